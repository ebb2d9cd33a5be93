"""Event sources: MovieLens-100K, CSV/Parquet/JSONL files, the synthetic stream."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from olrec.sources import SyntheticConfig, read_files, read_ml100k, read_synthetic, synthetic_stream

ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"
needs_ml100k = pytest.mark.skipif(not (ML100K / "u.data").is_file(), reason=f"MovieLens-100K not at {ML100K}")


# -- MovieLens-100K ------------------------------------------------------------


@pytest.fixture(scope="module")
def ml() -> pa.Table:
    return read_ml100k(ML100K)


@pytest.fixture(scope="module")
def udata() -> np.ndarray:
    return np.loadtxt(ML100K / "u.data", dtype=np.int64)


@needs_ml100k
def test_ml100k_rows_and_order(ml, udata):
    assert ml.num_rows == 100_000 == len(udata)
    ts = ml["ts"].to_numpy()
    eid = ml["event_id"].to_numpy()
    assert (np.diff(ts) >= 0).all()
    # ties keep file order: event_id increases within equal ts
    same = np.diff(ts) == 0
    assert same.any()  # the data really has ties, so this checks something
    assert (np.diff(eid)[same] > 0).all()
    # event_id is the row's position in u.data: a permutation of 0..n-1
    np.testing.assert_array_equal(np.sort(eid), np.arange(100_000))


@needs_ml100k
def test_ml100k_rows_match_u_data(ml, udata):
    eid = ml["event_id"].to_numpy()
    users, items, ratings, ts = udata[eid].T
    np.testing.assert_array_equal(ml["user_id"].to_numpy(), users)
    np.testing.assert_array_equal(ml["item_id"].to_numpy(), items)
    np.testing.assert_array_equal(ml["ts"].to_numpy(), ts.astype(np.float64))
    assert ml.schema.field("label").type == pa.int8()
    np.testing.assert_array_equal(ml["label"].to_numpy(), (ratings >= 4).astype(np.int8))
    assert 0.5 < ml["label"].to_numpy().mean() < 0.6  # 55% of MovieLens ratings are 4 or 5


@needs_ml100k
def test_ml100k_context_columns(ml):
    for col in ("age", "gender", "occupation", "zip", "genres", "year"):
        assert col in ml.column_names
    for col in ("age", "gender", "occupation", "zip", "genres"):
        assert ml[col].null_count == 0
        assert pa.types.is_string(ml.schema.field(col).type)
    assert ml.schema.field("year").type == pa.float64()
    assert set(ml["gender"].to_pylist()) == {"M", "F"}
    assert set(ml["age"].to_pylist()) <= {"<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"}
    assert {len(z) for z in set(ml["zip"].to_pylist())} == {2}

    # genres: '|'-joined names of the flags set in u.item
    genre_names = [ln.split("|")[0] for ln in (ML100K / "u.genre").read_text("latin-1").splitlines() if ln]
    expected = {}
    for line in (ML100K / "u.item").read_text("latin-1").splitlines():
        parts = line.split("|")
        flags = parts[5:]
        expected[int(parts[0])] = [g for g, f in zip(genre_names, flags) if f == "1"]
    got = dict(zip(ml["item_id"].to_pylist(), ml["genres"].to_pylist()))
    for item, genres in got.items():
        assert genres.split("|") == (expected[item] or ["unknown"])
    assert any("|" in g for g in got.values())
    # Toy Story (1995): Animation|Children's|Comedy
    assert got[1] == "Animation|Children's|Comedy"
    years = dict(zip(ml["item_id"].to_pylist(), ml["year"].to_pylist()))
    assert years[1] == 1995.0

    # user 1 in u.user: "1|24|M|technician|85711"
    row = ml.filter(pc.equal(ml["user_id"], 1)).slice(0, 1).to_pylist()[0]
    assert (row["age"], row["gender"], row["occupation"], row["zip"]) == ("18-24", "M", "technician", "85")


def test_ml100k_wrong_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="u.data"):
        read_ml100k(tmp_path / "nowhere")
    (tmp_path / "u.data").write_text("1\t1\t5\t100\n")
    with pytest.raises(FileNotFoundError, match="u.user"):
        read_ml100k(tmp_path)


# -- files --------------------------------------------------------------------

ROWS = [
    {"uid": 1, "iid": 10, "when": 100.0, "clicked": 1, "genre": "a|b"},
    {"uid": 2, "iid": 11, "when": 101.0, "clicked": 0, "genre": "c"},
    {"uid": 3, "iid": 12, "when": 102.0, "clicked": 1, "genre": "a"},
]
MAPPING = {"uid": "user_id", "iid": "item_id", "when": "ts", "clicked": "label"}


def _write(path: Path, rows: list[dict]) -> Path:
    t = pa.Table.from_pylist(rows)
    if path.suffix == ".csv":
        pacsv.write_csv(t, path)
    elif path.suffix == ".parquet":
        pq.write_table(t, path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_read_files_each_format(tmp_path, suffix):
    f = _write(tmp_path / f"events{suffix}", ROWS)
    t = read_files(f)
    assert t.num_rows == 3
    assert t["uid"].to_pylist() == [1, 2, 3]
    assert t["genre"].to_pylist() == ["a|b", "c", "a"]
    m = read_files(f, MAPPING)
    assert set(m.column_names) == {"user_id", "item_id", "ts", "label", "genre"}
    assert m["user_id"].to_pylist() == [1, 2, 3]
    assert m["ts"].to_pylist() == [100.0, 101.0, 102.0]
    assert m["label"].to_pylist() == [1, 0, 1]


def test_read_files_directory_of_mixed_formats(tmp_path):
    _write(tmp_path / "a.csv", ROWS[:1])
    _write(tmp_path / "b.parquet", ROWS[1:2])
    _write(tmp_path / "c.jsonl", ROWS[2:])
    (tmp_path / "notes.txt").write_text("ignored")
    t = read_files(tmp_path, MAPPING)
    assert t.num_rows == 3
    assert t["user_id"].to_pylist() == [1, 2, 3]  # files in name order
    assert t["item_id"].to_pylist() == [10, 11, 12]
    assert t["genre"].to_pylist() == ["a|b", "c", "a"]


def test_read_files_unknown_mapped_column_is_named(tmp_path):
    f = _write(tmp_path / "e.csv", ROWS)
    with pytest.raises(ValueError, match="user_ident") as e:
        read_files(f, {"user_ident": "user_id", "iid": "item_id"})
    assert "iid" not in str(e.value).split("not in the file")[0]  # only the missing one is named as missing


def test_read_files_empty_directory_and_unknown_type(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_files(tmp_path)
    bad = tmp_path / "events.txt"
    bad.write_text("x")
    with pytest.raises(ValueError, match="events.txt"):
        read_files(bad)


# -- synthetic stream -----------------------------------------------------------

SMALL = dict(n_users=500, n_items=1_000, n_events=20_000, chunk=2_500, dim=4)


def test_synthetic_deterministic_by_seed():
    a = read_synthetic(SyntheticConfig(**SMALL, seed=3))
    b = read_synthetic(SyntheticConfig(**SMALL, seed=3))
    c = read_synthetic(SyntheticConfig(**SMALL, seed=4))
    assert a.equals(b)
    assert not a["item_id"].equals(c["item_id"])
    assert not a["p_true"].equals(c["p_true"])


def test_synthetic_sizes_and_ranges():
    cfg = SyntheticConfig(**{**SMALL, "n_events": 21_000})
    chunks = list(synthetic_stream(cfg))
    assert [c.num_rows for c in chunks] == [2_500] * 8 + [1_000]
    t = pa.concat_tables(chunks)
    assert set(t.column_names) >= {"user_id", "item_id", "ts", "label", "event_id", "p_true"}
    u, i = t["user_id"].to_numpy(), t["item_id"].to_numpy()
    assert u.min() >= 0 and u.max() < cfg.n_users
    assert i.min() >= 0 and i.max() < cfg.n_items
    np.testing.assert_array_equal(t["event_id"].to_numpy(), np.arange(21_000))
    assert (np.diff(t["ts"].to_numpy()) > 0).all()
    assert set(np.unique(t["label"].to_numpy()).tolist()) == {0, 1}
    # Zipf popularity: the most popular item is far above the average
    counts = np.bincount(i, minlength=cfg.n_items)
    assert counts.max() > 10 * counts[counts > 0].mean()


def test_synthetic_new_items_appear_over_time():
    cfg = SyntheticConfig(**SMALL, new_item_fraction=0.5)
    chunks = list(synthetic_stream(cfg))
    first, last = chunks[0]["item_id"].to_numpy(), chunks[-1]["item_id"].to_numpy()
    assert last.max() > first.max()
    n_old = int(cfg.n_items * 0.5)
    # at most the first chunk's share of the new items is available at the start
    assert first.max() < n_old + (cfg.n_items - n_old) * cfg.chunk / cfg.n_events
    assert last.max() >= cfg.n_items - 50
    # items never seen in the first chunk show up later
    assert len(np.setdiff1d(last, first)) > 50


def test_synthetic_p_true_and_label_rate():
    t = read_synthetic(SyntheticConfig(**SMALL, seed=1))
    p = t["p_true"].to_numpy()
    y = t["label"].to_numpy()
    assert ((p > 0) & (p < 1)).all()
    assert p.std() > 0.05  # p varies by user and item
    sd = np.sqrt((p * (1 - p)).sum()) / len(p)
    assert abs(y.mean() - p.mean()) < 5 * sd
    # labels follow p: events with high p_true are positive more often
    hi, lo = p > np.quantile(p, 0.8), p < np.quantile(p, 0.2)
    assert y[hi].mean() > y[lo].mean() + 0.2


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(n_users=0), "n_users"),
        (dict(n_items=-5), "n_items"),
        (dict(n_events=0), "n_events"),
        (dict(dim=0), "dim"),
        (dict(chunk=0), "chunk"),
        (dict(new_item_fraction=1.0), "new_item_fraction"),
        (dict(new_item_fraction=-0.1), "new_item_fraction"),
        (dict(n_items=20_000_000), "million"),
    ],
)
def test_synthetic_config_rejects_bad_values(kw, field):
    with pytest.raises(ValueError, match=field):
        SyntheticConfig(**kw)
