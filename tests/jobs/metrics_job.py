"""A Ray job for tests/test_telemetry.py: an actor records known TrainMetrics values, then the
job keeps running (so Ray keeps the actor's series) until a stop file appears.

Run from the repository root of the uploaded working dir:
``python -m tests.jobs.metrics_job --run ID --stop-file PATH --reports JSON [--pull S ...] [--push S ...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import ray


@ray.remote(num_cpus=0)
class Recorder:
    def __init__(self, run: str) -> None:
        from olrec.telemetry import TrainMetrics

        self.metrics = TrainMetrics({"run": run})

    def record(self, reports: list[dict], pull: list[float], push: list[float]) -> dict:
        import olrec.telemetry

        for r in reports:
            self.metrics.record(r)
        for s in pull:
            self.metrics.observe_pull(s)
        for s in push:
            self.metrics.observe_push(s)
        return {"active": self.metrics.active, "pid": os.getpid(), "telemetry": olrec.telemetry.__file__}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--stop-file", required=True)
    ap.add_argument("--reports", required=True, help="JSON list of report dicts, recorded in order")
    ap.add_argument("--pull", type=float, nargs="*", default=[])
    ap.add_argument("--push", type=float, nargs="*", default=[])
    ap.add_argument("--max-seconds", type=float, default=300.0)
    a = ap.parse_args()
    ray.init()
    rec = Recorder.remote(a.run)
    info = ray.get(rec.record.remote(json.loads(a.reports), a.pull, a.push))
    print(f"recorded: {json.dumps(info)}", flush=True)
    if not info["active"]:
        print("TrainMetrics is not active inside the actor", file=sys.stderr)
        return 2
    deadline = time.monotonic() + a.max_seconds
    while not os.path.exists(a.stop_file):  # the test scrapes meanwhile
        if time.monotonic() > deadline:
            print(f"no stop file {a.stop_file} after {a.max_seconds} s", file=sys.stderr)
            return 1
        time.sleep(0.1)
    print("stop file seen", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
