"""The Serve application over real gRPC: Recommend, Score, Feedback, health,
reflection, bad input, deadlines, and Triton going away and coming back.

One app per module on the session's Serve instance (``serve_grpc``), serving a
checkpoint (serving-only mode) with the int8 ranking model in a real Triton;
the last tests redeploy it (the Triton fallback, then 2 replicas, one killed).
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import MAX_MESSAGE
from olrec.log import EventLog
from olrec.serving import ServeConfig
from olrec.v1 import recommender_pb2 as pb
from olrec.v1 import recommender_pb2_grpc as pbg
from raycluster import wait_for
from servingrun import ML100K, free_port, make_run

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not ML100K.is_dir(), reason="MovieLens-100K not beside the repo")]

APP = "olrec-test"
TOKEN = "s3cret"
OK_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.RESOURCE_EXHAUSTED}


class Client:
    """A gRPC client of one Serve application (its name goes in the metadata)."""

    def __init__(self, port: int, app: str) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[
            ("grpc.max_send_message_length", 64 * 1024 * 1024)])
        self.stub = pbg.RecommenderStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.md = (("application", app),)

    def __call__(self, method: str, request, token: str | None = None, timeout: float = 10.0):
        md = self.md + ((("authorization", f"Bearer {token}"),) if token else ())
        return getattr(self.stub, method)(request, metadata=md, timeout=timeout)

    def code(self, method: str, request, **kw) -> grpc.StatusCode:
        try:
            self(method, request, **kw)
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            return e.code()

    def serving(self) -> bool:
        r = self.health.Check(health_pb2.HealthCheckRequest(service="olrec.v1.Recommender"), metadata=self.md,
                              timeout=10)
        return r.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    from olrec.triton import TritonServer

    root = tmp_path_factory.mktemp("served")
    make_run(root)
    (root / "triton" / "local").mkdir(parents=True)
    # No model at start: the app's DensePublisher publishes the run's dense tower and loads it.
    server = TritonServer(root / "triton" / "local", models=(), grpc_port=free_port(), http_port=free_port(),
                          metrics_port=free_port())
    server.start()
    yield root, server
    server.close()


@pytest.fixture(scope="module")
def app(serve_grpc, triton):
    from ray import serve

    from serve.app import application

    root, server = triton
    cfg = ServeConfig(run_dir=str(root), triton_url=server.url, feedback_token=TOKEN, max_k=50, max_ids=100,
                      candidates=100)
    serve.run(application(cfg, num_replicas=1, ray_actor_options={"num_cpus": 0.25}), name=APP,
              route_prefix=f"/{APP}")
    client = Client(serve_grpc, APP)
    # Ready once Triton has the published model: a Score through it succeeds.
    wait_for(lambda: client.code("Score", pb.ScoreRequest(user_id=259, item_ids=[1])) == grpc.StatusCode.OK, 120,
             "the app to score through Triton")
    yield client, root, server
    serve.delete(APP)


def test_recommend_returns_k_fresh_items_from_triton(app):
    client, root, _ = app
    r = client("Recommend", pb.RecommendRequest(user_id=259, k=10, exclude_item_ids=[22, 242]))
    ids = [it.item_id for it in r.items]
    assert len(ids) == 10 == len(set(ids)) and not {22, 242} & set(ids)
    scores = [it.score for it in r.items]
    assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
    assert r.watermark == 20_000 and r.dense_version == "20000"
    assert r.scorer == pb.SCORER_TRITON_INT8 and r.retrieval == pb.RETRIEVAL_PERSONAL
    cold = client("Recommend", pb.RecommendRequest(user_id=10**12, k=5))
    assert cold.retrieval == pb.RETRIEVAL_POPULARITY and len(cold.items) == 5


def test_score_matches_recommend_and_handles_unknown_items(app):
    client, _, _ = app
    rec = client("Recommend", pb.RecommendRequest(user_id=259, k=3))
    ids = [it.item_id for it in rec.items]
    s = client("Score", pb.ScoreRequest(user_id=259, item_ids=[*ids, 10**9]))
    # the same pairs: the same scores (static int8 scales: a row's score does not depend on its batch)
    np.testing.assert_allclose(s.scores[:3], [it.score for it in rec.items], rtol=1e-6)
    assert 0 < s.scores[3] < 1  # an item never seen: the model's cold-start score, not an error
    assert s.watermark == 20_000 and s.scorer == pb.SCORER_TRITON_INT8


def test_concurrent_calls_share_ranking_passes_and_get_the_scores_they_get_alone(app):
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    client, _, _ = app
    reqs = [pb.ScoreRequest(user_id=u, item_ids=range(1, 51)) for u in (259, 7, 13, 42, 100, 200, 300, 400)]
    alone = [list(client("Score", r).scores) for r in reqs]
    before = serve.get_app_handle(APP).stats.remote().result()["batches"]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda r: list(client("Score", r).scores), reqs * 4))
    passes = serve.get_app_handle(APP).stats.remote().result()["batches"] - before
    print(f"{len(together)} concurrent Score calls in {passes} ranking passes")
    assert passes < len(together)  # calls that queued behind others shared a pass
    for i, scores in enumerate(together):
        np.testing.assert_allclose(scores, alone[i % len(reqs)], rtol=1e-6)


def test_feedback_lands_in_the_log_at_the_returned_offsets(app):
    client, root, _ = app
    events = [pb.Event(user_id=259, item_id=1, label=1, context={"age": pb.Value(text="18-24")}),
              pb.Event(user_id=7, item_id=2, label=0, ts=1.5e9)]
    r = client("Feedback", pb.FeedbackRequest(events=events), token=TOKEN)
    assert len(r.offsets) == 2 and r.offsets[1] == r.offsets[0] + 1 and r.offsets[0] >= 20_000
    got = pa_rows(root, r.offsets[0], r.offsets[1] + 1)
    assert [(g["user_id"], g["item_id"], g["label"], g["age"]) for g in got] == [(259, 1, 1, "18-24"), (7, 2, 0, None)]
    assert got[1]["ts"] == 1.5e9 and got[0]["ts"] > 1.7e9  # ts 0: the time the service got it
    for token in (None, "wrong"):
        try:
            client("Feedback", pb.FeedbackRequest(events=events), token=token)
            raise AssertionError("Feedback without the right token was accepted")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "token" in e.details()


def pa_rows(root: Path, start: int, end: int) -> list[dict]:
    return [r for t in EventLog(root / "log", create=False).read(start, end) for r in t.to_pylist()]


def test_health_and_reflection(app):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    client, _, _ = app
    assert client.serving()
    try:
        client.health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), metadata=client.md, timeout=10)
        raise AssertionError("an unknown service was reported healthy")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND
    watch = client.health.Watch(health_pb2.HealthCheckRequest(service="olrec.v1.Recommender"), metadata=client.md,
                                timeout=10)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING  # the current status first
    watch.cancel()
    db = ProtoReflectionDescriptorDatabase(client.channel)
    assert {"olrec.v1.Recommender", "grpc.health.v1.Health"} <= set(db.get_services())
    service = DescriptorPool(db).FindServiceByName("olrec.v1.Recommender")
    assert [m.name for m in service.methods] == ["Recommend", "Score", "Feedback"]


@pytest.mark.parametrize("method,request_,field", [
    ("Recommend", pb.RecommendRequest(user_id=1, k=0), "k: must be in [1, 50], got 0"),
    ("Recommend", pb.RecommendRequest(user_id=1, k=51), "got 51"),
    ("Recommend", pb.RecommendRequest(user_id=1, k=5, exclude_item_ids=range(101)), "exclude_item_ids: 101 ids"),
    ("Recommend", pb.RecommendRequest(user_id=1, k=5, context={"shoe_size": pb.Value(number=9)}),
     "context: unknown field 'shoe_size'"),
    ("Score", pb.ScoreRequest(user_id=1), "item_ids: must not be empty"),
    ("Score", pb.ScoreRequest(user_id=1, item_ids=[1], context={"age": pb.Value(number=math.nan)}),
     "context['age']: must be text"),
    ("Score", pb.ScoreRequest(user_id=1, item_ids=[1], context={"genres": pb.Value(text="Drama")}),
     "unknown field 'genres'"),  # item-side: the catalog's, not the request's
    ("Feedback", pb.FeedbackRequest(events=[pb.Event(label=3)]), "events[0].label: must be 0 or 1, got 3"),
    ("Feedback", pb.FeedbackRequest(events=[pb.Event(ts=math.inf)]), "events[0].ts"),
])
def test_bad_requests_are_invalid_argument_naming_the_field(app, method, request_, field):
    client, _, _ = app
    try:
        client(method, request_, token=TOKEN)
        raise AssertionError(f"{method} accepted a bad request")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details()
        assert field in e.details()


def test_an_oversized_message_is_resource_exhausted(app):
    client, _, _ = app
    huge = pb.ScoreRequest(user_id=1, item_ids=[1], context={"zip": pb.Value(text="x" * (MAX_MESSAGE + 1))})
    assert client.code("Score", huge) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert client.serving()


values = st.one_of(st.builds(pb.Value, text=st.text(max_size=8)),
                   st.builds(pb.Value, number=st.floats(allow_nan=True, allow_infinity=True)), st.builds(pb.Value))
contexts = st.dictionaries(st.sampled_from(["age", "gender", "occupation", "zip", "genres", "year", "bogus", ""]),
                           values, max_size=3)
ids = st.lists(st.integers(-2**63, 2**63 - 1), max_size=120)
requests = st.one_of(
    st.tuples(st.just("Recommend"), st.builds(pb.RecommendRequest, user_id=st.integers(-2**63, 2**63 - 1),
                                              k=st.integers(-2**31, 2**31 - 1), context=contexts,
                                              exclude_item_ids=ids)),
    st.tuples(st.just("Score"), st.builds(pb.ScoreRequest, user_id=st.integers(-2**63, 2**63 - 1), item_ids=ids,
                                          context=contexts)),
    st.tuples(st.just("Feedback"), st.builds(pb.FeedbackRequest, events=st.lists(st.builds(
        pb.Event, user_id=st.integers(-2**63, 2**63 - 1), item_id=st.integers(-2**63, 2**63 - 1),
        label=st.integers(-3, 3), ts=st.floats(allow_nan=True, allow_infinity=True), context=contexts),
        max_size=3))))


@given(call=requests, token=st.sampled_from([None, "wrong", TOKEN]))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzzed_requests_never_get_unknown_or_internal(app, call, token):
    client, _, _ = app
    method, request_ = call
    if method == "Feedback" and token == TOKEN:
        request_ = pb.FeedbackRequest(events=[e for e in request_.events if not (0 <= e.label <= 1)])
    code = client.code(method, request_, token=token)
    assert code in OK_CODES, (code, request_)


def test_fuzzed_replica_stays_healthy(app):
    client, _, _ = app  # runs after the fuzz test: the replica answered everything and is still serving
    assert client.serving()
    assert client.code("Recommend", pb.RecommendRequest(user_id=259, k=5)) == grpc.StatusCode.OK


def test_a_passed_deadline_is_deadline_exceeded_and_cancels_the_call_in_the_replica(app):
    from ray import serve

    client, _, _ = app
    assert client.code("Recommend", pb.RecommendRequest(user_id=259, k=10), timeout=0.001) == \
        grpc.StatusCode.DEADLINE_EXCEEDED
    before = serve.get_app_handle(APP).stats.remote().result()["cancelled"]
    # Deadlines from below to above a Score's latency: some pass while the replica works on the call.
    codes = [client.code("Score", pb.ScoreRequest(user_id=259, item_ids=range(1, 101)), timeout=ms / 1000)
             for ms in range(2, 60)]
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED}
    assert grpc.StatusCode.DEADLINE_EXCEEDED in codes and grpc.StatusCode.OK in codes
    after = serve.get_app_handle(APP).stats.remote().result()["cancelled"]
    print(f"cancelled in the replica: {after['requests'] - before['requests']} calls, "
          f"{after['triton_calls'] - before['triton_calls']} of them while waiting on Triton")
    assert after["requests"] > before["requests"]  # the client's deadline reached the replica's call
    # Scoring awaits nothing but Triton: a cancel that reaches the replica lands there, and cancels it.
    assert after["triton_calls"] > before["triton_calls"]
    assert client.code("Recommend", pb.RecommendRequest(user_id=259, k=10)) == grpc.StatusCode.OK


def test_triton_stopped_gives_unavailable_then_recovers(app):
    client, _, server = app
    req = pb.ScoreRequest(user_id=259, item_ids=[1, 2, 3])
    server.stop()
    try:
        t = time.monotonic()
        try:
            client("Score", req, timeout=5)
            raise AssertionError("scored with Triton down")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE and "ranking model is unavailable" in e.details()
        assert time.monotonic() - t < 5
        assert client.serving()  # the replica itself is fine
    finally:
        server.start()
    wait_for(lambda: client.code("Score", req) == grpc.StatusCode.OK, 60, "scores once Triton is back")


def test_a_new_checkpoint_swaps_rows_and_the_triton_version_under_load(app):
    """Feedback appends events; learning them gives a newer checkpoint. Replicas
    reload its rows and watermark, the publisher has Triton load its dense
    version, and calls running through all of it never fail."""
    from olrec.checkpoint import CheckpointStore
    from olrec.features import encode, ml100k_spec
    from olrec.learner import LearnerConfig
    from olrec.train import learner_from_checkpoint, stage_checkpoint

    client, root, _ = app
    req = pb.ScoreRequest(user_id=259, item_ids=[1, 2, 3])
    old = client("Score", req)
    events = [pb.Event(user_id=259 + i % 7, item_id=1 + i % 11, label=i % 2) for i in range(100)]
    offsets = client("Feedback", pb.FeedbackRequest(events=events), token=TOKEN).offsets
    end = offsets[-1] + 1
    ckpts = CheckpointStore(root / "checkpoints")
    learner = learner_from_checkpoint(ckpts.latest().path, ml100k_spec(), LearnerConfig())
    for t in EventLog(root / "log", create=False).read(old.watermark, end):
        learner.step(encode(t, ml100k_spec()))
    staging = stage_checkpoint(ckpts, learner)

    codes: list[grpc.StatusCode] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            codes.append(client.code("Score", req))

    worker = threading.Thread(target=load)
    worker.start()
    try:
        ckpts.commit(staging, end, {"events": int(learner.events)})
        new = wait_for(lambda: (r := client("Score", req)).dense_version == str(learner.events) and r, 90,
                       "answers from the new dense version in Triton")
    finally:
        stop.set()
        worker.join(30)
    assert new.watermark == end and new.scorer == pb.SCORER_TRITON_INT8
    assert codes and set(codes) == {grpc.StatusCode.OK}, {c: codes.count(c) for c in set(codes)}


def test_with_the_fallback_configured_triton_down_scores_in_process_and_says_so(app, serve_grpc):
    from ray import serve

    from serve.app import application

    client, root, server = app
    cfg = ServeConfig(run_dir=str(root), triton_url=server.url, feedback_token=TOKEN, max_k=50, max_ids=100,
                      candidates=100, on_triton_down="in_process")
    serve.run(application(cfg, num_replicas=1, ray_actor_options={"num_cpus": 0.25}), name=APP, route_prefix=f"/{APP}")
    req = pb.ScoreRequest(user_id=259, item_ids=[1, 2, 3])
    up = wait_for(lambda: client("Score", req), 60, "the updated app to answer")
    server.stop()
    try:
        down = client("Score", req, timeout=5)
        assert down.scorer == pb.SCORER_FALLBACK_IN_PROCESS and down.watermark == up.watermark
        np.testing.assert_allclose(down.scores, up.scores, atol=2e-3)  # fp32 in the replica vs int8 in Triton
    finally:
        server.start()
    wait_for(lambda: client("Score", req).scorer == pb.SCORER_TRITON_INT8, 60, "Triton scoring again")


def test_one_of_two_replicas_killed_under_steady_load_fails_at_most_one_percent(app):
    """Last in this module: it redeploys the app with 2 replicas (Triton scoring)."""
    import ray
    from ray import serve

    from serve.app import application

    client, root, server = app
    cfg = ServeConfig(run_dir=str(root), triton_url=server.url, feedback_token=TOKEN, max_k=50, max_ids=100,
                      candidates=100)
    serve.run(application(cfg, num_replicas=2, ray_actor_options={"num_cpus": 0.25}), name=APP, route_prefix=f"/{APP}")
    rate, seconds = 100, 21  # >= 2,000 requests over >= 20 s
    results: list[grpc.StatusCode] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        code = client.code("Recommend", pb.RecommendRequest(user_id=259 + i % 50, k=10), timeout=10)
        with lock:
            results.append(code)

    def replicas() -> list[str]:
        """Names of the live Recommender replicas (Serve names them SERVE_REPLICA::<app>#<deployment>#<id>)."""
        return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith(f"SERVE_REPLICA::{APP}#Recommender#")]

    wait_for(lambda: len(replicas()) == 2, 60, "2 replicas")
    start = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        for i in range(rate * seconds):
            if i == rate * seconds // 3:
                victim = replicas()[0]
                ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
            time.sleep(max(0.0, start + i / rate - time.monotonic()))  # open loop: on schedule
            pool.submit(one, i)
    failed = [c for c in results if c != grpc.StatusCode.OK]
    print(f"{len(results)} requests over {time.monotonic() - start:.1f} s, {len(failed)} failed: {set(failed)}")
    assert len(results) >= 2_000 and time.monotonic() - start >= 20
    assert len(failed) <= 0.01 * len(results)

    def recovered() -> bool:
        status = serve.status().applications[APP].deployments["Recommender"].status
        return status == "HEALTHY" and len(replicas()) == 2 and victim not in replicas()

    wait_for(recovered, 120, "the deployment back at 2 healthy replicas")
