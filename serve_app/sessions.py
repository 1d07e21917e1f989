"""Session stickiness: a conversation keeps the expert (or cascade tier) it started with.

The key is the `X-Session-ID` header when the client sends one, else a hash of the conversation
so far (every message before the newest user turn), so a follow-up turn finds the record its
previous turn left. Held per router replica, bounded in size and age.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Sequence

SESSION_HEADER = "x-session-id"


def conversation_key(messages: Sequence[dict]) -> str:
    blob = json.dumps([[m.get("role"), m.get("content")] for m in messages], ensure_ascii=False)
    return "conv:" + hashlib.sha256(blob.encode()).hexdigest()[:32]


def lookup_key(messages: Sequence[dict] | None, header: str | None) -> str | None:
    """The key under which this turn's predecessor stored its choice."""
    if header:
        return "hdr:" + header
    if messages and len(messages) > 1:
        return conversation_key(messages[:-1])
    return None


def store_key(messages: Sequence[dict] | None, answer: str, header: str | None) -> str | None:
    """The key the next turn will look up: the conversation including this answer."""
    if header:
        return "hdr:" + header
    if messages:
        return conversation_key([*messages, {"role": "assistant", "content": answer}])
    return None


class SessionStore:
    def __init__(self, ttl_s: float = 3600.0, max_entries: int = 10_000):
        self.ttl_s, self.max_entries = ttl_s, max_entries
        self._data: OrderedDict[str, tuple[float, str]] = OrderedDict()

    def get(self, key: str | None) -> str | None:
        if key is None or key not in self._data:
            return None
        at, value = self._data[key]
        if time.monotonic() - at > self.ttl_s:
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return value

    def put(self, key: str | None, value: str) -> None:
        if key is None:
            return
        self._data[key] = (time.monotonic(), value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)
