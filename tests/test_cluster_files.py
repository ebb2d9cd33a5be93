"""The files under cluster/: `ray up` configs pass Ray's own cluster schema, runtime
environments pass Ray's RuntimeEnv and set only variables something reads, job configs
load with olrec's schema, and cluster/README.md's commands name real files and flags.

Nothing here starts Ray or calls a cloud: the cluster files go through what `ray up`
runs before it bootstraps a provider (``prepare_config`` then ``validate_config``).
"""

from __future__ import annotations

import copy
import re
import shlex
import zipfile
from functools import cache
from pathlib import Path
from typing import Any, Callable

import jsonschema
import pytest
import yaml

from olrec.config import ConfigError, load_config
from olrec.rayenv import CORE_ENV, ENV

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
RAY_UP = sorted((CLUSTER / "ray-up").glob("*.yaml"))
RUNTIME_ENVS = sorted((CLUSTER / "runtime-env").glob("*.yaml"))
JOBS = sorted((CLUSTER / "jobs").glob("*.yaml"))
README = CLUSTER / "README.md"


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _name(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def test_the_cluster_files_are_there() -> None:
    # The parametrized tests below pass vacuously on an empty glob: name what must exist.
    assert {p.name for p in RAY_UP} >= {"local.yaml", "aws.yaml"}
    assert {p.name for p in RUNTIME_ENVS} >= {"train.yaml", "serve.yaml"}
    assert {p.name for p in JOBS} >= {"ml100k.yaml", "continuous.yaml"}


# -- `ray up` cluster configs ----------------------------------------------------------------------

def _validated(raw: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` checks (ray.autoscaler._private.commands._bootstrap_config): the config
    merged with its provider's defaults, then Ray's ray-schema.json and cross-field rules.
    The provider's bootstrap_config, the step that calls a cloud, is not run."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


@pytest.mark.parametrize("path", RAY_UP, ids=_name)
def test_ray_up_config_passes_rays_cluster_schema(path: Path) -> None:
    config = _validated(_yaml(path))
    assert config["cluster_name"] == "olrec"
    assert config["head_node_type"] in config["available_node_types"]


@pytest.mark.parametrize("path", RAY_UP, ids=_name)
@pytest.mark.parametrize("mutate, bad", [
    (lambda c: c.update(head_strat_ray_commands=["ray start --head"]), "head_strat_ray_commands"),
    (lambda c: c["auth"].update(ssh_usr="ubuntu"), "ssh_usr"),
    (lambda c: c["provider"].pop("type"), "type"),
], ids=["unknown-key", "unknown-auth-key", "no-provider-type"])
def test_ray_up_schema_rejects_a_bad_config(path: Path, mutate: Callable[[dict], Any], bad: str) -> None:
    raw = _yaml(path)
    mutate(raw)
    # The provider type is looked up before the schema runs: without one it is a KeyError.
    with pytest.raises((jsonschema.ValidationError, KeyError)) as e:
        _validated(raw)
    assert bad in str(e.value)


def _start_local_default(name: str) -> str:
    m = re.search(rf"^{name}=(\S+)$", (CLUSTER / "start-local.sh").read_text(), re.M)
    assert m, f"start-local.sh sets no {name}"
    return m[1]


@pytest.mark.parametrize("path", RAY_UP, ids=_name)
def test_nodes_start_as_start_local_does(path: Path) -> None:
    """Token auth, the venv's `python` for jobs, and olrec's metrics where cluster/grafana
    expects them: what cluster/start-local.sh does on one machine, on every node."""
    c = _yaml(path)
    metrics = _start_local_default("metrics_port")
    for key, role in (("head_start_ray_commands", "--head"), ("worker_start_ray_commands", "--address=$RAY_HEAD_IP:")):
        start = [cmd for cmd in c[key] if "ray start" in cmd]
        assert len(start) == 1, f"{key}: one `ray start`, got {start}"
        cmd = start[0]
        assert role in cmd and f"--metrics-export-port={metrics}" in cmd, cmd
        assert "RAY_AUTH_MODE=token" in cmd and 'PATH="$HOME/olrec/.venv/bin:$PATH"' in cmd, cmd
        for name in (*CORE_ENV, "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"):  # olrec/rayenv.py
            assert f"{name}={ENV[name]}" in cmd.split(";")[0], f"{key} does not export {name}={ENV[name]}"
        for name in re.findall(r"\b([A-Z][A-Z0-9_]*)=", cmd.split("ray start")[0]):
            assert name == "PATH" or _is_read(name), f"{path.name} sets {name}, which neither olrec nor Ray reads"
    assert c["file_mounts"]["~/olrec"] == "." and ".gitignore" in c["rsync_filter"]
    assert any("make -C ~/olrec install" in cmd for cmd in c["setup_commands"])


def test_start_local_exports_olrecs_ray_settings() -> None:
    """cluster/start-local.sh gives its nodes the settings a cluster olrec starts itself has."""
    script = (CLUSTER / "start-local.sh").read_text()
    for name, value in ENV.items():
        assert f'export {name}="${{{name}:-{value}}}"' in script, f"start-local.sh does not export {name}={value}"


# -- runtime environments ----------------------------------------------------------------------------

@cache
def _ray_sources() -> str:
    import ray

    return "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in Path(ray.__file__).parent.rglob("*.py"))


def _olrec_reads(name: str) -> bool:
    pattern = re.compile(rf"""(environ\.get\(|environ\[|getenv\()\s*["']{re.escape(name)}["']""")
    return any(pattern.search(p.read_text(encoding="utf-8"))
               for d in ("olrec", "serve") for p in (REPO / d).rglob("*.py"))


def _is_read(name: str) -> bool:
    """olrec reads ``name`` from its environment, or Ray's source names it (Ray's variables)."""
    if name.startswith("OLREC_"):
        return _olrec_reads(name)
    return name.startswith("RAY_") and f'"{name}"' in _ray_sources()


@pytest.mark.parametrize("path", RUNTIME_ENVS, ids=_name)
def test_runtime_env_is_one_ray_accepts(path: Path) -> None:
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.runtime_env import RuntimeEnv

    raw = parse_runtime_env_args(runtime_env=str(path))  # what `ray job submit --runtime-env` reads
    # RuntimeEnv lets unknown keys through (as plugins): a misspelt key would be dropped silently.
    public = {k for k in RuntimeEnv.known_fields if not k.startswith("_")}
    assert set(raw) <= public, sorted(set(raw) - public)
    RuntimeEnv(**raw)  # types: env_vars str -> str, excludes a list of str, ...
    assert raw["working_dir"] == "."
    for name, value in raw["env_vars"].items():
        assert _is_read(name), f"{path.name} sets {name}, which neither olrec nor Ray reads"
        if name == "OLREC_DATA":  # a job runs from a copy of the working dir
            assert Path(value).is_absolute(), value
        if name in ("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", "RAY_JOB_STOP_WAIT_TIME_S"):
            assert int(value) > 0, value  # Ray parses them as integers


def test_runtime_env_rejects_a_non_string_variable() -> None:
    from ray.runtime_env import RuntimeEnv

    raw = _yaml(CLUSTER / "runtime-env" / "serve.yaml")
    raw["env_vars"]["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] = 4194304  # unquoted in YAML
    with pytest.raises(TypeError, match="env_vars"):
        RuntimeEnv(**raw)


def test_an_unknown_variable_is_not_read() -> None:
    assert _is_read("OLREC_DATA") and _is_read("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE")
    assert not _is_read("OLREC_NO_SUCH_VARIABLE") and not _is_read("RAY_NO_SUCH_VARIABLE_OLREC")


@pytest.mark.parametrize("path", RUNTIME_ENVS, ids=_name)
def test_excludes_leave_out_local_state_and_keep_the_code(path: Path, tmp_path: Path) -> None:
    """Package a small tree the way Ray uploads a working_dir, with .gitignore off, so the
    excludes alone decide: the virtualenv, runs and reports stay behind, the code goes."""
    from ray._private.runtime_env.packaging import _zip_files

    keep = ["olrec/cli.py", "olrec/v1/recommender_pb2.py", "serve/app.py", "serve/config.yaml",
            "cluster/jobs/ml100k.yaml", "pyproject.toml"]
    drop = [".venv/bin/python", ".venv-peers/bin/python", ".venv-s3/bin/python", "runs/ml100k/log/seg.parquet",
            "reports/demo/report.json", ".git/HEAD", "olrec/__pycache__/cli.cpython-311.pyc"]
    for rel in keep + drop:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    out = tmp_path.parent / f"{tmp_path.name}.zip"
    _zip_files(str(tmp_path), _yaml(path)["excludes"], str(out), include_gitignore=False)
    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
    assert set(keep) <= names, sorted(set(keep) - names)
    assert not names & set(drop), sorted(names & set(drop))


# -- job configs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", JOBS, ids=_name)
def test_job_config_loads_and_an_unknown_key_fails(path: Path, tmp_path: Path) -> None:
    load_config(path)
    raw = _yaml(path)
    raw.setdefault("train", {})["checkpoint_every_secs"] = 30
    bad = tmp_path / path.name
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"train\.checkpoint_every_secs"):
        load_config(bad)


def test_the_continuous_job_follows_the_log_with_the_ml100k_model() -> None:
    cont, bounded = load_config(CLUSTER / "jobs" / "continuous.yaml"), load_config(CLUSTER / "jobs" / "ml100k.yaml")
    assert cont.train.continuous and not bounded.train.continuous
    assert (cont.learner, cont.features) == (bounded.learner, bounded.features)


# -- cluster/README.md ---------------------------------------------------------------------------------

def _readme_commands() -> list[str]:
    """The README's shell commands, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    return [line.strip() for b in blocks for line in b.replace("\\\n", " ").splitlines() if line.strip()]


def test_readme_names_files_that_exist() -> None:
    text = README.read_text(encoding="utf-8")
    named = set(re.findall(r"\b((?:cluster|serve)/[\w./-]+\.(?:yaml|sh|json))\b", text))
    assert named, "the README names no cluster files"
    assert {p for p in named if not (REPO / p).is_file()} == set()


def test_readme_olrec_commands_parse_and_jobs_use_token_auth() -> None:
    from olrec.cli import _parser
    from olrec.storage import is_uri

    cmds = _readme_commands()
    olrec = [re.split(r"(?:python -m |bin/)olrec ", c, maxsplit=1)[1] for c in cmds
             if re.search(r"(python -m |bin/)olrec ", c)]
    assert {shlex.split(c)[0] for c in olrec} >= {"train", "serve"}
    for c in olrec:
        args = _parser().parse_args(shlex.split(c.split(" #")[0]))  # SystemExit on an unknown flag
        run_dir = getattr(args, "run_dir", None)
        assert args.command != "train" or run_dir is None or is_uri(run_dir) or Path(run_dir).is_absolute(), c
    ray_clients = [c for c in cmds if re.search(r"\b(ray job \w+|serve (run|deploy))\b", c)]
    assert len(ray_clients) >= 4
    assert [c for c in ray_clients if "RAY_AUTH_MODE=token" not in c] == []
