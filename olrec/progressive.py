"""Progressive validation over a stream, with a frozen baseline in the same run.

Every batch is scored by the learner before it learns it. At ``frozen_at`` (a
fraction of the stream) an independent copy of all learner state is taken; it
scores the rest of the stream without learning anything, not even counters.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa

from .features import encode
from .learner import OnlineLearner
from .metrics import Summary, auc, summarize, windows
from .ps import LocalStore


@dataclass(frozen=True)
class Progress:
    events: int
    total: int
    events_per_s: float
    auc: float  # running progressive AUC over the events so far


@dataclass
class RunResult:
    label: np.ndarray
    pred: np.ndarray
    frozen_pred: np.ndarray  # NaN before the freeze point
    split: int  # index of the first event the frozen model scores
    learn_seconds: float  # encoding + scoring + learning, the online learner only
    frozen_seconds: float = 0.0  # the frozen copy's scoring after the split
    stats: list = field(default_factory=list)
    numeric: np.ndarray | None = None  # (n, M) numeric inputs when captured

    @property
    def events_per_s(self) -> float:
        return len(self.label) / self.learn_seconds if self.learn_seconds > 0 else float("nan")

    def overall(self) -> Summary:
        return summarize(self.label, self.pred)

    def after_split(self) -> tuple[Summary, Summary | None]:
        """(online, frozen) on the events after the freeze point."""
        s = self.split
        online = summarize(self.label[s:], self.pred[s:])
        if np.isnan(self.frozen_pred[s:]).all():
            return online, None
        return online, summarize(self.label[s:], self.frozen_pred[s:])

    def windows(self, size: int) -> list[dict]:
        """Per-window metrics, online and (after the split) frozen."""
        out = []
        for i, w in enumerate(windows(self.label, self.pred, size)):
            lo, hi = i * size, min((i + 1) * size, len(self.label))
            fp = self.frozen_pred[lo:hi]
            ok = ~np.isnan(fp)
            frozen_auc = auc(self.label[lo:hi][ok], fp[ok]) if ok.sum() > 1 else None
            out.append({"start": lo, "end": hi, "auc": w.auc, "logloss": w.logloss,
                        "mean_pred": w.mean_pred, "rate": w.rate,
                        "auc_frozen": None if frozen_auc is None or np.isnan(frozen_auc) else frozen_auc})
        return out


def run_progressive(events: pa.Table, learner: OnlineLearner, *, frozen_at: float | None = 0.5,
                    progress: Callable[[Progress], None] | None = None, progress_every: float = 0.25,
                    capture_numeric: bool = False, block_rows: int = 8192) -> RunResult:
    """Learn ``events`` in order, scoring each batch first; freeze a copy at ``frozen_at``.
    ``capture_numeric`` keeps every event's numeric model input (counter features included)."""
    n = events.num_rows
    split = int(n * frozen_at) if frozen_at is not None else n
    if frozen_at is not None and not 0 < frozen_at < 1:
        raise ValueError(f"frozen_at must be in (0, 1), got {frozen_at}")
    pred = np.empty(n, np.float32)
    label = np.empty(n, np.float32)
    frozen_pred = np.full(n, np.nan, np.float32)
    frozen: OnlineLearner | None = None
    numeric = np.empty((n, learner.spec.n_numeric), np.float32) if capture_numeric else None
    learn_s, frozen_s, pos, last_report = 0.0, 0.0, 0, time.perf_counter()
    block, block_start = None, 0
    while pos < n:
        size = min(learner.next_batch_size(), n - pos)
        if pos < split < pos + size:
            size = split - pos  # the frozen copy must have learned exactly the first part
        t0 = time.perf_counter()
        if block is None or pos + size > block_start + len(block):
            # Encode a block of events at a time (as a stream delivers blocks),
            # then cut micro-batches from it: fewer, larger array operations.
            block_start = pos
            block = encode(events.slice(pos, max(block_rows, size)), learner.spec)
        batch = block.slice(pos - block_start, pos - block_start + size)
        step = learner.step(batch)
        learn_s += time.perf_counter() - t0
        pred[pos : pos + size], label[pos : pos + size] = step.pred, step.label
        if numeric is not None:
            numeric[pos : pos + size] = step.numeric
        if frozen is not None:
            t0 = time.perf_counter()
            frozen_pred[pos : pos + size] = frozen.predict(batch, online=False)
            frozen_s += time.perf_counter() - t0
        pos += size
        if pos == split and frozen_at is not None:
            frozen = learner.frozen_copy()
        now = time.perf_counter()
        if progress is not None and (now - last_report >= progress_every or pos == n):
            last_report = now
            progress(Progress(pos, n, pos / learn_s if learn_s else 0.0, auc(label[:pos], pred[:pos])))
    stats = [t.stats() for t in learner.tables()] if isinstance(learner.store, LocalStore) else []
    return RunResult(label, pred, frozen_pred, split, learn_s, frozen_s, stats, numeric)
