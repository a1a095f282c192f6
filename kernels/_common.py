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
from typing import Any

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


def pointer_tables(rows: dict[str, Sequence[Tensor] | Tensor], device: torch.device) -> dict[str, Tensor]:
    """Pointer arrays for one batched launch (or two), built as ONE host table and copied at once (``host_table``):
    each row is a list of tensors (one pointer per member) or a stacked buffer whose first-dim slices are the
    members (their addresses computed, no ``unbind``). Returns each row by name, a view of the device table."""
    names = list(rows)
    values = []
    for name in names:
        ts = rows[name]
        if isinstance(ts, Tensor):
            step = ts.stride(0) * ts.element_size()
            values.append([ts.data_ptr() + i * step for i in range(ts.shape[0])])
        else:  # tensors, or plain integers stored as they are (a seeded projection's seed)
            values.append([t if isinstance(t, int) else t.data_ptr() for t in ts])
    table = host_table(values, torch.int64, device)
    return dict(zip(names, table.unbind(0), strict=True))


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


# Every launch passes ``enable_fp_fusion`` explicitly (Triton 3.9 defaults it on and warns that 3.10 turns it
# off): off. What the flag decides is whether LLVM/ptxas may contract a separate ``a * b + c`` into one FMA.
# ``tl.dot`` is not affected: its CUDA-core (ieee) lowering emits explicit fma instructions either way
# (checked on the SASS: the FFMA count of the GEMM loop is the same with the flag on and off), and TF32 runs
# on mma/wgmma. So the flag only touches the epilogues (Adam's moments, the weight update, the Philox
# Box-Muller of the in-kernel Gaussian), and there the interpreter, which the CPU tests run, never
# contracts: with fusion off a GPU rounds every product and sum as the interpreter does, the Gaussian a
# sketch generates stays the one ``refresh.gaussian`` materializes, and no result depends on Triton's default.
FP_FUSION = False


def tile_options(blocks: Blocks) -> dict[str, Any]:
    """The part every GEMM launch's config shares: its tiles as constexprs (``BM``, ``BN``, ``BK``, grouped
    ``GROUP_M`` = 8 tile rows), its warps and stages, and ``enable_fp_fusion`` (``FP_FUSION``)."""
    return dict(
        BM=blocks.m,
        BN=blocks.n,
        BK=blocks.k,
        GROUP_M=8,
        num_warps=blocks.warps,
        num_stages=blocks.stages,
        enable_fp_fusion=FP_FUSION,
    )


def default_blocks(fp64: bool = False, *, precision: str = "ieee", interpreted: bool | None = None) -> Blocks:
    """The tiles of every GEMM launch unless a caller passes its own ``blocks``.

    Interpreter: 16-wide tiles (cheap, and tiny test shapes still span several tiles); ``interpreted``
    None means whether ``TRITON_INTERPRET`` is set now (``aot`` asks for the GPU's tiles explicitly).

    GPU: 64 x 64 fp32 output tiles on 8 warps, K steps of 16 for ieee dots and 32 for TF32; fp64 Gram tiles
    32 x 32 x 16 on 4 warps. Chosen by proxy: no GPU has been lent, so nothing here is timed; the choice
    comes from the ahead-of-time sweep's register and spill counts (``python -m subspace_optim.kernels.aot``,
    ptxas for sm_80 and sm_90). With the former 64 x 64 x 32 on 4 warps, 32 accumulators per thread plus the
    step's fp32 epilogue (moments, N, 64-bit offsets) ran most step variants at 255 registers with spills,
    the back-projection of an fp32 weight with a bf16 basis spilled ~0.9 KB, the cold sketch's in-kernel
    Gaussian ~1 KB, and ptxas fell into 32-register allocations with 9-12 KB of spill stores for the ieee
    projection with one fp32 and one bf16 operand. 8 warps halve the per-thread tile; an ieee dot runs on
    CUDA cores and holds its A and B fragments in registers, so its K step is halved too (TF32 dots run on
    tensor cores, mma/wgmma, and did not need it). Every default-path variant then compiles without spills
    or with at most a few dozen bytes (8-bit moments), on both targets; see docs/kernels.md. Resident warps
    per SM stay the same (one 8-warp block of up to 255 registers instead of two 4-warp blocks of 255); the
    speed of these tiles is still to be measured on a GPU. The GPU tiles do not change the interpreter's
    numbers: it always runs 16-wide tiles."""
    if interpreting() if interpreted is None else interpreted:
        return Blocks(16, 16, 16)
    if fp64:
        return Blocks(32, 32, 16, warps=4, stages=2)
    return Blocks(64, 64, 16 if precision == "ieee" else 32, warps=8, stages=3)
