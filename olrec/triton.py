"""Triton Inference Server for the ranking tower: a local server process, and
the async client a Ray Serve replica ranks with.

Locally the server is the one bundled with pytriton, which has only the Python
backend: it serves the ``local`` model repository that
:func:`olrec.export.write_model_repos` writes (a Python model running the ONNX
file with onnxruntime). On Kubernetes a stock Triton serves the ``k8s`` one;
:class:`TritonRanker` speaks to either.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
import weakref
from pathlib import Path
from typing import Sequence

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException


class TritonUnavailable(RuntimeError):
    """Triton did not answer: not running, not reachable, the model not loaded, or past the timeout."""


def _channel_args(max_backoff_ms: int) -> list[tuple[str, int]]:
    # Triton is a sidecar that restarts in seconds: reconnect within
    # max_backoff_ms, not after gRPC's default backoff (growing to 2 minutes).
    return [("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
            ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
            ("grpc.initial_reconnect_backoff_ms", min(100, max_backoff_ms)),
            ("grpc.max_reconnect_backoff_ms", max_backoff_ms)]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:  # all bound at once: n distinct ports
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL what is left of the server's process group (Python-backend stubs included)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


#: The niceness Ray gives its worker processes on Linux (Ray's default ``worker_niceness``).
RAY_WORKER_NICENESS = 15


class TritonServer:
    """The tritonserver binary bundled with pytriton, as a subprocess serving
    ``model_repository`` (explicit model control: ``models`` load at start).

    ``with TritonServer(repos.local) as server: TritonRanker(server.url)...``
    """

    def __init__(self, model_repository: str | Path, models: Sequence[str] = ("olrec_ranker",), *,
                 grpc_port: int | None = None, http_port: int | None = None, metrics_port: int | None = None,
                 log_path: str | Path | None = None, start_timeout_s: float = 60.0,
                 stop_timeout_s: float = 10.0, niceness: int = 0) -> None:
        import pytriton  # only the local server needs it; replicas on k8s use TritonRanker alone

        self.repository = Path(model_repository)
        if not self.repository.is_dir():
            raise FileNotFoundError(f"model repository {self.repository} is not a directory")
        self.models = list(models)
        free = iter(_free_ports(3))
        self.grpc_port, self.http_port, self.metrics_port = (p or next(free) for p in (grpc_port, http_port, metrics_port))
        self.start_timeout_s, self.stop_timeout_s = start_timeout_s, stop_timeout_s
        #: Next to a local Ray cluster pass RAY_WORKER_NICENESS: Ray runs its workers at that
        #: niceness, and a Triton at 0 loading a model would starve the replicas calling it.
        self.niceness = niceness
        self._dist = Path(pytriton.__file__).parent / "tritonserver"
        self._work = Path(tempfile.mkdtemp(prefix="olrec-triton-"))
        self.log_path = Path(log_path) if log_path is not None else self._work / "tritonserver.log"
        self._proc: subprocess.Popen | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def url(self) -> str:
        """The gRPC endpoint, ``host:port``."""
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _backends(self) -> Path:
        """pytriton ships the Python backend's stub per Python version, apart from
        the backend: assemble the backend directory Triton expects (links)."""
        py = self._work / "backends" / "python"
        py.mkdir(parents=True, exist_ok=True)
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        links = {f.name: f for f in (self._dist / "backends" / "python").glob("*") if f.is_file()}
        links["triton_python_backend_stub"] = self._dist / "python_backend_stubs" / version / "triton_python_backend_stub"
        for name, target in links.items():
            if not (py / name).is_symlink():
                (py / name).symlink_to(target)
        return py.parent

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # The stub links libpython3.x by name: this interpreter's must come first,
        # else a system libpython runs with this interpreter's standard library
        # (models fail at load). The bundled libraries: links break $ORIGIN.
        libs = [sysconfig.get_config_var("LIBDIR"), str(self._dist.parent.parent / "nvidia_pytriton.libs")]
        # The stub's embedded interpreter ignores PYTHONPATH and finds its
        # prefix from the `python3` on PATH: this environment's, so that its
        # packages (numpy, onnxruntime) are the models'.
        bins = [str(Path(sys.exec_prefix) / "bin")]
        for key, first in (("LD_LIBRARY_PATH", libs), ("PATH", bins)):
            env[key] = os.pathsep.join([*first, *filter(None, [env.get(key)])])
        return env

    def _command(self) -> list[str]:
        nice = ["nice", "-n", str(self.niceness)] if self.niceness else []
        return [*nice, str(self._dist / "bin" / "tritonserver"),
                f"--model-repository={self.repository}", f"--backend-directory={self._backends()}",
                "--model-control-mode=explicit", *(f"--load-model={m}" for m in self.models),
                f"--grpc-port={self.grpc_port}", f"--http-port={self.http_port}", f"--metrics-port={self.metrics_port}",
                "--grpc-address=127.0.0.1", "--http-address=127.0.0.1", "--metrics-address=127.0.0.1",
                # Each server its own shared-memory regions: others may run on this machine.
                f"--backend-config=python,shm-region-prefix-name=olrec-{uuid.uuid4().hex[:12]}-",
                f"--exit-timeout-secs={max(1, int(self.stop_timeout_s))}"]

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def start(self) -> "TritonServer":
        """Start the server; return once it and every model are ready."""
        if self.running:
            return self
        with open(self.log_path, "ab") as log:
            # Its own session: stop() can reach the stubs it forks.
            self._proc = subprocess.Popen(self._command(), env=self._env(), stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        self._finalizer = weakref.finalize(self, _kill_group, self._proc)
        deadline = time.monotonic() + self.start_timeout_s
        with grpcclient.InferenceServerClient(self.url, channel_args=_channel_args(100)) as client:
            while not self._ready(client):
                if self._proc.poll() is not None:
                    code = self._proc.returncode
                    self.stop()
                    raise RuntimeError(f"tritonserver exited with code {code} while starting; "
                                       f"log {self.log_path}:\n{self.log_tail()}")
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"tritonserver and models {self.models} not ready after "
                                       f"{self.start_timeout_s:g}s; log {self.log_path}:\n{self.log_tail()}")
                time.sleep(0.05)
        return self

    def _ready(self, client: grpcclient.InferenceServerClient) -> bool:
        try:
            return client.is_server_ready(client_timeout=1.0) and all(
                client.is_model_ready(m, client_timeout=1.0) for m in self.models)
        except InferenceServerException:
            return False

    def stop(self) -> None:
        """SIGTERM (in-flight requests finish, models unload), then SIGKILL to
        the whole process group after ``stop_timeout_s``."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                pass
        _kill_group(proc)
        proc.wait()
        if self._finalizer is not None:
            self._finalizer.detach()

    def restart(self) -> "TritonServer":
        """Stop and start again on the same ports."""
        self.stop()
        return self.start()

    def load(self, name: str = "olrec_ranker") -> None:
        """(Re)load ``name`` from the repository, e.g. after a new version was
        written; returns once it serves. Triton swaps versions when the new one
        is ready, and requests already running on the old one complete."""
        with grpcclient.InferenceServerClient(self.url, channel_args=_channel_args(100)) as client:
            client.load_model(name)
        if name not in self.models:
            self.models.append(name)

    def close(self) -> None:
        """Stop for good: also remove the working directory (backend links, the default log)."""
        self.stop()
        shutil.rmtree(self._work, ignore_errors=True)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class TritonRanker:
    """Async client of the ranking model: a Serve replica's handle on Triton.

    One gRPC channel, made on first use in the running event loop and reused;
    use the ranker in that loop only."""

    def __init__(self, url: str, model: str = "olrec_ranker", timeout_s: float = 1.0) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.url, self.model, self.timeout_s = url, model, timeout_s
        self._client: aioclient.InferenceServerClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _conn(self) -> aioclient.InferenceServerClient:
        loop = asyncio.get_running_loop()
        if self._client is None:
            self._client, self._loop = aioclient.InferenceServerClient(self.url, channel_args=_channel_args(1000)), loop
        elif loop is not self._loop:
            raise RuntimeError("a TritonRanker serves the event loop it was first used in; make one per loop")
        return self._client

    def _unavailable(self, e: InferenceServerException) -> Exception:
        """Any Triton error as :class:`TritonUnavailable`: down, past the timeout,
        or the model not loaded (yet) alike mean no score from Triton now."""
        return TritonUnavailable(f"Triton at {self.url} (model {self.model!r}): {e.status() or ''} {e.message()}")

    async def logits(self, emb: np.ndarray, num: np.ndarray, timeout_s: float | None = None) -> tuple[np.ndarray, str]:
        """Logits (B,) float32 of the dense tower for ``emb`` (B, F, D+1) and ``num``
        (B, M), and the model version that computed them. Cancelling the
        coroutine cancels the call."""
        emb, num = np.ascontiguousarray(emb, np.float32), np.ascontiguousarray(num, np.float32)
        if emb.ndim != 3 or num.ndim != 2 or len(emb) != len(num):
            raise ValueError(f"want emb (B, F, D+1) and num (B, M); got {emb.shape} and {num.shape}")
        inputs = []
        for name, x in (("emb", emb), ("num", num)):
            t = aioclient.InferInput(name, list(x.shape), "FP32")
            t.set_data_from_numpy(x)
            inputs.append(t)
        try:
            res = await self._conn().infer(self.model, inputs, outputs=[aioclient.InferRequestedOutput("logit")],
                                           client_timeout=self.timeout_s if timeout_s is None else timeout_s)
        except InferenceServerException as e:
            raise self._unavailable(e) from e
        return res.as_numpy("logit").reshape(-1), res.get_response().model_version

    async def stats(self) -> dict[str, dict[str, int]]:
        """Per loaded version: inference_count (events), execution_count
        (model runs, after batching), compute_infer_ns (their total time)."""
        try:
            js = await self._conn().get_inference_statistics(self.model, as_json=True, client_timeout=self.timeout_s)
        except InferenceServerException as e:
            raise self._unavailable(e) from e
        return {s["version"]: {"inference_count": int(s.get("inference_count", 0)),
                               "execution_count": int(s.get("execution_count", 0)),
                               "compute_infer_ns": int(s.get("inference_stats", {}).get("compute_infer", {}).get("ns", 0))}
                for s in js.get("model_stats", [])}

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = self._loop = None

    async def __aenter__(self) -> "TritonRanker":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
