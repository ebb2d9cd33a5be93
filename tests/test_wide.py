"""The wide part: per-event FTRL-Proximal, checked against a plain-Python reference."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from olrec.features import FeatureSpec, encode
from olrec.wide import FTRL, Wide

SPEC = FeatureSpec(multi=("genres",), counters=("user_id", "item_id"), crosses=("user_id*genres",), recency=())


def _batch(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return encode(pa.table({
        "user_id": rng.integers(0, 5, n), "item_id": rng.integers(0, 4, n), "ts": np.arange(n, dtype=float),
        "label": rng.integers(0, 2, n).astype(np.int8), "genres": pa.array(rng.choice(["a", "a|b", "c"], n)),
    }), SPEC)


def _reference(batches, xs, ftrl: FTRL, keys_of) -> list[float]:
    """FTRL-Proximal per event, one dict of (z, n) per feature (McMahan et al. 2013, algorithm 1)."""
    z: dict = {}
    nn: dict = {}

    def w(i):
        zi, ni = z.get(i, 0.0), nn.get(i, 0.0)
        if abs(zi) <= ftrl.l1:
            return 0.0
        return -(zi - math.copysign(ftrl.l1, zi)) / ((ftrl.beta + math.sqrt(ni)) / ftrl.alpha + ftrl.l2)

    out = []
    for b, x in zip(batches, xs):
        keys, ptr = keys_of(b)
        for j in range(len(b)):
            feats = [(("num", k), x[j, k]) for k in range(x.shape[1])] + [(("bias",), 1.0)]
            feats += [(("id", int(k)), 1.0) for k in keys[ptr[j]:ptr[j + 1]]]
            s = sum(w(i) * v for i, v in feats)
            p = 1 / (1 + math.exp(-max(min(s, 35.0), -35.0)))
            out.append(p)
            g = p - float(b.label[j])
            for i, v in feats:
                gi, ni = g * v, nn.get(i, 0.0)
                sigma = (math.sqrt(ni + gi * gi) - math.sqrt(ni)) / ftrl.alpha
                z[i] = z.get(i, 0.0) + gi - sigma * w(i)
                nn[i] = ni + gi * gi
    return out


@pytest.mark.parametrize("ftrl", [FTRL(), FTRL(alpha=0.3, l1=0.5, l2=0.1)])
def test_per_event_ftrl_matches_the_reference(ftrl: FTRL) -> None:
    batches = [_batch(40, s) for s in range(3)]
    xs = [np.random.default_rng(10 + i).standard_normal((40, 3)) for i in range(3)]
    wide = Wide(SPEC, 3, ftrl)
    got = np.concatenate([wide.step(b, x) for b, x in zip(batches, xs)])
    np.testing.assert_allclose(got, _reference(batches, xs, ftrl, wide.keys), rtol=1e-5, atol=1e-6)


def test_predict_learns_nothing_and_matches_the_next_step() -> None:
    wide = Wide(SPEC, 2)
    x = np.zeros((30, 2))
    for s in range(3):
        wide.step(_batch(30, s), x)
    probe = _batch(30, 99)
    before = wide.predict(probe, x)
    np.testing.assert_array_equal(wide.predict(probe, x), before)
    # The first event of a step is scored with the same weights predict uses.
    assert wide.step(probe, x)[0] == pytest.approx(before[0])


def test_predict_scores_each_event_exactly_as_the_learning_pass() -> None:
    """predict sums keys in field order, the pass in event order: the same sums, to the bit.
    The reference: each event alone through the learning pass, which scores before it learns."""
    rng = np.random.default_rng(3)
    wide = Wide(SPEC, 3, FTRL(l1=0.05))
    for s in range(3):
        wide.step(_batch(40, s), rng.standard_normal((40, 3)))
    probe, x = _batch(50, 7), rng.standard_normal((50, 3))
    want = []
    for j in range(len(probe)):
        keys, ptr = wide.keys(probe.slice(j, j + 1))
        pulled = wide.store.fetch(Wide.TABLE, keys)
        want.append(wide._pass(ptr, pulled.inverse.astype(np.int64), x[j : j + 1], probe.label[j : j + 1],
                               pulled.weights.astype(np.float64), wide.dense.copy())[0])
    np.testing.assert_array_equal(wide.predict(probe, x), want)


def test_bad_ftrl_settings_name_the_field() -> None:
    with pytest.raises(ValueError, match="alpha"):
        FTRL(alpha=0)
    with pytest.raises(ValueError, match="l2"):
        FTRL(l2=-1)
