"""What the checkpoint manifest costs, for a BERT-base-sized checkpoint: JSON on stdout.

The files are what DeepSpeed writes for BERT-base RetroMAE in fp32 (ZeRO-2, one rank): the module's
weights (`mp_rank_00_model_states.pt`) and the fp32 master weights + Adam's two moments
(`*_optim_states.pt`), saved through the same `ManifestingCheckpointEngine.save` the trainer uses.

  plain        torch.save to the path (DeepSpeed's own engine: no hash, no fsync)
  plain+fsync  the same, then fsync: what a durable checkpoint costs without a manifest
  no-hash      ManifestingCheckpointEngine.save with the hash replaced by a no-op: same writer, same fsync
  manifest     ManifestingCheckpointEngine.save: xxh3 of every byte on its way to disk, then fsync
  verify       what `--resume auto` adds before loading: re-read every file and hash it

The manifest's cost is `manifest - no-hash` (the hash alone), as a share of `no-hash`; the cases take
turns and the page cache is flushed (os.sync) before each, so writeback of one does not land in the next.
Run:
    python -m bench.bench_manifest [--dir /path/on/the/checkpoint/filesystem] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def bert_base_states():
    import torch
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig())  # 12 x 768, vocab 30,522
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    optim = {"fp32_master": flat.clone(), "exp_avg": torch.randn_like(flat) * 1e-3,
             "exp_avg_sq": torch.rand_like(flat) * 1e-6}
    return {"module": weights}, {"optimizer_state_dict": optim}, flat.numel()


def main() -> None:
    import torch

    from retromae_ds.engine import checkpoint
    from retromae_ds.engine.checkpoint import ManifestingCheckpointEngine, file_digest

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=None, help="folder on the filesystem to measure (default: a temp dir)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model_states, optim_states, n_params = bert_base_states()
    files = {"mp_rank_00_model_states.pt": model_states, "zero_pp_rank_0_mp_rank_00_optim_states.pt": optim_states}

    class Plain:
        zipfile_serialization = True

    def plain(folder: Path, sync: bool) -> None:
        for name, state in files.items():
            torch.save(state, folder / name)
            if sync:
                with open(folder / name, "rb") as f:
                    os.fsync(f.fileno())

    def manifest(folder: Path) -> None:
        engine = ManifestingCheckpointEngine(Plain())
        for name, state in files.items():
            engine.save(state, str(folder / name))
        assert not engine.errors, engine.errors

    class _NoHash:
        def update(self, data):
            pass

        def hexdigest(self):
            return "0"

    def no_hash(folder: Path) -> None:
        real = checkpoint._hasher
        checkpoint._hasher = _NoHash
        try:
            manifest(folder)
        finally:
            checkpoint._hasher = real

    def verify(folder: Path) -> None:
        for name in files:
            file_digest(folder / name)

    times = {"plain": [], "plain+fsync": [], "no-hash": [], "manifest": [], "verify": []}
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        folder = Path(root)
        for _ in range(args.repeats):
            for label, run in (("plain", lambda: plain(folder, False)), ("plain+fsync", lambda: plain(folder, True)),
                               ("no-hash", lambda: no_hash(folder)), ("manifest", lambda: manifest(folder)),
                               ("verify", lambda: verify(folder))):
                os.sync()
                t = time.perf_counter()
                run()
                times[label].append(time.perf_counter() - t)
        size = sum((folder / n).stat().st_size for n in files)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({
        "checkpoint": "BERT-base MLM, fp32 weights + fp32 master + Adam moments (ZeRO-2, 1 rank)",
        "params": n_params, "bytes": size, "repeats": args.repeats, "seconds_median": med,
        "hash_overhead_vs_same_save_without_hash": (med["manifest"] - med["no-hash"]) / med["no-hash"],
        "manifest_save_vs_durable_plain_save": med["manifest"] / med["plain+fsync"],
        "manifest_save_vs_plain_save": med["manifest"] / med["plain"],
        "verify_vs_durable_save": med["verify"] / med["plain+fsync"],
        "hash": "xxh3_64 (python-xxhash)", "filesystem_dir": args.dir or tempfile.gettempdir(),
    }, indent=1))


if __name__ == "__main__":
    main()
