"""Event sources: MovieLens-100K, generic files, and a synthetic stream.

Every source yields pyarrow tables in the event schema (see :mod:`olrec.schema`),
in stream order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

GENRES_FILE = "u.genre"


def read_ml100k(path: str | Path) -> pa.Table:
    """MovieLens-100K as events, ordered by timestamp (ties keep file order).

    label = rating >= 4. Context: user age bucket, gender, occupation, zip
    prefix; item genres (``|``-separated) and release year. ``event_id`` is the
    row's position in ``u.data``.
    """
    root = Path(path)
    for name in ("u.data", "u.user", "u.item", GENRES_FILE):
        if not (root / name).is_file():
            raise FileNotFoundError(f"MovieLens-100K file {root / name} not found; pass the ml-100k directory")
    data = np.loadtxt(root / "u.data", dtype=np.int64)
    users, items, ratings, ts = data.T
    order = np.argsort(ts, kind="stable")

    u_age, u_gender, u_occ, u_zip = {}, {}, {}, {}
    for line in (root / "u.user").read_text(encoding="latin-1").splitlines():
        uid, age, gender, occ, zipc = line.split("|")
        age = int(age)
        bucket = "<18" if age < 18 else "18-24" if age < 25 else "25-34" if age < 35 else \
            "35-44" if age < 45 else "45-49" if age < 50 else "50-55" if age < 56 else "56+"
        u_age[int(uid)], u_gender[int(uid)], u_occ[int(uid)], u_zip[int(uid)] = bucket, gender, occ, zipc[:2]

    genre_names = [ln.split("|")[0] for ln in (root / GENRES_FILE).read_text(encoding="latin-1").splitlines() if ln]
    i_genres, i_year = {}, {}
    for line in (root / "u.item").read_text(encoding="latin-1").splitlines():
        parts = line.split("|")
        flags = parts[5:5 + len(genre_names)]
        i_genres[int(parts[0])] = "|".join(g for g, f in zip(genre_names, flags) if f == "1") or "unknown"
        date = parts[2]
        i_year[int(parts[0])] = float(date[-4:]) if len(date) >= 4 and date[-4:].isdigit() else np.nan

    u, i = users[order], items[order]
    return pa.table({
        "user_id": pa.array(u, pa.int64()),
        "item_id": pa.array(i, pa.int64()),
        "ts": pa.array(ts[order].astype(np.float64)),
        "label": pa.array((ratings[order] >= 4).astype(np.int8)),
        "event_id": pa.array(order.astype(np.int64)),
        "age": pa.array([u_age[x] for x in u.tolist()]),
        "gender": pa.array([u_gender[x] for x in u.tolist()]),
        "occupation": pa.array([u_occ[x] for x in u.tolist()]),
        "zip": pa.array([u_zip[x] for x in u.tolist()]),
        "genres": pa.array([i_genres[x] for x in i.tolist()]),
        "year": pa.array([i_year[x] for x in i.tolist()], pa.float64()),
    })


def read_files(path: str | Path, columns: Mapping[str, str] | None = None) -> pa.Table:
    """Read a CSV, Parquet or JSONL file, or a directory of them, as raw events.

    ``columns`` renames source columns to schema names, e.g.
    ``{"uid": "user_id", "clicked": "label"}``. The result is not validated:
    pass it through :func:`olrec.schema.validate` (the event log does).
    """
    p = Path(path)
    files = sorted(f for f in p.iterdir() if f.is_file() and _kind(f)) if p.is_dir() else [p]
    if not files:
        raise FileNotFoundError(f"no .csv, .parquet or .jsonl files in {p}")
    tables = []
    for f in files:
        kind = _kind(f)
        if kind == "csv":
            t = pacsv.read_csv(f)
        elif kind == "parquet":
            t = pq.read_table(f)
        elif kind == "jsonl":
            t = pajson.read_json(f)
        else:
            raise ValueError(f"{f}: unknown file type; use .csv, .parquet or .jsonl")
        if columns:
            unknown = [c for c in columns if c not in t.column_names]
            if unknown:
                raise ValueError(f"{f}: column mapping names column(s) {unknown} not in the file (has {t.column_names})")
            t = t.rename_columns([columns.get(c, c) for c in t.column_names])
        tables.append(t)
    return pa.concat_tables(tables, promote_options="permissive")


def _kind(f: Path) -> str | None:
    s = f.name.lower()
    if s.endswith((".csv", ".csv.gz")):
        return "csv"
    if s.endswith((".parquet", ".pq")):
        return "parquet"
    if s.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    return None


@dataclass(frozen=True)
class SyntheticConfig:
    """A deterministic stream with Zipf popularity, new items and drifting tastes."""

    n_users: int = 10_000
    n_items: int = 5_000
    n_events: int = 100_000
    dim: int = 8
    zipf_a: float = 1.1
    new_item_fraction: float = 0.5  # share of the catalog that appears over time
    drift: float = 0.2  # share of a quarter turn each user's taste rotates over the stream
    base_logit: float = -1.0
    seed: int = 0
    chunk: int = 10_000

    def __post_init__(self) -> None:
        for name in ("n_users", "n_items", "n_events", "dim", "chunk"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SyntheticConfig.{name} must be positive, got {getattr(self, name)}")
        if max(self.n_users, self.n_items) > 10_000_000:
            raise ValueError("SyntheticConfig supports up to 10 million users and items")
        if not 0 <= self.new_item_fraction < 1:
            raise ValueError(f"SyntheticConfig.new_item_fraction must be in [0, 1), got {self.new_item_fraction}")


def synthetic_stream(cfg: SyntheticConfig) -> Iterator[pa.Table]:
    """Yield chunks of events; each carries ``p_true``, its true click probability.

    Users and items have latent vectors; p = sigmoid(base + 2 u.v + bias_u + bias_i).
    Item ``i`` is available once ``i < n_old + n_new * progress`` (new items
    appear over time); popularity among available items and activity among
    users are Zipf. Drift: each user's taste turns from its start vector
    towards a second one of its own, by ``drift`` of a quarter turn over the
    stream. Vectors are derived from the id by seed, so memory is per chunk,
    not per id.
    """
    rng = np.random.default_rng(cfg.seed)
    n_old = max(1, int(cfg.n_items * (1 - cfg.new_item_fraction)))
    scale = 1.0 / np.sqrt(cfg.dim)
    emitted = 0
    while emitted < cfg.n_events:
        n = min(cfg.chunk, cfg.n_events - emitted)
        progress = (emitted + n) / cfg.n_events
        avail = n_old + int((cfg.n_items - n_old) * progress)
        users = _zipf_index(rng, cfg.n_users, cfg.zipf_a, n)
        # New items get a popularity boost so they are actually seen.
        items = _zipf_index(rng, avail, cfg.zipf_a, n)
        fresh = rng.random(n) < 0.3 * (avail > n_old)
        items = np.where(fresh, avail - 1 - _zipf_index(rng, max(1, avail - n_old), cfg.zipf_a, n) % max(1, avail - n_old), items)
        # Event-level progress, so taste turns smoothly inside a chunk too.
        t = (emitted + np.arange(n)) / cfg.n_events
        angle = (cfg.drift * np.pi / 2 * t)[:, None]
        uv = (np.cos(angle) * _id_vectors(users, cfg.seed, cfg.dim)
              + np.sin(angle) * _id_vectors(users, cfg.seed + 7, cfg.dim)) * scale
        iv = _id_vectors(items, cfg.seed + 1, cfg.dim) * scale
        ub = _id_vectors(users, cfg.seed + 2, 1)[:, 0] * 0.5
        ib = _id_vectors(items, cfg.seed + 3, 1)[:, 0] * 0.8
        logit = cfg.base_logit + 2.0 * (uv * iv).sum(1) + ub + ib
        p = 1.0 / (1.0 + np.exp(-logit))
        label = (rng.random(n) < p).astype(np.int8)
        ids = np.arange(emitted, emitted + n, dtype=np.int64)
        yield pa.table({
            "user_id": pa.array(users.astype(np.int64)),
            "item_id": pa.array(items.astype(np.int64)),
            "ts": pa.array(1.7e9 + ids.astype(np.float64)),
            "label": pa.array(label),
            "event_id": pa.array(ids),
            "p_true": pa.array(p),
        })
        emitted += n


def read_synthetic(cfg: SyntheticConfig) -> pa.Table:
    return pa.concat_tables(list(synthetic_stream(cfg)))


def _zipf_index(rng: np.random.Generator, n: int, a: float, size: int) -> np.ndarray:
    """Indices in [0, n) with P(k) proportional to (k+1)^-a, by inverse CDF on a continuous approximation."""
    u = rng.random(size)
    if abs(a - 1.0) < 1e-9:
        k = np.exp(u * np.log(n + 1)) - 1
    else:
        top = (n + 1) ** (1 - a)
        k = (1 + u * (top - 1)) ** (1 / (1 - a)) - 1
    return np.minimum(k.astype(np.int64), n - 1)


def _id_vectors(ids: np.ndarray, seed: int, dim: int) -> np.ndarray:
    """Deterministic standard-normal-ish vectors per id without storing a table (splitmix64 + Box-Muller)."""
    x = ids.astype(np.uint64)[:, None] * np.uint64(dim) + np.arange(dim, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        x = x + np.uint64((seed * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
        u1 = _splitmix(x)
        u2 = _splitmix(x ^ np.uint64(0xDEADBEEFCAFEBABE))
    f1 = (u1 >> np.uint64(11)).astype(np.float64) / float(1 << 53) + 1e-12
    f2 = (u2 >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return np.sqrt(-2 * np.log(f1)) * np.cos(2 * np.pi * f2)


def _splitmix(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))
