"""Where a document may be cut: sentence ends found in its text, mapped onto its tokens, and greedy
packing of whole sentences into blocks of at most ``capacity`` tokens."""

from __future__ import annotations

import re
from typing import Iterable

# Sentence ends, found without nltk: (1) the last visible character before a line break;
# (2) runs of . ! ? (plus closing quotes/brackets) followed by whitespace and a character that is not
# an ASCII lower-case letter, so "e.g. the" is not cut; (3) CJK full stops. Abbreviations followed by
# a capital ("Dr. Who") are cut too: sentences only decide where a block may end, never which ids
# are stored, so an occasional wrong cut costs a little packing quality and nothing else.
SENTENCE_END = re.compile(r"\S(?=[^\S\n]*\n)|[.!?]+[\"'\u201d\u2019)\]]*(?=\s+[^\sa-z])|[\u3002\uff01\uff1f]+")


def sentence_end_chars(text: str) -> list[int]:
    """Character offsets just past each sentence end (see SENTENCE_END)."""
    return [m.end() for m in SENTENCE_END.finditer(text)]


def sentence_starts(token_starts, ends: list[int], num_tokens: int):
    """Token indices where a new sentence begins: the first token starting at or after each end.

    Working on the offsets of ONE tokenization of the whole document means the stored ids are exactly
    the tokenizer's ids for the document, for WordPiece, SentencePiece and byte-level BPE alike.
    """
    import numpy as np

    cuts = np.searchsorted(np.maximum.accumulate(token_starts), ends, side="left")
    return np.unique(cuts[(cuts > 0) & (cuts < num_tokens)])


def pack_blocks(num_tokens: int, starts: Iterable[int], capacity: int) -> list[int]:
    """Block sizes for one document: greedy packing of whole sentences into blocks of <= capacity.

    A block ends at a sentence start when the next sentence would not fit. A sentence longer than
    ``capacity`` is cut into full blocks; its tail opens the next block, which later sentences fill.
    """
    sizes = []
    block_start = sentence_start = 0
    for sentence_end in list(starts) + [num_tokens]:
        if sentence_end - block_start > capacity:
            if sentence_start > block_start:
                sizes.append(sentence_start - block_start)
                block_start = sentence_start
            while sentence_end - block_start > capacity:
                sizes.append(capacity)
                block_start += capacity
        sentence_start = sentence_end
    if num_tokens > block_start:
        sizes.append(num_tokens - block_start)
    return sizes
