"""The event log as one long-lived Ray Data dataset, for Ray Train workers.

Ray Data has no unbounded source of its own, so :class:`LogDatasource` is one
read task that follows the log (:mod:`olrec.log`) from ``start``: bounded to
``[start, end)``, or until a stop file appears. Three things about Ray Data
2.60 shape this module (paths under ``ray/data/``):

* **Rows are chunks.** The read operator re-shapes what a read task yields
  by bytes alone (``_internal/output_buffer.py``, ``has_next`` and ``next``):
  it holds output until more than ``DataContext.target_max_block_size`` bytes
  are buffered, and cuts anything of 1.5x that size or more into pieces of
  about that size. Buffering by bytes means a few new events sit unseen in a
  quiet stream (at the default 128 MiB nothing arrives), and a limit small
  enough to pass one event cuts every block into one-row pieces (measured:
  ~170 events/s through ``streaming_split``). So each yielded block is a
  *packed* one-row table, one list column per log column, and the dataset runs
  with a 1-byte limit: every chunk leaves the read task at once and whole.
  Consumers call :func:`iter_events` (or :func:`unpack` on each batch) to get
  flat tables of events, each with the log's ``offset`` column.
* **Consumers must not prefetch.** ``iter_batches(prefetch_batches=p)`` holds
  each block back until ``p`` more have arrived
  (``_internal/block_batching/iter_batches.py``, ``prefetch_batches_locally``);
  in a quiet stream that is forever. :func:`iter_events` uses 0.
* **Ray Train splits with** ``equal=True`` (``ray/train/_internal/data_config.py``),
  which holds a chunk back until the other workers got as many rows, and drops
  the remainder when the stream ends (``output_splitter.py``,
  ``all_inputs_done``): events lost below the watermark. Pass
  :class:`LogDataConfig` as the trainer's ``dataset_config``.

Offsets are not contiguous per worker (``streaming_split`` hands out chunks
dynamically): checkpoint the watermark, not per-worker positions.
"""

from __future__ import annotations

import math
import numbers
import os
import time
from functools import partial
from typing import Any, Callable, Iterable, Iterator, Sequence

import pyarrow as pa
import ray.data
import ray.train
from ray.data.block import BlockMetadata
from ray.data.datasource import ReadTask

from .log import EventLog, log_exists
from . import storage
from .storage import mask_uri

# Every non-empty chunk exceeds one byte, so the read operator passes each one
# on as soon as it is yielded; a chunk is one packed row, so it is never cut.
_FLUSH_EVERY_CHUNK = 1


class LogDatasource(ray.data.Datasource):
    """Follows an event log from ``start``; each row of the dataset is one chunk
    of at most ``block_rows`` consecutive events (see :func:`unpack`).

    ``end`` given: exactly the offsets ``[start, end)``, waiting for the log to
    reach ``end``. ``end=None``: follows new events until ``stop_file`` exists.
    In both modes an existing ``stop_file`` (checked every poll and between
    chunks) ends the stream after the chunks already yielded; what follows is
    left for the next run, which resumes from its watermark.

    ``start`` may be a callable returning the offset: it runs inside the read
    task each time the dataset executes, so a trainer that passes "the
    latest checkpoint's watermark" resumes from it when Ray Train restarts the
    worker group and the dataset runs again. It must be picklable.

    The log (a directory, or a URI such as ``s3://``: see :mod:`olrec.log`)
    and ``stop_file`` must be reachable by the same name from the node that
    runs the read task.
    """

    def __init__(self, log_path: str | os.PathLike[str], start: int | Callable[[], int] = 0,
                 end: int | None = None, *, poll_interval: float = 0.2, stop_file: str | os.PathLike[str] | None = None,
                 block_rows: int = 1024, columns: Sequence[str] | None = None) -> None:
        super().__init__()
        if not log_exists(log_path):
            raise ValueError(f"log_path {mask_uri(str(log_path))!r} is not an existing event log")
        if end is not None:
            end = _offset("end", end)
        if not callable(start):
            _check_start(start, end)
        if (isinstance(poll_interval, bool) or not isinstance(poll_interval, numbers.Real)
                or not math.isfinite(poll_interval) or poll_interval <= 0):
            raise ValueError(f"poll_interval must be a positive number of seconds, got {poll_interval!r}")
        if isinstance(block_rows, bool) or not isinstance(block_rows, numbers.Integral) or block_rows < 1:
            raise ValueError(f"block_rows must be an integer >= 1, got {block_rows!r}")
        if stop_file is not None and storage.exists(stop_file):
            # The stream would end before its first event: almost surely a stop
            # file left over from an earlier run.
            raise ValueError(f"stop_file {storage.where(stop_file)!r} already exists; remove it before starting the stream")
        if columns is not None:
            if isinstance(columns, (str, bytes)) or not all(isinstance(c, str) for c in columns):
                raise ValueError(f"columns must be a sequence of column names, got {columns!r}")
            columns = tuple(columns)
        self._args = (str(log_path), start, end, float(poll_interval),
                      None if stop_file is None else str(stop_file), int(block_rows), columns)

    def estimate_inmemory_data_size(self) -> int | None:
        # Unknown in continuous mode; and in bounded mode an estimate would
        # only make Ray plan extra splits from it (there is nothing to split).
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        # Ray calls this when the dataset is built and again at every
        # execution; nothing here reads the log or resolves ``start``.
        metadata = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
        return [ReadTask(partial(_read_chunks, *self._args), metadata, per_task_row_limit=per_task_row_limit)]


def log_dataset(log_path: str | os.PathLike[str], start: int | Callable[[], int] = 0, end: int | None = None, *,
                poll_interval: float = 0.2, stop_file: str | os.PathLike[str] | None = None, block_rows: int = 1024,
                columns: Sequence[str] | None = None, num_cpus: float = 0) -> ray.data.Dataset:
    """The log as a dataset of packed chunks; see :class:`LogDatasource` for the
    arguments and :func:`iter_events` for reading it.

    The 1-byte ``target_max_block_size`` goes on this dataset's own
    ``DataContext`` (a copy taken when it is built, carried with it to
    ``streaming_split``'s coordinator and to Ray Train), never the global one.
    Operators appended to this dataset inherit it: transform events after
    :func:`unpack`, not with ``map_batches`` here.

    ``num_cpus`` is what the read task holds for the life of the stream. It
    mostly sleeps between polls, and a task asking for a CPU never starts
    where Train workers hold them all (2 cores, 2 workers), hence 0.
    """
    if isinstance(num_cpus, bool) or not isinstance(num_cpus, numbers.Real) or not num_cpus >= 0:
        raise ValueError(f"num_cpus must be a number >= 0, got {num_cpus!r}")
    source = LogDatasource(log_path, start, end, poll_interval=poll_interval, stop_file=stop_file,
                           block_rows=block_rows, columns=columns)
    # One read task: without override_num_blocks Ray asks for ~200 blocks and
    # splits each output block to get them (set_read_parallelism.py).
    ds = ray.data.read_datasource(source, override_num_blocks=1, num_cpus=num_cpus)
    ds.context.target_max_block_size = _FLUSH_EVERY_CHUNK
    return ds


def unpack(batch: pa.Table) -> pa.Table:
    """The events of a batch of packed chunks, as one flat table in chunk order."""
    arrays, fields = [], []
    for field, column in zip(batch.schema, batch.columns):
        if not pa.types.is_list(field.type):
            raise ValueError(f"column {field.name!r} has type {field.type}, not a packed list column: "
                             "unpack takes batches of a log_dataset")
        arrays.append(pa.chunked_array([chunk.flatten() for chunk in column.chunks], type=field.type.value_type))
        fields.append(field.type.value_field.with_name(field.name))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=batch.schema.metadata))


def iter_events(source: ray.data.Dataset | ray.data.DataIterator, prefetch: int = 0) -> Iterator[pa.Table]:
    """Flat tables of events from a log dataset or a shard of it (what
    ``ray.train.get_dataset_shard`` returns), each chunk as soon as it arrives.

    ``prefetch`` chunks are fetched ahead: faster through a log that is
    already written, but each chunk waits for ``prefetch`` more, so a
    stream that follows new events must use 0."""
    for batch in source.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=prefetch):
        table = unpack(batch)
        if table.num_rows:  # Ray may emit an empty block when a read yields nothing
            yield table


class LogDataConfig(ray.train.DataConfig):
    """Ray Train's ``DataConfig`` for log datasets: splits with ``equal=False``
    and no locality hints, so no chunk waits for another and none is dropped.

    Each worker gets whichever chunks it pulls first; together the workers get
    every chunk exactly once.
    """

    def configure(self, datasets: dict[str, ray.data.Dataset], world_size: int, worker_handles: Any,
                  worker_node_ids: Any, **kwargs: Any) -> list[dict[str, ray.data.DataIterator]]:
        output: list[dict[str, ray.data.DataIterator]] = [{} for _ in range(world_size)]
        to_split = set(datasets) if self._datasets_to_split == "all" else set(self._datasets_to_split)
        for name, ds in datasets.items():
            ds = ds.copy(ds)
            if ds.name is None:
                ds.set_name(name)
            ds.context.execution_options = self._resolve_execution_options(name)
            if name in to_split:
                for i, split in enumerate(ds.streaming_split(world_size, equal=False)):
                    output[i][name] = split
            else:
                for i in range(world_size):
                    output[i][name] = ds.iterator()
        return output


# -- the read task -------------------------------------------------------------


def _read_chunks(log_path: str, start: int | Callable[[], int], end: int | None, poll_interval: float,
                 stop_file: str | None, block_rows: int, columns: Sequence[str] | None) -> Iterator[pa.Table]:
    """Runs in the read task: yields packed chunks until ``end`` or the stop file."""
    pos = _check_start(start() if callable(start) else start, end)
    log = EventLog(log_path, create=False)
    looked = -math.inf

    def stopped() -> bool:  # at most one look per poll: in an object store, a look is a request
        nonlocal looked
        if stop_file is None or time.monotonic() - looked < poll_interval:
            return False
        looked = time.monotonic()
        return storage.exists(stop_file)

    while end is None or pos < end:
        looked = -math.inf
        if stopped():
            return
        before = pos
        for chunk in _rechunk(log.read_available(pos, end, columns=columns), block_rows,
                              None if end is None else end - pos):
            yield _pack(chunk)
            pos += chunk.num_rows
            if stopped():
                return
        if pos == before:
            time.sleep(poll_interval)


#: A bounded read's chunks shrink toward its end (guided self-scheduling): each
#: is 1/GUIDED_PARTS of what remains, at least GUIDED_MIN_ROWS and at most
#: ``block_rows``. ``streaming_split`` hands whole blocks to whichever worker
#: asks, so big blocks at the end of a run would leave one worker learning alone.
GUIDED_PARTS = 8
GUIDED_MIN_ROWS = 4096


def _rechunk(tables: Iterable[pa.Table], rows: int, remaining: int | None = None) -> Iterator[pa.Table]:
    """Consecutive tables as chunks of ``rows`` rows (the last may be short);
    a chunk never mixes schemas (segments may carry different columns).
    ``remaining``: how many rows ``tables`` hold (a bounded read), for chunks
    that shrink toward the end (see :data:`GUIDED_PARTS`)."""
    parts: list[pa.Table] = []
    have = done = 0

    def target() -> int:
        if remaining is None:
            return rows
        return min(rows, max((remaining - done) // GUIDED_PARTS, GUIDED_MIN_ROWS))

    want = target()
    for table in tables:
        if parts and not table.schema.equals(parts[0].schema):
            yield pa.concat_tables(parts)
            parts, have, done = [], 0, done + have
            want = target()
        while table.num_rows:
            take = min(want - have, table.num_rows)
            parts.append(table.slice(0, take))
            have += take
            table = table.slice(take)
            if have == want:
                yield pa.concat_tables(parts)
                parts, have, done = [], 0, done + have
                want = target()
    if parts:
        yield pa.concat_tables(parts)


def _pack(table: pa.Table) -> pa.Table:
    """One row: each column becomes a one-element list column holding all of it."""
    offsets = pa.array([0, table.num_rows], pa.int32())
    fields = [pa.field(f.name, pa.list_(f)) for f in table.schema]
    arrays = [pa.ListArray.from_arrays(offsets, col.combine_chunks(), type=f.type)
              for f, col in zip(fields, table.columns)]
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=table.schema.metadata))


def _offset(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer log offset, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def _check_start(start: object, end: int | None) -> int:
    start = _offset("start", start)
    if end is not None and start > end:
        raise ValueError(f"start={start} is after end={end}")
    return start


__all__ = ["LogDataConfig", "LogDatasource", "iter_events", "log_dataset", "unpack"]
