"""Collisionless id → row mapping.

:class:`IdMap` is an open-addressing hash table (linear probing) over int64
keys, vectorised with numpy so a batch of ids costs a few array passes rather
than a Python loop. Every distinct key gets its own row: probing compares the
stored key, so two ids never share a row (unlike hashing ids into a fixed-size
table). Memory is two int64 arrays at load factor <= 1/2, so about 32 bytes per
id; it doubles as ids arrive.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

EMPTY = np.iinfo(np.int64).min  # reserved: never a valid key
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def hash_strings(values: np.ndarray) -> np.ndarray:
    """Map strings to negative int64 keys (64-bit hash, top bit set).

    Integer ids are used as they are (they should be non-negative), so the sign
    keeps string and integer ids apart. The hash is stable across processes
    and runs (pandas' SipHash with its fixed key).
    """
    h = pd.util.hash_array(np.asarray(values, dtype=object), categorize=False)
    return -(h >> np.uint64(2)).astype(np.int64) - 1  # in [-2**62, -1]: never EMPTY


TAG_BITS = 56
_LOW = np.int64((1 << TAG_BITS) - 1)


def tag_keys(keys: np.ndarray, tag: int) -> np.ndarray:
    """Keys of one field (or counter) in a table shared by several: the id's
    low 56 bits under ``tag`` in the top byte. Integer ids in [0, 2**56) stay
    exact, so fields never collide; string ids keep 56 bits of their hash."""
    if not 0 <= tag < 128:
        raise ValueError(f"tag must be in [0, 128), got {tag}")
    return (np.asarray(keys, np.int64) & _LOW) | np.int64(tag << TAG_BITS)


def unique_small(values: np.ndarray, bound: int) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(values, return_inverse=True)`` for integers in [0, bound): a
    mark-and-rank pass instead of a sort while ``bound`` is not much larger
    than the input (row indices of a table, say)."""
    if bound > 64 * len(values):
        return np.unique(values, return_inverse=True)
    seen = np.zeros(bound, bool)
    seen[values] = True
    uniq = np.flatnonzero(seen)
    rank = np.empty(bound, np.int64)
    rank[uniq] = np.arange(len(uniq))
    return uniq, rank[values]


class IdMap:
    """int64 key → row index in [0, size), assigned in first-seen order."""

    def __init__(self, capacity: int = 1024) -> None:
        cap = 1 << max(4, int(np.ceil(np.log2(max(capacity, 2) * 2))))
        self._keys = np.full(cap, EMPTY, np.int64)
        self._vals = np.full(cap, -1, np.int64)
        self._bits = int(np.log2(cap))
        self.size = 0

    @property
    def capacity(self) -> int:
        return len(self._keys)

    @property
    def nbytes(self) -> int:
        return self._keys.nbytes + self._vals.nbytes

    def _home(self, keys: np.ndarray) -> np.ndarray:
        # Fibonacci hashing: the high bits of key * golden ratio spread
        # sequential ids evenly over the slots.
        h = keys.astype(np.uint64) * _GOLDEN  # array integer overflow wraps, silently
        return (h >> np.uint64(64 - self._bits)).astype(np.int64)

    def _find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For unique ``keys``: the slot holding each key, or the first empty slot on its probe path."""
        mask = self.capacity - 1
        slots = self._home(keys)
        found = np.zeros(len(keys), bool)
        pending = np.arange(len(keys))
        while pending.size:
            s = slots[pending]
            stored = self._keys[s]
            hit = stored == keys[pending]
            found[pending[hit]] = True
            cont = ~hit & (stored != EMPTY)
            slots[pending[cont]] = (s[cont] + 1) & mask
            pending = pending[cont]
        return slots, found

    def get(self, keys: np.ndarray) -> np.ndarray:
        """Rows for ``keys`` (any shape, duplicates allowed); -1 where absent."""
        keys = np.asarray(keys, np.int64)
        slots, found = self._find(keys.ravel())  # probing handles duplicates; no sort needed
        return np.where(found, self._vals[slots], -1).reshape(keys.shape)

    def insert(self, keys: np.ndarray) -> np.ndarray:
        """Rows for ``keys``, adding the absent ones with new rows in first-seen order."""
        keys = np.asarray(keys, np.int64)
        if (keys == EMPTY).any():
            raise ValueError(f"id {EMPTY} is reserved and cannot be stored")
        uniq, first, inv = np.unique(keys, return_index=True, return_inverse=True)
        slots, found = self._find(uniq)
        out = np.where(found, self._vals[slots], -1)
        new = np.flatnonzero(~found)
        if new.size:
            # New rows are numbered in the order the keys first appear in the batch.
            new = new[np.argsort(first[new], kind="stable")]
            if (self.size + new.size) * 2 > self.capacity:
                self._grow(self.size + new.size)
            rows = np.arange(self.size, self.size + new.size)
            self._place(uniq[new], rows)
            out[new] = rows
            self.size += new.size
        return out[inv].reshape(keys.shape)

    def _place(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Write absent unique ``keys`` with ``rows``; two keys racing for one empty slot retry."""
        while keys.size:
            slots, _ = self._find(keys)
            _, winner = np.unique(slots, return_index=True)
            self._keys[slots[winner]] = keys[winner]
            self._vals[slots[winner]] = rows[winner]
            lose = np.ones(keys.size, bool)
            lose[winner] = False
            keys, rows = keys[lose], rows[lose]

    def _grow(self, need: int) -> None:
        live = self._keys != EMPTY
        keys, vals = self._keys[live], self._vals[live]
        cap = self.capacity
        while need * 2 > cap:
            cap *= 2
        self._keys = np.full(cap, EMPTY, np.int64)
        self._vals = np.full(cap, -1, np.int64)
        self._bits = int(np.log2(cap))
        self._place(keys, vals)

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """All (keys, rows), ordered by row."""
        live = self._keys != EMPTY
        keys, vals = self._keys[live], self._vals[live]
        order = np.argsort(vals)
        return keys[order], vals[order]

    @classmethod
    def from_keys(cls, keys: np.ndarray) -> "IdMap":
        """A map giving ``keys[i]`` row ``i`` (keys must be unique)."""
        m = cls(capacity=len(keys))
        m.insert(np.asarray(keys, np.int64))
        return m
