"""Run-config parsing and DeepSpeed "auto" resolution (no processes started)."""

import argparse
import json

import pytest

from retromae_ds import config as C
from retromae_ds.engine import ds_config
from retromae_ds.errors import UserError


def parse(*argv):
    p = argparse.ArgumentParser()
    C.add_arguments(p)
    return C.config_from_args(p.parse_args(list(argv)))


def ds_json(**overrides):
    ds = json.loads(open("ds_configs/zero2.json").read())
    ds.update(overrides)
    return ds


def test_defaults_and_explicit_tracking():
    cfg = parse("--lr", "3e-4", "--micro-batch-size", "4")
    assert cfg.lr == 3e-4 and cfg.micro_batch_size == 4
    assert cfg.explicit == {"lr", "micro_batch_size"}
    assert cfg.is_demo and cfg.objective == "retromae" and cfg.encoder_mask_ratio == 0.3


def test_yaml_then_cli_wins(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("lr: 0.0002\nmicro-batch-size: 3\nobjective: dupmae\nactivation_checkpointing: true\n")
    cfg = parse("--config", str(y), "--micro-batch-size", "5")
    assert cfg.lr == 2e-4 and cfg.micro_batch_size == 5 and cfg.objective == "dupmae"
    assert cfg.activation_checkpointing is True
    assert {"lr", "micro_batch_size", "objective", "activation_checkpointing"} <= cfg.explicit


def test_yaml_errors_name_the_file_and_key(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("learning_rate: 1\n")
    with pytest.raises(UserError, match=r"run.yaml.*unknown setting `learning_rate`"):
        parse("--config", str(y))
    y.write_text("lr: fast\n")
    with pytest.raises(UserError, match=r"`lr` must be a float"):
        parse("--config", str(y))
    with pytest.raises(UserError, match="no such file"):
        parse("--config", str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("argv, match", [
    (["--data", "x"], "--model"),
    (["--model", "m", "--model-config", "c", "--data", "x"], "both given"),
    (["--model-config", "c", "--data", "x"], "needs --tokenizer"),
    (["--micro-batch-size", "0"], "micro-batch-size"),
    (["--data", "a", "b", "--data-weights", "1", "--model", "m"], "one weight per prefix"),
    (["--time-budget", "soon"], "time-budget"),
])
def test_invalid_combinations(argv, match):
    with pytest.raises(UserError, match=match):
        parse(*argv)


def test_time_budget_parsing():
    assert C.parse_time_budget("") is None
    assert C.parse_time_budget("90") == 90
    assert C.parse_time_budget("90m") == 5400
    assert C.parse_time_budget("1d2h3m4s") == ((24 + 2) * 60 + 3) * 60 + 4


def test_profile_steps_parsing():
    assert C.parse_profile_steps("") is None
    assert C.parse_profile_steps("20-25") == (20, 25) and C.parse_profile_steps(" 7 ") == (7, 7)
    for bad in ("0-3", "5-2", "a-b", "3-"):
        with pytest.raises(UserError, match="--profile-steps"):
            parse("--profile-steps", bad)


def test_auto_fields_are_filled():
    cfg = parse("--micro-batch-size", "4", "--grad-accum", "3", "--lr", "2e-4", "--clip", "0.5")
    ds = ds_config.resolve_deepspeed_config(ds_json(), cfg, world_size=2, precision="fp32")
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 24
    assert ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["params"]["lr"] == 2e-4
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.999]
    assert ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert "auto" not in json.dumps(ds)


def test_concrete_json_value_is_adopted_when_flag_not_given():
    cfg = parse()
    ds = ds_config.resolve_deepspeed_config(ds_json(gradient_accumulation_steps=4), cfg, world_size=1, precision="fp32")
    assert cfg.grad_accum == 4 and ds["train_batch_size"] == cfg.micro_batch_size * 4


def test_conflicting_values_are_rejected():
    cfg = parse("--grad-accum", "2")
    with pytest.raises(UserError, match=r"gradient_accumulation_steps.*4.*--grad-accum 2"):
        ds_config.resolve_deepspeed_config(ds_json(gradient_accumulation_steps=4), cfg, world_size=1, precision="fp32")
    cfg = parse("--micro-batch-size", "2")
    with pytest.raises(UserError, match="train_batch_size"):
        ds_config.resolve_deepspeed_config(ds_json(train_batch_size=7), cfg, world_size=1, precision="fp32")
    cfg = parse("--precision", "fp32")
    with pytest.raises(UserError, match=r"bf16.enabled.*--precision fp32"):
        ds_config.resolve_deepspeed_config(ds_json(bf16={"enabled": True}), cfg, world_size=1, precision="fp32")
    cfg = parse("--lr", "1e-3")
    ds = ds_json()
    ds["optimizer"]["params"]["lr"] = 5e-4
    with pytest.raises(UserError, match=r"optimizer.params.lr.*--lr"):
        ds_config.resolve_deepspeed_config(ds, cfg, world_size=1, precision="fp32")


def test_precision_auto():
    cfg = parse()
    assert ds_config.resolve_precision(cfg, "cpu", False) == "fp32"
    assert ds_config.resolve_precision(cfg, "cuda", True) == "bf16"
    assert ds_config.resolve_precision(cfg, "cuda", False) == "fp16"
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        ds_config.resolve_precision(parse("--precision", "fp16"), "cpu", False)


def test_explicit_precision_is_what_runs():
    """An explicit --precision is kept on any device (bf16 on CPU is slow but honest), and it is what
    the DeepSpeed JSON enables."""
    for device, bf16_ok in (("cpu", False), ("cuda", False), ("cuda", True)):
        for precision in ("bf16", "fp32"):
            assert ds_config.resolve_precision(parse("--precision", precision), device, bf16_ok) == precision
    assert ds_config.resolve_precision(parse("--precision", "fp16"), "cuda", True) == "fp16"
    for precision in ("bf16", "fp16", "fp32"):
        cfg = parse("--precision", precision)
        ds = ds_config.resolve_deepspeed_config(ds_json(), cfg, world_size=1, precision=precision)
        assert ds["bf16"]["enabled"] is (precision == "bf16") and ds["fp16"]["enabled"] is (precision == "fp16")


def test_shipped_ds_configs_resolve():
    for name in ("zero2", "zero3", "zero3_offload"):
        cfg = parse()
        ds = ds_config.resolve_deepspeed_config(json.load(open(f"ds_configs/{name}.json")), cfg, world_size=8,
                                                precision="bf16")
        assert ds["bf16"]["enabled"] is True and ds["train_batch_size"] == 8 * cfg.micro_batch_size


def test_run_presets_load_through_the_yaml_loader():
    """configs/*.yaml are read as `--config` reads them: every key a flag, every value of its type (a
    renamed flag breaks this), no clash with the DeepSpeed JSON they name; each is headed by a comment
    with its launch line; demo.yaml keeps the no-flag demo's settings."""
    from pathlib import Path

    from retromae_ds.engine.build import DEMO_DEFAULTS

    configs = Path(__file__).resolve().parent.parent / "configs"
    presets = sorted(configs.glob("*.yaml"))
    assert {p.name for p in presets} >= {"demo.yaml", "bert-base-8gpu.yaml", "long-context-8k.yaml"}
    for path in presets:
        values = C.load_yaml(str(path))
        model = [] if "model" in values else ["--model", "path/to/model"]  # demo.yaml: given at launch
        cfg = parse("--config", str(path), *model)
        assert {name: getattr(cfg, name) for name in values} == values and cfg.explicit >= set(values)
        ds_config.resolve_deepspeed_config(ds_config.load_deepspeed_json(cfg.deepspeed), cfg, world_size=8,
                                           precision="bf16")
        text = path.read_text()
        assert text.startswith("# ") and f"--config configs/{path.name}" in text, path.name
    demo = C.load_yaml(str(configs / "demo.yaml"))
    assert demo["data"] == [C.DEMO_DATA_PREFIX] and {k: demo[k] for k in DEMO_DEFAULTS} == DEMO_DEFAULTS


def test_schedule_is_a_function_of_step():
    from retromae_ds.engine.schedule import lr_at, warmup_steps

    assert warmup_steps(0.1, 200) == 20 and warmup_steps(30, 200) == 30
    kw = dict(peak_lr=1.0, total_steps=100, warmup=10)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(55, **kw) == pytest.approx(0.5)
    assert lr_at(100, **kw) == pytest.approx(0.0)
    assert lr_at(55, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_at(32, schedule="cosine", **kw) > lr_at(32, **kw)
    assert lr_at(100, min_ratio=0.1, **kw) == pytest.approx(0.1)


def test_missing_model_folder_is_a_clear_error(tmp_path):
    from retromae_ds.engine.build import load_tokenizer

    cfg = parse("--data", "x", "--model", str(tmp_path / "no-model"))
    with pytest.raises(UserError, match=r"--model .*no-model: no such folder"):
        load_tokenizer(cfg)
