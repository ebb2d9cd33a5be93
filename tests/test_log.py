"""The append-only event log: offsets, durability, dead letters, one writer, follow."""

from __future__ import annotations

import json
import math
import os
import select
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import olrec.log as log_mod
from olrec.log import DEAD_LETTER, AppendResult, EventLog, LogLockedError, segment_name

REPO = Path(__file__).resolve().parents[1]


def events(lo: int, hi: int, **context: list) -> pa.Table:
    """Good events with event_id lo..hi-1 (user/item/ts derived from the id)."""
    ids = list(range(lo, hi))
    cols = {
        "user_id": pa.array([i % 7 for i in ids], pa.int64()),
        "item_id": pa.array([100 + i for i in ids], pa.int64()),
        "ts": pa.array([1e9 + i for i in ids], pa.float64()),
        "label": pa.array([i % 2 for i in ids], pa.int64()),
        "event_id": pa.array(ids, pa.int64()),
    }
    cols.update({k: pa.array(v) for k, v in context.items()})
    return pa.table(cols)


def all_rows(log: EventLog, start: int = 0, end: int | None = None, **kw) -> pa.Table:
    tables = list(log.read(start, end, **kw))
    return pa.concat_tables(tables, promote_options="default") if tables else pa.table({})


def col(table: pa.Table, name: str) -> list:
    return table[name].to_pylist() if table.num_rows else []


def wait_for(cond, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def run_child(code: str, *args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def visible_files(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


# -- offsets and recovery ----------------------------------------------------


def test_offsets_are_contiguous_across_appends_and_recovered_on_reopen(tmp_path: Path) -> None:
    with EventLog(tmp_path) as log:
        results = [log.append(events(0, 3)), log.append(events(3, 3)), log.append(events(3, 8)),
                   log.append(events(8, 9))]
        assert results == [AppendResult(0, 3, 3, 0), AppendResult(3, 3, 0, 0),
                           AppendResult(3, 8, 5, 0), AppendResult(8, 9, 1, 0)]
        assert log.end_offset == 9
    # Names alone say the ranges; the empty append wrote nothing.
    assert [s.name for s in EventLog(tmp_path).segments()] == [
        segment_name(0, 3), segment_name(3, 8), segment_name(8, 9)]
    assert segment_name(0, 1000) == "seg-00000000000000000000-00000000000000001000.parquet"

    reopened = EventLog(tmp_path, create=False)
    assert reopened.end_offset == 9
    table = all_rows(reopened)
    assert table.schema.field("offset").type == pa.int64()
    assert col(table, "offset") == list(range(9))
    assert col(table, "event_id") == list(range(9))
    with reopened:
        assert reopened.append(events(9, 11)) == AppendResult(9, 11, 2, 0)
    assert EventLog(tmp_path).end_offset == 11


def test_missing_directory_without_create_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        EventLog(tmp_path / "nope", create=False)


def test_reader_end_offset_sees_another_writer(tmp_path: Path) -> None:
    reader = EventLog(tmp_path)
    with EventLog(tmp_path) as writer:
        writer.append(events(0, 4))
        assert reader.end_offset == 4
        writer.append(events(4, 6))
        assert reader.end_offset == 6
        assert col(all_rows(reader), "event_id") == list(range(6))


def test_resume_from_an_offset_yields_exactly_the_rest(tmp_path: Path) -> None:
    with EventLog(tmp_path) as log:
        for lo, hi in [(0, 4), (4, 5), (5, 12)]:
            log.append(events(lo, hi))
    for k in range(13):
        tail = all_rows(log, k)
        assert col(tail, "event_id") == list(range(k, 12)), k
        assert col(tail, "offset") == list(range(k, 12)), k
    assert col(all_rows(log, 2, 7), "event_id") == [2, 3, 4, 5, 6]
    assert list(log.read(5, 5)) == []


@pytest.mark.parametrize(("start", "end", "message"), [
    (7, None, "start offset 7 is beyond the log end 5"),
    (-1, None, "start offset -1 is negative"),
    (3, 2, "end offset 2 is before start offset 3"),
    (0, 6, "end offset 6 is beyond the log end 5"),
])
def test_read_rejects_bad_ranges_eagerly(tmp_path: Path, start: int, end: int | None, message: str) -> None:
    with EventLog(tmp_path) as log:
        log.append(events(0, 5))
    with pytest.raises(ValueError, match=message):
        log.read(start, end)  # raises on the call, not on first next()


def test_segments_keep_their_own_columns_and_columns_selects(tmp_path: Path) -> None:
    with EventLog(tmp_path) as log:
        log.append(events(0, 2, genres=["Action|Comedy", "Drama"]))
        log.append(events(2, 4, city=["Oslo", "Lima"]))
    first, second = list(log.read())
    assert "genres" in first.column_names and "city" not in first.column_names
    assert "city" in second.column_names and "genres" not in second.column_names
    assert first.column_names[0] == "offset"

    picked = list(log.read(1, columns=["event_id", "city"]))
    assert [t.column_names for t in picked] == [["offset", "event_id", "city"]] * 2
    assert [col(t, "city") for t in picked] == [[None], ["Oslo", "Lima"]]
    assert [col(t, "event_id") for t in picked] == [[1], [2, 3]]


def test_append_rejects_non_tables_and_a_reserved_offset_column(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    with pytest.raises(TypeError, match="RecordBatch"):
        log.append(events(0, 1).to_batches()[0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'offset' is reserved"):
        log.append(events(0, 1).append_column("offset", pa.array([5])))
    assert log.end_offset == 0


# -- atomicity ---------------------------------------------------------------


def test_failed_rename_leaves_no_segment_and_the_offsets_are_reused(tmp_path: Path, monkeypatch) -> None:
    log = EventLog(tmp_path)
    log.append(events(0, 2))

    def broken_replace(src, dst):
        raise OSError(f"disk went away renaming {src}")

    monkeypatch.setattr(log_mod.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk went away"):
        log.append(events(2, 5))
    monkeypatch.undo()

    assert not [n for n in visible_files(tmp_path) if n.startswith(".tmp")]
    reader = EventLog(tmp_path, create=False)
    assert reader.end_offset == 2 and log.end_offset == 2
    assert col(all_rows(reader), "event_id") == [0, 1]
    assert log.append(events(2, 5)) == AppendResult(2, 5, 3, 0)
    log.close()
    assert col(all_rows(reader), "offset") == list(range(5))


CHILD_BLOCKED_MID_WRITE = """
    import sys, threading
    import pyarrow as pa
    import olrec.log as L

    def partial_write(table, where, **kw):
        where.write(b"PAR1" + b"half a segment" * 100)  # a torn Parquet file
        where.flush()
        print("WRITING", flush=True)
        threading.Event().wait()  # block until SIGKILLed

    L.pq.write_table = partial_write
    log = L.EventLog(sys.argv[1])
    log.append(pa.table({"user_id": [1] * 4, "item_id": [2] * 4, "ts": [1.0] * 4, "label": [1] * 4,
                         "event_id": [900, 901, 902, 903]}))
    print("NOT REACHED", flush=True)
"""


def test_writer_killed_mid_write_leaves_no_visible_partial_segment(tmp_path: Path) -> None:
    with EventLog(tmp_path) as log:
        log.append(events(0, 3))
    child = run_child(CHILD_BLOCKED_MID_WRITE, str(tmp_path))
    try:
        ready, _, _ = select.select([child.stdout], [], [], 30)
        assert ready, "child never started writing"
        assert child.stdout.readline().strip() == "WRITING", child.stderr.read()
        temps = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
        assert len(temps) == 1 and temps[0].stat().st_size > 0  # partly written, not yet renamed
        reader = EventLog(tmp_path, create=False)
        assert reader.end_offset == 3
        assert col(all_rows(reader), "event_id") == [0, 1, 2]
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=10)
    assert child.returncode == -signal.SIGKILL

    # The dead writer's lock died with it; the next writer cleans up and reuses offsets 3.. .
    with EventLog(tmp_path) as log:
        assert log.append(events(3, 5)) == AppendResult(3, 5, 2, 0)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    table = all_rows(EventLog(tmp_path))
    assert col(table, "event_id") == [0, 1, 2, 3, 4]
    assert col(table, "offset") == [0, 1, 2, 3, 4]


# -- dead letters ------------------------------------------------------------


def test_bad_rows_are_dead_lettered_and_good_rows_around_them_kept(tmp_path: Path) -> None:
    mixed = pa.table({
        "user_id": pa.array([1, None, 3, 4, 5, 6], pa.int64()),
        "item_id": pa.array([10, 11, 12, 13, 14, 15], pa.int64()),
        "ts": pa.array([1.0, 2.0, 3.0, math.nan, 5.0, 6.0]),
        "label": pa.array([1, 0, 2, 1, 0, 1], pa.int64()),
        "event_id": pa.array([0, 1, 2, 3, 4, 5], pa.int64()),
    })
    string_label = events(10, 12).set_column(3, "label", pa.array(["yes", "no"]))
    wrong_type = events(20, 21).set_column(2, "ts", pa.array(["yesterday"]))
    with EventLog(tmp_path) as log:
        assert log.append(events(100, 102)) == AppendResult(0, 2, 2, 0)
        assert log.append(mixed) == AppendResult(2, 5, 3, 3)
        assert log.append(string_label) == AppendResult(5, 5, 0, 2)  # all bad: no segment
        assert log.append(wrong_type) == AppendResult(5, 5, 0, 1)
        assert log.append(events(102, 103)) == AppendResult(5, 6, 1, 0)
        assert log.dead_lettered == 6

    table = all_rows(EventLog(tmp_path))
    assert col(table, "event_id") == [100, 101, 0, 4, 5, 102]
    assert col(table, "offset") == list(range(6))
    assert len(EventLog(tmp_path).segments()) == 3

    records = [json.loads(line) for line in (tmp_path / DEAD_LETTER).read_text().splitlines()]
    assert [r["row"]["event_id"] for r in records] == ["1", "2", "3", "10", "11", "20"]
    reasons = [r["reason"] for r in records]
    assert "user_id" in reasons[0]
    assert "label" in reasons[1] and "label" in reasons[3]
    assert "ts" in reasons[2] and "NaN" in reasons[2]
    assert "ts" in reasons[5] and "not a number" in reasons[5]
    assert records[0]["row"]["user_id"] is None and records[1]["row"]["label"] == "2"
    assert records[5]["row"]["ts"] == "yesterday"
    assert all(isinstance(v, (str, type(None))) for r in records for v in r["row"].values())
    assert all(datetime.fromisoformat(r["time"]).tzinfo is not None for r in records)

    # The count survives reopening, for a reader and for the next writer.
    assert EventLog(tmp_path).dead_lettered == 6
    with EventLog(tmp_path) as log:
        log.append(mixed)
        assert log.dead_lettered == 9


def test_torn_dead_letter_line_is_cut_by_the_next_writer(tmp_path: Path) -> None:
    with EventLog(tmp_path) as log:
        log.append(events(0, 1).set_column(3, "label", pa.array([7])))
    with open(tmp_path / DEAD_LETTER, "a") as f:
        f.write('{"time": "2024-')  # a crash mid-line
    with EventLog(tmp_path) as log:
        assert log.dead_lettered == 1  # a reader counts complete lines only
        log.append(events(1, 2).set_column(3, "label", pa.array([7])))
        assert log.dead_lettered == 2
    lines = (tmp_path / DEAD_LETTER).read_text().splitlines()
    assert [json.loads(line)["row"]["event_id"] for line in lines] == ["0", "1"]


# -- one writer --------------------------------------------------------------


CHILD_APPEND = """
    import sys
    import pyarrow as pa
    from olrec.log import EventLog
    log = EventLog(sys.argv[1])
    for k in range(int(sys.argv[2])):
        lo = int(sys.argv[3]) + 4 * k
        ids = list(range(lo, lo + 4))
        log.append(pa.table({"user_id": ids, "item_id": ids, "ts": [1.0] * 4, "label": [0] * 4,
                             "event_id": ids}))
    print("END", log.end_offset, flush=True)
"""


def test_a_second_writer_process_is_refused_with_the_log_path(tmp_path: Path) -> None:
    log = EventLog(tmp_path).open_writer()
    log.append(events(0, 2))
    child = run_child(CHILD_APPEND, str(tmp_path), "1", "50")
    out, err = child.communicate(timeout=30)
    assert child.returncode != 0
    assert "LogLockedError" in err and str(tmp_path) in err and f"pid {os.getpid()}" in err
    assert log.end_offset == 2 and EventLog(tmp_path).end_offset == 2

    log.close()
    child = run_child(CHILD_APPEND, str(tmp_path), "1", "50")
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    assert out.split() == ["END", "6"]


def test_a_second_writer_instance_in_the_same_process_is_refused(tmp_path: Path) -> None:
    with EventLog(tmp_path) as first:
        first.append(events(0, 1))
        with pytest.raises(LogLockedError, match=f"event log {tmp_path} already has a writer"):
            EventLog(tmp_path).append(events(1, 2))
        EventLog(tmp_path).read(0)  # reading needs no lock
    with EventLog(tmp_path) as second:
        assert second.append(events(1, 2)).start == 1


def test_concurrent_producer_threads_get_disjoint_contiguous_offsets(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    results: list[AppendResult] = []
    barrier = threading.Barrier(4)

    def produce(t: int) -> None:
        barrier.wait()
        for k in range(10):
            lo = 1000 * t + 10 * k
            results.append(log.append(events(lo, lo + 1 + k % 3)))

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    log.close()
    total = sum(r.n_good for r in results)
    assert len(results) == 40 and total == log.end_offset
    spans = sorted((r.start, r.end) for r in results)
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    table = all_rows(EventLog(tmp_path))
    assert col(table, "offset") == list(range(total))
    # Each append's rows stay together and in order.
    by_start = {r.start: r for r in results}
    ids = col(table, "event_id")
    for r in by_start.values():
        chunk = ids[r.start:r.end]
        assert chunk == list(range(chunk[0], chunk[0] + r.n_good))


# -- follow ------------------------------------------------------------------


def test_follow_picks_up_new_segments_from_another_thread_and_stops(tmp_path: Path) -> None:
    writer = EventLog(tmp_path)
    writer.append(events(0, 3))
    stop = threading.Event()
    got: list[pa.Table] = []
    first = threading.Event()
    finished = threading.Event()

    def consume() -> None:
        for table in EventLog(tmp_path, create=False).follow(1, poll_interval=0.01, stop=stop):
            got.append(table)
            first.set()
        finished.set()

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    assert first.wait(10)
    writer.append(events(3, 5))
    writer.append(events(5, 5))
    writer.append(events(5, 9))
    wait_for(lambda: sum(t.num_rows for t in got) == 8, what="followed rows")
    assert not finished.is_set()  # still following: no idle timeout was given
    stop.set()
    consumer.join(10)
    assert finished.is_set()
    writer.close()
    followed = pa.concat_tables(got)
    assert col(followed, "offset") == list(range(1, 9))
    assert col(followed, "event_id") == list(range(1, 9))


def test_follow_picks_up_segments_written_by_another_process(tmp_path: Path) -> None:
    with EventLog(tmp_path) as log:
        log.append(events(0, 2))
    reader = EventLog(tmp_path, create=False)
    stream = reader.follow(0, poll_interval=0.01, idle_timeout=30)
    seen: list[int] = col(next(stream), "event_id")
    assert seen == [0, 1]
    child = run_child(CHILD_APPEND, str(tmp_path), "3", "2")
    for table in stream:
        seen += col(table, "event_id")
        if len(seen) >= 14:
            break
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    assert seen == list(range(14))


def test_follow_ends_after_idle_timeout(tmp_path: Path) -> None:
    with EventLog(tmp_path) as log:
        log.append(events(0, 2))
    t0 = time.monotonic()
    tables = list(log.follow(0, poll_interval=0.01, idle_timeout=0.1))
    elapsed = time.monotonic() - t0
    assert [col(t, "event_id") for t in tables] == [[0, 1]]
    assert 0.1 <= elapsed < 5
    with pytest.raises(ValueError, match="start offset 3 is beyond the log end 2"):
        next(log.follow(3, idle_timeout=0.1))


# -- property ----------------------------------------------------------------


GENRES = ["Action", "Comedy", "Drama", "Sci-Fi", "Film-Noir"]


@st.composite
def batches(draw) -> pa.Table:
    n = draw(st.integers(0, 6))

    def column(strategy):
        return draw(st.lists(strategy, min_size=n, max_size=n))

    return pa.table({
        "user_id": pa.array(column(st.integers(0, 2**62)), pa.int64()),
        "item_id": pa.array(column(st.integers(0, 10**6)), pa.int64()),
        "ts": pa.array(column(st.floats(0, 2e9)), pa.float64()),
        "label": pa.array(column(st.integers(0, 1)), pa.int8()),
        "price": pa.array(column(st.floats(allow_nan=False)), pa.float64()),
        "count": pa.array(column(st.integers(-2**63, 2**63 - 1)), pa.int64()),
        "city": pa.array(column(st.none() | st.text(max_size=8)), pa.string()),
        "genres": pa.array(column(st.lists(st.sampled_from(GENRES), min_size=1, max_size=3).map("|".join)),
                           pa.string()),
    })


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(appends=st.lists(batches(), max_size=5), data=st.data())
def test_read_from_any_offset_returns_exactly_the_tail(appends: list[pa.Table], data) -> None:
    with tempfile.TemporaryDirectory() as d, EventLog(d) as log:
        for batch in appends:
            log.append(batch)
        expected = pa.concat_tables(appends).to_pylist() if appends else []
        assert log.end_offset == len(expected) and log.dead_lettered == 0
        k = data.draw(st.integers(0, len(expected)), label="k")
        got = [row for table in EventLog(d).read(k) for row in table.to_pylist()]
        assert [row.pop("offset") for row in got] == list(range(k, len(expected)))
        assert got == expected[k:]


def test_read_available_reads_what_is_there_and_waits_without_error(tmp_path: Path) -> None:
    """What a follower polls with: the events the log holds now, clipped to ``end``; before
    the log reaches ``start``, nothing (the old read() would raise)."""
    log = EventLog(tmp_path)
    log.append(events(0, 5))
    assert list(log.read_available(5)) == [] and list(log.read_available(7, 9)) == []
    got = pa.concat_tables(log.read_available(2, 100, columns=["item_id"]))
    assert got["offset"].to_pylist() == [2, 3, 4] and got.column_names == ["offset", "item_id"]
    assert pa.concat_tables(log.read_available(1, 3))["offset"].to_pylist() == [1, 2]
