"""Serving throughput and latency: olrec's Serve app against a bare Serve gRPC app, in one run.

    python bench/serve.py [--data ../shared/data/ml-100k] [--replicas 1] [--replica-cpus 1.0]
                          [--concurrency 8] [--rate 50] [--duration 20] [--rounds 4]
                          [--hidden 512,256] [--json out.json]

A run directory is trained in process on the first ``--train-events`` events
of MovieLens-100K (a checkpoint: serving-only mode, the whole 1,682-item
catalog). One local Ray cluster and one Serve instance; each system is
deployed as its own app with the same replicas and CPUs, all at once, and
loaded one at a time (an idle app costs next to no CPU):

- ``echo``: a bare Serve gRPC deployment answering Recommend with an empty
  response (the floor: gRPC proxy, routing, one replica call);
- ``olrec-int8`` / ``olrec-fp32``: Recommend (k=10) ranked by the int8 / fp32
  tower in a local Triton (its own run directory each, so versions never mix);
- ``olrec-inprocess``: the fp32 tower in the replica.

Per system: closed loop (``--concurrency`` clients back to back, rps; in
``--rounds`` rounds with the systems in turn within each, so that a drift in
this shared machine's load hits all of them alike: rps is the median round,
and its ratio to echo the median of the rounds' ratios), open
loop (``--rate`` requests/s on schedule, latency from the scheduled send:
p50, p99), sequential Recommend latency through Serve, and the replica-side
time of the same Recommend (the app's Recommender class called in this
process, Serve left out; its tower call timed apart). Their difference is
what gRPC, the Serve proxy and the replica's queue add.

int8 against fp32 for one realistic batch of 100 candidates: Triton's own
compute_infer time per execution (``--triton-calls`` direct calls), and the
median Score latency through each app; onnxruntime alone on the same two
files for reference; the files' size ratio; and the AUC change of the whole
model on the last 20% after training on the first 80%.

This machine is shared and small (the client, the proxy, the replica and
Triton share its cores): compare ratios within one run.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# This file is bench/serve.py: with bench/ first on sys.path, `import serve`
# (the app package) would find this file, here and in Ray's workers, which
# get the driver's script directory on their path when it is on the driver's.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from contextlib import ExitStack  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from typing import Any, Awaitable, Callable  # noqa: E402

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
from ray import serve  # noqa: E402

from olrec.features import encode, ml100k_spec  # noqa: E402
from olrec.learner import LearnerConfig, OnlineLearner  # noqa: E402
from olrec.rayenv import apply_env  # noqa: E402
from olrec.serving import ServeConfig, ServingModel  # noqa: E402
from olrec.sources import read_ml100k  # noqa: E402
from olrec.train import learn_into_run  # noqa: E402
from olrec.v1 import recommender_pb2 as pb  # noqa: E402
from olrec.v1 import recommender_pb2_grpc as pbg  # noqa: E402

SYSTEMS = ("echo", "olrec-int8", "olrec-fp32", "olrec-inprocess")
TIMEOUT_S = 10.0  # per request: far above any healthy latency here, so a slow answer is latency, not an error


# ---------------------------------------------------------------------------
# The run and the systems.

@serve.deployment(max_ongoing_requests=32)  # as the Recommender
class Echo:
    """The floor: Serve's gRPC path with no work in the replica."""

    async def Recommend(self, request: pb.RecommendRequest, grpc_context: Any) -> pb.RecommendResponse:
        return pb.RecommendResponse()


class _Context:
    """What the Recommender uses of a RayServegRPCContext (errors only)."""

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def invocation_metadata(self) -> tuple:
        return ()


@dataclass
class Result:
    system: str
    rps: float = math.nan  # median over the rounds
    concurrency: int = 0
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    rate: float = 0.0
    errors: int = 0
    # printed, not in the JSON
    rps_rounds: list[float] = field(default_factory=list)  # closed-loop requests/s per round
    vs_echo: float = math.nan  # median over the rounds of rps / echo's rps in the same round
    closed_errors: int = 0
    open_errors: int = 0
    client_cpu: float = math.nan  # this process's CPU seconds per second in the closed loop (the load generator)
    seq_ms: float = math.nan  # one Recommend at a time, through Serve
    replica_ms: float = math.nan  # the same Recommend, the replica's code alone
    retrieve_ms: float = math.nan  # of which: candidates (user vector against every item's)
    inputs_ms: float = math.nan  # the candidates' features encoded, the tower's inputs gathered
    tower_ms: float = math.nan  # the ranking tower (Triton call or in process)
    score_ms: float = math.nan  # Score of the 100-candidate batch, through Serve
    triton_ms: float = math.nan  # Triton's compute_infer per execution for that batch

    def record(self) -> dict:
        return {k: getattr(self, k) for k in ("system", "rps", "concurrency", "p50_ms", "p99_ms", "rate", "errors")}


# ---------------------------------------------------------------------------
# Load.

class Load:
    """grpc.aio client of one Serve app (its name in the metadata selects it)."""

    def __init__(self, port: int, app: str, users: np.ndarray, seed: int = 0) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pbg.RecommenderStub(self.channel)
        self.md = (("application", app),)
        self.users, self.rng = users, np.random.default_rng(seed)

    def call(self) -> Any:
        """Recommend k=10 for a random known user (an awaitable)."""
        user = int(self.users[self.rng.integers(len(self.users))])
        return self.stub.Recommend(pb.RecommendRequest(user_id=user, k=10), metadata=self.md, timeout=TIMEOUT_S)

    async def recommend(self) -> bool:
        try:
            await self.call()
            return True
        except grpc.RpcError:
            return False

    async def closed(self, concurrency: int, duration: float) -> tuple[int, int]:
        """(successes, errors) of ``concurrency`` clients back to back; only answers before the end count."""
        end = time.monotonic() + duration
        counts = [0, 0]

        async def client() -> None:
            while time.monotonic() < end:
                ok = await self.recommend()
                if time.monotonic() <= end:
                    counts[not ok] += 1

        await asyncio.gather(*(client() for _ in range(concurrency)))
        return counts[0], counts[1]

    async def open(self, rate: float, duration: float) -> tuple[list[float], int]:
        """(latencies in s from each scheduled send, errors) at a fixed arrival rate."""
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.05
        lat: list[float] = []
        errors = 0

        async def one(at: float) -> None:
            nonlocal errors
            await asyncio.sleep(at - loop.time())
            if await self.recommend():
                lat.append(loop.time() - at)
            else:
                errors += 1

        await asyncio.gather(*(one(start + i / rate) for i in range(int(rate * duration))))
        return lat, errors

    async def sequential(self, call: Callable[[], Awaitable[Any]], n: int) -> float:
        """Median seconds of ``n`` calls one at a time."""
        times = []
        for _ in range(n):
            t = time.perf_counter()
            await call()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    async def close(self) -> None:
        await self.channel.close()


async def wait_ok(call: Callable[[], Awaitable[Any]], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await call()
        except grpc.RpcError as e:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not answering after {timeout_s:g} s: {e.code()} {e.details()}") from e
            await asyncio.sleep(0.5)


def timed(fn: Callable, into: list[float]) -> Callable:
    """``fn`` (sync or async) appending its seconds per call to ``into``."""
    if asyncio.iscoroutinefunction(fn):
        async def run_async(*args: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return await fn(*args, **kw)
            finally:
                into.append(time.perf_counter() - t)
        return run_async

    def run(*args: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            into.append(time.perf_counter() - t)
    return run


async def replica_side(cfg: ServeConfig, users: np.ndarray, n: int, res: Result) -> None:
    """Median ms of the app's Recommend and of its parts, run by the
    Recommender class in this process (no Serve, no gRPC, no proxy)."""
    from serve.app import Recommender

    cls = Recommender.func_or_class
    rec = cls.__new__(cls)
    await rec.__init__(asdict(cfg))
    parts: dict[str, list[float]] = {"replica": [], "retrieve": [], "batch": [], "rank_inputs": [], "tower": []}
    rec.model.retrieve = timed(rec.model.retrieve, parts["retrieve"])
    rec.model.catalog.batch = timed(rec.model.catalog.batch, parts["batch"])
    rec.model.rank_inputs = timed(rec.model.rank_inputs, parts["rank_inputs"])
    rec._tower = timed(rec._tower, parts["tower"])
    recommend = timed(rec.Recommend, parts["replica"])
    rng = np.random.default_rng(1)
    try:
        for _ in range(n + 20):  # the first 20 warm up (Triton channel, caches)
            resp = await recommend(pb.RecommendRequest(user_id=int(rng.choice(users)), k=10), _Context())
            assert len(resp.items) == 10, resp
    finally:
        rec._refresher.cancel()
        if rec._triton is not None:
            await rec._triton.close()
    ms = {k: statistics.median(v[20:]) * 1e3 for k, v in parts.items()}
    res.replica_ms, res.retrieve_ms, res.tower_ms = ms["replica"], ms["retrieve"], ms["tower"]
    res.inputs_ms = ms["batch"] + ms["rank_inputs"]  # the candidates' batch, then the tower's inputs


async def triton_compute_ms(urls: dict[str, str], emb: np.ndarray, num: np.ndarray, n: int,
                            rounds: int = 10) -> dict[str, float]:
    """Per Triton (name -> url): its compute_infer time per model execution over
    ``n`` direct calls of one batch, in interleaved rounds (the machine is noisy)."""
    from olrec.triton import TritonRanker

    rankers = {k: TritonRanker(url, timeout_s=TIMEOUT_S) for k, url in urls.items()}
    ns, runs = dict.fromkeys(urls, 0), dict.fromkeys(urls, 0)
    try:
        for r in rankers.values():
            for _ in range(20):
                await r.logits(emb, num)
        for _ in range(rounds):
            for k, r in rankers.items():
                before = await r.stats()
                for _ in range(n // rounds):
                    await r.logits(emb, num)
                after = await r.stats()
                for v, st in after.items():
                    ns[k] += st["compute_infer_ns"] - before.get(v, {}).get("compute_infer_ns", 0)
                    runs[k] += st["execution_count"] - before.get(v, {}).get("execution_count", 0)
    finally:
        for r in rankers.values():
            await r.close()
    return {k: ns[k] / runs[k] / 1e6 for k in urls}


# ---------------------------------------------------------------------------
# int8 against fp32 outside Serve.

def ort_ms(paths: dict[str, Path], emb: np.ndarray, num: np.ndarray, rounds: int = 15,
           runs: int = 100) -> dict[str, float]:
    """onnxruntime alone (one thread), median of interleaved rounds (the machine is noisy)."""
    from olrec.export import session

    sessions = {k: session(p) for k, p in paths.items()}
    feed = {"emb": emb, "num": num}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            t = time.perf_counter()
            for _ in range(runs):
                s.run(None, feed)
            times[k].append((time.perf_counter() - t) / runs)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def auc_delta(events: pa.Table, cfg: LearnerConfig, work: Path) -> float:
    """AUC(int8) - AUC(fp32) of the whole model (counters, wide part, blend) on
    the last 20% after training on the first 80% (tests/test_export.py)."""
    from olrec.export import export_onnx, quantize_int8, session
    from olrec.metrics import auc

    spec = ml100k_spec()
    learner = OnlineLearner(spec, cfg)
    split = int(events.num_rows * 0.8)
    learner.learn(encode(events.slice(0, split), spec))
    fp32 = export_onnx(learner.model, work / "auc-fp32.onnx")
    int8 = quantize_int8(fp32, work / "auc-int8.onnx", learner.calibration())
    test = encode(events.slice(split), spec)
    emb, num, p_wide = learner.ranking_inputs(test)
    aucs = {}
    for name, path in (("fp32", fp32), ("int8", int8)):
        logit = session(path).run(["logit"], {"emb": emb.numpy(), "num": num.numpy()})[0]
        aucs[name] = auc(test.label, learner.blend_probs(torch.from_numpy(logit), p_wide))
    return aucs["int8"] - aucs["fp32"]


# ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile_ms(lat: list[float], q: float) -> float:
    return float(np.percentile(lat, q)) * 1e3 if lat else math.nan


async def deploy(name: str, app: serve.Application, port: int, users: np.ndarray,
                 ready: Callable[[Load], Awaitable[Any]]) -> Load:
    """Deploy ``app`` as ``name``; its client once it answers."""
    serve.run(app, name=name, route_prefix=f"/{name}")
    load = Load(port, name, users)
    await wait_ok(lambda: ready(load), 180, name)
    return load


async def closed_rounds(loads: dict[str, Load], results: dict[str, Result], args: argparse.Namespace) -> None:
    """The closed loop in ``args.rounds`` rounds, each system in turn within a
    round: a drift in this shared machine's load hits every system alike, and
    each round gives each system's rps beside echo's."""
    part = args.duration / args.rounds
    cpu = dict.fromkeys(loads, 0.0)
    for name, load in loads.items():
        await load.closed(args.concurrency, args.warmup)
    for _ in range(args.rounds):
        for name, load in loads.items():
            await load.closed(args.concurrency, 1.0)  # settle after the switch from the other system
            t = time.process_time()
            ok, errors = await load.closed(args.concurrency, part)
            cpu[name] += time.process_time() - t
            results[name].rps_rounds.append(ok / part)
            results[name].closed_errors += errors
    echo = results["echo"].rps_rounds if "echo" in results else None
    for name, res in results.items():
        res.rps = statistics.median(res.rps_rounds)
        res.client_cpu = cpu[name] / args.duration
        if echo:
            res.vs_echo = statistics.median(r / e for r, e in zip(res.rps_rounds, echo))


async def latencies(name: str, load: Load, res: Result, args: argparse.Namespace, batch: tuple[int, np.ndarray]) -> None:
    """Open loop at ``args.rate``, then one call at a time (Recommend, and Score of the 100-candidate batch)."""
    lat, res.open_errors = await load.open(args.rate, args.duration)
    res.p50_ms, res.p99_ms = percentile_ms(lat, 50), percentile_ms(lat, 99)
    res.errors = res.closed_errors + res.open_errors
    res.seq_ms = await load.sequential(load.call, args.seq_calls) * 1e3
    if name != "echo":
        user, items = batch
        score = pb.ScoreRequest(user_id=user, item_ids=items.tolist())
        res.score_ms = await load.sequential(
            lambda: load.stub.Score(score, metadata=load.md, timeout=TIMEOUT_S), args.seq_calls) * 1e3
    print(f"  {name}: {res.rps:,.0f} rps at {args.concurrency} ({res.vs_echo:.2f}x echo), p99 {res.p99_ms:.1f} ms "
          f"at {args.rate:g}/s, errors {res.errors}", flush=True)


async def run_systems(args: argparse.Namespace, runs: dict[str, Path], users: np.ndarray, port: int,
                      batch: tuple[int, np.ndarray, np.ndarray, np.ndarray], stack: ExitStack) -> list[Result]:
    """Each system deployed, measured and deleted in turn; then the Tritons' own times, interleaved."""
    from olrec.triton import TritonServer
    from serve.app import application

    user, items, emb, num = batch
    options = {"num_replicas": args.replicas, "ray_actor_options": {"num_cpus": args.replica_cpus},
               "autoscaling_config": None}  # the Recommender autoscales by default: a fixed count here

    async def recommends(load: Load) -> Any:
        r = await load.stub.Recommend(pb.RecommendRequest(user_id=int(users[0]), k=10), metadata=load.md, timeout=5)
        assert len(r.items) == 10, r

    async def scores(load: Load, scorer: int) -> Any:  # through Triton: the publisher has published and loaded it
        r = await load.stub.Score(pb.ScoreRequest(user_id=user, item_ids=[1]), metadata=load.md, timeout=5)
        assert r.scorer == scorer, r

    apps: dict[str, tuple[serve.Application, Callable[[Load], Awaitable[Any]]]] = {}
    configs: dict[str, ServeConfig] = {}
    tritons: dict[str, str] = {}
    for name in args.systems:
        if name == "echo":
            echo = Echo.options(**{k: v for k, v in options.items() if k != "autoscaling_config"}).bind()
            apps[name] = (echo, lambda load: load.stub.Recommend(pb.RecommendRequest(), metadata=load.md, timeout=5))
        elif name == "olrec-inprocess":
            configs[name] = ServeConfig(run_dir=str(runs["base"]), scorer="in_process")
            apps[name] = (application(configs[name], **options), recommends)
        else:
            precision = name.removeprefix("olrec-")
            run = runs[precision]
            (run / "triton" / "local").mkdir(parents=True)
            # No model at start: the app's DensePublisher publishes the run's tower and has Triton load it.
            triton = TritonServer(run / "triton" / "local", models=(), log_path=run / "tritonserver.log")
            stack.enter_context(triton)  # up until the end: the int8 and fp32 Tritons are timed side by side
            tritons[name] = triton.url
            configs[name] = ServeConfig(run_dir=str(run), scorer="triton", precision=precision, triton_url=triton.url)
            scorer = pb.SCORER_TRITON_INT8 if precision == "int8" else pb.SCORER_TRITON_FP32
            apps[name] = (application(configs[name], **options), lambda load, s=scorer: scores(load, s))
    # Every app deployed at once, loaded one at a time: an idle app costs next to no CPU.
    loads: dict[str, Load] = {}
    results = {name: Result(name, concurrency=args.concurrency, rate=args.rate) for name in apps}
    try:
        for name, (app, ready) in apps.items():
            loads[name] = await deploy(name, app, port, users, ready)
        await closed_rounds(loads, results, args)
        for name, load in loads.items():
            await latencies(name, load, results[name], args, (user, items))
    finally:
        for name, load in loads.items():
            await load.close()
            serve.delete(name)
    for name, cfg in configs.items():
        await replica_side(cfg, users, args.seq_calls, results[name])
    if tritons:
        times = await triton_compute_ms(tritons, emb, num, args.triton_calls)
        for r in results.values():
            r.triton_ms = times.get(r.system, math.nan)
    return list(results.values())


def table(results: list[Result], cmp: dict, ort: dict[str, float], args: argparse.Namespace) -> str:
    def f(x: float, p: int = 1) -> str:
        return "-" if math.isnan(x) else f"{x:,.{p}f}"

    columns: list[tuple[str, Callable[[Result], str]]] = [
        (f"rps@{args.concurrency}", lambda r: f(r.rps, 0)), ("vs echo", lambda r: f(r.vs_echo, 2)),
        ("err", lambda r: str(r.closed_errors)),
        ("client", lambda r: f(r.client_cpu * 100, 0) + "%"), ("p50 ms", lambda r: f(r.p50_ms)),
        ("p99 ms", lambda r: f(r.p99_ms)), ("err", lambda r: str(r.open_errors)), ("seq ms", lambda r: f(r.seq_ms, 2)),
        ("replica", lambda r: f(r.replica_ms, 2)), ("retr", lambda r: f(r.retrieve_ms, 2)),
        ("inputs", lambda r: f(r.inputs_ms, 2)), ("tower", lambda r: f(r.tower_ms, 2)),
        ("overhead", lambda r: f(r.seq_ms - r.replica_ms, 2)), ("Score100", lambda r: f(r.score_ms, 2)),
        ("triton", lambda r: f(r.triton_ms, 3))]
    head = f"{'system':<16}" + "".join(f" {c:>8}" for c, _ in columns)
    lines = [f"closed loop: {args.concurrency} clients, {args.rounds} rounds of {args.duration / args.rounds:g} s per "
             f"system, interleaved; open loop: {args.rate:g} req/s for {args.duration:g} s; "
             f"{args.replicas} replica(s) x {args.replica_cpus:g} CPU; tower hidden={args.hidden_sizes}",
             head, "-" * len(head)]
    lines += [f"{r.system:<16}" + "".join(f" {cell(r):>8}" for _, cell in columns) for r in results]
    lines.append("(rps@N: median over the rounds; vs echo: median of each round's ratio to echo's rps;\n"
                 " client: this process's CPU in the closed loop, % of a core; seq ms: one Recommend at a time "
                 "through Serve;\n replica: the same Recommend run in this process without Serve, and its parts "
                 "retrieve, inputs, tower;\n overhead = seq - replica: gRPC, proxy, Serve; Score100: Score of 100 "
                 "candidates through Serve;\n triton: Triton's compute_infer per execution for those 100; "
                 "all medians, ms)")
    by = {r.system: r for r in results}
    lines.append("")
    lines.append(f"int8 vs fp32, batch of 100: speedup_triton {cmp['speedup_triton']:.2f}x, speedup_e2e "
                 f"{cmp['speedup_e2e']:.2f}x, onnxruntime alone {ort['fp32']:.3f} / {ort['int8']:.3f} ms = "
                 f"{ort['fp32'] / ort['int8']:.2f}x;\n  size_ratio {cmp['size_ratio']:.3f}; "
                 f"auc_delta {cmp['auc_delta']:+.2e}")

    def target(label: str, value: float, ok: bool, fmt: str) -> str:
        return f"  {label:<44} {format(value, fmt):>8}  {'MET' if ok else 'MISSED'}"

    lines.append("targets:")
    if "echo" in by and "olrec-int8" in by:
        ratio = by["olrec-int8"].vs_echo
        lines.append(target("olrec-int8 rps / echo rps (>= 0.5)", ratio, ratio >= 0.5, ".2f"))
    if "olrec-int8" in by:
        p99 = by["olrec-int8"].p99_ms
        lines.append(target(f"olrec-int8 p99 ms at {args.rate:g} rps (<= 25)", p99, p99 <= 25, ".1f"))
    s = cmp["speedup_triton"]
    lines.append(target("speedup_triton fp32/int8 (>= 1.3)", s, s >= 1.3, ".2f"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "ml-100k")
    ap.add_argument("--train-events", type=int, default=100_000)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--replica-cpus", type=float, default=1.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rate", type=float, default=50.0, help="open-loop requests/s")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of each loop, per system")
    ap.add_argument("--rounds", type=int, default=4, help="closed-loop rounds, systems interleaved (default 4)")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of closed loop before measuring")
    ap.add_argument("--seq-calls", type=int, default=200, help="sequential calls per median latency")
    ap.add_argument("--triton-calls", type=int, default=500)
    ap.add_argument("--hidden", default=None, help="the dense tower's hidden sizes, e.g. 512,256 "
                                                   f"(default LearnerConfig's {LearnerConfig().hidden})")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset (default all)")
    ap.add_argument("--json", type=Path, help="write the records here as a JSON list")
    args = ap.parse_args(argv)
    args.systems = [s for s in args.systems.split(",") if s]
    if unknown := set(args.systems) - set(SYSTEMS):
        ap.error(f"--systems: unknown {sorted(unknown)}; known {list(SYSTEMS)}")
    cfg = LearnerConfig(hidden=tuple(int(x) for x in args.hidden.split(","))) if args.hidden else LearnerConfig()
    args.hidden_sizes = cfg.hidden
    # SIGTERM as Ctrl-C: main's ExitStack stops Serve, Triton and Ray and removes the temp dirs.
    on_term = lambda *_: sys.exit(143)  # noqa: E731
    signal.signal(signal.SIGTERM, on_term)
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization's per-call advice
    logging.getLogger("ray.serve").setLevel(logging.WARNING)

    import ray
    from ray.serve.config import gRPCOptions

    from serve.app import SERVICER_FUNCTIONS

    with ExitStack() as stack:
        tmp = Path(tempfile.mkdtemp(prefix="olrec-bench-serve-"))
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        events = read_ml100k(args.data)
        t0 = time.time()
        runs = {"base": tmp / "run", "int8": tmp / "run-int8", "fp32": tmp / "run-fp32"}
        learn_into_run(events.slice(0, args.train_events), ml100k_spec(), cfg, runs["base"], shards=2)
        for k in ("int8", "fp32"):  # a run per precision: the publisher writes run/triton
            shutil.copytree(runs["base"], runs[k])
        model = ServingModel(ServeConfig(run_dir=str(runs["base"])))
        model.apply(model.read_update())
        users = np.unique(events.slice(0, args.train_events)["user_id"].to_numpy())
        np.random.default_rng(0).shuffle(users)
        # The int8/fp32 batch: a known user's 100 retrieved candidates, as the replica would rank them.
        user = int(users[0])
        items, _ = model.retrieve(user, 100, [])
        _, emb_t, num_t, _ = model.inputs(user, items, {})
        emb, num = emb_t.numpy(), num_t.numpy()
        d_auc = auc_delta(events, cfg, tmp)
        print(f"trained on {args.train_events:,} events ({model.catalog.items.size:,} items, {len(users):,} users), "
              f"AUC check: {time.time() - t0:.1f} s", flush=True)

        # Logical CPUs: every app's replicas (every other deployment asks for 0;
        # all apps are up at once, one loaded at a time), at least 2 as in the
        # tests: overcommitted on this 2-core machine. Ray and
        # Serve settings: olrec's (olrec/rayenv.py), as `olrec serve` starts a cluster.
        apply_env()
        ray.init(address="local", num_cpus=max(2, math.ceil(args.replicas * args.replica_cpus * len(args.systems))),
                 include_dashboard=False, log_to_driver=False, configure_logging=False)
        signal.signal(signal.SIGTERM, on_term)  # again: ray.init installs a handler that aborts
        stack.callback(ray.shutdown)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()},
                    grpc_options=gRPCOptions(port=port, grpc_servicer_functions=SERVICER_FUNCTIONS))
        stack.callback(serve.shutdown)
        results = asyncio.run(run_systems(args, runs, users, port, (user, items, emb, num), stack))

        # The int8 run's publish wrote both files of the same tower (fp32 export, then its quantization).
        onnx_dir = runs["int8"] / "triton" / "onnx"
        files = {k: onnx_dir / f"olrec_ranker.{k}.onnx" for k in ("fp32", "int8")}
        have = all(p.is_file() for p in files.values())
        ort = ort_ms(files, emb, num) if have else dict.fromkeys(files, math.nan)
        by = {r.system: r for r in results}

        def fp32_over_int8(field: str) -> float:
            both = "olrec-int8" in by and "olrec-fp32" in by
            return getattr(by["olrec-fp32"], field) / getattr(by["olrec-int8"], field) if both else math.nan

        cmp = {"system": "int8-vs-fp32", "speedup_triton": fp32_over_int8("triton_ms"),
               "speedup_e2e": fp32_over_int8("score_ms"),
               "size_ratio": files["int8"].stat().st_size / files["fp32"].stat().st_size if have else math.nan,
               "auc_delta": d_auc}
    print()
    print(table(results, cmp, ort, args))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        plain = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()}  # valid JSON
                 for r in [*(r.record() for r in results), cmp]]
        args.json.write_text(json.dumps(plain, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # everything is cleaned up by then (main's ExitStack)
        sys.exit(130)
