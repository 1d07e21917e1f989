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
    (lambda a: a["experts"][0]["engine"].update(max_context=2), "experts.0.engine.max_context"),
    (lambda a: a["experts"][0]["engine"].update(backend="tgi"), "experts.0.engine.backend"),
    (lambda a: a["experts"][0]["engine"].update(model="builtin:nope"), "unknown builtin model 'nope'"),
    (lambda a: a["experts"][0].update(batchng={}), "experts.0.batchng"),
    (lambda a: a["experts"][0]["deployment"].update(batchng={}), "experts.0.deployment.batchng"),
    (lambda a: a["experts"][1].update(name="demo-llama"), "repeated: ['demo-llama']"),
    (lambda a: a["experts"][0].update(name="moe"), "reserved"),
    (lambda a: a.update(default_model="ghost"), "default_model 'ghost'"),
    (lambda a: a["experts"][0].update(fallbacks=["ghost"]), "experts.demo-llama.fallbacks: ['ghost']"),
    (lambda a: a["experts"][0].update(fallbacks=["demo-llama"]), "fallbacks: ['demo-llama']"),
    (lambda a: a["router"].update(max_retries=-1), "router.max_retries"),
    (lambda a: a["experts"][0]["deployment"].update(timeout_s=0), "deployment.timeout_s"),
    (lambda a: a["experts"][0]["engine"]["scheduler"].update(max_batch_size=0),
     "experts.0.engine.scheduler.max_batch_size"),
    (lambda a: a.update(experts=[]), "experts"),
    (lambda a: a["experts"][0].pop("engine"), "exactly one of `engine`"),
    (lambda a: a["experts"][0].update(remote={"base_url": "http://x/v1"}), "exactly one of `engine`"),
    (lambda a: a["experts"].append({"name": "r", "remote": {"base_url": "http://x/v1"}}),
     "needs cost_per_1k_prompt"),
    (lambda a: a["experts"].append({"name": "r", "remote": {"base_url": "http://x/v1"},
                                    "deployment": {"num_replicas": 2}, "cost_per_1k_prompt": 1,
                                    "cost_per_1k_completion": 1}), "it has no `deployment`"),
])
def test_bad_config_names_the_field(mutate, needle):
    args = copy.deepcopy(TEST_APP_ARGS)
    mutate(args)
    with pytest.raises(ConfigError) as info:
        parse_app_config(args)
    assert needle in str(info.value)


OLD_SHAPE = {  # an expert as configs were written before engine, deployment and remote split
    "name": "old", "model": "builtin:demo-llama", "engine": "transformers", "dtype": "float32",
    "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.05},
    "resources": {"num_cpus": 0.5}, "max_queued_requests": 8,
    "autoscaling": {"enabled": False, "memory_fraction": 0.5},
}


def test_a_config_in_the_old_shape_says_what_moved_where():
    args = copy.deepcopy(TEST_APP_ARGS)
    args["experts"] = [OLD_SHAPE]
    with pytest.raises(ConfigError) as info:
        parse_app_config(args)
    message = str(info.value)
    for moved in ("`model` moved to `engine.model`",
                  "`engine: transformers|vllm` moved to `engine.backend`",
                  "`dtype` moved to `engine.dtype`",
                  "`max_batch_size`, `max_batched_tokens`, `admission_delay_s`, "
                  "`stream_interval_s` to `engine.scheduler`",
                  "`batch_wait_timeout_s` to `deployment.batch_wait_timeout_s`",
                  "`resources` moved to `deployment.resources`",
                  "`max_queued_requests` moved to `deployment.max_queued_requests`",
                  "`memory_fraction` and `memory_budget_bytes`, which moved to `engine.kv_cache`"):
        assert moved in message


def test_an_old_remote_expert_says_what_moved_where():
    args = copy.deepcopy(TEST_APP_ARGS)
    args["experts"].append({"name": "hosted", "kind": "openai", "base_url": "http://x/v1",
                            "remote_model": "m", "api_key_env": "K", "connect_timeout_s": 2,
                            "cost_per_1k_prompt": 1, "cost_per_1k_completion": 1})
    with pytest.raises(ConfigError) as info:
        parse_app_config(args)
    for moved in ("an expert with a `remote` section is remote", "`base_url` moved to "
                  "`remote.base_url`", "`remote_model` moved to `remote.model`",
                  "`api_key_env` moved to `remote.api_key_env`",
                  "`connect_timeout_s` moved to `remote.connect_timeout_s`"):
        assert moved in str(info.value)


def test_the_new_shape_loads_with_one_default_per_knob():
    from frugalserve.experts.paged.engine import PagedConfig
    from frugalserve.experts.paged.scheduler import SchedulerConfig
    from frugalserve.experts.spec import EngineSpec

    config = parse_app_config(copy.deepcopy(TEST_APP_ARGS))
    local = config.experts[0]
    assert local.engine is not None and local.remote is None
    assert local.engine.scheduler.max_batch_size == 32
    assert local.deployment.batch_wait_timeout_s == 0.1
    spec = EngineSpec(model="builtin:demo-llama")  # every knob at its default
    paged = PagedConfig.from_spec(spec)
    assert paged == PagedConfig()
    assert (SchedulerConfig().max_num_seqs, SchedulerConfig().max_num_batched_tokens) == (
        spec.scheduler.max_batch_size, spec.scheduler.max_batched_tokens)


def test_vllm_backend_without_vllm_names_the_extra():
    args = copy.deepcopy(TEST_APP_ARGS)
    args["experts"][0]["engine"]["backend"] = "vllm"
    with pytest.raises(ConfigError, match=r"frugalserve\[vllm\]"):
        parse_app_config(args)


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("applications: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_serve_config(path)
    data = yaml.safe_load((REPO / "configs/local.yaml").read_text())
    data["applications"][0]["args"]["experts"][0]["engine"]["dtype"] = "float8"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"(?s)applications\[0\]\.args.*experts\.0\.engine\.dtype"):
        load_serve_config(path)


def test_cli_reports_a_bad_config(tmp_path, capsys):
    from frugalserve.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text("applications:\n  - import_path: " + APP_IMPORT_PATH + "\n    args: {}\n")
    assert main(["serve", "--config", str(path)]) == 2
    assert "experts" in capsys.readouterr().err
