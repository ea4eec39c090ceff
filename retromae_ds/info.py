"""Describe a prepared dataset (PREFIX), a run/checkpoint folder, or (no argument) the environment.

For a checkpoint folder it also verifies every file against the manifest (exit 1 when damaged)."""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from retromae_ds.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", nargs="?", default=None,
                        help="dataset PREFIX, run OUTPUT_DIR or checkpoint folder; omit for the environment")


def main(args: argparse.Namespace) -> int:
    if args.path is None:
        print(json.dumps(environment(), indent=1))
        return 0
    p = Path(args.path)
    if Path(str(p) + ".idx").exists():
        from retromae_ds.data.indexed import IndexedDataset

        ds = IndexedDataset(str(p))
        info = {k: v for k, v in ds.meta.items()}
        info["opened"] = {"blocks": len(ds), "documents": ds.num_documents, "tokens": int(ds.num_tokens)}
        print(json.dumps(info, indent=1))
        return 0
    if p.is_dir():
        from retromae_ds.engine.checkpoint import complete_checkpoints, incomplete_checkpoints, read_marker, verify

        if (p / "COMPLETE").exists():
            marker = read_marker(p) or {}
            result = verify(p)
            marker.pop("files", None)  # one line per file: the verification below summarises them
            marker["verification"] = {"ok": result.ok, "summary": result.summary(), "problems": result.problems}
            print(json.dumps(marker, indent=1))
            return 0 if result.ok else 1
        done, partial = complete_checkpoints(p), incomplete_checkpoints(p)
        damaged = sorted(str(d) for d in (p / "checkpoints").glob("step_*.damaged*")) if (p / "checkpoints").is_dir() else []
        print(json.dumps({"complete": [str(c) for c in done], "incomplete": [str(c) for c in partial],
                          "damaged_set_aside": damaged, "newest": str(done[-1]) if done else None}, indent=1))
        return 0
    raise UserError(f"{args.path}: not a dataset prefix (no {args.path}.idx), run folder or checkpoint.")


def environment() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda_available": torch.cuda.is_available()}
    for name in ("deepspeed", "transformers", "datasets", "gensim", "sentence_transformers"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except ImportError:
            info[name] = None
    if torch.cuda.is_available():
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["bf16"] = torch.cuda.is_bf16_supported()
    return info
