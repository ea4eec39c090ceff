"""Per-sample pure-Python reference of the RetroMAE masks (the published collator's semantics).

`retromae_ds.data.masking.MaskGenerator` draws the same distribution with batched torch ops; this
module spells it out with plain loops over samples, words and decoder rows so that tests can compare
the two statistically and structurally, and `bench/bench_model.py` can time the speed-up. It lives in
scripts/ on purpose: nothing in the package depends on it (so the wheel leaves it out), and a benchmark
importing it imports no test module.

Semantics (the published collator: `RetroMAECollator` in FlagEmbedding's
`FlagEmbedding/baai_general_embedding/retromae_pretrain/data.py`): a sample is [CLS] t1..tn [SEP]; a
whole-word draw with ratio p covers at most max(1, round((n + 2) * p)) tokens, visiting the words in
random order and taking a word only if it still fits. The encoder gets one draw, corrupted 80% [MASK] / 10% random
non-special id / 10% unchanged. The decoder gets a fresh draw per attention row plus the row's own
position; [CLS] and [SEP] are never drawn and padding is never visible. With `pool=K` (the published
collator's scheme, K = 128 there) a sample instead draws min(n + 2, K) masks and every row takes a
uniformly random one of them.
"""

from __future__ import annotations

import random

import torch

IGNORE_INDEX = -100


def reference_words(ids: list[int], continuation: list[bool]) -> list[list[int]]:
    """Word spans as sequence positions (1-based: position 0 is [CLS]) of a block's ids.

    The block's first token always starts a word, whatever the table says.
    """
    words: list[list[int]] = []
    for offset, token in enumerate(ids):
        if words and continuation[token]:
            words[-1].append(offset + 1)
        else:
            words.append([offset + 1])
    return words


def reference_draw(words: list[list[int]], n_tokens: int, ratio: float, rng: random.Random) -> set[int]:
    """One greedy whole-word draw: the set of positions it covers."""
    budget = max(1, round(n_tokens * ratio))
    order = list(words)
    rng.shuffle(order)
    chosen: list[int] = []
    for word in order:
        if len(chosen) >= budget:
            break
        if len(chosen) + len(word) > budget:
            continue
        chosen.extend(word)
    return set(chosen)


def reference_sample(ids: list[int], continuation: list[bool], seq_len: int, cls_id: int, sep_id: int, pad_id: int,
                     mask_id: int, replacement_ids: list[int], enc_ratio: float, dec_ratio: float,
                     rng: random.Random, pool: int = 0) -> dict:
    """The six outputs of one sample as Python lists (decoder mask: list of rows, True = visible)."""
    n = len(ids)
    seq = [cls_id] + list(ids) + [sep_id] + [pad_id] * (seq_len - n - 2)
    words = reference_words(ids, continuation)

    masked = reference_draw(words, n + 2, enc_ratio, rng)
    enc_ids, enc_labels = list(seq), [IGNORE_INDEX] * seq_len
    for pos in sorted(masked):
        enc_labels[pos] = seq[pos]
        roll = rng.random()
        if roll < 0.8:
            enc_ids[pos] = mask_id
        elif roll < 0.9:
            enc_ids[pos] = rng.choice(replacement_ids)

    visible = [[False] * seq_len for _ in range(seq_len)]
    members = [reference_draw(words, n + 2, dec_ratio, rng) for _ in range(min(n + 2, pool))]
    for row in range(n + 2):
        hidden = set(rng.choice(members)) if members else reference_draw(words, n + 2, dec_ratio, rng)
        hidden.add(row)
        visible[row][: n + 2] = [col not in hidden for col in range(n + 2)]

    return {"encoder_input_ids": enc_ids,
            "encoder_attention_mask": [1] * (n + 2) + [0] * (seq_len - n - 2),
            "encoder_labels": enc_labels,
            "decoder_input_ids": seq,
            "decoder_attention_mask": visible,
            "decoder_labels": [IGNORE_INDEX] + list(ids) + [IGNORE_INDEX] * (seq_len - n - 1)}


def reference_masks(tokens_list: list[list[int]], continuation: list[bool], cls_id: int, sep_id: int, pad_id: int,
                    mask_id: int, replacement_ids: list[int], rng: random.Random, enc_ratio: float = 0.3,
                    dec_ratio: float = 0.5, pool: int = 0) -> dict[str, torch.Tensor]:
    """The per-sample Python version of `MaskGenerator.__call__`: same keys, shapes and dtypes.

    `tokens_list` holds blocks of ids without specials; L = longest block + 2 (no rounding, unlike
    `collate_blocks`); all randomness comes from `rng`. `pool`: decoder draws per sample (0 = one per row).
    """
    seq_len = max(len(block) for block in tokens_list) + 2
    samples = [reference_sample(list(block), continuation, seq_len, cls_id, sep_id, pad_id, mask_id,
                                replacement_ids, enc_ratio, dec_ratio, rng, pool) for block in tokens_list]
    out = {key: torch.tensor([sample[key] for sample in samples]) for key in samples[0]}
    out["decoder_attention_mask"] = out["decoder_attention_mask"].bool()
    return out
