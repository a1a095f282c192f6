"""The step kernels' GEMM tile, whose basis operand is loaded or regenerated in registers.

A projected matrix's basis P (d x r) reaches a step launch in one of three ways (``BASIS``):

- ``BASIS_STORED``: loaded from memory through its strides, fp32 or bf16 (a stored basis, or a projection the host
  materialized: apollo-torch's Gaussian stream);
- ``BASIS_SIGNS``: a seeded projection regenerated inside the tile, entry (i, j) = +-scale from one bit of
  Philox(seed, (i r + j) >> 7) (``subspace_optim.philox``, whose torch twin draws the same bits): the projection
  never exists in memory;
- ``BASIS_DCT``: DCT columns gathered inside the tile, P[i, j] = D[i, idx[j]] from the d x d table every matrix of
  that size shares (``subspace_optim.dct``): the step reads r indices instead of a d x r basis.

The launch's pointer array for the basis role holds, per member, the basis's address, its seed, or the address of
its int32 column indices (``basis_source``). Which operand is the basis and whether it appears transposed are
constexprs of the launch (P^T G and P N for a left basis, G P and N P^T for a right one).
"""

from __future__ import annotations

import triton
import triton.language as tl

BASIS_STORED, BASIS_SIGNS, BASIS_DCT = 0, 1, 2


@triton.jit
def basis_source(ptr, DT: tl.constexpr, BASIS: tl.constexpr):
    """What a member's entry of the basis pointer array means: its basis (a pointer to ``DT``), its seed (an
    int64), or its column indices (a pointer to int32)."""
    raw = tl.load(ptr)
    if BASIS == 1:
        src = raw
    elif BASIS == 2:
        src = raw.to(tl.pointer_type(tl.int32))
    else:
        src = raw.to(tl.pointer_type(DT))
    return src


@triton.jit
def regenerated_tile(src, table, scale, di, ki, ok, D, R, BASIS: tl.constexpr):
    """P[di, ki] for broadcastable index grids ``di`` (rows, < D) and ``ki`` (columns, < R), zero outside ``ok``."""
    if BASIS == 1:
        o = di * R + ki
        c0, c1, c2, c3 = tl.randint4x(src, (o >> 7).to(tl.int32))
        w = (o >> 5) & 3
        word = tl.where(w == 0, c0, tl.where(w == 1, c1, tl.where(w == 2, c2, c3)))
        bit = (word >> (o & 31).to(tl.uint32)) & 1
        val = tl.where(bit == 0, scale, -scale)
    else:
        col = tl.load(src + ki, mask=ki < R, other=0)
        val = tl.load(table + di * D + col, mask=ok, other=0.0)
    return tl.where(ok, val, 0.0)


@triton.jit
def step_dot(
    a, b, table, scale, rm, rn,
    M, N, K,
    sa0, sa1, sb0, sb1,
    BASIS: tl.constexpr, P_IS_A: tl.constexpr, P_T: tl.constexpr, SQ: tl.constexpr, SQ_OF_B: tl.constexpr,
    PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """acc = A[rm, :] @ B[:, rn] over K in fp32, masked for ragged edges, with the basis operand (A when P_IS_A,
    else B; P^T when P_T) regenerated unless BASIS is stored; with SQ, also the sums of squares of the gradient's
    entries along K while its tiles pass through registers: the columns of B (SQ_OF_B: G is B, a left basis) or
    the rows of A (a right one), which give ||G_j||^2 per channel without another read of G.

    The basis's sizes follow from its role: P^T as A is R x D (M x K), P as A is D x R, P as B is D x R (K x N),
    P^T as B is R x D."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    # One accumulator whose length the constexpr picks, and one return: Triton's code generator type-checks
    # every return statement, so returning a [BN] sum in one branch and a [BM] sum after it failed to compile
    # whenever BM != BN (8-bit moments), although the interpreter ran it.
    sq = tl.zeros((BN if SQ_OF_B else BM,), dtype=tl.float32)
    rk0 = tl.arange(0, BK)
    m_ok = rm < M
    n_ok = rn < N
    for k0 in range(0, K, BK):
        rk = k0 + rk0
        k_ok = rk < K
        a_mask = m_ok[:, None] & k_ok[None, :]
        b_mask = k_ok[:, None] & n_ok[None, :]
        if BASIS != 0 and P_IS_A:
            if P_T:  # A = P^T: rows are P's columns
                a_tile = regenerated_tile(a, table, scale, rk[None, :], rm[:, None], a_mask, K, M, BASIS)
            else:
                a_tile = regenerated_tile(a, table, scale, rm[:, None], rk[None, :], a_mask, M, K, BASIS)
        else:
            a_tile = tl.load(a + rm[:, None] * sa0 + rk[None, :].to(tl.int64) * sa1, mask=a_mask, other=0.0).to(
                tl.float32
            )
        if BASIS != 0 and not P_IS_A:
            if P_T:  # B = P^T: columns are P's rows
                b_tile = regenerated_tile(b, table, scale, rn[None, :], rk[:, None], b_mask, N, K, BASIS)
            else:
                b_tile = regenerated_tile(b, table, scale, rk[:, None], rn[None, :], b_mask, K, N, BASIS)
        else:
            b_tile = tl.load(b + rk[:, None].to(tl.int64) * sb0 + rn[None, :] * sb1, mask=b_mask, other=0.0).to(
                tl.float32
            )
        if SQ:
            if SQ_OF_B:
                sq += tl.sum(b_tile * b_tile, axis=0)
            else:
                sq += tl.sum(a_tile * a_tile, axis=1)
        acc = tl.dot(a_tile, b_tile, acc, input_precision=PRECISION)
    return acc, sq
