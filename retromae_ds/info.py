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
    parser.add_argument("--micro-batch-size", type=int, default=8,
                        help="for a dataset: the padding efficiency (real tokens / computed positions) expected "
                             "at this micro-batch size, in random and in length-grouped order (default 8)")
    parser.add_argument("--max-seq-len", type=int, default=0,
                        help="for a dataset: the training --max-seq-len (default: the dataset's)")
    parser.add_argument("--group-window", type=int, default=256,
                        help="for a dataset: the --group-window of the grouped estimate (default 256)")


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
        info["padding_efficiency"] = padding_report(ds, args)
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


def padding_report(ds, args) -> dict:
    """Real tokens / computed positions expected when training on `ds` (see data/padding.py)."""
    from retromae_ds.data.padding import expected_efficiency

    max_seq_len = args.max_seq_len or int(ds.meta.get("max_seq_len") or int(ds.sizes.max()) + 2)
    if args.micro_batch_size < 1 or args.group_window < 1 or max_seq_len < 3:
        raise UserError("--micro-batch-size and --group-window must be >= 1, --max-seq-len >= 3.")
    out = {"micro_batch_size": args.micro_batch_size, "max_seq_len": max_seq_len,
           "note": "real tokens / computed positions ([CLS]/[SEP] included) over the first 4,000 micro-batches of "
                   "the training order (one rank), each micro-batch padded to its longest block (accelerators: "
                   "rounded up to a multiple of 8); prepare's fill ratio is another figure: tokens / (blocks x "
                   "(max_seq_len - 2)), how full the blocks are, whatever the batches"}
    for name, window in (("random", 0), ("grouped", args.group_window)):
        for device, multiple in (("cpu", 1), ("accelerator", 8)):
            out[f"{name}_{device}"] = round(expected_efficiency(
                ds.sizes, args.micro_batch_size, max_seq_len - 2, group_window=window, pad_multiple=multiple), 4)
    return out


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
