"""An append-only event log: a directory of Parquet segments addressed by offset.

Layout of a log directory::

    seg-<start:020d>-<end:020d>.parquet   good events, offsets [start, end)
    dead-letter.jsonl                     rejected rows, one JSON object a line
    writer.lock                           flock'ed by the single writer

Every good row gets the next offset, stored in an ``offset`` int64 column, so
the model's watermark ("every event below offset w is in the weights") can be
resumed exactly. Segment names carry their offset range, so a reader lists and
seeks without opening files. A segment appears atomically (temp file, fsync,
rename, fsync of the directory): a reader never sees a partial one, and a
crash mid-write leaves only a temp file that the next writer removes.

Each segment keeps the columns of the append that wrote it; segments appended
with different context columns are fine, and :meth:`EventLog.read` returns
each segment's own columns (or, with ``columns=``, exactly those columns, as
nulls where a segment lacks one).

One writer per log: offsets are allocated by one writer (in the cluster, the
one writer actor every producer appends through), enforced by an exclusive
``flock``; any number of readers, in any process, may read and follow.
"""

from __future__ import annotations

import bisect
import fcntl
import json
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Iterator, NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .schema import validate

OFFSET = "offset"
DEAD_LETTER = "dead-letter.jsonl"
LOCK_FILE = "writer.lock"
_SEGMENT_RE = re.compile(r"^seg-(\d{20})-(\d{20})\.parquet$")
_TMP_PREFIX = ".tmp-seg-"


class LogLockedError(RuntimeError):
    """Another writer holds the log's writer lock."""


@dataclass(frozen=True)
class AppendResult:
    """Outcome of one append: good rows got offsets ``[start, end)``."""

    start: int
    end: int
    n_good: int
    n_bad: int


class Segment(NamedTuple):
    start: int
    end: int
    path: Path


def segment_name(start: int, end: int) -> str:
    return f"seg-{start:020d}-{end:020d}.parquet"


class EventLog:
    """An append-only, offset-addressed event log in directory ``path``.

    Thread-safe within a process; across processes, one writer and any number
    of readers.
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True) -> None:
        self._path = Path(path)
        if not self._path.is_dir():
            if not create:
                raise FileNotFoundError(f"event log directory {self._path} does not exist")
            self._path.mkdir(parents=True, exist_ok=True)
            fsync_dir(self._path.parent)  # the new directory survives a crash
        self._lock = threading.RLock()  # serializes appends from producer threads
        self._lock_file: BinaryIO | None = None  # the flock'ed file while this instance is the writer
        # Segment names parsed before: followers list the directory several times a second,
        # and parsing hundreds of names into paths each time was most of a follower's CPU.
        self._parsed: dict[str, Segment] = {}
        self._end = self._scan_end()
        self._dead = _count_lines(self._dead_path)

    # -- properties -------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    @property
    def is_writer(self) -> bool:
        return self._lock_file is not None

    @property
    def end_offset(self) -> int:
        """The next offset to be assigned (the number of good events ever appended)."""
        with self._lock:
            # The writer's own counter is authoritative; a reader looks afresh,
            # since another process may have appended.
            return self._end if self.is_writer else self._scan_end()

    @property
    def dead_lettered(self) -> int:
        """How many rows were rejected into the dead-letter file, over the log's life."""
        with self._lock:
            return self._dead if self.is_writer else _count_lines(self._dead_path)

    @property
    def _dead_path(self) -> Path:
        return self._path / DEAD_LETTER

    def __repr__(self) -> str:
        return f"EventLog({str(self._path)!r}, end_offset={self.end_offset}, writer={self.is_writer})"

    # -- writing ----------------------------------------------------------

    def open_writer(self) -> EventLog:
        """Take the writer lock (``append`` does this on first use); raise if another writer has it."""
        with self._lock:
            if self.is_writer:
                return self
            lock_path = self._path / LOCK_FILE
            # A file object, not a bare fd: if this instance is dropped without
            # close(), garbage collection closes it and so releases the lock.
            f = os.fdopen(os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644), "r+b")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(f.fileno(), 64, 0).decode(errors="replace").strip() or "unknown"
                f.close()
                raise LogLockedError(
                    f"event log {self._path} already has a writer (pid {holder} holds {lock_path}); "
                    "offsets come from one writer, so append through it") from None
            except BaseException:
                f.close()
                raise
            os.ftruncate(f.fileno(), 0)
            os.pwrite(f.fileno(), f"{os.getpid()}\n".encode(), 0)  # for the error message above
            self._lock_file = f
            # Now nobody else writes: drop temp files of a crashed writer, cut a
            # dead-letter line torn by a crash, and recount from disk.
            for p in self._path.glob(_TMP_PREFIX + "*"):
                p.unlink(missing_ok=True)
            _truncate_torn_tail(self._dead_path)
            self._end = self._scan_end()
            self._dead = _count_lines(self._dead_path)
            return self

    def close(self) -> None:
        """Release the writer lock (if held). Reading still works afterwards."""
        with self._lock:
            if self._lock_file is not None:
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)
                self._lock_file.close()
                self._lock_file = None

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def append(self, table: pa.Table) -> AppendResult:
        """Validate ``table``; good rows become one new segment, bad rows are dead-lettered.

        Bad rows never hold back the good ones. An empty or all-bad table
        writes no segment (``start == end``).
        """
        if not isinstance(table, pa.Table):
            raise TypeError(f"append expects a pyarrow.Table, got {type(table).__name__}")
        if OFFSET in table.column_names:
            raise ValueError(f"column {OFFSET!r} is reserved by the event log {self._path}; rename it")
        split = validate(table)
        with self._lock:
            self.open_writer()
            start = self._end
            # Dead letters first: if we crash before the segment lands, the
            # append was never acknowledged, and no rejected row went unrecorded.
            if split.n_bad:
                self._write_dead_letters(split.bad)
            n_good = split.good.num_rows
            if n_good:
                good = split.good.add_column(0, OFFSET, pa.array(np.arange(start, start + n_good, dtype=np.int64)))
                self._write_segment(good, start, start + n_good)
            return AppendResult(start=start, end=start + n_good, n_good=n_good, n_bad=split.n_bad)

    def _write_segment(self, table: pa.Table, start: int, end: int) -> None:
        final = self._path / segment_name(start, end)
        tmp = self._path / f"{_TMP_PREFIX}{start:020d}-{uuid.uuid4().hex}.parquet"
        try:
            with open(tmp, "wb") as f:
                pq.write_table(table, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        # Visible from here on: advance before the directory fsync, so a failing
        # fsync can never make the next append reuse these offsets.
        self._end = end
        fsync_dir(self._path)

    def _write_dead_letters(self, bad: pa.Table) -> None:
        now = datetime.now(timezone.utc).isoformat()
        lines = []
        for row in bad.to_pylist():
            reason = row.pop("reason")
            lines.append(json.dumps({"time": now, "reason": reason, "row": row}, ensure_ascii=False) + "\n")
        created = not self._dead_path.exists()
        with open(self._dead_path, "a", encoding="utf-8") as f:
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
        if created:
            fsync_dir(self._path)
        self._dead += len(lines)

    # -- reading ----------------------------------------------------------

    def segments(self) -> list[Segment]:
        """The visible segments in offset order (from their names; no file is opened)."""
        segs = []
        parsed = self._parsed
        for name in os.listdir(self._path):
            seg = parsed.get(name)
            if seg is None:
                m = _SEGMENT_RE.match(name)
                if m is None:
                    continue
                seg = parsed[name] = Segment(int(m[1]), int(m[2]), self._path / name)
            segs.append(seg)
        segs.sort()
        for a, b in zip(segs, segs[1:]):
            if a.end != b.start:
                raise RuntimeError(f"event log {self._path} is corrupt: {a.path.name} is followed by {b.path.name}")
        return segs

    def _scan_end(self) -> int:
        segs = self.segments()
        return segs[-1].end if segs else 0

    def read(self, start: int = 0, end: int | None = None, *,
             columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
        """Yield the events with offsets in ``[start, end)`` as tables, in offset order.

        ``end`` defaults to the log end when called. Each table holds one
        segment's rows and that segment's own columns; with ``columns``, exactly
        ``offset`` plus those columns (nulls where a segment lacks one).
        Validation happens here, not on first ``next()``.
        """
        segs = self.segments()
        log_end = segs[-1].end if segs else 0
        end = log_end if end is None else end
        self._check_range(segs, start, end, log_end)
        return self._iter(segs, start, end, columns)

    def _check_range(self, segs: list[Segment], start: int, end: int, log_end: int) -> None:
        if start < 0:
            raise ValueError(f"start offset {start} is negative")
        if start > log_end:
            raise ValueError(f"start offset {start} is beyond the log end {log_end} of {self._path}")
        if end < start:
            raise ValueError(f"end offset {end} is before start offset {start}")
        if end > log_end:
            raise ValueError(f"end offset {end} is beyond the log end {log_end} of {self._path}")
        if segs and start < segs[0].start:
            raise ValueError(f"start offset {start} is before the first segment {segs[0].path.name}")

    def _iter(self, segs: list[Segment], start: int, end: int,
              columns: Sequence[str] | None) -> Iterator[pa.Table]:
        i = max(bisect.bisect_right([s.start for s in segs], start) - 1, 0)
        for seg in segs[i:]:
            if seg.start >= end:
                break
            table = self._read_segment(seg, columns)
            lo, hi = max(start, seg.start) - seg.start, min(end, seg.end) - seg.start
            if hi > lo:
                yield table.slice(lo, hi - lo)

    def _read_segment(self, seg: Segment, columns: Sequence[str] | None) -> pa.Table:
        with pq.ParquetFile(seg.path) as pf:
            if pf.metadata.num_rows != seg.end - seg.start:
                raise RuntimeError(f"segment {seg.path} holds {pf.metadata.num_rows} rows, "
                                   f"its name says {seg.end - seg.start}")
            if columns is None:
                return pf.read()
            wanted = [OFFSET] + [c for c in columns if c != OFFSET]
            have = set(pf.schema_arrow.names)
            table = pf.read(columns=[c for c in wanted if c in have])
        n = table.num_rows
        return pa.table({c: table[c] if c in have else pa.nulls(n) for c in wanted})

    def follow(self, start: int = 0, *, columns: Sequence[str] | None = None,
               poll_interval: float = 0.2, stop: threading.Event | None = None,
               idle_timeout: float | None = None) -> Iterator[pa.Table]:
        """Yield events from ``start`` on, then new segments as any writer adds them.

        Ends when ``stop`` is set or nothing new arrived for ``idle_timeout``
        seconds (``None``: follow until stopped). New data is found by listing
        the directory every ``poll_interval`` seconds.
        """
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be positive, got {poll_interval}")
        pos = start
        last_new = time.monotonic()
        while stop is None or not stop.is_set():
            segs = self.segments()
            log_end = segs[-1].end if segs else 0
            self._check_range(segs, pos, log_end, log_end)
            if log_end > pos:
                for table in self._iter(segs, pos, log_end, columns):
                    yield table
                    pos += table.num_rows
                    if stop is not None and stop.is_set():
                        return
                last_new = time.monotonic()
                continue
            wait = poll_interval
            if idle_timeout is not None:
                left = idle_timeout - (time.monotonic() - last_new)
                if left <= 0:
                    return
                wait = min(wait, left)
            if stop is not None:
                stop.wait(wait)
            else:
                time.sleep(wait)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a new file, a rename) survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


def _truncate_torn_tail(path: Path) -> None:
    """Cut a last line without its newline (a crash mid-append); its append never returned."""
    try:
        f = open(path, "rb+")
    except FileNotFoundError:
        return
    with f:
        size = pos = f.seek(0, os.SEEK_END)
        keep = 0
        while pos > 0:
            step = min(pos, 1 << 16)
            f.seek(pos - step)
            i = f.read(step).rfind(b"\n")
            if i >= 0:
                keep = pos - step + i + 1
                break
            pos -= step
        if keep != size:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
