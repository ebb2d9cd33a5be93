"""``olrec demo``, the closed loop, as a user runs it: a bounded demo on a
standalone ``ray start --head`` cluster (the ``ray_head`` fixture), its report
checked, its metrics scraped by value from the node's Prometheus endpoint
while it lingers, then Ctrl-C ends it leaving no process behind."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from olrec.demo import BREAKS, DemoConfig, freshness, malformed_copies
from olrec.schema import validate
from raycluster import find, wait_for
from servingrun import ML100K, free_port
from test_grafana import DASHBOARD

REPO = Path(__file__).resolve().parents[1]


def test_every_malformed_copy_is_rejected_by_the_logs_validation():
    good = pa.table({"user_id": [1, 2], "item_id": [3, 4], "ts": [10.0, 11.0], "label": pa.array([1, 0], pa.int8()),
                     "genres": ["Drama", "Comedy"]})
    assert validate(good).n_bad == 0
    for kind in BREAKS:
        split = validate(malformed_copies(good, kind))
        assert split.n_bad == 2 and kind in split.bad["reason"][0].as_py(), kind


def test_freshness_is_the_first_later_answer_past_the_offset():
    t = np.array([1.0, 2.0, 3.0, 4.0])  # answers' arrival times
    w = np.array([5, 12, 9, 30])  # their watermarks (replicas may disagree)
    samples = [(4, 0.5), (11, 1.5), (11, 2.5), (29, 0.0), (30, 0.0)]
    got = freshness(samples, t, w)
    np.testing.assert_allclose(got[:4], [0.5, 0.5, 1.5, 4.0])
    assert np.isnan(got[4])  # no answer has W > 30 yet
    # A resolved sample keeps its value; later answers only resolve the rest.
    again = freshness(samples, np.r_[t, 5.0], np.r_[w, 31], known=got)
    np.testing.assert_allclose(again, [0.5, 0.5, 1.5, 4.0, 5.0])


@pytest.mark.parametrize("bad, match", [
    ({"rate": 0}, "rate"), ({"max_events": 1}, "max_events"), ({"malformed": 1.5}, "malformed"),
    ({"workers": 0}, "workers"), ({"scorer": "gpu"}, "scorer"), ({"port": 70000}, "port"),
])
def test_config_errors_name_the_knob(bad, match):
    with pytest.raises(ValueError, match=match):
        DemoConfig(data=Path("."), **bad)


def _leftovers(run_dir: Path) -> list[str]:
    """Command lines of live processes that name the run directory (Triton, its stubs), from /proc."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # ended meanwhile
            continue
        if str(run_dir) in text:
            found.append(text)
    return found


@pytest.mark.slow
@pytest.mark.skipif(not ML100K.is_dir(), reason="MovieLens-100K not beside the repo")
def test_bounded_demo_closes_the_loop_and_reports_it(ray_head, tmp_path: Path) -> None:
    run, report = tmp_path / "demo-run", tmp_path / "report" / "demo.json"  # the run's name tags its metrics
    # The replay and request rates are the demo's defaults halved: a CI machine runs
    # the session's other cluster too (the full rates are measured by `make demo`).
    cmd = [sys.executable, "-m", "olrec", "demo", "--data", str(ML100K), "--max-events", "20000",
           "--rate", "1000", "--request-rate", "25", "--run-dir", str(run), "--report", str(report),
           "--port", str(free_port()), "--linger", "300", "--quiet"]
    env = {**ray_head.env, "RAY_ADDRESS": ray_head.address}
    log = open(tmp_path / "demo.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: report.is_file() or proc.poll() is not None, 600, "the demo's report")
        assert proc.poll() is None, (tmp_path / "demo.log").read_text()[-3000:]
        r = json.loads(report.read_text())

        # The report: nothing lost, the dead-letter path exercised, learning pays, freshness measured.
        assert r["events_trained"] == r["events_appended"] == r["watermark"] > 20_000 - r["malformed_sent"]
        assert r["events_appended"] == 20_000 + r["feedback_events"]
        assert r["dead_lettered"] == r["malformed_sent"] == 20
        assert r["events_after_snapshot"] > 5_000
        assert r["auc_online"] > r["auc_frozen"], (r["auc_online"], r["auc_frozen"])
        assert r["freshness_samples"] >= 100 and r["freshness_unresolved"] == 0
        assert 0 < r["freshness_p50_s"] <= r["freshness_p99_s"]
        assert r["requests"] > 0 and r["errors"] == 0, r["error_examples"]
        for png in r["plots"]:
            assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        # The same figures in the node's Prometheus scrape, while the loop lingers.
        tag = {"run": run.name}

        def scraped() -> dict | None:
            s = ray_head.scrape()
            got = {"events": sum(find(s, "ray_olrec_train_events_total", **tag)),
                   "watermark": max(find(s, "ray_olrec_train_watermark", **tag), default=None),
                   "served_watermark": max(find(s, "ray_olrec_serve_watermark", **tag), default=None),
                   "requests": sum(find(s, "ray_olrec_serve_requests_total", **tag)),
                   "freshness": sum(find(s, "ray_olrec_freshness_seconds_count", **tag)),
                   "names": {x.name for x in s if x.name.startswith("ray_olrec_")}}
            want = {"events": r["events_trained"], "watermark": r["watermark"], "served_watermark": r["watermark"],
                    "requests": r["service_calls"], "freshness": r["freshness_samples"]}
            return got if all(got[k] == v for k, v in want.items()) else None

        got = wait_for(scraped, 60, "the scrape to show the report's figures")
        queried = {re.sub(r"_(bucket|count|sum|total)$", "", m)
                   for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]
                   for m in re.findall(r"\bray_olrec_[a-z0-9_]+", t["expr"])}
        present = {re.sub(r"_(bucket|count|sum|total)$", "", n) for n in got["names"]}
        assert queried <= present, sorted(queried - present)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # Ctrl-C: a clean end
        code = proc.wait(180)
        log.close()
    assert code == 0, (tmp_path / "demo.log").read_text()[-3000:]
    assert not _leftovers(run)
