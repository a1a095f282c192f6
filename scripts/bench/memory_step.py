"""Memory of a training step: weights, peak live gradients and optimizer state, with regular
stepping and with layer-wise updates inside backward. Used by ``scripts.bench.memory``; this module is
also the entry point of the measuring child processes (``python -m scripts.bench.memory_step --child JSON``).

Counted: from ``scripts.bench.memory``'s exact state bytes (retained: every storage the state keeps alive) plus
weights (every parameter in the weight dtype) plus the peak of live gradients:

- regular stepping: every trainable gradient at once, in the weight dtype (all of them exist when
  ``step()`` runs);
- layer-wise (``SubspaceAdamW.update_in_backward``, galore-torch's per-layer mode): the largest single
  weight's gradient. Each parameter is updated as soon as its gradient is complete and the gradient is
  freed at once, so one gradient is alive at a time, plus whatever the allocator keeps (slack; not counted)
  and the update's own temporaries (about one weight-sized tensor; not counted either).

Measured: one fresh process per configuration builds the pretrain job's LLaMA (``configs/llama_*.yaml``,
random init, fp32), its optimizer (``subspace_optim.pretrain.optimizers.build``: attention and MLP matrices
projected, embeddings, head and norms plain), and trains a few steps on random token ids. On CPU it reports
the process's peak RSS (``ru_maxrss``) and its RSS after the model and the token ids were built (the
baseline); glibc's ``MALLOC_MMAP_THRESHOLD_`` is fixed so freed tensors leave the RSS. On CUDA it reports
``torch.cuda.max_memory_allocated`` and the allocated bytes after the build.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from .common import ROOT, SMOKE, table

GB = 1e9
GIB = 2**30
MIB = 2**-20
RESULT = "MEMORY_STEP_RESULT "
TARGET = ("7b", "bfloat16", "ours_int8_layerwise", 20 * GB)  # the target: weights + gradients + state <= 20 GB

# key -> (label, scripts.bench.memory state row, gradients: "regular" | "layerwise")
STEP_ROWS = {
    "adamw": ("torch AdamW", "adamw", "regular"),
    "galore": ("galore-torch GaLoreAdamW", "galore", "regular"),
    "galore_per_layer": ("galore-torch GaLoreAdamW, its per-layer mode", "galore", "layerwise"),
    "galore8bit_per_layer": (
        "galore-torch GaLoreAdamW8bit, per-layer (the paper's 7B setting)",
        "galore8bit",
        "layerwise",
    ),
    "apollo": ("apollo-torch APOLLOAdamW 1.0", "apollo", "regular"),
    "adamw8bit": ("bitsandbytes AdamW8bit", "adamw8bit", "regular"),
    "ours": ("SubspaceAdamW, fp32 state", "ours_float32_float32", "regular"),
    "ours_layerwise": ("SubspaceAdamW layer-wise, fp32 state", "ours_float32_float32", "layerwise"),
    "ours_int8": ("SubspaceAdamW, int8 moments + bf16 bases", "ours_int8_bfloat16", "regular"),
    "ours_int8_layerwise": ("SubspaceAdamW layer-wise, int8 moments + bf16 bases", "ours_int8_bfloat16", "layerwise"),
}


# ------------------------------------------------------------------------------------------- accounting
def gradients(specs: list[Any], w: int) -> dict[str, Any]:
    """Peak live gradient bytes: every trainable gradient (regular) or the largest one (layer-wise)."""
    largest = max(specs, key=lambda s: s.numel)
    return {
        "regular": sum(s.numel for s in specs) * w,
        "layerwise": largest.numel * w,
        "largest": {"name": largest.name, "shape": list(largest.shape)},
    }


def step_accounting(specs: list[Any], w: int, state: dict[str, Any]) -> dict[str, Any]:
    """Weights + peak live gradients + optimizer state (retained bytes) per ``STEP_ROWS`` row; rows whose
    state row is missing from ``state`` (``scripts.bench.memory``'s per-dtype results) are left out."""
    grads = gradients(specs, w)
    weights = sum(s.numel for s in specs) * w
    rows = {}
    for key, (_, state_key, mode) in STEP_ROWS.items():
        if state_key not in state:
            continue
        s = state[state_key]["retained"]
        rows[key] = {"weights": weights, "gradients": grads[mode], "state": s, "total": weights + grads[mode] + s}
    return {"weights": weights, "gradients": grads, "rows": rows}


def target(step: dict[str, Any]) -> dict[str, Any] | None:
    """Issue 11's target, from the accounting: LLaMA-7B, bf16 weights, ours layer-wise with int8 + bf16 state."""
    model, wname, key, limit = TARGET
    row = step.get(model, {}).get(wname, {}).get("rows", {}).get(key)
    if row is None:
        return None
    return {
        "model": model,
        "weights_dtype": wname,
        "row": key,
        "total_bytes": row["total"],
        "total_gb": row["total"] / GB,
        "total_gib": row["total"] / GIB,
        "limit_gb": limit / GB,
        "met": row["total"] <= limit,
        **{f"{k}_gb": row[k] / GB for k in ("weights", "gradients", "state")},
    }


ACCOUNTING_NOTE = (
    "GB = 10^9 bytes. State: retained bytes (every storage the state keeps alive; galore-torch's fp32 basis keeps its "
    "SVD factor). Gradients: regular = every trainable gradient, in the weight dtype; layer-wise = the largest single "
    "weight's gradient, which is what `update_in_backward` (and galore-torch's per-layer mode, single GPU, one "
    "optimizer per parameter) leaves alive, plus allocator slack and the update's temporaries, not counted. "
    "Activations are not counted. Cells: **total** (of which optimizer state). Rows named per-layer or layer-wise "
    "update inside backward; the others step regularly"
)


def accounting_tables(step: dict[str, Any], ranks: dict[str, int]) -> list[dict[str, Any]]:
    """Per weight dtype: weights, peak live gradients and every row's total (state), per size."""
    names = list(step)
    columns = ["", *(f"{m.upper()} r{ranks[m]}" for m in names)]
    tables = []
    for wname in next(iter(step.values())):
        first = step[names[0]][wname]
        largest = first["gradients"]["largest"]["name"]
        rows = [["weights", *(f"{step[m][wname]['weights'] / GB:.3f}" for m in names)]]
        for mode, label in (("regular", "regular"), ("layerwise", f"layer-wise (largest: {largest})")):
            rows.append([f"gradients, {label}", *(f"{step[m][wname]['gradients'][mode] / GB:.3f}" for m in names)])
        for key in first["rows"]:
            rows.append([STEP_ROWS[key][0], *(_cell(step[m][wname]["rows"][key]) for m in names)])
        title = f"Memory of a training step, {wname} weights: weights + peak live gradients + optimizer state (GB)"
        tables.append(table(title, columns, rows, [ACCOUNTING_NOTE] if not tables else []))
    return tables


def _cell(row: dict[str, int]) -> str:
    return f"**{row['total'] / GB:.3f}** ({row['state'] / GB:.3f})"


def target_note(t: dict[str, Any] | None) -> str:
    if t is None:
        return "target (LLaMA-7B, bf16 weights): not computed (7b or the int8 + bf16 state row not in this run)"
    verdict = "met" if t["met"] else "NOT met"
    return (
        f"**target: {verdict}.** LLaMA-7B, bf16 weights, rank 1024, {STEP_ROWS[t['row']][0]}: weights "
        f"{t['weights_gb']:.3f} GB + peak live gradients {t['gradients_gb']:.3f} GB + state {t['state_gb']:.3f} GB "
        f"= **{t['total_gb']:.3f} GB ({t['total_gib']:.3f} GiB)**, limit {t['limit_gb']:.0f} GB (before activations)"
    )


# ------------------------------------------------------------------------------------------ measured: child
# size -> (config in configs/, overrides): the pretrain job's LLaMA; "smoke" is a tiny one for the tests.
RSS_MODELS = {
    "smoke": (
        "llama_9m",
        {
            "hidden_size": SMOKE.hidden,
            "intermediate_size": SMOKE.intermediate,
            "num_hidden_layers": SMOKE.layers,
            "tokenizer_vocab": SMOKE.vocab,
            "rank": SMOKE.rank,
        },
    ),
    "60m": ("llama_60m", {}),
    "130m": ("llama_130m", {}),
}
# config -> (label, accounting row it is compared with)
RSS_CONFIGS = {
    "adamw": ("torch AdamW, foreach=False (what the default resolves to on CPU)", "adamw"),
    "adamw_foreach": ("torch AdamW, foreach=True (the default on CUDA)", "adamw"),
    "adamw_fused": ("torch AdamW as the pretrain job builds it (fused=True on CPU)", "adamw"),
    "galore": ("galore-torch GaLoreAdamW", "galore"),
    "ours": ("SubspaceAdamW, fp32 state", "ours"),
    "ours_layerwise": ("SubspaceAdamW layer-wise, fp32 state", "ours_layerwise"),
    "ours_int8": ("SubspaceAdamW, int8 moments + bf16 bases", "ours_int8"),
    "ours_int8_layerwise": ("SubspaceAdamW layer-wise, int8 moments + bf16 bases", "ours_int8_layerwise"),
}
DEFAULT_RSS_CONFIGS = ("adamw", "adamw_fused", "galore", "ours", "ours_layerwise", "ours_int8_layerwise")


def _config(size: str, config: str) -> Any:
    from subspace_optim.pretrain.config import load_config

    name, overrides = RSS_MODELS[size]
    if config.startswith("ours_int8"):
        overrides = {**overrides, "moments_dtype": "int8", "basis_dtype": "bfloat16"}
    return load_config(["--model", name], **overrides)


def _optimizer(config: str, model: Any, cfg: Any) -> Any:
    import torch

    from subspace_optim.pretrain import optimizers

    if config in ("adamw", "adamw_foreach"):
        groups = optimizers._plain_groups(model, cfg.weight_decay, cfg, "adamw")
        return torch.optim.AdamW(groups, lr=cfg.lr_for("adamw"), foreach=config == "adamw_foreach", fused=False)
    opt = optimizers.build({"adamw_fused": "adamw", "galore": "galore"}.get(config, "subspace"), model, cfg)
    if config.endswith("_layerwise"):
        opt.update_in_backward(model)
    return opt


def _memory_now(device: Any) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _rss()


def _memory_peak(device: Any) -> int:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def child(job: dict[str, Any]) -> dict[str, Any]:
    """Build the model and optimizer, train ``job['steps']`` steps, report memory (bytes)."""
    import torch
    from torch import nn

    from subspace_optim.pretrain import loop, optimizers

    torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    cfg = _config(job["size"], job["config"])
    model = loop.build_model(cfg, cfg.tokenizer_vocab).to(device)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.tokenizer_vocab, (job["steps"], job["batch"], job["seq"] + 1), generator=gen)
    tokens = tokens.to(device)
    if job["config"] == "galore":  # galore-torch imports bitsandbytes: libraries belong to the baseline
        optimizers._import("galore")
    probe = model.model.layers[0].self_attn.q_proj.weight
    before = probe.detach().clone()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    baseline, baseline_peak = _memory_now(device), _memory_peak(device)
    opt = _optimizer(job["config"], model, cfg)
    start, losses, alive = time.perf_counter(), [], []
    for step in range(job["steps"]):
        window = tokens[step]
        logits = model(input_ids=window[:, :-1]).logits
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
        loss.backward()
        alive.append(sum(p.grad is not None for p in model.parameters()))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        del logits, loss
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {
        "baseline": baseline,
        "baseline_peak": baseline_peak,
        "peak": _memory_peak(device),
        "params": sum(p.numel() for p in model.parameters()),
        "grads_alive_after_backward": alive,
        "losses": losses,
        "weights_moved": not torch.equal(before, probe.detach()),
        "seconds": time.perf_counter() - start,
        "vocab": cfg.tokenizer_vocab,
        "rank": cfg.rank,
    }


# ------------------------------------------------------------------------- measured: one update's temporaries
# LLaMA-7B's largest plain weight (embedding; the head has its shape) and largest projected one (MLP), bf16.
TRANSIENT_WEIGHTS = {"embed_tokens": ((32000, 4096), False), "mlp (gate/up/down)": ((11008, 4096), True)}
TRANSIENT_OPTIMIZERS = {
    "adamw": "torch AdamW, foreach=False",
    "ours": "SubspaceAdamW, fp32 state",
    "ours_int8": "SubspaceAdamW, int8 moments + bf16 bases",
}


class _Poll:
    """Highest RSS seen by a thread sampling /proc every half millisecond while the block runs."""

    def __enter__(self) -> _Poll:
        import threading

        self.peak, self._stop = _rss(), False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, _rss())
            time.sleep(0.0005)

    def __exit__(self, *exc: Any) -> None:
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _rss() -> int:
    with open("/proc/self/statm") as f:  # Linux: resident pages are the second field
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def transient_child(job: dict[str, Any]) -> dict[str, Any]:
    """One weight with its gradient: RSS above (weight + gradient) during the first step, minus the state it
    creates (the first step also finds the basis), and above (weight + gradient + state) during three more."""
    import torch

    from subspace_optim import SubspaceAdamW
    from subspace_optim.metrics import state_footprint

    torch.set_num_threads(job["threads"])
    dtype, shape, gen = getattr(torch, job["dtype"]), tuple(job["shape"]), torch.Generator().manual_seed(0)
    p = torch.nn.Parameter((0.02 * torch.randn(shape, generator=gen)).to(dtype))
    p.grad = (1e-3 * torch.randn(shape, generator=gen)).to(dtype)
    if job["optimizer"] == "adamw":
        opt = torch.optim.AdamW([p], lr=1e-3, foreach=False)
    else:
        group = {"params": [p], "rank": job["rank"]} if job["projected"] else {"params": [p]}
        low = {"moments_dtype": "int8", "basis_dtype": "bfloat16"} if job["optimizer"] == "ours_int8" else {}
        opt = SubspaceAdamW([group], lr=1e-3, **low)
    gc.collect()
    base, start = _rss(), time.perf_counter()
    with _Poll() as first:
        opt.step()
    state = state_footprint(opt)[1]
    steady = _rss()
    with _Poll() as later:
        for _ in range(3):
            opt.step()
    return {
        "weight_bytes": p.numel() * p.element_size(),
        "state_bytes": state,
        "first_step": first.peak - base - state,
        "update": later.peak - steady,
        "seconds": time.perf_counter() - start,
    }


def measure_transient(dtype: str, rank: int, threads: int, log: Any = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for weight, (shape, projected) in TRANSIENT_WEIGHTS.items():
        for optimizer in TRANSIENT_OPTIMIZERS:
            job = {
                "kind": "transient",
                "optimizer": optimizer,
                "shape": list(shape),
                "projected": projected,
                "rank": rank,
                "dtype": dtype,
                "threads": threads,
            }
            got = run_child(job, timeout=1800)
            out.setdefault(weight, {})[optimizer] = {**got, "shape": list(shape), "projected": projected}
            if log:
                log(
                    f"transient {weight} {optimizer}: update +{got['update'] * MIB:.1f} MiB, "
                    f"first step +{got['first_step'] * MIB:.1f} MiB, {got['seconds']:.1f} s"
                )
    return out


def with_transient(t: dict[str, Any] | None, transient: dict[str, Any], largest_grad: int) -> dict[str, Any] | None:
    """The target's total with the layer-wise peak taken as max over the measured weights of (its gradient +
    its update's temporaries, first step or later) instead of the largest gradient alone."""
    if t is None or not transient:
        return None
    per = [w["ours_int8"] for w in transient.values() if "ours_int8" in w]
    worst = max(w["weight_bytes"] + max(w["update"], w["first_step"], 0) for w in per)  # gradient = weight size
    total = t["total_bytes"] - largest_grad + max(worst, largest_grad)
    return {"total_bytes": total, "total_gb": total / GB, "total_gib": total / GIB, "met": total <= t["limit_gb"] * GB}


TRANSIENT_COLUMNS = ["weight", "optimizer", "weight", "state", "first step (basis found, state made)", "later steps"]


def transient_table(transient: dict[str, Any], plus: dict[str, Any] | None, dtype: str, rank: int) -> dict[str, Any]:
    rows = []
    for weight, per in transient.items():
        for key, row in per.items():
            size = row["weight_bytes"]
            rows.append(
                [
                    f"{weight} {row['shape'][0]}x{row['shape'][1]}",
                    TRANSIENT_OPTIMIZERS[key],
                    f"{size * MIB:,.1f}",
                    f"{row['state_bytes'] * MIB:,.1f}",
                    f"{row['first_step'] * MIB:,.1f} ({row['first_step'] / size:.2f}x)",
                    f"{row['update'] * MIB:,.1f} ({row['update'] / size:.2f}x)",
                ]
            )
    notes = []
    if plus is not None:
        verdict = "met" if plus["met"] else "NOT met"
        notes.append(
            f"target with these temporaries in the layer-wise peak (if the GPU path allocated like the CPU "
            f"reference path): **{plus['total_gb']:.3f} GB ({plus['total_gib']:.3f} GiB), {verdict}**"
        )
    title = (
        f"One update's temporaries, LLaMA-7B's largest weights, {dtype}, rank {rank} (projected), CPU reference "
        "path, RSS sampled every 0.5 ms, MiB"
    )
    return table(title, TRANSIENT_COLUMNS, rows, notes)


# ----------------------------------------------------------------------------------------- measured: parent
def child_env(threads: int) -> dict[str, str]:
    """glibc: allocations >= 64 KiB are mmapped (so freeing them returns the pages), the heap is trimmed
    above 128 KiB of free top; one OpenMP pool of ``threads``."""
    return {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "MALLOC_TRIM_THRESHOLD_": "131072",
        "OMP_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
    }


def run_child(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One configuration in a fresh ``sys.executable`` process; its last ``RESULT`` line, parsed."""
    proc = subprocess.run(
        [sys.executable, "-m", __spec__.name if __spec__ else "scripts.bench.memory_step", "--child", json.dumps(job)],
        capture_output=True,
        text=True,
        env=child_env(job["threads"]),
        timeout=timeout,
        cwd=ROOT,
    )
    found = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"child {job} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(found[-1][len(RESULT) :])


CHILD_KEYS = ("steps", "batch", "seq", "threads", "device")


def measure_rss(
    sizes: list[str], configs: list[str], job: dict[str, Any], timeout: float = 1800, log: Any = None
) -> dict[str, Any]:
    """Every (size, config), ``job['repeats']`` times, interleaved (repeat r runs every config before r + 1, so a
    change in the machine's load spreads over all of them); medians per (size, config). ``job``: steps, batch,
    seq, threads and device of each child."""
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {s: {c: [] for c in configs} for s in sizes}
    for size in sizes:
        for r in range(job["repeats"]):
            for config in configs:
                child_job = {"size": size, "config": config, **{k: job[k] for k in CHILD_KEYS}}
                got = run_child(child_job, timeout)
                runs[size][config].append(got)
                if log:
                    log(
                        f"rss {size} {config} run {r}: peak {got['peak'] * MIB:.1f} MiB, "
                        f"+{(got['peak'] - got['baseline']) * MIB:.1f} MiB, {got['seconds']:.1f} s"
                    )
    return {size: {c: summarize(runs[size][c]) for c in configs} for size in sizes}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    increments = [r["peak"] - r["baseline"] for r in runs]
    return {
        "peak": statistics.median(r["peak"] for r in runs),
        "baseline": statistics.median(r["baseline"] for r in runs),
        "baseline_peak": statistics.median(r["baseline_peak"] for r in runs),
        "increment": statistics.median(increments),
        "increment_min": min(increments),
        "increment_max": max(increments),
        "grads_alive_after_backward": runs[0]["grads_alive_after_backward"],
        "weights_moved": all(r["weights_moved"] for r in runs),
        "finite": all(all(x == x and abs(x) != float("inf") for x in r["losses"]) for r in runs),
        "params": runs[0]["params"],
        "rank": runs[0]["rank"],
        "seconds": statistics.median(r["seconds"] for r in runs),
        "runs": runs,
    }


def ratios(measured: dict[str, Any]) -> None:
    """Increment (peak - baseline) and peak of each config as a fraction of torch AdamW's and galore-torch's,
    measured in the same run; in place."""
    for per in measured.values():
        for row in per.values():
            for ref in ("adamw", "galore"):
                if ref in per:
                    row[f"increment_vs_{ref}"] = row["increment"] / per[ref]["increment"]
                    row[f"peak_vs_{ref}"] = row["peak"] / per[ref]["peak"]


RSS_COLUMNS = [
    "configuration",
    "peak",
    "after build",
    "increment (min-max)",
    "x AdamW",
    "x galore-torch",
    "counted gradients + state",
    "gradients alive after backward",
]


def rss_tables(measured: dict[str, Any], predicted: dict[str, Any], job: dict[str, Any]) -> list[dict[str, Any]]:
    """One table per size; ``predicted``: size -> accounting rows (fp32) for the comparison column."""
    what = "CUDA max allocated" if job["device"] == "cuda" else "peak RSS"
    tables = []
    for size, per in measured.items():
        first = next(iter(per.values()))
        rows = []
        for config, row in per.items():
            acc = predicted.get(size, {}).get(RSS_CONFIGS[config][1])
            counted = "-" if acc is None else f"{(acc['gradients'] + acc['state']) * MIB:,.1f}"
            spread = f"{row['increment_min'] * MIB:,.1f}-{row['increment_max'] * MIB:,.1f}"
            rows.append(
                [
                    RSS_CONFIGS[config][0],
                    f"{row['peak'] * MIB:,.1f}",
                    f"{row['baseline'] * MIB:,.1f}",
                    f"{row['increment'] * MIB:,.1f} ({spread})",
                    _ratio(row, "adamw"),
                    _ratio(row, "galore"),
                    counted,
                    str(max(row["grads_alive_after_backward"])),
                ]
            )
        title = (
            f"LLaMA-{size.upper()} (fp32 weights, rank {first['rank']}, {first['params']:,} parameters): {what}, "
            f"median of {len(first['runs'])} fresh processes, MiB"
        )
        tables.append(table(title, RSS_COLUMNS, rows))
    return tables


def _ratio(row: dict[str, Any], ref: str) -> str:
    key = f"increment_vs_{ref}"
    return "-" if key not in row else f"{row[key]:.3f}"


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--child":
    _job = json.loads(sys.argv[2])
    result = transient_child(_job) if _job.get("kind") == "transient" else child(_job)
    print(RESULT + json.dumps(result), flush=True)
