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

The optimizers' steps are interleaved (one step of each in turn, round after round), so that load from
other processes on a shared machine falls on all of them alike. The script also checks what it timed:
no basis changed during the timed regular steps, every basis changed at every timed refresh step, the
triton row's steps called the kernels (``subspace_optim.kernels.step.subspace_adamw``/``refresh.refresh_bases`` are
wrapped and counted) and the reference rows never did. Finally it checks, on the timed reference
optimizer, the non-finite guarantee: with ``nonfinite="raise"`` a NaN gradient raises and nothing
changes; with ``"skip"`` the matrices with a NaN/Inf gradient are left untouched and the others step.

    python scripts/bench_step.py --model 60m --dtype float32 --markdown docs/benchmarks.md   # CPU (1 thread)
    python scripts/bench_step.py --model 1b --markdown docs/benchmarks.md                     # GPU
    python scripts/bench_step.py --smoke [--kernels]                                          # CPU, < 1 minute

On CPU, ``--model 60m`` and ``--smoke`` run (``--threads``, default 1 on CPU); the 1b and 7b-layer shapes
need a GPU. With ``--smoke --kernels`` the engine="triton" row runs the kernels under TRITON_INTERPRET=1
on CPU tensors (engine="triton" is obeyed there), which checks the wiring, not the speed; the interpreted
kernels get no refresh rows. ``--profile`` prints the top operators of one regular step of galore-torch
and of ours (torch.profiler, self CPU time).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# (hidden, intermediate, layers, rank): the GaLore paper's LLaMA configurations.
MODELS = {
    "smoke": (64, 172, 2, 16),
    "60m": (512, 1376, 8, 128),
    "1b": (2048, 5461, 24, 512),
    "7b-layer": (4096, 11008, 1, 1024),
}
CPU_MODELS = ("smoke", "60m")
# The Triton entry points and their modules (``functional`` imports them from there when it launches).
KERNEL_ENTRIES = {"subspace_adamw": "subspace_optim.kernels.step", "refresh_bases": "subspace_optim.kernels.refresh"}


def shapes(model: str) -> tuple[list[tuple[int, int]], int]:
    """(out, in) weight shapes of the projected matrices and the rank, per model: per layer q, k, v, o
    (hidden x hidden), gate, up (intermediate x hidden) and down (hidden x intermediate)."""
    if model not in MODELS:
        raise ValueError(model)
    hidden, inter, layers, rank = MODELS[model]
    layer = [(hidden, hidden)] * 4 + [(inter, hidden)] * 2 + [(hidden, inter)]
    return layer * layers, rank


def make_params(torch: Any, model: str, device: str, dtype: Any) -> tuple[list[Any], int]:
    mats, rank = shapes(model)
    gen = torch.Generator(device=device).manual_seed(0)
    params = []
    for m, n in mats:
        p = torch.nn.Parameter(0.02 * torch.randn(m, n, device=device, generator=gen, dtype=torch.float32).to(dtype))
        p.grad = (1e-3 * torch.randn(m, n, device=device, generator=gen, dtype=torch.float32)).to(dtype)
        params.append(p)
    return params, rank


def new_gradients(torch: Any, params: list[Any], seed: int) -> list[Any]:
    """A fresh gradient per matrix, the same for a given seed whatever the optimizer."""
    gen = torch.Generator(device=params[0].device).manual_seed(seed)
    return [
        (1e-3 * torch.randn(p.shape, device=p.device, generator=gen, dtype=torch.float32)).to(p.dtype) for p in params
    ]


def optimizer_bytes(opt: Any) -> tuple[int, int]:
    """(logical, retained) state bytes (``subspace_optim.metrics.state_bytes``): galore-torch's projector
    (a Python object holding the basis) counted too; retained counts whole storages kept alive (galore-torch's
    fp32 basis is a slice of its SVD factor)."""
    from subspace_optim.metrics import state_footprint

    return state_footprint(opt)


def sync(torch: Any, device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(torch: Any, device: str, fn: Callable[[], None], steps: int) -> float:
    """Median seconds of ``steps`` calls of ``fn`` after one warm-up call."""
    fn()
    sync(torch, device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        sync(torch, device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "triton", "galore_torch", "apollo_torch"):
        if importlib.util.find_spec(name) is None:
            out[name] = "not installed"
            continue
        try:
            from importlib.metadata import version

            out[name] = version(name.replace("_", "-"))
        except Exception:  # a module without distribution metadata
            out[name] = "installed"
    return out


def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return platform.processor() or None


def environment(torch: Any, device: str) -> dict[str, Any]:
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"{cpu_model() or platform.machine()} CPU, {os.cpu_count()} cores"
    return {
        "device": name,
        "threads": torch.get_num_threads(),
        "versions": versions(),
        "command": " ".join([sys.executable, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def write_outputs(result: dict[str, Any], rows: list[list[str]], header: list[str], args: Any, title: str) -> None:
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.markdown:
        env = result["environment"]
        lines = [f"\n### {title} ({result['model']})\n", f"- device: {env['device']}", f"- versions: {env['versions']}"]
        if "threads" in env:
            lines.append(f"- torch threads: {env['threads']}; date: {env.get('date', '?')}")
        lines += [f"- command: `{env['command']}`", ""]
        if result.get("notes"):
            lines += [f"- note: {n}" for n in result["notes"]] + [""]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        with open(args.markdown, "a") as f:
            f.write("\n".join(lines) + "\n")


@dataclass
class Contender:
    """One optimizer configuration: ``build(params, rank, gap)`` makes it with refresh gap ``gap``."""

    name: str
    label: str
    build: Callable[[list[Any], int, int], Any]
    regular: bool = True  # timed on regular steps
    refresh: str | None = None  # what its refresh step does (timed on refresh steps); None: no refresh rows
    kernels: bool = False  # its steps must run the Triton kernels (and only its steps)


@dataclass
class Running:
    contender: Contender
    opt: Any
    params: list[Any]
    times: list[float]


def refresh_marks(opt: Any) -> list[Any]:
    """Per projected matrix, a token that changes when its basis is refreshed: galore-torch replaces its
    projector's ``ortho_matrix`` tensor (the new one is made while the old one lives, so the ids differ),
    ours counts ``refresh_count``."""
    marks = []
    for s in opt.state.values():
        if "projector" in s:
            marks.append(id(s["projector"].ortho_matrix))
        elif "refresh_count" in s:
            marks.append(s["refresh_count"])
    return marks


class KernelCounter:
    """Wraps ``subspace_optim.kernels.step.subspace_adamw`` and ``.refresh.refresh_bases`` (``functional``
    looks them up there at each call) and counts the calls: the proof that a timed step ran the kernels."""

    def __init__(self) -> None:
        self.calls = dict.fromkeys(KERNEL_ENTRIES, 0)

    def __enter__(self) -> KernelCounter:
        self.originals = {}
        for name, module_name in KERNEL_ENTRIES.items():
            module = importlib.import_module(module_name)  # imports Triton
            self.originals[name] = (module, getattr(module, name))

            def counted(*a: Any, _name: str = name, _original: Any = self.originals[name][1], **kw: Any) -> Any:
                self.calls[_name] += 1
                return _original(*a, **kw)

            setattr(module, name, counted)
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, (module, original) in self.originals.items():
            setattr(module, name, original)

    def snapshot(self) -> dict[str, int]:
        return dict(self.calls)


def interleaved(
    torch: Any,
    device: str,
    running: list[Running],
    rounds: int,
    refresh: bool,
    counter: KernelCounter | None,
    seed: int = 1000,
) -> None:
    """``rounds`` rounds of one timed step of each optimizer in turn; checks after each step (untimed)
    that it refreshed every basis (``refresh``) or none, and ran the kernels iff its contender says so.
    Refresh rounds give every optimizer a new gradient first (the same for all)."""
    for k in range(rounds):
        if refresh:
            grads = new_gradients(torch, running[0].params, seed + k)
            for run in running:
                for p, g in zip(run.params, grads, strict=True):
                    p.grad.copy_(g)
            del grads
        for run in running:
            before = refresh_marks(run.opt)
            calls = counter.snapshot() if counter else None
            sync(torch, device)
            start = time.perf_counter()
            run.opt.step()
            sync(torch, device)
            run.times.append(time.perf_counter() - start)
            after = refresh_marks(run.opt)
            name = run.contender.name
            if refresh and any(a == b for a, b in zip(after, before, strict=True)):
                raise RuntimeError(f"{name}: a timed refresh step did not refresh every basis")
            if not refresh and after != before:
                raise RuntimeError(f"{name}: a timed regular step refreshed a basis")
            if counter is not None:
                made = {key: counter.calls[key] - calls[key] for key in KERNEL_ENTRIES}
                want = {"subspace_adamw": 1, "refresh_bases": int(refresh)} if run.contender.kernels else None
                if want is None and any(made.values()):
                    raise RuntimeError(f"{name}: a reference step called the kernels ({made})")
                if want is not None and made != want:
                    raise RuntimeError(f"{name}: a timed step made kernel calls {made}, expected {want}")


def check_all_or_nothing(torch: Any, opt: Any, params: list[Any]) -> str:
    """The timed reference optimizer keeps the non-finite guarantee: ``"raise"`` changes nothing, ``"skip"``
    leaves exactly the matrices with a NaN/Inf gradient untouched (weights, moments, basis, counters)."""
    bad = {0: float("nan"), len(params) - 1: float("inf")}

    def state_of(p: Any) -> dict[str, Any]:
        return {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}

    def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
        return a.keys() == b.keys() and all(
            torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a
        )

    for i, value in bad.items():
        params[i].grad.view(-1)[i % params[i].numel()] = value
    weights = [p.detach().clone() for p in params]
    states = [state_of(p) for p in params]
    group = opt.param_groups[0]
    group["nonfinite"] = "raise"
    try:
        opt.step()
        raise RuntimeError("nonfinite='raise': a NaN gradient did not raise")
    except FloatingPointError:
        pass
    finally:
        group["nonfinite"] = "skip"
    for p, w, s in zip(params, weights, states, strict=True):
        if not (torch.equal(p, w) and same(state_of(p), s)):
            raise RuntimeError("nonfinite='raise' changed a weight or its state")
    opt.step()
    for i, (p, w, s) in enumerate(zip(params, weights, states, strict=True)):
        untouched = torch.equal(p, w) and same(state_of(p), s)
        if untouched != (i in bad):
            raise RuntimeError(f"nonfinite='skip': matrix {i} {'was left' if untouched else 'moved'} wrongly")
    return (
        f"all-or-nothing kept on the timed configuration: a NaN and an Inf gradient (2 of {len(params)} matrices) "
        "raised with nothing changed under nonfinite='raise', and under 'skip' left exactly those 2 untouched"
    )


def profile_step(torch: Any, opt: Any, top: int) -> list[dict[str, Any]]:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=[m for m in MODELS if m != "smoke"], default="1b")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, reference engine, end to end")
    parser.add_argument("--kernels", action="store_true", help="on CPU: also run the kernels interpreted")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: 1 on CPU, torch's on CUDA)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--steps", type=int, help="timed regular steps (default 10; smoke 3)")
    parser.add_argument("--refresh-steps", type=int, help="timed refresh steps (default 3; smoke 2)")
    parser.add_argument("--profile", action="store_true", help="print the top ops of one regular step")
    parser.add_argument("--power-iters", type=int, help="SubspaceAdamW's power_iters (default: the library's)")
    parser.add_argument("--oversample", type=int, help="SubspaceAdamW's oversample (default: the library's)")
    parser.add_argument("--json", help="write the JSON result here too")
    parser.add_argument("--markdown", help="append a markdown table to this file")
    args = parser.parse_args()
    model = "smoke" if args.smoke else args.model
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu" and args.kernels:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are first imported (not by torch)

    from subspace_optim import SubspaceAdamW

    if device == "cpu" and model not in CPU_MODELS:
        sys.exit(f"--model {model} needs a GPU; on CPU use --model 60m or --smoke (the GPU numbers are owed)")
    threads = args.threads or (1 if device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    dtype = getattr(torch, args.dtype)
    steps = args.steps or (3 if args.smoke else 10)
    refresh_steps = args.refresh_steps or (2 if args.smoke else 3)
    notes = []
    regular_gap, refresh_gap = 10**9, 1

    def galore(ps: list[Any], r: int, gap: int) -> Any:
        from galore_torch import GaLoreAdamW

        group = {"params": ps, "rank": r, "update_proj_gap": gap, "scale": 0.25, "proj_type": "std"}
        return GaLoreAdamW([group], lr=1e-2)

    sketch = {k: v for k, v in (("power_iters", args.power_iters), ("oversample", args.oversample)) if v is not None}

    def subspace(engine: str, refresh: str) -> Callable[[list[Any], int, int], Any]:
        return lambda ps, r, gap: SubspaceAdamW(
            [{"params": ps, "rank": r, "update_gap": gap, "scale": 0.25, "refresh": refresh, **sketch}],
            lr=1e-2,
            engine=engine,
        )

    contenders = [
        Contender("adamw_fused", "torch AdamW, fused", lambda ps, r, gap: torch.optim.AdamW(ps, lr=1e-3, fused=True)),
        Contender(
            "adamw_foreach", "torch AdamW, foreach", lambda ps, r, gap: torch.optim.AdamW(ps, lr=1e-3, foreach=True)
        ),
    ]
    if importlib.util.find_spec("galore_torch") is not None:
        contenders.append(Contender("galore", "galore-torch GaLoreAdamW (refresh: SVD)", galore, refresh="svd"))
    else:
        notes.append("galore-torch not installed: skipped")
    if importlib.util.find_spec("apollo_torch") is None:
        notes.append("apollo-torch not installed: skipped")
    contenders += [
        Contender("subspace_reference", "SubspaceAdamW reference, refresh=warm", subspace("reference", "warm"),
                  refresh="warm"),
        Contender("subspace_reference_rsvd", "SubspaceAdamW reference, refresh=rsvd", subspace("reference", "rsvd"),
                  regular=False, refresh="rsvd"),
    ]  # fmt: skip
    use_kernels = device == "cuda" or args.kernels
    if use_kernels and importlib.util.find_spec("triton") is not None:
        interpreted = device == "cpu"
        contenders += [
            Contender("subspace_triton", "SubspaceAdamW triton, refresh=warm", subspace("triton", "warm"),
                      refresh=None if interpreted else "warm", kernels=True),
        ]  # fmt: skip
        if not interpreted:
            contenders.append(
                Contender("subspace_triton_rsvd", "SubspaceAdamW triton, refresh=rsvd", subspace("triton", "rsvd"),
                          regular=False, refresh="rsvd", kernels=True)
            )  # fmt: skip
        else:
            notes.append("subspace_triton ran under TRITON_INTERPRET=1: its CPU time is meaningless (no refresh rows)")
    elif use_kernels:
        notes.append("triton not installed: kernel engine skipped")
        use_kernels = False

    def start(cs: list[Contender], gap: int, warmups: int) -> list[Running]:
        running = []
        for c in cs:
            params, rank = make_params(torch, model, device, dtype)
            opt = c.build(params, rank, gap)
            for _ in range(warmups):  # the first step refreshes every basis (and compiles the kernels)
                opt.step()
            sync(torch, device)
            running.append(Running(c, opt, params, []))
        return running

    regular: dict[str, dict[str, Any]] = {}
    refreshes: dict[str, dict[str, Any]] = {}
    profiles: dict[str, Any] = {}
    guarantee = None
    # With the kernels, every kernel call is counted (and checked per timed step); None otherwise.
    with KernelCounter() if use_kernels else contextlib.nullcontext() as counter:
        running = start([c for c in contenders if c.regular], regular_gap, warmups=2)
        interleaved(torch, device, running, steps, refresh=False, counter=counter)
        for run in running:
            logical, retained = optimizer_bytes(run.opt)
            regular[run.contender.name] = {
                "label": run.contender.label,
                "step_s": statistics.median(run.times),
                "step_s_runs": run.times,
                "state_bytes": logical,
                "state_bytes_retained": retained,
            }
        by_name = {run.contender.name: run for run in running}
        if args.profile:
            for name in ("galore", "subspace_reference"):
                if name in by_name:
                    profiles[name] = profile_step(torch, by_name[name].opt, 12)
        ours = by_name["subspace_reference"]
        guarantee = check_all_or_nothing(torch, ours.opt, ours.params)
        del running, by_name, ours
        if device == "cuda":
            torch.cuda.empty_cache()

        running = start([c for c in contenders if c.refresh], refresh_gap, warmups=1)
        interleaved(torch, device, running, refresh_steps, refresh=True, counter=counter)
        for run in running:
            refreshes[run.contender.name] = {
                "label": run.contender.label,
                "refresh": run.contender.refresh,
                "refresh_step_s": statistics.median(run.times),
                "refresh_step_s_runs": run.times,
            }
        del running
    if counter:
        notes.append(f"kernel calls counted (every triton step checked): {counter.calls}")

    # The faster AdamW is the baseline and is reported as "adamw"; the other keeps its variant's name.
    adamw_variant = min(("adamw_fused", "adamw_foreach"), key=lambda n: regular[n]["step_s"])
    key = {adamw_variant: "adamw"}
    regular = {key.get(n, n): r for n, r in sorted(regular.items(), key=lambda item: item[0] != adamw_variant)}
    regular["adamw"]["variant"] = adamw_variant.removeprefix("adamw_")
    base = regular["adamw"]
    gal = regular.get("galore")
    gal_refresh = refreshes.get("galore")
    for r in regular.values():
        r["step_vs_adamw"] = r["step_s"] / base["step_s"]
        r["state_vs_adamw"] = r["state_bytes"] / base["state_bytes"]
        if gal:
            r["step_vs_galore"] = r["step_s"] / gal["step_s"]
            r["state_vs_galore"] = r["state_bytes"] / gal["state_bytes"]
    for r in refreshes.values():
        r["refresh_vs_adamw_step"] = r["refresh_step_s"] / base["step_s"]
        if gal_refresh:
            r["refresh_vs_galore"] = r["refresh_step_s"] / gal_refresh["refresh_step_s"]

    def fmt(x: float | None, spec: str, scale: float = 1.0) -> str:
        return "-" if x is None else format(x * scale, spec)

    rows = []
    for c in sorted(contenders, key=lambda c: c.name != adamw_variant):
        reg, ref = regular.get(key.get(c.name, c.name), {}), refreshes.get(c.name, {})
        rows.append(
            [
                c.label + (" (baseline)" if c.name == adamw_variant else ""),
                fmt(reg.get("step_s"), ".1f", 1e3),
                fmt(reg.get("step_vs_adamw"), ".2f"),
                fmt(reg.get("step_vs_galore"), ".3f"),
                fmt(ref.get("refresh_step_s"), ".0f", 1e3),
                fmt(ref.get("refresh_vs_galore"), ".3f"),
                fmt(ref.get("refresh_vs_adamw_step"), ".1f"),
                fmt(reg.get("state_bytes"), ".1f", 2**-20),
                fmt(reg.get("state_bytes_retained"), ".1f", 2**-20),
                fmt(reg.get("state_vs_adamw"), ".3f"),
                fmt(reg.get("state_vs_galore"), ".3f"),
            ]
        )
    acceptance = None
    if gal and gal_refresh:

        def paired(ours: list[float], theirs: list[float]) -> float:
            """Median over rounds of ours / theirs: the steps of a round ran back to back, under the same load."""
            return statistics.median([a / b for a, b in zip(ours, theirs, strict=True)])

        ours_reg, warm, rsvd = (
            regular["subspace_reference"],
            refreshes["subspace_reference"],
            refreshes["subspace_reference_rsvd"],
        )
        reg_paired = paired(ours_reg["step_s_runs"], gal["step_s_runs"])
        warm_paired = 1 / paired(warm["refresh_step_s_runs"], gal_refresh["refresh_step_s_runs"])
        rsvd_paired = 1 / paired(rsvd["refresh_step_s_runs"], gal_refresh["refresh_step_s_runs"])
        acceptance = {
            "regular_step_vs_galore": ours_reg["step_vs_galore"],
            "regular_step_vs_galore_paired": reg_paired,
            "regular_within_1.05x": max(ours_reg["step_vs_galore"], reg_paired) <= 1.05,
            "refresh_step_speedup_vs_galore_warm": 1 / warm["refresh_vs_galore"],
            "refresh_step_speedup_vs_galore_warm_paired": warm_paired,
            "refresh_step_speedup_vs_galore_rsvd": 1 / rsvd["refresh_vs_galore"],
            "refresh_step_speedup_vs_galore_rsvd_paired": rsvd_paired,
            "refresh_at_least_3x_faster": min(1 / warm["refresh_vs_galore"], warm_paired) >= 3,
            "nonfinite_guarantee": guarantee,
        }
        notes.append(
            f"{'(smoke: meaningless) ' if args.smoke else ''}"
            f"acceptance (reference engine vs galore-torch; ratio of medians, then median of per-round ratios): "
            f"regular step {ours_reg['step_vs_galore']:.3f}x / {reg_paired:.3f}x (target <= 1.05x), refresh step "
            f"(warm) {acceptance['refresh_step_speedup_vs_galore_warm']:.2f}x / {warm_paired:.2f}x faster (rsvd "
            f"{acceptance['refresh_step_speedup_vs_galore_rsvd']:.2f}x / {rsvd_paired:.2f}x; target >= 3x)"
        )
    notes.append(guarantee)
    notes.append(
        "state MiB: logical bytes of every state tensor (subspace_optim.metrics.state_bytes, galore-torch's "
        "projector basis included); retained MiB: whole storages those tensors keep alive (state_bytes(retained="
        "True): galore-torch's fp32 basis is a slice of its SVD factor)"
    )
    notes.append(
        f"medians of {steps} regular and {refresh_steps} refresh steps per optimizer, interleaved; "
        f"baseline AdamW = {adamw_variant}; SubspaceAdamW's step includes its finiteness check of every gradient"
    )
    if args.smoke:
        notes.append("CPU smoke run: checks the pipeline only; no claim is made from it")
    result = {
        "benchmark": "step",
        "model": model,
        "shapes": {"hidden_intermediate_layers_rank": MODELS[model], "matrices": len(shapes(model)[0])},
        "dtype": args.dtype,
        "subspace_options": sketch or "library defaults",
        "device_kind": device,
        "steps": steps,
        "refresh_steps": refresh_steps,
        "baseline_adamw": adamw_variant,
        "environment": environment(torch, device),
        "results": regular,
        "refresh": refreshes,
        "acceptance": acceptance,
        "profile": profiles or None,
        "notes": notes,
    }
    header = [
        "optimizer", "regular step ms", "x AdamW", "x GaLore", "refresh step ms", "refresh x GaLore",
        "refresh x AdamW step", "state MiB", "retained MiB", "state x AdamW", "state x GaLore",
    ]  # fmt: skip
    write_outputs(result, rows, header, args, f"Regular and refresh step, {args.dtype}")
    for name, top in profiles.items():
        print(f"\nprofile of one regular step, {name} (self CPU time):", file=sys.stderr)
        for e in top:
            line = f"  {e['op']:<40} {e['self_cpu_ms']:9.2f} ms {e['share']:6.1%} {e['calls']:6d} calls"
            print(line, file=sys.stderr)


if __name__ == "__main__":
    main()
