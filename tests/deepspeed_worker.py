"""Run by test_deepspeed.py in a fresh process: deepspeed.initialize with SubspaceAdamW at a ZeRO stage."""

from __future__ import annotations

import json
import os
import sys

import torch

os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")

import deepspeed  # noqa: E402

from subspace_optim import SubspaceAdamW, param_groups  # noqa: E402


def main(stage: int, precision: str = "fp32") -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    opt = SubspaceAdamW(param_groups(model, "all-linear", rank=2, update_gap=2), lr=1e-3)
    config = {"train_batch_size": 2, "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}
    dtype = torch.float32
    if precision == "bf16":  # DeepSpeed's mixed precision wrappers must not flatten the projected weights
        config["bf16"] = {"enabled": True}
        dtype = torch.bfloat16
    try:
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    except ValueError as err:
        return {"error": str(err), "where": "initialize"}
    try:
        for _ in range(3):
            loss = engine(torch.randn(2, 8, dtype=dtype)).float().square().mean()
            engine.backward(loss)
            engine.step()
    except ValueError as err:
        return {"error": str(err), "where": "step"}
    return {"error": None, "refresh_counts": [s["refresh_count"] for s in opt.state.values() if "refresh_count" in s]}


if __name__ == "__main__":
    os.environ["MASTER_PORT"] = sys.argv[2]
    print("RESULT " + json.dumps(main(int(sys.argv[1]), *sys.argv[3:])))
