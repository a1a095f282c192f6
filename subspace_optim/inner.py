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

import functools
import math
from collections.abc import Callable, Sequence
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


def scalars_by_age(
    lr: float, betas: tuple[float, float], eps: float, weight_decay: float, scale: float
) -> Callable[[int], AdamScalars]:
    """``adam_scalars`` of one call's hyperparameters by age, each age computed once (a call's matrices usually
    share one; both engines take their scalars from here)."""
    scalars = functools.partial(adam_scalars, lr, betas, eps, weight_decay, scale)
    return scalars if torch.compiler.is_compiling() else functools.lru_cache(maxsize=None)(scalars)  # dynamo: no cache


class Lag(NamedTuple):
    """One matrix's correction for steps skipped on the device that its host-side count ``t`` still includes
    (``lag_factors``): with a = t - lag its true age, ``c1`` = (1 - b1^t) / (1 - b1^a) multiplies alpha
    and ``c2`` = sqrt(1 - b2^t) / sqrt(1 - b2^a) multiplies sqrt(V) / sqrt(1 - b2^t); both 0-d fp64 on the
    device, exactly 1.0 where the lag is 0, so a matrix that skipped nothing steps bit for bit as without."""

    c1: Tensor
    c2: Tensor


def lag_vectors(steps: Sequence[int], lags: Sequence[Tensor], betas: tuple[float, float]) -> Lag:
    """``lag_factors`` of matrices whose lags share one device, as one ``Lag`` of two fp64 vectors (c1, c2), one
    entry per matrix: what a batched launch multiplies its scalar table's columns by."""
    beta1, beta2 = (float(b) for b in betas)
    t = device_vector(list(steps), torch.float64, lags[0].device)
    a = t - torch.stack(list(lags)).double()
    c1 = (1.0 - torch.pow(beta1, t)) / (1.0 - torch.pow(beta1, a))
    c2 = (1.0 - torch.pow(beta2, t)).sqrt_() / (1.0 - torch.pow(beta2, a)).sqrt_()
    return Lag(c1, c2)


def lag_factors(steps: Sequence[int], lags: Sequence[Tensor], betas: tuple[float, float]) -> list[Lag]:
    """Per matrix its ``Lag`` (on its lag's device), from the host ages ``steps`` and the device counts ``lags``
    of skipped steps among them, without reading the lags on the host (a sync): a few vector operations
    per device.

    A skipped matrix does not age; the optimizer learns which were skipped only when it next reads its
    flags, so until then its host count runs ahead by the lag and the bias corrections are fixed here.
    Numerator and denominator are the same device expression, so a lag of 0 gives exactly 1.0."""
    out: list[Lag | None] = [None] * len(lags)
    by_device: dict[torch.device, list[int]] = {}
    for i, lag in enumerate(lags):
        by_device.setdefault(lag.device, []).append(i)
    for idx in by_device.values():
        c1, c2 = lag_vectors([steps[i] for i in idx], [lags[i] for i in idx], betas)
        for i, x, y in zip(idx, c1.unbind(0), c2.unbind(0), strict=True):
            out[i] = Lag(x, y)
    return out  # type: ignore[return-value]


def device_vector(values: Sequence[float], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.tensor(values, dtype=dtype, device=device)`` without a host sync. A copy from pageable host memory
    to a GPU waits for the stream (everything queued before it); a pinned buffer copied with ``non_blocking``
    is queued instead (``kernels._common.host_table`` does the same for the kernels, which this module cannot
    import: it is Triton's)."""
    table = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return table.to(device)
    return table.pin_memory().to(device, non_blocking=True)


def projected_adamw(
    p: Tensor, g: Tensor, basis: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, s: AdamScalars, side: str,
    lag: Lag | None = None, skip: Tensor | None = None,
) -> None:  # fmt: skip
    """One step of matrix ``p`` (viewed as ``g``'s shape) in the subspace of ``basis``, in place (reference):
    ``projected_adamw_batch`` of one matrix."""
    projected_adamw_batch([p], [g], [basis], [exp_avg], [exp_avg_sq], [s], [side], [lag], [skip])


def projected_adamw_batch(
    ps: Sequence[Tensor], gs: Sequence[Tensor], bases: Sequence[Tensor], exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor], ss: Sequence[AdamScalars], sides: Sequence[str], lags: Sequence[Lag | None],
    skips: Sequence[Tensor | None],
) -> None:  # fmt: skip
    """One step of each matrix i in the subspace of ``bases[i]``, in place (reference). The projections and
    updates are per matrix; the moments and N are one ``torch._foreach_*`` operation per step of the rule for
    all of them (``moments_directions``): on a CPU each matrix then costs its GEMMs and a few dispatches instead
    of a dozen, with the same kernels, so the same bits.

    ``skips[i]`` (0-d bool on the device; True: the gradient is not finite) leaves ``ps[i]`` and its moments
    untouched bit for bit without the host knowing (``moments_directions``, ``_apply_update``)."""
    rs = [project(g.float(), basis, side) for g, basis, side in zip(gs, bases, sides, strict=True)]
    directions = moments_directions(rs, exp_avgs, exp_avg_sqs, ss, lags, skips)
    for i, direction in enumerate(directions):
        if lags[i] is not None:
            direction.mul_(lags[i].c1)
        _apply_update(ps[i], project_back(direction, bases[i], sides[i]), ss[i], skips[i])


def moments_directions(
    rs: Sequence[Tensor], exp_avgs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor], ss: Sequence[AdamScalars],
    lags: Sequence[Lag | None], skips: Sequence[Tensor | None],
) -> list[Tensor]:  # fmt: skip
    """Update each matrix's moments with its R in place; return each N = M / (sqrt(V) / sqrt(1 - b2^t) + eps).
    The matrices share betas and eps (one call's hyperparameters); their ages may differ.

    A matrix with ``skips[i]`` gets its new moments computed out of place by the same kernels (the same bits)
    and kept only where the flag is False, so a skipped matrix's NaN never lands in them (its N is garbage,
    unused). ``lags[i]`` (``Lag``) corrects sqrt(V) / sqrt(1 - b2^t) for steps the host counted but the device
    skipped."""
    w1, beta2, w2, eps = ss[0].w1, ss[0].beta2, ss[0].w2, ss[0].eps
    ms, vs = list(exp_avgs), list(exp_avg_sqs)
    kept = [i for i, skip in enumerate(skips) if skip is None]
    masked = [i for i, skip in enumerate(skips) if skip is not None]
    if kept:
        m_in, v_in, r_in = [ms[i] for i in kept], [vs[i] for i in kept], [rs[i] for i in kept]
        torch._foreach_lerp_(m_in, r_in, w1)
        torch._foreach_mul_(v_in, beta2)
        torch._foreach_addcmul_(v_in, r_in, r_in, value=w2)
    if masked:
        r_in = [rs[i] for i in masked]
        m_new = torch._foreach_lerp([ms[i] for i in masked], r_in, w1)
        v_new = torch._foreach_mul([vs[i] for i in masked], beta2)
        torch._foreach_addcmul_(v_new, r_in, r_in, value=w2)
        for i, m, v in zip(masked, m_new, v_new, strict=True):
            torch.where(skips[i], ms[i], m, out=ms[i])
            torch.where(skips[i], vs[i], v, out=vs[i])
            ms[i], vs[i] = m, v  # N is computed from the new values (a kept matrix's are the stored ones)
    roots = torch._foreach_sqrt(vs)
    for root, lag in zip(roots, lags, strict=True):
        if lag is not None:
            root.mul_(lag.c2)
    torch._foreach_div_(roots, [s.bias2_sqrt for s in ss])
    torch._foreach_add_(roots, eps)
    return list(torch._foreach_div(ms, roots))


def _decay(p: Tensor, decay: float, skip: Tensor | None) -> None:
    """W <- W (1 - lr wd) in place; a ``skip``ped matrix is multiplied by exactly 1. The factor becomes a 0-d
    fp32 tensor only where that rounds like the number (fp32 weights; any dtype on the CPU, where a 0-d
    operand is read at fp32); a low-precision GPU weight would round the tensor factor to its own dtype
    first, so it takes a ``where`` over a decayed copy instead."""
    if decay == 1.0:
        return
    if skip is None:
        p.mul_(decay)
    elif p.dtype == torch.float32 or p.device.type == "cpu":
        p.mul_(torch.where(skip, 1.0, decay))
    else:
        torch.where(skip, p, p * decay, out=p)


def _apply_update(p: Tensor, update: Tensor, s: AdamScalars, skip: Tensor | None = None) -> None:
    """W <- W (1 - lr wd) - alpha U, in place, U (fp32, ``p``'s element count) rounded once into ``p``'s dtype.

    With ``skip`` set, U (this step's temporary) is zeroed first: W + (-alpha) * (+0) is W for every W,
    signed zeros included, so the skipped matrix's weight keeps its bits and its NaN never reaches it."""
    if skip is not None:
        update.masked_fill_(skip, 0.0)
    _decay(p, s.decay, skip)
    if torch.compiler.is_compiling():
        # Inductor (torch 2.13, CPU) compiles p.add_(a @ b, alpha=c) as if alpha were 1: scale explicitly.
        p.add_((update * -s.alpha).view(p.shape).to(p.dtype))
    else:
        p.add_(update.view(p.shape).to(p.dtype), alpha=-s.alpha)


# --------------------------------------------------------------------------------------------- residual
# What a projected step does with the part of the gradient its subspace discards (the ``residual`` option).
RESIDUALS = ("none", "fira", "fira_tensor", "apollo")
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
    bias1: Tensor,
    mode: str,
    first_ratio: Tensor | float,
    scale: float,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    r"""The residual's per-channel coefficients for a batch of matrices, from per-channel sums of squares.

    ``sumsq`` (channels, 3): ||N_j||^2, ||R_j||^2, ||G_j||^2 for every channel j of every matrix, matrix after
    matrix, ``lengths[i]`` channels for matrix i (``fira_tensor``: ``lengths`` None, one row per matrix, its
    whole sums); ``previous``: each matrix's last limited norm (0: none yet); ``bias1``: 1 - b1^t; ``scale``:
    GaLore's scale. With phi_j = ||N_j|| / ||R_j|| (0 where R_j = 0), the update before lr scale / (1 - b1^t) is

        fira, fira_tensor:  U = P N + S,  S = (c / scale) phi o (G - P R)   (phi o: channel j scaled by phi_j)
        apollo:             U = c phi o G                                   (the whole gradient, channel-scaled)

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
    outside = gg if mode == "apollo" else (gg - rr).clamp_min_(0.0)  # ||G_j||^2, or ||G_j - P R_j||^2
    sums = torch.stack((nn, phi2 * outside), 1)
    if lengths is not None:  # per matrix: ||N||^2 and sum_j phi_j^2 outside_j
        sums = torch.segment_reduce(sums, "sum", lengths=lengths, axis=0)
        if reduce is not None:
            sums = reduce(sums)
    weight = 1.0 if mode == "apollo" else 1.0 / float(scale)  # the residual's weight inside U
    c, limited = _limited_norms(*sums.unbind(1), previous, bias1, weight, first_ratio)
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


def corrected_bias1(
    bias1: Sequence[float],
    steps: Sequence[int],
    lags: Sequence[Tensor] | None,
    betas: tuple[float, float],
    device: torch.device,
) -> Tensor:
    """1 - b1^a per matrix, fp64 on ``device``: ``bias1`` (the host ages' 1 - b1^t), divided by the lag
    correction c1 (``lag_vectors``) where the host count runs ahead; exact without a lag."""
    out = device_vector(list(bias1), torch.float64, device)
    return out if lags is None else out / lag_vectors(steps, lags, betas).c1


def residual_coefficients(
    sumsq: Tensor,
    lengths: list[int],
    *,
    bases: Sequence[Tensor],
    update_norms: Sequence[Tensor],
    bias1: Tensor,
    mode: str,
    scale: float,
    reduce: Callable[[Tensor], Tensor] | None,
    skipped: Sequence[Tensor] | None,
) -> tuple[Tensor, ...]:
    """The part of a residual step both engines share: ``residual_factors`` of every matrix of the call at once
    (``sumsq``: each matrix's channel sums, ``lengths[i]`` rows for matrix i; ``fira_tensor``: one row each),
    the limiter state ``update_norms`` updated in place (a ``skipped`` matrix keeps its value), and each
    matrix's coefficients (its ``lengths[i]`` channels) returned."""
    device = sumsq.device
    per_channel = mode != "fira_tensor"  # fira_tensor: one channel per matrix, the whole matrix
    channel_counts = device_vector(lengths, torch.int64, device) if per_channel else None
    previous = torch.stack(list(update_norms))
    coef, limiter = residual_factors(
        sumsq, channel_counts, previous, bias1, mode, first_ratios(list(bases), device), scale, reduce
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
    gs: Sequence[Tensor], bases: Sequence[Tensor], exp_avgs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor],
    ss: Sequence[AdamScalars], sides: Sequence[str], per_channel: bool, lags: Sequence[Lag | None],
    skips: Sequence[Tensor | None],
) -> tuple[list[Tensor], list[Tensor], list[list[Tensor]]]:  # fmt: skip
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
    directions = moments_directions(rs, exp_avgs, exp_avg_sqs, ss, lags, skips)
    sums = [[sums_of(direction, side), sums_of(r, side), gg]
            for direction, r, gg, side in zip(directions, rs, g_sums, sides, strict=True)]  # fmt: skip
    return rs, directions, sums


def residual_update(
    p: Tensor, g: Tensor, basis: Tensor, r: Tensor, direction: Tensor, coef: Tensor, s: AdamScalars, side: str,
    mode: str, lag: Lag | None = None, skip: Tensor | None = None,
) -> None:  # fmt: skip
    """The second half (reference): W <- W (1 - lr wd) - alpha U, with U = P (N - coef o R) + coef o G
    (fira, fira_tensor) or coef o G (apollo); ``coef`` from ``residual_factors``. ``direction`` (N, this
    step's temporary) is overwritten.

    An fp32 matrix (eager) is updated without forming U: the GEMM adds P X into W with the decay as its
    beta, then coef o G is added in place. That saves writing and re-reading an m x n temporary and a pass
    for the decay (on CPU the residual then costs little more than the plain step) at the price of two fp32
    roundings into W instead of one. Other dtypes (a bf16 W must be rounded once) and compiled graphs
    (inductor drops addmm's alpha, as in ``_apply_update``) form U.

    ``lag`` scales X = N - coef o R and coef by c1 (alpha's correction, ``Lag``); ``skip`` leaves ``p``
    untouched: U is zeroed (``_apply_update``), or the fp32 path runs on a copy of W that only a matrix not
    skipped takes (a ``where``), since addmm's beta and G's entries would otherwise touch it."""
    gf = g.float()
    coef_b = coef.unsqueeze(channel_dim(side))  # broadcast along the channel's entries
    x = None if mode == "apollo" else direction.addcmul_(r, coef_b, value=-1.0)
    if lag is not None:
        coef_b = coef_b * lag.c1
        if x is not None:
            x.mul_(lag.c1)
    if p.dtype != torch.float32 or p.shape != gf.shape or torch.compiler.is_compiling():
        update = gf * coef_b if x is None else project_back(x, basis, side).addcmul_(gf, coef_b)
        _apply_update(p, update, s, skip)
        return
    target = p if skip is None else p.clone()
    if x is None:
        if s.decay != 1.0:
            target.mul_(s.decay)
    else:
        a, b = (basis, x) if side == "left" else (x, basis.mT)  # project_back's product, added into W
        target.addmm_(a, b, beta=s.decay, alpha=-s.alpha)
    target.addcmul_(gf, coef_b, value=-s.alpha)
    if skip is not None:
        torch.where(skip, p, target, out=p)
