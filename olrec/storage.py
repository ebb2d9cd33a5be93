"""Where a run's files live: a local directory, or a prefix in an object store.

A *location* is a local path (``str`` or ``Path``) or a URI pyarrow opens
(``s3://bucket/run?endpoint_override=host:port``, ``gs://...``); options and
credentials ride in the URI's query and user parts, so any process, a Ray
worker on another node too, opens a location by its name alone. ``file://``
URIs are local paths.

Every write here is whole or nothing for a reader: a local file is written
to a temp file, fsynced and renamed into place; an object is encoded in
memory first and put with one write, which the store shows whole or not at
all. Neither offers a rename of a directory or an append to an object, so
the formats built on this module (checkpoints, the ledger, published dense
weights) only ever add whole files and delete them.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
import urllib.parse
from pathlib import Path
from typing import Union

import pyarrow as pa
from pyarrow import fs as pafs

Location = Union[str, "os.PathLike[str]"]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/")


def is_uri(loc: Location) -> bool:
    """Whether ``loc`` names a filesystem by URI (``s3://...``, ``gs://...``) rather than a local path.
    ``Path()`` folds ``s3://b`` to ``s3:/b``: look for the scheme either way."""
    return _SCHEME.match(str(loc)) is not None


def mask_uri(text: str) -> str:
    """``text`` with the credentials of a URI in it (``s3://key:secret@bucket/...``) masked, for messages."""
    return re.sub(r"([A-Za-z][A-Za-z0-9+.-]*:/+)[^?#\s'\"]*@", r"\1***@", str(text))


def local_path(loc: Location) -> Path | None:
    """``loc`` as a local path (``file://`` URIs too), or ``None`` for an object-store URI."""
    m = _SCHEME.match(str(loc))
    if m is None:
        return Path(loc)
    if m[1].lower() == "file":
        u = urllib.parse.urlsplit(str(loc))
        if u.netloc not in ("", "localhost"):  # file://runs/x would quietly be /x
            raise ValueError(f"{where(loc)!r}: a file:// URI names an absolute path (file:///abs/path)")
        return Path(urllib.parse.unquote(u.path))
    return None


def resolve(loc: Location) -> Path | str:
    """One spelling of ``loc`` for every process: an absolute path, or the URI as given."""
    p = local_path(loc)
    return p.resolve() if p is not None else str(loc)


def join(loc: Location, *names: str) -> Path | str:
    """``loc / name / ...``: a Path for a local location; for a URI, the names go into its path, before the query."""
    p = local_path(loc)
    if p is not None:
        return p.joinpath(*names)
    u = urllib.parse.urlsplit(str(loc))
    path = "/".join([u.path.rstrip("/"), *(urllib.parse.quote(n) for n in names)])
    return urllib.parse.urlunsplit(u._replace(path=path))


def name_of(loc: Location) -> str:
    """The last part of ``loc``'s path (a run's name in metric tags)."""
    p = local_path(loc)
    return p.name if p is not None else urllib.parse.unquote(urllib.parse.urlsplit(str(loc)).path.rstrip("/")).rsplit("/", 1)[-1]


def where(loc: Location) -> str:
    """``loc`` for messages: credentials masked."""
    return mask_uri(str(loc))


# One filesystem per store and options (the URI without its path): a client, and its
# connection pool, is made once per process, not per call. Its path prefix comes from
# the store's root (for s3://bucket/..., "bucket"), as pyarrow spells paths in it.
_filesystems: dict[tuple[str, str, str], tuple[pafs.FileSystem, str]] = {}
_fs_lock = threading.Lock()


def filesystem(loc: Location) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of an object-store URI, and the path in it."""
    u = urllib.parse.urlsplit(str(loc))
    key = (u.scheme.lower(), u.netloc, u.query)
    with _fs_lock:
        hit = _filesystems.get(key)
    if hit is None:
        root = urllib.parse.urlunsplit((u.scheme, u.netloc, "/", u.query, ""))
        try:
            hit = pafs.FileSystem.from_uri(root)
        except (pa.ArrowInvalid, ValueError) as e:  # pyarrow quotes the URI: its user part masked too
            why = mask_uri(str(e).replace(u.netloc, "***") if u.netloc else str(e))
            raise ValueError(f"{where(loc)!r}: not a filesystem URI pyarrow can open ({why})") from None
        with _fs_lock:
            hit = _filesystems.setdefault(key, hit)
    fs, prefix = hit
    rel = urllib.parse.unquote(u.path).strip("/")
    return fs, f"{prefix.rstrip('/')}/{rel}" if rel else prefix.rstrip("/") or "/"


def read_bytes(loc: Location) -> bytes:
    """The whole file; FileNotFoundError naming ``loc`` if there is none."""
    p = local_path(loc)
    if p is not None:
        return p.read_bytes()
    fs, path = filesystem(loc)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{where(loc)} does not exist") from None


def write_bytes(loc: Location, data: bytes | pa.Buffer, *, durable: bool = True) -> None:
    """Write a whole file that a reader sees whole or not at all (parents created).
    ``durable``: on a local disk, fsync the file and its directory, so it survives a
    machine crash; what is rewritten every report (metrics, published versions, ledger
    parts) skips them: a process crash cannot tear it either way."""
    p = local_path(loc)
    if p is None:
        fs, path = filesystem(loc)
        out = fs.open_output_stream(path)
        try:
            out.write(data)
        finally:
            out.close()  # publishes the object: ``data`` is complete by now
        return
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(p.parent)


def exists(loc: Location) -> bool:
    """Whether a file or a directory (a non-empty prefix, in an object store) is at ``loc``."""
    p = local_path(loc)
    if p is not None:
        return p.exists()
    fs, path = filesystem(loc)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(loc: Location) -> bool:
    p = local_path(loc)
    if p is not None:
        return p.is_file()
    fs, path = filesystem(loc)
    return fs.get_file_info(path).type == pafs.FileType.File


def listdir(loc: Location) -> list[str]:
    """Names directly under ``loc`` (files and directories); empty if there is nothing."""
    p = local_path(loc)
    if p is not None:
        try:
            return os.listdir(p)
        except FileNotFoundError:
            return []
    fs, path = filesystem(loc)
    return [i.base_name for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))]


def files_under(loc: Location) -> dict[str, tuple[int, float]]:
    """Every file under ``loc``, recursively: relative ``/``-path -> (size, mtime in seconds)."""
    p = local_path(loc)
    out: dict[str, tuple[int, float]] = {}
    if p is not None:
        for dirpath, _, filenames in os.walk(p):
            for name in filenames:
                full = os.path.join(dirpath, name)
                try:
                    st = os.lstat(full)
                except FileNotFoundError:
                    continue
                out[Path(full).relative_to(p).as_posix()] = (st.st_size, st.st_mtime)
        return out
    fs, path = filesystem(loc)
    for i in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True)):
        if i.type == pafs.FileType.File:
            mtime = i.mtime.timestamp() if i.mtime is not None else 0.0
            out[i.path[len(path) + 1:]] = (i.size, mtime)
    return out


def remove(loc: Location) -> None:
    """Delete one file; nothing if it is gone already."""
    p = local_path(loc)
    if p is not None:
        p.unlink(missing_ok=True)
        return
    fs, path = filesystem(loc)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def remove_tree(loc: Location) -> None:
    """Delete a directory (a prefix) and everything under it; nothing if it is gone already."""
    import shutil

    p = local_path(loc)
    if p is not None:
        shutil.rmtree(p, ignore_errors=True)
        return
    fs, path = filesystem(loc)
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a new file, a rename) survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
