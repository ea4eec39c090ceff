"""Write a synthetic prepared dataset (random token ids, full-length blocks) for throughput runs.

Why: GPU checks and benchmarks need data of exactly the shape being measured, on machines that may not
have the `datasets` library or a corpus. The ids are random word pieces from the given tokenizer's
vocabulary, so the tokenizer check at training time still applies.

    python -m scripts.make_synthetic_data --tokenizer DIR --output PREFIX [--blocks 4096] [--seq-len 512]

`--ragged`: one block per document, of passage-like length instead of full (the length distribution of
scripts/make_ragged_corpus.py: a log-normal body around 70 tokens, 3% full blocks), for the padding rows.
"""

import argparse
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--output", required=True, help="dataset PREFIX")
    ap.add_argument("--blocks", type=int, default=4096)
    ap.add_argument("--blocks-per-doc", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512, help="max_seq_len incl. [CLS]/[SEP]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ragged", action="store_true", help="passage-length blocks, one per document")
    args = ap.parse_args()

    import numpy as np
    from transformers import AutoTokenizer

    from retromae_ds.data.indexed import IndexedDatasetWriter, choose_dtype, tokenizer_fingerprint

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    fp = tokenizer_fingerprint(tok)
    special = set(tok.all_special_ids)
    pool = np.array([i for i in range(fp["vocab_size"]) if i not in special], dtype=np.int64)
    rng = np.random.default_rng(args.seed)
    block = args.seq_len - 2
    n_docs = args.blocks if args.ragged else args.blocks // args.blocks_per_doc
    with IndexedDatasetWriter(args.output, choose_dtype(fp["vocab_size"])) as w:
        for _ in range(n_docs):
            if args.ragged:
                size = block if rng.random() < 0.03 else int(np.clip(rng.lognormal(np.log(70), 0.5), 8, block))
                w.add_document(rng.choice(pool, size=size), [size])
                continue
            ids = rng.choice(pool, size=block * args.blocks_per_doc)
            w.add_document(ids, [block] * args.blocks_per_doc)
        w.finalize({"tokenizer": fp, "max_seq_len": args.seq_len, "sources": ["synthetic"],
                    "dropped_empty_documents": 0, "skipped_bad_records": 0})
    shape = "passage-length blocks" if args.ragged else f"blocks of {block} tokens"
    print(f"wrote {n_docs if args.ragged else n_docs * args.blocks_per_doc} {shape} to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
