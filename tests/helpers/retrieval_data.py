"""Retrieval fixtures: query-passage pairs cut from Lee news articles (the first sentence asks for the rest),
written as a pairs file or a BEIR folder, and a tiny random encoder folder to evaluate or fine-tune."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from tests.helpers.corpora import lee_articles
from tests.helpers.tiny_run import TINY_BERT, minilm_path


def lee_pairs(start: int, stop: int) -> list[dict]:
    """{"query": first sentence, "passage": the rest} of Lee articles start..stop-1 with 3+ sentences; an
    article whose first sentence or rest repeats an earlier row's is left out (the set repeats a few)."""
    rows, seen = [], set()
    for article in lee_articles()[start:stop]:
        sentences = article.split(". ")
        query, passage = sentences[0], ". ".join(sentences[1:])
        if len(sentences) >= 3 and query not in seen and passage not in seen:
            rows.append({"query": query, "passage": passage})
            seen.update((query, passage))
    return rows


def write_pairs(path, rows: list[dict], fields=("query", "passage")) -> str:
    """``rows`` as a .jsonl, .tsv or .csv file (by the suffix of ``path``) with the columns ``fields``."""
    path = Path(path)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({f: r[f] for f in fields}) + "\n" for r in rows))
    else:
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, delimiter="\t" if path.suffix == ".tsv" else ",")
            writer.writerow(fields)
            writer.writerows([[r[f] for f in fields] for r in rows])
    return str(path)


def write_beir(folder, rows: list[dict], split: str = "test") -> str:
    """The pairs as a BEIR folder: passage i is doc "d{i}", query i is "q{i}" with qrel grade 1."""
    folder = Path(folder)
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": r["passage"]}) + "\n"
                                                 for i, r in enumerate(rows)))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": r["query"]}) + "\n"
                                                  for i, r in enumerate(rows)))
    (folder / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\td{i}\t1\n" for i in range(len(rows))))
    return str(folder)


def tiny_encoder_dir(root, name: str = "tiny_encoder", seed: int = 0) -> str:
    """A random-init tiny BERT (TINY_BERT, no dropout) with the MiniLM tokenizer, saved as a Hugging Face folder."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = Path(root) / name
    torch.manual_seed(seed)
    config = {k: v for k, v in TINY_BERT.items() if k not in ("architectures", "model_type")}
    BertModel(BertConfig(**{**config, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
              ).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(folder)
    return str(folder)
