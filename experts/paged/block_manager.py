"""The page allocator of the KV cache: fixed-size pages, handed out and taken back whole.

Page 0 is reserved as scratch: padded rows of a CUDA-graph batch write their K/V there, so the
KV-write kernel needs no branch and no host synchronisation. It is never given to a sequence.
"""

from __future__ import annotations

from frugalserve.experts.paged.sequence import Sequence

SCRATCH_PAGE = 0


class BlockManager:
    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2:
            raise ValueError(f"the KV cache needs at least 2 pages (one is scratch), got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        # A stack, lowest pages first: recently freed pages are reused first, so a CPU cache
        # (allocated lazily by the OS) touches as few pages as the load needs.
        self._free: list[int] = list(range(num_pages - 1, 0, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_usable(self) -> int:
        """Pages sequences can hold (all but the scratch page)."""
        return self.num_pages - 1

    @property
    def num_used(self) -> int:
        return self.num_usable - self.num_free

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def pages_needed(self, seq: Sequence, new_tokens: int) -> int:
        """Pages `seq` must be given before `new_tokens` more of its tokens are cached."""
        return max(0, self.pages_for(seq.num_computed + new_tokens) - len(seq.pages))

    def can_hold(self, seq: Sequence) -> bool:
        """Whether the whole cache could ever hold this sequence (else it can never finish)."""
        return self.pages_for(seq.max_total_tokens) <= self.num_usable

    def allocate(self, seq: Sequence, new_tokens: int) -> None:
        need = self.pages_needed(seq, new_tokens)
        if need > len(self._free):
            raise RuntimeError(f"allocate: {need} pages needed, {len(self._free)} free")
        for _ in range(need):
            seq.pages.append(self._free.pop())

    def free(self, seq: Sequence) -> None:
        self._free.extend(reversed(seq.pages))
        seq.pages = []

    def slot(self, seq: Sequence, position: int) -> int:
        """Flat cache slot of the token at `position` of `seq`."""
        return seq.pages[position // self.page_size] * self.page_size + position % self.page_size
