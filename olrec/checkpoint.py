"""Consistent training checkpoints: a directory of files plus a manifest, on a filesystem.

Layout of a checkpoint root::

    ckpt-<seq:08d>/               one complete checkpoint (seq grows by one per commit)
        manifest.json             written last: watermark, meta, created, and every file's
                                  relative path, size and sha256, plus the manifest's own sha256
        shard-0000.pkl, dense.pt  the files writers put there (subdirectories allowed)
    .staging-<hex>/               a checkpoint being written (or left by a crash): never read
    .trash-ckpt-<seq>-<hex>/      a pruned checkpoint being deleted: never read

Writers (parameter-server shards in their own processes, the trainer's dense
state) put files in a directory from :meth:`CheckpointStore.stage`;
:meth:`CheckpointStore.commit` checksums and fsyncs them, writes
``manifest.json`` into it atomically (temp file, fsync, rename) and renames the
whole directory to ``ckpt-<seq>``. A checkpoint is complete exactly when a
``ckpt-*`` directory holds a manifest, so a crash at any point leaves the
previous checkpoints plus, at most, a hidden directory that readers ignore and a
later commit (or :meth:`CheckpointStore.cleanup`) removes.

The watermark is the event-log offset below which every event is in the
checkpoint's weights. Checkpoints are ordered by ``seq``, not by watermark: a
run resumed from an older checkpoint (the newest was refused) may commit a
lower watermark, and that newer checkpoint is the one to resume from.

An object store has no rename: :class:`ObjectCheckpointStore` keeps the same
layout and the same rule (complete exactly when the manifest exists) by
staging each checkpoint where it stays and putting the manifest last;
:func:`checkpoint_store` picks the store for a path or a URI.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import operator
import os
import re
import shutil
import stat
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from pyarrow import fs as pafs

from . import storage
from .storage import fsync_dir

MANIFEST = "manifest.json"
FORMAT = 1  # manifest format version; a reader refuses one it does not know
_PREFIX = "ckpt-"
_NAME_RE = re.compile(r"^ckpt-(\d{8,})$")
_STAGING = ".staging-"
_TRASH = ".trash-"
_MANIFEST_TMP = f".{MANIFEST}.tmp"
_CHUNK = 1 << 20  # bytes per read when hashing: memory stays flat for any file size
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_new_hash = hashlib.sha256  # of file contents (a seam for tests)

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used. ``path`` is the checkpoint (or staging)
    directory or URI; ``problems`` one line per thing wrong, each naming the file."""

    def __init__(self, path: Path | str, problems: Sequence[str]) -> None:
        self.path = path if storage.is_uri(path) else Path(path)
        self.problems = list(problems)
        super().__init__(f"checkpoint {storage.where(self.path)}: " + "; ".join(self.problems))


class FileEntry(NamedTuple):
    size: int
    sha256: str


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint as its manifest describes it (not yet verified)."""

    path: Path | str = field(repr=False)  # a local directory, or an object-store URI (may carry credentials)
    seq: int
    watermark: int  # every event with a log offset below it is in the checkpoint
    meta: dict[str, Any] = field(compare=False)
    created: float  # time.time() at commit
    files: dict[str, FileEntry] = field(compare=False, repr=False)  # relative posix path -> entry

    def file(self, name: str | os.PathLike[str]) -> Path | str:
        """The path of file ``name`` (relative, ``/``-separated) of this checkpoint.

        Raises :class:`CheckpointError` if the manifest lists no such file, so a
        reader learns which checkpoint lacks what, not just "file not found".
        """
        rel = PurePosixPath(Path(name).as_posix()).as_posix()
        if rel not in self.files:
            have = ", ".join(sorted(self.files)) or "none"
            raise CheckpointError(self.path, [f"has no file {rel!r} (its files: {have})"])
        return storage.join(self.path, *rel.split("/"))

    def read(self, name: str | os.PathLike[str]) -> bytes:
        """The bytes of file ``name`` (see :meth:`file`); wherever the checkpoint lives."""
        return storage.read_bytes(self.file(name))


class CheckpointStore:
    """Checkpoints under ``root``; each commit keeps the newest ``keep`` complete ones.

    One committer at a time is the intended use (the trainer's rank 0); two
    concurrent commits still never overwrite each other (the second takes the
    next sequence number). Any number of processes may stage files and read.

    ``stale_after``: seconds without any change after which a staging directory
    this instance did not hand out is taken as left by a crash and removed by
    :meth:`cleanup` (which every commit runs).
    """

    def __init__(self, root: str | os.PathLike[str], keep: int = 3, *, stale_after: float = 600.0) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an integer >= 1, got {keep!r}")
        if isinstance(stale_after, bool) or not isinstance(stale_after, (int, float)) \
                or not math.isfinite(stale_after) or stale_after < 0:
            raise ValueError(f"stale_after must be a finite number of seconds >= 0, got {stale_after!r}")
        self.root = Path(root)
        self.keep = keep
        self.stale_after = float(stale_after)
        self._open: set[Path] = set()  # staging directories handed out and not yet committed or aborted

    def __repr__(self) -> str:
        return f"CheckpointStore({str(self.root)!r}, keep={self.keep})"

    # -- writing ----------------------------------------------------------

    def stage(self) -> Path:
        """A fresh, empty staging directory inside ``root`` for one checkpoint's files.

        Any process that sees the path may write into it (subdirectories too);
        writers should close (ideally fsync) their files before :meth:`commit`.
        """
        if not self.root.is_dir():
            self.root.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.root.parent)  # the new root survives a crash
        path = self.root / f"{_STAGING}{uuid.uuid4().hex}"
        os.mkdir(path)
        self._open.add(path)
        return path

    def abort(self, staging: str | os.PathLike[str]) -> None:
        """Delete a staging directory without committing it (no-op if already gone)."""
        staging = self._check_staging(staging, must_exist=False)
        shutil.rmtree(staging, ignore_errors=True)
        self._open.discard(staging)

    def commit(self, staging: str | os.PathLike[str], watermark: int,
               meta: Mapping[str, Any] | None = None) -> Checkpoint:
        """Make ``staging`` the newest checkpoint at ``watermark``, then prune to ``keep``.

        Every regular file under ``staging`` is checksummed and fsynced; the
        manifest goes in last and atomically, then the directory is renamed to
        ``ckpt-<seq>`` and ``root`` fsynced. ``meta`` must be JSON (string keys,
        finite numbers). Raises :class:`CheckpointError` (naming the file) for a
        symlink or special file, a file named ``manifest.json``, or a file that
        changes while it is read; the staging directory is then left as it is
        (``abort`` it, or let a later commit clean it up).
        """
        watermark, meta = _check_commit(watermark, meta)
        staging = self._check_staging(staging, must_exist=True)

        files = _checksum_tree(staging)
        body = {"format": FORMAT, "watermark": watermark, "created": time.time(), "meta": meta,
                "files": {rel: {"size": e.size, "sha256": e.sha256} for rel, e in files.items()}}
        manifest = dict(body, manifest_sha256=_body_digest(body))
        tmp = staging / _MANIFEST_TMP
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, staging / MANIFEST)
        fsync_dir(staging)

        final = self._publish(staging)
        self._open.discard(staging)
        return self._committed(Checkpoint(final, _seq_of(final.name), watermark, meta, body["created"], files))

    def _committed(self, ckpt: Checkpoint) -> Checkpoint:
        try:  # housekeeping: the checkpoint is committed whatever happens here
            self._prune()
            self.cleanup()
        except OSError as e:
            log.warning("checkpoint %s committed, but pruning or cleaning up %s failed: %s",
                        storage.where(ckpt.path), storage.where(self.root), e)
        return ckpt

    def _publish(self, staging: Path) -> Path:
        """Rename ``staging`` to the next free ``ckpt-<seq>`` and fsync ``root``."""
        seq = self._next_seq()
        for _ in range(100):
            final = self.root / f"{_PREFIX}{seq:08d}"
            try:
                # Never onto a checkpoint: renaming a directory onto a non-empty
                # one fails (ENOTEMPTY/EEXIST), so a concurrent committer that
                # took this seq first keeps it and we take the next.
                os.rename(staging, final)
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                seq = max(seq + 1, self._next_seq())
                continue
            fsync_dir(self.root)
            return final
        raise CheckpointError(staging, [f"found no free checkpoint name after {final.name} (concurrent committers?)"])

    # -- reading ----------------------------------------------------------

    def list(self, on_refused: Callable[[CheckpointError], None] | None = None) -> list[Checkpoint]:
        """Complete checkpoints, oldest first; their manifests parsed, their files not verified.

        A checkpoint whose manifest cannot be read is skipped and reported
        through ``on_refused`` (default: a logged warning).
        """
        report = on_refused or _warn_refused
        out = []
        for _, path in self._scan():
            try:
                out.append(self._load(path))
            except CheckpointError as e:
                if storage.exists(path):  # else pruned while we looked: not a refusal
                    report(e)
        return out

    def verify(self, ckpt: Checkpoint) -> None:
        """Raise :class:`CheckpointError` unless ``ckpt`` is intact on disk.

        Intact: its manifest is still there, readable, self-consistent and as
        ``ckpt`` describes it, and every file it lists exists with the recorded
        size and sha256. The error lists every file that is wrong, expected
        against actual. Reads every byte of the checkpoint.
        """
        on_disk = self._load(ckpt.path)
        changed = [name for name in ("watermark", "created", "meta", "files")
                   if getattr(on_disk, name) != getattr(ckpt, name)]
        if changed:
            raise CheckpointError(ckpt.path, [f"{MANIFEST} on disk differs from the one read before in "
                                              + ", ".join(changed)])
        self._check_files(ckpt)

    def latest(self, on_refused: Callable[[CheckpointError], None] | None = None) -> Checkpoint | None:
        """The newest checkpoint that verifies, or ``None`` if none does.

        Each newer checkpoint refused on the way (unreadable manifest, missing
        or damaged file) is passed to ``on_refused`` (default: a logged
        warning) and skipped.
        """
        report = on_refused or _warn_refused
        for _, path in reversed(self._scan()):
            try:
                ckpt = self._load(path)
                self._check_files(ckpt)
            except CheckpointError as e:
                if storage.exists(path):
                    report(e)
                continue
            return ckpt
        return None

    # -- housekeeping -----------------------------------------------------

    def cleanup(self, min_age: float | None = None) -> list[Path]:
        """Remove what crashes left behind; return the directories removed.

        Removed: every ``.trash-*`` directory, and every staging directory not
        handed out by this instance in which nothing changed for ``min_age``
        seconds (default ``stale_after``). Checkpoints are never touched.
        """
        min_age = self.stale_after if min_age is None else min_age
        if not self.root.is_dir():
            return []
        removed = []
        now = time.time()
        for entry in os.scandir(self.root):
            path = Path(entry.path)
            if entry.name.startswith(_TRASH):
                pass
            elif entry.name.startswith(_STAGING) and path not in self._open:
                age = now - _newest_mtime(path)
                if age < min_age:
                    continue
            else:
                continue
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                removed.append(path)
            else:
                log.warning("could not remove %s left by an earlier crash", path)
        return removed

    def _prune(self) -> None:
        """Delete all but the newest ``keep`` complete checkpoints (by seq; not verified).

        Each goes by an atomic rename to a hidden ``.trash-*`` name first, so a
        crash mid-delete never leaves a half-deleted directory that looks like
        a checkpoint. Pruning does not verify: if the newest ``keep`` are all
        damaged, the older good ones are gone anyway (verifying would read
        every byte of every checkpoint on every commit).
        """
        for _, path in self._scan()[: -self.keep]:
            trash = self.root / f"{_TRASH}{path.name}-{uuid.uuid4().hex}"
            try:
                os.rename(path, trash)
            except FileNotFoundError:
                continue  # pruned by someone else
            except OSError as e:
                log.warning("could not prune checkpoint %s: %s", path, e)
                continue
            shutil.rmtree(trash, ignore_errors=True)
        fsync_dir(self.root)

    # -- internals --------------------------------------------------------

    def _scan(self) -> list[tuple[int, Path]]:
        """``(seq, path)`` of every complete checkpoint (a ``ckpt-*`` dir with a manifest), by seq."""
        if not self.root.is_dir():
            return []
        found = []
        for entry in os.scandir(self.root):
            m = _NAME_RE.match(entry.name)
            if m and os.path.isfile(os.path.join(entry.path, MANIFEST)):
                found.append((int(m[1]), Path(entry.path)))
        return sorted(found)

    def _next_seq(self) -> int:
        """One more than any ``ckpt-*`` name, complete or not: never reuses a name after a restart."""
        if not self.root.is_dir():
            return 1
        return max((_seq_of(e.name) for e in os.scandir(self.root) if _NAME_RE.match(e.name)), default=0) + 1

    def _check_staging(self, staging: str | os.PathLike[str], *, must_exist: bool) -> Path:
        """``staging`` as a Path, if it is a staging directory of this root (else ValueError).

        Guards ``abort``'s ``rmtree`` and ``commit``'s rename against a wrong path.
        """
        path = Path(staging)
        ok = path.name.startswith(_STAGING)
        if ok:
            try:
                ok = path.parent.samefile(self.root)
            except FileNotFoundError:
                ok = False
        if not ok:
            raise ValueError(f"staging directory {path} is not one of {self.root} (from stage())")
        if must_exist and not path.is_dir():
            raise ValueError(f"staging directory {path} does not exist (committed or aborted already?)")
        return self.root / path.name  # one spelling, as stage() handed it out

    def _check_files(self, ckpt: Checkpoint) -> None:
        _check_files(ckpt, _hash_file)

    def _load(self, path: Path | str) -> Checkpoint:
        """Parse and check ``path``'s manifest (not its files)."""
        def bad(what: str) -> CheckpointError:
            return CheckpointError(path, [f"unreadable {MANIFEST}: {what}"])

        try:
            raw = storage.read_bytes(storage.join(path, MANIFEST))
        except OSError as e:
            raise bad(f"{type(e).__name__}: {getattr(e, 'strerror', None) or e}") from None
        try:
            m = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise bad(f"not JSON ({e})") from None
        if not isinstance(m, dict):
            raise bad(f"a JSON {type(m).__name__}, not an object")
        if m.get("format") != FORMAT:
            raise bad(f"format {m.get('format')!r}, this olrec reads format {FORMAT}")
        missing = [k for k in ("watermark", "created", "meta", "files", "manifest_sha256") if k not in m]
        if missing:
            raise bad(f"no {', '.join(missing)}")
        digest = m.pop("manifest_sha256")
        try:
            actual = _body_digest(m)
        except ValueError as e:
            raise bad(str(e)) from None
        if digest != actual:
            raise bad(f"its content has sha256 {actual}, it records {digest!r} (edited or damaged)")
        wm, created, meta, files = m["watermark"], m["created"], m["meta"], m["files"]
        if isinstance(wm, bool) or not isinstance(wm, int) or wm < 0:
            raise bad(f"watermark {wm!r} is not an integer >= 0")
        if isinstance(created, bool) or not isinstance(created, (int, float)):
            raise bad(f"created {created!r} is not a number")
        if not isinstance(meta, dict):
            raise bad(f"meta is a {type(meta).__name__}, not an object")
        if not isinstance(files, dict):
            raise bad(f"files is a {type(files).__name__}, not an object")
        entries = {}
        for rel, e in files.items():
            if not _safe_rel(rel):
                raise bad(f"file name {rel!r} is not a relative path inside the checkpoint")
            size, sha = (e.get("size"), e.get("sha256")) if isinstance(e, dict) else (None, None)
            if isinstance(size, bool) or not isinstance(size, int) or size < 0 \
                    or not isinstance(sha, str) or not _SHA256_RE.match(sha):
                raise bad(f"entry of file {rel!r} is {e!r}, not {{'size': int >= 0, 'sha256': 64 hex digits}}")
            entries[rel] = FileEntry(size, sha)
        return Checkpoint(path, _seq_of(storage.name_of(path)), wm, meta, float(created), entries)


class ObjectCheckpointStore(CheckpointStore):
    """:class:`CheckpointStore` under an object-store prefix (``s3://bucket/run/checkpoints``).

    An object store renames nothing, so a checkpoint is staged where it will
    stay: :meth:`stage` hands out the next ``ckpt-<seq>`` prefix, writers put
    their objects there, and :meth:`commit` reads each back for its size and
    sha256 and then puts ``manifest.json``, one object. The checkpoint is
    complete exactly when that object exists; a prefix without one (staging,
    or left by a crash) is never read, and :meth:`cleanup` deletes it once
    nothing in it changed for ``stale_after`` seconds. Pruning deletes the
    manifest first, so a half-deleted checkpoint is an incomplete one.

    Sequence numbers are taken when staging: one committer at a time (the
    trainer's rank 0), as the store itself cannot refuse a second.
    """

    def __init__(self, root: str, keep: int = 3, *, stale_after: float = 600.0) -> None:
        super().__init__(root, keep, stale_after=stale_after)
        self.root = str(root).rstrip("/")  # type: ignore[assignment]
        self._open: set[str] = set()  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ObjectCheckpointStore({storage.where(self.root)!r}, keep={self.keep})"

    def stage(self) -> str:  # type: ignore[override]
        """The prefix (a URI) of the next checkpoint; any process may put objects under it."""
        taken = max((_seq_of(n) for n in self._open), default=0)
        name = f"{_PREFIX}{max(self._next_seq(), taken + 1):08d}"
        self._open.add(name)
        return str(storage.join(self.root, name))

    def abort(self, staging: str | os.PathLike[str]) -> None:
        name = self._check_staging(staging, must_exist=False)
        storage.remove_tree(storage.join(self.root, name))
        self._open.discard(name)

    def commit(self, staging: str | os.PathLike[str], watermark: int,
               meta: Mapping[str, Any] | None = None) -> Checkpoint:
        """Make ``staging`` (from :meth:`stage`) the newest checkpoint at ``watermark``, then prune to
        ``keep``. Every object under it is read for its size and sha256; the manifest goes in last.
        Raises :class:`CheckpointError` for an object named ``manifest.json``."""
        watermark, meta = _check_commit(watermark, meta)
        name = self._check_staging(staging, must_exist=True)
        path = str(storage.join(self.root, name))
        listed = storage.files_under(path)
        if not listed:  # an object store cannot tell an empty prefix from a deleted one
            raise ValueError(f"staging prefix {storage.where(path)} holds no objects: nothing to commit "
                             "(deleted by another store's cleanup?)")
        if MANIFEST in listed:
            raise CheckpointError(path, [f"{MANIFEST} is reserved for the checkpoint's manifest"])
        files = {}
        for rel in sorted(listed):
            try:
                files[rel] = _hash_object(storage.join(path, *rel.split("/")), rel)
            except _FileProblem as e:
                raise CheckpointError(path, [str(e)]) from None
        body = {"format": FORMAT, "watermark": watermark, "created": time.time(), "meta": meta,
                "files": {rel: {"size": e.size, "sha256": e.sha256} for rel, e in files.items()}}
        manifest = dict(body, manifest_sha256=_body_digest(body))
        storage.write_bytes(storage.join(path, MANIFEST),
                            (json.dumps(manifest, indent=1, allow_nan=False) + "\n").encode())
        self._open.discard(name)
        return self._committed(Checkpoint(path, _seq_of(name), watermark, meta, body["created"], files))

    def cleanup(self, min_age: float | None = None) -> list[str]:  # type: ignore[override]
        """Delete every incomplete ``ckpt-*`` prefix not handed out by this instance in which
        nothing changed for ``min_age`` seconds (default ``stale_after``); return their URIs."""
        min_age = self.stale_after if min_age is None else min_age
        newest: dict[str, float] = {}
        complete = set()
        for rel, (_, mtime) in storage.files_under(self.root).items():
            top, _, rest = rel.partition("/")
            if _NAME_RE.match(top):
                newest[top] = max(newest.get(top, 0.0), mtime)
                complete.update([top] if rest == MANIFEST else [])
        removed = []
        for name, mtime in newest.items():
            if name not in complete and name not in self._open and time.time() - mtime >= min_age:
                path = storage.join(self.root, name)
                storage.remove_tree(path)
                removed.append(path)
        return removed

    def _prune(self) -> None:
        for _, path in self._scan()[: -self.keep]:
            try:
                storage.remove(storage.join(path, MANIFEST))  # first: from here on it is not a checkpoint
                storage.remove_tree(path)
            except OSError as e:
                log.warning("could not prune checkpoint %s: %s", storage.where(path), e)

    def _check_files(self, ckpt: Checkpoint) -> None:
        _check_files(ckpt, _hash_object)

    def _scan(self) -> list[tuple[int, str]]:  # type: ignore[override]
        """``(seq, uri)`` of every complete checkpoint (a ``ckpt-*`` prefix with a manifest), by seq:
        one listing of the store (serving reads it at every refresh), not a request per checkpoint."""
        found = []
        for rel in storage.files_under(self.root):
            top, _, rest = rel.partition("/")
            if rest == MANIFEST and _NAME_RE.match(top):
                found.append((_seq_of(top), str(storage.join(self.root, top))))
        return sorted(found)

    def _next_seq(self) -> int:
        return max((_seq_of(n) for n in storage.listdir(self.root) if _NAME_RE.match(n)), default=0) + 1

    def _check_staging(self, staging: str | os.PathLike[str], *, must_exist: bool) -> str:  # type: ignore[override]
        """The checkpoint name of ``staging`` if this instance staged it (else ValueError)."""
        name = storage.name_of(staging)
        if str(staging) != str(storage.join(self.root, name)) or (must_exist and name not in self._open):
            raise ValueError(f"staging prefix {storage.where(staging)} is not one this store handed out "
                             f"under {storage.where(self.root)} and has not committed or aborted (from stage())")
        return name


def checkpoint_store(root: str | os.PathLike[str], keep: int = 3, *,
                     stale_after: float = 600.0) -> CheckpointStore:
    """The checkpoint store at ``root``: a directory, or an object-store prefix (a URI)."""
    if storage.local_path(root) is not None:
        return CheckpointStore(storage.local_path(root), keep, stale_after=stale_after)  # type: ignore[arg-type]
    return ObjectCheckpointStore(str(root), keep, stale_after=stale_after)


# -- helpers (all disk access of the module goes through these and the methods above) --

def _warn_refused(err: CheckpointError) -> None:
    log.warning("refused %s", err)


def _seq_of(name: str) -> int:
    return int(name[len(_PREFIX):])


def _body_digest(body: Mapping[str, Any]) -> str:
    """sha256 of the manifest body in a canonical JSON form (sorted keys, no spaces)."""
    try:
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"not canonical JSON: {e}") from None
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _check_commit(watermark: Any, meta: Mapping[str, Any] | None) -> tuple[int, dict[str, Any]]:
    """A commit's watermark as an int and its meta as a reader will see it; ValueError naming the bad one."""
    if isinstance(watermark, bool):
        raise ValueError(f"watermark must be an integer >= 0, got {watermark!r}")
    try:
        watermark = operator.index(watermark)  # numpy integers too
    except TypeError:
        raise ValueError(f"watermark must be an integer >= 0, got {watermark!r}") from None
    if watermark < 0:
        raise ValueError(f"watermark must be an integer >= 0, got {watermark}")
    meta = {} if meta is None else meta
    _check_json(meta, "meta")
    return watermark, json.loads(json.dumps(meta, allow_nan=False))  # tuples become lists, as a reader sees them


def _check_json(value: Any, where: str) -> None:
    """Raise ValueError naming the first part of ``value`` that JSON would not round-trip."""
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} is {value}; JSON has no NaN or infinity")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_json(v, f"{where}[{i}]")
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{where} has key {k!r} of type {type(k).__name__}; JSON keys are strings")
            _check_json(v, f"{where}[{k!r}]")
        return
    raise ValueError(f"{where} is a {type(value).__name__} ({value!r:.60}), not JSON "
                     "(null, bool, int, float, str, list or dict with string keys)")


def _safe_rel(rel: Any) -> bool:
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        return False
    p = PurePosixPath(rel)
    return not p.is_absolute() and ".." not in p.parts and p.as_posix() == rel and rel != MANIFEST


def _checksum_tree(staging: Path) -> dict[str, FileEntry]:
    """Size and sha256 of every file under ``staging``, each fsynced, then every directory fsynced."""
    files: dict[str, FileEntry] = {}
    dirs = []
    problems = []
    for dirpath, dirnames, filenames in os.walk(staging, followlinks=False):
        dirs.append(dirpath)
        for name in sorted(dirnames):
            if os.path.islink(os.path.join(dirpath, name)):
                rel = Path(dirpath, name).relative_to(staging).as_posix()
                problems.append(f"{rel} is a symbolic link; a checkpoint holds its own files only")
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            rel = Path(full).relative_to(staging).as_posix()
            if dirpath == str(staging) and name in (MANIFEST, _MANIFEST_TMP):
                problems.append(f"{rel} is reserved for the checkpoint's manifest")
                continue
            if os.path.islink(full):
                problems.append(f"{rel} is a symbolic link; a checkpoint holds its own files only")
                continue
            try:
                files[rel] = _hash_file(Path(full), rel, fsync=True)
            except _FileProblem as e:
                problems.append(str(e))
    if problems:
        raise CheckpointError(staging, problems)
    for d in dirs:
        fsync_dir(Path(d))
    return dict(sorted(files.items()))


class _FileProblem(Exception):
    """One file's problem, as a line of a CheckpointError."""


def _hash_file(path: Path, rel: str, *, fsync: bool = False, expect: FileEntry | None = None) -> FileEntry:
    """Stream ``path`` through sha256 (``_CHUNK`` bytes at a time); fsync it if asked.

    With ``expect``, a size mismatch is reported before reading any byte.
    Raises :class:`_FileProblem` naming ``rel``.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise _FileProblem(f"file {rel} is missing") from None
    except OSError as e:
        raise _FileProblem(f"file {rel} cannot be opened: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _FileProblem(f"{rel} is not a regular file")
        if expect is not None and st.st_size != expect.size:
            raise _FileProblem(f"file {rel} has {st.st_size} bytes, the manifest says {expect.size}")
        h = _new_hash()
        n = 0
        with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
            while block := f.read(_CHUNK):
                h.update(block)
                n += len(block)
        end = os.fstat(fd)
        if not n == st.st_size == end.st_size or end.st_mtime_ns != st.st_mtime_ns:
            raise _FileProblem(f"file {rel} changed while it was read ({st.st_size} bytes before, {n} read, "
                               f"{end.st_size} after): is a writer still writing it?")
        if fsync:
            os.fsync(fd)
        return FileEntry(n, h.hexdigest())
    finally:
        os.close(fd)


def _hash_object(loc: str | Path, rel: str, expect: FileEntry | None = None) -> FileEntry:
    """Size and sha256 of an object, streamed; :class:`_FileProblem` naming ``rel``."""
    fs, path = storage.filesystem(loc)
    try:
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            raise _FileProblem(f"file {rel} is missing")
        if expect is not None and info.size != expect.size:
            raise _FileProblem(f"file {rel} has {info.size} bytes, the manifest says {expect.size}")
        h = _new_hash()
        n = 0
        with fs.open_input_stream(path) as f:
            while block := f.read(_CHUNK):
                h.update(block)
                n += len(block)
    except OSError as e:
        raise _FileProblem(f"file {rel} cannot be read: {storage.mask_uri(str(e))}") from None
    return FileEntry(n, h.hexdigest())


def _check_files(ckpt: Checkpoint, hash_one: Callable[..., FileEntry]) -> None:
    """Raise CheckpointError listing every file of ``ckpt`` that is missing or differs
    (``hash_one(location, rel, expect=entry)``: :func:`_hash_file` or :func:`_hash_object`)."""
    problems = []
    for rel, want in ckpt.files.items():
        try:
            got = hash_one(storage.join(ckpt.path, *rel.split("/")), rel, expect=want)
        except _FileProblem as e:
            problems.append(str(e))
            continue
        if got.sha256 != want.sha256:
            problems.append(f"file {rel} has sha256 {got.sha256}, the manifest says {want.sha256}")
    if problems:
        raise CheckpointError(ckpt.path, problems)


def _newest_mtime(path: Path) -> float:
    """The latest mtime of ``path`` and anything under it (a writer touching any file counts)."""
    newest = 0.0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (".", *dirnames, *filenames):
            try:
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
            except FileNotFoundError:
                pass
    return newest

