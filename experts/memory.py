"""Memory per token of one expert replica: measured at replica start, tracked while it serves.

`profile_model` answers, for a loaded transformers model: how many bytes the weights take (from
the real parameters and buffers, so quantized weights count as stored), how many bytes of KV cache
one token costs (analytically from the config, and measured from the cache a real forward pass
builds), the activation overhead per token in flight, and how many bytes the replica may use for
tokens (device total × fraction − weights). `TokenLedger` counts the tokens a replica holds
(prompt + generated so far, for every running and queued request) and turns them into bytes; the
expert deployment reports its `stats()` to Serve's autoscaler (`cluster/autoscaling.py`).
"""

from __future__ import annotations

import gc
import math
import os
import threading
from dataclasses import asdict, dataclass
from typing import Any

from frugalserve.experts.engine_config import DEFAULT_MEMORY_FRACTION

# Names of the autoscaling metrics an expert replica reports (`record_autoscaling_stats`).
# cluster/autoscaling.py is cloudpickled into Serve's controller and imports only the stdlib, so it
# repeats these strings; tests/cluster/test_autoscaling.py checks the two agree.
BYTES_IN_USE = "frugalserve_bytes_in_use"
USABLE_BYTES = "frugalserve_usable_bytes"
TOKENS_IN_FLIGHT = "frugalserve_tokens_in_flight"
REQUESTS_IN_FLIGHT = "frugalserve_requests_in_flight"
KV_BYTES_PER_TOKEN = "frugalserve_kv_bytes_per_token"

_ACT_BYTES_WORKING_SET = 4  # activations of one layer live at once: hidden in/out, q|k|v, mlp


class InsufficientMemoryError(ValueError):
    """The weights leave no memory for the KV cache under the configured budget."""


@dataclass(frozen=True)
class KVShape:
    """What one token stores in the KV cache, from the model config."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    def bytes_per_token(self, dtype_bytes: int) -> int:
        return self.num_layers * self.num_kv_heads * self.head_dim * 2 * dtype_bytes  # 2: K and V


def kv_shape(config: Any) -> KVShape:
    """Layers, KV heads and head size of a Hugging Face config (object or dict).

    Llama-style configs name the KV heads `num_key_value_heads` (GQA; absent means MHA). Falcon
    names them `num_kv_heads` and keeps them only with `new_decoder_architecture` or without
    `multi_query`; the old multi-query Falcon (7B/40B-instruct era) caches one KV head.
    """
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    layers = _first(get, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first(get, "num_attention_heads", "n_head", "num_heads")
    hidden = _first(get, "hidden_size", "n_embd", "d_model")
    if layers is None or heads is None or hidden is None:
        raise ValueError("config lacks num_hidden_layers / num_attention_heads / hidden_size")
    head_dim = get("head_dim") or hidden // heads
    if get("model_type") == "falcon" or get("num_kv_heads") is not None:
        if get("new_decoder_architecture") or not get("multi_query", True):
            kv = get("num_kv_heads") or heads
        else:
            kv = 1
    else:
        kv = get("num_key_value_heads") or (1 if get("multi_query") else heads)
    if heads % kv:
        raise ValueError(f"num_attention_heads {heads} is not a multiple of KV heads {kv}")
    return KVShape(int(layers), int(kv), int(head_dim))


def _first(get, *keys):
    for key in keys:
        value = get(key)
        if value is not None:
            return value
    return None


@dataclass(frozen=True)
class MemoryProfile:
    """Memory facts of one replica, in bytes.

    A request in flight holds `kv_bytes_per_token` for each of its tokens (prompt + generated so
    far) and, while its batch runs, about `activation_bytes_per_token` for the token it is
    decoding: activations are transient and scale with the tokens of one forward pass, not with
    the cache.
    """

    model: str
    device: str
    dtype: str
    weight_bytes: int  # parameters + buffers as stored (quantized weights count as quantized)
    num_layers: int
    num_kv_heads: int
    head_dim: int
    kv_bytes_per_token_analytic: int  # layers × kv_heads × head_dim × 2 × dtype bytes
    kv_bytes_per_token_measured: float | None  # from the cache of a real forward pass
    kv_measure_method: str  # "cache-tensors", "cuda-allocated" or "not measured"
    kv_layout_factor: float  # measured / analytic: > 1 when the implementation caches more
    activation_bytes_per_token: float
    activation_method: str  # "cuda-peak" (measured) or "estimate" (one layer's working set)
    kv_bytes_per_token: float  # what the autoscaler charges per cached token: measured if known
    total_bytes: int  # device memory, the configured budget, or the machine's RAM
    total_source: str  # "cuda", "budget" or "ram"
    memory_fraction: float
    usable_bytes: int  # total × fraction − weights: what tokens in flight may take
    token_capacity: int  # usable_bytes // kv_bytes_per_token
    kv_cache_dtype: str = ""  # what the KV cache stores: `dtype`, or float8_e4m3fn (1 byte per element)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def weight_bytes(model) -> int:
    """Bytes of parameters and buffers as stored (shared, tied tensors count once), plus the
    quantization constants bitsandbytes keeps beside packed 4-bit weights."""
    seen: set[int] = set()
    total = 0
    for t in (*model.parameters(), *model.buffers()):
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None:
            continue
        for t in (getattr(state, "absmax", None),
                  getattr(getattr(state, "state2", None), "absmax", None)):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


def cache_bytes(cache: Any) -> int:
    """Bytes held by the tensors of a KV cache object (DynamicCache, tuples of tensors, ...)."""
    import torch

    seen: set[int] = set()
    total = 0
    stack, visited = [cache], set()
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen and storage.nbytes():
                seen.add(storage.data_ptr())
                total += storage.nbytes()
            continue
        if id(obj) in visited or isinstance(obj, (str, bytes, int, float, bool, type(None))):
            continue
        visited.add(id(obj))
        if isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    return total


def measure_kv_bytes_per_token(
    model, *, tokens: tuple[int, int] = (16, 48), batch: int = 2
) -> tuple[float, str, float | None]:
    """Run two real forward passes (caches of `tokens[0]` and `tokens[1]` tokens per row) and
    return (KV bytes per token, method, activation bytes per token or None).

    The difference between the two caches divided by the extra tokens cancels any fixed part. On
    CUDA the allocator's view is used as well: the bytes the retained cache adds and the peak
    above it (activations); on CPU the cache tensors' storage is the measurement.
    """
    import torch

    device = next(model.parameters()).device
    vocab = int(getattr(model.config, "vocab_size", 2) or 2)
    cuda = device.type == "cuda"
    sizes, allocated, peaks = [], [], []
    for n in tokens:
        gen = torch.Generator().manual_seed(n)
        ids = torch.randint(1, max(2, vocab - 1), (batch, n), generator=gen).to(device)
        gc.collect()
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        with torch.inference_mode():
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache = getattr(out, "cache", None)
        cache = cache if cache is not None else out.past_key_values
        del out
        sizes.append(cache_bytes(cache))
        if cuda:
            torch.cuda.synchronize(device)
            held = torch.cuda.memory_allocated(device) - before
            allocated.append(held)
            peaks.append(torch.cuda.max_memory_allocated(device) - before - held)
        del cache
    extra = batch * (tokens[1] - tokens[0])
    per_token = (sizes[1] - sizes[0]) / extra
    if not cuda:
        return per_token, "cache-tensors", None
    measured = (allocated[1] - allocated[0]) / extra
    # The caching allocator rounds blocks up; trust the tensors when the two disagree by > 10 %.
    method = "cuda-allocated" if abs(measured - per_token) <= 0.1 * per_token else "cache-tensors"
    value = measured if method == "cuda-allocated" else per_token
    activation = max(0.0, peaks[1] / (batch * tokens[1]))
    return value, method, activation


def estimate_activation_bytes_per_token(config: Any, dtype_bytes: int) -> float:
    """One decoder layer's working set per token (layers run one after another): hidden states in
    and out, q/k/v and the MLP's intermediate activations."""
    hidden = getattr(config, "hidden_size", 0) or 0
    inter = getattr(config, "intermediate_size", None) or getattr(config, "ffn_hidden_size", None)
    inter = inter or 4 * hidden
    return float((_ACT_BYTES_WORKING_SET * hidden + 2 * inter) * dtype_bytes)


def device_total_bytes(device, memory_budget_bytes: int | None = None) -> tuple[int, str]:
    """The memory a replica's device has: the configured budget if any, the CUDA device's total,
    or the machine's RAM on CPU."""
    if memory_budget_bytes:
        return int(memory_budget_bytes), "budget"
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        _, total = torch.cuda.mem_get_info(device)
        return int(total), "cuda"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "ram"


def profile_model(
    model,
    *,
    memory_fraction: float = DEFAULT_MEMORY_FRACTION,
    memory_budget_bytes: int | None = None,
    measure: bool = True,
    name: str = "",
) -> MemoryProfile:
    """Profile a loaded model (call once at replica start, before serving)."""
    if not 0 < memory_fraction <= 1:
        raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    compute_dtype = dtype if dtype.is_floating_point else _compute_dtype(model)
    dtype_bytes = compute_dtype.itemsize  # the KV cache is kept in the compute dtype
    shape = kv_shape(model.config)
    analytic = shape.bytes_per_token(dtype_bytes)
    measured, method, activation = (None, "not measured", None)
    if measure:
        measured, method, activation = measure_kv_bytes_per_token(model)
    act_method = "cuda-peak" if activation is not None else "estimate"
    if activation is None:
        activation = estimate_activation_bytes_per_token(model.config, dtype_bytes)
    kv = measured if measured else float(analytic)
    weights = weight_bytes(model)
    total, source = device_total_bytes(device, memory_budget_bytes)
    usable = int(total * memory_fraction) - weights
    if usable <= 0:
        raise InsufficientMemoryError(
            f"{name or 'model'}: weights take {weights} bytes, more than the {int(total * memory_fraction)}"
            f" bytes the replica may use ({source} {total} × memory_fraction {memory_fraction}); "
            "raise the memory budget or the fraction, or quantize the weights"
        )
    return MemoryProfile(
        model=name or str(getattr(model.config, "_name_or_path", "")),
        device=str(device),
        dtype=str(compute_dtype).removeprefix("torch."),
        weight_bytes=weights,
        num_layers=shape.num_layers,
        num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        kv_bytes_per_token_analytic=analytic,
        kv_bytes_per_token_measured=measured,
        kv_measure_method=method,
        kv_layout_factor=round(kv / analytic, 4),
        activation_bytes_per_token=activation,
        activation_method=act_method,
        kv_bytes_per_token=kv,
        total_bytes=total,
        total_source=source,
        memory_fraction=memory_fraction,
        usable_bytes=usable,
        token_capacity=int(usable // kv),
        kv_cache_dtype=str(compute_dtype).removeprefix("torch."),
    )


def _compute_dtype(model):
    import torch

    for p in model.parameters():
        if p.dtype.is_floating_point:
            return p.dtype
    return torch.float16


@dataclass
class _Entry:
    prompt: int
    generated: int = 0
    running: bool = False


class TokenLedger:
    """Tokens a replica holds: prompt + generated so far, per request, running or queued.

    Keys are any hashable per-request handle (the deployment uses the request object's id while
    it lives). A request is added when it arrives (`add`, queued), marked running when its batch
    starts (`start`), advanced per generated token (`advance`) and released when the engine frees
    its cache (`release`; for a padded batch that is when the whole batch ends).

    Bytes in use = tokens in flight × KV bytes per token + running requests × activation bytes
    per token (one token per request in the forward pass while decoding). Queued requests are
    counted too: they will need their prompt's cache as soon as their batch starts. Safe to call
    from the replica's event loop and from a metrics thread at once.
    """

    def __init__(
        self, kv_bytes_per_token: float, usable_bytes: int = 0,
        activation_bytes_per_token: float = 0.0,
    ):
        if kv_bytes_per_token <= 0:
            raise ValueError(f"kv_bytes_per_token must be > 0, got {kv_bytes_per_token}")
        self.kv_bytes_per_token = float(kv_bytes_per_token)
        self.activation_bytes_per_token = float(activation_bytes_per_token)
        self.usable_bytes = int(usable_bytes)
        self._entries: dict[Any, _Entry] = {}
        self._lock = threading.Lock()
        self.peak_tokens = 0

    @classmethod
    def for_profile(cls, profile: MemoryProfile) -> TokenLedger:
        return cls(profile.kv_bytes_per_token, profile.usable_bytes,
                   profile.activation_bytes_per_token)

    def add(self, key: Any, prompt_tokens: int) -> None:
        with self._lock:
            self._entries[key] = _Entry(int(prompt_tokens))
            self._note_peak()

    def start(self, keys) -> None:
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                if entry is not None:
                    entry.running = True

    def advance(self, key: Any, tokens: int = 1) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.generated += tokens
                self._note_peak()

    def release(self, key: Any) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def release_if_queued(self, key: Any) -> None:
        """For a request that leaves before its batch started (cancelled, rejected)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and not entry.running:
                del self._entries[key]

    def _note_peak(self) -> None:
        self.peak_tokens = max(self.peak_tokens, self._tokens())

    def _tokens(self, running: bool | None = None) -> int:
        return sum(e.prompt + e.generated for e in self._entries.values()
                   if running is None or e.running == running)

    @property
    def tokens_in_flight(self) -> int:
        with self._lock:
            return self._tokens()

    @property
    def bytes_in_use(self) -> float:
        return float(self.snapshot()["bytes_in_use"])

    def snapshot(self) -> dict[str, float]:
        """Everything at one instant, for the info endpoint and metrics."""
        with self._lock:
            running, queued = self._tokens(True), self._tokens(False)
            n_running = sum(e.running for e in self._entries.values())
            n = len(self._entries)
        tokens = running + queued
        in_use = tokens * self.kv_bytes_per_token + n_running * self.activation_bytes_per_token
        return {
            "tokens_in_flight": tokens,
            "running_tokens": running,
            "queued_tokens": queued,
            "requests_in_flight": n,
            "running_requests": n_running,
            "queued_requests": n - n_running,
            "bytes_in_use": in_use,
            "usable_bytes": self.usable_bytes,
            "utilisation": in_use / self.usable_bytes if self.usable_bytes else math.nan,
            "peak_tokens": self.peak_tokens,
        }

    def autoscaling_stats(self) -> dict[str, float]:
        """The dict `record_autoscaling_stats` returns (floats only, as Serve requires)."""
        snap = self.snapshot()
        return {
            BYTES_IN_USE: float(snap["bytes_in_use"]),
            USABLE_BYTES: float(self.usable_bytes),
            TOKENS_IN_FLIGHT: float(snap["tokens_in_flight"]),
            REQUESTS_IN_FLIGHT: float(snap["requests_in_flight"]),
            KV_BYTES_PER_TOKEN: self.kv_bytes_per_token,
        }
