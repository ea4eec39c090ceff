"""Host memory of the sample order at scale: GlobalBatchSampler and BlendedDataset at 100M blocks.

    python -m bench.bench_sampler_memory                       # 100M blocks, all cases
    python -m bench.bench_sampler_memory --blocks 1000000 --case blend

Why: every rank builds the sample order itself, so its arrays are paid once per GPU process; at
hundreds of millions of blocks they decide whether a node's host RAM suffices. Each case runs in a
fresh subprocess that reports its peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) and its
resident size after each phase, minus what it held after imports (``baseline_mb``), so numbers do not
depend on what ran before. The datasets are synthetic: per-block sizes are a broadcast constant
(no memory), as for a memory-mapped index whose pages are not counted as the sampler's.

Cases:
  sampler  one dataset of N blocks: first global batch, then a batch that crosses into epoch 1
  blend    two datasets (10% / 90% of N blocks), weights 0.5 / 0.5: build the blend, read its
           per-sample sizes as load_data does, then the sampler as above
Prints one JSON object: per case the peak and resident MB after each phase, and seconds.

Measured at 100M blocks (2-core shared CPU machine, MB above the post-import baseline):
  sampler  peak 2291 -> 399, resident 765 -> 399 (int64 permutation plus an int64 copy, now int32 in place)
  blend    peak 5935 -> 1544, resident 2674 -> 1544; of the 1544: 763 per-sample sizes in int64 (what
           load_data hands the trainer), 381 the per-dataset walks, 381 the epoch permutation;
           then 1544 -> 1163 with the sizes in int32
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLOBAL_BATCH = 1024


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Synthetic:
    """len() and a per-block ``sizes`` array that costs no memory (a broadcast constant)."""

    def __init__(self, n: int, size: int = 100) -> None:
        import numpy as np

        self.n = n
        self.sizes = np.broadcast_to(np.int32(size), (n,))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.sizes[:1]


def make_sampler(dataset, seed: int):
    """The sampler as the trainer builds it: through the dataset when this version can."""
    from retromae_ds.data.sampler import GlobalBatchSampler

    if hasattr(GlobalBatchSampler, "for_dataset"):
        return GlobalBatchSampler.for_dataset(dataset, seed=seed)
    return GlobalBatchSampler(len(dataset), seed=seed)


def run_case(case: str, blocks: int) -> dict:
    import numpy as np

    from retromae_ds.data import indexed

    baseline = resident_mb()
    phases = {}
    started = time.perf_counter()

    def mark(name):
        phases[name] = {"peak_mb": round(peak_mb() - baseline), "resident_mb": round(resident_mb() - baseline),
                        "seconds": round(time.perf_counter() - started, 2)}

    if case == "sampler":
        dataset = Synthetic(blocks)
    else:
        small = blocks // 10
        dataset = indexed.BlendedDataset([Synthetic(small), Synthetic(blocks - small)], [0.5, 0.5], seed=0)
        mark("blend_built")
        held = [np.asarray(dataset.sizes)]  # what load_data hands the trainer (int32 since issue 9's session)
        mark("sizes_read")
        held.clear()
    sampler = make_sampler(dataset, seed=0)
    batch = sampler.next_global_batch(GLOBAL_BATCH)
    _ = [dataset[int(i)] for i in batch[:8]]
    mark("first_batch")
    state = sampler.state_dict()
    state.update(epoch=0, consumed_in_epoch=sampler.num_samples - GLOBAL_BATCH // 2)
    sampler.load_state_dict(state)
    sampler.next_global_batch(GLOBAL_BATCH)  # half from epoch 0, half from epoch 1
    mark("epoch_crossed")
    return {"case": case, "blocks": blocks, "baseline_mb": round(baseline), "phases": phases,
            "peak_mb": round(peak_mb() - baseline)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=100_000_000)
    ap.add_argument("--case", choices=("sampler", "blend", "all"), default="all")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_case(args.case, args.blocks)))
        return 0
    cases = ("sampler", "blend") if args.case == "all" else (args.case,)
    results = {}
    for case in cases:
        out = subprocess.run([sys.executable, "-m", "bench.bench_sampler_memory", "--child", "--case", case,
                              "--blocks", str(args.blocks)], capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            results[case] = {"error": out.stderr.strip().splitlines()[-1:] or [f"exit {out.returncode}"]}
        else:
            results[case] = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
