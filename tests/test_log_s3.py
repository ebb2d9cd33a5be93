"""The event log under an S3 prefix, against a real S3 server (moto's, on loopback).

What differs from a directory (tests/test_log.py has the log's contract): no
rename, so a segment is one object that appears whole; dead letters are an
object per append; the single writer holds a lease object.
"""

from __future__ import annotations

import threading

import pyarrow as pa
import pytest

import olrec.log as log_mod
from olrec.log import EventLog, LogLockedError, is_uri, log_exists, mask_uri, segment_name
from test_log import events


def test_a_uri_is_told_from_a_path() -> None:
    assert is_uri("s3://bucket/log") and is_uri("s3:/bucket/log") and is_uri("gs://b/x")
    assert not is_uri("/tmp/log") and not is_uri("runs/log") and not is_uri("C_drive/log")


def test_credentials_are_masked_in_every_form() -> None:
    for uri in ("s3://AKIA:se/cret@bucket/log?region=x", "s3:/AKIA:secret@bucket/log", "gs://tok@b/x"):
        masked = mask_uri(f"cannot open '{uri}': no")
        assert "AKIA" not in masked and "cret" not in masked and "tok" not in masked and "***@" in masked, masked
    assert mask_uri("s3://bucket/log") == "s3://bucket/log"
    with pytest.raises(ValueError) as err:
        EventLog("s3://AKIA:se/cret@bucket/log")  # pyarrow's own message quotes the URI
    assert "se/cret" not in str(err.value) and "AKIA" not in str(err.value)


def test_a_file_uri_is_a_local_directory(tmp_path) -> None:
    """file:// gets the directory's rename, fsync and flock, not the object-store path."""
    with EventLog(f"file://{tmp_path}/log") as log:
        log.append(events(0, 2))
        assert (tmp_path / "log" / "writer.lock").exists()
    assert log_exists(tmp_path / "log") and not log_exists(tmp_path / "nothing")


def test_append_and_read_back_in_offset_order(s3_uri) -> None:
    uri = s3_uri("append")
    with EventLog(uri) as log:
        assert log.append(events(0, 3)).end == 3
        assert log.append(events(100, 105)).end == 8
    reader = EventLog(uri, create=False)
    assert [s.name for s in reader.segments()] == [segment_name(0, 3), segment_name(3, 8)]
    assert reader.end_offset == 8
    got = pa.concat_tables(reader.read())
    assert got["offset"].to_pylist() == list(range(8))
    assert got["event_id"].to_pylist() == [0, 1, 2, 100, 101, 102, 103, 104]
    assert pa.concat_tables(reader.read(2, 5, columns=["item_id"])).column_names == ["offset", "item_id"]


def test_a_missing_log_is_named_without_its_credentials(s3_uri) -> None:
    uri = s3_uri("never-written")
    with pytest.raises(FileNotFoundError, match="never-written") as err:
        EventLog(uri, create=False)
    assert "testing:testing" in uri and "testing:testing" not in str(err.value) and "s3://***@" in str(err.value)
    assert "testing:testing" not in repr(EventLog(s3_uri("written")))


def test_bad_rows_become_dead_letter_objects_and_are_counted(s3_uri) -> None:
    uri = s3_uri("dead")
    bad = events(0, 4).set_column(3, "label", pa.array([1, 7, 0, 9], pa.int8()))  # labels must be 0 or 1
    with EventLog(uri) as log:
        r = log.append(bad)
        assert (r.n_good, r.n_bad) == (2, 2)
        log.append(events(0, 1))
        assert log.dead_lettered == 2
    reader = EventLog(uri)
    assert reader.dead_lettered == 2 and reader.end_offset == 3
    letters = reader.dead_letters()
    assert [d["row"]["label"] for d in letters] == ["7", "9"] and all("label" in d["reason"] for d in letters)


def test_one_writer_holds_the_lease(s3_uri) -> None:
    uri = s3_uri("lease")
    first = EventLog(uri).open_writer()
    with pytest.raises(LogLockedError, match="already has a writer"):
        EventLog(uri).open_writer()
    first.append(events(0, 2))
    first.close()  # gives the lease back: the next writer needs no wait
    with EventLog(uri) as second:
        assert second.append(events(0, 2)).start == 2


def test_a_lapsed_lease_passes_on_and_the_old_writer_stops(s3_uri, monkeypatch) -> None:
    """A writer that stopped renewing (a crash, a pause) loses the log after the
    lease's time; if it comes back, it refuses to write rather than reuse offsets."""
    uri = s3_uri("lapse")
    old = EventLog(uri).open_writer()
    old.append(events(0, 2))
    monkeypatch.setattr(log_mod, "LEASE_TTL_S", 0.0)  # every lease has lapsed
    new = EventLog(uri).open_writer()
    assert new.append(events(0, 3)).start == 2
    monkeypatch.setattr(log_mod, "LEASE_TTL_S", 30.0)  # and the new one's holds
    bad = events(0, 2).set_column(3, "label", pa.array([5, 5], pa.int8()))
    with pytest.raises(LogLockedError, match="lost writer.lease"):  # not a dead letter either
        old.append(bad)
    assert not old.is_writer
    with pytest.raises(LogLockedError, match="already has a writer"):
        old.append(events(0, 1))
    reader = EventLog(uri)
    assert reader.end_offset == 5 and reader.dead_lettered == 0  # nothing of the old writer's
    new.close()


def test_an_error_while_encoding_publishes_nothing(s3_uri, monkeypatch) -> None:
    """Closing a store's output stream publishes what it holds: a segment is encoded in memory
    first, so an encoder that fails halfway leaves no object, and the offsets are not used up."""
    uri = s3_uri("encode")
    log = EventLog(uri).open_writer()
    real = log_mod.pq.write_table

    def half_then_fail(table, sink, **kw):
        sink.write(b"PAR1 half a segment")
        raise OSError("encoder failed")

    monkeypatch.setattr(log_mod.pq, "write_table", half_then_fail)
    with pytest.raises(OSError, match="encoder failed"):
        log.append(events(0, 3))
    monkeypatch.setattr(log_mod.pq, "write_table", real)
    assert EventLog(uri).segments() == []
    assert log.append(events(0, 2)).start == 0
    assert pa.concat_tables(EventLog(uri).read())["offset"].to_pylist() == [0, 1]
    log.close()


def test_a_follower_sees_new_segments(s3_uri) -> None:
    uri = s3_uri("follow")
    writer = EventLog(uri).open_writer()
    writer.append(events(0, 2))
    stop = threading.Event()
    seen: list[int] = []

    def follow() -> None:
        for t in EventLog(uri).follow(0, poll_interval=0.05, stop=stop, idle_timeout=10):
            seen.extend(t["offset"].to_pylist())
            if len(seen) >= 5:
                stop.set()

    th = threading.Thread(target=follow)
    th.start()
    writer.append(events(0, 3))
    th.join(20)
    assert seen == [0, 1, 2, 3, 4]
    writer.close()


def test_ray_data_streams_an_s3_log(s3_uri, ray_cluster) -> None:
    """The training stream's read task (another process) follows the log from its URI."""
    from olrec.stream import iter_events, log_dataset

    uri = s3_uri("stream")
    with EventLog(uri) as log:
        for i in range(4):
            log.append(events(10 * i, 10 * i + 5))
    got = pa.concat_tables(list(iter_events(log_dataset(uri, 0, 20, poll_interval=0.05, block_rows=8))))
    assert got["offset"].to_pylist() == list(range(20))
