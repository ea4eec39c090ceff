"""Peak memory of opening a prepared dataset: the open-time index check, whole index vs in chunks.

    python -m bench.bench_index_open_memory                                  # 20M blocks
    python -m bench.bench_index_open_memory --blocks 100000000 --out bench/results/index_open_memory.json

Why: every rank opens the index (`IndexedDataset`), and its consistency check used to build ~25 bytes
of temporaries per block at once (int64 sizes, their offsets, the scaled offsets, comparison masks):
2.5 GB per rank at 100M blocks, 20 GB on an 8-GPU node at the same moment. It now checks
`CHECK_CHUNK_BLOCKS` blocks at a time. "before" is the old whole-index check, kept below as
`whole_index_check`; "after" is the package's `_check_arrays`.

Method: a synthetic dataset is written with the package's own `IndexedDatasetWriter` (blocks of 1-4 ids,
4 blocks per document, all ids 0) in a temporary folder, then each case opens it in a fresh subprocess:
- rss: the child resets its peak RSS (`5` into /proc/self/clear_refs; ru_maxrss when that is refused),
  opens the dataset and reports `peak_mb` = VmHWM minus VmRSS before the open. That peak includes the
  index pages the check reads through the memory map (`file_mb`, the growth of RssFile): they live in the
  page cache, shared by all ranks of a node, and are the same for both cases, so `peak_minus_file_mb`
  estimates the private peak (the temporaries) from below.
- tracemalloc: a second child traces the open (numpy's buffers are traced) and reports the peak of
  what it allocated, the temporaries alone.
Prints (and with --out writes) one JSON object with both cases and the before/after ratios.

Measured (2-core shared CPU machine, numpy 2.4; peak = RSS growth during the open, file = index pages):
  20M blocks (bench/results/index_open_memory.json), open 0.23 s -> 0.16 s:
    before  peak  706 MB = file  267 + 439 private, tracemalloc  477 MB (25.0 bytes per block)
    after   peak  276 MB = file  267 +   9 private, tracemalloc    9 MB (one 1M-block chunk)
  100M blocks, open 1.5 s -> 0.4 s:
    before  peak 3529 MB = file 1336 + 2194 private, tracemalloc 2384 MB
    after   peak 1344 MB = file 1336 +    9 private, tracemalloc    9 MB
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKS_PER_DOCUMENT = 4


def whole_index_check(self) -> None:
    """The check before chunking (the array checks of `IndexedDataset._check_arrays` as they were):
    every temporary spans the whole index."""
    import numpy as np

    from retromae_ds.data.indexed import dataset_paths

    idx = dataset_paths(self.prefix)["idx"]
    sizes = self.sizes.astype(np.int64)
    if len(sizes) and sizes.min() < 1:
        raise self._fail(idx, "a block has no ids")
    if int(sizes.sum()) != self.num_tokens:
        raise self._fail(idx, f"block sizes sum to {int(sizes.sum())}, header says {self.num_tokens} ids")
    starts = np.zeros(len(sizes), np.int64)
    np.cumsum(sizes[:-1], out=starts[1:])
    if not np.array_equal(starts * self.dtype.itemsize, self._pointers):
        raise self._fail(idx, "block pointers disagree with block sizes")
    d = self.doc_index
    if d[0] != 0 or d[-1] != len(sizes) or (np.diff(d) < 1).any():
        raise self._fail(idx, "document index is not increasing from 0 to the number of blocks")


def status_kb(*keys: str) -> dict[str, int]:
    """Fields of /proc/self/status in KiB (VmRSS, VmHWM, RssFile, ...)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in keys:
                out[name] = int(value.split()[0])
    return out


def reset_peak_rss() -> bool:
    """Set VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def write_dataset(prefix: str, blocks: int, seed: int = 0) -> dict:
    import numpy as np

    from retromae_ds.data.indexed import IndexedDatasetWriter

    sizes = np.random.default_rng(seed).integers(1, 5, blocks, dtype=np.int32)
    documents, rest = divmod(blocks, BLOCKS_PER_DOCUMENT)
    per_document = np.full(documents + bool(rest), BLOCKS_PER_DOCUMENT, np.int64)
    if rest:
        per_document[-1] = rest
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        writer.add_documents(np.zeros(int(sizes.sum()), np.uint16), sizes, per_document)
        return writer.finalize({"max_seq_len": 6})


def child(prefix: str, case: str, mode: str) -> dict:
    """Open the dataset once in this fresh process and report what the open cost."""
    from retromae_ds.data.indexed import IndexedDataset

    if case == "before":
        IndexedDataset._check_arrays = whole_index_check
    if mode == "tracemalloc":
        import tracemalloc

        tracemalloc.start()
        started = time.perf_counter()
        dataset = IndexedDataset(prefix)
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return {"tracemalloc_peak_mb": round(peak / 2**20, 1), "blocks": len(dataset),
                "traced_open_seconds": round(seconds, 3)}
    fields = ("VmRSS", "VmHWM", "RssFile")
    reset = reset_peak_rss()
    before = status_kb(*fields)
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    dataset = IndexedDataset(prefix)
    seconds = time.perf_counter() - started
    after = status_kb(*fields)
    if reset:
        peak_kb, method = after["VmHWM"] - before["VmRSS"], "VmHWM after clear_refs"
    else:  # a lower bound when the imports' peak was higher than RSS before the open
        peak_kb, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss_before, "ru_maxrss"
    file_kb = after["RssFile"] - before["RssFile"]
    return {"peak_mb": round(peak_kb / 1024, 1), "file_mb": round(file_kb / 1024, 1),
            "peak_minus_file_mb": round((peak_kb - file_kb) / 1024, 1), "open_seconds": round(seconds, 3),
            "peak_method": method, "blocks": len(dataset)}


def run_child(prefix: str, case: str, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.bench_index_open_memory", "--child", os.path.abspath(prefix),
                          "--case", case, "--mode", mode], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"{case}/{mode} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=20_000_000)
    ap.add_argument("--workdir", default=None, help="folder for the synthetic dataset (default: a temp folder)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--case", choices=("before", "after"), help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=("rss", "tracemalloc"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.case, args.mode)))
        return 0

    import numpy as np

    from retromae_ds.data.indexed import CHECK_CHUNK_BLOCKS

    work = tempfile.mkdtemp(prefix="index-open-", dir=args.workdir)
    try:
        prefix = os.path.join(work, "synthetic")
        started = time.perf_counter()
        meta = write_dataset(prefix, args.blocks)
        write_seconds = time.perf_counter() - started
        cases = {case: {**run_child(prefix, case, "rss"), **run_child(prefix, case, "tracemalloc")}
                 for case in ("before", "after")}
        idx_mb = os.path.getsize(prefix + ".idx") / 2**20
    finally:
        shutil.rmtree(work, ignore_errors=True)
    before, after = cases["before"], cases["after"]
    result = {
        "blocks": meta["num_blocks"], "documents": meta["num_documents"], "tokens": meta["num_tokens"],
        "idx_mb": round(idx_mb, 1), "check_chunk_blocks": CHECK_CHUNK_BLOCKS,
        "write_seconds": round(write_seconds, 1), "before": before, "after": after,
        "ratio_before_after": {key: round(before[key] / max(after[key], 0.1), 1)
                               for key in ("peak_mb", "peak_minus_file_mb", "tracemalloc_peak_mb")},
        "bytes_per_block": {case: round(cases[case]["tracemalloc_peak_mb"] * 2**20 / meta["num_blocks"], 2)
                            for case in cases},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
                   f"numpy {np.__version__}",
        "date": time.strftime("%Y-%m-%d"),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
