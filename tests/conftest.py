"""Shared fixtures: one local Ray cluster per test session, started only if a test asks for it."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    ray = pytest.importorskip("ray")
    # address="local": always a new in-process-started cluster. A plain ray.init() would attach to
    # whatever RAY_ADDRESS or /tmp/ray/ray_current_cluster names (a `ray start` cluster on this machine).
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

    with standalone_head(num_cpus=4) as head:
        yield head
