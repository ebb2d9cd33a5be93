"""Event validation: casting to the core types, reasons that name the field, order kept."""

from __future__ import annotations

import math
from datetime import datetime, timezone

import pyarrow as pa
import pytest

from olrec.schema import CORE_FIELDS, validate


def table(n: int = 3, **overrides) -> pa.Table:
    cols = {"user_id": list(range(n)), "item_id": [10 + i for i in range(n)],
            "ts": [1e9 + i for i in range(n)], "label": [i % 2 for i in range(n)]}
    cols.update(overrides)
    return pa.table({k: v if isinstance(v, (pa.Array, pa.ChunkedArray)) else pa.array(v) for k, v in cols.items()})


def test_good_rows_get_the_core_types_then_optional_then_context_columns() -> None:
    t = table(2, city=["Oslo", "Lima"], genres=["Action|Comedy", "Drama"],
              weight=[1, 2], event_id=["7", "8"], price=pa.array([1.5, 2.5], pa.float32()))
    split = validate(t)
    assert split.n_bad == 0
    assert [(f.name, f.type) for f in split.good.schema][:4] == [(f.name, f.type) for f in CORE_FIELDS]
    assert split.good.column_names == ["user_id", "item_id", "ts", "label", "event_id", "weight",
                                       "city", "genres", "price"]
    assert split.good.schema.field("event_id").type == pa.int64()
    assert split.good.schema.field("weight").type == pa.float32()
    assert split.good.schema.field("price").type == pa.float32()  # context columns unchanged
    assert split.good["genres"].to_pylist() == ["Action|Comedy", "Drama"]
    assert split.good["event_id"].to_pylist() == [7, 8]


def test_string_ids_cast_digits_to_ints_and_hash_the_rest_stably() -> None:
    split = validate(table(4, user_id=["42", "alice", "bob", "alice"], item_id=["-3", "7", "x", "7"]))
    assert split.n_bad == 0
    users = split.good["user_id"].to_pylist()
    assert users[0] == 42
    assert users[1] == users[3] != users[2]  # same string, same id; different strings differ
    assert users[1] < 0 and users[2] < 0  # hashed strings live in the negative range
    assert validate(table(1, user_id=["alice"])).good["user_id"].to_pylist() == [users[1]]
    assert split.good["item_id"].to_pylist()[:2] == [-3, 7]


def test_float_ids_must_be_integral() -> None:
    split = validate(table(3, user_id=[1.0, 2.5, 3.0], item_id=[4.0, 5.0, math.inf]))
    assert split.good["user_id"].to_pylist() == [1]
    assert split.good.schema.field("user_id").type == pa.int64()
    assert split.bad["reason"].to_pylist() == ["user_id is missing or not an integer/string id",
                                               "item_id is missing or not an integer/string id"]
    assert split.bad["user_id"].to_pylist() == ["2.5", "3.0"]


def test_bool_and_float_labels_become_int8_and_others_are_rejected() -> None:
    split = validate(table(3, label=[True, False, True]))
    assert split.good["label"].to_pylist() == [1, 0, 1]
    assert split.good.schema.field("label").type == pa.int8()
    split = validate(table(4, label=[1.0, 0.0, 0.5, None]))
    assert split.good["label"].to_pylist() == [1, 0]
    assert split.bad["reason"].to_pylist() == ["label is not 0 or 1"] * 2
    # A text column (one bad cell makes a whole CSV column text) is parsed cell by cell.
    split = validate(table(3, label=["1", "0", "yes"]))
    assert split.good["label"].to_pylist() == [1, 0]
    assert split.bad["reason"].to_pylist() == ["label is not 0 or 1"]
    split = validate(table(1, label=pa.array([[1]])))
    assert split.bad["reason"].to_pylist() == ["label has type list<item: int64>, expected 0/1"]


def test_timestamp_ts_becomes_unix_seconds() -> None:
    when = datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    split = validate(table(2, ts=pa.array([when, None], pa.timestamp("ms", tz="UTC"))))
    assert split.good["ts"].to_pylist() == [when.timestamp()]
    assert split.bad["reason"].to_pylist() == ["ts is missing"]


@pytest.mark.parametrize(("field", "values", "reason_has"), [
    ("user_id", [1, None, 3], "user_id"),
    ("item_id", ["1", "", "3"], "item_id"),
    ("ts", [1.0, math.nan, 3.0], "ts is missing, NaN"),
    ("ts", [1.0, -math.inf, 3.0], "infinite"),
    ("label", [0, 2, 1], "label is not 0 or 1"),
    ("weight", [1.0, -1.0, 0.5], "weight"),
    ("event_id", [1, 2.5, 3], "event_id"),
])
def test_reason_names_the_bad_field_and_the_good_rows_keep_their_order(field, values, reason_has) -> None:
    t = table(3, **{field: values}).append_column("row", pa.array(["a", "b", "c"]))
    split = validate(t)
    assert split.good["row"].to_pylist() == ["a", "c"]
    assert split.bad["row"].to_pylist() == ["b"]
    (reason,) = split.bad["reason"].to_pylist()
    assert reason_has in reason and reason.startswith(field)


def test_first_failing_check_wins_and_bad_rows_are_strings() -> None:
    split = validate(table(3, user_id=[None, 1, 2], label=[5, 1, 9], ts=[1.0, 2.0, 3.5]))
    assert split.good["user_id"].to_pylist() == [1]
    assert [r.split()[0] for r in split.bad["reason"].to_pylist()] == ["user_id", "label"]
    assert split.bad.schema.field("ts").type == pa.string()
    assert split.bad["ts"].to_pylist() == ["1.0", "3.5"]
    assert split.bad["user_id"].to_pylist() == [None, "2"]


def test_missing_required_column_rejects_every_row_naming_it() -> None:
    split = validate(table(2).drop_columns(["label"]))
    assert split.good.num_rows == 0
    assert split.bad["reason"].to_pylist() == ["missing column(s) ['label']"] * 2


def test_unsupported_context_column_type_is_named() -> None:
    split = validate(table(2, tags=pa.array([["a"], ["b"]])))
    assert split.good.num_rows == 0
    assert all("'tags'" in r for r in split.bad["reason"].to_pylist())


def test_empty_table_validates_to_empty() -> None:
    split = validate(table(0))
    assert split.good.num_rows == 0 and split.n_bad == 0
    assert split.good.schema.field("user_id").type == pa.int64()


# Odd inputs: validate() rejects (or hashes) the row and never raises.


@pytest.mark.parametrize("bad_id", ["--5", "²", "99999999999999999999"])
def test_odd_string_ids_reject_or_hash_instead_of_raising(bad_id: str) -> None:
    split = validate(table(2, user_id=["1", bad_id]))
    assert split.good["user_id"].to_pylist()[0] == 1 and split.good.num_rows + split.n_bad == 2


def test_uint64_id_beyond_int64_is_rejected_not_raised() -> None:
    split = validate(table(2, user_id=pa.array([1, 2**64 - 1], pa.uint64())))
    assert split.good["user_id"].to_pylist() == [1] and split.n_bad == 1


def test_list_typed_id_column_is_rejected_not_raised() -> None:
    split = validate(table(1, user_id=pa.array([[1]])))
    assert split.n_bad == 1


def test_non_numeric_weight_is_rejected_not_raised() -> None:
    split = validate(table(2, weight=["1.0", "heavy"]))
    assert split.n_bad >= 1


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")
def test_float_id_beyond_int64_is_rejected() -> None:
    split = validate(table(2, user_id=[1.0, 1e19]))
    assert split.good["user_id"].to_pylist() == [1] and split.n_bad == 1
