"""Inputs for the masking and model tests: a synthetic vocabulary (ids 5..49 start words, 50..99 continue
them) with its mask generator and batches, a byte-level BPE trained on the Lee news text, and the word
structure the mask generator finds on the device."""

from __future__ import annotations

import random

import numpy as np
import torch

from retromae_ds.data.masking import MaskGenerator, collate_blocks, mask_rng
from tests.helpers.corpora import lee_articles

# --------------------------------------------------------------------------------------------------
# Synthetic vocabulary: ids 5..49 start words, 50..99 continue them

SPECIALS = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
VOCAB = 100


def synthetic_continuation() -> torch.Tensor:
    table = torch.zeros(VOCAB, dtype=torch.bool)
    table[50:] = True
    return table


def synthetic_block(word_lengths: list[int], rng: random.Random) -> list[int]:
    ids = []
    for length in word_lengths:
        ids.append(rng.randrange(5, 50))
        ids.extend(rng.randrange(50, VOCAB) for _ in range(length - 1))
    return ids


def synthetic_generator(**ratios) -> MaskGenerator:
    return MaskGenerator(synthetic_continuation(), cls_id=2, sep_id=3, pad_id=0, mask_id=4, vocab_size=VOCAB,
                         special_ids=list(SPECIALS.values()), **ratios)


def synthetic_batch(seed: int = 0, lengths=(20, 13, 6, 17), static: bool = False) -> dict:
    """A masked batch; `static`: drawn with the host plan (label capacity; no encoder mask if unpadded)."""
    rng = random.Random(seed)
    blocks = []
    for n in lengths:
        ids = synthetic_block([rng.choice([1, 1, 2, 3]) for _ in range(n)], rng)[:n]
        blocks.append(np.array(ids))
    tokens, lens = collate_blocks(blocks, 0)
    generator = synthetic_generator()
    plan = generator.plan(tokens.numpy(), lens.numpy()) if static else None
    generator.sync_free = static  # the accelerators' path, here on the CPU
    return generator(tokens, lens, mask_rng(seed, 0, 0, "cpu"), plan=plan)


# --------------------------------------------------------------------------------------------------
# A real byte-level vocabulary


def train_byte_level_bpe(folder):
    """A 1,000-token RoBERTa-style byte-level BPE trained on the Lee news text (saved and reloaded)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoTokenizer, RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(lee_articles(), vocab_size=1000, min_frequency=2, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tokenizer = RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                     sep_token="</s>", cls_token="<s>", unk_token="<unk>", pad_token="<pad>",
                                     mask_token="<mask>")
    tokenizer.save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


# --------------------------------------------------------------------------------------------------
# The word structure the generator finds on the device


def device_word_lengths(gen: MaskGenerator, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The word lengths [B, words] the generator finds on the device, by its own word-structure code
    path: a call without a plan, with draw_whole_words recording its inputs (the encoder's draw)."""
    import retromae_ds.data.masking as masking

    seen = []
    original = masking.draw_whole_words

    def recording(word_len, *args, **kwargs):
        seen.append(word_len)
        return original(word_len, *args, **kwargs)

    masking.draw_whole_words = recording
    try:
        gen(tokens, lengths, mask_rng(0, 0, 0, "cpu"))
    finally:
        masking.draw_whole_words = original
    return seen[0]                                              # the encoder's draw: one row per sample


def device_word_numbers(gen: MaskGenerator, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[int, int]:
    """(most words in a sample, longest word) as the generator finds them on the device."""
    word_len = device_word_lengths(gen, tokens, lengths)
    return int((word_len > 0).sum(1).max()), int(word_len.max())
