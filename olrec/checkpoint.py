"""Consistent training checkpoints: a directory of files plus a manifest.

Writers (parameter-server shards in their own processes, the trainer's dense
state) put files in a staging directory from :meth:`CheckpointStore.stage`;
:meth:`CheckpointStore.commit` checksums them, writes ``manifest.json`` last
(temp file, fsync, rename) and renames the directory to ``ckpt-<seq>``. A
checkpoint is complete exactly when its manifest exists; a crash at any point
leaves either the previous checkpoints or a hidden staging directory, which
readers ignore and the next commit removes. A file whose size or sha256 does
not match its manifest entry makes the checkpoint refused, naming the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

MANIFEST = "manifest.json"
_PREFIX = "ckpt-"
_STAGING = ".staging-"
log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: the message names it and what is wrong."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    seq: int
    watermark: int  # every event with a log offset below it is in the checkpoint
    meta: dict = field(compare=False)
    created: float
    files: dict = field(compare=False, repr=False)  # relative path -> {"size", "sha256"}

    def file(self, name: str) -> Path:
        return self.path / name


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class CheckpointStore:
    """Checkpoints under ``root``, newest ``keep`` kept."""

    def __init__(self, root: str | os.PathLike[str], keep: int = 3) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an integer >= 1, got {keep!r}")
        self.root = Path(root)
        self.keep = keep

    def stage(self) -> Path:
        """A fresh staging directory inside ``root`` for a checkpoint's files."""
        self.root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=_STAGING, dir=self.root))

    def abort(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def commit(self, staging: Path, watermark: int, meta: dict[str, Any] | None = None) -> Checkpoint:
        """Make ``staging`` the newest checkpoint at ``watermark``; prune to ``keep``."""
        if isinstance(watermark, bool) or not isinstance(watermark, int) or watermark < 0:
            raise ValueError(f"watermark must be an integer >= 0, got {watermark!r}")
        staging = Path(staging)
        if not staging.is_dir() or staging.parent.resolve() != self.root.resolve():
            raise ValueError(f"{staging} is not a staging directory of {self.root}")
        files = {}
        for p in sorted(staging.rglob("*")):
            if p.is_file():
                rel = p.relative_to(staging).as_posix()
                files[rel] = {"size": p.stat().st_size, "sha256": sha256_of(p)}
                _fsync(p)
        seq = self._next_seq()
        manifest = {"seq": seq, "watermark": watermark, "created": time.time(), "meta": meta or {}, "files": files}
        tmp = staging / f".{MANIFEST}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, staging / MANIFEST)
        final = self.root / f"{_PREFIX}{seq:08d}"
        os.replace(staging, final)
        _fsync(self.root)
        self._prune()
        return self._parse(final)

    def list(self) -> list[Checkpoint]:
        """Complete checkpoints (their manifest parsed, files not verified), oldest first."""
        if not self.root.is_dir():
            return []
        out = []
        for d in sorted(self.root.glob(f"{_PREFIX}*")):
            if (d / MANIFEST).is_file():
                try:
                    out.append(self._parse(d))
                except CheckpointError as e:
                    log.warning("%s", e)
        return sorted(out, key=lambda c: c.seq)

    def verify(self, ckpt: Checkpoint) -> None:
        """Raise :class:`CheckpointError` unless every file matches the manifest."""
        for rel, want in ckpt.files.items():
            p = ckpt.path / rel
            if not p.is_file():
                raise CheckpointError(f"checkpoint {ckpt.path}: file {rel} is missing")
            size = p.stat().st_size
            if size != want["size"]:
                raise CheckpointError(f"checkpoint {ckpt.path}: file {rel} has {size} bytes, the manifest says {want['size']}")
            got = sha256_of(p)
            if got != want["sha256"]:
                raise CheckpointError(f"checkpoint {ckpt.path}: file {rel} has sha256 {got}, "
                                      f"the manifest says {want['sha256']}")

    def latest(self, on_refused: Callable[[CheckpointError], None] | None = None) -> Checkpoint | None:
        """The newest checkpoint that verifies; each newer one refused is passed to
        ``on_refused`` (default: a logged warning). ``None`` when none verifies."""
        for ckpt in reversed(self.list()):
            try:
                self.verify(ckpt)
                return ckpt
            except CheckpointError as e:
                (on_refused or (lambda err: log.warning("refused %s", err)))(e)
        return None

    # -- internals ---------------------------------------------------------
    def _parse(self, d: Path) -> Checkpoint:
        try:
            m = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
            return Checkpoint(d, int(m["seq"]), int(m["watermark"]), dict(m.get("meta", {})), float(m["created"]),
                              dict(m["files"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint {d}: unreadable {MANIFEST}: {e}") from None

    def _next_seq(self) -> int:
        seqs = [int(d.name[len(_PREFIX):]) for d in self.root.glob(f"{_PREFIX}*") if d.name[len(_PREFIX):].isdigit()]
        return max(seqs, default=0) + 1

    def _prune(self) -> None:
        for ckpt in self.list()[: -self.keep]:
            shutil.rmtree(ckpt.path, ignore_errors=True)
        for d in self.root.glob(f"{_STAGING}*"):  # left by a writer that died; ours was just renamed
            if time.time() - d.stat().st_mtime > 60:
                shutil.rmtree(d, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
