"""What do `retromae-ds eval --pairs` over 100k passages and `retromae-ds probe` on 20k pairs cost?

    python -m bench.bench_retrieval                      # both: eval over 100,000 passages, probe on 20,000 pairs
    python -m bench.bench_retrieval --passages 20000 --skip-probe

Eval: passages are 60-word windows of gensim's Wikipedia sample (each window starts at another word, so no
two are equal), queries the first 8 words of every 10th passage; bert-tiny at random init with MiniLM's
vocabulary (the model does not change what is measured: the streaming and the chunked search). Reports the
seconds per stage, the peak resident memory (ru_maxrss) of a fresh process, the search's own bound
(`memory_bound`), and the memory a full queries x passages score matrix would take, for the ratio.

Probe: `retromae-ds probe` with its defaults (600 steps of 32 pairs, lr 5e-5, 128 tokens) on bert-tiny from
20,000 pairs of the same kind, evaluated on 2,000 other pairs before and after: the wall time of the whole
command (the issue's budget: 5 minutes on 2 CPU cores). Each part runs in its own process, so peak memory
is that part's. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def wiki_words() -> list[str]:
    from retromae_ds.data.demo_corpus import iter_wikipedia_articles

    return " ".join(iter_wikipedia_articles()).split()


def write_pairs(path: Path, words: list[str], count: int, offset: int, window: int = 60) -> int:
    """``count`` pairs: passage = ``window`` words starting at word ``offset + 7 i`` (wrapping), query = the
    passage's first 8 words, shuffled among the next ones, so a query is not a verbatim prefix."""
    import random

    rng = random.Random(offset)
    n = len(words)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(count):
            start = (offset + 7 * i) % (n - window)
            passage = words[start:start + window]
            query = passage[:4] + rng.sample(passage[4:20], 4)
            f.write(json.dumps({"query": " ".join(query), "passage": " ".join(passage)}) + "\n")
    return count


def tiny_encoder(folder: Path) -> Path:
    import torch
    from transformers import AutoModel, AutoTokenizer

    from retromae_ds.data.demo_corpus import minilm_path
    from retromae_ds.model.presets import preset_config

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    AutoModel.from_config(preset_config("bert-tiny", tokenizer, 128)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return time.perf_counter() - start, res.stdout


def eval_part(root: Path, encoder: Path, words: list[str], passages: int) -> dict:
    pairs = root / "eval_pairs.jsonl"
    write_pairs(pairs, words, passages, offset=0)
    # as a BEIR folder: every passage is a candidate, every 10th one's query is asked
    beir = root / "beir"
    (beir / "qrels").mkdir(parents=True)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    with open(beir / "corpus.jsonl", "w") as c, open(beir / "queries.jsonl", "w") as q, \
            open(beir / "qrels" / "test.tsv", "w") as r:
        r.write("query-id\tcorpus-id\tscore\n")
        for i, row in enumerate(rows):
            c.write(json.dumps({"_id": f"d{i}", "text": row["passage"]}) + "\n")
            if i % 10 == 0:
                q.write(json.dumps({"_id": f"q{i}", "text": row["query"]}) + "\n")
                r.write(f"q{i}\td{i}\t1\n")
    out = root / "eval.json"
    seconds, stdout = timed([sys.executable, "-m", "retromae_ds.cli", "eval", str(encoder), "--beir", str(beir),
                             "--no-lee", "--no-bm25", "--bootstrap", "0", "--max-length", "128", "--batch-size", "64",
                             "--json", str(out)])
    metrics = json.loads(out.read_text())["metrics"]
    memory = next(line for line in stdout.splitlines() if line.strip().endswith("Python)"))
    queries = metrics["beir/num_queries"]
    return {"passages": passages, "queries": queries, "seconds": round(seconds, 1), "memory_line": memory.strip(),
            "score_matrix_mib": round(4 * passages * queries / 2**20), "ndcg10_cls": metrics["beir/ndcg10_cls"]}


def probe_part(root: Path, encoder: Path, words: list[str], pairs: int) -> dict:
    train, held = root / "probe_train.jsonl", root / "probe_eval.jsonl"
    write_pairs(train, words, pairs, offset=3)
    write_pairs(held, words, 2000, offset=len(words) // 2)
    seconds, stdout = timed([sys.executable, "-m", "retromae_ds.cli", "probe", str(encoder), "--train-pairs",
                             str(train), "--pairs", str(held), "--out", str(root / "probe")])
    return {"train_pairs": pairs, "eval_pairs": 2000, "seconds": round(seconds, 1),
            "summary": stdout.strip().splitlines()[-2] if stdout.strip() else ""}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passages", type=int, default=100_000)
    ap.add_argument("--pairs", type=int, default=20_000)
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--skip-probe", action="store_true")
    args = ap.parse_args(argv)
    result = {}
    with tempfile.TemporaryDirectory(prefix="bench-retrieval-") as tmp:
        root = Path(tmp)
        words = wiki_words()
        encoder = tiny_encoder(root / "bert_tiny")
        if not args.skip_eval:
            result["eval"] = eval_part(root, encoder, words, args.passages)
        if not args.skip_probe:
            result["probe"] = probe_part(root, encoder, words, args.pairs)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
