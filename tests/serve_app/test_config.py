"""The application config: validated at load, errors name the field; the YAML is Serve's."""

from __future__ import annotations

import copy

import pytest
import yaml
from frugalserve.serve_app.config import (
    APP_IMPORT_PATH,
    ConfigError,
    app_config_from_file,
    load_serve_config,
    parse_app_config,
)

from tests.conftest import REPO, TEST_APP_ARGS


def test_local_yaml_is_a_valid_serve_config():
    from ray.serve.schema import ServeDeploySchema

    data = load_serve_config(REPO / "configs/local.yaml")
    ServeDeploySchema.model_validate(data) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(data)
    config = app_config_from_file(REPO / "configs/local.yaml")
    assert [e.name for e in config.experts]
    assert data["applications"][0]["import_path"] == APP_IMPORT_PATH


@pytest.mark.parametrize("mutate, needle", [
    (lambda a: a["experts"][0].update(max_context=2), "experts.0.max_context"),
    (lambda a: a["experts"][0].update(engine="tgi"), "experts.0.engine"),
    (lambda a: a["experts"][0].update(model="builtin:nope"), "unknown builtin model 'nope'"),
    (lambda a: a["experts"][0].update(batchng={}), "experts.0.batchng"),
    (lambda a: a["experts"][1].update(name="demo-llama"), "repeated: ['demo-llama']"),
    (lambda a: a["experts"][0].update(name="moe"), "reserved"),
    (lambda a: a.update(default_model="ghost"), "default_model 'ghost'"),
    (lambda a: a["experts"][0]["batching"].update(max_batch_size=0), "max_batch_size"),
    (lambda a: a.update(experts=[]), "experts"),
])
def test_bad_config_names_the_field(mutate, needle):
    args = copy.deepcopy(TEST_APP_ARGS)
    mutate(args)
    with pytest.raises(ConfigError) as info:
        parse_app_config(args)
    assert needle in str(info.value)


def test_vllm_engine_without_vllm_names_the_extra():
    args = copy.deepcopy(TEST_APP_ARGS)
    args["experts"][0]["engine"] = "vllm"
    with pytest.raises(ConfigError, match=r"frugalserve\[vllm\]"):
        parse_app_config(args)


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("applications: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_serve_config(path)
    data = yaml.safe_load((REPO / "configs/local.yaml").read_text())
    data["applications"][0]["args"]["experts"][0]["dtype"] = "float8"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"(?s)applications\[0\]\.args.*experts\.0\.dtype"):
        load_serve_config(path)


def test_cli_reports_a_bad_config(tmp_path, capsys):
    from frugalserve.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text("applications:\n  - import_path: " + APP_IMPORT_PATH + "\n    args: {}\n")
    assert main(["serve", "--config", str(path)]) == 2
    assert "experts" in capsys.readouterr().err
