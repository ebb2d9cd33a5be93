"""The event schema and its validation.

An event is one row: ``user_id``, ``item_id``, ``ts`` (unix seconds), ``label``
(0/1), optional ``event_id`` and ``weight``, and any further columns as context
features: strings are categorical, numbers numeric, and strings holding ``|``
are multi-valued categorical (``"Action|Comedy"``).

Ids may be integers or strings. Validation never raises on a bad row: it
splits a table into the good rows and the bad ones with a reason each, so a
caller can dead-letter the bad ones and keep every good one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

REQUIRED = ("user_id", "item_id", "ts", "label")
OPTIONAL = ("event_id", "weight")
RESERVED = REQUIRED + OPTIONAL

#: The fixed part of the schema; context columns follow these.
CORE_FIELDS = (
    pa.field("user_id", pa.int64(), nullable=False),
    pa.field("item_id", pa.int64(), nullable=False),
    pa.field("ts", pa.float64(), nullable=False),
    pa.field("label", pa.int8(), nullable=False),
)

MULTI_SEP = "|"
_INT_RE = re.compile(r"-?[0-9]+", re.ASCII)
_INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class Split:
    """Result of validating a table: the good rows and the rejected ones."""

    good: pa.Table
    bad: pa.Table  # the offending rows, as strings, plus a ``reason`` column

    @property
    def n_bad(self) -> int:
        return self.bad.num_rows


def _as_int64_ids(col: pa.ChunkedArray) -> tuple[pa.ChunkedArray, np.ndarray]:
    """Cast an id column to int64; return it and a mask of rows that failed."""
    n = len(col)
    if pa.types.is_integer(col.type):
        bad = pc.is_null(col)
        if col.type == pa.uint64():  # the only integer type that can exceed int64
            bad = pc.or_(bad, pc.fill_null(pc.greater(col, pa.scalar(_INT64_MAX, pa.uint64())), False))
        arr = pc.cast(col, pa.int64(), safe=False)  # out-of-range rows are flagged above
        return arr, np.asarray(bad.to_numpy(zero_copy_only=False), bool)
    if pa.types.is_floating(col.type):
        vals = col.to_numpy(zero_copy_only=False).astype(np.float64)
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(vals) | (np.floor(vals) != vals) | (np.abs(vals) >= 2.0**63)
        out = np.where(bad, 0, vals).astype(np.int64)
        return pa.chunked_array([out]), bad
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        # Strings that are not integers are mapped through a 64-bit hash; the
        # top bit marks them so they never meet an integer id.
        from .ids import hash_strings

        strs = col.to_numpy(zero_copy_only=False)
        bad = np.array([s is None or s == "" for s in strs], bool)
        out = np.zeros(n, np.int64)
        hashed = []
        for i in np.flatnonzero(~bad):
            s = strs[i]
            if _INT_RE.fullmatch(s):  # ASCII digits only: "²".isdigit() is True, int("²") fails
                v = int(s)
                if -_INT64_MAX - 1 <= v <= _INT64_MAX:
                    out[i] = v
                else:
                    bad[i] = True
            else:
                hashed.append(i)
        if hashed:
            out[hashed] = hash_strings(strs[hashed].astype(str))
        return pa.chunked_array([out]), bad
    # Unsupported type: every row is bad; return a castable placeholder.
    return pa.chunked_array([np.zeros(n, np.int64)]), np.ones(n, bool)


def validate(table: pa.Table) -> Split:
    """Split ``table`` into schema-conforming rows and rejected rows with reasons.

    Good rows come back with the core columns cast to :data:`CORE_FIELDS`
    types (ids int64, ts float64, label int8), then ``event_id`` / ``weight``
    when present, then context columns unchanged.
    """
    n = table.num_rows
    reasons = np.full(n, "", dtype=object)

    def flag(mask: np.ndarray, why: str) -> None:
        sel = mask & (reasons == "")
        reasons[sel] = why

    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        reasons[:] = f"missing column(s) {missing}"
        return Split(table.slice(0, 0), _bad_rows(table, reasons))

    cols: dict[str, pa.ChunkedArray] = {}
    for name in ("user_id", "item_id"):
        arr, bad = _as_int64_ids(table[name])
        flag(bad, f"{name} is missing or not an integer/string id")
        cols[name] = arr

    ts_col = table["ts"]
    if _numberlike(ts_col.type):
        ts = _numbers(ts_col)
        flag(~np.isfinite(ts), "ts is missing, NaN, infinite or not a number")
    elif pa.types.is_timestamp(ts_col.type):
        ts = pc.cast(ts_col, pa.timestamp("us")).cast(pa.int64()).to_numpy(zero_copy_only=False) / 1e6
        flag(pc.is_null(ts_col).to_numpy(zero_copy_only=False), "ts is missing")
    else:
        ts = np.zeros(n)
        flag(np.ones(n, bool), f"ts has type {ts_col.type}, expected a number of unix seconds")
    cols["ts"] = pa.chunked_array([np.nan_to_num(ts)])

    lab_col = table["label"]
    if _numberlike(lab_col.type) or pa.types.is_boolean(lab_col.type):
        lab = _numbers(lab_col)
        flag(~np.isin(lab, (0.0, 1.0)), "label is not 0 or 1")
    else:
        lab = np.zeros(n)
        flag(np.ones(n, bool), f"label has type {lab_col.type}, expected 0/1")
    cols["label"] = pa.chunked_array([np.where(np.isin(lab, (0.0, 1.0)), lab, 0).astype(np.int8)])

    if "weight" in table.column_names:
        w_col = table["weight"]
        if _numberlike(w_col.type) or pa.types.is_boolean(w_col.type):
            w = _numbers(w_col)
            flag(~np.isfinite(w) | (w < 0), "weight is missing, negative, NaN or infinite")
        else:
            w = np.zeros(n)
            flag(np.ones(n, bool), f"weight has type {w_col.type}, expected a number")
        cols["weight"] = pa.chunked_array([np.nan_to_num(w).astype(np.float32)])
    if "event_id" in table.column_names:
        cols["event_id"], bad = _as_int64_ids(table["event_id"])
        flag(bad, "event_id is not an integer/string id")

    for name in table.column_names:
        if name in RESERVED:
            continue
        col = table[name]
        if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)
                or pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
                or pa.types.is_boolean(col.type) or pa.types.is_null(col.type)):
            flag(np.ones(n, bool), f"context column {name!r} has type {col.type}; use a number or a string")
        cols[name] = col

    good_mask = reasons == ""
    order = [c for c in ("user_id", "item_id", "ts", "label", "event_id", "weight") if c in cols]
    order += [c for c in cols if c not in order]
    out = pa.table({c: cols[c] for c in order})
    out = out.cast(_normalized_schema(out.schema))
    return Split(out.filter(pa.array(good_mask)), _bad_rows(table, reasons, ~good_mask))


def _numberlike(t: pa.DataType) -> bool:
    """Numbers, or strings that may hold them (one bad cell makes a CSV column text)."""
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_string(t) or pa.types.is_large_string(t)


def _numbers(col: pa.ChunkedArray) -> np.ndarray:
    """float64 values; NaN where a cell is missing or (in a text column) not a number."""
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        import pandas as pd

        return pd.to_numeric(pd.Series(col.to_numpy(zero_copy_only=False)), errors="coerce").to_numpy(np.float64)
    return pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)


def _normalized_schema(schema: pa.Schema) -> pa.Schema:
    fields = []
    for f in schema:
        if f.name in ("user_id", "item_id", "event_id"):
            fields.append(pa.field(f.name, pa.int64()))
        elif f.name == "ts":
            fields.append(pa.field("ts", pa.float64()))
        elif f.name == "label":
            fields.append(pa.field("label", pa.int8()))
        elif f.name == "weight":
            fields.append(pa.field("weight", pa.float32()))
        elif pa.types.is_large_string(f.type):
            fields.append(pa.field(f.name, pa.string()))
        else:
            fields.append(f)
    return pa.schema(fields)


def _bad_rows(table: pa.Table, reasons: np.ndarray, mask: np.ndarray | None = None) -> pa.Table:
    """Rows selected by ``mask`` rendered as strings (they failed typing) plus a reason."""
    if mask is None:
        mask = np.ones(table.num_rows, bool)
    idx = np.flatnonzero(mask)
    rows = table.take(pa.array(idx, pa.int64()))  # only the bad rows go through Python objects
    cols = {}
    for name in rows.column_names:
        cols[name] = pa.array([None if v is None else str(v) for v in rows[name].to_pylist()], pa.string())
    cols["reason"] = pa.array([str(r) for r in reasons[idx]], pa.string())
    return pa.table(cols)


def context_columns(schema: pa.Schema) -> list[str]:
    return [n for n in schema.names if n not in RESERVED]
