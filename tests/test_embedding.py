"""EmbeddingTable: collisionless rows, admission, expiry, sparse optimizers, deltas, state."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from olrec.embedding import EmbeddingTable, TableConfig
from olrec.ids import EMPTY


def table(**kw) -> EmbeddingTable:
    kw.setdefault("name", "emb")
    return EmbeddingTable(TableConfig(**kw))


def by_key(t: EmbeddingTable, keys) -> np.ndarray:
    """Weights of ``keys`` looked up through the table's own id map."""
    return t.gather(t.rows(np.asarray(keys, np.int64))).copy()


# -- collisionless ----------------------------------------------------------


def test_no_two_ids_share_a_row():
    rng = np.random.default_rng(0)
    t = table(dim=4)
    ids = np.concatenate([rng.integers(-(2**62), 2**62, 30_000), np.arange(20_000), np.arange(20_000)])
    rng.shuffle(ids)
    all_rows = []
    for chunk in np.array_split(ids, 23):
        all_rows.append(t.observe(chunk))
    rows = np.concatenate(all_rows)
    uniq = np.unique(ids)
    assert len(t) == len(uniq)
    assert (rows >= 1).all() and (rows <= len(uniq)).all()  # row 0 is only the default row
    # a function in both directions: one row per id, one id per row
    pairs = np.unique(np.c_[ids, rows], axis=0)
    assert len(pairs) == len(uniq)
    assert len(np.unique(pairs[:, 1])) == len(uniq)
    np.testing.assert_array_equal(t.keys[rows], ids)
    # lookups without side effects agree
    np.testing.assert_array_equal(t.rows(ids), rows)
    assert t.stats().rows == len(uniq) and t.stats().admissions == len(uniq)


def test_rows_has_no_side_effects_and_unknown_ids_use_default_row():
    t = table(dim=2)
    assert t.rows(np.array([1, 2, 3])).tolist() == [0, 0, 0]
    assert len(t) == 0 and t.version == 0
    r = t.observe(np.array([1, 2, 1]))
    assert r[0] == r[2] and r[0] != r[1] and (r > 0).all()
    assert t.rows(np.array([1, 9])).tolist() == [r[0], 0]


# -- admission --------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 5])
def test_admission_after_n_sightings_across_batches(n):
    t = table(dim=2, admit_after=n)
    for i in range(n - 1):
        assert t.observe(np.array([42, 7])).tolist() == [0, 0], f"admitted after {i + 1} < {n} sightings"
        assert t.rows(np.array([42])).tolist() == [0]
        assert len(t) == 0
    r = t.observe(np.array([42]))
    assert r[0] > 0
    assert t.rows(np.array([42, 7])).tolist() == [r[0], 0]  # 7 has only n-1 sightings
    assert t.stats().admissions == 1
    # once admitted, the row is stable
    assert t.observe(np.array([42]))[0] == r[0]


def test_admission_counts_duplicates_within_a_batch():
    t = table(dim=2, admit_after=3)
    r = t.observe(np.array([5, 5, 5, 6, 6]))
    assert r[0] > 0 and r[0] == r[1] == r[2]  # three sightings in one batch: admitted
    assert r[3] == r[4] == 0  # two sightings: not yet
    r2 = t.observe(np.array([6]))
    assert r2[0] > 0 and r2[0] != r[0]
    assert t.stats().admissions == 2


def test_not_admitted_ids_share_default_row_weights():
    t = table(dim=3, admit_after=10)
    rows = t.observe(np.array([1, 2, 3]))
    assert rows.tolist() == [0, 0, 0]
    np.testing.assert_array_equal(t.gather(rows), np.repeat(t.weight[:1], 3, 0))


# -- expiry -----------------------------------------------------------------


def _fill_and_train(t: EmbeddingTable, ids: np.ndarray, **obs) -> None:
    rows = t.observe(ids, **obs)
    rng = np.random.default_rng(3)
    t.apply_gradients(rows, rng.standard_normal((len(rows), t.cfg.dim)).astype(np.float32))


def test_expiry_by_events_evicts_exactly_the_stale_rows():
    t = table(dim=4, ttl_events=50, init_std=0.1)
    stale = np.arange(100, 110)
    fresh = np.arange(200, 210)
    edge_keep, edge_drop = np.array([300]), np.array([301])
    _fill_and_train(t, stale, event=0)
    _fill_and_train(t, fresh, event=0)
    t.observe(fresh, event=100)
    t.observe(edge_keep, event=70)  # 70 == 120 - 50: not older than the ttl
    t.observe(edge_drop, event=69)
    keep = np.concatenate([fresh, edge_keep])
    w_keep = by_key(t, keep)
    w_default = t.weight[0].copy()
    n_before = len(t)

    evicted = t.expire(now_event=120)

    assert evicted == len(stale) + 1
    assert len(t) == n_before - evicted == len(keep)
    assert t.stats().evictions == evicted
    assert (t.rows(np.concatenate([stale, edge_drop])) == 0).all()
    rows_keep = t.rows(keep)
    assert (rows_keep > 0).all() and len(set(rows_keep.tolist())) == len(keep)
    np.testing.assert_array_equal(t.keys[rows_keep], keep)  # keys intact
    np.testing.assert_array_equal(by_key(t, keep), w_keep)  # weights intact
    np.testing.assert_array_equal(t.weight[0], w_default)  # default row is never evicted
    # a second expiry at the same time evicts nothing more
    assert t.expire(now_event=120) == 0
    # an evicted id seen again is admitted afresh
    r = t.observe(stale[:1], event=121)
    assert r[0] > 0 and t.stats().admissions == n_before + 1


def test_expiry_by_seconds_evicts_exactly_the_stale_rows():
    t = table(dim=3, ttl_seconds=60.0, init_std=0.1)
    _fill_and_train(t, np.array([1, 2, 3, 4]), ts=1000.0)
    t.observe(np.array([2, 4]), ts=1100.0)
    t.observe(np.array([3]), ts=1040.0)  # exactly now - ttl: kept
    w = by_key(t, [2, 3, 4])
    assert t.expire(now_ts=1100.0) == 1
    assert t.rows(np.array([1])).tolist() == [0]
    np.testing.assert_array_equal(by_key(t, [2, 3, 4]), w)
    np.testing.assert_array_equal(t.keys[t.rows(np.array([2, 3, 4]))], [2, 3, 4])
    assert t.expire(now_ts=1100.5) == 1  # now 3 is stale
    assert sorted(t.keys[1 : len(t) + 1].tolist()) == [2, 4]
    assert t.stats().evictions == 2


def test_expiry_without_ttl_is_a_no_op():
    t = table(dim=2)
    t.observe(np.arange(10), event=0)
    assert t.expire(now_event=10**9, now_ts=1e12) == 0
    assert len(t) == 10


def test_expiry_drops_stale_pending_counts():
    t = table(dim=2, admit_after=2, ttl_events=10)
    t.observe(np.array([1, 2]), event=0)
    t.observe(np.array([2]), event=95)
    t.expire(now_event=100)
    # id 1's sighting went stale: one more sighting is not enough
    assert t.observe(np.array([1]), event=100).tolist() == [0]
    # id 2's sighting is fresh: one more admits it
    assert t.observe(np.array([2]), event=100)[0] > 0


@pytest.mark.parametrize("opt", ["adagrad", "adam"])
def test_row_admitted_after_eviction_starts_with_fresh_optimizer_state(opt):
    t = table(dim=2, optimizer=opt, ttl_events=5, initial_accumulator=0.1)
    r = t.observe(np.array([1, 2, 3]), event=0)
    for _ in range(3):
        t.apply_gradients(r, np.full((3, 2), 10.0, np.float32))
    t.observe(np.array([1]), event=10)
    assert t.expire(now_event=10) == 2
    new = t.observe(np.array([7, 8]), event=10)  # reuse the slots of evicted 2 and 3
    if opt == "adagrad":
        np.testing.assert_array_equal(t.acc[new], np.full((2, 2), 0.1, np.float32))
    else:
        assert t.step[new].tolist() == [0, 0]
        np.testing.assert_array_equal(t.m[new], 0)
        np.testing.assert_array_equal(t.v[new], 0)


# -- optimizers vs torch ------------------------------------------------------


def _compare_with_torch(cfg_kw: dict, make_opt, steps: int = 6, n: int = 5, dim: int = 4):
    t = table(dim=dim, init_std=0.5, **cfg_kw)
    rows = t.observe(np.arange(10, 10 + n))
    rows = np.r_[0, rows]  # the default row learns too
    w0 = t.gather(rows).copy()
    p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = make_opt([p])
    rng = np.random.default_rng(7)
    for _ in range(steps):
        g = rng.standard_normal((len(rows), dim)).astype(np.float32) * rng.uniform(0.01, 3.0)
        t.apply_gradients(rows, g)
        opt.zero_grad()
        p.grad = torch.from_numpy(g.copy())
        opt.step()
        np.testing.assert_allclose(t.gather(rows), p.detach().numpy(), rtol=1e-5, atol=1e-6)
    # something actually moved
    assert np.abs(t.gather(rows) - w0).min() > 1e-4
    return t


@pytest.mark.parametrize("init_acc", [0.0, 0.1])
def test_adagrad_matches_torch(init_acc):
    cfg = dict(optimizer="adagrad", lr=0.3, eps=1e-8, initial_accumulator=init_acc)
    t = _compare_with_torch(cfg, lambda ps: torch.optim.Adagrad(ps, lr=0.3, eps=1e-8, initial_accumulator_value=init_acc))
    assert t.acc[0].min() > init_acc


def test_adam_matches_torch():
    cfg = dict(optimizer="adam", lr=0.05, beta1=0.8, beta2=0.95, eps=1e-6)
    _compare_with_torch(cfg, lambda ps: torch.optim.Adam(ps, lr=0.05, betas=(0.8, 0.95), eps=1e-6), steps=8)


def test_sgd_matches_torch():
    _compare_with_torch(dict(optimizer="sgd", lr=0.2), lambda ps: torch.optim.SGD(ps, lr=0.2))


def test_optimizer_moves_weights_against_gradient():
    for opt in ("adagrad", "adam", "sgd"):
        t = table(dim=2, optimizer=opt, lr=0.1, init_std=0.0)
        r = t.observe(np.array([1]))
        t.apply_gradients(r, np.array([[1.0, -1.0]], np.float32))
        w = t.gather(r)[0]
        assert w[0] < 0 < w[1], opt


@pytest.mark.parametrize("opt", ["adagrad", "adam", "sgd"])
def test_duplicate_rows_sum_their_gradients(opt):
    t = table(dim=3, optimizer=opt, lr=0.1, init_std=0.2)
    rows = t.observe(np.array([1, 2, 3]))
    ref = t.copy()
    g = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    dup_rows = np.array([rows[0], rows[1], rows[0], rows[2], rows[0]])
    t.apply_gradients(dup_rows, g)
    summed = np.stack([g[0] + g[2] + g[4], g[1], g[3]])
    ref.apply_gradients(rows, summed)
    np.testing.assert_allclose(t.gather(rows), ref.gather(rows), rtol=1e-6, atol=1e-7)
    # and it's one step, not three: differs from applying the duplicates one by one (adagrad/adam)
    if opt != "sgd":
        seq2 = table(dim=3, optimizer=opt, lr=0.1, init_std=0.2)
        seq2.observe(np.array([1, 2, 3]))
        for i in (0, 2, 4):
            seq2.apply_gradients(rows[:1], g[i : i + 1])
        assert not np.allclose(seq2.gather(rows[:1]), t.gather(rows[:1]))


def test_none_optimizer_refuses_gradients_but_adds():
    t = table(dim=2, optimizer="none", init_std=0.0)
    r = t.observe(np.array([4, 5]))
    with pytest.raises(TypeError, match="emb"):
        t.apply_gradients(r, np.ones((2, 2), np.float32))
    t.add(np.r_[r, r[0]], np.array([[1, 2], [3, 4], [10, 20]], np.float32))
    np.testing.assert_array_equal(t.gather(r), [[11, 22], [3, 4]])


# -- deltas -------------------------------------------------------------------


def test_deltas_returns_exactly_the_rows_changed_after_a_version():
    t = table(dim=2, optimizer="sgd", lr=1.0)
    rows = t.observe(np.arange(1, 11))
    keys_all, w_all, v0 = t.deltas(-1)
    assert sorted(keys_all.tolist()) == sorted([EMPTY, *range(1, 11)])  # default row comes with EMPTY
    assert v0 == t.version
    assert t.deltas(v0)[0].size == 0

    t.apply_gradients(rows[[2, 5]], np.ones((2, 2), np.float32))
    v1 = t.version
    t.apply_gradients(rows[[5, 7]], np.ones((2, 2), np.float32))
    new_rows = t.observe(np.array([99]))
    v2 = t.version
    assert v0 < v1 < v2

    keys, w, v = t.deltas(v0)
    assert v == v2
    assert sorted(keys.tolist()) == [3, 6, 8, 99]
    np.testing.assert_array_equal(w, by_key(t, keys))
    keys, w, _ = t.deltas(v1)
    assert sorted(keys.tolist()) == [6, 8, 99]
    keys, _, _ = t.deltas(v2)
    assert keys.size == 0
    # the default row, when trained, is reported with the reserved key
    t.apply_gradients(np.array([0]), np.ones((1, 2), np.float32))
    keys, w, _ = t.deltas(v2)
    assert keys.tolist() == [EMPTY]
    np.testing.assert_array_equal(w[0], t.weight[0])
    assert new_rows[0] > 0
    # deltas are copies
    w[0] += 100
    assert not np.array_equal(w[0], t.weight[0])


# -- state ----------------------------------------------------------------------


def _assert_same(a: EmbeddingTable, b: EmbeddingTable, keys) -> None:
    keys = np.asarray(keys, np.int64)
    np.testing.assert_array_equal(a.rows(keys), b.rows(keys))
    np.testing.assert_array_equal(by_key(a, keys), by_key(b, keys))
    # bytes may differ: a restored table holds trimmed arrays
    assert dataclasses.replace(a.stats(), bytes=0) == dataclasses.replace(b.stats(), bytes=0)
    np.testing.assert_array_equal(a.deltas(-1)[0], b.deltas(-1)[0])
    np.testing.assert_array_equal(a.deltas(-1)[1], b.deltas(-1)[1])


@pytest.mark.parametrize("opt", ["adagrad", "adam", "sgd", "none"])
def test_state_dict_round_trip_and_copy_independent(opt):
    t = table(dim=3, optimizer=opt, admit_after=3, ttl_events=100, init_std=0.1)
    t.observe(np.array([1, 1, 1, 2, 2, 3]), event=1)  # 1 admitted; 2 pending with 2; 3 with 1
    r = t.observe(np.array([1, 4, 4, 4]), event=2)
    if opt != "none":
        t.apply_gradients(r, np.ones((4, 3), np.float32))
    else:
        t.add(r, np.ones((4, 3), np.float32))
    keys = np.array([1, 2, 3, 4, 5])

    for clone in (EmbeddingTable.from_state_dict(t.state_dict()), t.copy()):
        _assert_same(t, clone, keys)
        assert clone.stats().pending == t.stats().pending
        # pending counts survive: 2 needs one more sighting, 3 needs two
        for tb in (t.copy(), clone.copy()):
            assert tb.observe(np.array([2, 3]), event=3).tolist()[1] == 0
            rows = tb.rows(np.array([2, 3]))
            assert rows[0] > 0 and rows[1] == 0
        # same rng state: the next admitted id gets the same initial weights
        a, b = t.copy(), clone.copy()
        np.testing.assert_array_equal(by_key_after(a, 77), by_key_after(b, 77))
        # the optimizer state came along: one more identical step gives identical weights
        if opt != "none":
            a, b = t.copy(), clone.copy()
            g = np.full((1, 3), 0.5, np.float32)
            a.apply_gradients(a.rows(np.array([4])), g)
            b.apply_gradients(b.rows(np.array([4])), g)
            np.testing.assert_array_equal(by_key(a, [4]), by_key(b, [4]))

    # independence: changing the copy doesn't touch the original, nor the reverse
    c = t.copy()
    before = by_key(t, keys).copy()
    stats_before = t.stats()
    c.observe(np.array([2, 50, 50, 50]), event=4)
    if opt != "none":
        c.apply_gradients(c.rows(np.array([1])), np.ones((1, 3), np.float32))
    else:
        c.add(c.rows(np.array([1])), np.ones((1, 3), np.float32))
    c.expire(now_event=10_000)
    np.testing.assert_array_equal(by_key(t, keys), before)
    assert t.stats() == stats_before
    assert t.rows(np.array([2, 50])).tolist() == [0, 0]
    d = t.copy()
    t.add(t.rows(np.array([1])), np.ones((1, 3), np.float32))
    assert not np.array_equal(by_key(t, [1]), by_key(d, [1]))


def test_state_dict_round_trip_many_ids():
    t = table(dim=4, optimizer="adam", admit_after=2, init_std=0.1)
    ids = np.arange(1_000)
    r = t.observe(np.r_[ids, ids[:600], np.arange(5_000, 5_010)])
    t.apply_gradients(r[:1_000], np.ones((1_000, 4), np.float32))
    for clone in (EmbeddingTable.from_state_dict(t.state_dict()), t.copy()):
        _assert_same(t, clone, np.r_[ids, np.arange(5_000, 5_010)])
        assert clone.stats().rows == 600
        assert clone.observe(np.array([700]))[0] > 0  # pending count (1) survived


def by_key_after(t: EmbeddingTable, key: int) -> np.ndarray:
    t.observe(np.array([key, key, key]))
    return by_key(t, [key])


def test_state_dict_is_a_snapshot():
    t = table(dim=2, optimizer="sgd")
    r = t.observe(np.array([1, 2]))
    s = t.state_dict()
    w = s["arrays"]["weight"].copy()
    t.apply_gradients(r, np.ones((2, 2), np.float32))
    np.testing.assert_array_equal(s["arrays"]["weight"], w)


# -- stats ----------------------------------------------------------------------


def test_stats_counts_and_bytes_grow_with_ids():
    small, big = table(dim=16), table(dim=16)
    small.observe(np.arange(1_000))
    big.observe(np.arange(100_000))
    s, b = small.stats(), big.stats()
    assert (s.rows, b.rows) == (1_000, 100_000)
    assert (s.admissions, b.admissions) == (1_000, 100_000)
    assert s.evictions == b.evictions == 0
    assert s.name == "emb"
    assert 20 < b.bytes / s.bytes < 200, (s.bytes, b.bytes)
    # at least the raw weights + adagrad state are counted
    assert b.bytes >= 100_000 * 16 * 4 * 2


def test_stats_bytes_follow_ids_not_a_fixed_reservation():
    t = table(dim=8, optimizer="sgd")
    empty = t.stats().bytes
    t.observe(np.arange(50_000))
    assert t.stats().bytes > 50_000 * 8 * 4 > empty * 10


def test_stats_pending():
    t = table(dim=2, admit_after=3)
    t.observe(np.array([1, 2, 2]))
    st = t.stats()
    assert st.pending == 2 and st.rows == 0 and st.admissions == 0


def test_stats_pending_excludes_admitted_ids():
    t = table(dim=2, admit_after=2)
    t.observe(np.array([1, 1, 2]))
    assert t.stats().rows == 1
    assert t.stats().pending == 1  # only id 2 is still waiting


# -- memory -----------------------------------------------------------------------


def _allocated_bytes(obj, seen=None) -> int:
    """Bytes of every numpy array reachable through ``obj``'s attributes (id maps included)."""
    from olrec.ids import IdMap

    seen = set() if seen is None else seen
    total = 0
    for v in vars(obj).values():
        if isinstance(v, np.ndarray) and id(v) not in seen:
            seen.add(id(v))
            total += v.nbytes
        elif isinstance(v, IdMap):
            total += _allocated_bytes(v, seen)
    return total


@pytest.mark.parametrize("ttl", [{}, {"ttl_events": 10**6, "ttl_seconds": 3600.0}], ids=["no-ttl", "ttl"])
def test_bytes_per_row_at_most_twice_the_raw_row(ttl):
    """A shard table at the default config (dim 16, Adagrad) holds a row in at
    most 2x its raw bytes (weights + optimizer state), at every size on the way
    to 200k rows of random 64-bit keys: growth slack, the id map and the
    per-row metadata included."""
    cfg = TableConfig(name="sparse", **ttl)
    assert (cfg.dim, cfg.optimizer, cfg.admit_after) == (16, "adagrad", 1)
    raw = cfg.dim * 4 * (1 + cfg.slots)
    t = EmbeddingTable(cfg)
    keys = np.random.default_rng(0).integers(-(2**62), 2**62, 200_000)
    worst = 0.0
    for at in range(0, len(keys), 5_000):
        t.observe(keys[at : at + 5_000], ts=1.7e9 + at, event=at)
        if len(t) >= 50_000:
            worst = max(worst, t.nbytes / len(t))
            assert t.nbytes >= _allocated_bytes(t)  # nbytes counts everything the table allocates
    assert len(t) == len(np.unique(keys))
    assert worst <= 2 * raw, f"{worst:.1f} bytes per row > 2 x {raw}"


def test_clocks_are_kept_only_for_the_ttl_that_reads_them():
    assert not hasattr(table(), "last_ts") and not hasattr(table(), "last_event")
    t = table(ttl_events=5)
    assert hasattr(t, "last_event") and not hasattr(t, "last_ts")
    t = table(ttl_seconds=5.0)
    assert hasattr(t, "last_ts") and not hasattr(t, "last_event")
    # a table without ttl still observes, and expiry is a no-op
    t = table(dim=2, admit_after=2)
    t.observe(np.array([1, 1, 2]), ts=5.0, event=5)
    assert t.expire(now_ts=1e12, now_event=10**12) == 0 and len(t) == 1 and t.stats().pending == 1


def test_state_dict_with_clocks_the_table_does_not_keep_loads():
    """A state holding every clock (as tables kept them before) restores into a
    table that keeps none of them."""
    t = table(dim=3, admit_after=2, init_std=0.1)
    t.observe(np.array([1, 1, 2, 3, 3]))
    s = t.state_dict()
    n, m = len(s["arrays"]["weight"]), len(s["pending_keys"])
    s["arrays"]["last_ts"], s["arrays"]["last_event"] = np.zeros(n), np.zeros(n, np.int64)
    s["pending_seen"], s["pending_event"] = np.zeros(m), np.zeros(m, np.int64)
    clone = EmbeddingTable.from_state_dict(s)
    _assert_same(t, clone, [1, 2, 3, 4])
    assert clone.observe(np.array([2]))[0] > 0  # its pending count (1) survived


def test_keys_are_a_read_only_view_of_the_id_map():
    t = table(dim=2)
    t.observe(np.array([10, 20]))
    assert t.keys.tolist() == [EMPTY, 10, 20]
    with pytest.raises(ValueError):
        t.keys[1] = 30
    np.testing.assert_array_equal(t.held_keys(), [10, 20])
    assert t.state_dict()["arrays"]["keys"].tolist() == [EMPTY, 10, 20]


def test_pending_counts_saturate_without_changing_admission():
    t = table(dim=2, admit_after=4)
    assert t.observe(np.full(3, 7)).tolist() == [0, 0, 0]
    r = t.observe(np.full(10, 7))  # 13 sightings in all: admitted, as ever
    assert (r > 0).all() and len(set(r.tolist())) == 1
    assert t.state_dict()["pending_count"].dtype == np.int64


# -- config validation ------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(dim=0), "dim"),
        (dict(dim=-3), "dim"),
        (dict(optimizer="rmsprop"), "optimizer"),
        (dict(lr=-0.1), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(lr=float("inf")), "lr"),
        (dict(admit_after=0), "admit_after"),
        (dict(ttl_events=0), "ttl_events"),
        (dict(ttl_seconds=-1.0), "ttl_seconds"),
    ],
)
def test_table_config_rejects_bad_values(kw, field):
    with pytest.raises(ValueError) as e:
        TableConfig(name="item_emb", **kw)
    msg = str(e.value)
    assert "item_emb" in msg and field in msg


def test_table_config_rejects_empty_name():
    with pytest.raises(ValueError, match="name"):
        TableConfig(name="")


def test_table_config_is_frozen_and_accepts_good_values():
    c = TableConfig(name="x", dim=4, optimizer="adam", ttl_events=10, ttl_seconds=5.0, admit_after=2)
    with pytest.raises(Exception):
        c.dim = 8  # type: ignore[misc]
    assert c.slots == 2 and TableConfig(name="y").slots == 1 and TableConfig(name="z", optimizer="sgd").slots == 0


@pytest.mark.parametrize(
    "kw, field",
    [(dict(beta1=1.0), "beta1"), (dict(beta2=1.5), "beta2"),
     (dict(initial_accumulator=-1.0), "initial_accumulator"), (dict(init_std=-0.1), "init_std")],
)
def test_table_config_rejects_bad_optimizer_hyperparameters(kw, field):
    with pytest.raises(ValueError) as e:
        TableConfig(name="item_emb", **kw)
    assert "item_emb" in str(e.value) and field in str(e.value)
