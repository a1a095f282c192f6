"""The functional core, in ``torch.optim.adam.adam``'s style: lists of tensors in, in-place updates out.

``subspace_adamw`` (the projected AdamW step) and ``refresh_bases`` (new subspace bases) each dispatch to
the reference implementation in PyTorch or to its Triton twin in ``subspace_optim.kernels``, which has
the same signature. ``engine`` is obeyed as given: the optimizer decides ``"auto"`` per matrix
(``engine.choose``), and callers (tests, benchmarks, the layer-wise mode) may force either one, e.g. the
interpreted kernels on CPU tensors under ``TRITON_INTERPRET=1``.

These functions assume valid inputs: the optimizer validates everything (options, tensor types) before it
calls them, which is what makes a step all or nothing. Finiteness is the exception that the host need not
know: ``subspace_adamw``'s ``skipped`` flags, computed on the device, leave the matrices whose gradient is
not finite untouched there (as torch's fused AdamW does with ``found_inf``), so a regular step never waits
for the device to say which gradients were bad.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim.adam import adam as _torch_adam

from . import distributed, int8_weights, linalg, subspace, workspace
from .adam_rule import (
    AdamScalars,
    Lag,
    adam_scalars,
    apply_update,
    lag_factors,
    moments_directions,
    projected_adamw_batch,
    scalars_by_age,
)
from .factored import Factored
from .quant import Moment, as_matrix, as_moment, load_moment, parts, store_moment
from .residual_rule import (
    LIMITERS,
    PER_MATRIX,
    RESIDUALS,
    limiter_units,
    residual_coefficients,
    residual_moments,
    residual_update,
)
from .rounding import round_stochastically, rounding_bits

__all__ = ["Moment", "adamw", "refresh_bases", "subspace_adamw"]

# The twin contract. Each function below and its Triton twin (``kernels.step.subspace_adamw``,
# ``kernels.refresh.refresh_bases``) take the same parameters, with the same kinds, defaults and annotations,
# except these (``tests/test_twins.py`` checks it):
REFERENCE_ONLY = {
    "subspace_adamw": ("engine",),  # the dispatch itself
    # the twin runs the warm/rsvd range finder only (``previous[i]`` None: cold), on unsharded gradients
    "refresh_bases": ("policy", "slabs", "engine"),
}
TWIN_ONLY = {
    "subspace_adamw": ("blocks",),  # the kernels' tiles (tests and benchmarks)
    "refresh_bases": (),
}

# A matrix's two stored moments (first, second): bare float tensors or ``quant.Moment`` records; a factored
# second moment is a ``factored.Factored`` record.
Moments = tuple[Tensor | Moment, Tensor | Moment | Factored]


def _stored(i: int, exp_avgs: Sequence[Tensor | Moment], exp_avg_sqs: Sequence[Tensor | Moment]) -> Moments:
    """Member i's stored moments, as given (no record is made for a bare tensor: this runs per matrix and step)."""
    return exp_avgs[i], exp_avg_sqs[i]


def _codes(moment: Tensor | Moment) -> bool:
    """Whether a stored moment is 8-bit codes (a record with an absmax)."""
    return parts(moment)[1] is not None


def _tensors(moments: Moments) -> list[Tensor]:
    """Every tensor a matrix's stored moments are made of (values, absmaxes of 8-bit codes, factors)."""
    return [t for mo in moments for t in (mo if type(mo) is Factored else parts(mo)) if t is not None]


def _snapshot(moments: Moments, skip: Tensor | None) -> list[Tensor] | None:
    """Copies of a matrix's 8-bit moments (codes and absmaxes) when it may be skipped (``_restore``). fp32 and
    bf16 moments need none: the update keeps their old fp32 values itself (``adam_rule.moments_directions``), and
    a bf16 value goes back to bf16 exactly; requantizing dequantized codes is not guaranteed to."""
    if skip is None or not any(_codes(mo) for mo in moments):
        return None
    return [t.clone() for t in _tensors(moments)]


def _restore(moments: Moments, saved: list[Tensor] | None, skip: Tensor | None) -> None:
    """Put the saved 8-bit moments back where ``skip`` is set (the moments are low rank: cheap)."""
    if saved is not None:
        for t, old in zip(_tensors(moments), saved, strict=True):
            torch.where(skip, old, t, out=t)


def _load(moments: Moments) -> tuple[Tensor, Tensor]:
    """fp32 working copies of a matrix's (first, second) moments (``quant.load_moment``)."""
    second = moments[1] if type(moments[1]) is Factored else load_moment(moments[1], False)  # factors: fp32
    return load_moment(moments[0], True), second


def _store(moments: Moments, m: Tensor, v: Tensor) -> None:
    """Write fp32 working moments back into their storage (``quant.store_moment``)."""
    store_moment(moments[0], True, m)
    if type(moments[1]) is not Factored:  # factors are updated in place
        store_moment(moments[1], False, v)


def _lags(steps: Sequence[int], lags: Sequence[Tensor] | None, betas: tuple[float, float]) -> list[Lag | None]:
    """Each matrix's ``adam_rule.Lag`` (None for all when no lag is given)."""
    return [None] * len(steps) if lags is None else list(lag_factors(steps, lags, betas))


def subspace_adamw(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    bases: Sequence[Tensor],
    exp_avgs: Sequence[Tensor | Moment],
    exp_avg_sqs: Sequence[Tensor | Moment],
    steps: Sequence[int],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    scale: float,
    sides: Sequence[str],
    engine: str = "reference",
    matmul_precision: str = "ieee",
    residual: str = "none",
    update_norms: Sequence[Tensor] | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
    limiter: str = "corrected",
    skipped: Sequence[Tensor] | None = None,
    lags: Sequence[Tensor] | None = None,
    batches: Sequence[Sequence[int]] | None = None,
    rounding_seeds: Sequence[int | None] | None = None,
) -> None:
    r"""One projected AdamW step for each matrix i (``adam_rule`` has the math), in place.

    ``grads[i]`` is G_i (m x n); ``params[i]`` the weight, any shape that views as (m, n); ``bases[i]`` P_i
    (d x r, orthonormal columns, d = m for ``sides[i] == "left"``, n for ``"right"``), fp32 or bf16; the
    moments have the projected shape (r x n or m x r), fp32 or bf16 tensors, or ``quant.Moment`` records (8-bit
    codes with their absmax); the math is fp32 whatever the storage. ``steps[i]`` is the moments' age t,
    counting this step. ``residual`` (``residual_rule.RESIDUALS``) adds what the subspace discards; it then needs
    ``update_norms[i]``, matrix i's 0-d fp32 limiter state, updated in place, and on FSDP2 row shards
    ``reduce``, a sum over the ranks holding the other rows (every rank calls this with the same matrices);
    ``limiter`` (``residual_rule.LIMITERS``) is the units of its norm-growth limiter.

    ``skipped[i]`` (0-d bool on matrix i's device; True: its gradient is not finite) leaves matrix i's weight,
    moments and limiter state untouched bit for bit, decided on the device: no host sync. ``lags[i]`` (0-d
    int on the device) counts such skips among ``steps[i]`` that the caller has not read back yet; the bias
    corrections are fixed on the device (``adam_rule.lag_factors``). ``matmul_precision`` and ``batches`` (the
    launch batches, ``kernels.step.layout_batches``, from a caller that knows the layouts are unchanged) are
    the Triton engine's; the reference ignores them. ``rounding_seeds[i]`` (``rounding.rounding_seed``, or None)
    rounds a bf16 weight stochastically from that seed's bits (``rounding``); other weights ignore it.
    """
    _check_choices(residual, limiter, engine, update_norms, len(params))
    tensors = (params, grads, bases, exp_avgs, exp_avg_sqs, steps)
    hyper = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, scale=scale, sides=sides)
    masking = dict(skipped=skipped, lags=lags, rounding_seeds=rounding_seeds)
    residual_args = dict(residual=residual, update_norms=update_norms, reduce=reduce, limiter=limiter)
    if engine == "triton":
        from .kernels.step import subspace_adamw as triton_subspace_adamw  # imports Triton: only on use

        triton_subspace_adamw(
            *tensors, **hyper, **masking, **residual_args, matmul_precision=matmul_precision, batches=batches
        )
    elif residual != "none":
        _residual_reference(*tensors, **hyper, **masking, **residual_args)
    else:
        _projected_reference(*tensors, **hyper, **masking, reduce=reduce)


def _check_choices(residual: str, limiter: str, engine: str, update_norms: Sequence[Tensor] | None, count: int) -> None:
    """``subspace_adamw``'s string arguments, and the limiter state a residual needs."""
    if residual not in RESIDUALS:
        raise ValueError(f"subspace_adamw: residual must be one of {RESIDUALS}, got {residual!r}")
    if residual != "none" and (update_norms is None or len(update_norms) != count):
        raise ValueError(f"subspace_adamw: residual={residual!r} needs update_norms, one 0-d tensor per matrix")
    if limiter not in LIMITERS:
        raise ValueError(f"subspace_adamw: limiter must be one of {LIMITERS}, got {limiter!r}")
    if engine not in ("reference", "triton"):
        raise ValueError(f"subspace_adamw: engine must be 'reference' or 'triton', got {engine!r}")


def _projected_reference(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    bases: Sequence[Tensor],
    exp_avgs: Sequence[Tensor | Moment],
    exp_avg_sqs: Sequence[Tensor | Moment],
    steps: Sequence[int],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    scale: float,
    sides: Sequence[str],
    skipped: Sequence[Tensor] | None,
    lags: Sequence[Tensor] | None,
    reduce: Callable[[Tensor], Tensor] | None = None,
    rounding_seeds: Sequence[int | None] | None = None,
) -> None:
    """The reference step without a residual: chunk by chunk (``_moment_chunks``), the moments' fp32 working
    copies through ``adam_rule.projected_adamw_batch``, then stored back (8-bit ones restored where skipped)."""
    fixes = _lags(steps, lags, betas)
    scalars = scalars_by_age(lr, betas, eps, weight_decay, scale)
    for chunk in _moment_chunks(exp_avgs):
        skips = [None if skipped is None else skipped[i] for i in chunk]
        moments, saved, ms, vs = _working_moments(chunk, exp_avgs, exp_avg_sqs, skips)
        projected_adamw_batch(
            [params[i] for i in chunk],
            [grads[i] for i in chunk],
            [bases[i].float() for i in chunk],
            ms,
            vs,
            [scalars(steps[i]) for i in chunk],
            [sides[i] for i in chunk],
            [fixes[i] for i in chunk],
            skips,
            reduce,
            None if rounding_seeds is None else [rounding_seeds[i] for i in chunk],
        )
        _store_moments(moments, saved, ms, vs, skips)


# Moment entries per reference chunk: the working copies (fp32 views of bf16 or 8-bit moments) and the per-matrix
# temporaries (R, N, sqrt(V)) of one chunk's matrices exist at once, so their size is bounded, not the state's.
_CHUNK_MOMENTS = 1 << 22


def _moment_chunks(exp_avgs: Sequence[Tensor | Moment]) -> list[range]:
    """Consecutive matrices in chunks of at most ``_CHUNK_MOMENTS`` moment entries (at least one matrix each)."""
    out, start, total = [], 0, 0
    for i, m in enumerate(exp_avgs):
        entries = parts(m)[0].numel()
        if i > start and total + entries > _CHUNK_MOMENTS:
            out.append(range(start, i))
            start, total = i, 0
        total += entries
    out.append(range(start, len(exp_avgs)))
    return out


def _working_moments(
    chunk: range,
    exp_avgs: Sequence[Tensor | Moment],
    exp_avg_sqs: Sequence[Tensor | Moment],
    skips: Sequence[Tensor | None],
) -> tuple[list[Moments], list[list[Tensor] | None], list[Tensor], list[Tensor]]:
    """For the chunk's matrices: their stored moments, snapshots of the 8-bit ones that may be skipped
    (``_snapshot``), and the fp32 working moments (the stored tensors themselves when fp32)."""
    moments = [_stored(i, exp_avgs, exp_avg_sqs) for i in chunk]
    saved = [_snapshot(mo, skip) for mo, skip in zip(moments, skips, strict=True)]
    loaded = [_load(mo) for mo in moments]
    return moments, saved, [m for m, _ in loaded], [v for _, v in loaded]


def _store_moments(
    moments: list[Moments],
    saved: list[list[Tensor] | None],
    ms: list[Tensor],
    vs: list[Tensor],
    skips: Sequence[Tensor | None],
) -> None:
    """Write the working moments back into their storage and restore the skipped 8-bit ones."""
    for mo, kept, m, v, skip in zip(moments, saved, ms, vs, skips, strict=True):
        _store(mo, m, v)
        _restore(mo, kept, skip)


class _ResidualWork(NamedTuple):
    """What the first half of a reference residual step leaves for the second, per matrix."""

    scalars: AdamScalars
    basis: Tensor  # fp32
    r: Tensor  # R, the projected gradient
    direction: Tensor  # N, the normalized moment (overwritten by the update)


def _residual_reference(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    bases: Sequence[Tensor],
    exp_avgs: Sequence[Tensor | Moment],
    exp_avg_sqs: Sequence[Tensor | Moment],
    steps: Sequence[int],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    scale: float,
    sides: Sequence[str],
    residual: str,
    update_norms: Sequence[Tensor],
    reduce: Callable[[Tensor], Tensor] | None,
    limiter: str,
    skipped: Sequence[Tensor] | None,
    lags: Sequence[Tensor] | None,
    rounding_seeds: Sequence[int | None] | None = None,
) -> None:
    """The reference residual step in three passes: R, moments, N and channel sums per matrix
    (``_residual_moments``); the coefficients of every matrix in one call (``residual_rule.residual_coefficients``,
    shared with the kernels: every matrix's channels in one flat tensor, a few operations per step instead of
    per matrix); then each update. ``PER_MATRIX`` modes take whole-matrix norms (one row per matrix). A skipped
    matrix's NaN stays in its own rows of the flat tensors; its limiter state keeps its old value."""
    fixes = _lags(steps, lags, betas)
    scalars = scalars_by_age(lr, betas, eps, weight_decay, scale)
    work, sumsq, lengths = _residual_moments(
        grads, bases, exp_avgs, exp_avg_sqs, steps, sides, residual, scalars, fixes, skipped, reduce
    )
    units = limiter_units(limiter, [w.scalars for w in work], steps, lags, betas, grads[0].device)
    coefs = residual_coefficients(
        sumsq,
        lengths,
        bases=bases,
        update_norms=update_norms,
        units=units,
        mode=residual,
        scale=scale,
        reduce=reduce,
        skipped=skipped,
        limiter=limiter,
    )
    for i in reversed(range(len(work))):  # the last projected first: its G is the likeliest still in cache
        w, skip, seed = work[i], _at(skipped, i), _at(rounding_seeds, i)
        matrix = (params[i], grads[i], w.basis, w.r, w.direction, coefs[i], w.scalars, sides[i])
        residual_update(*matrix, residual, fixes[i], skip, seed)


def _at(values: Sequence[Any] | None, i: int) -> Any:
    """Entry i of an optional per-matrix list."""
    return None if values is None else values[i]


def _residual_moments(
    grads: Sequence[Tensor],
    bases: Sequence[Tensor],
    exp_avgs: Sequence[Tensor | Moment],
    exp_avg_sqs: Sequence[Tensor | Moment],
    steps: Sequence[int],
    sides: Sequence[str],
    residual: str,
    scalars: Callable[[int], AdamScalars],
    fixes: Sequence[Lag | None],
    skipped: Sequence[Tensor] | None,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> tuple[list[_ResidualWork], Tensor, list[int]]:
    """The first half of the reference residual step, chunk by chunk (``_moment_chunks``): the moments
    updated (``residual_rule.residual_moments``) and stored, each matrix's work, and the flat per-channel sums of
    squares with each matrix's channel count (``residual_rule.residual_factors``' ``sumsq``)."""
    per_channel = residual not in PER_MATRIX  # one channel per matrix, the whole matrix
    work: list[_ResidualWork] = []
    sums: tuple[list[Tensor], list[Tensor], list[Tensor]] = ([], [], [])
    for chunk in _moment_chunks(exp_avgs):
        skips = [None if skipped is None else skipped[i] for i in chunk]
        moments, saved, ms, vs = _working_moments(chunk, exp_avgs, exp_avg_sqs, skips)
        ages, chunk_bases = [scalars(steps[i]) for i in chunk], [bases[i].float() for i in chunk]
        rs, directions, channel_sums = residual_moments(
            [grads[i] for i in chunk],
            chunk_bases,
            ms,
            vs,
            ages,
            [sides[i] for i in chunk],
            per_channel,
            [fixes[i] for i in chunk],
            skips,
            reduce,
        )
        _store_moments(moments, saved, ms, vs, skips)
        work += [_ResidualWork(*item) for item in zip(ages, chunk_bases, rs, directions, strict=True)]
        for matrix_sums in channel_sums:
            for into, t in zip(sums, matrix_sums, strict=True):
                into.append(t)
    if per_channel:
        return work, torch.stack([torch.cat(ts) for ts in sums], dim=1), [t.shape[0] for t in sums[0]]
    # whole-matrix norms, squared at once
    return work, torch.stack([torch.stack(ts) for ts in sums], dim=1).square_(), [1] * len(work)


def adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor | Moment],
    exp_avg_sqs: list[Tensor | Moment],
    steps: list[Tensor],
    *,
    lr: float | Tensor,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    foreach: bool | None,
    fused: bool | None = None,
    rounding_seeds: Sequence[int | None] | None = None,
) -> None:
    """Plain AdamW for the parameters that are not projected: torch's own ``adam`` with decoupled weight
    decay, so these parameters train exactly as ``torch.optim.AdamW`` would train them.

    Moments stored in low precision (bf16 for a wider parameter, or 8-bit codes: ``quant.Moment`` records) are
    updated one parameter at a time through fp32 working copies (``quant.load_moment``/``store_moment``), with
    the same ``adam`` call. A bf16 parameter with a ``rounding_seeds`` entry takes that path too, its fp32 result
    rounded stochastically into it (``rounding``).
    """
    kwargs = dict(decoupled_weight_decay=True, amsgrad=False, maximize=False, lr=lr, weight_decay=weight_decay, eps=eps)
    kwargs.update(beta1=betas[0], beta2=betas[1])
    foreach = _foreach_choice(params, lr, betas, foreach, fused)
    ms, vs = list(exp_avgs), list(exp_avg_sqs)
    hyper = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    seeds = [None] * len(params) if rounding_seeds is None else list(rounding_seeds)
    rounded = [i for i, (p, s) in enumerate(zip(params, seeds, strict=True)) if _rounds(p, s)]
    if rounded:  # these one by one (``_rounded_adamw``), the others as usual
        for i in rounded:
            _rounded_adamw(params[i], grads[i], (ms[i], vs[i]), steps[i], kwargs, hyper, seeds[i])
        rest = [i for i in range(len(params)) if i not in rounded]
        if rest:
            pick = [[t[i] for i in rest] for t in (params, grads, ms, vs, steps)]
            adamw(*pick, **hyper, foreach=foreach, fused=fused)
        return
    if any(type(v) is Factored for v in vs):
        for p, g, m, v, step in zip(params, grads, ms, vs, steps, strict=True):
            if type(v) is Factored:
                _factored_adamw(p, g, m, v, step, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
            else:
                adamw(
                    [p], [g], [m], [v], [step], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach
                )
        return
    if any(type(m) is Moment for m in (*ms, *vs)):  # records: bare values where they hold no codes
        ms, vs = [as_moment(m) for m in ms], [as_moment(v) for v in vs]
        if all(m.absmax is None for m in ms):
            ms, vs = [m.values for m in ms], [v.values for v in vs]
    if all(type(m) is not Moment and m.dtype == p.dtype for m, p in zip(ms, params, strict=True)):
        _torch_adam(params, grads, ms, vs, [], steps, foreach=foreach, fused=fused, **kwargs)
        return
    for p, g, m, v, step in zip(params, grads, ms, vs, steps, strict=True):
        _stored_adamw(p, g, (m, v), step, kwargs)


def _factored_adamw(
    p: Tensor,
    grad: Tensor,
    exp_avg: Tensor | Moment,
    factors: Factored,
    step: Tensor,
    *,
    lr: float | Tensor,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    rounding: int | None = None,
) -> None:
    """AdamW for one plain parameter whose second moment is factored (``factored``), viewed as rows x the rest:
    torch AdamW's update (decoupled decay, bias corrections, eps outside sqrt(V_hat)) with V from the factors,
    through ``adam_rule``'s rule, the projected matrices' own; ``rounding``: a stochastic rounding seed."""
    step.add_(1)
    scalars = adam_scalars(float(lr), betas, eps, weight_decay, 1.0, int(step.item()))
    reduce = None
    if distributed.is_dtensor(p):  # FSDP2 row shards: this rank's rows; column sums and total over every rank
        reduce = functools.partial(distributed.all_reduce_sum, group=p.device_mesh.get_group())
        p, grad, factors = distributed.local(p), distributed.local(grad), Factored(*map(distributed.local, factors))
        values, absmax = parts(exp_avg)
        exp_avg = distributed.local(values) if absmax is None else Moment(*map(distributed.local, (values, absmax)))
    m = load_moment(exp_avg, True)
    g = grad.reshape(grad.shape[0], -1).float()
    direction = moments_directions([g], [m.view(g.shape)], [factors], [scalars], [None], [None], [None], reduce)[0]
    store_moment(exp_avg, True, m)
    apply_update(p, direction, scalars, rounding=rounding)


def _rounds(p: Tensor, seed: int | None) -> bool:
    """Whether a plain parameter's result is rounded from a seed: torchao's int8 weights, seeded bf16 weights."""
    return int8_weights.is_int8(p) or (seed is not None and p.dtype == torch.bfloat16)


def _rounded_adamw(
    p: Tensor, grad: Tensor, moments: Moments, step: Tensor, kwargs: dict, hyper: dict, seed: int | None
) -> None:
    """One plain parameter whose result is rounded from ``seed``'s bits: a torchao int8 weight (``_int8_adamw``), or a
    bf16 one rounded stochastically (factored: ``_factored_adamw``; else fp32 working copies, ``_stored_adamw``)."""
    if type(moments[1]) is Factored:  # the factored rule's update (adam_rule.apply_update) rounds either kind
        _factored_adamw(p, grad, moments[0], moments[1], step, **hyper, rounding=seed)
        return
    if distributed.is_dtensor(p):  # an FSDP2 row shard: the update is elementwise, so this rank's rows alone
        p, grad = distributed.local(p), distributed.local(grad)
        moments = tuple(as_moment(mo).local(distributed.local) for mo in moments)
    if int8_weights.is_int8(p):
        _int8_adamw(p, grad, moments, step, kwargs, seed)
    else:
        _stored_adamw(p, grad, moments, step, kwargs, seed)


def _int8_adamw(p: Tensor, grad: Tensor, moments: Moments, step: Tensor, kwargs: dict, seed: int | None) -> None:
    """torch's AdamW for one torchao int8 weight: on its dequantized fp32 values, then requantized with the seed's
    bits (``int8_weights.store_``)."""
    work = int8_weights.dequantized(p)
    m, v = _load(moments)
    _torch_adam([work], [grad.float()], [m], [v], [], [step], foreach=False, **kwargs)
    _store(moments, m, v)
    int8_weights.store_(p, work, seed)


def _foreach_choice(
    params: list[Tensor], lr: float | Tensor, betas: tuple[float, float], foreach: bool | None, fused: bool | None
) -> bool | None:
    """The ``foreach`` passed to torch's ``adam``: the caller's, except where torch would pick wrongly."""
    if isinstance(betas[0], Tensor) and foreach is None:
        return False  # torch's foreach AdamW refuses tensor betas; it would pick foreach on CUDA
    cpu = all(type(p) in _PLAIN_TENSORS and p.device.type == "cpu" and p.dtype in _FOREACH_SAME for p in params)
    if foreach is None and not fused and cpu and not isinstance(lr, Tensor) and not torch.compiler.is_compiling():
        # torch's own default on the CPU is its per-tensor loop; its foreach path gives the same bits there
        # (every _foreach_ op loops over the same kernels; tests/test_adamw_parity.py checks it against the
        # default) with one dispatch per operation instead of one per operation and tensor. Not with a tensor
        # lr (torch's foreach path refuses it) or under torch.compile (its fake tensors refuse the foreach
        # path's CPU step counters).
        return True
    return foreach


def _stored_adamw(
    p: Tensor, grad: Tensor, moments: Moments, step: Tensor, kwargs: dict, rounding: int | None = None
) -> None:
    """torch's AdamW for one parameter whose moments are stored otherwise than in its dtype (or whose bf16 result
    is rounded stochastically, from ``rounding``'s bits), through fp32 working copies of row chunks."""
    # one draw of the whole parameter's rounding bits, sliced per chunk
    bits = None if rounding is None else rounding_bits(p.shape, rounding, p.device)
    if not p.is_contiguous():  # no row view to write through: one chunk, the whole tensor
        _chunk_adamw(p, grad, moments, step.clone(), kwargs, bits)
        step.add_(1)
        return
    matrix, grad = as_matrix(p), as_matrix(grad)
    # Row chunks bound the fp32 working copies (a 32000 x 4096 embedding would otherwise hold about 2.5 GB of
    # them at once); rows never split an 8-bit block, and every operation is elementwise, so the result is the
    # same bit for bit. Each chunk steps from the same count; the count advances once.
    for rows in _row_chunks(matrix.shape[0], matrix.shape[1]):
        chunk = tuple(as_moment(mo).local(lambda t, rows=rows: as_matrix(t)[rows]) for mo in moments)
        chunk_bits = None if bits is None else as_matrix(bits)[rows]
        _chunk_adamw(matrix[rows], grad[rows], chunk, step.clone(), kwargs, chunk_bits)
    step.add_(1)


_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)  # not DTensors or other subclasses
# Dtypes whose CPU foreach kernels round as the per-tensor ones (fp16's _foreach_mul_ by a scalar does not).
_FOREACH_SAME = (torch.float32, torch.bfloat16, torch.float64)


def fused_adamw_skipping(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    found_infs: list[Tensor],
    *,
    lr: float | Tensor,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """``torch.optim.AdamW(fused=True)``'s step for each plain parameter, skipped on the device where its
    ``found_infs[i]`` (0-d fp32 on its device; 1.0: not finite) is set, with no host read.

    torch's fused kernel takes one ``found_inf`` per call (meant for a GradScaler's whole step), so each
    parameter is its own call, with torch's own step bookkeeping around it (``torch.optim.adam._fused_adam``:
    counts + 1, the kernel, counts - found_inf). A parameter whose flag is 0 steps exactly as in
    ``torch.optim.AdamW(fused=True)``; one whose flag is 1 is left untouched, its count included. Moments in
    the parameter's dtype only (torch AdamW's own state); the step counts live on the parameters' devices."""
    beta1, beta2 = (float(b) for b in betas)  # torch's _to_scalar
    lrs: dict[torch.device, float | Tensor] = {}  # a CUDA tensor lr on each parameter's device, as torch moves it

    def lr_on(device: torch.device) -> float | Tensor:
        if not isinstance(lr, Tensor) or lr.device.type == "cpu" or lr.device == device:
            return lr
        return lrs.setdefault(device, lr.to(device, non_blocking=True))

    torch._foreach_add_(steps, 1)
    for p, g, m, v, step, bad in zip(params, grads, exp_avgs, exp_avg_sqs, steps, found_infs, strict=True):
        torch._fused_adamw_(
            [p],
            [g],
            [m],
            [v],
            [],
            [step],
            amsgrad=False,
            lr=lr_on(p.device),
            beta1=beta1,
            beta2=beta2,
            weight_decay=weight_decay,
            eps=eps,
            maximize=False,
            grad_scale=None,
            found_inf=bad,
        )
    torch._foreach_sub_(steps, list(found_infs))


def _chunk_adamw(
    target: Tensor, grad: Tensor, moments: Moments, count: Tensor, kwargs: dict, bits: Tensor | None = None
) -> None:
    """torch's AdamW on fp32 working copies of one chunk, written back into its stored moments and weight (rounded
    stochastically with ``bits``, ``rounding.rounding_bits``, when given)."""
    if bits is not None and target.dtype == torch.bfloat16:
        _rounded_chunk_adamw(target, grad, moments, count, kwargs, bits)
        return
    m, v = _load(moments)
    work = target if target.dtype == torch.float32 else target.float()  # fp32 math, rounded once into bf16
    _torch_adam([work], [grad.float()], [m], [v], [], [count], foreach=False, **kwargs)
    if work is not target:
        target.copy_(work)
    _store(moments, m, v)


def _rounded_chunk_adamw(
    target: Tensor, grad: Tensor, moments: Moments, count: Tensor, kwargs: dict, bits: Tensor
) -> None:
    """``_chunk_adamw`` for a bf16 chunk rounded stochastically: the same fp32 math, made cheap enough that rounding
    costs little over rounding to nearest. Its fp32 copies go into kept CPU buffers (``workspace``; fresh ones
    faulted in their pages each step), and torch's fused kernel does the update in one pass over them where the
    per-tensor code makes ~8 with two fresh temporaries (a 1M-value chunk, one CPU thread: 0.5 ms against 7 ms).
    Its results differ from the per-tensor code's in the last fp32 bit, far below the rounding's; the other stored
    paths keep the per-tensor code, which the tests hold bit-exact with torch's AdamW."""
    work = workspace.fp32_copy(target, "rounded_weight")
    g = workspace.fp32_copy(grad, "rounded_grad")
    m = _kept_fp32(moments[0], True, "rounded_m")
    v = _kept_fp32(moments[1], False, "rounded_v")
    fused = work.device.type in ("cpu", "cuda")
    _torch_adam([work], [g], [m], [v], [], [count], foreach=False, fused=fused, **kwargs)
    target.copy_(round_stochastically(work, bits.view(work.shape)))
    _store(moments, m, v)


def _kept_fp32(moment: Tensor | Moment, signed: bool, name: str) -> Tensor:
    """A working fp32 copy of a stored moment (``quant.load_moment``), a bf16 one in a kept buffer."""
    values, absmax = parts(moment)
    if absmax is None and values.dtype == torch.bfloat16:
        return workspace.fp32_copy(values, name)
    return load_moment(moment, signed)


_CHUNK_ELEMENTS = 1 << 22  # 16 MiB per fp32 working copy


def _row_chunks(rows: int, cols: int) -> list[slice]:
    """Row ranges of about ``_CHUNK_ELEMENTS`` values each (one range for a small tensor, or no rows)."""
    per = max(1, _CHUNK_ELEMENTS // max(cols, 1))
    return [slice(start, min(start + per, rows)) for start in range(0, max(rows, 1), per)]


def refresh_bases(
    grads: Sequence[Tensor],
    previous: Sequence[Tensor | None],
    seeds: Sequence[int],
    *,
    sides: Sequence[str],
    rank: int,
    policy: str,
    oversample: int,
    power_iters: int,
    slabs: Sequence[linalg.Slab] | None = None,
    engine: str = "reference",
    matmul_precision: str = "ieee",
) -> list[linalg.Basis]:
    """A new basis for each gradient G_i (m x n, or this rank's rows of it with ``slabs[i]``).

    ``policy`` is the refresh (``subspace.refresh_basis``); ``previous[i]`` the current basis or None;
    ``seeds[i]`` the sketch seed (``linalg.sketch_seed``). Never returns a non-finite basis: a refresh
    that fails (a factorization refuses the numbers, or a finite gradient still overflows fp32 inside a
    power iteration) keeps the previous basis, or on a first refresh the seeded random one
    (``kept_basis``). ``engine="triton"`` runs ``warm``/``rsvd`` on the Triton products; ``svd`` and
    ``random`` are torch operations on either engine, and row-sharded gradients (``slabs``) take the
    reference products, whose reductions the kernels do not implement.
    """
    count = len(grads)
    slabs = list(slabs) if slabs is not None else [linalg.UNSHARDED] * count
    if {len(previous), len(seeds), len(sides), len(slabs)} != {count}:
        raise ValueError("refresh_bases: every argument list needs one entry per gradient")
    out: list[linalg.Basis | None] = [None] * count
    fast = [
        i for i in range(count) if engine == "triton" and policy in ("warm", "rsvd") and slabs[i] is linalg.UNSHARDED
    ]
    if fast:
        from .kernels.refresh import refresh_bases as triton_refresh_bases  # imports Triton: only on use

        try:
            items = triton_refresh_bases(
                [grads[i] for i in fast],
                [previous[i] if policy == "warm" else None for i in fast],
                [seeds[i] for i in fast],
                sides=[sides[i] for i in fast],
                rank=rank,
                oversample=oversample,
                power_iters=power_iters,
                matmul_precision=matmul_precision,
            )
            for i, item in zip(fast, items, strict=True):
                out[i] = item
        except torch.linalg.LinAlgError:
            pass  # a factorization refused one member's numbers: the reference redoes the batch below
    for i in range(count):
        if out[i] is None:
            out[i] = _reference_basis(
                grads[i], previous[i], seeds[i], sides[i], rank, policy, oversample, power_iters, slabs[i]
            )
        elif not bool(torch.isfinite(out[i].basis).all()):
            d = out[i].basis.shape[0]
            out[i] = kept_basis(previous[i], d, rank, seeds[i], grads[i].device, out[i].total)
    return out  # type: ignore[return-value]


def _reference_basis(
    g: Tensor,
    previous: Tensor | None,
    seed: int,
    side: str,
    rank: int,
    policy: str,
    oversample: int,
    power_iters: int,
    slab: linalg.Slab,
) -> linalg.Basis:
    try:
        new = subspace.refresh_basis(
            g,
            side,
            rank,
            policy=policy,
            previous=previous,
            oversample=oversample,
            power_iters=power_iters,
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
    return kept_basis(previous, d, rank, seed, g.device, total)


def kept_basis(
    previous: Tensor | None, d: int, rank: int, seed: int, device: torch.device, total: Tensor
) -> linalg.Basis:
    """What a refresh that failed returns: the previous basis (on a first refresh, the seeded random one),
    capturing nothing of the gradient's energy ``total``."""
    basis = previous if previous is not None else linalg.random_basis(d, rank, seed, device)
    return linalg.Basis(basis, total.new_zeros(()), total)
