"""Captured energy of each refresh method against the exact SVD, on real gradients of a small LLaMA.

The Triton engine's target "captured energy >= 97% of the exact SVD's on real gradients" is a property of
the refresh math, not of the device (the kernel refresh returns the reference's subspaces to ~1e-6, see
tests/test_kernels.py), so it is measured here with the reference engine on CPU.

For every refresh method, a byte-level LLaMA is trained on the built-in standard-library corpus (same
init and data order for each method; each then follows its own trajectory). At every refresh step, just
before ``opt.step()``, the exact top-r energy of each projected gradient is computed in float64; after the
step, the optimizer's own metric ||P^T G||^2 / ||G||^2 for that gradient is read back. The ratio of the two
is 1 for the exact SVD and below 1 for a sketch. The first refresh (a cold start for every method) is
reported apart from the later ones, where ``warm`` starts from the previous basis.

    python -m scripts.bench.energy --json energy.json && python -m scripts.bench.render energy.json
    python -m scripts.bench.energy --smoke

``--oversample`` and ``--power-iters`` default to the library's (``subspace_optim.options``).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from collections.abc import Iterator
from typing import Any

import torch

import subspace_optim as so

from . import common

# name -> SubspaceAdamW options
METHODS: dict[str, dict[str, Any]] = {
    "warm, power_iters=0": {"refresh": "warm", "power_iters": 0},
    "warm, power_iters=1 (default)": {"refresh": "warm", "power_iters": 1},
    "warm, power_iters=2": {"refresh": "warm", "power_iters": 2},
    "rsvd, power_iters=1": {"refresh": "rsvd", "power_iters": 1},
    "svd (exact)": {"refresh": "svd"},
    # Not a sketch of the SVD but a choice among fixed DCT-II columns (refresh="dct"): how much of the best rank-r
    # energy it keeps. Run on request (--methods dct), not by default, so the default tables stay as published.
    "dct": {"refresh": "dct"},
}
DEFAULT_METHODS = [name for name in METHODS if name != "dct"]
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _kind(name: str) -> str:
    return next((k for k in KINDS if k in name), "other")


def top_energy_fraction(grad: torch.Tensor, rank: int) -> float:
    """||G_r||_F^2 / ||G||_F^2 for the best rank-r approximation G_r (singular values in float64)."""
    energies = torch.linalg.svdvals(grad.double().reshape(grad.shape[0], -1)).square()
    return float(energies[:rank].sum() / energies.sum())


def shape_of(args: argparse.Namespace) -> common.LlamaShape:
    return common.LlamaShape("energy", args.hidden, args.intermediate, args.layers, args.heads, 256, args.rank)


def refresh_samples(opt: so.SubspaceAdamW, step: int, bounds: dict[str, float]) -> list[dict[str, Any]]:
    metrics = opt.subspace_metrics()["params"]
    samples = []
    for name, bound in bounds.items():
        captured = metrics[name]["captured_energy"]
        samples.append(
            {
                "step": step,
                "name": name,
                "kind": _kind(name),
                "captured": captured,
                "svd": bound,
                "ratio": captured / bound,
            }
        )
    return samples


def run_method(label: str, options: dict[str, Any], args: argparse.Namespace, tokens: torch.Tensor) -> dict[str, Any]:
    model = common.build_llama(shape_of(args), seed=args.seed, max_positions=args.seq)
    options = {"power_iters": args.power_iters, **options}  # a method's own power_iters wins
    groups = so.param_groups(model, "all-linear", rank=args.rank, update_gap=args.update_gap, **options)
    opt = so.SubspaceAdamW(groups, lr=args.lr, oversample=args.oversample)
    # param_groups hands (name, parameter) pairs; the optimizer keeps the names for its metrics.
    projected = {p: name for group in groups if group.get("rank") for name, p in group["params"]}
    windows = common.token_windows(tokens, args.batch, args.seq, args.seed)
    samples: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def sample_refresh(step: int) -> Iterator[None]:
        """At a refresh step: the exact top-r energy of each gradient before, the optimizer's metric after."""
        if step % args.update_gap:
            yield
            return
        bounds = {name: top_energy_fraction(p.grad, args.rank) for p, name in projected.items()}
        yield
        samples.extend(refresh_samples(opt, step, bounds))

    losses, seconds = common.train_steps(model, opt, windows, args.steps, sample_refresh)
    trained = {"train_loss_last10": sum(losses[-10:]) / 10, "seconds": seconds}
    return {"method": label, "options": options, **trained, "samples": samples, "summary": summarize(samples)}


def stats(rows: list[dict[str, Any]]) -> dict[str, float] | None:
    if not rows:
        return None
    ratios = [r["ratio"] for r in rows]
    weighted = sum(r["captured"] for r in rows) / sum(r["svd"] for r in rows)
    return {"n": len(rows), "min": min(ratios), "median": statistics.median(ratios), "weighted": weighted}


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Min, median and SVD-energy-weighted mean of the ratio; first refresh and later ones apart."""
    first_step = min(s["step"] for s in samples)
    later = [s for s in samples if s["step"] != first_step]
    return {
        "first_refresh": stats([s for s in samples if s["step"] == first_step]),
        "later_refreshes": stats(later),
        "later_by_kind": {k: stats(rows) for k in KINDS if (rows := [s for s in later if s["kind"] == k])},
    }


def tables(args: argparse.Namespace, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    setup = (
        f"Hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, rank {args.rank}, "
        f"update_gap {args.update_gap}, oversample {args.oversample}, lr {args.lr}, batch {args.batch}x{args.seq} "
        "bytes; every linear layer of the blocks projected"
    )
    why = (
        "ratio = captured energy / the exact top-r SVD's, per (refresh, matrix); weighted = sum of captured / sum "
        "of SVD energy. The first refresh is cold for every method"
    )
    rows, by_kind = [], []
    for run in runs:
        first, later = run["summary"]["first_refresh"], run["summary"]["later_refreshes"]
        rows.append(
            [
                run["method"],
                f"{first['min']:.4f} / {first['weighted']:.4f}",
                f"{later['min']:.4f}",
                f"{later['median']:.4f}",
                f"{later['weighted']:.4f}",
                f"{run['train_loss_last10']:.4f}",
                f"{run['seconds']:.0f}",
            ]
        )
        found = run["summary"]["later_by_kind"]
        by_kind.append([run["method"], *(f"{found[k]['weighted']:.4f}" for k in KINDS if k in found)])
    columns = [
        "method",
        "first refresh: min / weighted",
        "later refreshes: min",
        "median",
        "weighted",
        "train loss",
        "seconds",
    ]
    return [
        common.table(
            f"Captured energy vs exact SVD on real gradients: tiny LLaMA, {args.steps} steps",
            columns,
            rows,
            [setup, why],
        ),
        common.table("Later refreshes, weighted ratio by matrix type", ["method", *KINDS], by_kind),
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model and run (seconds), for CI")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--rank", type=int, default=64, help="default hidden/4")
    parser.add_argument("--update-gap", type=int, default=50)
    parser.add_argument("--oversample", type=int, default=common.library_default("oversample"))
    parser.add_argument(
        "--power-iters",
        type=int,
        default=common.library_default("power_iters"),
        help="for the methods that do not set their own",
    )
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=DEFAULT_METHODS)
    common.add_output_args(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.hidden, args.intermediate, args.layers = 41, 64, 172, 2
        args.rank, args.update_gap, args.seq = 16, 20, 64
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    tokens, _ = common.corpus_tokens(2_000_000, 0)
    runs = []
    for label in args.methods:
        run = run_method(label, METHODS[label], args, tokens)
        runs.append(run)
        later = run["summary"]["later_refreshes"]
        print(f"{label}: later refreshes min {later['min']:.4f}, weighted {later['weighted']:.4f}", file=sys.stderr)
        if METHODS[label]["refresh"] == "svd":
            # The measurement itself is wrong if the exact SVD is not at 1, from below or from above.
            worst = max((s["ratio"] for s in run["samples"]), key=lambda ratio: abs(ratio - 1.0))
            if abs(worst - 1.0) > 1e-4:
                raise SystemExit(f"sanity check failed: the exact SVD's ratio is {worst}, not 1")
    result = {"benchmark": "energy", "runs": runs, "tables": tables(args, runs)}
    return common.write_result(result, args)


if __name__ == "__main__":
    main()
