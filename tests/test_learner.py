"""The online learner: progressive validation, the frozen baseline, and learning a known world."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from olrec.features import FeatureSpec, encode, ml100k_spec
from olrec.learner import LearnerConfig, OnlineLearner
from olrec.metrics import auc, logloss
from olrec.progressive import run_progressive
from olrec.sources import SyntheticConfig, read_ml100k, read_synthetic

ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"


def _events(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({
        "user_id": rng.integers(0, 30, n), "item_id": rng.integers(0, 20, n),
        "ts": np.arange(n, dtype=np.float64), "label": rng.integers(0, 2, n).astype(np.int8),
        "genres": pa.array(rng.choice(["a", "a|b", "c"], n)),
    })


SPEC = FeatureSpec(multi=("genres",), counters=("user_id", "item_id", "user_id*genres"))


def test_a_batch_is_scored_before_its_labels_are_learned() -> None:
    """Flipping one event's label changes no prediction up to and including
    that event, but does change later events of the same batch (counters see
    earlier events of the batch) and of later batches."""
    events = _events(600)
    cfg = LearnerConfig(batch_size=100, warmup_events=0)
    a, b = OnlineLearner(SPEC, cfg), OnlineLearner(SPEC, cfg)
    for start in range(0, 300, 100):
        batch = encode(events.slice(start, 100), SPEC)
        pa_, pb = a.step(batch).pred, b.step(batch).pred
        np.testing.assert_array_equal(pa_, pb)
    # Batch 3: flip event 50's label for learner b.
    batch = encode(events.slice(300, 100), SPEC)
    flipped = encode(events.slice(300, 100), SPEC)
    flipped.label = flipped.label.copy()
    flipped.label[50] = 1 - flipped.label[50]
    pa_, pb = a.step(batch).pred, b.step(flipped).pred
    np.testing.assert_array_equal(pa_[:51], pb[:51])
    assert not np.allclose(pa_[51:], pb[51:])
    nxt = encode(events.slice(400, 100), SPEC)
    assert not np.allclose(a.step(nxt).pred, b.step(nxt).pred)


def test_frozen_copy_learns_nothing_and_is_independent() -> None:
    events = _events(800)
    learner = OnlineLearner(SPEC, LearnerConfig(batch_size=100, warmup_events=0))
    for start in range(0, 400, 100):
        learner.step(encode(events.slice(start, 100), SPEC))
    frozen = learner.frozen_copy()
    probe = encode(events.slice(400, 100), SPEC)
    before = frozen.predict(probe)
    # Scoring with flipped labels: a frozen model must not see any of them.
    flipped = encode(events.slice(400, 100), SPEC)
    flipped.label = 1 - flipped.label
    np.testing.assert_array_equal(frozen.predict(flipped), before)
    for start in range(400, 800, 100):  # the online learner goes on learning
        learner.step(encode(events.slice(start, 100), SPEC))
    np.testing.assert_array_equal(frozen.predict(probe), before)
    assert not np.allclose(learner.predict(probe), before)


def test_batch_size_warms_up_then_holds() -> None:
    learner = OnlineLearner(SPEC, LearnerConfig(batch_size=512, warmup_batch_size=32, warmup_events=2000))
    sizes = []
    events = _events(6000)
    pos = 0
    while pos < events.num_rows:
        size = learner.next_batch_size()
        sizes.append(size)
        learner.step(encode(events.slice(pos, size), SPEC))
        pos += size
    assert sizes[0] == 32 and sizes[-2] == 512
    assert all(x <= y for x, y in zip(sizes, sizes[1:-1]))


def test_expiry_evicts_ids_not_seen_for_ttl_events() -> None:
    learner = OnlineLearner(SPEC, LearnerConfig(batch_size=100, warmup_events=0, ttl_events=200, expire_every=1))
    old = pa.table({"user_id": np.arange(100), "item_id": np.zeros(100, np.int64), "ts": np.zeros(100),
                    "label": np.zeros(100, np.int8), "genres": pa.array(["a"] * 100)})
    learner.step(encode(old, SPEC))
    assert learner.rows_per_field()["user_id"] == 100
    fresh = _events(400, seed=1)  # user ids 0..29 only
    for start in range(0, 400, 100):
        learner.step(encode(fresh.slice(start, 100), SPEC))
    assert learner.rows_per_field()["user_id"] == 30
    assert learner.table.evictions >= 70  # the 70 idle users (and the idle item 0 / genre rows, if any)
    old_users = encode(old, SPEC)
    keys, spans = learner.field_keys(old_users)
    assert (learner.table.rows(keys[spans[0]])[30:] == 0).all()


def test_learns_a_known_world_close_to_the_truth() -> None:
    """After a long synthetic stream (MF-structured, drifting, new items), the
    last window's AUC is within 0.03 of the true probabilities' AUC and the
    logloss beats always predicting the base rate."""
    world = read_synthetic(SyntheticConfig(n_users=500, n_items=200, n_events=400_000, seed=3))
    learner = OnlineLearner(FeatureSpec(), LearnerConfig(dim=8, sparse_lr=0.2))
    res = run_progressive(world.drop(["p_true"]), learner, frozen_at=None)
    w = len(res.label) // 10
    y, p, truth = res.label[-w:], res.pred[-w:], world["p_true"].to_numpy()[-w:]
    assert auc(y, p) >= auc(y, truth) - 0.03, (auc(y, p), auc(y, truth))
    assert logloss(y, p) < logloss(y, np.full(w, y.mean()))


@pytest.mark.skipif(not ML100K.is_dir(), reason="MovieLens-100K not beside the repo")
def test_online_beats_frozen_on_movielens_second_half() -> None:
    events = read_ml100k(ML100K)
    res = run_progressive(events, OnlineLearner(ml100k_spec(), LearnerConfig()), frozen_at=0.5)
    online, frozen = res.after_split()
    assert frozen is not None and online.auc > frozen.auc + 0.05, (online.auc, frozen.auc)
    assert 0.9 < online.calibration < 1.1


def test_user_and_item_vectors_for_retrieval() -> None:
    """After learning, item vectors are the table's rows: distinct per item,
    the default row for an unknown one, and what the model scores with."""
    events = _events(2000)
    learner = OnlineLearner(SPEC, LearnerConfig(batch_size=200, warmup_events=0, dim=8))
    for start in range(0, 2000, 200):
        learner.step(encode(events.slice(start, 200), SPEC))
    items = learner.vectors("item_id", np.arange(20))
    assert items.shape == (20, 8) and len({tuple(v) for v in items}) == 20
    unknown = learner.vectors("item_id", np.array([10_000, 10_001]))
    np.testing.assert_array_equal(unknown[0], unknown[1])
    assert learner.vectors("user_id", np.arange(30)).shape == (30, 8)
    with pytest.raises(ValueError, match="genres"):
        learner.vectors("genres", np.arange(3))
