"""Subspace refresh time and captured energy (vs the exact SVD) on LLaMA projection shapes.

Per engine, a refresh of every matrix: galore-torch 1.0 (full SVD of each gradient) and
``functional.refresh_bases`` with refresh="rsvd" (cold) and "warm" on each engine: ``engine="reference"``
(``linalg.range_finder`` over the reference products, one matrix at a time) and ``engine="triton"`` (its
twin ``kernels.refresh_bases``: the same ``linalg.range_finder`` over ``kernels.refresh.KernelProducts``,
batched by shape, in-kernel Gaussian sketch). Each is run ``--warmup`` times untimed (compilation,
allocator and cuSOLVER/cuBLAS set-up excluded) and then ``--repeats`` rounds, interleaved (each round runs every
method once); the median is reported.
Times are ratios against galore-torch's refresh and against one fused AdamW step.

The gradients are gradient-like, not iid noise: a rank-4r part with a power-law spectrum (s_i = 1/(i+1))
plus iid noise carrying about a sixth of the energy. The warm starts are the exact top-r bases of the
gradient one refresh earlier: the same construction with both singular-vector sets perturbed and fresh
noise, so the dominant subspace has drifted. Captured energy is ||P^T G||^2 / ||G||^2, summed over the
matrices, relative to the exact top-r SVD's.

    python -m scripts.bench.refresh --model 7b-layer --json refresh.json   # GPU
    python -m scripts.bench.refresh --model 60m                            # CPU (1 thread) or GPU
    python -m scripts.bench.refresh --smoke [--kernels]                    # CPU: seconds; about a minute with --kernels

``--oversample`` and ``--power-iters`` default to the library's (``subspace_optim.options``).

With ``--kernels`` on CPU the triton rows run under TRITON_INTERPRET=1 (engine="triton" is obeyed there):
that checks the wiring, not the speed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from subspace_optim import functional, linalg, subspace

from . import common

COLUMNS = ["refresh", "ms (all matrices)", "x GaLore SVD", "x AdamW step", "captured / SVD"]


def gradient_pair(
    rows: int, cols: int, rank: int, drift: float, generator: torch.Generator, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, G_prev), fp32: G = U diag(s) V^T + noise with L = min(4 rank, m, n) near-orthonormal Gaussian
    directions and s_i = 1/(i+1); G_prev uses U + drift E, V + drift F (E, F Gaussian at U's scale) and its
    own noise. The noise is scaled to a fifth of the low-rank part's energy (a sixth of the total)."""
    size = min(4 * rank, rows, cols)
    spectrum = 1.0 / torch.arange(1, size + 1, device=device, dtype=torch.float32)
    sigma = (0.2 * float(spectrum.square().sum()) / (rows * cols)) ** 0.5

    def draw(height: int, width: int, scale: float) -> torch.Tensor:
        return scale * torch.randn(height, width, generator=generator, device=device)

    left, right = draw(rows, size, rows**-0.5), draw(cols, size, cols**-0.5)
    grad = (left * spectrum) @ right.T + draw(rows, cols, sigma)
    left.add_(draw(rows, size, drift * rows**-0.5))
    right.add_(draw(cols, size, drift * cols**-0.5))
    return grad, (left * spectrum) @ right.T + draw(rows, cols, sigma)


@dataclass
class Problem:
    """The gradients, their sides, the warm starts (the best bases the last refresh could give) and the exact SVDs."""

    grads: list[torch.Tensor]
    sides: list[str]
    starts: list[torch.Tensor]
    exact: list[Any]
    rank: int

    def fraction(self, bases: list[torch.Tensor]) -> float:
        """Captured energy of ``bases``, summed over the matrices, relative to the exact top-r SVD's."""
        captured = sum(
            float(linalg.captured_energy(subspace.oriented(g.float(), s), p))
            for g, s, p in zip(self.grads, self.sides, bases, strict=True)
        )
        exact = sum(float(b.captured) for b in self.exact)
        return captured / exact


def problem(args: argparse.Namespace, device: str) -> tuple[Problem, list[torch.nn.Parameter]]:
    shape = common.llama_shape(args.model)
    params = common.projected_params(shape, device, torch.bfloat16)
    if args.smoke:
        params = params[:7]  # one layer: keeps the interpreted kernels under a minute
    generator = torch.Generator(device=device).manual_seed(1)
    starts = []
    for param in params:
        grad, previous = gradient_pair(*param.shape, shape.rank, args.drift, generator, device)
        param.grad = grad.to(param.dtype)
        starts.append(linalg.svd_basis(previous, shape.rank, subspace.choose_side("std", *param.shape)).basis)
    grads = [p.grad for p in params]
    sides = [subspace.choose_side("std", *g.shape) for g in grads]
    exact = [linalg.svd_basis(g, shape.rank, s) for g, s in zip(grads, sides, strict=True)]
    return Problem(grads, sides, starts, exact, shape.rank), params


def galore_refresh(task: Problem) -> Callable[[], list[torch.Tensor]]:
    from galore_torch.galore_projector import GaLoreProjector

    def refresh() -> list[torch.Tensor]:
        bases = []
        for grad in task.grads:
            projector = GaLoreProjector(task.rank, update_proj_gap=1, proj_type="std")
            projector.project(grad, 0)
            basis = projector.ortho_matrix.float()
            bases.append(basis if grad.shape[0] < grad.shape[1] else basis.mT)
        return bases

    return refresh


def ours_refresh(task: Problem, engine: str, policy: str, args: argparse.Namespace) -> Callable[[], list]:
    previous = task.starts if policy == "warm" else [None] * len(task.grads)
    seeds = list(range(len(task.grads)))
    sketch = {"oversample": args.oversample, "power_iters": args.power_iters}
    return lambda: [
        b.basis
        for b in functional.refresh_bases(
            task.grads, previous, seeds, sides=task.sides, rank=task.rank, policy=policy, engine=engine, **sketch
        )
    ]


def methods(task: Problem, args: argparse.Namespace, device: str, notes: list[str]) -> dict[str, Callable[[], list]]:
    found = {}
    if importlib.util.find_spec("galore_torch") is not None:
        found["galore_svd"] = galore_refresh(task)
    else:
        notes.append("galore-torch not installed: skipped")
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
            found[f"{engine}_{policy}"] = ours_refresh(task, engine, policy, args)
    return found


def adamw_step_s(params: list[torch.nn.Parameter], device: str) -> float:
    """Median of 3 fused (CUDA) AdamW steps over the same matrices, after one warm-up."""
    adamw = torch.optim.AdamW(params, lr=1e-3, fused=(device == "cuda") or None)
    adamw.step()
    return common.interleaved({"adamw": adamw.step}, 3, device).median("adamw")


def time_methods(
    found: dict[str, Callable[[], list]], task: Problem, args: argparse.Namespace, device: str
) -> dict[str, dict[str, Any]]:
    captured = {}
    for name, refresh in found.items():
        for _ in range(max(1, args.warmup)):
            bases = refresh()
        captured[name] = task.fraction(bases)
    timings = common.interleaved(found, args.repeats, device)
    baseline = "galore_svd" if "galore_svd" in found else "reference_rsvd"
    summary = timings.summary(baseline)
    return {
        name: {
            "refresh_s": summary[name]["median_s"],
            "refresh_s_runs": summary[name]["runs_s"],
            f"vs_{baseline}_paired": summary[name][f"vs_{baseline}"],
            "captured_vs_svd": captured[name],
        }
        for name in found
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["60m", "1b", "7b-layer"], default="7b-layer")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--kernels", action="store_true", help="on CPU: also run the kernels interpreted")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: 1 on CPU, torch's on CUDA)")
    parser.add_argument("--oversample", type=int, default=common.library_default("oversample"))
    parser.add_argument("--power-iters", type=int, default=common.library_default("power_iters"))
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each method first")
    parser.add_argument(
        "--repeats", type=int, help="timed rounds of every method, median reported (default 5; smoke 2)"
    )
    parser.add_argument("--drift", type=float, default=0.3, help="how far the previous gradient's subspace is")
    common.add_output_args(parser)
    args = parser.parse_args(argv)
    args.model = "smoke" if args.smoke else args.model
    args.repeats = args.repeats or (2 if args.smoke else 5)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = common.pick_device("auto", args.smoke)
    if device == "cpu" and args.kernels:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are first imported
    if device == "cpu" and args.model not in common.CPU_MODELS:
        sys.exit(f"--model {args.model} needs a GPU; on CPU use --model 60m or --smoke (the GPU numbers are owed)")
    common.set_threads(args.threads, device)
    notes = ["apollo-torch not installed: skipped"] if importlib.util.find_spec("apollo_torch") is None else []
    notes += ["CPU smoke run: checks the pipeline only; no claim is made from it"] if args.smoke else []
    task, params = problem(args, device)
    results = time_methods(methods(task, args, device, notes), task, args, device)
    adamw_s = adamw_step_s(params, device)
    rows = []
    for name, row in results.items():
        row["vs_adamw_step"] = row["refresh_s"] / adamw_s
        if "galore_svd" in results:
            row["vs_galore"] = row["refresh_s"] / results["galore_svd"]["refresh_s"]
        rows.append(
            [
                name,
                common.cell(row["refresh_s"], ".1f", 1e3),
                common.cell(row.get("vs_galore"), ".3f"),
                common.cell(row["vs_adamw_step"], ".1f"),
                common.cell(row["captured_vs_svd"], ".4f"),
            ]
        )
    exact = sum(float(b.captured) for b in task.exact) / sum(float(b.total) for b in task.exact)
    notes.append(
        f"oversample {args.oversample}, power_iters {args.power_iters}, drift {args.drift}; medians of "
        f"{args.repeats} interleaved rounds after {args.warmup} untimed"
    )
    result = {
        "benchmark": "refresh",
        "model": args.model,
        "rank": task.rank,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "drift": args.drift,
        "exact_svd_captured": exact,
        "adamw_step_s": adamw_s,
        "results": results,
        "notes": notes,
        "tables": [common.table(f"Refresh ({args.model}, rank {task.rank})", COLUMNS, rows)],
    }
    return common.write_result(result, args, device)


if __name__ == "__main__":
    main()
