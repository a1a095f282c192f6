"""Shared host helpers for the Triton kernels: pointer arrays, block sizes, dtype mapping.

Batched launches address a group of same-shape matrices through an int64 array of data pointers, so
separate parameter tensors (never stacked, never copied) are processed by one launch with a grid axis
over the group. Only same-shape, same-dtype, same-stride tensors may share an array.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton.language as tl
from torch import Tensor

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (kernels then run on CPU tensors, in numpy)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def tl_dtype(dtype: torch.dtype) -> tl.dtype:
    """The Triton element type of a supported tensor dtype (fp32, bf16, fp16)."""
    try:
        return _TL_DTYPES[dtype]
    except KeyError:
        raise TypeError(f"unsupported dtype for the Triton engine: {dtype}") from None


def pointer_array(tensors: list[Tensor], device: torch.device) -> Tensor:
    """An int64 tensor of the tensors' data pointers on ``device`` (one small host-to-device copy)."""
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=device)


def check_same_layout(tensors: list[Tensor], what: str) -> tuple[int, int]:
    """The common (stride0, stride1) of 2-D tensors of one shape and dtype; raise if they differ."""
    first = tensors[0]
    for t in tensors:
        if t.dim() != 2 or t.shape != first.shape or t.dtype != first.dtype or t.stride() != first.stride():
            raise ValueError(
                f"{what}: a batch needs 2-D tensors of one shape, dtype and stride; got "
                f"{tuple(t.shape)}/{t.dtype}/{t.stride()} next to {tuple(first.shape)}/{first.dtype}/{first.stride()}"
            )
        if t.device != first.device:
            raise ValueError(f"{what}: a batch must live on one device")
    return first.stride(0), first.stride(1)


@dataclass(frozen=True)
class Blocks:
    """Tile sizes of a GEMM launch (M x N output tile, K step) and its warps/stages."""

    m: int
    n: int
    k: int
    warps: int = 4
    stages: int = 3


def default_blocks(fp64: bool = False) -> Blocks:
    """Interpreter: 16-wide tiles (cheap, and tiny test shapes still span several tiles).
    GPU: 64 x 64 x 32 fp32 tiles (32 x 32 x 16 for fp64 Gram tiles, which need twice the registers)."""
    if interpreting():
        return Blocks(16, 16, 16)
    if fp64:
        return Blocks(32, 32, 16, warps=4, stages=2)
    return Blocks(64, 64, 32, warps=4, stages=3)
