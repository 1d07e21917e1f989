"""Structured output (`response_format` json_object / json_schema) through xgrammar.

xgrammar compiles a JSON grammar (or a JSON schema) against the tokenizer's vocabulary once per
engine and schema; each request gets a matcher that says which tokens may come next (a bitmask
over the vocabulary) and advances with every token chosen. The matcher allows the end tokens
only once the JSON is complete.

xgrammar is imported lazily: the GPU image carries no structured-output library, and an engine
without it refuses such requests with a clear 400 (`UnsupportedFeatureError`) instead of failing
to start.
"""

from __future__ import annotations

import functools
import importlib.util
import threading
from typing import Any

import torch
from frugalserve.experts.engine import Guide, UnsupportedFeatureError

LIBRARY = "xgrammar"


def missing_reason() -> str | None:
    """Why structured output is unavailable here, or None when it is available."""
    try:
        found = importlib.util.find_spec(LIBRARY) is not None
    except ValueError:  # in sys.modules as None: blocked, as if not installed
        found = False
    if not found:
        return (f"structured output needs the `{LIBRARY}` package, which this replica lacks "
                f"(`pip install {LIBRARY}`)")
    return None


class Grammars:
    """One engine's grammar compiler: compiled grammars are cached per guide."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: frozenset[int]):
        self.tokenizer, self.vocab_size, self.stop_ids = tokenizer, vocab_size, stop_ids
        self._compiler: Any = None
        self._lock = threading.Lock()

    def check(self, guide: Guide, expert: str) -> None:
        """Raise `UnsupportedFeatureError` (param `response_format`) if `guide` cannot be served."""
        reason = missing_reason()
        if reason is not None:
            raise UnsupportedFeatureError(f"expert {expert!r}: {reason}", "response_format")
        try:
            self._compiled(guide)
        except UnsupportedFeatureError:
            raise
        except Exception as exc:  # noqa: BLE001 - xgrammar's message names what it cannot compile
            raise UnsupportedFeatureError(f"expert {expert!r} cannot compile this json_schema: "
                                          f"{exc}", "response_format") from None

    def matcher(self, guide: Guide) -> Matcher:
        return Matcher(self._compiled(guide), self.vocab_size)

    def _compiled(self, guide: Guide):
        return self._compile(guide.kind, guide.schema)

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one Grammars per engine, kept for its life
    def _compile(self, kind: str, schema: str | None):
        import xgrammar as xgr  # optional: see missing_reason

        with self._lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=sorted(self.stop_ids))
                self._compiler = xgr.GrammarCompiler(info)
            # json_object is OpenAI's "a JSON object", not any JSON value
            return self._compiler.compile_json_schema(
                schema if kind == "json_schema" and schema is not None else '{"type": "object"}',
                any_whitespace=False)


class Matcher:
    """One request's place in its grammar."""

    def __init__(self, compiled, vocab_size: int):
        import xgrammar as xgr  # optional: see missing_reason

        self._xgr = xgr
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits of tokens the grammar forbids next to -inf, in place ([vocab])."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        row = logits[None]
        self._xgr.apply_token_bitmask_inplace(row, self.bitmask.to(logits.device))

    def accept(self, token: int) -> None:
        if not self.matcher.is_terminated():
            self.matcher.accept_token(token)
