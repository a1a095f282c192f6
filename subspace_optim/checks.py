"""What a step checks before anything moves: every parameter the groups hold, every gradient's type, and
one batched finiteness test whose flags decide, per parameter, between stepping, skipping and raising.

The flags stay on the device: the host reads them only where it must (``nonfinite="raise"``, a refresh, plain
AdamW parameters; ``SubspaceAdamW._read``), and a regular step of projected matrices hands them to the
functional core, which skips on the device."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from . import distributed
from .adam_rule import device_vector
from .distributed import local
from .guards import FLATTENED

_SQRT_FP32_MAX = math.sqrt(torch.finfo(torch.float32).max)


def refuse_bad_gradient(p: Tensor, name: str) -> None:
    """Sparse gradients and complex parameters are not supported: a TypeError with the alternative."""
    if p.grad.is_sparse:
        raise TypeError(
            f"SubspaceAdamW does not support sparse gradients (parameter {name}); "
            "use torch.optim.SparseAdam for it, or a dense embedding (sparse=False)"
        )
    if torch.is_complex(p):
        raise TypeError(
            f"SubspaceAdamW does not support complex parameters (parameter {name}); "
            "optimize torch.view_as_real(param) instead"
        )


def refuse_unknown(p: Tensor, group: dict[str, Any], name: str, known: set[int]) -> None:
    """A parameter put into a projected group behind ``add_param_group`` (DeepSpeed ZeRO edits in place)."""
    if group["rank"] is not None and id(p) not in known:
        if p.dim() == 1:
            raise ValueError(FLATTENED.format(rank=group["rank"]))
        raise ValueError(f"parameter {name} was put into a param group directly; use optimizer.add_param_group()")


def grad_limit(p: Tensor, projected: bool) -> float:
    """The largest |gradient entry| a parameter's step can take without overflowing fp32.

    A projected coordinate sums d entries against a unit vector, so |R| <= max|G| sqrt(d), and the second
    moment needs R^2 finite: above sqrt(fp32max) / 2 / sqrt(d) (~9e18 / sqrt(d)) a finite gradient could
    make V infinite and freeze the matrix for good, so it is handled like a non-finite one. Plain AdamW
    parameters only need finite entries (torch.optim.AdamW's own behaviour)."""
    if not projected:
        return math.inf
    return _SQRT_FP32_MAX / 2.0 / math.sqrt(max(p.shape[0], p.numel() // p.shape[0]))


def nonfinite_flags(grads: list[Tensor], limits: Tensor | list[float], shard_groups: list[Any]) -> Tensor:
    """Per gradient, True where an entry is NaN/Inf or above its limit: a bool tensor on the device (the first
    gradient's), never read here, so computing it costs no host sync.

    One ``torch._foreach_norm(grads, inf)`` per device reads every gradient once (max |G|; NaN propagates:
    CUDA's kernel takes ``max_propagate_nan``, the CPU's ``vector_norm``), instead of an ``aminmax`` and four
    small operations per gradient: the step's cost then does not grow with the parameter count by five
    dispatches each. ``limits`` (``grad_limit``; fp32 on that device, or a list) are compared in fp32, as a
    Python float limit is. Ranks holding shards of the same parameters OR their flags over ``shard_groups``,
    so a NaN in one rank's rows skips the parameter everywhere (and no rank waits in a refresh all-reduce that
    the others skipped).
    """
    locals_ = [local(g) for g in grads]
    device = locals_[0].device
    if not isinstance(limits, Tensor):
        limits = device_vector(limits, torch.float32, device)
    peaks = torch.zeros(len(grads), dtype=torch.float32, device=device)
    by_device: dict[torch.device, list[int]] = {}
    for i, g in enumerate(locals_):
        if g.numel():  # an empty FSDP shard: nothing here can be bad (its peak stays 0)
            by_device.setdefault(g.device, []).append(i)
    for idx in by_device.values():
        norms = torch._foreach_norm([locals_[i] for i in idx], math.inf)
        found = (
            torch.stack(norms).float()
            if len({t.dtype for t in norms}) == 1
            else torch.stack([t.float() for t in norms])
        )
        if len(idx) == len(grads):
            peaks = found.to(device)
        else:
            peaks[device_vector(idx, torch.int64, device)] = found.to(device)
    bad = ~(peaks < limits)  # True (bad) for NaN, for Inf and above the limit
    if shard_groups:  # collectives take int flags; an all-reduce is queued on the device, not waited for
        bad = distributed.any_across(bad.to(torch.int32), shard_groups).bool()
    return bad
