"""Runs one scheduled step on the model: packs its tokens, keeps the paged KV cache, attends
through frugalserve's kernels, captures decode steps in CUDA graphs, samples.

The tokens of a step are one flat batch: decode tokens first (one per sequence, its context
cached), then prefill chunks. Every layer writes the new K/V into their pages (KV-write kernel),
then the decode rows attend through the paged decode kernel and the prefill rows through the
varlen prefill kernel (keys gathered from the cache when a chunk continues a cached prefix). On
CPU the same code runs the kernels' PyTorch references (`frugalserve.kernels.dispatch` decides,
once, and says why). On GPU, steps that only decode replay a CUDA graph captured for the
smallest batch-size bucket that holds them; steps with prefills run eagerly.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from frugalserve.experts.paged.block_manager import SCRATCH_PAGE, BlockManager
from frugalserve.experts.paged.models import PagedModel
from frugalserve.experts.paged.scheduler import Scheduled, Step
from frugalserve.experts.sampling import choose_tokens
from frugalserve.kernels import dispatch

logger = logging.getLogger(__name__)

GRAPH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)


@dataclass
class AttnMeta:
    """What every layer's attention needs for one step (tensors on the model's device)."""

    slot_mapping: torch.Tensor  # [T] int32: flat cache slot of each token of the step
    num_decodes: int
    block_tables: torch.Tensor | None = None  # [num_decodes, pages_per_seq] int32
    context_lens: torch.Tensor | None = None  # [num_decodes] int32 (new token included)
    max_context: int = 0  # host bound on context_lens: no device sync in the decode launcher
    num_splits: int | None = None  # fixed for captured graphs
    cu_q: torch.Tensor | None = None  # [num_prefills + 1] int32
    cu_k: torch.Tensor | None = None
    max_q: int = 0
    gather: torch.Tensor | None = None  # [sum of keys] flat slots; None: keys are the step's own


class ModelRunner:
    def __init__(self, model: PagedModel, blocks: BlockManager, *, max_num_seqs: int,
                 max_context: int, eos_ids: frozenset[int], cuda_graphs: bool = True,
                 max_num_batched_tokens: int = 2048):
        self.model = model
        self.eos_ids = eos_ids
        self.blocks = blocks
        self.device = model.device
        self.dtype = model.dtype
        self.page_size = blocks.page_size
        self.max_context = max_context
        self.pages_per_seq = blocks.pages_for(max_context)
        shape = (blocks.num_pages, blocks.page_size, model.num_kv_heads, model.head_dim)
        # torch.empty: on CPU the OS backs only the pages the load touches.
        self.k_cache = [torch.empty(shape, dtype=self.dtype, device=self.device)
                        for _ in range(model.num_layers)]
        self.v_cache = [torch.empty(shape, dtype=self.dtype, device=self.device)
                        for _ in range(model.num_layers)]
        self.meta: AttnMeta | None = None
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._buckets: dict[int, int] = {}
        self.graph_steps = 0
        self.eager_steps = 0
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.max_num_seqs = max_num_seqs
        self.attention = self._attention_plan()
        if self.cuda_graphs:
            self._capture_graphs()

    # -- facts -----------------------------------------------------------------------------

    @staticmethod
    def page_bytes(model: PagedModel, page_size: int) -> int:
        """Bytes one page takes over all layers, K and V."""
        elt = torch.empty((), dtype=model.dtype).element_size()
        return model.num_layers * 2 * page_size * model.num_kv_heads * model.head_dim * elt

    @property
    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k_cache, *self.v_cache))

    def _attention_plan(self) -> dict[str, str]:
        m = self.model
        plan = {}
        for kernel in ("prefill", "decode", "kv-write"):
            d = dispatch.decide(kernel, self.device, self.dtype, m.head_dim, m.num_heads,
                              m.num_kv_heads)
            plan[kernel] = f"{'triton' if d.use_triton else 'reference'} ({d.reason})"
        plan["cuda_graphs"] = ("decode steps, batch buckets up to "
                               f"{self.max_num_seqs}" if self.cuda_graphs else "off")
        return plan

    # -- attention -------------------------------------------------------------------------

    def _attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        meta, m = self.meta, self.model
        kc, vc = self.k_cache[layer], self.v_cache[layer]
        dispatch.write_kv(k, v, kc, vc, meta.slot_mapping)
        nd = meta.num_decodes
        if nd == q.shape[0]:
            return dispatch.decode(q[:, None], kc, vc, meta.block_tables, meta.context_lens,
                                   alibi_slopes=m.alibi, scale=m.scale,
                                   max_context_len=meta.max_context,
                                   num_splits=meta.num_splits)[:, 0]
        out = torch.empty_like(q)
        if nd:
            out[:nd] = dispatch.decode(q[:nd, None], kc, vc, meta.block_tables, meta.context_lens,
                                       alibi_slopes=m.alibi, scale=m.scale,
                                       max_context_len=meta.max_context)[:, 0]
        if meta.gather is None:
            kp, vp = k[nd:], v[nd:]
        else:
            kp = kc.view(-1, *kc.shape[2:])[meta.gather]
            vp = vc.view(-1, *vc.shape[2:])[meta.gather]
        out[nd:] = dispatch.attention_varlen(q[nd:], kp, vp, meta.cu_q, meta.cu_k, meta.max_q,
                                             causal=True, alibi_slopes=m.alibi, scale=m.scale,
                                             autotune=False)
        return out

    # -- steps -----------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, step: Step) -> dict[int, tuple[int, float]]:
        rows = [s for s in step.scheduled if s.sample]
        if self.graphs and not step.prefills and len(step.decodes) in self._buckets:
            logits = self._replay(step.decodes)
            self.graph_steps += 1
        else:
            logits = self._eager(step)
            self.eager_steps += 1
        return self._sample(logits, rows)

    def _slots(self, seq, start: int, n: int) -> np.ndarray:
        pos = np.arange(start, start + n)
        pages = np.asarray(seq.pages, dtype=np.int64)
        return pages[pos // self.page_size] * self.page_size + pos % self.page_size

    def _eager(self, step: Step) -> torch.Tensor:
        decodes, prefills = step.decodes, step.prefills
        nd = len(decodes)
        ids: list[int] = []
        pos: list[int] = []
        slots: list[np.ndarray] = []
        for s in decodes:
            seq, p = s.seq, s.start
            ids.append(seq.tokens[p])
            pos.append(p)
        if nd:
            slots.append(np.asarray([self.blocks.slot(s.seq, s.start) for s in decodes]))
        cu_q, cu_k, gather, max_q, own_keys = [0], [0], [], 0, True
        sample_idx = list(range(nd))  # every decode row samples
        for s in prefills:
            seq = s.seq
            ids.extend(seq.tokens[s.start:s.start + s.n])
            pos.extend(range(s.start, s.start + s.n))
            slots.append(self._slots(seq, s.start, s.n))
            cu_q.append(cu_q[-1] + s.n)
            cu_k.append(cu_k[-1] + s.start + s.n)
            max_q = max(max_q, s.n)
            own_keys = own_keys and s.start == 0
            gather.append(self._slots(seq, 0, s.start + s.n))
            if s.sample:
                sample_idx.append(nd + cu_q[-1] - 1)
        dev = self.device
        meta = AttnMeta(slot_mapping=_tensor(np.concatenate(slots), dev), num_decodes=nd)
        if nd:
            meta.block_tables = _tensor(self._block_table(decodes), dev)
            meta.context_lens = _tensor(np.asarray([s.start + 1 for s in decodes]), dev)
            meta.max_context = max(s.start + 1 for s in decodes)
        if prefills:
            meta.cu_q, meta.cu_k, meta.max_q = _tensor(cu_q, dev), _tensor(cu_k, dev), max_q
            if not own_keys:
                meta.gather = _tensor(np.concatenate(gather), dev).long()
        self.meta = meta
        hidden = self.model.forward(_tensor(ids, dev), _tensor(pos, dev), self._attend)
        return self.model.logits(hidden[_tensor(sample_idx, dev).long()])

    def _block_table(self, decodes: list[Scheduled]) -> np.ndarray:
        width = max(len(s.seq.pages) for s in decodes)
        table = np.zeros((len(decodes), width), dtype=np.int32)
        for i, s in enumerate(decodes):
            table[i, :len(s.seq.pages)] = s.seq.pages
        return table

    # -- CUDA graphs -----------------------------------------------------------------------

    def _capture_graphs(self) -> None:
        n = self.max_num_seqs
        sizes = sorted({b for b in GRAPH_BUCKETS if b < n} | {n})
        # batch size -> the captured bucket that runs it
        self._buckets = {bs: next(b for b in sizes if b >= bs) for bs in range(1, n + 1)}
        w = self.pages_per_seq
        # One int32 buffer: ids | positions | slots | context lengths | block tables.
        self._gbuf = torch.zeros(4 * n + n * w, dtype=torch.int32, device=self.device)
        self._ghost = torch.zeros(4 * n + n * w, dtype=torch.int32).pin_memory()
        g = self._gbuf
        self._g_ids, self._g_pos, self._g_slots, self._g_ctx = (g[i * n:(i + 1) * n] for i in range(4))
        self._g_bt = g[4 * n:].view(n, w)
        self._g_ctx.fill_(1)  # capture reads the scratch page: valid memory, results unused
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        from frugalserve.kernels.decode import default_num_splits

        pool = None
        for bs in reversed(sizes):  # largest first: smaller graphs reuse its memory pool
            meta = AttnMeta(slot_mapping=self._g_slots[:bs], num_decodes=bs,
                            block_tables=self._g_bt[:bs], context_lens=self._g_ctx[:bs],
                            max_context=self.max_context,
                            num_splits=default_num_splits(bs, self.model.num_kv_heads,
                                                          self.max_context, num_sms=sms))
            self.meta = meta
            with torch.inference_mode():
                self._graph_body(bs)  # compiles the kernels outside the capture
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = self._graph_body(bs)
            pool = graph.pool()
            self.graphs[bs] = (graph, out)
        torch.cuda.synchronize(self.device)
        logger.info("captured %d decode graphs (batch %s)", len(self.graphs), sizes)

    def _graph_body(self, bs: int) -> torch.Tensor:
        hidden = self.model.forward(self._g_ids[:bs], self._g_pos[:bs], self._attend)
        return self.model.logits(hidden)

    def _replay(self, decodes: list[Scheduled]) -> torch.Tensor:
        n, bs = len(decodes), self._buckets[len(decodes)]
        cap, w = self.max_num_seqs, self.pages_per_seq
        host = self._ghost.numpy()
        ids, pos, slots, ctx = (host[i * cap:i * cap + bs] for i in range(4))
        for i, s in enumerate(decodes):
            seq, p = s.seq, s.start
            ids[i] = seq.tokens[p]
            pos[i] = p
            slots[i] = self.blocks.slot(seq, p)
            ctx[i] = p + 1
        ids[n:], pos[n:], slots[n:], ctx[n:] = 0, 0, SCRATCH_PAGE * self.page_size, 0
        bt = host[4 * cap:].reshape(cap, w)
        for i, s in enumerate(decodes):  # entries past a row's pages are never read
            bt[i, :len(s.seq.pages)] = s.seq.pages
        self._gbuf[:4 * cap].copy_(self._ghost[:4 * cap], non_blocking=True)
        self._g_bt[:n].copy_(self._ghost[4 * cap:].view(cap, w)[:n], non_blocking=True)
        graph, out = self.graphs[bs]
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
                budget_bytes: float, reserved_bytes: float) -> int:
    """Pages for the KV cache: what the budget leaves after `reserved_bytes` (weights,
    activations, graphs), and never more than `max_num_seqs` full contexts need (+ scratch)."""
    need = max_num_seqs * math.ceil(max_context / page_size) + 1
    free = max(0.0, budget_bytes - reserved_bytes)
    return int(min(need, free // ModelRunner.page_bytes(model, page_size)))
