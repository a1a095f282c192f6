"""Shared host helpers for the Triton kernels: pointer arrays, block sizes, dtype mapping.

Batched launches address a group of same-shape matrices through an int64 array of data pointers, so
separate parameter tensors (never stacked, never copied) are processed by one launch with a grid axis
over the group. Only same-shape, same-dtype, same-stride tensors may share an array.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton.language as tl
from torch import Tensor

from ..quant import dynamic_map, num_blocks
from ..triton_runtime import interpreting

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def tl_dtype(dtype: torch.dtype) -> tl.dtype:
    """The Triton element type of a supported tensor dtype (fp32, bf16, fp16)."""
    try:
        return _TL_DTYPES[dtype]
    except KeyError:
        raise TypeError(f"unsupported dtype for the Triton engine: {dtype}") from None


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` the current CUDA device for a launch: Triton launches on (and takes the stream of)
    ``torch.cuda.current_device()``, not on its tensors' device. A no-op for CPU tensors (interpreter)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def host_table(values: Sequence, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small host-built table (pointers, hyperparameters, seeds) on ``device``.

    On CUDA it is built in pinned memory and copied with ``non_blocking=True``: the copy is queued on the
    current stream ahead of the launch that reads it, and the host does not wait for it (a copy from
    pageable memory would block). PyTorch's caching host allocator keeps the pinned block alive until the
    copy has run. Call it under ``device_guard(device)`` so that the copy and the launch share a stream.
    """
    table = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return table.to(device)
    return table.pin_memory().to(device, non_blocking=True)


def pointer_array(tensors: list[Tensor], device: torch.device) -> Tensor:
    """An int64 tensor of the tensors' data pointers on ``device`` (see ``host_table``)."""
    return host_table([t.data_ptr() for t in tensors], torch.int64, device)


# How a moment is stored, as the step kernel's M_KIND / V_KIND constants (``quant.stored_kind``).
MOMENT_FP32, MOMENT_BF16, MOMENT_INT8 = 0, 1, 2


def moment_kind(values: Tensor, absmax: Tensor | None, what: str) -> int:
    """The storage kind of one moment: int8 codes (uint8, with an fp32 absmax of shape (rows, ceil(cols /
    256))), bf16 or fp32."""
    if absmax is not None:
        rows, cols = values.shape
        blocks = num_blocks(cols)
        if values.dtype != torch.uint8 or absmax.dtype != torch.float32 or tuple(absmax.shape) != (rows, blocks):
            raise TypeError(
                f"{what}: 8-bit state needs uint8 codes and an fp32 absmax of shape {(rows, blocks)}; got "
                f"{values.dtype} codes and a {absmax.dtype} absmax of shape {tuple(absmax.shape)}"
            )
        return MOMENT_INT8
    if values.dtype == torch.float32:
        return MOMENT_FP32
    if values.dtype == torch.bfloat16:
        return MOMENT_BF16
    raise TypeError(f"{what}: moments must be fp32, bf16, or uint8 codes with an absmax; got {values.dtype}")


@functools.lru_cache(maxsize=8)
def code_table(signed: bool, device: torch.device) -> Tensor:
    """The 8-bit dynamic map (256 fp32 values, ``quant.dynamic_map``) followed by its 255 midpoints
    ``(map[1:] + map[:-1]) / 2``, computed in fp32 exactly as ``quant.quantize`` does, and one pad: 512
    values on ``device``. Built once per (map, device)."""
    values = dynamic_map(signed)
    mids = (values[1:] + values[:-1]) / 2
    return torch.cat([values, mids, values.new_zeros(1)]).to(device)


def check_writable(t: Tensor, what: str) -> None:
    """Refuse a 2-D output whose elements could share memory (a stride of 0, or rows overlapping columns),
    as torch's in-place ops do: tiles written in parallel would race. Any non-overlapping strides, row- or
    column-major, sliced or transposed, are fine."""
    if t.numel() == 0:
        return
    (s_in, n_in), (s_out, n_out) = sorted(zip(t.stride(), t.shape, strict=True))
    extent_in = (n_in - 1) * s_in + 1  # memory span of one run along the inner (smaller-stride) dimension
    if (n_in > 1 and s_in < 1) or (n_out > 1 and s_out < extent_in):
        raise ValueError(f"{what}: shape {tuple(t.shape)} with strides {t.stride()} overlaps itself in memory")


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
