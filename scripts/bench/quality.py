"""Quality at equal steps and rank: tuned AdamW, galore-torch and SubspaceAdamW with every residual mode.

Each row is one ``subspace-optim pretrain`` run (same model init, data order, steps, rank, schedule; only the
optimizer and its learning rates change), run as its own process and read back from its report.json. The
sweep goes in stages, each choosing from the finished rows before it:

1. AdamW over ``--adamw-lrs``; the best one then again with a separate lr for the embedding, head and
   norms (``--plain-lr``, each of ``--plain-factors`` x its lr);
2. galore-torch at its paper's settings (lr 1e-2, scale 0.25, update gap 200) and at our update gap, and
   apollo-torch (when installed: ``pip install -e ".[peers]"``) at its paper's (lr 1e-2, random projection,
   channel-wise scaling, scale 1, update gap 200) and at our update gap;
3. SubspaceAdamW with every ``residual`` at lr 1e-2, then an lr sweep (``--subspace-lrs``) of ``none`` and
   of the best residual, then the best of those with a separate plain lr.

With ``--step-time`` it also times SubspaceAdamW's ``step()`` alone, every residual against ``none`` in one
process, steps interleaved round by round (``common.interleaved``), on the model's projected shapes (no refresh in
the timed steps).

    python -m scripts.bench.quality --model llama_9m --out runs/quality --step-time --json quality.json
    python -m scripts.bench.render quality.json

Runs already in ``--out`` are read, not rerun, so an interrupted sweep resumes. ``--smoke`` runs a few steps
of a tiny model (what the tests run).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from subspace_optim import SubspaceAdamW, param_groups, residual_rule
from subspace_optim.pretrain import loop
from subspace_optim.pretrain.config import load_config

from . import common

RESIDUALS = residual_rule.RESIDUALS  # every mode, from the library


def _flag_value(value: float) -> str:
    return f"{value:.6g}"


def _command(args: argparse.Namespace, out: Path, optimizer: str, lr: float, extra: dict) -> list[str]:
    cmd = [
        sys.executable,
        str(common.ROOT / "scripts" / "pretrain.py"),
        "--model",
        args.model,
        "--optimizer",
        optimizer,
        "--lr",
        f"{optimizer}={_flag_value(lr)}",
        "--output-dir",
        str(out),
        "--no-progress",
        "--save-every",
        "0",
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.steps:
        cmd += ["--steps", str(args.steps)]
    cmd += list(args.extra_flags)
    for key, value in extra.items():
        if key == "plain_lr":
            cmd += ["--plain-lr", f"{optimizer}={_flag_value(value)}"]
        elif isinstance(value, bool):  # a switch: --flag / --no-flag
            cmd += [f"--{'' if value else 'no-'}{key.replace('_', '-')}"]
        else:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    return cmd


def run_many(args: argparse.Namespace, specs: list[tuple[str, str, float, dict]]) -> list[dict]:
    """Run the pretrain jobs ``specs`` = (name, optimizer, lr, extra flags), ``--jobs`` at a time (runs
    whose report.json exists are read, not rerun); returns their rows in ``specs`` order."""
    # this checkout's package first, whatever an editable install elsewhere points at
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(common.ROOT), os.environ.get("PYTHONPATH", "")])}
    todo = [s for s in specs if not (args.out / s[0] / "report.json").exists()]
    # a run directory without a report is a run in progress elsewhere (an earlier, interrupted sweep's
    # child): wait for its report instead of starting it twice (delete the directory to rerun it)
    elsewhere = [s[0] for s in todo if (args.out / s[0]).exists()]
    todo = [s for s in todo if s[0] not in elsewhere]
    running: list[tuple[subprocess.Popen, str, float]] = []
    while todo or running or elsewhere:
        elsewhere = [name for name in elsewhere if not (args.out / name / "report.json").exists()]
        while todo and len(running) < args.jobs:
            name, optimizer, lr, extra = todo.pop(0)
            cmd = _command(args, args.out / name, optimizer, lr, extra)
            args.out.mkdir(parents=True, exist_ok=True)
            try:  # the claim: creating the directory is atomic, so two sweeps never start the same run
                (args.out / name).mkdir()
            except FileExistsError:
                elsewhere.append(name)
                continue
            log = (args.out / name / "stdout.log").open("w")
            print("$", " ".join(cmd), flush=True)
            running.append(
                (
                    subprocess.Popen(cmd, cwd=common.ROOT, env=env, stdout=log, stderr=subprocess.STDOUT),
                    name,
                    time.perf_counter(),
                )
            )
        time.sleep(2)
        for job in list(running):
            proc, name, started = job
            if proc.poll() is not None:
                running.remove(job)
                if proc.returncode != 0:
                    raise RuntimeError(f"run {name} failed (exit {proc.returncode}); see {args.out / name}/stdout.log")
                print(f"  {name} done ({time.perf_counter() - started:.0f} s)", flush=True)
    return [_row(args, *s) for s in specs]


def _row(args: argparse.Namespace, name: str, optimizer: str, lr: float, extra: dict) -> dict:
    run = json.loads((args.out / name / "report.json").read_text())["runs"][0]
    summary = run["summary"]
    row = {
        "name": name,
        "optimizer": optimizer,
        "lr": lr,
        "plain_lr": extra.get("plain_lr"),
        "residual": extra.get("residual", "none" if optimizer == "subspace" else None),
        "update_gap": extra.get("update_gap"),
        "eval_loss": summary["final_eval_loss"],
        "train_seconds": summary["train_seconds"],
        "tokens_per_s": summary["tokens_per_s"],
        "state_bytes": summary["state_bytes"],
        "steps": summary["steps"],
    }
    print(json.dumps(row), flush=True)
    return row


def recorded_row(args: argparse.Namespace, name: str) -> dict:
    """The row of a finished run directory, from what the run recorded (its optimizer, lr and config)."""
    run = json.loads((args.out / name / "report.json").read_text())["runs"][0]
    config = json.loads((args.out / name / run["optimizer"] / "log.json").read_text())["config"]
    plain = config.get("plain_lr")
    extra = {"plain_lr": plain.get(run["optimizer"]) if isinstance(plain, dict) else plain}
    if run["optimizer"] in ("subspace", "galore", "apollo"):
        extra["update_gap"] = config["update_gap"]
    if run["optimizer"] == "subspace":
        extra["residual"] = config.get("residual", "none")
    return _row(args, name, run["optimizer"], run["lr"], {k: v for k, v in extra.items() if v is not None})


def _best(rows: list[dict]) -> dict:
    return min(rows, key=lambda r: r["eval_loss"])


def sweep(args: argparse.Namespace) -> list[dict]:
    """Stage 1: AdamW's lrs, galore-torch, ours with every residual (lr 1e-2); stage 2: the best AdamW with
    separate plain lrs, ours (best residual) at other lrs and with separate plain lrs."""
    f = _flag_value
    adamw = [(f"adamw_lr{f(lr)}", "adamw", lr, {}) for lr in args.adamw_lrs]
    galore = (
        []
        if args.no_galore
        else [
            (f"galore_lr0.01_gap{gap}", "galore", 1e-2, {"update_gap": gap, "scale": 0.25})
            for gap in dict.fromkeys([200, args.update_gap])
        ]
    )
    # apollo-torch at its paper's LLaMA settings (lr 1e-2, rank as ours, random projection, channel-wise
    # scaling, scale 1, update gap 200) and at our update gap; skipped when it is not installed
    apollo = (
        []
        if args.no_apollo or importlib.util.find_spec("apollo_torch") is None
        else [
            (
                f"apollo_lr0.01_gap{gap}",
                "apollo",
                1e-2,
                {"update_gap": gap, "apollo_scale": 1, "apollo_proj": "random", "apollo_scale_type": "channel"},
            )
            for gap in dict.fromkeys([200, args.update_gap])
        ]
    )
    ours = [(f"subspace_{mode}_lr0.01", "subspace", 1e-2, {"residual": mode}) for mode in args.residuals]
    first = run_many(args, adamw + galore + apollo + ours)
    adamw_rows = first[: len(adamw)]
    ours_rows = first[len(adamw) + len(galore) + len(apollo) :]
    best = _best(adamw_rows)
    top = _best(ours_rows)
    second = [
        (f"adamw_lr{f(best['lr'])}_plain{f(best['lr'] * k)}", "adamw", best["lr"], {"plain_lr": best["lr"] * k})
        for k in args.plain_factors
    ]
    second += [
        (f"subspace_{top['residual']}_lr{f(lr)}", "subspace", lr, {"residual": top["residual"]})
        for lr in args.subspace_lrs
        if lr != 1e-2
    ]
    second += [
        (
            f"subspace_{top['residual']}_lr0.01_plain{f(plain)}",
            "subspace",
            1e-2,
            {"residual": top["residual"], "plain_lr": plain},
        )
        for plain in args.subspace_plain_lrs
    ]
    return first + run_many(args, second)


def step_times(args: argparse.Namespace) -> dict[str, Any]:
    """Median seconds of SubspaceAdamW.step() per residual mode, interleaved, on the model's shapes; then a whole
    training step (forward, backward, step) per mode on one batch of the config's shape: what the residual adds
    to a run's wall time. Ratios are medians of per-round ratios against ``none``."""
    torch.manual_seed(0)
    cfg = load_config(["--model", args.model])
    model = loop.build_model(cfg, cfg.tokenizer_vocab)
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = {}
    for mode in RESIDUALS:
        groups = param_groups(model, "all-linear", rank=cfg.rank, update_gap=10**9)
        opts[mode] = SubspaceAdamW(groups, lr=1e-6, residual=mode)  # tiny lr: the weights barely move
    projected = list(opts["none"].param_groups[0]["params"])
    grads = {id(p): torch.randn_like(p) * 1e-2 for p in model.parameters()}
    for param in model.parameters():
        param.grad = grads[id(param)]

    def restore_grads(_: int) -> None:  # only the projected matrices: the plain part is the same for every mode
        for param in projected:
            param.grad = grads[id(param)]

    steps = {mode: opt.step for mode, opt in opts.items()}
    common.interleaved(steps, 2, before_round=restore_grads)  # the first (refresh) step and one warm-up
    times = common.interleaved(steps, args.timed_steps, before_round=restore_grads)
    ids = torch.randint(0, cfg.tokenizer_vocab, (cfg.batch_size, cfg.seq_len + 1), generator=torch.Generator())

    def train_step(opt: torch.optim.Optimizer) -> None:
        opt.zero_grad()
        common.next_token_loss(model, ids).backward()
        opt.step()

    train = {mode: (lambda o=opt: train_step(o)) for mode, opt in opts.items()}
    common.interleaved(train, 1)
    trained = common.interleaved(train, min(args.timed_steps // 2, 10))
    step_summary, train_summary = times.summary("none"), trained.summary("none")
    return {
        "model": args.model,
        "rank": cfg.rank,
        "threads": torch.get_num_threads(),
        "steps": args.timed_steps,
        "median_s": {m: s["median_s"] for m, s in step_summary.items()},
        "ratio_vs_none": {m: s["vs_none"] for m, s in step_summary.items()},
        "train_median_s": {m: s["median_s"] for m, s in train_summary.items()},
        "train_ratio_vs_none": {m: s["vs_none"] for m, s in train_summary.items()},
    }


QUALITY_COLUMNS = [
    "run",
    "optimizer",
    "lr",
    "plain lr",
    "residual",
    "update gap",
    "held-out loss",
    "vs best AdamW",
    "vs best galore",
    "train s",
    "optimizer state",
]


def quality_table(args: argparse.Namespace, rows: list[dict]) -> dict[str, Any]:
    best = {
        name: _best(found)["eval_loss"] if (found := [r for r in rows if r["optimizer"] == name]) else None
        for name in ("adamw", "galore")
    }

    def rel(loss: float, ref: float | None) -> str:
        return "" if ref is None else f"{100 * (loss - ref) / ref:+.2f}%"

    cells = [
        [
            r["name"],
            r["optimizer"],
            f"{r['lr']:g}",
            "" if r["plain_lr"] is None else format(r["plain_lr"], "g"),
            r["residual"] or "",
            str(r["update_gap"] or ""),
            f"{r['eval_loss']:.4f}",
            rel(r["eval_loss"], best["adamw"]),
            rel(r["eval_loss"], best["galore"]),
            f"{r['train_seconds']:.0f}",
            f"{r['state_bytes'] / 2**20:.2f} MiB",
        ]
        for r in rows
    ]
    title = f"Quality sweep: {args.model}, {rows[0]['steps']} steps, equal rank and data (`scripts.bench.quality`)"
    note = "Held-out loss at the last step; seconds are training wall time on shared cores (indicative only)"
    return common.table(title, QUALITY_COLUMNS, cells, [note])


def timing_tables(timing: dict[str, Any]) -> list[dict[str, Any]]:
    step = [
        [mode, f"{1e3 * t:.1f} ms", f"{timing['ratio_vs_none'][mode]:.3f}"] for mode, t in timing["median_s"].items()
    ]
    train = [
        [mode, f"{1e3 * t:.0f} ms", f"{timing['train_ratio_vs_none'][mode]:.3f}"]
        for mode, t in timing["train_median_s"].items()
    ]
    setup = (
        f"{timing['model']} shapes, rank {timing['rank']}, {timing['threads']} threads, median of "
        f"{timing['steps']} interleaved steps, no refresh; ratio: median of per-round ratios"
    )
    return [
        common.table(
            "Step time of `SubspaceAdamW.step()` alone", ["residual", "median step", "ratio vs none"], step, [setup]
        ),
        common.table(
            "A whole training step (forward, backward and step on one batch of the config's shape)",
            ["residual", "median training step", "ratio vs none"],
            train,
        ),
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama_9m")
    ap.add_argument("--steps", type=int, default=None, help="default: the model config's")
    ap.add_argument("--update-gap", type=int, default=50, help="our (and the second galore row's) update gap")
    ap.add_argument("--out", type=Path, default=common.ROOT / "runs" / "quality", help="the runs' folder")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--jobs", type=int, default=1, help="pretrain runs at a time")
    ap.add_argument("--adamw-lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    ap.add_argument("--plain-factors", type=float, nargs="*", default=[3.0])
    ap.add_argument("--residuals", nargs="+", default=list(RESIDUALS), choices=RESIDUALS)
    ap.add_argument("--subspace-lrs", type=float, nargs="*", default=[])
    ap.add_argument("--subspace-plain-lrs", type=float, nargs="*", default=[3e-2])
    ap.add_argument("--no-galore", action="store_true")
    ap.add_argument("--no-apollo", action="store_true", help="leave apollo-torch out (skipped if not installed)")
    ap.add_argument("--also", nargs="*", default=[], help="finished run directories in --out to add to the table")
    ap.add_argument("--step-time", action="store_true", help="also time step() per residual mode")
    ap.add_argument("--step-time-only", action="store_true", help="time the steps; no pretrain runs")
    ap.add_argument("--timed-steps", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="a tiny model for a few steps (the tests)")
    common.add_output_args(ap)
    ap.add_argument("--extra-flags", nargs=argparse.REMAINDER, default=[], help="passed to every pretrain run")
    return ap.parse_args(argv)


SMOKE_FLAGS = shlex.split(
    "--hidden-size 32 --intermediate-size 64 --num-hidden-layers 1 --num-attention-heads 2 --rank 4 "
    "--eval-every 2 --eval-windows 2 --max-train-bytes 200000 --tokenizer-vocab 300 --seq-len 32 "
    "--batch-size 2 --update-gap 2"
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.smoke:
        args.steps = args.steps or 4
        args.extra_flags = [*SMOKE_FLAGS, *args.extra_flags]
        args.adamw_lrs, args.plain_factors, args.subspace_lrs, args.subspace_plain_lrs = [3e-3], [], [], []
        args.timed_steps = 2
    else:
        args.extra_flags = ["--update-gap", str(args.update_gap), *args.extra_flags]
    rows = [] if args.step_time_only else sweep(args)
    seen = {r["name"] for r in rows}
    rows += [recorded_row(args, name) for name in args.also if name not in seen]
    timing = step_times(args) if args.step_time or args.step_time_only else None
    tables = ([quality_table(args, rows)] if rows else []) + (timing_tables(timing) if timing else [])
    result = {"benchmark": "quality", "rows": rows, "step_time": timing, "tables": tables}
    return common.write_result(result, args)


if __name__ == "__main__":
    main()
