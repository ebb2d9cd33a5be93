"""A run directory in an object store: storage primitives, checkpoints as
manifest-last objects, the ledger, and `olrec train` then serving from an S3
run, against a real S3 server on loopback (moto's, see conftest.s3_server)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from olrec import storage
from olrec.checkpoint import CheckpointError, ObjectCheckpointStore, checkpoint_store
from olrec.train import Ledger, ledger_writers, read_ledger


def test_storage_reads_writes_lists_and_deletes_objects(s3_uri) -> None:
    root = s3_uri("run")
    f = storage.join(root, "a", "b.bin")
    assert isinstance(f, str) and f.startswith("s3://") and "/run/a/b.bin?endpoint_override=" in f
    assert not storage.exists(f)
    storage.write_bytes(f, b"hello")
    storage.write_bytes(storage.join(root, "c.json"), b"{}")
    assert storage.read_bytes(f) == b"hello" and storage.is_file(f) and storage.exists(storage.join(root, "a"))
    assert sorted(storage.listdir(root)) == ["a", "c.json"]
    assert {k: v[0] for k, v in storage.files_under(root).items()} == {"a/b.bin": 5, "c.json": 2}
    assert storage.name_of(f) == "b.bin"
    storage.remove(f)
    storage.remove(f)  # gone already: nothing
    assert not storage.exists(f)
    storage.remove_tree(root)
    assert storage.listdir(root) == []
    with pytest.raises(FileNotFoundError) as e:
        storage.read_bytes(f)
    assert "***@" in str(e.value) and "testing:testing" not in str(e.value)


def test_the_local_and_the_object_store_resolve_one_spelling(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert storage.resolve("runs/x") == tmp_path / "runs" / "x"
    assert storage.resolve(f"file://{tmp_path}/y") == tmp_path / "y"
    uri = "s3://bucket/run?endpoint_override=h:1"
    assert storage.resolve(uri) == uri and storage.join(uri, "log") == "s3://bucket/run/log?endpoint_override=h:1"


def _commit(store: ObjectCheckpointStore, watermark: int, payload: bytes) -> None:
    staging = store.stage()
    storage.write_bytes(storage.join(staging, "dense.pt"), payload)
    storage.write_bytes(storage.join(staging, "sub", "shard-0000.pkl"), payload * 2)
    store.commit(staging, watermark, {"events": watermark})


def test_checkpoints_are_objects_complete_when_their_manifest_lands(s3_uri) -> None:
    store = checkpoint_store(s3_uri("ckpts"), keep=2)
    assert isinstance(store, ObjectCheckpointStore)
    for w in (10, 20, 30):
        _commit(store, w, f"w{w}".encode())
    assert [c.watermark for c in store.list()] == [20, 30]  # pruned to keep=2
    assert sorted(storage.listdir(store.root)) == ["ckpt-00000002", "ckpt-00000003"]
    latest = store.latest()
    assert latest.seq == 3 and latest.meta == {"events": 30}
    assert latest.read("sub/shard-0000.pkl") == b"w30w30" and set(latest.files) == {"dense.pt", "sub/shard-0000.pkl"}

    # Staged, not committed: no manifest, so no checkpoint; another store's cleanup deletes it once stale.
    staging = store.stage()
    storage.write_bytes(storage.join(staging, "dense.pt"), b"half")
    assert [c.seq for c in store.list()] == [2, 3] and store.latest().seq == 3
    assert checkpoint_store(store.root).cleanup(min_age=3600) == []
    assert store.cleanup(min_age=0) == []  # its own staging is left alone
    assert checkpoint_store(store.root).cleanup(min_age=0) == [staging]
    assert not storage.exists(staging)
    with pytest.raises(ValueError, match="holds no objects"):
        store.commit(staging, 40)
    with pytest.raises(ValueError, match="not one this store handed out"):
        store.commit(storage.join(store.root, "ckpt-00000009"), 40)


def test_a_damaged_object_is_refused_and_the_previous_checkpoint_used(s3_uri) -> None:
    store = checkpoint_store(s3_uri("ckpts"), keep=3)
    _commit(store, 10, b"first")
    _commit(store, 20, b"second")
    newest = store.list()[-1]
    storage.write_bytes(newest.file("dense.pt"), b"SECOND")  # same size, other bytes
    refused: list[CheckpointError] = []
    assert store.latest(on_refused=refused.append).watermark == 10
    assert len(refused) == 1 and "dense.pt has sha256" in str(refused[0]) and "testing:testing" not in str(refused[0])
    with pytest.raises(CheckpointError, match="reserved for the checkpoint's manifest"):
        staging = store.stage()
        storage.write_bytes(storage.join(staging, "manifest.json"), b"{}")
        store.commit(staging, 30)


def test_the_ledger_in_an_object_store(s3_uri) -> None:
    d = s3_uri("ledger")
    a = Ledger(d, "rank0-1-5")
    a.add([(0, 10)])
    a.flush()
    a.add([(10, 20)])
    a.compact()
    a.add([(30, 40)])
    a.flush()
    assert sorted(storage.listdir(d)) == ["rank0-1-5-c00000002.bin", "rank0-1-5-p00000002.bin"]
    assert ledger_writers(d) == {"rank0-1-5": [(0, 20), (30, 40)]} and len(read_ledger(d)) == 2


@pytest.mark.slow
def test_olrec_train_and_serving_on_a_run_in_s3(s3_uri, ray_cluster, tmp_path: Path) -> None:
    """`olrec train --run-dir s3://...` fills the log, trains and checkpoints there; a second
    run resumes from the checkpoint; serving reads the model from the bucket."""
    import pyarrow.parquet as pq
    from test_train import published_watermark, synthetic

    from olrec.cli import main
    from olrec.log import EventLog
    from olrec.serving import ServeConfig, ServingModel
    from olrec.train import RunPaths, TrainConfig, published_versions, read_model, train

    run = s3_uri("run")
    events = synthetic(10_000)
    data = tmp_path / "events.parquet"
    pq.write_table(events.slice(0, 6_000), data)
    cfg = tmp_path / "job.yaml"
    cfg.write_text("learner: {batch_size: 1000}\ntrain: {checkpoint_every_s: 3600}\n")
    assert main(["train", "--config", str(cfg), "--run-dir", run, "--data", str(data), "--format", "generic"]) == 0
    paths = RunPaths.of(run)
    out = json.loads(storage.read_bytes(storage.join(run, "train.json")))
    assert out["watermark"] == 6_000 and out["events_trained"] == 6_000 and "testing:testing" not in out["run_dir"]
    assert published_watermark(run) == 6_000 and 1 <= len(published_versions(paths)) <= 3
    assert checkpoint_store(paths.checkpoints).latest().watermark == 6_000

    with EventLog(paths.log).open_writer() as w:
        w.append(events.slice(6_000))
    spec, learner, _ = read_model(run)
    metrics = train(spec, learner, TrainConfig(checkpoint_every_s=3600), run)
    assert metrics["watermark"] == 10_000 and metrics["replayed"] == 0
    counts = np.zeros(10_000, np.int64)
    for lo, hi in read_ledger(paths.ledger):
        counts[lo:hi] += 1
    assert (counts == 1).all()  # every event applied once over the two runs

    model = ServingModel(ServeConfig(run_dir=run, scorer="in_process"))
    model.apply(model.read_update())  # no trainer now: the latest checkpoint and the versions after it
    assert model.snapshot.watermark == 10_000 and model.snapshot.source == "published"
    user, items = int(events["user_id"][0].as_py()), np.asarray(events["item_id"].to_numpy()[:5])
    snap, emb, num, p_wide = model.inputs(user, items, {})
    scores = np.asarray(snap.learner.blend_probs(snap.learner.model(emb, num), p_wide))
    assert ((scores > 0) & (scores < 1)).all() and len(set(scores.round(6).tolist())) > 1
