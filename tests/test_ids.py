"""IdMap (collisionless int64 key -> row) and hash_strings."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from olrec.ids import EMPTY, IdMap, grown, hash_strings

I64_MIN = int(np.iinfo(np.int64).min)
I64_MAX = int(np.iinfo(np.int64).max)

# Keys: a small pool (forces duplicates across and within batches) mixed with
# the extremes of int64 (negative, huge) — never the reserved minimum.
valid_key = st.one_of(
    st.integers(-20, 20),
    st.sampled_from([I64_MIN + 1, I64_MIN + 2, -1, I64_MAX, I64_MAX - 1, 1 << 62, -(1 << 62), 1 << 32]),
    st.integers(I64_MIN + 1, I64_MAX),
)
batches = st.lists(st.lists(valid_key, max_size=40), max_size=12)


def _reference(batches_: list[list[int]]) -> dict[int, int]:
    ref: dict[int, int] = {}
    for b in batches_:
        for k in b:
            ref.setdefault(k, len(ref))
    return ref


@settings(max_examples=60, deadline=None)
@given(batches, st.integers(1, 64))
def test_insert_matches_first_seen_reference(bs, capacity):
    m = IdMap(capacity=capacity)
    ref: dict[int, int] = {}
    for b in bs:
        got = m.insert(np.array(b, np.int64))
        for k in b:
            ref.setdefault(k, len(ref))
        # rows returned for this batch are the reference rows (a key keeps its row forever)
        assert got.tolist() == [ref[k] for k in b]
        assert m.size == len(ref)
        # every key seen so far still maps to its original row
        keys = np.array(list(ref), np.int64)
        assert m.get(keys).tolist() == list(ref.values())
    assert m.size == len(ref)
    keys, rows = m.items()
    # rows are exactly 0..size-1, ordered by first sight, one key per row
    assert rows.tolist() == list(range(len(ref)))
    assert keys.tolist() == list(ref)
    assert len(set(keys.tolist())) == len(keys)


@settings(max_examples=40, deadline=None)
@given(batches, st.lists(valid_key, max_size=30))
def test_get_absent_is_minus_one_and_shape_preserved(bs, probe):
    m = IdMap()
    ref = _reference(bs)
    for b in bs:
        m.insert(np.array(b, np.int64))
    size_before = m.size
    probe_arr = np.array(probe, np.int64)
    got = m.get(probe_arr)
    assert got.tolist() == [ref.get(k, -1) for k in probe]
    # get never inserts
    assert m.size == size_before
    # shape is preserved for 2-D input
    if len(probe) >= 2 and len(probe) % 2 == 0:
        grid = probe_arr.reshape(2, -1)
        g2 = m.get(grid)
        assert g2.shape == grid.shape
        assert g2.ravel().tolist() == got.tolist()


def test_get_and_insert_preserve_shape():
    m = IdMap()
    keys = np.array([[5, 6, 5], [7, 5, 8]], np.int64)
    rows = m.insert(keys)
    assert rows.shape == (2, 3)
    assert rows.tolist() == [[0, 1, 0], [2, 0, 3]]
    assert m.get(keys).tolist() == rows.tolist()
    assert m.get(np.array([[9, 5]])).tolist() == [[-1, 0]]
    assert m.get(np.zeros((0,), np.int64)).shape == (0,)
    assert m.get(np.int64(6)).shape == ()
    assert int(m.get(np.int64(6))) == 1


@settings(max_examples=40, deadline=None)
@given(st.lists(valid_key, unique=True, max_size=200))
def test_from_keys_items_round_trip(keys):
    m = IdMap.from_keys(np.array(keys, np.int64))
    k, r = m.items()
    assert k.tolist() == keys
    assert r.tolist() == list(range(len(keys)))
    m2 = IdMap.from_keys(k)
    assert m2.get(np.array(keys, np.int64)).tolist() == list(range(len(keys)))


def test_growth_over_many_doublings_keeps_all_mappings():
    rng = np.random.default_rng(0)
    m = IdMap(capacity=2)
    cap0 = m.capacity
    all_keys = rng.choice(np.arange(-(10**12), 10**12, 7919), size=50_000, replace=False).astype(np.int64)
    # sequential ids too: the pattern Fibonacci hashing must spread
    all_keys[:10_000] = np.arange(10_000)
    for chunk in np.array_split(all_keys, 37):
        m.insert(chunk)
    assert m.capacity >= cap0 * 2**10  # many doublings happened
    assert m.size == len(all_keys)
    assert m.capacity >= 2 * m.size  # load factor stays <= 1/2
    np.testing.assert_array_equal(m.get(all_keys), np.arange(len(all_keys)))
    # absent keys are still absent after all that growth
    assert (m.get(np.array([10**12 + 1, -(10**12) - 1, 3 + 7919 * 10**8])) == -1).all()


def test_one_big_batch_with_duplicates():
    rng = np.random.default_rng(1)
    keys = rng.integers(0, 5_000, size=40_000)
    m = IdMap(capacity=4)
    rows = m.insert(keys)
    _, first = np.unique(keys, return_index=True)
    order = keys[np.sort(first)]
    assert m.size == len(order)
    np.testing.assert_array_equal(m.get(order), np.arange(len(order)))
    # same key -> same row; different keys -> different rows
    pairs = np.unique(np.c_[keys, rows], axis=0)
    assert len(pairs) == len(order)
    assert len(np.unique(pairs[:, 1])) == len(order)


def test_reserved_key_rejected_and_nothing_inserted():
    m = IdMap()
    m.insert(np.array([1, 2]))
    with pytest.raises(ValueError, match="reserved"):
        m.insert(np.array([3, EMPTY, 4], np.int64))
    assert m.size == 2
    assert m.get(np.array([3, 4])).tolist() == [-1, -1]
    assert EMPTY == I64_MIN


def test_hash_strings_deterministic_negative_distinct():
    sample = np.array([f"item-{i}" for i in range(5000)] + ["", "a", "A", "ü", "a|b", "b|a", " a"], dtype=object)
    h1 = hash_strings(sample)
    h2 = hash_strings(sample.copy())
    assert h1.dtype == np.int64
    np.testing.assert_array_equal(h1, h2)
    assert (h1 < 0).all()
    assert (h1 != EMPTY).all()
    assert len(np.unique(h1)) == len(sample)
    # order-independent: a string's key doesn't depend on its neighbours
    np.testing.assert_array_equal(hash_strings(sample[::-1]), h1[::-1])
    # a single value hashes the same as in a batch
    assert hash_strings(np.array(["item-0"], dtype=object))[0] == h1[0]


def test_hash_strings_stable_across_processes():
    import subprocess
    import sys
    from pathlib import Path

    code = "import numpy as np; from olrec.ids import hash_strings; print(hash_strings(np.array(['Drama','x'], dtype=object)).tolist())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345", "PATH": ""},
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == str(hash_strings(np.array(["Drama", "x"], dtype=object)).tolist())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 127), st.integers(0, 2**56 - 1)), min_size=1, max_size=200))
def test_tagged_keys_of_distinct_fields_or_ids_never_collide(pairs) -> None:
    from olrec.ids import tag_keys

    keys = {int(tag_keys(np.array([i], np.int64), t)[0]): (t, i) for t, i in pairs}
    assert len(keys) == len(set(pairs))  # one key per distinct (field, id)
    assert all(k >= 0 for k in keys)  # never the reserved key


def test_tag_out_of_range_is_refused() -> None:
    from olrec.ids import tag_keys

    with pytest.raises(ValueError, match="tag"):
        tag_keys(np.array([1]), 128)


def test_index_is_row_plus_one_and_by_index_holds_the_keys():
    m = IdMap(capacity=2)
    m.insert(np.array([5, 6, 5, 7]))
    assert m.index(np.array([[6, 9], [5, 7]])).tolist() == [[2, 0], [1, 3]]
    assert m.by_index.tolist() == [EMPTY, 5, 6, 7]
    with pytest.raises(ValueError):
        m.by_index[1] = 8  # read-only: the map's own keys
    assert m.get(np.array([6, 9])).tolist() == [1, -1]


@settings(max_examples=40, deadline=None)
@given(st.lists(valid_key, unique=True, max_size=60), st.lists(valid_key, unique=True, max_size=60))
def test_insert_unique_flag_gives_the_same_rows(first, second):
    a, b = IdMap(capacity=1), IdMap(capacity=1)
    a.insert(np.array(first, np.int64))
    b.insert(np.array(first, np.int64), unique=True)
    np.testing.assert_array_equal(a.insert(np.array(second, np.int64)),
                                  b.insert(np.array(second, np.int64), unique=True))
    np.testing.assert_array_equal(a.items()[0], b.items()[0])


def test_memory_per_key_stays_small_through_growth():
    """Keys stored once (8 bytes, <= 25 % slack once large) and 4-byte slots at
    load <= 1/2: under 28 bytes per key at every size on the way."""
    rng = np.random.default_rng(0)
    keys = rng.integers(-(2**62), 2**62, 300_000)
    m = IdMap()
    worst = 0.0
    for chunk in np.array_split(keys, 60):
        m.insert(chunk)
        if m.size >= 20_000:
            worst = max(worst, m.nbytes / m.size)
            assert m.capacity >= 2 * m.size
    assert worst < 28, worst
    np.testing.assert_array_equal(m.get(keys), np.arange(len(keys)))


def test_grown_slack():
    for n in (0, 1, 100, 60_000):
        assert grown(n) >= max(n * 3 // 2, n + 16)
    for n in (1 << 16, 10**6, 10**9):
        assert n < grown(n) <= n * 5 // 4
