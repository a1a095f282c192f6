"""Convergence of each ``moments`` policy (and refresh method) against AdamW on a tiny LLaMA.

Trains the same byte-level LLaMA (same init, same data order) on the built-in standard-library corpus
with torch AdamW and with SubspaceAdamW for every policy and seed, and reports final train loss
(mean of the last 10 steps) and held-out loss. This is the measurement behind the ``moments`` default.

    python -m scripts.bench.moments --steps 200 --seeds 0 1 2 --json moments.json
    python -m scripts.bench.render moments.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

import torch

import subspace_optim as so

from . import common

COLUMNS = ["optimizer", "train loss", "eval loss (mean ± sd)", "eval vs AdamW", "seconds"]


def train(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    data: tuple[torch.Tensor, torch.Tensor],
    args: argparse.Namespace,
    seed: int,
) -> tuple[list[float], float, float]:
    """``args.steps`` steps of next-token prediction: (losses, held-out loss, seconds)."""
    windows = common.token_windows(data[0], args.batch, args.seq, seed)
    losses, seconds = common.train_steps(model, opt, windows, args.steps)
    return losses, common.heldout_loss(model, data[1], args.seq), seconds


def run_one(
    name: str, args: argparse.Namespace, seed: int, data: tuple[torch.Tensor, torch.Tensor], options: dict[str, Any]
) -> dict[str, Any]:
    shape = common.LlamaShape("moments", args.hidden, args.intermediate, args.layers, 4, 256, args.rank)
    model = common.build_llama(shape, seed=seed, max_positions=args.seq)
    if name == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=args.adamw_lr, weight_decay=0.0)
    else:
        groups = so.param_groups(model, "all-linear", rank=args.rank, update_gap=args.update_gap, **options)
        opt = so.SubspaceAdamW(groups, lr=args.lr)
    losses, heldout, seconds = train(model, opt, data, args, seed)
    return {
        "name": name,
        "seed": seed,
        "train_loss": sum(losses[-10:]) / 10,
        "eval_loss": heldout,
        "seconds": seconds,
        **options,
    }


def summarize(rows: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    adamw_eval = statistics.mean(r["eval_loss"] for r in rows if r["name"] == "adamw")
    summary = []
    for name in names:
        mine = [r for r in rows if r["name"] == name]
        heldout = statistics.mean(r["eval_loss"] for r in mine)
        summary.append(
            {
                "name": name,
                "train_loss": statistics.mean(r["train_loss"] for r in mine),
                "eval_loss": heldout,
                "eval_loss_sd": statistics.stdev(r["eval_loss"] for r in mine) if len(mine) > 1 else 0.0,
                "vs_adamw": heldout / adamw_eval,
                "seconds": statistics.mean(r["seconds"] for r in mine),
            }
        )
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--intermediate", type=int, default=172)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16, help="default hidden/4")
    parser.add_argument("--update-gap", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1e-2, help="SubspaceAdamW lr (GaLore uses a larger lr than AdamW)")
    parser.add_argument("--adamw-lr", type=float, default=3e-3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--policies", nargs="+", default=["rotate", "keep", "reset"])
    parser.add_argument("--refresh", nargs="+", default=["warm"], help="refresh methods to cross with policies")
    parser.add_argument("--threads", type=int, default=2)
    common.add_output_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(min(args.threads, torch.get_num_threads()))
    data = common.corpus_tokens(2_000_000, 200_000)
    configs = [("adamw", {})] + [
        (f"subspace {r}/{p}", {"refresh": r, "moments": p}) for r in args.refresh for p in args.policies
    ]
    rows = []
    for name, options in configs:
        for seed in args.seeds:
            rows.append(run_one(name, args, seed, data, options))
            print(json.dumps(rows[-1]), flush=True)
    summary = summarize(rows, [name for name, _ in configs])
    table_rows = [
        [
            s["name"],
            f"{s['train_loss']:.4f}",
            f"{s['eval_loss']:.4f} ± {s['eval_loss_sd']:.4f}",
            f"{s['vs_adamw']:.3f}",
            f"{s['seconds']:.1f}",
        ]
        for s in summary
    ]
    setup = (
        f"hidden {args.hidden}, {args.layers} layers, rank {args.rank}, update_gap {args.update_gap}, lr {args.lr} "
        f"(AdamW {args.adamw_lr}), batch {args.batch}x{args.seq} bytes"
    )
    title = f"moments policies: tiny LLaMA, {args.steps} steps, seeds {args.seeds}"
    result = {
        "benchmark": "moments",
        "rows": rows,
        "summary": summary,
        "tables": [common.table(title, COLUMNS, table_rows, [setup])],
    }
    return common.write_result(result, args)


if __name__ == "__main__":
    main()
