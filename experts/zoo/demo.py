"""Build the two tiny untrained demo models (`frugalserve demo-models`).

They exist so the application and its tests run on any machine with no download: one Llama with
grouped-query attention (8 query heads, 2 KV heads) and one Falcon with ALiBi and grouped KV
heads, sharing a BPE tokenizer trained here with a chat template. Seeded, so a rebuild writes the
same weights.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from frugalserve.experts.spec import MODELS_DIR
from frugalserve.experts.zoo.tokenizer import train_tokenizer
from transformers import FalconConfig, FalconForCausalLM, LlamaConfig, LlamaForCausalLM

DEMO_CORPUS = [
    "What is 12 + 30? The answer is 42.",
    "Reverse the word serve: evres.",
    "The capital of Zorvia is Quellin, founded in 1712.",
    "frugalserve answers each request with the cheapest model that is good enough.",
    "Hello! How can I help you today?",
    "The quick brown fox jumps over the lazy dog 0123456789 times.",
]


def build_demo_models(out_dir: Path = MODELS_DIR, seed: int = 0) -> list[Path]:
    tokenizer = train_tokenizer(DEMO_CORPUS * 20, vocab_size=320)
    vocab = len(tokenizer)
    common = dict(
        vocab_size=vocab,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    configs = {
        "demo-llama": LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
            tie_word_embeddings=True, **common,
        ),
        "demo-falcon": FalconConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_kv_heads=2,
            new_decoder_architecture=True, alibi=True, parallel_attn=True, bias=False,
            max_position_embeddings=512, tie_word_embeddings=True, **common,
        ),
    }
    classes = {"demo-llama": LlamaForCausalLM, "demo-falcon": FalconForCausalLM}
    written = []
    for name, config in configs.items():
        torch.manual_seed(seed)
        model = classes[name](config)
        # Wider than the default init (0.02) so greedy choices are not near-ties.
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.2)
        path = out_dir / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        written.append(path)
        print(f"wrote {path} ({sum(p.numel() for p in model.parameters()):,} parameters)")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="frugalserve demo-models", description=__doc__)
    parser.add_argument("--out", type=Path, default=MODELS_DIR, help="folder to write into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    build_demo_models(args.out, args.seed)
    return 0
