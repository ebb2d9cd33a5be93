"""Quality and speed of olrec against River and Vowpal Wabbit on one stream, in one run.

    python bench/quality.py --events ../shared/data/ml-100k --format ml100k [--json out.json]

Every system learns the stream once, in order, by progressive validation
(predict each event, then learn it). Printed per system: progressive AUC and
logloss over the whole stream, AUC on the second half, and learning events/s
timed from parsed rows to predictions (building each system's input inside the
timer). ``olrec-frozen`` is olrec's state frozen at the half: it scores the
second half learning nothing. The peers run in their own virtualenv
(``.venv-peers``, built on first use) because River needs numpy 2.

This machine is shared and noisy: events/s is a median, over ``--repeats``
runs for olrec and over the learning-rate sweep's runs for each peer (a
system's speed does not depend on its learning rate).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from olrec.features import FeatureSpec, ml100k_spec  # noqa: E402
from olrec.learner import LearnerConfig, OnlineLearner  # noqa: E402
from olrec.metrics import auc, logloss  # noqa: E402
from olrec.progressive import run_progressive  # noqa: E402
from olrec.schema import validate  # noqa: E402
from olrec.sources import read_files, read_ml100k  # noqa: E402

PEERS = ["river-fm", "river-logreg", "vw-linear", "vw-lrq", "vw-linear-olrec-features"]
AS_USERS_RUN_THEM = ["river-fm", "river-logreg", "vw-linear", "vw-lrq"]


def load(path: Path, fmt: str) -> tuple[pa.Table, FeatureSpec]:
    if fmt == "ml100k":
        return read_ml100k(path), ml100k_spec()
    split = validate(read_files(path))
    if split.n_bad:
        print(f"quality: {split.n_bad} malformed rows skipped (first reason: {split.bad['reason'][0]})", file=sys.stderr)
    events = split.good
    return events, FeatureSpec.infer(events.schema, events.slice(0, 10_000))


def run_olrec(events: pa.Table, spec: FeatureSpec, cfg: LearnerConfig, repeats: int) -> tuple[list[dict], pa.Table]:
    speeds = []
    for _ in range(repeats):  # olrec is deterministic: repeats only steady the speed (median)
        learner = OnlineLearner(spec, cfg)
        res = run_progressive(events, learner, frozen_at=0.5, capture_numeric=True)
        speeds.append(res.events_per_s)
    y, p, s = res.label, res.pred, res.split
    online = {"system": "olrec", "auc": auc(y, p), "logloss": logloss(y, p),
              "auc_second_half": auc(y[s:], p[s:]), "events_per_s": float(np.median(speeds)),
              "events_per_s_runs": speeds}
    fp = np.where(np.isnan(res.frozen_pred), p, res.frozen_pred)  # identical models up to the half
    frozen = {"system": "olrec-frozen", "auc": auc(y, fp), "logloss": logloss(y, fp),
              "auc_second_half": auc(y[s:], fp[s:]),
              # it learns nothing after the half: its speed is scoring only
              "events_per_s": (len(y) - s) / res.frozen_seconds if res.frozen_seconds else float("nan")}
    # What olrec feeds its model, for `vw-linear-olrec-features`.
    feats = {f"f_{name}": res.numeric[:, j] for j, name in enumerate(learner.numeric_names())}
    cats = {f"c_{c}": events[c] for c in (*spec.categorical, *spec.multi) if c not in ("user_id", "item_id")}
    return [online, frozen], _peer_table(events, feats, cats)


def _peer_table(events: pa.Table, feats: dict, cats: dict) -> pa.Table:
    t = events
    for name, col in {**feats, **cats}.items():
        t = t.append_column(name.replace("*", "_x_").replace(":", "_"), pa.array(col) if isinstance(col, np.ndarray) else col)
    return t


def table(records: list[dict]) -> str:
    head = f"{'system':<26} {'AUC':>7} {'logloss':>8} {'AUC 2nd half':>13} {'events/s':>10}  note"
    lines = [head, "-" * len(head)]
    for r in records:
        note = f"lr={r['lr']}" if "lr" in r else ("scoring only after the half" if r["system"] == "olrec-frozen" else "")
        lines.append(f"{r['system']:<26} {r['auc']:>7.4f} {r['logloss']:>8.4f} {r['auc_second_half']:>13.4f} "
                     f"{r['events_per_s']:>10,.0f}  {note}")
    return "\n".join(lines)


def verdict(records: list[dict]) -> list[str]:
    by = {r["system"]: r for r in records}
    if "olrec" not in by:
        return []
    o = by["olrec"]
    out = []
    peers = [by[s] for s in AS_USERS_RUN_THEM if s in by]
    if peers:
        best = max(peers, key=lambda r: r["auc"])
        fastest = max(peers, key=lambda r: r["events_per_s"])
        d = o["auc"] - best["auc"]
        out.append(f"olrec AUC - best peer ({best['system']}): {d:+.4f} (target >= +0.01): {'MET' if d >= 0.01 else 'MISSED'}")
        ratio = o["events_per_s"] / fastest["events_per_s"]
        out.append(f"olrec events/s / fastest peer ({fastest['system']}): {ratio:.2f}x (target >= 1.0): "
                   f"{'MET' if ratio >= 1.0 else 'MISSED'}")
    if "olrec-frozen" in by:
        d = o["auc_second_half"] - by["olrec-frozen"]["auc_second_half"]
        out.append(f"olrec online - frozen, second-half AUC: {d:+.4f} (target >= +0.05): {'MET' if d >= 0.05 else 'MISSED'}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=Path, default=ROOT.parent / "shared" / "data" / "ml-100k",
                    help="the stream: the ml-100k directory, or CSV/Parquet/JSONL file(s) in the event schema")
    ap.add_argument("--format", choices=["ml100k", "generic"], default="ml100k", help="how to read --events")
    ap.add_argument("--systems", default=",".join(["olrec", "olrec-frozen", *PEERS]),
                    help="comma-separated subset of: olrec, olrec-frozen, " + ", ".join(PEERS))
    ap.add_argument("--batch-size", type=int, default=None, help="olrec's micro-batch size (default: LearnerConfig's)")
    ap.add_argument("--repeats", type=int, default=3, help="olrec runs; its events/s is their median (default 3)")
    ap.add_argument("--json", type=Path, help="write the records here as a JSON list")
    args = ap.parse_args(argv)

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in ("olrec", "olrec-frozen", *PEERS)]
    if unknown:
        ap.error(f"unknown system(s) {unknown}")
    events, spec = load(args.events, args.format)
    print(f"quality: {events.num_rows:,} events from {args.events} ({args.format})", file=sys.stderr)
    cfg = LearnerConfig() if args.batch_size is None else LearnerConfig(batch_size=args.batch_size)
    olrec_records, peer_input = run_olrec(events, spec, cfg, max(1, args.repeats))
    records = [r for r in olrec_records if r["system"] in systems]
    peers = [s for s in PEERS if s in systems]
    if peers:
        from peer_env import run_peers

        with tempfile.TemporaryDirectory(prefix="olrec-quality-") as tmp:
            path = Path(tmp) / "events.parquet"
            pq.write_table(peer_input, path)
            records += run_peers(path, peers, check_reference=args.format == "ml100k", root=ROOT)
    print(table(records))
    for line in verdict(records):
        print(line)
    if args.json:
        keep = ("system", "auc", "logloss", "auc_second_half", "events_per_s")
        args.json.write_text(json.dumps([{k: r[k] for k in keep} | ({"lr": r["lr"]} if "lr" in r else {})
                                         for r in records], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
