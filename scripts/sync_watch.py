"""Find the host-device synchronisations of a training step without a GPU.

On a GPU, a sync (reading a value, a data-dependent shape, a blocking copy) makes the host wait until
the device has finished everything queued, so the Python of the next operations no longer overlaps
the device's work. On the CPU nothing waits, so a sync costs nothing there and is invisible to timing;
but the operators that would sync on a GPU are the same, and they pass through torch's dispatcher. This
`TorchDispatchMode` records every such operator with the first frame outside torch that called it
(retromae_ds, transformers, deepspeed, ...), so a CPU test can assert that a step has none.

What counts (each syncs on CUDA): reading a scalar (`.item()`, `float(t)`, `bool(t)`, `int(t)`:
`aten::_local_scalar_dense`), `Tensor.tolist()` (patched: on the CPU it bypasses the dispatcher),
`nonzero`, `masked_select`, `unique`, `equal`, `is_nonzero`, `repeat_interleave` without
`output_size`, and indexing or index-assignment with a boolean mask (a nonzero inside); on a GPU
also copies from the device to the host. With `cuda_debug` on a GPU, torch's own detector
(`torch.cuda.set_sync_debug_mode("warn")`) runs as well and each of its warnings is recorded with its
caller as op "cuda-sync-warning": it sees syncs inside kernels' host code that no operator name shows.
"""

from __future__ import annotations

import os
import threading
import traceback
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique",
            "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive", "aten::equal", "aten::is_nonzero",
            "aten::allclose"}
BOOL_INDEX_OPS = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}
TORCH_DIR = os.path.dirname(torch.__file__)
HERE = os.path.abspath(__file__)


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in indices or ())


def _device_to_host(func, args, kwargs) -> bool:
    """A copy from an accelerator into host memory (blocking unless non_blocking into pinned memory)."""
    name = func._schema.name
    if name == "aten::_to_copy":
        src, target = args[0], kwargs.get("device")
        return src.device.type not in ("cpu", "meta") and target is not None and torch.device(target).type == "cpu"
    dst, src = args[0], args[1]
    return isinstance(src, torch.Tensor) and src.device.type not in ("cpu", "meta") and dst.device.type == "cpu"


def caller() -> tuple[str, str]:
    """(package, 'file:line function') of the innermost frame outside torch and this file."""
    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if path == HERE or path.startswith(TORCH_DIR) or "/contextlib.py" in path:
            continue
        parts = path.split(os.sep)
        package = next((p for p in ("retromae_ds", "transformers", "deepspeed") if p in parts), "other")
        return package, f"{os.path.basename(path)}:{frame.lineno} {frame.name}"
    return "torch", "?"


class SyncWatch(TorchDispatchMode):
    """Records would-be syncs per window: set `window` (e.g. the step number) as the run goes."""

    def __init__(self, cuda_debug: bool = False) -> None:
        super().__init__()
        self.window = 0
        self.records: list[dict] = []
        self._thread = threading.get_ident()
        self._tolist = None
        self._cuda_debug = cuda_debug and torch.cuda.is_available()
        self._showwarning = None

    def _record(self, op: str) -> None:
        if threading.get_ident() != self._thread:
            return
        package, where = caller()
        self.records.append({"window": self.window, "op": op, "package": package, "where": where})

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in ("aten::_to_copy", "aten::copy_") and _device_to_host(func, args, kwargs or {}):
            self._record(name + " (device to host)")
        elif name in SYNC_OPS or (name == "aten::repeat_interleave" and (kwargs or {}).get("output_size") is None
                                and len(args) == 1) or (name in BOOL_INDEX_OPS and _has_bool_index(args)):
            self._record(name)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        original = torch.Tensor.tolist
        watch = self

        def tolist(tensor):
            watch._record("Tensor.tolist")
            return original(tensor)

        self._tolist = original
        torch.Tensor.tolist = tolist
        if self._cuda_debug:
            import warnings

            self._showwarning = warnings.showwarning

            def showwarning(message, category, filename, lineno, file=None, line=None):
                if "synchroniz" in str(message):
                    watch._record("cuda-sync-warning")
                else:
                    watch._showwarning(message, category, filename, lineno, file, line)

            warnings.showwarning = showwarning
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        if self._cuda_debug:
            import warnings

            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = self._showwarning
        return super().__exit__(*exc)

    def summary(self) -> dict:
        """{window: Counter of 'package op @ where'}."""
        out: dict = {}
        for r in self.records:
            out.setdefault(r["window"], Counter())[f"{r['package']} {r['op']} @ {r['where']}"] += 1
        return out
