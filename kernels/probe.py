"""A first-use self-check of the Triton engine on a device, against the reference engine.

``engine="auto"`` promises a drop-in optimizer: if the kernels cannot compile or launch on a device (an
old GPU, a Triton build without fp64 ``tl.dot``, a driver problem) or, worse, compile to wrong numbers,
training must continue on the PyTorch path rather than crash or silently diverge. The optimizer therefore
runs this probe once per device before the first kernel launch there; ``engine="triton"`` turns a
failure into an error instead.

The probe covers what the optimizer launches: the fused step (both sides, fp32 and bf16 weights, a batch
of two) and a cold and a warm batched refresh, each on small random matrices whose shapes are not
multiples of the tile sizes. Results are compared with ``inner.projected_adamw`` and the
range-finder's captured energy, with the tolerances of the kernel tests.
"""

from __future__ import annotations

import torch


def _step_error(
    device: torch.device, wdtype: torch.dtype, precision: str, side: str, gen: torch.Generator
) -> str | None:
    from subspace_optim import inner, linalg, subspace

    from .step import subspace_adamw

    m, n, r = 37, 29, 5
    d = subspace.basis_dim(side, m, n)
    group = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, "scale": 0.25}
    params, grads, bases, ms, vs = [], [], [], [], []
    for _ in range(2):
        params.append(torch.randn(m, n, generator=gen).to(device=device, dtype=wdtype))
        grads.append(torch.randn(m, n, generator=gen).to(device=device, dtype=wdtype))
        bases.append(linalg.orthonormalize(torch.randn(d, r, generator=gen)).to(device))
        shape = (r, n) if side == "left" else (m, r)
        ms.append(torch.randn(*shape, generator=gen).to(device))
        vs.append(torch.rand(*shape, generator=gen).to(device))
    expected = []
    for p, g, b, mm, vv in zip(params, grads, bases, ms, vs, strict=True):
        # The reference in fp32 on an fp32 copy of W: the kernel must match it up to W's own rounding.
        p_ref, m_ref, v_ref = p.float(), mm.clone(), vv.clone()
        inner.projected_adamw(p_ref, g, b, m_ref, v_ref, inner.adam_scalars(**group, age=3), side)
        expected.append((p_ref, m_ref, v_ref))
    subspace_adamw(params, grads, bases, ms, vs, [3, 3], **group, sides=[side, side], matmul_precision=precision)
    tol = 1e-5 if wdtype == torch.float32 else 8e-3  # half a bf16 ulp at |W| ~ 3
    moment_tol = 1e-5 if precision == "ieee" else 1e-3  # TF32 rounds P to 10 bits: |R| ~ 6 moves by ~3e-3
    for (p_ref, m_ref, v_ref), p, mm, vv in zip(expected, params, ms, vs, strict=True):
        worst = max(
            float((p.double() - p_ref).abs().max()) / tol,
            float((mm.double() - m_ref).abs().max()) / moment_tol,
            float((vv.double() - v_ref).abs().max()) / moment_tol,
        )
        if not worst <= 1.0:  # also catches NaN
            return f"fused step ({side}, {wdtype}, {precision}) differs from the reference ({worst:.3g} x tolerance)"
    return None


def _refresh_error(device: torch.device, gen: torch.Generator) -> str | None:
    from .refresh import refresh_bases

    m, n, r = 45, 27, 4
    grads = [torch.randn(m, n, generator=gen).to(device) for _ in range(2)]
    kw = dict(sides=["right", "right"], rank=r, oversample=4, power_iters=1)
    cold = refresh_bases(grads, [None, None], [1, 2], **kw)
    warm = refresh_bases(grads, [p for p, _, _ in cold], [3, 4], **kw)
    for g, (p, captured, total) in zip(grads * 2, [*cold, *warm], strict=True):
        s2 = torch.linalg.svdvals(g.double().cpu()).square()
        best = float(s2[:r].sum())
        ortho = float((p.mT @ p - torch.eye(r, device=p.device)).abs().max())
        ok = ortho < 1e-4 and abs(float(total) - float(s2.sum())) <= 1e-6 * float(s2.sum())
        if not (ok and 0.9 * best <= float(captured) <= best * (1 + 1e-6)):
            ratio = float(captured) / best
            return f"refresh differs from the reference (orthonormality {ortho:.3g}, captured/SVD {ratio:.4f})"
    return None


def probe(device: torch.device) -> str | None:
    """None when the kernels compile, launch and agree with the reference on ``device``; else why not."""
    gen = torch.Generator().manual_seed(20261123)
    try:
        # The optimizer's matmul_precision="auto" pairs: ieee for fp32 weights, TF32 for bf16 weights.
        for wdtype, precision in ((torch.float32, "ieee"), (torch.bfloat16, "tf32")):
            for side in ("left", "right"):
                error = _step_error(device, wdtype, precision, side, gen)
                if error:
                    return error
        error = _refresh_error(device, gen)
        if error:
            return error
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as err:  # noqa: BLE001 - any compile or launch failure means "do not use the kernels"
        return f"{type(err).__name__}: {err}"
    return None
