"""Regular-step time, refresh-step time and optimizer state bytes on LLaMA projection shapes.

Compares, in one run and on the same matrices and gradients, full ``optimizer.step()`` calls of:
torch.optim.AdamW (fused and foreach; the faster one is the baseline), galore-torch 1.0 GaLoreAdamW
(rank r, proj_type std, scale 0.25), SubspaceAdamW(engine="reference") and, where the kernels run,
SubspaceAdamW(engine="triton") (the batched Triton step, with its host work: state lookup, batching,
tables). apollo-torch is reported as skipped when not installed.

Regular steps: every optimizer is built with a refresh gap larger than the run, takes one step (which
refreshes every basis, and compiles the kernels) and one untimed warm-up step, then ``--steps`` timed
steps; the median is reported. Refresh steps: every subspace optimizer is built with a refresh gap of
1, so that each of its steps refreshes every matrix (galore-torch: ``step % update_proj_gap == 0``; ours:
``step % update_gap == 0``), takes one untimed step (its first, cold refresh), then ``--refresh-steps``
timed steps, each on a new gradient (the same gradients for every optimizer); the median is reported.
Ours is timed with refresh="warm" (the default, so the timed refreshes are warm: they start from the
previous basis) and with refresh="rsvd"; galore-torch's refresh is a full SVD. A refresh step is the whole
step: the refresh, the moments' transport (ours) and the regular update.

The optimizers' steps are interleaved (``common.interleaved``: one step of each in turn, round after
round), so that load from other processes on a shared machine falls on all of them alike.
The script also checks what it timed:
no basis changed during the timed regular steps, every basis changed at every timed refresh step, the
triton row's steps called the kernels (``subspace_optim.kernels.step.subspace_adamw``/``refresh.refresh_bases`` are
wrapped and counted) and the reference rows never did. Finally it checks, on the timed reference
optimizer, the non-finite guarantee: with ``nonfinite="raise"`` a NaN gradient raises and nothing
changes; with ``"skip"`` the matrices with a NaN/Inf gradient are left untouched and the others step.

    python -m scripts.bench.step --model 60m --dtype float32 --json step.json   # CPU (1 thread)
    python -m scripts.bench.step --model 1b --json step.json                    # GPU
    python -m scripts.bench.step --smoke [--kernels]                            # CPU, < 1 minute

On CPU, ``--model 60m`` and ``--smoke`` run (``--threads``, default 1 on CPU); the 1b and 7b-layer shapes
need a GPU. With ``--smoke --kernels`` the engine="triton" row runs the kernels under TRITON_INTERPRET=1
on CPU tensors (engine="triton" is obeyed there), which checks the wiring, not the speed; the interpreted
kernels get no refresh rows. ``--profile`` prints the top operators of one regular step of galore-torch
and of ours (torch.profiler, self CPU time).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch

from . import common

GPU_MODELS = ("60m", "1b", "7b-layer")
REGULAR_GAP, REFRESH_GAP = 10**9, 1  # no timed regular step refreshes; every refresh step refreshes all


def _state_of(opt: torch.optim.Optimizer, param: torch.nn.Parameter) -> dict[str, Any]:
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[param].items()}


def _same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def check_all_or_nothing(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> str:
    """The timed reference optimizer keeps the non-finite guarantee: ``"raise"`` changes nothing, ``"skip"``
    leaves exactly the matrices with a NaN/Inf gradient untouched (weights, moments, basis, counters)."""
    bad = {0: float("nan"), len(params) - 1: float("inf")}
    for index, value in bad.items():
        params[index].grad.view(-1)[index % params[index].numel()] = value
    weights = [p.detach().clone() for p in params]
    states = [_state_of(opt, p) for p in params]
    group = opt.param_groups[0]
    group["nonfinite"] = "raise"
    try:
        opt.step()
        raise RuntimeError("nonfinite='raise': a NaN gradient did not raise")
    except FloatingPointError:
        pass
    finally:
        group["nonfinite"] = "skip"
    for param, weight, state in zip(params, weights, states, strict=True):
        if not (torch.equal(param, weight) and _same_state(_state_of(opt, param), state)):
            raise RuntimeError("nonfinite='raise' changed a weight or its state")
    opt.step()
    for index, (param, weight, state) in enumerate(zip(params, weights, states, strict=True)):
        untouched = torch.equal(param, weight) and _same_state(_state_of(opt, param), state)
        if untouched != (index in bad):
            raise RuntimeError(f"nonfinite='skip': matrix {index} {'was left' if untouched else 'moved'} wrongly")
    return (
        f"all-or-nothing kept on the timed configuration: a NaN and an Inf gradient (2 of {len(params)} matrices) "
        "raised with nothing changed under nonfinite='raise', and under 'skip' left exactly those 2 untouched"
    )


def profile_step(opt: torch.optim.Optimizer, top: int) -> list[dict[str, Any]]:
    """The ``top`` operators of one ``opt.step()`` by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    opt.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [
        {
            "op": e.key,
            "self_cpu_ms": e.self_cpu_time_total / 1e3,
            "share": e.self_cpu_time_total / total,
            "calls": e.count,
        }
        for e in events[:top]
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=GPU_MODELS, default="1b", help="a size from configs/ (7b-layer: one layer)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, reference engine, end to end")
    parser.add_argument("--kernels", action="store_true", help="on CPU: also run the kernels interpreted")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: 1 on CPU, torch's on CUDA)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--steps", type=int, help="timed regular steps (default 10; smoke 3)")
    parser.add_argument("--refresh-steps", type=int, help="timed refresh steps (default 3; smoke 2)")
    parser.add_argument("--profile", action="store_true", help="print the top ops of one regular step")
    parser.add_argument("--power-iters", type=int, default=common.library_default("power_iters"))
    parser.add_argument("--oversample", type=int, default=common.library_default("oversample"))
    common.add_output_args(parser)
    args = parser.parse_args(argv)
    args.steps = args.steps or (3 if args.smoke else 10)
    args.refresh_steps = args.refresh_steps or (2 if args.smoke else 3)
    return args


def galore_build(params: list[torch.nn.Parameter], rank: int, gap: int) -> torch.optim.Optimizer:
    from galore_torch import GaLoreAdamW

    group = {"params": params, "rank": rank, "update_proj_gap": gap, "scale": 0.25, "proj_type": "std"}
    return GaLoreAdamW([group], lr=1e-2)


def subspace_build(engine: str, refresh: str, sketch: dict[str, int]) -> common.Build:
    from subspace_optim import SubspaceAdamW

    def build(params: list[torch.nn.Parameter], rank: int, gap: int) -> torch.optim.Optimizer:
        group = {"params": params, "rank": rank, "update_gap": gap, "scale": 0.25, "refresh": refresh, **sketch}
        return SubspaceAdamW([group], lr=1e-2, engine=engine)

    return build


def adamw_build(kind: str) -> common.Build:
    return lambda params, rank, gap: torch.optim.AdamW(params, lr=1e-3, **{kind: True})


def subspace_contender(
    engine: str, refresh: str, sketch: dict[str, int], timed_refresh: bool = True
) -> common.Contender:
    """SubspaceAdamW on ``engine`` refreshing by ``refresh``: the warm one is timed on regular and refresh steps,
    the others on refresh steps only; ``timed_refresh=False`` (interpreted kernels) gives it no refresh rows."""
    return common.Contender(
        f"subspace_{engine}" + ("" if refresh == "warm" else f"_{refresh}"),
        f"SubspaceAdamW {engine}, refresh={refresh}",
        subspace_build(engine, refresh, sketch),
        regular=refresh == "warm",
        refresh=refresh if timed_refresh else None,
        kernels=engine == "triton",
    )


def kernel_contenders(device: str, sketch: dict[str, int], notes: list[str]) -> list[common.Contender]:
    """The triton rows: timed on CUDA; on CPU (``--kernels``) interpreted, a wiring check without refresh rows."""
    if importlib.util.find_spec("triton") is None:
        notes.append("triton not installed: kernel engine skipped")
        return []
    if device == "cpu":
        notes.append("subspace_triton ran under TRITON_INTERPRET=1: its CPU time is meaningless (no refresh rows)")
        return [subspace_contender("triton", "warm", sketch, timed_refresh=False)]
    return [subspace_contender("triton", policy, sketch) for policy in ("warm", "rsvd")]


def contenders(device: str, kernels: bool, sketch: dict[str, int], notes: list[str]) -> list[common.Contender]:
    found = [
        common.Contender("adamw_fused", "torch AdamW, fused", adamw_build("fused")),
        common.Contender("adamw_foreach", "torch AdamW, foreach", adamw_build("foreach")),
    ]
    if importlib.util.find_spec("galore_torch") is not None:
        found.append(common.Contender("galore", "galore-torch GaLoreAdamW (refresh: SVD)", galore_build, refresh="svd"))
    else:
        notes.append("galore-torch not installed: skipped")
    if importlib.util.find_spec("apollo_torch") is None:
        notes.append("apollo-torch not installed: skipped")
    found += [subspace_contender("reference", policy, sketch) for policy in ("warm", "rsvd")]
    return found + (kernel_contenders(device, sketch, notes) if kernels else [])


@dataclass
class Setup:
    shape: common.LlamaShape
    device: str
    dtype: torch.dtype


def start(setup: Setup, chosen: list[common.Contender], gap: int, warmups: int) -> list[common.Running]:
    """common.Build every chosen optimizer on its own copy of the matrices and take its untimed first steps (the first
    refreshes every basis and compiles the kernels)."""
    running = []
    for contender in chosen:
        params = common.projected_params(setup.shape, setup.device, setup.dtype)
        opt = contender.build(params, setup.shape.rank, gap)
        for _ in range(warmups):
            opt.step()
        common.sync(setup.device)
        running.append(common.Running(contender, opt, params))
    return running


def regular_steps(
    setup: Setup, chosen: list[common.Contender], args: argparse.Namespace, counter: common.KernelCounter | None
) -> tuple[dict[str, dict[str, Any]], dict[str, Any], str]:
    """Timed regular steps and state bytes per optimizer; the top ops (``--profile``) and the non-finite check."""
    from subspace_optim.metrics import state_footprint

    running = start(setup, [c for c in chosen if c.regular], REGULAR_GAP, warmups=2)
    common.run_interleaved(running, args.steps, setup.device, refresh=False, counter=counter)
    regular = {}
    for run in running:
        logical, retained = state_footprint(run.opt)
        regular[run.contender.name] = {
            "label": run.contender.label,
            "step_s": common.median(run.times),
            "step_s_runs": run.times,
            "state_bytes": logical,
            "state_bytes_retained": retained,
        }
    by_name = {run.contender.name: run for run in running}
    profiles = {
        name: profile_step(by_name[name].opt, 12)
        for name in ("galore", "subspace_reference")
        if args.profile and name in by_name
    }
    ours = by_name["subspace_reference"]
    return regular, profiles, check_all_or_nothing(ours.opt, ours.params)


def refresh_steps(
    setup: Setup, chosen: list[common.Contender], rounds: int, counter: common.KernelCounter | None
) -> dict[str, dict[str, Any]]:
    running = start(setup, [c for c in chosen if c.refresh], REFRESH_GAP, warmups=1)
    common.run_interleaved(running, rounds, setup.device, refresh=True, counter=counter)
    return {
        run.contender.name: {
            "label": run.contender.label,
            "refresh": run.contender.refresh,
            "refresh_step_s": common.median(run.times),
            "refresh_step_s_runs": run.times,
        }
        for run in running
    }


def compare(regular: dict[str, dict[str, Any]], refreshes: dict[str, dict[str, Any]]) -> tuple[dict, str]:
    """The faster AdamW becomes the baseline row ``adamw``; ratios against it and galore-torch."""
    variant = min(("adamw_fused", "adamw_foreach"), key=lambda name: regular[name]["step_s"])
    regular = {("adamw" if n == variant else n): r for n, r in sorted(regular.items(), key=lambda i: i[0] != variant)}
    regular["adamw"]["variant"] = variant.removeprefix("adamw_")
    base, galore, galore_refresh = regular["adamw"], regular.get("galore"), refreshes.get("galore")
    for row in regular.values():
        row["step_vs_adamw"] = row["step_s"] / base["step_s"]
        row["state_vs_adamw"] = row["state_bytes"] / base["state_bytes"]
        if galore:
            row["step_vs_galore"] = row["step_s"] / galore["step_s"]
            row["state_vs_galore"] = row["state_bytes"] / galore["state_bytes"]
    for row in refreshes.values():
        row["refresh_vs_adamw_step"] = row["refresh_step_s"] / base["step_s"]
        if galore_refresh:
            row["refresh_vs_galore"] = row["refresh_step_s"] / galore_refresh["refresh_step_s"]
    return regular, variant


def paired(ours: list[float], theirs: list[float]) -> float:
    """Median over rounds of ours / theirs (``common.Timings.ratios``)."""
    return common.median(common.Timings({"ours": ours, "theirs": theirs}).ratios("ours", "theirs"))


def acceptance(regular: dict, refreshes: dict, guarantee: str, smoke: bool) -> tuple[dict | None, str | None]:
    """Ours (reference engine) against galore-torch: ratio of medians and median of per-round ratios."""
    galore, galore_refresh = regular.get("galore"), refreshes.get("galore")
    if not (galore and galore_refresh):
        return None, None
    ours, warm, rsvd = (
        regular["subspace_reference"],
        refreshes["subspace_reference"],
        refreshes["subspace_reference_rsvd"],
    )
    reg_paired = paired(ours["step_s_runs"], galore["step_s_runs"])
    warm_paired = 1 / paired(warm["refresh_step_s_runs"], galore_refresh["refresh_step_s_runs"])
    rsvd_paired = 1 / paired(rsvd["refresh_step_s_runs"], galore_refresh["refresh_step_s_runs"])
    found = {
        "regular_step_vs_galore": ours["step_vs_galore"],
        "regular_step_vs_galore_paired": reg_paired,
        "regular_within_1.05x": max(ours["step_vs_galore"], reg_paired) <= 1.05,
        "refresh_step_speedup_vs_galore_warm": 1 / warm["refresh_vs_galore"],
        "refresh_step_speedup_vs_galore_warm_paired": warm_paired,
        "refresh_step_speedup_vs_galore_rsvd": 1 / rsvd["refresh_vs_galore"],
        "refresh_step_speedup_vs_galore_rsvd_paired": rsvd_paired,
        "refresh_at_least_3x_faster": min(1 / warm["refresh_vs_galore"], warm_paired) >= 3,
        "nonfinite_guarantee": guarantee,
    }
    note = (
        f"{'(smoke: meaningless) ' if smoke else ''}acceptance (reference engine vs galore-torch; ratio of "
        f"medians, then median of per-round ratios): regular step {ours['step_vs_galore']:.3f}x / "
        f"{reg_paired:.3f}x (target <= 1.05x), refresh step (warm) "
        f"{found['refresh_step_speedup_vs_galore_warm']:.2f}x / {warm_paired:.2f}x faster (rsvd "
        f"{found['refresh_step_speedup_vs_galore_rsvd']:.2f}x / {rsvd_paired:.2f}x; target >= 3x)"
    )
    return found, note


COLUMNS = [
    "optimizer",
    "regular step ms",
    "x AdamW",
    "x GaLore",
    "refresh step ms",
    "refresh x GaLore",
    "refresh x AdamW step",
    "state MiB",
    "retained MiB",
    "state x AdamW",
    "state x GaLore",
]


def step_rows(chosen: list[common.Contender], regular: dict, refreshes: dict, variant: str) -> list[list[str]]:
    rows = []
    for contender in sorted(chosen, key=lambda c: c.name != variant):
        reg = regular.get("adamw" if contender.name == variant else contender.name, {})
        ref = refreshes.get(contender.name, {})
        cell = common.cell
        rows.append(
            [
                contender.label + (" (baseline)" if contender.name == variant else ""),
                cell(reg.get("step_s"), ".1f", 1e3),
                cell(reg.get("step_vs_adamw"), ".2f"),
                cell(reg.get("step_vs_galore"), ".3f"),
                cell(ref.get("refresh_step_s"), ".0f", 1e3),
                cell(ref.get("refresh_vs_galore"), ".3f"),
                cell(ref.get("refresh_vs_adamw_step"), ".1f"),
                cell(reg.get("state_bytes"), ".1f", 2**-20),
                cell(reg.get("state_bytes_retained"), ".1f", 2**-20),
                cell(reg.get("state_vs_adamw"), ".3f"),
                cell(reg.get("state_vs_galore"), ".3f"),
            ]
        )
    return rows


def closing_notes(args: argparse.Namespace, variant: str) -> list[str]:
    notes = [
        "state MiB: logical bytes of every state tensor (subspace_optim.metrics.state_bytes, galore-torch's "
        "projector basis included); retained MiB: whole storages those tensors keep alive (state_bytes(retained="
        "True): galore-torch's fp32 basis is a slice of its SVD factor)",
        f"medians of {args.steps} regular and {args.refresh_steps} refresh steps per optimizer, interleaved; "
        f"baseline AdamW = {variant}; SubspaceAdamW's step includes its finiteness check of every gradient",
        f"SubspaceAdamW's sketch: oversample {args.oversample}, power_iters {args.power_iters}",
    ]
    return notes + (["CPU smoke run: checks the pipeline only; no claim is made from it"] if args.smoke else [])


def print_profiles(profiles: dict[str, list[dict[str, Any]]]) -> None:
    for name, top in profiles.items():
        print(f"\nprofile of one regular step, {name} (self CPU time):", file=sys.stderr)
        for event in top:
            line = f"  {event['op']:<40} {event['self_cpu_ms']:9.2f} ms {event['share']:6.1%} {event['calls']:6d} calls"
            print(line, file=sys.stderr)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = common.pick_device(args.device, args.smoke)
    if device == "cpu" and args.kernels:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are first imported (not by torch)
    model = "smoke" if args.smoke else args.model
    if device == "cpu" and model not in common.CPU_MODELS:
        sys.exit(f"--model {model} needs a GPU; on CPU use --model 60m or --smoke (the GPU numbers are owed)")
    common.set_threads(args.threads, device)
    setup = Setup(common.llama_shape(model), device, getattr(torch, args.dtype))
    notes: list[str] = []
    kernels = device == "cuda" or args.kernels
    chosen = contenders(device, kernels, {"oversample": args.oversample, "power_iters": args.power_iters}, notes)
    kernels = any(c.kernels for c in chosen)
    with common.KernelCounter() if kernels else contextlib.nullcontext() as counter:
        regular, profiles, guarantee = regular_steps(setup, chosen, args, counter)
        if device == "cuda":
            torch.cuda.empty_cache()
        refreshes = refresh_steps(setup, chosen, args.refresh_steps, counter)
    if counter:
        notes.append(f"kernel calls counted (every triton step checked): {counter.calls}")
    regular, variant = compare(regular, refreshes)
    found, note = acceptance(regular, refreshes, guarantee, args.smoke)
    notes += [note] if note else []
    notes += [guarantee, *closing_notes(args, variant)]
    title = f"Regular and refresh step, {args.dtype} ({model})"
    result = {
        "benchmark": "step",
        "model": model,
        "shape": vars(setup.shape),
        "matrices": len(setup.shape.projected()),
        "dtype": args.dtype,
        "device_kind": device,
        "steps": args.steps,
        "refresh_steps": args.refresh_steps,
        "baseline_adamw": variant,
        "results": regular,
        "refresh": refreshes,
        "acceptance": found,
        "profile": profiles or None,
        "notes": notes,
        "tables": [common.table(title, COLUMNS, step_rows(chosen, regular, refreshes, variant))],
    }
    common.write_result(result, args, device)
    print_profiles(profiles)
    return result


if __name__ == "__main__":
    main()
