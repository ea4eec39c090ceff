"""Monitoring: the FLOP formula against torch's FLOP counter, the peak table, Throughput averages,
metrics.jsonl + TensorBoard read back with TensorBoard's own event reader, resume truncation, and the
progress bar's plain (non-terminal) mode."""

from __future__ import annotations

import io
import json
import math

import pytest

from retromae_ds.monitor import flops, metrics, peaks, progress, throughput


def tiny_bert_config(**overrides):
    from transformers import BertConfig

    kw = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
              max_position_embeddings=64)
    kw.update(overrides)
    return BertConfig(**kw)


def read_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# ---- FLOPs ---------------------------------------------------------------------------------------

def test_flops_hand_count_tiny_config():
    # h=4, f=8, 1 encoder layer, V=10, L=6 (4 real tokens). Matmuls of one layer, as (m, k, n):
    # q, k, v, out (6,4,4) x4; scores (6,4,6) and weights x V (6,6,4), one head or several alike;
    # ffn (6,4,8) + (6,8,4).
    cfg = tiny_bert_config(vocab_size=10, hidden_size=4, num_hidden_layers=1, num_attention_heads=1,
                           intermediate_size=8)
    mm = lambda m, k, n: 2 * m * k * n  # noqa: E731
    layer = 4 * mm(6, 4, 4) + mm(6, 4, 6) + mm(6, 6, 4) + mm(6, 4, 8) + mm(6, 8, 4)
    assert layer == 768 + 576 + 768
    head = lambda rows: mm(rows, 4, 4) + mm(rows, 4, 10)  # noqa: E731
    # retromae, fast heads: encoder head on 0.3 * 4 = 1.2 masked rows, decoder head on 4 rows
    expected = 3 * (layer + head(1.2) + layer + head(4))
    got = flops.retromae_flops_per_sample(cfg, 6, objective="retromae")
    assert got == pytest.approx(expected)
    assert flops.retromae_flops_per_sample(cfg, 6, objective="mlm") == pytest.approx(3 * (layer + head(1.2)))
    # naive heads: every row through the head, both branches; DupMAE's encoder head always sees all rows
    assert flops.retromae_flops_per_sample(cfg, 6, objective="retromae", fast_heads=False) == \
        pytest.approx(3 * (2 * layer + 2 * head(6)))
    assert flops.retromae_flops_per_sample(cfg, 6, objective="dupmae") == \
        pytest.approx(3 * (2 * layer + head(6) + head(4)))
    assert flops.retromae_flops_per_sample(cfg, 6, num_encoder_masked=2, num_decoder_labelled=3) == \
        pytest.approx(3 * (2 * layer + head(2) + head(3)))


def test_flops_match_torch_flop_counter_on_bert_mlm():
    """The encoder + head terms equal what torch counts for a real BertForMaskedLM forward+backward."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import BertForMaskedLM

    cfg = tiny_bert_config()
    cfg._attn_implementation = "eager"  # the counter sees eager matmuls (not every SDPA CPU kernel)
    model = BertForMaskedLM(cfg).train()
    seq_len = 10
    ids = torch.randint(5, 50, (1, seq_len))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids).logits.sum().backward()
    formula = flops.retromae_flops_per_sample(cfg, seq_len, objective="mlm", fast_heads=False)
    assert formula == pytest.approx(counter.get_total_flops(), rel=1e-9)


def test_flops_scale_as_expected():
    cfg = tiny_bert_config(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                           intermediate_size=3072, max_position_embeddings=512)
    f = lambda L, **kw: flops.retromae_flops_per_sample(cfg, L, **kw)  # noqa: E731
    # Linear + quadratic in L: the second difference f(L+2d) - 2 f(L+d) + f(L) = 2 c d^2 isolates the
    # attention term c L^2 with c = 4 h per layer (13 layers: 12 encoder + 1 decoder), x 3 for training.
    second_diff = f(384) - 2 * f(256) + f(128)
    assert second_diff == pytest.approx(2 * (3 * 13 * 4 * 768) * 128 ** 2, rel=1e-9)
    # Adding layers adds exactly one layer's cost each.
    deeper = tiny_bert_config(vocab_size=30522, hidden_size=768, num_hidden_layers=13, num_attention_heads=12,
                              intermediate_size=3072)
    one_layer = flops.retromae_flops_per_sample(deeper, 512) - f(512)
    assert one_layer == pytest.approx(3 * flops.transformer_layer_flops(512, 768, 3072))
    # Order: mlm < retromae < dupmae < naive heads; BERT-base RetroMAE ~ 6 * params * tokens ballpark.
    assert f(512, objective="mlm") < f(512) < f(512, objective="dupmae") < f(512, fast_heads=False)
    params = 110e6
    assert 0.5 < f(512, objective="mlm") / (6 * params * 512) < 1.5


# ---- peak FLOPs ----------------------------------------------------------------------------------

def test_peak_table_by_device_name():
    assert peaks.lookup_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4)
    assert peaks.lookup_peak_tflops("NVIDIA H100 PCIe", "bf16") == pytest.approx(756.0)
    assert peaks.lookup_peak_tflops("NVIDIA H200", "fp16") == pytest.approx(989.4)
    assert peaks.lookup_peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == pytest.approx(312.0)
    assert peaks.lookup_peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == pytest.approx(19.5)
    assert peaks.lookup_peak_tflops("NVIDIA A100-SXM4-80GB", "fp32", tf32=True) == pytest.approx(156.0)
    assert peaks.lookup_peak_tflops("NVIDIA A10G", "bf16") == pytest.approx(70.0)
    assert peaks.lookup_peak_tflops("NVIDIA A10", "bf16") == pytest.approx(125.0)
    assert peaks.lookup_peak_tflops("NVIDIA L4", "bf16") == pytest.approx(121.0)
    assert peaks.lookup_peak_tflops("NVIDIA L40S", "bf16") == pytest.approx(362.1)
    assert peaks.lookup_peak_tflops("Tesla V100-SXM2-32GB", "fp16") == pytest.approx(125.0)
    assert peaks.lookup_peak_tflops("NVIDIA GeForce RTX 4090", "bf16") == pytest.approx(165.2)
    assert peaks.lookup_peak_tflops("Some Unknown Accelerator", "bf16") is None


def test_peak_flops_cpu_none_unless_overridden():
    import torch

    assert peaks.peak_flops_per_device(torch.device("cpu"), "fp32") is None
    assert peaks.peak_flops_per_device(torch.device("cpu"), "fp32", override=2e12) == 2e12


# ---- Throughput ----------------------------------------------------------------------------------

def test_throughput_window_averages_and_mfu():
    import torch

    cfg = tiny_bert_config()
    meter = throughput.Throughput(model_config=cfg, objective="retromae", device=torch.device("cpu"), dtype="fp32",
                               world_size=2, peak_tflops=1e-6)
    per_sample = flops.retromae_flops_per_sample(cfg, 32, objective="retromae")
    meter.update(step_time=1.0, data_wait=0.1, tokens=8 * 32, samples=8, seq_len=32)
    meter.update(step_time=3.0, data_wait=0.3, tokens=8 * 32, samples=8, seq_len=32)
    s = meter.summary()
    assert s["tokens_per_s"] == pytest.approx(512 / 4.0)
    assert s["samples_per_s"] == pytest.approx(16 / 4.0)
    assert s["step_time_s"] == pytest.approx(2.0)
    assert s["data_wait_s"] == pytest.approx(0.2)
    assert s["tflops_per_device"] == pytest.approx(per_sample * 16 / 4.0 / 2 / 1e12)
    assert s["mfu"] == pytest.approx(s["tflops_per_device"] / 1e-6)
    assert s["peak_host_mem_gb"] > 0.01  # a Python process with torch holds well over 10 MB
    assert "peak_device_mem_gb" not in s  # CPU

    # The window restarts: the next summary reflects only the new updates. Shorter real lengths
    # (padding) count fewer FLOPs than full-length samples.
    meter.update(step_time=1.0, tokens=8 * 16, samples=8, seq_len=32)
    s2 = meter.summary()
    assert s2["tokens_per_s"] == pytest.approx(128.0)
    assert s2["tflops_per_device"] == pytest.approx(
        flops.retromae_flops_per_sample(cfg, 16) * 8 / 1.0 / 2 / 1e12)


def test_throughput_without_peak_has_no_mfu():
    import torch

    meter = throughput.Throughput(model_config=tiny_bert_config(), objective="mlm", device=torch.device("cpu"),
                               dtype="fp32", world_size=1, peak_tflops=None)
    meter.update(step_time=0.5, data_wait=0.0, tokens=100, samples=4, seq_len=32)
    s = meter.summary()
    assert "mfu" not in s and s["tflops_per_device"] > 0


# ---- metrics.jsonl + TensorBoard -----------------------------------------------------------------

TRAIN_KEYS = ("loss", "encoder_loss", "decoder_loss", "encoder_accuracy", "lr", "grad_norm", "skipped_steps",
              "tokens_seen", "epoch", "tokens_per_s", "samples_per_s", "step_time_s", "data_wait_s",
              "tflops_per_device", "mfu", "peak_host_mem_gb")


def train_metrics(step: int) -> dict:
    return {key: float(step) + i / 100 for i, key in enumerate(TRAIN_KEYS)}


def test_logger_writes_jsonl_and_tensorboard(tmp_path):
    out = tmp_path / "run"
    logger = metrics.MetricsLogger(out, None, enabled=True, resume_step=0)
    for step in (1, 2, 3):
        logger.log(step, train_metrics(step))
    logger.log(3, {"lee/spearman_cls": 0.47, "heldout/mrr10": 0.8, "heldout/num_queries": 40}, kind="eval")
    logger.close()

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["kind"]) for r in records] == [(1, "train"), (2, "train"), (3, "train"), (3, "eval")]
    assert records[1] == {"step": 2, "kind": "train", **train_metrics(2)}
    assert records[3]["lee/spearman_cls"] == 0.47 and records[3]["heldout/num_queries"] == 40
    assert metrics.read_metrics(out, kind="eval") == [records[3]]

    scalars = read_scalars(out / "tensorboard")
    assert scalars["train/loss"] == [(1, pytest.approx(1.0)), (2, pytest.approx(2.0)), (3, pytest.approx(3.0))]
    assert scalars["perf/tokens_per_s"][-1] == (3, pytest.approx(3.0 + TRAIN_KEYS.index("tokens_per_s") / 100))
    for key in ("encoder_loss", "decoder_loss", "encoder_accuracy", "lr", "grad_norm", "skipped_steps"):
        assert len(scalars[f"train/{key}"]) == 3, key
    for key in ("samples_per_s", "step_time_s", "data_wait_s", "tflops_per_device", "mfu", "peak_host_mem_gb"):
        assert len(scalars[f"perf/{key}"]) == 3, key
    assert scalars["eval/lee/spearman_cls"] == [(3, pytest.approx(0.47))]
    assert scalars["eval/heldout/mrr10"] == [(3, pytest.approx(0.8))]


def test_logger_custom_tensorboard_dir_nonfinite_and_numpy_values(tmp_path):
    import numpy as np
    import torch

    tb = tmp_path / "elsewhere"
    with metrics.MetricsLogger(tmp_path / "run", tb) as logger:
        logger.log(1, {"loss": float("nan"), "grad_norm": np.float32(1.5), "lr": torch.tensor(0.001),
                       "skipped_steps": np.int64(2), "mfu": None})
    line = (tmp_path / "run" / "metrics.jsonl").read_text().strip()
    record = json.loads(line)  # strict JSON: NaN became null
    assert "NaN" not in line
    assert record == {"step": 1, "kind": "train", "loss": None, "grad_norm": 1.5, "lr": pytest.approx(0.001),
                      "skipped_steps": 2}
    assert not (tmp_path / "run" / "tensorboard").exists()
    scalars = read_scalars(tb)
    assert math.isnan(scalars["train/loss"][0][1])
    assert scalars["train/grad_norm"] == [(1, 1.5)]
    assert "perf/mfu" not in scalars


def test_disabled_logger_writes_nothing(tmp_path):
    logger = metrics.MetricsLogger(tmp_path / "run", None, enabled=False, resume_step=5)
    logger.log(1, {"loss": 1.0})
    logger.truncate_after(0)
    logger.close()
    assert not (tmp_path / "run").exists()


def test_truncate_after_keeps_earlier_steps_atomically(tmp_path):
    logger = metrics.MetricsLogger(tmp_path, None)
    for step in range(1, 7):
        logger.log(step, {"loss": 10.0 - step})
    logger.log(4, {"heldout/mrr10": 0.5}, kind="eval")
    logger.truncate_after(4)
    logger.log(5, {"loss": 0.25})  # logging continues after the rewrite
    logger.close()
    records = metrics.read_metrics(tmp_path)
    assert [(r["step"], r["kind"]) for r in records] == [(1, "train"), (2, "train"), (3, "train"), (4, "train"),
                                                          (4, "eval"), (5, "train")]
    assert records[-1]["loss"] == 0.25
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_resume_drops_later_records_and_purges_tensorboard(tmp_path):
    # First run reaches step 6 (checkpoint at 4), then dies mid-write: a half line at the end.
    first = metrics.MetricsLogger(tmp_path, None)
    for step in range(1, 7):
        first.log(step, {"loss": float(step)})
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "kind": "tr')
    # Resumed run continues from step 4 with different values.
    second = metrics.MetricsLogger(tmp_path, None, resume_step=4)
    for step in (5, 6, 7):
        second.log(step, {"loss": 100.0 + step})
    second.close()

    records = metrics.read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0),
                                                         (5, 105.0), (6, 106.0), (7, 107.0)]
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line)  # the half-written line is gone
    assert read_scalars(tmp_path / "tensorboard")["train/loss"] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 105.0), (6, 106.0), (7, 107.0)]


# ---- progress bar --------------------------------------------------------------------------------

def test_progress_bar_plain_mode_prints_log_lines():
    buf = io.StringIO()
    bar = progress.ProgressBar(100, initial_step=10, enabled=True, plain=True, file=buf)
    bar.update(11, None)
    bar.update(12, None)
    assert buf.getvalue() == ""  # no metrics: nothing to say
    bar.update(20, {"loss": 3.14159, "tokens_per_s": 12345.6, "lr": 1e-4})
    bar.update(30, {"loss": 2.5, "tokens_per_s": 1000.0, "padding_efficiency": 0.9712})
    bar.write("a note")
    bar.close()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 3
    assert "step 20/100 (20.0%)" in lines[0] and "loss 3.1416" in lines[0] and "tok/s 12,346" in lines[0]
    assert "eta " in lines[0] and "lr 0.0001" in lines[0]
    assert "step 30/100" in lines[1] and "loss 2.5000" in lines[1] and "real 97%" in lines[1]
    assert "real" not in lines[0]  # shown only when the run reports it
    assert lines[2] == "a note"
    assert bar.eta_seconds() is not None and bar.eta_seconds() >= 0


def test_progress_bar_decides_mode_from_terminal_and_is_quiet_when_disabled(capsys):
    bar = progress.ProgressBar(10, initial_step=0, enabled=True)  # pytest captures stderr: not a TTY
    assert bar.plain
    bar.update(5, {"loss": 1.0})
    bar.close()
    assert "step 5/10" in capsys.readouterr().out

    quiet = progress.ProgressBar(10, initial_step=0, enabled=False)
    quiet.update(5, {"loss": 1.0})
    quiet.write("hello")
    quiet.close()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_progress_bar_tqdm_mode_shows_loss_and_rate():
    buf = io.StringIO()
    bar = progress.ProgressBar(50, initial_step=5, enabled=True, plain=False, file=buf)
    bar.update(10, {"loss": 1.2345, "tokens_per_s": 999.0})
    bar._bar.refresh()
    bar.close()
    text = buf.getvalue()
    assert "10/50" in text and "loss=1.2345" in text and "tok/s=999" in text


def test_a_step_of_a_kind_is_logged_once_even_when_a_finished_run_is_run_again(tmp_path):
    """Re-running a finished run's command resumes at its last step and evaluates it again: that
    evaluation is already in metrics.jsonl and TensorBoard, and must not appear twice."""
    first = metrics.MetricsLogger(tmp_path, None)
    for step in (1, 2):
        first.log(step, {"loss": float(step)})
    assert first.log(2, {"heldout/mrr10": 0.5}, kind="eval")
    first.close()
    again = metrics.MetricsLogger(tmp_path, None, resume_step=2)
    assert not again.log(2, {"heldout/mrr10": 0.5}, kind="eval")
    again.close()
    assert [(r["step"], r["kind"]) for r in metrics.read_metrics(tmp_path)] == [(1, "train"), (2, "train"),
                                                                                (2, "eval")]
    assert read_scalars(tmp_path / "tensorboard")["eval/heldout/mrr10"] == [(2, 0.5)]


def test_a_fresh_start_in_a_used_folder_starts_the_records_over(tmp_path):
    first = metrics.MetricsLogger(tmp_path, None)
    first.log(0, {"heldout/mrr10": 0.1}, kind="eval")
    first.log(1, {"loss": 1.0})
    first.close()
    fresh = metrics.MetricsLogger(tmp_path, None)  # --resume none: a new run in the same --output-dir
    assert fresh.log(0, {"heldout/mrr10": 0.2}, kind="eval")
    fresh.close()
    assert [(r["step"], r["kind"], r["heldout/mrr10"]) for r in metrics.read_metrics(tmp_path)] == [(0, "eval", 0.2)]
    assert read_scalars(tmp_path / "tensorboard")["eval/heldout/mrr10"] == [(0, pytest.approx(0.2))]


def test_the_console_line_of_an_evaluation_shows_the_key_numbers_and_their_change():
    from retromae_ds.engine.trainer import eval_line

    first = {"heldout/mrr10": 0.344, "lee/pearson_cls": 0.604, "cls_gain": 0.01, "heldout/recall10": 0.5}
    later = {"heldout/mrr10": 0.385, "lee/pearson_cls": 0.511, "cls_gain": 0.03, "heldout/recall10": 0.6}
    line = eval_line(100, later, first)
    assert line.startswith("[retromae-ds] eval at step 100: ")
    assert "heldout/mrr10 0.3850 (+0.0410)" in line and "lee/pearson_cls 0.5110 (-0.0930)" in line
    assert "cls_gain 0.0300 (+0.0200)" in line
    assert "(+" not in eval_line(0, first, None)
