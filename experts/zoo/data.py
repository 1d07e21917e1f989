"""Training data of the demo zoo: the shared tokenizer and token pools drawn from the task suite.

Examples are chat-formatted (`chat_text`, equal to the tokenizer's chat template) and drawn ahead
into a token pool per domain, tokenized in seeded chunks (in parallel processes), so that a
training step costs no Python data work. `Batches` samples a model's domains from the pools on the
device; `interleave` packs them into one token stream (the ALiBi experiment's input).
"""

from __future__ import annotations

import itertools
import math
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import torch
from frugalserve.experts.spec import MODELS_DIR
from frugalserve.experts.zoo import tasks as T
from frugalserve.experts.zoo.tokenizer import train_tokenizer
from tokenizers import Tokenizer
from transformers import AutoTokenizer

TOKENIZER_DIR = MODELS_DIR / "tokenizer"


# -- tokenizer ---------------------------------------------------------------------------------


def tokenizer_corpus(n: int = 30_000, seed: int = 0) -> list[str]:
    """Chat-formatted training examples of every domain plus every name of the world."""
    texts = [chat_text(t.prompt, t.answer) for t in itertools.islice(T.training_stream(seed=seed), n)]
    texts += [f"{e.name} {e.capital}" for e in T.world()]
    return texts


def chat_text(prompt: str, answer: str | None = None) -> str:
    """The chat template, spelled out (kept equal to `tokenizer.CHAT_TEMPLATE`)."""
    text = f"<|bos|><|user|>{prompt}<|end|><|assistant|>"
    return text if answer is None else f"{text}{answer}<|end|>"


def build_tokenizer(vocab_size: int = 512, out: Path = TOKENIZER_DIR):
    tok = train_tokenizer(tokenizer_corpus(), vocab_size=vocab_size)
    tok.save_pretrained(out)
    return tok


def load_tokenizer(path: Path = TOKENIZER_DIR, vocab_size: int = 512):
    if not (path / "tokenizer.json").is_file():
        return build_tokenizer(vocab_size, path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    return tok


# -- data --------------------------------------------------------------------------------------


POOL_CHUNK = 50_000  # examples drawn from one seeded stream; pools are built chunk by chunk


def _encode(backend, tasks_: list[T.Task], max_len: int, pad: int) -> dict:
    """Token pool: ids [N, max_len] (pad after the end), lengths [N], answer starts [N]."""
    prefix = backend.encode_batch([chat_text(t.prompt) for t in tasks_], add_special_tokens=False)
    answer = backend.encode_batch([t.answer + "<|end|>" for t in tasks_], add_special_tokens=False)
    filler = [pad] * max_len
    rows, lens, starts = [], [], []
    for t, p, a in zip(tasks_, prefix, answer):
        seq = p.ids + a.ids
        if len(seq) > max_len:  # a cut example would teach a wrong answer
            raise ValueError(f"{t.prompt!r} -> {t.answer!r} is {len(seq)} tokens, over max_len "
                             f"{max_len}: raise `max_len` in the zoo config")
        rows.append((seq + filler)[:max_len])
        lens.append(len(seq))
        starts.append(len(p.ids))
    return {"ids": np.array(rows, dtype=np.int16), "lens": np.array(lens, dtype=np.int16),
            "starts": np.array(starts, dtype=np.int16)}


def _pool_chunk(job: tuple) -> dict:


    tok_file, domain, seed, chunk, size, max_len, pad = job
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    stream = T.training_stream((domain,), seed=seed * 1_000_003 + chunk)
    return _encode(Tokenizer.from_file(tok_file), list(itertools.islice(stream, size)), max_len, pad)


def build_pools(tok_dir: Path, domains, n: int, seed: int, max_len: int, procs: int | None = None) -> dict:
    """Training examples per domain, drawn ahead in seeded chunks of `POOL_CHUNK` (so the pool
    does not depend on how many processes draw it) and tokenized."""


    pad = load_tokenizer(tok_dir).pad_token_id
    jobs = [(str(tok_dir / "tokenizer.json"), d, seed, c, min(POOL_CHUNK, n - c * POOL_CHUNK), max_len, pad)
            for d in domains for c in range(math.ceil(n / POOL_CHUNK))]
    procs = min(len(jobs), procs or os.cpu_count() or 1)
    if procs > 1:
        with mp.get_context("spawn").Pool(procs) as pool:
            parts = pool.map(_pool_chunk, jobs)
    else:
        parts = [_pool_chunk(j) for j in jobs]
    pools = {}
    for d in domains:
        mine = [p for j, p in zip(jobs, parts) if j[1] == d]
        pools[d] = {k: torch.from_numpy(np.concatenate([p[k] for p in mine])) for k in mine[0]}
    return pools


def interleave(pools: dict, domains) -> dict:
    """The pools' examples packed back to back, domains in turn: one token stream."""
    n = min(len(pools[d]["ids"]) for d in domains)
    ids = torch.stack([pools[d]["ids"][:n] for d in domains], 1).flatten(0, 1)
    lens = torch.stack([pools[d]["lens"][:n] for d in domains], 1).flatten(0, 1).long()
    keep = torch.arange(ids.shape[1])[None, :] < lens[:, None]
    return {"ids": ids[keep], "ends": lens.cumsum(0)}


class Batches:
    """Random batches from the pools of the model's domains (equal shares), on the device."""
    def __init__(self, pools: dict[str, dict], domains, batch_size: int, device, seed: int):
        parts = [pools[d] for d in domains]
        self.ids = torch.cat([p["ids"] for p in parts]).to(device)
        lens = torch.cat([p["lens"] for p in parts]).to(device).long()
        starts = torch.cat([p["starts"] for p in parts]).to(device).long()
        pos = torch.arange(self.ids.shape[1] - 1, device=device)
        # target position t predicts token t + 1: learn the answer tokens and the closing <|end|>
        self.mask = (pos[None, :] + 1 >= starts[:, None]) & (pos[None, :] + 1 < lens[:, None])
        self.batch_size = batch_size
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(seed)

    def next(self):
        idx = torch.randint(self.ids.shape[0], (self.batch_size,), generator=self.gen, device=self.ids.device)
        x = self.ids[idx].long()
        return x[:, :-1], x[:, 1:], self.mask[idx]
