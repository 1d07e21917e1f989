"""The vLLM engine's pure parts and the vLLM backend's torch parts, without vLLM (CI).

The merging test feeds hand-made outputs shaped like vLLM's (0.24 and 0.33 alike) RequestOutput / CompletionOutput /
Logprob (same attribute names, DELTA mode: each output carries only what is new).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

import pytest
import torch
from frugalserve.experts import vllm_engine as ve
from frugalserve.experts.engine import PromptTooLongError, SamplingParams, completion_budget
from frugalserve.experts.spec import EngineSpec
from frugalserve.kernels import alibi_slopes, vllm_backend, vllm_compat
from frugalserve.kernels.reference import attention_reference

NO_VLLM = importlib.util.find_spec("vllm") is None
needs_no_vllm = pytest.mark.skipif(not NO_VLLM, reason="checks behaviour without vLLM installed")


def _spec(vllm: dict | None = None, **fields) -> EngineSpec:
    """A valid spec switched to backend vllm (validating backend vllm needs vLLM installed)."""
    base = EngineSpec(model="/models/big", **fields)
    return base.model_copy(update={"backend": "vllm", "vllm": vllm or {}})


# -- without vLLM --------------------------------------------------------------------------------


@needs_no_vllm
def test_spec_with_engine_vllm_names_the_extra():
    with pytest.raises(ValueError, match=r"pip install 'frugalserve\[vllm\]'"):
        EngineSpec(model="/models/big", backend="vllm")


@needs_no_vllm
def test_backend_module_imports_and_register_names_the_extra():
    assert vllm_backend.CLASS_PATH == "frugalserve.kernels.vllm_backend.FrugalAttentionBackend"
    with pytest.raises(vllm_backend.VLLMUnavailableError, match=r"frugalserve\[vllm\]"):
        vllm_backend.register()
    with pytest.raises(vllm_backend.VLLMUnavailableError, match="0.33"):
        vllm_backend.FrugalAttentionBackend  # noqa: B018  (classes are built on first access)


def test_transformers_stays_the_default_engine():
    assert EngineSpec(model="/models/small").backend == "transformers"


# -- engine arguments ---------------------------------------------------------------------------


def test_engine_args_map_spec_fields():
    spec = _spec({"tensor_parallel_size": 2, "gpu_memory_utilization": 0.85, "quantization": "awq",
                  "enable_lora": True, "attention_backend": "CUSTOM", "max_num_seqs": 64},
                 dtype="bfloat16", max_context=4096)
    assert ve.engine_args_from_spec(spec, "big") == {
        "model": "/models/big", "served_model_name": "big", "dtype": "bfloat16", "max_model_len": 4096,
        "disable_log_stats": False, "enable_log_requests": False,
        "distributed_executor_backend": "ray", "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.85, "quantization": "awq", "enable_lora": True,
        "attention_backend": "CUSTOM", "max_num_seqs": 64,
    }


def test_engine_args_defaults_leave_vllm_defaults():
    args = ve.engine_args_from_spec(_spec(), "big")
    assert args == {"model": "/models/big", "served_model_name": "big", "dtype": "auto",
                    "disable_log_stats": False, "enable_log_requests": False}
    assert ve.engine_args_from_spec(_spec({"max_model_len": 1024}), "big")["max_model_len"] == 1024


def test_engine_args_reject_unknown_and_bad_options():
    with pytest.raises(ValueError, match=r"expert 'big': unknown vllm option\(s\) \['tensor_parallel'\]"):
        ve.engine_args_from_spec(_spec({"tensor_parallel": 2}), "big")
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        ve.engine_args_from_spec(_spec({"gpu_memory_utilization": 1.5}), "big")
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        ve.engine_args_from_spec(_spec({"tensor_parallel_size": "two"}), "big")
    with pytest.raises(ValueError, match="disagree"):
        ve.engine_args_from_spec(_spec({"max_model_len": 1024}, max_context=2048), "big")
    with pytest.raises(ValueError, match="CUDA"):
        ve.engine_args_from_spec(_spec(device="cpu"), "big")


def test_kv_cache_dtype_becomes_vllms_kv_cache_dtype():
    assert ve.engine_args_from_spec(_spec(kv_cache={"dtype": "fp8_e4m3"}), "big")["kv_cache_dtype"] == "fp8"
    assert ve.engine_args_from_spec(_spec({"kv_cache_dtype": "fp8"}, kv_cache={"dtype": "fp8"}),
                                    "big")["kv_cache_dtype"] == "fp8"
    with pytest.raises(ValueError, match="disagree"):
        ve.engine_args_from_spec(_spec({"kv_cache_dtype": "auto"}, kv_cache={"dtype": "fp8"}), "big")
    with pytest.raises(ValueError, match="kv_cache.dtype 'float32' has no vLLM kv_cache_dtype"):
        ve.engine_args_from_spec(_spec(kv_cache={"dtype": "fp32"}), "big")


def test_deployment_reserves_one_gpu_per_tp_rank():
    assert ve.deployment_resources(_spec(), 1.0) == {"ray_actor_options": {"num_cpus": 1.0, "num_gpus": 1}}
    tp4 = ve.deployment_resources(_spec({"tensor_parallel_size": 4}), 1.0)
    assert tp4["ray_actor_options"]["num_gpus"] == 0
    assert tp4["placement_group_bundles"] == [{"CPU": 1.0}] + [{"GPU": 1}] * 4
    assert tp4["placement_group_strategy"] == "STRICT_PACK"


def test_fractional_gpu_replica_needs_a_memory_share_that_fits():
    half = _spec({"gpu_memory_utilization": 0.3})
    assert ve.deployment_resources(half, 1.0, "small", gpus=0.3)["ray_actor_options"]["num_gpus"] == 0.3
    by_bytes = _spec({"kv_cache_memory_bytes": 2 << 30})
    assert ve.deployment_resources(by_bytes, 1.0, gpus=0.1)["ray_actor_options"]["num_gpus"] == 0.1
    with pytest.raises(ValueError, match=r"'small'.*num_gpus 0.25.*0.9.*gpu_memory_utilization to at most 0.25"):
        ve.deployment_resources(_spec(), 1.0, "small", gpus=0.25)
    with pytest.raises(ValueError, match="0.5 of its memory"):
        ve.deployment_resources(_spec({"gpu_memory_utilization": 0.5}), 1.0, gpus=0.25)
    with pytest.raises(ValueError, match="num_gpus is 0"):
        ve.deployment_resources(_spec(), 1.0, gpus=0)


def test_supported_releases_and_their_kv_layouts():
    assert vllm_compat.release_for("0.24.0").kv_layout == "split"
    assert vllm_compat.release_for("0.33.1").kv_layout == "packed"
    assert vllm_compat.release_for("0.24.0").backend_sets_kv_shape
    for other in ("0.25.0", "0.32.1", "0.34.0", "1.0.0", "unknown"):
        with pytest.raises(vllm_compat.VLLMUnavailableError, match=rf"0.24.x or 0.33.x, found {other}"):
            vllm_compat.release_for(other)
    assert vllm_compat.kv_cache_shape(7, 16, 2, 40) == (7, 2, 16, 2, 40)
    with pytest.raises(ValueError, match="block size 8"):
        vllm_compat.kv_cache_shape(7, 8, 2, 40)
    with pytest.raises(ValueError, match=r"got \(3, 4, 5\)"):
        vllm_compat.split_kv_cache(torch.zeros(3, 4, 5), 40)


def test_sampling_kwargs():
    params = SamplingParams(max_tokens=None, temperature=0.7, top_p=0.9, stop=("\n\n",), seed=3)
    assert ve.sampling_kwargs(params, 40) == {
        "n": 1, "temperature": 0.7, "top_p": 0.9, "stop": ["\n\n"], "seed": 3, "max_tokens": 40,
        "logprobs": 0, "skip_special_tokens": True,
    }
    assert ve.sampling_kwargs(SamplingParams(), 16)["stop"] is None


def test_completion_budget():
    assert completion_budget(100, 64, 90, None) == 10
    assert completion_budget(100, 64, 10, None) == 64
    assert completion_budget(100, 64, 10, 90) == 90
    with pytest.raises(PromptTooLongError, match="needs 101"):
        completion_budget(100, 64, 10, 91)
    with pytest.raises(PromptTooLongError, match="prompt alone takes 100"):
        completion_budget(100, 64, 100, None)


# -- merging vLLM outputs -----------------------------------------------------------------------


@dataclass
class Logprob:  # vllm.logprobs.Logprob
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:  # vllm.outputs.CompletionOutput
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:  # vllm.outputs.RequestOutput (the attributes the engine reads)
    request_id: str
    outputs: list[CompletionOutput]
    finished: bool
    prompt_token_ids: list[int] = field(default_factory=list)


def _out(rid, pieces, finished=False, reason=None):
    """A DELTA-mode output carrying `pieces` = [(token_id, text, logprob), ...]."""
    lps = [{t: Logprob(lp, 1, s)} for t, s, lp in pieces]
    co = CompletionOutput(0, "".join(s for _, s, _ in pieces), [t for t, _, _ in pieces], None, lps,
                          finish_reason=reason)
    return RequestOutput(rid, [co], finished)


def test_merge_interleaved_requests_step_by_step():
    states = [ve.RequestState(prompt_tokens=5), ve.RequestState(prompt_tokens=7)]
    step = ve.merge_outputs(states, [(0, _out("a", [(11, "Hel", -0.1)])),
                                     (0, _out("a", [(12, "lo", -0.2)]))])
    assert step[0].text == "Hello" and step[0].token_ids == (11, 12)
    assert step[0].token_logprobs == (-0.1, -0.2) and step[0].finish_reason is None
    assert step[1].text == "" and step[1].token_ids == ()  # running, nothing new yet

    step = ve.merge_outputs(states, [(1, _out("b", [(21, "Hi", -0.5)], True, "stop")),
                                     (0, _out("a", [(13, "!", -0.3)], True, "length"))])
    a, b = step[0].completion, step[1].completion
    assert (step[0].text, step[0].finish_reason) == ("!", "length")
    assert a.text == "Hello!" and a.token_ids == (11, 12, 13) and a.token_logprobs == (-0.1, -0.2, -0.3)
    assert a.token_texts == ("Hel", "lo", "!") and a.prompt_tokens == 5 and a.completion_tokens == 3
    assert b.finish_reason == "stop" and b.text == "Hi" and b.prompt_tokens == 7
    assert ve.merge_outputs(states, []) == [None, None]  # both reported: None from now on


def test_merge_cancelled_and_errors():
    states = [ve.RequestState(prompt_tokens=1), ve.RequestState(prompt_tokens=1)]
    step = ve.merge_outputs(states, [(0, ve.CANCELLED), (1, _out("b", [(5, "x", -1.0)]))])
    assert step[0] is None and step[1].text == "x"
    step = ve.merge_outputs(states, [(1, _out("b", [], True, "abort"))])
    assert step == [None, None]
    with pytest.raises(RuntimeError, match="error"):
        ve.merge_outputs([ve.RequestState(1)], [(0, _out("c", [], True, "error"))])
    no_lp = RequestOutput("d", [CompletionOutput(0, "y", [7], None, None)], False)
    with pytest.raises(ValueError, match="logprobs"):
        ve.merge_outputs([ve.RequestState(1)], [(0, no_lp)])


def test_kv_memory_stats():
    s = ve.kv_memory_stats(num_blocks=1000, block_size=16, bytes_per_token=131072, usage=0.25,
                           running=3, waiting=1)
    assert s["kv_cache_tokens"] == 16000 and s["kv_cache_bytes"] == 16000 * 131072
    assert s["kv_cache_tokens_used"] == 4000 and s["num_running_requests"] == 3
    assert "kv_cache_usage" not in ve.kv_memory_stats(num_blocks=1, block_size=16, bytes_per_token=2)


# -- the backend's batch split and paged attention, on the PyTorch reference --------------------


@pytest.mark.parametrize("path", ["reference", "triton"])
@pytest.mark.parametrize("release", ["0.24", "0.33"])
def test_attend_over_vllm_cache_layout_matches_reference(monkeypatch, release, path):
    """Each release's layer cache, written with write_kv, read by attend in one launch (GQA 8/2,
    ALiBi; a decode, a fresh prefill, a chunk over a cached prefix and a padding request with an
    empty query, as vLLM pads a batch for a CUDA graph): 0.24's [blocks, 2, block, Hkv, D]; 0.33's
    [blocks, Hkv, block, 2*D], stored block-major as vLLM's default LBNHC layout. The padding
    request's row of the (larger) block table and its seq_len are never read, and the output rows
    past the batch's tokens are left as they were."""
    if path == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FRUGALSERVE_ATTENTION", path)
    torch.manual_seed(0)
    hq, hkv, d, bs, nblocks = 8, 2, 32, 4, 16
    if release == "0.24":
        kv_cache = torch.zeros(nblocks, 2, bs, hkv, d)
    else:
        kv_cache = torch.zeros(nblocks, bs, hkv, 2 * d).transpose(1, 2)  # logical [B, H, N, 2D]
    kc, vc = vllm_backend.split_kv_cache(kv_cache, d)
    batch = [(6, 1), (0, 5), (3, 2)]  # (cached, new)
    # the padding request's row points past the cache: reading it would fail
    tables = torch.tensor([[3, 7, 0, 0], [9, 2, 0, 0], [5, 0, 0, 0], [99, 99, 99, 99], [0, 0, 0, 0]],
                          dtype=torch.int32)
    ks = [torch.randn(c + n, hkv, d) for c, n in batch]
    vs = [torch.randn(c + n, hkv, d) for c, n in batch]
    slots = [torch.tensor([int(tables[r, p // bs]) * bs + p % bs for p in range(c + n)])
             for r, (c, n) in enumerate(batch)]
    for r in range(len(batch)):
        vllm_backend.write_kv(ks[r], vs[r], kc, vc, torch.cat([slots[r], torch.tensor([-1])]))
    qlens = [n for _, n in batch]
    qsl = torch.tensor([0, 1, 6, 8, 8], dtype=torch.int32)  # the 4th request: padding, no query
    seq = torch.tensor([c + n for c, n in batch] + [0, 7], dtype=torch.int32)  # [>= B]: vLLM's buffer
    q = torch.randn(sum(qlens) + 2, hq, d)  # two padding tokens past the batch
    out = torch.full_like(q, float("nan"))
    slopes = alibi_slopes(hq)
    vllm_backend.attend(q, kc, vc, tables, qsl, seq, out, max_query_len=max(qlens), scale=d ** -0.5,
                        alibi_slopes=slopes)
    assert out[sum(qlens):].isnan().all()
    for r in range(len(batch)):
        lo, hi = int(qsl[r]), int(qsl[r + 1])
        ref = attention_reference(q[None, lo:hi], ks[r][None], vs[r][None], causal=True,
                                  alibi_slopes=slopes, scale=d ** -0.5)[0]
        torch.testing.assert_close(out[lo:hi], ref, atol=1e-5, rtol=1e-5)


def test_unsupported_reasons_name_each_feature():
    reasons = vllm_backend.unsupported_reasons(
        head_size=100, num_heads=6, num_kv_heads=4, sliding_window=4096, kv_cache_dtype="fp8_e5m2",
        logits_soft_cap=30.0, attn_type="encoder_only", sinks=torch.zeros(6), dtype=torch.float32)
    text = "; ".join(reasons)
    for word in ("head size 100", "multiple of num_kv_heads", "sliding window", "fp8_e5m2", "soft-capping",
                 "encoder_only", "sinks", "float32"):
        assert word in text
    assert vllm_backend.unsupported_reasons(head_size=128, num_heads=32, num_kv_heads=8,
                                            alibi_slopes=[0.5] * 32) == []


def test_sampling_kwargs_carry_vllms_fields_and_guided_decoding():
    from frugalserve.experts.engine import Guide, UnsupportedFeatureError

    params = SamplingParams(temperature=0.5, top_k=5, min_p=0.1, repetition_penalty=1.2,
                            presence_penalty=0.3, logit_bias=((7, -100.0),), min_tokens=2,
                            ignore_eos=True, stop_token_ids=(9,), top_logprobs=3,
                            guide=Guide("json_schema", '{"type": "object"}'))
    kw = ve.sampling_kwargs(params, 16)
    assert {k: kw[k] for k in ("top_k", "min_p", "repetition_penalty", "presence_penalty",
                               "min_tokens", "ignore_eos", "stop_token_ids", "logit_bias",
                               "logprobs")} == {
        "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2, "presence_penalty": 0.3,
        "min_tokens": 2, "ignore_eos": True, "stop_token_ids": [9], "logit_bias": {7: -100.0},
        "logprobs": 3}
    assert kw["structured_outputs"] == {"json": {"type": "object"}}
    assert ve.sampling_kwargs(SamplingParams(guide=Guide("json_object")), 4)[
        "structured_outputs"] == {"json_object": True}
    assert "top_k" not in ve.sampling_kwargs(SamplingParams(), 4)  # vLLM's defaults stay its own
    with pytest.raises(UnsupportedFeatureError) as info:
        ve.sampling_kwargs(SamplingParams(n=2), 4)
    assert info.value.param == "n"


def test_autoscaling_signal_reads_vllms_kv_cache():
    from frugalserve.experts import memory

    assert ve.kv_load_stats(ve.kv_memory_stats(num_blocks=100, block_size=16, bytes_per_token=2560)) == {}
    stats = ve.kv_load_stats(ve.kv_memory_stats(num_blocks=100, block_size=16, bytes_per_token=2560,
                                                usage=0.25, running=3, waiting=2))
    assert stats == {memory.BYTES_IN_USE: 0.25 * 1600 * 2560, memory.USABLE_BYTES: 1600 * 2560,
                     memory.TOKENS_IN_FLIGHT: 400, memory.REQUESTS_IN_FLIGHT: 5,
                     memory.KV_BYTES_PER_TOKEN: 2560}


def test_checkpoint_parameters_read_from_safetensors_headers():
    from frugalserve.experts.spec import resolve_model_path
    from safetensors.torch import load_file

    folder = resolve_model_path("builtin:tier-l")
    expected = sum(t.numel() for f in folder.glob("*.safetensors") for t in load_file(f).values())
    assert ve.checkpoint_parameters(folder) == expected > 1_000_000
