"""DeepSpeed's Muon modules stay unloaded in runs that do not use Muon (retromae_ds/engine/unused_muon.py).

A fresh interpreter for each check (the stand-ins live in sys.modules). The end-to-end check, that real
ZeRO runs train without loading them or torch's inductor, is in test_engine.py's ZeRO-2 test."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers.engine_runs import REPO, free_port, run_env

CODE = """
import sys, torch
from retromae_ds.engine import unused_muon as U
from retromae_ds.engine.distributed import init_distributed
init_distributed()  # DeepSpeed's Muon module asks for its process group when imported
assert not U.skip_unused_muon({"optimizer": {"type": "Muon", "params": {}}}), "stood in for a Muon run"
assert U.MUON_OPTIMIZER not in sys.modules and U.ORIGINAL_MUON not in sys.modules
assert U.skip_unused_muon({"optimizer": {"type": "AdamW", "params": {}}})
from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam
from deepspeed.runtime.zero.utils import is_zero_supported_optimizer
adam = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
assert not isinstance(adam, MuonWithAuxAdam) and is_zero_supported_optimizer(adam)
print("inductor before", "torch._inductor.compile_fx" in sys.modules)
from deepspeed.runtime.zero.muon.original_muon import zeropower_via_newtonschulz5  # not stood in: the real one
print("real", zeropower_via_newtonschulz5.__module__, getattr(sys.modules[U.ORIGINAL_MUON], "__file__", None) is not None)
"""


def test_a_run_without_muon_gets_stand_ins_and_any_other_name_the_real_module():
    env = run_env({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(free_port())})
    res = subprocess.run([sys.executable, "-c", CODE], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "inductor before False" in res.stdout, res.stdout
    assert "real deepspeed.runtime.zero.muon.original_muon True" in res.stdout, res.stdout
