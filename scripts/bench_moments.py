"""Convergence of each ``moments`` policy (and refresh method) against AdamW on a tiny LLaMA.

Trains the same byte-level LLaMA (same init, same data order) on the built-in standard-library corpus
with torch AdamW and with SubspaceAdamW for every policy and seed, and reports final train loss
(mean of the last 10 steps) and held-out loss. This is the measurement behind ``DEFAULT_MOMENTS``.

    python scripts/bench_moments.py --steps 200 --seeds 0 1 2 --markdown docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

import subspace_optim as so
from subspace_optim.pretrain import corpus, lm


def run_one(name: str, args: argparse.Namespace, seed: int, data, options: dict) -> dict:
    train_tokens, eval_tokens = data
    model = lm.tiny_llama(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, seed=seed)
    if name == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=args.adamw_lr, weight_decay=0.0)
    else:
        groups = so.param_groups(model, "all-linear", rank=args.rank, update_gap=args.update_gap, **options)
        opt = so.SubspaceAdamW(groups, lr=args.lr)
    res = lm.train(model, opt, train_tokens, eval_tokens, steps=args.steps, batch=args.batch, seq=args.seq, seed=seed)
    return {
        "name": name,
        "seed": seed,
        "train_loss": sum(res.losses[-10:]) / 10,
        "eval_loss": res.eval_loss,
        "seconds": res.seconds,
        **options,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--intermediate", type=int, default=172)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16, help="default hidden/4")
    ap.add_argument("--update-gap", type=int, default=50)
    ap.add_argument("--lr", type=float, default=1e-2, help="SubspaceAdamW lr (GaLore uses a larger lr than AdamW)")
    ap.add_argument("--adamw-lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--policies", nargs="+", default=["rotate", "keep", "reset"])
    ap.add_argument("--refresh", nargs="+", default=["warm"], help="refresh methods to cross with policies")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None, help="append the table to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    data = (
        lm.byte_tokens(corpus.stdlib_text(2_000_000)),
        lm.byte_tokens(corpus.stdlib_text(200_000, split="heldout")),
    )
    rows = []
    configs = [("adamw", {})] + [
        (f"subspace {r}/{p}", {"refresh": r, "moments": p}) for r in args.refresh for p in args.policies
    ]
    for name, options in configs:
        for seed in args.seeds:
            row = run_one(name, args, seed, data, options)
            rows.append(row)
            print(json.dumps(row), flush=True)

    summary = []
    adamw_eval = statistics.mean(r["eval_loss"] for r in rows if r["name"] == "adamw")
    for name, _ in configs:
        mine = [r for r in rows if r["name"] == name]
        ev = statistics.mean(r["eval_loss"] for r in mine)
        summary.append(
            {
                "name": name,
                "train_loss": statistics.mean(r["train_loss"] for r in mine),
                "eval_loss": ev,
                "eval_loss_sd": statistics.stdev(r["eval_loss"] for r in mine) if len(mine) > 1 else 0.0,
                "vs_adamw": ev / adamw_eval,
                "seconds": statistics.mean(r["seconds"] for r in mine),
            }
        )
    result = {"args": vars(args) | {"json": None, "markdown": None}, "rows": rows, "summary": summary}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    table = [
        "| optimizer | train loss | eval loss (mean ± sd) | eval vs AdamW | seconds |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s in summary:
        table.append(
            f"| {s['name']} | {s['train_loss']:.4f} | {s['eval_loss']:.4f} ± {s['eval_loss_sd']:.4f} | "
            f"{s['vs_adamw']:.3f} | {s['seconds']:.1f} |"
        )
    text = "\n".join(table)
    print(text)
    if args.markdown:
        header = (
            f"\n### moments policies: tiny LLaMA, {args.steps} steps, seeds {args.seeds}\n\n"
            f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
            f"Python {platform.python_version()}. hidden {args.hidden}, {args.layers} layers, rank {args.rank}, "
            f"update_gap {args.update_gap}, lr {args.lr} (AdamW {args.adamw_lr}), "
            f"batch {args.batch}x{args.seq} bytes.\n"
            f"Command: `python scripts/bench_moments.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
        )
        with args.markdown.open("a") as fh:
            fh.write(header + text + "\n")
    return result


if __name__ == "__main__":
    main()
