"""Distributed training: the watermark's bookkeeping (pure functions), the
feeder, and real runs on the session's local Ray cluster: equivalence with
the in-process learner, and faults counted with a ledger of applied events."""

from __future__ import annotations

import os
import queue
import signal
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from olrec.train import (Applied, Feeder, Ledger, RunPaths, TrainConfig, count_from, intervals, latest_published,
                         ledger_writers, read_ledger, read_published)


# -- watermark bookkeeping ------------------------------------------------------------

def test_intervals_are_runs_of_consecutive_offsets() -> None:
    assert intervals(np.array([3, 4, 5, 9, 11, 12])) == [(3, 6), (9, 10), (11, 13)]
    assert intervals(np.array([], np.int64)) == []
    assert intervals(np.array([7, 5, 6])) == [(5, 8)]


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 50), st.lists(st.integers(1, 30), min_size=1, max_size=20), st.randoms(use_true_random=False),
       st.integers(0, 19))
def test_watermark_is_the_gap_free_prefix(start: int, sizes: list[int], rnd, hold: int) -> None:
    """Blocks applied in any order: the watermark is where the first block not yet applied begins."""
    bounds = np.cumsum([start] + sizes)
    blocks = list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))
    held = blocks[hold % len(blocks)]
    order = [b for b in blocks if b != held]
    rnd.shuffle(order)
    a = Applied(start)
    for b in order:
        a.add([b])
        assert a.watermark <= held[0]
    assert a.watermark == held[0]
    a.add([held])
    assert a.watermark == bounds[-1]


def test_applied_ignores_spans_below_the_watermark() -> None:
    a = Applied(100)
    a.add([(0, 50), (90, 120)])
    assert a.watermark == 120
    a.add([(130, 140)])
    assert a.watermark == 120


def test_ledger_parts_and_compactions_count_each_span_once(tmp_path: Path) -> None:
    a, b = Ledger(tmp_path, "rank0-1-5"), Ledger(tmp_path, "rank1-2-6")
    a.add([(0, 10)])
    a.flush()
    a.add([(20, 30)])
    a.flush()
    b.add([(10, 20)])
    b.flush()
    assert sorted(read_ledger(tmp_path)) == [(0, 10), (10, 20), (20, 30)]
    a.compact()  # a's two parts become one file
    a.add([(30, 40)])
    a.flush()
    assert sorted(os.listdir(tmp_path)) == ["rank0-1-5-c00000002.bin", "rank0-1-5-p00000002.bin",
                                            "rank1-2-6-p00000000.bin"]
    assert ledger_writers(tmp_path) == {"rank0-1-5": [(0, 10), (20, 30), (30, 40)], "rank1-2-6": [(10, 20)]}
    a.flush()  # nothing new: no file
    a.compact()
    assert sorted(os.listdir(tmp_path)) == ["rank0-1-5-c00000003.bin", "rank1-2-6-p00000000.bin"]
    spans = read_ledger(tmp_path)
    assert sorted(spans) == [(0, 10), (10, 20), (20, 40)]
    assert count_from(spans + [(5, 15)], 8) == 2 + 10 + 20 + 7
    with open(tmp_path / "rank0-7-8.bin", "wb") as f:  # appended by olrec before Ledger, its last record torn
        f.write(np.asarray([(40, 50)], np.int64).tobytes() + np.int64(60).tobytes())
    assert ledger_writers(tmp_path)["rank0-7-8"] == [(40, 50)]


def test_train_config_names_bad_values() -> None:
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        TrainConfig(workers=0)
    with pytest.raises(ValueError, match="poll_interval must be a positive number, got -1"):
        TrainConfig(poll_interval=-1)
    with pytest.raises(ValueError, match="max_failures"):
        TrainConfig(max_failures=-2)


# -- the feeder -------------------------------------------------------------------------

def _blocks(sizes: list[int]) -> list[pa.Table]:
    out, at = [], 0
    for n in sizes:
        out.append(pa.table({"offset": np.arange(at, at + n, dtype=np.int64)}))
        at += n
    return out


def test_feeder_cuts_full_batches_across_blocks() -> None:
    f = Feeder(iter(_blocks([3, 5, 4, 2])))
    got = []
    while True:
        t = f.take(4, wait=1.0, full=True)
        if t is None:
            break
        got.append(t["offset"].to_pylist())
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13]]
    assert f.done


def test_feeder_hands_over_what_arrived_without_waiting_for_a_full_batch() -> None:
    q: queue.Queue = queue.Queue()

    def blocks():
        while (b := q.get()) is not None:
            yield b

    f = Feeder(blocks())
    q.put(_blocks([3])[0])
    deadline = time.monotonic() + 10
    t = None
    while t is None and time.monotonic() < deadline:
        t = f.take(100, wait=0.05)
    assert t is not None and t["offset"].to_pylist() == [0, 1, 2]
    assert f.take(100, wait=0.01) is None and not f.done
    q.put(None)
    while not f.done and time.monotonic() < deadline:
        f.take(100, wait=0.05)
    assert f.done


def test_feeder_reraises_the_stream_error() -> None:
    def blocks():
        yield _blocks([2])[0]
        raise RuntimeError("the log vanished")

    f = Feeder(blocks())
    with pytest.raises(RuntimeError, match="the log vanished"):
        for _ in range(100):
            f.take(10, wait=0.1, full=True)


# -- real runs on the session's local Ray cluster ----------------------------------------

from olrec.checkpoint import CheckpointStore  # noqa: E402
from olrec.features import FeatureSpec, encode, ml100k_spec  # noqa: E402
from olrec.learner import LearnerConfig, OnlineLearner  # noqa: E402
from olrec.log import OFFSET, EventLog  # noqa: E402
from olrec.progressive import run_progressive  # noqa: E402
from olrec.sources import SyntheticConfig, read_ml100k, read_synthetic  # noqa: E402
from olrec.train import NAMESPACE, learner_from_checkpoint, shard_name, train  # noqa: E402
from raycluster import Background  # noqa: E402

ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"
SYN_SPEC = FeatureSpec()


def wait_for(cond, what: str, timeout: float = 120.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def fill(run_dir: Path, events: pa.Table) -> None:
    with EventLog(run_dir / "log").open_writer() as w:
        for at in range(0, events.num_rows, 4000):
            w.append(events.slice(at, 4000))


def synthetic(n: int) -> pa.Table:
    t = read_synthetic(SyntheticConfig(n_users=300, n_items=150, n_events=n, seed=5)).drop_columns(["p_true"])
    ids = pa.array(np.arange(n, dtype=np.int64) * 7 + 1_000_003)  # unique, unlike offsets
    return t.set_column(t.schema.get_field_index("event_id"), "event_id", ids)


def published_watermark(run_dir: Path | str) -> int:
    paths = RunPaths.of(run_dir)
    try:
        name = latest_published(paths)
        return -1 if name is None else int(read_published(paths, name)["watermark"])
    except FileNotFoundError:  # pruned between the listing and the read
        return -1


def applied_counts(run_dir: Path, n: int) -> np.ndarray:
    """How many times each offset's event was applied, from every worker's ledger."""
    counts = np.zeros(n, np.int64)
    for lo, hi in read_ledger(run_dir / "ledger"):
        counts[lo:hi] += 1
    return counts


def event_ids(run_dir: Path) -> np.ndarray:
    t = pa.concat_tables(list(EventLog(run_dir / "log", create=False).read(columns=["event_id"])))
    assert t[OFFSET].to_pylist() == list(range(t.num_rows))
    return t["event_id"].to_numpy()


def ledger_verdict(run_dir: Path, n: int) -> tuple[int, int]:
    """(lost, duplicated) event ids: appended but never applied, applied more than once."""
    ids = event_ids(run_dir)
    assert len(np.unique(ids)) == n
    applied = np.repeat(ids, applied_counts(run_dir, n))
    uniq, times = np.unique(applied, return_counts=True)
    lost = len(np.setdiff1d(ids, uniq))
    return lost, int((times - 1).sum())


@pytest.mark.slow
@pytest.mark.skipif(not ML100K.is_dir(), reason="MovieLens-100K not in ../shared/data")
def test_one_worker_one_shard_matches_the_in_process_learner(ray_cluster, tmp_path: Path) -> None:
    events = read_ml100k(ML100K).slice(0, 22_000)
    train_part, probe = events.slice(0, 20_000), events.slice(20_000)
    spec, cfg = ml100k_spec(), LearnerConfig()  # the foundation's defaults
    fill(tmp_path, train_part)
    metrics = train(spec, cfg, TrainConfig(workers=1, shards=1), tmp_path)
    assert metrics["events_trained"] == 20_000 and metrics["watermark"] == 20_000

    ref = OnlineLearner(spec, cfg)
    progressive = run_progressive(train_part, ref, frozen_at=None)
    latest = CheckpointStore(tmp_path / "checkpoints").latest()
    assert latest is not None and latest.watermark == 20_000
    with np.load(latest.file("progress.npz")) as z:
        assert z["offsets"].tolist() == list(range(20_000))
        np.testing.assert_allclose(z["preds"], progressive.pred, atol=1e-4)
    dist = learner_from_checkpoint(latest.path, spec, cfg)
    batch = encode(probe, spec)
    np.testing.assert_allclose(dist.predict(batch), ref.predict(batch), atol=1e-4)


def _kill_mid_run(tmp_path: Path, kill) -> tuple[dict, int, int]:
    """A bounded run over 24k synthetic events whose second half is appended
    only after ``kill(run_dir)`` hit the run (checkpoints every 5k events)."""
    events = synthetic(24_000)
    fill(tmp_path, events.slice(0, 12_000))
    tc = TrainConfig(checkpoint_every_events=5_000, checkpoint_every_s=3600, report_every_s=0.2, max_failures=3)
    with Background(SYN_SPEC, LearnerConfig(batch_size=1000), tc, tmp_path, end=24_000) as run:
        wait_for(lambda: published_watermark(tmp_path) >= 12_000, "the first half trained")
        latest = CheckpointStore(tmp_path / "checkpoints").latest()
        assert latest is not None and latest.watermark == 10_000
        kill(tmp_path)
        with EventLog(tmp_path / "log").open_writer() as w:
            w.append(events.slice(12_000))
        metrics = run.join()
    lost, dup = ledger_verdict(tmp_path, 24_000)
    return metrics, lost, dup


@pytest.mark.slow
def test_a_killed_shard_is_restored_from_the_checkpoint_and_nothing_is_lost(ray_cluster, tmp_path: Path) -> None:
    def kill_shard(run_dir: Path) -> None:
        import ray

        os.kill(ray.get(ray.get_actor(shard_name(run_dir, 0), namespace=NAMESPACE).pid.remote()), signal.SIGKILL)

    metrics, lost, dup = _kill_mid_run(tmp_path, kill_shard)
    assert metrics["watermark"] == 24_000 and metrics["events_trained"] == 24_000
    assert lost == 0
    assert dup == 2_000  # events 10k..12k: applied, then replayed from the checkpoint at 10k
    assert metrics["replayed"] == dup


@pytest.mark.slow
def test_a_killed_worker_resumes_from_the_checkpoint_not_the_start(ray_cluster, tmp_path: Path) -> None:
    def kill_worker(run_dir: Path) -> None:
        writers = [w for w in ledger_writers(run_dir / "ledger") if w.startswith("rank0-")]
        assert len(writers) == 1
        os.kill(int(writers[0].split("-")[1]), signal.SIGKILL)

    metrics, lost, dup = _kill_mid_run(tmp_path, kill_worker)
    assert lost == 0 and dup == 2_000 and metrics["replayed"] == dup
    attempts = sorted((w for w in ledger_writers(tmp_path / "ledger").items() if w[0].startswith("rank0-")),
                      key=lambda w: int(w[0].split("-")[2]))
    assert len(attempts) == 2
    assert min(attempts[1][1])[0] == 10_000  # the second attempt started at the checkpoint's watermark


@pytest.mark.slow
def test_a_corrupted_checkpoint_is_refused_and_the_previous_one_used(ray_cluster, tmp_path: Path) -> None:
    events = synthetic(20_000)
    fill(tmp_path, events.slice(0, 16_000))
    tc = TrainConfig(checkpoint_every_events=5_000, checkpoint_every_s=3600)
    cfg = LearnerConfig(batch_size=1000)
    train(SYN_SPEC, cfg, tc, tmp_path)
    store = CheckpointStore(tmp_path / "checkpoints")
    newest, previous = store.list()[-1], store.list()[-2]
    assert (newest.watermark, previous.watermark) == (16_000, 15_000)
    shard_file = newest.file("shard-0000.pkl")
    data = bytearray(shard_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard_file.write_bytes(bytes(data))

    with EventLog(tmp_path / "log").open_writer() as w:
        w.append(events.slice(16_000))
    metrics = train(SYN_SPEC, cfg, tc, tmp_path)
    assert any("shard-0000.pkl" in m for m in metrics["refused_checkpoints"])
    assert metrics["watermark"] == 20_000
    lost, dup = ledger_verdict(tmp_path, 20_000)
    assert lost == 0 and dup == 1_000  # 15k..16k replayed from the previous checkpoint
    assert metrics["replayed"] == 1_000


@pytest.mark.slow
def test_a_replica_that_cannot_reach_the_shards_follows_the_published_rows(ray_cluster, tmp_path: Path,
                                                                           monkeypatch) -> None:
    """A replica in another Ray cluster (a KubeRay RayService) finds no shard actors:
    it serves a checkpoint plus the rows every published version changed, as fresh
    as the trainer's reports, and holds exactly the shards' rows."""
    from olrec.ps import ShardedTables
    from olrec.serving import ServeConfig, ServingModel

    def replica() -> ServingModel:
        model = ServingModel(ServeConfig(run_dir=str(tmp_path), scorer="in_process", rows="fp32"))
        monkeypatch.setattr(model, "_live_shards", lambda: None)  # another cluster: none by name
        return model

    def refreshed(model: ServingModel) -> int:
        model.apply(model.read_update())
        return model.snapshot.watermark if model.snapshot else -1

    events = synthetic(12_000)
    fill(tmp_path, events.slice(0, 8_000))
    tc = TrainConfig(continuous=True, report_every_s=0.2, poll_interval=0.1, checkpoint_every_events=3_000,
                     checkpoint_every_s=3600)
    with Background(SYN_SPEC, LearnerConfig(batch_size=1000), tc, tmp_path) as run:
        wait_for(lambda: published_watermark(tmp_path) >= 0, "the trainer's first version")
        early = replica()
        wait_for(lambda: refreshed(early) >= 8_000, "a replica without shards to reach the log's end")
        assert early.snapshot.source == "published"
        with EventLog(tmp_path / "log").open_writer() as w:
            w.append(events.slice(8_000))
        wait_for(lambda: refreshed(early) >= 12_000, "it to follow new events")
        late = replica()  # starts from the newest checkpoint and the versions after it
        assert refreshed(late) >= 12_000 and late.snapshot.source == "published"
        import ray

        shards = ShardedTables([ray.get_actor(shard_name(tmp_path, 0), namespace=NAMESPACE)])
        for t in ("sparse", "counters"):
            keys, weights, _ = shards.deltas(t, [-1])
            for model in (early, late):
                refreshed(model)  # a version published after the last push (the log is drained)
                np.testing.assert_array_equal(model.mirrors[t].gather(model.mirrors[t].rows(keys)), weights)
        (tmp_path / "STOP").touch()
        run.join()
