"""``olrec demo``: the closed loop on one Ray cluster, measured.

Processes and what crosses between them::

    driver (this module) ── replays MovieLens-100K into the log through the
        app's LogWriter (a Serve handle call per tick, events as Arrow), calls
        Recommend and Feedback over gRPC as simulated users, measures freshness
        and latency, snapshots the frozen baseline, shows the live view and
        writes the report
    Ray Train workers + shard actors (olrec.train, continuous) ── follow the log
    Serve app (serve.app: Recommender replicas, LogWriter, DensePublisher) + Triton
    FrozenShadow actor ── the model as checkpointed halfway, scoring every later
        event of the log without learning (counters frozen too)

**Freshness** of an event at log offset o appended at time t: the time from t
to the first Recommend response after t whose watermark W is past o (W > o).
The replayer samples the last event of every append.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .metrics import auc as auc_of
from .rayenv import init_ray

APP = "olrec"
DENSE_EVERY_S = 30.0  # between dense versions loaded into Triton
#: Candidates a Recommend ranks (the service's default is 200): building ranking inputs
#: is most of a call's cost, and the replica shares two cores with the trainers.
CANDIDATES = 100
#: The replayer appends what is due every tick (1,000 events at 2,000 events/s): each append is a
#: log segment, a Ray Data block and a training round, whose fixed costs add up on two cores.
TICK_S = 0.5
#: The frozen baseline is bookkeeping, not the loop: its threads yield the CPU to the
#: trainers and the service (Linux nice values are per thread and inherited by new threads).
BACKGROUND_NICENESS = 5


@dataclass(frozen=True)
class DemoConfig:
    """The knobs of ``olrec demo`` (validated here; the CLI maps its flags onto them)."""

    data: Path
    run_dir: Path = Path("runs/demo")
    report: Path = Path("reports/demo/demo.json")
    rate: float = 2000.0  # events replayed per second
    max_events: int | None = None  # replay only the first N events
    duration_s: float | None = None  # replay for at most this long
    request_rate: float = 50.0  # Recommend calls per second, open loop
    feedback: float = 0.5  # the share of Recommend answers whose user sends Feedback on the top item
    malformed: float = 0.001  # malformed events sent, per replayed event
    workers: int = 1
    shards: int = 1
    replicas: int = 1
    port: int = 9000
    scorer: str = "triton"  # triton | in_process
    k: int = 10
    deadline_s: float = 5.0  # of each gRPC call
    linger_s: float = 0.0  # keep everything up this long after the report
    settle_s: float = 60.0  # the most to wait, after the replay, for training and serving to catch up
    seed: int = 0
    quiet: bool = False

    def __post_init__(self) -> None:
        for name in ("rate", "request_rate", "deadline_s", "settle_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        for name in ("workers", "shards", "replicas", "k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_events is not None and self.max_events < 2:
            raise ValueError(f"max_events must be >= 2 (half of the replay is the frozen baseline), got {self.max_events}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"duration_s must be positive, got {self.duration_s}")
        for name in ("feedback", "malformed"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise ValueError(f"{name} must be a fraction in [0, 1], got {v}")
        if self.linger_s < 0:
            raise ValueError(f"linger_s must be >= 0, got {self.linger_s}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.scorer not in ("triton", "in_process"):
            raise ValueError(f"scorer must be triton or in_process, got {self.scorer!r}")


# ---------------------------------------------------------------------------
# Events in: the replay, with malformed events mixed in.

#: How a malformed copy of a good event is broken (cycled), each a rule the log's validation enforces.
BREAKS = ("label", "ts", "user_id")
#: MovieLens-100K's item-side columns (u.item); the others describe the user (u.user).
ITEM_FIELDS = ("genres", "year")


def malformed_copies(rows: pa.Table, kind: str) -> pa.Table:
    """``rows`` broken one way: a label of 2, a NaN timestamp or a missing user id."""
    n = rows.num_rows
    i = rows.schema.get_field_index(kind)
    if kind == "label":
        col = pa.array(np.full(n, 2, np.int8))
    elif kind == "ts":
        col = pa.array(np.full(n, np.nan))
    else:
        col = pa.nulls(n, pa.int64())
    return rows.set_column(i, kind, col)


class Replayer:
    """Appends ``events`` (in order) at ``rate`` per second through the app's log
    writer, plus one malformed event per ``1/malformed`` good ones."""

    def __init__(self, events: pa.Table, writer: Any, rate: float, malformed: float) -> None:
        self.events, self.writer, self.rate, self.malformed = events, writer, rate, malformed
        self.pos = 0  # events replayed
        self.half_offset: int | None = None  # the log's end once half the replay was in
        self.malformed_sent = 0
        self.samples: list[tuple[int, float]] = []  # (offset, monotonic time the append began)
        self.sim_ts = float(events["ts"][0].as_py())  # the replay's clock (unix seconds of the data)
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="olrec-replay", daemon=True)

    def start(self) -> Replayer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        try:
            self._replay()
        except BaseException as e:  # reported by the driver
            self.error = e
        finally:
            self.done.set()

    def _replay(self) -> None:
        n = self.events.num_rows
        began, owed, kinds = time.monotonic(), 0.0, 0
        while self.pos < n and not self._stop.is_set():
            now = time.monotonic()
            due = min(n, int((now - began) * self.rate) + 1) - self.pos
            if due <= 0:
                self._stop.wait(TICK_S)
                continue
            good = self.events.slice(self.pos, due)
            owed += due * self.malformed
            bad = int(owed)
            parts = [good]
            if bad:
                owed -= bad
                kind = BREAKS[kinds % len(BREAKS)]
                kinds += 1
                parts.append(malformed_copies(good.slice(0, min(bad, due)), kind))
                bad = parts[-1].num_rows
            t = time.monotonic()
            start, end, _ = self.writer.append.remote(pa.concat_tables(parts)).result()
            self.malformed_sent += bad
            if end > start:
                self.samples.append((end - 1, t))
            self.pos += due
            self.sim_ts = float(good["ts"][-1].as_py())
            if self.half_offset is None and self.pos >= n // 2:
                self.half_offset = end


# ---------------------------------------------------------------------------
# Simulated users over gRPC.

@dataclass
class Calls:
    """What the simulated users saw: one entry per Recommend answer."""

    t: list = field(default_factory=list)  # monotonic time the answer arrived
    watermark: list = field(default_factory=list)
    latency_s: list = field(default_factory=list)
    recommend: int = 0
    max_send_lag_s: float = 0.0  # the most the users fell behind their arrival schedule
    fallback: int = 0  # answers ranked in the replica because Triton did not answer in time
    feedback: int = 0
    feedback_events: int = 0
    errors: dict = field(default_factory=dict)  # status code name -> count
    examples: dict = field(default_factory=dict)  # status code name -> the first error's details

    def error(self, e: Any) -> None:
        code = e.code().name
        self.errors[code] = self.errors.get(code, 0) + 1
        self.examples.setdefault(code, e.details())


class Users:
    """Simulated users on an event loop of their own: Recommend at ``rate`` per
    second (open loop: a slow answer does not slow the arrivals), for users
    drawn from the events replayed so far; Feedback on the top item for a share
    of the answers, labelled by what the user did in the data (a rating of 4+)."""

    MAX_EVENTS = 1000  # per Feedback call (the service's max_ids)

    def __init__(self, port: int, replay: Replayer, cfg: DemoConfig, token: str) -> None:
        self.port, self.replay, self.cfg, self.token = port, replay, cfg, token
        ev = replay.events
        self.user_ids = ev["user_id"].to_numpy()
        liked = ev.filter(pc.equal(ev["label"], 1))
        self.liked = set(zip(liked["user_id"].to_pylist(), liked["item_id"].to_pylist()))
        core = {"user_id", "item_id", "ts", "label", "event_id", "weight"}
        self.context_cols = [c for c in ev.column_names if c not in core]
        self.profile: dict[tuple[str, int], dict[str, Any]] = {}
        for side in ("user_id", "item_id"):
            firsts = np.unique(ev[side].to_numpy(), return_index=True)[1]
            rows = ev.take(pa.array(firsts)).to_pylist()
            for r in rows:
                self.profile[(side, r[side])] = r
        self.calls = Calls()
        self.rng = np.random.default_rng(cfg.seed)
        self._stop = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._main(),),
                                         name="olrec-users", daemon=True)

    def start(self) -> Users:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.cfg.deadline_s + 10)

    def _context(self, user: int, item: int) -> dict:
        from .v1 import recommender_pb2 as pb

        out = {}
        u, i = self.profile.get(("user_id", user), {}), self.profile.get(("item_id", item), {})
        for c in self.context_cols:
            # A user's first event carries some item's fields too: those come from the item.
            v = i.get(c) if c in ITEM_FIELDS else u.get(c, i.get(c))
            if v is None:
                continue
            out[c] = pb.Value(number=float(v)) if isinstance(v, (int, float)) else pb.Value(text=str(v))
        return out

    async def _main(self) -> None:
        import grpc

        from .v1 import recommender_pb2 as pb
        from .v1 import recommender_pb2_grpc as pbg

        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = pbg.RecommenderStub(channel)
            md = (("application", APP),)
            fb_md = md + (("authorization", f"Bearer {self.token}"),)
            pending: set[asyncio.Task] = set()

            async def one(user: int) -> None:
                sent = time.monotonic()
                try:
                    r = await stub.Recommend(pb.RecommendRequest(user_id=user, k=self.cfg.k), metadata=md,
                                             timeout=self.cfg.deadline_s)
                except grpc.aio.AioRpcError as e:
                    self.calls.error(e)
                    return
                now = time.monotonic()
                c = self.calls
                c.t.append(now)
                c.watermark.append(r.watermark)
                c.latency_s.append(now - sent)
                c.fallback += r.scorer == pb.SCORER_FALLBACK_IN_PROCESS
                if r.items and self.rng.random() < self.cfg.feedback:
                    item = r.items[0].item_id
                    outbox.append(pb.Event(user_id=user, item_id=item, label=int((user, item) in self.liked),
                                           ts=self.replay.sim_ts, context=self._context(user, item)))

            async def send(events: list) -> None:
                try:
                    await stub.Feedback(pb.FeedbackRequest(events=events), metadata=fb_md, timeout=self.cfg.deadline_s)
                    self.calls.feedback_events += len(events)
                except grpc.aio.AioRpcError as e:
                    self.calls.error(e)
                self.calls.feedback += 1

            async def flush_every(seconds: float) -> None:
                """The app batches its users' feedback: one Feedback call a second (one log segment)."""
                while not self._stop.is_set() or outbox:
                    await asyncio.sleep(seconds)
                    if outbox:
                        events = outbox[: self.MAX_EVENTS]
                        del outbox[: len(events)]
                        await send(events)

            outbox: list = []
            flusher = asyncio.ensure_future(flush_every(1.0))
            interval = 1.0 / self.cfg.request_rate
            next_at = time.monotonic()
            while not self._stop.is_set():
                pos = self.replay.pos
                if pos:
                    user = int(self.user_ids[self.rng.integers(pos)])
                    self.calls.recommend += 1
                    task = asyncio.ensure_future(one(user))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                next_at += interval
                self.calls.max_send_lag_s = max(self.calls.max_send_lag_s, time.monotonic() - next_at)
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            if pending:
                await asyncio.wait(pending)
            await flusher


def freshness(samples: list[tuple[int, float]], t: np.ndarray, watermark: np.ndarray,
              known: np.ndarray | None = None) -> np.ndarray:
    """Per sampled (offset o, append time a): seconds from a to the first answer
    at or after a whose watermark is past o; NaN where none was (yet). ``t`` is
    in arrival order; ``known`` (a previous result) is kept where resolved:
    later answers cannot change a first one."""
    out = np.full(len(samples), np.nan)
    if known is not None:
        out[: len(known)] = known
    for k, (o, a) in enumerate(samples):
        if np.isfinite(out[k]):
            continue
        j = int(np.searchsorted(t, a))
        past = np.flatnonzero(watermark[j:] > o)
        if past.size:
            out[k] = t[j + past[0]] - a
    return out


# ---------------------------------------------------------------------------
# The frozen baseline.

class FrozenShadow:
    """The model of a checkpoint, scoring the log's events from its watermark on
    without learning anything (a Ray actor; a thread follows the log)."""

    def __init__(self) -> None:
        # Started with the loop, loaded at the snapshot: a new process importing
        # torch takes seconds of CPU that the service would feel halfway through.
        from . import features, learner, train  # noqa: F401

        self.offsets: list[np.ndarray] = []
        self.preds: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.scored_to: int | None = None
        self.error: str | None = None
        self._stop = threading.Event()

    def start(self, run_dir: str, checkpoint: str, start: int) -> None:
        """Load the checkpoint and score the log from ``start`` on, on a thread."""
        from .log import EventLog
        from .train import RunPaths, learner_from_checkpoint, read_model

        os.nice(BACKGROUND_NICENESS)  # this thread, and the scoring thread it starts
        spec, cfg, _ = read_model(run_dir)
        self.learner = learner_from_checkpoint(checkpoint, spec, cfg)
        self.spec, self.scored_to = spec, start
        self.log = EventLog(RunPaths.of(run_dir).log, create=False)
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        from .features import encode
        from .log import OFFSET

        try:
            while not self._stop.is_set():
                end = self.log.end_offset
                if end > self.scored_to:  # what arrived since the last look, scored in one go
                    parts = list(self.log.read(self.scored_to, end))
                    table = pa.concat_tables(parts, promote_options="default") if len(parts) > 1 else parts[0]
                    p = self.learner.predict(encode(table, self.spec), online=False)
                    self.offsets.append(table[OFFSET].to_numpy())
                    self.preds.append(np.asarray(p, np.float32))
                    self.labels.append(table["label"].to_numpy().astype(np.float32))
                    self.scored_to = end
                self._stop.wait(0.5)
        except Exception as e:  # noqa: BLE001 - reported through progress()
            self.error = f"{type(e).__name__}: {e}"

    def progress(self) -> dict:
        recent = self.preds[-10:]
        p = np.concatenate(recent) if recent else np.zeros(0)
        y = np.concatenate(self.labels[-10:]) if recent else np.zeros(0)
        return {"scored_to": self.scored_to or 0, "error": self.error,
                "auc_recent": float(auc_of(y, p)) if len(np.unique(y)) > 1 else float("nan")}

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self._stop.set()
        if not self.offsets:
            return np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32)
        return tuple(np.concatenate(x) for x in (self.offsets, self.preds, self.labels))  # type: ignore[return-value]


# ---------------------------------------------------------------------------
# The driver.

def _percentile(x, q: float) -> float | None:
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    return float(np.percentile(x, q)) if x.size else None


def _serving(port: int, demo: Demo) -> bool:
    """Whether the app answers its gRPC health check with SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    demo.setup_calls += 1
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            r = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="olrec.v1.Recommender"), metadata=(("application", APP),),
                timeout=5)
        except grpc.RpcError:
            return False
    return r.status == health_pb2.HealthCheckResponse.SERVING


def _recommends(port: int, replay: Replayer, demo: Demo) -> bool:
    """Whether a Recommend for a user of the replay so far is answered."""
    import grpc

    from .v1 import recommender_pb2 as pb
    from .v1 import recommender_pb2_grpc as pbg

    if replay.pos == 0:
        return False
    demo.setup_calls += 1
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            r = pbg.RecommenderStub(channel).Recommend(
                pb.RecommendRequest(user_id=int(replay.events["user_id"][0].as_py()), k=1),
                metadata=(("application", APP),), timeout=5)
        except grpc.RpcError:
            return False
    return len(r.items) > 0  # no items: no catalog yet, and nothing ranked


def _check_port(port: int) -> None:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError as e:
            raise ValueError(f"gRPC port {port} is in use ({e.strerror}); choose another with --port") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _fresh_run_dir(root: Path) -> None:
    """The demo starts from an empty run directory; it only ever removes one of its own."""
    if root.exists():
        mine = (root / "log").is_dir() or (root / "model.json").is_file() or not any(root.iterdir())
        if not mine:
            raise ValueError(f"{root} exists and is not an olrec run directory; choose another --run-dir")
        shutil.rmtree(root)
    root.mkdir(parents=True)


class Demo:
    """One run of the closed loop (:func:`run_demo`)."""

    def __init__(self, cfg: DemoConfig) -> None:
        self.cfg = cfg
        self.stop = threading.Event()  # Ctrl-C: end the replay early, then report
        self.lines = 0
        self.setup_calls = 0  # health checks and Recommend probes before the users arrive

    def say(self, msg: str) -> None:
        print(f"olrec: {msg}", file=sys.stderr, flush=True)

    def live(self, text: str) -> None:
        if self.cfg.quiet:
            return
        if sys.stderr.isatty():
            print("\r\033[K" + text, end="", file=sys.stderr, flush=True)
        elif self.lines % 5 == 0:  # a log file gets a line every 5 s
            print(text, file=sys.stderr, flush=True)
        self.lines += 1

    def wait(self, cond, timeout: float, what: str, view=None) -> bool:
        """Poll ``cond`` every 0.2 s (the live view every second) until true or ``timeout``."""
        deadline = time.monotonic() + timeout
        last_view = 0.0
        while not cond():
            if time.monotonic() > deadline:
                self.say(f"gave up after {timeout:.0f} s waiting for {what}")
                return False
            if view is not None and time.monotonic() - last_view >= 1.0:
                view()
                last_view = time.monotonic()
            time.sleep(0.2)
        return True


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the loop; returns the report (also written to ``cfg.report``)."""
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from serve.app import SERVICER_FUNCTIONS, application, serve_config

    from .checkpoint import CheckpointStore
    from .config import load_config
    from .log import EventLog
    from .sources import read_ml100k
    from .telemetry import FreshnessMetrics
    from .train import RunPaths, TrainConfig, latest_published, train

    if not cfg.data.is_dir():
        raise FileNotFoundError(f"MovieLens-100K not found at {cfg.data.resolve()}; pass --data /path/to/ml-100k")
    events = read_ml100k(cfg.data)
    if cfg.max_events is not None:
        events = events.slice(0, cfg.max_events)
    if cfg.duration_s is not None:  # the events that many seconds of replay take: the snapshot falls halfway
        events = events.slice(0, max(2, int(cfg.rate * cfg.duration_s)))
    _check_port(cfg.port)
    conf = load_config(None, {"data": {"path": str(cfg.data.resolve()), "format": "ml100k"}})
    spec = conf.feature_spec(events)
    paths = RunPaths.of(cfg.run_dir)
    _fresh_run_dir(paths.root)
    EventLog(paths.log).close()  # the trainer and the catalog read it before the first append
    demo = Demo(cfg)
    token = os.urandom(12).hex()  # Feedback needs it, as a deployment with a token would
    tc = TrainConfig(workers=cfg.workers, shards=cfg.shards, continuous=True, poll_interval=0.1,
                     checkpoint_every_s=600, keep_checkpoints=5, report_every_s=0.5, cpus_per_worker=1.0)

    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in signals}

    def on_signal(signum, frame) -> None:
        demo.stop.set()
        demo.say("stopping: the report comes next (again to interrupt)")
        for s, h in previous.items():
            signal.signal(s, h)

    for s in signals:
        signal.signal(s, on_signal)
    started_ray = not ray.is_initialized()
    triton = trainer = replay = users = shadow = None
    result: dict[str, Any] = {}
    began = time.monotonic()
    try:
        if started_ray:
            # Logical CPUs overcommitted: workers, shards and replicas mostly wait on each other.
            ctx = init_ray(max(8, 2 * cfg.workers + 4), include_dashboard=True, dashboard_host="127.0.0.1")
            dashboard = ctx.dashboard_url
        else:
            dashboard = ray.get_runtime_context().gcs_address
        dashboard = f"http://{dashboard}" if dashboard and not str(dashboard).startswith("http") else dashboard
        demo.say(f"Ray dashboard: {dashboard or '(not running)'}")
        fresh_metric = FreshnessMetrics({"run": paths.root.name})

        if cfg.scorer == "triton":
            from .triton import RAY_WORKER_NICENESS, TritonServer

            (paths.root / "triton" / "local").mkdir(parents=True, exist_ok=True)
            triton = TritonServer(paths.root / "triton" / "local", models=(), niceness=RAY_WORKER_NICENESS,
                                  log_path=paths.root / "triton" / "tritonserver.log").start()
            demo.say(f"Triton on {triton.url}")

        def run_trainer() -> None:
            try:
                result["train"] = train(spec, conf.learner, tc, paths.root)
            except BaseException as e:  # reported below
                result["train_error"] = e

        shadow = ray.remote(num_cpus=0.25, max_concurrency=4)(FrozenShadow).remote()
        trainer = threading.Thread(target=run_trainer, name="olrec-train", daemon=True)
        trainer.start()
        if not demo.wait(lambda: latest_published(paths) is not None or "train_error" in result, 180, "the trainers"):
            raise RuntimeError("the trainers did not start within 180 s")
        if "train_error" in result:
            raise result["train_error"]

        # Rows (and W) refresh every 0.2 s; the dense tower, which changes slowly, goes to
        # Triton every DENSE_EVERY_S (as Monolith syncs dense weights less often than
        # sparse ones): a load costs Triton's Python backend seconds of CPU here.
        # A Triton call that times out is ranked in the replica (fp32), and the answer says so.
        opts = {"run_dir": str(paths.root), "scorer": cfg.scorer, "feedback_token": token,
                "publish_s": DENSE_EVERY_S, "on_triton_down": "in_process", "candidates": CANDIDATES}
        if triton is not None:
            opts["triton_url"] = triton.url
        serve.start(grpc_options=gRPCOptions(port=cfg.port, grpc_servicer_functions=SERVICER_FUNCTIONS))
        # A replica at its max_ongoing_requests bounces calls back to the proxy's router, which
        # retries with backoff: on a loaded machine, seconds. Queued in the replica they wait less.
        serve.run(application(serve_config(opts), num_replicas=cfg.replicas, max_ongoing_requests=256,
                              ray_actor_options={"num_cpus": 0.5}), name=APP, route_prefix=f"/{APP}")
        writer = serve.get_deployment_handle("LogWriter", app_name=APP)
        demo.say(f"serving olrec.v1.Recommender on gRPC port {cfg.port}")

        if not demo.wait(lambda: _serving(cfg.port, demo), 120, "the Recommender replicas' first weights"):
            raise RuntimeError("the Recommender replicas did not report SERVING within 120 s")
        replay = Replayer(events, writer, cfg.rate, cfg.malformed).start()
        # Users arrive once the service ranks: the first dense version is in Triton (it needs learned events).
        if not demo.wait(lambda: replay.error is not None or _recommends(cfg.port, replay, demo), 120,
                         "the first answer to Recommend"):
            raise RuntimeError("the service did not answer Recommend within 120 s")
        users = Users(cfg.port, replay, cfg, token).start()
        demo.say(f"replaying {events.num_rows:,} events at {cfg.rate:,.0f}/s, {cfg.request_rate:g} requests/s")

        split: int | None = None
        fresh_now = np.zeros(0)

        def trained() -> dict:
            return _read_json(paths.metrics)

        def update_freshness() -> np.ndarray:
            """Resolve what the answers so far can; each sample reaches the Ray metric once."""
            nonlocal fresh_now
            c = users.calls
            n = min(len(c.t), len(c.watermark))  # appended on the users' thread
            before = np.isfinite(fresh_now)
            fresh_now = freshness(list(replay.samples), np.asarray(c.t[:n]), np.asarray(c.watermark[:n]), fresh_now)
            new = np.isfinite(fresh_now)
            new[: len(before)] &= ~before
            for v in fresh_now[new]:
                fresh_metric.observe("freshness_s", float(v))
            return fresh_now

        def view() -> None:
            m = trained()
            c = users.calls
            update_freshness()
            sh = ray.get(shadow.progress.remote()) if split is not None else {}
            lat = c.latency_s[-500:]
            p50, p99 = _percentile(lat, 50), _percentile(lat, 99)
            f50, f99 = _percentile(fresh_now, 50), _percentile(fresh_now, 99)
            fmt = lambda v, unit="", scale=1.0: "-" if v is None or not math.isfinite(v) else f"{v * scale:.2f}{unit}"
            demo.live(
                f"appended {replay.pos:,}/{events.num_rows:,} | trained {m.get('events_trained', 0):,} "
                f"W {m.get('watermark', 0):,} {m.get('events_per_s', 0):,.0f} ev/s | AUC online "
                f"{fmt(m.get('auc', float('nan')))} frozen {fmt(sh.get('auc_recent', float('nan')))} | fresh p50 "
                f"{fmt(f50, 's')} p99 {fmt(f99, 's')} | serve p50 {fmt(p50, 'ms', 1e3)} p99 {fmt(p99, 'ms', 1e3)} "
                f"| {c.recommend:,} calls, {sum(c.errors.values())} errors | {dashboard}")

        def snapshot_ready() -> bool:
            return replay.half_offset is not None and trained().get("watermark", 0) >= replay.half_offset

        def checkpoint_now(what: str):
            """Ask the trainers for a checkpoint at their next round; the newest
            checkpoint once that one is committed (None if not within a minute)."""
            paths.checkpoint_request.touch()
            if not demo.wait(lambda: not paths.checkpoint_request.exists(), 60, what, view):
                return None
            return CheckpointStore(paths.checkpoints).latest()

        def freeze() -> int | None:
            """The frozen baseline: a checkpoint, scoring in shadow from its watermark on."""
            ckpt = checkpoint_now("the halfway checkpoint")
            if ckpt is None:
                return None
            ray.get(shadow.start.remote(str(paths.root), str(ckpt.path), ckpt.watermark))
            demo.say(f"\nfrozen baseline: the model at watermark {ckpt.watermark:,}, scoring the rest in shadow")
            return ckpt.watermark

        # The replay; halfway, the frozen baseline.
        while not (replay.done.is_set() or demo.stop.is_set()):
            if "train_error" in result:
                raise result["train_error"]
            if split is None and snapshot_ready():
                split = freeze()
            view()
            demo.stop.wait(1.0)
        replay.stop()
        if replay.error is not None:
            raise replay.error
        if split is None and not demo.stop.is_set():  # a replay too short to reach the snapshot in the loop
            demo.wait(snapshot_ready, cfg.settle_s, "the trainers to pass half the replay", view)
            split = freeze()
        settle = 5.0 if demo.stop.is_set() else cfg.settle_s
        # Answers until every sampled event is served, then the users stop and training catches up.
        demo.wait(lambda: bool(np.isfinite(update_freshness()).all()), settle, "every sampled event to be served",
                  view)
        users.stop()
        log = EventLog(paths.log, create=False)
        end = log.end_offset
        demo.wait(lambda: trained().get("watermark", 0) >= end, settle, "the trainers to reach the log's end", view)
        final = checkpoint_now("the final checkpoint") or CheckpointStore(paths.checkpoints).latest()
        if split is not None:
            demo.wait(lambda: ray.get(shadow.progress.remote())["scored_to"] >= end, settle,
                      "the frozen baseline to score the log", view)
        view()
        if not cfg.quiet and sys.stderr.isatty():
            print(file=sys.stderr)
        report = _report(cfg, paths, replay, users.calls, fresh_now, final, split, shadow, log, time.monotonic() - began,
                         interrupted=demo.stop.is_set(), setup_calls=demo.setup_calls)
        if cfg.linger_s and not demo.stop.is_set():
            demo.say(f"everything stays up for {cfg.linger_s:g} s (Ctrl-C to end now)")
            demo.stop.wait(cfg.linger_s)
        return report
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for part in (users, replay):
            if part is not None:
                part.stop()
        if trainer is not None and trainer.is_alive():
            paths.stop_file.touch()
            trainer.join(120)
        if ray.is_initialized():
            if shadow is not None:
                ray.kill(shadow)
            serve.shutdown()
            if started_ray:
                ray.shutdown()
        if triton is not None:
            triton.close()


def _auc(y: np.ndarray, p: np.ndarray) -> float | None:
    return float(auc_of(y, p)) if len(np.unique(y)) > 1 else None


def _report(cfg: DemoConfig, paths, replay: Replayer, calls: Calls, fresh: np.ndarray, final, split: int | None,
            shadow, log, wall_s: float, interrupted: bool, setup_calls: int) -> dict[str, Any]:
    import ray

    online = (np.zeros(0, np.int64), np.zeros(0), np.zeros(0))
    if final is not None:
        with np.load(final.file("progress.npz")) as z:
            online = (z["offsets"], z["preds"], z["labels"])
    frozen = ray.get(shadow.result.remote()) if split is not None else (np.zeros(0, np.int64), np.zeros(0), np.zeros(0))
    after = online[0] >= (split if split is not None else np.iinfo(np.int64).max)
    # The same events for both: those after the snapshot that both scored.
    common = np.intersect1d(online[0][after], frozen[0])
    on_idx = np.searchsorted(online[0], common)
    fr_order = np.argsort(frozen[0], kind="stable")
    fr_idx = fr_order[np.searchsorted(frozen[0], common, sorter=fr_order)]
    y = online[2][on_idx]
    lat_ms = np.asarray(calls.latency_s) * 1e3
    report = {
        "events_appended": int(log.end_offset),
        "events_replayed": int(replay.pos),
        "feedback_events": int(calls.feedback_events),
        "malformed_sent": int(replay.malformed_sent),
        "dead_lettered": int(log.dead_lettered),
        "events_trained": int(final.meta.get("events", 0)) if final is not None else 0,
        "watermark": int(final.watermark) if final is not None else 0,
        "snapshot_watermark": split,
        "events_after_snapshot": int(common.size),
        "auc_online": _auc(y, online[1][on_idx]),
        "auc_frozen": _auc(y, frozen[1][fr_idx]),
        "auc_online_all": _auc(online[2], online[1]),
        "rate": cfg.rate,
        "request_rate": cfg.request_rate,
        "freshness_samples": int(np.isfinite(fresh).sum()),
        "freshness_unresolved": int((~np.isfinite(fresh)).sum()),
        "freshness_p50_s": _percentile(fresh, 50),
        "freshness_p99_s": _percentile(fresh, 99),
        "serve_p50_ms": _percentile(lat_ms, 50),
        "serve_p99_ms": _percentile(lat_ms, 99),
        "requests": int(calls.recommend + calls.feedback),
        "recommend_requests": int(calls.recommend),
        "feedback_requests": int(calls.feedback),
        # Every call the service answered for the demo: the users' and the start-up probes.
        "service_calls": int(calls.recommend + calls.feedback + setup_calls),
        "errors": int(sum(calls.errors.values())),
        "fallback_answers": int(calls.fallback),
        "max_send_lag_s": calls.max_send_lag_s,
        "error_codes": dict(calls.errors),
        "error_examples": dict(calls.examples),
        "workers": cfg.workers,
        "shards": cfg.shards,
        "replicas": cfg.replicas,
        "scorer": cfg.scorer,
        "wall_seconds": wall_s,
        "interrupted": interrupted,
        "run_dir": str(paths.root),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
    }
    cfg.report.parent.mkdir(parents=True, exist_ok=True)
    report["plots"] = _plots(cfg.report, online, frozen, split, fresh, lat_ms)
    cfg.report.write_text(json.dumps(report, indent=2) + "\n")
    print(summary(report))
    print(f"report: {cfg.report}\nplots:  {', '.join(report['plots'])}")
    return report


def summary(r: dict) -> str:
    f = lambda v, d=4: "-" if v is None else f"{v:.{d}f}"
    return (f"events: {r['events_appended']:,} appended ({r['feedback_events']:,} of them Feedback), "
            f"{r['events_trained']:,} trained; {r['malformed_sent']} malformed sent, {r['dead_lettered']} dead-lettered\n"
            f"AUC after the snapshot ({r['events_after_snapshot']:,} events): online {f(r['auc_online'])}, "
            f"frozen {f(r['auc_frozen'])}\n"
            f"freshness ({r['freshness_samples']} sampled events): p50 {f(r['freshness_p50_s'], 2)} s, "
            f"p99 {f(r['freshness_p99_s'], 2)} s\n"
            f"serving: {r['requests']:,} calls, {r['errors']} errors, Recommend p50 {f(r['serve_p50_ms'], 1)} ms, "
            f"p99 {f(r['serve_p99_ms'], 1)} ms")


def _plots(report: Path, online, frozen, split, fresh: np.ndarray, lat_ms: np.ndarray) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    stem = report.with_suffix("")

    def save(fig, name: str) -> None:
        path = Path(f"{stem}-{name}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        out.append(str(path))

    fig, ax = plt.subplots(figsize=(8, 4))
    for (o, p, y), label in ((online, "online"), (frozen, "frozen at the snapshot")):
        if len(o) < 2:
            continue
        order = np.argsort(o)
        o, p, y = o[order], p[order], y[order]
        size = max(500, len(online[0]) // 40)
        xs, ys = [], []
        for lo in range(0, len(o), size):
            a = _auc(y[lo:lo + size], p[lo:lo + size])
            if a is not None:
                xs.append(o[min(lo + size, len(o)) - 1])
                ys.append(a)
        ax.plot(xs, ys, marker=".", label=label)
    if split is not None:
        ax.axvline(split, color="grey", linestyle="--", label="snapshot")
    ax.set(xlabel="log offset", ylabel="AUC (windows of events)", title="Progressive AUC: online vs frozen")
    ax.legend()
    save(fig, "auc")

    fig, ax = plt.subplots(figsize=(6, 4))
    f = fresh[np.isfinite(fresh)]
    ax.hist(f, bins=40)
    ax.set(xlabel="seconds from append to a served watermark past the event", ylabel="sampled events",
           title="Freshness")
    save(fig, "freshness")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(lat_ms, bins=60)
    ax.set(xlabel="Recommend latency at the client, ms", ylabel="calls", title="Serving latency")
    save(fig, "latency")
    return out
