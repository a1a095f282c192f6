"""The inner rule (optax's term): AdamW on projected coordinates, with its scalars folded once for every engine.

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
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import factored, int8_weights
from . import rounding as rounding_mod
from .subspace import project, project_back


class AdamScalars(NamedTuple):
    """One matrix's step constants: lerp weight 1 - b1, b2, 1 - b2, eps, sqrt(1 - b2^t), the update's
    multiplier alpha = lr scale / (1 - b1^t), the decay factor 1 - lr wd, and 1 - b1^t (the residual's
    limiter measures updates in units of the bias-corrected Adam step)."""

    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
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
        one_minus_beta1=1.0 - beta1,
        beta2=beta2,
        one_minus_beta2=1.0 - beta2,
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
    p: Tensor,
    g: Tensor,
    basis: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    scalars: AdamScalars,
    side: str,
    lag: Lag | None = None,
    skip: Tensor | None = None,
) -> None:
    """One step of matrix ``p`` (viewed as ``g``'s shape) in the subspace of ``basis``, in place (reference):
    ``projected_adamw_batch`` of one matrix."""
    projected_adamw_batch([p], [g], [basis], [exp_avg], [exp_avg_sq], [scalars], [side], [lag], [skip])


def projected_adamw_batch(
    ps: Sequence[Tensor],
    gs: Sequence[Tensor],
    bases: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    scalars: Sequence[AdamScalars],
    sides: Sequence[str],
    lags: Sequence[Lag | None],
    skips: Sequence[Tensor | None],
    reduce: Callable[[Tensor], Tensor] | None = None,
    roundings: Sequence[int | None] | None = None,
) -> None:
    """One step of each matrix i in the subspace of ``bases[i]``, in place (reference); ``roundings[i]``: a
    stochastic rounding seed for a bf16 weight (``apply_update``). The projections and
    updates are per matrix; the moments and N are one ``torch._foreach_*`` operation per step of the rule for
    all of them (``moments_directions``): on a CPU each matrix then costs its GEMMs and a few dispatches instead
    of a dozen, with the same kernels, so the same bits.

    ``skips[i]`` (0-d bool on the device; True: the gradient is not finite) leaves ``ps[i]`` and its moments
    untouched bit for bit without the host knowing (``moments_directions``, ``apply_update``)."""
    rs = [project(g.float(), basis, side) for g, basis, side in zip(gs, bases, sides, strict=True)]
    directions = moments_directions(rs, exp_avgs, exp_avg_sqs, scalars, lags, skips, sides, reduce)
    for i, direction in enumerate(directions):
        if lags[i] is not None:
            direction.mul_(lags[i].c1)
        rounding = None if roundings is None else roundings[i]
        apply_update(ps[i], project_back(direction, bases[i], sides[i]), scalars[i], skips[i], rounding)


def moments_directions(
    rs: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    scalars: Sequence[AdamScalars],
    lags: Sequence[Lag | None],
    skips: Sequence[Tensor | None],
    sides: Sequence[str | None] | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> list[Tensor]:
    """Update each matrix's moments with its R in place; return each N = M / (sqrt(V) / sqrt(1 - b2^t) + eps).
    The matrices share betas and eps (one call's hyperparameters); their ages may differ. A second moment given
    as ``factored.Factored`` is updated by its factors and its sqrt(V) formed from them (``sides[i]`` says which
    factor normalizes; ``reduce`` sums over the ranks of a row-sharded matrix).

    A matrix with ``skips[i]`` gets its new moments computed out of place by the same kernels (the same bits)
    and kept only where the flag is False, so a skipped matrix's NaN never lands in them (its N is garbage,
    unused). ``lags[i]`` (``Lag``) corrects sqrt(V) / sqrt(1 - b2^t) for steps the host counted but the device
    skipped."""
    first = scalars[0]  # the call's betas and eps (its matrices' ages may differ)
    lerp_weight, beta2, square_weight, eps = first.one_minus_beta1, first.beta2, first.one_minus_beta2, first.eps
    ms, vs = list(exp_avgs), list(exp_avg_sqs)
    full = {i for i, v in enumerate(vs) if type(v) is not factored.Factored}  # a set: tested per matrix
    factors = [i for i in range(len(vs)) if i not in full]
    kept = [i for i, skip in enumerate(skips) if skip is None]
    masked = [i for i, skip in enumerate(skips) if skip is not None]
    if kept:
        torch._foreach_lerp_([ms[i] for i in kept], [rs[i] for i in kept], lerp_weight)
        v_in, r_in = [vs[i] for i in kept if i in full], [rs[i] for i in kept if i in full]
        if v_in:
            torch._foreach_mul_(v_in, beta2)
            torch._foreach_addcmul_(v_in, r_in, r_in, value=square_weight)
    if masked:
        m_new = torch._foreach_lerp([ms[i] for i in masked], [rs[i] for i in masked], lerp_weight)
        for i, m in zip(masked, m_new, strict=True):
            torch.where(skips[i], ms[i], m, out=ms[i])
            ms[i] = m  # N is computed from the new values (a kept matrix's are the stored ones)
        masked_full = [i for i in masked if i in full]
        if masked_full:
            r_in = [rs[i] for i in masked_full]
            v_new = torch._foreach_mul([vs[i] for i in masked_full], beta2)
            torch._foreach_addcmul_(v_new, r_in, r_in, value=square_weight)
            for i, v in zip(masked_full, v_new, strict=True):
                torch.where(skips[i], vs[i], v, out=vs[i])
                vs[i] = v
    for i in factors:  # their EMAs of R o R's row and column sums
        vs[i] = factored.update(vs[i], rs[i], square_weight, skips[i], reduce)
    roots = _roots(vs, sorted(full), sides, reduce)
    for root, lag in zip(roots, lags, strict=True):
        if lag is not None:
            root.mul_(lag.c2)
    for i in factors:
        _floor_by_first_moment(roots[i], ms[i], scalars[i], lags[i])
    torch._foreach_div_(roots, [x.bias2_sqrt for x in scalars])
    torch._foreach_add_(roots, eps)
    return list(torch._foreach_div(ms, roots))


def _floor_by_first_moment(root: Tensor, m: Tensor, scalars: AdamScalars, lag: Lag | None) -> None:
    """Raise a factored sqrt(V) to |M| where it is lower, both bias-corrected (``factored``: a second moment is at
    least the square of the mean, which the factors' rank-one estimate can break), in place: |M_hat / sqrt(V_hat)|
    <= 1 for every element. ``root`` is sqrt(V) (times the lag's c2) before its division by sqrt(1 - b2^t)."""
    floor = m.abs().mul_(scalars.bias2_sqrt / scalars.bias1)
    if lag is not None:
        floor.mul_(lag.c1)
    torch.maximum(root, floor, out=root)


def _roots(
    vs: list[Any], full: list[int], sides: Sequence[str | None] | None, reduce: Callable[[Tensor], Tensor] | None
) -> list[Tensor]:
    """sqrt(V) of every matrix: of the full V's (one foreach op), and of the (updated) factors' V."""
    out: list[Tensor | None] = [None] * len(vs)
    if full:
        for i, root in zip(full, torch._foreach_sqrt([vs[i] for i in full]), strict=True):
            out[i] = root
    for i, v in enumerate(vs):
        if out[i] is None:
            out[i] = factored.roots(v, None if sides is None else sides[i], reduce)
    return out  # type: ignore[return-value]


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


def apply_update(
    p: Tensor, update: Tensor, scalars: AdamScalars, skip: Tensor | None = None, rounding: int | None = None
) -> None:
    """W <- W (1 - lr wd) - alpha U, in place, U (fp32, ``p``'s element count) rounded once into ``p``'s dtype.

    With ``skip`` set, U (this step's temporary) is zeroed first: W + (-alpha) * (+0) is W for every W,
    signed zeros included, so the skipped matrix's weight keeps its bits and its NaN never reaches it. With a
    ``rounding`` seed a bf16 W is computed in fp32 and rounded stochastically (``rounding``): a skipped W, already
    a bf16 number, keeps its bits whatever the random ones."""
    if skip is not None:
        update.masked_fill_(skip, 0.0)
    int8 = int8_weights.is_int8(p)  # torchao's int8 weight: requantized from fp32 with the seed's bits
    if int8 or (rounding is not None and p.dtype == torch.bfloat16):
        work = int8_weights.dequantized(p) if int8 else p.float()
        _decay(work, scalars.decay, skip)
        work.add_(update.view(p.shape), alpha=-scalars.alpha)
        if int8:
            int8_weights.store_(p, work, rounding, skip)
        else:
            rounding_mod.store_(p, work, rounding)
        return
    _decay(p, scalars.decay, skip)
    if torch.compiler.is_compiling():
        # Inductor (torch 2.13, CPU) compiles p.add_(a @ b, alpha=c) as if alpha were 1: scale explicitly.
        p.add_((update * -scalars.alpha).view(p.shape).to(p.dtype))
    else:
        p.add_(update.view(p.shape).to(p.dtype), alpha=-scalars.alpha)
