"""RetroMAE masks generated on the batch's device: whole-word masking for every tokenizer family.

A training batch arrives as packed blocks of token ids *without* special tokens (what `prepare`
stores). `MaskGenerator` turns it into the six tensors `RetroMAEForPretraining.forward` takes:

    encoder_input_ids       [B, L]     [CLS] t1..tn [SEP] [PAD].., ~30% of whole words corrupted 80/10/10
    encoder_attention_mask  [B, L]     1 on [CLS]..[SEP]
    encoder_labels          [B, L]     original id where a word was chosen, -100 elsewhere
    decoder_input_ids       [B, L]     the unmasked ids
    decoder_attention_mask  [B, L, L]  bool, True = row i may attend to column j
    decoder_labels          [B, L]     original id at t1..tn, -100 on [CLS], [SEP] and padding

with L = Lmax + 2. Semantics follow the published reference (`RetroMAECollator` in FlagEmbedding's
`FlagEmbedding/baai_general_embedding/retromae_pretrain/data.py`, on transformers' whole-word masking):
a whole-word draw with ratio p covers at most `max(1, round((n + 2) * p))` tokens (n + 2 counts the
[CLS]/[SEP] like the reference, which measures the encoded sequence); words are visited in random
order and a word is taken only if it still fits. A word longer than `MAX_WORD_TOKENS` (a run of text
without spaces: Chinese, Japanese, Thai) counts as consecutive words of at most that many tokens, so it
is masked like other text instead of never fitting the budget. Each decoder attention row hides one
whole-word draw (ratio `decoder_mask_ratio`) plus itself; [CLS] (column 0) is never drawn, so every
other row sees it; padding is never visible.

Decoder draws come from a pool, like the reference: `decoder_mask_pool` = K draws per sample (default
128) and every row picks one member uniformly at random. A row's mask has exactly the distribution of a
fresh draw, but the work is O(K * words) per sample instead of O(L * words) (at L = 8,192 on the CPU:
about 80 MB and 0.5 s per sample instead of 2.1 GB and several seconds; bench/bench_masks.py).
Sample b's rows pick among its first min(K, n_b + 2) members (the reference's `min(len(tokens), 128)`),
so even the correlation between rows matches the reference; the batch draws min(K, L) members per
sample, so a pool never costs more than one draw per row.
`decoder_mask_pool=0` gives every row its own draw (the pre-pool behaviour, bit for bit).

Vectorised draw: every row gives each of its words a random key; sorting the keys yields the random
visiting order, a cumulative sum of the word lengths in that order finds the words that fit before
the first one that does not, and a few rounds of "first later word that still fits the remaining
budget" finish the greedy walk exactly (each round adds one word per row, and the remaining budget is
below the length of the word that stopped the prefix, so there are few rounds). Rows are independent,
so the encoder (B rows) and the decoder pool (B * K rows, or B * L without a pool) use the same code;
nothing loops over tokens.

Host syncs. Two numbers fix tensor shapes and loop bounds: the most words in a sample and the
longest word. Given a `BatchPlan` (`MaskGenerator.plan`, computed with numpy from the host copy of the
blocks before they are sent, e.g. in the loader thread), the call makes no host sync at all; without
one it reads both from the device in one sync. With a pool on an accelerator, the greedy rounds run a
fixed `longest - 1` times over all rows (each round takes one word per row that still has a fitting
one, and the budget left after the prefix is below the longest word), so there is no per-round sync;
words are capped at `MAX_WORD_TOKENS`, so that is at most 7 rounds, even for text without spaces.
Without a pool (B * L rows: too many for full-width rounds) and on the CPU (where a sync is free) the
rounds compact the unfinished rows instead, one sync per round. Both loops give the same draw
(`MaskGenerator.sync_free` picks). A plan also makes the batch static for the model: the encoder's
attention mask is None when no sample is padded (no padding check, the flash kernel applies) and
`encoder_label_capacity` bounds the masked positions, so the MLM head selects rows with a fixed shape.

Randomness comes only from the `torch.Generator` passed in; `mask_rng(seed, step, rank, device)`
builds it from the run seed, the global step and the rank (or micro-batch number), so masks are
identical after a resume and independent of the number of data-loader workers.
"""

from __future__ import annotations

import hashlib
import operator
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from retromae_ds.errors import UserError

IGNORE_INDEX = -100

WORDPIECE = "wordpiece"
SENTENCEPIECE = "sentencepiece"
BYTE_LEVEL_BPE = "byte-level-bpe"
WORD_LEVEL = "word-level"

# The most tokens a word may have; a longer run is cut into words of this many tokens from its start.
# Without spaces (Chinese, Japanese, Thai under SentencePiece or byte-level BPE) a whole clause or
# paragraph is one "word" of hundreds of tokens: longer than its sample's budget, it is never masked (that
# text trains nothing), and it sets the sync-free draw's `longest - 1` rounds. Why 8: words of spaced text
# are much shorter (BERT's uncased WordPiece on the Lee news corpus: 96% one piece, 0.02% more than 4,
# none more than 6), so their masks stay bit for bit what they were; a piece of 8 still fits the
# encoder's budget from 25-token samples up (round(25 * 0.3) = 8) and the decoder's from 15; a capped run
# misses the ratio by less than one piece; and the greedy rounds stay at most 7.
MAX_WORD_TOKENS = 8


def collate_blocks(blocks: Sequence[np.ndarray], pad_id: int, pad_to_multiple_of: int | None = 8,
                   max_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack blocks of ids (no specials) into a padded [B, Lmax] int64 tensor plus their lengths [B].

    Lmax is the longest block, rounded up so that Lmax + 2 (the model's length once [CLS] and [SEP]
    are added) is a multiple of `pad_to_multiple_of`; `max_tokens` caps that rounding (give the
    model's max_seq_len - 2 so padding never exceeds its position table).
    """
    if len(blocks) == 0:
        raise ValueError("collate_blocks needs at least one block")
    lengths = [len(block) for block in blocks]
    width = padded_width(max(lengths), pad_to_multiple_of, max_tokens)
    tokens = np.full((len(blocks), width), pad_id, dtype=np.int64)
    for row, block in enumerate(blocks):
        tokens[row, : len(block)] = block
    return torch.from_numpy(tokens), torch.tensor(lengths, dtype=torch.long)


def padded_width(longest: int, pad_to_multiple_of: int | None = 8, max_tokens: int | None = None) -> int:
    """The block width `collate_blocks` pads a batch to (see there): `longest`, rounded up so that the
    width + 2 is a multiple of `pad_to_multiple_of`, the rounding capped at `max_tokens`."""
    if not pad_to_multiple_of or pad_to_multiple_of <= 1:
        return longest
    padded = -(-(longest + 2) // pad_to_multiple_of) * pad_to_multiple_of - 2
    return padded if max_tokens is None else max(longest, min(padded, max_tokens))


def tokenizer_family(tokenizer) -> str:
    """Which subword convention marks word boundaries: the most frequent piece prefix decides."""
    pieces = _pieces(tokenizer)
    special = set(tokenizer.all_special_ids)
    counts = {WORDPIECE: 0, SENTENCEPIECE: 0, BYTE_LEVEL_BPE: 0}
    for i, piece in enumerate(pieces):
        if i in special or not piece:
            continue
        if piece.startswith("##") and len(piece) > 2:
            counts[WORDPIECE] += 1
        elif piece.startswith("\u2581"):
            counts[SENTENCEPIECE] += 1
        elif piece.startswith("\u0120"):
            counts[BYTE_LEVEL_BPE] += 1
    family, count = max(counts.items(), key=lambda kv: kv[1])
    return family if count > 0 else WORD_LEVEL


# Byte-level BPE writes the whitespace bytes tab, line feed, vertical tab, form feed, carriage return and
# space as the characters 256 + byte (GPT-2's byte-to-unicode table): ĉ Ċ ċ Č č and Ġ.
BYTE_LEVEL_WHITESPACE = frozenset(chr(256 + b) for b in (9, 10, 11, 12, 13, 32))


def continuation_table(tokenizer) -> torch.Tensor:
    """BoolTensor [len(tokenizer)]: True where the id continues the word begun by the previous id
    (unless `word_break_table` says the previous id ended with whitespace).

    Rules per family (detected from the vocabulary by `tokenizer_family`):
    - WordPiece (BERT): a piece starting with ``##`` continues; everything else starts a word.
    - SentencePiece (XLM-R, T5, ...): a piece starting with ``▁`` (U+2581, "a space was here")
      starts a word; a piece WITHOUT it continues (so ``▁hello`` ``,`` is one word).
    - Byte-level BPE (RoBERTa, GPT-2, ModernBERT): a piece starting with a whitespace byte (``Ġ``
      the space, ``Ċ`` a line break, ...) starts a word; a piece WITHOUT one continues (the first word
      of a text has none; the generator always treats a block's first token as a word start).
    - Word-level vocabularies (none of the above): every id starts a word.
    Special and added tokens always count as word starts (they are never masked anyway).
    """
    family = tokenizer_family(tokenizer)
    pieces = _pieces(tokenizer)
    table = torch.zeros(len(pieces), dtype=torch.bool)
    if family == WORD_LEVEL:
        return table
    for i, piece in enumerate(pieces):
        if not piece:
            continue
        if family == WORDPIECE:
            table[i] = piece.startswith("##")
        elif family == SENTENCEPIECE:
            table[i] = not piece.startswith("\u2581")
        else:
            table[i] = piece[0] not in BYTE_LEVEL_WHITESPACE
    for i in _whole_tokens(tokenizer):
        if 0 <= i < len(table):
            table[i] = False
    return table


def _whole_tokens(tokenizer) -> set[int]:
    """Special and added tokens: always word starts, never joined to a neighbour."""
    return set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})


def word_break_table(tokenizer) -> torch.Tensor:
    """BoolTensor [len(tokenizer)]: True where the id ENDS with whitespace, so the next id starts a word
    whatever its own form. Only byte-level BPE has such pieces: after a line break the next word carries
    no ``Ġ`` (``.Ċ`` then ``History``), and judged alone it would continue the word before the break.
    A piece ending in a plain space (``Ġ``) is the exception: byte-level pre-tokenizers attach a space to
    the text after it, so a next piece without ``Ġ`` is the rest of that word (" illegal" can come out as
    ``Ġ`` ``il`` ``le`` ``g`` ``al``: one word), and a next word always starts with ``Ġ`` itself.
    All False for the other families (their pieces never end in whitespace)."""
    pieces = _pieces(tokenizer)
    table = torch.zeros(len(pieces), dtype=torch.bool)
    if tokenizer_family(tokenizer) != BYTE_LEVEL_BPE:
        return table
    never = _whole_tokens(tokenizer)
    breaks = BYTE_LEVEL_WHITESPACE - {"\u0120"}
    for i, piece in enumerate(pieces):
        table[i] = bool(piece) and piece[-1] in breaks and i not in never
    return table


def _pieces(tokenizer) -> list[str]:
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return [piece if isinstance(piece, str) else "" for piece in pieces]


def mask_rng(seed: int, step: int, rank: int, device) -> torch.Generator:
    """Generator for one micro-batch: its seed is a hash of (run seed, global step, rank).

    A hash (not seed + step) keeps streams of neighbouring steps/ranks unrelated, and the value
    depends on nothing else, so a resumed run regenerates exactly the masks it would have drawn.
    """
    digest = hashlib.blake2b(f"retromae-ds/mask/{int(seed)}/{int(step)}/{int(rank)}".encode(),
                             digest_size=8).digest()
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return generator


@dataclass(frozen=True)
class BatchPlan:
    """What the host knows about a collated batch before it reaches the device: with it, the mask draw
    and the model's heads need no host-device sync (every shape and loop bound is known up front)."""

    n_words: int                 # the most words in one sample (the width of the word tables)
    longest: int                 # the longest word, in tokens (the greedy rounds' bound; <= the cap)
    padded: bool                 # some sample is shorter than the batch width
    encoder_label_capacity: int  # at most this many encoder positions get a label


class MaskGenerator:
    """Builds the six RetroMAE input tensors from packed blocks with torch ops on their device."""

    #: sync-free shapes: greedy rounds without host syncs (pool path only) and, with a plan, the heads'
    #: static row capacity (`encoder_label_capacity`). None = on accelerators only: on the CPU a sync
    #: costs nothing, the compacting rounds do less work, and the heads then project only the labelled
    #: rows instead of a fixed capacity that counts padding (measured in docs/data.md, "Ragged corpora").
    #: The masks are the same either way. --compile / --static-shapes set it (one shape every step).
    sync_free: bool | None = None

    def __init__(self, continuation: torch.Tensor, cls_id: int, sep_id: int, pad_id: int, mask_id: int,
                 vocab_size: int, special_ids: Sequence[int], encoder_mask_ratio: float = 0.3,
                 decoder_mask_ratio: float = 0.5, decoder_mask_pool: int = 128,
                 word_breaks: torch.Tensor | None = None, max_word_tokens: int = MAX_WORD_TOKENS) -> None:
        """`continuation` and `word_breaks` (optional, all False when omitted): the tokenizer's
        `continuation_table` and `word_break_table`; a token continues the previous token's word when
        its id continues and the previous id does not end with whitespace, and the word has fewer than
        `max_word_tokens` tokens so far (see MAX_WORD_TOKENS)."""
        named = {"cls_token": cls_id, "sep_token": sep_id, "pad_token": pad_id, "mask_token": mask_id}
        missing = [name for name, value in named.items() if value is None]
        if missing:
            raise UserError(f"the tokenizer has no {', '.join(missing)}; RetroMAE needs [CLS], [SEP], [PAD] "
                            f"and [MASK] equivalents. Use a BERT/RoBERTa/XLM-R style tokenizer or add them "
                            f"(tokenizer.add_special_tokens) before `prepare`.")
        for name, ratio in (("encoder_mask_ratio", encoder_mask_ratio), ("decoder_mask_ratio", decoder_mask_ratio)):
            if not 0.0 <= ratio <= 1.0:
                raise UserError(f"{name} = {ratio}: must lie in [0, 1] (the fraction of tokens to mask).")
        try:
            pool = operator.index(decoder_mask_pool)
        except TypeError:
            pool = -1
        if isinstance(decoder_mask_pool, bool) or pool < 0:
            raise UserError(f"decoder_mask_pool = {decoder_mask_pool!r}: must be an integer >= 0 (whole-word draws "
                            f"per sample for the decoder rows to pick from; 0 = one draw per row).")
        self.continuation = continuation.to(torch.bool)
        self.word_breaks = (torch.zeros_like(self.continuation) if word_breaks is None else word_breaks.to(torch.bool))
        if self.word_breaks.shape != self.continuation.shape:
            raise ValueError(f"word_breaks has {len(self.word_breaks)} entries, continuation {len(self.continuation)}")
        self._host_continuation = self.continuation.cpu().numpy()  # for plan(), which runs on the host
        self._host_word_breaks = self.word_breaks.cpu().numpy()
        self.cls_id, self.sep_id, self.pad_id, self.mask_id = int(cls_id), int(sep_id), int(pad_id), int(mask_id)
        self.encoder_mask_ratio = float(encoder_mask_ratio)
        self.decoder_mask_ratio = float(decoder_mask_ratio)
        self.decoder_mask_pool = pool
        if isinstance(max_word_tokens, bool) or operator.index(max_word_tokens) < 1:
            raise ValueError(f"max_word_tokens = {max_word_tokens!r}: must be an integer >= 1")
        self.max_word_tokens = operator.index(max_word_tokens)
        allowed = torch.ones(int(vocab_size), dtype=torch.bool)
        allowed[[i for i in special_ids if 0 <= i < vocab_size]] = False
        self.replacement_ids = allowed.nonzero().squeeze(1)

    def to(self, device) -> "MaskGenerator":
        self.continuation = self.continuation.to(device)
        self.word_breaks = self.word_breaks.to(device)
        self.replacement_ids = self.replacement_ids.to(device)
        return self

    def plan(self, tokens, lengths) -> BatchPlan:
        """The `BatchPlan` of a collated batch, from its host copy (numpy or CPU tensors): the same word
        structure `__call__` finds on the device (a word starts at the first token, at every token the
        tables do not join to the previous one, and every `max_word_tokens` tokens into a longer run),
        computed here so that the device never reports it back."""
        tokens = np.asarray(tokens)
        lengths = np.asarray(lengths, dtype=np.int64)
        batch, width = tokens.shape
        real = np.arange(width)[None, :] < lengths[:, None]
        table, breaks = self._host_continuation, self._host_word_breaks
        clipped = np.clip(tokens, 0, len(table) - 1)
        continues = table[clipped] & real
        continues[:, 1:] &= ~breaks[clipped[:, :-1]]           # the previous token ended with whitespace
        continues[:, 0] = False                                # a block's first token always starts a word
        starts = real & ~continues
        at = np.arange(width)                                  # as on the device: cut long runs from their start
        word_start = np.maximum.accumulate(np.where(starts, at, 0), axis=1)
        starts |= real & ((at - word_start) % self.max_word_tokens == 0)
        n_words = int(starts.sum(1).max()) if batch else 0
        start_at = np.flatnonzero(starts[real])                # words never cross samples: each starts one
        longest = int(np.diff(np.append(start_at, int(real.sum()))).max()) if len(start_at) else 0
        per_sample = max(1, round((width + 2) * self.encoder_mask_ratio))  # the budget of a full-width sample
        return BatchPlan(n_words=n_words, longest=longest, padded=bool((lengths < width).any()),
                         encoder_label_capacity=batch * min(width, per_sample))

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator,
                 plan: BatchPlan | None = None) -> dict:
        """The six model inputs. With `plan` (from `self.plan` on the same batch) the encoder mask is None
        when no sample is padded, and where shapes are sync-free (`sync_free`) nothing syncs with the host
        and the batch also carries `encoder_label_capacity`; the masks drawn are the same either way."""
        device = tokens.device
        batch, width = tokens.shape
        seq_len = width + 2
        lengths = lengths.to(device=device, dtype=torch.long)
        pos = torch.arange(seq_len, device=device)
        real = (pos >= 1) & (pos <= lengths[:, None])                         # t1..tn
        visible_cols = pos < (lengths[:, None] + 2)                             # [CLS] t1..tn [SEP]

        shifted = torch.full((batch, seq_len), self.pad_id, dtype=torch.long, device=device)
        shifted[:, 1:-1] = tokens
        ids = torch.where(real, shifted, self.pad_id)
        ids[:, 0] = self.cls_id
        ids.scatter_(1, (lengths + 1)[:, None], self.sep_id)

        # word structure: a word starts at every real token that does not continue the previous one
        known = ids.clamp(0, len(self.continuation) - 1)
        continues = self.continuation[known] & real & (pos >= 2)
        continues[:, 1:] &= ~self.word_breaks[known[:, :-1]]                   # ... and the previous did not end a word
        starts = real & ~continues
        word_start = torch.where(starts, pos, 0).cummax(1).values                # where each token's word began
        starts |= real & ((pos - word_start) % self.max_word_tokens == 0)       # cut runs into MAX_WORD_TOKENS
        word_of = (starts.cumsum(1) - 1).clamp(min=0)                           # word index per position
        word_len = torch.zeros(batch, seq_len, dtype=torch.int32, device=device)  # trimmed to n_words below
        word_len.scatter_add_(1, word_of, real.to(torch.int32))
        # both numbers fix shapes (n_words) or the round bound (longest): from the plan, or one host sync
        if plan is not None:
            n_words, longest = plan.n_words, plan.longest
        else:
            n_words, longest = (torch.stack([starts.sum(1).max(), word_len.max().to(torch.long)]).tolist()
                                if batch else (0, 0))
        word_len = word_len[:, :max(n_words, 1)].contiguous()
        use_sync_free = self.sync_free if self.sync_free is not None else device.type != "cpu"
        sync_free = longest if self.decoder_mask_pool and use_sync_free else None

        n_total = (lengths + 2).to(torch.float64)
        enc_budget = torch.round(n_total * self.encoder_mask_ratio).long().clamp(min=1)
        dec_budget = torch.round(n_total * self.decoder_mask_ratio).long().clamp(min=1)

        # encoder: one draw per sample, 80% [MASK] / 10% random id / 10% unchanged
        enc_words = draw_whole_words(word_len, enc_budget, generator, max_word_len=sync_free)
        chosen = enc_words.gather(1, word_of) & real
        roll = torch.rand(batch, seq_len, generator=generator, device=device)
        pick = torch.randint(len(self.replacement_ids), (batch, seq_len), generator=generator, device=device)
        corrupted = torch.where(roll < 0.8, self.mask_id, torch.where(roll < 0.9, self.replacement_ids[pick], ids))
        encoder_input_ids = torch.where(chosen, corrupted, ids)
        encoder_labels = torch.where(chosen, ids, IGNORE_INDEX)

        if self.decoder_mask_pool:
            visible = self._pooled_decoder_mask(word_len, word_of, real, visible_cols, lengths, dec_budget, sync_free,
                                                generator)
        else:  # one draw per attention row (B * L rows share their sample's words)
            rows_len = word_len[:, None, :].expand(batch, seq_len, word_len.shape[1]).reshape(batch * seq_len, -1)
            dec_words = draw_whole_words(rows_len, dec_budget.repeat_interleave(seq_len), generator)
            dec_words = dec_words.view(batch, seq_len, -1)
            hidden = dec_words.gather(2, word_of[:, None, :].expand(batch, seq_len, seq_len))
            hidden &= real[:, None, :]
            visible = hidden.logical_not_()                                     # in place: one [B, L, L] tensor
            visible &= visible_cols[:, None, :]
            visible &= visible_cols[:, :, None]
        visible.diagonal(dim1=1, dim2=2).fill_(False)                           # row i hides itself

        out = {
            "encoder_input_ids": encoder_input_ids,
            "encoder_attention_mask": visible_cols.long(),
            "encoder_labels": encoder_labels,
            "decoder_input_ids": ids,
            "decoder_attention_mask": visible,
            "decoder_labels": torch.where(real, ids, IGNORE_INDEX),
        }
        if plan is not None:
            if not plan.padded:
                out["encoder_attention_mask"] = None  # all visible: no mask to check, flash attention applies
            if use_sync_free:
                out["encoder_label_capacity"] = plan.encoder_label_capacity
        return out

    def _pooled_decoder_mask(self, word_len, word_of, real, visible_cols, lengths, dec_budget, sync_free: int | None,
                             generator: torch.Generator) -> torch.Tensor:
        """BoolTensor [B, L, L]: each real row's visible columns from a random pool member (diagonal not yet hidden).

        min(K, L) draws per sample; sample b's rows pick uniformly among the first min(K, n_b + 2), the
        reference's pool size (a pool larger than the rows would only change the rows' correlation).
        Padding is applied to the [B, K + 1, L] pool (member K is all hidden, for padding rows), so the
        [B, L, L] result is one row copy (index_select) with no further full-size pass.
        """
        batch, seq_len = word_of.shape
        members = min(self.decoder_mask_pool, seq_len)
        pool_len = word_len[:, None, :].expand(batch, members, word_len.shape[1]).reshape(batch * members, -1)
        pool_budget = dec_budget[:, None].expand(batch, members).reshape(-1)
        pool = draw_whole_words(pool_len, pool_budget, generator, max_word_len=sync_free).view(batch, members, -1)
        hidden = pool.gather(2, word_of[:, None, :].expand(batch, members, seq_len)) & real[:, None, :]
        pool_visible = torch.cat([hidden.logical_not_() & visible_cols[:, None, :],
                                  hidden.new_zeros(batch, 1, seq_len)], dim=1)          # [B, members + 1, L]
        size = (lengths + 2).clamp(max=members)
        # a uniform member per row; 2**62 is a multiple of every power of two, the modulo bias is below 2**-50
        choice = torch.randint(0, 1 << 62, (batch, seq_len), generator=generator, device=word_of.device) % size[:, None]
        choice = torch.where(visible_cols, choice, members)                             # padding rows: member K
        flat = choice + torch.arange(batch, device=word_of.device)[:, None] * (members + 1)
        return pool_visible.view(batch * (members + 1), seq_len).index_select(0, flat.view(-1)).view(batch, seq_len,
                                                                                                      seq_len)


def draw_whole_words(word_len: torch.Tensor, budget: torch.Tensor, generator: torch.Generator,
                     window: int = 8, unsynced_rounds: int = 2, max_word_len: int | None = None) -> torch.Tensor:
    """Independent greedy whole-word draws, one per row: BoolTensor [R, W] of chosen words.

    `word_len` [R, W] holds each word's token count (0 = no such word); `budget` [R] the most
    tokens to cover. Words are visited in a uniformly random order and taken while they fit.
    `max_word_len` (at least the longest word) switches the greedy continuation to a fixed number of
    full-width rounds with no host sync (for few rows: O(R * W) per round); the result is the same.
    """
    rows, n_words = word_len.shape
    device = word_len.device
    exists = word_len > 0
    top = torch.iinfo(torch.int32).max
    keys = torch.randint(0, top, (rows, n_words), generator=generator, device=device, dtype=torch.int32)
    order = keys.masked_fill_(~exists, top).argsort(dim=1)                     # random order, absent words last
    sorted_len = word_len.to(torch.int32).masked_fill(~exists, top // max(n_words, 1)).gather(1, order)
    budget = budget.to(torch.int32)
    covered = sorted_len.cumsum(1, dtype=torch.int32)
    taken = covered <= budget[:, None]                                          # the prefix that fits
    cursor = torch.searchsorted(covered, budget[:, None], right=True).squeeze(1)  # the first word that did not
    used = covered.gather(1, (cursor - 1).clamp(min=0)[:, None]).squeeze(1) * (cursor > 0)
    remaining = budget - used
    if max_word_len is not None:
        # After the prefix the budget left is below the misfit's length <= max_word_len, and every round
        # takes one word (>= 1 token) in each row that still has a later word that fits, so
        # max_word_len - 1 rounds finish every row; finished rows find nothing and stay as they are.
        slots = torch.arange(n_words, device=device, dtype=torch.int32)
        cursor = cursor.to(torch.int32)
        for _ in range(max(int(max_word_len) - 1, 0)):
            fits = (slots > cursor[:, None]) & (sorted_len <= remaining[:, None])
            first = torch.where(fits, slots, n_words).amin(1)
            found = first < n_words
            at = first.clamp(max=n_words - 1).long()[:, None]
            taken.scatter_(1, at, taken.gather(1, at) | found[:, None])
            remaining -= torch.where(found, sorted_len.gather(1, at).squeeze(1), 0)
            cursor = torch.where(found, first, cursor)
        return torch.zeros_like(taken).scatter_(1, order, taken)
    # Greedy continuation: rows with budget left look for the next word that still fits, `window`
    # slots at a time; a row leaves once no later word is short enough (suffix minimum). The first
    # rounds run over all rows without a host sync (most rows finish there), then the rest compacted.
    later_min = sorted_len.flip(1).cummin(1).values.flip(1)
    later_min = torch.cat([later_min[:, 1:], later_min.new_full((rows, 1), top)], dim=1)
    offsets = torch.arange(1, window + 1, device=device)

    def greedy_round(idx: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        slots = cursor[idx, None] + offsets                                     # [rows, window]
        lens = sorted_len[idx[:, None], slots.clamp(max=n_words - 1)]
        fits = alive[:, None] & (slots < n_words) & (lens <= remaining[idx, None])
        found = fits.any(1)
        first = fits.to(torch.uint8).argmax(1)
        pick = slots.gather(1, first[:, None]).squeeze(1).clamp(max=n_words - 1)
        taken[idx, pick] = taken[idx, pick] | found
        remaining[idx] -= torch.where(found, lens.gather(1, first[:, None]).squeeze(1), 0)
        cursor[idx] = torch.where(alive, torch.where(found, pick, slots[:, -1]), cursor[idx])  # a miss skips
        at = cursor[idx].clamp(max=n_words - 1)
        return alive & (remaining[idx] > 0) & (cursor[idx] < n_words) & (later_min[idx, at] <= remaining[idx])

    every = torch.arange(rows, device=device)
    alive = (remaining > 0) & (cursor < n_words) & (later_min[every, cursor.clamp(max=n_words - 1)] <= remaining)
    for _ in range(unsynced_rounds):
        alive = greedy_round(every, alive)
    active = alive.nonzero().squeeze(1)
    while active.numel():
        active = active[greedy_round(active, torch.ones_like(active, dtype=torch.bool))]
    return torch.zeros_like(taken).scatter_(1, order, taken)
