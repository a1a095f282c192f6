"""The fused projected-AdamW step: two batched GEMM launches per group of same-shape matrices.

Launch 1 (projection + moments), with R = P^T G (left) or G P (right):
    M <- b1 M + (1 - b1) R;   V <- b2 V + (1 - b2) R o R;   N = M / (sqrt(V) / sqrt(1 - b2^t) + eps)
Launch 2 (back-projection + weight update), with U = P N (left) or N P^T (right):
    W <- W (1 - lr wd) - (lr scale / (1 - b1^t)) U

R and U exist only tile by tile in registers; the only temporary is N, which has the moments' low-rank
shape. W (bf16 or fp32) is read and written once, rounded once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..inner import adam_scalars
from ._common import (
    Blocks,
    check_same_layout,
    check_writable,
    default_blocks,
    device_guard,
    host_table,
    pointer_array,
    tl_dtype,
)
from .gemm import dot_tile, tile_ids

# The per-member table holds ``inner.AdamScalars`` in field order (w1, b2, w2, eps, sqrt(1 - b2^t), alpha,
# decay), padded to 8 columns: one fp32 row per matrix of a batch.


@triton.jit
def project_adam_kernel(
    a_ptrs,
    b_ptrs,
    m_ptrs,
    v_ptrs,
    n_ptrs,
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
    A_DT: tl.constexpr,
    B_DT: tl.constexpr,
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

    M and V are updated in place (fp32); N is written for the back-projection launch. M, V and N each
    have their own strides (a checkpoint may restore column-major or sliced moments; N is a fresh buffer).
    Both divisions are IEEE round-to-nearest (``div_rn``): a plain ``/`` compiles to an approximate
    division on NVIDIA GPUs.
    """
    bid = tl.program_id(1)
    pid_m, pid_n = tile_ids(M, N, BM, BN, GROUP_M)
    a = tl.load(a_ptrs + bid).to(tl.pointer_type(A_DT))
    b = tl.load(b_ptrs + bid).to(tl.pointer_type(B_DT))
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    rn = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    r = dot_tile(a, b, 0, rm, rn, M, N, K, sa0, sa1, sb0, sb1, 0, 0, 1.0, False, False, PRECISION, BM, BN, BK)

    h = hyper + bid * 8
    w1 = tl.load(h + 0)
    b2 = tl.load(h + 1)
    w2 = tl.load(h + 2)
    eps = tl.load(h + 3)
    bc2 = tl.load(h + 4)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    m_off = rm[:, None] * sm0 + rn[None, :] * sm1
    v_off = rm[:, None] * sv0 + rn[None, :] * sv1
    mp = tl.load(m_ptrs + bid).to(tl.pointer_type(tl.float32))
    vp = tl.load(v_ptrs + bid).to(tl.pointer_type(tl.float32))
    np_ = tl.load(n_ptrs + bid).to(tl.pointer_type(tl.float32))
    m_old = tl.load(mp + m_off, mask=mask, other=0.0)
    v_old = tl.load(vp + v_off, mask=mask, other=0.0)
    m_new = tl.where(w1 < 0.5, m_old + w1 * (r - m_old), r - (r - m_old) * (1.0 - w1))
    v_new = v_old * b2 + w2 * (r * r)
    n = tl.div_rn(m_new, tl.div_rn(tl.sqrt_rn(v_new), bc2) + eps)
    tl.store(mp + m_off, m_new, mask=mask)
    tl.store(vp + v_off, v_new, mask=mask)
    tl.store(np_ + rm[:, None] * sn0 + rn[None, :] * sn1, n, mask=mask)


@triton.jit
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
    A_DT: tl.constexpr,
    B_DT: tl.constexpr,
    W_DT: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """U = A @ B (A = P, B = N for a left basis; A = N, B = P^T for a right one), then in the epilogue

        W <- W (1 - lr wd) - alpha U,   alpha = lr scale / (1 - b1^t)

    computed in fp32 and rounded once (to nearest even) to W's dtype, in place.
    """
    bid = tl.program_id(1)
    pid_m, pid_n = tile_ids(M, N, BM, BN, GROUP_M)
    a = tl.load(a_ptrs + bid).to(tl.pointer_type(A_DT))
    b = tl.load(b_ptrs + bid).to(tl.pointer_type(B_DT))
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    rn = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    u = dot_tile(a, b, 0, rm, rn, M, N, K, sa0, sa1, sb0, sb1, 0, 0, 1.0, False, False, PRECISION, BM, BN, BK)

    h = hyper + bid * 8
    alpha = tl.load(h + 5)
    decay = tl.load(h + 6)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    wp = tl.load(w_ptrs + bid).to(tl.pointer_type(W_DT))
    off = rm[:, None] * sw0 + rn[None, :] * sw1
    w = tl.load(wp + off, mask=mask, other=0.0).to(tl.float32)
    w = w * decay - alpha * u
    if ROUND_BF16:
        # Round to nearest even by hand: the interpreter's fp32 -> bf16 cast truncates, the GPU's rounds.
        bits = w.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        w = tl.where(w == w, bits.to(tl.float32, bitcast=True), w)
    tl.store(wp + off, w.to(W_DT), mask=mask)


def _launch_group(
    ws: list[Tensor],
    gs: list[Tensor],
    ps: list[Tensor],
    ms: list[Tensor],
    vs: list[Tensor],
    hyper: Tensor,
    side: str,
    blocks: Blocks,
    precision: str,
) -> None:
    """Both launches for one batch of same-shape, same-layout matrices, on their device.

    Every operand is addressed through its own strides, so any non-overlapping layout works: column-major
    or sliced moments (as ``load_state_dict`` may restore them), a transposed basis, a strided gradient.
    """
    dev = gs[0].device
    m, n = gs[0].shape
    r = ps[0].shape[1]
    gst = check_same_layout(gs, "gradients")
    pst = check_same_layout(ps, "bases")
    mst = check_same_layout(ms, "exp_avg")
    vst = check_same_layout(vs, "exp_avg_sq")
    wst = check_same_layout(ws, "weights")
    rshape = (r, n) if side == "left" else (m, r)
    if tuple(ms[0].shape) != rshape or tuple(vs[0].shape) != rshape or ps[0].shape[0] != (m if side == "left" else n):
        raise ValueError(f"{side} basis {tuple(ps[0].shape)} / moments {tuple(ms[0].shape)} do not fit G {(m, n)}")
    for t in ps + ms + vs:
        if t.dtype != torch.float32:
            raise TypeError("bases and moments must be fp32")
    for what, ts in (("weight", ws), ("exp_avg", ms), ("exp_avg_sq", vs)):
        check_writable(ts[0], what)  # same strides across the batch: one check covers it
    batch = len(gs)
    nbuf = torch.empty((batch, *rshape), dtype=torch.float32, device=dev)
    nst = nbuf.stride()[1:]
    g_arr, p_arr = pointer_array(gs, dev), pointer_array(ps, dev)
    n_arr = pointer_array(list(nbuf.unbind(0)), dev)
    common = dict(PRECISION=precision, BM=blocks.m, BN=blocks.n, BK=blocks.k, GROUP_M=8)
    launch = dict(num_warps=blocks.warps, num_stages=blocks.stages)

    if side == "left":  # R = P^T G: A = P^T (r x m), B = G (m x n)
        a_arr, sa, a_dt, b_arr, sb, b_dt, (rm, rn, rk) = (
            p_arr,
            pst[::-1],
            ps[0].dtype,
            g_arr,
            gst,
            gs[0].dtype,
            (r, n, m),
        )
    else:  # R = G P: A = G (m x n), B = P (n x r)
        a_arr, sa, a_dt, b_arr, sb, b_dt, (rm, rn, rk) = g_arr, gst, gs[0].dtype, p_arr, pst, ps[0].dtype, (m, r, n)
    grid = (triton.cdiv(rm, blocks.m) * triton.cdiv(rn, blocks.n), batch)
    project_adam_kernel[grid](
        a_arr, b_arr, pointer_array(ms, dev), pointer_array(vs, dev), n_arr, hyper,
        rm, rn, rk, sa[0], sa[1], sb[0], sb[1], mst[0], mst[1], vst[0], vst[1], nst[0], nst[1],
        A_DT=tl_dtype(a_dt), B_DT=tl_dtype(b_dt), **common, **launch,
    )  # fmt: skip

    if side == "left":  # U = P N: A = P (m x r), B = N (r x n)
        a_arr, sa, b_arr, sb = p_arr, pst, n_arr, nst
    else:  # U = N P^T: A = N (m x r), B = P^T (r x n)
        a_arr, sa, b_arr, sb = n_arr, nst, p_arr, pst[::-1]
    grid = (triton.cdiv(m, blocks.m) * triton.cdiv(n, blocks.n), batch)
    back_update_kernel[grid](
        a_arr, b_arr, pointer_array(ws, dev), hyper,
        m, n, r, sa[0], sa[1], sb[0], sb[1], wst[0], wst[1],
        A_DT=tl.float32, B_DT=tl.float32, W_DT=tl_dtype(ws[0].dtype), ROUND_BF16=ws[0].dtype == torch.bfloat16,
        **common, **launch,
    )  # fmt: skip


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
    matmul_precision: str = "ieee",
    blocks: Blocks | None = None,
) -> None:
    """The Triton twin of ``functional.subspace_adamw``: the same arguments, the same update, in place.

    ``grads[i]`` is matrix i's gradient viewed as G (m x n); ``params[i]`` its weight, of any shape that
    views as (m, n) without a copy. Matrices sharing side, shapes, dtypes and strides form one batch: two
    kernel launches per batch, whatever its size. ``matmul_precision="ieee"`` keeps fp32 GEMM semantics
    (the reference's); ``"tf32"`` trades that for tensor-core speed.
    """
    count = len(grads)
    if {len(x) for x in (params, bases, exp_avgs, exp_avg_sqs, steps, sides)} != {count}:
        raise ValueError("subspace_adamw: every argument list needs one entry per matrix")
    blocks = blocks or default_blocks()
    batches: dict[tuple, list[int]] = {}
    ws = []
    for i in range(count):
        g, w = grads[i], params[i].view(grads[i].shape)
        ws.append(w)
        if sides[i] not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', got {sides[i]!r}")
        key = (sides[i], g.device, tuple(g.shape), g.dtype, g.stride(), w.dtype, w.stride())
        key += tuple((tuple(t.shape), t.stride()) for t in (bases[i], exp_avgs[i], exp_avg_sqs[i]))
        batches.setdefault(key, []).append(i)
    for key, idx in batches.items():
        dev = grads[idx[0]].device
        rows = []
        for i in idx:
            s = adam_scalars(lr, betas, eps, weight_decay, scale, steps[i])
            rows.append([s.w1, s.beta2, s.w2, s.eps, s.bias2_sqrt, s.alpha, s.decay, 0.0])
        with device_guard(dev):
            _launch_group(
                [ws[i] for i in idx],
                [grads[i] for i in idx],
                [bases[i] for i in idx],
                [exp_avgs[i] for i in idx],
                [exp_avg_sqs[i] for i in idx],
                host_table(rows, torch.float32, dev),
                key[0],
                blocks,
                matmul_precision,
            )
