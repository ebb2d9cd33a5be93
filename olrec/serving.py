"""What a serving replica keeps and computes; ``serve/app.py`` wraps it in Ray Serve.

A replica holds a copy of the per-id rows it serves (:class:`RowMirror`: the
sparse rows in fp16 by default, counters and the wide part's state in fp32,
since counts above 2048 do not survive fp16) and the dense parts of the model
(:class:`Snapshot`). :class:`ServingModel` refreshes both from the run:

- live, while ``olrec train`` runs: rows from the parameter-server shards with
  ``deltas(since_version)``, dense weights from the run's ``published/``. The
  published watermark W is read *before* the rows are pulled, and training
  publishes W only once every push below it is applied, so the rows served
  hold every event below W (they may hold more);
- published, when the shards are out of reach (a replica on another Ray cluster,
  or the trainer has stopped): the newest checkpoint plus the rows every later
  published version changed (each version carries them: olrec.train.RowChain),
  as fresh as the trainer's reports;
- serving-only, for runs whose versions carry no rows: the latest checkpoint
  (its rows, dense state and watermark).

Side information comes from the event log (:class:`Catalog`): each item's
item-side fields (genres, year), each user's last user-side fields, item
popularity, and what users clicked. Refresh work (file reads, Ray calls) runs
off the request path; its result is applied between requests.
"""

from __future__ import annotations

import hashlib
import io
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from .features import Batch, FeatureSpec, _column_keys, _string_keys
from .ids import EMPTY, IdMap, grown, tag_keys
from .learner import OnlineLearner
from .log import EventLog
from .ps import Fetch, Pulled, ShardedTables
from .schema import MULTI_SEP, RESERVED
from .storage import local_path, resolve, where

RowDtype = Literal["fp32", "fp16", "int8"]


@dataclass(frozen=True)
class ServeConfig:
    """How a replica serves (``serve/config.yaml`` passes these as application args)."""

    run_dir: str = field(repr=False)  # a URI may carry credentials
    scorer: Literal["triton", "in_process"] = "triton"
    precision: Literal["int8", "fp32"] = "int8"  # of the ranking model in Triton
    triton_url: str = "127.0.0.1:8001"
    triton_model: str = "olrec_ranker"
    triton_timeout_s: float = 0.5
    #: Triton unreachable: answer UNAVAILABLE, or score in the replica (fp32) and say so.
    on_triton_down: Literal["unavailable", "in_process"] = "unavailable"
    rows: RowDtype = "fp16"  # how the replica keeps sparse rows
    refresh_s: float = 0.2  # between pulls of changed rows
    #: Between looks for a newer dense version to quantize and load into Triton
    #: (each load costs Triton a model instance: seconds of CPU on a small machine).
    publish_s: float = 2.0
    max_k: int = 100
    max_ids: int = 1000  # item ids in Score, exclude ids in Recommend, events in Feedback
    candidates: int = 200  # retrieved for ranking by Recommend
    exclude_clicked: bool = True
    #: The Kubernetes model repository's instance group: KIND_GPU for a Triton with GPUs (k8s/overlays/gpu).
    triton_gpu: bool = False
    #: Where the Triton model repositories are written (default: :func:`triton_repo`); a
    #: Kubernetes Triton reads ``<it>/k8s`` from a volume, also for a run in an object store.
    triton_repo: str | None = None
    feedback_token: str | None = field(default=None, repr=False)  # Feedback needs "authorization: Bearer <token>" when set

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"serve config: {what}")

        need(self.scorer in ("triton", "in_process"), f"scorer must be 'triton' or 'in_process', got {self.scorer!r}")
        need(self.precision in ("int8", "fp32"), f"precision must be 'int8' or 'fp32', got {self.precision!r}")
        need(self.on_triton_down in ("unavailable", "in_process"),
             f"on_triton_down must be 'unavailable' or 'in_process', got {self.on_triton_down!r}")
        need(self.rows in ("fp32", "fp16", "int8"), f"rows must be 'fp32', 'fp16' or 'int8', got {self.rows!r}")
        for name in ("triton_timeout_s", "refresh_s", "publish_s"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and v > 0 and math.isfinite(v), f"{name} must be a positive number, got {v!r}")
        for name in ("max_k", "max_ids", "candidates"):
            v = getattr(self, name)
            need(isinstance(v, int) and v >= 1, f"{name} must be an integer >= 1, got {v!r}")
        need(self.candidates >= self.max_k, f"candidates ({self.candidates}) must be >= max_k ({self.max_k})")


class RequestError(Exception):
    """A request the service refuses; ``code`` is a gRPC status code name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def bad(message: str) -> RequestError:
    return RequestError("INVALID_ARGUMENT", message)


# ---------------------------------------------------------------------------
# Rows.

class RowMirror:
    """A replica's copy of one table's rows: key -> row, stored as fp32, fp16,
    or int8 with a per-row scale (max |w| / 127). Row 0 is the table's default
    row (what ids never admitted get)."""

    def __init__(self, dim: int, dtype: RowDtype = "fp32") -> None:
        self.dim, self.dtype = dim, dtype
        self.ids = IdMap()
        self._w = np.zeros((16, dim), {"fp32": np.float32, "fp16": np.float16, "int8": np.int8}[dtype])
        self._scale = np.ones(16, np.float32)
        self.version = 0  # bumped by every update: caches keyed on it

    def __len__(self) -> int:
        return self.ids.size

    def update(self, keys: np.ndarray, weights: np.ndarray) -> None:
        keys = np.asarray(keys, np.int64)
        weights = np.asarray(weights, np.float32)
        default = keys == EMPTY
        rows = np.zeros(len(keys), np.int64)
        rows[~default] = self.ids.insert(keys[~default]) + 1
        if self.ids.size + 1 > len(self._w):
            cap = grown(self.ids.size + 1)
            w = np.zeros((cap, self.dim), self._w.dtype)
            w[: len(self._w)] = self._w
            s = np.ones(cap, np.float32)
            s[: len(self._scale)] = self._scale
            self._w, self._scale = w, s
        if self.dtype == "int8":
            scale = np.maximum(np.abs(weights).max(1), 1e-12) / 127.0
            self._w[rows] = np.clip(np.rint(weights / scale[:, None]), -127, 127)
            self._scale[rows] = scale
        else:
            self._w[rows] = weights
        self.version += 1

    def rows(self, keys: np.ndarray) -> np.ndarray:
        """Row of each key; 0 (the default row) for keys not held."""
        return self.ids.index(keys)

    def gather(self, rows: np.ndarray) -> np.ndarray:
        w = self._w[rows].astype(np.float32)
        return w * self._scale[rows, None] if self.dtype == "int8" else w

    @property
    def nbytes(self) -> int:
        n = self.ids.size + 1
        return int(self._w[:n].nbytes + (self._scale[:n].nbytes if self.dtype == "int8" else 0) + self.ids.nbytes)


class MirrorStore:
    """The :class:`~olrec.ps.Store` a serving learner reads: the replica's
    mirrors, read-only (scoring never admits, counts or learns)."""

    def __init__(self, mirrors: Mapping[str, RowMirror]) -> None:
        self.mirrors = dict(mirrors)

    def fetch(self, table: str, keys: np.ndarray, *, observe: bool = False, ts: float = 0.0,
              event: int = 0, unique: bool = False) -> Pulled:
        # A row per key asked for, repeats included: a request's keys repeat (the
        # user's fields on every candidate), but hashing each is cheaper than
        # deduplicating them first, and nothing is pushed back to these rows.
        m = self.mirrors[table]
        return Pulled(m.gather(m.rows(keys)), np.arange(len(keys)), np.asarray(keys, np.int64) if unique else None, None)

    def fetch_many(self, requests: Sequence[Fetch]) -> list[Pulled]:
        return [self.fetch(r.table, r.keys, unique=r.unique) for r in requests]

    def _read_only(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a serving replica's rows are read-only")

    apply = add = _read_only

    def end_batch(self, tag: Any = None) -> None:
        pass

    def done(self) -> list:
        return []

    def flush(self) -> None:
        pass

    def expire(self, ts: float, event: int) -> int:
        return 0


# ---------------------------------------------------------------------------
# Side information from the log.

class Catalog:
    """What the event log says about items and users, following the log.

    A context column is item-side when every item has one value of it in the
    first events read (MovieLens: genres, year), user-side when every user has
    one (age, gender, occupation, zip); requests supply the others. Item-side
    fields are kept encoded (table keys, numbers), so scoring a request builds
    its :class:`~olrec.features.Batch` without encoding the candidates again."""

    SAMPLE = 50_000
    #: Events to judge the sides from while the log is still growing: from its
    #: first few events every field looks item-side (each item seen once).
    MIN_SIDES = 2_000
    _CACHE = 100_000  # encoded request values kept

    def __init__(self, log_dir: str | Path, spec: FeatureSpec) -> None:
        self.log = EventLog(log_dir, create=False)
        self.spec = spec
        self.features = [c for c in (*spec.categorical, *spec.multi, *spec.numeric) if c not in ("user_id", "item_id")]
        self.end = 0
        self.item_side: list[str] | None = None  # decided on the first events
        self.user_side: list[str] = []
        self.items = IdMap()  # item id -> row of the arrays below
        self.item_values: dict[str, np.ndarray] = {}  # field -> per item row: keys (object: key arrays) or numbers
        self.positives = np.zeros(0, np.float64)
        self.users: dict[int, dict[str, Any]] = {}  # user -> last user-side values
        self.clicked: dict[int, set[int]] = {}
        self._encoded: dict[tuple[str, Any], Any] = {}
        self._undecided = 0  # events seen before the sides were decided

    def read_new(self) -> pa.Table | None:
        """Events appended since the last read (off the request path)."""
        end = self.log.end_offset
        if end <= self.end:
            return None
        cols = ["user_id", "item_id", "label", *self.features]
        return pa.concat_tables(list(self.log.read(self.end, end, columns=cols)), promote_options="permissive")

    def add(self, t: pa.Table) -> None:
        """Fold newly read events in (between requests)."""
        if self.item_side is None:
            if self._undecided < t.num_rows < self.MIN_SIDES:
                # Few events, and more arriving: left unread, so the next refresh reads them all again.
                self._undecided = t.num_rows
                return
            self._decide_sides(t.slice(0, self.SAMPLE))
        users = t["user_id"].to_numpy()
        items = t["item_id"].to_numpy()
        rows = self.items.insert(items)
        n = self.items.size
        if n > len(self.positives):
            cap = grown(n)
            self.positives = np.concatenate([self.positives, np.zeros(cap - len(self.positives))])
            for c, v in self.item_values.items():
                self.item_values[c] = np.concatenate([v, self._missing(c, cap - len(v))])
        label = t["label"].to_numpy(zero_copy_only=False).astype(np.float64)
        np.add.at(self.positives, rows, label)
        # Each item's last event sets its item-side fields.
        last = len(items) - 1 - np.unique(items[::-1], return_index=True)[1]
        for c in self.item_side or ():
            self.item_values[c][rows[last]] = self._encode(c, t[c].take(pa.array(last)))
        if self.user_side:
            at = {int(u): i for i, u in enumerate(users)}
            vals = {c: t[c].to_numpy(zero_copy_only=False) for c in self.user_side}
            for u, i in at.items():
                self.users[u] = {c: vals[c][i] for c in self.user_side}
        for u, i in zip(users[label > 0].tolist(), items[label > 0].tolist()):
            self.clicked.setdefault(u, set()).add(i)
        self.end += t.num_rows

    def _decide_sides(self, t: pa.Table) -> None:
        df = t.to_pandas()
        item_side, user_side = [], []
        for c in self.features:
            if c not in df or df[c].isna().all():
                continue
            if df.groupby("item_id")[c].nunique(dropna=False).max() <= 1:
                item_side.append(c)
            elif df.groupby("user_id")[c].nunique(dropna=False).max() <= 1:
                user_side.append(c)
        self.item_side, self.user_side = item_side, user_side
        self.item_values = {c: self._missing(c, len(self.positives)) for c in item_side}

    # -- encoding, exactly as olrec.features.encode does ------------------------
    def _encode(self, c: str, col: pa.ChunkedArray | pa.Array) -> np.ndarray:
        """Per value of ``col``: a key (categorical), an array of keys (multi) or a number."""
        col = pa.chunked_array([col]) if isinstance(col, pa.Array) else col
        if c in self.spec.numeric:
            x = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)
            return np.nan_to_num(x.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        if c in self.spec.multi:
            lists = pc.split_pattern(pc.fill_null(pc.cast(col, pa.string()), ""), MULTI_SEP).combine_chunks()
            flat = _string_keys(lists.flatten())
            ends = np.cumsum(pc.list_value_length(lists).to_numpy(zero_copy_only=False))
            out = np.empty(len(ends), object)
            out[:] = np.split(flat, ends[:-1])
            return out
        return _column_keys(pa.chunked_array([pc.cast(col, pa.string())]) if pa.types.is_null(col.type) else col)

    def _missing(self, c: str, n: int) -> np.ndarray:
        """What a missing value encodes to, ``n`` times (unknown items)."""
        return _repeat(self._encode(c, pa.array([None], type=self._type(c)))[0], n)

    def _value(self, c: str, v: Any) -> Any:
        """A request's (or profile's) value of ``c``, encoded (cached)."""
        got = self._encoded.get((c, v))
        if got is None:
            if len(self._encoded) > self._CACHE:
                self._encoded.clear()
            got = self._encoded[(c, v)] = self._encode(c, pa.array([v], type=self._type(c)))[0]
        return got

    def _type(self, c: str) -> pa.DataType:
        return pa.float64() if c in self.spec.numeric else pa.string()

    @property
    def context_fields(self) -> list[str]:
        """Fields a request may give: all features but the item-side ones."""
        return [c for c in self.features if c not in (self.item_side or ())]

    def item_ids(self) -> np.ndarray:
        return self.items.items()[0]

    def popular(self) -> np.ndarray:
        """Item ids, most clicked first."""
        order = np.argsort(-self.positives[: self.items.size], kind="stable")
        return self.item_ids()[order]

    def batch(self, user: int, items: np.ndarray, context: Mapping[str, Any]) -> Batch:
        """The (user, item) pairs as an unlabelled batch: what ``encode`` gives for
        them as events with the log's raw values (a test checks it)."""
        n = len(items)
        rows = self.items.get(items)
        known = rows >= 0
        profile = self.users.get(int(user), {})
        spec = self.spec

        def field(c: str) -> np.ndarray:
            if c in self.item_values:
                v = self.item_values[c][np.where(known, rows, 0)]
                unknown = np.flatnonzero(~known)
                if unknown.size:
                    v[unknown] = self._missing(c, unknown.size)
                return v
            return _repeat(self._value(c, context.get(c, profile.get(c))), n)

        keys = {"user_id": np.full(n, user, np.int64), "item_id": np.asarray(items, np.int64)}
        keys |= {c: field(c).astype(np.int64) for c in spec.categorical if c not in keys}
        multi = {}
        for c in spec.multi:
            parts = field(c)
            multi[c] = (np.concatenate(parts) if n else np.zeros(0, np.int64),
                        np.fromiter((len(p) for p in parts), np.int64, n))
        numeric = (np.stack([field(c).astype(np.float32) for c in spec.numeric], 1) if spec.numeric
                   else np.zeros((n, 0), np.float32))
        return Batch(keys=keys, multi=multi, numeric=numeric, label=np.zeros(n, np.float32),
                     ts=np.full(n, time.time()), weight=np.ones(n, np.float32))


def _repeat(value: Any, n: int) -> np.ndarray:
    """``value`` n times; an array value (a multi field's keys) stays one element."""
    if isinstance(value, np.ndarray):
        out = np.empty(n, object)
        for i in range(n):
            out[i] = value
        return out
    return np.full(n, value)


# ---------------------------------------------------------------------------
# Dense state and refresh.

@dataclass
class Snapshot:
    """The dense side of the model that scores a request, and the watermark of
    the rows: immutable once built (a refresh builds a new one)."""

    learner: OnlineLearner  # its tower, blend, wide numerics, global counts; rows via MirrorStore
    watermark: int
    dense_version: str  # the events the dense weights had learned
    source: str  # "live" or "checkpoint:<path>"


@dataclass
class Update:
    """What a refresh read, to apply between requests."""

    rows: dict[str, tuple[np.ndarray, np.ndarray]]
    versions: dict[str, list[int]]
    full: bool
    dense: dict | None  # new dense weights (a published version or a checkpoint's dense.pt)
    watermark: int
    source: str
    events: pa.Table | None = None
    mirrors: dict[str, RowMirror] | None = None  # a full reload's rows, built off the request path
    published: str | None = None  # the published version ``dense`` came from
    chain: int | None = None  # the last published version whose rows are in (source "published")


TABLES = ("sparse", "counters", "wide")


class ServingModel:
    """The replica's model: mirrors, the dense snapshot, the catalog and the
    item vectors for retrieval. ``read_update`` runs off the request path and
    ``apply`` between requests (both from one refresher)."""

    def __init__(self, cfg: ServeConfig) -> None:
        from .train import RunPaths, read_model

        self.cfg = cfg
        self.paths = RunPaths.of(cfg.run_dir)
        self.spec, self.lcfg, self.n_shards = read_model(self.paths.root)
        self.tables = [t for t in TABLES if t != "wide" or self.lcfg.wide]
        self.mirrors = self._new_mirrors()
        self.store = MirrorStore(self.mirrors)
        self.catalog = Catalog(self.paths.log, self.spec)
        self.snapshot: Snapshot | None = None
        self._published: str | None = None  # the published version the snapshot holds
        self._chain: int | None = None  # source "published": the last version whose rows are in
        self._no_start: int | None = None  # the newest version when no start point was found
        self._versions: dict[str, list[int]] = {}
        self._force_full = False  # a shard went back in version: pull everything again
        self._shards: list | None = None  # the live trainer's shard actors, once found
        self._item_cache: tuple[RowMirror, tuple, np.ndarray, np.ndarray] | None = None
        self.user_field = self.spec.sparse_fields.index("user_id")
        self.item_field = self.spec.sparse_fields.index("item_id")
        self.refreshes = 0

    def _new_mirrors(self) -> dict[str, RowMirror]:
        from .learner import learner_tables

        dims = {t.name: t.dim for t in learner_tables(self.spec, self.lcfg)}
        return {t: RowMirror(dims[t], self.cfg.rows if t == "sparse" else "fp32") for t in self.tables}

    # -- refresh ------------------------------------------------------------
    def read_update(self) -> Update:
        """Rows, dense weights and events new since the last refresh (source
        "none" while there is no model: no trainer ran, no checkpoint)."""
        from ray.exceptions import RayActorError

        from .train import latest_published

        events = self.catalog.read_new()
        up = None
        shards = self._live_shards()
        published = latest_published(self.paths) if shards is not None else None
        if shards is not None and published is not None:
            try:
                up = self._read_live(shards, published)
            except RayActorError:  # the trainer stopped or restarted: look its shards up again
                self._shards = None
                shards = self._live_shards()
                if shards is not None:
                    up = self._read_live(shards, published)
        if up is None:
            up = self._read_published()
        if up is None:
            up = self._read_checkpoint()
        up.events = events
        return up

    def _live_shards(self) -> list | None:
        """The trainer's shard actors, looked up by name once and kept (a lookup
        is a round trip to Ray's GCS per shard; refreshes come 5 times a second)
        until a call to them fails."""
        import ray

        from .train import NAMESPACE, shard_name

        if self._shards is not None:
            return self._shards
        if not ray.is_initialized():
            return None
        try:
            self._shards = [ray.get_actor(shard_name(self.paths.root, i), namespace=NAMESPACE)
                            for i in range(self.n_shards)]
        except ValueError:
            return None
        return self._shards

    def _read_live(self, shards: list, published: str) -> Update:
        from .train import read_listed

        source = "live:" + ",".join(s._actor_id.hex()[:8] for s in shards)
        full = self.snapshot is None or self.snapshot.source != source or self._force_full
        self._force_full = False
        # Dense weights and W first, rows after: the rows then hold every event below W.
        dense = None
        if full or published != self._published:
            published, dense = read_listed(self.paths, published)
        watermark = dense["watermark"] if dense is not None else self.snapshot.watermark  # type: ignore[union-attr]
        since = {t: [-1] * len(shards) if full else self._versions[t] for t in self.tables}
        got = ShardedTables(shards).deltas_many(since)
        rows, versions = {}, {}
        for t in self.tables:
            keys, weights, vs = got[t]
            if not full and any(v < s for v, s in zip(vs, since[t])):  # a shard was reset or restored
                self._force_full = True
                return self._read_live(shards, published)
            rows[t], versions[t] = (keys, weights), vs
        up = self._update(rows, versions, full, dense, watermark, source)
        up.published = published if dense is not None else None
        return up

    def _read_published(self) -> Update | None:
        """The rows and dense weights of the published versions, for a replica that cannot
        reach the trainer's shards (it runs in another Ray cluster: a KubeRay RayService):
        a checkpoint's rows plus the rows every later version of its chain changed
        (:class:`olrec.train.RowChain`). ``None`` when versions carry no rows or the ones
        needed are gone: then the newest checkpoint alone."""
        from .checkpoint import CheckpointError
        from .train import published_versions

        seqs = [int(n[:12]) for n in published_versions(self.paths)]
        if not seqs or seqs[-1] == self._no_start:
            return None
        snap = self.snapshot
        try:
            if snap is not None and snap.source == "published" and self._chain is not None:
                if seqs[-1] == self._chain:
                    return Update({}, {}, False, None, snap.watermark, "published")
                versions = [self._version(s) for s in seqs if s > self._chain]
                if versions and all(v.get("rows") for v in versions) and _links(self._chain, versions):
                    return Update(_overlay({}, versions, self.tables), {}, False, versions[-1], versions[-1]["watermark"],
                                  "published", chain=seqs[-1])
            up = self._restart_published(seqs)
        except (FileNotFoundError, CheckpointError):  # pruned or damaged while we read: the checkpoint
            up = None
        if up is None:  # no start point for this version: look again only when a newer one is out
            self._no_start = seqs[-1]
        return up

    def _restart_published(self, seqs: list[int]) -> Update | None:
        """From the newest start point: walking back from the newest version along its
        chain, the first checkpoint that names the version before it, or the chain's
        start (its base checkpoint, or empty tables)."""
        from .checkpoint import checkpoint_store
        from .train import learner_from_checkpoint

        store = checkpoint_store(self.paths.checkpoints)
        ckpts = store.list(on_refused=lambda e: None)
        by_published = {int(c.meta["published"]): c for c in ckpts if c.meta.get("published") is not None}
        present = set(seqs)
        chain: list[dict] = []
        cur = seqs[-1]
        while True:
            v = self._version(cur)
            if not v.get("rows"):  # a version of an older olrec: no rows in it
                return None
            chain.insert(0, v)
            prev = v["rows"]["prev"]
            if prev is None:  # the chain's start: its base, or a newer checkpoint made before its first version
                b = v["rows"]["base"]
                starts = [c for c in ckpts if c.seq == b or (c.meta.get("chain_base") == b and "published" in c.meta
                                                             and c.meta["published"] is None)]
                base = starts[-1] if starts else None
                if b and base is None:
                    return None  # pruned
                break
            if prev in by_published:
                base = by_published[prev]
                break
            if prev not in present:
                return None  # a version it needs is pruned
            cur = prev
        rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if base is not None:
            store.verify(base)
            learner = learner_from_checkpoint(base.path, self.spec, self.lcfg)
            for t in self.tables:
                keys, weights, _ = learner.store.deltas(t, [-1] * len(learner.store.shards))  # type: ignore[attr-defined]
                rows[t] = (keys, weights)
        up = self._update(_overlay(rows, chain, self.tables), {}, True, chain[-1], chain[-1]["watermark"], "published")
        up.chain = seqs[-1]
        return up

    def _version(self, seq: int) -> dict:
        """Version ``seq`` with the rows it changed (``["rows"]["tables"]``) when it carries them."""
        from .train import read_published, read_published_rows

        v = read_published(self.paths, f"{seq:012d}.pt")
        if v.get("rows"):
            v["rows"] = {**v["rows"], "tables": read_published_rows(self.paths, seq)}
        return v

    def _read_checkpoint(self) -> Update:
        from .checkpoint import checkpoint_store
        from .train import learner_from_checkpoint

        store = checkpoint_store(self.paths.checkpoints)
        newest = store.list(on_refused=lambda e: None)  # manifests only: cheap enough for every refresh
        if self.snapshot is not None and newest and self.snapshot.source == f"checkpoint:{where(newest[-1].path)}":
            return Update({}, {}, False, None, self.snapshot.watermark, self.snapshot.source)
        latest = store.latest(on_refused=lambda e: None)  # reads every byte: only when it changed
        if latest is None:
            return Update({}, {}, False, None, -1, "none")
        source = f"checkpoint:{where(latest.path)}"
        if self.snapshot is not None and self.snapshot.source == source:
            return Update({}, {}, False, None, self.snapshot.watermark, source)
        learner = learner_from_checkpoint(latest.path, self.spec, self.lcfg)
        rows, versions = {}, {}
        for t in self.tables:
            keys, weights, vs = learner.store.deltas(t, [-1] * len(learner.store.shards))  # type: ignore[attr-defined]
            rows[t], versions[t] = (keys, weights), vs
        return self._update(rows, versions, True, learner.dense_state_dict(), latest.watermark, source)

    def _update(self, rows: dict, versions: dict, full: bool, dense: dict | None, watermark: int,
                source: str) -> Update:
        """An update; a full one (it always carries dense weights) with its mirrors
        already built here, off the request path."""
        if not full:
            return Update(rows, versions, False, dense, watermark, source)
        mirrors = self._new_mirrors()
        for t, (keys, weights) in rows.items():
            mirrors[t].update(keys, weights)
        return Update({}, versions, True, dense, watermark, source, mirrors=mirrors)

    def apply(self, up: Update) -> None:
        """Fold an update in (between requests: nothing here awaits)."""
        self.refreshes += 1
        if up.events is not None:
            self.catalog.add(up.events)
        if up.source == "none":
            return
        if up.mirrors is not None:
            self.mirrors = up.mirrors
            self.store = MirrorStore(self.mirrors)
        for t, (keys, weights) in up.rows.items():
            if len(keys):
                self.mirrors[t].update(keys, weights)
        if up.versions:
            self._versions = up.versions
        if up.published is not None:
            self._published = up.published
        if up.chain is not None:
            self._chain = up.chain
        if up.dense is not None:  # new dense weights (always, with new mirrors): a new snapshot learner
            learner = OnlineLearner(self.spec, self.lcfg, store=self.store)
            _load_dense(learner, up.dense)
            self.snapshot = Snapshot(learner, int(up.watermark), str(int(up.dense["events"])), up.source)
        else:
            assert self.snapshot is not None  # the first update of a source is full
            self.snapshot = Snapshot(self.snapshot.learner, int(up.watermark), self.snapshot.dense_version, up.source)

    @property
    def ready(self) -> bool:
        return self.snapshot is not None

    # -- scoring ------------------------------------------------------------
    def inputs(self, user: int, items: np.ndarray, context: Mapping[str, Any]) -> tuple:
        """(snapshot, emb, num, p_wide) for scoring ``items`` for ``user``."""
        return self.rank_inputs(self.catalog.batch(user, items, context))

    def rank_inputs(self, batch: Batch) -> tuple:
        """(snapshot, emb, num, p_wide) for scoring the pairs of ``batch`` (of
        :meth:`Catalog.batch`, or several concatenated): read now, so a refresh
        while the tower runs cannot mix versions into them."""
        snap = self.snapshot
        if snap is None:
            raise RequestError("UNAVAILABLE", f"no model yet: no trainer has published to {where(self.paths.root)} "
                                              f"and it holds no checkpoint")
        emb, num, p_wide = snap.learner.ranking_inputs(batch)
        return snap, emb, num, p_wide

    def item_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(item ids, (N, dim + 1) vectors and first-order weights) of the catalog."""
        m = self.mirrors["sparse"]
        key = (m.version, self.catalog.items.size)
        cache = self._item_cache
        if cache is None or cache[0] is not m or cache[1] != key:  # a full reload brings a new mirror
            ids = self.catalog.item_ids()
            cache = self._item_cache = (m, key, ids, m.gather(m.rows(tag_keys(ids, self.item_field))))
        return cache[2], cache[3]

    def retrieve(self, user: int, n: int, exclude: Sequence[int]) -> tuple[np.ndarray, bool]:
        """Up to ``n`` candidate items for ``user`` and whether they are personal
        (the user's vector against every item's) or, for a user without a row
        (cold start), the most clicked items."""
        ids, vecs = self.item_vectors()
        m = self.mirrors["sparse"]
        row = m.rows(tag_keys(np.array([user], np.int64), self.user_field))
        drop = set(int(x) for x in exclude)
        if self.cfg.exclude_clicked:
            drop |= self.catalog.clicked.get(int(user), set())
        if row[0] == 0 or len(ids) == 0:
            pop = self.catalog.popular()
            keep = pop[~np.isin(pop, np.fromiter(drop, np.int64, len(drop)))] if drop else pop
            return keep[:n], False
        d = self.lcfg.dim
        u = m.gather(row)[0]
        score = vecs[:, :d] @ u[:d] + vecs[:, d]
        if drop:  # ids are the catalog's items in row order
            rows = self.catalog.items.get(np.fromiter(drop, np.int64, len(drop)))
            score[rows[rows >= 0]] = -np.inf
        n = min(n, int(np.isfinite(score).sum()))
        top = np.argpartition(-score, n - 1)[:n] if n else np.zeros(0, np.int64)
        return ids[top], True


def _links(prev: int, versions: list[dict]) -> bool:
    """Whether ``versions`` (consecutive) continue the chain whose last version is ``prev``."""
    for v in versions:
        if v["rows"]["prev"] != prev:
            return False
        prev += 1
    return True


def _overlay(rows: dict[str, tuple[np.ndarray, np.ndarray]], versions: list[dict],
             tables: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``rows`` with each version's changed rows laid over them in order (the last value of a key wins)."""
    out = {}
    for t in tables:
        parts = ([rows[t]] if t in rows else []) + [v["rows"]["tables"][t] for v in versions if t in v["rows"]["tables"]]
        if not parts:
            continue
        keys = np.concatenate([k for k, _ in parts])
        weights = np.concatenate([w for _, w in parts])
        _, last = np.unique(keys[::-1], return_index=True)
        keep = np.sort(len(keys) - 1 - last)
        out[t] = (keys[keep], weights[keep])
    return out


def _load_dense(learner: OnlineLearner, dense: dict) -> None:
    learner.model.load_state_dict(dense["model"])
    learner.blend.load_state_dict(dense["blend"])
    wide = dense.get("wide_dense", dense.get("wide"))
    if learner.wide is not None and wide is not None:
        learner.wide.dense = np.array(wide, copy=True)
    learner.counters.total = np.array(dense["total"], copy=True)
    learner.events = int(dense["events"])
    learner.model.eval()


# ---------------------------------------------------------------------------
# Requests: validation that names the field and the value.

def check_context(context: Mapping[str, Any], allowed: Sequence[str], spec: FeatureSpec, where: str) -> dict[str, Any]:
    """Plain values of a request's context map (``olrec.v1.Value`` messages)."""
    out: dict[str, Any] = {}
    for name, value in context.items():
        if name not in allowed:
            raise bad(f"{where}: unknown field {name!r}; known fields: {sorted(allowed)}")
        kind = value.WhichOneof("kind")
        if kind is None:
            raise bad(f"{where}[{name!r}]: no value set (give text or number)")
        if name in spec.numeric:
            if kind != "number":
                raise bad(f"{where}[{name!r}]: must be a number, got text {value.text!r}")
            if not math.isfinite(value.number):
                raise bad(f"{where}[{name!r}]: must be a finite number, got {value.number}")
            out[name] = value.number
        else:
            if kind != "text":
                raise bad(f"{where}[{name!r}]: must be text (a categorical field), got the number {value.number}")
            out[name] = value.text
    return out


def check_ids(ids: Sequence[int], field: str, max_ids: int, allow_empty: bool) -> np.ndarray:
    if not ids and not allow_empty:
        raise bad(f"{field}: must not be empty")
    if len(ids) > max_ids:
        raise bad(f"{field}: {len(ids)} ids, more than the maximum {max_ids}")
    return np.asarray(ids, np.int64)


def feedback_table(events: Sequence[Any], spec: FeatureSpec, max_ids: int, now: float) -> pa.Table:
    """``olrec.v1.Event`` messages as an event table for the log, every value checked."""
    if not events:
        raise bad("events: must not be empty")
    if len(events) > max_ids:
        raise bad(f"events: {len(events)} events, more than the maximum {max_ids}")
    known = [c for c in (*spec.categorical, *spec.multi, *spec.numeric) if c not in RESERVED]
    cols: dict[str, list] = {c: [] for c in ("user_id", "item_id", "ts", "label", "event_id", "weight", *known)}
    for i, e in enumerate(events):
        where = f"events[{i}]"
        if e.label not in (0, 1):
            raise bad(f"{where}.label: must be 0 or 1, got {e.label}")
        if not math.isfinite(e.ts) or e.ts < 0:
            raise bad(f"{where}.ts: must be a finite number of unix seconds >= 0, got {e.ts}")
        if e.HasField("weight") and not (math.isfinite(e.weight) and e.weight >= 0):
            raise bad(f"{where}.weight: must be a finite number >= 0, got {e.weight}")
        ctx = check_context(e.context, known, spec, f"{where}.context")
        cols["user_id"].append(e.user_id)
        cols["item_id"].append(e.item_id)
        cols["ts"].append(e.ts or now)
        cols["label"].append(e.label)
        cols["event_id"].append(e.event_id if e.HasField("event_id") else None)
        cols["weight"].append(e.weight if e.HasField("weight") else 1.0)
        for c in known:
            cols[c].append(ctx.get(c))
    types = {"user_id": pa.int64(), "item_id": pa.int64(), "ts": pa.float64(), "label": pa.int8(),
             "event_id": pa.int64(), "weight": pa.float32()}
    table = pa.table({c: pa.array(v, type=types.get(c, pa.float64() if c in spec.numeric else pa.string()))
                      for c, v in cols.items() if c != "event_id" or any(x is not None for x in v)})
    return table


def check_token(metadata: Sequence[tuple[str, Any]], token: str | None) -> None:
    if token is None:
        return
    got = dict((k.lower(), v) for k, v in metadata).get("authorization")
    if got is None:
        raise RequestError("UNAUTHENTICATED", "Feedback needs an 'authorization: Bearer <token>' metadata entry")
    if got != f"Bearer {token}":
        raise RequestError("UNAUTHENTICATED", "Feedback: the bearer token in 'authorization' is wrong")




# ---------------------------------------------------------------------------
# Dense versions to Triton.

def triton_repo(run_dir: str | Path) -> Path:
    """Where a run's Triton model repositories go: ``run_dir/triton`` on a local disk;
    for a run in an object store, a directory of this machine's temp dir (the local
    Triton reads a local directory; a Kubernetes Triton gets its repository from
    a volume or object storage, see ``k8s/``)."""
    local = local_path(resolve(run_dir))
    if local is not None:
        return local / "triton"
    return Path(tempfile.gettempdir()) / f"olrec-triton-{hashlib.sha1(str(run_dir).encode()).hexdigest()[:10]}"


class DenseWatcher:
    """Publishes each new dense tower of the run (the newest published version
    or checkpoint, whichever has learned more) to the Triton model repositories
    under :func:`triton_repo`, version number = the events it had learned, and
    has Triton load it. Triton keeps answering from the previous version until
    the new one is loaded, so in-flight requests do not fail."""

    def __init__(self, cfg: ServeConfig) -> None:
        from .train import RunPaths, read_model

        self.cfg = cfg
        self.paths = RunPaths.of(cfg.run_dir)
        self.spec, self.lcfg, _ = read_model(self.paths.root)
        self.root = Path(cfg.triton_repo) if cfg.triton_repo else triton_repo(self.paths.root)
        self.published: int | None = None  # the version Triton last loaded
        self._newest: tuple[tuple, dict | None] = ((), None)  # (what it was read from, the state)

    def newest(self) -> dict | None:
        """The newest dense state of the run (``events``, ``model``, ``calibration``);
        read again only when the newest published version or checkpoint changed."""
        from .checkpoint import checkpoint_store
        from .train import latest_published, read_listed

        pub = latest_published(self.paths)
        ckpts = checkpoint_store(self.paths.checkpoints).list(on_refused=lambda e: None)
        key = (pub, ckpts[-1].path if ckpts else None)
        if key == self._newest[0]:
            return self._newest[1]
        best = None
        if pub is not None:
            try:
                pub, best = read_listed(self.paths, pub)
            except FileNotFoundError:  # published/ was emptied since the listing
                pub = None
            key = (pub, key[1])
        if ckpts and (best is None or int(ckpts[-1].meta.get("events", 0)) > int(best["events"])):
            best = torch.load(io.BytesIO(ckpts[-1].read("dense.pt")), weights_only=False, map_location="cpu")
        self._newest = (key, best)
        return best

    def step(self) -> int | None:
        """Publish and load the newest version if Triton lacks it; returns the version Triton serves."""
        from .export import publish
        from .model import DenseTower

        state = self.newest()
        if state is None:
            return self.published
        version = max(int(state["events"]), 1)
        model_dir = self.root / "local" / self.cfg.triton_model
        on_disk = max((int(p.name) for p in model_dir.glob("[0-9]*") if p.name.isdigit()), default=0)
        if version > on_disk:
            tower = DenseTower(len(self.spec.sparse_fields), self.lcfg.dim, self.spec.n_numeric,
                               arch=self.lcfg.arch, hidden=self.lcfg.hidden)
            tower.load_state_dict(state["model"])
            calibration = state.get("calibration")
            if calibration is None and self.cfg.precision == "int8":
                calibration = self._calibration()
            publish(tower.eval(), self.root, version, self.cfg.precision, calibration=calibration,
                    name=self.cfg.triton_model, gpu=self.cfg.triton_gpu)
        else:
            version = on_disk  # written before (this watcher restarted): Triton may only need to load it
        if version != self.published or not self._serving(version):
            self._load()  # also after a Triton restart: it loads nothing by itself
            self.published = version
        return version

    def _calibration(self) -> tuple[np.ndarray, np.ndarray]:
        """Inputs of the tower for the log's last 1,024 events, scored by the newest
        checkpoint (for dense weights saved without their recent inputs)."""
        from .checkpoint import checkpoint_store
        from .features import encode
        from .train import learner_from_checkpoint

        latest = checkpoint_store(self.paths.checkpoints).latest(on_refused=lambda e: None)
        log = EventLog(self.paths.log, create=False)
        if latest is None or log.end_offset == 0:
            raise RuntimeError(f"no calibration inputs for int8: {where(self.paths.root)} has no checkpoint or no events")
        learner = learner_from_checkpoint(latest.path, self.spec, self.lcfg)
        end = log.end_offset
        events = pa.concat_tables(list(log.read(max(0, end - 1024), end)), promote_options="permissive")
        emb, num, _ = learner.ranking_inputs(encode(events, self.spec))
        return emb.numpy(), num.numpy()

    def _load(self) -> None:
        import tritonclient.grpc as tc

        with tc.InferenceServerClient(self.cfg.triton_url) as client:
            client.load_model(self.cfg.triton_model)

    def _serving(self, version: int) -> bool:
        import tritonclient.grpc as tc
        from tritonclient.utils import InferenceServerException

        try:
            with tc.InferenceServerClient(self.cfg.triton_url) as client:
                return client.is_model_ready(self.cfg.triton_model, str(version), client_timeout=2.0)
        except InferenceServerException:
            return False
