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
from .compat import FLATTENED
from .distributed import local

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


def nonfinite_flags(grads: list[Tensor], limits: list[float], shard_groups: list[Any]) -> Tensor:
    """Per gradient, True where an entry is NaN/Inf or above its limit: one batched test, a bool tensor on the
    device (the first gradient's), never read here, so computing it costs no host sync.

    ``aminmax`` reads G once (NaN propagates into both results); it is about 20x cheaper on CPU than the
    ``vector_norm(G, inf)`` it replaced, which cost as much as a projection GEMM. Ranks holding shards of
    the same parameters OR their flags over ``shard_groups``, so a NaN in one rank's rows skips the
    parameter everywhere (and no rank waits in a refresh all-reduce that the others skipped).
    """
    flags = []
    for g, limit in zip(grads, limits, strict=True):
        g = local(g)
        if g.numel() == 0:  # an empty FSDP shard: nothing here can be bad
            flags.append(torch.zeros((), dtype=torch.bool, device=g.device))
            continue
        low, high = torch.aminmax(g)
        peak = torch.maximum(high.float(), -low.float())  # NaN if any entry is NaN
        flags.append(~(peak < limit))  # True (bad) for NaN, for Inf and above the limit
    bad = torch.stack([f.to(flags[0].device) for f in flags])
    if shard_groups:  # collectives take int flags; an all-reduce is queued on the device, not waited for
        bad = distributed.any_across(bad.to(torch.int32), shard_groups).bool()
    return bad
