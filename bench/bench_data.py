"""Data-path throughput: `prepare` on 1 vs N processes, and random vs sequential block reads.

    python -m bench.bench_data                    # demo text x2 (~1.4M tokens), N = all CPUs
    python -m bench.bench_data --repeat 1 --num-proc 2 --reads 100000

The corpus is the demo text (gensim's Wikipedia sample + Lee news) written `--repeat` times to a
.jsonl file, tokenized with the MiniLM tokenizer at max_seq_len 512. Prints one JSON object:
prepare tokens/s for 1 and N processes and their ratio; read blocks/s and tokens/s for random and
sequential access through IndexedDataset (memory-mapped, zero-copy) and for the same access pattern
on an in-memory copy; the ratios are against baselines measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def write_corpus(path: str, repeat: int) -> int:
    from retromae_ds.data.demo_corpus import iter_demo_documents

    documents = [d for d in iter_demo_documents() if d.strip()]
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(repeat):
            for text in documents:
                f.write(json.dumps({"text": text}) + "\n")
    return len(documents) * repeat


def time_prepare(corpus: str, tokenizer_path: str, prefix: str, num_proc: int) -> dict:
    from retromae_ds.data.prepare import prepare_files

    started = time.perf_counter()
    summary = prepare_files([corpus], tokenizer_path, prefix, max_seq_len=512, num_proc=num_proc, progress=False,
                            overwrite=True)
    wall = time.perf_counter() - started
    return {"num_proc": num_proc, "seconds": round(wall, 3), "tokens": summary["num_tokens"],
            "tokens_per_s": round(summary["num_tokens"] / wall), "blocks": summary["num_blocks"]}


def time_reads(dataset, order) -> dict:
    """Touch every id of the blocks in ``order`` (sum them) so that the pages are really read."""
    started = time.perf_counter()
    tokens = checksum = 0
    for i in order:
        block = dataset[int(i)]
        tokens += len(block)
        checksum += int(block.sum())
    seconds = time.perf_counter() - started
    return {"blocks_per_s": round(len(order) / seconds), "tokens_per_s": round(tokens / seconds), "_sum": checksum}


class InMemory:
    """The same blocks as numpy arrays in RAM: the best case a memory map can approach."""

    def __init__(self, dataset) -> None:
        self.blocks = [dataset[i].copy() for i in range(len(dataset))]

    def __getitem__(self, i):
        return self.blocks[i]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=2, help="copies of the demo text in the corpus")
    ap.add_argument("--num-proc", type=int, default=0, help="N for the multi-process run (0: all CPUs, at most 8)")
    ap.add_argument("--reads", type=int, default=200_000, help="block reads per access pattern")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import numpy as np

    from retromae_ds.data.demo_corpus import minilm_path
    from retromae_ds.data.indexed import IndexedDataset
    from retromae_ds.data.prepare import default_num_proc

    num_proc = args.num_proc or default_num_proc()
    with tempfile.TemporaryDirectory() as work:
        corpus = os.path.join(work, "corpus.jsonl")
        documents = write_corpus(corpus, args.repeat)
        megabytes = round(os.path.getsize(corpus) / 1e6, 2)
        prefix = os.path.join(work, "bench")
        tokenizer = minilm_path()
        time_prepare(corpus, tokenizer, prefix, 1)  # warm-up: imports, file cache
        one = time_prepare(corpus, tokenizer, prefix, 1)
        many = time_prepare(corpus, tokenizer, prefix, num_proc)

        ds = IndexedDataset(prefix)
        rng = np.random.default_rng(args.seed)
        random_order = rng.integers(0, len(ds), args.reads)
        sequential_order = np.arange(args.reads) % len(ds)
        in_memory = InMemory(ds)
        reads = {
            "mmap_sequential": time_reads(ds, sequential_order),
            "mmap_random": time_reads(ds, random_order),
            "ram_random": time_reads(in_memory, random_order),
        }
        assert reads["mmap_random"]["_sum"] == reads["ram_random"]["_sum"]
        for r in reads.values():
            del r["_sum"]

    result = {
        "bench": "data",
        "cpus": os.cpu_count(),
        "corpus": {"documents": documents, "megabytes": megabytes, "tokens": one["tokens"], "blocks": one["blocks"],
                   "max_seq_len": 512, "tokenizer": "MiniLM WordPiece (uncased)"},
        "prepare": {"1_proc": one, f"{num_proc}_proc": many,
                    "speedup_vs_1_proc": round(many["tokens_per_s"] / one["tokens_per_s"], 3)},
        "read": {**reads,
                 "random_vs_sequential": round(reads["mmap_random"]["blocks_per_s"]
                                               / reads["mmap_sequential"]["blocks_per_s"], 3),
                 "mmap_vs_ram_random": round(reads["mmap_random"]["blocks_per_s"]
                                             / reads["ram_random"]["blocks_per_s"], 3)},
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
