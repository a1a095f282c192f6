"""Regular (non-refresh) step time and optimizer state bytes on LLaMA projection shapes.

Compares, in one run and on the same matrices, the full ``optimizer.step()`` of: fused torch.optim.AdamW,
galore-torch 1.0 GaLoreAdamW, SubspaceAdamW(engine="reference") and SubspaceAdamW(engine="triton") (the
batched Triton step, with its host work: state lookup, batching, tables). Every optimizer takes one
step first (the refresh, and the kernels' compilation), then one untimed warm-up step, then the median of
``--steps`` timed steps. apollo-torch is reported as skipped when not installed.

    python scripts/bench_step.py --model 1b --markdown docs/benchmarks.md     # GPU
    python scripts/bench_step.py --smoke [--kernels]                           # CPU, < 1 minute

On CPU only ``--smoke`` runs: CPU timings say nothing about the GPU claims, which stay owed. With
``--smoke --kernels`` the engine="triton" row runs the kernels under TRITON_INTERPRET=1 on CPU tensors
(the engine is made to accept them), which checks the wiring, not the speed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shapes(model: str) -> tuple[list[tuple[int, int]], int]:
    """(out, in) weight shapes of the projected matrices and the rank, per model."""
    if model == "smoke":
        hidden, inter, layers, rank = 64, 172, 2, 16
    elif model == "1b":
        hidden, inter, layers, rank = 2048, 5461, 24, 512
    elif model == "7b-layer":
        hidden, inter, layers, rank = 4096, 11008, 1, 1024
    else:
        raise ValueError(model)
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


def optimizer_bytes(opt: Any) -> int:
    """State bytes, counting galore-torch's projector (a Python object holding the basis) too."""
    from subspace_optim.optimizer import state_bytes

    extra = 0
    for s in opt.state.values():
        basis = getattr(s.get("projector"), "ortho_matrix", None)
        if basis is not None:
            extra += basis.numel() * basis.element_size()
    return state_bytes(opt) + extra


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


def environment(torch: Any, device: str) -> dict[str, Any]:
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    return {"device": name, "versions": versions(), "command": " ".join([sys.executable, *sys.argv])}


def write_outputs(result: dict[str, Any], rows: list[list[str]], header: list[str], args: Any, title: str) -> None:
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.markdown:
        env = result["environment"]
        lines = [f"\n### {title} ({result['model']})\n", f"- device: {env['device']}", f"- versions: {env['versions']}"]
        lines += [f"- command: `{env['command']}`", ""]
        if result.get("notes"):
            lines += [f"- note: {n}" for n in result["notes"]] + [""]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        with open(args.markdown, "a") as f:
            f.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["1b", "7b-layer"], default="1b")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, reference engine, end to end")
    parser.add_argument("--kernels", action="store_true", help="with --smoke: also run the kernels interpreted")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", help="write the JSON result here too")
    parser.add_argument("--markdown", help="append a markdown table to this file")
    args = parser.parse_args()
    if args.smoke and args.kernels:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from subspace_optim import SubspaceAdamW

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu" and not args.smoke:
        sys.exit("no GPU: only --smoke runs on CPU (the GPU numbers are owed, not measured)")
    model = "smoke" if args.smoke else args.model
    dtype = getattr(torch, args.dtype)
    steps = 3 if args.smoke else args.steps
    notes = []
    results: dict[str, dict[str, Any]] = {}

    def bench(name: str, build: Callable[[list[Any], int], Any]) -> None:
        params, rank = make_params(torch, model, device, dtype)
        opt = build(params, rank)
        opt.step()  # the first step refreshes every basis; time the regular steps after it
        seconds = timed(torch, device, opt.step, steps)
        results[name] = {"step_s": seconds, "state_bytes": optimizer_bytes(opt)}
        del opt, params
        if device == "cuda":
            torch.cuda.empty_cache()

    fused = device == "cuda"
    bench("adamw", lambda ps, r: torch.optim.AdamW(ps, lr=1e-3, fused=fused or None))
    if importlib.util.find_spec("galore_torch") is not None:
        from galore_torch import GaLoreAdamW

        bench(
            "galore",
            lambda ps, r: GaLoreAdamW(
                [{"params": ps, "rank": r, "update_proj_gap": 10**9, "scale": 0.25, "proj_type": "std"}], lr=1e-2
            ),
        )
    else:
        notes.append("galore-torch not installed: skipped")
    if importlib.util.find_spec("apollo_torch") is None:
        notes.append("apollo-torch not installed: skipped")

    def subspace(engine: str) -> Callable[[list[Any], int], Any]:
        return lambda ps, r: SubspaceAdamW(
            [{"params": ps, "rank": r, "update_gap": 10**9, "scale": 0.25}], lr=1e-2, engine=engine
        )

    bench("subspace_reference", subspace("reference"))
    use_kernels = device == "cuda" or args.kernels
    if use_kernels and importlib.util.find_spec("triton") is not None:
        import subspace_optim.kernels as kernels

        if device == "cpu":  # engine="triton" sends CPU tensors to the reference path; run the kernels instead
            kernels.supports = lambda t: True
            notes.append("subspace_triton ran under TRITON_INTERPRET=1: its CPU time is meaningless")
        launches = {"batched_steps": 0}
        step_fn = kernels.step_projected_batch

        def counted(*a: Any, **kw: Any) -> int:
            launches["batched_steps"] += 1
            return step_fn(*a, **kw)

        kernels.step_projected_batch = counted  # proves the timed steps ran the kernels (one call per step)
        bench("subspace_triton", subspace("triton"))
        kernels.step_projected_batch = step_fn
        if launches["batched_steps"] != steps + 2:
            raise RuntimeError(f"engine='triton' ran {launches['batched_steps']} kernel steps, expected {steps + 2}")
    elif use_kernels:
        notes.append("triton not installed: kernel engine skipped")

    base = results["adamw"]
    gal = results.get("galore")
    rows = []
    for name, r in results.items():
        r["step_vs_adamw"] = r["step_s"] / base["step_s"]
        r["state_vs_adamw"] = r["state_bytes"] / base["state_bytes"]
        if gal:
            r["step_vs_galore"] = r["step_s"] / gal["step_s"]
            r["state_vs_galore"] = r["state_bytes"] / gal["state_bytes"]
        rows.append(
            [
                name,
                f"{r['step_s'] * 1e3:.2f}",
                f"{r['step_vs_adamw']:.2f}",
                f"{r.get('step_vs_galore', float('nan')):.2f}",
                f"{r['state_bytes'] / 2**20:.1f}",
                f"{r['state_vs_adamw']:.3f}",
                f"{r.get('state_vs_galore', float('nan')):.3f}",
            ]
        )
    if device == "cpu":
        notes.append("CPU smoke run: checks the pipeline only; no GPU claim is made from it")
    result = {
        "benchmark": "step",
        "model": model,
        "dtype": args.dtype,
        "environment": environment(torch, device),
        "results": results,
        "notes": notes,
    }
    header = ["optimizer", "step ms", "x AdamW", "x GaLore", "state MiB", "state x AdamW", "state x GaLore"]
    write_outputs(result, rows, header, args, "Regular step")


if __name__ == "__main__":
    main()
