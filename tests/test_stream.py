"""The log as a long-lived Ray Data dataset: bounded and continuous reads,
splitting across consumers, start resolved at execution, bad arguments."""

from __future__ import annotations

import math
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from olrec.log import OFFSET, EventLog
from olrec.stream import GUIDED_MIN_ROWS, GUIDED_PARTS, LogDataConfig, LogDatasource, iter_events, log_dataset, unpack


def events(lo: int, hi: int) -> pa.Table:
    """Good events with event_id lo..hi-1 (appended from an empty log, event_id == offset)."""
    ids = list(range(lo, hi))
    return pa.table({
        "user_id": pa.array([i % 7 for i in ids], pa.int64()),
        "item_id": pa.array([100 + i for i in ids], pa.int64()),
        "ts": pa.array([1e9 + i for i in ids], pa.float64()),
        "label": pa.array([i % 2 for i in ids], pa.int64()),
        "event_id": pa.array(ids, pa.int64()),
    })


def write_log(path: Path, sizes: Iterable[int]) -> EventLog:
    """A log at ``path`` with one segment per size; the writer stays open for more appends."""
    log = EventLog(path).open_writer()
    for n in sizes:
        log.append(events(log.end_offset, log.end_offset + n))
    return log


def offsets(tables: Iterable[pa.Table]) -> list[int]:
    return [o for t in tables for o in t[OFFSET].to_pylist()]


def wait_for(cond: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


class Consumer:
    """Drains ``iter_events(source)`` on a thread, so a test can append while it reads."""

    def __init__(self, source) -> None:
        self.tables: list[pa.Table] = []
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, args=(source,), daemon=True)
        self._thread.start()

    def _run(self, source) -> None:
        try:
            for t in iter_events(source):
                with self._lock:
                    self.tables.append(t)
        except BaseException as e:
            self.error = e

    def offsets(self) -> list[int]:
        with self._lock:
            return offsets(self.tables)

    def join(self, timeout: float = 15.0) -> list[int]:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the stream did not end within {timeout}s"
        if self.error is not None:
            raise self.error
        return self.offsets()


# -- without a cluster: the read task in-process, arguments ---------------------


def read_in_process(source: LogDatasource) -> list[pa.Table]:
    """What the one read task yields, unpacked chunk by chunk (no Ray needed)."""
    (task,) = source.get_read_tasks(1)
    return [unpack(chunk) for chunk in task()]


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 9), min_size=1, max_size=6), block_rows=st.integers(1, 8), data=st.data())
def test_read_task_yields_start_to_end_in_chunks_of_block_rows(sizes: list[int], block_rows: int, data) -> None:
    total = sum(sizes)
    start = data.draw(st.integers(0, total), label="start")
    end = data.draw(st.integers(start, total), label="end")
    with tempfile.TemporaryDirectory() as d:
        write_log(Path(d), sizes).close()
        chunks = read_in_process(LogDatasource(d, start, end, block_rows=block_rows))
    assert offsets(chunks) == list(range(start, end))
    # Chunks span segments: all full but the last.
    n = end - start
    assert [c.num_rows for c in chunks] == [block_rows] * (n // block_rows) + ([n % block_rows] if n % block_rows else [])
    for c in chunks:
        assert c["item_id"].to_pylist() == [100 + o for o in c[OFFSET].to_pylist()]


def test_a_bounded_reads_chunks_shrink_toward_its_end_and_a_following_reads_do_not(tmp_path: Path) -> None:
    """Guided self-scheduling: 2 workers taking whole blocks in turn get about
    half the events each, where blocks of 32,768 would give them 65,536 and 34,464."""
    write_log(tmp_path, [25_000] * 4).close()
    bounded = [c.num_rows for c in read_in_process(LogDatasource(tmp_path, 0, 100_000, block_rows=32_768))]
    assert sum(bounded) == 100_000
    assert bounded == sorted(bounded, reverse=True)  # non-increasing
    assert bounded[0] == 100_000 // GUIDED_PARTS and min(bounded[:-1]) == GUIDED_MIN_ROWS
    halves = [sum(bounded[0::2]), sum(bounded[1::2])]
    assert max(halves) - min(halves) <= bounded[0]
    # With more than GUIDED_PARTS x block_rows to go, chunks are block_rows.
    assert [c.num_rows for c in read_in_process(LogDatasource(tmp_path, 0, 100_000, block_rows=4000))][:3] == [4000] * 3
    # Following the log (no end): a backlog in chunks of block_rows.
    src = LogDatasource(tmp_path, 0, None, block_rows=32_768, stop_file=tmp_path / "stop", poll_interval=0.01)
    task = src.get_read_tasks(1)[0]
    first = [unpack(c).num_rows for _, c in zip(range(3), task())]
    assert first == [32_768, 32_768, 32_768]


def test_columns_selects_offset_plus_those_columns(tmp_path: Path) -> None:
    write_log(tmp_path, [4, 3]).close()
    (chunk,) = read_in_process(LogDatasource(tmp_path, 1, 6, columns=["item_id"]))
    assert chunk.column_names == [OFFSET, "item_id"]
    assert chunk.to_pydict() == {OFFSET: [1, 2, 3, 4, 5], "item_id": [101, 102, 103, 104, 105]}


def test_a_stop_file_ends_a_bounded_read_that_waits_for_the_log(tmp_path: Path) -> None:
    write_log(tmp_path / "log", [5]).close()
    stop = tmp_path / "stop"
    (task,) = LogDatasource(tmp_path / "log", 0, 100, poll_interval=0.01, stop_file=stop).get_read_tasks(1)
    got: list[pa.Table] = []
    reader = threading.Thread(target=lambda: got.extend(unpack(c) for c in task()), daemon=True)
    reader.start()
    wait_for(lambda: offsets(got) == list(range(5)), what="the 5 events in the log")
    assert reader.is_alive()  # waiting for offsets 5..99
    stop.touch()
    reader.join(10)
    assert not reader.is_alive()
    assert offsets(got) == list(range(5))


def test_unpack_rejects_a_table_that_is_not_packed() -> None:
    with pytest.raises(ValueError, match="column 'offset' has type int64, not a packed list column"):
        unpack(pa.table({OFFSET: [1, 2]}))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"start": 5, "end": 3}, "start=5 is after end=3"),
    ({"start": -1}, "start must be >= 0, got -1"),
    ({"start": "0"}, "start must be an integer log offset, got '0'"),
    ({"end": -2, "start": 0}, "end must be >= 0, got -2"),
    ({"poll_interval": 0}, "poll_interval must be a positive number of seconds, got 0"),
    ({"poll_interval": -0.5}, "poll_interval must be a positive number of seconds, got -0.5"),
    ({"poll_interval": math.nan}, "poll_interval must be a positive number of seconds, got nan"),
    ({"poll_interval": math.inf}, "poll_interval must be a positive number of seconds, got inf"),
    ({"block_rows": 0}, "block_rows must be an integer >= 1, got 0"),
    ({"block_rows": 2.5}, "block_rows must be an integer >= 1, got 2.5"),
    ({"columns": "item_id"}, "columns must be a sequence of column names, got 'item_id'"),
    ({"num_cpus": -1}, "num_cpus must be a number >= 0, got -1"),
])
def test_bad_arguments_are_refused_by_name_and_value(tmp_path: Path, kwargs: dict, message: str) -> None:
    EventLog(tmp_path)
    with pytest.raises(ValueError, match=f"^{_re(message)}$"):
        log_dataset(str(tmp_path), **kwargs)


def test_a_missing_log_or_a_leftover_stop_file_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=f"log_path {_re(repr(str(missing)))} is not an existing event log"):
        log_dataset(missing)
    assert not missing.exists()  # building a dataset never creates a log
    EventLog(tmp_path / "log")
    (tmp_path / "stop").touch()
    with pytest.raises(ValueError, match="stop_file .* already exists"):
        log_dataset(tmp_path / "log", stop_file=tmp_path / "stop")


def _re(s: str) -> str:
    import re
    return re.escape(s)


# -- on the shared Ray cluster --------------------------------------------------


def test_bounded_dataset_delivers_each_offset_once_in_order_and_waits_for_end(ray_cluster, tmp_path: Path) -> None:
    from ray.data import DataContext

    log = write_log(tmp_path, [3, 5, 1])  # offsets 0..8
    try:
        before = DataContext.get_current().target_max_block_size
        ds = log_dataset(str(tmp_path), start=2, end=14, block_rows=4, poll_interval=0.02)
        assert ds.context.target_max_block_size == 1
        assert DataContext.get_current().target_max_block_size == before  # nothing global changed
        consumer = Consumer(ds)
        # The log's first 9 events arrive while the stream still waits for 9..13.
        wait_for(lambda: consumer.offsets() == list(range(2, 9)), what="offsets 2..8")
        log.append(events(9, 20))  # past end: the stream stops at 14
        got = consumer.join()
    finally:
        log.close()
    assert got == list(range(2, 14))
    assert [t.num_rows for t in consumer.tables] == [4, 3, 4, 1]  # chunks of at most block_rows


@pytest.mark.parametrize("how", ["streaming_split", "LogDataConfig"])
def test_two_way_split_gives_disjoint_shards_covering_the_range(ray_cluster, tmp_path: Path, how: str) -> None:
    write_log(tmp_path, [6, 10, 7, 9]).close()
    ds = log_dataset(str(tmp_path), start=3, end=29, block_rows=2)  # 13 chunks: an equal split would drop one
    if how == "streaming_split":
        shards = ds.streaming_split(2)
    else:  # what Ray Train's get_dataset_shard hands each of 2 workers
        per_worker = LogDataConfig().configure({"train": ds}, world_size=2, worker_handles=None, worker_node_ids=None)
        shards = [w["train"] for w in per_worker]
    consumers = [Consumer(s) for s in shards]  # streaming_split needs every shard consumed at once
    a, b = (c.join() for c in consumers)
    assert a and b
    assert not set(a) & set(b)
    assert sorted(a + b) == list(range(3, 29))


def test_continuous_dataset_picks_up_new_events_and_ends_at_the_stop_file(ray_cluster, tmp_path: Path) -> None:
    log = write_log(tmp_path / "log", [3])
    stop = tmp_path / "stop"
    consumer = None
    try:
        consumer = Consumer(log_dataset(str(tmp_path / "log"), stop_file=str(stop), poll_interval=0.02))
        wait_for(lambda: consumer.offsets() == [0, 1, 2], what="the first 3 events")
        log.append(events(3, 4))  # a single new event reaches the consumer on its own
        wait_for(lambda: consumer.offsets() == [0, 1, 2, 3], what="the 1 appended event")
        log.append(events(4, 9))
        wait_for(lambda: consumer.offsets() == list(range(9)), what="5 more appended events")
    finally:
        stop.touch()
        log.close()
        got = consumer.join() if consumer else []
    assert got == list(range(9))


def test_a_callable_start_is_read_each_time_the_dataset_executes(ray_cluster, tmp_path: Path) -> None:
    write_log(tmp_path / "log", [4, 6]).close()
    watermark = tmp_path / "watermark"

    def resume_at() -> int:  # what a trainer passes: the latest checkpoint's watermark
        return int(watermark.read_text())

    # Built before the file exists: the callable is not run when the dataset is built.
    ds = log_dataset(str(tmp_path / "log"), start=resume_at, end=10)
    watermark.write_text("2")
    assert offsets(iter_events(ds)) == list(range(2, 10))
    watermark.write_text("7")  # a "restart": the same dataset executes again
    assert offsets(iter_events(ds)) == list(range(7, 10))
    watermark.write_text("12")
    with pytest.raises(ValueError, match="start=12 is after end=10"):
        list(iter_events(ds))
