"""A trained run directory without Ray, for serving tests, and a free port."""

from __future__ import annotations

import socket
from pathlib import Path

from olrec.features import ml100k_spec
from olrec.learner import LearnerConfig, OnlineLearner
from olrec.sources import read_ml100k
from olrec.train import learn_into_run

ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"


def make_run(root: Path, n_events: int = 20_000, shards: int = 2, cfg: LearnerConfig = LearnerConfig()) -> OnlineLearner:
    """The first ``n_events`` of MovieLens-100K learned into ``root``; returns the learner."""
    return learn_into_run(read_ml100k(ML100K).slice(0, n_events), ml100k_spec(), cfg, root, shards=shards)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
