"""The serving replica's logic without Ray Serve: mirrors, the catalog, scoring
from a checkpoint, and request validation."""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from olrec.features import encode, ml100k_spec
from olrec.ids import EMPTY
from olrec.serving import (Catalog, MirrorStore, RequestError, RowMirror, ServeConfig, ServingModel, check_context,
                           check_ids, check_token, feedback_table)
from olrec.v1 import recommender_pb2 as pb

from servingrun import ML100K, make_run

pytestmark = pytest.mark.skipif(not ML100K.is_dir(), reason="MovieLens-100K not beside the repo")


def raw_events(c: Catalog, user: int, items: np.ndarray, context: dict) -> pa.Table:
    """The (user, item) pairs as unlabelled events with every feature column from
    the log's raw values: what ``Catalog.batch`` must encode to, built the slow way."""
    raw = pa.concat_tables(list(c.log.read(0, c.end, columns=["item_id", *c.item_side]))).to_pandas()
    raw = raw.drop_duplicates("item_id", keep="last").set_index("item_id")
    n = len(items)
    cols = {"user_id": pa.array(np.full(n, user, np.int64)), "item_id": pa.array(items),
            "ts": pa.array(np.zeros(n)), "label": pa.array(np.zeros(n, np.int8))}
    profile = c.users.get(int(user), {})
    for f in c.features:
        kind = pa.float64() if f in c.spec.numeric else pa.string()
        if f in c.item_side:
            cols[f] = pa.array([None if pd.isna(x) else x for x in raw[f].reindex(items)], type=kind)
        else:
            cols[f] = pa.array([context.get(f, profile.get(f))] * n, type=kind)
    return pa.table(cols)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    return root, make_run(root)


@pytest.mark.parametrize("dtype,tol", [("fp32", 0.0), ("fp16", 1e-3), ("int8", 1 / 127)])
@given(rows=st.lists(st.lists(st.floats(-4, 4, width=32), min_size=5, max_size=5), min_size=1, max_size=40))
@settings(max_examples=25, deadline=None)
def test_row_mirror_round_trips_within_its_precision(dtype, tol, rows):
    m = RowMirror(5, dtype)
    w = np.asarray(rows, np.float32)
    keys = np.arange(len(w), dtype=np.int64) * 7919 + 3
    m.update(keys, w)
    got = m.gather(m.rows(keys))
    scale = np.abs(w).max(1, keepdims=True) if dtype == "int8" else np.maximum(np.abs(w), 1.0)
    assert np.all(np.abs(got - w) <= tol * scale + 1e-7)
    assert np.all(m.rows(np.array([10**12])) == 0)  # not held: the default row


def test_row_mirror_updates_rows_in_place_and_keeps_the_default_row():
    m = RowMirror(2)
    m.update(np.array([EMPTY, 5, 9]), np.array([[0.5, 0.5], [1, 2], [3, 4]], np.float32))
    m.update(np.array([9, 11]), np.array([[7, 7], [8, 8]], np.float32))
    assert len(m) == 3
    np.testing.assert_array_equal(m.gather(m.rows(np.array([5, 9, 11, 404]))),
                                  [[1, 2], [7, 7], [8, 8], [0.5, 0.5]])


def test_mirror_store_honours_unique_fetches_and_refuses_writes():
    m = RowMirror(1)
    m.update(np.array([1, 2]), np.array([[1.0], [2.0]], np.float32))
    store = MirrorStore({"t": m})
    got = store.fetch("t", np.array([2, 77, 88]), unique=True)
    np.testing.assert_array_equal(got.weights[:, 0], [2.0, 0.0, 0.0])  # one row per key, unknown ones included
    dup = store.fetch("t", np.array([1, 1, 2]))
    np.testing.assert_array_equal(dup.weights[dup.inverse, 0], [1.0, 1.0, 2.0])
    with pytest.raises(TypeError, match="read-only"):
        store.apply("t", got, np.zeros((3, 1)))


def test_catalog_tells_item_side_from_user_side_fields(run):
    root, _ = run
    c = Catalog(root / "log", ml100k_spec())
    c.add(c.read_new())
    assert c.item_side == ["genres", "year"]
    assert c.user_side == ["age", "gender", "occupation", "zip"]
    assert c.read_new() is None  # nothing new
    t = raw_events(c, 259, np.array([1, 999_999]), {"occupation": "writer"})
    row = t.to_pylist()
    assert row[0]["genres"] == "Animation|Children's|Comedy" and row[1]["genres"] is None  # unknown item: no profile
    assert row[0]["occupation"] == "writer" and row[0]["gender"] == c.users[259]["gender"]


def test_catalog_waits_for_enough_events_to_tell_the_sides(tmp_path):
    from olrec.log import EventLog
    from olrec.sources import read_ml100k

    events = read_ml100k(ML100K)
    with EventLog(tmp_path / "log") as log:
        log.append(events.slice(0, 100))  # one event per item so far: every field looks item-side
        c = Catalog(tmp_path / "log", ml100k_spec())
        c.add(c.read_new())
        assert c.item_side is None and c.end == 0  # the log is growing: read again next time
        log.append(events.slice(100, 2_000))
        c.add(c.read_new())  # enough events (2,100) to judge
    assert c.item_side == ["genres", "year"] and c.end == 2_100
    # A log that stays small is judged on its second read.
    with EventLog(tmp_path / "small") as log:
        log.append(events.slice(0, 500))
    small = Catalog(tmp_path / "small", ml100k_spec())
    small.add(small.read_new())
    assert small.item_side is None
    small.add(small.read_new())
    assert small.item_side is not None and small.end == 500


@pytest.mark.parametrize("rows,tol", [("fp32", 1e-6), ("fp16", 2e-3)])
def test_serving_only_mode_scores_as_the_trained_learner(run, rows, tol):
    root, learner = run
    model = ServingModel(ServeConfig(run_dir=str(root), rows=rows))
    assert not model.ready
    model.apply(model.read_update())
    snap = model.snapshot
    assert snap.watermark == 20_000 and snap.dense_version == "20000" and snap.source.startswith("checkpoint:")
    first_user = 259  # the first user of the stream: trained, so it has a row
    items = np.array([1, 50, 100, 181, 242])
    snap, emb, num, p_wide = model.inputs(first_user, items, {})
    served = snap.learner.blend_probs(snap.learner.model(emb, num), p_wide)
    expect = learner.predict(encode(raw_events(model.catalog, first_user, items, {}), model.spec))
    np.testing.assert_allclose(served, expect, atol=tol)


def test_retrieval_is_personal_for_known_users_and_popular_for_new_ones(run):
    root, _ = run
    model = ServingModel(ServeConfig(run_dir=str(root), exclude_clicked=True))
    model.apply(model.read_update())
    items, personal = model.retrieve(259, 50, exclude=[22])
    assert personal and len(items) == 50 and 22 not in items
    assert not set(items.tolist()) & model.catalog.clicked[259]
    items, personal = model.retrieve(10**9, 10, exclude=[])
    assert not personal
    np.testing.assert_array_equal(items, model.catalog.popular()[:10])


def test_no_model_yet_is_unavailable(tmp_path):
    from olrec.log import EventLog
    from olrec.learner import LearnerConfig
    from olrec.train import RunPaths, write_model

    EventLog(tmp_path / "log")
    write_model(RunPaths(tmp_path), ml100k_spec(), LearnerConfig(), 1)
    model = ServingModel(ServeConfig(run_dir=str(tmp_path)))
    model.apply(model.read_update())
    with pytest.raises(RequestError, match="no model yet") as e:
        model.inputs(1, np.array([1]), {})
    assert e.value.code == "UNAVAILABLE"


def test_context_checks_name_the_field_and_value():
    spec = ml100k_spec()
    allowed = ["age", "gender", "occupation", "zip", "year"]
    assert check_context({"age": pb.Value(text="25-34"), "year": pb.Value(number=1990)}, allowed, spec, "context") == \
        {"age": "25-34", "year": 1990.0}
    cases = [({"colour": pb.Value(text="x")}, "unknown field 'colour'"),
             ({"age": pb.Value()}, r"context\['age'\]: no value"),
             ({"age": pb.Value(number=3)}, "must be text"),
             ({"year": pb.Value(text="1990")}, "must be a number"),
             ({"year": pb.Value(number=math.inf)}, "finite number, got inf")]
    for ctx, message in cases:
        with pytest.raises(RequestError, match=message) as e:
            check_context(ctx, allowed, spec, "context")
        assert e.value.code == "INVALID_ARGUMENT"
    with pytest.raises(RequestError, match="item_ids: must not be empty"):
        check_ids([], "item_ids", 10, allow_empty=False)
    with pytest.raises(RequestError, match="item_ids: 11 ids, more than the maximum 10"):
        check_ids(list(range(11)), "item_ids", 10, allow_empty=False)


def test_feedback_events_become_a_log_table_or_a_named_error():
    spec = ml100k_spec()
    events = [pb.Event(user_id=1, item_id=2, label=1, context={"genres": pb.Value(text="Drama")}),
              pb.Event(user_id=3, item_id=4, label=0, ts=5.0, weight=2.0, event_id=77)]
    t = feedback_table(events, spec, 100, now=123.0)
    rows = t.to_pylist()
    assert rows[0]["ts"] == 123.0 and rows[0]["genres"] == "Drama" and rows[1]["weight"] == 2.0
    assert rows[1]["event_id"] == 77 and rows[0]["event_id"] is None
    for e, message in [(pb.Event(label=2), r"events\[0\].label: must be 0 or 1, got 2"),
                       (pb.Event(ts=math.nan), r"events\[0\].ts"),
                       (pb.Event(weight=-1), r"events\[0\].weight"),
                       (pb.Event(context={"user_id": pb.Value(text="x")}), "unknown field 'user_id'")]:
        with pytest.raises(RequestError, match=message):
            feedback_table([e], spec, 100, now=0.0)
    with pytest.raises(RequestError, match="events: must not be empty"):
        feedback_table([], spec, 100, now=0.0)


def test_bearer_token():
    check_token([], None)
    check_token([("authorization", "Bearer s3cret")], "s3cret")
    for md in ([], [("authorization", "Bearer nope")], [("authorization", "s3cret")]):
        with pytest.raises(RequestError) as e:
            check_token(md, "s3cret")
        assert e.value.code == "UNAUTHENTICATED"


def test_serve_config_names_bad_values():
    with pytest.raises(ValueError, match="max_k must be an integer >= 1, got 0"):
        ServeConfig(run_dir="x", max_k=0)
    with pytest.raises(ValueError, match="rows must be"):
        ServeConfig(run_dir="x", rows="bf16")


def test_learn_into_run_refuses_a_run_with_events(run):
    from olrec.learner import LearnerConfig
    from olrec.train import learn_into_run

    root, _ = run
    with pytest.raises(ValueError, match="is not empty"):
        learn_into_run(Catalog(root / "log", ml100k_spec()).read_new(), ml100k_spec(), LearnerConfig(), root)


def test_the_catalog_batch_is_what_encode_gives(run):
    root, _ = run
    c = Catalog(root / "log", ml100k_spec())
    c.add(c.read_new())
    items = np.array([1, 50, 999_999, 1, 181])  # an unknown item, a repeat
    for user, ctx in [(259, {}), (259, {"occupation": "writer"}), (10**9, {}), (10**9, {"age": "25-34"})]:
        got, want = c.batch(user, items, ctx), encode(raw_events(c, user, items, ctx), c.spec)
        assert got.keys.keys() == want.keys.keys()
        for f in want.keys:
            np.testing.assert_array_equal(got.keys[f], want.keys[f], err_msg=f)
        for f in want.multi:
            for a, b in zip(got.multi[f], want.multi[f]):
                np.testing.assert_array_equal(a, b, err_msg=f)
        np.testing.assert_array_equal(got.numeric, want.numeric)
        np.testing.assert_array_equal(got.label, want.label)


def test_live_shards_are_looked_up_once_and_again_after_they_go(tmp_path, ray_cluster, monkeypatch):
    """A replica finds the trainer's shard actors by name once (not at every refresh),
    falls back to the checkpoint when they die, and finds a new trainer's shards."""
    from olrec.checkpoint import CheckpointStore
    from olrec.learner import LearnerConfig, learner_tables
    from olrec.ps import LocalShard
    from olrec.train import NAMESPACE, RunPaths, publish_dense, shard_name

    learner = make_run(tmp_path, n_events=2_000, shards=1)
    paths = RunPaths(tmp_path)
    publish_dense(paths, learner, 2_000)
    snapshot = str(CheckpointStore(paths.checkpoints).latest().file("shard-0000.pkl"))
    actor = ray_cluster.remote(num_cpus=0)(LocalShard)

    def start_shard():
        handle = actor.options(name=shard_name(tmp_path, 0), namespace=NAMESPACE).remote(
            learner_tables(ml100k_spec(), LearnerConfig()), 0)
        ray_cluster.get(handle.restore.remote(snapshot))
        return handle

    model = ServingModel(ServeConfig(run_dir=str(tmp_path)))
    shard = start_shard()
    lookups: list = []
    real = ray_cluster.get_actor
    monkeypatch.setattr(ray_cluster, "get_actor", lambda *a, **kw: lookups.append(a) or real(*a, **kw))
    for _ in range(5):
        model.apply(model.read_update())
    assert model.snapshot.source.startswith("live:") and len(lookups) == 1
    ray_cluster.kill(shard)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # kill() returns before the actor is gone: calls may still be answered
        try:
            ray_cluster.get(shard.stats.remote(), timeout=30)
            time.sleep(0.1)
        except ray_cluster.exceptions.RayActorError:
            break
    else:
        pytest.fail("the killed shard still answers after 30 s")
    model.apply(model.read_update())  # the call to the dead shard fails, and no shard has its name now
    assert model.snapshot.source.startswith("checkpoint:") and model.snapshot.watermark == 2_000
    monkeypatch.setattr(ray_cluster, "get_actor", real)
    shard = start_shard()  # a new trainer's (held: an actor without a handle goes away)
    model.apply(model.read_update())
    assert model.snapshot.source.startswith("live:") and model.snapshot.watermark == 2_000
