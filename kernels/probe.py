"""A first-use self-check of the Triton engine on a device, against the reference engine.

``engine="auto"`` promises a drop-in optimizer: if the kernels cannot compile or launch on a device (an
old GPU, a Triton build without fp64 ``tl.dot``, a driver problem) or, worse, compile to wrong numbers,
training must continue on the PyTorch path rather than crash or silently diverge. The optimizer therefore
runs this probe once per device before the first kernel launch there; ``engine="triton"`` turns a
failure into an error instead.

The probe covers what the optimizer launches: the fused step (both sides, fp32 and bf16 weights, a batch
of two; and low-precision state: bf16 moments with a bf16 basis, 8-bit moments) and a cold and a warm
batched refresh, each on small random matrices whose shapes are not
multiples of the tile sizes. Results are compared with ``adam_rule.projected_adamw`` and the
range-finder's captured energy, with the tolerances of the kernel tests.
"""

from __future__ import annotations

import torch


def _step_error(
    device: torch.device, wdtype: torch.dtype, precision: str, side: str, gen: torch.Generator
) -> str | None:
    from subspace_optim import adam_rule, linalg, subspace

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
        adam_rule.projected_adamw(p_ref, g, b, m_ref, v_ref, adam_rule.adam_scalars(**group, age=3), side)
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


def _low_precision_error(device: torch.device, gen: torch.Generator) -> str | None:
    """The fused step on bf16 moments with a bf16 basis (right) and on 8-bit moments (left, 300 columns:
    two quantization blocks per row), against ``functional.subspace_adamw(engine="reference")``: W within
    fp32 rounding, moments within a bf16 ulp / one step of the 8-bit map."""
    from subspace_optim import functional, linalg, quant

    from .step import subspace_adamw

    group = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, "scale": 0.25}
    for kind, bdtype, side, (m, n, r) in (
        ("bfloat16", torch.bfloat16, "right", (37, 29, 5)),
        ("int8", torch.float32, "left", (7, 300, 3)),
    ):
        d = m if side == "left" else n
        shape = (r, n) if side == "left" else (m, r)
        ws, gs, ps, states = [], [], [], []
        for _ in range(2):
            ws.append(torch.randn(m, n, generator=gen).to(device))
            gs.append(torch.randn(m, n, generator=gen).to(device))
            ps.append(linalg.orthonormalize(torch.randn(d, r, generator=gen)).to(device=device, dtype=bdtype))
            st = {**quant.zeros(shape, kind, device, "exp_avg"), **quant.zeros(shape, kind, device, "exp_avg_sq")}
            quant.store(st, "exp_avg", torch.randn(*shape, generator=gen).to(device))
            quant.store(st, "exp_avg_sq", torch.rand(*shape, generator=gen).to(device))
            states.append(st)
        results = {}
        for which in ("reference", "triton"):
            weights, copies = [w.clone() for w in ws], [{k: v.clone() for k, v in st.items()} for st in states]
            ms, vs = [quant.moment(st, "exp_avg") for st in copies], [quant.moment(st, "exp_avg_sq") for st in copies]
            # The kernels through .step, as above: never through the package attribute a caller may wrap.
            run = functional.subspace_adamw if which == "reference" else subspace_adamw
            run(weights, gs, ps, ms, vs, [3, 3], **group, sides=[side, side])
            results[which] = (weights, copies)
        worst = 0.0
        (w_ref, s_ref), (w_tri, s_tri) = results["reference"], results["triton"]
        for i in range(2):
            worst = max(worst, float((w_tri[i].double() - w_ref[i].double()).abs().max()) / 1e-5)
            for key in ("exp_avg", "exp_avg_sq"):
                a, b = quant.load(s_ref[i], key).double(), quant.load(s_tri[i], key).double()
                if kind == "int8":  # the map's steps are at most ~1.4e-2 of the block's absmax
                    tol = 2e-2 * s_ref[i][key + "_absmax"].double().amax()
                else:  # one bf16 ulp
                    tol = a.abs() * 2.0**-7 + 1e-30
                worst = max(worst, float(((b - a).abs() / tol).max()))
        if not worst <= 1.0:  # also catches NaN
            where = f"{kind} moments, {bdtype} basis, {side}"
            return f"fused step ({where}) differs from the reference ({worst:.3g} x tolerance)"
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
        error = _low_precision_error(device, gen) or _refresh_error(device, gen)
        if error:
            return error
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as err:  # noqa: BLE001 - any compile or launch failure means "do not use the kernels"
        return f"{type(err).__name__}: {err}"
    return None
