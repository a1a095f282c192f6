"""Buffers kept from step to step for the temporaries a CPU step would otherwise allocate afresh every time.

Why: glibc serves a multi-megabyte allocation with freshly mapped pages, and faulting them in costs more than the
arithmetic done on them (an 8192 x 128 bf16 -> fp32 copy: ~0.09 ms into a kept buffer, ~0.5 ms into a new one, on
this project's CPU). CUDA's caching allocator already reuses its blocks, so callers keep buffers on the CPU only,
except where they say otherwise.

A buffer is named by its use; a caller is done with the view it got before it asks for the same name again (the
paths that use them are sequential), and a buffer only grows, to the largest request: its bytes are the price.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_KEPT: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}


def kept(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A tensor of ``shape`` (uninitialized): a view of the buffer kept for (``name``, ``device``, ``dtype``), grown
    when it is too small."""
    count = math.prod(shape)
    key = (name, torch.device(device), dtype)
    held = _KEPT.get(key)
    if held is None or held.numel() < count:
        held = _KEPT[key] = torch.empty(count, dtype=dtype, device=device)
    return held[:count].view(shape)


def fp32_copy(t: Tensor, name: str) -> Tensor:
    """An fp32 copy of ``t``: in the buffer kept under ``name`` on the CPU, a fresh tensor elsewhere."""
    if t.device.type != "cpu":
        return t.float()
    return kept(name, tuple(t.shape), torch.float32, t.device).copy_(t)
