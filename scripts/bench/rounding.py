"""Low-precision weights: held-out loss at equal steps with fp32 weights, bf16 weights rounded to nearest, bf16
weights rounded stochastically (``stochastic_rounding=True``) and torchao's int8 weights (``--weights int8``), and what
each costs in a training step.

Quality: ``subspace-optim pretrain`` runs (``quality.run_many``: same init, data order and steps; only the weights'
dtype and the rounding change) at the model file's tuned settings, one per ``--seeds``; a row per setting with the
mean held-out loss and its gap to fp32 weights. Speed: a whole training step (forward, backward, optimizer step) of
that model with each kind of weights (``TIMED``), interleaved by round on one batch of the model file's shape:
medians and the median of per-round ratios against bf16 weights rounded to nearest.

    python -m scripts.bench.rounding --model llama_9m --seeds 0 1 --out runs/rounding --json docs/results/rounding.json
    python -m scripts.bench.rounding --model llama_9m --seeds 0 1 --lr-scale 0.1 --out runs/rounding \
        --json docs/results/rounding-lr0.1.json                                   # updates 10x smaller
    python -m scripts.bench.rounding --model llama_20m --step-time-only --timed-steps 10 --json step.json  # timing
    python -m scripts.bench.rounding --smoke                                                       # a pipeline check
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from subspace_optim.pretrain import loop, optimizers
from subspace_optim.pretrain.config import load_config

from . import common, quality

# (name, pretrain flags): the weights setting of each row.
ROWS: list[tuple[str, dict[str, Any]]] = [
    ("fp32 weights", {"weights": "fp32"}),
    ("bf16 weights, round to nearest", {"weights": "bf16"}),
    ("bf16 weights, stochastic rounding", {"weights": "bf16", "stochastic_rounding": True}),
    ("int8 weights (torchao)", {"weights": "int8"}),
]


def _slug(name: str) -> str:
    return name.replace(" ", "-").replace(",", "")


def rows(args: argparse.Namespace, lr: float, plain_lr: float | None) -> list[dict[str, Any]]:
    """One row per weights setting: per-seed and mean held-out loss, and the gap to fp32 weights. ``--lr-scale``
    multiplies both learning rates (smaller updates: the regime stochastic rounding is for)."""
    lr, plain_lr = lr * args.lr_scale, None if plain_lr is None else plain_lr * args.lr_scale
    tuned = {} if plain_lr is None else {"plain_lr": plain_lr}
    prefix = "" if args.lr_scale == 1.0 else f"lrx{args.lr_scale:g}-"
    specs = [
        (f"{prefix}{_slug(name)}-s{seed}", "subspace", lr, {**tuned, **flags, "seed": seed})
        for name, flags in ROWS
        for seed in args.seeds
    ]
    done = quality.run_many(args, specs)
    out = []
    for name, flags in ROWS:
        losses = [r["eval_loss"] for r in done if r["name"].rsplit("-s", 1)[0] == prefix + _slug(name)]
        out.append({"name": name, "flags": flags, "losses": losses, "mean_loss": statistics.mean(losses)})
    base = out[0]["mean_loss"]
    for row in out:
        row["vs_fp32"] = row["mean_loss"] / base - 1.0
    return out


# (name, pretrain flags) of each timed step; the first is the baseline of the ratios.
TIMED: list[tuple[str, list[str]]] = [
    ("bf16, round to nearest", ["--weights", "bf16"]),
    ("bf16, stochastic rounding", ["--weights", "bf16", "--stochastic-rounding"]),
    ("fp32", ["--weights", "fp32"]),
    ("int8 (torchao)", ["--weights", "int8"]),
]


def step_times(args: argparse.Namespace) -> dict[str, Any]:
    """Whole training steps with each kind of weights (``TIMED``), interleaved (``common.interleaved``)."""
    argv = ["--model", args.model, "--optimizer", "subspace"]
    runs = {}
    for name, extra in TIMED:
        cfg = load_config(argv + extra + list(args.extra_flags))
        model = loop.build_model(cfg, cfg.tokenizer_vocab)
        runs[name] = (model, optimizers.build("subspace", model, cfg))
    shape = (cfg.batch_size, cfg.seq_len + 1)
    ids = torch.randint(0, cfg.tokenizer_vocab, shape, generator=torch.Generator().manual_seed(0))

    optimizer_s: dict[str, list[float]] = {name: [] for name in runs}

    def train_step(name: str, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        opt.zero_grad()
        common.next_token_loss(model, ids).backward()
        start = time.perf_counter()  # no device sync: the step's own time on a CPU (this bench's device)
        opt.step()
        optimizer_s[name].append(time.perf_counter() - start)

    steps = {name: (lambda n=name, m=model, o=opt: train_step(n, m, o)) for name, (model, opt) in runs.items()}
    common.interleaved(steps, 2)  # the first (refresh) step and a warm-up
    for kept in optimizer_s.values():
        kept.clear()
    times = common.interleaved(steps, args.timed_steps)
    base = TIMED[0][0]
    summary = times.summary(base)
    return {
        "model": args.model,
        "threads": torch.get_num_threads(),
        "steps": args.timed_steps,
        "median_s": {n: s["median_s"] for n, s in summary.items()},
        "ratio": {n: s[f"vs_{base}"] for n, s in summary.items()},
        "optimizer_median_s": {n: statistics.median(t) for n, t in optimizer_s.items()},
    }


def tables(args: argparse.Namespace, quality_rows: list[dict[str, Any]], timing: dict[str, Any]) -> list[dict]:
    """The quality table (none with ``--step-time-only``) and the step-time table."""
    seeds = ", ".join(str(s) for s in args.seeds)
    q = (
        None
        if not quality_rows
        else common.table(
            "Weights in low precision: held-out loss",
            ["weights", "held-out loss (mean)", "per seed", "vs fp32 weights"],
            [
                [
                    r["name"],
                    common.cell(r["mean_loss"], ".4f"),
                    " / ".join(f"{x:.4f}" for x in r["losses"]),
                    f"{100 * r['vs_fp32']:+.2f}%",
                ]
                for r in quality_rows
            ],
            [
                f"{args.model}, seeds {seeds}, SubspaceAdamW at the model file's settings"
                + ("" if args.lr_scale == 1.0 else f", both lrs x {args.lr_scale:g}")
                + "; equal steps and data."
            ],
        )
    )
    t = common.table(
        "Low-precision weights: a whole training step",
        ["weights", "median step (ms)", f"vs {TIMED[0][0]}", "of which optimizer step (ms)"],
        [
            [
                name,
                common.cell(timing["median_s"][name], ".1f", 1e3),
                f"{timing['ratio'][name]:.3f}x",
                common.cell(timing["optimizer_median_s"][name], ".1f", 1e3),
            ]
            for name in timing["median_s"]
        ],
        [
            f"{timing['model']}: forward, backward and optimizer step on one batch, {timing['threads']} torch "
            f"threads, medians of {timing['steps']} interleaved rounds; ratio: median of per-round ratios."
        ],
    )
    return [t] if q is None else [q, t]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama_9m")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=common.ROOT / "runs" / "rounding")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--timed-steps", type=int, default=10)
    parser.add_argument("--lr-scale", type=float, default=1.0, help="multiply the model file's lr and plain lr")
    parser.add_argument("--smoke", action="store_true", help="the tiny model, a few steps, one seed")
    parser.add_argument("--step-time-only", action="store_true", help="only the step times (no training runs)")
    common.add_output_args(parser)
    args = parser.parse_args(argv)
    args.extra_flags = []
    if args.smoke:
        args.steps, args.seeds, args.timed_steps = 4, [0], 2
        args.extra_flags = quality.SMOKE_FLAGS
    torch.set_num_threads(args.threads)
    shape = common.model_config(args.model)
    lr, plain = shape["lr"]["subspace"], shape.get("plain_lr", {}).get("subspace")
    quality_rows = [] if args.step_time_only else rows(args, lr, plain)
    timing = step_times(args)
    result = {
        "benchmark": "rounding",
        "model": args.model,
        "rows": quality_rows,
        "step_time": timing,
        "tables": tables(args, quality_rows, timing),
    }
    common.write_result(result, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
