"""The olrec Ray Serve application: gRPC recommendations from fresh weights.

Import path ``serve.app:build`` (``serve run serve/config.yaml``, a KubeRay
RayService). Deployments:

- ``Recommender`` (the ingress, autoscaled): answers ``olrec.v1.Recommender``
  and ``grpc.health.v1.Health`` calls through Ray Serve's gRPC proxy. Each
  replica keeps the rows it serves and refreshes them every ``refresh_s``
  (:class:`olrec.serving.ServingModel`); the dense ranking tower runs in
  Triton (int8 by default) or in the replica. Calls that arrive while others
  are being ranked are ranked together in one pass (:mod:`olrec.batcher`).
- ``LogWriter`` (one replica): the event log's single writer; Feedback appends through it.
- ``DensePublisher`` (one replica, with the Triton scorer): exports each
  new dense version the trainer publishes to the Triton model repositories
  and has Triton load it.

Bad input is answered with INVALID_ARGUMENT, UNAUTHENTICATED or
RESOURCE_EXHAUSTED naming the field and value; a refresh that fails is
retried and never fails a request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, fields
from typing import Any, AsyncIterator

import grpc
import numpy as np
import pyarrow as pa
import torch
from grpc_health.v1 import health_pb2
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext

from olrec import storage
from olrec.batcher import MicroBatcher
from olrec.export import MAX_BATCH
from olrec.features import Batch
from olrec.serving import (RequestError, ServeConfig, ServingModel, bad, check_context, check_ids, check_token,
                           feedback_table)
from olrec.v1 import recommender_pb2 as pb

log = logging.getLogger("ray.serve")

SERVICE = "olrec.v1.Recommender"
#: The gRPC servicer functions Serve's proxy registers (serve/config.yaml lists the same).
SERVICER_FUNCTIONS = ["olrec.v1.recommender_pb2_grpc.add_RecommenderServicer_to_server",
                      "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"]


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class LogWriter:
    """The one writer of the run's event log (it holds the log's writer lock)."""

    def __init__(self, log_dir: str) -> None:
        from olrec.log import EventLog

        self.log = EventLog(log_dir).open_writer()

    def append(self, table: pa.Table) -> tuple[int, int, int]:
        r = self.log.append(table)
        return r.start, r.end, r.n_bad


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class DensePublisher:
    """Watches the run's published dense weights (or newest checkpoint) and publishes each
    new dense version to the Triton model repositories (version number = the
    events the weights had learned), at most every ``every_s`` seconds."""

    async def __init__(self, cfg: dict, every_s: float = 2.0) -> None:
        from olrec.serving import DenseWatcher

        self.watcher = DenseWatcher(ServeConfig(**cfg))
        self.every_s = every_s
        # Exporting and quantizing is background work: its thread yields the CPU to the replicas'
        # requests where they share a machine (a Linux nice value is per thread).
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="olrec-publish", initializer=os.nice, initargs=(5,))
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                await loop.run_in_executor(self._pool, self.watcher.step)
            except Exception as e:  # keep publishing later versions; replicas keep the last one
                log.warning("olrec: publishing the dense tower to Triton failed: %s", e)
            # Until Triton holds a version the replicas answer UNAVAILABLE: look again soon.
            await asyncio.sleep(self.every_s if self.watcher.published is not None else min(self.every_s, 0.5))

    def version(self) -> int | None:
        return self.watcher.published


@serve.deployment(
    ray_actor_options={"num_cpus": 0.5},
    max_ongoing_requests=32,
    autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8},
    health_check_period_s=2,
)
class Recommender:
    async def __init__(self, cfg: dict, writer: Any = None, publisher: Any = None) -> None:
        from olrec.telemetry import ServeMetrics

        self.cfg = ServeConfig(**cfg)
        self.model = ServingModel(self.cfg)
        self.metrics = ServeMetrics({"run": storage.name_of(self.cfg.run_dir)})
        self.writer, self.publisher = writer, publisher
        # Calls whose client gave up (deadline, cancel): Serve cancels them here, mid-Triton-call included.
        self.cancelled = {"requests": 0, "triton_calls": 0}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="olrec-refresh")
        self._triton = None
        if self.cfg.scorer == "triton":
            from olrec.triton import TritonRanker

            self._triton = TritonRanker(self.cfg.triton_url, self.cfg.triton_model, timeout_s=self.cfg.triton_timeout_s)
        self._scorer = pb.SCORER_IN_PROCESS if self.cfg.scorer == "in_process" else (
            pb.SCORER_TRITON_INT8 if self.cfg.precision == "int8" else pb.SCORER_TRITON_FP32)
        # A pass's fixed cost (feature lookups, the Triton call) is most of a
        # small call's: calls that queue while others are ranked share one.
        self._batcher = MicroBatcher(self._rank, rows=len, max_rows=MAX_BATCH)
        await self._refresh()
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever())

    # -- weights ------------------------------------------------------------
    async def _refresh(self) -> None:
        up = await asyncio.get_running_loop().run_in_executor(self._pool, self.model.read_update)
        self.model.apply(up)  # on the event loop, between requests
        snap = self.model.snapshot
        if snap is not None:
            self.metrics.record({"watermark": snap.watermark, "dense_events": float(snap.dense_version),
                                 "rows": len(self.model.mirrors["sparse"])})

    async def _refresh_forever(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.cfg.refresh_s)
            try:
                await self._refresh()
                failing = False
            except Exception as e:  # a shard restarting, a file being replaced: next time
                if not failing:
                    log.warning("olrec: weight refresh failed (serving the weights held): %r", e)
                failing = True

    async def _tower(self, snap: Any, emb: torch.Tensor, num: torch.Tensor) -> tuple[torch.Tensor, str, int]:
        """The ranking tower's logits, the dense version that gave them and the scorer."""
        if self._triton is None:
            with torch.no_grad():
                return snap.learner.model(emb, num), snap.dense_version, self._scorer
        from olrec.triton import TritonUnavailable

        try:
            logits, version = await self._triton.logits(emb.numpy(), num.numpy())
            return torch.from_numpy(np.array(logits)), version, self._scorer  # tritonclient's arrays are read-only
        except asyncio.CancelledError:
            self.cancelled["triton_calls"] += 1
            raise
        except TritonUnavailable as e:
            if self.cfg.on_triton_down != "in_process":
                raise RequestError("UNAVAILABLE", f"the ranking model is unavailable: {e}") from e
            with torch.no_grad():
                return snap.learner.model(emb, num), snap.dense_version, pb.SCORER_FALLBACK_IN_PROCESS

    async def _score(self, user: int, items: np.ndarray, context: dict) -> tuple[np.ndarray, Any, str, int]:
        """(probabilities, snapshot, dense version, scorer) for ``items``, ranked with the calls queued beside it."""
        return await self._batcher.submit(self.model.catalog.batch(user, items, context))

    async def _rank(self, batches: list[Batch]) -> list[tuple[np.ndarray, Any, str, int]]:
        """One pass over several calls' candidates: one snapshot, one tower call."""
        snap, emb, num, p_wide = self.model.rank_inputs(Batch.concat(batches))
        logits, version, scorer = await self._tower(snap, emb, num)
        probs = snap.learner.blend_probs(logits, p_wide)
        return [(p, snap, version, scorer) for p in np.split(probs, np.cumsum([len(b) for b in batches])[:-1])]

    # -- the API --------------------------------------------------------------
    async def Recommend(self, request: pb.RecommendRequest, grpc_context: RayServegRPCContext) -> pb.RecommendResponse:
        async def answer() -> pb.RecommendResponse:
            if not 1 <= request.k <= self.cfg.max_k:
                raise bad(f"k: must be in [1, {self.cfg.max_k}], got {request.k}")
            exclude = check_ids(request.exclude_item_ids, "exclude_item_ids", self.cfg.max_ids, allow_empty=True)
            context = check_context(request.context, self.model.catalog.context_fields, self.model.spec, "context")
            self._need_model()
            candidates, personal = self.model.retrieve(request.user_id, max(self.cfg.candidates, request.k), exclude)
            resp = pb.RecommendResponse(retrieval=pb.RETRIEVAL_PERSONAL if personal else pb.RETRIEVAL_POPULARITY)
            if len(candidates) == 0:
                snap = self.model.snapshot
                resp.watermark, resp.dense_version, resp.scorer = snap.watermark, snap.dense_version, self._scorer
                return resp
            probs, snap, version, scorer = await self._score(request.user_id, candidates, context)
            top = np.argsort(-probs, kind="stable")[: request.k]
            resp.items.extend(pb.ScoredItem(item_id=int(candidates[i]), score=float(probs[i])) for i in top)
            resp.watermark, resp.dense_version, resp.scorer = snap.watermark, version, scorer
            return resp

        return await self._answer(grpc_context, pb.RecommendResponse, answer)

    async def Score(self, request: pb.ScoreRequest, grpc_context: RayServegRPCContext) -> pb.ScoreResponse:
        async def answer() -> pb.ScoreResponse:
            items = check_ids(request.item_ids, "item_ids", self.cfg.max_ids, allow_empty=False)
            context = check_context(request.context, self.model.catalog.context_fields, self.model.spec, "context")
            self._need_model()
            probs, snap, version, scorer = await self._score(request.user_id, items, context)
            return pb.ScoreResponse(scores=probs.tolist(), watermark=snap.watermark, dense_version=version,
                                    scorer=scorer)

        return await self._answer(grpc_context, pb.ScoreResponse, answer)

    async def Feedback(self, request: pb.FeedbackRequest, grpc_context: RayServegRPCContext) -> pb.FeedbackResponse:
        async def answer() -> pb.FeedbackResponse:
            check_token(grpc_context.invocation_metadata(), self.cfg.feedback_token)
            table = feedback_table(request.events, self.model.spec, self.cfg.max_ids, time.time())
            if self.writer is None:
                raise RequestError("FAILED_PRECONDITION", "this deployment has no log writer")
            start, end, n_bad = await self.writer.append.remote(table)
            if n_bad:  # checked above, so the log's validation should agree; say so if not
                raise bad(f"events: the event log rejected {n_bad} of {len(request.events)} events "
                          f"(see its dead-letter.jsonl); the others got offsets [{start}, {end})")
            return pb.FeedbackResponse(offsets=range(start, end))

        return await self._answer(grpc_context, pb.FeedbackResponse, answer)

    # -- grpc.health.v1.Health -------------------------------------------------
    def _health(self, service: str) -> int:
        if service not in ("", SERVICE):
            raise RequestError("NOT_FOUND", f"service: unknown service {service!r}; this server has {SERVICE!r}")
        return health_pb2.HealthCheckResponse.SERVING if self.model.ready else health_pb2.HealthCheckResponse.NOT_SERVING

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    grpc_context: RayServegRPCContext) -> health_pb2.HealthCheckResponse:
        async def answer() -> health_pb2.HealthCheckResponse:
            return health_pb2.HealthCheckResponse(status=self._health(request.service))

        return await self._answer(grpc_context, health_pb2.HealthCheckResponse, answer)

    async def Watch(self, request: health_pb2.HealthCheckRequest,
                    grpc_context: RayServegRPCContext) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last = None
        while True:
            try:
                status = self._health(request.service)
            except RequestError:
                status = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(1.0)

    # -- plumbing -------------------------------------------------------------
    def _need_model(self) -> None:
        if not self.model.ready:
            raise RequestError("UNAVAILABLE", f"no model yet: nothing trained in {storage.where(self.model.paths.root)} "
                                              "(no trainer publishing, no checkpoint)")

    async def _answer(self, grpc_context: RayServegRPCContext, empty: type, answer: Any) -> Any:
        start = time.perf_counter()
        ok = False
        try:
            out = await answer()
            ok = True
            return out
        except asyncio.CancelledError:
            self.cancelled["requests"] += 1
            self.metrics.inc("cancelled", 1)
            raise
        except RequestError as e:
            grpc_context.set_code(getattr(grpc.StatusCode, e.code))
            grpc_context.set_details(str(e))
            return empty()
        except Exception as e:  # a bug: INTERNAL with its message (the proxy cannot unpickle every exception)
            log.exception("olrec: request failed")
            grpc_context.set_code(grpc.StatusCode.INTERNAL)
            grpc_context.set_details(f"{type(e).__name__}: {e}")
            return empty()
        finally:
            self.metrics.inc("requests", 1)
            if not ok:
                self.metrics.inc("errors", 1)
            self.metrics.observe("latency_s", time.perf_counter() - start)

    def stats(self) -> dict[str, Any]:
        """This replica's counters (through a deployment handle)."""
        return {"cancelled": dict(self.cancelled), "refreshes": self.model.refreshes, "batches": self._batcher.batches,
                "watermark": None if self.model.snapshot is None else self.model.snapshot.watermark}

    def check_health(self) -> None:
        """Serve's replica health check: the refresher must be alive."""
        if self._refresher.done():
            raise RuntimeError(f"the weight refresher stopped: {self._refresher.exception()!r}")


def serve_config(args: dict[str, Any]) -> ServeConfig:
    """The application args as a validated :class:`ServeConfig` (unknown keys named)."""
    known = {f.name for f in fields(ServeConfig)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"serve config: unknown key(s) {unknown}; known keys: {sorted(known)}")
    if "run_dir" not in args:
        raise ValueError("serve config: run_dir is required (the olrec train run to serve)")
    args = dict(args)
    args["run_dir"] = str(storage.resolve(args["run_dir"]))
    if args.get("feedback_token") is None:
        import os

        args["feedback_token"] = os.environ.get("OLREC_FEEDBACK_TOKEN") or None
    return ServeConfig(**args)


def build(args: dict[str, Any]) -> serve.Application:
    """The application for ``serve run`` / a RayService (``args``: :class:`ServeConfig` fields)."""
    return application(serve_config(args))


def application(cfg: ServeConfig, *, publisher_node: str | None = None, **options: Any) -> serve.Application:
    """The application for ``cfg``; ``options`` go to the Recommender deployment
    (``num_replicas``, ``ray_actor_options``, ...). ``publisher_node``: the IP of the
    node whose Triton reads a repository on its own disk (``olrec serve``'s local
    Triton): the DensePublisher runs there."""
    plain = asdict(cfg)
    if "num_replicas" in options:  # a fixed count replaces the autoscaling config
        options.setdefault("autoscaling_config", None)
    writer = LogWriter.bind(str(storage.join(cfg.run_dir, "log")))
    pin = {"ray_actor_options": {"num_cpus": 0, "resources": {f"node:{publisher_node}": 0.001}}} if publisher_node else {}
    publisher = DensePublisher.options(**pin).bind(plain, cfg.publish_s) if cfg.scorer == "triton" else None
    return (Recommender.options(**options) if options else Recommender).bind(plain, writer, publisher)


__all__ = ["build", "application", "serve_config", "Recommender", "LogWriter", "DensePublisher", "SERVICER_FUNCTIONS"]
