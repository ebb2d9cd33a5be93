"""The olrec command, run in-process on small real files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from olrec.cli import main

ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"


def _csv(path: Path, n: int = 3000, bad: int = 5) -> None:
    rng = np.random.default_rng(0)
    lines = ["uid,item_id,ts,clicked,device,tags,price"]
    for i in range(n):
        u, it = rng.integers(0, 50), rng.integers(0, 40)
        y = int(rng.random() < (0.2 + 0.6 * (u % 2)))
        lines.append(f"u{u},{it},{1_700_000_000 + i},{y},{rng.choice(['ios', 'web'])},"
                     f"{rng.choice(['a', 'a|b', 'c'])},{rng.random() * 10:.2f}")
    for i in range(bad):  # label 2, missing user, NaN ts, ...
        lines.insert(10 + i * 7, ["u1,1,1700000000,2,ios,a,1", ",1,1700000000,1,ios,a,1",
                                  "u1,1,nan,1,ios,a,1", "u1,1,1700000000,yes,ios,a,1", "u1,,1700000000,1,web,a,1"][i % 5])
    path.write_text("\n".join(lines) + "\n")


def test_learn_generic_csv_writes_report_and_dead_letters(tmp_path: Path, capsys) -> None:
    src = tmp_path / "events.csv"
    _csv(src)
    out = tmp_path / "rep"
    code = main(["learn", "--events", str(src), "--format", "generic", "--columns", "uid=user_id", "clicked=label",
                 "--report-dir", str(out), "--batch-size", "256", "--quiet"])
    assert code == 0
    rep = json.loads((out / "events.json").read_text())
    assert rep["events"] == 3000 and rep["dead_lettered"] == 5
    assert 0.6 < rep["auc"] <= 1.0  # users are either clickers or not: learnable
    assert rep["auc_online_after_split"] is not None and rep["windows"]
    assert (out / "events.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    dead = [json.loads(line) for line in (out / "dead-letter.jsonl").read_text().splitlines()]
    assert len(dead) == 5 and all(d["reason"] for d in dead)
    assert "events/s" in capsys.readouterr().out


@pytest.mark.parametrize("sub, options", [
    ("learn", ["--events", "--format", "--columns", "--config", "--report-dir", "--batch-size", "--max-events",
               "--quiet"]),
    ("demo", ["--data", "--rate", "--max-events", "--duration", "--request-rate", "--feedback", "--malformed",
              "--workers", "--shards", "--replicas", "--scorer", "--port", "--run-dir", "--report", "--linger",
              "--quiet"]),
    ("train", ["--config", "--data", "--format", "--run-dir", "--workers", "--shards", "--max-events", "--continuous"]),
])
def test_help_lists_every_option(sub: str, options: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main([sub, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert all(o in text for o in options)


def test_bad_config_exits_2_naming_the_key(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learner:\n  bach_size: 3\n")
    assert main(["learn", "--config", str(cfg), "--format", "synthetic", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("olrec: error:") and "learner.bach_size" in err and "Traceback" not in err


def test_train_config_errors_exit_2_naming_the_key(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  workers: 0\n  shard: 2\n")
    assert main(["train", "--config", str(cfg), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "train.workers" in err and "train.shard" in err and "Traceback" not in err


def test_train_with_an_empty_log_and_no_data_exits_2(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("OLREC_DATA", raising=False)
    assert main(["train", "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "is empty and no data was given: pass --data" in err and str(tmp_path / "run" / "log") in err


def test_demo_with_missing_data_exits_2_naming_the_path(capsys) -> None:
    assert main(["demo", "--data", "/nonexistent/ml-100k", "--quiet"]) == 2
    assert "/nonexistent/ml-100k" in capsys.readouterr().err


def test_rerun_rewrites_dead_letters_with_row_numbers(tmp_path: Path) -> None:
    src = tmp_path / "e.csv"
    src.write_text("user_id,item_id,ts,label\n" + "".join(f"{i % 3},{i % 5},{i},{i % 2}\n" for i in range(40))
                   + "1,2,99,7\n")
    args = ["learn", "--events", str(src), "--format", "generic", "--report-dir", str(tmp_path / "r"), "--quiet"]
    assert main(args) == 0 and main(args) == 0
    dead = [json.loads(line) for line in (tmp_path / "r" / "dead-letter.jsonl").read_text().splitlines()]
    assert dead == [{"user_id": "1", "item_id": "2", "ts": "99", "label": "7",
                     "reason": "label is not 0 or 1", "row": 40}]
    assert json.loads((tmp_path / "r" / "e.json").read_text())["dead_lettered"] == 1


@pytest.mark.parametrize("name, text, expect", [
    ("e.txt", "a,b\n1,2\n", "unknown file type"),
    ("e.csv", "user_id,item_id,ts,label\n1,2,3,1\n1,2\n", "CSV parse error"),
    ("e.csv", "uid,item,ts,label\n1,2,3,1\n", "missing column(s)"),  # forgot --columns: every row rejected
])
def test_unreadable_or_empty_events_exit_2_with_one_line(tmp_path: Path, capsys, name: str, text: str,
                                                          expect: str) -> None:
    (tmp_path / name).write_text(text)
    code = main(["learn", "--events", str(tmp_path / name), "--format", "generic",
                 "--report-dir", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("olrec: error:") and expect in err
    assert str(tmp_path / name) in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.skipif(not ML100K.is_dir(), reason="MovieLens-100K not beside the repo")
def test_learn_on_movielens(tmp_path: Path) -> None:
    assert main(["learn", "--events", str(ML100K), "--format", "ml100k", "--max-events", "20000",
                 "--report-dir", str(tmp_path), "--quiet"]) == 0
    rep = json.loads((tmp_path / "ml100k.json").read_text())
    assert rep["events"] == 20000 and rep["auc"] > 0.7
    assert rep["auc_online_after_split"] > rep["auc_frozen_after_split"]


def test_demo_refuses_a_uri_run_dir_naming_it(capsys) -> None:
    assert main(["demo", "--run-dir", "s3://key:secret@bucket/run"]) == 2
    err = capsys.readouterr().err
    assert "s3://***@bucket/run" in err and "this machine" in err and "secret" not in err and "Traceback" not in err


def test_a_uri_run_dir_in_a_config_stays_a_uri(tmp_path: Path) -> None:
    from olrec.config import load_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  run_dir: s3://bucket/run?endpoint_override=localhost:9000\n")
    assert load_config(cfg).run_dir == "s3://bucket/run?endpoint_override=localhost:9000"
    assert load_config(None, {"train": {"run_dir": "runs/x"}}).run_dir == Path("runs/x")
