"""Pretraining entry point for launchers that want a script path (torchrun, accelerate launch).

Same as the installed command ``subspace-optim pretrain``:

    python scripts/pretrain.py --compare adamw,subspace
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 scripts/pretrain.py --steps 100
    accelerate launch --config_file configs/accelerate_cpu_2proc.yaml scripts/pretrain.py
"""

from __future__ import annotations

import sys

from subspace_optim.pretrain import main

if __name__ == "__main__":
    sys.exit(main(prog="scripts/pretrain.py"))
