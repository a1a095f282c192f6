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
    multiplier alpha = lr scale / (1 - b1^t), the decay factor 1 - lr wd, and 1 - b1^t (the residual's
    limiter measures updates in units of the bias-corrected Adam step)."""

    w1: float
    beta2: float
    w2: float
    eps: float
    bias2_sqrt: float
    alpha: float
    decay: float
    bias1: float = 1.0


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
        bias1=1.0 - beta1**age,
    )


def projected_adamw(
    p: Tensor, g: Tensor, basis: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, s: AdamScalars, side: str
) -> None:
    """One step of matrix ``p`` (viewed as ``g``'s shape) in the subspace of ``basis``, in place (reference)."""
    r = project(g.float(), basis, side)
    direction = _moments_direction(r, exp_avg, exp_avg_sq, s)
    _apply_update(p, project_back(direction, basis, side), s)


def _moments_direction(r: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, s: AdamScalars) -> Tensor:
    """Update the moments with R in place; return N = M / (sqrt(V) / sqrt(1 - b2^t) + eps)."""
    exp_avg.lerp_(r, s.w1)
    exp_avg_sq.mul_(s.beta2).addcmul_(r, r, value=s.w2)
    return exp_avg / (exp_avg_sq.sqrt() / s.bias2_sqrt).add_(s.eps)


def _apply_update(p: Tensor, update: Tensor, s: AdamScalars) -> None:
    """W <- W (1 - lr wd) - alpha U, in place, U (fp32, ``p``'s element count) rounded once into ``p``'s dtype."""
    if s.decay != 1.0:
        p.mul_(s.decay)
    if torch.compiler.is_compiling():
        # Inductor (torch 2.13, CPU) compiles p.add_(a @ b, alpha=c) as if alpha were 1: scale explicitly.
        p.add_((update * -s.alpha).view(p.shape).to(p.dtype))
    else:
        p.add_(update.view(p.shape).to(p.dtype), alpha=-s.alpha)


# --------------------------------------------------------------------------------------------- residual
# What a projected step does with the part of the gradient its subspace discards (the ``residual`` option).
RESIDUALS = ("none", "fira", "fira_tensor", "apollo")
# Fira's norm-growth limiter: an update's norm may grow by at most this factor from one step to the next.
GROWTH_LIMIT = 1.01
# Residual coefficients are capped so that coef * |G_ij| stays below this: a channel whose projection is
# (almost) zero while Adam's moment still remembers it would otherwise give an unbounded phi.
_COEF_PRODUCT_CAP = 1e30


def channel_dim(side: str) -> int:
    """The axis of the projected matrix (R, N; r x n for a left basis, m x r for a right one) that is
    summed to get one number per channel: a channel is a column of G for a left basis, a row for a right
    one (the side that is not projected, which is also the row-local side of a row-sharded weight)."""
    return 0 if side == "left" else 1


def residual_factors(
    nn: Tensor, rr: Tensor, gg: Tensor, previous: Tensor, bias1: Tensor, mode: str, first_ratio: Tensor | float
) -> tuple[Tensor, Tensor, Tensor]:
    r"""The residual's coefficients, from per-channel sums of squares (the last axis is the channel).

    ``nn``, ``rr``, ``gg``: ||N_j||^2, ||R_j||^2, ||G_j||^2 per channel j (fp32, any leading batch axes);
    ``previous``: the last step's update norm (0: none yet); ``bias1``: 1 - b1^t. With
    phi_j = ||N_j|| / ||R_j|| (``fira``, ``apollo``; 0 where R_j = 0) or phi = ||N|| / ||R|| (``fira_tensor``),
    the step's full-space update, before lr scale / (1 - b1^t), is

        fira, fira_tensor:  U = P N + phi o (G - P R)      (phi o: channel j scaled by phi_j)
        apollo:             U = phi o G                    (the whole gradient, channel-scaled)

    ``P N`` lies in the subspace and ``G - P R`` is orthogonal to it, channel by channel, so
    ||U||^2 = ||N||^2 + sum_j phi_j^2 (||G_j||^2 - ||R_j||^2) (fira) or sum_j phi_j^2 ||G_j||^2 (apollo):
    no pass over U is needed for its norm. The limiter (Fira's) scales U by
    c = min(1, GROWTH_LIMIT * previous / (||U|| / bias1)). On the first step (``previous`` 0) the bound is
    ``first_ratio`` ||N|| / bias1 instead, with first_ratio = sqrt(d / r) (d the projected side): the norm
    of a full-space update whose entries have the RMS of N. A usual first step (the basis captures more
    than r/d of G's energy) stays below it, so it is unlimited as in Fira; a channel whose projection is
    nearly zero while N is not cannot make the first step arbitrarily large.

    Returns (c, coef = c phi, the new ``previous`` = c ||U|| / bias1): the update is
    ``P (c N - coef o R) + coef o G`` (fira: P R never formed on its own) or ``coef o G`` (apollo). The
    factors are computed in fp64 and ``coef`` is capped so that ``coef * |G_ij|`` stays finite: no
    NaN or Inf reaches a weight, whatever the (finite) gradient.
    """
    # Few, fused operations: this runs once per matrix and step, on vectors of one number per channel.
    stats = torch.stack((nn, rr, gg)).double()
    nn, rr, gg = stats.unbind(0)
    sums = stats.sum(-1)  # ||N||^2, ||R||^2, ||G||^2 per matrix
    if mode == "fira_tensor":
        phi2 = torch.where(sums[1] > 0, sums[0] / sums[1], 0.0).unsqueeze(-1)
    else:
        phi2 = torch.where(rr > 0, nn / rr, 0.0)  # phi_j^2
    outside = gg if mode == "apollo" else (gg - rr).clamp_min_(0.0)  # ||G_j||^2, or ||G_j - P R_j||^2
    total = (phi2 * outside).sum(-1)
    if mode != "apollo":
        total += sums[0]
    norm = total.sqrt_().div_(bias1)
    limit = torch.where(previous > 0, GROWTH_LIMIT * previous.double(), sums[0].sqrt() * (first_ratio / bias1))
    c = (limit / norm).clamp_(max=1.0).nan_to_num_(0.0)  # 0 / 0 (no update at all): 0
    coef = torch.minimum(phi2.sqrt_() * c.unsqueeze(-1), (_COEF_PRODUCT_CAP**2 / gg).sqrt_())
    return c.float(), coef.float(), (c * norm).float()


def residual_moments(
    g: Tensor, basis: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, s: AdamScalars, side: str
) -> tuple[Tensor, Tensor, Tensor]:
    """The first half of a residual step (reference): R, the moments updated in place, N, and the per-channel
    sums of squares (``residual_factors``' ``nn``, ``rr``, ``gg``) stacked as a 3 x channels tensor."""
    gf = g.float()
    r = project(gf, basis, side)
    direction = _moments_direction(r, exp_avg, exp_avg_sq, s)
    dim = channel_dim(side)
    # G's channels lie along R's axis; vector_norm makes no m x n temporary
    stats = torch.stack((direction.square().sum(dim), r.square().sum(dim), torch.linalg.vector_norm(gf, dim=dim)))
    stats[2].square_()
    return r, direction, stats


def residual_update(
    p: Tensor, g: Tensor, basis: Tensor, r: Tensor, direction: Tensor, c: Tensor, coef: Tensor, s: AdamScalars,
    side: str, mode: str,
) -> None:  # fmt: skip
    """The second half (reference): W <- W (1 - lr wd) - alpha U, with U = P (c N - coef o R) + coef o G
    (fira, fira_tensor) or coef o G (apollo); ``c`` and ``coef`` from ``residual_factors``."""
    gf = g.float()
    coef_b = coef.unsqueeze(channel_dim(side))  # broadcast along the channel's entries
    if mode == "apollo":
        update = gf * coef_b
    else:
        update = project_back(direction * c - r * coef_b, basis, side).addcmul_(gf, coef_b)
    _apply_update(p, update, s)
