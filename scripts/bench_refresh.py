"""Subspace refresh time and captured energy (vs the exact SVD) on LLaMA projection shapes.

Per engine, a refresh of every matrix: galore-torch 1.0 (full SVD of each gradient) and
``functional.refresh_bases`` with refresh="rsvd" (cold) and "warm" on each engine: ``engine="reference"``
(``linalg.range_finder`` over the reference products, one matrix at a time) and ``engine="triton"`` (its
twin ``kernels.refresh_bases``: the same ``linalg.range_finder`` over ``kernels.refresh.KernelProducts``,
batched by shape, in-kernel Gaussian sketch). Each is run ``--warmup`` times untimed (compilation,
allocator and cuSOLVER/cuBLAS set-up excluded) and then ``--repeats`` times; the median is reported.
Times are ratios against galore-torch's refresh and against one fused AdamW step.

The gradients are gradient-like, not iid noise: a rank-4r part with a power-law spectrum (s_i = 1/(i+1))
plus iid noise carrying about a sixth of the energy. The warm starts are the exact top-r bases of the
gradient one refresh earlier: the same construction with both singular-vector sets perturbed and fresh
noise, so the dominant subspace has drifted. Captured energy is ||P^T G||^2 / ||G||^2, summed over the
matrices, relative to the exact top-r SVD's.

    python scripts/bench_refresh.py --model 7b-layer --markdown docs/benchmarks.md   # GPU
    python scripts/bench_refresh.py --model 60m                    # CPU (1 thread) or GPU
    python scripts/bench_refresh.py --smoke [--kernels]            # CPU: seconds; about a minute with --kernels

With ``--kernels`` on CPU the triton rows run under TRITON_INTERPRET=1 (engine="triton" is obeyed there):
that checks the wiring, not the speed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from typing import Any

from bench_step import CPU_MODELS, environment, make_params, sync, timed, write_outputs


def gradient_pair(torch: Any, m: int, n: int, rank: int, drift: float, gen: Any, device: str) -> tuple[Any, Any]:
    """(G, G_prev), fp32: G = U diag(s) V^T + noise with L = min(4 rank, m, n) near-orthonormal Gaussian
    directions and s_i = 1/(i+1); G_prev uses U + drift E, V + drift F (E, F Gaussian at U's scale) and its
    own noise. The noise is scaled to a fifth of the low-rank part's energy (a sixth of the total)."""
    k = min(4 * rank, m, n)
    s = 1.0 / torch.arange(1, k + 1, device=device, dtype=torch.float32)
    sigma = (0.2 * float(s.square().sum()) / (m * n)) ** 0.5

    def draw(rows: int, cols: int, scale: float) -> Any:
        return scale * torch.randn(rows, cols, generator=gen, device=device)

    u, v = draw(m, k, m**-0.5), draw(n, k, n**-0.5)
    g = (u * s) @ v.T + draw(m, n, sigma)
    u.add_(draw(m, k, drift * m**-0.5))
    v.add_(draw(n, k, drift * n**-0.5))
    g_prev = (u * s) @ v.T + draw(m, n, sigma)
    return g, g_prev


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["60m", "1b", "7b-layer"], default="7b-layer")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--kernels", action="store_true", help="on CPU: also run the kernels interpreted")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: 1 on CPU, torch's on CUDA)")
    parser.add_argument("--oversample", type=int, default=8)
    parser.add_argument("--power-iters", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each method first")
    parser.add_argument("--repeats", type=int, help="timed runs of each method, median reported (default 5; smoke 2)")
    parser.add_argument("--drift", type=float, default=0.3, help="how far the previous gradient's subspace is")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args()
    model = "smoke" if args.smoke else args.model
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu" and args.kernels:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are first imported
    if device == "cpu" and model not in CPU_MODELS:
        sys.exit(f"--model {model} needs a GPU; on CPU use --model 60m or --smoke (the GPU numbers are owed)")
    threads = args.threads or (1 if device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)

    from subspace_optim import functional, linalg, subspace

    repeats = args.repeats or (2 if args.smoke else 5)
    params, rank = make_params(torch, model, device, torch.bfloat16)
    if args.smoke:
        params = params[:7]  # one layer: keeps the interpreted kernels under a minute
    gen = torch.Generator(device=device).manual_seed(1)
    starts = []
    for p in params:
        g, g_prev = gradient_pair(torch, *p.shape, rank, args.drift, gen, device)
        p.grad = g.to(p.dtype)
        side = subspace.choose_side("std", *p.shape)
        starts.append(linalg.svd_basis(g_prev, rank, side).basis)  # the best basis the last refresh could give
        del g, g_prev
    grads = [p.grad for p in params]
    sides = [subspace.choose_side("std", *g.shape) for g in grads]
    notes = ["apollo-torch not installed: skipped"] if importlib.util.find_spec("apollo_torch") is None else []
    if args.smoke:
        notes.append("CPU smoke run: checks the pipeline only; no claim is made from it")

    exact = [linalg.svd_basis(g, rank, s) for g, s in zip(grads, sides, strict=True)]
    exact_frac = sum(float(b.captured) for b in exact) / sum(float(b.total) for b in exact)

    def fraction(bases: list[Any]) -> float:
        cap = sum(
            float(linalg.captured_energy(subspace.oriented(g.float(), s), p))
            for g, s, p in zip(grads, sides, bases, strict=True)
        )
        return cap / sum(float(b.total) for b in exact)

    results: dict[str, dict[str, Any]] = {}

    def record(name: str, fn: Any) -> None:
        for _ in range(args.warmup):
            bases = fn()
        times = []
        for _ in range(repeats):
            sync(torch, device)
            start = time.perf_counter()
            bases = fn()
            sync(torch, device)
            times.append(time.perf_counter() - start)
        results[name] = {
            "refresh_s": statistics.median(times),
            "refresh_s_runs": times,
            "captured_vs_svd": fraction(bases) / exact_frac,
        }

    if importlib.util.find_spec("galore_torch") is not None:
        from galore_torch.galore_projector import GaLoreProjector

        def galore() -> list[Any]:
            out = []
            for g in grads:
                proj = GaLoreProjector(rank, update_proj_gap=1, proj_type="std")
                proj.project(g, 0)
                out.append(proj.ortho_matrix.float() if g.shape[0] < g.shape[1] else proj.ortho_matrix.float().mT)
            return out

        record("galore_svd", galore)
    else:
        notes.append("galore-torch not installed: skipped")

    seeds = list(range(len(grads)))
    kw = dict(sides=sides, rank=rank, oversample=args.oversample, power_iters=args.power_iters)

    def ours(engine: str, policy: str) -> Any:
        previous = starts if policy == "warm" else [None] * len(grads)
        return lambda: [
            b.basis for b in functional.refresh_bases(grads, previous, seeds, policy=policy, engine=engine, **kw)
        ]

    engines = ["reference"]
    if device == "cuda" or args.kernels:
        if importlib.util.find_spec("triton") is not None:
            engines.append("triton")
            if device == "cpu":
                notes.append("triton rows ran under TRITON_INTERPRET=1: their CPU times are meaningless")
        else:
            notes.append("triton not installed: kernel engine skipped")
    for engine in engines:
        for policy in ("rsvd", "warm"):
            record(f"{engine}_{policy}", ours(engine, policy))

    adamw = torch.optim.AdamW(params, lr=1e-3, fused=(device == "cuda") or None)
    adamw_step = timed(torch, device, adamw.step, 3)
    gal = results.get("galore_svd")
    rows = []
    for name, r in results.items():
        r["vs_adamw_step"] = r["refresh_s"] / adamw_step
        if gal:
            r["vs_galore"] = r["refresh_s"] / gal["refresh_s"]
        rows.append(
            [
                name,
                f"{r['refresh_s'] * 1e3:.1f}",
                f"{r.get('vs_galore', float('nan')):.3f}",
                f"{r['vs_adamw_step']:.1f}",
                f"{r['captured_vs_svd']:.4f}",
            ]
        )
    result = {
        "benchmark": "refresh",
        "model": model,
        "rank": rank,
        "warmup": args.warmup,
        "repeats": repeats,
        "drift": args.drift,
        "exact_svd_captured": exact_frac,
        "adamw_step_s": adamw_step,
        "environment": environment(torch, device),
        "results": results,
        "notes": notes,
    }
    header = ["refresh", "ms (all matrices)", "x GaLore SVD", "x AdamW step", "captured / SVD"]
    write_outputs(result, rows, header, args, "Refresh")


if __name__ == "__main__":
    main()
