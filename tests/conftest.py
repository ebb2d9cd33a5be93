"""Shared fixtures: one local Ray cluster per test session, started only if a test asks for it."""

from __future__ import annotations

import os

import pytest

#: Serve's gRPC proxy refuses bigger requests with RESOURCE_EXHAUSTED (read when the proxy starts).
MAX_MESSAGE = 4 * 1024 * 1024


@pytest.fixture(scope="session")
def ray_cluster():
    ray = pytest.importorskip("ray")
    # address="local": always a new in-process-started cluster. A plain ray.init() would attach to
    # whatever RAY_ADDRESS or /tmp/ray/ray_current_cluster names (a `ray start` cluster on this machine).
    os.environ["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] = str(MAX_MESSAGE)  # inherited by the cluster's processes
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

    from olrec.demo import SERVE_ENV

    with standalone_head(num_cpus=4, env=SERVE_ENV) as head:
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
