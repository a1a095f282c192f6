"""The inner rule: AdamW on projected coordinates, with its scalars folded once for every engine.

With R the projected gradient (``subspace.project``), t the moments' age (counting this step), all math in
fp32:

    M <- b1 M + (1 - b1) R;     V <- b2 V + (1 - b2) R o R
    N = M / (sqrt(V) / sqrt(1 - b2^t) + eps)
    W <- W (1 - lr wd) - (lr scale / (1 - b1^t)) back(N)        (decoupled weight decay, in full space)

which is ``torch.optim.AdamW``'s update applied in the subspace coordinates. ``adam_scalars`` is the one
place where lr, betas, bias corrections, scale and decay become the numbers both engines consume: the
reference below and the Triton epilogues (``kernels.step``) read the same ``AdamScalars``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .subspace import project, project_back


class AdamScalars(NamedTuple):
    """One matrix's step constants: lerp weight 1 - b1, b2, 1 - b2, eps, sqrt(1 - b2^t), the update's
    multiplier alpha = lr scale / (1 - b1^t), and the decay factor 1 - lr wd."""

    w1: float
    beta2: float
    w2: float
    eps: float
    bias2_sqrt: float
    alpha: float
    decay: float


def adam_scalars(
    lr: float, betas: tuple[float, float], eps: float, weight_decay: float, scale: float, age: int
) -> AdamScalars:
    beta1, beta2 = (float(b) for b in betas)
    lr = float(lr)
    return AdamScalars(
        w1=1.0 - beta1,
        beta2=beta2,
        w2=1.0 - beta2,
        eps=float(eps),
        bias2_sqrt=math.sqrt(1.0 - beta2**age),
        alpha=lr * float(scale) / (1.0 - beta1**age),
        decay=1.0 - lr * float(weight_decay),
    )


def projected_adamw(
    p: Tensor, g: Tensor, basis: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, s: AdamScalars, side: str
) -> None:
    """One step of matrix ``p`` (viewed as ``g``'s shape) in the subspace of ``basis``, in place (reference)."""
    r = project(g.float(), basis, side)
    exp_avg.lerp_(r, s.w1)
    exp_avg_sq.mul_(s.beta2).addcmul_(r, r, value=s.w2)
    direction = exp_avg / (exp_avg_sq.sqrt() / s.bias2_sqrt).add_(s.eps)
    update = project_back(direction, basis, side)
    if s.decay != 1.0:
        p.mul_(s.decay)
    if torch.compiler.is_compiling():
        # Inductor (torch 2.13, CPU) compiles p.add_(a @ b, alpha=c) as if alpha were 1: scale explicitly.
        p.add_((update * -s.alpha).view(p.shape).to(p.dtype))
    else:
        p.add_(update.view(p.shape).to(p.dtype), alpha=-s.alpha)
