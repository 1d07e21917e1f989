"""`frugalserve zoo {train,alibi,tokenizer}`: the zoo's commands, each a `main(argv)` of its module."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from frugalserve.experts.zoo import alibi_experiment, train
from frugalserve.experts.zoo.data import TOKENIZER_DIR, build_tokenizer


def cmd_tokenizer(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="frugalserve zoo tokenizer", description="retrain the shared tokenizer")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--out", type=Path, default=TOKENIZER_DIR)
    args = parser.parse_args(argv)
    tok = build_tokenizer(args.vocab_size, args.out)
    print(f"wrote {args.out} ({len(tok)} tokens)")
    return 0


COMMANDS = {"train": train.cmd_train, "alibi": alibi_experiment.main, "tokenizer": cmd_tokenizer}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print("usage: frugalserve zoo {train,alibi,tokenizer} [options]  (--help on each)", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
