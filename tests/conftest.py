"""Shared fixtures: one real Ray Serve application per test session, reached over HTTP."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


# Without CUDA the Triton kernels run in Triton's interpreter. The switch is read when a
# @triton.jit function is defined, so it must be set before anything imports Triton (other
# packages do: bitsandbytes, peft), not only in tests/kernels.
if not _cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if _cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TEST_APP_ARGS = {
    "gpus": "never",
    "default_model": "demo-llama",
    "router": {"num_replicas": 1, "num_cpus": 0.1},
    "experts": [
        {
            "name": "demo-llama",
            "engine": {"model": "builtin:demo-llama", "scheduler": {"max_batch_size": 32}},
            "deployment": {"resources": {"num_cpus": 0.5}, "batch_wait_timeout_s": 0.1},
        },
        {
            "name": "demo-falcon",
            "engine": {"model": "builtin:demo-falcon", "max_context": 128,
                       "scheduler": {"max_batch_size": 32}},
            "deployment": {"resources": {"num_cpus": 0.5}, "batch_wait_timeout_s": 0.1},
        },
    ],
}


METRICS_PORT = free_port()


@pytest.fixture(scope="session")
def ray_cluster():
    """One Ray instance for the whole session (Serve starts in about 10 s here)."""
    import ray

    for attempt in range(3):  # a loaded 2-core machine occasionally misses Ray's start deadline
        try:
            ray.init(
                num_cpus=8,
                include_dashboard=False,
                log_to_driver=False,
                object_store_memory=200 * 1024**2,
                # the mode `frugalserve serve` runs in: Ray Serve's high-throughput mode
                runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false",
                                          "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}},
                _metrics_export_port=METRICS_PORT,
                _system_config={"metrics_report_interval_ms": 1000},
            )
            break
        except Exception:  # noqa: BLE001 - retried, then re-raised
            ray.shutdown()
            if attempt == 2:
                raise
            time.sleep(5)
    yield ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def metrics_url(ray_cluster):
    """Where Prometheus would scrape this node: Ray's metrics export port."""
    return f"http://127.0.0.1:{METRICS_PORT}/metrics"


@pytest.fixture(scope="session")
def serve_http(ray_cluster):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def demo_router(tmp_path_factory):
    """A router artifact over the two demo experts (see tests/serve_app/router_fixture.py)."""
    from tests.serve_app.router_fixture import build_demo_router

    return build_demo_router(tmp_path_factory.mktemp("router"))


def make_random_adapter(base: Path, out: Path, seed: int = 0) -> Path:
    """A real peft LoRA folder for `base` with random (not zero) B matrices, so the adapter
    changes the model's answers without training."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def demo_adapter(tmp_path_factory):
    from frugalserve.experts.spec import resolve_model_path

    return make_random_adapter(resolve_model_path("builtin:demo-llama"),
                               tmp_path_factory.mktemp("adapter") / "demo-llama-lora")


@pytest.fixture(scope="session")
def stub_provider():
    """A hosted provider's stand-in on loopback (429 + Retry-After on a first call)."""
    from tests.serve_app.stub_openai import StubProvider

    stub = StubProvider()
    yield stub
    stub.close()


ALIASES = {"gpt-4o-mini": "cascade", "cheap": "cascade:max_tier=0", "gpt-4o": "demo-falcon"}


@pytest.fixture(scope="session")
def app_url(serve_http, demo_router, demo_adapter, stub_provider):
    """The test application deployed once under `/`: both demo experts, the moe and cascade
    policies, aliases, and three remote experts: one served by a second frugalserve application
    under `/remote` (a real OpenAI-compatible endpoint, vLLM's sampling fields on), one pointing
    at a closed port, one at a stub provider that rate-limits."""
    import copy

    from frugalserve.serve_app.app import build_app
    from ray import serve

    started = time.monotonic()
    remote_args = copy.deepcopy(TEST_APP_ARGS)
    remote_args["experts"] = [e for e in remote_args["experts"] if e["name"] == "demo-falcon"]
    remote_args["default_model"] = "demo-falcon"
    serve.run(build_app(remote_args), name="remote", route_prefix="/remote")
    args = copy.deepcopy(TEST_APP_ARGS)
    args["routing"] = {"artifact": str(demo_router)}
    args["aliases"] = dict(ALIASES)
    args["experts"][0]["engine"]["adapters"] = {"demo-llama-lora": str(demo_adapter)}
    args["experts"] += [
        {"name": "hosted-falcon", "cost_per_1k_prompt": 1.0, "cost_per_1k_completion": 2.0,
         "remote": {"base_url": f"{serve_http}/remote/v1", "model": "demo-falcon",
                    "api_key_env": "FRUGALSERVE_TEST_KEY", "max_context": 128,
                    "vllm_sampling": True}},
        {"name": "dead", "cost_per_1k_prompt": 1.0, "cost_per_1k_completion": 1.0,
         "remote": {"base_url": f"http://127.0.0.1:{free_port()}/v1", "connect_timeout_s": 2,
                    "max_retries": 0, "allowed_fails": 100}},  # its breaker: test_failover.py
        {"name": "flaky", "cost_per_1k_prompt": 1.0, "cost_per_1k_completion": 1.0,
         "remote": {"base_url": stub_provider.url, "model": "stub-model", "logprobs": False,
                    "max_tokens_field": "max_completion_tokens", "max_retries": 2}},
    ]
    serve.run(build_app(args), name="frugalserve", route_prefix="/")
    _wait_ready(serve_http, started)
    return serve_http


def _wait_ready(url: str, started: float, timeout_s: float = 180) -> None:
    import httpx

    while time.monotonic() - started < timeout_s:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"application at {url} not ready after {timeout_s} s")
