"""The ``residual`` option: what a projected step does with the part of the gradient its subspace discards.

Fira's rule (``fira``, ``fira_tensor``) adds the discarded part G - P R scaled per channel by phi_j = ||N_j|| /
||R_j||; APOLLO's (``apollo``) steps along the whole gradient scaled the same way; Fira's norm-growth limiter
bounds the residual's norm. ``residual_factors`` has the math. Both engines compute their per-channel sums
their own way (the reference per matrix, the kernels inside the projection GEMM) and share everything after
that: ``residual_coefficients`` (the factors, the limiter state) and ``limiter_units``. The reference's two
halves of a step are ``residual_moments`` and ``residual_update``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from . import int8_weights
from .adam_rule import AdamScalars, Lag, apply_update, device_vector, lag_vectors, moments_directions
from .subspace import project, project_back

RESIDUALS = ("none", "fira", "fira_tensor", "apollo", "apollo_tensor")
# Modes with one channel per matrix (its whole norms), and modes whose update is the whole scaled gradient.
PER_MATRIX = ("fira_tensor", "apollo_tensor")
WHOLE_GRADIENT = ("apollo", "apollo_tensor")
LIMITERS = ("corrected", "raw")
# Fira's norm-growth limiter: the residual's norm may grow by at most this factor from one step to the next.
GROWTH_LIMIT = 1.01
# The limiter's state never falls below this fraction of the low-rank step's norm (times the residual's weight).
# A residual that vanishes (a fresh basis that holds the whole gradient) is computed as ||G_j||^2 - ||R_j||^2:
# 0, or fp32 rounding noise (about 3e-4 of the norm), depending on summation order (ranks, engines). Stored
# as is, that noise would hold every later residual near zero for the rest of the gap (1% growth a step);
# the floor, 30x above the noise, makes both cases the same and the limiter continuous.
_LIMIT_FLOOR = 1e-2
# Residual coefficients are capped so that coef * |G_ij| stays below this: a channel whose projection is
# (almost) zero while Adam's moment still remembers it would otherwise give an unbounded phi.
_COEF_PRODUCT_CAP = 1e30


def channel_dim(side: str) -> int:
    """The axis of the projected matrix (R, N; r x n for a left basis, m x r for a right one) that is
    summed to get one number per channel: a channel is a column of G for a left basis, a row for a right
    one (the side that is not projected, which is also the row-local side of a row-sharded weight)."""
    return 0 if side == "left" else 1


def residual_factors(
    sumsq: Tensor,
    lengths: Tensor | None,
    previous: Tensor,
    units: Tensor,
    mode: str,
    first_ratio: Tensor | float,
    scale: float,
    reduce: Callable[[Tensor], Tensor] | None = None,
    limiter: str = "corrected",
) -> tuple[Tensor, Tensor]:
    r"""The residual's per-channel coefficients for a batch of matrices, from per-channel sums of squares.

    ``sumsq`` (channels, 3): ||N_j||^2, ||R_j||^2, ||G_j||^2 for every channel j of every matrix, matrix after
    matrix, ``lengths[i]`` channels for matrix i (``PER_MATRIX`` modes: ``lengths`` None, one row per matrix, its
    whole sums); ``previous``: each matrix's last limited norm (0: none yet); ``units``: what the limiter divides
    norms by (``limiter_units``: 1 - b1^t, or sqrt(1 - b2^t) with ``limiter="raw"``); ``scale``: GaLore's scale.
    With phi_j = ||N_j|| / ||R_j|| (0 where R_j = 0), the update before lr scale / (1 - b1^t) is

        fira, fira_tensor:       U = P N + S,  S = (c / scale) phi o (G - P R)   (phi o: channel j scaled by phi_j)
        apollo, apollo_tensor:   U = c phi o G                                   (the whole gradient, channel-scaled)

    The ``_tensor`` modes take one phi per matrix (whole-matrix norms: APOLLO-Mini's tensor-wise scaling).

    ``fira`` is Fira's rule as its authors' code applies it: S is not multiplied by GaLore's scale (hence the
    1 / scale, since the whole U is) and the norm-growth limiter c acts on S alone; ``apollo``'s update is all
    residual, so c acts on all of it. Since G - P R is orthogonal to the subspace channel by channel, the norm
    the limiter measures needs no pass over G (``_limited_norms``). ``reduce`` (FSDP2 row shards) sums
    per-matrix partial sums over the ranks holding the matrices' rows: a channel of a right projection is a
    row, so phi_j is rank-local and only matrices x 2 (x 3 for whole matrices) fp64 numbers travel.

    Returns (coef per channel, flat as ``sumsq``: c phi_j / scale (fira) or c phi_j (apollo); the new
    ``previous`` per matrix): the update is ``P (N - coef o R) + coef o G`` (fira) or ``coef o G`` (apollo).
    The factors are computed in fp64 and ``coef`` is capped so that ``coef * |G_ij|`` stays finite: no NaN or
    Inf reaches a weight, whatever the (finite) gradient.
    """
    # Few operations on one flat tensor: on CPU each costs a dispatch, whatever its size.
    stats = sumsq.double()
    if lengths is None and reduce is not None:  # whole matrices, sharded: their sums over every rank's rows
        stats = reduce(stats.clone() if stats is sumsq else stats)
    nn, rr, gg = stats.unbind(1)
    phi2 = torch.where(rr > 0, nn / rr, 0.0)  # phi_j^2
    outside = gg if mode in WHOLE_GRADIENT else (gg - rr).clamp_min_(0.0)  # ||G_j||^2, or ||G_j - P R_j||^2
    sums = torch.stack((nn, phi2 * outside), 1)
    if lengths is not None:  # per matrix: ||N||^2 and sum_j phi_j^2 outside_j
        sums = torch.segment_reduce(sums, "sum", lengths=lengths, axis=0)
        if reduce is not None:
            sums = reduce(sums)
    weight = 1.0 if mode in WHOLE_GRADIENT else 1.0 / float(scale)  # the residual's weight inside U
    limit = _raw_limited_norms if limiter == "raw" else _limited_norms
    c, limited = limit(*sums.unbind(1), previous, units, weight, first_ratio)
    per_channel = c if lengths is None else c.repeat_interleave(lengths, output_size=stats.shape[0])
    coef = phi2.sqrt_().mul_(per_channel * weight)
    coef = torch.minimum(coef, gg.rsqrt().mul_(_COEF_PRODUCT_CAP))  # ||G_j|| = 0: rsqrt inf, no cap
    return coef.float(), limited.float()


def _limited_norms(
    sum_n: Tensor, total: Tensor, previous: Tensor, bias1: Tensor, weight: float, first_ratio: Tensor | float
) -> tuple[Tensor, Tensor]:
    """Fira's norm-growth limiter per matrix: (c, the new limiter state).

    The residual's norm, in units of the bias-corrected step (so lr warmup never triggers the limiter), is
    T = weight sqrt(total) / bias1, with ``total`` = sum_j phi_j^2 ||outside_j||^2 (||S||^2 or ||U||^2 without
    forming either). c = min(1, GROWTH_LIMIT previous / T). On a first step (``previous`` 0) the bound is
    weight first_ratio ||N|| / bias1 instead, first_ratio = sqrt(d / r): the norm of a full-space update whose
    entries have N's RMS, so a usual first step is unlimited (as in Fira) while a channel whose projection is
    nearly zero cannot make it arbitrarily large. The new state is c T, but at least ``_LIMIT_FLOOR`` weight
    ||N|| / bias1 (see the floor's comment)."""
    norm = total.sqrt().mul_(weight / bias1)
    limit = torch.where(previous > 0, GROWTH_LIMIT * previous.double(), sum_n.sqrt() * (weight * first_ratio / bias1))
    c = (limit / norm).clamp_(max=1.0).nan_to_num_(0.0)  # 0 / 0 (nothing outside the subspace): 0
    floor = sum_n.sqrt().mul_(weight * _LIMIT_FLOOR / bias1)
    return c, torch.maximum(c * norm, floor)


def _raw_limited_norms(
    sum_n: Tensor, total: Tensor, previous: Tensor, units: Tensor, weight: float, first_ratio: Tensor | float
) -> tuple[Tensor, Tensor]:
    """The limiter as Fira's and APOLLO's own code apply it (``limiter="raw"``): the residual's norm is measured
    before Adam's bias corrections, T = weight sqrt(total) / sqrt(1 - b2^t) (``units``; our N carries that
    sqrt, their m / (sqrt(v) + eps) does not), the first step (``previous`` 0) is not bounded, and the state is
    c T with no floor. Early in training T grows by (1 - b1^t) / sqrt(1 - b2^t) a step, so this limiter acts on
    the first steps where the corrected one does not: that is apollo-torch's trajectory."""
    del sum_n, first_ratio  # the raw limiter has no first-step bound and no floor
    norm = total.sqrt().mul_(weight / units)
    c = torch.where(previous > 0, GROWTH_LIMIT * previous.double() / norm, 1.0).clamp_(max=1.0).nan_to_num_(0.0)
    return c, c * norm


def limiter_units(
    limiter: str,
    scalars: Sequence[AdamScalars],
    steps: Sequence[int],
    lags: Sequence[Tensor] | None,
    betas: tuple[float, float],
    device: torch.device,
) -> Tensor:
    """What the limiter divides a matrix's residual norm by, fp64 on ``device``: 1 - b1^a (``corrected``: the
    bias-corrected step's units) or sqrt(1 - b2^a) (``raw``), a the true age. The host ages' values are divided
    by the lag correction (``lag_vectors``: c1, c2) where the host count runs ahead; exact without a lag."""
    raw = limiter == "raw"
    out = device_vector([s.bias2_sqrt if raw else s.bias1 for s in scalars], torch.float64, device)
    if lags is None:
        return out
    fix = lag_vectors(steps, lags, betas)
    return out / (fix.c2 if raw else fix.c1)


def residual_coefficients(
    sumsq: Tensor,
    lengths: list[int],
    *,
    bases: Sequence[Tensor],
    update_norms: Sequence[Tensor],
    units: Tensor,
    mode: str,
    scale: float,
    reduce: Callable[[Tensor], Tensor] | None,
    skipped: Sequence[Tensor] | None,
    limiter: str = "corrected",
) -> tuple[Tensor, ...]:
    """The part of a residual step both engines share: ``residual_factors`` of every matrix of the call at once
    (``sumsq``: each matrix's channel sums, ``lengths[i]`` rows for matrix i; ``PER_MATRIX`` modes: one row each),
    the limiter state ``update_norms`` updated in place (a ``skipped`` matrix keeps its value), and each
    matrix's coefficients (its ``lengths[i]`` channels) returned."""
    device = sumsq.device
    per_channel = mode not in PER_MATRIX  # one channel per matrix, the whole matrix
    channel_counts = device_vector(lengths, torch.int64, device) if per_channel else None
    previous = torch.stack(list(update_norms))
    coef, limiter = residual_factors(
        sumsq, channel_counts, previous, units, mode, first_ratios(list(bases), device), scale, reduce, limiter
    )
    if skipped is not None:
        limiter = torch.where(torch.stack(list(skipped)), previous, limiter)
    torch._foreach_copy_(list(update_norms), list(limiter.unbind(0)))
    return coef.split(lengths)


def first_ratios(bases: list[Tensor], device: torch.device) -> Tensor:
    """``residual_factors``' first-step bound per matrix: sqrt(d / r) of each d x r basis, in fp64."""
    return device_vector([math.sqrt(b.shape[0] / b.shape[1]) for b in bases], torch.float64, device)


def channel_sumsq(t: Tensor, dim: int) -> Tensor:
    """sum(t^2) along ``dim`` of a matrix: ||t_j||^2 for each channel. Along rows (dim 1) ``vector_norm``
    squared, which makes no temporary; down columns (dim 0) ``square().sum(0)`` over bands of rows
    (at most ``_SUMSQ_BAND`` values of temporary), because on CPU (torch 2.13) ``vector_norm`` down
    columns is 5-40x slower than either (measured here, docs/benchmarks.md "Step time of the residual modes")."""
    if dim == 1:
        return torch.linalg.vector_norm(t, dim=1).square_()
    band = max(1, _SUMSQ_BAND // max(t.shape[1], 1))
    if t.shape[0] <= band:
        return t.square().sum(0)
    out = t[:band].square().sum(0)
    for start in range(band, t.shape[0], band):
        out += t[start : start + band].square().sum(0)
    return out


_SUMSQ_BAND = 1 << 22  # values of temporary per band in channel_sumsq (16 MiB in fp32)


def residual_moments(
    gs: Sequence[Tensor],
    bases: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    scalars: Sequence[AdamScalars],
    sides: Sequence[str],
    per_channel: bool,
    lags: Sequence[Lag | None],
    skips: Sequence[Tensor | None],
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> tuple[list[Tensor], list[Tensor], list[list[Tensor]]]:
    """The first half of a residual step (reference), for each matrix i: R, the moments updated in place
    (``moments_directions``), N, and (``per_channel``) the per-channel sums of squares ||N_j||^2, ||R_j||^2,
    ||G_j||^2 (``residual_factors``' ``sumsq`` columns), or else the whole norms ||N||, ||R||, ||G|| (0-d; the
    caller squares a batch of them at once)."""

    def sums_of(t: Tensor, side: str) -> Tensor:
        return channel_sumsq(t, channel_dim(side)) if per_channel else torch.linalg.vector_norm(t)

    rs, g_sums = [], []
    for g, basis, side in zip(gs, bases, sides, strict=True):  # G's sums while it is in cache; its fp32 copy
        gf = g.float()  # (a bf16 G's) lives for one matrix only
        rs.append(project(gf, basis, side))
        g_sums.append(sums_of(gf, side))
    directions = moments_directions(rs, exp_avgs, exp_avg_sqs, scalars, lags, skips, sides, reduce)
    sums = [
        [sums_of(direction, side), sums_of(r, side), gg]
        for direction, r, gg, side in zip(directions, rs, g_sums, sides, strict=True)
    ]
    return rs, directions, sums


def residual_update(
    p: Tensor,
    g: Tensor,
    basis: Tensor,
    r: Tensor,
    direction: Tensor,
    coef: Tensor,
    scalars: AdamScalars,
    side: str,
    mode: str,
    lag: Lag | None = None,
    skip: Tensor | None = None,
    rounding: int | None = None,
) -> None:
    """The second half (reference): W <- W (1 - lr wd) - alpha U, with U = P (N - coef o R) + coef o G
    (fira, fira_tensor) or coef o G (apollo); ``coef`` from ``residual_factors``. ``direction`` (N, this
    step's temporary) is overwritten.

    An fp32 matrix (eager) is updated without forming U: the GEMM adds P X into W with the decay as its
    beta, then coef o G is added in place. That saves writing and re-reading an m x n temporary and a pass
    for the decay (on CPU the residual then costs little more than the plain step) at the price of two fp32
    roundings into W instead of one. Other dtypes (a bf16 W must be rounded once) and compiled graphs
    (inductor drops addmm's alpha, as in ``apply_update``) form U. A torchao int8 W takes the fp32 path on its
    dequantized values, which are then requantized with the ``rounding`` seed's bits (``int8_weights``).

    ``lag`` scales X = N - coef o R and coef by c1 (alpha's correction, ``Lag``); ``skip`` leaves ``p``
    untouched: U is zeroed (``apply_update``), or the fp32 path runs on a copy of W that only a matrix not
    skipped takes (a ``where``), since addmm's beta and G's entries would otherwise touch it."""
    gf = g.float()
    coef_b = coef.unsqueeze(channel_dim(side))  # broadcast along the channel's entries
    x = None if mode in WHOLE_GRADIENT else direction.addcmul_(r, coef_b, value=-1.0)
    if lag is not None:
        coef_b = coef_b * lag.c1
        if x is not None:
            x.mul_(lag.c1)
    int8 = int8_weights.is_int8(p)  # its fp32 values take the fp32 path, then are requantized
    if not int8 and (p.dtype != torch.float32 or p.shape != gf.shape or torch.compiler.is_compiling()):
        update = gf * coef_b if x is None else project_back(x, basis, side).addcmul_(gf, coef_b)
        apply_update(p, update, scalars, skip, rounding)
        return
    target = int8_weights.dequantized(p) if int8 else p if skip is None else p.clone()
    if x is None:
        if scalars.decay != 1.0:
            target.mul_(scalars.decay)
    else:
        a, b = (basis, x) if side == "left" else (x, basis.mT)  # project_back's product, added into W
        target.addmm_(a, b, beta=scalars.decay, alpha=-scalars.alpha)
    target.addcmul_(gf, coef_b, value=-scalars.alpha)
    if int8:
        int8_weights.store_(p, target, rounding, skip)
    elif skip is not None:
        torch.where(skip, p, target, out=p)
