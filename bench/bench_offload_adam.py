"""The optimizer step of an offloaded run (ZeRO + offload_optimizer): DeepSpeed's CPU Adam vs torch's AdamW.

With the optimizer offloaded, the Adam step runs on the host over fp32 master weights; this is the step
`zero3_offload.json` pays on every optimizer step. Both optimizers update the same BERT-base-sized
flat fp32 buffers (one rank's share with --shards N); JSON on stdout with the ratio.
    python -m bench.bench_offload_adam [--params 110e6] [--shards 1] [--repeats 5]
DeepSpeedCPUAdam JIT-builds on first use (~80 s; cached under TORCH_EXTENSIONS_DIR).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    import torch
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=110e6)
    ap.add_argument("--shards", type=int, default=1, help="ranks sharing the optimizer state (ZeRO)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    n = int(args.params) // args.shards
    results = {}
    for name in ("torch_adamw", "deepspeed_cpu_adam"):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(n) * 0.02)
        p.grad = torch.randn(n) * 1e-3
        kw = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
        opt = torch.optim.AdamW([p], **kw) if name == "torch_adamw" else DeepSpeedCPUAdam([p], adamw_mode=True, **kw)
        opt.step()  # allocate state (and JIT-build for CPU Adam)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t)
        results[name] = statistics.median(times)
    print(json.dumps({"params_per_rank": n, "threads": torch.get_num_threads(), "step_seconds_median": results,
                      "cpu_adam_speedup_vs_torch_adamw": results["torch_adamw"] / results["deepspeed_cpu_adam"]},
                     indent=1))


if __name__ == "__main__":
    main()
