"""Batched, strided GEMM building blocks shared by the step and refresh kernels.

Every operand is addressed as ``base + row * s0 + col * s1`` with ``base`` read from a pointer array
indexed by the batch member (grid axis 1), so a transpose is a stride swap and nothing is copied.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .precompile import jit


@triton.jit
def tile_ids(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M row-tiles share their column tiles in L2 before moving on."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BM)
    tiles_n = tl.cdiv(N, BN)
    per_group = GROUP_M * tiles_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def dot_tile(
    a, b, seed, rm, rn,
    M, N, K,
    sa0, sa1, sb0, sb1,
    GAUSS: tl.constexpr, FP64: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """acc = A[rm, :] @ B[:, rn] over K, in fp32 (or fp64 when FP64); masked for ragged edges.

    With GAUSS, B (K x N) is not loaded but generated: B[k, j] = randn(seed, k * N + j), a counter-based
    Philox Gaussian, so the sketch matrix is never stored.
    """
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    acc = tl.zeros((BM, BN), dtype=ACC)
    rk0 = tl.arange(0, BK)
    m_ok = rm < M
    n_ok = rn < N
    for k0 in range(0, K, BK):
        rk = k0 + rk0
        k_ok = rk < K
        a_tile = tl.load(
            a + rm[:, None] * sa0 + rk[None, :].to(tl.int64) * sa1, mask=m_ok[:, None] & k_ok[None, :], other=0.0
        ).to(ACC)
        b_mask = k_ok[:, None] & n_ok[None, :]
        if GAUSS:
            noise = tl.randn(seed, (rk[:, None] * N + rn[None, :]).to(tl.int32)).to(ACC)
            b_tile = tl.where(b_mask, noise, 0.0)
        else:
            b_tile = tl.load(b + rk[:, None].to(tl.int64) * sb0 + rn[None, :] * sb1, mask=b_mask, other=0.0).to(ACC)
        if FP64:
            acc = tl.dot(a_tile, b_tile, acc, input_precision="ieee")
        else:
            acc = tl.dot(a_tile, b_tile, acc, input_precision=PRECISION)
    return acc


@jit
def batched_gemm_kernel(
    a_ptrs, b_ptrs, c_ptrs, seeds,
    M, N, K,
    sa0, sa1, sb0, sb1, sc0, sc1,
    A_DT: tl.constexpr, B_DT: tl.constexpr, C_DT: tl.constexpr, GAUSS: tl.constexpr, FP64: tl.constexpr,
    PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """C_b = A_b @ B_b for every member b of the batch (grid axis 1); B may carry in-kernel Gaussian
    columns (see ``dot_tile``). With FP64 the fp32 inputs are widened before the dot, so C = Y^T Y is
    the exact-product fp64 Gram matrix that CholeskyQR needs."""
    bid = tl.program_id(1)
    pid_m, pid_n = tile_ids(M, N, BM, BN, GROUP_M)
    a = tl.load(a_ptrs + bid).to(tl.pointer_type(A_DT))
    b = tl.load(b_ptrs + bid).to(tl.pointer_type(B_DT))
    c = tl.load(c_ptrs + bid).to(tl.pointer_type(C_DT))
    seed = tl.load(seeds + bid)
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    rn = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    acc = dot_tile(a, b, seed, rm, rn, M, N, K, sa0, sa1, sb0, sb1, GAUSS, FP64, PRECISION, BM, BN, BK)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(c + rm[:, None] * sc0 + rn[None, :] * sc1, acc.to(C_DT), mask=mask)


@jit
def gaussian_kernel(out, seed, rows, cols, BLOCK: tl.constexpr):
    """out[i, j] = randn(seed, i * cols + j): the exact numbers ``dot_tile`` generates for a sketch."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < rows * cols
    tl.store(out + offs, tl.randn(seed, offs.to(tl.int32)), mask=ok)
