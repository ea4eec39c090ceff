"""Peak FLOP/s of a device, from the vendors' data sheets: what MFU divides by.

A GPU missing from the table (and every CPU) gets no MFU; --peak-tflops gives the number instead.
"""

from __future__ import annotations

import re


# Dense (no sparsity) peak TFLOPs from the vendors' data sheets: (pattern on the device name,
# bf16, fp16, tf32, fp32). bf16/fp16 are tensor-core peaks with fp32 accumulation; None where the
# type has no tensor-core support. More specific names come first (A100 before A10, H100 PCIe
# before H100).
_PEAK_TFLOPS = [
    (r"H100.*PCIe", 756.0, 756.0, 378.0, 51.2),
    (r"H100.*NVL", 835.0, 835.0, 418.0, 60.0),
    (r"H100|H800", 989.4, 989.4, 494.7, 66.9),
    (r"H200", 989.4, 989.4, 494.7, 66.9),
    (r"B200", 2250.0, 2250.0, 1100.0, 80.0),
    (r"A100|A800", 312.0, 312.0, 156.0, 19.5),
    (r"A10G", 70.0, 70.0, 35.0, 31.2),
    (r"\bA10\b", 125.0, 125.0, 62.5, 31.2),
    (r"L40S", 362.1, 362.1, 183.0, 91.6),
    (r"\bL40\b", 181.0, 181.0, 90.5, 90.5),
    (r"\bL4\b", 121.0, 121.0, 60.0, 30.3),
    (r"RTX A6000", 154.8, 154.8, 77.4, 38.7),
    (r"RTX 6000 Ada", 364.2, 364.2, 182.1, 91.1),
    (r"RTX 4090", 165.2, 165.2, 82.6, 82.6),
    (r"RTX 3090", 71.0, 71.0, 35.6, 35.6),
    (r"V100", None, 125.0, None, 15.7),
    (r"\bT4\b", None, 65.0, None, 8.1),
    (r"MI300X", 1307.4, 1307.4, 653.7, 163.4),
    (r"MI250X?", 383.0, 383.0, None, 47.9),
]


def lookup_peak_tflops(device_name: str, dtype: str, *, tf32: bool = False) -> float | None:
    """Peak dense TFLOPs of a named GPU for a training dtype ("bf16", "fp16", "fp32"); None if the
    device is not in the table. fp32 uses the TF32 tensor-core peak when `tf32` is on (PyTorch's
    float32 matmul precision "high"/"medium"), else the plain fp32 peak."""
    if dtype not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"dtype must be bf16, fp16 or fp32, got {dtype!r}")
    for pattern, bf16, fp16, tf32_peak, fp32 in _PEAK_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            if dtype == "bf16":
                return bf16 if bf16 is not None else fp32  # no bf16 tensor cores: runs at fp32 speed
            if dtype == "fp16":
                return fp16
            return tf32_peak if (tf32 and tf32_peak is not None) else fp32
    return None


def peak_flops_per_device(device, dtype: str, override: float | None = None) -> float | None:
    """Peak FLOP/s of one device for `dtype`: `override` (FLOP/s) if given, else the data-sheet peak
    of the CUDA device by `torch.cuda.get_device_name`; None for CPUs and unknown GPUs (then MFU is
    not reported; give --peak-tflops to get it)."""
    if override:
        return float(override)
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    tf32 = torch.get_float32_matmul_precision() != "highest" or torch.backends.cuda.matmul.allow_tf32
    peak = lookup_peak_tflops(torch.cuda.get_device_name(device), dtype, tf32=tf32)
    return peak * 1e12 if peak else None
