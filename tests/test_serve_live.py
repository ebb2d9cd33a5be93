"""Serving next to a live trainer: fresh weights reach answers, and a replica
killed under steady load costs at most 1% of the requests.

One continuous ``olrec.train.train`` (1 worker, 1 shard) on the session
cluster follows the run's log; the app (2 replicas, in-process scoring: Triton
is covered by test_serve.py) refreshes rows from the live shard.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from olrec.features import ml100k_spec
from olrec.learner import LearnerConfig
from olrec.log import EventLog
from olrec.serving import ServeConfig
from olrec.sources import read_ml100k
from olrec.train import TrainConfig
from olrec.v1 import recommender_pb2 as pb
from raycluster import Background, wait_for
from servingrun import ML100K
from test_serve import Client

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not ML100K.is_dir(), reason="MovieLens-100K not beside the repo")]

APP = "olrec-live"
USER, ITEM = 259, 1  # a user and an item of the first events


@pytest.fixture(scope="module")
def live(serve_grpc, tmp_path_factory):
    from ray import serve

    from serve.app import application

    root = tmp_path_factory.mktemp("live")
    with EventLog(root / "log") as log:
        log.append(read_ml100k(ML100K).slice(0, 20_000))
    tc = TrainConfig(workers=1, shards=1, continuous=True, report_every_s=0.5, checkpoint_every_s=3600,
                     poll_interval=0.1)
    with Background(ml100k_spec(), LearnerConfig(), tc, root) as trainer:
        cfg = ServeConfig(run_dir=str(root), scorer="in_process", refresh_s=0.2)
        client = Client(serve_grpc, APP)
        wait_for(lambda: (root / "published.pt").is_file(), 120, "the trainer's first publish")
        # 0.1 CPU a replica: the trainer holds most of the session cluster's two
        serve.run(application(cfg, num_replicas=2, ray_actor_options={"num_cpus": 0.1}), name=APP,
                  route_prefix=f"/{APP}")
        wait_for(lambda: client("Score", pb.ScoreRequest(user_id=USER, item_ids=[ITEM])).watermark >= 20_000, 120,
                 "the served watermark to reach the initial log's end")
        try:
            yield client, root
        finally:
            serve.delete(APP)
            (root / "STOP").touch()
            trainer.join(120)


def test_feedback_is_trained_and_served_within_seconds(live):
    client, root = live
    before = client("Score", pb.ScoreRequest(user_id=USER, item_ids=[ITEM]))
    assert before.watermark >= 20_000
    events = [pb.Event(user_id=USER, item_id=ITEM, label=1) for _ in range(30)]
    offsets = client("Feedback", pb.FeedbackRequest(events=events)).offsets
    assert list(offsets) == list(range(offsets[0], offsets[0] + 30)) and offsets[0] >= 20_000
    sent = time.monotonic()
    after = wait_for(lambda: (r := client("Score", pb.ScoreRequest(user_id=USER, item_ids=[ITEM]))).watermark
                     > offsets[-1] and r, 60, "a Score whose watermark is past the feedback")
    print(f"feedback served after {time.monotonic() - sent:.2f} s (W {before.watermark} -> {after.watermark})")
    assert after.scores[0] > before.scores[0], (before.scores[0], after.scores[0])


def test_a_replica_killed_under_steady_load_fails_at_most_one_percent(live):
    import ray
    from ray import serve

    client, _ = live
    rate, seconds = 110, 22  # >= 2,000 requests over >= 20 s
    results: list[grpc.StatusCode] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        code = client.code("Recommend", pb.RecommendRequest(user_id=USER + i % 50, k=10), timeout=10)
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
