"""The default engine: any Hugging Face causal LM from a local folder, on CPU or GPU.

One `stream_batch` call decodes a batch together: prompts are left-padded, each request keeps
its own `max_tokens`, sampling settings, stop sequences and seed, and every generated token comes
with its log-probability under the model (temperature-free), which the cascade's scorer reads.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from frugalserve.experts.engine import (
    Completion,
    Engine,
    GenerationRequest,
    SamplingParams,
    StreamDelta,
)
from frugalserve.experts.sampling import choose_tokens

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class PromptTooLongError(ValueError):
    """The prompt plus `max_tokens` does not fit the model's context."""


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


@dataclass
class _Row:
    """Decoding state of one request in a batch."""

    request: GenerationRequest
    prompt_ids: list[int]
    generator: torch.Generator | None
    max_tokens: int
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    emitted: int = 0  # characters of text already streamed
    finished: str | None = None  # finish reason once done
    text: str = ""


class TransformersEngine(Engine):
    def __init__(
        self, model, tokenizer, *, max_context: int | None = None, name: str = "",
        default_max_tokens: int = 64,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.name = name or getattr(model.config, "_name_or_path", "model")
        model_limit = _model_context_limit(model.config)
        self._max_context = min(max_context or model_limit, model_limit)
        self.default_max_tokens = default_max_tokens
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.batch_sizes: list[int] = []  # one entry per engine call: how many requests it held
        self.cancelled: set[str] = set()  # request ids whose callers went away
        self.cancelled_total = 0
        self.attention_backend = "transformers"
        self.quantization = "none"
        self.adapters: list[str] = []
        self._lock = asyncio.Lock()
        # transformers 5.2x calls the KV cache `cache`; earlier releases `past_key_values`.
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    @classmethod
    def from_path(
        cls,
        path: str | Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_context: int | None = None,
        name: str = "",
        use_kernels: bool = True,
        default_max_tokens: int = 64,
        quantization: str = "none",
        double_quant: bool = True,
        adapters: dict[str, str | Path] | None = None,
    ) -> TransformersEngine:
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
            from frugalserve.experts.adapters import attach_adapters

            model = attach_adapters(model, path, adapters)
        engine = cls(
            model, tokenizer, max_context=max_context, name=name or path.name,
            default_max_tokens=default_max_tokens,
        )
        engine.quantization = quantization
        engine.adapters = sorted(adapters or {})
        if use_kernels and dev.type == "cuda" and not adapters:
            engine.attention_backend = _enable_kernels(model)
        logger.info(
            "loaded %s from %s on %s in %s (attention: %s)",
            engine.name, path, dev, torch_dtype, engine.attention_backend,
        )
        return engine

    @classmethod
    def from_spec(cls, spec) -> TransformersEngine:
        from frugalserve.experts.spec import resolve_model_path

        return cls.from_path(
            spec.model_path, device=spec.device, dtype=spec.dtype,
            max_context=spec.max_context, name=spec.name,
            default_max_tokens=spec.max_tokens_default,
            quantization=spec.quantization, double_quant=spec.double_quant,
            adapters={n: resolve_model_path(p) for n, p in spec.adapters.items()},
        )

    # -- interface -------------------------------------------------------------------------

    @property
    def max_context(self) -> int:
        return self._max_context

    @property
    def num_parameters(self) -> int:
        """The base model's parameters (LoRA adapters' own weights are not part of its cost)."""
        total = 0
        for name, p in self.model.named_parameters():
            if "lora_" in name:
                continue
            state = getattr(p, "quant_state", None)  # NF4 packs two weights per stored byte
            total += math.prod(state.shape) if state is not None else p.numel()
        return total

    def encode(self, request: GenerationRequest) -> list[int]:
        tok = self.tokenizer
        if request.messages is not None:
            if tok.chat_template is None:
                raise ValueError(f"model {self.name!r} has no chat template; use /v1/completions")
            text = tok.apply_chat_template(
                list(request.messages), add_generation_prompt=True, tokenize=False
            )
            return tok(text, add_special_tokens=False)["input_ids"]
        ids = tok(request.prompt or "", add_special_tokens=False)["input_ids"]
        if tok.bos_token_id is not None:
            ids = [tok.bos_token_id, *ids]
        return ids

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return len(self.encode(request))

    def check_fits(self, request: GenerationRequest, prompt_tokens: int | None = None) -> int:
        """Raise `PromptTooLongError` unless the prompt and the completion fit the context;
        return how many tokens the completion may take."""
        n = self.count_prompt_tokens(request) if prompt_tokens is None else prompt_tokens
        room = self._max_context - n
        asked = request.params.max_tokens
        if asked is None:
            if room < 1:
                raise PromptTooLongError(
                    f"this model's maximum context length is {self._max_context} tokens, but the "
                    f"prompt alone takes {n}; shorten the prompt"
                )
            return min(self.default_max_tokens, room)
        if asked > room:
            raise PromptTooLongError(
                f"this model's maximum context length is {self._max_context} tokens, but the "
                f"request needs {n + asked} ({n} in the prompt + {asked} in max_tokens); "
                "shorten the prompt or lower max_tokens"
            )
        return asked

    async def stream_batch(
        self, requests: Sequence[GenerationRequest]
    ) -> AsyncIterator[list[StreamDelta | None]]:
        rows = [self._new_row(r) for r in requests]
        async with self._lock:  # one batch on the model at a time
            self.batch_sizes.append(len(rows))
            state = await asyncio.to_thread(self._prefill, rows)
            while True:
                deltas = [self._delta(row) for row in rows]
                yield deltas
                for row, d in zip(rows, deltas):
                    if d is not None and d.finish_reason is not None:
                        row.emitted = -1  # reported; stays None from now on
                self._drop_cancelled(rows)
                if all(row.finished for row in rows):
                    return
                state = await asyncio.to_thread(self._decode_step, rows, state)

    def cancel(self, request_id: str) -> None:
        """The caller of `request_id` went away: stop decoding it at the next step."""
        if request_id:
            self.cancelled.add(request_id)

    def _drop_cancelled(self, rows: list[_Row]) -> None:
        for row in rows:
            rid = row.request.request_id
            if rid and rid in self.cancelled:
                self.cancelled.discard(rid)
                if not row.finished:
                    row.finished, row.emitted = "cancelled", -1
                    self.cancelled_total += 1

    # -- decoding --------------------------------------------------------------------------

    def _new_row(self, request: GenerationRequest) -> _Row:
        if request.adapter is not None and request.adapter not in self.adapters:
            raise ValueError(f"model {self.name!r} has no adapter {request.adapter!r}; it has "
                             f"{self.adapters}")
        prompt_ids = self.encode(request)
        max_tokens = self.check_fits(request, len(prompt_ids))
        gen = None
        if request.params.temperature > 0:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(request.params.seed if request.params.seed is not None else
                            int(time.time_ns() % (2**63)))
        return _Row(request, prompt_ids, gen, max_tokens)

    @torch.inference_mode()
    def _prefill(self, rows: list[_Row]):
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
            logits_to_keep=1, **self._adapter_kwargs(rows),
        )
        self._append(rows, out.logits[:, -1, :])
        return _cache_of(out), mask, positions[:, -1]

    @torch.inference_mode()
    def _decode_step(self, rows: list[_Row], state):
        cache, mask, last_pos = state
        next_ids = torch.tensor(
            [r.ids[-1] if not r.finished else self.pad_id for r in rows], device=self.device
        )[:, None]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        positions = (last_pos + 1)[:, None]
        out = self.model(
            input_ids=next_ids, attention_mask=mask, position_ids=positions,
            use_cache=True, **{self._cache_kwarg: cache}, **self._adapter_kwargs(rows),
        )
        self._append(rows, out.logits[:, -1, :])
        return _cache_of(out), mask, positions[:, -1]

    def _adapter_kwargs(self, rows: list[_Row]) -> dict:
        """peft's mixed-batch inference: one adapter name per row, `__base__` for the base."""
        if not self.adapters:
            return {}
        return {"adapter_names": [r.request.adapter or "__base__" for r in rows]}

    def _append(self, rows: list[_Row], logits: torch.Tensor) -> None:
        logits = logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        params = [r.request.params for r in rows]
        chosen = choose_tokens(logits, params, [r.generator for r in rows])
        chosen_lp = logprobs.gather(-1, chosen[:, None])[:, 0].tolist()
        for row, tok, lp in zip(rows, chosen.tolist(), chosen_lp):
            if row.finished:
                continue
            row.ids.append(tok)
            row.logprobs.append(lp)
            self._update_finish(row, tok)

    def _update_finish(self, row: _Row, tok: int) -> None:
        p: SamplingParams = row.request.params
        if tok in self.eos_ids:
            # The eos token counts as generated (and keeps its logprob) but adds no text.
            row.finished = "stop"
            return
        row.text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
        for s in p.stop:
            at = row.text.find(s)
            if at != -1:
                row.text = row.text[:at]
                row.finished = "stop"
                return
        if len(row.ids) >= row.max_tokens:
            row.finished = "length"

    def _delta(self, row: _Row) -> StreamDelta | None:
        if row.emitted < 0:
            return None
        text = row.text
        if not row.finished:
            # Hold back what could still become a stop sequence or a split multibyte character.
            hold = max((len(s) - 1 for s in row.request.params.stop), default=0)
            end = len(text) - hold
            while end > row.emitted and text[end - 1] == "\ufffd":
                end -= 1
            piece = text[row.emitted:max(end, row.emitted)]
            row.emitted += len(piece)
            return StreamDelta(text=piece)
        piece = text[row.emitted:]
        row.emitted = len(text)
        completion = Completion(
            text=text,
            token_ids=tuple(row.ids),
            token_logprobs=tuple(row.logprobs),
            prompt_tokens=len(row.prompt_ids),
            completion_tokens=len(row.ids),
            finish_reason=row.finished,
            token_texts=tuple(self.tokenizer.decode([t]) for t in row.ids),
        )
        return StreamDelta(text=piece, finish_reason=row.finished, completion=completion)

    def memory_stats(self) -> dict[str, float]:
        from frugalserve.experts.quant import weight_bytes

        return {"weight_bytes": float(weight_bytes(self.model))}


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _model_context_limit(config) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, gen_eos):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    if not ids:
        raise ValueError("the model declares no eos token; cannot tell when an answer ends")
    return ids


def _enable_kernels(model) -> str:
    """Run attention in frugalserve's Triton kernels where they support the model."""
    try:
        from frugalserve.kernels import hf
    except Exception as exc:  # kernels are an optional speed-up, never a requirement
        logger.warning("frugalserve kernels unavailable (%s); using transformers attention", exc)
        return "transformers"
    return hf.enable_for_model(model)
