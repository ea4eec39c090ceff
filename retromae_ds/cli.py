"""`retromae-ds {tokenizer,prepare,train,export,eval,bench,info,init}`.

Each subcommand lives in its own module that exposes `add_arguments(parser)` and `main(args) -> int`.
Those modules keep heavy imports (torch, deepspeed, datasets) inside functions so that `--help`
answers instantly.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from retromae_ds.errors import UserError

COMMANDS = {
    "tokenizer": ("retromae_ds.data.train_tokenizer", "train a WordPiece/BPE/unigram tokenizer on a corpus"),
    "prepare": ("retromae_ds.data.prepare", "tokenize a corpus into packed memory-mapped blocks (.bin/.idx/.json)"),
    "train": ("retromae_ds.engine.trainer", "pre-train with DeepSpeed (same flags as launch/pretrain.py)"),
    "export": ("retromae_ds.engine.export", "turn a checkpoint into a Hugging Face encoder folder"),
    "eval": ("retromae_ds.evaluate", "zero-shot similarity / retrieval quality of the [CLS] embedding"),
    "bench": ("retromae_ds.bench", "run the benchmarks in bench/ and print JSON"),
    "info": ("retromae_ds.info", "describe a prepared dataset, a checkpoint (and verify it) or the environment"),
    "init": ("retromae_ds.scaffold", "write editable copies of the DeepSpeed configs and the SLURM script"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retromae-ds",
        description="RetroMAE / DupMAE pre-training on DeepSpeed: prepare data, train, export, evaluate.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._module.main(args) or 0)
    except UserError as err:
        print(f"retromae-ds {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `retromae-ds info X | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"retromae-ds {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
