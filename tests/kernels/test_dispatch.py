import logging
import subprocess
import sys

import pytest
import torch
from frugalserve.kernels import dispatch
from frugalserve.kernels.checks import SUPPORTED_HEAD_DIMS


def test_import_without_triton():
    code = ("import sys; sys.modules['triton'] = None; import frugalserve.kernels as k, torch;"
            "from frugalserve.kernels import dispatch; dispatch.triton_import_error.cache_clear();"
            "ok, why = k.choose_backend('cuda'); assert not ok and 'triton' in why, why;"
            "q = torch.randn(1, 3, 2, 64); print(k.attention(q, q, q).shape)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "torch.Size([1, 3, 2, 64])" in res.stdout


def test_cpu_uses_reference(monkeypatch):
    monkeypatch.delenv(dispatch.ENV, raising=False)
    assert dispatch.choose("cpu") == (False, "device is cpu, the Triton kernels need CUDA")
    monkeypatch.setenv(dispatch.ENV, "reference")
    assert dispatch.choose("cuda")[0] is False


def test_unsupported_inputs_fall_back():
    q = torch.randn(1, 2, 2, 50)
    assert "head_dim 50" in dispatch.unsupported_reason(q.half(), q.half())
    assert "dtype" in dispatch.unsupported_reason(q[..., :48], q[..., :48])
    assert dispatch.unsupported_reason(q[..., :48].half(), q[..., :48].half()) is None


def test_supported_head_dims():
    assert SUPPORTED_HEAD_DIMS == tuple(range(8, 257, 8))
    for d in (24, 40, 72, 112, 160, 192, 256):
        assert d in SUPPORTED_HEAD_DIMS


@pytest.fixture
def h200(monkeypatch):
    """dispatch.choose as on a CUDA device of compute capability 9.0 with triton importable."""
    monkeypatch.delenv(dispatch.ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(dispatch, "triton_import_error", lambda: None)


@pytest.mark.parametrize("kernel", dispatch.KERNELS)
def test_decide_on_gpu_says_why(h200, kernel):
    d = dispatch.decide(kernel, "cuda", torch.bfloat16, 128, 32, 8)
    assert d == dispatch.KernelDecision(True, d.reason)
    assert "compute capability 9.0" in d.reason and "head_dim 128, 32/8 heads supported" in d.reason
    odd = dispatch.decide(kernel, "cuda:0", torch.float16, 36, 8, 2)  # not a multiple of 8
    if kernel == "kv-write":  # a copy takes any head dim
        assert odd.use_triton
    else:
        assert not odd.use_triton and "head_dim 36 is not supported" in odd.reason
    fp32 = dispatch.decide(kernel, "cuda", torch.float32, 64, 8, 8)
    assert fp32.use_triton is (kernel == "kv-write")
    with pytest.raises(AttributeError):  # frozen
        d.use_triton = False


def test_decide_layout_limits(h200):
    assert dispatch.decide("decode", "cuda", torch.float16, 64, 128, 1).use_triton  # MQA, 128 heads
    wide = dispatch.decide("decode", "cuda", torch.float16, 64, 64, 1, query_len=4)
    assert not wide.use_triton and "4 query tokens x 64 query heads per KV head > 128" in wide.reason
    assert dispatch.decide("prefill", "cuda", torch.float16, 64, 64, 1).use_triton  # prefill splits groups
    # paged prefill: any number of query tokens, groups split in chunks of 16 heads
    assert dispatch.decide("paged-prefill", "cuda", torch.bfloat16, 64, 64, 1, query_len=4096).use_triton
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        dispatch.decide("prefill", "cuda", torch.float16, 64, 6, 4)
    with pytest.raises(ValueError, match="unknown kernel"):
        dispatch.decide("attention", "cuda", torch.float16, 64, 8, 2)


def test_decide_before_any_tensor(monkeypatch):
    """Device and environment first: CPU, a forced reference, a forced interpreter."""
    monkeypatch.delenv(dispatch.ENV, raising=False)
    cpu = dispatch.decide("prefill", "cpu", torch.float16, 64, 8, 2)
    assert cpu == dispatch.KernelDecision(False, "device is cpu, the Triton kernels need CUDA")
    monkeypatch.setenv(dispatch.ENV, "reference")
    assert dispatch.decide("kv-write", "cuda", torch.float16, 64, 8, 2).reason == f"{dispatch.ENV}=reference"
    monkeypatch.setenv(dispatch.ENV, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.decide("decode", "cpu", torch.float16, 40, 4, 4).use_triton
    assert not dispatch.decide("decode", "cpu", torch.float16, 264, 4, 4).use_triton
    monkeypatch.setattr(dispatch, "triton_import_error", lambda: "triton is not importable (x)")
    assert dispatch.decide("decode", "cuda", torch.float16, 40, 4, 4).reason == "triton is not importable (x)"


def test_per_call_decision_is_decide(monkeypatch, caplog):
    """use_triton_for logs the same decision decide gives for the tensors' layout."""
    monkeypatch.setenv(dispatch.ENV, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(dispatch, "_logged", set())
    caplog.set_level(logging.INFO, logger="frugalserve.kernels")
    q, k = torch.empty(1, 3, 12, 72, dtype=torch.bfloat16), torch.empty(1, 3, 4, 72, dtype=torch.bfloat16)
    assert dispatch.use_triton_for(q, k, "prefill attention")
    expected = dispatch.decide("prefill", "cpu", torch.bfloat16, 72, 12, 4)
    assert f"prefill attention: triton ({expected.reason})" in caplog.text
    q64 = torch.empty(1, 3, 64, 72, dtype=torch.bfloat16)
    assert not dispatch.use_triton_for(q64, k[:, :, :1], "paged decode attention", kernel="decode")
    assert "paged decode attention: reference (unsupported input: 3 query tokens" in caplog.text
    assert not dispatch.use_triton_for(q, k.half(), "prefill attention")
