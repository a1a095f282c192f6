"""Quality at equal steps and rank: tuned AdamW, galore-torch and SubspaceAdamW with every residual mode.

Each row is one ``subspace-optim pretrain`` run (same model init, data order, steps, rank, schedule; only the
optimizer and its learning rates change), run as its own process and read back from its report.json. The
sweep goes in stages, each choosing from the finished rows before it:

1. AdamW over ``--adamw-lrs``; the best one then again with a separate lr for the embedding, head and
   norms (``--plain-lr``, each of ``--plain-factors`` x its lr);
2. galore-torch at its paper's settings (lr 1e-2, scale 0.25, update gap 200) and at our update gap;
3. SubspaceAdamW with every ``residual`` at lr 1e-2, then an lr sweep (``--subspace-lrs``) of ``none`` and
   of the best residual, then the best of those with a separate plain lr.

With ``--step-time`` it also times SubspaceAdamW's ``step()`` alone, every residual against ``none`` in one
process, steps interleaved round by round, on the model's projected shapes (no refresh in the timed steps).

    python scripts/bench_quality.py --model llama_9m --out runs/quality --step-time --markdown docs/benchmarks.md

Runs already in ``--out`` are read, not rerun, so an interrupted sweep resumes. ``--smoke`` runs a few steps
of a tiny model (what the tests run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESIDUALS = ("none", "fira", "fira_tensor", "apollo")


def _flag_value(value: float) -> str:
    return f"{value:.6g}"


def run_one(args: argparse.Namespace, name: str, optimizer: str, lr: float, **extra: object) -> dict:
    """One pretrain run (or its saved result); returns the row for the table."""
    out = args.out / name
    report = out / "report.json"
    if not report.exists():
        cmd = [sys.executable, str(ROOT / "scripts" / "pretrain.py"), "--model", args.model, "--optimizer", optimizer,
               "--lr", f"{optimizer}={_flag_value(lr)}", "--output-dir", str(out), "--no-progress",
               "--save-every", "0"]  # fmt: skip
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if args.steps:
            cmd += ["--steps", str(args.steps)]
        cmd += list(args.extra_flags)
        for key, value in extra.items():
            if key == "plain_lr":
                cmd += ["--plain-lr", f"{optimizer}={_flag_value(value)}"]
            else:
                cmd += [f"--{key.replace('_', '-')}", str(value)]
        print("$", " ".join(cmd), flush=True)
        started = time.perf_counter()
        # this checkout's package first, whatever an editable install elsewhere points at
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        subprocess.run(cmd, check=True, cwd=ROOT, env=env)
        print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)
    run = json.loads(report.read_text())["runs"][0]
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


def _best(rows: list[dict]) -> dict:
    return min(rows, key=lambda r: r["eval_loss"])


def sweep(args: argparse.Namespace) -> list[dict]:
    rows: list[dict] = []
    adamw = [run_one(args, f"adamw_lr{_flag_value(lr)}", "adamw", lr) for lr in args.adamw_lrs]
    rows += adamw
    best = _best(adamw)
    for f in args.plain_factors:
        plain = best["lr"] * f
        rows.append(run_one(args, f"adamw_lr{_flag_value(best['lr'])}_plain{_flag_value(plain)}", "adamw",
                            best["lr"], plain_lr=plain))  # fmt: skip
    if not args.no_galore:
        for gap in dict.fromkeys([200, args.update_gap]):
            rows.append(run_one(args, f"galore_lr0.01_gap{gap}", "galore", 1e-2, update_gap=gap, scale=0.25))
    ours = [run_one(args, f"subspace_{mode}_lr0.01", "subspace", 1e-2, residual=mode) for mode in args.residuals]
    best_mode = _best([r for r in ours if r["residual"] != "none"] or ours)["residual"]
    for mode in dict.fromkeys(["none", best_mode]):
        for lr in args.subspace_lrs:
            if lr != 1e-2:
                ours.append(run_one(args, f"subspace_{mode}_lr{_flag_value(lr)}", "subspace", lr, residual=mode))
    rows += ours
    top = _best(ours)
    for plain in args.subspace_plain_lrs:
        rows.append(run_one(args, f"subspace_{top['residual']}_lr{_flag_value(top['lr'])}_plain{_flag_value(plain)}",
                            "subspace", top["lr"], residual=top["residual"], plain_lr=plain))  # fmt: skip
    return rows


def step_times(args: argparse.Namespace) -> dict:
    """Median seconds of SubspaceAdamW.step() per residual mode, interleaved, on the model's shapes."""
    from subspace_optim import SubspaceAdamW, param_groups
    from subspace_optim.pretrain import loop
    from subspace_optim.pretrain.config import load_config

    torch.manual_seed(0)
    cfg = load_config(["--model", args.model])
    model = loop.build_model(cfg, cfg.tokenizer_vocab)
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = {}
    for mode in RESIDUALS:
        groups = param_groups(model, "all-linear", rank=cfg.rank, update_gap=10**9)
        opts[mode] = SubspaceAdamW(groups, lr=1e-6, residual=mode)  # tiny lr: the weights barely move
    projected = [p for p in opts["none"].param_groups[0]["params"]]
    grads = {id(p): torch.randn_like(p) * 1e-2 for p in model.parameters()}
    times: dict[str, list[float]] = {m: [] for m in RESIDUALS}
    for p in model.parameters():
        p.grad = grads[id(p)]
    for rnd in range(args.timed_steps + 2):
        for mode, opt in opts.items():
            for p in projected:  # only the projected matrices: the plain AdamW part is the same for every mode
                p.grad = grads[id(p)]
            started = time.perf_counter()
            opt.step()
            if rnd >= 2:  # the first (refresh) step and one warm-up step are not timed
                times[mode].append(time.perf_counter() - started)
    medians = {m: statistics.median(t) for m, t in times.items()}
    return {"model": args.model, "rank": cfg.rank, "threads": torch.get_num_threads(), "steps": args.timed_steps,
            "median_s": medians, "ratio_vs_none": {m: medians[m] / medians["none"] for m in RESIDUALS}}  # fmt: skip


def markdown(args: argparse.Namespace, rows: list[dict], timing: dict | None, command: str) -> str:
    adamw = [r for r in rows if r["optimizer"] == "adamw"]
    galore = [r for r in rows if r["optimizer"] == "galore"]
    best_adamw = _best(adamw)["eval_loss"] if adamw else None
    best_galore = _best(galore)["eval_loss"] if galore else None

    def rel(x: float, ref: float | None) -> str:
        return "" if ref is None else f"{100 * (x - ref) / ref:+.2f}%"

    lines = [
        f"### Quality sweep: {args.model}, {rows[0]['steps']} steps, equal rank and data (`scripts/bench_quality.py`)",
        "",
        f"Command: `{command}`; {platform.machine()} CPU, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. "
        "Held-out loss at the last step; seconds are training wall time on shared cores (indicative only).",
        "",
        "| run | optimizer | lr | plain lr | residual | update gap | held-out loss | vs best AdamW | vs best galore | "
        "train s | optimizer state |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        plain = "" if r["plain_lr"] is None else format(r["plain_lr"], "g")
        loss = r["eval_loss"]
        lines.append(
            f"| {r['name']} | {r['optimizer']} | {r['lr']:g} | {plain} | {r['residual'] or ''}"
            f" | {r['update_gap'] or ''} | {loss:.4f} | {rel(loss, best_adamw)} | {rel(loss, best_galore)}"
            f" | {r['train_seconds']:.0f}"
            f" | {r['state_bytes'] / 2**20:.2f} MiB |"
        )
    if timing:
        lines += ["", f"Step time of `SubspaceAdamW.step()` alone ({timing['model']} shapes, rank {timing['rank']}, "
                  f"{timing['threads']} threads, median of {timing['steps']} interleaved steps, no refresh):", "",
                  "| residual | median step | ratio vs none |", "| --- | --- | --- |"]  # fmt: skip
        for mode, t in timing["median_s"].items():
            lines.append(f"| {mode} | {1e3 * t:.1f} ms | {timing['ratio_vs_none'][mode]:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama_9m")
    ap.add_argument("--steps", type=int, default=None, help="default: the model config's")
    ap.add_argument("--update-gap", type=int, default=50, help="our (and the second galore row's) update gap")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "quality")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--adamw-lrs", type=float, nargs="+", default=[1e-3, 2e-3, 3e-3, 6e-3])
    ap.add_argument("--plain-factors", type=float, nargs="*", default=[0.3, 3.0])
    ap.add_argument("--residuals", nargs="+", default=list(RESIDUALS), choices=RESIDUALS)
    ap.add_argument("--subspace-lrs", type=float, nargs="+", default=[5e-3, 1e-2, 2e-2])
    ap.add_argument("--subspace-plain-lrs", type=float, nargs="*", default=[3e-3, 1e-3])
    ap.add_argument("--no-galore", action="store_true")
    ap.add_argument("--step-time", action="store_true", help="also time step() per residual mode")
    ap.add_argument("--timed-steps", type=int, default=20)
    ap.add_argument("--extra-flags", nargs=argparse.REMAINDER, default=[], help="passed to every pretrain run")
    ap.add_argument("--markdown", type=Path, default=None, help="append the table to this file")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true", help="a tiny model for a few steps (the tests)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps = args.steps or 4
        args.extra_flags = ["--hidden-size", "32", "--intermediate-size", "64", "--num-hidden-layers", "1",
                            "--num-attention-heads", "2", "--rank", "4", "--eval-every", "2", "--eval-windows", "2",
                            "--max-train-bytes", "200000", "--tokenizer-vocab", "300", "--seq-len", "32",
                            "--batch-size", "2", "--update-gap", "2", *args.extra_flags]  # fmt: skip
        args.adamw_lrs, args.plain_factors, args.subspace_lrs = [1e-3, 3e-3, 1e-2], [3.0], [1e-2, 2e-2]
        args.subspace_plain_lrs, args.timed_steps = [3e-3], 2
    else:
        args.extra_flags = ["--update-gap", str(args.update_gap), *args.extra_flags]
    command = "python scripts/bench_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows = sweep(args)
    timing = step_times(args) if args.step_time else None
    result = {"rows": rows, "step_time": timing, "command": command}
    text = markdown(args, rows, timing, command)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.markdown:
        with args.markdown.open("a") as f:
            f.write("\n" + text)
    return result


if __name__ == "__main__":
    main()
