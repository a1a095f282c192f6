"""The reference engine: the subspace refresh and the projected AdamW step in plain PyTorch.

This is the oracle every faster engine (the Triton kernels) is tested against, and the path used for
CPU tensors. Functions take one matrix and its state dict; the optimizer owns iteration and policy.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor

from . import linalg, subspace

State = dict[str, Any]


def refresh(g: Tensor, state: State, group: dict[str, Any], side: str, index: int) -> dict[str, Any]:
    """Replace ``state["basis"]`` with a fresh one for gradient G and carry the moments into it.

    Returns the refresh's metrics (time, captured energy, overlap with the previous basis) as
    tensors, so that reading them (a device sync) is left to whoever asks for metrics.
    """
    start = time.perf_counter()
    rank = group["rank"]
    previous = state.get("basis")
    seed = linalg.sketch_seed(group["seed"], index, state["refresh_count"])
    new = subspace.refresh_basis(
        g,
        side,
        rank,
        policy=group["refresh"],
        previous=previous,
        oversample=group["oversample"],
        power_iters=group["power_iters"],
        seed=seed,
    )
    basis = new.basis
    if not bool(torch.isfinite(basis).all()):
        # A finite gradient can still overflow fp32 in a power iteration; never store such a basis.
        basis = previous if previous is not None else linalg.random_basis(basis.shape[0], rank, seed, g.device)
    overlap = None
    if previous is None:
        state["basis"] = basis.contiguous()
    else:
        c = subspace.transport_moments(state["exp_avg"], state["exp_avg_sq"], previous, basis, side, group["moments"])
        overlap = c.double().square().sum() / rank
        state["basis"].copy_(basis)
        if group["moments"] == "reset":
            state["moment_age"] = 0
    state["refresh_count"] += 1
    if g.device.type == "cuda":
        torch.cuda.synchronize(g.device)
    return {
        "refresh_time_s": time.perf_counter() - start,
        "captured": new.captured,
        "total": new.total,
        "overlap": overlap,
        "refresh_count": state["refresh_count"],
    }


def projected_adamw(p: Tensor, g: Tensor, state: State, group: dict[str, Any], side: str) -> None:
    """One AdamW step of matrix parameter ``p`` in the subspace of ``state["basis"]``.

    With R the projected gradient (``subspace.project``), t the moments' age, and all math in fp32:

        M <- b1 M + (1 - b1) R;     V <- b2 V + (1 - b2) R o R
        N = (M / (1 - b1^t)) / (sqrt(V / (1 - b2^t)) + eps)
        W <- W (1 - lr wd) - lr * scale * back(N)          (decoupled weight decay, in full space)

    which is ``torch.optim.AdamW``'s update applied in the subspace coordinates.
    """
    beta1, beta2 = group["betas"]
    lr = float(group["lr"])
    basis = state["basis"]
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]

    r = subspace.project(g.float(), basis, side)
    state["step"] += 1
    state["moment_age"] += 1
    age = state["moment_age"]
    exp_avg.lerp_(r, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(r, r, value=1.0 - beta2)
    bias1 = 1.0 - beta1**age
    bias2_sqrt = math.sqrt(1.0 - beta2**age)
    direction = exp_avg / (exp_avg_sq.sqrt() / bias2_sqrt).add_(group["eps"])
    update = subspace.project_back(direction, basis, side)

    if group["weight_decay"] != 0.0:
        p.mul_(1.0 - lr * group["weight_decay"])
    p.add_(update.view(p.shape).to(p.dtype), alpha=-lr * group["scale"] / bias1)
