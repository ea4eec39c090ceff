"""The DeepSpeed JSON of a run: find it, fill its "auto" fields from the run config, settle precision.

`--deepspeed` names a JSON file or one of the configs bundled inside the package
(retromae_ds/ds_configs/, which a wheel carries and `retromae-ds init` copies). Every "auto" in it is
filled from the run config (`resolve_deepspeed_config`); a concrete value in the JSON is adopted when
the user did not set the matching flag, and is an error when the user did and the two disagree.
`resolve_precision` decides what --precision auto means on this device.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from retromae_ds.config import TrainConfig
from retromae_ds.errors import UserError


def load_deepspeed_json(path: str) -> dict[str, Any]:
    p = find_deepspeed_json(path)
    if p is None:
        raise UserError(f"--deepspeed {path}: no such file. Use one of the bundled configs "
                        f"({', '.join(n[:-5] for n in BUNDLED_DS_CONFIGS)}, e.g. --deepspeed zero2), "
                        f"`retromae-ds init DIR` to write editable copies, or your own DeepSpeed JSON.")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"--deepspeed {path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}).") from None


def resolve_precision(cfg: TrainConfig, device_type: str, bf16_supported: bool) -> str:
    """auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU.

    fp32 on CPU is deliberate: bf16 matmuls are ~10x slower than fp32 on CPUs without AVX512-BF16/AMX,
    and fp16 does not run on CPU in DeepSpeed at all."""
    if cfg.precision != "auto":
        if cfg.precision == "fp16" and device_type == "cpu":
            raise UserError("--precision fp16 needs a GPU (DeepSpeed has no fp16 on CPU): use fp32 or bf16.")
        return cfg.precision
    if device_type == "cpu":
        return "fp32"
    return "bf16" if bf16_supported else "fp16"


def resolve_deepspeed_config(ds: dict[str, Any], cfg: TrainConfig, *, world_size: int, precision: str,
                             source: str = "DeepSpeed config") -> dict[str, Any]:
    """Fill every "auto" in the DeepSpeed JSON from the run config.

    A concrete JSON value is kept when the user did not set the matching flag (and copied back into
    `cfg`, so the trainer and the checkpoint agree with DeepSpeed); when the user did set it and the
    two disagree, that is an error naming both places.
    """
    ds = json.loads(json.dumps(ds))  # deep copy

    def settle(container: dict, key: str, cfg_name: str | None, value: Any, where: str):
        if key not in container or container[key] == "auto":
            container[key] = value
            return
        given = container[key]
        if cfg_name is None:
            if given != value:
                raise UserError(f"{source}: `{where}` = {given!r} but the run needs {value!r} "
                                f"(derived from micro batch x grad accum x world size); set it to \"auto\".")
            return
        same = math.isclose(float(given), float(value), rel_tol=1e-9) if isinstance(value, (int, float)) and not isinstance(value, bool) else given == value
        if same:
            return
        if cfg_name in cfg.explicit:
            flag = "--" + cfg_name.replace("_", "-")
            raise UserError(f"{source}: `{where}` = {given!r} disagrees with {flag} {value!r}. Set one of them "
                            f"(\"auto\" in the JSON takes the flag's value).")
        setattr(cfg, cfg_name, type(value)(given))
        container[key] = given

    settle(ds, "train_micro_batch_size_per_gpu", "micro_batch_size", cfg.micro_batch_size, "train_micro_batch_size_per_gpu")
    settle(ds, "gradient_accumulation_steps", "grad_accum", cfg.grad_accum, "gradient_accumulation_steps")
    settle(ds, "train_batch_size", None, cfg.micro_batch_size * cfg.grad_accum * world_size, "train_batch_size")
    settle(ds, "gradient_clipping", "clip", cfg.clip, "gradient_clipping")

    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    settle(params, "lr", "lr", cfg.lr, "optimizer.params.lr")
    settle(params, "weight_decay", "weight_decay", cfg.weight_decay, "optimizer.params.weight_decay")
    settle(params, "eps", "adam_eps", cfg.adam_eps, "optimizer.params.eps")
    betas = params.get("betas", "auto")
    if betas == "auto":
        params["betas"] = [cfg.adam_beta1, cfg.adam_beta2]
    else:
        for i, name in enumerate(("adam_beta1", "adam_beta2")):
            settle({"b": betas[i]}, "b", name, getattr(cfg, name), f"optimizer.params.betas[{i}]")
        params["betas"] = [cfg.adam_beta1, cfg.adam_beta2]
    offloaded = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") in ("cpu", "nvme")
    if opt.get("type", "").lower() in ("adam", "adamw") and "torch_adam" not in params:
        # On the device, torch's AdamW (multi-tensor on GPUs) needs no JIT build, while DeepSpeed's
        # FusedAdam compiles for about a minute at first use (and cannot on CPU). With the optimizer
        # offloaded the step runs on the host, where DeepSpeed's CPU Adam (AVX, one JIT build cached
        # under TORCH_EXTENSIONS_DIR) is several times faster than torch's AdamW. The JSON's
        # "torch_adam" wins either way.
        params["torch_adam"] = not offloaded

    for key, want in (("bf16", precision == "bf16"), ("fp16", precision == "fp16")):
        section = ds.setdefault(key, {})
        enabled = section.get("enabled", "auto")
        if enabled == "auto":
            section["enabled"] = want
        elif bool(enabled) != want:
            if "precision" in cfg.explicit:
                raise UserError(f"{source}: `{key}.enabled` = {enabled} disagrees with --precision {cfg.precision}. "
                                f"Set `{key}.enabled` to \"auto\" or change --precision.")
            raise UserError(f"{source}: `{key}.enabled` = {enabled} but precision resolved to {precision} on this "
                            f"device; set `{key}.enabled` to \"auto\" or pass --precision explicitly.")

    if precision == "bf16":
        _settle_bf16_numerics(ds, source)

    zero = ds.get("zero_optimization", {})
    for key, value in list(zero.items()):
        if value == "auto":
            raise UserError(f"{source}: `zero_optimization.{key}` = \"auto\" is not supported; give a number.")
    ds.setdefault("steps_per_print", 10**9)  # we log ourselves
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def _settle_bf16_numerics(ds: dict[str, Any], source: str) -> None:
    """bf16 runs: skip steps with NaN/inf gradients, and accumulate and reduce gradients in fp32.

    - `bf16.check_grad_overflow`: DeepSpeed releases before mid-2026 default it to false, and then
      ZeRO-2 bf16 *applies* NaN/inf gradients (weights become NaN). We set it, and refuse a JSON that
      turns it off: the trainer's skip-and-count logic relies on it.
    - `data_types.grad_accum_dtype` and `communication_data_type` = fp32 (the JSON may choose
      otherwise): bf16 keeps 8 bits of mantissa, so summing 64 ranks x 8 micro-batches of bf16 partial
      gradients loses the small contributions (each addition rounds to ~3 significant digits). fp32
      accumulation costs one fp32 gradient buffer (4 bytes/param, partitioned under ZeRO-2/3) and
      doubles the bytes of the gradient reduce-scatter; the GPU check measures what that costs.
    """
    bf16 = ds.setdefault("bf16", {})
    if bf16.get("check_grad_overflow", True) is False:
        raise UserError(f"{source}: `bf16.check_grad_overflow` is false, which lets DeepSpeed apply NaN/inf "
                        f"gradients to the weights; remove the key (the trainer turns it on).")
    bf16["check_grad_overflow"] = True
    ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    ds.setdefault("communication_data_type", "fp32")


BUNDLED_DS_CONFIGS = ("zero1.json", "zero2.json", "zero3.json", "zero3_offload.json")


def bundled_ds_config_dir() -> Path:
    """The DeepSpeed JSONs shipped inside the package (a wheel install has no ds_configs/ folder)."""
    return Path(__file__).resolve().parent.parent / "ds_configs"


def find_deepspeed_json(path: str) -> Path | None:
    """The file --deepspeed names: the path itself, else a bundled config of that name
    (`ds_configs/zero2.json`, `zero2.json` or `zero2`), so a run outside a clone finds the defaults."""
    p = Path(path)
    if p.is_file():
        return p
    name = p.name if p.suffix == ".json" else p.name + ".json"
    bundled = bundled_ds_config_dir() / name
    if name in BUNDLED_DS_CONFIGS and bundled.is_file() and (len(p.parts) == 1 or p.parent.name == "ds_configs"):
        return bundled
    return None
