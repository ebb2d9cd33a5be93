"""``olrec serve`` end to end: its own local Ray cluster and Triton, answering
gRPC, and nothing left running after Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from olrec.v1 import recommender_pb2 as pb
from olrec.v1 import recommender_pb2_grpc as pbg
from raycluster import wait_for
from servingrun import ML100K, free_port, make_run

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not ML100K.is_dir(), reason="MovieLens-100K not beside the repo")]


def test_olrec_serve_answers_and_stops_cleanly_on_ctrl_c(tmp_path: Path):
    make_run(tmp_path / "run", n_events=5_000)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # its own cluster, not the session's
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "olrec", "serve", "--run-dir", str(tmp_path / "run"),
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pbg.RecommenderStub(channel)

        def recommend():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            return stub.Recommend(pb.RecommendRequest(user_id=259, k=5), timeout=5)

        r = wait_for(recommend, 180, "olrec serve to recommend through Triton")
        assert len(r.items) == 5 and r.watermark == 5_000 and r.scorer == pb.SCORER_TRITON_INT8
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        wait_for(lambda: b"on gRPC port" in (tmp_path / "serve.log").read_bytes(), 60, "the serving line")
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(120)
    out = (tmp_path / "serve.log").read_text()
    assert code == 0, out[-3000:]
    assert f"serving {tmp_path / 'run'} on gRPC port {port}" in out
    left = subprocess.run(["pgrep", "-f", str(tmp_path / "run" / "triton")], capture_output=True, text=True).stdout
    assert not left.strip(), f"Triton left running: {left}"
