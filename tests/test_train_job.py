"""`olrec train` as a Ray job: submitted with `ray job submit` to a cluster
started with `ray start --head` (token auth on), followed to SUCCEEDED; its
metrics scraped from the node's Prometheus endpoint while it runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from raycluster import find, submit, wait_for, wait_job
from test_train import fill, published_watermark, synthetic

from olrec.checkpoint import CheckpointStore
from olrec.log import EventLog

REPO = Path(__file__).resolve().parents[1]


def _reported(run: Path) -> dict | None:
    try:
        return json.loads((run / "metrics.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _scraped(head) -> tuple[float, float] | None:
    """(events-trained counter summed over the job's processes, watermark gauge) as Prometheus sees them."""
    samples = head.scrape()  # this run's series only: the session's head runs other tests' too
    events = find(samples, "ray_olrec_train_events_total", run="run")
    watermark = find(samples, "ray_olrec_train_watermark", run="run")
    return (sum(events), max(watermark)) if events and watermark else None


@pytest.mark.slow
def test_ray_job_submit_trains_checkpoints_and_reports_metrics(ray_head, tmp_path: Path) -> None:
    run = tmp_path / "run"
    events = synthetic(12_288)
    fill(run, events.slice(0, 8_192))
    config = tmp_path / "job.yaml"
    config.write_text("data: {format: synthetic}\n"
                      "learner: {batch_size: 1024}\n"
                      "train: {continuous: true, report_every_s: 0.3, checkpoint_every_s: 3600}\n")
    job = submit(ray_head, [sys.executable, "-m", "olrec", "train", "--config", str(config), "--run-dir", str(run)],
                 working_dir=REPO)

    for watermark in (8_192, 12_288):
        reported = wait_for(lambda: (m := _reported(run)) is not None and m["watermark"] == watermark and m,
                            240, f"the job to report watermark {watermark}")
        # The log is drained, so the job's figures hold still: Prometheus must show the same values.
        assert reported["events_trained"] == watermark
        wait_for(lambda: _scraped(ray_head) == (watermark, watermark), 60,
                 f"the scraped events counter and watermark gauge to reach {watermark}")
        if watermark == 8_192:
            with EventLog(run / "log").open_writer() as w:
                w.append(events.slice(8_192))

    (run / "STOP").touch()  # a continuous run ends with a final checkpoint
    result = wait_job(ray_head, job, timeout=240)
    assert result.status == "SUCCEEDED", result.logs[-3000:]
    final = json.loads((run / "train.json").read_text())
    assert final["watermark"] == 12_288 and final["events_trained"] == 12_288 and final["final"]
    latest = CheckpointStore(run / "checkpoints").latest()
    assert latest is not None and latest.watermark == 12_288
    assert published_watermark(run) == 12_288


@pytest.mark.slow
def test_ctrl_c_ends_a_continuous_run_with_a_final_checkpoint(tmp_path: Path) -> None:
    """`olrec train --continuous` on a local cluster of its own: SIGINT stops the
    stream, the workers write a final checkpoint, the command exits 0."""
    import os
    import signal
    import subprocess

    run = tmp_path / "run"
    fill(run, synthetic(6_000))
    config = tmp_path / "c.yaml"
    config.write_text("data: {format: synthetic}\nlearner: {batch_size: 1000}\ntrain: {report_every_s: 0.3}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    proc = subprocess.Popen([sys.executable, "-m", "olrec", "train", "--continuous", "--config", str(config),
                             "--run-dir", str(run)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (m := _reported(run)) is not None and m["watermark"] == 6_000, 240,
                 "the run to train the log")
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert json.loads((run / "train.json").read_text())["watermark"] == 6_000
    latest = CheckpointStore(run / "checkpoints").latest()
    assert latest is not None and latest.watermark == 6_000
