"""serve/config.yaml is a valid Serve config whose import path and args work."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_serve_config_parses_and_names_the_app_and_services():
    from ray.serve.schema import ServeDeploySchema

    from serve.app import SERVICER_FUNCTIONS, serve_config

    raw = yaml.safe_load((ROOT / "serve/config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    assert schema.grpc_options.grpc_servicer_functions == SERVICER_FUNCTIONS
    app = schema.applications[0]
    module, attr = app.import_path.split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    cfg = serve_config(app.args)
    assert cfg.scorer == "triton" and cfg.precision == "int8" and cfg.rows == "fp16"
    assert [d.name for d in app.deployments] == ["Recommender"]


def test_serve_config_refuses_unknown_keys_naming_them():
    from serve.app import serve_config

    with pytest.raises(ValueError, match=r"unknown key\(s\) \['colour'\]"):
        serve_config({"run_dir": "x", "colour": "red"})
    with pytest.raises(ValueError, match="run_dir is required"):
        serve_config({})
