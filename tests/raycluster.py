"""Test helpers for a real, standalone Ray cluster (``ray start --head``) next to the
test session's own in-process cluster (the ``ray_cluster`` fixture).

- :func:`standalone_head` starts ``ray start --head --block`` on free ports with
  its own ``--temp-dir`` and token authentication (as Ray 2.60 turns on when a
  token exists; the helper makes sure one does), yields a :class:`Head`, and on
  exit stops exactly the processes it started (never ``ray stop``, which kills
  every Ray process on the machine, the session cluster included) and fails if
  any is left behind.
- Coexistence: the head writes its address only under its own temp dir, the
  session fixture uses ``ray.init(address="local")`` (always a new cluster,
  ignoring ``RAY_ADDRESS`` and ``/tmp/ray/ray_current_cluster``), and the head's
  environment drops the pytest process's ``RAY_*`` variables.
- :func:`submit` / :func:`wait_job` wrap ``ray job submit --no-wait`` and the
  dashboard's job REST API (``/api/jobs/<id>``, with the bearer token).
- :func:`scrape` parses a node's Prometheus endpoint
  (``http://127.0.0.1:<metrics-export-port>/metrics``, served by the node's
  metrics agent; no token needed).
- :func:`wait_for` polls a condition to a deadline and names what it waited for.
- :class:`Background` runs ``olrec.train.train`` on a thread of the test process (the driver).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

__all__ = [
    "Head",
    "JobResult",
    "Sample",
    "auth_token",
    "find",
    "job_logs",
    "job_status",
    "parse_prometheus",
    "scrape",
    "standalone_head",
    "submit",
    "wait_for",
    "wait_job",
]

T = TypeVar("T")
RAY = str(Path(sys.executable).with_name("ray"))
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
# Passed through to the head: they say where the token is, not how the pytest process's cluster runs.
_KEEP_RAY_ENV = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


# -- waiting ------------------------------------------------------------------------------------------
def wait_for(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
    """Poll ``condition`` until it returns something truthy (returned) or ``timeout`` seconds pass.

    An exception raised by ``condition`` counts as "not yet"; the last value or
    exception is named in the ``TimeoutError``, with ``what`` was awaited.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            value = condition()
        except Exception as e:  # noqa: BLE001 - reported below if it never clears
            value, last = None, e
        else:
            if value:
                return value
            last = value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}; last: {last!r}")
        time.sleep(interval)


# -- Prometheus text ----------------------------------------------------------------------------------
class Sample(NamedTuple):
    name: str
    labels: dict[str, str]
    value: float


_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(?:\s+-?\d+)?\s*$")
_LABEL_RE = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(,|$)')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def _value(text: str) -> float:
    special = {"+Inf": math.inf, "Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}
    return special[text] if text in special else float(text)


def parse_prometheus(text: str) -> list[Sample]:
    """Samples of a Prometheus text exposition (format 0.0.4); comments are skipped."""
    out: list[Sample] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE_RE.match(line)
        if m is None:
            raise ValueError(f"line {n} is not a Prometheus sample: {line!r}")
        labels: dict[str, str] = {}
        body = (m.group(2) or "{}")[1:-1]
        pos = 0
        while pos < len(body):
            lm = _LABEL_RE.match(body, pos)
            if lm is None:
                raise ValueError(f"line {n}: bad labels at {body[pos:]!r}")
            labels[lm.group(1)] = re.sub(r'\\[\\"n]', lambda e: _UNESCAPE[e.group(0)], lm.group(2))
            pos = lm.end()
        out.append(Sample(m.group(1), labels, _value(m.group(3))))
    return out


def scrape(metrics_port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> list[Sample]:
    """Every sample the node's metrics agent serves at ``http://host:port/metrics``."""
    with urllib.request.urlopen(f"http://{host}:{metrics_port}/metrics", timeout=timeout) as r:
        return parse_prometheus(r.read().decode("utf-8"))


def find(samples: list[Sample], name: str, **labels: str) -> list[float]:
    """Values of the samples called ``name`` whose labels include ``labels``."""
    return [s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


# -- the standalone head ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Head:
    address: str            # GCS address, "ip:port" (``ray start --address``, ``ray.init(address=...)``)
    dashboard_url: str      # "http://127.0.0.1:<port>": the job API
    metrics_port: int       # the head node's Prometheus endpoint: http://127.0.0.1:<port>/metrics
    temp_dir: Path
    session_dir: Path
    pid: int                # the ``ray start --block`` process
    env: dict[str, str] = field(repr=False)  # for ``ray job ...`` clients: RAY_AUTH_MODE=token, RAY_ADDRESS

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def scrape(self) -> list[Sample]:
        return scrape(self.metrics_port)


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free now (held together while choosing, so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


_token_cache: list[str] = []


def auth_token() -> str:
    """The token Ray's clients send (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
    ``~/.ray/auth_token``, as Ray resolves them), generated as ``ray.init`` would if none exists."""
    if not _token_cache:
        r = subprocess.run([RAY, "get-auth-token", "--generate"], capture_output=True, text=True, timeout=60)
        if r.returncode != 0 or not r.stdout.strip():
            raise RuntimeError(f"ray get-auth-token --generate failed ({r.returncode}): {r.stderr[-2000:]}")
        _token_cache.append(r.stdout.strip())
    return _token_cache[0]


def _head_env(extra: Mapping[str, str], report_interval_ms: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") or k in _KEEP_RAY_ENV}
    # `python` in a job's entrypoint is this interpreter (the raylet's PATH reaches the job driver).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_metrics_report_interval_ms"] = str(report_interval_ms)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # SIGTERM makes `ray start --block` drain the node first (default up to 30 s while a job runs).
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    env.update(extra)
    return env


def _client_env(dashboard_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") or k in _KEEP_RAY_ENV}
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_ADDRESS"] = dashboard_url
    env["RAY_API_SERVER_ADDRESS"] = dashboard_url
    return env


def _http_json(url: str, token: str, timeout: float = 10.0) -> Any:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode("utf-8"))


def _proc_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, session id, start time in clock ticks), from /proc."""
    table = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read().decode("utf-8", "replace")
        except OSError:
            continue
        rest = stat[stat.rfind(")") + 2:].split()  # fields after "(comm)": state ppid pgrp session ...
        table[int(d)] = (int(rest[1]), int(rest[3]), int(rest[19]))
    return table


def _cmdline_has(pid: int, needle: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return needle.encode() in f.read()
    except OSError:
        return False


def _ours(root: int, root_start: int | None, temp_dir: str) -> set[tuple[int, int]]:
    """(pid, start time) of the processes this head started: descendants of ``root``,
    its session (job drivers start their own, but are descendants while they live),
    and anything naming the head's temp dir. ``root_start`` None: the root is gone
    (its pid may be reused), so only the temp dir identifies them."""
    table = _proc_table()
    found: set[tuple[int, int]] = set()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    if root_start is not None and root in table and table[root][2] == root_start:
        stack = [root]
        while stack:
            p = stack.pop()
            found.add((p, table[p][2]))
            stack.extend(children.get(p, ()))
    for pid, (_, sid, start) in table.items():
        if pid != os.getpid() and ((root_start is not None and sid == root) or _cmdline_has(pid, temp_dir)):
            found.add((pid, start))
    return found


def _alive(procs: set[tuple[int, int]]) -> set[tuple[int, int]]:
    table = _proc_table()
    return {(p, s) for p, s in procs if p in table and table[p][2] == s and not _zombie(p)}


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("utf-8", "replace")
        return stat[stat.rfind(")") + 2] in "ZX"
    except OSError:
        return True


def _signal(procs: set[tuple[int, int]], sig: int) -> None:
    for pid, _ in _alive(procs):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _stop(proc: subprocess.Popen, temp_dir: str, grace: float = 30.0) -> list[str]:
    """Stop the head started as ``proc`` and every process it started; return what had to be killed."""
    root_start = _proc_table().get(proc.pid, (0, 0, None))[2] if proc.poll() is None else None
    procs = _ours(proc.pid, root_start, temp_dir)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its node's processes on SIGTERM
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    procs |= _ours(proc.pid, None, temp_dir)  # orphans that still name the temp dir
    deadline = time.monotonic() + 15
    while _alive(procs) and time.monotonic() < deadline:
        time.sleep(0.2)  # graceful exits of workers and agents after the raylet is gone
    killed = []
    left = _alive(procs)
    if left:
        for pid, _ in left:
            killed.append(_describe(pid))
        _signal(left, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(left) and time.monotonic() < deadline:
            time.sleep(0.1)
    still = _alive(procs)
    if still:
        raise RuntimeError(f"processes of the standalone head survive SIGKILL: {[_describe(p) for p, _ in still]}")
    return killed


def _describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        cmd = "?"
    return f"{pid} {cmd[:160]}"


@contextlib.contextmanager
def standalone_head(num_cpus: int = 2, *, env: Mapping[str, str] | None = None,
                    metrics_report_interval_ms: int = 1000, start_timeout: float = 120.0,
                    keep_temp_dir: bool = False) -> Iterator[Head]:
    """Start ``ray start --head --block`` on free ports in a fresh temp dir; stop it on exit.

    ``metrics_report_interval_ms`` is passed as ``RAY_metrics_report_interval_ms``
    (workers export custom metrics that often; Ray's default is 10000), and
    ``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0`` (no 30 s drain on stop). ``env``
    adds variables to the head's environment (its raylet, workers and job
    drivers). On exit every process the head started is stopped; an error is
    raised if any had to be SIGKILLed after the graceful stop, naming them. The
    temp dir (logs) is removed unless ``keep_temp_dir`` or the body raised.
    """
    token = auth_token()
    # Short path: Ray's Unix sockets live under it (108-byte limit).
    temp_dir = Path(tempfile.mkdtemp(prefix="olray-", dir="/tmp"))
    gcs, dash, metrics, agent_http, agent_grpc, renv, client, nm, om = _free_ports(9)
    cmd = [
        RAY, "start", "--head", "--block", f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}",
        f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--metrics-export-port={metrics}", f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={renv}",
        f"--ray-client-server-port={client}", f"--node-manager-port={nm}", f"--object-manager-port={om}",
        "--disable-usage-stats",
    ]
    log_path = temp_dir / "ray-start.log"
    with open(log_path, "wb") as log:
        # Its own session: no signal to the pytest process group reaches it, and its processes are findable.
        proc = subprocess.Popen(cmd, env=_head_env(env or {}, metrics_report_interval_ms), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    dashboard_url = f"http://127.0.0.1:{dash}"
    failed = True
    try:
        def up() -> dict | None:
            if proc.poll() is not None:
                raise _Fatal(f"`ray start --head` exited with {proc.returncode}:\n{_tail(log_path)}")
            if not (temp_dir / "ray_current_cluster").exists():
                return None
            return _http_json(f"{dashboard_url}/api/version", token, timeout=2)

        version = _wait_or_fatal(up, start_timeout, f"the standalone head's dashboard at {dashboard_url}")
        session_dir = temp_dir / version["session_name"]
        if not session_dir.is_dir():
            raise RuntimeError(f"the dashboard at {dashboard_url} answers for session {version['session_name']}, "
                               f"which is not under {temp_dir}: another cluster holds the port")
        address = (temp_dir / "ray_current_cluster").read_text().strip()
        _wait_or_fatal(lambda: proc.poll() is None and scrape(metrics, timeout=2) is not None, start_timeout,
                       f"the head's metrics endpoint on port {metrics}")
        head = Head(address=address, dashboard_url=dashboard_url, metrics_port=metrics, temp_dir=temp_dir,
                    session_dir=session_dir, pid=proc.pid, env=_client_env(dashboard_url))
        yield head
        failed = False
    finally:
        killed = _stop(proc, str(temp_dir))
        if failed or keep_temp_dir:
            print(f"standalone head's logs kept in {temp_dir}", file=sys.stderr)
            if killed:
                print(f"standalone head: killed after its graceful stop: {killed}", file=sys.stderr)
        else:
            shutil.rmtree(temp_dir, ignore_errors=True)
    if killed:
        raise RuntimeError(f"processes of the standalone head outlived its graceful stop and were killed: {killed}")


class _Fatal(Exception):
    pass


def _wait_or_fatal(condition: Callable[[], T], timeout: float, what: str) -> T:
    holder: list[_Fatal] = []

    def cond() -> T | None:
        try:
            return condition()
        except _Fatal as e:
            holder.append(e)
            return True  # type: ignore[return-value]

    value = wait_for(cond, timeout, what, interval=0.25)
    if holder:
        raise RuntimeError(str(holder[0]))
    return value


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text("utf-8", "replace")[-n:]
    except OSError:
        return "(no log)"


# -- jobs ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobResult:
    job_id: str
    status: str
    message: str
    logs: str


def submit(head: Head, entrypoint: list[str] | str, working_dir: str | Path | None = None,
           env: Mapping[str, str] | None = None, timeout: float = 120.0) -> str:
    """``ray job submit --no-wait`` (token auth, ``--working-dir``); return the submission id.

    ``env`` becomes the job's ``runtime_env.env_vars``.
    """
    job_id = f"olrec_test_{uuid.uuid4().hex[:12]}"
    cmd = [RAY, "job", "submit", "--address", head.dashboard_url, "--no-wait", "--submission-id", job_id]
    if working_dir is not None:
        cmd += ["--working-dir", str(working_dir)]
    if env:
        cmd += ["--runtime-env-json", json.dumps({"env_vars": dict(env)})]
    cmd += ["--"] + ([entrypoint] if isinstance(entrypoint, str) else list(entrypoint))
    r = subprocess.run(cmd, env=head.env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"ray job submit failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return job_id


def job_status(head: Head, job_id: str) -> dict[str, Any]:
    """The job's record from the dashboard (``status``, ``message``, ``driver_exit_code``, ...)."""
    return _http_json(f"{head.dashboard_url}/api/jobs/{job_id}", auth_token())


def job_logs(head: Head, job_id: str) -> str:
    return _http_json(f"{head.dashboard_url}/api/jobs/{job_id}/logs", auth_token())["logs"]


def wait_job(head: Head, job_id: str, timeout: float = 120.0) -> JobResult:
    """Wait until the job is SUCCEEDED, FAILED or STOPPED; return its status and logs."""
    seen: list[dict[str, Any]] = []

    def done() -> dict[str, Any] | None:
        seen[:] = [job_status(head, job_id)]
        return seen[0] if seen[0]["status"] in TERMINAL else None

    try:
        info = wait_for(done, timeout, f"job {job_id} to finish")
    except TimeoutError as e:
        status = seen[0]["status"] if seen else "unknown"
        raise TimeoutError(f"{e}; status {status}; logs:\n{job_logs(head, job_id)[-3000:]}") from None
    return JobResult(job_id, info["status"], info.get("message") or "", job_logs(head, job_id))


class Background:
    """``train`` on a thread (the test process is the driver), its result or error kept.
    Leaving the ``with`` block on an error stops the run (its stop file), so a
    failed test leaves no trainer holding the session cluster's CPUs."""

    def __init__(self, *args, **kwargs) -> None:
        self.result: dict | None = None
        self.error: BaseException | None = None
        self._run_dir = Path(args[3])
        self._t = threading.Thread(target=self._run, args=args, kwargs=kwargs, daemon=True)
        self._t.start()

    def __enter__(self) -> "Background":
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is not None:
            (self._run_dir / "STOP").touch()
            self._t.join(120)

    def _run(self, *args, **kwargs) -> None:
        from olrec.train import train

        try:
            self.result = train(*args, **kwargs)
        except BaseException as e:  # reported by join()
            self.error = e

    def join(self, timeout: float = 240) -> dict:
        self._t.join(timeout)
        assert not self._t.is_alive(), "training did not finish"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result
