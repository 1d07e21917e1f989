import subprocess
import sys

import torch
from frugalserve.kernels import dispatch


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
    q = torch.randn(1, 2, 2, 48)
    assert "head_dim 48" in dispatch.unsupported_reason(q.half(), q.half())
    assert "dtype" in dispatch.unsupported_reason(q, q)
