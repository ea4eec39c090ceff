"""--compile, --static-shapes and --profile-steps in real (1-rank, CPU) DeepSpeed runs, and the loader.

- `--compile` (torch.compile of the encoder layers and the decoder layer) trains the same as eager with
  the same shapes (`--static-shapes`): losses and gradient norms over a few optimizer steps agree to
  float rounding, so the compiled layers compute the same forward and backward;
- `--compile` with ZeRO-3 is a clear error;
- `--profile-steps` writes a trace and a summary with per-step figures;
- the loader thread hands out exactly the blocks a direct collate of the same indices gives.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.helpers import engine_runs as R
from tests.helpers.tiny_run import tiny_run

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Lee news at L = 64 and the tiny BERT without dropout (compiled dropout draws other random numbers)."""
    return tiny_run(tmp_path_factory.mktemp("step_features"), n_docs=60, max_seq_len=64,
                    bert_overrides={"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})


def train(corpus, name: str, extra: list[str], expect_rc: int = 0):
    root = corpus["root"]
    args = [*corpus["base"], "--micro-batch-size", "4", "--max-steps", "4", "--log-interval", "1", "--save-interval", "0",
            "--eval-heldout-docs", "0", "--no-export", "--seed", "3", "--lr", "1e-3", "--warmup", "1",
            "--output-dir", str(root / name), *extra]
    res = R.run("python", 1, args, root / f"{name}.log", timeout=400, script=R.PROBE,
                env=R.probe_env(root / f"{name}.probe"))
    assert res.returncode == expect_rc, res.stdout[-4000:]
    return res, R.metrics(root / name) if expect_rc == 0 else None


@pytest.mark.full
def test_compiled_layers_train_like_eager(corpus):
    _, eager = train(corpus, "eager", ["--static-shapes", "--deepspeed", "zero2"])
    _, compiled = train(corpus, "compiled", ["--compile", "--deepspeed", "zero2"])
    assert [r["step"] for r in compiled] == [1, 2, 3, 4]
    assert R.probe(corpus["root"] / "compiled.probe")["engine"]["compiled_modules"] == 3   # 2 encoder layers + decoder
    assert R.probe(corpus["root"] / "eager.probe")["engine"]["compiled_modules"] == 0
    for a, b in zip(eager, compiled):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-5, abs=2e-5), (a["step"], a["loss"], b["loss"])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4, abs=1e-5), a["step"]
    log = (corpus["root"] / "compiled.log").read_text()
    assert "Traceback" not in log


@pytest.mark.full
def test_compile_with_zero3_is_a_clear_error(corpus):
    res, _ = train(corpus, "compiled_z3", ["--compile", "--deepspeed", "zero3"], expect_rc=2)
    assert "--compile with ZeRO-3" in res.stdout and "Traceback" not in res.stdout


def test_profile_steps_write_a_trace_and_a_summary(corpus):
    train(corpus, "profiled", ["--profile-steps", "2-3", "--deepspeed", "zero2"])
    folder = corpus["root"] / "profiled" / "profile"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["wall_ms_per_step"] > 0
    assert summary["aten_ops_per_step"] > 50 and summary["top_host"]
    assert json.loads((folder / "trace.json").read_text())["traceEvents"]
    assert "ms wall per step" in (folder / "summary.txt").read_text()


def test_loader_thread_gives_the_direct_collate(corpus):
    from transformers import AutoTokenizer

    from retromae_ds.data.indexed import IndexedDataset
    from retromae_ds.data.loader import MicroBatchLoader
    from retromae_ds.data.masking import MaskGenerator, collate_blocks, continuation_table

    root = corpus["root"]
    tok = AutoTokenizer.from_pretrained(corpus["base"][corpus["base"].index("--tokenizer") + 1])
    data = IndexedDataset(str(root / "lee"))
    masker = MaskGenerator(continuation_table(tok), tok.cls_token_id, tok.sep_token_id, tok.pad_token_id,
                           tok.mask_token_id, len(tok), tok.all_special_ids)
    batch = np.random.default_rng(0).permutation(len(data))[:12]
    for static in (False, True):
        loader = MicroBatchLoader(data, masker, tok.pad_token_id, block_cap=62, micro_batch_size=3, world_size=2,
                                  rank=1, grad_accum=2, static_width=static)
        try:
            micro = loader.submit(batch).result()
        finally:
            loader.close()
        assert len(micro) == 2
        for k, mb in enumerate(micro):
            ids = batch[(k * 2 + 1) * 3:(k * 2 + 2) * 3]                   # rank 1's slice of accumulation step k
            tokens, lengths = collate_blocks([data[int(i)][:62] for i in ids], tok.pad_token_id, max_tokens=62)
            if static:
                assert mb.tokens.shape == (3, 62)
                tokens = torch.nn.functional.pad(tokens, (0, 62 - tokens.shape[1]), value=tok.pad_token_id)
            assert torch.equal(mb.tokens, tokens) and torch.equal(mb.lengths, lengths)
            assert mb.plan == masker.plan(tokens.numpy(), lengths.numpy())
