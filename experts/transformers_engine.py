"""The plain transformers engine: any Hugging Face causal LM from a local folder, one static
batch at a time.

It is the fallback for what the continuous-batching paged engine (experts/paged/) does not run:
model families it has no paged implementation for, LoRA adapters mixed in one batch (peft's
`adapter_names`), and engines asked for with `engine.scheduler.continuous: off`. One `stream_batch` call
decodes a batch together: prompts are left-padded, each request keeps its own `max_tokens`,
sampling settings, stop sequences and seed, and every generated token comes with its
log-probability under the model (temperature-free), which the cascade's scorer reads.

`load_model` (device, dtype, quantization, adapters) is shared with the paged engine.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from frugalserve.experts.engine import Admission, Engine, EngineInfo, SamplingParams, StreamDelta
from frugalserve.experts.engine_config import DEFAULT_MAX_TOKENS, DEFAULT_MEMORY_FRACTION
from frugalserve.experts.memory import TokenLedger, profile_model
from frugalserve.experts.output import Choices, eos_token_ids, token_finish
from frugalserve.experts.sampling import RowState, check_params, choose_tokens, row_state
from frugalserve.experts.structured import Grammars

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on GPUs that support it, float16 on older GPUs, float32 on CPU."""
    if dtype != "auto":
        return _DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_model(path: str | Path, *, device: str = "auto", dtype: str = "auto",
               quantization: str = "none", double_quant: bool = True,
               adapters: dict[str, str | Path] | None = None):
    """(model, tokenizer) from a Hugging Face folder, on `device`, quantized and with LoRA
    adapters attached as asked."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no Hugging Face model at {str(path)!r} (config.json missing)")
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if quantization == "none":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(dev)
    else:
        from frugalserve.experts.quant import check_cpu_4bit, quantization_config

        if quantization == "nf4" and dev.type == "cpu":
            check_cpu_4bit(path)
        config = quantization_config(quantization, double_quant, torch_dtype)
        model = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=config, dtype=torch_dtype,
            device_map={"": dev.index or 0} if dev.type == "cuda" else {"": "cpu"})
    if adapters:
        from frugalserve.experts.adapters import attach_adapters  # peft: optional extra

        model = attach_adapters(model, path, adapters)
    return model.eval(), tokenizer


def model_parameters(model) -> int:
    """The base model's parameters (LoRA adapters' own weights are not part of its cost)."""
    total = 0
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        state = getattr(p, "quant_state", None)  # NF4 packs two weights per stored byte
        total += math.prod(state.shape) if state is not None else p.numel()
    return total


def model_context_limit(config) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


@dataclass
class _Row:
    """Decoding state of one choice of one request in a static batch (n rows per request)."""

    admission: Admission
    choices: Choices  # shared by the request's rows
    index: int  # which choice this row is
    params: SamplingParams
    state: RowState | None
    ids: list[int]  # prompt + generated (the sampler's penalties read it)
    last: int = 0  # the last token generated
    done: bool = False  # finished and reported

    @property
    def generated(self) -> int:
        return len(self.ids) - len(self.admission.prompt_ids)


class TransformersEngine(Engine):
    batches_itself = False

    def __init__(self, model, tokenizer, *, max_context: int | None = None, name: str = "",
                 default_max_tokens: int = DEFAULT_MAX_TOKENS, quantization: str = "none",
                 adapters: Sequence[str] = (), use_kernels: bool = False,
                 memory_fraction: float = DEFAULT_MEMORY_FRACTION, memory_budget_bytes: int | None = None,
                 profile_memory: bool = True, static_reason: str = ""):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.name = name or getattr(model.config, "_name_or_path", "model")
        limit = model_context_limit(model.config)
        self._max_context = min(max_context or limit, limit)
        self.default_max_tokens = default_max_tokens
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)
        self.quantization = quantization
        self.adapters = tuple(sorted(adapters))
        self.num_parameters = model_parameters(model)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.grammars = Grammars(tokenizer, self.vocab_size, self.eos_ids)
        self.static_reason = static_reason  # why this model is not on the paged engine
        self.batch_sizes: list[int] = []  # one entry per engine call: how many requests it held
        self.cancelled: set[str] = set()  # request ids whose callers went away
        self.cancelled_total = 0
        self._lock = asyncio.Lock()
        # transformers 5.2x calls the KV cache `cache`; earlier releases `past_key_values`.
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.attention = {"attention": "transformers (kernels not enabled)"}
        if use_kernels:
            self.attention = {"attention": _enable_kernels(model)}
        self._profile = None
        self.ledger: TokenLedger | None = None
        if profile_memory:
            self._profile = profile_model(model, memory_fraction=memory_fraction,
                                          memory_budget_bytes=memory_budget_bytes, name=self.name)
            self.ledger = TokenLedger.for_profile(self._profile)

    @classmethod
    def from_path(cls, path: str | Path, *, device: str = "auto", dtype: str = "auto",
                  max_context: int | None = None, name: str = "", use_kernels: bool = True,
                  default_max_tokens: int = DEFAULT_MAX_TOKENS, quantization: str = "none",
                  double_quant: bool = True, adapters: dict[str, str | Path] | None = None,
                  **kwargs) -> TransformersEngine:
        model, tokenizer = load_model(path, device=device, dtype=dtype, quantization=quantization,
                                      double_quant=double_quant, adapters=adapters)
        dev = next(model.parameters()).device
        engine = cls(model, tokenizer, max_context=max_context, name=name or Path(path).name,
                     default_max_tokens=default_max_tokens, quantization=quantization,
                     adapters=list(adapters or {}),
                     use_kernels=use_kernels and dev.type == "cuda" and not adapters, **kwargs)
        logger.info("loaded %s from %s on %s in %s (attention: %s)", engine.name, path, dev,
                    next(model.parameters()).dtype, engine.attention)
        return engine

    # -- contract --------------------------------------------------------------------------

    @property
    def max_context(self) -> int:
        return self._max_context

    def info(self) -> EngineInfo:
        p = next(self.model.parameters())
        return EngineInfo(
            name=self.name, engine="transformers", batching="static", device=str(self.device),
            dtype=str(p.dtype).removeprefix("torch."), num_parameters=self.num_parameters,
            max_context=self._max_context, default_max_tokens=self.default_max_tokens,
            attention=dict(self.attention), quantization=self.quantization,
            adapters=self.adapters,
            details={"static_batching_reason": self.static_reason} if self.static_reason else {},
        )

    def admit(self, request) -> Admission:
        admission = super().admit(request)
        check_params(request.params, self.vocab_size, self.grammars, self.name)
        if self.ledger is not None:  # queued until its batch starts
            self.ledger.add(id(admission), len(admission.prompt_ids))
        return admission

    def release(self, admission: Admission) -> None:
        if self.ledger is not None:  # a running batch keeps its rows until it ends
            self.ledger.release_if_queued(id(admission))

    def cancel(self, request_id: str) -> None:
        """The caller of `request_id` went away: stop decoding it at the next step."""
        if request_id:
            self.cancelled.add(request_id)

    def stats(self) -> dict:
        return {"batch_sizes": list(self.batch_sizes), "cancelled": self.cancelled_total,
                "tokens": self.ledger.snapshot() if self.ledger is not None else None}

    def memory_profile(self):
        return self._profile

    def load_stats(self) -> dict[str, float]:
        return self.ledger.autoscaling_stats() if self.ledger is not None else {}

    def weight_bytes(self) -> float:
        from frugalserve.experts.memory import weight_bytes

        return float(weight_bytes(self.model))

    def _rows(self, admissions: Sequence[Admission]) -> list[_Row]:
        """n rows per request (one per choice), the choices of a request side by side."""
        rows = []
        for a in admissions:
            choices = Choices(self.tokenizer, a)
            for k in range(a.request.params.n):
                params = a.request.params.for_choice(k)
                ids = list(a.prompt_ids)
                state = row_state(params, ids, len(ids), self.grammars, self.device)
                rows.append(_Row(a, choices, k, params, state, ids))
        return rows

    async def stream_batch(self, admissions: Sequence[Admission]) -> AsyncIterator[list[StreamDelta | None]]:
        rows = self._rows(admissions)
        keys, ledger = [id(a) for a in admissions], self.ledger
        async with self._lock:  # one batch on the model at a time
            self.batch_sizes.append(len(rows))
            if ledger is not None:
                ledger.start(keys)
            try:
                state = await asyncio.to_thread(self._prefill, rows)
                while True:
                    deltas = await asyncio.to_thread(self._sample, rows, state[-1])
                    for step in self._per_request(admissions, rows, deltas):
                        if ledger is not None:
                            for key, d in zip(keys, step):
                                if d is not None:
                                    ledger.advance(key)
                        yield step
                    self._drop_cancelled(rows)
                    if all(row.done for row in rows):
                        return
                    state = await asyncio.to_thread(self._decode_step, rows, state)
            finally:
                if ledger is not None:  # the batch's cache is freed now, finished rows included
                    for key in keys:
                        ledger.release(key)

    @staticmethod
    def _per_request(admissions: Sequence[Admission], rows: list[_Row],
                     deltas: list[StreamDelta | None]) -> list[list[StreamDelta | None]]:
        """The contract's lists (one slot per request) from one step's row deltas: with n > 1
        choices, one list per choice index; a finished request's slot is None."""
        width = max(a.request.params.n for a in admissions)
        out: list[list[StreamDelta | None]] = [[None] * len(admissions) for _ in range(width)]
        slot = {id(a): i for i, a in enumerate(admissions)}
        choices: dict[int, Choices] = {}
        for row, delta in zip(rows, deltas):
            i = slot[id(row.admission)]
            choices[i] = row.choices
            out[row.index][i] = delta
        for i, c in choices.items():
            final = next((k for k in range(width) if (d := out[k][i]) is not None
                          and d.completion is not None), None)
            for k in range(width):
                if out[k][i] is None and not c.reported and (final is None or k < final):
                    out[k][i] = StreamDelta(text="")
            c.reported = c.reported or final is not None
        return out

    def _drop_cancelled(self, rows: list[_Row]) -> None:
        for row in rows:
            rid = row.admission.request.request_id
            if rid and rid in self.cancelled:
                self.cancelled.discard(rid)
                if not row.done:
                    row.done = True
                    self.cancelled_total += 1

    # -- decoding --------------------------------------------------------------------------

    @torch.inference_mode()
    def _prefill(self, rows: list[_Row]):
        width = max(len(r.admission.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r.admission.prompt_ids)
            ids[i, width - n:] = torch.tensor(r.admission.prompt_ids)
            mask[i, width - n:] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **self._adapter_kwargs(rows))
        return _cache_of(out), mask, positions[:, -1], out.logits[:, -1, :]

    @torch.inference_mode()
    def _decode_step(self, rows: list[_Row], state):
        cache, mask, last_pos, _ = state
        next_ids = torch.tensor([r.last if not r.done else self.pad_id for r in rows],
                                device=self.device)[:, None]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        positions = (last_pos + 1)[:, None]
        out = self.model(input_ids=next_ids, attention_mask=mask, position_ids=positions,
                         use_cache=True, **{self._cache_kwarg: cache}, **self._adapter_kwargs(rows))
        return _cache_of(out), mask, positions[:, -1], out.logits[:, -1, :]

    def _adapter_kwargs(self, rows: list[_Row]) -> dict:
        """peft's mixed-batch inference: one adapter name per row, `__base__` for the base."""
        if not self.adapters:
            return {}
        return {"adapter_names": [r.admission.request.adapter or "__base__" for r in rows]}

    @torch.inference_mode()
    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> list[StreamDelta | None]:
        """Choose each live row's next token and turn it into that row's delta."""
        logits = logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        live = [r for r in rows if not r.done]  # finished rows are not sampled (nor their grammar)
        at = [i for i, r in enumerate(rows) if not r.done]
        deltas: list[StreamDelta | None] = [None] * len(rows)
        if not live:
            return deltas
        logits = logits[at]
        chosen = choose_tokens(logits, [r.params for r in live], [r.state for r in live],
                               [self._suppressed(r) for r in live])
        chosen_lp = logprobs[at].gather(-1, chosen[:, None])[:, 0].tolist()
        for i, row, tok, lp in zip(at, live, chosen.tolist(), chosen_lp):
            row.last = tok
            row.ids.append(tok)
            finish = token_finish(tok, row.generated, row.admission.max_tokens, self.eos_ids,
                                  row.params)
            top = row.state.top[-1:] if row.state is not None and row.state.top else ()
            delta = row.choices.add(row.index, [tok], [lp], finish, top)
            if row.choices.outs[row.index].finished:
                row.done = True
            deltas[i] = delta if delta is not None else StreamDelta(text="", index=row.index)
        return deltas

    def _suppressed(self, row: _Row) -> tuple[int, ...]:
        p = row.params
        if row.done or row.generated >= p.min_tokens:
            return ()
        return tuple(p.stop_token_ids) + (() if p.ignore_eos else tuple(self.eos_ids))


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _enable_kernels(model) -> str:
    """Run attention in frugalserve's Triton kernels where they support the model."""
    try:
        from frugalserve.kernels import hf  # triton may be missing: kernels are optional
    except Exception as exc:  # kernels are an optional speed-up, never a requirement
        logger.warning("frugalserve kernels unavailable (%s); using transformers attention", exc)
        return f"transformers (frugalserve kernels unavailable: {exc})"
    return hf.enable_for_model(model)
