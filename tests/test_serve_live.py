"""Serving next to a live trainer: Feedback is trained and served within seconds.

One continuous ``olrec.train.train`` (1 worker, 1 shard) on the session
cluster follows the run's log; the app (in-process scoring: Triton is covered
by test_serve.py) refreshes rows from the live shard.
"""

from __future__ import annotations

import time

import pytest

from olrec.features import ml100k_spec
from olrec.learner import LearnerConfig
from olrec.log import EventLog
from olrec.serving import ServeConfig
from olrec.sources import read_ml100k
from olrec.train import RunPaths, TrainConfig, latest_published
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
        wait_for(lambda: latest_published(RunPaths(root)) is not None, 120, "the trainer's first publish")
        # 0.1 CPU: the trainer holds most of the session cluster's two
        serve.run(application(cfg, num_replicas=1, ray_actor_options={"num_cpus": 0.1}), name=APP,
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
