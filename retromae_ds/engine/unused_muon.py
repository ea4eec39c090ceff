"""Keep DeepSpeed from importing its Muon optimizer in runs that do not use it.

DeepSpeed 0.19's ZeRO optimizers import `deepspeed.runtime.zero.muon.muon_optimizer` (to ask whether the
optimizer is a `MuonWithAuxAdam`) and `...muon.original_muon` (for `muon_update`) whatever the optimizer.
Importing them applies `torch.compile` to Muon's kernels, which loads torch's inductor: ~1 s of CPU in
every rank's start-up (measured: a 1-rank tiny run, 8.0-8.5 s of user CPU with them and 7.1-7.6 s
without; a tenth of each launch in the test suite). No optimizer this trainer builds is a Muon unless the
DeepSpeed config asks for one.

So, when the config's optimizer is not Muon, stand-ins take those two module names: a class that no
optimizer is an instance of, and a `muon_update` that would load DeepSpeed's own. Any other name asked of
a stand-in loads DeepSpeed's real modules in its place, so a DeepSpeed that reads more from them still
gets what it asks for.
"""

from __future__ import annotations

import importlib
import sys
import types

MUON_OPTIMIZER = "deepspeed.runtime.zero.muon.muon_optimizer"
ORIGINAL_MUON = "deepspeed.runtime.zero.muon.original_muon"
_STAND_IN = "_retromae_stand_in"


class MuonWithAuxAdam:
    """Stands in for DeepSpeed's Muon optimizer class in `isinstance` checks: no optimizer of this run is one."""


def _real(module: str, name: str):
    """DeepSpeed's own `module.name`, the stand-ins removed first."""
    for key in (MUON_OPTIMIZER, ORIGINAL_MUON):
        if getattr(sys.modules.get(key), _STAND_IN, False):
            del sys.modules[key]
    return getattr(importlib.import_module(module), name)


def muon_update(*args, **kwargs):
    """Only called for Muon parameters, which a run without Muon has none of; if it is, the real one runs."""
    return _real(ORIGINAL_MUON, "muon_update")(*args, **kwargs)


def _stand_in(module: str, **names) -> types.ModuleType:
    stub = types.ModuleType(module, f"retromae-ds stand-in for {module} (retromae_ds/engine/unused_muon.py)")
    stub.__dict__.update(names)
    setattr(stub, _STAND_IN, True)

    def __getattr__(name: str):  # PEP 562: any other name comes from DeepSpeed's module
        if name.startswith("__"):  # the import system's probes (__path__, __file__) are not DeepSpeed's names
            raise AttributeError(name)
        return _real(module, name)

    stub.__getattr__ = __getattr__
    return stub


def skip_unused_muon(ds_config: dict) -> bool:
    """Put the stand-ins in place unless the config's optimizer is a Muon or DeepSpeed's modules are already
    loaded. Returns whether it did. Call before `deepspeed.initialize`."""
    optimizer = str((ds_config.get("optimizer") or {}).get("type", "")).lower()
    if "muon" in optimizer or MUON_OPTIMIZER in sys.modules or ORIGINAL_MUON in sys.modules:
        return False
    sys.modules[MUON_OPTIMIZER] = _stand_in(MUON_OPTIMIZER, MuonWithAuxAdam=MuonWithAuxAdam)
    sys.modules[ORIGINAL_MUON] = _stand_in(ORIGINAL_MUON, muon_update=muon_update)
    return True
