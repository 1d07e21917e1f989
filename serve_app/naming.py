"""Routing chosen from the `model` name, for clients that can set nothing else (most UIs and SDK
configs), like RouteLLM's `router-mf-0.116`:

    POLICY[:KEY=VALUE[,KEY=VALUE...]]     e.g.  cascade:budget=0.02   cascade:start_tier=1,max_tier=2

KEY is one of `budget` (cost units), `max_tier` and `start_tier` (cascade tier indices) — the
fields of the body's `frugalserve` object, which win where both are given. Config-level aliases
(`aliases: {gpt-4o-mini: "cascade:budget=0.02"}`) name an expert, a policy or such a string.
"""

from __future__ import annotations

import math
from typing import Any

OPTIONS: dict[str, type] = {"budget": float, "max_tier": int, "start_tier": int}


class ModelNameError(ValueError):
    """A `model` string whose options cannot be read; the message says what is allowed."""


def parse(name: str) -> tuple[str, dict[str, Any]]:
    """(base name, routing options) of a `model` string."""
    base, sep, rest = name.partition(":")
    if not sep:
        return name, {}
    options: dict[str, Any] = {}
    for item in rest.split(","):
        key, eq, value = item.strip().partition("=")
        if not eq or key not in OPTIONS:
            raise ModelNameError(f"model {name!r}: options are KEY=VALUE with KEY one of "
                                 f"{sorted(OPTIONS)}, e.g. '{base}:budget=0.02'")
        try:
            options[key] = OPTIONS[key](value)
        except ValueError:
            raise ModelNameError(f"model {name!r}: {key} must be a {OPTIONS[key].__name__}, "
                                 f"got {value!r}") from None
        if options[key] < 0:
            raise ModelNameError(f"model {name!r}: {key} must not be negative")
    return base, options


def budget_name(policy: str, budget: float, digits: int = 3) -> str:
    """`policy:budget=B` with B rounded *up* to `digits` significant digits, so the name selects
    the operating point of cost `budget` (the most accurate one within the budget)."""
    if budget <= 0:
        return f"{policy}:budget=0"
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(budget)))
    return f"{policy}:budget={math.ceil(budget * scale - 1e-9) / scale:g}"
