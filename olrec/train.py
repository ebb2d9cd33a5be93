"""Distributed online training on Ray: the event log streamed by Ray Data to
Ray Train workers, per-id state in parameter-server shards, dense state
reduced across workers, watermarked checkpoints.

Processes and what crosses between them::

    driver ── creates the shard actors, the dataset and the TorchTrainer; waits
    shard actors (olrec.ps.LocalShard) ── per-id tables; numpy keys/rows in, rows out
    Ray Data read task (olrec.stream) ── follows the log, blocks of events with offsets
    Train workers (this module's _worker) ── each round: take up to batch_size
        events, pull their rows, score (progressive), learn, push; then an
        all-reduce of dense gradients and of additive dense state (gloo/NCCL)

``batch_size`` is per worker, as in DDP: a round learns up to W x batch_size
events, and one worker with one shard learns exactly as the in-process learner.

The **watermark** W: every event with offset < W is in the shards and in the
dense weights. Ray Data hands blocks to workers dynamically, so one worker's
offsets have gaps: each worker reports the offset intervals whose pushes are
applied, and rank 0 takes W as the end of the gap-free run from the start.
A checkpoint (olrec.checkpoint) holds the shards, the dense state and W; a
restarted run (Ray Train's FailureConfig, or a new job) restores the latest
one that verifies and replays the log from W: nothing is lost, and the events
applied after the checkpoint are applied again (counted from the ledger of
applied offsets every worker writes, :class:`Ledger`).
"""

from __future__ import annotations

import io
import json
import os
import queue
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import pyarrow as pa
import torch

from . import storage
from .features import FeatureSpec, encode
from .learner import LearnerConfig, OnlineLearner
from .log import OFFSET
from .metrics import auc as auc_of

if TYPE_CHECKING:
    from .checkpoint import CheckpointStore


@dataclass(frozen=True)
class TrainConfig:
    """How a training run is laid out on Ray (the model is :class:`LearnerConfig`)."""

    workers: int = 1
    shards: int = 1
    use_gpu: bool = False  # the dense tower on each worker's GPU, reduced with NCCL
    cpus_per_worker: float = 1.0
    cpus_per_shard: float = 0.25  # a shard mostly waits for calls
    #: Dense reduction: 1 all-reduces gradients every round (workers stay
    #: identical); k > 1 lets each worker step alone and averages the
    #: parameters every k rounds (fewer collectives, slightly stale).
    sync_every: int = 1
    #: Batches whose sparse pushes may be unacknowledged when the next is
    #: pulled (0: synchronous). A shard runs a worker's calls in order, so a
    #: worker always reads its own pushes; 1 overlaps a push with the next batch.
    max_staleness: int = 1
    continuous: bool = False  # follow the log until stopped; else stop at its end (or max_events)
    poll_interval: float = 0.2  # seconds between looks at the log for new segments
    #: Most rows per Ray Data block (a following stream sends what has
    #: arrived, so this bounds only a backlog's blocks). Ray Data pays per
    #: block (its executor's scheduling step, a block's serialization): on a
    #: backlog 2 workers learned about 1.2x the events/s at 32,768 as at 4,096.
    block_rows: int = 32768
    checkpoint_every_s: float = 30.0
    checkpoint_every_events: int | None = None
    keep_checkpoints: int = 3
    max_failures: int = 3  # worker-group restarts (from the latest checkpoint) before the run fails
    report_every_s: float = 1.0  # metrics, watermark and the published dense weights
    idle_wait_s: float = 0.05  # a worker without events waits this long before an empty round

    def __post_init__(self) -> None:
        for name in ("workers", "shards", "sync_every", "block_rows", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {self.max_staleness}")
        if self.max_failures < -1:
            raise ValueError(f"max_failures must be >= -1 (-1: retry forever), got {self.max_failures}")
        for name in ("cpus_per_worker", "poll_interval", "checkpoint_every_s", "report_every_s", "idle_wait_s"):
            v = getattr(self, name)
            if not (v > 0 and np.isfinite(v)):
                raise ValueError(f"{name} must be a positive number, got {v}")
        if not (self.cpus_per_shard >= 0 and np.isfinite(self.cpus_per_shard)):
            raise ValueError(f"cpus_per_shard must be >= 0, got {self.cpus_per_shard}")
        if self.checkpoint_every_events is not None and self.checkpoint_every_events < 1:
            raise ValueError(f"checkpoint_every_events must be >= 1 or None, got {self.checkpoint_every_events}")


@dataclass(frozen=True)
class RunPaths:
    """Where a run keeps its state: one directory on storage every process
    sees, or a prefix in an object store (see :mod:`olrec.storage`)."""

    root: Path | str

    @classmethod
    def of(cls, run_dir: str | os.PathLike[str]) -> RunPaths:
        """The run at ``run_dir``, spelled the same in every process (an absolute path, or the URI)."""
        return cls(storage.resolve(run_dir))

    @property
    def log(self) -> Path | str:
        return storage.join(self.root, "log")

    @property
    def checkpoints(self) -> Path | str:
        return storage.join(self.root, "checkpoints")

    @property
    def ledger(self) -> Path | str:
        return storage.join(self.root, "ledger")

    @property
    def published(self) -> Path | str:
        """The dense weights with their watermark, for serving: ``<version:012d>.pt`` files, newest last."""
        return storage.join(self.root, "published")

    @property
    def model(self) -> Path | str:
        """What the run's model is (feature spec, learner config, shard count), for serving."""
        return storage.join(self.root, "model.json")

    @property
    def metrics(self) -> Path | str:
        """The latest training metrics (rank 0 rewrites it at every report)."""
        return storage.join(self.root, "metrics.json")

    @property
    def checkpoint_request(self) -> Path | str:
        """Created to ask for a checkpoint soon; rank 0 removes it once that
        checkpoint is committed (``olrec demo`` snapshots its frozen baseline this way)."""
        return storage.join(self.root, "CHECKPOINT")

    @property
    def stop_file(self) -> Path | str:
        """Created to end a continuous run (the driver does on SIGINT/SIGTERM)."""
        return storage.join(self.root, "STOP")


def write_model(paths: RunPaths, spec: FeatureSpec, learner: LearnerConfig, shards: int) -> None:
    _write_json(paths.model, {"spec": asdict(spec), "learner": asdict(learner), "shards": shards})


def read_model(run_dir: str | os.PathLike[str]) -> tuple[FeatureSpec, LearnerConfig, int]:
    """The feature spec, learner config and shard count a run trains with."""
    path = RunPaths.of(run_dir).model
    try:
        m = json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{storage.where(path)} not found: no olrec train run has started in "
                                f"{storage.where(run_dir)}") from None
    learner = {**m["learner"], "hidden": tuple(m["learner"]["hidden"])}
    return FeatureSpec(**m["spec"]), LearnerConfig(**learner), int(m["shards"])


# ---------------------------------------------------------------------------
# Dense weights published for serving.

_PUBLISHED_RE = re.compile(r"^(\d{12})\.pt$")
KEEP_PUBLISHED = 3  # a reader that listed a version has a few publishes' time to read it


def published_versions(paths: RunPaths) -> list[str]:
    """The names of the published dense weights, oldest first."""
    return sorted(n for n in storage.listdir(paths.published) if _PUBLISHED_RE.match(n))


def latest_published(paths: RunPaths) -> str | None:
    """The newest published version's name (one listing: cheap enough for every refresh), or ``None``."""
    names = published_versions(paths)
    return names[-1] if names else None


def read_published(paths: RunPaths, name: str) -> dict[str, Any]:
    """The dense state of version ``name``; FileNotFoundError if newer ones have pruned it."""
    return torch.load(io.BytesIO(storage.read_bytes(storage.join(paths.published, name))),
                      weights_only=False, map_location="cpu")


def read_listed(paths: RunPaths, name: str) -> tuple[str, dict[str, Any]]:
    """Version ``name`` as listed, or the newest one if newer versions pruned it since
    (FileNotFoundError when there is none); with its name."""
    try:
        return name, read_published(paths, name)
    except FileNotFoundError:
        newest = latest_published(paths)
        if newest is None:
            raise
        return newest, read_published(paths, newest)


def publish_dense(paths: RunPaths, learner: OnlineLearner, watermark: int, *, rows: RowChain | None = None,
                  keep_after: int = 0) -> str:
    """The dense weights that match ``watermark``, for serving, as the next version. A new
    file each time (an object store has no rename): the name is one more than the newest,
    so versions order by name whichever node's clock wrote them. One publisher at a time.

    ``rows``: the per-id rows changed since the previous version of the chain (pulled
    after ``watermark`` was taken, so they hold every event below it), for replicas
    that cannot reach the shards (another Ray cluster: a KubeRay RayService).
    Versions after ``keep_after`` (the newest checkpoint's last version: a replica
    starts from that checkpoint and replays them) stay; of older ones, the last
    :data:`KEEP_PUBLISHED`."""
    names = published_versions(paths)
    seq = int(names[-1][:12]) + 1 if names else 1
    name = f"{seq:012d}.pt"
    chain = None
    if rows is not None:  # the rows in a file of their own, first: replicas that pull rows from the shards skip it
        chain, tables = rows.pull()
        storage.write_bytes(storage.join(paths.published, _rows_name(seq)), _rows_bytes(tables), durable=False)
        rows.prev = seq
    storage.write_bytes(storage.join(paths.published, name), _saved(
        {"watermark": int(watermark), "events": int(learner.events),
         "model": learner.model.state_dict(), "blend": learner.blend.state_dict(),
         "wide_dense": None if learner.wide is None else learner.wide.dense.copy(),
         "total": learner.counters.total.copy(), "calibration": learner.calibration(), "rows": chain}), durable=False)
    for old in names[: max(0, len(names) + 1 - KEEP_PUBLISHED)]:
        if int(old[:12]) <= keep_after:
            storage.remove(storage.join(paths.published, old))
            storage.remove(storage.join(paths.published, _rows_name(int(old[:12]))))
    return name


def read_published_rows(paths: RunPaths, seq: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The rows version ``seq`` changed, per table (FileNotFoundError if pruned)."""
    with np.load(io.BytesIO(storage.read_bytes(storage.join(paths.published, _rows_name(seq)))), allow_pickle=False) as z:
        names = [f[: -len(".keys")] for f in z.files if f.endswith(".keys")]
        return {t: (z[f"{t}.keys"], z[f"{t}.values"]) for t in names}


def _rows_name(seq: int) -> str:
    return f"{seq:012d}.rows.npz"


def _rows_bytes(tables: dict[str, tuple[np.ndarray, np.ndarray]]) -> bytes:
    """Plain arrays in an (uncompressed) .npz: no pickle to trust on load, and about 10x
    faster to write than ``torch.save``, which rank 0 does every report with a stream's
    changed rows (hundreds of thousands a second on a wide stream)."""
    buf = io.BytesIO()
    np.savez(buf, **{f"{t}.{part}": a for t, (keys, values) in tables.items() for part, a in (("keys", keys), ("values", values))})
    return buf.getvalue()


def _saved(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@dataclass
class RowChain:
    """The rows each published version carries: those changed in the shards since the
    chain's previous version. A chain starts with every attempt of a run, at the
    checkpoint it restored (``base``: its seq; 0: empty tables); a replica holds the
    base's rows plus every version of the chain, in order."""

    store: Any  # the ShardedTables client of rank 0
    tables: list[str]
    base: int
    prev: int | None = None  # the chain's last published version
    since: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.store.shards)
        if self.base == 0:  # tables just reset: the first version carries all their rows (the default rows)
            self.since = {t: [-1] * n for t in self.tables}
            return
        # The shards' versions now, just restored: the base checkpoint holds those rows.
        got = self.store.deltas_many({t: [np.iinfo(np.int64).max] * n for t in self.tables})
        self.since = {t: got[t][2] for t in self.tables}

    def pull(self) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
        """The chain's link for the next version (``base``, ``prev``), and the rows changed since the last."""
        got = self.store.deltas_many(self.since)
        for t in self.tables:
            if any(v < s for v, s in zip(got[t][2], self.since[t])):
                # A shard restarted empty: its rows are gone, and the attempt must restore them.
                raise RuntimeError(f"a parameter-server shard of table {t!r} went back from version "
                                   f"{self.since[t]} to {got[t][2]}: it restarted; restoring from the checkpoint")
        self.since = {t: got[t][2] for t in self.tables}
        return {"base": self.base, "prev": self.prev}, {t: (got[t][0], got[t][1]) for t in self.tables}


# ---------------------------------------------------------------------------
# Offsets applied and the watermark.

def intervals(offsets: np.ndarray) -> list[tuple[int, int]]:
    """Half-open runs of consecutive offsets, e.g. [3,4,5,9] -> [(3,6), (9,10)]."""
    o = np.asarray(offsets, np.int64)
    if o.size == 0:
        return []
    o = np.sort(o)
    breaks = np.flatnonzero(np.diff(o) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [o.size]))
    return [(int(o[s]), int(o[e - 1]) + 1) for s, e in zip(starts, ends)]


class Applied:
    """Offset intervals applied at or above ``start``; the watermark is the end
    of the gap-free run from ``start``."""

    def __init__(self, start: int) -> None:
        self.start = self.watermark = start
        self._above: list[tuple[int, int]] = []

    @property
    def covered(self) -> int:
        """Distinct offsets applied at or above ``start``."""
        return self.watermark - self.start + sum(hi - lo for lo, hi in self._above)

    def add(self, spans: list[tuple[int, int]]) -> None:
        out = _merge(self._above + [s for s in spans if s[1] > self.watermark])
        while out and out[0][0] <= self.watermark:
            self.watermark = max(self.watermark, out.pop(0)[1])
        self._above = out


_LEDGER_RE = re.compile(r"^(.+)-([pc])(\d{8})\.bin$")
_LEGACY_LEDGER_RE = re.compile(r"^(rank\d+-\d+-\d+)\.bin$")


class Ledger:
    """The offset intervals one worker applied, for counting events applied
    twice after a restore. Whole files only, so a ledger lives in an object
    store too: :meth:`flush` writes what is new as part ``<writer>-p<n>.bin``;
    :meth:`compact` writes everything so far as ``<writer>-c<n>.bin`` (it
    replaces parts below ``n``) and deletes them, so a long run keeps a few
    files per worker. int64 (lo, hi) pairs."""

    def __init__(self, directory: Path | str, writer: str) -> None:
        self.directory, self.writer = directory, writer
        self._parts = self._compacted = 0
        self._new: list[tuple[int, int]] = []
        self._all: list[np.ndarray] = []  # every part's (n, 2) spans, merged at compact()

    def add(self, spans: list[tuple[int, int]]) -> None:
        self._new.extend(spans)

    def flush(self) -> None:
        if self._new:
            part = np.asarray(self._new, np.int64).reshape(-1, 2)
            self._write(f"p{self._parts:08d}", part)
            self._parts += 1
            self._all.append(part)
            self._new = []

    def compact(self) -> None:
        self.flush()
        if self._parts == self._compacted:
            return
        self._all = [_merge_array(np.concatenate(self._all))]
        self._write(f"c{self._parts:08d}", self._all[0])
        self._compacted = self._parts
        for name in storage.listdir(self.directory):
            m = _LEDGER_RE.match(name)
            if m and m[1] == self.writer and int(m[3]) < self._parts:
                storage.remove(storage.join(self.directory, name))

    def _write(self, suffix: str, spans: np.ndarray) -> None:
        storage.write_bytes(storage.join(self.directory, f"{self.writer}-{suffix}.bin"), spans.tobytes(), durable=False)


def _merge_array(spans: np.ndarray) -> np.ndarray:
    """(n, 2) half-open intervals with overlapping or touching ones joined, in order."""
    if len(spans) == 0:
        return spans.reshape(0, 2)
    a = spans[np.argsort(spans[:, 0], kind="stable")]
    reach = np.maximum.accumulate(a[:, 1])  # the furthest end so far: a gap starts a new interval
    starts = np.flatnonzero(np.r_[True, a[1:, 0] > reach[:-1]])
    return np.stack([a[starts, 0], np.maximum.reduceat(a[:, 1], starts)], axis=1)


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """:func:`_merge_array` of a list of (lo, hi)."""
    return [(lo, hi) for lo, hi in _merge_array(np.asarray(spans, np.int64).reshape(-1, 2)).tolist()]


def read_ledger(directory: Path | str) -> list[tuple[int, int]]:
    """Every applied interval any worker recorded."""
    return [span for spans in ledger_writers(directory).values() for span in spans]


def ledger_writers(directory: Path | str) -> dict[str, list[tuple[int, int]]]:
    """Each writer's (``rank<r>-<pid>-<ns>``) applied intervals: its newest
    compaction and the parts written after it."""
    for attempt in range(9):
        try:
            return _read_ledger(directory)
        except FileNotFoundError:  # a writer compacted while we read: list again
            time.sleep(0.05 * (attempt + 1))
    return _read_ledger(directory)


def _read_ledger(directory: Path | str) -> dict[str, list[tuple[int, int]]]:
    files: dict[str, dict[str, list[int]]] = {}
    out: dict[str, list[tuple[int, int]]] = {}
    for name in storage.listdir(directory):
        m = _LEDGER_RE.match(name)
        if m:
            files.setdefault(m[1], {"p": [], "c": []})[m[2]].append(int(m[3]))
        elif m := _LEGACY_LEDGER_RE.match(name):  # a file appended to by olrec before Ledger: a torn record dropped
            a = np.frombuffer(storage.read_bytes(storage.join(directory, name)), np.int64)
            out[m[1]] = [(int(lo), int(hi)) for lo, hi in a[: a.size // 2 * 2].reshape(-1, 2)]
    for writer, got in sorted(files.items()):
        upto = max(got["c"], default=0)
        names = ([f"c{upto:08d}"] if got["c"] else []) + [f"p{n:08d}" for n in sorted(got["p"]) if n >= upto]
        spans = out.setdefault(writer, [])
        for suffix in names:
            a = np.frombuffer(storage.read_bytes(storage.join(directory, f"{writer}-{suffix}.bin")), np.int64)
            spans += [(int(lo), int(hi)) for lo, hi in a.reshape(-1, 2)]
    return out


def count_from(spans: list[tuple[int, int]], start: int) -> int:
    """Offsets at or above ``start`` covered by ``spans``, with multiplicity."""
    return int(sum(max(0, hi - max(lo, start)) for lo, hi in spans))


def duplicates(spans: list[tuple[int, int]]) -> int:
    """Applications beyond the first of each offset (events applied twice after a restore)."""
    union = Applied(0)
    union.add(spans)
    return count_from(spans, 0) - union.covered


# ---------------------------------------------------------------------------
# Dense reduction across workers.

class Solo:
    """The reduction of a single worker: nothing to merge."""

    def reduce_grads(self, params: list, n_events: int) -> bool:
        return n_events > 0

    def end_round(self, learner: OnlineLearner, control: np.ndarray) -> np.ndarray:
        return control

    def average_params(self, learner: OnlineLearner) -> None:
        pass


class TorchDenseSync:
    """All-reduce through Ray Train's torch process group (gloo on CPU, NCCL on GPU).

    Per round: the dense gradients, weighted by each worker's events (so a
    round is one step on the union of the workers' batches), in one
    collective; then the additive dense state (numeric statistics, the wide
    part's numeric weights, global counts) as deltas since the last round,
    plus a few control numbers, in another.
    """

    def __init__(self, learner: OnlineLearner, every: int, device: torch.device) -> None:
        import torch.distributed as dist

        self.dist, self.every, self.device = dist, every, device
        self.world = dist.get_world_size()
        self.base = learner.additive_state()
        self.rounds = 0

    def reduce_grads(self, params: list, n_events: int) -> bool:
        if self.every > 1:
            return n_events > 0  # local steps; parameters are averaged in end_round
        # The tower may sit on a GPU and the blend on the CPU: one flat buffer on the sync device.
        flat = torch.cat([p.grad.reshape(-1).to(self.device) * n_events for p in params]
                         + [torch.tensor([float(n_events)], device=self.device)])
        self.dist.all_reduce(flat)
        total = float(flat[-1])
        if total == 0:
            return False
        at = 0
        for p in params:
            p.grad.copy_((flat[at : at + p.numel()] / total).view_as(p))
            at += p.numel()
        return True

    def end_round(self, learner: OnlineLearner, control: np.ndarray) -> np.ndarray:
        """Merge the additive state (and every k rounds the parameters); the
        control numbers summed over workers."""
        self.rounds += 1
        now = learner.additive_state()
        deltas = [n - b for n, b in zip(now, self.base)]
        flat = torch.from_numpy(np.concatenate([d.ravel() for d in deltas] + [control.astype(np.float64)])).to(self.device)
        self.dist.all_reduce(flat)
        flat = flat.cpu().numpy()
        merged, at = [], 0
        for b in self.base:
            merged.append(b + flat[at : at + b.size].reshape(b.shape))
            at += b.size
        learner.set_additive_state(merged)
        self.base = [m.copy() for m in merged]
        if self.rounds % self.every == 0:
            self.average_params(learner)
        return flat[at:]

    def average_params(self, learner: OnlineLearner) -> None:
        """Make every worker's parameters their mean (a no-op when gradients are
        all-reduced every round: the workers are identical already)."""
        if self.every > 1:
            params = learner.dense_params()
            with torch.no_grad():
                vec = torch.cat([p.reshape(-1).to(self.device) for p in params])
                self.dist.all_reduce(vec)
                vec /= self.world
                at = 0
                for p in params:
                    p.copy_(vec[at : at + p.numel()].view_as(p))
                    at += p.numel()


# ---------------------------------------------------------------------------
# The worker.

class Feeder:
    """Pulls blocks from a dataset iterator on a thread, so a round can take
    whatever has arrived (up to a batch) instead of waiting for a full batch."""

    def __init__(self, blocks: Iterator[pa.Table]) -> None:
        self._q: queue.Queue = queue.Queue(maxsize=8)
        self._rest: pa.Table | None = None
        self.exhausted = False
        self._thread = threading.Thread(target=self._pump, args=(blocks,), daemon=True)
        self._thread.start()

    def _pump(self, blocks: Iterator[pa.Table]) -> None:
        try:
            for b in blocks:
                if b.num_rows:
                    self._q.put(b)
            self._q.put(None)
        except BaseException as e:  # re-raised in the training thread
            self._q.put(e)

    def _get(self, timeout: float | None) -> pa.Table | None:
        try:
            item = self._q.get(timeout=timeout) if timeout else self._q.get_nowait()
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            raise item
        if item is None:
            self.exhausted = True
        return item

    def take(self, n: int, wait: float, full: bool = False) -> pa.Table | None:
        """Up to ``n`` rows: what has arrived, waiting at most ``wait`` s for the
        first; ``full``: wait for ``n`` rows unless the stream ends (a bounded
        run cuts the same batches as the in-process learner)."""
        parts, have = [], 0
        if self._rest is not None:
            parts, have, self._rest = [self._rest], self._rest.num_rows, None
        while have < n and not self.exhausted:
            t = self._get(wait if full or not have else None)
            if t is None:
                if full and have:
                    continue  # a partial batch waits for the rest
                break
            parts.append(t)
            have += t.num_rows
        if not parts:
            return None
        table = pa.concat_tables(parts, promote_options="default") if len(parts) > 1 else parts[0]
        if table.num_rows > n:
            self._rest = table.slice(n)
            table = table.slice(0, n)
        return table

    @property
    def done(self) -> bool:
        return self.exhausted and self._rest is None


@dataclass
class _Progress:
    """Progressive predictions gathered on rank 0, by offset; the newest
    ``keep`` events' (a continuous run's memory stays bounded)."""

    offsets: list = field(default_factory=list)
    preds: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    keep: int = 5_000_000
    _rows: int = 0

    def extend(self, o: np.ndarray, p: np.ndarray, y: np.ndarray) -> None:
        self.offsets.append(o)
        self.preds.append(p)
        self.labels.append(y)
        self._rows += len(o)
        if self._rows > 2 * self.keep:
            o, p, y = self.arrays()
            self.offsets, self.preds, self.labels = [o[-self.keep:]], [p[-self.keep:]], [y[-self.keep:]]
            self._rows = len(self.offsets[0])

    def recent_auc(self, n: int) -> float:
        """AUC of about the newest ``n`` scores (the live figure: no sort of the whole run)."""
        k, have = len(self.preds), 0
        while k > 0 and have < n:
            k -= 1
            have += len(self.preds[k])
        p, y = np.concatenate(self.preds[k:] or [np.zeros(0)]), np.concatenate(self.labels[k:] or [np.zeros(0)])
        return float(auc_of(y, p)) if len(y) > 1 else float("nan")

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.offsets:
            return np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32)
        o, p, y = (np.concatenate(x) for x in (self.offsets, self.preds, self.labels))
        if o.size == 0:
            return o.astype(np.int64), p.astype(np.float32), y.astype(np.float32)
        # An event replayed after a restore keeps its latest score.
        order = np.argsort(o, kind="stable")
        o, p, y = o[order], p[order], y[order]
        last = np.r_[o[1:] != o[:-1], True]
        self.offsets, self.preds, self.labels = [o[last]], [p[last]], [y[last]]
        self._rows = int(last.sum())
        return o[last], p[last], y[last]


def _worker(config: dict) -> None:
    """The train function each Ray Train worker runs."""
    import ray.train

    from .checkpoint import checkpoint_store
    from .learner import learner_tables
    from .log import EventLog
    from .ps import ShardedTables
    from .stream import iter_events
    from .telemetry import TrainMetrics

    job: TrainJob = config["job"]
    tc = job.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    paths = RunPaths(job.run_dir)
    device = torch.device("cpu")
    if tc.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
    store = ShardedTables(list(job.shards), tc.max_staleness)
    learner = OnlineLearner(job.spec, job.learner, store=store).to(device)
    learner.expires = rank == 0
    ckpts = checkpoint_store(paths.checkpoints, keep=tc.keep_checkpoints)
    refused: list[str] = []

    def on_refused(e: Exception) -> None:
        refused.append(str(e))
        print(f"olrec: checkpoint refused: {e}", flush=True)

    latest = ckpts.latest(on_refused=on_refused)
    start = latest.watermark if latest else 0
    progress = _Progress()
    chain: RowChain | None = None  # rank 0's: the rows changed, published with every dense version
    if rank == 0:
        # Shards may hold a failed attempt's updates: back to the checkpoint, or empty.
        if latest:
            store.restore(str(latest.path))
        else:
            store.reset()
        # Rows changed from here on go out with the published versions: before any rank steps.
        chain = RowChain(store, [t.name for t in learner_tables(job.spec, job.learner)], base=latest.seq if latest else 0)
        again = count_from(read_ledger(paths.ledger), start)
        if again:
            print(f"olrec: resuming at offset {start}; {again} events applied since are applied again", flush=True)
    if latest:
        state = torch.load(io.BytesIO(latest.read("dense.pt")), weights_only=False, map_location="cpu")
        learner.load_dense_state_dict(state)
        if rank == 0:
            with np.load(io.BytesIO(latest.read("progress.npz"))) as z:
                progress.extend(z["offsets"], z["preds"], z["labels"])
    if world > 1:
        torch.distributed.barrier()  # no pull before the shards are restored
    sync: Any = TorchDenseSync(learner, tc.sync_every, device) if world > 1 else Solo()
    ledger = Ledger(paths.ledger, f"rank{rank}-{os.getpid()}-{time.time_ns()}")
    keep_published = int(latest.meta.get("published", 0)) if latest else 0
    applied = Applied(start)
    log = EventLog(paths.log, create=False) if rank == 0 else None
    # Rank 0 reports for the run (its learner's counts are the merged ones).
    telemetry = TrainMetrics({"run": storage.name_of(paths.root)}, events_start=learner.events) if rank == 0 else None
    feeder = Feeder(iter_events(ray.train.get_dataset_shard("train"), prefetch=job.prefetch))
    per_worker = job.learner.batch_size  # per worker, as in DDP: a round learns up to W x batch_size
    mine = _Progress()  # this worker's predictions since the last gather
    new_spans: list[tuple[int, int]] = []
    last_report = last_ckpt = time.monotonic()
    asked, last_asked = False, -np.inf
    ckpt_events = learner.events
    ckpt_time = time.time()
    loss_sum, loss_n, step_s = 0.0, 0, 0.0
    first_at: float | None = None  # when this attempt trained its first batch (start-up ends)
    first_events, last_at = learner.events, time.time()

    def settle() -> None:
        spans = [s for tag in store.done() for s in tag]
        if spans:
            ledger.add(spans)
            new_spans.extend(spans)

    def gather() -> None:
        """Everyone's new applied spans and predictions to rank 0; ledger flushed."""
        store.flush()
        settle()
        ledger.flush()
        mine_arrays = mine.arrays()
        parts = [(list(new_spans), mine_arrays)]
        if world > 1:
            got: list = [None] * world
            torch.distributed.all_gather_object(got, parts[0])
            parts = got
        for spans, arrays in parts:
            applied.add(spans)
            progress.extend(*arrays)
        new_spans.clear()
        mine.offsets, mine.preds, mine.labels = [], [], []

    def report(final: bool) -> None:
        nonlocal last_report
        now = time.monotonic()
        if rank == 0 and final:
            o, p, y = progress.arrays()
            score = float(auc_of(y, p)) if len(y) > 1 else float("nan")
        else:  # the live figure: the newest scores only (sorting a long run's every second would cost)
            score = progress.recent_auc(100_000) if rank == 0 else float("nan")
        stats = store.stats() if rank == 0 else []
        metrics = {
            "events_trained": int(learner.events),
            # From the first batch of this attempt on: start-up (cluster, trainer, dataset) excluded.
            "events_per_s": (learner.events - first_events) / max(last_at - first_at, 1e-9) if first_at else 0.0,
            "first_batch_at": first_at,
            "loss": loss_sum / max(loss_n, 1),
            "auc": score,  # progressive: the whole run's at the end, the newest 100k events' before
            "watermark": int(applied.watermark),
            "stream_lag": int(log.end_offset - applied.watermark) if log is not None else 0,
            "shard_rows": int(sum(t["rows"] for s in stats for t in s["tables"].values())),
            "shard_bytes": int(sum(t["bytes"] for s in stats for t in s["tables"].values())),
            # Seconds a shard spends serving one batched call (the rest of a call's time is the wire and the queue).
            "shard_pull_s": sum(s["pull_s"] for s in stats) / max(sum(s["pulls"] for s in stats), 1),
            "shard_push_s": sum(s["push_s"] for s in stats) / max(sum(s["pushes"] for s in stats), 1),
            "step_s": step_s / max(loss_n, 1),  # a batch's pull, learn and push
            "fetch_s": store.fetch_s / max(loss_n, 1),  # a batch's wait for its rows
            "settle_s": store.settle_s / max(loss_n, 1),  # a batch's wait for its pushes' acks
            "checkpoint_age_s": time.time() - ckpt_time,
            # Events applied twice (restores replay from a checkpoint), from every worker's ledger.
            "replayed": duplicates(read_ledger(paths.ledger)) if rank == 0 and final else 0,
            "refused_checkpoints": refused,
            "final": final,
        }
        if telemetry is not None:
            publish_dense(paths, learner, applied.watermark, rows=chain, keep_after=keep_published)
            _write_json(paths.metrics, metrics)
            telemetry.record(metrics)
            for kind, values in store.latencies.items():
                for v in values:
                    telemetry.observe(f"{kind}_latency_s", v)
        for values in store.latencies.values():
            values.clear()
        last_report = now
        # Not ray.train.report: it is a barrier that costs about 2 s in Ray
        # 2.60, and olrec keeps its own checkpoints. Metrics go to the Ray
        # dashboard (olrec.telemetry) and to metrics.json.

    def checkpoint() -> None:
        nonlocal last_ckpt, ckpt_events, ckpt_time, keep_published
        if rank == 0:
            o, p, y = progress.arrays()
            keep = o < applied.watermark
            staging = stage_checkpoint(ckpts, learner, (o[keep], p[keep], y[keep]))
            # A replica starting here replays the versions after "published" (None: the whole
            # chain, from its first version: it holds the rows changed since "chain_base").
            published = chain.prev  # type: ignore[union-attr]
            ckpts.commit(staging, applied.watermark, {"events": int(learner.events), "workers": world,
                                                      "shards": len(job.shards), "published": published,
                                                      "chain_base": chain.base})  # type: ignore[union-attr]
            keep_published = published or keep_published
            storage.remove(paths.checkpoint_request)
        ledger.compact()
        last_ckpt, ckpt_events, ckpt_time = time.monotonic(), learner.events, time.time()

    while True:
        table = feeder.take(per_worker, tc.idle_wait_s, full=not tc.continuous)
        if table is not None:
            offsets = table[OFFSET].to_numpy()
            if first_at is None:
                first_at, first_events = time.time(), learner.events
            t = time.perf_counter()
            res = learner.step(encode(table, job.spec), sync, tag=intervals(offsets))
            step_s += time.perf_counter() - t
            last_at = time.time()
            loss_sum, loss_n = loss_sum + res.loss, loss_n + 1
            mine.extend(offsets, res.pred, res.label)
        elif world > 1:
            learner.idle_step(sync)
        settle()
        now = time.monotonic()
        want = np.zeros(3)
        want[0] = float(feeder.done and table is None)
        if rank == 0:
            want[1] = float(now - last_report >= tc.report_every_s)
            due_events = tc.checkpoint_every_events is not None and learner.events - ckpt_events >= tc.checkpoint_every_events
            if now - last_asked >= tc.poll_interval:  # a stat (an object store: a request) per poll
                asked, last_asked = storage.exists(paths.checkpoint_request), now
            want[2] = float(now - last_ckpt >= tc.checkpoint_every_s or due_events or asked)
        got = sync.end_round(learner, want)
        if got[1] > 0 or got[2] > 0:  # every worker sees the same decision
            sync.average_params(learner)
            gather()
            if got[2] > 0:
                checkpoint()
                asked = False  # the request is served: look again at the next poll
            report(final=False)
        if got[0] >= world:
            break

    sync.average_params(learner)
    gather()
    checkpoint()
    if world > 1:
        torch.distributed.barrier()  # every ledger compacted before rank 0 reads them all
    report(final=True)


def _write_json(path: Path | str, obj: dict) -> None:
    storage.write_bytes(path, (json.dumps(obj, default=str) + "\n").encode(), durable=False)


def learner_from_checkpoint(path: str | Path, spec: FeatureSpec, cfg: LearnerConfig) -> OnlineLearner:
    """The model a checkpoint (its directory or URI) holds, in this process: its
    shards as local objects behind the same client, its dense state loaded."""
    from .learner import learner_tables
    from .ps import LocalShard, ShardedTables

    n = sum(1 for name in storage.listdir(path) if re.match(r"^shard-\d{4}\.pkl$", name))
    if n == 0:
        raise FileNotFoundError(f"no shard snapshots (shard-*.pkl) in checkpoint {storage.where(path)}")
    store = ShardedTables([LocalShard(learner_tables(spec, cfg), i) for i in range(n)])
    store.restore(str(path))
    learner = OnlineLearner(spec, cfg, store=store)
    learner.load_dense_state_dict(torch.load(io.BytesIO(storage.read_bytes(storage.join(path, "dense.pt"))),
                                             weights_only=False, map_location="cpu"))
    return learner


def stage_checkpoint(ckpts: CheckpointStore, learner: OnlineLearner,
                     progress: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> Path | str:
    """Stage a checkpoint of a learner whose rows live in shards (a
    :class:`~olrec.ps.ShardedTables`): every shard's snapshot, the dense state
    and the progressive (offsets, predictions, labels) below its watermark.
    Commit it with ``ckpts.commit(staging, watermark, meta)``."""
    staging = ckpts.stage()
    learner.store.snapshot(str(staging))  # type: ignore[attr-defined]
    buf = io.BytesIO()
    torch.save(learner.dense_state_dict(), buf)
    storage.write_bytes(storage.join(staging, "dense.pt"), buf.getvalue())
    o, p, y = progress if progress is not None else (np.zeros(0, np.int64), np.zeros(0), np.zeros(0))
    buf = io.BytesIO()
    np.savez(buf, offsets=o, preds=p, labels=y)
    storage.write_bytes(storage.join(staging, "progress.npz"), buf.getvalue())
    return staging


def learn_into_run(events: pa.Table, spec: FeatureSpec, cfg: LearnerConfig, run_dir: str | Path,
                   shards: int = 1) -> OnlineLearner:
    """Learn ``events`` in this process into a run directory, with no Ray
    cluster: the events in its log, one checkpoint at their end, model.json.
    ``olrec serve`` serves it as it serves a run of :func:`train`."""
    from .checkpoint import checkpoint_store
    from .learner import learner_tables
    from .log import EventLog
    from .ps import LocalShard, ShardedTables

    paths = RunPaths.of(run_dir)
    with EventLog(paths.log) as log:
        if log.end_offset:
            raise ValueError(f"the event log {storage.where(paths.log)} is not empty")
        n = log.append(events).n_good
    store = ShardedTables([LocalShard(learner_tables(spec, cfg), i) for i in range(shards)])
    learner = OnlineLearner(spec, cfg, store=store)
    for table in EventLog(paths.log, create=False).read(0):
        learner.learn(encode(table, spec))
    ckpts = checkpoint_store(paths.checkpoints)
    ckpts.commit(stage_checkpoint(ckpts, learner), n, {"events": int(learner.events), "workers": 0, "shards": shards})
    write_model(paths, spec, cfg, shards)
    return learner


NAMESPACE = "olrec"


def shard_name(run_dir: str | Path, index: int) -> str:
    """The Ray actor name of a run's shard, in namespace :data:`NAMESPACE`
    (``ray.get_actor(name, namespace=NAMESPACE)`` finds it from any job, Serve's too)."""
    import hashlib

    digest = hashlib.sha1(str(storage.resolve(run_dir)).encode()).hexdigest()[:10]
    return f"olrec-shard-{digest}-{index}"


@dataclass(frozen=True)
class TrainJob:
    """Everything a worker needs, pickled once into the train loop's config."""

    spec: FeatureSpec
    learner: LearnerConfig
    train: TrainConfig
    run_dir: str = field(repr=False)  # a URI may carry credentials
    shards: tuple
    #: Blocks a worker fetches ahead. Only for a log already written up to the
    #: end: a prefetching iterator holds each block until more arrive.
    prefetch: int = 0


class _ResumeAt:
    """The dataset's start, read when it executes: the latest checkpoint's
    watermark, so a restarted worker group replays from there."""

    def __init__(self, checkpoints: Path | str) -> None:
        self.checkpoints = checkpoints

    def __call__(self) -> int:
        from .checkpoint import checkpoint_store

        latest = checkpoint_store(self.checkpoints).latest(on_refused=lambda e: None)
        return latest.watermark if latest else 0


# ---------------------------------------------------------------------------
# The driver.

def train(spec: FeatureSpec, learner: LearnerConfig, tc: TrainConfig, run_dir: str | Path, *,
          end: int | None = None, storage_name: str = "train") -> dict[str, Any]:
    """Train on the event log in ``run_dir/log`` with ``tc.workers`` Ray Train
    workers and ``tc.shards`` shard actors, on the Ray cluster this process is
    connected to. Bounded (to ``end``, default the log's end now) unless
    ``tc.continuous``. Returns the final metrics (rank 0's)."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .learner import learner_tables
    from .log import EventLog
    from .ps import LocalShard
    from .stream import LogDataConfig, log_dataset

    paths = RunPaths.of(run_dir)
    log = EventLog(paths.log, create=False)
    if not tc.continuous and end is None:
        end = log.end_offset
    storage.remove(paths.stop_file)
    storage.remove(paths.checkpoint_request)
    write_model(paths, spec, learner, tc.shards)
    # A shard that dies comes back empty (max_restarts); the call that saw it
    # die fails the worker group, which restores every shard from the checkpoint.
    actor = ray.remote(LocalShard)
    shards = tuple(actor.options(name=shard_name(paths.root, i), namespace=NAMESPACE, num_cpus=tc.cpus_per_shard, max_restarts=-1,
                                 max_task_retries=0).remote(learner_tables(spec, learner), i)
                   for i in range(tc.shards))
    try:
        ds = log_dataset(str(paths.log), start=_ResumeAt(paths.checkpoints), end=None if tc.continuous else end,
                         poll_interval=tc.poll_interval, stop_file=str(paths.stop_file), block_rows=tc.block_rows)
        complete = not tc.continuous and end is not None and log.end_offset >= end
        job = TrainJob(spec, learner, tc, str(paths.root), shards, prefetch=2 if complete else 0)
        trainer = TorchTrainer(
            _worker, train_loop_config={"job": job},
            scaling_config=ScalingConfig(num_workers=tc.workers, use_gpu=tc.use_gpu,
                                         resources_per_worker={"CPU": tc.cpus_per_worker}),
            run_config=RunConfig(name=storage_name, storage_path=_ray_storage(paths),
                                 failure_config=FailureConfig(max_failures=tc.max_failures)),
            datasets={"train": ds}, dataset_config=LogDataConfig())
        storage.remove(paths.metrics)
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        return json.loads(storage.read_bytes(paths.metrics))
    finally:
        for s in shards:
            ray.kill(s)


def _ray_storage(paths: RunPaths) -> str | None:
    """Ray Train's own results (olrec reports no Ray checkpoints): beside the
    run on a local disk; for a run in an object store, Ray's default (None)."""
    return str(storage.join(paths.root, "ray")) if storage.local_path(paths.root) is not None else None
