"""The fused projected-AdamW step: two batched GEMM launches per group of same-shape matrices.

Launch 1 (projection + moments), with R = P^T G (left) or G P (right):
    M <- b1 M + (1 - b1) R;   V <- b2 V + (1 - b2) R o R;   N = M / (sqrt(V) / sqrt(1 - b2^t) + eps)
Launch 2 (back-projection + weight update), with U = P N (left) or N P^T (right):
    W <- W (1 - lr wd) - (lr scale / (1 - b1^t)) U

R and U exist only tile by tile in registers; the only temporary is N, which has the moments' low-rank
shape. W (fp32, bf16 or fp16) is read and written once, rounded once.

Low-precision state (``quant``) is converted inside launch 1's epilogue, never through an fp32 copy in
memory: bf16 moments are widened on load and rounded to nearest even on store; 8-bit moments are
dequantized on load (map[code] * absmax) and requantized on store (a new absmax per 256-column block of a
row, then the nearest map value by a binary search over the map's midpoints). N is computed from the
fp32 new moments, before they are rounded, as the reference does. Bases may be fp32 or bf16 (widened to
fp32 on load).

With a ``residual`` (``inner.residual_factors``), launch 1 also keeps R and sums ||G_j||^2 per channel
inside its GEMM loop; torch folds the coefficients into N between the launches (N <- N - coef o R);
launch 2 adds coef o G in its epilogue (``apollo``: U = coef o G, no GEMM). No extra GEMM or pass over G.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..inner import adam_scalars, channel_dim, device_vector, first_ratios, lag_vectors, residual_factors
from ..quant import BLOCK
from ..triton_runtime import interpreting
from ._common import (
    FP_FUSION,
    MOMENT_INT8,
    Blocks,
    check_same_layout,
    check_writable,
    code_table,
    default_blocks,
    device_guard,
    host_table,
    moment_kind,
    pointer_tables,
    tl_dtype,
)
from .gemm import dot_tile, tile_ids
from .precompile import jit

# The per-member table holds ``inner.AdamScalars`` in field order (w1, b2, w2, eps, sqrt(1 - b2^t), alpha,
# decay), then a skip flag (nonzero: leave the member untouched; set on the device): one fp32 row of 8 per
# matrix of a batch.


@triton.jit
def round_bf16(x):
    """x rounded to the nearest bf16 value (ties to even), still as fp32: the interpreter's fp32 -> bf16
    cast truncates, the GPU's rounds; after this both casts are exact. NaN passes through."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(x == x, bits.to(tl.float32, bitcast=True), x)


@triton.jit
def load_moment(ptrs, absmax_ptrs, table, bid, rm, rn, pid_n, M, s0, s1, sq0, sq1, mask, KIND: tl.constexpr):
    """The fp32 working values of one moment tile (0 outside ``mask``). KIND: 0 fp32, 1 bf16, 2 int8 codes
    (dequantized as table[code] * absmax[row, block]; the tile's columns are one quantization block)."""
    off = rm[:, None] * s0 + rn[None, :] * s1
    if KIND == 2:
        codes = tl.load(tl.load(ptrs + bid).to(tl.pointer_type(tl.uint8)) + off, mask=mask, other=0)
        absmax_p = tl.load(absmax_ptrs + bid).to(tl.pointer_type(tl.float32))
        absmax = tl.load(absmax_p + rm * sq0 + pid_n * sq1, mask=rm < M, other=0.0)
        x = tl.where(mask, tl.load(table + codes.to(tl.int32)) * absmax[:, None], 0.0)
    elif KIND == 1:
        x = tl.load(tl.load(ptrs + bid).to(tl.pointer_type(tl.bfloat16)) + off, mask=mask, other=0.0)
        x = x.to(tl.float32)
    else:
        x = tl.load(tl.load(ptrs + bid).to(tl.pointer_type(tl.float32)) + off, mask=mask, other=0.0)
    return x


@triton.jit
def store_moment(ptrs, absmax_ptrs, table, bid, x, rm, rn, pid_n, M, s0, s1, sq0, sq1, mask, KIND: tl.constexpr):
    """Store fp32 moment values ``x`` in their storage kind (``load_moment``'s KIND), in place.

    int8 (``quant.quantize``): absmax = max |x| over the row's block (the tile's columns), normed = x / absmax
    (divisor 1 for an all-zero block), code = the number of midpoints m_j < normed (``torch.bucketize``:
    the nearest map value, ties to the smaller index), found by an 8-step binary search over the 255
    sorted midpoints at table[256:], one gather per step."""
    off = rm[:, None] * s0 + rn[None, :] * s1
    if KIND == 2:
        x = tl.where(mask, x, 0.0)
        absmax = tl.max(tl.abs(x), axis=1)
        normed = tl.div_rn(x, tl.where(absmax > 0.0, absmax, 1.0)[:, None])
        code = tl.zeros_like(x).to(tl.int32)
        for i in tl.static_range(8):
            step = 128 >> i
            mid = tl.load(table + 256 + code + (step - 1))
            code = tl.where(mid < normed, code + step, code)
        tl.store(tl.load(ptrs + bid).to(tl.pointer_type(tl.uint8)) + off, code.to(tl.uint8), mask=mask)
        absmax_p = tl.load(absmax_ptrs + bid).to(tl.pointer_type(tl.float32))
        tl.store(absmax_p + rm * sq0 + pid_n * sq1, absmax, mask=rm < M)
    elif KIND == 1:
        tl.store(tl.load(ptrs + bid).to(tl.pointer_type(tl.bfloat16)) + off, round_bf16(x).to(tl.bfloat16), mask=mask)
    else:
        tl.store(tl.load(ptrs + bid).to(tl.pointer_type(tl.float32)) + off, x, mask=mask)


@triton.jit
def dot_tile_sumsq(
    a,
    b,
    rm,
    rn,
    M,
    N,
    K,
    sa0,
    sa1,
    sb0,
    sb1,
    SQ_OF_B: tl.constexpr,
    PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """``gemm.dot_tile`` (fp32, loaded operands) that also sums the squares of the gradient operand's
    entries along K while its tiles pass through registers: the columns of B (SQ_OF_B: G is B, a left
    basis) or the rows of A (G is A, a right basis). That gives ||G_j||^2 per channel without another
    read of G."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    # One accumulator whose length the constexpr picks, and one return: Triton's code generator type-checks
    # every return statement, so returning a [BN] sum in one branch and a [BM] sum after it failed to
    # compile whenever BM != BN (8-bit moments), although the interpreter ran it.
    sq = tl.zeros((BN if SQ_OF_B else BM,), dtype=tl.float32)
    rk0 = tl.arange(0, BK)
    m_ok = rm < M
    n_ok = rn < N
    for k0 in range(0, K, BK):
        rk = k0 + rk0
        k_ok = rk < K
        a_tile = tl.load(
            a + rm[:, None] * sa0 + rk[None, :].to(tl.int64) * sa1, mask=m_ok[:, None] & k_ok[None, :], other=0.0
        ).to(tl.float32)
        b_tile = tl.load(
            b + rk[:, None].to(tl.int64) * sb0 + rn[None, :] * sb1, mask=k_ok[:, None] & n_ok[None, :], other=0.0
        ).to(tl.float32)
        if SQ_OF_B:
            sq += tl.sum(b_tile * b_tile, axis=0)
        else:
            sq += tl.sum(a_tile * a_tile, axis=1)
        acc = tl.dot(a_tile, b_tile, acc, input_precision=PRECISION)
    return acc, sq


@jit
def project_adam_kernel(
    a_ptrs,
    b_ptrs,
    m_ptrs,
    v_ptrs,
    n_ptrs,
    mq_ptrs,
    vq_ptrs,
    m_table,
    v_table,
    hyper,
    M,
    N,
    K,
    sa0,
    sa1,
    sb0,
    sb1,
    sm0,
    sm1,
    sv0,
    sv1,
    sn0,
    sn1,
    smq0,
    smq1,
    svq0,
    svq1,
    r_ptrs,
    sq_ptrs,
    A_DT: tl.constexpr,
    B_DT: tl.constexpr,
    M_KIND: tl.constexpr,
    V_KIND: tl.constexpr,
    RESID: tl.constexpr,
    SQ_OF_B: tl.constexpr,
    PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """R = A @ B (A = P^T, B = G for a left basis; A = G, B = P for a right one), then in the epilogue

        M <- M + (1 - b1) (R - M)                   (torch's lerp; = b1 M + (1 - b1) R)
        V <- b2 V + (1 - b2) R o R
        N  = M / (sqrt(V) / sqrt(1 - b2^t) + eps)

    in fp32, whatever the moments' storage (M_KIND / V_KIND, see ``load_moment``): they are loaded into
    registers as fp32, N is computed from the fp32 new values, and only then are the moments stored back
    in place (rounded to bf16, or requantized with a new absmax; for int8 the host makes each tile's
    columns exactly one quantization block, ``mq_ptrs``/``vq_ptrs`` are the absmax arrays and
    ``m_table``/``v_table`` the code tables of ``_common.code_table``). N is written in fp32 for the
    back-projection launch. M, V, N and the absmaxes each have their own strides (a checkpoint may
    restore column-major or sliced moments; N is a fresh buffer). Both divisions are IEEE
    round-to-nearest (``div_rn``): a plain ``/`` compiles to an approximate division on NVIDIA GPUs.

    With RESID (a ``residual`` other than "none") the epilogue also stores R (fp32, N's layout, at
    ``r_ptrs``), and the tiles of the first row (SQ_OF_B: G is B) or column (G is A) of the grid store
    ||G_j||^2 per channel (``sq_ptrs``), summed while G's tiles pass through the GEMM.

    A member whose ``hyper`` row has a nonzero skip flag (column 7: a non-finite gradient, decided on the
    device) returns at once, storing nothing: its moments keep their bits; its N (and R, sums) stay unset.
    """
    bid = tl.program_id(1)
    if tl.load(hyper + bid * 8 + 7) != 0.0:
        return
    pid_m, pid_n = tile_ids(M, N, BM, BN, GROUP_M)
    a = tl.load(a_ptrs + bid).to(tl.pointer_type(A_DT))
    b = tl.load(b_ptrs + bid).to(tl.pointer_type(B_DT))
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    rn = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    if RESID:
        r, sq = dot_tile_sumsq(a, b, rm, rn, M, N, K, sa0, sa1, sb0, sb1, SQ_OF_B, PRECISION, BM, BN, BK)
        sqp = tl.load(sq_ptrs + bid).to(tl.pointer_type(tl.float32))
        if SQ_OF_B:
            if pid_m == 0:
                tl.store(sqp + rn, sq, mask=rn < N)
        else:
            if pid_n == 0:
                tl.store(sqp + rm, sq, mask=rm < M)
    else:
        r = dot_tile(a, b, 0, rm, rn, M, N, K, sa0, sa1, sb0, sb1, False, False, PRECISION, BM, BN, BK)

    h = hyper + bid * 8
    w1 = tl.load(h + 0)
    b2 = tl.load(h + 1)
    w2 = tl.load(h + 2)
    eps = tl.load(h + 3)
    bc2 = tl.load(h + 4)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    m_old = load_moment(m_ptrs, mq_ptrs, m_table, bid, rm, rn, pid_n, M, sm0, sm1, smq0, smq1, mask, M_KIND)
    v_old = load_moment(v_ptrs, vq_ptrs, v_table, bid, rm, rn, pid_n, M, sv0, sv1, svq0, svq1, mask, V_KIND)
    m_new = tl.where(w1 < 0.5, m_old + w1 * (r - m_old), r - (r - m_old) * (1.0 - w1))
    v_new = v_old * b2 + w2 * (r * r)
    n = tl.div_rn(m_new, tl.div_rn(tl.sqrt_rn(v_new), bc2) + eps)
    store_moment(m_ptrs, mq_ptrs, m_table, bid, m_new, rm, rn, pid_n, M, sm0, sm1, smq0, smq1, mask, M_KIND)
    store_moment(v_ptrs, vq_ptrs, v_table, bid, v_new, rm, rn, pid_n, M, sv0, sv1, svq0, svq1, mask, V_KIND)
    np_ = tl.load(n_ptrs + bid).to(tl.pointer_type(tl.float32))
    tl.store(np_ + rm[:, None] * sn0 + rn[None, :] * sn1, n, mask=mask)
    if RESID:
        rp = tl.load(r_ptrs + bid).to(tl.pointer_type(tl.float32))
        tl.store(rp + rm[:, None] * sn0 + rn[None, :] * sn1, r, mask=mask)


@jit
def back_update_kernel(
    a_ptrs,
    b_ptrs,
    w_ptrs,
    hyper,
    M,
    N,
    K,
    sa0,
    sa1,
    sb0,
    sb1,
    sw0,
    sw1,
    g_ptrs,
    sg0,
    sg1,
    coef,
    s_coef,
    A_DT: tl.constexpr,
    B_DT: tl.constexpr,
    W_DT: tl.constexpr,
    G_DT: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    RESID: tl.constexpr,
    LOW_RANK: tl.constexpr,
    COEF_OF_COLS: tl.constexpr,
    PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """U = A @ B (A = P, B = N for a left basis; A = N, B = P^T for a right one), then in the epilogue

        W <- W (1 - lr wd) - alpha U,   alpha = lr scale / (1 - b1^t)

    computed in fp32 and rounded once (to nearest even) to W's dtype, in place.

    With RESID, N has become N - coef o R on the host, and the epilogue adds coef o G (coef_j per
    column, COEF_OF_COLS, for a left basis; per row for a right one; ``coef`` is one fp32 row of
    ``s_coef`` elements per member), reading G's tile beside W's: U = P (N - coef o R) + coef o G
    = P N + coef o (G - P P^T G). Without LOW_RANK (``apollo``) there is no GEMM: U = coef o G.

    A member flagged to skip (``hyper`` column 7, as in ``project_adam_kernel``) returns at once: its
    weight keeps its bits.
    """
    bid = tl.program_id(1)
    if tl.load(hyper + bid * 8 + 7) != 0.0:
        return
    pid_m, pid_n = tile_ids(M, N, BM, BN, GROUP_M)
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    rn = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    if LOW_RANK:
        a = tl.load(a_ptrs + bid).to(tl.pointer_type(A_DT))
        b = tl.load(b_ptrs + bid).to(tl.pointer_type(B_DT))
        u = dot_tile(a, b, 0, rm, rn, M, N, K, sa0, sa1, sb0, sb1, False, False, PRECISION, BM, BN, BK)
    else:
        u = tl.zeros((BM, BN), dtype=tl.float32)
    if RESID:
        gp = tl.load(g_ptrs + bid).to(tl.pointer_type(G_DT))
        g = tl.load(gp + rm[:, None] * sg0 + rn[None, :] * sg1, mask=mask, other=0.0).to(tl.float32)
        if COEF_OF_COLS:
            k = tl.load(coef + bid * s_coef + rn, mask=rn < N, other=0.0)
            u = u + g * k[None, :]
        else:
            k = tl.load(coef + bid * s_coef + rm, mask=rm < M, other=0.0)
            u = u + g * k[:, None]

    h = hyper + bid * 8
    alpha = tl.load(h + 5)
    decay = tl.load(h + 6)
    wp = tl.load(w_ptrs + bid).to(tl.pointer_type(W_DT))
    off = rm[:, None] * sw0 + rn[None, :] * sw1
    w = tl.load(wp + off, mask=mask, other=0.0).to(tl.float32)
    w = w * decay - alpha * u
    if ROUND_BF16:
        w = round_bf16(w)  # to nearest even by hand: the interpreter's fp32 -> bf16 cast truncates
    tl.store(wp + off, w.to(W_DT), mask=mask)


def projection_blocks(blocks: Blocks, cols: int, quantized: bool) -> Blocks:
    """The projection launch's tiles. With an 8-bit moment, a tile's columns must be exactly one
    quantization block of each row it covers (its absmax is computed in the epilogue): BN = 256
    (``quant.BLOCK``), or the next power of two >= cols for a row shorter than that (one block), at
    least 16 for ``tl.dot``; BM shrinks to keep the tile's area (registers) about the default's."""
    if not quantized:
        return blocks
    bn = max(16, min(BLOCK, triton.next_power_of_2(max(cols, 1))))
    bm = max(16, min(blocks.m, blocks.m * blocks.n // bn))
    return Blocks(bm, bn, blocks.k, warps=blocks.warps, stages=blocks.stages)


def project_config(
    side: str,
    g_dtype: torch.dtype,
    p_dtype: torch.dtype,
    m_kind: int,
    v_kind: int,
    resid: bool,
    precision: str,
    cols: int,
    blocks: Blocks | None = None,
    *,
    interpreted: bool | None = None,
) -> dict[str, Any]:
    """``project_adam_kernel``'s constexprs and launch options for one batch (``cols``: the moments'
    columns). The one place they are chosen: ``_project_launch`` launches with them and ``aot`` compiles
    every combination of its arguments, so the ahead-of-time sweep covers exactly what can launch. Cached
    (a step asks per batch); callers get a copy."""
    here = interpreting() if interpreted is None else interpreted
    return dict(_project_config(side, g_dtype, p_dtype, m_kind, v_kind, resid, precision, cols, blocks, here))


@functools.lru_cache(maxsize=1024)
def _project_config(side, g_dtype, p_dtype, m_kind, v_kind, resid, precision, cols, blocks, interpreted):  # noqa: ANN001, ANN202
    quantized = MOMENT_INT8 in (m_kind, v_kind)
    a_dt, b_dt = (p_dtype, g_dtype) if side == "left" else (g_dtype, p_dtype)  # left: P^T G; right: G P
    if blocks is None:
        blocks = default_blocks(precision=precision, interpreted=interpreted)
    pb = projection_blocks(blocks, cols, quantized)
    return dict(
        A_DT=tl_dtype(a_dt), B_DT=tl_dtype(b_dt), M_KIND=m_kind, V_KIND=v_kind, RESID=resid,
        SQ_OF_B=side == "left", PRECISION=precision, BM=pb.m, BN=pb.n, BK=pb.k, GROUP_M=8,
        num_warps=pb.warps, num_stages=pb.stages, enable_fp_fusion=FP_FUSION,
    )  # fmt: skip


def back_config(
    side: str,
    w_dtype: torch.dtype,
    g_dtype: torch.dtype,
    p_dtype: torch.dtype,
    residual: str,
    precision: str,
    blocks: Blocks | None = None,
    *,
    interpreted: bool | None = None,
) -> dict[str, Any]:
    """``back_update_kernel``'s constexprs and launch options for one batch (see ``project_config``)."""
    here = interpreting() if interpreted is None else interpreted
    return dict(_back_config(side, w_dtype, g_dtype, p_dtype, residual, precision, blocks, here))


@functools.lru_cache(maxsize=1024)
def _back_config(side, w_dtype, g_dtype, p_dtype, residual, precision, blocks, interpreted):  # noqa: ANN001, ANN202
    a_dt, b_dt = (p_dtype, torch.float32) if side == "left" else (torch.float32, p_dtype)  # P N; N P^T
    if blocks is None:
        blocks = default_blocks(precision=precision, interpreted=interpreted)
    return dict(
        A_DT=tl_dtype(a_dt), B_DT=tl_dtype(b_dt), W_DT=tl_dtype(w_dtype), G_DT=tl_dtype(g_dtype),
        ROUND_BF16=w_dtype == torch.bfloat16, RESID=residual != "none", LOW_RANK=residual != "apollo",
        COEF_OF_COLS=side == "left", PRECISION=precision, BM=blocks.m, BN=blocks.n, BK=blocks.k, GROUP_M=8,
        num_warps=blocks.warps, num_stages=blocks.stages, enable_fp_fusion=FP_FUSION,
    )  # fmt: skip


class _Launched(NamedTuple):
    """What launch 1 leaves for launch 2: N (and with a residual R and ||G_j||^2) per batch member, and the
    pointer tables both launches read (weights, gradients, bases, N)."""

    ws: list[Tensor]
    gs: list[Tensor]
    ps: list[Tensor]
    hyper: Tensor
    side: str
    nbuf: Tensor
    rbuf: Tensor | None
    sqbuf: Tensor | None
    tables: dict[str, Tensor]


def _project_launch(
    ws: list[Tensor],
    gs: list[Tensor],
    ps: list[Tensor],
    ms: list[Tensor],
    vs: list[Tensor],
    mqs: list[Tensor] | None,
    vqs: list[Tensor] | None,
    hyper: Tensor,
    side: str,
    blocks: Blocks | None,
    precision: str,
    resid: bool,
    same_layout: bool = False,
) -> _Launched:
    """Launch 1 for one batch of same-shape, same-layout, same-storage matrices, on their device: the
    moments updated in place, N in a fresh buffer (with ``resid``, also R and ||G_j||^2 per channel).

    Every operand is addressed through its own strides, so any non-overlapping layout works: column-major
    or sliced moments (as ``load_state_dict`` may restore them), a transposed basis, a strided gradient.
    ``mqs``/``vqs`` are the moments' absmaxes when they are stored as 8-bit codes, else None.
    ``same_layout``: the caller grouped the batch by every tensor's shape, strides, dtype and device
    (``subspace_adamw`` does), so the first member's layout is every member's and is not checked again.
    Every pointer table of both launches is one host table, copied to the device at once (``pointer_tables``).
    """
    dev = gs[0].device
    m, n = gs[0].shape
    r = ps[0].shape[1]
    if same_layout:
        gst, pst, mst, vst = gs[0].stride(), ps[0].stride(), ms[0].stride(), vs[0].stride()
    else:
        gst = check_same_layout(gs, "gradients")
        pst = check_same_layout(ps, "bases")
        mst = check_same_layout(ms, "exp_avg")
        vst = check_same_layout(vs, "exp_avg_sq")
        check_same_layout(ws, "weights")
    rshape = (r, n) if side == "left" else (m, r)
    if tuple(ms[0].shape) != rshape or tuple(vs[0].shape) != rshape or ps[0].shape[0] != (m if side == "left" else n):
        raise ValueError(f"{side} basis {tuple(ps[0].shape)} / moments {tuple(ms[0].shape)} do not fit G {(m, n)}")
    if ps[0].dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"bases must be fp32 or bf16, got {ps[0].dtype}")
    m_kind = moment_kind(ms[0], mqs[0] if mqs else None, "exp_avg")
    v_kind = moment_kind(vs[0], vqs[0] if vqs else None, "exp_avg_sq")
    for what, ts in (("weight", ws), ("exp_avg", ms), ("exp_avg_sq", vs)):
        check_writable(ts[0], what)  # same strides across the batch: one check covers it
    batch = len(gs)
    nbuf = torch.empty((batch, *rshape), dtype=torch.float32, device=dev)
    nst = nbuf.stride()[1:]
    rows: dict[str, list[Tensor] | Tensor] = {"w": ws, "g": gs, "p": ps, "m": ms, "v": vs, "n": nbuf}
    mqst, vqst, m_table, v_table = (0, 0), (0, 0), hyper, hyper  # placeholders, never read unless int8
    if m_kind == MOMENT_INT8:
        mqst = mqs[0].stride() if same_layout else check_same_layout(mqs, "exp_avg_absmax")
        check_writable(mqs[0], "exp_avg_absmax")
        rows["mq"], m_table = mqs, code_table(True, dev)
    if v_kind == MOMENT_INT8:
        vqst = vqs[0].stride() if same_layout else check_same_layout(vqs, "exp_avg_sq_absmax")
        check_writable(vqs[0], "exp_avg_sq_absmax")
        rows["vq"], v_table = vqs, code_table(False, dev)
    rbuf = sqbuf = None
    if resid:
        channels = n if side == "left" else m
        rbuf = torch.empty_like(nbuf)
        sqbuf = torch.empty((batch, channels), dtype=torch.float32, device=dev)
        rows.update(r=rbuf, sq=sqbuf)
    tables = pointer_tables(rows, dev)
    mq_arr, vq_arr = tables.get("mq", tables["m"]), tables.get("vq", tables["m"])  # placeholders unless int8
    r_arr, sq_arr = tables.get("r", tables["n"]), tables.get("sq", tables["n"])  # never read without a residual

    g_dt, pp_dt = gs[0].dtype, ps[0].dtype
    if side == "left":  # R = P^T G: A = P^T (r x m), B = G (m x n)
        a_arr, sa, b_arr, sb, (rm, rn, rk) = tables["p"], pst[::-1], tables["g"], gst, (r, n, m)
    else:  # R = G P: A = G (m x n), B = P (n x r)
        a_arr, sa, b_arr, sb, (rm, rn, rk) = tables["g"], gst, tables["p"], pst, (m, r, n)
    cfg = project_config(side, g_dt, pp_dt, m_kind, v_kind, resid, precision, rn, blocks)
    grid = (triton.cdiv(rm, cfg["BM"]) * triton.cdiv(rn, cfg["BN"]), batch)
    project_adam_kernel[grid](
        a_arr, b_arr, tables["m"], tables["v"], tables["n"], mq_arr, vq_arr, m_table, v_table,
        hyper, rm, rn, rk, sa[0], sa[1], sb[0], sb[1], mst[0], mst[1], vst[0], vst[1], nst[0], nst[1],
        mqst[0], mqst[1], vqst[0], vqst[1], r_arr, sq_arr, **cfg,
    )  # fmt: skip
    return _Launched(ws, gs, ps, hyper, side, nbuf, rbuf, sqbuf, tables)


def _back_launch(x: _Launched, blocks: Blocks | None, precision: str, residual: str, coef: Tensor | None) -> None:
    """Launch 2: W <- W (1 - lr wd) - alpha (P N + coef o G) for the batch; with a residual, N already
    holds N - coef o R (``apollo``: no GEMM, U = coef o G); ``coef`` batch x channels, contiguous."""
    ws, gs, ps, side, tables = x.ws, x.gs, x.ps, x.side, x.tables
    m, n = gs[0].shape
    r = ps[0].shape[1]
    gst, pst, wst = gs[0].stride(), ps[0].stride(), ws[0].stride()
    nst = x.nbuf.stride()[1:]
    resid = residual != "none"
    if side == "left":  # U = P N: A = P (m x r), B = N (r x n)
        a_arr, sa, b_arr, sb = tables["p"], pst, tables["n"], nst
    else:  # U = N P^T: A = N (m x r), B = P^T (r x n)
        a_arr, sa, b_arr, sb = tables["n"], nst, tables["p"], pst[::-1]
    coef = x.hyper if coef is None else coef  # placeholder without a residual
    cfg = back_config(side, ws[0].dtype, gs[0].dtype, ps[0].dtype, residual, precision, blocks)
    grid = (triton.cdiv(m, cfg["BM"]) * triton.cdiv(n, cfg["BN"]), len(gs))
    back_update_kernel[grid](
        a_arr, b_arr, tables["w"], x.hyper,
        m, n, r, sa[0], sa[1], sb[0], sb[1], wst[0], wst[1], tables["g"], gst[0], gst[1], coef,
        coef.stride(0) if resid else 0, **cfg,
    )  # fmt: skip


def _residual_between(
    launched: list[_Launched],
    members: list[list[int]],
    bases: Sequence[Tensor],
    residual: str,
    update_norms: Sequence[Tensor],
    bias1: Tensor,
    scale: float,
    reduce: Callable[[Tensor], Tensor] | None,
    skipped: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    """Between the launches, for every batch at once: the residual's coefficients from launch 1's low-rank
    buffers (never G), in matrix order (so row-sharded ranks, whose batches may group differently, make
    the same ``reduce`` call), the limiter state updated in place, and each batch's N turned into
    N - coef o R. Returns each batch's coef (batch x channels, contiguous). ``bias1``: 1 - b1^t per matrix
    (fp64, on the device). A ``skipped`` matrix's buffers were never written: its garbage stays in its own
    rows, and its limiter state keeps its value."""
    per_channel = residual != "fira_tensor"  # fira_tensor: one channel per matrix, the whole matrix
    pieces: list[Tensor | None] = [None] * len(bases)
    for x, idx in zip(launched, members, strict=True):
        dim = channel_dim(x.side) + 1  # the batch axis comes first
        sumsq = torch.stack((x.nbuf.square().sum(dim), x.rbuf.square().sum(dim), x.sqbuf), dim=-1)  # b x ch x 3
        for j, i in enumerate(idx):
            pieces[i] = sumsq[j] if per_channel else sumsq[j].sum(0, keepdim=True)
    dev = pieces[0].device
    lengths = [t.shape[0] for t in pieces]
    previous = torch.stack(list(update_norms))
    coef, norms = residual_factors(
        torch.cat(pieces), device_vector(lengths, torch.int64, dev) if per_channel else None, previous,
        bias1, residual, first_ratios(list(bases), dev), scale, reduce,
    )  # fmt: skip
    if skipped is not None:
        norms = torch.where(torch.stack(list(skipped)), previous, norms)
    torch._foreach_copy_(list(update_norms), list(norms.unbind(0)))
    coefs = coef.split(lengths)
    out = []
    for x, idx in zip(launched, members, strict=True):
        channels = x.sqbuf.shape[1]
        dim = channel_dim(x.side) + 1
        batch_coef = torch.stack([coefs[i].expand(channels) for i in idx])
        if residual != "apollo":  # B of launch 2 becomes N - coef o R (in place: N is this step's temporary)
            x.nbuf.sub_(x.rbuf.mul_(batch_coef.unsqueeze(dim)))
        out.append(batch_coef.contiguous())
    return out


def layout_batches(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    bases: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    sides: Sequence[str],
    exp_avg_absmaxes: Sequence[Tensor | None] | None = None,
    exp_avg_sq_absmaxes: Sequence[Tensor | None] | None = None,
) -> list[list[int]]:
    """The matrices of a ``subspace_adamw`` call grouped into launch batches: the same side and every tensor's
    shape, strides, dtype and device (a batch shares one layout, ``_project_launch``'s ``same_layout``).
    ``params[i]`` as the launch sees it, viewed as its gradient's shape."""
    count = len(grads)
    mqs = exp_avg_absmaxes if exp_avg_absmaxes is not None else [None] * count
    vqs = exp_avg_sq_absmaxes if exp_avg_sq_absmaxes is not None else [None] * count
    out: dict[tuple, list[int]] = {}
    for i in range(count):
        g, w = grads[i], params[i]
        if sides[i] not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', got {sides[i]!r}")
        key = (sides[i], g.shape, g.dtype, g.stride(), g.get_device(), w.shape, w.dtype, w.stride(), w.get_device(),
               _layout(bases[i]), _layout(exp_avgs[i]), _layout(exp_avg_sqs[i]), _layout(mqs[i]), _layout(vqs[i]))
        out.setdefault(key, []).append(i)
    return list(out.values())


def _layout(t: Tensor | None) -> tuple | None:
    return None if t is None else (t.shape, t.stride(), t.dtype, t.get_device())


def subspace_adamw(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    bases: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[int],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    scale: float,
    sides: Sequence[str],
    exp_avg_absmaxes: Sequence[Tensor | None] | None = None,
    exp_avg_sq_absmaxes: Sequence[Tensor | None] | None = None,
    matmul_precision: str = "ieee",
    residual: str = "none",
    update_norms: Sequence[Tensor] | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
    skipped: Sequence[Tensor] | None = None,
    lags: Sequence[Tensor] | None = None,
    blocks: Blocks | None = None,
    batches: Sequence[Sequence[int]] | None = None,
) -> None:
    """The Triton twin of ``functional.subspace_adamw``: the same arguments, the same update, in place.

    ``grads[i]`` is matrix i's gradient viewed as G (m x n); ``params[i]`` its weight, of any shape that
    views as (m, n) without a copy. Bases are fp32 or bf16. Moments are fp32, bf16, or 8-bit codes (uint8)
    when ``exp_avg_absmaxes[i]`` / ``exp_avg_sq_absmaxes[i]`` is given (``quant``'s blockwise format); the
    math is fp32 whatever the storage, and the state is converted inside the kernel. Matrices sharing
    side, shapes, dtypes, strides and storage form one batch: two kernel launches per batch, whatever its
    size. ``matmul_precision="ieee"`` keeps fp32 GEMM semantics (the reference's); ``"tf32"`` trades that
    for tensor-core speed. ``residual`` / ``update_norms`` as the reference's (``functional._residual_reference``):
    the residual adds no GEMM (``fira``: P (N - coef o R) replaces P N; ``apollo`` drops the
    back-projection GEMM) and no pass over G (its channel norms are summed inside the projection GEMM,
    its entries read in the weight epilogue beside W's). ``skipped`` / ``lags`` as the reference's: the
    flags are copied on the device into the scalar table's spare column, which both kernels read first (a
    flagged member's programs store nothing), and the lags' corrections (``inner.Lag``) are applied to the
    table's scalars on the device.

    Engine-only arguments: ``blocks`` (the tiles; tests and benchmarks), and ``batches``, the grouping
    ``layout_batches`` gives for these very tensors, which a caller that knows their layouts are unchanged
    (the optimizer, while its plan holds) passes instead of having every tensor's layout read again.
    """
    count = len(grads)
    if {len(x) for x in (params, bases, exp_avgs, exp_avg_sqs, steps, sides)} != {count}:
        raise ValueError("subspace_adamw: every argument list needs one entry per matrix")
    mqs = list(exp_avg_absmaxes) if exp_avg_absmaxes is not None else [None] * count
    vqs = list(exp_avg_sq_absmaxes) if exp_avg_sq_absmaxes is not None else [None] * count
    if len(mqs) != count or len(vqs) != count:
        raise ValueError("subspace_adamw: the absmax lists need one entry per matrix")
    ws = [w if w.shape == g.shape else w.view(g.shape) for w, g in zip(params, grads, strict=True)]
    if batches is None:
        batches = layout_batches(ws, grads, bases, exp_avgs, exp_avg_sqs, sides, mqs, vqs)
    resid = residual != "none"
    launched, members, bias1 = [], [list(idx) for idx in batches], [0.0] * count
    by_age: dict[int, tuple[list[float], float]] = {}  # a batch's matrices usually share one age
    for idx in members:
        dev = grads[idx[0]].device
        rows = []
        for i in idx:
            if steps[i] not in by_age:
                s = adam_scalars(lr, betas, eps, weight_decay, scale, steps[i])
                by_age[steps[i]] = ([s.w1, s.beta2, s.w2, s.eps, s.bias2_sqrt, s.alpha, s.decay, 0.0], s.bias1)
            row, bias1[i] = by_age[steps[i]]
            rows.append(row)
        with device_guard(dev):
            hyper = host_table(rows, torch.float32, dev)
            if skipped is not None:
                hyper[:, 7].copy_(torch.stack([skipped[i] for i in idx]))
            if lags is not None:  # alpha and sqrt(1 - b2^t) where the host count runs ahead (exact 1.0 otherwise)
                fix = lag_vectors([steps[i] for i in idx], [lags[i] for i in idx], betas)  # ``inner.Lag`` vectors
                hyper[:, 5].mul_(fix.c1)
                hyper[:, 4].div_(fix.c2)
            launched.append(_project_launch(
                [ws[i] for i in idx], [grads[i] for i in idx], [bases[i] for i in idx], [exp_avgs[i] for i in idx],
                [exp_avg_sqs[i] for i in idx], None if mqs[idx[0]] is None else [mqs[i] for i in idx],
                None if vqs[idx[0]] is None else [vqs[i] for i in idx], hyper,
                sides[idx[0]], blocks, matmul_precision, resid, same_layout=True,
            ))  # fmt: skip
    coefs = None
    if resid:
        bias1_t = device_vector(bias1, torch.float64, grads[0].device)
        if lags is not None:
            bias1_t = bias1_t / lag_vectors(steps, lags, betas).c1
        coefs = _residual_between(launched, members, bases, residual, update_norms, bias1_t, scale, reduce, skipped)
    for b, x in enumerate(launched):
        with device_guard(x.gs[0].device):
            _back_launch(x, blocks, matmul_precision, residual, None if coefs is None else coefs[b])
