"""The model's math against plain references written in this file (issue 28).

Every reference here is written out by hand (python loops, torch.einsum, exp/log/erf on float64
tensors) and calls no code of the package: no `retromae_ds` helper and none of torch's fused kernels
that the package itself uses (scaled_dot_product_attention, cross_entropy, layer_norm, log_softmax).
The package's modules are only called as the thing under test, and their weights are read (the
weights are inputs, the math is ours). Next to each comparison, the properties that define the piece:

- the enhanced decoder layer (retromae_ds/model/decoder.py): under learned absolute positions (the
  layer itself is blind to key order, positions come from the embeddings) and rotary positions
  (scores depend only on the offset between query and key positions);
- the decoder's [B, L, L] matrix masks (retromae_ds/data/masking.py): each row hides one greedy
  whole-word draw of at most max(1, round((n + 2) * ratio)) tokens plus itself, every other row sees
  [CLS] and [SEP], padding is never visible and padding rows see nothing;
- the heads and losses (retromae_ds/model/heads.py) and the whole forward's
  loss = encoder + decoder (+ bow_loss_weight * bag-of-words) on a tiny random BERT.

Small random inputs, one thread: the module runs in a few seconds.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from torch import nn
from transformers import ModernBertConfig

from retromae_ds.data.masking import collate_blocks, mask_rng
from retromae_ds.model import decoder as decoder_mod
from retromae_ds.model import heads
from retromae_ds.model.decoder import EnhancedDecoderLayer
from retromae_ds.model.positions import RotaryEmbedding
from retromae_ds.model.retromae import RetroMAEConfig, RetroMAEForPretraining
from tests.helpers.masking_data import synthetic_batch, synthetic_block, synthetic_generator
from tests.helpers.tiny_models import tiny_bert

HIDDEN, HEADS, FFN = 32, 4, 64
HEAD_DIM = HIDDEN // HEADS
BIG_NEGATIVE = -1e9  # an additive mask, as the published reference: hidden keys get exp(-1e9) = 0


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; the machine is shared
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------
# plain references (float64, no package code)


def plain_linear(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    return torch.einsum("...i,oi->...o", x, linear.weight.double()) + linear.bias.double()


def plain_layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight.double() + norm.bias.double()


def plain_gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def plain_rotate(x: torch.Tensor, inv_freq: list[float], first_position: int = 0) -> torch.Tensor:
    """RoPE, first half / second half pairing: dimension d and d + half turn by position * inv_freq[d]."""
    length, dim = x.shape[-2], x.shape[-1]
    half = dim // 2
    positions = torch.arange(first_position, first_position + length, dtype=torch.float64)
    firsts, seconds = [], []
    for d in range(half):
        cos, sin = torch.cos(positions * inv_freq[d]), torch.sin(positions * inv_freq[d])
        a, b = x[..., d], x[..., d + half]
        firsts.append(a * cos - b * sin)
        seconds.append(b * cos + a * sin)
    return torch.cat([torch.stack(firsts, -1), torch.stack(seconds, -1)], -1)


def plain_softmax(scores: torch.Tensor) -> torch.Tensor:
    e = torch.exp(scores - scores.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def plain_decoder_layer(layer, query, key_value, visible, heads_count: int, inv_freq=None) -> torch.Tensor:
    """One BERT layer whose queries come from `query` and keys/values from `key_value`, under the
    [B, L, L] mask `visible` (True = row i may read column j), in float64."""
    query, key_value = query.double(), key_value.double()
    batch, length, hidden = query.shape
    dim = hidden // heads_count
    attn = layer.attention.self

    def split(x):  # [B, L, H] -> [B, heads, L, dim]
        return x.reshape(batch, length, heads_count, dim).permute(0, 2, 1, 3)

    q, k, v = split(plain_linear(query, attn.query)), split(plain_linear(key_value, attn.key)), \
        split(plain_linear(key_value, attn.value))
    if inv_freq is not None:
        q, k = plain_rotate(q, inv_freq), plain_rotate(k, inv_freq)
    scores = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(dim)
    scores = scores + torch.where(visible[:, None].bool(), 0.0, BIG_NEGATIVE)
    context = torch.einsum("bhij,bhjd->bhid", plain_softmax(scores), v)
    context = context.permute(0, 2, 1, 3).reshape(batch, length, hidden)
    out = layer.attention.output
    attended = plain_layer_norm(plain_linear(context, out.dense) + query, out.LayerNorm)
    inner = plain_gelu(plain_linear(attended, layer.intermediate.dense))
    return plain_layer_norm(plain_linear(inner, layer.output.dense) + attended, layer.output.LayerNorm)


def plain_row_losses(logits: torch.Tensor, targets) -> list[torch.Tensor]:
    """-log softmax(z)[y] for each row whose target is not -100, one row at a time."""
    losses = []
    for row, target in zip(logits, [int(t) for t in targets]):
        if target == -100:
            continue
        top = row.max()
        losses.append(torch.log(torch.exp(row - top).sum()) + top - row[target])
    return losses


def inverse_frequencies(theta: float, dim: int) -> list[float]:
    return [theta ** (-(2.0 * d) / dim) for d in range(dim // 2)]


# --------------------------------------------------------------------------------------------------
# the enhanced decoder layer


def randomize(module: nn.Module, seed: int, std: float = 0.3) -> nn.Module:
    """Every weight and bias random (LayerNorm weights around 1): a zero bias or a unit LayerNorm
    would let a bug that drops one go unseen, and BERT's 0.02 init makes attention near uniform."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            p.copy_(1.0 + 0.2 * noise if "LayerNorm" in name and name.endswith("weight") else std * noise)
    return module


def modernbert_config(**overrides) -> ModernBertConfig:
    values = dict(vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS,
                  intermediate_size=FFN, max_position_embeddings=64, pad_token_id=0, cls_token_id=2, sep_token_id=3,
                  bos_token_id=2, eos_token_id=3)
    values.update(overrides)
    return ModernBertConfig(**values)


def make_layer(scheme: str, seed: int = 0):
    """(layer, inverse frequencies the reference rotates by or None) for a position scheme."""
    if scheme == "absolute":
        layer, inv_freq = EnhancedDecoderLayer(HIDDEN, HEADS, FFN, "gelu", 1e-12, 0.0, 0.0), None
    elif scheme == "rotary":  # a small theta: every pair turns by a sizeable angle over a few positions
        inv_freq = inverse_frequencies(100.0, HEAD_DIM)
        rotary = RotaryEmbedding(HEAD_DIM, torch.tensor(inv_freq, dtype=torch.float64).float())
        layer = EnhancedDecoderLayer(HIDDEN, HEADS, FFN, "gelu", 1e-5, 0.0, 0.0, rotary=rotary)
    else:  # built from a ModernBERT config: its full-attention theta (160,000), not the sliding layers'
        config = modernbert_config()
        theta = config.rope_parameters["full_attention"]["rope_theta"]
        layer, inv_freq = EnhancedDecoderLayer.from_config(config, rotary=True), inverse_frequencies(theta, HEAD_DIM)
    return randomize(layer, seed).eval(), inv_freq


def random_streams(batch: int, length: int, seed: int, empty_rows: bool = True):
    """(query, key_value, visible) with random masks; a few rows see nothing (padding rows)."""
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, length, HIDDEN, generator=gen)
    key_value = torch.randn(batch, length, HIDDEN, generator=gen)
    visible = torch.rand(batch, length, length, generator=gen) > 0.45
    visible[:, 0, 0] = False  # row 0 never sees column 0: the fallback key must not be given to it
    visible[:, 0, 1] = True
    if empty_rows:
        visible[0, -2:] = False
    return query, key_value, visible


def seen_rows(visible: torch.Tensor) -> torch.Tensor:
    return visible.any(-1)


SCHEMES = ["absolute", "rotary", "rotary-from-modernbert-config"]


@pytest.mark.parametrize("row_blocks", [False, True], ids=["all-rows", "row-blocks"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_decoder_layer_equals_the_plain_reference(scheme, row_blocks, monkeypatch):
    """Output of every row that sees a key equals the hand-written layer (1/sqrt(head_dim) scale,
    rotary on queries and keys only, residual on the query stream); rows that see nothing stay finite."""
    layer, inv_freq = make_layer(scheme)
    if row_blocks:  # the long-sequence path, on a short sequence: blocks of 5 query rows
        monkeypatch.setattr(decoder_mod, "ROW_BLOCK", 5)
        layer.attention.self.row_blocks_from = 4
    query, key_value, visible = random_streams(3, 13, seed=1)
    query.requires_grad_(True)
    got = layer(query, key_value, visible)
    want = plain_decoder_layer(layer, query.detach(), key_value, visible, HEADS, inv_freq)
    rows = seen_rows(visible)
    assert (~rows).any() and rows.any()
    assert torch.allclose(got[rows].double(), want[rows], atol=2e-5, rtol=1e-5), \
        (got[rows].double() - want[rows]).abs().max()
    assert torch.isfinite(got).all()
    got[rows].sum().backward()  # the rows without a key do not poison the gradient either
    assert torch.isfinite(query.grad).all()
    # the reference's integer mask (1 = visible) means the same as the boolean one
    assert torch.equal(layer(query, key_value, visible.long()), got)


@pytest.mark.parametrize("scheme", SCHEMES[:2])
def test_decoder_rows_read_only_the_columns_their_mask_shows(scheme):
    """Changing the key/value stream at a column changes exactly the rows that may see that column."""
    layer, _ = make_layer(scheme, seed=2)
    query, key_value, visible = random_streams(2, 11, seed=3, empty_rows=False)
    gen = torch.Generator().manual_seed(31)
    with torch.no_grad():
        before = layer(query, key_value, visible)
        for column in (1, 4, 10):
            changed = key_value.clone()
            changed[:, column] += torch.randn(HIDDEN, generator=gen)
            after = layer(query, changed, visible)
            moved = (after - before).abs().amax(-1) > 1e-6
            assert torch.equal(moved, visible[:, :, column]), column


def test_absolute_scheme_layer_is_blind_to_key_order():
    """Without rotary the layer adds no position of its own (BERT-like encoders give positions through the
    embedding module): permuting the key/value positions together with the mask's columns changes nothing.
    Under rotary the same permutation does change the output."""
    query, key_value, visible = random_streams(2, 12, seed=4, empty_rows=False)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(5))
    results = {}
    for scheme in SCHEMES[:2]:
        layer, _ = make_layer(scheme, seed=6)
        with torch.no_grad():
            results[scheme] = (layer(query, key_value, visible),
                               layer(query, key_value[:, order], visible[:, :, order]))
    same, permuted = results["absolute"]
    assert torch.allclose(same, permuted, atol=1e-5)
    same, permuted = results["rotary"]
    assert not torch.allclose(same, permuted, atol=1e-3)


def test_rotary_scores_depend_only_on_the_offset():
    """q at position i, k at position j: rotate(q)_i . rotate(k)_j = q . rotate(k)_(j - i); with the
    same q at every position and the same k at every position the score matrix is constant along each
    diagonal, and equals the reference rotation's."""
    inv_freq = inverse_frequencies(100.0, HEAD_DIM)
    rotary = RotaryEmbedding(HEAD_DIM, torch.tensor(inv_freq, dtype=torch.float64).float())
    gen = torch.Generator().manual_seed(7)
    q, k = torch.randn(HEAD_DIM, generator=gen), torch.randn(HEAD_DIM, generator=gen)
    length = 12
    rq = rotary(q.expand(1, 1, length, HEAD_DIM).contiguous())[0, 0].double()
    rk = rotary(k.expand(1, 1, length, HEAD_DIM).contiguous())[0, 0].double()
    scores = rq @ rk.T
    for i in range(length):
        for j in range(length):
            offset = j - i
            k_at = plain_rotate(k.double().expand(1, HEAD_DIM), inv_freq, first_position=abs(offset))[0]
            q_at = plain_rotate(q.double().expand(1, HEAD_DIM), inv_freq, first_position=abs(offset))[0]
            want = q.double() @ k_at if offset >= 0 else q_at @ k.double()
            assert abs(float(scores[i, j]) - float(want)) < 1e-4, (i, j)
    assert scores.diagonal().std() < 1e-5  # offset 0 everywhere: q . k
    assert (scores - scores.T).abs().max() > 0.1  # offsets +d and -d differ: a real rotation


@pytest.mark.parametrize("scheme", SCHEMES[:2])
def test_shifting_every_position_leaves_the_decoder_output_unchanged(scheme):
    """Prepend `shift` positions the original rows cannot see: under rotary every query and key moves
    by the same constant, so the original rows' outputs must not change (relative positions only)."""
    layer, _ = make_layer(scheme, seed=8)
    query, key_value, visible = random_streams(2, 10, seed=9, empty_rows=False)
    shift = 5
    gen = torch.Generator().manual_seed(10)
    q2 = torch.cat([torch.randn(2, shift, HIDDEN, generator=gen), query], dim=1)
    kv2 = torch.cat([torch.randn(2, shift, HIDDEN, generator=gen), key_value], dim=1)
    v2 = torch.zeros(2, 10 + shift, 10 + shift, dtype=torch.bool)
    v2[:, shift:, shift:] = visible
    v2[:, :shift, :] = True  # the new rows see everything (they are not compared)
    with torch.no_grad():
        assert torch.allclose(layer(q2, kv2, v2)[:, shift:], layer(query, key_value, visible), atol=2e-5)


# --------------------------------------------------------------------------------------------------
# the decoder's [B, L, L] matrix masks


def word_spans(ids: list[int], n: int) -> list[list[int]]:
    """Words of the synthetic vocabulary at positions 1..n: ids 5..49 start one, 50..99 continue it."""
    spans = []
    for j in range(1, n + 1):
        if j == 1 or ids[j] < 50:
            spans.append([j])
        else:
            spans[-1].append(j)
    return spans


def check_row(row: list[bool], i: int, n: int, spans: list[list[int]], budget: int) -> frozenset:
    """Row i of a real position (0..n+1) sees everything of [CLS] t1..tn [SEP] except itself and one
    greedy whole-word draw: at most `budget` tokens, and no word left out that would still have fitted.
    Returns the hidden token positions (without i)."""
    assert not row[i], f"row {i} sees itself"
    assert not any(row[n + 2:]), f"row {i} sees padding"
    if i != 0:
        assert row[0], f"row {i} does not see [CLS]"
    if i != n + 1:
        assert row[n + 1], f"row {i} does not see [SEP]"
    hidden = frozenset(j for j in range(1, n + 1) if j != i and not row[j])
    drawn, maybe = [], None
    for word in spans:
        others = [j for j in word if j != i]
        states = {row[j] for j in others}
        assert len(states) <= 1, f"row {i} hides part of word {word}"
        if not others:
            maybe = word  # a one-token word at i itself: hidden anyway, drawn or not
        elif states == {False}:
            drawn.append(word)
    candidates = [drawn] + ([drawn + [maybe]] if maybe else [])
    for words in candidates:
        size = sum(len(w) for w in words)
        left = [w for w in spans if w not in words]
        if size <= budget and all(len(w) > budget - size for w in left):
            return hidden
    raise AssertionError(f"row {i}: hidden words {drawn} (+{maybe}) are not a greedy draw of budget {budget}")


def mask_batch(seed: int, word_lengths: tuple[int, ...], lengths: tuple[int, ...], pool: int, ratio: float):
    rng = random.Random(seed)
    blocks = [np.array(synthetic_block([rng.choice(word_lengths) for _ in range(n)], rng)[:n]) for n in lengths]
    tokens, lens = collate_blocks(blocks, 0)
    generator = synthetic_generator(decoder_mask_ratio=ratio, decoder_mask_pool=pool)
    return generator(tokens, lens, mask_rng(seed, 0, 0, "cpu")), lens


@pytest.mark.parametrize("pool", [128, 0], ids=["pool", "row-draws"])
@pytest.mark.parametrize("ratio", [0.5, 0.3])
@pytest.mark.parametrize("word_lengths", [(1,), (1, 1, 2, 3)], ids=["one-token-words", "mixed-words"])
def test_decoder_mask_rows_are_the_defined_ones(word_lengths, ratio, pool):
    """Every row of every sample checked one by one (check_row), padding rows see nothing, and rows draw
    independently (a sample's rows do not all hide the same words)."""
    for seed in range(2):
        out, lens = mask_batch(seed, word_lengths, (20, 13, 6, 17, 9), pool, ratio)
        visible = out["decoder_attention_mask"]
        batch, length, _ = visible.shape
        assert visible.dtype == torch.bool and length == int(lens.max()) + 2 + (-(int(lens.max()) + 2)) % 8
        for b in range(batch):
            n = int(lens[b])
            ids = out["decoder_input_ids"][b].tolist()
            spans = word_spans(ids, n)
            budget = max(1, round((n + 2) * ratio))  # [CLS] and [SEP] count, like the reference
            rows = visible[b].tolist()
            draws = [check_row(rows[i], i, n, spans, budget) for i in range(n + 2)]
            for i in range(n + 2, length):
                assert not any(rows[i]), f"padding row {i} sees something"
            if n >= 12:
                assert len(set(draws)) > 1, "every row hides the same words"


# --------------------------------------------------------------------------------------------------
# heads and losses


def random_logits(rows: int, vocab: int, seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    logits = (3.0 * torch.randn(rows, vocab, generator=gen)).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    targets[torch.rand(rows, generator=gen) < 0.35] = -100
    targets[0], targets[1] = -100, 3
    return logits, targets


@pytest.mark.parametrize("dtype, row_block", [(torch.float32, None), (torch.float32, 3), (torch.bfloat16, None)],
                         ids=["fp32", "fp32-row-blocks", "bf16"])
def test_summed_cross_entropy_equals_a_plain_row_loop(dtype, row_block, monkeypatch):
    """Loss = sum over rows with a target of -log softmax(z)[y]; gradient = upstream * (softmax(z) - onehot(y))
    on those rows and exactly 0 on rows whose target is -100."""
    vocab = 23
    if row_block:
        monkeypatch.setattr(heads, "ROW_BLOCK_ELEMENTS", vocab * row_block)
    logits, targets = random_logits(17, vocab, seed=11, dtype=dtype)
    logits.requires_grad_(True)
    loss = heads.summed_cross_entropy(logits, targets)
    reference = logits.detach().double().requires_grad_(True)
    want = torch.stack(plain_row_losses(reference, targets)).sum()
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    assert loss.dtype == torch.float32
    assert abs(loss.item() - want.item()) < tol * max(1.0, abs(want.item())), (loss.item(), want.item())
    (2.5 * loss).backward()
    (2.5 * want).backward()
    assert logits.grad.dtype == dtype
    ignored = targets == -100
    assert torch.equal(logits.grad[ignored], torch.zeros_like(logits.grad[ignored]))
    assert torch.allclose(logits.grad.double(), reference.grad, atol=tol * 10 if dtype != torch.float32 else 1e-5)


def hidden_and_labels(batch: int, length: int, hidden: int, vocab: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    states = torch.randn(batch, length, hidden, generator=gen)
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    labels[torch.rand(batch, length, generator=gen) < 0.6] = -100
    labels[0, 0], labels[-1, -1] = 2, -100
    return states, labels


def expected_labelled(states, labels):
    rows, targets = [], []
    for b in range(labels.shape[0]):
        for position in range(labels.shape[1]):
            if int(labels[b, position]) != -100:
                rows.append(states[b, position])
                targets.append(int(labels[b, position]))
    return torch.stack(rows), torch.tensor(targets)


def test_labelled_rows_are_the_labelled_positions_in_order():
    states, labels = hidden_and_labels(3, 7, 5, 11, seed=12)
    want_rows, want_targets = expected_labelled(states, labels)
    count, total = len(want_targets), labels.numel()
    rows, targets = heads.labelled_rows(states, labels)
    assert torch.equal(rows, want_rows) and torch.equal(targets, want_targets)
    flat = states.reshape(total, -1)
    unlabelled = [flat[i] for i in range(total) if int(labels.reshape(-1)[i]) == -100]
    for capacity in (count, count + 4, total - 1):
        rows, targets = heads.labelled_rows(states, labels, capacity)
        assert rows.shape == (capacity, 5) and targets.shape == (capacity,), capacity
        assert torch.equal(rows[:count], want_rows) and torch.equal(targets[:count], want_targets), capacity
        assert (targets[count:] == -100).all(), capacity
        for row in rows[count:]:  # filler: rows of unlabelled positions
            assert any(torch.equal(row, u) for u in unlabelled), capacity
    for capacity in (total, total + 3):  # everything, as it is
        rows, targets = heads.labelled_rows(states, labels, capacity)
        assert torch.equal(rows, flat) and torch.equal(targets, labels.reshape(-1))
    with pytest.raises(RuntimeError, match="static capacity"):
        heads.labelled_rows(states, labels, count - 1)


def plain_head_logits(head: nn.Linear, rows: torch.Tensor) -> torch.Tensor:
    return torch.stack([head.weight.double() @ row.double() + head.bias.double() for row in rows])


@pytest.mark.parametrize("capacity", [None, "static"])
@pytest.mark.parametrize("chunk", [None, 1, 3, 4, 100])
def test_labelled_rows_loss_equals_a_plain_loop_chunked_or_not(chunk, capacity):
    """Summed loss, number right and gradients (head and hidden) equal one plain loop over the labelled
    positions, whatever the chunk size and with the static capacity's filler rows."""
    vocab = 19
    states, labels = hidden_and_labels(3, 8, 6, vocab, seed=13)
    head = randomize(nn.Linear(6, vocab), seed=14, std=0.8)
    count = int((labels != -100).sum())
    assert count > 4  # several chunks of 3 and 4, the last one partial
    states.requires_grad_(True)
    loss, correct = heads.labelled_rows_loss(head, states, labels, chunk,
                                             capacity=None if capacity is None else count + 5)
    loss.backward()
    got = (states.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone())
    states.grad = head.weight.grad = head.bias.grad = None
    rows, targets = expected_labelled(states, labels)
    logits = plain_head_logits(head, rows)
    want = torch.stack(plain_row_losses(logits, targets)).sum()
    want.backward()
    assert abs(loss.item() - want.item()) < 1e-5 * max(1.0, want.item()), (loss.item(), want.item())
    assert int(correct) == sum(int(z.argmax()) == int(t) for z, t in zip(logits, targets))
    for mine, theirs in zip(got, (states.grad, head.weight.grad, head.bias.grad)):
        assert torch.allclose(mine, theirs.float(), atol=1e-5, rtol=1e-4)


def plain_max_pool(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[B, L, V] -> [B, V]: per sample and vocabulary entry, the max over the kept positions only."""
    batch, length, vocab = logits.shape
    pooled = []
    for b in range(batch):
        kept = [position for position in range(length) if bool(keep[b, position])]
        pooled.append(torch.stack([torch.stack([logits[b, p, v] for p in kept]).max() for v in range(vocab)]))
    return torch.stack(pooled)


@pytest.mark.parametrize("static", [False, True], ids=["selected", "static"])
@pytest.mark.parametrize("chunk", [None, 2, 7, 13])
def test_pooled_and_labelled_loss_equals_plain_loops(chunk, static):
    """One head pass, sliced or not: the max-pooled vector over the kept positions, the summed loss and the
    number right over the labelled ones, and the gradients of both, equal plain loops."""
    vocab = 11
    states, labels = hidden_and_labels(3, 9, 6, vocab, seed=15)
    keep = torch.rand(3, 9, generator=torch.Generator().manual_seed(16)) > 0.4
    keep[:, 0] = False
    keep[:, 5] = True
    keep[2, 6:] = False  # a padded sample
    head = randomize(nn.Linear(6, vocab), seed=17, std=0.8)
    weights = torch.randn(3, vocab, generator=torch.Generator().manual_seed(18))
    states.requires_grad_(True)
    pooled, loss, correct = heads.pooled_and_labelled_loss(head, states, labels, keep, chunk, static=static)
    assert pooled.dtype == torch.float32 and pooled.shape == (3, vocab)
    ((pooled * weights).sum() + 0.3 * loss).backward()
    got = (states.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone())
    states.grad = head.weight.grad = head.bias.grad = None

    logits = plain_head_logits(head, states.reshape(-1, 6)).reshape(3, 9, vocab)
    want_pooled = plain_max_pool(logits, keep)
    want_loss = torch.stack(plain_row_losses(logits.reshape(-1, vocab), labels.reshape(-1))).sum()
    ((want_pooled * weights.double()).sum() + 0.3 * want_loss).backward()
    assert torch.allclose(pooled.double(), want_pooled, atol=1e-5)
    assert abs(loss.item() - want_loss.item()) < 1e-5 * max(1.0, want_loss.item())
    flat_logits, flat_labels = logits.reshape(-1, vocab), labels.reshape(-1)
    assert int(correct) == sum(int(flat_logits[i].argmax()) == int(flat_labels[i])
                               for i in range(len(flat_labels)) if int(flat_labels[i]) != -100)
    for mine, theirs in zip(got, (states.grad, head.weight.grad, head.bias.grad)):
        assert torch.allclose(mine, theirs.float(), atol=1e-5, rtol=1e-4)


def test_max_pool_logits_takes_the_kept_positions_only():
    gen = torch.Generator().manual_seed(19)
    logits = torch.randn(2, 6, 5, generator=gen)
    logits[:, 0] = 100.0  # a huge excluded position must not win
    keep = torch.tensor([[False, True, True, False, True, False], [False, False, False, False, False, True]])
    assert torch.equal(heads.max_pool_logits(logits, keep).double(), plain_max_pool(logits.double(), keep))
    assert torch.equal(heads.max_pool_logits(logits.bfloat16(), keep),
                       plain_max_pool(logits.bfloat16().double(), keep).float())


def plain_bag_of_words(labels: torch.Tensor, vocab: int) -> torch.Tensor:
    """Each distinct labelled id of a sample weighs 1 / (number of labelled tokens): repeats not summed."""
    targets = torch.zeros(labels.shape[0], vocab, dtype=torch.float64)
    for b, row in enumerate(labels.tolist()):
        tokens = [t for t in row if t != -100]
        for t in set(tokens):
            targets[b, t] = 1.0 / len(tokens)
    return targets


def test_bag_of_words_targets_equal_a_plain_loop():
    labels = torch.tensor([[-100, 5, 7, 5, 5, 9, -100, -100],
                           [-100, 0, 3, 3, 4, 1, 2, -100],   # id 0 (pad) as a real token
                           [-100, -100, -100, -100, -100, -100, -100, -100],  # nothing labelled
                           [-100, 8, 8, 8, 8, 8, 8, -100]])
    got = heads.bag_of_words_targets(labels, 12)
    want = plain_bag_of_words(labels, 12)
    assert got.dtype == torch.float32 and torch.allclose(got.double(), want, atol=1e-7)
    assert abs(float(got[0].sum()) - 3 / 5) < 1e-6  # (#distinct / #tokens)
    gen = torch.Generator().manual_seed(20)
    labels = torch.randint(0, 9, (5, 14), generator=gen)
    labels[torch.rand(5, 14, generator=gen) < 0.3] = -100
    assert torch.allclose(heads.bag_of_words_targets(labels, 9).double(), plain_bag_of_words(labels, 9), atol=1e-7)


def test_bag_of_words_loss_equals_a_plain_loop():
    """Mean over samples of -sum_v target_v * log softmax(pooled)_v."""
    gen = torch.Generator().manual_seed(21)
    pooled = 2.0 * torch.randn(4, 10, generator=gen)
    labels = torch.randint(0, 10, (4, 9), generator=gen)
    labels[:, 0] = -100
    targets = plain_bag_of_words(labels, 10)
    per_sample = []
    for b in range(4):
        log_norm = math.log(sum(math.exp(float(z)) for z in pooled[b]))
        per_sample.append(-sum(float(targets[b, v]) * (float(pooled[b, v]) - log_norm) for v in range(10)))
    want = sum(per_sample) / 4
    got = heads.bag_of_words_loss(pooled, targets.float())
    assert abs(got.item() - want) < 1e-5, (got.item(), want)


# --------------------------------------------------------------------------------------------------
# the whole forward


def plain_retromae_losses(model: RetroMAEForPretraining, batch: dict) -> dict:
    """The losses built by hand: the HF encoder's own forward for the encoder (its logits and last hidden
    state), then the decoder path from the embedding, decoder-layer and MLM-head weights with the plain
    math of this file: kv = [CLS vector ; E(ids)[1:]], query_i = LayerNorm(CLS vector + P_i + T_0)."""
    lm = model.lm
    ids = batch["encoder_input_ids"]
    mask = batch["encoder_attention_mask"]
    mask = torch.ones_like(ids) if mask is None else mask
    out = lm(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    enc_logits = out.logits.double()
    vocab = enc_logits.shape[-1]
    enc_losses = plain_row_losses(enc_logits.reshape(-1, vocab), batch["encoder_labels"].reshape(-1))
    encoder_loss = torch.stack(enc_losses).sum() / len(enc_losses)

    cls = out.hidden_states[-1][:, 0].double()                                    # [B, H]
    emb = lm.bert.embeddings
    dec_ids = batch["decoder_input_ids"]
    batch_size, length = dec_ids.shape
    words, positions = emb.word_embeddings.weight.double(), emb.position_embeddings.weight.double()
    token_type = emb.token_type_embeddings.weight.double()[0]
    key_value = [torch.stack([cls[b]] + [plain_layer_norm(words[int(dec_ids[b, j])] + positions[j] + token_type,
                                                          emb.LayerNorm) for j in range(1, length)])
                 for b in range(batch_size)]
    query = [torch.stack([plain_layer_norm(cls[b] + positions[i] + token_type, emb.LayerNorm) for i in range(length)])
             for b in range(batch_size)]
    decoded = plain_decoder_layer(model.c_head, torch.stack(query), torch.stack(key_value),
                                  batch["decoder_attention_mask"], lm.config.num_attention_heads)
    predictions = lm.cls.predictions
    transformed = plain_layer_norm(plain_gelu(plain_linear(decoded, predictions.transform.dense)),
                                   predictions.transform.LayerNorm)
    dec_logits = plain_linear(transformed, predictions.decoder)
    dec_losses = plain_row_losses(dec_logits.reshape(-1, vocab), batch["decoder_labels"].reshape(-1))
    decoder_loss = torch.stack(dec_losses).sum() / len(dec_losses)

    # DupMAE: max over positions 1.. that are not padding of the encoder logits; targets from the
    # sample's labelled decoder tokens
    keep = mask.bool().clone()
    keep[:, 0] = False
    pooled = plain_max_pool(enc_logits, keep)
    targets = plain_bag_of_words(batch["decoder_labels"], vocab)
    log_norm = torch.log(torch.exp(pooled - pooled.max(-1, keepdim=True).values).sum(-1, keepdim=True)) + \
        pooled.max(-1, keepdim=True).values
    bow_loss = -(targets * (pooled - log_norm)).sum(-1).mean()
    return {"encoder_loss": encoder_loss, "decoder_loss": decoder_loss, "bow_loss": bow_loss}


FORWARD_VARIANTS = [
    pytest.param("retromae", True, None, None, id="retromae-fast"),
    pytest.param("retromae", True, 4, (20, 13, 6, 17), id="retromae-static-chunked"),
    pytest.param("retromae", False, None, None, id="retromae-naive"),
    pytest.param("dupmae", True, None, None, id="dupmae-fast"),
    pytest.param("dupmae", True, 5, (22, 22, 22), id="dupmae-static-unpadded-chunked"),
    pytest.param("dupmae", False, None, None, id="dupmae-naive"),
]


@pytest.mark.parametrize("objective, fast_heads, chunk, static", FORWARD_VARIANTS)
def test_forward_loss_is_encoder_plus_decoder_plus_weighted_bow(objective, fast_heads, chunk, static):
    """On a tiny random BERT (every weight random, the decoder's included), each reported part equals the
    hand-built one, loss = encoder + decoder (+ 0.7 * bow for DupMAE), and the gradients agree."""
    torch.manual_seed(0)
    config = RetroMAEConfig(objective=objective, bow_loss_weight=0.7, fast_heads=fast_heads, ce_chunk_size=chunk)
    model = RetroMAEForPretraining(tiny_bert(), config).train()  # no dropout in tiny_bert: train = eval
    randomize(model, seed=22, std=0.2)
    batch = synthetic_batch(seed=1, lengths=static, static=True) if static else synthetic_batch(seed=1)
    if static:
        assert "encoder_label_capacity" in batch

    out = model(**batch)
    out.loss.backward()
    got = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    parts = plain_retromae_losses(model, batch)
    want = parts["encoder_loss"] + parts["decoder_loss"]
    if objective == "dupmae":
        want = want + 0.7 * parts["bow_loss"]
        assert abs(out.bow_loss.item() - parts["bow_loss"].item()) < 1e-5, (out.bow_loss.item(), parts["bow_loss"])
    else:
        assert out.bow_loss is None
    for name in ("encoder_loss", "decoder_loss"):
        assert abs(getattr(out, name).item() - parts[name].item()) < 2e-5, (name, getattr(out, name), parts[name])
    assert abs(out.loss.item() - want.item()) < 3e-5, (out.loss.item(), want.item())
    assert int(out.decoder_tokens) == int((batch["decoder_labels"] != -100).sum())
    assert int(out.encoder_tokens) == int((batch["encoder_labels"] != -100).sum())
    want.backward()
    expected = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(expected)
    for name in expected:
        assert torch.allclose(got[name], expected[name].float(), atol=2e-5, rtol=1e-4), \
            (name, (got[name] - expected[name]).abs().max())
