"""Fast subspace refresh: randomized range finder / warm subspace iteration with GEMM kernels.

For A = G (left basis) or G^T (right basis), d x c, and k = rank + oversample columns:

    cold:  Y = A Omega                          (Omega c x k, generated inside the GEMM, never stored)
    warm:  Y = A A^T [P_old | Omega' / sqrt(d)] (Omega' d x oversample, generated inside the GEMM)
    then power iterations Y <- A (A^T orth(Y)), Q = orth(Y), and Rayleigh-Ritz (every A^T product that
    feeds another product with A is divided by ||A||_F, so nothing overflows for a huge finite gradient):
    B = A^T Q, B^T B = W diag(lambda) W^T (fp64 eigh, k x k), P = Q W[:, :rank], captured = sum lambda[:rank].

orth is CholeskyQR2 from two kernels (the fp64 Gram Y^T Y and the product Y R^-1) with the k x k
Cholesky on the host, a shifted CholeskyQR3 retry and a Householder fallback (as linalg.orthonormalize).
The reference warm start orthonormalizes [P_old | Omega'] before multiplying; here the Gaussian columns
are scaled to unit expected norm instead, which spans the same subspace (A A^T is linear) without
materializing Omega'. The Gaussians differ from ``linalg.gaussian``'s (Philox in the kernel vs torch's
generator), so bases agree with the reference as subspaces, not bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..linalg import inverse_norm
from ._common import Blocks, check_same_layout, default_blocks, device_guard, host_table, pointer_array, tl_dtype
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


def bmm(
    a: Mat,
    b: Mat | None,
    out: Tensor,
    *,
    seeds: Tensor | None = None,
    b_stored: int | None = None,
    gauss_scale: float = 1.0,
    precision: str = "ieee",
    blocks: Blocks | None = None,
) -> Tensor:
    """out[i] = A_i @ B_i for a stacked ``out`` (batch, M, N) in fp32 or fp64 (fp64: exact-product Gram).

    With ``seeds`` (int64, one per member), B's columns from ``b_stored`` on (all of them if ``b`` is
    None) are the in-kernel Gaussian, column c of that part, row k, drawn at counter k * width + c.
    """
    batch, m, n = out.shape
    fp64 = out.dtype == torch.float64
    blocks = blocks or default_blocks(fp64)
    if b is None:
        b = Mat(a.ptrs, a.cols, 0, 0, 0, a.dtype)
        b_stored = 0
    if a.cols != b.rows or a.rows != m or b.cols != (n if b_stored is None else b_stored):
        raise ValueError(f"bmm shapes: ({a.rows} x {a.cols}) @ ({b.rows} x {b.cols}) -> {tuple(out.shape)}")
    gauss = seeds is not None
    stored = n if b_stored is None else b_stored
    if gauss and (b.rows * (n - stored)) >= 2**31:
        raise ValueError("sketch too large for 32-bit Philox counters")
    grid = (triton.cdiv(m, blocks.m) * triton.cdiv(n, blocks.n), batch)
    with device_guard(out.device):
        if seeds is None:
            seeds = torch.zeros(batch, dtype=torch.int64, device=out.device)
        batched_gemm_kernel[grid](
            a.ptrs, b.ptrs, pointer_array(list(out.unbind(0)), out.device), seeds,
            m, n, a.cols, a.s0, a.s1, b.s0, b.s1, out.stride(1), out.stride(2),
            stored, n - stored, gauss_scale,
            A_DT=tl_dtype(a.dtype), B_DT=tl_dtype(b.dtype), C_DT=tl.float64 if fp64 else tl.float32,
            GAUSS=gauss, FP64=fp64, PRECISION=precision, BM=blocks.m, BN=blocks.n, BK=blocks.k, GROUP_M=8,
            num_warps=blocks.warps, num_stages=blocks.stages,
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
    block = 1024
    with device_guard(out.device):
        gaussian_kernel[(triton.cdiv(rows * cols, block),)](out, seed, rows, cols, BLOCK=block)
    return out


def _cholesky_qr(y: Tensor, shift: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One batched CholeskyQR pass Q = Y R^-1, R^T R = Y^T Y (+ shift I); returns Q and per-member ok."""
    batch, _, k = y.shape
    h = gram(y)
    if shift is not None:
        h.diagonal(dim1=-2, dim2=-1).add_(shift[:, None])
    chol, info = torch.linalg.cholesky_ex(h)
    ok = info == 0
    eye = torch.eye(k, dtype=h.dtype, device=h.device).expand(batch, k, k)
    chol = torch.where(ok[:, None, None], chol, eye)  # failed members get a harmless R; they are redone
    r_inv = torch.linalg.solve_triangular(chol, eye, upper=False).mT.float().contiguous()
    q = bmm(Mat.of(list(y.unbind(0))), Mat.of(list(r_inv.unbind(0))), torch.empty_like(y))
    return q, ok & torch.isfinite(q).flatten(1).all(dim=1)


def _orthonormalize_hard(y: Tensor) -> Tensor:
    """The slow path for one member (1, d, k): shifted CholeskyQR3, then Householder. A non-finite Y gives a
    NaN Q (the caller keeps the previous basis then, as ``reference.compute_basis`` does) rather than the
    LinAlgError that the spectral norm would raise."""
    _, d, k = y.shape
    if not bool(torch.isfinite(y).all()):
        return torch.full_like(y, float("nan"))
    norm2 = float(torch.linalg.matrix_norm(y[0].double(), ord=2)) ** 2
    if 0.0 < norm2 < float("inf"):
        shift = 11.0 * (d * k + k * (k + 1)) * torch.finfo(torch.float64).eps * norm2
        q, ok = _cholesky_qr(y, torch.full((1,), shift, dtype=torch.float64, device=y.device))
        for _ in range(2):
            if not bool(ok.all()):
                break
            q, ok = _cholesky_qr(q)
        if bool(ok.all()):
            return q
    q, _ = torch.linalg.qr(y[0].double())
    return q.float()[None]


def orthonormalize(y: Tensor) -> Tensor:
    """Orthonormal bases of span(Y_i) for a stacked fp32 Y (batch, d, k), d >= k: batched CholeskyQR2,
    and members whose Gram matrix is not positive definite take the shifted / Householder path."""
    if y.shape[1] < y.shape[2]:
        raise ValueError(f"orthonormalize needs tall matrices, got {y.shape[1]} x {y.shape[2]}")
    with device_guard(y.device):
        q1, ok1 = _cholesky_qr(y)
        q, ok2 = _cholesky_qr(q1)
        ok = (ok1 & ok2).tolist()
        for i, good in enumerate(ok):
            if not good:
                q[i] = _orthonormalize_hard(y[i : i + 1].clone())[0]
    return q


def _range_finder(
    gs: list[Tensor],
    side: str,
    rank: int,
    oversample: int,
    power_iters: int,
    seeds: list[int],
    previous: list[Tensor] | None,
    precision: str,
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """One batch of same-layout gradients; see the module docstring for the math."""
    dev = gs[0].device
    batch = len(gs)
    a = Mat.of(gs)
    if side == "right":
        a = a.t
    d, c = a.rows, a.cols
    seed_t = host_table(seeds, torch.int64, dev)
    mm = dict(precision=precision)
    totals = [torch.linalg.vector_norm(g, dtype=torch.float64).square() for g in gs]
    # The c x k middle products are divided by ||A||_F per member, as in linalg.range_finder_basis.
    inv_norm = inverse_norm(torch.stack(totals))[:, None, None]
    if previous is None:
        k = min(rank + oversample, d, c)
        y = bmm(a, None, torch.empty(batch, d, k, device=dev), seeds=seed_t, **mm)
        iterations = power_iters
    else:
        r0 = previous[0].shape[1]
        k = min(r0 + oversample, d)
        start = Mat.of(previous)
        if start.rows != d:
            raise ValueError(f"previous basis has {start.rows} rows, the gradient needs {d}")
        z = bmm(a.t, start, torch.empty(batch, c, k, device=dev), seeds=seed_t, b_stored=r0, gauss_scale=d**-0.5, **mm)
        z.mul_(inv_norm)
        y = bmm(a, Mat.of(list(z.unbind(0))), torch.empty(batch, d, k, device=dev), **mm)
        iterations = max(power_iters - 1, 0)
    z = torch.empty(batch, c, k, device=dev)
    for _ in range(iterations):
        q = orthonormalize(y)
        bmm(a.t, Mat.of(list(q.unbind(0))), z, **mm).mul_(inv_norm)
        bmm(a, Mat.of(list(z.unbind(0))), y, **mm)
    q = orthonormalize(y)
    bmm(a.t, Mat.of(list(q.unbind(0))), z, **mm)  # B = A^T Q
    evals, evecs = torch.linalg.eigh(gram(z))
    order = torch.argsort(evals, dim=-1, descending=True)[:, :rank]
    w = torch.gather(evecs, 2, order[:, None, :].expand(batch, k, rank)).float().contiguous()
    p = bmm(Mat.of(list(q.unbind(0))), Mat.of(list(w.unbind(0))), torch.empty(batch, d, rank, device=dev), **mm)
    captured = torch.gather(evals, 1, order).clamp_min(0).sum(dim=1)
    # own storage for P: state_dict saves views whole
    return [(p[i].clone(), captured[i].clone(), totals[i]) for i in range(batch)]


def refresh_batch(
    grads: Sequence[Tensor],
    sides: Sequence[str],
    rank: int | Sequence[int],
    *,
    oversample: int,
    power_iters: int,
    seeds: Sequence[int],
    previous: Sequence[Tensor | None] | None = None,
    input_precision: str = "ieee",
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """New bases for many gradients (``linalg.range_finder_basis`` semantics), batched by layout.

    Returns, per gradient and in order, (P, captured, total): P (d x rank, fp32, orthonormal columns),
    captured = ||P^T A||_F^2 and total = ||A||_F^2 as 0-d fp64 tensors (``linalg.Basis(*item)``).
    ``previous[i]`` (d x r, or None) selects a warm start for that matrix. Gradients that share side,
    shape, dtype, stride, rank and warm/cold are refreshed together: each GEMM is one launch per batch.
    """
    count = len(grads)
    ranks = [rank] * count if isinstance(rank, int) else list(rank)
    prevs = list(previous) if previous is not None else [None] * count
    if {len(sides), len(ranks), len(seeds), len(prevs)} != {count}:
        raise ValueError("refresh_batch: every argument list needs one entry per gradient")
    batches: dict[tuple, list[int]] = {}
    for i, g in enumerate(grads):
        prev = prevs[i]
        warm = None if prev is None else (tuple(prev.shape), prev.stride(), prev.dtype)
        key = (sides[i], g.device, tuple(g.shape), g.dtype, g.stride(), ranks[i], warm)
        batches.setdefault(key, []).append(i)
    results: list[tuple[Tensor, Tensor, Tensor] | None] = [None] * count
    for key, idx in batches.items():
        side, dev, rank_i, warm = key[0], key[1], key[5], key[6]
        with device_guard(dev):  # every launch, table copy and host-side factorization on the batch's device
            out = _range_finder(
                [grads[i] for i in idx],
                side,
                rank_i,
                oversample,
                power_iters,
                [int(seeds[i]) for i in idx],
                None if warm is None else [prevs[i].float() for i in idx],
                input_precision,
            )
        for i, item in zip(idx, out, strict=True):
            results[i] = item
    return results  # type: ignore[return-value]
