"""An append-only event log: Parquet segments addressed by offset, in a
directory or under an object-store prefix.

Layout::

    seg-<start:020d>-<end:020d>.parquet   good events, offsets [start, end)
    dead-letter.jsonl                     rejected rows, one JSON object a line (a directory)
    dead-letter/<start>-<ns>-<n>.jsonl    the same, an object per append (an object store)
    writer.lock                           flock'ed by the single writer (a directory)
    writer.lease                          held by the single writer (an object store)

Every good row gets the next offset, stored in an ``offset`` int64 column, so
the model's watermark ("every event below offset w is in the weights") can be
resumed exactly. Segment names carry their offset range, so a reader lists and
seeks without opening files, and a reader never sees part of a segment: in a
directory it appears atomically (temp file, fsync, rename, fsync of the
directory; a crash mid-write leaves only a temp file that the next writer
removes); in an object store it is one object, which the store shows whole or
not at all (see :class:`_ObjectDir`).

A log is named by a local path or by a URI pyarrow opens (``s3://bucket/log``,
``gs://...``; for S3, options such as ``?endpoint_override=host:port`` ride
in the URI and credentials come from the usual environment).

Each segment keeps the columns of the append that wrote it; segments appended
with different context columns are fine, and :meth:`EventLog.read` returns
each segment's own columns (or, with ``columns=``, exactly those columns, as
nulls where a segment lacks one).

One writer per log: offsets are allocated by one writer (in the cluster, the
one writer actor every producer appends through), enforced by an exclusive
``flock`` or a lease; any number of readers, in any process, may read and follow.
"""

from __future__ import annotations

import bisect
import fcntl
import json
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from .schema import validate
from . import storage
from .storage import filesystem, fsync_dir, is_uri, local_path, mask_uri  # noqa: F401 (is_uri, mask_uri: olrec.log's API)

OFFSET = "offset"
DEAD_LETTER = "dead-letter.jsonl"
DEAD_LETTER_DIR = "dead-letter"
LOCK_FILE = "writer.lock"
LEASE_FILE = "writer.lease"
LEASE_TTL_S = 30.0  # an object-store writer that stops renewing its lease gives the log up after this
_DEAD_RE = re.compile(r"^\d{20}-\d{20}-(\d{8})\.jsonl$")
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
    name: str


def segment_name(start: int, end: int) -> str:
    return f"seg-{start:020d}-{end:020d}.parquet"


class EventLog:
    """An append-only, offset-addressed event log in directory ``path``.

    Thread-safe within a process; across processes, one writer and any number
    of readers.
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True) -> None:
        self._dir = _open_dir(path, create)
        self._lock = threading.RLock()  # serializes appends from producer threads
        self._writer = False  # whether this instance holds the writer lock or lease
        # Segment names parsed before: followers list the log several times a second,
        # and parsing hundreds of names each time was most of a follower's CPU.
        self._parsed: dict[str, Segment] = {}
        self._end = self._scan_end()
        self._dead = self._dir.dead_count()

    # -- properties -------------------------------------------------------

    @property
    def path(self) -> Path | str:
        """The log's directory, or its URI."""
        return self._dir.path

    @property
    def is_writer(self) -> bool:
        return self._writer

    @property
    def end_offset(self) -> int:
        """The next offset to be assigned (the number of good events ever appended)."""
        with self._lock:
            # The writer's own counter is authoritative; a reader looks afresh,
            # since another process may have appended.
            return self._end if self.is_writer else self._scan_end()

    @property
    def dead_lettered(self) -> int:
        """How many rows were rejected as dead letters, over the log's life."""
        with self._lock:
            return self._dead if self.is_writer else self._dir.dead_count()

    def dead_letters(self) -> list[dict]:
        """The dead letters, oldest first: ``{"time", "reason", "row"}`` each."""
        return self._dir.dead_letters()

    def __repr__(self) -> str:
        return f"EventLog({self._dir.where!r}, end_offset={self.end_offset}, writer={self.is_writer})"

    # -- writing ----------------------------------------------------------

    def open_writer(self) -> EventLog:
        """Take the writer lock (``append`` does this on first use); raise if another writer has it."""
        with self._lock:
            if self._writer:
                return self
            self._dir.lock()
            self._writer = True
            # Now nobody else writes: recount from the log itself.
            self._end = self._scan_end()
            self._dead = self._dir.dead_count()
            return self

    def close(self) -> None:
        """Release the writer lock (if held). Reading still works afterwards."""
        with self._lock:
            if self._writer:
                self._writer = False  # even if the release fails: this instance stops writing
                self._dir.unlock()

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
            raise ValueError(f"column {OFFSET!r} is reserved by the event log {self._dir.where}; rename it")
        split = validate(table)
        with self._lock:
            self.open_writer()
            start = self._end
            try:
                # Dead letters first: if we crash before the segment lands, the
                # append was never acknowledged, and no rejected row went unrecorded.
                if split.n_bad:
                    self._write_dead_letters(split.bad)
                n_good = split.good.num_rows
                if n_good:
                    good = split.good.add_column(0, OFFSET, pa.array(np.arange(start, start + n_good, dtype=np.int64)))
                    self._write_segment(good, start, start + n_good)
            except LogLockedError:  # another writer has the log now: stop being one
                self._writer = False
                self._dir.forget()
                raise
            return AppendResult(start=start, end=start + n_good, n_good=n_good, n_bad=split.n_bad)

    def _write_segment(self, table: pa.Table, start: int, end: int) -> None:
        def landed() -> None:
            # Visible from here on: advance before anything else can fail, so
            # the next append never reuses these offsets.
            self._end = end

        self._dir.put_segment(segment_name(start, end), table, landed)

    def _write_dead_letters(self, bad: pa.Table) -> None:
        now = datetime.now(timezone.utc).isoformat()
        lines = []
        for row in bad.to_pylist():
            reason = row.pop("reason")
            lines.append(json.dumps({"time": now, "reason": reason, "row": row}, ensure_ascii=False) + "\n")
        self._dir.add_dead(lines, self._end)
        self._dead += len(lines)

    # -- reading ----------------------------------------------------------

    def segments(self) -> list[Segment]:
        """The visible segments in offset order (from their names; no file is opened)."""
        segs = []
        parsed = self._parsed
        for name in self._dir.names():
            seg = parsed.get(name)
            if seg is None:
                m = _SEGMENT_RE.match(name)
                if m is None:
                    continue
                seg = parsed[name] = Segment(int(m[1]), int(m[2]), name)
            segs.append(seg)
        segs.sort()
        for a, b in zip(segs, segs[1:]):
            if a.end != b.start:
                raise RuntimeError(f"event log {self._dir.where} is corrupt: {a.name} is followed by {b.name}")
        return segs

    def _listing(self) -> tuple[list[Segment], int]:
        """The segments and the log end, from one listing."""
        segs = self.segments()
        return segs, segs[-1].end if segs else 0

    def _scan_end(self) -> int:
        return self._listing()[1]

    def read(self, start: int = 0, end: int | None = None, *,
             columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
        """Yield the events with offsets in ``[start, end)`` as tables, in offset order.

        ``end`` defaults to the log end when called. Each table holds one
        segment's rows and that segment's own columns; with ``columns``, exactly
        ``offset`` plus those columns (nulls where a segment lacks one).
        Validation happens here, not on first ``next()``.
        """
        segs, log_end = self._listing()
        end = log_end if end is None else end
        self._check_range(segs, start, end, log_end)
        return self._iter(segs, start, end, columns)

    def read_available(self, start: int, end: int | None = None, *,
                       columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
        """:meth:`read` of the events in ``[start, end)`` the log holds now
        (``end=None``: all from ``start``): nothing, not an error, while the log
        is short of ``start``. One listing of the log, for followers that poll."""
        segs, log_end = self._listing()
        end = log_end if end is None else min(end, log_end)
        if start >= end:
            return iter(())
        self._check_range(segs, start, end, log_end)
        return self._iter(segs, start, end, columns)

    def _check_range(self, segs: list[Segment], start: int, end: int, log_end: int) -> None:
        if start < 0:
            raise ValueError(f"start offset {start} is negative")
        if start > log_end:
            raise ValueError(f"start offset {start} is beyond the log end {log_end} of {self._dir.where}")
        if end < start:
            raise ValueError(f"end offset {end} is before start offset {start}")
        if end > log_end:
            raise ValueError(f"end offset {end} is beyond the log end {log_end} of {self._dir.where}")
        if segs and start < segs[0].start:
            raise ValueError(f"start offset {start} is before the first segment {segs[0].name}")

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
        with self._dir.open_segment(seg.name) as source, pq.ParquetFile(source) as pf:
            if pf.metadata.num_rows != seg.end - seg.start:
                raise RuntimeError(f"segment {seg.name} of {self._dir.where} holds {pf.metadata.num_rows} rows, "
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
        the log every ``poll_interval`` seconds.
        """
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be positive, got {poll_interval}")
        pos = start
        last_new = time.monotonic()
        while stop is None or not stop.is_set():
            segs, log_end = self._listing()
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


# -- where a log lives: a POSIX directory or a prefix in an object store ------------------------


def _open_dir(path: str | os.PathLike[str], create: bool) -> _LocalDir | _ObjectDir:
    local = local_path(path)  # file:// too: a local directory, where rename, fsync and flock work
    return _LocalDir(local, create) if local is not None else _ObjectDir(str(path), create)


def log_exists(path: str | os.PathLike[str]) -> bool:
    """Whether an event log (a directory, or an object-store prefix) is at ``path``; reads none of it."""
    try:
        _open_dir(path, create=False)
    except FileNotFoundError:
        return False
    return True


class _LocalDir:
    """A POSIX directory: a segment is renamed into place after an fsync, one
    writer holds an ``flock``, dead letters are lines appended to one file."""

    def __init__(self, path: Path, create: bool) -> None:
        self.path = path
        if not path.is_dir():
            if not create:
                raise FileNotFoundError(f"event log directory {path} does not exist")
            path.mkdir(parents=True, exist_ok=True)
            fsync_dir(path.parent)  # the new directory survives a crash
        self._lock_file: BinaryIO | None = None

    @property
    def where(self) -> str:
        return str(self.path)

    def names(self) -> list[str]:
        return os.listdir(self.path)

    def open_segment(self, name: str) -> pa.NativeFile:
        return pa.OSFile(str(self.path / name))

    def put_segment(self, name: str, table: pa.Table, landed: Callable[[], None]) -> None:
        """Write ``table`` as segment ``name``: temp file, fsync, rename; ``landed()``
        runs once it is visible, before the directory's fsync (which may fail)."""
        tmp = self.path / f"{_TMP_PREFIX}{uuid.uuid4().hex}.parquet"
        try:
            with open(tmp, "wb") as f:
                pq.write_table(table, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        landed()
        fsync_dir(self.path)

    def lock(self) -> None:
        lock_path = self.path / LOCK_FILE
        # A file object, not a bare fd: if the log is dropped without close(),
        # garbage collection closes it and so releases the lock.
        f = os.fdopen(os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644), "r+b")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(f.fileno(), 64, 0).decode(errors="replace").strip() or "unknown"
            f.close()
            raise LogLockedError(
                f"event log {self.path} already has a writer (pid {holder} holds {lock_path}); "
                "offsets come from one writer, so append through it") from None
        except BaseException:
            f.close()
            raise
        self._lock_file = f
        try:
            os.ftruncate(f.fileno(), 0)
            os.pwrite(f.fileno(), f"{os.getpid()}\n".encode(), 0)  # for the error message above
            # Now nobody else writes: drop temp files of a crashed writer and cut a
            # dead-letter line torn by a crash.
            for p in self.path.glob(_TMP_PREFIX + "*"):
                p.unlink(missing_ok=True)
            _truncate_torn_tail(self.path / DEAD_LETTER)
        except BaseException:
            self.unlock()
            raise

    def check_lock(self) -> None:
        pass  # the flock holds until released

    def forget(self) -> None:
        self.unlock()

    def unlock(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def dead_count(self) -> int:
        return _count_lines(self.path / DEAD_LETTER)

    def add_dead(self, lines: list[str], start: int) -> None:
        path = self.path / DEAD_LETTER
        created = not path.exists()
        with open(path, "a", encoding="utf-8") as f:
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
        if created:
            fsync_dir(self.path)

    def dead_letters(self) -> list[dict]:
        try:
            text = (self.path / DEAD_LETTER).read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line]


class _ObjectDir:
    """A prefix in an object store, through a pyarrow filesystem (``s3://``,
    ``gs://``, ...). An object store has no rename, no append and no lock:

    - a segment is one object written under its final name; the store makes
      it visible whole or not at all when the write completes, so the segment
      is its own manifest entry and a reader never sees part of one;
    - dead letters go to one object per append (``dead-letter/``), their count
      in the name, so the count needs a listing and no read;
    - the single writer holds a lease object (``writer.lease``), renewed while
      it appends and checked before every segment it writes. pyarrow writes no
      object conditionally, so two writers racing for the lease within one
      check could both write: the fence is the one writer actor that every
      producer appends through, and the lease turns a second writer away. A
      lease lapses by its writer's clock, read on the next writer's: clocks
      must agree to well within :data:`LEASE_TTL_S`.
    """

    def __init__(self, uri: str, create: bool) -> None:
        self.path = uri  # the URI, as given
        try:
            self.fs, self.base = filesystem(uri)
        except ValueError as e:
            raise ValueError(f"event log {e}") from None
        if self.fs.get_file_info(self.base).type == pafs.FileType.NotFound:
            if not create:
                raise FileNotFoundError(f"event log {self.where} does not exist")
            self.fs.create_dir(self.base)
        self._owner: str | None = None
        self._renewed = 0.0

    @property
    def where(self) -> str:
        """The URI for messages: credentials in it (``s3://key:secret@bucket``) masked."""
        return mask_uri(self.path)

    def _at(self, *names: str) -> str:
        return str(storage.join(self.path, *names))

    def names(self) -> list[str]:
        return storage.listdir(self.path)

    def open_segment(self, name: str) -> pa.NativeFile:
        return self.fs.open_input_file(f"{self.base}/{name}")

    def put_segment(self, name: str, table: pa.Table, landed: Callable[[], None]) -> None:
        # Encoded first: an error while encoding must not reach the store, where
        # closing the stream (as leaving a `with` does) would publish a part.
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        self._put(name, buf.getvalue())
        landed()

    def _put(self, name: str, data: bytes | pa.Buffer) -> None:
        """One object, written only while this writer holds the lease."""
        self.check_lock()
        storage.write_bytes(self._at(*name.split("/")), data)

    # The lease: {"owner", "host", "pid", "renewed"} (seconds since the epoch, the writer's clock).
    def _read_lease(self) -> dict | None:
        try:
            return json.loads(storage.read_bytes(self._at(LEASE_FILE)))
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:  # not a lease: nobody's (a store error propagates: the append fails)
            return None

    def _write_lease(self) -> None:
        lease = {"owner": self._owner, "host": socket.gethostname(), "pid": os.getpid(), "renewed": time.time()}
        storage.write_bytes(self._at(LEASE_FILE), json.dumps(lease).encode())
        self._renewed = time.monotonic()

    def lock(self) -> None:
        held = self._read_lease()
        if held is not None and time.time() - float(held.get("renewed", 0)) < LEASE_TTL_S:
            raise LogLockedError(
                f"event log {self.where} already has a writer (pid {held.get('pid')} on {held.get('host')} "
                f"renewed {LEASE_FILE} {time.time() - float(held['renewed']):.0f} s ago; a lease lapses "
                f"after {LEASE_TTL_S:.0f} s); offsets come from one writer, so append through it")
        self._owner = uuid.uuid4().hex
        self._write_lease()
        held = self._read_lease()  # a writer that took it at the same moment wins or loses here
        if held is None or held.get("owner") != self._owner:
            self._owner = None
            raise LogLockedError(f"event log {self.where}: another writer took {LEASE_FILE} at the same time")

    def check_lock(self) -> None:
        """Before a segment: the lease is still this writer's (renewed when a third of it has passed)."""
        held = self._read_lease()
        if held is None or held.get("owner") != self._owner:
            raise LogLockedError(f"event log {self.where}: this writer lost {LEASE_FILE} to "
                                 f"{'nobody' if held is None else 'pid %s on %s' % (held.get('pid'), held.get('host'))}"
                                 "; its offsets may now be another writer's, so it stops")
        if time.monotonic() - self._renewed > LEASE_TTL_S / 3:
            self._write_lease()

    def forget(self) -> None:
        """Stop writing without touching the lease: it is another writer's now."""
        self._owner = None

    def unlock(self) -> None:
        owner, self._owner = self._owner, None
        if owner is not None:
            held = self._read_lease()
            if held is not None and held.get("owner") == owner:
                storage.remove(self._at(LEASE_FILE))

    def dead_count(self) -> int:
        return sum(int(m[1]) for n in storage.listdir(self._at(DEAD_LETTER_DIR)) if (m := _DEAD_RE.match(n)))

    def add_dead(self, lines: list[str], start: int) -> None:
        self._put(f"{DEAD_LETTER_DIR}/{start:020d}-{time.time_ns():020d}-{len(lines):08d}.jsonl",
                  "".join(lines).encode())

    def dead_letters(self) -> list[dict]:
        out = []
        for name in sorted(n for n in storage.listdir(self._at(DEAD_LETTER_DIR)) if _DEAD_RE.match(n)):
            text = storage.read_bytes(self._at(DEAD_LETTER_DIR, name)).decode()
            out += [json.loads(line) for line in text.splitlines() if line]
        return out


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
