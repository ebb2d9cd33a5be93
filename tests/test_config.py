"""The validated edge: YAML configs become frozen dataclasses or fail naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from olrec.config import ConfigError, load_config
from olrec.features import ml100k_spec

REPO = Path(__file__).resolve().parents[1]


def test_defaults_for_ml100k_are_the_movielens_spec() -> None:
    cfg = load_config(None)
    assert cfg.data.format == "ml100k"
    assert cfg.features == ml100k_spec()


def test_the_example_job_config_loads() -> None:
    cfg = load_config(REPO / "cluster" / "jobs" / "ml100k.yaml")
    assert cfg.learner.batch_size == 2048 and cfg.learner.arch == "dcn"


@pytest.mark.parametrize("raw, where", [
    ({"lerner": {}}, "lerner"),
    ({"learner": {"bach_size": 3}}, "learner.bach_size"),
    ({"data": {"format": "csv"}}, "data.format"),
    ({"features": {"recency": [{"key": "user_id", "alpha": 0.1, "beta": 1}]}}, "features.recency"),
])
def test_unknown_keys_and_values_name_the_field(raw: dict, where: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(raw)
    assert where in str(e.value)


@pytest.mark.parametrize("raw, where, value", [
    ({"learner": {"batch_size": 0}}, "learner.batch_size", "0"),
    ({"learner": {"sparse_lr": -1.0}}, "learner.sparse_lr", "-1"),
    ({"learner": {"arch": "transformer"}}, "learner.arch", "transformer"),
    ({"features": {"counters": ["user_id", "item_id", "user_id*nope"]}}, "features", "nope"),
])
def test_bad_values_name_the_field_and_value(raw: dict, where: str, value: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(raw)
    assert where in str(e.value) and value in str(e.value)


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = load_config({"learner": {"batch_size": 256, "dim": 8}, "report": {"frozen_at": 0.3}})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    again = load_config(path)
    assert again.learner == cfg.learner and again.features == cfg.features and again.report == cfg.report


def test_bad_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("learner:\n  batch_size: [1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and "line" in str(e.value)
