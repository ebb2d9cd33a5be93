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
