"""Optional bearer-token auth for the API. Keys come from an environment variable or a file;
they are compared in constant time and never logged or exported."""

from __future__ import annotations

import hmac
import os
from pathlib import Path


def load_keys(env: str | None, file: str | None) -> frozenset[str] | None:
    """The accepted keys, or None when auth is off. Raises if configured but empty."""
    if env is None and file is None:
        return None
    keys: set[str] = set()
    if env is not None:
        keys.update(k.strip() for k in os.environ.get(env, "").split(",") if k.strip())
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise ValueError(f"router.api_keys_file {file!r} does not exist")
        keys.update(line.strip() for line in path.read_text().splitlines() if line.strip())
    if not keys:
        where = " and ".join(x for x in (env and f"${env}", file) if x)
        raise ValueError(f"API auth is configured but {where} holds no key")
    return frozenset(keys)


def authorized(header: str | None, keys: frozenset[str]) -> bool:
    if not header or not header.startswith("Bearer "):
        return False
    given = header[len("Bearer "):].strip().encode()
    ok = False
    for key in keys:  # compare against every key so timing says nothing about which matched
        ok |= hmac.compare_digest(given, key.encode())
    return ok
