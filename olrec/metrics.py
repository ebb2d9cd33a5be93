"""Progressive-validation metrics: AUC, logloss, calibration, per window."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half), as scikit-learn computes it."""
    y = np.asarray(y, bool)
    p = np.asarray(p, np.float64)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    ps = p[order]
    ranks = np.empty(len(p), np.float64)
    # average ranks over ties
    starts = np.r_[0, np.flatnonzero(np.diff(ps)) + 1]
    ends = np.r_[starts[1:], len(ps)]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def logloss(y: np.ndarray, p: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(np.asarray(p, np.float64), eps, 1 - eps)
    y = np.asarray(y, np.float64)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()) if len(y) else float("nan")


@dataclass(frozen=True)
class Summary:
    n: int
    auc: float
    logloss: float
    mean_pred: float
    rate: float

    @property
    def calibration(self) -> float:
        """Mean prediction over observed rate (1.0 is calibrated)."""
        return self.mean_pred / self.rate if self.rate > 0 else float("nan")


def summarize(y: np.ndarray, p: np.ndarray) -> Summary:
    y = np.asarray(y, np.float64)
    p = np.asarray(p, np.float64)
    return Summary(len(y), auc(y, p), logloss(y, p),
                   float(p.mean()) if len(p) else float("nan"), float(y.mean()) if len(y) else float("nan"))


def windows(y: np.ndarray, p: np.ndarray, size: int) -> list[Summary]:
    """Summaries over consecutive windows of ``size`` events (the last may be shorter)."""
    return [summarize(y[i : i + size], p[i : i + size]) for i in range(0, len(y), size)]
