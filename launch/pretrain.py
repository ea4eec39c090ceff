#!/usr/bin/env python
"""Launcher entry for RetroMAE pre-training: `deepspeed`, `torchrun`, `srun` or plain `python`.

    deepspeed launch/pretrain.py --deepspeed ds_configs/zero2.json          # the offline demo
    deepspeed --num_gpus 8 launch/pretrain.py --deepspeed ds_configs/zero2.json --data ... --model ...
    torchrun --nproc-per-node 8 launch/pretrain.py --deepspeed ds_configs/zero3.json ...

See `python launch/pretrain.py --help` for every flag (the same as `retromae-ds train`).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from retromae_ds.engine.trainer import run_cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_cli())
