"""Collisionless id → row mapping.

:class:`IdMap` is an open-addressing hash table (linear probing) over int64
keys: lookups are one compiled loop over a batch of ids (numba), inserts a
few numpy array passes. Every distinct key gets its own row: probing compares the
stored key, so two ids never share a row (unlike hashing ids into a fixed-size
table).

Memory: the keys are stored once, densely in row order (8 bytes each, plus
the growth slack of :func:`grown`), and the slot table holds only a 4-byte
index into them, at load factor <= 1/2: 8 to 16 bytes of slots per key. So
about 20 bytes per id in all; a table of rows keyed by the map can use the
map's key array as its own (:attr:`IdMap.by_index`) rather than keep a copy.
"""

from __future__ import annotations

import numba
import numpy as np
import pandas as pd

EMPTY = np.iinfo(np.int64).min  # reserved: never a valid key
GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio: Fibonacci hashing (IdMap slots, cross keys)


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


def grown(need: int) -> int:
    """A capacity for ``need`` items when an array must grow: half again while
    small, a quarter once large, so big tables carry at most 25 % slack and
    each item is still copied only a few times over all the growth."""
    return need + max(16, need // 2 if need < 1 << 16 else need // 4)


@numba.njit(cache=False, nogil=True)
def _probe(keys, slots, by_index, bits):
    """:meth:`IdMap._find`, compiled: per key, walk from its home slot (as
    :meth:`IdMap._home` hashes it) to the slot holding it or to an empty one,
    and return the index there (0: absent).
    A loop per key: numpy passes would take one pass per probe step, and a
    batch's longest probe path sets their count."""
    mask = len(slots) - 1
    shift = np.uint64(64 - bits)
    out = np.empty(len(keys), np.int64)
    for j in range(len(keys)):
        k = keys[j]
        s = np.int64((np.uint64(k) * GOLDEN) >> shift)
        i = np.int64(slots[s])
        while i != 0 and by_index[i] != k:
            s = (s + 1) & mask
            i = np.int64(slots[s])
        out[j] = i
    return out


class IdMap:
    """int64 key → row index in [0, size), assigned in first-seen order.

    Storage: ``_keys[0]`` is ``EMPTY`` (a sentinel) and ``_keys[r + 1]`` the key
    of row ``r``; the slot table ``_slots`` holds ``r + 1`` for the key placed
    in a slot and 0 for an empty slot, which so points at the sentinel. A probe
    reads a slot and the key it points to; no key equals ``EMPTY``, so an
    empty slot ends the probe. ``r + 1`` is the key's *index* (:meth:`index`,
    :attr:`by_index`): index 0 means absent.
    """

    def __init__(self, capacity: int = 1024) -> None:
        capacity = max(int(capacity), 0)
        self.size = 0
        self._keys = np.full(capacity + 1, EMPTY, np.int64)
        self._new_slots(capacity)
        # Compile the lookup now (a process's first map: start-up), not inside its first batch.
        _probe(np.zeros(0, np.int64), self._slots, self._keys, self._bits)

    def _new_slots(self, n: int) -> None:
        """An empty slot table for ``n`` keys at load factor <= 1/2."""
        bits = max(4, (max(n, 1) * 2 - 1).bit_length())  # smallest power of two >= 2n, 16 at least
        self._bits = bits
        # 4-byte indices while they fit (all but tables of 2**31 ids)
        self._slots = np.zeros(1 << bits, np.int32 if n < 2**31 - 1 else np.int64)

    @property
    def capacity(self) -> int:
        """Slots in the hash table (at least twice :attr:`size`)."""
        return len(self._slots)

    @property
    def nbytes(self) -> int:
        return self._slots.nbytes + self._keys.nbytes

    @property
    def by_index(self) -> np.ndarray:
        """Keys by index (row + 1), read-only: ``EMPTY`` at 0, then the keys in row order."""
        v = self._keys[: self.size + 1]
        v.flags.writeable = False
        return v

    def _home(self, keys: np.ndarray) -> np.ndarray:
        # Fibonacci hashing: the high bits of key * golden ratio spread
        # sequential ids evenly over the slots.
        h = keys.view(np.uint64) * GOLDEN  # array integer overflow wraps, silently
        return (h >> np.uint64(64 - self._bits)).astype(np.int64)

    def _find(self, keys: np.ndarray) -> np.ndarray:
        """For 1-D ``keys`` (duplicates allowed): each key's index (0: absent)."""
        return _probe(keys, self._slots, self._keys, self._bits)

    def index(self, keys: np.ndarray) -> np.ndarray:
        """Indices (row + 1) for ``keys`` (any shape, duplicates allowed); 0 where absent."""
        keys = np.asarray(keys, np.int64)
        return self._find(keys.ravel()).reshape(keys.shape)

    def get(self, keys: np.ndarray) -> np.ndarray:
        """Rows for ``keys`` (any shape, duplicates allowed); -1 where absent."""
        keys = np.asarray(keys, np.int64)
        idx = self._find(keys.ravel())  # probing handles duplicates; no sort needed
        return np.subtract(idx, 1, dtype=np.int64).reshape(keys.shape)

    def insert(self, keys: np.ndarray, unique: bool = False) -> np.ndarray:
        """Rows for ``keys``, adding the absent ones with new rows in first-seen
        order (pass ``unique=True`` when the caller knows there are no duplicates)."""
        keys = np.asarray(keys, np.int64)
        if (keys == EMPTY).any():
            raise ValueError(f"id {EMPTY} is reserved and cannot be stored")
        flat = keys.ravel()
        idx = self._find(flat)
        rows = np.subtract(idx, 1, dtype=np.int64)
        absent = np.flatnonzero(idx == 0)
        if absent.size and unique:
            rows[absent] = np.arange(self.size, self.size + absent.size)
            self._append(flat[absent])
        elif absent.size:
            # only the absent keys are sorted: new rows follow first sight in the batch
            uniq, first, inv = np.unique(flat[absent], return_index=True, return_inverse=True)
            seen = np.zeros(absent.size, bool)
            seen[first] = True
            rank = (np.cumsum(seen) - 1)[first]  # of each unique key in first-seen order
            order = np.empty_like(rank)
            order[rank] = np.arange(rank.size)
            rows[absent] = self.size + rank[inv.ravel()]
            self._append(uniq[order])
        return rows.reshape(keys.shape)

    def _append(self, keys: np.ndarray) -> None:
        """Give unique absent ``keys`` the next rows, in order."""
        n = self.size + keys.size
        if n + 1 > len(self._keys):
            k = np.full(grown(n) + 1, EMPTY, np.int64)
            k[: self.size + 1] = self._keys[: self.size + 1]
            self._keys = k
        self._keys[self.size + 1 : n + 1] = keys
        idx = np.arange(self.size + 1, n + 1)
        self.size = n
        if n * 2 > len(self._slots) or (n >= 2**31 - 1 and self._slots.dtype == np.int32):
            self._new_slots(n)  # rehash every key, the new ones with them
            self._place(self._keys[1 : n + 1], np.arange(1, n + 1))
        else:
            self._place(keys, idx)

    def _place(self, keys: np.ndarray, idx: np.ndarray) -> None:
        """Put unique absent ``keys`` in empty slots, pointing at ``idx``."""
        mask = len(self._slots) - 1
        while keys.size:
            slots = self._home(keys)
            pending = np.flatnonzero(self._slots[slots] != 0)
            while pending.size:  # walk to the first empty slot; no key compare needed
                s = (slots[pending] + 1) & mask
                slots[pending] = s
                pending = pending[self._slots[s] != 0]
            # keys racing for one empty slot: the last write wins, the others retry
            self._slots[slots] = idx
            lose = self._slots[slots] != idx
            keys, idx = keys[lose], idx[lose]

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """All (keys, rows), ordered by row."""
        return self._keys[1 : self.size + 1].copy(), np.arange(self.size)

    @classmethod
    def from_keys(cls, keys: np.ndarray) -> "IdMap":
        """A map giving ``keys[i]`` row ``i`` (keys must be unique)."""
        keys = np.asarray(keys, np.int64)
        m = cls(capacity=len(keys))
        m.insert(keys)
        return m
