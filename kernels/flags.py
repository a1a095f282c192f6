"""The step's finiteness test as a few launches (per gradient dtype and size class): which gradients hold a NaN,
an Inf or an entry at or above their limit (``checks.grad_limit``).

``checks.nonfinite_flags`` computes the same flags with ``torch._foreach_norm(grads, inf)``. On a GPU that is a
multi-tensor launch too; this kernel exists so that a Triton step's host work is its own launches and tables
(it reads a pointer table, like the step kernels) and so that the test asks exactly the question the skip
needs: is every entry's magnitude below the limit, ``|x| < limit`` (False for NaN), compared in fp32 as
``checks`` compares max |G| (an fp32 or wider value) with its fp32 limit. Each gradient is read once, by a few
programs striding over it; a program that sees a bad entry stores 1 into the gradient's flag (several may: the
same value).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import FP_FUSION, device_guard, host_table, tl_dtype
from .precompile import jit

BLOCK = 1024
# Programs per gradient: enough that the largest gradient is read by many programs at once, capped so that a
# step with thousands of small gradients does not launch millions of idle programs.
_MAX_PROGRAMS = 512
_ITERATIONS = 16  # blocks a program reads, at most, before another program is added (up to the cap)
_MAX_GRADIENTS = 65535  # CUDA's limit on a grid's second axis


@jit
def nonfinite_kernel(ptrs, numels, positions, limits, out, X_DT: tl.constexpr, BLOCK: tl.constexpr):
    """out[k] = 1, with k = positions[t], if gradient t of this launch (``numels[t]`` contiguous entries at
    ``ptrs[t]``) has an entry with not (|x| < limits[k]); programs (i, t) for i < grid 0 read blocks i, i + P,
    i + 2P, ... (``positions``: where the launch's gradients stand among all of the step's)."""
    pid = tl.program_id(0)
    t = tl.program_id(1)
    step = tl.num_programs(0)
    x_ptr = tl.load(ptrs + t).to(tl.pointer_type(X_DT))
    n = tl.load(numels + t)
    k = tl.load(positions + t)
    limit = tl.load(limits + k)
    bad = tl.zeros((BLOCK,), dtype=tl.int32)
    for start in range(pid * BLOCK, n, step * BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        bad = tl.maximum(bad, tl.where(tl.abs(x) < limit, 0, 1))
    found = tl.max(bad, axis=0)
    tl.store(out + k, found, mask=found > 0)


def flags_config(x_dtype: torch.dtype) -> dict[str, Any]:
    """``nonfinite_kernel``'s constexprs and launch options for gradients of ``x_dtype`` (``aot`` and
    ``precompile`` ask this too)."""
    return dict(X_DT=tl_dtype(x_dtype), BLOCK=BLOCK, num_warps=4, enable_fp_fusion=FP_FUSION)


class Layout(NamedTuple):
    """What the launches of one set of gradients need besides their addresses: per launch, the gradients' dtype,
    positions, entry counts and the programs per gradient (``layout``)."""

    groups: tuple[tuple[torch.dtype, tuple[int, ...], tuple[int, ...], int], ...]


def _programs(numel: int) -> int:
    """Programs for a gradient of ``numel`` entries: enough that none reads more than ``_ITERATIONS`` blocks, up
    to ``_MAX_PROGRAMS``, rounded up to a power of two (a size class)."""
    return min(_MAX_PROGRAMS, triton.next_power_of_2(max(1, triton.cdiv(numel, BLOCK * _ITERATIONS))))


def layout(grads: list[Tensor]) -> Layout:
    """The ``Layout`` of these gradients (a caller that keeps their shapes and dtypes may keep it too): one launch
    per dtype and size class, so that a small gradient does not get a large one's idle programs, and at most
    ``_MAX_GRADIENTS`` gradients per launch (the grid's second axis)."""
    classes: dict[tuple[torch.dtype, int], list[int]] = {}
    for i, g in enumerate(grads):
        classes.setdefault((g.dtype, _programs(g.numel())), []).append(i)
    groups = []
    for (dtype, programs), idx in classes.items():
        for start in range(0, len(idx), _MAX_GRADIENTS):
            part = tuple(idx[start : start + _MAX_GRADIENTS])
            groups.append((dtype, part, tuple(grads[i].numel() for i in part), programs))
    return Layout(tuple(groups))


def nonfinite_flags(grads: list[Tensor], limits: Tensor, shape: Layout | None = None) -> Tensor:
    """Per gradient (contiguous, all on one device, fp32/bf16/fp16), True where an entry is NaN/Inf or not below
    its limit (``limits``: fp32 on that device): ``checks.nonfinite_flags``'s answer, one launch per ``layout`` group.
    ``shape``: these gradients' ``layout`` when the caller kept it."""
    device = grads[0].device
    out = torch.zeros(len(grads), dtype=torch.int32, device=device)
    with device_guard(device):
        for dtype, idx, numels, programs in (shape or layout(grads)).groups:
            table = host_table([[grads[i].data_ptr() for i in idx], list(numels), list(idx)], torch.int64, device)
            nonfinite_kernel[(programs, len(idx))](table[0], table[1], table[2], limits, out, **flags_config(dtype))
    return out.bool()
