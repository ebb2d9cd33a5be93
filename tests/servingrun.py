"""A trained run directory without Ray (for serving tests): MovieLens events in
the log, a learner over in-process shards trained on them, one checkpoint."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import torch

from olrec.checkpoint import CheckpointStore
from olrec.features import encode, ml100k_spec
from olrec.learner import LearnerConfig, OnlineLearner, learner_tables
from olrec.log import EventLog
from olrec.ps import LocalShard, ShardedTables
from olrec.sources import read_ml100k
from olrec.train import RunPaths, write_model

ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"


def make_run(root: Path, n_events: int = 20_000, shards: int = 2, cfg: LearnerConfig = LearnerConfig()) -> OnlineLearner:
    """Train on the first ``n_events`` of MovieLens-100K into ``root``; returns the learner."""
    paths, spec = RunPaths(Path(root)), ml100k_spec()
    with EventLog(paths.log) as log:
        log.append(read_ml100k(ML100K).slice(0, n_events))
    store = ShardedTables([LocalShard(learner_tables(spec, cfg), i) for i in range(shards)])
    learner = OnlineLearner(spec, cfg, store=store)
    for t in EventLog(paths.log, create=False).read(0):
        for i in range(0, t.num_rows, cfg.batch_size):
            learner.step(encode(t.slice(i, cfg.batch_size), spec))
    ckpts = CheckpointStore(paths.checkpoints)
    staging = ckpts.stage()
    store.snapshot(str(staging))
    torch.save(learner.dense_state_dict(), staging / "dense.pt")
    np.savez(staging / "progress.npz", offsets=np.zeros(0), preds=np.zeros(0), labels=np.zeros(0))
    ckpts.commit(staging, n_events, {"events": n_events})
    write_model(paths, spec, cfg, shards)
    return learner


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
