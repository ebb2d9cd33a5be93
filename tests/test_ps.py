"""The parameter server's shard contract, run by every implementation: in
process, and Ray actors on a real local cluster."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from olrec.embedding import EmbeddingTable, TableConfig
from olrec.ps import LocalShard, ShardedTables, ray_shards, shard_of

TABLES = [TableConfig("emb", dim=4, optimizer="adagrad", lr=0.1, admit_after=2, seed=1),
          TableConfig("counts", dim=2, optimizer="none", init_std=0.0)]


@pytest.fixture(params=["local", "ray"])
def make_client(request):
    def make(n_shards: int) -> ShardedTables:
        if request.param == "local":
            return ShardedTables([LocalShard(TABLES, i) for i in range(n_shards)])
        request.getfixturevalue("ray_cluster")
        return ShardedTables(ray_shards(TABLES, n_shards))
    return make


def test_one_shard_behaves_exactly_like_the_table(make_client) -> None:
    client = make_client(1)
    ref = EmbeddingTable(TABLES[0])
    rng = np.random.default_rng(0)
    for step in range(5):
        keys = rng.integers(0, 50, 64)
        got = client.pull("emb", keys, observe=True, event=step)
        want = ref.gather(ref.observe(keys, 0.0, step))
        np.testing.assert_array_equal(got, want)
        grads = rng.standard_normal((64, 4)).astype(np.float32)
        client.push_gradients("emb", keys, grads)
        ref.apply_gradients(ref.rows(keys), grads)
    np.testing.assert_array_equal(client.pull("emb", np.arange(50)), ref.gather(ref.rows(np.arange(50))))


def test_sharded_rows_are_consistent_and_deltas_cover_changes(make_client) -> None:
    client = make_client(3)
    keys = np.arange(200)
    client.pull("emb", keys, observe=True)
    client.pull("emb", keys, observe=True)  # admitted after 2 sightings
    first = client.pull("emb", keys)
    assert len({tuple(r) for r in first}) == 200  # collisionless across shards
    np.testing.assert_array_equal(client.pull("emb", keys[::-1]), first[::-1])  # order restored
    _, _, versions = client.deltas("emb", [0, 0, 0])
    changed = np.array([3, 50, 199])
    client.push_gradients("emb", changed, np.ones((3, 4), np.float32))
    dkeys, dweights, _ = client.deltas("emb", versions)
    assert sorted(dkeys.tolist()) == changed.tolist()
    np.testing.assert_array_equal(dweights[np.argsort(dkeys)], client.pull("emb", changed))
    assert sum(s["tables"]["emb"]["rows"] for s in client.stats()) == 200


def test_deltas_of_several_tables_at_once_equal_one_by_one(make_client) -> None:
    client = make_client(2)
    for _ in range(2):  # admitted after 2 sightings
        client.pull("emb", np.arange(10), observe=True)
    client.push_deltas("counts", np.array([3, 4]), np.ones((2, 2), np.float32))
    zero = [0, 0]
    both = client.deltas_many({"emb": zero, "counts": zero})
    for t in ("emb", "counts"):
        keys, weights, versions = client.deltas(t, zero)
        np.testing.assert_array_equal(both[t][0], keys)
        np.testing.assert_array_equal(both[t][1], weights)
        assert both[t][2] == versions


def test_counter_deltas_add_up(make_client) -> None:
    client = make_client(2)
    keys = np.array([7, 7, 8, 9])
    client.push_deltas("counts", keys, np.ones((4, 2), np.float32))
    client.push_deltas("counts", np.array([9]), np.full((1, 2), 2.0, np.float32))
    np.testing.assert_array_equal(client.pull("counts", np.array([7, 8, 9, 10]))[:, 0], [2.0, 1.0, 3.0, 0.0])


def test_snapshot_and_restore_round_trip(make_client, tmp_path: Path) -> None:
    client = make_client(2)
    keys = np.arange(40)
    for _ in range(2):
        client.pull("emb", keys, observe=True)
    client.push_gradients("emb", keys, np.ones((40, 4), np.float32))
    before = client.pull("emb", keys)
    paths = client.snapshot(str(tmp_path))
    assert all(Path(p).is_file() for p in paths)
    client.push_gradients("emb", keys, np.ones((40, 4), np.float32))
    assert not np.array_equal(client.pull("emb", keys), before)
    client.restore(str(tmp_path))
    np.testing.assert_array_equal(client.pull("emb", keys), before)


def test_unknown_table_is_named() -> None:
    with pytest.raises(KeyError, match="nope"):
        LocalShard(TABLES).pull("nope", np.arange(3))
    with pytest.raises(ValueError, match="duplicate"):
        LocalShard([TABLES[0], TABLES[0]])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(-2**62, 2**62), min_size=1, max_size=300), st.integers(1, 16))
def test_partition_is_stable_and_complete(keys, n) -> None:
    keys = np.array(keys, np.int64)
    owner = shard_of(keys, n)
    assert ((owner >= 0) & (owner < n)).all()
    np.testing.assert_array_equal(owner, shard_of(keys.copy(), n))  # stable
    for k, o in zip(keys.tolist(), owner.tolist()):  # a key's shard does not depend on its batch
        assert shard_of(np.array([k]), n)[0] == o


def test_partition_spreads_sequential_ids() -> None:
    counts = np.bincount(shard_of(np.arange(100_000), 4), minlength=4)
    assert counts.min() > 0.9 * counts.max()
