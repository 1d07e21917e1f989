"""Shared fixtures for the kernel tests.

On a machine without CUDA the Triton kernels run under the interpreter (TRITON_INTERPRET=1, set
here before any kernel module is imported), on small shapes and float16 only: the interpreter's
tl.dot on bfloat16 operands returns garbage. GPU variants carry @pytest.mark.gpu.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:
    HAS_TRITON = False

# Kernel output vs the float32 reference on the same inputs, |out - ref| <= atol + rtol * |ref|.
TOLERANCES = {
    # fp16 keeps 11 bits: the output's own rounding is <= 4.9e-4 at |x| ~ 1, and the kernel rounds the
    # softmax probabilities to fp16 before the P@V product, so twice that plus accumulation-order noise.
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    # bf16 keeps 8 bits: rounding of the output alone is up to 3.9e-3 at |x| ~ 1, P is rounded to bf16
    # before P@V (another ~4e-3 relative per term, averaging out over keys): 1.6e-2 leaves headroom
    # without hiding an indexing error, whose effect is O(1).
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}

# Model logits (tiny random models) of our path vs transformers' own path, float32 on CPU: both are
# float32 softmax attention with a different summation order, ~1e-6 observed; 1e-4 is the bound.
MODEL_ATOL_FP32 = 1e-4



def _assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert not torch.isnan(out).any(), "NaN in kernel output"
    torch.testing.assert_close(out.float(), ref.float(), **TOLERANCES[dtype])


@pytest.fixture
def assert_close():
    """assert_close(out, ref, dtype): kernel output against the reference with TOLERANCES[dtype]."""
    return _assert_close


@pytest.fixture
def tolerances() -> dict:
    """TOLERANCES itself: two kernels each within it of the reference may be twice apart."""
    return TOLERANCES


@pytest.fixture
def model_atol() -> float:
    return MODEL_ATOL_FP32


@pytest.fixture
def interp_device() -> str:
    """Device for kernel-vs-reference tests: CUDA where present, else CPU under the interpreter."""
    return "cuda" if HAS_CUDA else "cpu"
