"""The Grafana dashboard queries only series olrec exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from olrec.telemetry import HISTOGRAM, FreshnessMetrics, ServeMetrics, TrainMetrics

DASHBOARD = Path(__file__).resolve().parents[1] / "cluster" / "grafana" / "olrec-dashboard.json"


def exported() -> set[str]:
    names = set()
    for spec in (*TrainMetrics.SPECS, *ServeMetrics.SPECS, *FreshnessMetrics.SPECS):
        names |= {f"{spec.exported}{s}" for s in ("_bucket", "_count", "_sum")} if spec.kind == HISTOGRAM \
            else {spec.exported}
    return names


def test_every_queried_series_is_exported_and_every_metric_is_shown():
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    queried = {m for e in exprs for m in re.findall(r"\bray_olrec_[a-z0-9_]+", e)}
    assert queried and queried <= exported(), sorted(queried - exported())
    shown = {re.sub(r"_(bucket|count|sum)$", "", q) for q in queried}
    specs = {s.exported for s in (*TrainMetrics.SPECS, *ServeMetrics.SPECS, *FreshnessMetrics.SPECS)}
    assert specs - shown <= {"ray_olrec_train_events_per_second"}, sorted(specs - shown)  # a rate() of the counter instead
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
