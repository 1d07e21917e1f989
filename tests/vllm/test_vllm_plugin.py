"""The frugalserve attention backend against the real vLLM (0.24.x or 0.33.x): needs the `vllm`
extra, so it runs in `make test-vllm VLLM=<version>` (one venv per version), never in CI.

On a machine without CUDA it runs on CPU: vLLM is told its platform is the CPU one, and our Triton
kernels run under TRITON_INTERPRET=1 (float16 only: the interpreter's tl.dot on bfloat16 returns
garbage). The impl is driven the way vLLM's model runner drives it: a `CommonAttentionMetadata`
for a mixed batch, our builder's `build`, a KV cache made by vLLM's `create_kv_cache_views`,
`do_kv_cache_update`, then `forward`, and compared with our PyTorch reference. vLLM 0.33 lays
the cache out itself (each `KVCacheLayout` is tested); vLLM 0.24 takes the shape the backend
declares (`get_kv_cache_shape`), viewed over the raw buffer as its model runner does.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import os
from types import SimpleNamespace

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")  # the CUDA wheel finds no GPU platform here

pytest.importorskip("vllm", reason="needs the vllm extra (`make test-vllm`); CI runs without vLLM")

from frugalserve.kernels import alibi_slopes_list  # noqa: E402
from frugalserve.kernels import vllm_backend as vb  # noqa: E402
from frugalserve.kernels.reference import attention_reference  # noqa: E402
from frugalserve.kernels.vllm_compat import RELEASES, release_for  # noqa: E402
from vllm.config import VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.platforms.interface import DeviceCapability  # noqa: E402
from vllm.v1.attention.backend import (  # noqa: E402
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.attention.backends.registry import AttentionBackendEnum  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec  # noqa: E402

RELEASE = release_for(__import__("vllm").__version__)
if RELEASE.kv_layout == "packed":
    from vllm.v1.kv_cache_interface import KVCacheLayout, KVCacheTensor, create_kv_cache_views

    LAYOUTS: list = [KVCacheLayout.LBNHC, KVCacheLayout.LBHNC]
else:
    LAYOUTS = ["declared"]  # the backend's get_kv_cache_shape, identity strides

DEVICE = "cuda" if HAS_CUDA else "cpu"
BLOCK = 16
TOL = dict(atol=2e-3, rtol=2e-3)  # float16 vs the float32 reference: see tests/kernels/conftest.py


@pytest.fixture(scope="module")
def vllm_config():
    if HAS_CUDA:
        config = VllmConfig()
    else:  # the CUDA wheel finds no platform on a CPU machine (0.24 does not infer "cpu")
        from vllm.config import DeviceConfig

        config = VllmConfig(device_config=DeviceConfig(device="cpu"))
    with set_current_vllm_config(config):
        yield config


def test_installed_release_is_supported():
    import vllm

    assert RELEASE is RELEASES[".".join(vllm.__version__.split(".")[:2])]
    # 0.24 asks each backend for its cache shape; 0.33 has no such method and lays the cache out itself
    assert hasattr(vb.FrugalAttentionBackend, "get_kv_cache_shape") == RELEASE.backend_sets_kv_shape


def test_register_maps_custom_to_our_backend():
    assert vb.register() == vb.CLASS_PATH
    assert vb.register() == vb.CLASS_PATH  # re-entrant: vLLM calls it in every process
    assert AttentionBackendEnum.CUSTOM.get_class() is vb.FrugalAttentionBackend
    # the Attention layer looks the enum member up by get_name()
    assert AttentionBackendEnum[vb.FrugalAttentionBackend.get_name()] is AttentionBackendEnum.CUSTOM


def test_entry_point_declared_and_loaded_by_vllm():
    eps = [ep for ep in importlib.metadata.entry_points(group="vllm.general_plugins")
           if ep.value == "frugalserve.kernels.vllm_backend:register"]
    assert eps, ("no vllm.general_plugins entry point for frugalserve.kernels.vllm_backend:register; "
                 "add it to pyproject.toml and reinstall the project")
    import vllm.plugins

    AttentionBackendEnum.CUSTOM.clear_override()
    vllm.plugins.plugins_loaded = False
    vllm.plugins.load_general_plugins()
    assert AttentionBackendEnum.CUSTOM.get_path() == vb.CLASS_PATH


def test_classes_satisfy_vllm_abcs():
    pairs = [(vb.FrugalAttentionBackend, AttentionBackend), (vb.FrugalAttentionImpl, AttentionImpl),
             (vb.FrugalAttentionMetadataBuilder, AttentionMetadataBuilder)]
    for cls, base in pairs:
        assert issubclass(cls, base)
        assert not inspect.isabstract(cls), f"{cls.__name__} leaves {cls.__abstractmethods__} abstract"
    assert vb.FrugalAttentionBackend.get_impl_cls() is vb.FrugalAttentionImpl
    assert vb.FrugalAttentionBackend.get_builder_cls() is vb.FrugalAttentionMetadataBuilder
    assert vb.FrugalAttentionBackend.full_cls_name() == ("frugalserve.kernels.vllm_backend",
                                                          "FrugalAttentionBackend")


def _validate(**overrides):
    args = dict(head_size=128, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=16,
                use_mla=False, has_sink=False, use_sparse=False, use_mm_prefix=False,
                use_per_head_quant_scales=False, device_capability=DeviceCapability(9, 0),
                attn_type=AttentionType.DECODER)
    args.update(overrides)
    return vb.FrugalAttentionBackend.validate_configuration(**args)


def test_validation_says_what_is_unsupported():
    assert _validate() == []
    assert _validate(head_size=64, dtype=torch.float16, block_size=32) == []
    assert "head_size not supported" in _validate(head_size=100)
    assert "dtype not supported" in _validate(dtype=torch.float32)
    assert _validate(kv_cache_dtype="fp8") == [] and _validate(kv_cache_dtype="fp8_e4m3") == []
    assert "kv_cache_dtype not supported" in _validate(kv_cache_dtype="fp8_e5m2")
    assert "block_size not supported" in _validate(block_size=8)
    if "has_sliding_window" in inspect.signature(AttentionBackend.validate_configuration).parameters:
        assert "sliding window not supported" in _validate(has_sliding_window=True)
    assert "attention sinks not supported" in _validate(has_sink=True)
    assert "MLA not supported" in _validate(use_mla=True)
    assert "compute capability not supported" in _validate(device_capability=DeviceCapability(7, 5))
    assert any(r.startswith("attention type") for r in _validate(attn_type=AttentionType.ENCODER_ONLY))


def _impl(*args):
    # positionally, as vLLM's Attention layer calls it
    return vb.FrugalAttentionImpl(*args)


def test_impl_refuses_with_reasons(vllm_config):
    with pytest.raises(NotImplementedError, match="sliding window 4096"):
        _impl(8, 64, 0.125, 2, None, 4096, "auto", None, AttentionType.DECODER, None)
    with pytest.raises(NotImplementedError, match="kv_cache_dtype 'fp8_e5m2'.*soft-capping"):
        _impl(8, 64, 0.125, 2, None, None, "fp8_e5m2", 30.0, AttentionType.DECODER, None)
    with pytest.raises(NotImplementedError, match="head size 100"):
        _impl(8, 100, 0.1, 8, None, None, "auto", None, AttentionType.DECODER, None)
    with pytest.raises(NotImplementedError, match="attention sinks"):
        vb.FrugalAttentionImpl(8, 64, 0.125, 2, None, None, "auto", None, AttentionType.DECODER, None,
                               sinks=torch.zeros(8))
    impl = _impl(8, 64, 0.125, 2, alibi_slopes_list(8), None, "auto", None, AttentionType.DECODER, None)
    assert impl.alibi_slopes.dtype == torch.float32 and impl.alibi_slopes.shape == (8,)


def _kv_cache(layout, num_blocks: int, num_kv_heads: int, head: int, dtype):
    """One layer's cache exactly as vLLM's worker makes it: a byte buffer viewed per layout."""
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=num_kv_heads, head_size=head, dtype=dtype)
    page = spec.page_size_bytes
    raw = torch.zeros(page * num_blocks, dtype=torch.int8, device=DEVICE)
    if layout == "declared":  # vLLM 0.24's _reshape_attention_kv_cache with no stride order
        shape = vb.FrugalAttentionBackend.get_kv_cache_shape(num_blocks, BLOCK, num_kv_heads, head)
        return spec, raw.view(dtype).view(shape)
    tensor = KVCacheTensor(size=raw.numel(), layers=["layer.0"], layer_stride=page * num_blocks,
                           block_stride=page)
    (cache,) = create_kv_cache_views(raw, spec, num_blocks, layout, tensor)
    return spec, cache


# (cached tokens, new tokens) per request, mixed as vLLM schedules them: decodes, a fresh prefill,
# a chunked prefill over a cached prefix, a decode at position 0 + 1, one decode past a block edge.
BATCH = [(36, 1), (0, 19), (33, 7), (1, 1), (15, 1), (0, 2)]


@pytest.mark.parametrize("mode", ["triton", "reference"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("heads,alibi", [((8, 2), "local"), ((5, 1), "tp-slice"), ((4, 4), None)])
@pytest.mark.parametrize("kv_dtype", ["auto", "fp8"])
def test_forward_mixed_batch_matches_reference(vllm_config, monkeypatch, mode, layout, heads, alibi, kv_dtype):
    """vLLM's fp8 cache: bytes viewed as e4m3, one scale per layer (layer._k_scale / _v_scale); the
    reference reads the same quantized K/V, dequantized."""
    monkeypatch.setenv("FRUGALSERVE_ATTENTION", mode)
    torch.manual_seed(0)
    hq, hkv = heads
    head, dtype = 64, torch.float16
    scale = head ** -0.5
    fp8 = kv_dtype == "fp8"
    slopes = None
    if alibi == "local":
        slopes = alibi_slopes_list(hq)
    elif alibi == "tp-slice":  # rank 1 of TP 2: a slice of the global slopes, not slopes(local heads)
        slopes = alibi_slopes_list(2 * hq)[hq:]
    num_blocks = 24
    spec, kv_cache = _kv_cache(layout, num_blocks, hkv, head, torch.uint8 if fp8 else dtype)
    builder = vb.FrugalAttentionMetadataBuilder(spec, ["layer.0"], vllm_config, torch.device(DEVICE))
    impl = _impl(hq, head, scale, hkv, slopes, None, kv_dtype, None, AttentionType.DECODER, None)
    k_scale, v_scale = (0.02, 0.015) if fp8 else (1.0, 1.0)  # randn amax ~4.5 x 2 / 448
    layer = SimpleNamespace(_k_scale=torch.tensor(k_scale, device=DEVICE),
                            _v_scale=torch.tensor(v_scale, device=DEVICE))

    # Each request gets shuffled blocks (block 0 is vLLM's null block, never handed out).
    free = (torch.randperm(num_blocks - 1) + 1).tolist()
    max_blocks = max(-(-(c + n) // BLOCK) for c, n in BATCH)
    block_table = torch.zeros(len(BATCH), max_blocks, dtype=torch.int32)
    full_k, full_v = [], []
    for r, (cached, new) in enumerate(BATCH):
        nb = -(-(cached + new) // BLOCK)
        block_table[r, :nb] = torch.tensor([free.pop() for _ in range(nb)])
        full_k.append(torch.randn(cached + new, hkv, head, dtype=dtype))
        full_v.append(torch.randn(cached + new, hkv, head, dtype=dtype))

    def slots(r, positions):
        return torch.tensor([int(block_table[r, p // BLOCK]) * BLOCK + p % BLOCK for p in positions])

    # Earlier steps filled the cached prefixes.
    for r, (cached, _) in enumerate(BATCH):
        if cached:
            impl.do_kv_cache_update(layer, full_k[r][:cached].to(DEVICE), full_v[r][:cached].to(DEVICE),
                                    kv_cache, slots(r, range(cached)).to(DEVICE))

    # This step: the new tokens of every request, packed in batch order, plus 3 padding tokens.
    q_lens = [n for _, n in BATCH]
    seq_lens = [c + n for c, n in BATCH]
    n_tok, pad = sum(q_lens), 3
    query = torch.randn(n_tok + pad, hq, head, dtype=dtype, device=DEVICE)
    key = torch.cat([full_k[r][c:] for r, (c, _) in enumerate(BATCH)])
    value = torch.cat([full_v[r][c:] for r, (c, _) in enumerate(BATCH)])
    key = torch.cat([key, torch.randn(pad, hkv, head, dtype=dtype)]).to(DEVICE)
    value = torch.cat([value, torch.randn(pad, hkv, head, dtype=dtype)]).to(DEVICE)
    slot_mapping = torch.cat([slots(r, range(c, c + n)) for r, (c, n) in enumerate(BATCH)]
                             + [torch.full((pad,), -1)]).to(DEVICE)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    common = CommonAttentionMetadata(
        query_start_loc=qsl.to(DEVICE), query_start_loc_cpu=qsl,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        num_reqs=len(BATCH), num_actual_tokens=n_tok, max_query_len=max(q_lens),
        max_seq_len=max(seq_lens), block_table_tensor=block_table.to(DEVICE),
        slot_mapping=slot_mapping, causal=True,
    )
    metadata = builder.build(common_prefix_len=0, common_attn_metadata=common)
    impl.do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
    output = torch.full((n_tok + pad, hq, head), float("nan"), dtype=dtype, device=DEVICE)
    impl.forward(layer, query, key, value, kv_cache, metadata, output)

    slopes_t = None if slopes is None else torch.tensor(slopes, device=DEVICE)
    scales = {}
    if fp8:
        from frugalserve.kernels.kv_cache import quantize_fp8

        ks, vs = torch.tensor([k_scale]), torch.tensor([v_scale])
        full_k = [quantize_fp8(x, ks) for x in full_k]
        full_v = [quantize_fp8(x, vs) for x in full_v]
        scales = dict(k_scale=ks.to(DEVICE), v_scale=vs.to(DEVICE))
    # on CUDA vLLM's own writer quantizes (its division may round an element to the neighbouring e4m3
    # value, ~6 % of one key): a wider bound there, still far below an indexing or scale error's O(1)
    tol = dict(atol=2e-2, rtol=2e-2) if fp8 and HAS_CUDA else TOL
    for r in range(len(BATCH)):
        lo, hi = int(qsl[r]), int(qsl[r + 1])
        ref = attention_reference(query[None, lo:hi], full_k[r][None].to(DEVICE), full_v[r][None].to(DEVICE),
                                  causal=True, alibi_slopes=slopes_t, scale=scale, **scales)[0]
        torch.testing.assert_close(output[lo:hi].float(), ref.float(), **tol,
                                   msg=lambda m, r=r: f"request {r} {BATCH[r]}: {m}")
    assert torch.isnan(output[n_tok:]).all(), "padding rows must be left alone"


def test_builder_declares_full_cuda_graphs():
    from vllm.v1.attention.backend import AttentionCGSupport

    assert vb.FrugalAttentionMetadataBuilder._cudagraph_support == AttentionCGSupport.ALWAYS


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("kv_dtype", ["auto", "fp8"])
def test_forward_captured_in_a_cuda_graph_replays_other_batches(vllm_config, kv_dtype):
    """As vLLM's full CUDA graphs use the backend: metadata built once over persistent buffers
    (build_for_cudagraph_capture), forward captured, then new lengths, block tables and queries
    written into those buffers and the graph replayed: each replay equals the reference. The
    captured batch is padded (the last request has no query) like vLLM's padded decode graphs."""
    from frugalserve.kernels.kv_cache import quantize_fp8

    torch.manual_seed(1)
    hq, hkv, head, dtype = 8, 2, 64, torch.bfloat16
    fp8 = kv_dtype == "fp8"
    num_reqs, num_blocks, max_blocks = 4, 40, 8
    spec, kv_cache = _kv_cache(LAYOUTS[0], num_blocks, hkv, head, torch.uint8 if fp8 else dtype)
    builder = vb.FrugalAttentionMetadataBuilder(spec, ["layer.0"], vllm_config, torch.device(DEVICE))
    slopes = alibi_slopes_list(hq)
    impl = _impl(hq, head, head ** -0.5, hkv, slopes, None, kv_dtype, None, AttentionType.DECODER, None)
    ks, vs = (0.02, 0.015) if fp8 else (1.0, 1.0)
    layer = SimpleNamespace(_k_scale=torch.tensor(ks, device=DEVICE), _v_scale=torch.tensor(vs, device=DEVICE))
    # vLLM's persistent buffers: one decode token per request, the last request padding
    qsl = torch.tensor([0, 1, 2, 3, 3], dtype=torch.int32, device=DEVICE)
    seq_lens = torch.ones(num_reqs, dtype=torch.int32, device=DEVICE)
    table = torch.zeros(num_reqs, max_blocks, dtype=torch.int32, device=DEVICE)
    query = torch.zeros(num_reqs, hq, head, dtype=dtype, device=DEVICE)
    output = torch.zeros(num_reqs, hq, head, dtype=dtype, device=DEVICE)
    common = CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl.cpu(), seq_lens=seq_lens, num_reqs=num_reqs,
        num_actual_tokens=num_reqs, max_query_len=1, max_seq_len=max_blocks * BLOCK,
        block_table_tensor=table, slot_mapping=torch.zeros(num_reqs, dtype=torch.int64, device=DEVICE),
        causal=True)
    metadata = builder.build_for_cudagraph_capture(common)
    impl.forward(layer, query, query, query, kv_cache, metadata, output)  # warm-up compiles
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        impl.forward(layer, query, query, query, kv_cache, metadata, output)
    slopes_t = torch.tensor(slopes, device=DEVICE)
    for step, lens in enumerate([(5, 17, 100), (128, 1, 33)]):
        free = (torch.randperm(num_blocks - 1) + 1).tolist()
        contexts = []
        for r, n in enumerate(lens):
            nb = -(-n // BLOCK)
            table[r, :nb] = torch.tensor([free.pop() for _ in range(nb)], dtype=torch.int32)
            k = torch.randn(n, hkv, head, dtype=dtype, device=DEVICE)
            v = torch.randn(n, hkv, head, dtype=dtype, device=DEVICE)
            pos = torch.arange(n, device=DEVICE)
            impl.do_kv_cache_update(layer, k, v, kv_cache, (table[r, pos // BLOCK] * BLOCK + pos % BLOCK).long())
            contexts.append((k, v))
        seq_lens.copy_(torch.tensor([*lens, 0], dtype=torch.int32))
        query.copy_(torch.randn(num_reqs, hq, head, dtype=dtype))
        output.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for r, (k, v) in enumerate(contexts):
            if fp8:
                k, v = (quantize_fp8(x, torch.tensor([s], device=DEVICE)).float() * s
                        for x, s in ((k, ks), (v, vs)))
            ref = attention_reference(query[None, r:r + 1].float(), k[None].float(), v[None].float(),
                                      causal=True, alibi_slopes=slopes_t, scale=head ** -0.5)[0]
            tol = dict(atol=3e-2, rtol=3e-2)  # bf16 output
            torch.testing.assert_close(output[r:r + 1].float(), ref, **tol,
                                       msg=lambda m, r=r, step=step: f"replay {step}, request {r}: {m}")
        assert torch.isnan(output[3]).all(), "the padding request's row must be left alone"


def test_profiling_run_without_metadata_zeroes_output(vllm_config):
    impl = _impl(4, 64, 0.125, 4, None, None, "auto", None, AttentionType.DECODER, None)
    _, kv_cache = _kv_cache(LAYOUTS[0], 2, 4, 64, torch.float16)
    out = torch.ones(3, 4, 64, dtype=torch.float16, device=DEVICE)
    impl.forward(None, out, out, out, kv_cache, None, out)
    assert not out.any()


# -- the engine adapter against vLLM's own classes -------------------------------------------------


def test_engine_options_are_engine_args_fields():
    import dataclasses

    from frugalserve.experts.spec import VLLMOptions
    from vllm import AsyncEngineArgs

    fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    assert set(VLLMOptions.model_fields) <= fields, set(VLLMOptions.model_fields) - fields


def test_engine_args_build_vllm_objects():
    from frugalserve.experts import vllm_engine as ve
    from frugalserve.experts.engine import SamplingParams
    from frugalserve.experts.spec import EngineSpec
    from vllm import AsyncEngineArgs
    from vllm import SamplingParams as VSamplingParams
    from vllm.sampling_params import RequestOutputKind

    spec = EngineSpec(model="/models/big", backend="vllm", max_context=2048, dtype="bfloat16")
    spec = spec.model_copy(update={"vllm": {"tensor_parallel_size": 2, "gpu_memory_utilization": 0.8,
                                            "quantization": "awq", "enable_lora": True,
                                            "attention_backend": "CUSTOM"}})
    args = AsyncEngineArgs(**ve.engine_args_from_spec(spec, "big"))
    assert (args.model, args.served_model_name, args.dtype, args.max_model_len) == (
        "/models/big", "big", "bfloat16", 2048)
    assert (args.tensor_parallel_size, args.gpu_memory_utilization, args.quantization) == (2, 0.8, "awq")
    assert args.enable_lora and args.attention_backend == "CUSTOM"
    assert args.distributed_executor_backend == "ray" and not args.disable_log_stats

    params = SamplingParams(max_tokens=None, temperature=0.5, top_p=0.9, stop=("END",), seed=7)
    vp = VSamplingParams(**ve.sampling_kwargs(params, 12), output_kind=RequestOutputKind.DELTA)
    assert (vp.max_tokens, vp.temperature, vp.top_p, vp.stop, vp.seed, vp.logprobs) == (
        12, 0.5, 0.9, ["END"], 7, 0)


def test_merge_reads_vllm_output_objects():
    from frugalserve.experts import vllm_engine as ve
    from vllm.logprobs import Logprob
    from vllm.outputs import CompletionOutput, RequestOutput

    def out(ids, text, lps, finished, reason=None):
        co = CompletionOutput(index=0, text=text, token_ids=ids, cumulative_logprob=None,
                              logprobs=[{t: Logprob(lp, 1, text)} for t, lp in zip(ids, lps)],
                              finish_reason=reason)
        return RequestOutput("r", None, [1, 2], None, [co], finished)

    states = [ve.RequestState(prompt_tokens=2)]
    assert ve.merge_outputs(states, [(0, out([5], "a", [-0.5], False))])[0].token_logprobs == (-0.5,)
    final = ve.merge_outputs(states, [(0, out([6], "b", [-0.25], True, "length"))])[0]
    assert final.completion.text == "ab" and final.completion.token_logprobs == (-0.5, -0.25)
    assert final.finish_reason == "length"


def test_stat_logger_is_a_vllm_stat_logger(vllm_config):
    from frugalserve.experts import vllm_engine as ve
    from vllm.v1.metrics.loggers import StatLoggerBase
    from vllm.v1.metrics.stats import SchedulerStats

    snap = ve._SchedulerSnapshot()
    factory = ve._stat_logger_factory(snap)
    assert issubclass(factory, StatLoggerBase) and not inspect.isabstract(factory)
    factory(vllm_config, 0).record(SchedulerStats(num_running_reqs=3, kv_cache_usage=0.5), None)
    assert (snap.usage, snap.running) == (0.5, 3)
