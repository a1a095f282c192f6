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

With a ``residual`` (``residual_rule.residual_factors``), launch 1 also keeps R and sums ||G_j||^2 per channel
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

from ..adam_rule import AdamScalars, Lag, lag_factors, lag_vectors, moments_directions, scalars_by_age
from ..factored import Factored
from ..philox import scale_of
from ..projections import DctColumns, Signs
from ..quant import BLOCK, Moment, as_moment, parts
from ..residual_rule import (
    PER_MATRIX,
    WHOLE_GRADIENT,
    channel_dim,
    channel_sumsq,
    limiter_units,
    residual_coefficients,
)
from ..subspace import project
from ..triton_runtime import interpreting
from ._common import (
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
    tile_options,
    tl_dtype,
)
from .gemm import tile_ids
from .operands import BASIS_DCT, BASIS_SIGNS, BASIS_STORED, basis_source, step_dot
from .precompile import jit

# The scalar table both kernels read: one fp32 row per matrix of a batch, its columns named once, here: the
# ``adam_rule.AdamScalars`` fields the epilogues use, then a skip flag (nonzero: leave the member untouched; set on
# the device). The host fills rows by these names (``_scalar_row``) and the kernels read them at the constexpr
# offsets derived below, so the two cannot disagree on the layout.
SCALAR_COLUMNS = ("one_minus_beta1", "beta2", "one_minus_beta2", "eps", "bias2_sqrt", "alpha", "decay", "skip")
assert set(SCALAR_COLUMNS) - {"skip"} <= set(AdamScalars._fields), "a scalar column that AdamScalars does not hold"
COLUMN = {name: i for i, name in enumerate(SCALAR_COLUMNS)}
ROW = tl.constexpr(len(SCALAR_COLUMNS))
ONE_MINUS_BETA1, BETA2, ONE_MINUS_BETA2, EPS = (
    tl.constexpr(COLUMN[name]) for name in ("one_minus_beta1", "beta2", "one_minus_beta2", "eps")
)
BIAS2_SQRT, ALPHA, DECAY, SKIP = (tl.constexpr(COLUMN[name]) for name in ("bias2_sqrt", "alpha", "decay", "skip"))


@triton.jit
def round_bf16(x):
    """x rounded to the nearest bf16 value (ties to even), still as fp32: the interpreter's fp32 -> bf16
    cast truncates, the GPU's rounds; after this both casts are exact. NaN passes through."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(x == x, bits.to(tl.float32, bitcast=True), x)


@triton.jit
def round_bf16_stochastic(x, seed, e):
    """x (fp32) rounded to bf16 stochastically (``subspace_optim.rounding``), as fp32 holding bf16 numbers: the
    bit pattern plus 16 random bits, low half cleared; entry e (its index in the matrix) takes half (e & 1) of word
    ((e >> 1) & 3) of Philox(seed, e >> 3). Special values as the reference treats them."""
    c0, c1, c2, c3 = tl.randint4x(seed, (e >> 3).to(tl.int32))
    w = (e >> 1) & 3
    word = tl.where(w == 0, c0, tl.where(w == 1, c1, tl.where(w == 2, c2, c3)))
    bits = (word >> ((e & 1) * 16).to(tl.uint32)) & 0xFFFF
    pattern = x.to(tl.int32, bitcast=True) + bits.to(tl.int32)
    return (pattern & -65536).to(tl.float32, bitcast=True)


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
def channel_sums_store(sq_ptrs, bid, sq, rm, rn, pid_m, pid_n, M, N, SQ_OF_B: tl.constexpr):
    """Store ||G_j||^2 per channel from the grid's first row of tiles (SQ_OF_B: G is B, a left basis; the
    channels are columns) or first column (G is A; the channels are rows): each tile of it saw whole channels."""
    sqp = tl.load(sq_ptrs + bid).to(tl.pointer_type(tl.float32))
    if SQ_OF_B:
        if pid_m == 0:
            tl.store(sqp + rn, sq, mask=rn < N)
    else:
        if pid_n == 0:
            tl.store(sqp + rm, sq, mask=rm < M)


@triton.jit
def adam_epilogue(
    r, h, bid, rm, rn, pid_n, M, mask,
    m_ptrs, mq_ptrs, m_table, sm0, sm1, smq0, smq1,
    v_ptrs, vq_ptrs, v_table, sv0, sv1, svq0, svq1,
    M_KIND: tl.constexpr, V_KIND: tl.constexpr,
):  # fmt: skip
    """Adam's moments for one tile of R, in fp32 whatever their storage (``load_moment``), stored back in place;
    returns N from the fp32 new values, before they are rounded (as the reference does). ``h``: the member's
    row of the scalar table. Both divisions are IEEE round-to-nearest (``div_rn``): a plain ``/`` compiles to
    an approximate division on NVIDIA GPUs; the lerp is torch's (exact for both halves of the weight)."""
    weight = tl.load(h + ONE_MINUS_BETA1)  # torch's lerp weight
    m_old = load_moment(m_ptrs, mq_ptrs, m_table, bid, rm, rn, pid_n, M, sm0, sm1, smq0, smq1, mask, M_KIND)
    v_old = load_moment(v_ptrs, vq_ptrs, v_table, bid, rm, rn, pid_n, M, sv0, sv1, svq0, svq1, mask, V_KIND)
    m_new = tl.where(weight < 0.5, m_old + weight * (r - m_old), r - (r - m_old) * (1.0 - weight))
    v_new = v_old * tl.load(h + BETA2) + tl.load(h + ONE_MINUS_BETA2) * (r * r)
    n = tl.div_rn(m_new, tl.div_rn(tl.sqrt_rn(v_new), tl.load(h + BIAS2_SQRT)) + tl.load(h + EPS))
    store_moment(m_ptrs, mq_ptrs, m_table, bid, m_new, rm, rn, pid_n, M, sm0, sm1, smq0, smq1, mask, M_KIND)
    store_moment(v_ptrs, vq_ptrs, v_table, bid, v_new, rm, rn, pid_n, M, sv0, sv1, svq0, svq1, mask, V_KIND)
    return n


@jit
def project_adam_kernel(
    a_ptrs, b_ptrs, m_ptrs, v_ptrs, n_ptrs, mq_ptrs, vq_ptrs, m_table, v_table, hyper,
    M, N, K,
    sa0, sa1, sb0, sb1, sm0, sm1, sv0, sv1, sn0, sn1, smq0, smq1, svq0, svq1,
    r_ptrs, sq_ptrs, p_table, p_scale,
    A_DT: tl.constexpr, B_DT: tl.constexpr, M_KIND: tl.constexpr, V_KIND: tl.constexpr, RESID: tl.constexpr,
    SQ_OF_B: tl.constexpr, BASIS: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """R = A @ B (A = P^T, B = G for a left basis; A = G, B = P for a right one), then Adam's epilogue on it
    (``adam_epilogue``): the moments updated in place in their storage (M_KIND / V_KIND, ``load_moment``;
    for int8 the host makes each tile's columns exactly one quantization block, ``mq_ptrs``/``vq_ptrs`` are
    the absmax arrays and ``m_table``/``v_table`` the code tables of ``_common.code_table``) and N written in
    fp32 for the back-projection launch. Arguments, one line per role: per-member pointer arrays and tables;
    R's sizes; strides (M, V, N and the absmaxes each have their own: a checkpoint may restore column-major or
    sliced moments); the residual's buffers; constexprs.

    With RESID (a ``residual`` other than "none") the epilogue also stores R (fp32, N's layout, at ``r_ptrs``)
    and ||G_j||^2 per channel (``channel_sums_store``), summed while G's tiles pass through the GEMM.
    A member whose scalar row has a nonzero skip flag (decided on the device) returns at once, storing
    nothing: its moments keep their bits; its N (and R, sums) stay unset."""
    bid = tl.program_id(1)
    h = hyper + bid * ROW
    if tl.load(h + SKIP) != 0.0:
        return
    pid_m, pid_n = tile_ids(M, N, BM, BN, GROUP_M)
    if SQ_OF_B:  # left: A = P^T, B = G
        a = basis_source(a_ptrs + bid, A_DT, BASIS)
        b = tl.load(b_ptrs + bid).to(tl.pointer_type(B_DT))
    else:  # right: A = G, B = P
        a = tl.load(a_ptrs + bid).to(tl.pointer_type(A_DT))
        b = basis_source(b_ptrs + bid, B_DT, BASIS)
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    rn = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    r, sq = step_dot(
        a, b, p_table, p_scale, rm, rn, M, N, K, sa0, sa1, sb0, sb1,
        BASIS, SQ_OF_B, SQ_OF_B, RESID, SQ_OF_B, PRECISION, BM, BN, BK,
    )  # fmt: skip
    if RESID:
        channel_sums_store(sq_ptrs, bid, sq, rm, rn, pid_m, pid_n, M, N, SQ_OF_B)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    n = adam_epilogue(
        r, h, bid, rm, rn, pid_n, M, mask,
        m_ptrs, mq_ptrs, m_table, sm0, sm1, smq0, smq1,
        v_ptrs, vq_ptrs, v_table, sv0, sv1, svq0, svq1,
        M_KIND, V_KIND,
    )  # fmt: skip
    n_out = tl.load(n_ptrs + bid).to(tl.pointer_type(tl.float32))
    tl.store(n_out + rm[:, None] * sn0 + rn[None, :] * sn1, n, mask=mask)
    if RESID:
        r_out = tl.load(r_ptrs + bid).to(tl.pointer_type(tl.float32))
        tl.store(r_out + rm[:, None] * sn0 + rn[None, :] * sn1, r, mask=mask)


@triton.jit
def residual_add(u, g_ptrs, coef, bid, s_coef, rm, rn, M, N, sg0, sg1, mask, G_DT: tl.constexpr,
                 COEF_OF_COLS: tl.constexpr):  # fmt: skip
    """U + coef o G for one tile: coef_j per column (COEF_OF_COLS, a left basis) or per row (a right one), from
    the member's row of ``coef`` (``s_coef`` elements apart), G's tile read beside W's."""
    gp = tl.load(g_ptrs + bid).to(tl.pointer_type(G_DT))
    g = tl.load(gp + rm[:, None] * sg0 + rn[None, :] * sg1, mask=mask, other=0.0).to(tl.float32)
    if COEF_OF_COLS:
        k = tl.load(coef + bid * s_coef + rn, mask=rn < N, other=0.0)
        return u + g * k[None, :]
    else:
        k = tl.load(coef + bid * s_coef + rm, mask=rm < M, other=0.0)
        return u + g * k[:, None]


@jit
def back_update_kernel(
    a_ptrs, b_ptrs, w_ptrs, hyper,
    M, N, K,
    sa0, sa1, sb0, sb1, sw0, sw1,
    g_ptrs, sg0, sg1, coef, s_coef, p_table, p_scale, rounding_seeds,
    A_DT: tl.constexpr, B_DT: tl.constexpr, W_DT: tl.constexpr, G_DT: tl.constexpr, ROUND_BF16: tl.constexpr,
    STOCHASTIC: tl.constexpr, RESID: tl.constexpr, LOW_RANK: tl.constexpr, COEF_OF_COLS: tl.constexpr,
    BASIS: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """U = A @ B (A = P, B = N for a left basis; A = N, B = P^T for a right one), then in the epilogue

        W <- W (1 - lr wd) - alpha U,   alpha = lr scale / (1 - b1^t)

    computed in fp32 and rounded once (to nearest even) to W's dtype, in place. Arguments, one line per role:
    per-member pointer arrays and the scalar table; U's sizes; strides; the residual's G and coefficients;
    constexprs. With RESID, N has become N - coef o R on the host, and the epilogue adds coef o G
    (``residual_add``): U = P (N - coef o R) + coef o G = P N + coef o (G - P P^T G). Without LOW_RANK
    (``apollo``) there is no GEMM: U = coef o G. A member flagged to skip returns at once: its weight keeps
    its bits."""
    bid = tl.program_id(1)
    h = hyper + bid * ROW
    if tl.load(h + SKIP) != 0.0:
        return
    pid_m, pid_n = tile_ids(M, N, BM, BN, GROUP_M)
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    rn = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    if LOW_RANK:
        if COEF_OF_COLS:  # left: A = P, B = N
            a = basis_source(a_ptrs + bid, A_DT, BASIS)
            b = tl.load(b_ptrs + bid).to(tl.pointer_type(B_DT))
        else:  # right: A = N, B = P^T
            a = tl.load(a_ptrs + bid).to(tl.pointer_type(A_DT))
            b = basis_source(b_ptrs + bid, B_DT, BASIS)
        u, _ = step_dot(
            a, b, p_table, p_scale, rm, rn, M, N, K, sa0, sa1, sb0, sb1,
            BASIS, COEF_OF_COLS, not COEF_OF_COLS, False, False, PRECISION, BM, BN, BK,
        )  # fmt: skip
    else:
        u = tl.zeros((BM, BN), dtype=tl.float32)
    if RESID:
        u = residual_add(u, g_ptrs, coef, bid, s_coef, rm, rn, M, N, sg0, sg1, mask, G_DT, COEF_OF_COLS)
    wp = tl.load(w_ptrs + bid).to(tl.pointer_type(W_DT))
    off = rm[:, None] * sw0 + rn[None, :] * sw1
    w = tl.load(wp + off, mask=mask, other=0.0).to(tl.float32)
    w = w * tl.load(h + DECAY) - tl.load(h + ALPHA) * u
    if STOCHASTIC:
        w = round_bf16_stochastic(w, tl.load(rounding_seeds + bid), rm[:, None] * N + rn[None, :])
    elif ROUND_BF16:
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
    basis: int = BASIS_STORED,
    interpreted: bool | None = None,
) -> dict[str, Any]:
    """``project_adam_kernel``'s constexprs and launch options for one batch (``cols``: the moments'
    columns; ``basis``: how the basis reaches the GEMM, ``operands``). The one place they are chosen:
    ``_project_launch`` launches with them and ``aot`` compiles every combination of its arguments, so the
    ahead-of-time sweep covers exactly what can launch. Cached (a step asks per batch); callers get a copy."""
    here = interpreting() if interpreted is None else interpreted
    return dict(_project_config(side, g_dtype, p_dtype, m_kind, v_kind, resid, precision, cols, blocks, basis, here))


@functools.lru_cache(maxsize=1024)
def _project_config(side, g_dtype, p_dtype, m_kind, v_kind, resid, precision, cols, blocks, basis, interpreted):  # noqa: ANN001, ANN202
    quantized = MOMENT_INT8 in (m_kind, v_kind)
    a_dt, b_dt = (p_dtype, g_dtype) if side == "left" else (g_dtype, p_dtype)  # left: P^T G; right: G P
    if blocks is None:
        blocks = default_blocks(precision=precision, interpreted=interpreted)
    pb = projection_blocks(blocks, cols, quantized)
    return dict(
        A_DT=tl_dtype(a_dt),
        B_DT=tl_dtype(b_dt),
        M_KIND=m_kind,
        V_KIND=v_kind,
        RESID=resid,
        SQ_OF_B=side == "left",
        BASIS=basis,
        PRECISION=precision,
        **tile_options(pb),
    )


def back_config(
    side: str,
    w_dtype: torch.dtype,
    g_dtype: torch.dtype,
    p_dtype: torch.dtype,
    residual: str,
    precision: str,
    blocks: Blocks | None = None,
    *,
    basis: int = BASIS_STORED,
    stochastic: bool = False,
    interpreted: bool | None = None,
) -> dict[str, Any]:
    """``back_update_kernel``'s constexprs and launch options for one batch (see ``project_config``; ``stochastic``:
    a bf16 weight is rounded stochastically)."""
    here = interpreting() if interpreted is None else interpreted
    return dict(_back_config(side, w_dtype, g_dtype, p_dtype, residual, precision, blocks, basis, stochastic, here))


@functools.lru_cache(maxsize=1024)
def _back_config(side, w_dtype, g_dtype, p_dtype, residual, precision, blocks, basis, stochastic, interpreted):  # noqa: ANN001, ANN202
    a_dt, b_dt = (p_dtype, torch.float32) if side == "left" else (torch.float32, p_dtype)  # P N; N P^T
    if residual in WHOLE_GRADIENT:  # no GEMM, no basis read: one variant whatever the basis
        basis = BASIS_STORED
    if blocks is None:
        blocks = default_blocks(precision=precision, interpreted=interpreted)
    return dict(
        A_DT=tl_dtype(a_dt),
        B_DT=tl_dtype(b_dt),
        W_DT=tl_dtype(w_dtype),
        G_DT=tl_dtype(g_dtype),
        ROUND_BF16=w_dtype == torch.bfloat16,
        STOCHASTIC=stochastic and w_dtype == torch.bfloat16,
        RESID=residual != "none",
        LOW_RANK=residual not in WHOLE_GRADIENT,
        COEF_OF_COLS=side == "left",
        BASIS=basis,
        PRECISION=precision,
        **tile_options(blocks),
    )


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


class _BatchMoments(NamedTuple):
    """One moment of every member of a batch: the stored values and, for 8-bit codes, their absmaxes (a batch
    shares one storage, ``layout_batches``)."""

    values: list[Tensor]
    absmaxes: list[Tensor] | None


def _batch_moments(moments: list[Tensor | Moment]) -> _BatchMoments:
    """A batch's moments given as tensors or ``quant.Moment`` records, split without a record per member when
    they are bare tensors (the usual float storage: the regular step's host path stays allocation-free)."""
    if not any(type(m) is Moment for m in moments):
        return _BatchMoments(moments, None)
    values, absmaxes = (list(side) for side in zip(*map(parts, moments), strict=True))
    return _BatchMoments(values, None if absmaxes[0] is None else absmaxes)


class _Layout(NamedTuple):
    """One batch's shapes and strides, as launch 1 reads them (``_project_layout``)."""

    m: int
    n: int
    r: int
    rshape: tuple[int, int]  # the moments' (and N's) shape
    g: tuple[int, int]  # strides of G, P, M's values, V's values
    p: tuple[int, int]
    m_values: tuple[int, int]
    v_values: tuple[int, int]


def _project_layout(
    ws: list[Tensor],
    gs: list[Tensor],
    ps: list[Tensor],
    ms: _BatchMoments,
    vs: _BatchMoments,
    side: str,
    same_layout: bool,
) -> _Layout:
    """The batch's common layout, checked: one shape, dtype and stride per operand (unless ``same_layout``: the
    caller grouped the batch by them), moments and basis that fit G, fp32 or bf16 bases, writable outputs."""
    m, n = gs[0].shape
    r = ps[0].shape[1]
    if same_layout:
        strides = [gs[0].stride(), basis_strides(ps[0]), ms.values[0].stride(), vs.values[0].stride()]
    else:
        strides = [
            check_same_layout(gs, "gradients"),
            check_same_layout(ps, "bases") if basis_kind(ps[0]) == BASIS_STORED else basis_strides(ps[0]),
            check_same_layout(ms.values, "exp_avg"),
            check_same_layout(vs.values, "exp_avg_sq"),
        ]
        check_same_layout(ws, "weights")
    rshape = (r, n) if side == "left" else (m, r)
    fits = tuple(ms.values[0].shape) == rshape and tuple(vs.values[0].shape) == rshape
    if not fits or ps[0].shape[0] != (m if side == "left" else n):
        shapes = f"{side} basis {tuple(ps[0].shape)} / moments {tuple(ms.values[0].shape)}"
        raise ValueError(f"{shapes} do not fit G {(m, n)}")
    if basis_dtype(ps[0]) not in (torch.float32, torch.bfloat16):
        raise TypeError(f"bases must be fp32 or bf16, got {ps[0].dtype}")
    for what, t in (("weight", ws[0]), ("exp_avg", ms.values[0]), ("exp_avg_sq", vs.values[0])):
        check_writable(t, what)  # same strides across the batch: one check covers it
    return _Layout(m, n, r, rshape, *strides)


def basis_kind(p: Tensor | Signs | DctColumns) -> int:
    """How a member's basis reaches the GEMM (``operands``): loaded, or regenerated from a record."""
    return BASIS_SIGNS if type(p) is Signs else BASIS_DCT if type(p) is DctColumns else BASIS_STORED


def basis_strides(p: Tensor | Signs | DctColumns) -> tuple[int, int]:
    """A stored basis's strides; a regenerated one has none (placeholders the kernels never read)."""
    return p.stride() if isinstance(p, Tensor) else (0, 0)


def basis_dtype(p: Tensor | Signs | DctColumns) -> torch.dtype:
    """The dtype the GEMM sees for the basis: a stored one's, fp32 for a regenerated one."""
    return p.dtype if isinstance(p, Tensor) else torch.float32


def _basis_pointer(p: Tensor | Signs | DctColumns) -> Tensor | int:
    """A member's entry of the basis pointer array: the basis, its seed, or its column indices."""
    return p.seed if type(p) is Signs else p.index if type(p) is DctColumns else p


def _basis_arguments(ps: list[Tensor | Signs | DctColumns], placeholder: Tensor) -> tuple[Tensor, float]:
    """The launches' ``p_table`` (the DCT table of a DCT batch) and ``p_scale`` (a sign batch's 1/sqrt(r))."""
    kind = basis_kind(ps[0])
    if kind == BASIS_DCT:
        return ps[0].table, 1.0
    return placeholder, scale_of(ps[0].shape[1]) if kind == BASIS_SIGNS else 1.0


def _absmax_rows(
    moments: _BatchMoments, key: str, signed: bool, same_layout: bool, rows: dict[str, Any], dev: torch.device
) -> tuple[int, tuple[int, int], Tensor | None]:
    """One moment's storage kind, and for 8-bit codes its absmaxes' strides and code table, their pointer row
    added to ``rows`` (under ``key``); for other storage, placeholder strides and no table."""
    absmaxes = moments.absmaxes
    kind = moment_kind(
        moments.values[0], None if absmaxes is None else absmaxes[0], "exp_avg" if signed else "exp_avg_sq"
    )
    if kind != MOMENT_INT8:
        return kind, (0, 0), None
    what = "exp_avg_absmax" if signed else "exp_avg_sq_absmax"
    strides = absmaxes[0].stride() if same_layout else check_same_layout(absmaxes, what)
    check_writable(absmaxes[0], what)
    rows[key] = absmaxes
    return kind, strides, code_table(signed, dev)


def _project_launch(
    ws: list[Tensor],
    gs: list[Tensor],
    ps: list[Tensor],
    ms: list[Tensor | Moment],
    vs: list[Tensor | Moment],
    hyper: Tensor,
    side: str,
    blocks: Blocks | None,
    precision: str,
    resid: bool,
    same_layout: bool = False,
    seeds: list[int] | None = None,
) -> _Launched:
    """Launch 1 for one batch of same-shape, same-layout, same-storage matrices, on their device: the
    moments updated in place, N in a fresh buffer (with ``resid``, also R and ||G_j||^2 per channel).

    Every operand is addressed through its own strides, so any non-overlapping layout works: column-major
    or sliced moments (as ``load_state_dict`` may restore them), a transposed basis, a strided gradient.
    ``same_layout``: the caller grouped the batch by every tensor's shape, strides, dtype and device
    (``subspace_adamw`` does), so the first member's layout is every member's and is not checked again.
    Every pointer table of both launches is one host table, copied to the device at once (``pointer_tables``).
    """
    dev = gs[0].device
    ms, vs = _batch_moments(ms), _batch_moments(vs)
    lay = _project_layout(ws, gs, ps, ms, vs, side, same_layout)
    nbuf = torch.empty((len(gs), *lay.rshape), dtype=torch.float32, device=dev)
    rows: dict[str, Any] = {"w": ws, "g": gs, "p": [_basis_pointer(p) for p in ps], "m": ms.values, "v": vs.values}
    rows["n"] = nbuf
    if seeds is not None:  # the back launch's stochastic rounding seeds travel in the same table
        rows["rounding"] = seeds
    m_kind, mq_strides, m_table = _absmax_rows(ms, "mq", True, same_layout, rows, dev)
    v_kind, vq_strides, v_table = _absmax_rows(vs, "vq", False, same_layout, rows, dev)
    rbuf = sqbuf = None
    if resid:
        rbuf = torch.empty_like(nbuf)
        sqbuf = torch.empty((len(gs), lay.n if side == "left" else lay.m), dtype=torch.float32, device=dev)
        rows.update(r=rbuf, sq=sqbuf)
    tables = pointer_tables(rows, dev)
    if side == "left":  # R = P^T G: A = P^T (r x m), B = G (m x n)
        a_arr, sa, b_arr, sb, (rm, rn, rk) = tables["p"], lay.p[::-1], tables["g"], lay.g, (lay.r, lay.n, lay.m)
    else:  # R = G P: A = G (m x n), B = P (n x r)
        a_arr, sa, b_arr, sb, (rm, rn, rk) = tables["g"], lay.g, tables["p"], lay.p, (lay.m, lay.r, lay.n)
    kind, p_dtype = basis_kind(ps[0]), basis_dtype(ps[0])
    cfg = project_config(side, gs[0].dtype, p_dtype, m_kind, v_kind, resid, precision, rn, blocks, basis=kind)
    grid = (triton.cdiv(rm, cfg["BM"]) * triton.cdiv(rn, cfg["BN"]), len(gs))
    placeholder = tables["n"]  # stands for the arrays a variant never reads (no int8 moment, no residual)
    p_table, p_scale = _basis_arguments(ps, hyper)
    n_strides = nbuf.stride()[1:]
    project_adam_kernel[grid](
        a_arr, b_arr, tables["m"], tables["v"], tables["n"], tables.get("mq", placeholder),
        tables.get("vq", placeholder), hyper if m_table is None else m_table, hyper if v_table is None else v_table,
        hyper,
        rm, rn, rk,
        *sa, *sb, *lay.m_values, *lay.v_values, *n_strides, *mq_strides, *vq_strides,
        tables.get("r", placeholder), tables.get("sq", placeholder), p_table, p_scale,
        **cfg,
    )  # fmt: skip
    return _Launched(ws, gs, ps, hyper, side, nbuf, rbuf, sqbuf, tables)


def _factored_first_half(
    ws: list[Tensor],
    gs: list[Tensor],
    ps: list[Tensor],
    ms: list[Tensor | Moment],
    vs: list[Factored],
    hyper: Tensor,
    side: str,
    resid: bool,
    ages: list[int],
    scalars: Callable[[int], AdamScalars],
    lags: list[Tensor] | None,
    betas: tuple[float, float],
    skips: list[Tensor] | None,
    reduce: Callable[[Tensor], Tensor] | None,
    seeds: list[int] | None = None,
) -> _Launched:
    """Launch 1's work for a batch whose second moments are factored (``factored``), in torch: R = P^T G (or G P),
    the moments and N through the reference's own rule and storage helpers (the factors need every tile's row and
    column sums before any N exists, which one launch cannot give), and for a residual R and ||G_j||^2 per channel.
    Launch 2 is the fused kernel, as for every batch: it takes N from the same buffer."""
    from ..functional import _store_moments, _working_moments  # the reference's moment storage, shared

    dev = gs[0].device
    flags = [None] * len(gs) if skips is None else skips
    fixes: list[Lag | None] = [None] * len(gs) if lags is None else lag_factors(ages, lags, betas)
    rs = [project(g.float(), p.float(), side) for g, p in zip(gs, ps, strict=True)]
    moments, saved, m_work, v_work = _working_moments(range(len(gs)), ms, vs, flags)
    rows = [scalars(age) for age in ages]
    directions = moments_directions(rs, m_work, v_work, rows, fixes, flags, [side] * len(gs), reduce)
    _store_moments(moments, saved, m_work, v_work, flags)
    nbuf = torch.stack(directions)
    rows: dict[str, Any] = {"w": ws, "g": gs, "p": [_basis_pointer(p) for p in ps], "n": nbuf}
    if seeds is not None:
        rows["rounding"] = seeds
    rbuf = sqbuf = None
    if resid:
        rbuf = torch.stack(rs)
        sqbuf = torch.stack([channel_sumsq(g.float(), channel_dim(side)) for g in gs])
        rows.update(r=rbuf, sq=sqbuf)
    return _Launched(ws, gs, ps, hyper, side, nbuf, rbuf, sqbuf, pointer_tables(rows, dev))


def _back_launch(
    x: _Launched,
    blocks: Blocks | None,
    precision: str,
    residual: str,
    coef: Tensor | None,
) -> None:
    """Launch 2: W <- W (1 - lr wd) - alpha (P N + coef o G) for the batch; with a residual, N already
    holds N - coef o R (``apollo``: no GEMM, U = coef o G); ``coef`` batch x channels, contiguous."""
    ws, gs, ps, side, tables = x.ws, x.gs, x.ps, x.side, x.tables
    m, n = gs[0].shape
    r = ps[0].shape[1]
    g_strides, p_strides, w_strides = gs[0].stride(), basis_strides(ps[0]), ws[0].stride()
    n_strides = x.nbuf.stride()[1:]
    resid = residual != "none"
    if side == "left":  # U = P N: A = P (m x r), B = N (r x n)
        a_arr, sa, b_arr, sb = tables["p"], p_strides, tables["n"], n_strides
    else:  # U = N P^T: A = N (m x r), B = P^T (r x n)
        a_arr, sa, b_arr, sb = tables["n"], n_strides, tables["p"], p_strides[::-1]
    coef = x.hyper if coef is None else coef  # placeholder without a residual
    kind = basis_kind(ps[0])
    stochastic = "rounding" in tables  # launch 1 put the batch's rounding seeds in its pointer table
    cfg = back_config(
        side,
        ws[0].dtype,
        gs[0].dtype,
        basis_dtype(ps[0]),
        residual,
        precision,
        blocks,
        basis=kind,
        stochastic=stochastic,
    )
    grid = (triton.cdiv(m, cfg["BM"]) * triton.cdiv(n, cfg["BN"]), len(gs))
    p_table, p_scale = _basis_arguments(ps, x.hyper)
    rounding = tables["rounding"] if cfg["STOCHASTIC"] else tables["w"]  # placeholder
    back_update_kernel[grid](
        a_arr, b_arr, tables["w"], x.hyper,
        m, n, r,
        *sa, *sb, *w_strides,
        tables["g"], *g_strides, coef, coef.stride(0) if resid else 0, p_table, p_scale, rounding,
        **cfg,
    )  # fmt: skip


def _residual_between(
    launched: list[_Launched],
    members: list[list[int]],
    bases: Sequence[Tensor],
    residual: str,
    update_norms: Sequence[Tensor],
    units: Tensor,
    scale: float,
    reduce: Callable[[Tensor], Tensor] | None,
    skipped: Sequence[Tensor] | None = None,
    limiter: str = "corrected",
) -> list[Tensor]:
    """Between the launches, for every batch at once: the residual's coefficients from launch 1's low-rank
    buffers (never G), in matrix order (so row-sharded ranks, whose batches may group differently, make
    the same ``reduce`` call) through ``residual_rule.residual_coefficients`` (the reference's own), which also
    updates the limiter state; then each batch's N turned into N - coef o R. Returns each batch's coef
    (batch x channels, contiguous). ``units``: ``residual_rule.limiter_units`` per matrix (fp64, on the device).
    A ``skipped`` matrix's buffers were never written: its garbage stays in its own rows."""
    per_channel = residual not in PER_MATRIX  # one channel per matrix, the whole matrix
    pieces: list[Tensor | None] = [None] * len(bases)
    for x, idx in zip(launched, members, strict=True):
        dim = channel_dim(x.side) + 1  # the batch axis comes first
        sumsq = torch.stack((x.nbuf.square().sum(dim), x.rbuf.square().sum(dim), x.sqbuf), dim=-1)  # b x ch x 3
        for j, i in enumerate(idx):
            pieces[i] = sumsq[j] if per_channel else sumsq[j].sum(0, keepdim=True)
    coefs = residual_coefficients(
        torch.cat(pieces),
        [t.shape[0] for t in pieces],
        bases=bases,
        update_norms=update_norms,
        units=units,
        mode=residual,
        scale=scale,
        reduce=reduce,
        skipped=skipped,
        limiter=limiter,
    )
    out = []
    for x, idx in zip(launched, members, strict=True):
        channels = x.sqbuf.shape[1]
        dim = channel_dim(x.side) + 1
        batch_coef = torch.stack([coefs[i].expand(channels) for i in idx])
        if residual not in WHOLE_GRADIENT:  # B of launch 2 becomes N - coef o R (in place: N is this step's temporary)
            x.nbuf.sub_(x.rbuf.mul_(batch_coef.unsqueeze(dim)))
        out.append(batch_coef.contiguous())
    return out


def layout_batches(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    bases: Sequence[Tensor],
    exp_avgs: Sequence[Tensor | Moment],
    exp_avg_sqs: Sequence[Tensor | Moment],
    sides: Sequence[str],
    rounding_seeds: Sequence[int | None] | None = None,
) -> list[list[int]]:
    """The matrices of a ``subspace_adamw`` call grouped into launch batches: the same side and every tensor's
    shape, strides, dtype and device (a batch shares one layout, ``_project_launch``'s ``same_layout``), and
    whether it is rounded stochastically. ``params[i]`` as the launch sees it, viewed as its gradient's shape."""
    out: dict[tuple, list[int]] = {}
    for i, (g, w) in enumerate(zip(grads, params, strict=True)):
        if sides[i] not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', got {sides[i]!r}")
        m, v = as_moment(exp_avgs[i]), exp_avg_sqs[i]
        v = v if type(v) is Factored else as_moment(v)  # factors: their own layouts (and their own first half)
        rounded = rounding_seeds is not None and rounding_seeds[i] is not None
        key = (
            sides[i],
            _layout(g),
            _layout(w),
            _layout(bases[i]),
            *map(_layout, m),
            type(v),
            *map(_layout, v),
            rounded,
        )
        out.setdefault(key, []).append(i)
    return list(out.values())


def _layout(t: Tensor | Signs | DctColumns | None) -> tuple | None:
    if t is None:
        return None
    if type(t) is Signs:
        return ("signs", t.shape)
    if type(t) is DctColumns:  # one table per batch (the launch reads one)
        return ("dct", t.shape, t.table.data_ptr(), t.index.get_device())
    return (t.shape, t.stride(), t.dtype, t.get_device())


def _scalar_table(
    steps: list[int],
    scalars: Callable[[int], AdamScalars],
    skipped: list[Tensor] | None,
    lags: list[Tensor] | None,
    betas: tuple[float, float],
    dev: torch.device,
) -> Tensor:
    """One batch's scalar table on its device (``SCALAR_COLUMNS``): each member's ``AdamScalars`` by age, its
    skip flag copied on the device, and alpha and sqrt(1 - b2^t) corrected by the lags (``adam_rule.Lag``; exact
    1.0 where the host count does not run ahead). Call under ``device_guard(dev)``."""
    by_age: dict[int, list[float]] = {}  # a batch's members usually share one age: one row, reused
    rows = [by_age[t] if t in by_age else by_age.setdefault(t, _scalar_row(scalars(t))) for t in steps]
    hyper = host_table(rows, torch.float32, dev)
    if skipped is not None:
        hyper[:, COLUMN["skip"]].copy_(torch.stack(skipped))
    if lags is not None:
        fix = lag_vectors(steps, lags, betas)
        hyper[:, COLUMN["alpha"]].mul_(fix.c1)
        hyper[:, COLUMN["bias2_sqrt"]].div_(fix.c2)
    return hyper


def _scalar_row(s: AdamScalars) -> list[float]:
    """A member's row of the scalar table: its scalars in ``SCALAR_COLUMNS`` order, and no skip flag."""
    return [0.0 if name == "skip" else getattr(s, name) for name in SCALAR_COLUMNS]


def subspace_adamw(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    bases: Sequence[Tensor],
    exp_avgs: Sequence[Tensor | Moment],
    exp_avg_sqs: Sequence[Tensor | Moment],
    steps: Sequence[int],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    scale: float,
    sides: Sequence[str],
    matmul_precision: str = "ieee",
    residual: str = "none",
    update_norms: Sequence[Tensor] | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
    limiter: str = "corrected",
    skipped: Sequence[Tensor] | None = None,
    lags: Sequence[Tensor] | None = None,
    batches: Sequence[Sequence[int]] | None = None,
    rounding_seeds: Sequence[int | None] | None = None,
    blocks: Blocks | None = None,
) -> None:
    """The Triton twin of ``functional.subspace_adamw``: the same arguments (``functional.TWIN_ONLY``: also
    ``blocks``, the tiles), the same update, in place. Matrices sharing side, shapes, dtypes, strides and
    storage form one batch: two kernel launches per batch, whatever its size; moments are converted inside the
    kernel. ``matmul_precision="tf32"`` trades the reference's fp32 GEMM semantics for tensor-core speed. The
    residual adds no GEMM and no pass over G (module docstring). ``skipped`` flags are copied on the device
    into the scalar table, which both kernels read first; the lags correct the table there."""
    if {len(x) for x in (params, bases, exp_avgs, exp_avg_sqs, steps, sides)} != {len(grads)}:
        raise ValueError("subspace_adamw: every argument list needs one entry per matrix")
    ws = [w if w.shape == g.shape else w.view(g.shape) for w, g in zip(params, grads, strict=True)]
    if batches is None:
        batches = layout_batches(ws, grads, bases, exp_avgs, exp_avg_sqs, sides, rounding_seeds)
    members = [list(idx) for idx in batches]
    scalars = scalars_by_age(lr, betas, eps, weight_decay, scale)
    launched = []
    for idx in members:
        dev = grads[idx[0]].device
        with device_guard(dev):
            flags = None if skipped is None else [skipped[i] for i in idx]
            lag, ages = (None if lags is None else [lags[i] for i in idx]), [steps[i] for i in idx]
            hyper = _scalar_table(ages, scalars, flags, lag, betas, dev)
            batch = [[t[i] for i in idx] for t in (ws, grads, bases, exp_avgs, exp_avg_sqs)]
            late = (ages, scalars, lag, betas, flags, reduce)  # what a factored batch's torch half also needs
            side, seeds = sides[idx[0]], _batch_seeds(rounding_seeds, idx)  # seeds: the back launch's rounding
            launched.append(
                _first_launch(batch, hyper, side, residual != "none", blocks, matmul_precision, late, seeds)
            )
    coefs = None
    if residual != "none":
        units = limiter_units(limiter, [scalars(t) for t in steps], steps, lags, betas, grads[0].device)
        coefs = _residual_between(
            launched, members, bases, residual, update_norms, units, scale, reduce, skipped, limiter
        )
    for b, x in enumerate(launched):
        with device_guard(x.gs[0].device):
            _back_launch(x, blocks, matmul_precision, residual, None if coefs is None else coefs[b])


def _first_launch(
    batch: list[list],
    hyper: Tensor,
    side: str,
    resid: bool,
    blocks: Blocks | None,
    precision: str,
    late: tuple,
    seeds: list[int] | None,
) -> _Launched:
    """Launch 1 of one batch: the fused kernel, or for factored second moments its work in torch, which reads the
    bases materialized (``_factored_first_half``). ``seeds``: the batch's stochastic rounding seeds, put in the pointer
    table both launches read (one host-to-device copy per batch)."""
    if type(batch[4][0]) is not Factored:
        return _project_launch(*batch, hyper, side, blocks, precision, resid, True, seeds)
    dev = batch[1][0].device
    batch[2] = [p if isinstance(p, Tensor) else p.materialize(dev) for p in batch[2]]
    return _factored_first_half(*batch, hyper, side, resid, *late, seeds)


def _batch_seeds(rounding_seeds: Sequence[int | None] | None, idx: list[int]) -> list[int] | None:
    """A batch's stochastic rounding seeds, or None: it rounds to nearest (every member, or none, has a seed)."""
    seeds = None if rounding_seeds is None else [rounding_seeds[i] for i in idx]
    return None if seeds is None or None in seeds else seeds  # type: ignore[return-value]
