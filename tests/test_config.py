"""The validated edge: YAML configs become frozen dataclasses or fail naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import dataclasses

import pyarrow as pa

from olrec.config import ConfigError, LearnerSchema, SyntheticSchema, TrainSchema, load_config
from olrec.features import FeatureSpec, ml100k_spec
from olrec.learner import LearnerConfig
from olrec.sources import SyntheticConfig
from olrec.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def test_defaults_for_ml100k_are_the_movielens_spec() -> None:
    cfg = load_config(None)
    assert cfg.data.format == "ml100k"
    assert cfg.features == ml100k_spec()


def test_the_example_job_config_loads() -> None:
    cfg = load_config(REPO / "cluster" / "jobs" / "ml100k.yaml")
    assert cfg.learner.batch_size == 4096 and cfg.learner.arch == "deepfm"


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


@pytest.mark.parametrize("raw, where", [
    ({"lerner": {}}, "lerner"),
    ({"data": {"paht": "x"}}, "data.paht"),
    ({"data": {"synthetic": {"n_user": 3}}}, "data.synthetic.n_user"),
    ({"features": {"numerics": ["year"]}}, "features.numerics"),
    ({"features": {"recency": [{"key": "user_id", "alpha": 0.1, "beta": 1}]}}, "features.recency[0].beta"),
    ({"learner": {"bach_size": 3}}, "learner.bach_size"),
    ({"report": {"windows": 5}}, "report.windows"),
])
def test_an_unknown_key_at_any_level_fails_naming_its_path(raw: dict, where: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(raw)
    assert str(e.value).startswith(f"{where}: unknown key")


def test_errors_are_plain_lines_one_per_problem() -> None:
    with pytest.raises(ConfigError) as e:
        load_config({"learner": {"batch_size": 0, "bach_size": 3}, "report": {"frozen_at": 1.5}})
    text = str(e.value)
    assert "learner.batch_size: must be >= 1, got 0" in text
    assert "learner.bach_size: unknown key (did you mean 'batch_size'?)" in text
    assert "report.frozen_at: must be < 1" in text and "1.5" in text
    assert len(e.value.errors) == 3 and "pydantic" not in text and "http" not in text


def test_dataclass_errors_surface_as_config_errors_naming_the_section() -> None:
    with pytest.raises(ConfigError, match=r"learner\.warmup_batch_size: .*got 128"):
        load_config({"learner": {"batch_size": 64, "warmup_batch_size": 128}})
    with pytest.raises(ConfigError, match=r"features\.categorical: must include 'item_id'"):
        load_config({"features": {"categorical": ["user_id"]}})
    with pytest.raises(ConfigError, match=r"features\.counters: must include 'user_id' and 'item_id'"):
        load_config({"data": {"format": "synthetic"}, "features": {"counters": ["user_id"], "recency": []}})


def test_an_unset_warmup_batch_follows_a_small_batch_size() -> None:
    assert load_config({"learner": {"batch_size": 16}}).learner.warmup_batch_size == 16


def test_the_schema_covers_every_dataclass_field_with_its_default() -> None:
    for schema, cls, extra in ((LearnerSchema, LearnerConfig, set()), (SyntheticSchema, SyntheticConfig, set()),
                               (TrainSchema, TrainConfig, {"run_dir"})):
        assert set(schema.model_fields) == {f.name for f in dataclasses.fields(cls)} | extra
    assert load_config(None).learner == LearnerConfig()
    assert load_config({"data": {"format": "synthetic"}}).data.synthetic == SyntheticConfig()


def test_generic_features_are_inferred_from_the_events_with_overrides_on_top() -> None:
    events = pa.table({"user_id": [1, 2], "item_id": [3, 4], "ts": [1.0, 2.0], "label": pa.array([0, 1], pa.int8()),
                       "device": ["ios", "web"], "tags": ["a|b", "c"], "price": [1.5, 2.0]})
    cfg = load_config({"data": {"format": "generic"}, "features": {"prior_strength": 2.0}})
    assert cfg.features is None
    spec = cfg.feature_spec(events)
    assert spec == FeatureSpec.infer(events.schema, events, prior_strength=2.0)
    assert spec.categorical == ("user_id", "item_id", "device") and spec.multi == ("tags",)
    assert spec.numeric == ("price",) and "user_id*tags" in spec.counters
    with pytest.raises(ConfigError, match=r"features\.numeric: column\(s\) \['year'\] not in the events"):
        load_config({"data": {"format": "generic"}, "features": {"numeric": ["year"]}}).feature_spec(events)


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
