"""The refresh's products as Triton GEMMs: ``linalg.range_finder`` and CholeskyQR run on these.

The algorithm (randomized range finder, warm subspace iteration, CholeskyQR2 with its shifted and
Householder fallbacks, Rayleigh-Ritz) is written once, in ``subspace_optim.linalg``, over a ``Products``
object; this module supplies a subclass whose products are batched, strided GEMM launches over pointer
arrays: same-layout gradients of a batch are never stacked or copied, a transpose is a stride swap, the
cold sketch A Omega generates Omega inside the GEMM (a counter-based Philox Gaussian, never stored), and the
CholeskyQR Gram matrices Y^T Y are exact-product fp64 GEMMs. The k x k factorizations stay in torch.

The Gaussians differ from ``linalg.gaussian``'s (Philox in the kernel vs torch's generator), so bases
agree with the reference as subspaces, not bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import linalg
from ._common import (
    FP_FUSION,
    Blocks,
    check_same_layout,
    default_blocks,
    device_guard,
    host_table,
    pointer_array,
    tile_options,
    tl_dtype,
)
from .gemm import batched_gemm_kernel, gaussian_kernel


@dataclass(frozen=True)
class Mat:
    """A batch of same-layout matrices seen through a pointer array: element (i, j) of member b is at
    ptrs[b] + i * s0 + j * s1. ``t`` is the transpose (a stride swap)."""

    ptrs: Tensor
    rows: int
    cols: int
    s0: int
    s1: int
    dtype: torch.dtype

    @staticmethod
    def of(tensors: Sequence[Tensor]) -> Mat:
        tensors = list(tensors)
        s0, s1 = check_same_layout(tensors, "operand")
        rows, cols = tensors[0].shape
        return Mat(pointer_array(tensors, tensors[0].device), rows, cols, s0, s1, tensors[0].dtype)

    @property
    def t(self) -> Mat:
        return replace(self, rows=self.cols, cols=self.rows, s0=self.s1, s1=self.s0)


def gemm_config(
    a_dtype: torch.dtype,
    b_dtype: torch.dtype | None,
    fp64: bool,
    precision: str,
    blocks: Blocks | None = None,
    *,
    interpreted: bool | None = None,
) -> dict[str, Any]:
    """``batched_gemm_kernel``'s constexprs and launch options (``b_dtype`` None: B is the in-kernel
    Gaussian; ``fp64``: an exact-product fp64 Gram matrix). The one place they are chosen: ``bmm`` launches
    with them and ``aot`` compiles every combination the refresh can ask for."""
    if blocks is None:
        blocks = default_blocks(fp64, precision=precision, interpreted=interpreted)
    return dict(
        A_DT=tl_dtype(a_dtype),
        B_DT=tl_dtype(a_dtype if b_dtype is None else b_dtype),
        C_DT=tl.float64 if fp64 else tl.float32,
        GAUSS=b_dtype is None,
        FP64=fp64,
        PRECISION=precision,
        **tile_options(blocks),
    )


def gaussian_config() -> dict[str, Any]:
    """``gaussian_kernel``'s constexprs and launch options: fp fusion as in ``batched_gemm_kernel``, whose
    in-kernel Gaussian must be these very numbers."""
    return dict(BLOCK=1024, num_warps=4, enable_fp_fusion=FP_FUSION)


def bmm(
    a: Mat,
    b: Mat | None,
    out: Tensor,
    *,
    seeds: Tensor | None = None,
    precision: str = "ieee",
    blocks: Blocks | None = None,
) -> Tensor:
    """out[i] = A_i @ B_i for a stacked ``out`` (batch, M, N) in fp32 or fp64 (fp64: exact-product Gram).

    With ``b`` None and ``seeds`` (int64, one per member), B is the in-kernel Gaussian: row k, column c
    drawn at counter k * N + c (``gaussian`` materializes the same numbers).
    """
    batch, m, n = out.shape
    fp64 = out.dtype == torch.float64
    gauss = b is None
    if gauss:
        if seeds is None:
            raise ValueError("bmm: a generated (Gaussian) B needs seeds")
        b = Mat(a.ptrs, a.cols, n, 0, 0, a.dtype)
    if a.cols != b.rows or a.rows != m or b.cols != n:
        raise ValueError(f"bmm shapes: ({a.rows} x {a.cols}) @ ({b.rows} x {b.cols}) -> {tuple(out.shape)}")
    if gauss and b.rows * n >= 2**31:
        raise ValueError("sketch too large for 32-bit Philox counters")
    cfg = gemm_config(a.dtype, None if gauss else b.dtype, fp64, precision, blocks)
    grid = (triton.cdiv(m, cfg["BM"]) * triton.cdiv(n, cfg["BN"]), batch)
    with device_guard(out.device):
        if seeds is None:
            seeds = torch.zeros(batch, dtype=torch.int64, device=out.device)
        batched_gemm_kernel[grid](
            a.ptrs, b.ptrs, pointer_array(list(out.unbind(0)), out.device), seeds,
            m, n, a.cols, a.s0, a.s1, b.s0, b.s1, out.stride(1), out.stride(2),
            **cfg,
        )  # fmt: skip
    return out


def gram(y: Tensor) -> Tensor:
    """Y_i^T Y_i in fp64 for a stacked fp32 Y (batch, d, k): the CholeskyQR Gram matrices, one launch."""
    batch, _, k = y.shape
    with device_guard(y.device):
        ym = Mat.of(list(y.unbind(0)))
        return bmm(ym.t, ym, torch.empty(batch, k, k, dtype=torch.float64, device=y.device))


def gaussian(rows: int, cols: int, seed: int, device: torch.device | str = "cpu") -> Tensor:
    """The rows x cols Gaussian that a sketch with ``seed`` uses, materialized (for tests and debugging).

    Entry (i, j) is Philox randn(seed, i * cols + j), exactly what the GEMM kernel generates in place.
    """
    out = torch.empty(rows, cols, dtype=torch.float32, device=device)
    cfg = gaussian_config()
    with device_guard(out.device):
        gaussian_kernel[(triton.cdiv(rows * cols, cfg["BLOCK"]),)](out, seed, rows, cols, **cfg)
    return out


class KernelProducts(linalg.Products):
    """``linalg.Products`` for a batch of same-layout gradients G_b, with A_b = G_b (left) or G_b^T (right)."""

    def __init__(
        self,
        grads: Sequence[Tensor],
        side: str,
        seeds: Sequence[int],
        precision: str = "ieee",
        device: torch.device | None = None,
    ) -> None:
        """No ``grads`` (then ``device`` is needed): only the small products, for ``orthonormalize``."""
        self.mats = list(grads)
        self.seeds = [int(s) for s in seeds]
        self.slab = linalg.UNSHARDED
        self.device = self.mats[0].device if self.mats else device
        if self.mats:
            a = Mat.of(self.mats)
            self.matrix = a.t if side == "right" else a
            self.seed_table = host_table(self.seeds, torch.int64, self.device)
        self.precision = precision

    @property
    def rows(self) -> int:
        return self.matrix.rows

    @property
    def columns(self) -> int:
        return self.matrix.cols

    def _out(self, rows: int, cols: int, batch: int | None = None) -> Tensor:
        batch = len(self.mats) if batch is None else batch
        return torch.empty(batch, rows, cols, dtype=torch.float32, device=self.device)

    def energy(self) -> Tensor:
        return torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64).square() for g in self.mats])

    def sketch(self, k: int) -> Tensor:
        return bmm(self.matrix, None, self._out(self.rows, k), seeds=self.seed_table, precision=self.precision)

    def gaussian(self, rows: int, cols: int) -> Tensor:
        return torch.stack([gaussian(rows, cols, seed, self.device) for seed in self.seeds])

    def at(self, q: Tensor) -> Tensor:
        return bmm(self.matrix.t, _stacked(q), self._out(self.columns, q.shape[2]), precision=self.precision)

    def a(self, z: Tensor) -> Tensor:
        return bmm(self.matrix, _stacked(z), self._out(self.rows, z.shape[2]), precision=self.precision)

    def mm(self, x: Tensor, y: Tensor) -> Tensor:
        out = self._out(x.shape[1], y.shape[2], x.shape[0])
        return bmm(_stacked(x), _stacked(y), out, precision=self.precision)

    def gram64(self, y: Tensor) -> Tensor:
        return gram(y)


def orthonormalize(y: Tensor) -> Tensor:
    """``linalg.orthonormalize`` of a stacked Y (batch, d, k) with the Gram matrices and Y R^-1 on the kernels."""
    with device_guard(y.device):
        return linalg.orthonormalize(y, KernelProducts([], "left", [], device=y.device))


def _stacked(t: Tensor) -> Mat:
    return Mat.of(list(t.unbind(0)))


def refresh_bases(
    grads: Sequence[Tensor],
    previous: Sequence[Tensor | None],
    seeds: Sequence[int],
    *,
    sides: Sequence[str],
    rank: int,
    oversample: int,
    power_iters: int,
    matmul_precision: str = "ieee",
) -> list[linalg.Basis]:
    """The Triton twin of ``functional.refresh_bases`` for the ``warm``/``rsvd`` policies (``previous[i]``
    None: a cold refresh). Gradients sharing side, shape, dtype, stride and warm/cold are one batch: each
    product is one launch per batch. Bases may be non-finite; the caller applies the refresh fallback."""
    count = len(grads)
    if {len(previous), len(seeds), len(sides)} != {count}:
        raise ValueError("refresh_bases: every argument list needs one entry per gradient")
    batches: dict[tuple, list[int]] = {}
    for i, g in enumerate(grads):
        prev = previous[i]
        warm = None if prev is None else (tuple(prev.shape), prev.stride(), prev.dtype)
        batches.setdefault((sides[i], g.device, tuple(g.shape), g.dtype, g.stride(), warm), []).append(i)
    results: list[linalg.Basis | None] = [None] * count
    for (side, dev, *_rest, warm), idx in batches.items():
        with device_guard(dev):  # every launch, table copy and host-side factorization on the batch's device
            products = KernelProducts([grads[i] for i in idx], side, [seeds[i] for i in idx], matmul_precision)
            start = None if warm is None else torch.stack([previous[i].float() for i in idx])
            out = linalg.range_finder(products, rank, oversample=oversample, power_iters=power_iters, start=start)
        for i, item in zip(idx, out, strict=True):
            results[i] = item
    return results  # type: ignore[return-value]
