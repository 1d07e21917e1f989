"""The paged KV-cache writer: the Triton kernel (interpreter on CPU) against the PyTorch reference."""

import importlib.util

import pytest
import torch
from frugalserve.kernels import dispatch
from frugalserve.kernels.kv_cache import write_kv_cache
from frugalserve.kernels.reference import gather_paged_kv

requires_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _case(T, num_pages, page, hkv, d, dtype, device, seed, pad=0.3):
    """Random K/V, random caches, and T distinct random slots of which ~pad are -1 (padding)."""
    g = torch.Generator().manual_seed(seed)
    num_pages = max(num_pages, -(-T // page) + 2)  # room for T distinct slots and some never written
    key = torch.randn(T, hkv, d, generator=g).to(device, dtype)
    value = torch.randn(T, hkv, d, generator=g).to(device, dtype)
    k_cache = torch.randn(num_pages, page, hkv, d, generator=g).to(device, dtype)
    v_cache = torch.randn(num_pages, page, hkv, d, generator=g).to(device, dtype)
    slots = torch.randperm(num_pages * page, generator=g)[:T]
    slots[torch.rand(T, generator=g) < pad] = -1
    return key, value, k_cache, v_cache, slots.to(device)


def test_write_kv_cache_roundtrip():
    g = torch.Generator().manual_seed(0)
    page, hkv, d = 4, 2, 32
    kc = torch.randn(6, page, hkv, d, generator=g)
    vc = torch.randn(6, page, hkv, d, generator=g)
    table = torch.tensor([5, 2, 0])
    n = 10
    k = torch.randn(n, hkv, d, generator=g)
    v = torch.randn(n, hkv, d, generator=g)
    pos = torch.arange(n)
    slots = table[pos // page] * page + pos % page
    write_kv_cache(k, v, kc, vc, slots)
    torch.testing.assert_close(gather_paged_kv(kc, table, n), k)
    torch.testing.assert_close(gather_paged_kv(vc, table, n), v)
    write_kv_cache(k[:2] + 7, v[:2], kc, vc, torch.tensor([-1, slots[1]]))  # -1 = padding, skipped
    assert torch.equal(kc.view(-1, hkv, d)[slots[0]], k[0]) and torch.equal(kc.view(-1, hkv, d)[slots[1]], k[1] + 7)
    with pytest.raises(ValueError, match="dtype mismatch"):
        write_kv_cache(k.half(), v.half(), kc, vc, slots)


@requires_triton
@pytest.mark.parametrize("page,hkv,d", [(1, 3, 8), (5, 2, 40), (16, 4, 128), (16, 1, 256), (8, 8, 24)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_kernel_matches_reference(page, hkv, d, dtype, slot_dtype):
    from frugalserve.kernels.kv_cache import write_kv_cache_triton

    key, value, kc, vc, slots = _case(23, 7, page, hkv, d, dtype, "cpu", seed=page * d)
    slots = slots.to(slot_dtype)
    ref_k, ref_v = kc.clone(), vc.clone()
    write_kv_cache(key, value, ref_k, ref_v, slots)
    write_kv_cache_triton(key, value, kc, vc, slots)
    assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)  # a copy: exact
    assert (slots < 0).any() and (slots >= 0).any()


@requires_triton
def test_kernel_strided_inputs_and_out_of_range_slots():
    """K/V as views of a fused QKV projection [T, Hq + 2 Hkv, D]; slots past the cache are skipped."""
    from frugalserve.kernels.kv_cache import write_kv_cache_triton

    g = torch.Generator().manual_seed(3)
    T, hq, hkv, d, page, pages = 9, 4, 2, 48, 4, 5
    qkv = torch.randn(T, hq + 2 * hkv, d, generator=g).half()
    key, value = qkv[:, hq : hq + hkv], qkv[:, hq + hkv :]
    assert not key.is_contiguous()
    kc = torch.randn(pages, page, hkv, d, generator=g).half()
    vc = torch.randn(pages, page, hkv, d, generator=g).half()
    slots = torch.tensor([0, 19, -1, 7, 20, 3, -5, 12, 1000], dtype=torch.int32)
    ref_k, ref_v = kc.clone(), vc.clone()
    keep = (slots >= 0) & (slots < pages * page)
    write_kv_cache(key[keep], value[keep], ref_k, ref_v, slots[keep])
    write_kv_cache_triton(key, value, kc, vc, slots)
    assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)
    write_kv_cache_triton(key[:0], value[:0], kc, vc, slots[:0])  # nothing to write


@requires_triton
def test_kernel_bad_input():
    from frugalserve.kernels.kv_cache import write_kv_cache_triton

    key, value, kc, vc, slots = _case(5, 3, 4, 2, 16, torch.float16, "cpu", seed=1)
    with pytest.raises(ValueError, match="slot_mapping must be int32 or int64"):
        write_kv_cache_triton(key, value, kc, vc, slots.float())
    with pytest.raises(ValueError, match=r"slot_mapping must be \[T=5\]"):
        write_kv_cache_triton(key, value, kc, vc, slots[:4])
    with pytest.raises(ValueError, match="last"):
        write_kv_cache_triton(key.transpose(1, 2).contiguous().transpose(1, 2), value, kc, vc, slots)
    with pytest.raises(ValueError, match="not supported"):
        write_kv_cache_triton(key.double(), value.double(), kc.double(), vc.double(), slots)
    with pytest.raises(ValueError, match="contiguous"):
        write_kv_cache_triton(key, value, kc.transpose(0, 1), vc.transpose(0, 1), slots)


@requires_triton
def test_dispatch_write_kv(monkeypatch):
    """dispatch.write_kv: the reference on CPU, the kernel when forced under the interpreter."""
    key, value, kc, vc, slots = _case(11, 4, 8, 2, 40, torch.float16, "cpu", seed=5)
    ref_k, ref_v = kc.clone(), vc.clone()
    write_kv_cache(key, value, ref_k, ref_v, slots)
    for mode in ("auto", "triton"):
        monkeypatch.setenv(dispatch.ENV, mode)
        assert dispatch.decide("kv-write", "cpu", torch.float16, 40, 2, 2).use_triton is (mode == "triton")
        k2, v2 = kc.clone(), vc.clone()
        dispatch.write_kv(key, value, k2, v2, slots)
        assert torch.equal(k2, ref_k) and torch.equal(v2, ref_v)
