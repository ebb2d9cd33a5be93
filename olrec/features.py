"""From events to model inputs: id keys per field, numeric context, and
real-time counter features.

Which columns are which comes from :class:`FeatureSpec`. Counter features are
per-id statistics of past labels (count and positives), computed from strictly
earlier events only: the state kept per id *plus* an exclusive running sum over
earlier events of the same batch, so a micro-batch sees every earlier event of
the stream even though the model learns once per batch. An event's own label
never enters its features.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .embedding import EmbeddingTable, TableConfig
from .ids import GOLDEN, hash_strings, tag_keys
from .ps import Fetch, LocalStore, Store
from .schema import MULTI_SEP, RESERVED


@dataclass(frozen=True)
class FeatureSpec:
    """Which event columns feed the model.

    ``categorical`` and ``multi`` name id-like columns (``user_id`` and
    ``item_id`` are always categorical). ``counters`` names the keys that keep
    label counters: a field, or a cross ``"user_id*genres"`` of a field with a
    (possibly multi-valued) field.
    """

    categorical: tuple[str, ...] = ("user_id", "item_id")
    multi: tuple[str, ...] = ()
    numeric: tuple[str, ...] = ()
    counters: tuple[str, ...] = ("user_id", "item_id")
    prior_strength: float = 5.0  # pseudo-events pulling a rate towards the global rate
    #: Crossed ids the wide (per-event) part learns a weight for, e.g.
    #: ``"user_id*genres"`` (a user's taste per genre), ``"item_id*age"``.
    crosses: tuple[str, ...] = ()
    #: (key, alpha) pairs: an exponentially weighted moving average of the key's
    #: labels (recent taste; MovieLens users rate in sessions). Keys must be counters.
    recency: tuple[tuple[str, float], ...] = (("user_id", 0.1), ("user_id", 0.3))

    def __post_init__(self) -> None:
        # Accept lists (from YAML/JSON) but store tuples: the spec stays hashable.
        for name in ("categorical", "multi", "numeric", "counters", "crosses"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "recency", tuple((str(k), float(a)) for k, a in self.recency))
        for need in ("user_id", "item_id"):
            if need not in self.categorical:
                raise ValueError(f"FeatureSpec.categorical must include {need!r}")
        seen: set[str] = set()
        for name in (*self.categorical, *self.multi, *self.numeric):
            if name in seen:
                raise ValueError(f"FeatureSpec: column {name!r} is listed twice")
            seen.add(name)
            if name in RESERVED and name not in ("user_id", "item_id"):
                raise ValueError(f"FeatureSpec: {name!r} is not a feature column")
        for what in ("counters", "crosses"):
            for key in getattr(self, what):
                for part in key.split("*"):
                    if part not in self.categorical and part not in self.multi:
                        raise ValueError(f"FeatureSpec.{what}: {key!r} names {part!r}, which is not a categorical or multi field")
                if len(key.split("*")) > 2:
                    raise ValueError(f"FeatureSpec.{what}: {key!r} crosses more than two fields")
        if len(self.crosses) + len(self.categorical) + len(self.multi) > 127:
            raise ValueError("FeatureSpec: at most 127 sparse fields and crosses")
        if self.counters and not {"user_id", "item_id"} <= set(self.counters):
            raise ValueError(f"FeatureSpec.counters must include 'user_id' and 'item_id' (the residual "
                             f"references), got {self.counters}")
        for key, alpha in self.recency:
            if key not in self.counters:
                raise ValueError(f"FeatureSpec.recency: {key!r} is not one of the counters {self.counters}")
            if not 0 < alpha < 1:
                raise ValueError(f"FeatureSpec.recency: alpha for {key!r} must be in (0, 1), got {alpha}")
        if self.prior_strength <= 0:
            raise ValueError(f"FeatureSpec.prior_strength must be positive, got {self.prior_strength}")

    @property
    def sparse_fields(self) -> tuple[str, ...]:
        return (*self.categorical, *self.multi)

    @property
    def n_numeric(self) -> int:
        """Width of the numeric input: context numerics, 3 features per counter key, the recency averages, the global rate."""
        return len(self.numeric) + 3 * len(self.counters) + len(self.recency) + 1

    @classmethod
    def infer(cls, schema: pa.Schema, sample: pa.Table | None = None, **overrides) -> "FeatureSpec":
        """Guess roles from a schema: strings are categorical (multi if a sample
        value holds ``|``), numbers numeric. Counters on user and item, and on the
        user crossed with each multi-valued field (tastes per genre, say)."""
        cat, multi, num = ["user_id", "item_id"], [], []
        for f in schema:
            if f.name in RESERVED or f.name in ("p_true", "offset"):
                continue
            if pa.types.is_string(f.type) or pa.types.is_large_string(f.type):
                is_multi = sample is not None and pc.any(pc.match_substring(sample[f.name], MULTI_SEP)).as_py()
                (multi if is_multi else cat).append(f.name)
            elif pa.types.is_integer(f.type) or pa.types.is_floating(f.type) or pa.types.is_boolean(f.type):
                num.append(f.name)
        counters = ["user_id", "item_id", *(f"user_id*{m}" for m in multi)]
        args = dict(categorical=tuple(cat), multi=tuple(multi), numeric=tuple(num), counters=tuple(counters),
                    crosses=tuple(f"user_id*{m}" for m in multi))
        args.update(overrides)
        return cls(**args)


@dataclass
class Batch:
    """One micro-batch, encoded. Shapes: B events; multi fields are ragged (flat keys + lengths)."""

    keys: dict[str, np.ndarray]  # categorical field -> (B,) int64
    multi: dict[str, tuple[np.ndarray, np.ndarray]]  # multi field -> (flat keys, per-event lengths)
    numeric: np.ndarray  # (B, len(spec.numeric)) float32, raw
    label: np.ndarray  # (B,) float32
    ts: np.ndarray  # (B,) float64
    weight: np.ndarray  # (B,) float32
    #: :func:`counter_keys` per field or cross, made once: the counters and the
    #: wide part both read the user's, the item's and the crosses' keys.
    derived: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.label)

    @classmethod
    def concat(cls, batches: Sequence["Batch"]) -> "Batch":
        """The events of ``batches`` (same fields), in order, as one batch."""
        if len(batches) == 1:
            return batches[0]
        first = batches[0]
        return cls(keys={f: np.concatenate([b.keys[f] for b in batches]) for f in first.keys},
                   multi={f: (np.concatenate([b.multi[f][0] for b in batches]),
                              np.concatenate([b.multi[f][1] for b in batches])) for f in first.multi},
                   numeric=np.concatenate([b.numeric for b in batches]),
                   label=np.concatenate([b.label for b in batches]), ts=np.concatenate([b.ts for b in batches]),
                   weight=np.concatenate([b.weight for b in batches]))

    def slice(self, start: int, stop: int) -> "Batch":
        """Events [start, stop) of this batch (ragged fields sliced consistently)."""
        multi = {}
        for f, (flat, lengths) in self.multi.items():
            ends = np.cumsum(lengths)
            lo = int(ends[start - 1]) if start > 0 else 0
            hi = int(ends[stop - 1]) if stop > 0 else 0
            multi[f] = (flat[lo:hi], lengths[start:stop])
        return Batch(keys={f: k[start:stop] for f, k in self.keys.items()}, multi=multi,
                     numeric=self.numeric[start:stop], label=self.label[start:stop], ts=self.ts[start:stop],
                     weight=self.weight[start:stop])


def _string_keys(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """int64 keys for a string column: hash each distinct value once."""
    enc = pc.dictionary_encode(col)
    if isinstance(enc, pa.ChunkedArray):
        enc = enc.combine_chunks() if enc.num_chunks != 1 else enc.chunk(0)
    dict_keys = hash_strings(enc.dictionary.to_numpy(zero_copy_only=False))
    nulls = pc.is_null(enc.indices).to_numpy(zero_copy_only=False)
    idx = pc.fill_null(enc.indices, 0).to_numpy(zero_copy_only=False)  # with nulls left in, numpy makes them float
    out = dict_keys[idx] if len(dict_keys) else np.zeros(len(idx), np.int64)
    return np.where(nulls, -1, out)  # a missing value is its own key


def _column_keys(col: pa.ChunkedArray) -> np.ndarray:
    if pa.types.is_integer(col.type):
        return pc.fill_null(col, -1).to_numpy().astype(np.int64)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return _string_keys(col)
    return _string_keys(pc.cast(col, pa.string()))


def encode(table: pa.Table, spec: FeatureSpec) -> Batch:
    n = table.num_rows
    missing = [c for c in (*spec.categorical, *spec.multi, *spec.numeric) if c not in table.column_names]
    if missing:
        raise ValueError(f"events lack feature column(s) {missing}; they have {table.column_names}")
    keys = {f: _column_keys(table[f]) for f in spec.categorical}
    multi = {}
    for f in spec.multi:
        lists = pc.split_pattern(pc.fill_null(pc.cast(table[f], pa.string()), ""), MULTI_SEP)
        lists = lists.combine_chunks() if isinstance(lists, pa.ChunkedArray) else lists
        flat = lists.flatten()
        lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
        multi[f] = (_string_keys(flat) if len(flat) else np.zeros(0, np.int64), lengths)
    if spec.numeric:
        numeric = np.stack([pc.cast(table[c], pa.float64()).to_numpy(zero_copy_only=False) for c in spec.numeric], 1)
        numeric = np.nan_to_num(numeric.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    else:
        numeric = np.zeros((n, 0), np.float32)
    # A row without a weight (a segment that had none, e.g. file events
    # streamed together with Feedback events) weighs 1, as a missing column does.
    weight = (pc.fill_null(table["weight"], 1.0).to_numpy(zero_copy_only=False).astype(np.float32)
              if "weight" in table.column_names else np.ones(n, np.float32))
    return Batch(keys=keys, multi=multi, numeric=numeric,
                 label=table["label"].to_numpy(zero_copy_only=False).astype(np.float32),
                 ts=table["ts"].to_numpy(zero_copy_only=False).astype(np.float64), weight=weight)


class Groups:
    """A batch's keys grouped once (one sort), reused by every per-key statistic.

    Positions are in batch order; "earlier" means an earlier position.
    """

    def __init__(self, keys: np.ndarray) -> None:
        n = len(keys)
        self.order = np.argsort(keys, kind="stable")
        ks = keys[self.order]
        self.first = np.concatenate(([True], ks[1:] != ks[:-1])) if n else np.zeros(0, bool)  # sorted space
        self.start = np.maximum.accumulate(np.where(self.first, np.arange(n), 0)) if n else np.zeros(0, np.int64)
        self.pos = np.arange(n) - self.start  # position within its key's run
        self.uniq = ks[self.first]
        self.inverse = np.empty(n, np.int64)
        self.inverse[self.order] = np.cumsum(self.first) - 1

    def _unsort(self, sorted_vals: np.ndarray) -> np.ndarray:
        out = np.empty_like(sorted_vals)
        out[self.order] = sorted_vals
        return out

    def exclusive_sum(self, vals: np.ndarray) -> np.ndarray:
        """out[j] = sum of vals[i] over earlier positions i with the same key."""
        if len(vals) == 0:
            return vals.copy()
        v = vals[self.order]
        excl = np.cumsum(v, axis=0) - v
        return self._unsort(excl - excl[self.start])

    def total(self, vals: np.ndarray) -> np.ndarray:
        """Sum of vals per unique key."""
        if len(vals) == 0:
            return np.zeros((0,) + vals.shape[1:], vals.dtype)
        return np.add.reduceat(vals[self.order], np.flatnonzero(self.first), axis=0)

    def ewma(self, vals: np.ndarray, start: np.ndarray, alphas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Moving averages ``v <- v + alpha * (x - v)`` per key, one column per
        alpha, from ``start`` ((unique keys, A): stored values). ``alphas`` is
        (A,), or (n, A) per position (equal on all of a key's positions).
        Returns (value before each position (n, A), value per unique key after
        its last position (U, A)). A segmented Hillis-Steele scan: log2(longest
        run) vectorised passes, no exponent blow-up."""
        alphas = np.asarray(alphas, np.float64)
        n = len(vals)
        if n == 0:
            return np.zeros((0, alphas.shape[-1])), start.copy()
        if alphas.ndim == 2:
            alphas = alphas[self.order]
        decay = 1.0 - alphas
        acc = alphas * vals[self.order].astype(np.float64)[:, None]
        d, longest = 1, int(self.pos.max())
        while d <= longest:
            sel = np.flatnonzero(self.pos >= d)
            nxt = acc.copy()
            nxt[sel] += (decay[sel] if decay.ndim == 2 else decay) ** d * acc[sel - d]
            acc, d = nxt, d * 2
        s0 = start[np.cumsum(self.first) - 1]
        after = decay ** (self.pos + 1)[:, None] * s0 + acc
        before = np.where(self.first[:, None], s0, np.concatenate((np.zeros((1, alphas.shape[-1])), after[:-1])))
        last = np.concatenate((self.first[1:], [True]))
        return self._unsort(before), after[last]


def counter_keys(batch: Batch, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Keys of one field or cross (``"user_id*genres"``), flat, with the event
    index of each (a multi field, or a cross with one, gives several keys per
    event; a value repeated within an event counts once). Made once per batch
    and shared (a single field's keys are the batch's own array): do not modify."""
    got = batch.derived.get(key)
    if got is None:
        got = batch.derived[key] = _counter_keys(batch, key)
    return got


def _counter_keys(batch: Batch, key: str) -> tuple[np.ndarray, np.ndarray]:
    parts = key.split("*")
    idx = np.arange(len(batch))

    def field_keys(f: str) -> tuple[np.ndarray, np.ndarray]:
        if f in batch.keys:
            return batch.keys[f], idx
        flat, lengths = batch.multi[f]
        return flat, np.repeat(idx, lengths)

    k, ev = field_keys(parts[0])
    if len(parts) == 2:
        k2, ev2 = field_keys(parts[1])
        if len(ev) != len(idx):  # make the first part the single-valued one
            k, ev, k2, ev2 = k2, ev2, k, ev
        # Mix the two ids into one int64 key; ids stay in their own table, so
        # only crosses of the same pair can meet. (Array integer overflow wraps
        # silently: no errstate needed, whose set and reset cost more than this.)
        k1 = np.asarray(k, np.int64)[ev2].view(np.uint64)
        k = (k1 * GOLDEN ^ np.asarray(k2, np.int64).view(np.uint64)).view(np.int64)
        ev = ev2
    if any(p in batch.multi for p in parts) and len(k) > 1:
        # A value repeated inside one event ("Drama|Drama") would make the
        # event's second key see its own first key's label: keep one per event.
        o = np.lexsort((k, ev))
        dup = np.zeros(len(k), bool)
        dup[o[1:]] = (ev[o[1:]] == ev[o[:-1]]) & (k[o[1:]] == k[o[:-1]])
        k, ev = k[~dup], ev[~dup]
    return k, ev


def tagged_keys(batch: Batch, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[slice]]:
    """The :func:`counter_keys` of each field or cross in ``names``, tagged by
    its index (:func:`olrec.ids.tag_keys`) and concatenated: keys, event index
    of each, and each name's slice."""
    ks, evs, spans, at = [], [], [], 0
    for tag, name in enumerate(names):
        k, ev = counter_keys(batch, name)
        ks.append(tag_keys(k, tag))
        evs.append(ev)
        spans.append(slice(at, at + len(k)))
        at += len(k)
    if not ks:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), spans
    return np.concatenate(ks), np.concatenate(evs), spans


class Counters:
    """Label counters per key, kept in one embedding table (a key's index
    tags its ids, as sparse fields do): count, positives, the residual sum of
    ``label - reference rate``, then the moving averages of the labels, one
    per recency alpha of that key.

    The residual debiases a rate: a user who rates only popular films has a
    high positive rate but a residual near zero. A user key's reference is the
    item's rate at the time of the event, any other key's the user's.
    """

    DIM = 3
    TABLE = "counters"

    def __init__(self, spec: FeatureSpec, ttl_events: int | None = None, store: Store | None = None) -> None:
        self.spec = spec
        self.keys = list(spec.counters)
        self.alphas = {k: [a for rk, a in spec.recency if rk == k] for k in self.keys}
        self.n_avg = max((len(v) for v in self.alphas.values()), default=0)
        self.store = store if store is not None else LocalStore([self.table_config(spec, ttl_events)])
        self.total = np.zeros(2, np.float64)  # global (count, positives)

    @classmethod
    def table_config(cls, spec: FeatureSpec, ttl_events: int | None = None) -> TableConfig:
        n_avg = max((sum(1 for rk, _ in spec.recency if rk == k) for k in spec.counters), default=0)
        return TableConfig(name=cls.TABLE, dim=cls.DIM + n_avg, optimizer="none", init_std=0.0, ttl_events=ttl_events)

    @property
    def table(self) -> EmbeddingTable:
        """The counter table, when it lives in this process."""
        return self.store.tables[self.TABLE]  # type: ignore[attr-defined]

    @property
    def width(self) -> int:
        return self.DIM * len(self.keys) + len(self.spec.recency) + 1

    def feature_names(self) -> list[str]:
        names = [f"{k}:{stat}" for k in self.keys for stat in ("rate_logit", "log_count", "residual")]
        return names + [f"{k}:recent{a:g}" for k, a in self.spec.recency] + ["global:rate_logit"]

    def lookup(self, batch: Batch) -> tuple:
        """The batch's counter keys (tagged, grouped) and the :class:`~olrec.ps.Fetch`
        of their rows: a learner fetches them with its other tables' rows."""
        k, ev, spans = tagged_keys(batch, self.keys)
        g = Groups(k)
        return (k, ev, spans, g), Fetch(self.TABLE, g.uniq, unique=True)

    def features(self, batch: Batch, online: bool, prefetched: tuple | None = None) -> tuple[np.ndarray, tuple | None]:
        """Features (B, width) float32 and (``online``) the update to apply once the batch is learned.

        Per key: logit of the smoothed positive rate, log1p(count), mean
        residual; then the moving averages; last, the logit of the global
        rate. ``online`` adds the exclusive running sums of earlier events in
        the batch; a frozen model passes False and sees only its stored state.
        """
        n = len(batch)
        y = batch.label.astype(np.float64)
        tot = np.tile(self.total, (n, 1))
        if online:
            tot = tot + np.stack([np.arange(n), np.cumsum(y) - y], 1)
        prior = (tot[:, 1] + 1.0) / (tot[:, 0] + 2.0)
        a = self.spec.prior_strength
        out = np.empty((n, self.width), np.float32)

        # Every key's ids in one array, tagged by the key's index: one sort,
        # one lookup, one scan for all counters. ``prefetched``: (lookup(), rows).
        if prefetched is None:
            found, request = self.lookup(batch)
            prefetched = (found, self.store.fetch_many([request])[0])
        (k, ev, spans, g), pulled = prefetched
        stored = pulled.weights.astype(np.float64)
        state = stored[g.inverse, : self.DIM]
        if online:
            state[:, :2] += g.exclusive_sum(np.stack([np.ones(len(k)), y[ev]], 1))

        # Pass 1: each key's count and rate per event.
        cnt, rate = {}, {}
        for key, sp in zip(self.keys, spans):
            cnt[key] = np.bincount(ev[sp], state[sp, 0], minlength=n)
            rate[key] = (np.bincount(ev[sp], state[sp, 1], minlength=n) + a * prior) / (cnt[key] + a)

        # Pass 2: residuals against the reference rate, and moving averages.
        resid = np.empty(len(k))
        for key, sp in zip(self.keys, spans):
            resid[sp] = y[ev[sp]] - rate["item_id" if key.split("*")[0] == "user_id" else "user_id"][ev[sp]]
        if online:
            state[:, 2] += g.exclusive_sum(resid)
        for j, (key, sp) in enumerate(zip(self.keys, spans)):
            out[:, 3 * j] = _logit(rate[key])
            out[:, 3 * j + 1] = np.log1p(cnt[key])
            out[:, 3 * j + 2] = np.bincount(ev[sp], state[sp, 2], minlength=n) / (cnt[key] + a)
        delta = [g.total(np.stack([np.ones(len(k)), y[ev], resid], 1))] if online else []
        if self.n_avg:
            # Moving averages only over the keys that have them (often the user alone).
            with_avg = [(key, sp) for key, sp in zip(self.keys, spans) if self.alphas[key]]
            sub = np.concatenate([np.arange(sp.start, sp.stop) for _, sp in with_avg])
            pos, sub_spans = 0, []
            for key, sp in with_avg:
                sub_spans.append((key, slice(pos, pos + sp.stop - sp.start)))
                pos += sp.stop - sp.start
            # A key never seen (count 0) starts its averages at the global rate.
            unseen = prior[0] if n else 0.5
            if online:
                g2 = Groups(k[sub])
                at_u = np.searchsorted(g.uniq, g2.uniq)  # g2's keys among g's (both sorted)
                alphas = np.full((len(sub), self.n_avg), 0.5)  # unused columns get 0.5, never read
                for key, sp in sub_spans:
                    alphas[sp, : len(self.alphas[key])] = self.alphas[key]
                stored_avg = stored[at_u, self.DIM :]
                start = np.where((stored[at_u, 0] > 0)[:, None], stored_avg, unseen)
                before, after = g2.ewma(y[ev[sub]], start, alphas)
            else:  # each key's stored averages as they are
                at_k = stored[g.inverse[sub]]
                before = np.where((at_k[:, 0] > 0)[:, None], at_k[:, self.DIM :], unseen)
            col = self.DIM * len(self.keys)
            cols = {}
            for key, sp in sub_spans:
                e = ev[sub][sp]
                counts = np.maximum(np.bincount(e, minlength=n), 1)
                for i, alpha in enumerate(self.alphas[key]):
                    cols[(key, alpha)] = np.bincount(e, before[sp, i], minlength=n) / counts
            for key, alpha in self.spec.recency:
                out[:, col] = cols[(key, alpha)]
                col += 1
            if online:
                avg_delta = np.zeros((len(g.uniq), self.n_avg))
                avg_delta[at_u] = after - stored_avg
                delta.append(avg_delta)
        out[:, -1] = _logit(prior)
        return out, (pulled, np.concatenate(delta, 1).astype(np.float32)) if online else None

    def update(self, batch: Batch, update: tuple, event: int = 0) -> None:
        """Apply the update that :meth:`features` returned for this batch."""
        pulled, delta = update
        ts = float(batch.ts[-1]) if len(batch) else 0.0
        self.store.add(self.TABLE, pulled, delta, ts=ts, event=event)
        self.total += (len(batch), float(batch.label.sum()))


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


def ml100k_spec() -> FeatureSpec:
    """The feature spec for MovieLens-100K as :func:`olrec.sources.read_ml100k` reads it."""
    return FeatureSpec(
        categorical=("user_id", "item_id", "age", "gender", "occupation", "zip"),
        multi=("genres",),
        numeric=("year",),
        counters=("user_id", "item_id", "user_id*genres"),
        crosses=("user_id*genres", "item_id*age", "item_id*gender", "item_id*occupation"),
    )
