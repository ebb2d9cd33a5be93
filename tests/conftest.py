"""Shared fixtures: one local Ray cluster per test session, started only if a test asks for it."""

from __future__ import annotations


import pytest

from olrec.rayenv import ENV, apply_env

#: Serve's gRPC proxy refuses bigger requests with RESOURCE_EXHAUSTED (read when the proxy starts).
MAX_MESSAGE = int(ENV["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"])


@pytest.fixture(scope="session")
def ray_cluster():
    ray = pytest.importorskip("ray")
    # address="local": always a new in-process-started cluster. A plain ray.init() would attach to
    # whatever RAY_ADDRESS or /tmp/ray/ray_current_cluster names (a `ray start` cluster on this machine).
    apply_env()  # olrec's Ray settings (olrec/rayenv.py), inherited by the cluster's processes
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_head():
    """A standalone `ray start --head` cluster (tests/raycluster.py), shared by the session's tests.

    Its own ports and temp dir; stopped at the end without touching the `ray_cluster` cluster.
    """
    pytest.importorskip("ray")
    from raycluster import standalone_head

    with standalone_head(num_cpus=4, env=ENV) as head:
        yield head


@pytest.fixture(scope="session")
def serve_grpc(ray_cluster):
    """Ray Serve on the session cluster with olrec's gRPC services on a free port
    (one Serve instance per cluster); yields the port. Apps deploy under their own names."""
    from ray import serve
    from ray.serve.config import gRPCOptions

    from serve.app import SERVICER_FUNCTIONS
    from servingrun import free_port

    port = free_port()
    serve.start(grpc_options=gRPCOptions(port=port, grpc_servicer_functions=SERVICER_FUNCTIONS))
    yield port
    serve.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 server on loopback (moto's, from .venv-s3: `make test` builds it); its host:port."""
    import subprocess
    import time
    import urllib.request
    from pathlib import Path

    from servingrun import free_port

    server = Path(__file__).resolve().parents[1] / ".venv-s3" / "bin" / "moto_server"
    if not server.exists():
        pytest.fail(f"{server} is missing: `make test` (or `make .venv-s3/.installed`) installs it")
    port = free_port()
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto's S3 server did not start on port {port}")
            time.sleep(0.2)
    yield f"127.0.0.1:{port}"
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def s3_uri(s3_server, request):
    """``s3_uri(name)``: a URI under a fresh bucket of the S3 server, credentials and endpoint in it
    (pyarrow reads both from the URI), so any process, a Ray worker too, opens it as it is."""
    import re
    import uuid

    from pyarrow import fs

    s3 = fs.S3FileSystem(access_key="testing", secret_key="testing", endpoint_override=s3_server,
                         scheme="http", region="us-east-1", allow_bucket_creation=True)
    bucket = (re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8])
    s3.create_dir(bucket)
    return lambda name: f"s3://testing:testing@{bucket}/{name}?endpoint_override={s3_server}&scheme=http&region=us-east-1"
