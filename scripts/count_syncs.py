"""Count the operations that would make the host wait for a GPU, per training step (CPU is enough).

    python -m scripts.count_syncs [--tree DIR] [--steps 8] -- TRAINER FLAGS...      # prints JSON

Runs the trainer in this process for the given flags with scripts/sync_watch.py recording, per step
(one `next_global_batch` to the next: the step's logging included), every would-be sync and the
package whose code asked for it (retromae_ds, transformers, deepspeed). The mask generator takes its
accelerator path. `--tree` runs another checkout of retromae_ds (e.g. a `git worktree` of an older
commit) with this checkout's watch: the before/after count of issue 9.
"""

from __future__ import annotations

import argparse
import collections
import importlib.machinery
import importlib.util
import json
import os
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_package_from(tree: str) -> None:
    """Import `retromae_ds` from TREE (its submodules then follow the package's own path), whatever
    copy sys.path would find: --tree swaps the package under test, the watch stays this checkout's."""
    if "retromae_ds" in sys.modules:
        raise SystemExit("count_syncs: retromae_ds was imported before --tree could choose it")
    spec = importlib.machinery.PathFinder.find_spec("retromae_ds", [tree])
    if spec is None:
        raise SystemExit(f"count_syncs: no retromae_ds package in {tree}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["retromae_ds"] = module
    spec.loader.exec_module(module)


def main() -> int:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", default=HERE, help="checkout whose retromae_ds runs (default: this one)")
    ap.add_argument("--steps", type=int, default=8, help="steps recorded")
    ap.add_argument("--log-interval", type=int, default=4, help="passed to the trainer too")
    args = ap.parse_args(argv[:split])
    import_package_from(os.path.abspath(args.tree))
    from retromae_ds.data.masking import MaskGenerator
    from retromae_ds.data.sampler import GlobalBatchSampler
    from scripts.sync_watch import SyncWatch

    MaskGenerator.sync_free = True
    watch = SyncWatch(cuda_debug=True)
    original, peeking = GlobalBatchSampler.next_global_batch, [False]
    if hasattr(GlobalBatchSampler, "peek_global_batch"):  # peeking calls next_global_batch: not a new step
        original_peek = GlobalBatchSampler.peek_global_batch

        def peek(self, n):
            peeking[0] = True
            try:
                return original_peek(self, n)
            finally:
                peeking[0] = False

        GlobalBatchSampler.peek_global_batch = peek

    def next_global_batch(self, n):
        if not peeking[0]:
            watch.window += 1
            if watch.window == 1:
                watch.__enter__()
            elif watch.window == args.steps + 1:
                watch.__exit__(None, None, None)
        return original(self, n)

    GlobalBatchSampler.next_global_batch = next_global_batch
    from retromae_ds.engine.trainer import run_cli

    rc = run_cli(argv[split + 1:] + ["--log-interval", str(args.log_interval),
                                     "--max-steps", str(args.steps + 2)])
    per_step = collections.defaultdict(collections.Counter)
    for r in watch.records:
        per_step[r["window"]][r["package"]] += 1
    log_steps = [s for s in range(1, args.steps + 1) if s % args.log_interval == 0]
    quiet = [s for s in range(1, args.steps + 1) if s not in log_steps]

    def mean(steps, package=None):
        return sum(sum(per_step[s].values()) if package is None else per_step[s][package] for s in steps) / len(steps)

    print(json.dumps({
        "tree": os.path.abspath(args.tree), "rc": rc, "flags": argv[split + 1:],
        "syncs_per_step_without_logging": mean(quiet),
        "by_package_without_logging": {p: mean(quiet, p) for p in ("retromae_ds", "transformers", "deepspeed", "other")},
        "syncs_per_log_step": mean(log_steps) if log_steps else None,
        "where": collections.Counter(f"{r['package']} {r['op']} @ {r['where']}" for r in watch.records
                                     if r["window"] in quiet).most_common(),
    }, indent=1))
    return rc


if __name__ == "__main__":
    sys.exit(main())
