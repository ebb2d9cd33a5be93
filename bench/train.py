"""Distributed training against the in-process learner, in one run.

    python bench/train.py [--data ../shared/data/ml-100k] [--synthetic-events N] [--json out.json]

For MovieLens-100K and for a synthetic stream with about a million distinct
ids, each system learns the whole stream once by progressive validation:

- ``inprocess``: :class:`olrec.learner.OnlineLearner` in this process;
- ``ray-1w1s``: ``olrec.train`` with 1 Ray Train worker and 1 shard actor;
- ``ray-2w2s``: 2 workers and 2 shards, dense gradients all-reduced each round;
- ``ray-2w2s-ray-defaults`` (synthetic only): the same on a second cluster
  started with Ray's default object inlining (100 KiB) instead of olrec's 4 MiB
  (:data:`olrec.rayenv.CORE_ENV`), to show what that setting is worth. This
  driver keeps the first cluster's setting (Ray reads it once per process);
  the workers, shards and Ray Data's processes take the second's.

Printed side by side: steady-state events/s (from each run's first trained
batch to its last: cluster and trainer start-up excluded, and reported
separately as ``startup_s``), progressive AUC, and the ratios the targets
name. Then the shard memory per row at the default table config (dim 16,
Adagrad) against the raw bytes of a row. This machine is shared and noisy:
compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]

from olrec.embedding import EmbeddingTable, TableConfig  # noqa: E402
from olrec.features import FeatureSpec, ml100k_spec  # noqa: E402
from olrec.learner import LearnerConfig, OnlineLearner  # noqa: E402
from olrec.log import EventLog  # noqa: E402
from olrec.rayenv import CORE_ENV, apply_env  # noqa: E402
from olrec.progressive import run_progressive  # noqa: E402
from olrec.sources import SyntheticConfig, read_ml100k, read_synthetic  # noqa: E402
from olrec.train import TrainConfig, train  # noqa: E402

SYSTEMS = {"ray-1w1s": (1, 1), "ray-2w2s": (2, 2)}
INLINE = "RAY_max_direct_call_object_size"
RAY_DEFAULT_INLINE = str(100 * 1024)


def synthetic(n_events: int) -> pa.Table:
    """A stream where about a million distinct user and item ids appear."""
    cfg = SyntheticConfig(n_users=4_000_000, n_items=400_000, n_events=n_events, zipf_a=0.6, seed=11)
    return read_synthetic(cfg).drop_columns(["p_true"])


def distinct_ids(events: pa.Table) -> int:
    return len(np.unique(events["user_id"].to_numpy())) + len(np.unique(events["item_id"].to_numpy()))


def run_inprocess(events: pa.Table, spec: FeatureSpec, cfg: LearnerConfig) -> dict:
    t0 = time.perf_counter()
    learner = OnlineLearner(spec, cfg)
    startup = time.perf_counter() - t0
    res = run_progressive(events, learner, frozen_at=None)
    return {"events_per_s": res.events_per_s, "startup_s": startup, "auc": res.overall().auc}


def run_ray(events_log: Path, spec: FeatureSpec, cfg: LearnerConfig, workers: int, shards: int, tmp: Path) -> dict:
    run_dir = tmp / f"run-{workers}w{shards}s-{time.time_ns()}"
    run_dir.mkdir()
    shutil.copytree(events_log, run_dir / "log")
    tc = TrainConfig(workers=workers, shards=shards, checkpoint_every_s=3600.0, report_every_s=2.0)
    t0 = time.time()
    m = train(spec, cfg, tc, run_dir)
    wall = time.time() - t0
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"events_per_s": m["events_per_s"], "startup_s": m["first_batch_at"] - t0, "auc": m["auc"],
            "wall_s": wall, "events_trained": m["events_trained"]}


def start_ray() -> None:
    """A new local cluster (its processes take this one's environment)."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)


def with_ray_default_inline(run):
    """``run()`` on a fresh local cluster whose processes inline objects up to Ray's default size."""
    import ray

    ray.shutdown()
    had = os.environ.get(INLINE)
    os.environ[INLINE] = RAY_DEFAULT_INLINE
    try:
        start_ray()
        return run()
    finally:
        ray.shutdown()
        if had is None:
            del os.environ[INLINE]
        else:
            os.environ[INLINE] = had


def shard_memory(rows: int) -> dict:
    """Bytes per held row of a shard table at the default config (dim 16, Adagrad)."""
    cfg = TableConfig(name="sparse")
    t = EmbeddingTable(cfg)
    keys = np.random.default_rng(0).integers(-(2**62), 2**62, rows)
    for at in range(0, rows, 65_536):
        t.observe(keys[at : at + 65_536])
    return {"system": "shard-memory", "bytes_per_row": t.nbytes / len(t),
            "raw_bytes_per_row": cfg.dim * 4 * (1 + cfg.slots), "rows": len(t), "dim": cfg.dim,
            "optimizer": cfg.optimizer}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "ml-100k")
    ap.add_argument("--synthetic-events", type=int, default=1_500_000)
    ap.add_argument("--memory-rows", type=int, default=1_000_000)
    ap.add_argument("--json", type=Path, help="write the records here")
    args = ap.parse_args()
    import ray

    cfg = LearnerConfig()
    records: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="olrec-bench-train-") as tmp_s:
        tmp = Path(tmp_s)
        t0 = time.time()
        apply_env()  # olrec's Ray settings, as `olrec train` starts a local cluster with them
        start_ray()
        print(f"ray.init: {time.time() - t0:.1f} s ({INLINE}={os.environ[INLINE]})")
        datasets = [("ml100k", lambda: (read_ml100k(args.data), ml100k_spec())),
                    ("synthetic", lambda: (synthetic(args.synthetic_events), FeatureSpec()))]
        for name, make in datasets:
            events, spec = make()
            extra = f", {distinct_ids(events):,} distinct ids" if name == "synthetic" else ""
            print(f"\n{name}: {events.num_rows:,} events{extra}")
            log_dir = tmp / f"log-{name}"
            with EventLog(log_dir).open_writer() as w:
                for at in range(0, events.num_rows, 65_536):
                    w.append(events.slice(at, 65_536))
            rec = {"system": "inprocess", "dataset": name, **run_inprocess(events, spec, cfg)}
            records.append(rec)
            _print(rec)
            for system, (workers, shards) in SYSTEMS.items():
                rec = {"system": system, "dataset": name, **run_ray(log_dir, spec, cfg, workers, shards, tmp)}
                records.append(rec)
                _print(rec)
            base = next(r for r in records if r["dataset"] == name and r["system"] == "inprocess")
            two = next(r for r in records if r["dataset"] == name and r["system"] == "ray-2w2s")
            ratio = two["events_per_s"] / base["events_per_s"]
            print(f"  ray-2w2s / inprocess events/s: {ratio:.2f}x (target >= 0.5x): {'MET' if ratio >= 0.5 else 'MISSED'}")
            d_auc = two["auc"] - base["auc"]
            if name == "ml100k":
                print(f"  ray-2w2s AUC - inprocess AUC: {d_auc:+.4f} (target within 0.005): "
                      f"{'MET' if abs(d_auc) <= 0.005 else 'MISSED'}")
            if name == "synthetic":
                rec = {"system": "ray-2w2s-ray-defaults", "dataset": name,
                       **with_ray_default_inline(lambda: run_ray(log_dir, spec, cfg, 2, 2, tmp))}
                records.append(rec)
                _print(rec)
                print(f"  ray-2w2s with {INLINE}={CORE_ENV[INLINE]} / with Ray's {RAY_DEFAULT_INLINE}: "
                      f"{two['events_per_s'] / rec['events_per_s']:.2f}x")
            shutil.rmtree(log_dir, ignore_errors=True)
        ray.shutdown()
    mem = shard_memory(args.memory_rows)
    records.append(mem)
    x = mem["bytes_per_row"] / mem["raw_bytes_per_row"]
    print(f"\nshard memory at dim {mem['dim']}, {mem['optimizer']}, {mem['rows']:,} rows: {mem['bytes_per_row']:.1f} B/row, "
          f"raw {mem['raw_bytes_per_row']} B/row: {x:.2f}x (target <= 2x): {'MET' if x <= 2 else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps(records, indent=2) + "\n")
    return 0


def _print(r: dict) -> None:
    print(f"  {r['system']:<10} {r['events_per_s']:>10,.0f} ev/s  AUC {r['auc']:.4f}  startup {r['startup_s']:5.1f} s")


if __name__ == "__main__":
    sys.exit(main())
