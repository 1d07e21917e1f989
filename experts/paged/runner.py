"""Runs one scheduled step on the model: packs its tokens, keeps the paged KV cache, attends
through frugalserve's kernels, replays CUDA graphs, samples.

The tokens of a step are one flat batch: decode tokens first (one per sequence, its context
cached), then prefill chunks. Every layer writes the new K/V into their pages (KV-write kernel)
and attends over the cache:
- a step that only decodes uses the paged decode kernel (split-K over long contexts);
- a step with prefill chunks uses the paged prefill kernel for all its rows at once: each
  sequence's new tokens attend to everything its pages hold, the chunk itself included.
On CPU the same code runs the kernels' PyTorch references (`frugalserve.kernels.dispatch`
decides, once, and says why). An fp8 cache (`kv_dtype` float8_e4m3fn) holds K/V quantized with
per-layer, per-KV-head scales (`kv_scales`, calibrated by the engine): the KV write quantizes, the
attention kernels (or references) dequantize. On GPU every step replays a CUDA graph: decode steps one captured
per batch-size bucket, mixed steps one per total-token bucket (up to `max_num_seqs` sequences);
the launch grids depend only on the bucket, so one graph serves any mix that fits it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from frugalserve.experts.paged.block_manager import BlockManager
from frugalserve.experts.paged.models import PagedModel
from frugalserve.experts.paged.scheduler import Scheduled, Step
from frugalserve.experts.sampling import choose_tokens
from frugalserve.kernels import dispatch

logger = logging.getLogger(__name__)

DECODE_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)
TOKEN_BUCKETS = (16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144,
                 8192)


@dataclass
class AttnMeta:
    """What every layer's attention needs for one step (tensors on the model's device)."""

    slot_mapping: torch.Tensor  # [T] int32: flat cache slot of each token (< 0: skipped)
    decode_only: bool
    block_tables: torch.Tensor  # [S, pages_per_seq] int32, one row per sequence of the step
    seq_lens: torch.Tensor  # [S] int32: cached tokens of each sequence after this step's
    max_context: int = 0  # host bound on seq_lens: no device sync in the decode launcher
    num_splits: int | None = None  # decode: fixed for captured graphs
    cu_q: torch.Tensor | None = None  # [S + 1] int32: each sequence's rows of the step
    max_q: int = 0  # host bound on any sequence's rows (sizes the prefill grid)


def _buckets(sizes, limit: int) -> list[int]:
    return sorted({b for b in sizes if b < limit} | {limit})


class _Graphs:
    """CUDA graphs of one kind (decode or mixed) over one static int32 input buffer."""

    def __init__(self, sizes: list[int]):
        self.sizes = sizes
        self.by_bucket: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def bucket(self, n: int) -> int | None:
        for b in self.sizes:
            if b >= n:
                return b
        return None


class ModelRunner:
    def __init__(self, model: PagedModel, blocks: BlockManager, *, max_num_seqs: int,
                 max_context: int, eos_ids: frozenset[int], cuda_graphs: bool = True,
                 max_num_batched_tokens: int = 2048, kv_dtype: torch.dtype | None = None,
                 kv_scales: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None):
        self.model = model
        self.eos_ids = eos_ids
        self.blocks = blocks
        self.device = model.device
        self.dtype = model.dtype
        self.page_size = blocks.page_size
        self.max_context = max_context
        self.max_num_seqs = max_num_seqs
        self.max_tokens = max_num_batched_tokens
        self.pages_per_seq = blocks.pages_for(max_context)
        self.kv_dtype = kv_dtype or self.dtype
        shape = (blocks.num_pages, blocks.page_size, model.num_kv_heads, model.head_dim)
        # torch.empty: on CPU the OS backs only the pages the load touches.
        self.k_cache = [torch.empty(shape, dtype=self.kv_dtype, device=self.device)
                        for _ in range(model.num_layers)]
        self.v_cache = [torch.empty(shape, dtype=self.kv_dtype, device=self.device)
                        for _ in range(model.num_layers)]
        self.k_scale: list[torch.Tensor | None] = [None] * model.num_layers
        self.v_scale: list[torch.Tensor | None] = [None] * model.num_layers
        if self.kv_dtype == torch.float8_e4m3fn:
            if kv_scales is None:
                raise ValueError("an fp8 KV cache needs its per-layer scales (kv_scales)")
            self.k_scale = [s.to(self.device, torch.float32).contiguous() for s in kv_scales[0]]
            self.v_scale = [s.to(self.device, torch.float32).contiguous() for s in kv_scales[1]]
        self.meta: AttnMeta | None = None
        self.graph_steps = 0
        self.eager_steps = 0
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.decode_graphs = _Graphs(_buckets(DECODE_BUCKETS, max_num_seqs))
        self.mixed_graphs = _Graphs(_buckets(TOKEN_BUCKETS, max(16, max_num_batched_tokens)))
        self.attention = self._attention_plan()
        if self.cuda_graphs:
            self._capture_graphs()

    # -- facts -----------------------------------------------------------------------------

    @staticmethod
    def page_bytes(model: PagedModel, page_size: int, kv_dtype: torch.dtype | None = None) -> int:
        """Bytes one page takes over all layers, K and V, in `kv_dtype` (default: the model's)."""
        elt = (kv_dtype or model.dtype).itemsize
        return model.num_layers * 2 * page_size * model.num_kv_heads * model.head_dim * elt

    @property
    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k_cache, *self.v_cache))

    @property
    def graphs(self) -> dict[int, tuple]:
        return {**self.decode_graphs.by_bucket,
                **{-t: g for t, g in self.mixed_graphs.by_bucket.items()}}

    def _attention_plan(self) -> dict[str, str]:
        m = self.model
        plan = {}
        for kernel in ("paged-prefill", "decode", "kv-write"):
            d = dispatch.decide(kernel, self.device, self.dtype, m.head_dim, m.num_heads,
                                m.num_kv_heads, kv_dtype=self.kv_dtype)
            plan[kernel] = f"{'triton' if d.use_triton else 'reference'} ({d.reason})"
        plan["kv_cache"] = str(self.kv_dtype).removeprefix("torch.") + (
            ", per-layer per-KV-head scales calibrated at load" if self.kv_dtype == torch.float8_e4m3fn else "")
        plan["cuda_graphs"] = (
            f"decode steps of 1..{self.max_num_seqs} sequences and mixed steps of up to "
            f"{self.mixed_graphs.sizes[-1]} tokens" if self.cuda_graphs else "off")
        return plan

    # -- attention -------------------------------------------------------------------------

    def _attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        meta, m = self.meta, self.model
        kc, vc = self.k_cache[layer], self.v_cache[layer]
        scales = dict(k_scale=self.k_scale[layer], v_scale=self.v_scale[layer])
        dispatch.write_kv(k, v, kc, vc, meta.slot_mapping, **scales)
        if meta.decode_only:
            return dispatch.decode(q[:, None], kc, vc, meta.block_tables, meta.seq_lens,
                                   alibi_slopes=m.alibi, scale=m.scale,
                                   max_context_len=meta.max_context,
                                   num_splits=meta.num_splits, **scales)[:, 0]
        return dispatch.paged_prefill(q, kc, vc, meta.block_tables, meta.cu_q, meta.seq_lens,
                                      max_seqlen_q=meta.max_q, alibi_slopes=m.alibi,
                                      scale=m.scale, **scales)

    # -- steps -----------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, step: Step) -> dict[int, tuple[int, float]]:
        rows = [s for s in step.scheduled if s.sample]
        logits = None
        if self.cuda_graphs:
            if not step.prefills:
                logits = self._replay_decode(step.decodes)
            elif len(step.scheduled) <= self.max_num_seqs:
                logits = self._replay_mixed(step)
        if logits is None:
            logits = self._eager(step)
            self.eager_steps += 1
        else:
            self.graph_steps += 1
        return self._sample(logits, rows)

    def _pack(self, scheduled: list[Scheduled], ids: np.ndarray, pos: np.ndarray,
              slots: np.ndarray, cu_q: np.ndarray, lens: np.ndarray, bt: np.ndarray) -> list[int]:
        """Write a step's inputs into host arrays; return the rows whose logits are sampled."""
        P = self.page_size
        t, sample = 0, []
        cu_q[0] = 0
        for j, s in enumerate(scheduled):
            seq, n = s.seq, s.n
            pages = seq.pages
            bt[j, :len(pages)] = pages
            if n == 1:
                p = s.start
                ids[t] = seq.tokens[p]
                pos[t] = p
                slots[t] = pages[p // P] * P + p % P
            else:
                p = np.arange(s.start, s.start + n)
                ids[t:t + n] = seq.tokens[s.start:s.start + n]
                pos[t:t + n] = p
                slots[t:t + n] = np.asarray(pages)[p // P] * P + p % P
            t += n
            cu_q[j + 1] = t
            lens[j] = s.start + n
            if s.sample:
                sample.append(t - 1)
        return sample

    def _eager(self, step: Step) -> torch.Tensor:
        scheduled = step.scheduled
        S, T = len(scheduled), step.num_tokens
        width = max(len(s.seq.pages) for s in scheduled)
        ids, pos, slots = (np.zeros(T, dtype=np.int32) for _ in range(3))
        cu_q, lens = np.zeros(S + 1, dtype=np.int32), np.zeros(S, dtype=np.int32)
        bt = np.zeros((S, width), dtype=np.int32)
        sample = self._pack(scheduled, ids, pos, slots, cu_q, lens, bt)
        dev = self.device
        self.meta = AttnMeta(
            slot_mapping=_tensor(slots, dev), decode_only=not step.prefills,
            block_tables=_tensor(bt, dev), seq_lens=_tensor(lens, dev),
            max_context=int(lens.max()), cu_q=_tensor(cu_q, dev),
            max_q=max(s.n for s in scheduled))
        hidden = self.model.forward(_tensor(ids, dev), _tensor(pos, dev), self._attend)
        return self.model.logits(hidden[_tensor(sample, dev).long()])

    # -- CUDA graphs -----------------------------------------------------------------------
    # One int32 device buffer holds every input of a graph: ids | positions | slots | cu_q |
    # seq_lens | sample rows | block tables, with a pinned host twin: a step is one copy.

    def _views(self, buf: torch.Tensor, T: int, S: int):
        sizes = (T, T, T, S + 1, S, S)
        out, at = [], 0
        for n in sizes:
            out.append(buf[at:at + n])
            at += n
        out.append(buf[at:at + S * self.pages_per_seq].view(S, self.pages_per_seq))
        return out  # ids, pos, slots, cu_q, lens, sample, bt

    def _capture_graphs(self) -> None:
        from frugalserve.kernels.decode import default_num_splits

        S, W = self.max_num_seqs, self.pages_per_seq
        T = max(self.mixed_graphs.sizes[-1], S)
        n = 3 * T + 3 * S + 1 + S * W
        self._buf = torch.zeros(n, dtype=torch.int32, device=self.device)
        self._host = torch.zeros(n, dtype=torch.int32).pin_memory()
        self._T = T
        ids, pos, slots, cu_q, lens, sample, bt = self._views(self._buf, T, S)
        lens.fill_(1)  # capture-time decode reads one token of the scratch page: valid memory
        slots.fill_(-1)
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        pool = None
        captures = [("mixed", t) for t in reversed(self.mixed_graphs.sizes)]
        captures += [("decode", b) for b in reversed(self.decode_graphs.sizes)]
        for kind, size in captures:  # largest first: the others reuse its memory pool
            if kind == "decode":
                self.meta = AttnMeta(
                    slot_mapping=slots[:size], decode_only=True, block_tables=bt[:size],
                    seq_lens=lens[:size], max_context=self.max_context,
                    num_splits=default_num_splits(size, self.model.num_kv_heads,
                                                  self.max_context, num_sms=sms))
                body = lambda b=size: self.model.logits(  # noqa: E731
                    self.model.forward(ids[:b], pos[:b], self._attend))
                graphs = self.decode_graphs
            else:
                self.meta = AttnMeta(slot_mapping=slots[:size], decode_only=False,
                                     block_tables=bt, seq_lens=lens, cu_q=cu_q, max_q=size,
                                     max_context=self.max_context)
                body = lambda t=size: self.model.logits(  # noqa: E731
                    self.model.forward(ids[:t], pos[:t], self._attend)[sample.long()])
                graphs = self.mixed_graphs
            body()  # compiles the kernels outside the capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = body()
            pool = graph.pool()
            graphs.by_bucket[size] = (graph, out)
        torch.cuda.synchronize(self.device)
        logger.info("captured CUDA graphs: decode batches %s, mixed-step tokens %s",
                    self.decode_graphs.sizes, self.mixed_graphs.sizes)

    def _replay_decode(self, decodes: list[Scheduled]) -> torch.Tensor | None:
        n = len(decodes)
        b = self.decode_graphs.bucket(n)
        if b is None:
            return None
        ids, pos, slots, cu_q, lens, sample, bt = self._views(self._host, self._T, self.max_num_seqs)
        h = [v.numpy() for v in (ids, pos, slots, cu_q, lens, bt)]
        self._pack(decodes, *h)
        h[0][n:b], h[1][n:b], h[2][n:b], h[4][n:b] = 0, 0, -1, 0  # padded rows: nothing to do
        return self._run(self.decode_graphs.by_bucket[b], n)

    def _replay_mixed(self, step: Step) -> torch.Tensor | None:
        T = step.num_tokens
        t = self.mixed_graphs.bucket(T)
        if t is None:
            return None
        scheduled = step.scheduled
        S = len(scheduled)
        ids, pos, slots, cu_q, lens, sample, bt = (
            v.numpy() for v in self._views(self._host, self._T, self.max_num_seqs))
        rows = self._pack(scheduled, ids, pos, slots, cu_q, lens, bt)
        ids[T:t], pos[T:t], slots[T:t] = 0, 0, -1  # rows of no sequence: never sampled
        cu_q[S + 1:], lens[S:] = T, 0  # padded sequences: no rows, no keys
        sample[:len(rows)], sample[len(rows):] = rows, 0
        return self._run(self.mixed_graphs.by_bucket[t], len(rows))

    def _run(self, graph_out: tuple[torch.cuda.CUDAGraph, torch.Tensor], n: int) -> torch.Tensor:
        self._buf.copy_(self._host, non_blocking=True)  # the host buffer is reused only after
        graph, out = graph_out                             # the sampler's sync below
        graph.replay()
        return out[:n]

    # -- sampling --------------------------------------------------------------------------

    def _sample(self, logits: torch.Tensor, rows: list[Scheduled]) -> dict[int, tuple[int, float]]:
        if not rows:
            return {}
        logits = logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        seqs = [s.seq for s in rows]
        suppress = [self._suppressed(seq) for seq in seqs]
        chosen = choose_tokens(logits, [s.params for s in seqs], [s.generator for s in seqs],
                               suppress)
        picked = logprobs.gather(-1, chosen[:, None])[:, 0]
        both = torch.stack((chosen.double(), picked.double())).cpu().tolist()
        return {seq.seq_id: (int(t), lp) for seq, t, lp in zip(seqs, both[0], both[1])}

    def _suppressed(self, seq) -> tuple[int, ...]:
        p = seq.params
        if seq.num_generated + 1 > p.min_tokens:  # the token drawn now is number generated + 1
            return ()
        return tuple(p.stop_token_ids) + (() if p.ignore_eos else tuple(self.eos_ids))


def _tensor(values, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(values, dtype=np.int32))
    return t.to(device, non_blocking=True) if device.type != "cpu" else t


def cache_pages(model: PagedModel, page_size: int, *, max_num_seqs: int, max_context: int,
                budget_bytes: float, reserved_bytes: float, kv_dtype: torch.dtype | None = None) -> int:
    """Pages for the KV cache: what the budget leaves after `reserved_bytes` (weights,
    activations, graphs), and never more than `max_num_seqs` full contexts need (+ scratch)."""
    need = max_num_seqs * math.ceil(max_context / page_size) + 1
    free = max(0.0, budget_bytes - reserved_bytes)
    return int(min(need, free // ModelRunner.page_bytes(model, page_size, kv_dtype)))
