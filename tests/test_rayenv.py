"""olrec's Ray settings reach the processes of a cluster olrec starts (olrec/rayenv.py)."""

from __future__ import annotations

import os

import pytest

from olrec.rayenv import ENV, apply_env


def test_apply_env_leaves_a_value_already_set(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    name = next(iter(ENV))
    monkeypatch.setenv(name, "12345")
    apply_env()
    assert os.environ[name] == "12345"  # the caller's choice
    assert {k: os.environ[k] for k in ENV if k != name} == {k: v for k, v in ENV.items() if k != name}


def test_the_clusters_workers_run_with_olrecs_settings(ray_cluster) -> None:
    """The session's cluster is started the way `olrec train` starts one: its workers
    (Train workers, shard actors, Ray Data's tasks) inherit the settings from the raylet."""

    @ray_cluster.remote(num_cpus=0)
    def environment() -> dict[str, str | None]:
        return {k: os.environ.get(k) for k in ENV}

    assert ray_cluster.get(environment.remote()) == ENV
