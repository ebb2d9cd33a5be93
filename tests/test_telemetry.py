"""olrec.telemetry: no-op without Ray; the values reach Prometheus through a real `ray start` cluster."""

from __future__ import annotations

import json
import math
import pickle
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from olrec.telemetry import (COUNTER, GAUGE, HISTOGRAM, MetricSet, MetricSpec, ServeMetrics, TrainMetrics,
                             counter_delta)
from raycluster import find, parse_prometheus, standalone_head, submit, wait_for, wait_job

REPO = Path(__file__).resolve().parents[1]


# -- without a cluster --------------------------------------------------------------------------------
def test_recording_without_ray_is_a_no_op_and_imports_nothing() -> None:
    # A fresh interpreter: this pytest process may already hold the session's Ray cluster.
    code = textwrap.dedent("""
        import sys
        from olrec.telemetry import TrainMetrics
        m = TrainMetrics({"run": "r"})
        report = {"events_trained": 10, "watermark": 5, "loss": 0.5, "auc": float("nan"), "final": True}
        m.record(report); m.observe_pull(0.01); m.observe_push(0.02); m.set("loss", 1.0); m.inc("events_trained", 3)
        assert not m.active
        assert "ray" not in sys.modules, "recording without Ray imported ray"
        import ray
        m.record(dict(report, events_trained=20)); m.observe_pull(0.01)
        assert not m.active and not ray.is_initialized()
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_counter_delta_adds_the_growth_and_rebases_when_the_total_goes_down() -> None:
    assert counter_delta(0, 1000) == (1000, 1000)
    assert counter_delta(1000, 1234) == (234, 1234)
    assert counter_delta(1234, 1234) == (0, 1234)
    assert counter_delta(1234, 900) == (0, 900)  # restored from an older checkpoint: no negative increment
    assert counter_delta(900, 1000) == (100, 1000)


def test_specs_validate_and_name_the_exported_series() -> None:
    names = {s.key: s.exported for s in TrainMetrics.SPECS}
    assert names["events_trained"] == "ray_olrec_train_events_total"
    assert names["watermark"] == "ray_olrec_train_watermark"
    assert names["pull_latency_s"] == "ray_olrec_train_pull_latency_seconds"
    serve = {s.key: s.exported for s in ServeMetrics({"run": "r"}).specs}
    assert serve["requests"] == "ray_olrec_serve_requests_total" and serve["watermark"] == "ray_olrec_serve_watermark"
    with pytest.raises(ValueError, match="'olrec_'"):
        MetricSpec("x", "train_x", GAUGE, "no prefix")
    with pytest.raises(ValueError, match="boundaries"):
        MetricSpec("x", "olrec_x", HISTOGRAM, "d", (0.1, 0.05))
    with pytest.raises(ValueError, match="_total"):
        MetricSpec("x", "olrec_x_total", COUNTER, "d")
    with pytest.raises(ValueError, match="WorkerId"):
        TrainMetrics({"WorkerId": "1"})
    with pytest.raises(TypeError, match="'rank'"):
        TrainMetrics({"rank": 0})  # type: ignore[dict-item]
    with pytest.raises(KeyError, match="'nope'"):
        TrainMetrics().set("nope", 1.0)
    with pytest.raises(TypeError, match="counter, not a gauge"):
        TrainMetrics().set("events_trained", 1.0)

    class Dup(MetricSet):
        SPECS = (MetricSpec("a", "olrec_a", GAUGE, "d"), MetricSpec("b", "olrec_a", GAUGE, "d"))

    with pytest.raises(ValueError, match="duplicate metric name 'olrec_a'"):
        Dup()


def test_a_metric_set_pickles_without_its_ray_objects() -> None:
    m = TrainMetrics({"run": "r"}, events_start=50)
    m.record({"events_trained": 70})
    m2 = pickle.loads(pickle.dumps(m))
    assert m2.tags == {"run": "r"} and m2._metrics is None and m2._totals == {"events_trained": 70.0}


def test_prometheus_parser_reads_labels_escapes_and_special_values() -> None:
    text = textwrap.dedent(r"""
        # HELP ray_x_total a counter
        # TYPE ray_x_total counter
        ray_x_total{a="1",b="q\"uo\\te",c="line\nbreak"} 1234.0
        ray_h_bucket{le="+Inf",run="r"} 3
        ray_g NaN
        ray_t{x="y",} -Inf 1700000000000
    """)
    s = parse_prometheus(text)
    assert [x.name for x in s] == ["ray_x_total", "ray_h_bucket", "ray_g", "ray_t"]
    assert s[0].labels == {"a": "1", "b": 'q"uo\\te', "c": "line\nbreak"} and s[0].value == 1234.0
    assert find(s, "ray_h_bucket", le="+Inf") == [3.0] and find(s, "ray_h_bucket", le="1") == []
    assert math.isnan(s[2].value) and s[3].value == -math.inf and s[3].labels == {"x": "y"}
    with pytest.raises(ValueError, match="line 2"):
        parse_prometheus("ok 1\nnot a sample line\n")


# -- end to end: `ray start --head`, `ray job submit`, scrape ---------------------------------------
@pytest.mark.slow
def test_recorded_values_reach_the_head_metrics_endpoint(tmp_path: Path) -> None:
    run = f"t{uuid.uuid4().hex[:8]}"
    stop = tmp_path / "stop"
    reports = [
        {"events_trained": 1000, "watermark": 500, "final": False},  # the counter adds deltas: 1000 then 234
        {"events_trained": 1234, "watermark": 98765, "loss": 0.25, "auc": 0.75, "stream_lag": 7,
         "shard_rows": 4321, "shard_bytes": 65536, "checkpoint_age_s": 3.5, "events_per_s": 250.0,
         "first_batch_at": 1.7e9},
    ]
    t0 = time.monotonic()
    with standalone_head(num_cpus=2) as head:
        t_up = time.monotonic() - t0
        job = submit(head, ["python", "-m", "tests.jobs.metrics_job", "--run", run, "--stop-file", str(stop),
                            "--reports", json.dumps(reports), "--pull", "0.003", "0.003", "0.03", "--push", "0.0007"],
                     working_dir=REPO)

        def exported():
            s = head.scrape()
            # The last series to be exported: once it is there, the others recorded before it are too.
            return s if find(s, "ray_olrec_train_push_latency_seconds_count", run=run) else None

        samples = wait_for(exported, 60, f"run {run}'s metrics on {head.metrics_url}")
        t_seen = time.monotonic() - t0

        def one(name: str, **labels: str) -> float:
            values = find(samples, name, run=run, **labels)
            assert len(values) == 1, f"{name} {labels}: {values}"
            return values[0]

        assert one("ray_olrec_train_events_total") == 1234
        assert one("ray_olrec_train_watermark") == 98765
        assert one("ray_olrec_train_loss") == 0.25
        assert one("ray_olrec_train_auc") == 0.75
        assert one("ray_olrec_train_stream_lag_events") == 7
        assert one("ray_olrec_train_shard_rows") == 4321
        assert one("ray_olrec_train_shard_bytes") == 65536
        assert one("ray_olrec_train_checkpoint_age_seconds") == 3.5
        assert one("ray_olrec_train_events_per_second") == 250.0
        assert one("ray_olrec_train_pull_latency_seconds_count") == 3
        assert one("ray_olrec_train_pull_latency_seconds_bucket", le="0.002") == 0
        assert one("ray_olrec_train_pull_latency_seconds_bucket", le="0.005") == 2
        assert one("ray_olrec_train_pull_latency_seconds_bucket", le="0.05") == 3
        assert one("ray_olrec_train_push_latency_seconds_bucket", le="0.001") == 1
        assert find(samples, "ray_olrec_train_events_total", run=run, Component="core_worker")

        stop.touch()
        result = wait_job(head, job, timeout=60)
        assert result.status == "SUCCEEDED", f"{result.message}\n{result.logs}"
        assert "stop file seen" in result.logs
        # The actor ran the uploaded copy of the repository, not this checkout.
        used = json.loads(result.logs.split("recorded: ", 1)[1].splitlines()[0])["telemetry"]
        assert not used.startswith(str(REPO)) and str(head.temp_dir) in used, used
        t_done = time.monotonic() - t0
    t_stopped = time.monotonic() - t0
    print(f"head up {t_up:.1f} s, metrics seen {t_seen:.1f} s, job done {t_done:.1f} s, stopped {t_stopped:.1f} s")


@pytest.mark.slow
def test_a_standalone_head_coexists_with_the_session_cluster(ray_cluster) -> None:
    ray = ray_cluster

    @ray.remote(num_cpus=0)
    def where() -> str:
        return ray.get_runtime_context().gcs_address

    session_gcs = ray.get_runtime_context().gcs_address
    with standalone_head(num_cpus=1) as head:
        assert head.address != session_gcs
        assert ray.get(where.remote(), timeout=60) == session_gcs  # the session cluster still serves
        # The other order: a cluster started while the head runs (as the fixture does) is a new one.
        code = ("import ray; ray.init(address='local', num_cpus=1, include_dashboard=False); "
                "print(ray.get_runtime_context().gcs_address); ray.shutdown()")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        other = r.stdout.strip().splitlines()[-1]
        assert other not in (head.address, session_gcs)
        assert head.scrape()  # the head still answers after the other cluster came and went
    # Stopping the head (only its own processes) left the session cluster alive.
    assert ray.get(where.remote(), timeout=60) == session_gcs
