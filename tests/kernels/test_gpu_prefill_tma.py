"""GPU: the tensor-descriptor (TMA) prefill variant at realistic sizes, bf16 and fp16, against the reference:
padded causal + ALiBi with left padding, packed varlen with ragged lengths, an fp8 K/V, every BLOCK_D class
with the odd head dims the zoo uses. Needs compute capability 9.0+; skipped without CUDA."""

import pytest
import torch
from frugalserve.kernels.alibi import alibi_slopes
from frugalserve.kernels.kv_cache import quantize_fp8
from frugalserve.kernels.reference import attention_reference, varlen_attention_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _hopper():
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need compute capability 9.0+")


def _rand(*shape, seed, dtype):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, device="cuda", generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,d", [((32, 8), 128), ((12, 3), 80), ((8, 1), 64), ((20, 1), 96), ((4, 4), 256)])
@pytest.mark.parametrize("autotune", [False, True])
def test_padded_and_varlen(heads, d, dtype, autotune, assert_close):
    from frugalserve.kernels.prefill import flash_attention, flash_attention_varlen

    hq, hkv = heads
    s = alibi_slopes(hq, device="cuda")
    q, k, v = _rand(2, 1000, hq, d, seed=1, dtype=dtype), _rand(2, 1000, hkv, d, seed=2, dtype=dtype), \
        _rand(2, 1000, hkv, d, seed=3, dtype=dtype)
    kv_lo = torch.tensor([0, 333], dtype=torch.int32, device="cuda")
    out = flash_attention(q, k, v, alibi_slopes=s, kv_lo=kv_lo, tma=True, autotune=autotune)
    assert_close(out, attention_reference(q, k, v, alibi_slopes=s, kv_lo=kv_lo), dtype)
    lens_q, lens_k = [1, 127, 128, 129, 700, 7], [1, 127, 200, 129, 700, 64]
    cu = lambda n: torch.tensor([0] + torch.tensor(n).cumsum(0).tolist(), dtype=torch.int32,  # noqa: E731
                                device="cuda")
    qv = _rand(sum(lens_q), hq, d, seed=4, dtype=dtype)
    kv, vv = _rand(sum(lens_k), hkv, d, seed=5, dtype=dtype), _rand(sum(lens_k), hkv, d, seed=6, dtype=dtype)
    out = flash_attention_varlen(qv, kv, vv, cu(lens_q), cu(lens_k), max(lens_q), alibi_slopes=s, tma=True,
                                 autotune=autotune)
    assert_close(out, varlen_attention_reference(qv, kv, vv, cu(lens_q), cu(lens_k), alibi_slopes=s), dtype)
    if d % 16 == 0:  # fp8 rows of d bytes: TMA needs multiples of 16
        ks = vs = torch.full((hkv,), 0.02, device="cuda")
        k8, v8 = quantize_fp8(kv, ks), quantize_fp8(vv, vs)
        out = flash_attention_varlen(qv, k8, v8, cu(lens_q), cu(lens_k), max(lens_q), alibi_slopes=s, tma=True,
                                     autotune=autotune, k_scale=ks, v_scale=vs)
        ref = varlen_attention_reference(qv, k8, v8, cu(lens_q), cu(lens_k), alibi_slopes=s, k_scale=ks,
                                         v_scale=vs, compute_dtype=torch.float64)
        assert_close(out, ref, dtype)
