"""Write a ragged corpus (JSONL): passage-length documents with a tail of long ones, cut from the demo text.

Why: the demo corpus is Wikipedia articles and news stories, packed into mostly full blocks, so its
batches are nearly all real tokens. Corpora of passages, abstracts or Q&A (MS MARCO, the RetroMAE
paper's second corpus: ~60-80 tokens a passage) give short blocks, and a batch padded to its longest
member is then mostly padding. This script makes such a corpus from real text that installs from PyPI
(the demo's gensim Wikipedia sample and Lee news), so the padding benchmark needs no download.

Lengths, in words: a log-normal body (median --median-words, spread --sigma; the default median of 55
words is ~70 WordPiece tokens, MS MARCO's passage size) clipped to [8, 400], and a fraction
--long-fraction of long documents of 400-3,000 words (whole articles), all cut in order from the
concatenated demo text (each document is consecutive text; sentences may be cut at its edges).

    python -m scripts.make_ragged_corpus --output data/ragged.jsonl
    retromae-ds prepare --input data/ragged.jsonl --tokenizer "$(python -c 'from retromae_ds.data.demo_corpus \
        import minilm_path as p; print(p())')" --output data/ragged_512 --max-seq-len 512
"""

from __future__ import annotations

import argparse
import json
import sys


def ragged_documents(words: list[str], seed: int, median_words: float, sigma: float, long_fraction: float):
    """Consecutive spans of `words` with passage-like lengths (see the module docstring)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    at = 0
    while at < len(words):
        if rng.random() < long_fraction:
            n = int(rng.integers(400, 3001))
        else:
            n = int(np.clip(round(rng.lognormal(np.log(median_words), sigma)), 8, 400))
        yield " ".join(words[at:at + n])
        at += n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", required=True, help="JSONL file to write ({\"text\": ...} per line)")
    ap.add_argument("--median-words", type=float, default=55.0)
    ap.add_argument("--sigma", type=float, default=0.5)
    ap.add_argument("--long-fraction", type=float, default=0.03)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from retromae_ds.data.demo_corpus import iter_demo_documents

    words = [w for doc in iter_demo_documents() for w in doc.split()]
    count = 0
    with open(args.output, "w", encoding="utf-8") as f:
        for text in ragged_documents(words, args.seed, args.median_words, args.sigma, args.long_fraction):
            f.write(json.dumps({"text": text}) + "\n")
            count += 1
    print(json.dumps({"output": args.output, "documents": count, "words": len(words)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
