"""The embedding table: collisionless rows with admission, expiry, a sparse
optimizer, and a version per row.

One class serves the in-process learner now and each parameter-server shard
later. Real-time features (per-id counters) are rows of the same kind of table
with ``optimizer="none"``, so whatever holds embeddings holds them too.

Row 0 is the *default row*: ids not yet admitted (seen fewer than
``admit_after`` times) share it, and it learns like any row.

Memory per row: the weights and optimizer state (float32), an int64 version
and the key (int64, kept once, in the :class:`~olrec.ids.IdMap`, whose slots
add 8 to 16 bytes), plus the last-seen clocks only where a ttl needs them:
``last_event`` (int64) with ``ttl_events``, ``last_ts`` (float64 seconds, so
exact to well under a microsecond for unix times) with ``ttl_seconds``. Arrays
grow by :func:`~olrec.ids.grown`: at most 25 % slack once a table is large.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from .ids import IdMap, grown

Optimizer = Literal["adagrad", "adam", "sgd", "none"]


@dataclass(frozen=True)
class TableConfig:
    """One embedding table. ``lr`` etc. are the sparse optimizer's settings."""

    name: str
    dim: int = 16
    optimizer: Optimizer = "adagrad"
    lr: float = 0.05
    init_std: float = 0.01
    eps: float = 1e-10  # torch.optim.Adagrad's default
    initial_accumulator: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    admit_after: int = 1
    ttl_events: int | None = None
    ttl_seconds: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("TableConfig.name must be non-empty")
        if self.dim <= 0:
            raise ValueError(f"table {self.name!r}: dim must be positive, got {self.dim}")
        if self.optimizer not in ("adagrad", "adam", "sgd", "none"):
            raise ValueError(f"table {self.name!r}: unknown optimizer {self.optimizer!r}; use adagrad, adam, sgd or none")
        if self.lr < 0 or not np.isfinite(self.lr):
            raise ValueError(f"table {self.name!r}: lr must be a finite non-negative number, got {self.lr}")
        if self.admit_after < 1:
            raise ValueError(f"table {self.name!r}: admit_after must be >= 1, got {self.admit_after}")
        for f in ("beta1", "beta2"):
            if not 0 <= getattr(self, f) < 1:
                raise ValueError(f"table {self.name!r}: {f} must be in [0, 1), got {getattr(self, f)}")
        for f in ("initial_accumulator", "init_std", "eps"):
            if getattr(self, f) < 0:
                raise ValueError(f"table {self.name!r}: {f} must be >= 0, got {getattr(self, f)}")
        for f in ("ttl_events", "ttl_seconds"):
            v = getattr(self, f)
            if v is not None and v <= 0:
                raise ValueError(f"table {self.name!r}: {f} must be positive or None, got {v}")

    @property
    def slots(self) -> int:
        """Optimizer state vectors per row (for the raw-bytes-per-row measure)."""
        return {"adagrad": 1, "adam": 2, "sgd": 0, "none": 0}[self.optimizer]


@dataclass(frozen=True)
class TableStats:
    name: str
    rows: int
    pending: int
    bytes: int
    admissions: int
    evictions: int
    version: int


class EmbeddingTable:
    def __init__(self, cfg: TableConfig) -> None:
        self.cfg = cfg
        self._rng = np.random.default_rng(cfg.seed)
        self._ids = IdMap()  # holds the keys too: index r is row r, and index 0 (EMPTY) the default row
        # ids seen but not admitted yet: their sighting counts and clocks
        self._set_pending(np.zeros(0, np.int64), np.zeros(0, np.int64))
        self.version = 0
        self.admissions = 0
        self.evictions = 0
        self._n = 1  # rows in use, the default row included
        self._alloc(16)
        self.weight[0] = self._init_rows(1)

    # -- storage ---------------------------------------------------------
    def _new_arrays(self, cap: int) -> dict[str, np.ndarray]:
        """The per-row arrays (the one list of them), sized for ``cap`` rows.
        The keys live in the id map; a clock is kept only for a ttl that reads it."""
        c, d = self.cfg, self.cfg.dim
        arrays = {
            "weight": np.zeros((cap, d), np.float32),
            "row_version": np.zeros(cap, np.int64),
        }
        if c.ttl_seconds is not None:
            arrays["last_ts"] = np.zeros(cap, np.float64)
        if c.ttl_events is not None:
            arrays["last_event"] = np.zeros(cap, np.int64)
        if c.optimizer == "adagrad":
            arrays["acc"] = np.full((cap, d), c.initial_accumulator, np.float32)
        elif c.optimizer == "adam":
            arrays["m"] = np.zeros((cap, d), np.float32)
            arrays["v"] = np.zeros((cap, d), np.float32)
            arrays["step"] = np.zeros(cap, np.int64)
        return arrays

    def _alloc(self, cap: int) -> None:
        for name, arr in self._new_arrays(cap).items():
            if hasattr(self, name):  # growing: keep the rows in use
                arr[: self._n] = getattr(self, name)[: self._n]
            setattr(self, name, arr)

    # pending state: the sighting count always, each clock only for the ttl that reads it
    _PENDING = {"count": np.int32, "seen": np.float64, "event": np.int64}

    def _pending_names(self) -> list[str]:
        c = self.cfg
        return ["count"] + ["seen"] * (c.ttl_seconds is not None) + ["event"] * (c.ttl_events is not None)

    def _grow_pending(self) -> None:
        need = self._pending.size
        if need > len(self._pending_count):
            cap = grown(need)
            for name in self._pending_names():
                old = getattr(self, f"_pending_{name}")
                new = np.zeros(cap, self._PENDING[name])
                new[: len(old)] = old
                setattr(self, f"_pending_{name}", new)

    def _set_pending(self, keys: np.ndarray, count: np.ndarray, seen: np.ndarray | None = None,
                     event: np.ndarray | None = None) -> None:
        self._pending = IdMap.from_keys(keys)
        # counts saturate at admit_after (all that admission reads), so they fit 32 bits
        count = np.minimum(count, self._count_cap)
        given = {"count": count, "seen": seen, "event": event}
        for name in self._pending_names():
            arr = np.zeros(len(keys), self._PENDING[name])
            if given[name] is not None:
                arr[:] = given[name]
            setattr(self, f"_pending_{name}", arr)
        self._grow_pending()

    @property
    def _count_cap(self) -> int:
        return min(self.cfg.admit_after, np.iinfo(np.int32).max)

    def _array_names(self) -> list[str]:
        return list(self._new_arrays(0))

    def _init_rows(self, n: int) -> np.ndarray:
        if self.cfg.init_std == 0:
            return np.zeros((n, self.cfg.dim), np.float32)
        return (self._rng.standard_normal((n, self.cfg.dim)) * self.cfg.init_std).astype(np.float32)

    def __len__(self) -> int:
        """Admitted ids (the default row not counted)."""
        return self._n - 1

    @property
    def size(self) -> int:
        """Rows in use, the default row included: every row index is below this."""
        return self._n

    @property
    def keys(self) -> np.ndarray:
        """The key of each row in use (a read-only view); the default row's is ``EMPTY``."""
        return self._ids.by_index

    # -- lookup ----------------------------------------------------------
    def rows(self, keys: np.ndarray) -> np.ndarray:
        """Rows for ``keys`` without side effects; not-admitted ids map to the default row 0."""
        return self._ids.index(keys)  # a key's index in the map is its row

    def observe(self, keys: np.ndarray, ts: float = 0.0, event: int = 0, rows: np.ndarray | None = None) -> np.ndarray:
        """Count a sighting of each key (duplicates count), admit those that
        reach ``admit_after``, refresh their last-seen clocks, and return rows.
        ``rows``, when given, is a current :meth:`rows` lookup of ``keys``."""
        keys = np.asarray(keys, np.int64)
        rows = self.rows(keys) if rows is None else rows.copy()
        unheld = np.flatnonzero(rows == 0)
        if unheld.size:
            fresh, fresh_counts = np.unique(keys[unheld], return_counts=True)
            if self.cfg.admit_after > 1:
                before = self._pending.size
                prow = self._pending.insert(fresh)
                self._grow_pending()
                self._pending_count[prow[prow >= before]] = 0
                count = np.minimum(self._pending_count[prow] + fresh_counts, self._count_cap)
                self._pending_count[prow] = count
                if self.cfg.ttl_seconds is not None:
                    self._pending_seen[prow] = ts
                if self.cfg.ttl_events is not None:
                    self._pending_event[prow] = event
                admit = fresh[self._pending_count[prow] >= self.cfg.admit_after]
            else:
                admit = fresh
            if admit.size:
                first_new = self._n
                self._admit(admit)  # sorted keys get consecutive rows in order
                at = np.minimum(np.searchsorted(admit, keys[unheld]), admit.size - 1)
                hit = admit[at] == keys[unheld]
                rows[unheld[hit]] = first_new + at[hit]
        if self.cfg.ttl_seconds is not None or self.cfg.ttl_events is not None:
            held = rows[rows > 0]
            if self.cfg.ttl_seconds is not None:
                self.last_ts[held] = ts
            if self.cfg.ttl_events is not None:
                self.last_event[held] = event
        return rows

    def _admit(self, keys: np.ndarray) -> None:
        n_new = keys.size
        if self._n + n_new > len(self.weight):
            self._alloc(grown(self._n + n_new))
        self._ids.insert(keys, unique=True)  # indices numbered _n.. in order: the new rows
        sl = slice(self._n, self._n + n_new)
        self.weight[sl] = self._init_rows(n_new)
        # Slots freed by expiry are reused: a new row starts with fresh optimizer state.
        if self.cfg.optimizer == "adagrad":
            self.acc[sl] = self.cfg.initial_accumulator
        elif self.cfg.optimizer == "adam":
            self.m[sl], self.v[sl], self.step[sl] = 0.0, 0.0, 0
        self.version += 1
        self.row_version[sl] = self.version
        self._n += n_new
        self.admissions += n_new

    # -- updates ---------------------------------------------------------
    def gather(self, rows: np.ndarray) -> np.ndarray:
        return self.weight[rows]

    def apply_gradients(self, rows: np.ndarray, grads: np.ndarray, unique: bool = False) -> None:
        """One optimizer step on ``rows`` (gradients of duplicate rows are
        summed; pass ``unique=True`` when the caller knows there are none)."""
        rows, grads = np.asarray(rows, np.int64), np.asarray(grads, np.float32)
        if not unique:
            rows, grads = _sum_duplicates(rows, grads)
        c = self.cfg
        if c.optimizer == "none":
            raise TypeError(f"table {c.name!r} has no optimizer; use add()")
        if c.optimizer == "sgd":
            self.weight[rows] -= c.lr * grads
        elif c.optimizer == "adagrad":
            acc = self.acc[rows] + grads * grads
            self.acc[rows] = acc
            self.weight[rows] -= c.lr * grads / (np.sqrt(acc) + c.eps)
        else:  # adam, lazily: each row keeps its own step count
            step = self.step[rows] + 1
            self.step[rows] = step
            m = c.beta1 * self.m[rows] + (1 - c.beta1) * grads
            v = c.beta2 * self.v[rows] + (1 - c.beta2) * grads * grads
            self.m[rows], self.v[rows] = m, v
            bc1 = (1 - c.beta1 ** step)[:, None]
            bc2 = (1 - c.beta2 ** step)[:, None]
            self.weight[rows] -= (c.lr / bc1) * m / (np.sqrt(v / bc2) + c.eps)
        self._bump(rows)

    def add(self, rows: np.ndarray, deltas: np.ndarray, unique: bool = False) -> None:
        """Add ``deltas`` to ``rows`` (for counter tables); see :meth:`apply_gradients` for ``unique``."""
        rows, deltas = np.asarray(rows, np.int64), np.asarray(deltas, np.float32)
        if not unique:
            rows, deltas = _sum_duplicates(rows, deltas)
        self.weight[rows] += deltas
        self._bump(rows)

    def _bump(self, rows: np.ndarray) -> None:
        self.version += 1
        self.row_version[rows] = self.version

    def held_keys(self) -> np.ndarray:
        """Keys of the admitted ids, in row order."""
        return self.keys[1:].copy()

    # -- serving and housekeeping ------------------------------------------
    def deltas(self, since_version: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(keys, weights, version) of rows changed after ``since_version``.
        The default row comes with key ``EMPTY`` (int64 min)."""
        changed = np.flatnonzero(self.row_version[: self._n] > since_version)
        return self.keys[changed], self.weight[changed], self.version  # fancy indexing copies

    def expire(self, now_ts: float = 0.0, now_event: int = 0) -> int:
        """Evict rows unseen for ``ttl_events`` events or ``ttl_seconds`` seconds; returns how many."""
        c = self.cfg
        if c.ttl_events is None and c.ttl_seconds is None:
            return 0
        old = np.zeros(self._n, bool)
        if c.ttl_events is not None:
            old |= self.last_event[: self._n] < now_event - c.ttl_events
        if c.ttl_seconds is not None:
            old |= self.last_ts[: self._n] < now_ts - c.ttl_seconds
        old[0] = False
        n_old = int(old.sum())
        if n_old:
            keep = np.flatnonzero(~old)
            for name in self._array_names():
                arr = getattr(self, name)
                arr[: keep.size] = arr[keep]
            kept = self.keys[keep[1:]]
            self._n = keep.size
            self._ids = IdMap.from_keys(kept)
            self.evictions += n_old
            self.version += 1
        if c.admit_after > 1 and self._pending.size:
            pk, _ = self._pending.items()
            m = pk.size
            live = self._ids.index(pk) == 0  # admitted ids leave the pending set
            if c.ttl_events is not None:
                live &= self._pending_event[:m] >= now_event - c.ttl_events
            if c.ttl_seconds is not None:
                live &= self._pending_seen[:m] >= now_ts - c.ttl_seconds
            self._set_pending(pk[live], **{n: getattr(self, f"_pending_{n}")[:m][live] for n in self._pending_names()})
        return n_old

    @property
    def nbytes(self) -> int:
        """Bytes of everything the table holds: row arrays at capacity, the id map, the pending set."""
        arrays = sum(getattr(self, n).nbytes for n in self._array_names())
        pending = self._pending.nbytes + sum(getattr(self, f"_pending_{n}").nbytes for n in self._pending_names())
        return arrays + self._ids.nbytes + pending

    def stats(self) -> TableStats:
        pk, _ = self._pending.items()
        pending = int((self._ids.index(pk) == 0).sum()) if pk.size else 0  # admitted ids linger until expire()
        return TableStats(self.cfg.name, len(self), pending, self.nbytes,
                          self.admissions, self.evictions, self.version)

    # -- state -------------------------------------------------------------
    def state_dict(self) -> dict:
        """A self-contained copy of the table (arrays trimmed to the rows held).
        A clock (``last_ts``, ``last_event`` and their pending twins) is there
        only where the table keeps it: where its ttl is set."""
        pk, _ = self._pending.items()
        m = pk.size
        state = {
            "config": asdict(self.cfg),
            "arrays": {"keys": self.keys.copy(), **{n: getattr(self, n)[: self._n].copy() for n in self._array_names()}},
            "pending_keys": pk, "pending_count": self._pending_count[:m].astype(np.int64),
            "counters": {"version": self.version, "admissions": self.admissions, "evictions": self.evictions},
            "rng": self._rng.bit_generator.state,
        }
        for name in self._pending_names()[1:]:
            state[f"pending_{name}"] = getattr(self, f"_pending_{name}")[:m].copy()
        return state

    @classmethod
    def from_state_dict(cls, state: dict) -> "EmbeddingTable":
        t = cls(TableConfig(**state["config"]))
        arrays = state["arrays"]
        n = len(arrays["weight"])
        t._alloc(n + 16)  # before _n moves: _alloc copies the first _n rows
        t._n = n
        for name in t._array_names():  # arrays the table doesn't keep (an untracked clock) are ignored
            if name in arrays:
                getattr(t, name)[:n] = arrays[name]
        t._ids = IdMap.from_keys(arrays["keys"][1:n])
        t._set_pending(state["pending_keys"], state["pending_count"],
                       state.get("pending_seen"), state.get("pending_event"))
        for k, v in state["counters"].items():
            setattr(t, k, v)
        t._rng.bit_generator.state = state["rng"]
        return t

    def copy(self) -> "EmbeddingTable":
        return EmbeddingTable.from_state_dict(self.state_dict())


def _sum_duplicates(rows: np.ndarray, vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    uniq, inv = np.unique(rows, return_inverse=True)
    if uniq.size == rows.size:
        return rows, vals
    out = np.zeros((uniq.size,) + vals.shape[1:], vals.dtype)
    np.add.at(out, inv, vals)
    return uniq, out
