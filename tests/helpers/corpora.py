"""Real text for tests: gensim's Lee background news articles, and JSON-lines files written from records."""

from __future__ import annotations

import json


def lee_articles(n: int | None = None) -> list[str]:
    """The 300 Lee background news articles (one per line of gensim's lee_background.cor), or the first n."""
    from retromae_ds.data.demo_corpus import iter_lee_articles

    articles = list(iter_lee_articles())
    return articles[:n] if n else articles


def ragged_articles(n: int) -> list[str]:
    """The first `n` Lee articles cut to 5-200 words: blocks from a few tokens to full at L = 64."""
    cuts = [5, 12, 30, 60, 200]
    return [" ".join(a.split()[:cuts[i % len(cuts)]]) for i, a in enumerate(lee_articles(n))]


def write_jsonl(path, records) -> str:
    """Write one JSON object per line; ``records`` may hold dicts or ready-made strings."""
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(record if isinstance(record, str) else json.dumps(record, ensure_ascii=False))
            f.write("\n")
    return str(path)
