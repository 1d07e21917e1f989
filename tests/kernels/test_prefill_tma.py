"""The tensor-descriptor (TMA) prefill variant against the reference: the same kernel with K/V read through
tl.make_tensor_descriptor. CPU: the interpreter (which supports descriptors), float16, small shapes."""

import importlib.util

import pytest
import torch
from frugalserve.kernels import dispatch
from frugalserve.kernels.alibi import alibi_slopes
from frugalserve.kernels.kv_cache import quantize_fp8
from frugalserve.kernels.reference import attention_reference, varlen_attention_reference

requires_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
DT = torch.float16


def _rand(*shape, seed, device):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device, DT)


@requires_triton
@pytest.mark.parametrize("heads,d,alibi", [((8, 2), 64, True), ((12, 3), 80, True), ((5, 1), 32, False)])
def test_padded_causal_with_left_padding(heads, d, alibi, interp_device, assert_close):
    from frugalserve.kernels.prefill import flash_attention

    hq, hkv = heads
    q, k, v = _rand(2, 37, hq, d, seed=1, device=interp_device), _rand(2, 45, hkv, d, seed=2, device=interp_device), \
        _rand(2, 45, hkv, d, seed=3, device=interp_device)
    v[0, :5] = 1e4  # left padding of row 0: must not leak into the output
    kv_lo = torch.tensor([5, 0], dtype=torch.int32, device=interp_device)
    s = alibi_slopes(hq, device=interp_device) if alibi else None
    out = flash_attention(q, k, v, alibi_slopes=s, kv_lo=kv_lo, tma=True)
    assert_close(out, attention_reference(q, k, v, alibi_slopes=s, kv_lo=kv_lo), DT)


@requires_triton
def test_varlen_fp8_and_dispatch(interp_device, assert_close, monkeypatch):
    from frugalserve.kernels.prefill import flash_attention_varlen, tma_problem

    hq, hkv, d = 8, 2, 64
    lens_q, lens_k = [1, 17, 30], [9, 17, 41]
    cu = lambda n: torch.tensor([0] + torch.tensor(n).cumsum(0).tolist(), dtype=torch.int32,  # noqa: E731
                                device=interp_device)
    q = _rand(sum(lens_q), hq, d, seed=4, device=interp_device)
    k, v = _rand(sum(lens_k), hkv, d, seed=5, device=interp_device), _rand(sum(lens_k), hkv, d, seed=6,
                                                                           device=interp_device)
    s = alibi_slopes(hq, device=interp_device)
    out = flash_attention_varlen(q, k, v, cu(lens_q), cu(lens_k), max(lens_q), alibi_slopes=s, tma=True)
    assert_close(out, varlen_attention_reference(q, k, v, cu(lens_q), cu(lens_k), alibi_slopes=s), DT)
    ks = vs = torch.full((hkv,), 0.02, device=interp_device)
    k8, v8 = quantize_fp8(k, ks), quantize_fp8(v, vs)
    out = flash_attention_varlen(q, k8, v8, cu(lens_q), cu(lens_k), max(lens_q), alibi_slopes=s, tma=True,
                                 k_scale=ks, v_scale=vs)
    ref = varlen_attention_reference(q, k8, v8, cu(lens_q), cu(lens_k), alibi_slopes=s, k_scale=ks, v_scale=vs,
                                     compute_dtype=torch.float64)
    assert_close(out, ref, DT)
    # fp8 at d 24: a 24-byte head stride is not a multiple of 16: no TMA, and dispatch falls back to say so
    k24 = quantize_fp8(k[..., :24].float(), ks)
    assert "multiples of 16 bytes" in tma_problem(q[..., :24], k24, k24)
    monkeypatch.setenv("FRUGALSERVE_ATTENTION", "triton")
    monkeypatch.setenv("FRUGALSERVE_PREFILL_VARIANT", "tma")
    assert dispatch.prefill_variant(q, k, v) == (True, "tensor descriptors (tma)")
    ok, why = dispatch.prefill_variant(q[..., :24], k24, k24)
    assert not ok and why.startswith("tma requested, pointer loads instead")
    with pytest.raises(ValueError, match="prefill variant 'wgmma'"):
        dispatch.prefill_variant(q, k, v, "wgmma")
    out = dispatch.attention_varlen(q[..., :24], k24, k24, cu(lens_q), cu(lens_k), max(lens_q), k_scale=ks,
                                    v_scale=vs)
    ref = varlen_attention_reference(q[..., :24], k24, k24, cu(lens_q), cu(lens_k), k_scale=ks, v_scale=vs,
                                     compute_dtype=torch.float64)
    assert_close(out, ref, DT)
