"""The parameter server: embedding tables sharded over processes.

A :class:`Shard` holds, for every table it serves, the rows of the ids that
hash to it (each an :class:`~olrec.embedding.EmbeddingTable`: collisionless,
admission, expiry, sparse optimizer, row versions). :class:`ShardedTables` is
the client a trainer or a serving replica uses: it splits a batch's keys by a
stable hash, makes one call per shard (in parallel for remote shards) and puts
the answers back in the batch's order. :class:`LocalShard` runs in the
caller's process; :func:`ray_shards` starts Ray actors around it, so the same
client drives one process or a cluster. What crosses the wire is numpy
arrays: keys, weights, gradients.

A learner reaches its per-id state through a :class:`Store`: pull the rows of
a batch's keys (deduplicated), later push gradients or additive deltas for
them. :class:`LocalStore` keeps the tables in the learner's process (the
in-process learner, fastest: it remembers the row indices it pulled);
:class:`ShardedTables` is the same contract over shards, with pushes that may
run asynchronously up to a bound on staleness.
"""

from __future__ import annotations

import os
import pickle
import time
from dataclasses import asdict, dataclass, replace
from collections import deque
from typing import Any, Mapping, NamedTuple, Protocol, Sequence

import numpy as np

from . import storage
from .embedding import EmbeddingTable, TableConfig
from .ids import unique_small

_MIX = np.uint64(0x9E3779B97F4A7C15)


def shard_of(keys: np.ndarray, n_shards: int) -> np.ndarray:
    """Stable shard index of each key: a multiplicative hash's high bits, so
    sequential ids spread evenly; the same key always lands on the same shard."""
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    h = np.asarray(keys, np.int64).astype(np.uint64) * _MIX
    return ((h >> np.uint64(32)) % np.uint64(n_shards)).astype(np.int64)


class Shard(Protocol):
    """One shard's API: batched, numpy in and out, one call per training batch."""

    def pull(self, table: str, keys: np.ndarray, observe: bool = False,
             ts: float = 0.0, event: int = 0, counts: np.ndarray | None = None) -> np.ndarray: ...

    def push_gradients(self, table: str, keys: np.ndarray, grads: np.ndarray) -> None: ...

    def push_deltas(self, table: str, keys: np.ndarray, deltas: np.ndarray,
                    ts: float = 0.0, event: int = 0) -> None: ...

    def expire(self, ts: float, event: int) -> int: ...

    def reset(self) -> None: ...

    def deltas(self, table: str, since_version: int) -> tuple[np.ndarray, np.ndarray, int]: ...

    def snapshot(self, path: str) -> None: ...

    def restore(self, path: str) -> None: ...

    def stats(self) -> dict[str, Any]: ...


@dataclass
class Pulled:
    """The rows a :class:`Store` fetched for a batch: ``weights`` (U, dim) of the
    U distinct keys, ``inverse`` (N,) the weight row of each key asked for, and
    what the store needs to push to the same rows later (``ref``)."""

    weights: np.ndarray
    inverse: np.ndarray
    keys: np.ndarray | None
    ref: Any


class Fetch(NamedTuple):
    """One table's part of a batch's fetch (see :meth:`Store.fetch`)."""

    table: str
    keys: np.ndarray
    observe: bool = False
    ts: float = 0.0
    event: int = 0
    unique: bool = False


class Store(Protocol):
    """Where a learner keeps its per-id state (tables named ``sparse``, ``counters``, ``wide``)."""

    def fetch(self, table: str, keys: np.ndarray, *, observe: bool = False, ts: float = 0.0,
              event: int = 0, unique: bool = False) -> Pulled:
        """Rows of ``keys`` (``unique``: the caller has deduplicated them)."""
        ...

    def fetch_many(self, requests: Sequence[Fetch]) -> list[Pulled]:
        """Several tables' rows at once: one call per shard for a batch."""
        ...

    def apply(self, table: str, pulled: Pulled, grads: np.ndarray) -> None:
        """One optimizer step with gradients (U, dim) for the pulled rows."""
        ...

    def add(self, table: str, pulled: Pulled, deltas: np.ndarray, *, ts: float = 0.0, event: int = 0) -> None:
        """Add deltas (U, dim) to the pulled rows, admitting unseen keys (needs ``unique`` keys)."""
        ...

    def end_batch(self, tag: Any = None) -> None:
        """The batch's pushes are all issued (a sharded store sends them now);
        :meth:`done` returns ``tag`` (unless None) once they are applied."""
        ...

    def done(self) -> list:
        """Tags of batches whose pushes are applied, in batch order, each returned once."""
        ...

    def flush(self) -> None:
        """Wait until every push issued is applied."""
        ...

    def expire(self, ts: float, event: int) -> int: ...


class LocalStore:
    """Tables in the learner's process: it keeps the row indices it fetched, so
    a push costs no second lookup."""

    def __init__(self, tables: Sequence[TableConfig]) -> None:
        self.tables = {t.name: EmbeddingTable(t) for t in tables}
        self._done: list = []

    def fetch(self, table: str, keys: np.ndarray, *, observe: bool = False, ts: float = 0.0,
              event: int = 0, unique: bool = False) -> Pulled:
        t = self.tables[table]
        rows = t.observe(keys, ts, event) if observe else t.rows(keys)
        if unique:
            return Pulled(t.gather(rows), np.arange(len(rows)), np.asarray(keys, np.int64), rows)
        uniq, inv = unique_small(rows, t.size)
        return Pulled(t.gather(uniq), inv, None, uniq)

    def fetch_many(self, requests: Sequence[Fetch]) -> list[Pulled]:
        return [self.fetch(r.table, r.keys, observe=r.observe, ts=r.ts, event=r.event, unique=r.unique)
                for r in requests]

    def apply(self, table: str, pulled: Pulled, grads: np.ndarray) -> None:
        # Rows of unique keys repeat only at the default row: let the table sum them.
        self.tables[table].apply_gradients(pulled.ref, grads, unique=pulled.keys is None)

    def add(self, table: str, pulled: Pulled, deltas: np.ndarray, *, ts: float = 0.0, event: int = 0) -> None:
        t = self.tables[table]
        if pulled.keys is None:  # rows already admitted by an observing fetch
            t.add(pulled.ref, deltas, unique=True)
        else:
            t.add(t.observe(pulled.keys, ts, event, rows=pulled.ref), deltas, unique=True)

    def end_batch(self, tag: Any = None) -> None:
        if tag is not None:
            self._done.append(tag)

    def done(self) -> list:
        out, self._done = self._done, []
        return out

    def flush(self) -> None:
        pass

    def expire(self, ts: float, event: int) -> int:
        return sum(t.expire(ts, event) for t in self.tables.values())


class LocalShard:
    """A shard in this process: one :class:`EmbeddingTable` per table name.
    ``index`` is the shard's place among its peers (it seeds the initial rows)."""

    def __init__(self, tables: Sequence[TableConfig], index: int = 0) -> None:
        names = [t.name for t in tables]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate table name(s) {sorted(dup)}")
        # Each shard draws its initial rows from its own stream.
        self.configs = [replace(t, seed=t.seed + 7919 * index) for t in tables]
        self._started = time.monotonic()
        self._load = {"pulls": 0, "pushes": 0, "pull_s": 0.0, "push_s": 0.0}
        self.reset()

    def reset(self) -> None:
        """Drop every row: a restarted run without a checkpoint starts here."""
        self.tables = {t.name: EmbeddingTable(t) for t in self.configs}

    def _table(self, name: str) -> EmbeddingTable:
        try:
            return self.tables[name]
        except KeyError:
            raise KeyError(f"no table {name!r} on this shard; have {sorted(self.tables)}") from None

    def pull(self, table: str, keys: np.ndarray, observe: bool = False, ts: float = 0.0, event: int = 0,
             counts: np.ndarray | None = None) -> np.ndarray:
        """Weights of ``keys`` (the default row for ids not admitted). ``observe``
        counts the sighting (admission, last-seen clocks) as training does;
        serving and frozen scoring pull without it. ``counts``: how many
        sightings each (deduplicated) key stands for (admission counts them)."""
        t = self._table(table)
        if not observe:
            return t.gather(t.rows(keys))
        if counts is None or t.cfg.admit_after == 1:  # sighting counts matter only for admission
            return t.gather(t.observe(keys, ts, event))
        rows = t.observe(np.repeat(keys, counts), ts, event)
        return t.gather(rows[np.cumsum(counts) - counts])

    def pull_many(self, requests: list[tuple]) -> list[np.ndarray]:
        """Several :meth:`pull` calls in one (a batch's tables: one round trip)."""
        t0 = time.perf_counter()
        out = [self.pull(*r) for r in requests]
        self._load["pulls"] += 1
        self._load["pull_s"] += time.perf_counter() - t0
        return out

    def push_many(self, ops: list[tuple[str, tuple]]) -> None:
        """Several pushes in one call, in order: (``"push_gradients"`` or ``"push_deltas"``, args)."""
        t0 = time.perf_counter()
        for method, args in ops:
            if method not in ("push_gradients", "push_deltas"):
                raise ValueError(f"push_many: {method!r} is not a push")
            getattr(self, method)(*args)
        self._load["pushes"] += 1
        self._load["push_s"] += time.perf_counter() - t0

    def push_gradients(self, table: str, keys: np.ndarray, grads: np.ndarray, unique: bool = False) -> None:
        """One optimizer step (gradients of duplicate keys and of ids sharing the
        default row are summed). ``unique``: the keys are distinct (no sort needed
        to find duplicates, unless ids not admitted share the default row)."""
        t = self._table(table)
        t.apply_gradients(t.rows(keys), grads, unique=unique and t.cfg.admit_after == 1)

    def push_deltas(self, table: str, keys: np.ndarray, deltas: np.ndarray, ts: float = 0.0, event: int = 0,
                    unique: bool = False) -> None:
        """Add to the rows (counters, the wide part's state); unseen keys are admitted first."""
        t = self._table(table)
        t.add(t.observe(keys, ts, event), deltas, unique=unique and t.cfg.admit_after == 1)

    def expire(self, ts: float, event: int) -> int:
        """Evict idle rows of every table (their ``ttl_*``); returns how many."""
        return sum(t.expire(ts, event) for t in self.tables.values())

    def deltas(self, table: str, since_version: int) -> tuple[np.ndarray, np.ndarray, int]:
        return self._table(table).deltas(since_version)

    def snapshot(self, path: str) -> None:
        """Write every table to ``path`` (a local path or an object-store URI), whole or not at all."""
        state = {name: t.state_dict() for name, t in self.tables.items()}
        storage.write_bytes(path, pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))

    def restore(self, path: str) -> None:
        state = pickle.loads(storage.read_bytes(path))
        if set(state) != set(self.tables):
            raise ValueError(f"snapshot {storage.where(path)} holds tables {sorted(state)}, this shard serves {sorted(self.tables)}")
        self.tables = {name: EmbeddingTable.from_state_dict(s) for name, s in state.items()}

    def stats(self) -> dict[str, Any]:
        """Per table: rows, bytes, admissions, evictions, version; and the batched
        pulls and pushes served since the shard started, with their rates and
        the seconds spent serving them."""
        up = max(time.monotonic() - self._started, 1e-9)
        load = dict(self._load)
        return {"tables": {name: asdict(t.stats()) for name, t in self.tables.items()}, **load,
                "pulls_per_s": load["pulls"] / up, "pushes_per_s": load["pushes"] / up, "uptime_s": up}

    def pid(self) -> int:
        """The shard's process (operators and fault tests signal it)."""
        return os.getpid()


@dataclass
class ShardedTables:
    """The client: keys split by :func:`shard_of`, one call per shard per batch.

    ``shards`` are :class:`LocalShard` objects or Ray actor handles around
    them (see :func:`ray_shards`); remote calls run in parallel.
    """

    shards: list
    #: Batches whose pushes may still be in flight when the next batch is
    #: fetched (0: every push is applied before ``end_batch`` returns). A
    #: shard runs one caller's calls in order, so a worker always reads its
    #: own pushes; the bound limits how far it runs ahead of their acks.
    max_staleness: int = 0

    def __post_init__(self) -> None:
        if not self.shards:
            raise ValueError("ShardedTables needs at least one shard")
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {self.max_staleness}")
        self._remote = hasattr(self.shards[0].pull, "remote")
        self._queued: dict[int, list] = {}  # this batch's pushes, per shard
        self._inflight: deque = deque()  # (tag, futures, sent at) of earlier batches
        self._done: list = []
        self.fetch_s = 0.0  # time spent fetching rows (the wire and the shards' queues included)
        self.settle_s = 0.0  # time spent waiting for pushes to be acknowledged
        #: Seconds per batched fetch, and from sending a batch's pushes to their ack
        #: (an upper bound when acks are collected late): the newest, for a caller to drain.
        self.latencies: dict[str, deque] = {"pull": deque(maxlen=10_000), "push": deque(maxlen=10_000)}

    def _call_async(self, method: str, per_shard: Mapping[int, tuple]) -> list:
        """Futures of remote calls (none: local shards run the calls now)."""
        if self._remote:
            return [getattr(self.shards[i], method).remote(*args) for i, args in per_shard.items()]
        self._call(method, per_shard)
        return []

    def _call(self, method: str, per_shard: Mapping[int, tuple]) -> dict[int, Any]:
        if self._remote:
            import ray

            futures = {i: getattr(self.shards[i], method).remote(*args) for i, args in per_shard.items()}
            return dict(zip(futures, ray.get(list(futures.values()))))
        return {i: getattr(self.shards[i], method)(*args) for i, args in per_shard.items()}

    def _push(self, method: str, per_shard: Mapping[int, tuple]) -> None:
        """Queue a push; :meth:`end_batch` sends each shard its batch's pushes in one call."""
        for i, args in per_shard.items():
            self._queued.setdefault(i, []).append((method, args))

    # -- the Store contract (a learner's batch: fetch, then push) -------------
    def fetch(self, table: str, keys: np.ndarray, *, observe: bool = False, ts: float = 0.0,
              event: int = 0, unique: bool = False) -> Pulled:
        return self.fetch_many([Fetch(table, keys, observe, ts, event, unique)])[0]

    def fetch_many(self, requests: Sequence[Fetch]) -> list[Pulled]:
        t0 = time.perf_counter()
        plans = []  # per request: unique keys, inverse, per-shard parts (the pushes reuse the split)
        per_shard: dict[int, list] = {}
        for r in requests:
            keys = np.asarray(r.keys, np.int64)
            if r.unique:
                uniq, inv, counts = keys, np.arange(len(keys)), None
            else:
                uniq, inv, counts = np.unique(keys, return_inverse=True, return_counts=True)
            parts = self._split(uniq)
            plans.append((uniq, inv, parts))
            for i, idx in parts:
                per_shard.setdefault(i, []).append(
                    (r.table, uniq[idx], r.observe, r.ts, r.event, None if counts is None else counts[idx]))
        got = self._call("pull_many", {i: (reqs,) for i, reqs in per_shard.items()})
        taken = {i: iter(rows) for i, rows in got.items()}
        out = []
        for uniq, inv, parts in plans:
            chunks = [(idx, next(taken[i])) for i, idx in parts]
            dim = chunks[0][1].shape[1] if chunks else 0
            weights = np.empty((len(uniq), dim), np.float32)
            for idx, rows in chunks:
                weights[idx] = rows
            out.append(Pulled(weights, inv, uniq, parts))
        took = time.perf_counter() - t0
        self.fetch_s += took
        self.latencies["pull"].append(took)
        return out

    def apply(self, table: str, pulled: Pulled, grads: np.ndarray) -> None:
        self._push("push_gradients", {i: (table, pulled.keys[idx], grads[idx], True) for i, idx in pulled.ref})

    def add(self, table: str, pulled: Pulled, deltas: np.ndarray, *, ts: float = 0.0, event: int = 0) -> None:
        self._push("push_deltas", {i: (table, pulled.keys[idx], deltas[idx], ts, event, True) for i, idx in pulled.ref})

    def end_batch(self, tag: Any = None) -> None:
        sent = self._call_async("push_many", {i: (ops,) for i, ops in self._queued.items()})
        self._queued = {}
        self._inflight.append((tag, sent, time.perf_counter()))
        while len(self._inflight) > self.max_staleness:
            self._settle()

    def _settle(self) -> None:
        tag, futures, sent_at = self._inflight.popleft()
        if futures:
            import ray

            t0 = time.perf_counter()
            ray.get(futures)  # raises if a shard died: the batch is not applied
            self.settle_s += time.perf_counter() - t0
            self.latencies["push"].append(time.perf_counter() - sent_at)
        if tag is not None:
            self._done.append(tag)

    def done(self) -> list:
        while self._inflight:
            futures = self._inflight[0][1]
            if futures:
                import ray

                if ray.wait(futures, num_returns=len(futures), timeout=0)[1]:
                    break  # still in flight
            self._settle()
        out, self._done = self._done, []
        return out

    def flush(self) -> None:
        while self._inflight:
            self._settle()

    def expire(self, ts: float, event: int) -> int:
        return sum(self._call("expire", {i: (ts, event) for i in range(len(self.shards))}).values())

    def reset(self) -> None:
        self._call("reset", {i: () for i in range(len(self.shards))})

    def _split(self, keys: np.ndarray) -> list[tuple[int, np.ndarray]]:
        owner = shard_of(keys, len(self.shards))
        return [(i, np.flatnonzero(owner == i)) for i in range(len(self.shards)) if (owner == i).any()]

    def pull(self, table: str, keys: np.ndarray, observe: bool = False, ts: float = 0.0, event: int = 0) -> np.ndarray:
        """Weights of ``keys`` in their order (duplicates count as sightings, as in a table)."""
        pulled = self.fetch(table, keys, observe=observe, ts=ts, event=event)
        return pulled.weights[pulled.inverse]

    def push_gradients(self, table: str, keys: np.ndarray, grads: np.ndarray) -> None:
        keys = np.asarray(keys, np.int64)
        self._call("push_gradients", {i: (table, keys[idx], grads[idx]) for i, idx in self._split(keys)})

    def push_deltas(self, table: str, keys: np.ndarray, deltas: np.ndarray, ts: float = 0.0, event: int = 0) -> None:
        keys = np.asarray(keys, np.int64)
        self._call("push_deltas", {i: (table, keys[idx], deltas[idx], ts, event) for i, idx in self._split(keys)})

    def deltas(self, table: str, since: Sequence[int]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Rows changed after each shard's version in ``since`` (one per shard);
        returns keys, weights and the shards' new versions (pass them next time)."""
        return self.deltas_many({table: since})[table]

    def deltas_many(self, since: Mapping[str, Sequence[int]]) -> dict[str, tuple[np.ndarray, np.ndarray, list[int]]]:
        """:meth:`deltas` of several tables, every call in flight at once: one
        wait for a serving replica's refresh, not one round trip per table."""
        calls = [(t, i, int(v)) for t, vs in since.items() for i, v in enumerate(vs)]
        if self._remote:
            import ray

            results = ray.get([self.shards[i].deltas.remote(t, v) for t, i, v in calls])
        else:
            results = [self.shards[i].deltas(t, v) for t, i, v in calls]
        got: dict[str, dict[int, tuple]] = {}
        for (t, i, _), r in zip(calls, results):
            got.setdefault(t, {})[i] = r
        n = len(self.shards)
        return {t: (np.concatenate([g[i][0] for i in range(n)]), np.concatenate([g[i][1] for i in range(n)]),
                    [g[i][2] for i in range(n)]) for t, g in got.items()}

    def snapshot(self, directory: str) -> list[str]:
        paths = [str(storage.join(directory, f"shard-{i:04d}.pkl")) for i in range(len(self.shards))]
        self._call("snapshot", {i: (p,) for i, p in enumerate(paths)})
        return paths

    def restore(self, directory: str) -> None:
        self._call("restore", {i: (str(storage.join(directory, f"shard-{i:04d}.pkl")),) for i in range(len(self.shards))})

    def stats(self) -> list[dict[str, Any]]:
        got = self._call("stats", {i: () for i in range(len(self.shards))})
        return [got[i] for i in range(len(self.shards))]


def ray_shards(tables: Sequence[TableConfig], n_shards: int, num_cpus: float = 0.25) -> list:
    """``n_shards`` Ray actors, each a :class:`LocalShard` of ``tables``
    (fractional CPUs: a shard mostly waits for calls)."""
    import ray

    actor = ray.remote(num_cpus=num_cpus)(LocalShard)
    return [actor.remote(list(tables), i) for i in range(n_shards)]
