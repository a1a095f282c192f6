"""The comparison report: a markdown table, loss-vs-step and loss-vs-time plots, and the numbers as JSON."""

from __future__ import annotations

import math
import platform
from pathlib import Path
from typing import Any

import torch

from . import files

LABELS = {
    "adamw": "AdamW (torch)",
    "subspace": "SubspaceAdamW",
    "galore": "GaLoreAdamW (galore-torch)",
    "apollo": "APOLLOAdamW (apollo-torch)",
    "adamw8bit": "AdamW8bit (bitsandbytes)",
}


def human_bytes(size: float | None) -> str:
    if size is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{size:.2f} TiB"  # pragma: no cover


def _fmt(value: float | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def smooth(values: list[float], alpha: float = 0.1) -> list[float]:
    """Exponential moving average with bias correction (a readable curve from noisy per-step losses)."""
    out, avg = [], 0.0
    for count, value in enumerate(values, 1):
        avg = (1 - alpha) * avg + alpha * value
        out.append(avg / (1 - (1 - alpha) ** count))
    return out


def _lrs(run: dict[str, Any]) -> str:
    """'subspace 0.01 (plain parameters 0.03)': an optimizer's peak lr and its separate plain-parameter lr."""
    plain = run["config"].get("plain_lr")
    plain = plain.get(run["optimizer"]) if isinstance(plain, dict) else plain
    return f"{run['optimizer']} {run['lr']:g}" + ("" if plain is None else f" (plain parameters {float(plain):g})")


def eval_span(state: dict[str, Any]) -> str:
    """'9.038 (step 0) -> 5.244 (step 300)': the first and the last held-out loss, each with its step."""
    evals = state["evals"]
    if not evals:
        return "n/a"
    first, last = evals[0], evals[-1]
    text = f"{first['loss']:.3f} (step {first['step']})"
    return text if len(evals) == 1 else f"{text} -> {last['loss']:.3f} (step {last['step']})"


def table(runs: list[dict[str, Any]]) -> str:
    header = (
        "| optimizer | lr | steps | train loss (first → last 10) | eval loss (step 0 → last eval) | "
        "eval ppl (last eval) | "
        "optimizer state | peak memory | step time | tokens/s | refreshes (total time) |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    rows = [header]
    for run in runs:
        summary = run.get("summary") or {}
        state = run["state"]
        evals = state["evals"]
        refresh = "n/a"
        if summary.get("refreshes") is not None:
            refresh = f"{summary['refreshes']} ({summary['refresh_seconds_total']:.2f} s)"
        status = "" if run.get("status") == "finished" else f" ({run.get('status')})"
        first_loss = state["history"][0]["loss"] if state["history"] else None
        last_step = f" (step {evals[-1]['step']})" if evals else ""
        rows.append(
            f"| {LABELS.get(run['optimizer'], run['optimizer'])}{status} | {run['lr']:g} | {state['step']} | "
            f"{_fmt(first_loss, '.3f')} → {_fmt(summary.get('final_train_loss'), '.3f')} | "
            f"{_fmt(evals[0]['loss'] if evals else None, '.3f')} → {_fmt(evals[-1]['loss'] if evals else None, '.4f')}"
            f"{last_step}"
            f" | {_fmt(evals[-1]['ppl'] if evals else None, '.2f')} | {human_bytes(summary.get('state_bytes'))} | "
            f"{human_bytes(summary.get('peak_memory_bytes'))} | {_fmt(summary.get('step_time_s'), '.3f')} s | "
            f"{_fmt(summary.get('tokens_per_s'), ',.0f')} | {refresh} |"
        )
    return "\n".join(rows)


def plot(runs: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """loss_vs_step.png and loss_vs_time.png: smoothed training loss (line) and held-out loss (markers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for axis, key, label in (("step", "step", "optimizer step"), ("time", "time_s", "training time (s)")):
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
        for i, run in enumerate(runs):
            color = f"C{i}"
            history = run["state"]["history"]
            name = LABELS.get(run["optimizer"], run["optimizer"])
            if history:
                ax.plot(
                    [record[key] for record in history],
                    smooth([record["loss"] for record in history]),
                    color=color,
                    label=f"{name} train (EMA)",
                )
            evals = run["state"]["evals"]
            if evals:
                ax.plot(
                    [point[key] for point in evals],
                    [point["loss"] for point in evals],
                    "o--",
                    color=color,
                    markersize=4,
                    linewidth=1,
                    label=f"{name} held-out",
                )
        ax.set_xlabel(label)
        ax.set_ylabel("next-token loss (nats)")
        ax.set_title(f"loss vs {axis}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"loss_vs_{axis}.png"
        files.atomic_write(path, lambda tmp, fig=fig: fig.savefig(tmp, format="png"))
        plt.close(fig)
        written.append(path)
    return written


def environment() -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.machine()})"
    return f"{device}, torch {torch.__version__}, Python {platform.python_version()}"


def write(runs: list[dict[str, Any]], out_dir: Path, command: str) -> Path:
    """Write report.md, report.json and the two plots into ``out_dir``; returns the markdown path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = plot(runs, out_dir)
    first = runs[0]
    model = first["model"]
    cfg = first["config"]
    peak_kind = (first.get("summary") or {}).get("peak_memory_kind", "peak memory")
    lines = [
        f"# Pretraining report: {model['name']}",
        "",
        f"Command: `{command}`",
        "",
        f"- model: LLaMA {model['name']}, {model['parameters'] / 1e6:.2f}M parameters "
        f"(hidden {cfg['hidden_size']}, MLP {cfg['intermediate_size']}, {cfg['num_hidden_layers']} layers, "
        f"{cfg['num_attention_heads']} heads, vocabulary {model['vocab_size']})",
        f"- data: {first['data']}; tokenizer: {first['tokenizer']}",
        f"- {cfg['steps']} steps of {first['tokens_per_step']:,} tokens ({first['world_size']} process(es) x "
        f"batch {cfg['batch_size']} x accumulation {first['grad_accum']} x sequence {cfg['seq_len']}), warmup "
        f"{cfg['warmup_steps'] if cfg['warmup_steps'] is not None else max(1, cfg['steps'] // 10)} steps then "
        f"cosine to {cfg['min_lr_ratio']:g} x lr, clip {cfg['max_grad_norm']:g}, seed {cfg['seed']}, "
        f"same data order for every optimizer",
        f"- low-rank settings: rank {cfg['rank']}, update gap {cfg['update_gap']}, scale {cfg['scale']:g} "
        f"(subspace: refresh {cfg['refresh']}, moments {cfg['moments']}, proj_type {cfg['proj_type']}, "
        f"residual {cfg.get('residual', 'none')}"
        + (", layer-wise updates inside backward, clipping by the layer-wise rule)" if cfg.get("layerwise") else ")"),
        f"- learning rates: {', '.join(_lrs(run) for run in runs)}; chosen by: {cfg.get('lr_tuning', 'not recorded')}",
        f"- machine: {environment()}, {first['device']}, mixed precision {first['mixed_precision']}",
        "",
        table(runs),
        "",
        f"Train loss: the first step's, and the mean of the last 10 steps. Eval: mean loss on {cfg['eval_windows']} "
        f"held-out sequences, before training and at the last evaluation, whose step is shown (the end, or --stop-at "
        f"for a stopped run). Optimizer state: bytes of state tensors on process 0. "
        f"Peak memory: {peak_kind} of process 0 during training. Step time: mean wall time per optimizer step after "
        f"the first. Refreshes: subspace basis refresh events and their total wall time (SubspaceAdamW only).",
        "",
        *(f"![{plot.stem}]({plot.name})" for plot in plots),
        "",
    ]
    path = out_dir / "report.md"
    files.write_text(path, "\n".join(lines))
    files.write_json(
        out_dir / "report.json",
        {
            "command": command,
            "runs": [
                {key: run[key] for key in ("optimizer", "lr", "status", "summary", "run_dir") if key in run}
                | {"evals": run["state"]["evals"]}
                for run in runs
            ],
        },
    )
    return path
