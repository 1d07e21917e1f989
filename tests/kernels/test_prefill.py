"""Flash prefill kernel vs the PyTorch reference (interpreter on CPU, float16, small shapes)."""

import importlib.util

import pytest
import torch
from frugalserve.kernels.alibi import alibi_slopes
from frugalserve.kernels.reference import attention_reference, varlen_attention_reference

requires_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

pytestmark = requires_triton
LAYOUTS = [(4, 4), (8, 2), (5, 1), (12, 3), (32, 8)]
DT = torch.float16
# the demo zoo's dims (8, 24, 32, 40) and common models' up to 256: odd multiples of 8 pad to BLOCK_D
HEAD_DIMS = [8, 24, 32, 40, 48, 64, 72, 80, 96, 112, 128, 160, 192, 256]


def _qkv(B, sq, sk, hq, hkv, d, device, seed=0, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, sq, hq, d, generator=g).to(device, dtype)
    k = torch.randn(B, sk, hkv, d, generator=g).to(device, dtype)
    v = torch.randn(B, sk, hkv, d, generator=g).to(device, dtype)
    return q, k, v


@pytest.mark.parametrize("heads", LAYOUTS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("alibi", [False, True])
def test_padded_layouts(heads, causal, alibi, interp_device, assert_close):
    from frugalserve.kernels.prefill import flash_attention

    hq, hkv = heads
    q, k, v = _qkv(2, 19, 19, hq, hkv, 64, interp_device, seed=hq)
    s = alibi_slopes(hq, device=interp_device) if alibi else None
    out = flash_attention(q, k, v, causal=causal, alibi_slopes=s)
    assert_close(out, attention_reference(q, k, v, causal=causal, alibi_slopes=s), DT)


def _cu(lens, device):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_head_dims_padded(d, interp_device, assert_close):
    """Every head dim: causal + ALiBi and non-causal, a GQA layout per dim, both launch paths."""
    from frugalserve.kernels.prefill import flash_attention

    i = HEAD_DIMS.index(d)
    hq, hkv = LAYOUTS[i % 4]
    q, k, v = _qkv(2, 19, 19, hq, hkv, d, interp_device, seed=d)
    s = alibi_slopes(hq, device=interp_device)
    out = flash_attention(q, k, v, alibi_slopes=s, autotune=i % 2 == 0)
    assert_close(out, attention_reference(q, k, v, alibi_slopes=s), DT)
    out = flash_attention(q[:, 6:], k, v, causal=False, autotune=i % 2 == 1)
    assert_close(out, attention_reference(q[:, 6:], k, v, causal=False), DT)


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_head_dims_varlen(d, interp_device, assert_close):
    """Every head dim, packed ragged sequences (lengths 1, 17, 33; shorter queries than keys)."""
    from frugalserve.kernels.prefill import flash_attention_varlen

    i = HEAD_DIMS.index(d)
    hq, hkv = LAYOUTS[(i + 1) % 4]
    lens_q, lens_k = [1, 17, 33], [1, 20, 33]
    g = torch.Generator().manual_seed(1000 + d)
    q = torch.randn(sum(lens_q), hq, d, generator=g).to(interp_device, DT)
    k = torch.randn(sum(lens_k), hkv, d, generator=g).to(interp_device, DT)
    v = torch.randn(sum(lens_k), hkv, d, generator=g).to(interp_device, DT)
    cu_q, cu_k = _cu(lens_q, interp_device), _cu(lens_k, interp_device)
    s = alibi_slopes(hq, device=interp_device)
    for causal, autotune in ((True, False), (False, True)):
        out = flash_attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), causal=causal, alibi_slopes=s,
                                     autotune=autotune)
        ref = varlen_attention_reference(q, k, v, cu_q, cu_k, causal=causal, alibi_slopes=s)
        assert_close(out, ref, DT)


@pytest.mark.parametrize("sq,sk", [(1, 1), (1, 37), (5, 37), (33, 33), (16, 48)])
def test_query_shorter_than_keys(sq, sk, interp_device, assert_close):
    """Queries are the last Sq tokens (decode/chunked prefill against a cache): bottom-right causal."""
    from frugalserve.kernels.prefill import flash_attention

    q, k, v = _qkv(2, sq, sk, 8, 2, 64, interp_device, seed=sq * 100 + sk)
    s = alibi_slopes(8, device=interp_device)
    assert_close(flash_attention(q, k, v, alibi_slopes=s), attention_reference(q, k, v, alibi_slopes=s), DT)


def test_left_padding_and_scale(interp_device, assert_close):
    from frugalserve.kernels.prefill import flash_attention

    q, k, v = _qkv(3, 23, 23, 12, 3, 64, interp_device, seed=3)
    kv_lo = torch.tensor([0, 7, 16], dtype=torch.int32, device=interp_device)
    s = alibi_slopes(12, device=interp_device)
    out = flash_attention(q, k, v, alibi_slopes=s, kv_lo=kv_lo, scale=0.3)
    ref = attention_reference(q, k, v, alibi_slopes=s, kv_lo=kv_lo, scale=0.3)
    real = (torch.arange(23, device=interp_device)[None, :] >= kv_lo[:, None].long())  # padding rows: don't care
    assert_close(out[real], ref[real], DT)


def test_strided_inputs_hf_layout(interp_device, assert_close):
    """transformers hands [B, H, S, D] tensors: the kernel reads their transposed views without copies."""
    from frugalserve.kernels.prefill import flash_attention

    g = torch.Generator().manual_seed(5)
    qh = torch.randn(2, 8, 17, 64, generator=g).to(interp_device, DT)
    kh = torch.randn(2, 2, 17, 64, generator=g).to(interp_device, DT)
    vh = torch.randn(2, 2, 17, 64, generator=g).to(interp_device, DT)
    q, k, v = qh.transpose(1, 2), kh.transpose(1, 2), vh.transpose(1, 2)
    assert not q.is_contiguous()
    assert_close(flash_attention(q, k, v), attention_reference(q, k, v), DT)


@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (5, 1)])
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_ragged(heads, causal, interp_device, assert_close):
    from frugalserve.kernels.prefill import flash_attention_varlen

    hq, hkv = heads
    lens_q = [1, 17, 40, 3]
    lens_k = [1, 17, 45, 30] if causal else [9, 17, 40, 3]
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32, device=interp_device)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32, device=interp_device)
    g = torch.Generator().manual_seed(hq)
    q = torch.randn(sum(lens_q), hq, 64, generator=g).to(interp_device, DT)
    k = torch.randn(sum(lens_k), hkv, 64, generator=g).to(interp_device, DT)
    v = torch.randn(sum(lens_k), hkv, 64, generator=g).to(interp_device, DT)
    s = alibi_slopes(hq, device=interp_device)
    out = flash_attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), causal=causal, alibi_slopes=s)
    ref = varlen_attention_reference(q, k, v, cu_q, cu_k, causal=causal, alibi_slopes=s)
    assert_close(out, ref, DT)


def test_autotune_shapes_by_block_d(monkeypatch):
    """GPU config lists (read with the interpreter off): d <= 128 keeps the measured list; 256-wide heads
    get their own shapes (see prefill._TUNE_SHAPES: chosen by register spills compiled for sm90)."""
    from frugalserve.kernels import prefill

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    configs = prefill._configs()
    for block_d in (16, 32, 64, 128):
        kept = [prefill._shape(c) for c in prefill._prune(configs, {"BLOCK_D": block_d})]
        assert kept == prefill._TUNE_SHAPES[128]
    wide = [prefill._shape(c) for c in prefill._prune(configs, {}, BLOCK_D=256)]
    assert wide == prefill._TUNE_SHAPES[256]
    for m, n, warps, _ in wide:
        assert n <= 32  # K and V tiles of at most 32 keys x 256 dims (16 KB in bf16)
        assert m * 256 // (32 * warps) <= 128  # fp32 accumulator floats per thread
    assert prefill.fixed_shapes(256)[0] in wide and prefill.fixed_shapes(128)[0] in kept
    assert prefill.fixed_shapes(72) == prefill.fixed_shapes(128)  # BLOCK_D 128
    assert prefill.fixed_shapes(160) == prefill.fixed_shapes(256)


def test_fixed_launch_falls_back_on_out_of_resources(monkeypatch):
    """A device without the shared memory for the first fixed shape gets the next one, once."""
    from types import SimpleNamespace

    from frugalserve.kernels import prefill
    from triton.runtime.errors import OutOfResources

    calls = []

    def launch(*args, BLOCK_M, BLOCK_N, num_warps, num_stages, **meta):
        calls.append((BLOCK_M, BLOCK_N, num_warps, num_stages))
        if (BLOCK_M, BLOCK_N, num_warps, num_stages) == prefill._FIXED_SHAPES[128][0]:
            raise OutOfResources(160 * 1024, 99 * 1024, "shared memory")

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(prefill, "_prefill_kernel", SimpleNamespace(fn={None: launch}))
    monkeypatch.setattr(prefill, "_fixed_resolved", {})
    for _ in range(2):
        prefill._launch_fixed(None, (), {"HEAD_DIM": 64}, "cuda:0")
    first, second = prefill._FIXED_SHAPES[128]
    assert calls == [first, second, second]
    with pytest.raises(OutOfResources):  # the last shape's failure is the caller's
        monkeypatch.setattr(prefill, "_FIXED_SHAPES", {128: [first], 256: [first]})
        prefill._launch_fixed(None, (), {"HEAD_DIM": 256}, "cuda:0")


def test_poisoned_output_fully_written(interp_device, assert_close):
    from frugalserve.kernels.prefill import flash_attention

    q, k, v = _qkv(2, 13, 13, 8, 2, 80, interp_device, seed=9)
    out = torch.full_like(q, float("nan"))
    flash_attention(q, k, v, out=out)
    assert not torch.isnan(out).any()


# ---- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [4, 50, 264])
def test_bad_head_dim(d, interp_device):
    from frugalserve.kernels.prefill import flash_attention

    q, k, v = _qkv(1, 4, 4, 4, 4, d, interp_device)
    with pytest.raises(ValueError, match=f"head_dim {d} is not supported.*multiples of 8 from 8 to 256"):
        flash_attention(q, k, v)


def test_non_divisible_heads(interp_device, assert_close):
    from frugalserve.kernels.prefill import flash_attention

    q, k, v = _qkv(1, 4, 4, 6, 4, 64, interp_device)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        flash_attention(q, k, v)


def test_mismatched_dtypes(interp_device, assert_close):
    from frugalserve.kernels.prefill import flash_attention

    q, k, v = _qkv(1, 4, 4, 4, 4, 64, interp_device)
    with pytest.raises(ValueError, match="dtype mismatch"):
        flash_attention(q, k.float(), v)
    with pytest.raises(ValueError, match="not supported"):
        flash_attention(q.float(), k.float(), v.float())


def test_bad_shapes(interp_device, assert_close):
    from frugalserve.kernels.prefill import flash_attention, flash_attention_varlen

    q, k, v = _qkv(1, 8, 4, 4, 4, 64, interp_device)
    with pytest.raises(ValueError, match="query length"):
        flash_attention(q, k, v)
    with pytest.raises(ValueError, match="alibi_slopes"):
        flash_attention(q[:, :4], k, v, alibi_slopes=torch.ones(3))
    with pytest.raises(ValueError, match="last"):
        flash_attention(torch.cat([q[:, :4], q[:, :4]], -1)[..., ::2], k, v)
    with pytest.raises(ValueError, match="cu_seqlens"):
        flash_attention_varlen(q[0], k[0], v[0], torch.tensor([0, 4]), torch.tensor([0, 2, 4]), 4)
