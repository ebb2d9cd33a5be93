"""Checkpoints: commit round trip, refusal of damaged ones, sequence numbers, pruning, crashes."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from olrec.checkpoint import MANIFEST, Checkpoint, CheckpointError, CheckpointStore

REPO = Path(__file__).resolve().parents[1]


def commit(store: CheckpointStore, watermark: int, files: dict[str, bytes] | None = None,
           meta: dict | None = None) -> Checkpoint:
    staging = store.stage()
    for rel, data in (files if files is not None else {"dense.pt": f"w{watermark}".encode()}).items():
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        (staging / rel).write_bytes(data)
    return store.commit(staging, watermark, meta)


def flip_byte(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0xFF
    path.write_bytes(bytes(data))


def entries(root: Path) -> list[str]:
    return sorted(os.listdir(root))


# -- round trip --------------------------------------------------------------

def test_commit_round_trip(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "ckpts")
    files = {"dense.pt": b"dense weights", "shard-0000.pkl": os.urandom(3000), "sub/dir/extra.bin": b"",
             "progress.npz": b"\x00" * 10}
    meta = {"events": 1234, "workers": 2, "note": "héllo", "nested": {"a": [1, 2.5, None, True]}}
    ckpt = commit(store, 1234, files, meta)

    assert ckpt.path == tmp_path / "ckpts" / "ckpt-00000001" and ckpt.seq == 1
    assert (ckpt.watermark, ckpt.meta) == (1234, meta)
    assert abs(ckpt.created - time.time()) < 60
    assert {rel: e.size for rel, e in ckpt.files.items()} == {rel: len(d) for rel, d in files.items()}
    for rel, data in files.items():
        assert ckpt.file(rel).read_bytes() == data
    assert entries(tmp_path / "ckpts") == ["ckpt-00000001"]  # the staging directory became the checkpoint

    manifest = json.loads((ckpt.path / MANIFEST).read_text())
    assert manifest["watermark"] == 1234 and manifest["meta"] == meta
    assert set(manifest["files"]) == set(files)
    assert manifest["files"]["dense.pt"] == {"size": 13, "sha256": hashlib.sha256(b"dense weights").hexdigest()}

    again = CheckpointStore(tmp_path / "ckpts")  # a fresh reader, as after a restart
    [listed] = again.list()
    assert listed == ckpt and listed.meta == meta and listed.files == ckpt.files
    again.verify(listed)
    assert again.latest() == ckpt


def test_meta_is_stored_as_json_sees_it_and_numpy_watermarks_are_accepted(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    ckpt = commit(store, np.int64(7), meta={"shape": (2, 3)})
    assert ckpt.watermark == 7 and type(ckpt.watermark) is int
    assert ckpt.meta == {"shape": [2, 3]} == store.latest().meta  # what commit returns is what a reader gets


def test_an_empty_checkpoint_holds_just_a_watermark(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    ckpt = commit(store, 0, {})
    assert ckpt.files == {} and store.latest() == ckpt


def test_file_names_what_the_checkpoint_lacks(tmp_path: Path) -> None:
    ckpt = commit(CheckpointStore(tmp_path), 5, {"dense.pt": b"x"})
    with pytest.raises(CheckpointError, match=r"ckpt-00000001.*has no file 'shard-0000.pkl'.*dense.pt"):
        ckpt.file("shard-0000.pkl")


# -- visibility and refusal ----------------------------------------------------

def test_an_uncommitted_staging_directory_is_invisible(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    staging = store.stage()
    (staging / "dense.pt").write_bytes(b"half done")
    assert staging.parent == tmp_path and staging.name.startswith(".")
    assert store.list() == [] and store.latest() is None

    first = commit(store, 10)
    other = store.stage()
    (other / "dense.pt").write_bytes(b"never committed")
    assert store.list() == [first] and store.latest() == first
    assert staging.is_dir() and other.is_dir()  # staging this instance handed out is not cleaned up under it


def test_latest_skips_a_corrupted_and_a_missing_file_reporting_each(tmp_path: Path, caplog) -> None:
    store = CheckpointStore(tmp_path, keep=5)
    good = commit(store, 100, {"dense.pt": b"a" * 100, "shard-0000.pkl": b"b" * 100})
    missing = commit(store, 200, {"dense.pt": b"c" * 100, "shard-0000.pkl": b"d" * 100})
    corrupt = commit(store, 300, {"dense.pt": b"e" * 100, "shard-0000.pkl": b"f" * 100})
    missing.file("dense.pt").unlink()
    flip_byte(corrupt.file("shard-0000.pkl"))

    refused: list[CheckpointError] = []
    assert store.latest(on_refused=refused.append) == good
    assert [e.path for e in refused] == [corrupt.path, missing.path]  # newest first
    assert "shard-0000.pkl" in str(refused[0]) and str(corrupt.path) in str(refused[0])
    assert "dense.pt is missing" in str(refused[1]) and str(missing.path) in str(refused[1])
    want = corrupt.files["shard-0000.pkl"].sha256
    assert f"the manifest says {want}" in str(refused[0])  # expected against actual

    caplog.set_level(logging.WARNING, logger="olrec.checkpoint")
    assert store.latest() == good  # default: a logged warning each
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and "shard-0000.pkl" in warned[0] and "dense.pt" in warned[1]


def test_latest_is_none_when_nothing_verifies(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    ckpt = commit(store, 1)
    flip_byte(ckpt.file("dense.pt"))
    refused: list[CheckpointError] = []
    assert store.latest(on_refused=refused.append) is None
    assert len(refused) == 1


def test_verify_names_the_checkpoint_and_every_bad_file(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    ckpt = commit(store, 9, {"a.bin": b"1" * 50, "b.bin": b"2" * 50, "c.bin": b"3" * 50, "ok.bin": b"4"})
    store.verify(ckpt)
    flip_byte(ckpt.file("a.bin"))
    with open(ckpt.file("b.bin"), "ab") as f:
        f.write(b"more")
    ckpt.file("c.bin").unlink()
    with pytest.raises(CheckpointError) as info:
        store.verify(ckpt)
    e = info.value
    assert e.path == ckpt.path and str(ckpt.path) in str(e)
    assert len(e.problems) == 3
    assert any(p.startswith("file a.bin has sha256 ") for p in e.problems)
    assert "file b.bin has 54 bytes, the manifest says 50" in e.problems
    assert "file c.bin is missing" in e.problems


@pytest.mark.parametrize("damage, message", [
    (lambda m: m.write_bytes(m.read_bytes()[:-20]), "unreadable manifest.json: not JSON"),
    (lambda m: m.write_text(m.read_text().replace('"watermark": 42', '"watermark": 43')), "edited or damaged"),
    (lambda m: m.write_text("[]"), "a JSON list, not an object"),
    (lambda m: m.write_text(m.read_text().replace('"format": 1', '"format": 2')), "format 2, this olrec reads"),
])
def test_a_damaged_manifest_is_refused(tmp_path: Path, damage, message: str) -> None:
    store = CheckpointStore(tmp_path, keep=5)
    previous = commit(store, 41)
    ckpt = commit(store, 42)
    damage(ckpt.path / MANIFEST)
    with pytest.raises(CheckpointError, match=message) as info:
        store.verify(ckpt)
    assert info.value.path == ckpt.path
    refused: list[CheckpointError] = []
    assert store.latest(on_refused=refused.append) == previous
    assert [e.path for e in refused] == [ckpt.path] and message.split(":")[-1] in str(refused[0])
    refused.clear()
    assert store.list(on_refused=refused.append) == [previous] and [e.path for e in refused] == [ckpt.path]


def test_without_its_manifest_a_directory_is_no_checkpoint(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=5)
    previous = commit(store, 41)
    ckpt = commit(store, 42)
    (ckpt.path / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=r"ckpt-00000002: unreadable manifest.json: FileNotFoundError"):
        store.verify(ckpt)  # a Checkpoint read before: its manifest is gone
    refused: list[CheckpointError] = []
    assert store.latest(on_refused=refused.append) == previous and refused == []
    assert store.list() == [previous]
    assert commit(store, 43).seq == 3  # its name is still never reused


def test_checkpoints_are_ordered_by_commit_not_by_watermark(tmp_path: Path) -> None:
    # Resumed from an older checkpoint, a run may commit a lower watermark: that one is the newest.
    store = CheckpointStore(tmp_path)
    commit(store, 500)
    lower = commit(store, 300)
    assert store.latest() == lower and [c.watermark for c in store.list()] == [500, 300]


# -- sequence numbers, pruning, cleanup -------------------------------------------

def test_sequence_numbers_continue_after_a_restart(tmp_path: Path) -> None:
    first = CheckpointStore(tmp_path, keep=1)
    commit(first, 1)
    commit(first, 2)
    restarted = CheckpointStore(tmp_path, keep=1)
    ckpt = commit(restarted, 3)
    assert ckpt.seq == 3 and ckpt.path.name == "ckpt-00000003"
    assert entries(tmp_path) == ["ckpt-00000003"]


def test_prune_keeps_the_newest_keep(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=2)
    for w in range(5):
        commit(store, w * 10)
        assert len(store.list()) == min(w + 1, 2)
    assert [(c.seq, c.watermark) for c in store.list()] == [(4, 30), (5, 40)]
    assert entries(tmp_path) == ["ckpt-00000004", "ckpt-00000005"]  # no trash left behind


def test_a_concurrent_committer_never_overwrites(tmp_path: Path, monkeypatch) -> None:
    a, b = CheckpointStore(tmp_path, keep=5), CheckpointStore(tmp_path, keep=5)
    sa, sb = a.stage(), b.stage()
    (sa / "dense.pt").write_bytes(b"from a")
    (sb / "dense.pt").write_bytes(b"from b")
    monkeypatch.setattr(b, "_next_seq", lambda: 1)  # b computed its seq before a renamed
    ca = a.commit(sa, 1)
    cb = b.commit(sb, 2)
    assert (ca.seq, cb.seq) == (1, 2)
    assert ca.file("dense.pt").read_bytes() == b"from a" and cb.file("dense.pt").read_bytes() == b"from b"
    a.verify(ca)
    a.verify(cb)


def test_commit_removes_stale_staging_left_by_others_and_keeps_fresh_and_own(tmp_path: Path) -> None:
    crashed = CheckpointStore(tmp_path).stage()  # handed out by an instance that died
    (crashed / "shard-0000.pkl").write_bytes(b"partial")
    old = time.time() - 3600
    for p in (crashed / "shard-0000.pkl", crashed):
        os.utime(p, (old, old))
    busy = CheckpointStore(tmp_path).stage()  # another process still writing
    store = CheckpointStore(tmp_path, stale_after=600)
    mine = store.stage()
    os.utime(mine, (old, old))
    trash = tmp_path / ".trash-ckpt-00000001-abc"  # a prune that crashed mid-delete
    (trash / "sub").mkdir(parents=True)

    ckpt = commit(store, 5)
    assert entries(tmp_path) == sorted([ckpt.path.name, busy.name, mine.name])
    assert store.cleanup(min_age=0) == [busy]  # explicit cleanup: everything not this instance's own
    store.abort(mine)
    assert entries(tmp_path) == [ckpt.path.name]


def test_a_staging_directory_touched_recently_deep_inside_is_not_stale(tmp_path: Path) -> None:
    writer = CheckpointStore(tmp_path).stage()
    (writer / "a" / "b").mkdir(parents=True)
    old = time.time() - 3600
    os.utime(writer / "a", (old, old))
    os.utime(writer, (old, old))
    (writer / "a" / "b" / "big.bin").write_bytes(b"still writing")  # this file's mtime is now
    os.utime(writer / "a" / "b", (old, old))
    assert CheckpointStore(tmp_path, stale_after=600).cleanup() == []
    assert writer.is_dir()


def test_abort_deletes_the_staging_directory(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    staging = store.stage()
    (staging / "x").write_bytes(b"x")
    store.abort(staging)
    assert entries(tmp_path) == []
    store.abort(staging)  # again: nothing to do
    with pytest.raises(ValueError, match="does not exist"):
        store.commit(staging, 1)


# -- bad arguments ----------------------------------------------------------------

@pytest.mark.parametrize("keep", [0, -1, 1.5, True, "3"])
def test_bad_keep_is_named(tmp_path: Path, keep) -> None:
    with pytest.raises(ValueError, match=rf"keep must be an integer >= 1, got {keep!r}"):
        CheckpointStore(tmp_path, keep=keep)


@pytest.mark.parametrize("stale_after", [-1, float("nan"), float("inf"), "10"])
def test_bad_stale_after_is_named(tmp_path: Path, stale_after) -> None:
    with pytest.raises(ValueError, match="stale_after"):
        CheckpointStore(tmp_path, stale_after=stale_after)


@pytest.mark.parametrize("watermark", [-1, 1.5, True, "3", None])
def test_bad_watermark_is_named_and_nothing_is_committed(tmp_path: Path, watermark) -> None:
    store = CheckpointStore(tmp_path)
    staging = store.stage()
    with pytest.raises(ValueError, match=r"watermark must be an integer >= 0, got "):
        store.commit(staging, watermark)
    assert store.list() == [] and staging.is_dir()


@pytest.mark.parametrize("meta, where", [
    ({"loss": float("nan")}, r"meta\['loss'\] is nan"),
    ({"ids": {1, 2}}, r"meta\['ids'\] is a set"),
    ({1: "a"}, r"meta has key 1 of type int"),
    ({"a": [0, np.float32(1)]}, r"meta\['a'\]\[1\] is a float32"),
])
def test_meta_that_is_not_json_is_named(tmp_path: Path, meta, where: str) -> None:
    store = CheckpointStore(tmp_path)
    with pytest.raises(ValueError, match=where):
        store.commit(store.stage(), 1, meta)
    assert store.list() == []


def test_only_staging_directories_of_the_store_are_committed_or_deleted(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "ckpts")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data").write_bytes(b"keep me")
    with pytest.raises(ValueError, match=f"staging directory {precious} is not one of"):
        store.abort(precious)
    with pytest.raises(ValueError, match=f"staging directory {precious} is not one of"):
        store.commit(precious, 1)
    other = CheckpointStore(tmp_path / "other").stage()
    with pytest.raises(ValueError, match="is not one of"):
        store.commit(other, 1)
    assert (precious / "data").read_bytes() == b"keep me" and other.is_dir()


def test_a_staging_directory_with_a_symlink_or_a_manifest_is_refused_naming_it(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "ckpts")
    (tmp_path / "outside").write_bytes(b"not ours")
    staging = store.stage()
    (staging / "link.bin").symlink_to(tmp_path / "outside")
    (staging / MANIFEST).write_text("{}")
    with pytest.raises(CheckpointError) as info:
        store.commit(staging, 1)
    assert info.value.path == staging
    assert any("link.bin is a symbolic link" in p for p in info.value.problems)
    assert any(f"{MANIFEST} is reserved" in p for p in info.value.problems)
    assert store.list() == [] and staging.is_dir()


def test_a_file_that_grows_while_checksummed_fails_the_commit(tmp_path: Path, monkeypatch) -> None:
    import olrec.checkpoint as mod

    store = CheckpointStore(tmp_path)
    staging = store.stage()
    (staging / "shard.pkl").write_bytes(b"x" * 10)
    monkeypatch.setattr(mod, "_CHUNK", 4)

    class Growing:  # a writer appends after commit read the first chunk
        def __init__(self) -> None:
            self.h, self.done = hashlib.sha256(), False

        def update(self, block: bytes) -> None:
            if not self.done:
                with open(staging / "shard.pkl", "ab") as f:
                    f.write(b"late")
                self.done = True
            self.h.update(block)

        def hexdigest(self) -> str:
            return self.h.hexdigest()

    monkeypatch.setattr(mod, "_new_hash", Growing)
    with pytest.raises(CheckpointError, match="file shard.pkl changed while it was read .10 bytes before, 14 read"):
        store.commit(staging, 1)
    assert store.list() == [] and staging.is_dir()


# -- properties ---------------------------------------------------------------------

_name = st.text(alphabet="abcXYZ019_-.", min_size=1, max_size=6).filter(lambda s: s not in (".", "..", MANIFEST))
_rel = st.lists(_name, min_size=1, max_size=3).map("/".join)


def _no_file_is_a_directory(files: dict[str, bytes]) -> bool:
    return not any(other.startswith(rel + "/") for rel in files for other in files)


_trees = st.dictionaries(_rel, st.binary(max_size=300), max_size=6).filter(_no_file_is_a_directory)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
    max_leaves=10)


@settings(max_examples=60, deadline=None)
@given(files=_trees, watermark=st.integers(0, 2**62), meta=st.dictionaries(st.text(max_size=5), _json, max_size=4))
def test_any_files_round_trip_and_verify(files: dict[str, bytes], watermark: int, meta: dict) -> None:
    with tempfile.TemporaryDirectory() as d:
        ckpt = commit(CheckpointStore(d), watermark, files, meta)
        reread = CheckpointStore(d).latest(on_refused=lambda e: pytest.fail(str(e)))
        assert reread == ckpt and reread.meta == meta and set(reread.files) == set(files)
        for rel, data in files.items():
            assert reread.file(rel).read_bytes() == data
            assert reread.files[rel].size == len(data)


@settings(max_examples=40, deadline=None)
@given(files=_trees.filter(lambda f: any(f.values())), data=st.data())
def test_any_flipped_byte_is_caught_and_its_file_named(files: dict[str, bytes], data) -> None:
    rel = data.draw(st.sampled_from(sorted(r for r, b in files.items() if b)))
    at = data.draw(st.integers(0, len(files[rel]) - 1))
    with tempfile.TemporaryDirectory() as d:
        store = CheckpointStore(d)
        ckpt = commit(store, 1, files)
        flip_byte(ckpt.file(rel), at)
        with pytest.raises(CheckpointError) as info:
            store.verify(ckpt)
        assert len(info.value.problems) == 1 and info.value.problems[0].startswith(f"file {rel} has sha256 ")


# -- crashes ------------------------------------------------------------------------

# Commits in a child that SIGKILLs itself right before its kill_at-th call of a
# disk operation that makes, orders or removes state (fsync, rename, replace,
# rmtree and the unlink/rmdir inside it), so every step boundary of commit,
# prune and cleanup, and every point inside a deletion, is a crash point.
_CRASHING_COMMIT = textwrap.dedent("""
    import os, shutil, signal, sys
    from olrec.checkpoint import CheckpointStore

    root, kill_at = sys.argv[1], int(sys.argv[2])
    store = CheckpointStore(root, keep=2)
    staging = store.stage()
    (staging / "dense.pt").write_bytes(os.urandom(200_000))
    (staging / "shards").mkdir()
    for i in range(2):
        (staging / "shards" / f"shard-{i:04d}.pkl").write_bytes(os.urandom(50_000))
    calls = 0

    def crashing(fn):
        def wrapped(*a, **k):
            global calls
            calls += 1
            if calls == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*a, **k)
        return wrapped

    for mod, name in [(os, "fsync"), (os, "rename"), (os, "replace"), (shutil, "rmtree"), (os, "unlink"),
                      (os, "rmdir")]:
        setattr(mod, name, crashing(getattr(mod, name)))
    store.commit(staging, 300, {"attempt": kill_at})
    print("committed after", calls, "calls", flush=True)
""")


def test_a_sigkill_anywhere_in_commit_never_leaves_a_visible_incomplete_checkpoint(tmp_path: Path) -> None:
    template = tmp_path / "template"
    store = CheckpointStore(template, keep=2)
    commit(store, 100)
    commit(store, 200)
    crashed = (template / ".staging-from-an-earlier-crash")  # so the commit's cleanup has work too
    crashed.mkdir()
    os.utime(crashed, (0, 0))

    outcomes = []
    for kill_at in range(1, 100):
        root = tmp_path / f"crash-{kill_at}"
        shutil.copytree(template, root)
        os.utime(root / crashed.name, (0, 0))
        r = subprocess.run([sys.executable, "-c", _CRASHING_COMMIT, str(root), str(kill_at)],
                           capture_output=True, text=True, timeout=60, cwd=REPO)
        after = CheckpointStore(root, keep=2)
        refused: list[CheckpointError] = []
        visible = after.list(on_refused=refused.append)
        assert refused == []
        for name in os.listdir(root):  # every checkpoint-named directory is a complete checkpoint
            if name.startswith("ckpt-"):
                assert (root / name / MANIFEST).is_file(), f"kill at call {kill_at}: {name} has no manifest"
        for ckpt in visible:
            after.verify(ckpt)
        watermarks = [c.watermark for c in visible]
        assert watermarks in ([100, 200], [100, 200, 300], [200, 300]), f"kill at call {kill_at}: {watermarks}"
        assert after.latest(on_refused=refused.append).watermark == watermarks[-1] and refused == []
        # The next commit (or an explicit cleanup) clears what the crash left, and numbering goes on.
        nxt = commit(after, 400)
        after.cleanup(min_age=0)
        assert nxt.seq == max(c.seq for c in visible) + 1
        assert [c.watermark for c in after.list()] == watermarks[-1:] + [400]
        assert all(n.startswith("ckpt-") for n in os.listdir(root)), os.listdir(root)
        if r.returncode == 0:
            assert "committed" in r.stdout
            outcomes.append("done")
            break
        assert r.returncode == -signal.SIGKILL, r.stderr
        outcomes.append(watermarks[-1])
    assert outcomes[-1] == "done", "the commit never completed"
    # Crash points both before and after the checkpoint became visible were hit.
    assert 200 in outcomes and 300 in outcomes and len(outcomes) >= 8, outcomes


def test_a_writer_killed_mid_write_leaves_nothing_visible(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    good = commit(store, 7)
    staging = store.stage()
    code = textwrap.dedent("""
        import os, signal, sys
        with open(sys.argv[1], "wb") as f:
            f.write(os.urandom(100_000))
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    r = subprocess.run([sys.executable, "-c", code, str(staging / "shard-0000.pkl")], timeout=60)
    assert r.returncode == -signal.SIGKILL
    assert (staging / "shard-0000.pkl").stat().st_size == 100_000
    restarted = CheckpointStore(tmp_path)
    assert restarted.list() == [good] and restarted.latest() == good
    assert restarted.cleanup(min_age=0) == [staging]
