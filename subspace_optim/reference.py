"""The reference engine: the subspace refresh and the projected AdamW step in plain PyTorch.

This is the oracle every faster engine (the Triton kernels) is tested against, and the path used for
CPU tensors. Functions take rank-local tensors of one matrix; the optimizer owns iteration, state and
communication policy.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from . import linalg, subspace


def compute_basis(
    g: Tensor,
    previous: Tensor | None,
    group: dict[str, Any],
    side: str,
    seed: int,
    slab: linalg.Slab = linalg.UNSHARDED,
) -> linalg.Basis:
    """A fresh basis for gradient G (m x n, or this rank's rows of it with a ``slab``).

    Never returns a non-finite basis: a finite gradient can still overflow fp32 inside a power
    iteration, and then the previous basis (or, on the first refresh, a seeded random one) is kept.
    """
    try:
        new = subspace.refresh_basis(
            g,
            side,
            group["rank"],
            policy=group["refresh"],
            previous=previous,
            oversample=group["oversample"],
            power_iters=group["power_iters"],
            seed=seed,
            slab=slab,
        )
    except torch.linalg.LinAlgError:
        # eigh/svd refuse non-finite input. Every rank of a sharded refresh holds the same reduced
        # matrices, so they all take this branch together and no collective is left waiting.
        new = None
    if new is not None and bool(torch.isfinite(new.basis).all()):
        return new
    d = subspace.basis_dim(side, *g.shape)  # a row shard keeps every column, so this holds sharded too
    total = new.total if new is not None else linalg.energy(g.float(), slab)
    return kept_basis(previous, d, group["rank"], seed, g.device, total)


def kept_basis(
    previous: Tensor | None, d: int, rank: int, seed: int, device: torch.device, total: Tensor
) -> linalg.Basis:
    """What a refresh that failed returns: the previous basis (on a first refresh, the seeded random one),
    capturing nothing of the gradient's energy ``total``."""
    basis = previous if previous is not None else linalg.random_basis(d, rank, seed, device)
    return linalg.Basis(basis, total.new_zeros(()), total)


def projected_adamw(
    p: Tensor,
    g: Tensor,
    basis: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    age: int,
    group: dict[str, Any],
    side: str,
) -> None:
    """One AdamW step of matrix parameter ``p`` (viewed as ``g``'s shape) in the subspace of ``basis``.

    With R the projected gradient (``subspace.project``), t = ``age`` the moments' age (already counting
    this step), and all math in fp32:

        M <- b1 M + (1 - b1) R;     V <- b2 V + (1 - b2) R o R
        N = (M / (1 - b1^t)) / (sqrt(V / (1 - b2^t)) + eps)
        W <- W (1 - lr wd) - lr * scale * back(N)          (decoupled weight decay, in full space)

    which is ``torch.optim.AdamW``'s update applied in the subspace coordinates.
    """
    beta1, beta2 = group["betas"]
    lr = float(group["lr"])
    r = subspace.project(g.float(), basis, side)
    exp_avg.lerp_(r, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(r, r, value=1.0 - beta2)
    bias1 = 1.0 - beta1**age
    bias2_sqrt = math.sqrt(1.0 - beta2**age)
    direction = exp_avg / (exp_avg_sq.sqrt() / bias2_sqrt).add_(group["eps"])
    update = subspace.project_back(direction, basis, side)

    if group["weight_decay"] != 0.0:
        p.mul_(1.0 - lr * group["weight_decay"])
    p.add_(update.view(p.shape).to(p.dtype), alpha=-lr * group["scale"] / bias1)
