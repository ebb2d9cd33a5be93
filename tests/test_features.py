"""Features: encoding, per-key group statistics, counter keys, and leakage-free counters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from olrec.features import Batch, Counters, FeatureSpec, Groups, counter_keys, encode
from olrec.ids import hash_strings

ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"
GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance"]
SPEC = FeatureSpec(multi=("genres",), counters=("user_id", "item_id", "user_id*genres"))


def events(users, items, labels, genres=None, ts=None) -> pa.Table:
    n = len(users)
    cols = {
        "user_id": pa.array(users, pa.int64()),
        "item_id": pa.array(items, pa.int64()),
        "ts": pa.array(np.arange(n, dtype=np.float64) if ts is None else ts, pa.float64()),
        "label": pa.array(labels, pa.int8()),
    }
    cols["genres"] = pa.array(genres if genres is not None else ["Drama"] * n, pa.string())
    return pa.table(cols)


def random_events(rng: np.random.Generator, n: int, n_users: int = 4, n_items: int = 5) -> pa.Table:
    genres = ["|".join(rng.choice(GENRES, rng.integers(1, 4), replace=False)) for _ in range(n)]
    return events(rng.integers(0, n_users, n), rng.integers(0, n_items, n), rng.integers(0, 2, n), genres)


def with_labels(t: pa.Table, labels) -> pa.Table:
    return t.set_column(t.column_names.index("label"), "label", pa.array(np.asarray(labels), pa.int8()))


# -- Groups ------------------------------------------------------------------------

keys_and_vals = st.integers(0, 60).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(-3, 3), min_size=n, max_size=n),
        st.lists(st.integers(-5, 5), min_size=n, max_size=n),
    )
)


@settings(max_examples=60, deadline=None)
@given(keys_and_vals)
def test_exclusive_sum_equals_loop(kv):
    keys, vals = np.array(kv[0], np.int64), np.array(kv[1], np.float64)
    g = Groups(keys)
    expect = np.array([sum(vals[i] for i in range(j) if keys[i] == keys[j]) for j in range(len(keys))])
    np.testing.assert_allclose(g.exclusive_sum(vals), expect.reshape(vals.shape), atol=1e-9)
    # 2-D values: each column independently
    v2 = np.c_[vals, 2 * vals + 1]
    expect2 = np.array([[sum(v2[i, c] for i in range(j) if keys[i] == keys[j]) for c in range(2)]
                        for j in range(len(keys))]).reshape(v2.shape)
    np.testing.assert_allclose(g.exclusive_sum(v2), expect2, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(keys_and_vals)
def test_total_per_unique_key(kv):
    keys, vals = np.array(kv[0], np.int64), np.array(kv[1], np.float64)
    g = Groups(keys)
    ref: dict[int, float] = {}
    for k, v in zip(keys.tolist(), vals.tolist()):
        ref[k] = ref.get(k, 0.0) + v
    assert g.uniq.tolist() == sorted(ref)
    np.testing.assert_allclose(g.total(vals), [ref[k] for k in g.uniq.tolist()])
    # inverse maps each position to its key's slot in uniq
    np.testing.assert_array_equal(g.uniq[g.inverse], keys)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 70).flatmap(lambda n: st.tuples(
        st.lists(st.integers(0, 4), min_size=n, max_size=n),
        st.lists(st.sampled_from([0.0, 1.0, 0.25]), min_size=n, max_size=n))),
    st.floats(0.01, 0.99),
    st.integers(0, 2**31),
)
def test_ewma_equals_loop(kv, alpha, seed):
    keys, vals = np.array(kv[0], np.int64), np.array(kv[1], np.float64)
    g = Groups(keys)
    start = np.random.default_rng(seed).random(len(g.uniq))
    state = dict(zip(g.uniq.tolist(), start.tolist()))
    before = []
    for k, x in zip(keys.tolist(), vals.tolist()):
        before.append(state[k])
        state[k] = state[k] + alpha * (x - state[k])
    # Two columns: the drawn alpha and a fixed one, from the same starts.
    got_before, got_after = g.ewma(vals, np.stack([start, start], 1), np.array([alpha, 0.5]))
    np.testing.assert_allclose(got_before[:, 0], before, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got_after[:, 0], [state[k] for k in g.uniq.tolist()], rtol=1e-9, atol=1e-12)
    half = dict(zip(g.uniq.tolist(), start.tolist()))
    for k, x in zip(keys.tolist(), vals.tolist()):
        half[k] = half[k] + 0.5 * (x - half[k])
    np.testing.assert_allclose(got_after[:, 1], [half[k] for k in g.uniq.tolist()], rtol=1e-9, atol=1e-12)


def test_ewma_long_run_is_stable():
    keys = np.zeros(5000, np.int64)
    vals = np.ones(5000)
    before, after = Groups(keys).ewma(vals, np.array([[0.0]]), np.array([0.01]))
    assert np.isfinite(before).all()
    assert after[0, 0] == pytest.approx(1 - 0.99**5000)
    assert before[100, 0] == pytest.approx(1 - 0.99**100)


# -- encode and counter_keys ----------------------------------------------------------


def test_encode_keys_multi_and_labels():
    t = events([7, 8, 7], [1, 2, 3], [1, 0, 1], ["Action|Comedy", "Drama", None])
    b = encode(t, SPEC)
    assert isinstance(b, Batch) and len(b) == 3
    assert b.keys["user_id"].tolist() == [7, 8, 7]
    assert b.keys["item_id"].tolist() == [1, 2, 3]
    flat, lengths = b.multi["genres"]
    assert lengths.tolist() == [2, 1, 1]
    np.testing.assert_array_equal(flat[:3], hash_strings(np.array(["Action", "Comedy", "Drama"], dtype=object)))
    assert b.label.tolist() == [1.0, 0.0, 1.0] and b.label.dtype == np.float32
    assert b.weight.tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="genres"):
        encode(t.drop(["genres"]), SPEC)


def test_rows_without_a_weight_weigh_one_when_streamed_with_weighted_rows():
    # File events (no weight column) and Feedback events (weight 0.5) in one batch, as the trainer concatenates them.
    weighted = events([9], [4], [1], ["Drama"]).append_column("weight", pa.array([0.5], pa.float32()))
    t = pa.concat_tables([events([7, 8], [1, 2], [1, 0], ["Action", "Drama"]), weighted], promote_options="default")
    assert t["weight"].null_count == 2
    assert encode(t, SPEC).weight.tolist() == [1.0, 1.0, 0.5]


def test_counter_keys_cross_with_multi_field():
    t = events([1, 2, 1, 1], [5, 5, 6, 7], [0, 1, 0, 1], ["Action|Comedy", "Action", "Comedy|Drama|Action", "Drama"])
    b = encode(t, SPEC)
    k, ev = counter_keys(b, "user_id*genres")
    assert ev.tolist() == [0, 0, 1, 2, 2, 2, 3]
    pairs = [(1, "Action"), (1, "Comedy"), (2, "Action"), (1, "Comedy"), (1, "Drama"), (1, "Action"), (1, "Drama")]
    # same (user, genre) pair -> same key; different pairs -> different keys
    for a in range(len(pairs)):
        for c in range(len(pairs)):
            assert (k[a] == k[c]) == (pairs[a] == pairs[c]), (pairs[a], pairs[c])
    # a cross key differs from the plain user and genre keys
    assert not set(k.tolist()) & set(b.keys["user_id"].tolist())
    assert not set(k.tolist()) & set(b.multi["genres"][0].tolist())
    # order of the parts doesn't matter
    k2, ev2 = counter_keys(b, "genres*user_id")
    np.testing.assert_array_equal(k2, k)
    np.testing.assert_array_equal(ev2, ev)
    # single fields
    ku, evu = counter_keys(b, "user_id")
    assert ku.tolist() == [1, 2, 1, 1] and evu.tolist() == [0, 1, 2, 3]
    kg, evg = counter_keys(b, "genres")
    assert evg.tolist() == ev.tolist() and len(np.unique(kg)) == 3


# -- Counters: leakage, online vs frozen, update -------------------------------------


def _warm_counters(rng: np.random.Generator) -> Counters:
    c = Counters(SPEC)
    for _ in range(2):
        b = encode(random_events(rng, 30), SPEC)
        c.update(b, c.features(b, online=True)[1])
    return c


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 40), st.booleans())
def test_no_leakage_of_own_label_online(seed, n, warm):
    rng = np.random.default_rng(seed)
    c = _warm_counters(rng) if warm else Counters(SPEC)
    t = random_events(rng, n)
    base, _ = c.features(encode(t, SPEC), online=True)
    assert base.shape == (n, c.width)
    assert c.width == 3 * 3 + 2 + 1
    j = int(rng.integers(0, n))
    y = t["label"].to_numpy().copy()
    y[j] = 1 - y[j]
    flipped, _ = c.features(encode(with_labels(t, y), SPEC), online=True)
    # event j's features, and every earlier event's, ignore label j (up to
    # float rounding: the batch-wide cumsum behind the exclusive sum runs
    # through other keys' values, so a ~1e-17 residue of label j can remain)
    np.testing.assert_allclose(flipped[: j + 1], base[: j + 1], rtol=1e-6, atol=1e-6)


def test_online_features_do_use_earlier_labels_in_the_batch():
    """The counterpart of the leakage test: a later event of the same user sees an earlier label."""
    c = Counters(SPEC)
    t = events([1, 2, 1], [10, 11, 12], [0, 0, 0], ["Drama", "Drama", "Drama"])
    a, _ = c.features(encode(t, SPEC), online=True)
    b, _ = c.features(encode(with_labels(t, [1, 0, 0]), SPEC), online=True)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[2], b[2])  # user 1 again: its rate moved
    assert b[2, 0] > a[2, 0]  # user rate feature rose with the positive label
    assert a[2, 1] == pytest.approx(np.log1p(1))  # one earlier event of user 1
    assert a[1, 1] == 0.0  # user 2 never seen before


def test_no_leakage_with_repeated_multi_value_in_one_event():
    c = Counters(SPEC)
    t = events([1, 1], [5, 6], [0, 0], ["Drama|Drama", "Drama"])
    a, _ = c.features(encode(t, SPEC), online=True)
    b, _ = c.features(encode(with_labels(t, [1, 0]), SPEC), online=True)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 40))
def test_frozen_features_ignore_all_batch_labels(seed, n):
    rng = np.random.default_rng(seed)
    c = _warm_counters(rng)
    t = random_events(rng, n)
    a, _ = c.features(encode(t, SPEC), online=False)
    b, _ = c.features(encode(with_labels(t, rng.integers(0, 2, n)), SPEC), online=False)
    ones, _ = c.features(encode(with_labels(t, np.ones(n)), SPEC), online=False)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, ones)
    # frozen features of a repeated event are identical: no running sums
    t2 = events([3, 3, 3], [1, 1, 1], [1, 1, 1])
    f, _ = c.features(encode(t2, SPEC), online=False)
    np.testing.assert_array_equal(f[0], f[2])


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 30))
def test_frozen_features_are_each_event_scored_alone_online(seed, n):
    """The frozen path reads each key's stored state directly; online, an event
    alone in its batch sees exactly that state too (no earlier events to add)."""
    rng = np.random.default_rng(seed)
    c = _warm_counters(rng)
    b = encode(random_events(rng, n), SPEC)
    frozen, update = c.features(b, online=False)
    assert update is None  # nothing to learn from a frozen read
    alone = np.concatenate([c.features(b.slice(j, j + 1), online=True)[0] for j in range(n)])
    np.testing.assert_allclose(frozen, alone, rtol=1e-6, atol=1e-6)


def test_update_makes_next_batch_see_the_counts():
    c = Counters(SPEC)
    a = SPEC.prior_strength
    b1 = encode(events([1, 1, 1, 2], [10, 11, 10, 12], [1, 1, 0, 0]), SPEC)
    f1, up = c.features(b1, online=True)
    # before the update the state is empty: frozen features see nothing
    f0, _ = c.features(encode(events([1], [10], [0]), SPEC), online=False)
    assert f0[0, 1] == 0.0
    c.update(b1, up)
    assert c.total.tolist() == [4.0, 2.0]

    f2, _ = c.features(encode(events([1, 2, 9], [10, 12, 99], [0, 1, 0]), SPEC), online=False)
    prior = (2 + 1) / (4 + 2)
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    # user_id counter: columns 0 (rate), 1 (log count)
    assert f2[0, 1] == pytest.approx(np.log1p(3))
    assert f2[0, 0] == pytest.approx(logit((2 + a * prior) / (3 + a)), rel=1e-5)
    assert f2[1, 1] == pytest.approx(np.log1p(1))
    assert f2[1, 0] == pytest.approx(logit((0 + a * prior) / (1 + a)), rel=1e-5)
    assert f2[2, 1] == 0.0 and f2[2, 0] == pytest.approx(logit(prior), rel=1e-5)  # unseen user: the prior
    # item_id counter: columns 3, 4
    assert f2[0, 4] == pytest.approx(np.log1p(2))
    assert f2[0, 3] == pytest.approx(logit((1 + a * prior) / (2 + a)), rel=1e-5)
    # user*genres: user 1 had three Drama events
    assert f2[0, 7] == pytest.approx(np.log1p(3))
    # global rate, last column
    assert f2[0, -1] == pytest.approx(logit(prior), rel=1e-5)
    # the recency averages moved from the starting global rate towards user 1's labels
    assert f2[0, 9] != f2[2, 9]


def test_split_batches_equal_one_batch_online():
    """Learning once per micro-batch loses nothing: features of a stream split in two
    batches (with an update between) equal those of the stream as one batch."""
    rng = np.random.default_rng(5)
    first = random_events(rng, 40, n_users=3, n_items=4)
    # the second part only uses users, items and genres already seen, so the
    # moving averages start from stored values in both cases
    u = first["user_id"].to_numpy()
    second = events(rng.choice(np.unique(u), 25), rng.choice(np.unique(first["item_id"].to_numpy()), 25),
                    rng.integers(0, 2, 25), ["|".join(rng.choice(GENRES, 2, replace=False)) for _ in range(25)],
                    ts=np.arange(40, 65, dtype=np.float64))
    seen = set("|".join(first["genres"].to_pylist()).split("|"))
    if not all(set(g.split("|")) <= seen for g in second["genres"].to_pylist()):
        second = second.set_column(4, "genres", first["genres"].slice(0, 25).combine_chunks())
    whole = pa.concat_tables([first, second])

    c1 = Counters(SPEC)
    f_whole, _ = c1.features(encode(whole, SPEC), online=True)

    c2 = Counters(SPEC)
    b1 = encode(first, SPEC)
    fa, up = c2.features(b1, online=True)
    c2.update(b1, up)
    fb, _ = c2.features(encode(second, SPEC), online=True)
    np.testing.assert_allclose(np.r_[fa, fb], f_whole, rtol=1e-4, atol=1e-5)


# -- FeatureSpec ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(categorical=("item_id",)), "user_id"),
        (dict(categorical=("user_id",)), "item_id"),
        (dict(categorical=("user_id", "item_id", "city"), numeric=("city",)), "city"),
        (dict(numeric=("ts",)), "ts"),
        (dict(numeric=("label",)), "label"),
        (dict(counters=("user_id", "item_id", "user_id*city")), "city"),
        (dict(multi=("g", "h"), counters=("user_id", "item_id", "user_id*g*h")), "user_id*g*h"),
        (dict(recency=(("genres", 0.1),)), "genres"),
        (dict(recency=(("user_id", 1.5),)), "alpha"),
        (dict(recency=(("user_id", 0.0),)), "alpha"),
        (dict(prior_strength=0.0), "prior_strength"),
    ],
)
def test_feature_spec_validation_names_the_field(kw, needle):
    with pytest.raises(ValueError, match=needle.replace("*", r"\*")):
        FeatureSpec(**kw)


def test_counters_need_user_and_item():
    with pytest.raises(ValueError, match="user_id"):
        Counters(FeatureSpec(counters=("user_id",), recency=()))


@pytest.mark.skipif(not (ML100K / "u.data").is_file(), reason="MovieLens-100K not available")
def test_infer_on_movielens():
    from olrec.sources import read_ml100k

    t = read_ml100k(ML100K)
    spec = FeatureSpec.infer(t.schema, t.slice(0, 2000))
    assert "genres" in spec.multi and "genres" not in spec.categorical
    assert "year" in spec.numeric
    assert {"age", "gender", "occupation", "zip"} <= set(spec.categorical)
    assert spec.categorical[:2] == ("user_id", "item_id")
    for reserved in ("ts", "label", "event_id"):
        assert reserved not in (*spec.categorical, *spec.multi, *spec.numeric)
    assert "user_id*genres" in spec.counters
    # overrides win; without a sample, nothing is multi-valued
    assert FeatureSpec.infer(t.schema, t.slice(0, 100), numeric=()).numeric == ()
    assert FeatureSpec.infer(t.schema).multi == ()
    # the inferred spec encodes the table and gives finite features
    b = encode(t.slice(0, 500), spec)
    f, _ = Counters(spec).features(b, online=True)
    assert np.isfinite(f).all() and f.shape == (500, spec.n_numeric - len(spec.numeric))


def test_missing_categorical_values_encode_as_their_own_key():
    """A null in a string column (an event without that context field) is key -1,
    and the other values keep the keys they have without nulls around."""
    from olrec.features import FeatureSpec, encode

    spec = FeatureSpec(categorical=("user_id", "item_id", "city"))
    base = events([1, 2, 3], [4, 5, 6], [1, 0, 1])
    with_nulls = encode(base.append_column("city", pa.array(["Oslo", None, "Rome"])), spec)
    without = encode(base.append_column("city", pa.array(["Oslo", "Rome", "Rome"])), spec)
    assert with_nulls.keys["city"][1] == -1
    assert with_nulls.keys["city"][0] == without.keys["city"][0] and with_nulls.keys["city"][2] == without.keys["city"][2]
