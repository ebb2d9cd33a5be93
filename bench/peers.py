"""Peer systems (River, Vowpal Wabbit) for the quality benchmark, run by progressive validation.

Runs inside ``.venv-peers`` (River 0.26 needs numpy>=2, olrec needs numpy<2), so it
imports nothing from olrec; ``bench/peer_env.py`` starts it. Every event is predicted,
then learned, in stream order; the best learning rate of each sweep is reported.

    python bench/peers.py --events ev.parquet --systems river-fm,vw-linear --out records.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from sklearn.metrics import log_loss, roc_auc_score

USER_SIDE = ("age", "gender", "occupation")  # one-hot, with the user id
ITEM_MULTI = "genres"  # `|`-separated, multi-hot, with the item id
VW_BASE = "--loss_function logistic --link logistic -b 20 --quiet"
SWEEPS: dict[str, tuple[float, ...]] = {
    "river-fm": (0.01, 0.03, 0.1, 0.3),
    "river-logreg": (0.03, 0.1, 0.3, 1.0),
    "vw-linear": (0.5, 1.5, 3.0),
    "vw-lrq": (0.5, 1.5, 3.0),
    "vw-linear-olrec-features": (0.5, 1.5, 3.0),
}

Cols = dict[str, list]
# A runner plays the whole stream for one lr and returns the probability of label 1 per event.
Runner = Callable[[Cols, int, float], np.ndarray]


def _esc(v: object) -> str:
    # VW splits on whitespace and reads `|` and `:` as syntax; River doesn't care but shares the names.
    return str(v).replace(" ", "_").replace("\t", "_").replace("|", "/").replace(":", ";")


def _present(v: object) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def _tokens(cols: Cols, k: int) -> tuple[list[str], list[str]]:
    """The user-side and item-side one-hot feature names of event ``k``."""
    user = [f"user={cols['user_id'][k]}"]
    user += [f"{c}={_esc(cols[c][k])}" for c in USER_SIDE if c in cols and _present(cols[c][k])]
    item = [f"item={cols['item_id'][k]}"]
    if ITEM_MULTI in cols and _present(cols[ITEM_MULTI][k]):
        item += [f"genre={_esc(g)}" for g in cols[ITEM_MULTI][k].split("|") if g]
    return user, item


def _river(system: str) -> Runner:
    from river import facto, linear_model, optim

    def run(cols: Cols, n: int, lr: float) -> np.ndarray:
        if system == "river-fm":
            model = facto.FMClassifier(n_factors=10, weight_optimizer=optim.SGD(lr),
                                       latent_optimizer=optim.SGD(lr), seed=42)
        else:  # defaults otherwise (intercept_lr 0.01, no l2), which is how River's users run it
            model = linear_model.LogisticRegression(optimizer=optim.SGD(lr))
        preds = np.full(n, np.nan)
        labels = cols["label"]
        with np.errstate(all="ignore"):  # a diverging lr overflows; evaluate() reports it once
            for k in range(n):
                user, item = _tokens(cols, k)
                x = dict.fromkeys(user + item, 1.0)
                preds[k] = model.predict_proba_one(x).get(True, 0.0)
                if preds[k] != preds[k]:
                    break  # NaN: diverged, the rest of the stream would be NaN too
                model.learn_one(x, bool(labels[k]))  # bool: River's classes are True/False
        return preds

    return run


def _vw_lines(cols: Cols, n: int, olrec_features: bool) -> Iterator[str]:
    f_cols = [c for c in cols if c.startswith("f_")] if olrec_features else []
    c_cols = [c for c in cols if c.startswith("c_")] if olrec_features else []
    labels = cols["label"]
    for k in range(n):
        if olrec_features:  # ids plus olrec's own features instead of the raw side columns
            user, item = [f"user={cols['user_id'][k]}"], [f"item={cols['item_id'][k]}"]
        else:
            user, item = _tokens(cols, k)
        line = f"{1 if labels[k] else -1} |user {' '.join(user)} |item {' '.join(item)}"
        if f_cols:
            line += " |f " + " ".join(f"{_esc(c)}:{cols[c][k]}" for c in f_cols if _present(cols[c][k]))
        if c_cols:  # `|` inside a c_ value means multi-valued, as in genres
            line += " |c " + " ".join(f"{_esc(c)}={_esc(v)}" for c in c_cols if _present(cols[c][k])
                                      for v in str(cols[c][k]).split("|"))
        yield line


def _vw(system: str) -> Runner:
    from vowpalwabbit import Workspace

    # --lrq ui8: rank-8 interactions between namespaces starting with u (user) and i (item).
    extra = " --lrq ui8" if system == "vw-lrq" else ""

    def run(cols: Cols, n: int, lr: float) -> np.ndarray:
        ws = Workspace(f"{VW_BASE} -l {lr}{extra}")
        preds = np.empty(n)
        for k, line in enumerate(_vw_lines(cols, n, system == "vw-linear-olrec-features")):
            ex = ws.parse(line)  # parse once; predict() on a labeled example does not learn
            preds[k] = ws.predict(ex)
            ws.learn(ex)
            ws.finish_example(ex)
        ws.finish()
        return preds

    return run


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    return float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")


def evaluate(system: str, cols: Cols) -> dict:
    """Sweep ``system``'s lr over the whole stream; the record of the best progressive AUC."""
    if system not in SWEEPS:
        raise SystemExit(f"unknown system {system!r}; known: {', '.join(SWEEPS)}")
    runner = _river(system) if system.startswith("river-") else _vw(system)
    y = np.asarray(cols["label"], dtype=np.int64)
    n = len(y)
    best: dict | None = None
    sweep: dict[str, float | None] = {}
    speeds: list[float] = []
    for lr in SWEEPS[system]:
        t0 = time.perf_counter()
        p = runner(cols, n, lr)  # timed: input building + predict + learn
        secs = time.perf_counter() - t0
        if not np.isfinite(p).all():
            sweep[str(lr)] = None  # JSON has no NaN; null marks a diverged lr
            print(f"peers: {system:<26} lr={lr:<5} diverged at event {int(np.argmax(~np.isfinite(p)))}",
                  file=sys.stderr, flush=True)
            continue
        rec = {"system": system, "auc": _auc(y, p),
               "logloss": float(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7), labels=[0, 1])),
               "auc_second_half": _auc(y[n // 2:], p[n // 2:]),
               "events_per_s": n / secs, "lr": lr}
        sweep[str(lr)] = rec["auc"]
        speeds.append(rec["events_per_s"])
        print(f"peers: {system:<26} lr={lr:<5} auc={rec['auc']:.4f} logloss={rec['logloss']:.4f} "
              f"auc_2nd_half={rec['auc_second_half']:.4f} {rec['events_per_s']:,.0f} ev/s ({secs:.1f}s)",
              file=sys.stderr, flush=True)
        if best is None or rec["auc"] > best["auc"]:
            best = rec
    if best is None:
        raise SystemExit(f"{system}: every lr in {SWEEPS[system]} diverged")
    # A system's speed does not depend on its lr: the median over the sweep's
    # runs is robust to this shared machine's drift.
    return {**best, "events_per_s": float(np.median(speeds)), "events_per_s_runs": speeds, "sweep": sweep}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=Path, required=True, help="parquet file of events in stream order")
    ap.add_argument("--systems", required=True, help=f"comma-separated, from: {', '.join(SWEEPS)}")
    ap.add_argument("--out", type=Path, required=True, help="JSON list of records")
    args = ap.parse_args(argv)
    systems = [s for s in args.systems.split(",") if s]
    for s in systems:
        if s not in SWEEPS:
            ap.error(f"unknown system {s!r}; known: {', '.join(SWEEPS)}")
    # Parsed to python lists up front so the timer measures the systems, not parquet decoding.
    cols: Cols = pq.read_table(args.events).to_pydict()
    for c in ("user_id", "item_id", "label"):
        if c not in cols:
            ap.error(f"{args.events} has no column {c!r}")
    records = [evaluate(s, cols) for s in systems]
    args.out.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
