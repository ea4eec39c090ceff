"""Masks generated on the device: structure, whole words for every tokenizer family, ratios, 80/10/10,
determinism, and the same distribution as the plain per-sample Python reference in
scripts/masking_reference.py (shared with bench/bench_model.py, which times it; deliberately not in the package)."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch

from retromae_ds.data.masking import (BYTE_LEVEL_BPE, MAX_WORD_TOKENS, SENTENCEPIECE, WORD_LEVEL, WORDPIECE,
                                      MaskGenerator, collate_blocks, continuation_table, draw_whole_words, mask_rng,
                                      tokenizer_family, word_break_table)
from scripts.masking_reference import reference_draw, reference_masks, reference_words
from tests.helpers.corpora import lee_articles
from tests.helpers.masking_data import (VOCAB, device_word_lengths, device_word_numbers, synthetic_block,
                                        synthetic_continuation, synthetic_generator)

# --------------------------------------------------------------------------------------------------
# Synthetic vocabulary (tests/helpers/masking_data.py): ids 5..49 start words, 50..99 continue them


def word_spans(ids: torch.Tensor, length: int, table: torch.Tensor) -> list[list[int]]:
    return reference_words(ids[1:length + 1].tolist(), table.tolist())


# --------------------------------------------------------------------------------------------------
# collate_blocks


def test_collate_blocks_pads_and_rounds_the_model_length():
    blocks = [np.array([7, 8, 9], dtype=np.uint16), np.array([5], dtype=np.int32), np.array([6, 6, 6, 6, 6, 6, 6])]
    tokens, lengths = collate_blocks(blocks, pad_id=0)
    assert tokens.dtype == torch.long and lengths.tolist() == [3, 1, 7]
    assert tokens.shape == (3, 14)  # 7 + 2 = 9 -> 16 = 14 + 2
    assert tokens[0, :3].tolist() == [7, 8, 9] and (tokens[0, 3:] == 0).all()
    assert collate_blocks(blocks, pad_id=0, pad_to_multiple_of=None)[0].shape == (3, 7)
    assert collate_blocks(blocks, pad_id=0, max_tokens=10)[0].shape == (3, 10)
    assert collate_blocks(blocks, pad_id=0, max_tokens=5)[0].shape == (3, 7)  # never cuts a block
    with pytest.raises(ValueError):
        collate_blocks([], pad_id=0)


# --------------------------------------------------------------------------------------------------
# continuation tables for every tokenizer family


TEXT = ("The unbelievably quick, brownish fox jumped over 12 lazy dogs, and Anthropomorphization isn't "
        "uncommon in Australian newspapers, said Mr. Howard.")


def starts_by_rule(tokenizer, text: str, family: str) -> list[bool]:
    """Independent word starts: WordPiece from the pre-tokenizer's word ids, SentencePiece and
    byte-level BPE from the text (a token starts a word when whitespace precedes it)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if family == WORDPIECE:
        word_ids = enc.word_ids()
        return [i == 0 or word_ids[i] != word_ids[i - 1] for i in range(len(word_ids))]
    out, previous = [], None
    for i, (start, _) in enumerate(enc["offset_mapping"]):
        after_space = start == 0 or text[start - 1].isspace() or text[start].isspace()
        out.append(i == 0 or (after_space and start != previous))  # a lone "▁" shares its offset
        previous = start
    return out


@pytest.mark.parametrize("which, family", [("minilm_tokenizer", WORDPIECE), ("sentencepiece_tokenizer", SENTENCEPIECE),
                                           ("byte_level_tokenizer", BYTE_LEVEL_BPE)])
def test_continuation_table_marks_word_starts(request, which, family):
    tokenizer = request.getfixturevalue(which)
    assert tokenizer_family(tokenizer) == family
    table = continuation_table(tokenizer)
    assert table.dtype == torch.bool and len(table) == len(tokenizer)
    assert not table[tokenizer.all_special_ids].any()
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    got = [i == 0 or not bool(table[t]) for i, t in enumerate(ids)]
    assert got == starts_by_rule(tokenizer, TEXT, family)
    assert 0 < sum(got) < len(got)  # the sentence has multi-piece words


def test_word_level_vocabulary_has_no_continuations(big_vocab_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(big_vocab_tokenizer_dir)
    assert tokenizer_family(tokenizer) == WORD_LEVEL
    assert not continuation_table(tokenizer).any()


# --------------------------------------------------------------------------------------------------
# structure of every mask


@pytest.fixture(scope="module")
def minilm_batch(minilm_tokenizer):
    tok = minilm_tokenizer
    texts = [TEXT] + lee_articles(8)
    blocks = [np.array(tok(t, add_special_tokens=False)["input_ids"][:100 - 7 * i]) for i, t in enumerate(texts)]
    table = continuation_table(tok)
    generator = MaskGenerator(table, tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, tok.mask_token_id,
                              len(tok), tok.all_special_ids)
    tokens, lengths = collate_blocks(blocks, tok.pad_token_id)
    return generator, tokens, lengths, table


def check_structure(out: dict, tokens, lengths, table, gen: MaskGenerator) -> None:
    batch, width = tokens.shape
    seq_len = width + 2
    visible = out["decoder_attention_mask"]
    assert visible.dtype == torch.bool and visible.shape == (batch, seq_len, seq_len)
    for key in ("encoder_input_ids", "encoder_attention_mask", "encoder_labels", "decoder_input_ids", "decoder_labels"):
        assert out[key].shape == (batch, seq_len), key
    assert not visible.diagonal(dim1=1, dim2=2).any()                                     # own position hidden
    for b in range(batch):
        n = int(lengths[b])
        ids = out["decoder_input_ids"][b]
        assert ids[0] == gen.cls_id and ids[n + 1] == gen.sep_id and (ids[n + 2:] == gen.pad_id).all()
        assert ids[1:n + 1].tolist() == tokens[b, :n].tolist()
        assert out["encoder_attention_mask"][b].tolist() == [1] * (n + 2) + [0] * (seq_len - n - 2)
        assert out["decoder_labels"][b].tolist() == [-100] + tokens[b, :n].tolist() + [-100] * (seq_len - n - 1)
        v = visible[b]
        assert v[1:n + 2, 0].all()                                                         # [CLS] seen by rows >= 1
        assert not v[:, n + 2:].any() and not v[n + 2:].any()                              # padding never visible
        assert v[torch.arange(n + 1), n + 1].all()                                         # [SEP] never drawn
        labels = out["encoder_labels"][b]
        enc = out["encoder_input_ids"][b]
        masked = labels != -100
        assert not masked[0] and not masked[n + 1:].any()
        assert (labels[masked] == ids[masked]).all() and (enc[~masked] == ids[~masked]).all()
        assert 1 <= int(masked.sum()) <= max(1, round((n + 2) * gen.encoder_mask_ratio))
        dec_budget = max(1, round((n + 2) * gen.decoder_mask_ratio))
        for word in word_spans(ids, n, table):
            assert len(set(masked[word].tolist())) == 1, "encoder must mask whole words"
            cols = v[:n + 2][:, word]                                                      # [rows, word tokens]
            outside = torch.ones(n + 2, dtype=torch.bool)
            outside[word] = False
            assert (cols[outside].all(1) | ~cols[outside].any(1)).all(), "decoder rows hide whole words"
            for k, row in enumerate(word):                                                 # rows inside the word
                others = cols[row, [j for j in range(len(word)) if j != k]]
                assert others.all() or not others.any()
        hidden_counts = (~v[1:n + 1, 1:n + 1]).sum(1) - 1                                  # minus own position
        assert (hidden_counts <= dec_budget).all()


def test_every_mask_has_the_reference_structure(minilm_batch):
    gen, tokens, lengths, table = minilm_batch
    for step in range(3):
        out = gen(tokens, lengths, mask_rng(7, step, 0, "cpu"))
        check_structure(out, tokens, lengths, table, gen)


def test_python_reference_has_the_same_structure(minilm_batch):
    gen, tokens, lengths, table = minilm_batch
    blocks = [tokens[b, :int(lengths[b])].tolist() for b in range(len(lengths))]
    out = reference_masks(blocks, table.tolist(), gen.cls_id, gen.sep_id, gen.pad_id, gen.mask_id,
                          gen.replacement_ids.tolist(), random.Random(0))
    width = out["decoder_input_ids"].shape[1] - 2
    padded = torch.full((len(blocks), width), gen.pad_id)
    padded[:, :tokens.shape[1]] = tokens[:, :width]
    check_structure(out, padded, lengths, table, gen)


def test_determinism_per_seed_step_and_rank(minilm_batch):
    gen, tokens, lengths, _ = minilm_batch
    first = gen(tokens, lengths, mask_rng(3, 10, 1, "cpu"))
    again = gen(tokens, lengths, mask_rng(3, 10, 1, torch.device("cpu")))
    assert all(torch.equal(first[k], again[k]) for k in first)
    for other in (mask_rng(3, 11, 1, "cpu"), mask_rng(3, 10, 0, "cpu"), mask_rng(4, 10, 1, "cpu")):
        out = gen(tokens, lengths, other)
        assert not torch.equal(out["encoder_labels"], first["encoder_labels"])
        assert not torch.equal(out["decoder_attention_mask"], first["decoder_attention_mask"])


def test_corruption_is_80_10_10_and_never_inserts_specials(minilm_tokenizer):
    tok = minilm_tokenizer
    gen = MaskGenerator(continuation_table(tok), tok.cls_token_id, tok.sep_token_id, tok.pad_token_id,
                        tok.mask_token_id, len(tok), tok.all_special_ids)
    blocks = [np.array(tok(t, add_special_tokens=False)["input_ids"][:126]) for t in lee_articles(64)]
    tokens, lengths = collate_blocks(blocks, tok.pad_token_id)
    counts = np.zeros(3)
    specials = torch.tensor(tok.all_special_ids)
    for step in range(6):
        out = gen(tokens, lengths, mask_rng(0, step, 0, "cpu"))
        masked = out["encoder_labels"] != -100
        enc, orig = out["encoder_input_ids"][masked], out["encoder_labels"][masked]
        is_mask = enc == tok.mask_token_id
        same = enc == orig
        counts += [int(is_mask.sum()), int((~is_mask & ~same).sum()), int(same.sum())]
        assert not torch.isin(enc[~is_mask], specials).any()
        ratio = masked.sum(1).float() / (lengths + 2)
        assert abs(float(ratio.mean()) - 0.3) < 0.01
    shares = counts / counts.sum()
    assert counts.sum() > 10_000
    assert abs(shares[0] - 0.8) < 0.015 and abs(shares[1] - 0.1) < 0.01 and abs(shares[2] - 0.1) < 0.01


# --------------------------------------------------------------------------------------------------
# same distribution as the Python reference


MIXED_LENGTHS = [3, 1, 4, 3, 1, 2, 5, 3, 1, 3, 2, 3, 1, 6, 3]
MOSTLY_LONG = [3] * 30 + [1, 2, 1] + [4] * 8  # the fitting short word is often many slots away


@pytest.mark.parametrize("lengths, window, unsynced_rounds", [(MIXED_LENGTHS, 8, 2), (MOSTLY_LONG, 8, 2),
                                                              (MOSTLY_LONG, 1, 0)])
def test_whole_word_draw_matches_python_reference_distribution(lengths, window, unsynced_rounds):
    """Per-word selection frequencies and covered-token counts of the vectorised greedy draw equal
    the reference's (words of mixed lengths, where stopping at the first misfit would undershoot)."""
    rng = random.Random(5)
    words, pos = [], 1
    for length in lengths:
        words.append(list(range(pos, pos + length)))
        pos += length
    n_tokens = sum(lengths) + 2
    draws = 4000
    for ratio in (0.3, 0.5):
        ref_hits = np.zeros(len(words))
        ref_cover = np.zeros(draws)
        for d in range(draws):
            chosen = reference_draw(words, n_tokens, ratio, rng)
            ref_hits += [w[0] in chosen for w in words]
            ref_cover[d] = len(chosen)
        word_len = torch.tensor(lengths, dtype=torch.int32).repeat(draws, 1)
        budget = torch.full((draws,), max(1, round(n_tokens * ratio)))
        chosen = draw_whole_words(word_len, budget, torch.Generator().manual_seed(1), window=window,
                                  unsynced_rounds=unsynced_rounds)
        got_hits = chosen.sum(0).numpy()
        got_cover = (chosen * word_len).sum(1).numpy()
        p = (ref_hits + got_hits) / (2 * draws)
        sigma = np.sqrt(2 * p * (1 - p) / draws) + 1e-9
        assert (np.abs(got_hits - ref_hits) / draws <= 5 * sigma).all(), (got_hits / draws, ref_hits / draws)
        assert (got_cover <= budget.numpy()).all()
        for value in np.unique(np.concatenate([ref_cover, got_cover])):
            a, b = (ref_cover == value).mean(), (got_cover == value).mean()
            assert abs(a - b) <= 5 * np.sqrt((a + b) / draws) + 1e-9, (value, a, b)
        assert got_cover.mean() > budget[0].item() - 0.5  # greedy keeps filling after a misfit


def test_decoder_rows_match_reference_frequencies():
    """Column-hiding frequencies per decoder row agree with the per-sample reference."""
    rng = random.Random(11)
    ids = synthetic_block([2, 1, 1, 3, 1, 1, 2, 1, 4, 1, 1, 1], rng)
    gen = synthetic_generator()
    repeats = 400
    tokens, lengths = collate_blocks([np.array(ids)] * repeats, 0, pad_to_multiple_of=None)
    out = gen(tokens, lengths, mask_rng(0, 0, 0, "cpu"))
    got = (~out["decoder_attention_mask"]).float().mean(0)
    ref = torch.zeros_like(got)
    ref_rng = random.Random(3)
    table = synthetic_continuation().tolist()
    replacement = gen.replacement_ids.tolist()
    for _ in range(repeats):
        ref += ~reference_masks([ids], table, 2, 3, 0, 4, replacement, ref_rng)["decoder_attention_mask"][0]
    ref /= repeats
    sigma = torch.sqrt(2 * ((got + ref) / 2) * (1 - (got + ref) / 2) / repeats) + 1e-6
    assert ((got - ref).abs() <= 5 * sigma + 1e-6).all()
    n = len(ids)
    assert abs(float(got[1:n + 1, 1:n + 1].sum(1).mean()) - 1 - round((n + 2) * 0.5)) < 0.6


def test_encoder_masks_match_reference_frequencies():
    """Per-position masking rates and the [MASK]/random/kept split of the encoder input agree with
    the per-sample reference on the same block (whole generator, not only the word draw)."""
    rng = random.Random(4)
    ids = synthetic_block([1, 3, 1, 2, 1, 1, 4, 1, 2, 1, 1, 3, 1], rng)
    gen = synthetic_generator()
    repeats = 1500
    tokens, lengths = collate_blocks([np.array(ids)] * repeats, 0, pad_to_multiple_of=None)
    out = gen(tokens, lengths, mask_rng(2, 0, 0, "cpu"))
    ref = reference_masks([ids] * repeats, synthetic_continuation().tolist(), 2, 3, 0, 4,
                          gen.replacement_ids.tolist(), random.Random(8))
    assert torch.equal(out["decoder_input_ids"], ref["decoder_input_ids"])
    assert torch.equal(out["decoder_labels"], ref["decoder_labels"])
    assert torch.equal(out["encoder_attention_mask"], ref["encoder_attention_mask"])
    rates = []
    for o in (out, ref):
        masked = o["encoder_labels"] != -100
        enc = o["encoder_input_ids"]
        rates.append(torch.stack([masked.float().mean(0),
                                  (masked & (enc == 4)).float().mean(0),
                                  (masked & (enc != 4) & (enc != o["decoder_input_ids"])).float().mean(0)]))
    got, want = rates
    p = (got + want) / 2
    assert ((got - want).abs() <= 5 * torch.sqrt(2 * p * (1 - p) / repeats) + 1e-6).all(), (got, want)
    masked_total = float(got[0].sum()) * repeats                       # pooled over positions: sharper
    shares_got, shares_want = got[1:].sum(1) / got[0].sum(), want[1:].sum(1) / want[0].sum()
    p = (shares_got + shares_want) / 2
    assert ((shares_got - shares_want).abs() <= 5 * torch.sqrt(2 * p * (1 - p) / masked_total)).all()


def test_budget_is_filled_exactly_while_single_token_words_remain():
    gen = synthetic_generator(encoder_mask_ratio=0.15, decoder_mask_ratio=0.15)
    rng = random.Random(0)
    blocks = [np.array(synthetic_block([rng.choice([1, 1, 1, 2, 3]) for _ in range(40)], rng)) for _ in range(4)]
    tokens, lengths = collate_blocks(blocks, 0)
    out = gen(tokens, lengths, mask_rng(1, 1, 1, "cpu"))
    assert all(t.device.type == "cpu" for t in out.values())
    assert (out["encoder_labels"] != -100).sum(1).tolist() == [max(1, round((n + 2) * 0.15)) for n in lengths.tolist()]


def test_invalid_ratio_and_missing_special_tokens_are_user_errors():
    from retromae_ds.errors import UserError

    with pytest.raises(UserError, match="encoder_mask_ratio"):
        synthetic_generator(encoder_mask_ratio=1.5)
    with pytest.raises(UserError, match="mask_token"):
        MaskGenerator(synthetic_continuation(), 2, 3, 0, None, VOCAB, [0, 1, 2, 3])


# --------------------------------------------------------------------------------------------------
# decoder mask pool: K whole-word draws per sample, each attention row picks one


def pool_generator(pool: int, **kwargs) -> MaskGenerator:
    return synthetic_generator(decoder_mask_pool=pool, **kwargs)


def hidden_rows(out: dict, b: int, n: int) -> torch.Tensor:
    """Sample b's real rows/columns of the decoder mask as True = hidden, [n + 2, n + 2]."""
    return ~out["decoder_attention_mask"][b, :n + 2, :n + 2]


@pytest.mark.parametrize("pool", [0, 1, 128])
def test_pool_masks_have_the_reference_structure(minilm_batch, pool):
    """Whole words, own position hidden, [CLS] and [SEP] seen, padding never visible, budget kept."""
    gen, tokens, lengths, table = minilm_batch
    pooled = copy.copy(gen)
    pooled.decoder_mask_pool = pool
    for step in range(2):
        check_structure(pooled(tokens, lengths, mask_rng(7, step, 0, "cpu")), tokens, lengths, table, pooled)


@pytest.mark.parametrize("pool", [1, 4, 128])
def test_pool_rows_have_the_per_row_distribution(pool):
    """Per row and column, the chance of being hidden (and each row's visible share) equals the
    per-row draw's (K = 0) within sampling error, whatever the pool size: a row's pool member is one
    draw. Rows of one sample are correlated, but each cell is compared across independent samples."""
    rng = random.Random(11)
    ids = synthetic_block([2, 1, 1, 3, 1, 1, 2, 1, 4, 1, 1, 1], rng)
    repeats = 600
    tokens, lengths = collate_blocks([np.array(ids)] * repeats, 0, pad_to_multiple_of=None)
    got = (~pool_generator(pool)(tokens, lengths, mask_rng(0, 0, 0, "cpu"))["decoder_attention_mask"]).float().mean(0)
    want = (~pool_generator(0)(tokens, lengths, mask_rng(1, 0, 0, "cpu"))["decoder_attention_mask"]).float().mean(0)
    p = (got + want) / 2
    assert ((got - want).abs() <= 5 * torch.sqrt(2 * p * (1 - p) / repeats) + 1e-6).all(), (got - want).abs().max()
    n = len(ids)
    for share in (got, want):  # hidden per real row: the budget (these words can fill it) + the row itself
        assert abs(float(share[1:n + 1, 1:n + 1].sum(1).mean()) - 1 - round((n + 2) * 0.5)) < 0.6


def test_pool_of_one_shares_one_draw_per_sample():
    """K = 1: all rows of a sample hide the same whole-word draw, apart from their own position."""
    rng = random.Random(2)
    blocks = [np.array(synthetic_block([rng.choice([1, 1, 2, 3]) for _ in range(k)], rng)) for k in (6, 25, 40, 13)]
    tokens, lengths = collate_blocks(blocks, 0)
    table = synthetic_continuation()
    for step in range(3):
        out = pool_generator(1)(tokens, lengths, mask_rng(4, step, 0, "cpu"))
        for b, n in enumerate(lengths.tolist()):
            hidden = hidden_rows(out, b, n)
            off_diagonal = ~torch.eye(n + 2, dtype=torch.bool)
            for col in range(n + 2):
                values = hidden[off_diagonal[:, col], col]
                assert values.all() or not values.any(), (b, col)
            shared = hidden[0].clone()                        # the draw + row 0's own column ([CLS], never drawn)
            shared[0] = False
            covered = int(shared.sum())
            assert 1 <= covered <= max(1, round((n + 2) * 0.5))
            for word in word_spans(out["decoder_input_ids"][b], n, table):
                assert len(set(shared[word].tolist())) == 1


def shared_pairs_rate(out: dict, b: int, n: int) -> float:
    """Share of row pairs (i < j) of sample b whose hidden columns agree outside i and j: rows that
    took the same pool member (plus rare coincidences of two different draws)."""
    hidden = hidden_rows(out, b, n).clone()
    rows = n + 2
    same = 0
    for i in range(rows):
        for j in range(i + 1, rows):
            keep = torch.ones(rows, dtype=torch.bool)
            keep[[i, j]] = False
            same += bool(torch.equal(hidden[i, keep], hidden[j, keep]))
    return same / (rows * (rows - 1) / 2)


def test_pool_size_per_sample_is_the_references():
    """A sample of n + 2 < K tokens picks among min(K, n + 2) members, like the reference collator
    (rows share a member 1/16 of the time here, not 1/128), even when a longer sample sets L = K."""
    rng = random.Random(9)
    short = synthetic_block([1] * 14, rng)                     # 16 rows; 3,003 possible draws
    long = synthetic_block([1] * 126, rng)                     # L = 128 = K
    repeats = 60
    tokens, lengths = collate_blocks([np.array(short), np.array(long)] * repeats, 0, pad_to_multiple_of=None)
    out = pool_generator(128)(tokens, lengths, mask_rng(3, 0, 0, "cpu"))
    got = np.mean([shared_pairs_rate(out, 2 * r, 14) for r in range(repeats)])
    ref_rng = random.Random(1)
    ref = reference_masks([short] * repeats, synthetic_continuation().tolist(), 2, 3, 0, 4, [7], ref_rng, pool=128)
    want = np.mean([shared_pairs_rate(ref, r, 14) for r in range(repeats)])
    assert abs(want - 1 / 16) < 0.02 and abs(got - want) < 0.025, (got, want)
    long_rate = shared_pairs_rate(out, 1, 126)                 # 128 members: rows rarely share
    assert long_rate < 0.02, long_rate


@pytest.mark.parametrize("pool", [0, 1, 128])
def test_pool_masks_are_reproducible_from_the_seed(pool):
    rng = random.Random(6)
    blocks = [np.array(synthetic_block([rng.choice([1, 1, 2, 3]) for _ in range(k)], rng)) for k in (20, 31, 9)]
    tokens, lengths = collate_blocks(blocks, 0)
    gen = pool_generator(pool)
    first = gen(tokens, lengths, mask_rng(3, 10, 1, "cpu"))
    again = pool_generator(pool)(tokens, lengths, mask_rng(3, 10, 1, "cpu"))
    assert all(torch.equal(first[k], again[k]) for k in first)
    for other in (mask_rng(3, 11, 1, "cpu"), mask_rng(3, 10, 0, "cpu"), mask_rng(4, 10, 1, "cpu")):
        assert not torch.equal(gen(tokens, lengths, other)["decoder_attention_mask"], first["decoder_attention_mask"])


def test_no_pool_reproduces_the_per_row_masks_bit_for_bit():
    """decoder_mask_pool=0 is the pre-pool generator: this digest was recorded with the code before
    the pool existed (same torch CPU generator). A change here changes every run's masks."""
    import hashlib

    rng = random.Random(21)
    blocks = [np.array(synthetic_block([rng.choice([1, 1, 1, 2, 3, 7]) for _ in range(k)], rng)) for k in (5, 30, 17)]
    tokens, lengths = collate_blocks(blocks, 0)
    out = pool_generator(0)(tokens, lengths, mask_rng(5, 3, 1, "cpu"))
    digest = hashlib.sha256()
    for key in sorted(out):
        digest.update(key.encode())
        digest.update(out[key].to(torch.int64).numpy().tobytes())
    assert digest.hexdigest() == "580cc88620e89fa6b4cd5c0fdb228f21e34a24aebbc48abbb4703300a9247754"


@pytest.mark.parametrize("lengths", [MIXED_LENGTHS, MOSTLY_LONG, [9, 1, 1, 1, 1, 1, 1, 1, 1, 2, 7, 1, 1, 1]])
def test_sync_free_rounds_give_the_same_draw(lengths):
    """`max_word_len` (fixed rounds, no host sync) must reproduce the compacting loop exactly."""
    draws = 3000
    word_len = torch.tensor(lengths, dtype=torch.int32).repeat(draws, 1)
    word_len[::3, -2:] = 0                                     # rows with fewer words
    for ratio in (0.15, 0.3, 0.5):
        budget = torch.full((draws,), max(1, round((sum(lengths) + 2) * ratio)))
        plain = draw_whole_words(word_len, budget, torch.Generator().manual_seed(4))
        fixed = draw_whole_words(word_len, budget, torch.Generator().manual_seed(4), max_word_len=max(lengths))
        assert torch.equal(plain, fixed)


def test_mask_generator_is_the_same_with_and_without_host_syncs(minilm_batch):
    """The accelerator path (sync-free rounds, bounded by the batch's longest word) gives the CPU
    path's masks; and the pool setting leaves the encoder's masks alone."""
    gen, tokens, lengths, _ = minilm_batch
    rng = random.Random(3)
    blocks = [np.array(synthetic_block([1, 6, 1, 1, 2, 1, 1], rng)),          # the longest word is not in sample 0
              np.array(synthetic_block([1] * 20 + [12] + [rng.choice([1, 1, 2]) for _ in range(20)], rng))]
    synthetic = collate_blocks(blocks, 0)
    for masker, (tok, lens) in ((gen, (tokens, lengths)), (pool_generator(128), synthetic)):
        outs = {}
        for sync_free in (False, True):
            masker.sync_free = sync_free
            outs[sync_free] = masker(tok, lens, mask_rng(1, 2, 0, "cpu"))
        masker.sync_free = None
        assert all(torch.equal(outs[False][k], outs[True][k]) for k in outs[False])
    per_row = pool_generator(0)(*synthetic, mask_rng(1, 2, 0, "cpu"))
    for key in ("encoder_input_ids", "encoder_labels", "decoder_input_ids", "decoder_labels"):
        assert torch.equal(per_row[key], outs[True][key]), key


@pytest.mark.parametrize("bad", [-1, 1.5, True, "128"])
def test_invalid_pool_is_a_user_error(bad):
    from retromae_ds.errors import UserError

    with pytest.raises(UserError, match="decoder_mask_pool"):
        pool_generator(bad)


@pytest.mark.parametrize("pool", [0, 128])
def test_host_plan_gives_the_same_batch_without_syncs(minilm_batch, pool):
    """A BatchPlan (numpy, on the host) must find the device's word structure exactly (a wrong word
    count changes the random draws, a short round bound leaves words undrawn), and a call with it must
    give the same six tensors; only the encoder mask becomes None when no sample is padded."""
    gen, tokens, lengths, _ = minilm_batch
    rng = random.Random(8)
    capped = copy.copy(gen)
    capped.max_word_tokens = 2                                # cuts many of the real text's words
    cases = [(gen, tokens, lengths), (capped, tokens, lengths)]
    synthetic = pool_generator(pool)
    for words in ([1, 6, 1, 1, 2, 1, 1], [12] + [1] * 30, [1] * 3, [2, 3, 1, 9, 1, 1, 4] * 4,
                  [400] + [1] * 5, [9, 8, 17, 1, 16]):                 # runs cut into pieces of MAX_WORD_TOKENS
        blocks = [np.array(synthetic_block(words, rng)), np.array(synthetic_block(words[::-1] + [1, 2], rng))]
        cases.append((synthetic, *collate_blocks(blocks, 0)))
    full = [np.array(synthetic_block([1, 2, 3, 1, 1], rng)) for _ in range(3)]   # 8 tokens + 2: no padding
    cases.append((synthetic, *collate_blocks(full, 0)))
    cut = [np.array([60, 61] + synthetic_block([1, 3], rng)), np.array([70] + synthetic_block([2, 2], rng))]
    cases.append((synthetic, *collate_blocks(cut, 0)))       # blocks cut mid-word: their first token starts one
    for masker, tok, lens in cases:
        plan = masker.plan(tok.numpy(), lens.numpy())
        assert (plan.n_words, plan.longest) == device_word_numbers(masker, tok, lens)
        assert plan.longest <= masker.max_word_tokens          # the sync-free draw's rounds stay few
        assert plan.padded == bool((lens < tok.shape[1]).any())
        for sync_free in (False, True):
            masker.sync_free = sync_free
            plain = masker(tok, lens, mask_rng(2, 5, 1, "cpu"))
            planned = masker(tok, lens, mask_rng(2, 5, 1, "cpu"), plan=plan)
            masker.sync_free = None
            # the heads' static capacity comes with sync-free shapes only (the CPU's default projects exact rows)
            assert planned.pop("encoder_label_capacity", None) == (plan.encoder_label_capacity if sync_free else None)
            labelled = int((plain["encoder_labels"] != -100).sum())
            assert labelled <= plan.encoder_label_capacity
            if plan.padded:
                assert torch.equal(planned["encoder_attention_mask"], plain["encoder_attention_mask"])
            else:
                assert planned["encoder_attention_mask"] is None and bool(plain["encoder_attention_mask"].all())
            for key in plain:
                if key != "encoder_attention_mask":
                    assert torch.equal(planned[key], plain[key]), (key, sync_free)


def test_label_capacity_is_the_budget_of_full_width_samples():
    """Full blocks fill their encoder budget exactly when one-token words remain: the capacity is
    then tight, so the static head selection wastes no rows."""
    rng = random.Random(4)
    blocks = [np.array(synthetic_block([1] * 62, rng)) for _ in range(4)]                 # 62 + 2 = 64 tokens
    tokens, lengths = collate_blocks(blocks, 0)
    gen = synthetic_generator()
    plan = gen.plan(tokens.numpy(), lengths.numpy())
    out = gen(tokens, lengths, mask_rng(1, 1, 0, "cpu"), plan=plan)
    assert plan.encoder_label_capacity == 4 * round(64 * 0.3)
    assert int((out["encoder_labels"] != -100).sum()) == plan.encoder_label_capacity


# --------------------------------------------------------------------------------------------------
# unspaced scripts: a run without spaces (Chinese, Japanese, Thai) is cut into words of MAX_WORD_TOKENS


def test_long_words_are_cut_into_pieces_from_their_start():
    """A word of more than MAX_WORD_TOKENS tokens becomes words of MAX_WORD_TOKENS from its start, then the rest."""
    rng = random.Random(12)
    blocks = [np.array(synthetic_block([20, 1, 9, 8, 3], rng)), np.array(synthetic_block([2, 17], rng))]
    tokens, lengths = collate_blocks(blocks, 0)
    gen = synthetic_generator()
    assert MAX_WORD_TOKENS == 8
    assert device_word_lengths(gen, tokens, lengths).tolist() == [[8, 8, 4, 1, 8, 1, 8, 3],
                                                                  [2, 8, 8, 1, 0, 0, 0, 0]]
    plan = gen.plan(tokens.numpy(), lengths.numpy())
    assert (plan.n_words, plan.longest) == (8, 8)


def test_ordinary_text_masks_are_unchanged_by_the_cap(minilm_batch):
    """No word of this text is longer than MAX_WORD_TOKENS: the masks are bit for bit the ones recorded
    before words were capped (same torch CPU generator), on both greedy loops."""
    import hashlib

    gen, tokens, lengths, _ = minilm_batch
    for sync_free in (False, True):
        gen.sync_free = sync_free
        out = gen(tokens, lengths, mask_rng(9, 4, 2, "cpu"))
        gen.sync_free = None
        digest = hashlib.sha256()
        for key in sorted(out):
            digest.update(key.encode())
            digest.update(out[key].to(torch.int64).numpy().tobytes())
        assert digest.hexdigest() == "7419f5af1f3a666aaa9e25db95632899709a6deb4bc9498b66c3a5710035982b", sync_free


UNSPACED = "这是一个没有空格的句子，我们在这里测试很长的词。" * 20


@pytest.mark.parametrize("family", ["synthetic", BYTE_LEVEL_BPE])
def test_unspaced_run_is_masked_at_the_ratio(request, family):
    """A 400-token word (no spaces) was one word, longer than every budget, so it was never masked. Cut
    into pieces it is masked at the ratio (encoder 0.3, decoder rows 0.5) in whole pieces, and the plan's
    longest word (the bound of the sync-free rounds) is the cap. Byte-level BPE: the run follows a line
    break, so its start comes from the word-break table."""
    run = 400
    if family == "synthetic":
        ids = synthetic_block([run], random.Random(1))
        gen, first = synthetic_generator(), 0
    else:
        tok = request.getfixturevalue("byte_level_tokenizer")
        ids = tok("The report said.\n" + UNSPACED, add_special_tokens=False)["input_ids"]
        table, breaks = continuation_table(tok), word_break_table(tok)
        first = next(i for i in range(1, len(ids)) if breaks[ids[i - 1]])         # the run starts after "Ċ"
        ids = ids[:first + run]
        assert all(table[t] and not breaks[p] for p, t in zip(ids[first:], ids[first + 1:]))  # really one word
        gen = MaskGenerator(table, tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, tok.mask_token_id,
                            len(tok), tok.all_special_ids, word_breaks=breaks)
    repeats = 8
    tokens, lengths = collate_blocks([np.array(ids)] * repeats, gen.pad_id)
    n = len(ids)
    plan = gen.plan(tokens.numpy(), lengths.numpy())
    for sync_free in (False, True):
        gen.sync_free = sync_free
        out = gen(tokens, lengths, mask_rng(0, 1, 0, "cpu"), plan=plan)
        gen.sync_free = None
        masked = (out["encoder_labels"][:, 1:n + 1] != -100)
        enc_share = masked.sum(1).float() / (n + 2)
        assert ((enc_share - 0.3).abs() < 0.02).all(), enc_share
        pieces = masked[:, first:].reshape(repeats, run // MAX_WORD_TOKENS, MAX_WORD_TOKENS)
        assert (pieces.all(2) | ~pieces.any(2)).all()                             # whole pieces
        hidden = ~out["decoder_attention_mask"][:, 1:n + 1, :n + 2]               # real rows (own position too)
        dec_share = hidden.sum(2).float() / (n + 2)
        assert ((dec_share - 0.5).abs() < 0.02).all(), (dec_share.min(), dec_share.max())
    assert plan.longest == MAX_WORD_TOKENS
    assert (plan.n_words, plan.longest) == device_word_numbers(gen, tokens, lengths)
