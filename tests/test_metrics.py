"""Progressive-validation metrics against scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss, roc_auc_score

from olrec.metrics import Summary, auc, logloss, summarize, windows


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 300), st.integers(1, 12), st.integers(0, 2**32 - 1))
def test_auc_equals_sklearn_with_ties(n, n_levels, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    y[0], y[1] = 0, 1  # both classes present
    # few distinct scores: heavy ties, including ties across classes
    p = rng.integers(0, n_levels, n) / max(n_levels - 1, 1)
    assert auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.floats(0, 1, allow_nan=False)), min_size=2, max_size=80))
def test_auc_equals_sklearn_hypothesis_lists(pairs):
    y = np.array([a for a, _ in pairs])
    p = np.array([b for _, b in pairs])
    if y.all() or not y.any():
        assert math.isnan(auc(y, p))
    else:
        assert auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)


def test_auc_continuous_random_and_extremes():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 5000)
    p = np.clip(0.3 * y + rng.random(5000), 0, 1)
    assert auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert 0.5 < auc(y, p) < 1.0
    assert auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5


def test_auc_one_class_is_nan():
    assert math.isnan(auc(np.ones(5), np.linspace(0, 1, 5)))
    assert math.isnan(auc(np.zeros(5), np.linspace(0, 1, 5)))
    assert math.isnan(auc(np.zeros(0), np.zeros(0)))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 200), st.integers(0, 2**32 - 1))
def test_logloss_equals_sklearn(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = rng.uniform(0.001, 0.999, n)
    assert logloss(y, p) == pytest.approx(log_loss(y, p, labels=[0, 1]), rel=1e-9, abs=1e-12)


def test_logloss_clips_and_empty():
    # a certain, wrong prediction is finite (clipped), and large
    v = logloss(np.array([1, 0]), np.array([0.0, 1.0]))
    assert math.isfinite(v) and v > 10
    assert logloss(np.array([1, 0]), np.array([1.0, 0.0])) < 1e-6
    assert logloss([1], [0.5]) == pytest.approx(math.log(2))
    assert math.isnan(logloss(np.zeros(0), np.zeros(0)))


def test_summarize_fields_and_calibration():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400).astype(float)
    p = rng.uniform(0.05, 0.95, 400)
    s = summarize(y, p)
    assert isinstance(s, Summary)
    assert s.n == 400
    assert s.auc == pytest.approx(roc_auc_score(y, p))
    assert s.logloss == pytest.approx(log_loss(y, p))
    assert s.mean_pred == pytest.approx(p.mean())
    assert s.rate == pytest.approx(y.mean())
    assert s.calibration == pytest.approx(p.mean() / y.mean())
    # calibrated predictions: constant p = observed rate
    c = summarize(y, np.full(400, y.mean()))
    assert c.calibration == pytest.approx(1.0)
    assert c.auc == 0.5
    # over-prediction shows as calibration > 1
    assert summarize(y, np.full(400, min(1.0, 2 * y.mean()))).calibration > 1.5
    # no positives: calibration undefined
    assert math.isnan(summarize(np.zeros(4), np.full(4, 0.2)).calibration)


def test_windows_shapes_and_contents():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 1050).astype(float)
    p = rng.uniform(0, 1, 1050)
    ws = windows(y, p, 100)
    assert len(ws) == 11
    assert [w.n for w in ws] == [100] * 10 + [50]
    for i, w in enumerate(ws):
        sl = slice(100 * i, 100 * (i + 1))
        assert w == summarize(y[sl], p[sl])
    assert sum(w.n for w in ws) == len(y)
    assert windows(y, p, 2000) == [summarize(y, p)]
    assert windows(y[:0], p[:0], 10) == []
    assert [w.n for w in windows(y[:300], p[:300], 100)] == [100, 100, 100]
