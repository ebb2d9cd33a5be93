"""The wide part: a logistic regression learned per event by FTRL-Proximal
(McMahan et al. 2013), over the numeric inputs, one-hot ids and crossed ids.

The deep part (:mod:`olrec.model`) learns once per micro-batch; this part
learns after every single event, the earlier events of its own batch included,
which is what online learning on bursty streams rewards. Its per-id state
(FTRL's ``z`` and ``n``) is rows of an :class:`~olrec.embedding.EmbeddingTable`,
pulled and pushed once per batch like embeddings; the numeric weights are
dense state. The loop over events is compiled with numba.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from .embedding import EmbeddingTable, TableConfig
from .features import Batch, FeatureSpec, tagged_keys
from .ps import Fetch, LocalStore, Store


@dataclass(frozen=True)
class FTRL:
    alpha: float = 0.1
    beta: float = 1.0
    l1: float = 0.0
    l2: float = 1.0

    def __post_init__(self) -> None:
        for name in ("alpha", "beta"):
            if not getattr(self, name) > 0:
                raise ValueError(f"FTRL.{name} must be positive, got {getattr(self, name)}")
        for name in ("l1", "l2"):
            if getattr(self, name) < 0:
                raise ValueError(f"FTRL.{name} must be >= 0, got {getattr(self, name)}")


@numba.njit(cache=False, nogil=True)
def _weight(z: float, n: float, alpha: float, beta: float, l1: float, l2: float) -> float:
    if abs(z) <= l1:
        return 0.0
    sign = 1.0 if z > 0 else -1.0
    return -(z - sign * l1) / ((beta + np.sqrt(n)) / alpha + l2)


@numba.njit(cache=False, nogil=True)
def _dense_logit(x, j, zn_dense, alpha, beta, l1, l2):
    """Event j's logit from the numeric inputs ``x[j]`` and the bias (the last dense weight)."""
    m = x.shape[1]
    s = _weight(zn_dense[m, 0], zn_dense[m, 1], alpha, beta, l1, l2)
    for k in range(m):
        s += _weight(zn_dense[k, 0], zn_dense[k, 1], alpha, beta, l1, l2) * x[j, k]
    return s


@numba.njit(cache=False, nogil=True)
def _sigmoid(s):
    return 1.0 / (1.0 + np.exp(-min(max(s, -35.0), 35.0)))


@numba.njit(cache=False, nogil=True)
def _ftrl_pass(ptr, idx, x, y, zn, zn_dense, alpha, beta, l1, l2, out):
    """Per event: predict from the current weights, then update them.
    ``idx[ptr[j]:ptr[j+1]]`` are event j's rows in ``zn``; ``x`` its numeric inputs
    (the last dense weight is the bias)."""
    b, m = x.shape
    for j in range(b):
        s = _dense_logit(x, j, zn_dense, alpha, beta, l1, l2)
        for t in range(ptr[j], ptr[j + 1]):
            i = idx[t]
            s += _weight(zn[i, 0], zn[i, 1], alpha, beta, l1, l2)
        p = _sigmoid(s)
        out[j] = p
        g = p - y[j]
        for k in range(m + 1):
            gk = g * (x[j, k] if k < m else 1.0)
            z, n = zn_dense[k, 0], zn_dense[k, 1]
            sigma = (np.sqrt(n + gk * gk) - np.sqrt(n)) / alpha
            zn_dense[k, 0] = z + gk - sigma * _weight(z, n, alpha, beta, l1, l2)
            zn_dense[k, 1] = n + gk * gk
        for t in range(ptr[j], ptr[j + 1]):
            i = idx[t]
            z, n = zn[i, 0], zn[i, 1]
            sigma = (np.sqrt(n + g * g) - np.sqrt(n)) / alpha
            zn[i, 0] = z + g - sigma * _weight(z, n, alpha, beta, l1, l2)
            zn[i, 1] = n + g * g


@numba.njit(cache=False, nogil=True)
def _ftrl_scores(ev, idx, x, zn, zn_dense, alpha, beta, l1, l2, out):
    """What :func:`_ftrl_pass` predicts without learning, for keys in any event
    order: key t of event ``ev[t]`` has row ``idx[t]`` in ``zn``. An event's keys
    are summed in their order here, as the pass sums them, so scores are equal."""
    for j in range(len(out)):
        out[j] = _dense_logit(x, j, zn_dense, alpha, beta, l1, l2)
    for t in range(len(ev)):
        i = idx[t]
        out[ev[t]] += _weight(zn[i, 0], zn[i, 1], alpha, beta, l1, l2)
    for j in range(len(out)):
        out[j] = _sigmoid(out[j])


class Wide:
    """Per-event FTRL over ``n_numeric`` inputs, every sparse field's ids and ``spec.crosses``."""

    TABLE = "wide"

    def __init__(self, spec: FeatureSpec, n_numeric: int, ftrl: FTRL = FTRL(), ttl_events: int | None = None,
                 store: Store | None = None) -> None:
        self.spec, self.ftrl = spec, ftrl
        self.store = store if store is not None else LocalStore([self.table_config(ttl_events)])
        self.dense = np.zeros((n_numeric + 1, 2))  # (z, n) per numeric input, then the bias
        # Compile now (start-up), not inside the first batch.
        self._pass(np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros((0, n_numeric)), np.zeros(0),
                   np.zeros((1, 2)), self.dense.copy())
        _ftrl_scores(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, n_numeric)), np.zeros((1, 2)),
                     self.dense, ftrl.alpha, ftrl.beta, ftrl.l1, ftrl.l2, np.zeros(0))

    @classmethod
    def table_config(cls, ttl_events: int | None = None) -> TableConfig:
        """Per-id (z, n) of FTRL, changed by adding deltas."""
        return TableConfig(name=cls.TABLE, dim=2, optimizer="none", init_std=0.0, ttl_events=ttl_events)

    @property
    def table(self) -> EmbeddingTable:
        """The (z, n) table, when it lives in this process."""
        return self.store.tables[self.TABLE]  # type: ignore[attr-defined]

    def keys(self, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        """Every event's one-hot keys (tagged: fields, then crosses), flat in event
        order, with ``ptr`` so that event j's are ``keys[ptr[j]:ptr[j+1]]``."""
        k, ev, _ = tagged_keys(batch, (*self.spec.sparse_fields, *self.spec.crosses))
        # Small event indices sort by radix (linear time) when they fit 16 bits.
        order = np.argsort(ev.astype(np.uint16) if len(batch) < 1 << 16 else ev, kind="stable")
        ptr = np.concatenate(([0], np.cumsum(np.bincount(ev, minlength=len(batch))))).astype(np.int64)
        return k[order], ptr

    def _pass(self, ptr, idx, x, y, zn, dense) -> np.ndarray:
        f = self.ftrl
        out = np.empty(len(ptr) - 1)
        _ftrl_pass(ptr, idx, np.ascontiguousarray(x, np.float64), np.ascontiguousarray(y, np.float64),
                   zn, dense, f.alpha, f.beta, f.l1, f.l2, out)
        return out

    def lookup(self, batch: Batch, ts: float = 0.0, event: int = 0) -> tuple:
        """The batch's keys with ``ptr`` (see :meth:`keys`) and the learning :class:`~olrec.ps.Fetch` of their rows."""
        keys, ptr = self.keys(batch)
        return (keys, ptr), Fetch(self.TABLE, keys, observe=True, ts=ts, event=event)

    def step(self, batch: Batch, x: np.ndarray, ts: float = 0.0, event: int = 0,
             prefetched: tuple | None = None) -> np.ndarray:
        """Progressive probabilities for the batch, each event scored before it is
        learned. ``prefetched``: (lookup(), rows), fetched with other tables'."""
        if prefetched is None:
            found, request = self.lookup(batch, ts, event)
            prefetched = (found, self.store.fetch_many([request])[0])
        (keys, ptr), pulled = prefetched
        zn = pulled.weights.astype(np.float64)
        before = zn.copy()
        p = self._pass(ptr, pulled.inverse.astype(np.int64), x, batch.label, zn, self.dense)
        self.store.add(self.TABLE, pulled, (zn - before).astype(np.float32), ts=ts, event=event)
        return p

    def predict(self, batch: Batch, x: np.ndarray) -> np.ndarray:
        """Probabilities from the stored weights, learning nothing (keys left in
        field order: no sort into event order, as :meth:`keys` does for learning)."""
        keys, ev, _ = tagged_keys(batch, (*self.spec.sparse_fields, *self.spec.crosses))
        pulled = self.store.fetch(self.TABLE, keys)
        f, out = self.ftrl, np.empty(len(batch))
        _ftrl_scores(ev, pulled.inverse.astype(np.int64), np.ascontiguousarray(x, np.float64),
                     pulled.weights.astype(np.float64), self.dense, f.alpha, f.beta, f.l1, f.l2, out)
        return out
