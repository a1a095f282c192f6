"""Writes tests/data/release_checkpoint.pt: checkpoints saved by a released SubspaceAdamW and the trajectory
that release continued them on. tests/test_state.py resumes each checkpoint with the current code and
requires the same weights and state bit for bit, so a refactor cannot change what an old run resumes to.

Run it only with the release whose checkpoints are being frozen (it was run at commit 552fb61):

    python tests/data/make_release_checkpoint.py
"""

from __future__ import annotations

import io
import os

import torch
from torch import nn

from subspace_optim import SubspaceAdamW, param_groups

# (options, weight dtype): every refresh and moment policy, both sides, bf16 weights, a plain-AdamW group.
CASES = [
    (dict(refresh="warm", moments="rotate", proj_type="std"), torch.float32),
    (dict(refresh="rsvd", moments="keep", proj_type="reverse_std"), torch.float32),
    (dict(refresh="svd", moments="reset", proj_type="left"), torch.float32),
    (dict(refresh="random", moments="rotate", proj_type="right"), torch.float32),
    (dict(refresh="warm", moments="rotate", proj_type="std"), torch.bfloat16),
]
SPLIT, TOTAL = 5, 11
# CPU results are bit-exact only for one intra-op thread count: a GEMM or a reduction split over another
# number of threads sums in another order. The frozen trajectories were made with 2 threads, and the test
# resumes them with 2 whatever the suite's own count.
THREADS = 2
# ... and only on one CPU model: another vendor's or generation's GEMM kernels block and vectorize differently and
# round differently in the last bits. The release ran on an AMD EPYC (every benchmark record of that time names
# it, and the suite matched the frozen bits there); elsewhere the test compares to float tolerance.
CPU = "AMD EPYC"


def net(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 12), nn.Tanh(), nn.Linear(12, 5))
    return model.to(dtype)


def optimizer(model: nn.Module, options: dict) -> SubspaceAdamW:
    groups = param_groups(model, "all-linear", weight_decay=0.01, rank=4, update_gap=3, scale=0.5, **options)
    return SubspaceAdamW(groups, lr=5e-3)


def step(model: nn.Module, opt: SubspaceAdamW, i: int) -> None:
    gen = torch.Generator().manual_seed(i)
    dtype = next(model.parameters()).dtype
    x = torch.randn(32, 16, generator=gen).to(dtype)
    y = torch.randn(32, 5, generator=gen).to(dtype)
    opt.zero_grad()
    (model(x) - y).float().square().mean().backward()
    opt.step()


def main() -> None:
    torch.set_num_threads(THREADS)
    out = []
    for options, dtype in CASES:
        model = net(dtype)
        opt = optimizer(model, options)
        for i in range(SPLIT):
            step(model, opt, i)
        saved = {"model": {k: v.clone() for k, v in model.state_dict().items()}}
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        saved["optimizer"] = buf.getvalue()
        for i in range(SPLIT, TOTAL):
            step(model, opt, i)
        saved["final_model"] = {k: v.clone() for k, v in model.state_dict().items()}
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        saved["final_optimizer"] = buf.getvalue()
        out.append({"options": options, "dtype": str(dtype), **saved})
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "release_checkpoint.pt")
    torch.save({"split": SPLIT, "total": TOTAL, "cases": out}, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
