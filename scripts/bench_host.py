"""Host (Python + dispatch) time of one regular optimizer step at LLaMA-7B's parameter count.

Why: on a GPU the whole fused-AdamW step of a 1.3B model takes ~10 ms, so an optimizer whose host path
costs as much becomes the step. This measures that host path on any machine: the parameters have the
count and roles of ``configs/llama_7b.yaml``'s model (a ``LlamaForCausalLM`` built with the config's layer
count: 7 projected linear weights per layer, 224 in all, and 65 RMSNorm vectors; the embedding and head
only with ``--vocab``), but tiny widths (``--width``, 8: q/k/v/o 8x8, gate/up 22x8, down 8x22, the config's
aspect ratio; the rank scaled by the same factor), so the device work is negligible and what is timed is
the per-parameter Python, state lookups, checks, dispatches and host tables.

Compared in ONE interleaved run (one step of each optimizer in turn, round after round, as
``bench_step.interleaved`` does, which also checks that no timed step refreshed a basis) on one CPU thread:
torch AdamW (fused and foreach), galore-torch GaLoreAdamW, and SubspaceAdamW with the reference engine and
with the Triton engine, each at the default options, ``residual="fira"`` and 8-bit moments + bf16 bases.
On CPU the Triton engine's launches are replaced by counted no-ops (``triton``'s ``JITFunction.run`` and
the interpreter's ``InterpretedFunction.run`` are patched for kernels of ``subspace_optim.kernels``), so its
whole host path runs (batching, layout checks, pointer arrays, host tables, the residual's torch ops) but
no interpreter; the launches of one untimed step per configuration are counted and reported per step and
per group of same-shape matrices. Its first step (which refreshes every basis) runs on the reference
engine: the state is the same, and the stubbed kernels would compute nothing. On CUDA (``--device
cuda``) the kernels run for real (still counted); tiny tensors keep the device work negligible there too.

Per configuration, one more untimed step runs under a dispatch mode that counts torch operators (on a GPU
each non-view operator is at least one kernel launch), the device-to-host reads (``Tensor.item``,
``bool``/``float``/``int`` of a tensor and ``tolist``, with their call sites; the "device syncs" among them
leave out torch.optim's reads of the step counters it keeps on the CPU) and the tensors built from host data
(``torch.tensor``: a host-to-device copy on a GPU, and a value a CUDA graph would freeze).

``--compile BACKEND`` adds a row for ``torch.compile(optimizer.step, backend=BACKEND)`` of the reference
engine at the default options: its compile time (the warm-up steps), its steps timed with the others, and
the graphs and graph breaks dynamo reports.

    python scripts/bench_host.py --markdown /tmp/host.md          # CPU, 1 thread, 20 interleaved rounds
    python scripts/bench_host.py --smoke                          # CPU, 2 layers, seconds
    python scripts/bench_host.py --device cuda                    # GPU: real launches, host + launch time
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import statistics
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench_step import Contender, KernelCounter, Running, environment, interleaved, sync, write_outputs

ROOT = Path(__file__).resolve().parent.parent
PRESET = "llama_7b"
# SubspaceAdamW configurations, as options over the library's defaults (an empty dict: the defaults).
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "fira": {"residual": "fira"},
    "int8_bf16": {"moments_dtype": "int8", "basis_dtype": "bfloat16"},
    "fused": {"fused": True},  # the plain parameters on torch's fused AdamW: they skip on the device too
}
KERNEL_PACKAGE = "subspace_optim.kernels"
STEP_KERNELS = ("project_adam_kernel", "back_update_kernel")  # two per group of same-shape matrices
REGULAR_GAP = 10**9  # no timed step refreshes (bench_step checks it after every timed step)


# ------------------------------------------------------------------------------------------------ model
def preset(name: str) -> dict[str, Any]:
    """The model file's keys (``configs/<name>.yaml``), read by the pretraining CLI's own reader."""
    from subspace_optim.pretrain.config import model_file, read_yaml

    return read_yaml(model_file(name))


def tiny_model(cfg: dict[str, Any], width: int, layers: int | None) -> tuple[Any, dict[str, int]]:
    """A ``LlamaForCausalLM`` with the preset's layer count (or ``layers``) and its widths scaled to ``width``
    (the MLP keeps the preset's aspect ratio, the rank the same fraction of the width, at least 1)."""
    from subspace_optim.pretrain.lm import tiny_llama

    factor = width / cfg["hidden_size"]
    dims = {
        "hidden": width,
        "intermediate": max(1, round(cfg["intermediate_size"] * factor)),
        "layers": layers or cfg["num_hidden_layers"],
        "rank": max(1, round(cfg["rank"] * factor)),
    }
    model = tiny_llama(hidden=width, intermediate=dims["intermediate"], layers=dims["layers"], heads=1, vocab=16)
    return model, dims


def split(model: Any, rank: int, vocab: bool) -> tuple[list[Any], list[Any]]:
    """(projected weights, plain parameters) by ``subspace_optim.param_groups``' own rule (every linear layer
    but the head); the plain ones are the norms, and with ``vocab`` the embedding and head too."""
    from subspace_optim import param_groups

    groups = param_groups(model, rank=rank)
    projected = [p for _, p in groups[0]["params"]]
    plain = [p for g in groups[1:] for _, p in g["params"] if vocab or p.dim() < 2]
    return projected, plain


def fresh(torch: Any, base: list[Any], device: str, dtype: Any) -> list[Any]:
    """Independent copies of the parameters, each with the same fixed gradient for every optimizer."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for p in base:
        q = torch.nn.Parameter(p.detach().to(device=device, dtype=dtype, copy=True))
        q.grad = (1e-3 * torch.randn(p.shape, generator=gen)).to(device=device, dtype=dtype)
        out.append(q)
    return out


# ------------------------------------------------------------------------------------------- launches
def _kernel_classes() -> list[type]:
    """Triton's launchable kernel classes: compiled (``JITFunction``) and interpreted."""
    from triton.runtime.jit import JITFunction

    classes: list[type] = [JITFunction]
    with contextlib.suppress(ImportError):
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    return classes


class Launches:
    """Counts the launches of ``subspace_optim.kernels``' Triton kernels; with ``stub`` they do nothing.

    Patched at the one place every launch passes (``kernel[grid](...)`` and ``kernel.warmup(...)`` both call
    ``run(*args, grid=..., warmup=..., **kw)``), so it finds kernels wherever the package defines them, and
    device functions (``dot_tile``) are untouched. Kernels of other packages pass through."""

    def __init__(self, stub: bool) -> None:
        self.stub = stub
        self.launches: list[tuple[str, Any]] = []  # (kernel name, grid)
        self.warmups: list[str] = []

    def __enter__(self) -> Launches:
        self.saved = [(cls, cls.__dict__["run"]) for cls in _kernel_classes() if "run" in cls.__dict__]
        for cls, original in self.saved:

            def run(kernel: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
                fn = getattr(kernel, "fn", None)
                if not getattr(fn, "__module__", "").startswith(KERNEL_PACKAGE):
                    return _original(kernel, *args, **kwargs)
                if kwargs.get("warmup"):
                    self.warmups.append(fn.__name__)
                else:
                    self.launches.append((fn.__name__, kwargs.get("grid")))
                return None if self.stub else _original(kernel, *args, **kwargs)

            cls.run = run  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: Any) -> None:
        for cls, original in self.saved:
            cls.run = original  # type: ignore[method-assign]

    def since(self, start: int) -> dict[str, Any]:
        """Launches after the first ``start``: total, per kernel, and the batch size (grid axis 1: matrices) of
        each launch of the step's two kernels (the finiteness test's axis 1 is every gradient of the step)."""
        made = self.launches[start:]
        batches = sorted(g[1] if isinstance(g, tuple) and len(g) > 1 else 1 for n, g in made if n in STEP_KERNELS)
        return {"total": len(made), "by_kernel": dict(Counter(n for n, _ in made)), "batch_sizes": batches}


@contextlib.contextmanager
def probe_passed(stub: bool) -> Iterator[None]:
    """Stubbed launches compute nothing, so the engine's first-use self-check (which compares the kernels'
    numbers with the reference) would fail: report it passed while stubbed. Real launches probe as usual."""
    if not stub:
        yield
        return
    from subspace_optim import engine

    original = engine._passes_probe
    engine._passes_probe = lambda device, which: True  # type: ignore[assignment]
    try:
        yield
    finally:
        engine._passes_probe = original  # type: ignore[assignment]


# ---------------------------------------------------------------------------------------- inspection
def _call_site() -> str:
    """The innermost frame that is neither torch's machinery nor this script (torch.optim is reported)."""
    here = os.path.abspath(__file__)
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = os.path.abspath(frame.filename)
        if path == here or ("/torch/" in path and "/torch/optim/" not in path):
            continue
        for root in (str(ROOT) + os.sep, os.sep + "site-packages" + os.sep):
            if root in path:
                path = path.split(root, 1)[1]
                break
        return f"{path}:{frame.lineno} {frame.name}"
    return "?"


def _cpu_counter(site: str) -> bool:
    """A read by torch.optim's ``_get_value``: of the step counters torch's AdamW keeps on the CPU
    (non-fused, non-capturable; ours too for plain parameters), never a device sync."""
    return "torch/optim/" in site and site.endswith(" _get_value")


def inspect_step(torch: Any, step: Callable[[], Any], device: str) -> dict[str, Any]:
    """One ``step()`` under a dispatch mode: operators (views apart), host reads with call sites, the device
    syncs among them (on CUDA: reads of a CUDA tensor; on CPU: the reads other than ``_cpu_counter``'s), and
    tensors built from host data (``torch.tensor``: ``aten.lift_fresh``)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    ops: Counter[str] = Counter()
    reads: Counter[str] = Counter()
    syncs = [0]  # reads of a tensor on an accelerator (--device cuda)

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            name = str(func.overloadpacket.__name__)
            if name == "_local_scalar_dense":  # item(), bool(), float(), int() of a tensor
                reads[_call_site()] += 1
                syncs[0] += args[0].device.type != "cpu"
            # lift_fresh (torch.tensor of host values) is an alias op, but the data came from the host
            ops[name if name == "lift_fresh" or not func.is_view else "(view)"] += 1
            return func(*args, **(kwargs or {}))

    tolist = torch.Tensor.tolist

    def counted_tolist(t: Any) -> Any:  # tolist() reads the storage without dispatching
        reads[_call_site() + " (tolist)"] += 1
        syncs[0] += t.device.type != "cpu"
        return tolist(t)

    torch.Tensor.tolist = counted_tolist
    try:
        with Count():
            step()
    finally:
        torch.Tensor.tolist = tolist
    views = ops.pop("(view)", 0)
    return {
        "torch_ops": sum(ops.values()),
        "view_ops": views,
        "host_reads": sum(reads.values()),
        "host_read_sites": dict(reads),
        "device_syncs": syncs[0] if device != "cpu" else sum(n for s, n in reads.items() if not _cpu_counter(s)),
        "host_built_tensors": ops.get("lift_fresh", 0),
        "top_ops": dict(ops.most_common(8)),
    }


# -------------------------------------------------------------------------------------------- compile
def dynamo_stats(torch: Any) -> dict[str, int]:
    """Graphs compiled and graph breaks so far (dynamo's counters)."""
    from torch._dynamo.utils import counters

    breaks = counters["graph_break"]
    return {"graphs": int(counters["stats"]["unique_graphs"]), "graph_breaks": sum(breaks.values()),
            "graph_break_reasons": sorted({str(k).splitlines()[0][:200] for k in breaks})}  # fmt: skip


# ----------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="2 layers, 3 rounds: checks the pipeline (tests)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16", help="weights and gradients")
    parser.add_argument("--width", type=int, default=8, help="the tiny hidden size (default 8)")
    parser.add_argument("--layers", type=int, help="override the preset's layer count (smoke: 2)")
    parser.add_argument("--vocab", action="store_true", help="also step the embedding and head (plain AdamW)")
    parser.add_argument("--steps", type=int, help="interleaved timed rounds (default 20; smoke 3)")
    parser.add_argument("--compile", choices=["eager", "aot_eager", "inductor"],
                        help="also time torch.compile(step, backend=...) of the reference engine")  # fmt: skip
    parser.add_argument("--json", help="write the JSON result here too")
    parser.add_argument("--markdown", help="append a markdown table to this file")
    args = parser.parse_args()
    stub = args.device == "cpu"
    if stub:  # engine="triton" takes CPU tensors only under the interpreter (read when triton is imported)
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    torch.set_num_threads(args.threads)
    from subspace_optim import SubspaceAdamW, options

    device = args.device
    dtype = getattr(torch, args.dtype)
    steps = args.steps or (3 if args.smoke else 20)
    cfg = preset(PRESET)
    model, dims = tiny_model(cfg, args.width, args.layers or (2 if args.smoke else None))
    projected, plain = split(model, dims["rank"], args.vocab)
    n_proj = len(projected)
    base = projected + plain
    lrs = cfg.get("lr", {})

    def lr(name: str) -> float:
        """The preset's peak lr for this optimizer (a number for all, or per optimizer), else the library's."""
        return lrs.get(name, options.DEFAULTS["lr"]) if isinstance(lrs, dict) else lrs

    scale = cfg.get("scale", options.DEFAULTS["scale"])
    proj_type = cfg.get("proj_type", options.DEFAULTS["proj_type"])
    notes: list[str] = []

    def plain_groups(ps: list[Any]) -> list[dict[str, Any]]:
        """Matrices and vectors apart, as the pretraining CLI builds every optimizer's plain groups."""
        groups = [{"params": [p for p in ps if p.dim() >= 2]}, {"params": [p for p in ps if p.dim() < 2]}]
        return [g for g in groups if g["params"]]

    def adamw(kind: str) -> Callable[[list[Any], int, int], Any]:
        return lambda ps, r, gap: torch.optim.AdamW(plain_groups(ps), lr=lr("adamw"), **{kind: True})

    def galore(ps: list[Any], r: int, gap: int) -> Any:
        from galore_torch import GaLoreAdamW

        low_rank = {"rank": r, "update_proj_gap": gap, "scale": scale, "proj_type": proj_type}
        return GaLoreAdamW([{"params": ps[:n_proj], **low_rank}, *plain_groups(ps[n_proj:])], lr=lr("galore"))

    def ours(engine: str, variant: dict[str, Any]) -> Callable[[list[Any], int, int], Any]:
        def build(ps: list[Any], r: int, gap: int) -> Any:
            groups = [{"params": ps[:n_proj], "rank": r, "update_gap": gap, "scale": scale}, *plain_groups(ps[n_proj:])]
            return SubspaceAdamW(groups, lr=lr("subspace"), engine=engine, **variant)

        return build

    def describe(variant: dict[str, Any]) -> str:
        return ", ".join(f"{k}={v}" for k, v in variant.items() if v != options.DEFAULTS[k]) or "defaults"

    contenders = [
        Contender("adamw_fused", "torch AdamW, fused", adamw("fused")),
        Contender("adamw_foreach", "torch AdamW, foreach", adamw("foreach")),
    ]
    if importlib.util.find_spec("galore_torch") is not None:
        contenders.append(Contender("galore", "galore-torch GaLoreAdamW", galore))
    else:
        notes.append("galore-torch not installed: skipped")
    kernels = importlib.util.find_spec("triton") is not None
    if not kernels:
        notes.append("triton not installed: the triton engine rows are skipped")
    triton_label = "triton engine, launches stubbed" if stub else "triton engine"
    for key, variant in VARIANTS.items():
        suffix = "" if key == "default" else f"_{key}"
        contenders.append(Contender(f"reference{suffix}", f"ours, reference engine, {describe(variant)}",
                                    ours("reference", variant)))  # fmt: skip
        if kernels:
            contenders.append(Contender(f"triton{suffix}", f"ours, {triton_label}, {describe(variant)}",
                                        ours("triton", variant), kernels=True))  # fmt: skip

    launches = Launches(stub) if kernels else None
    compile_info: dict[str, Any] | None = None
    with contextlib.ExitStack() as stack:
        counter = stack.enter_context(KernelCounter()) if kernels else None
        if launches is not None:
            stack.enter_context(launches)
            stack.enter_context(probe_passed(stub))
        running: list[Running] = []
        for c in contenders:
            params = fresh(torch, base, device, dtype)
            opt = c.build(params, dims["rank"], REGULAR_GAP)
            if c.kernels:  # the first step refreshes every basis: on the reference engine (same state)
                for group in opt.param_groups:
                    group["engine"] = "reference"
                opt.step()
                for group in opt.param_groups:
                    group["engine"] = "triton"
            for _ in range(2 if not c.kernels else 1):  # the first refreshes; one more warms every cache
                opt.step()
            sync(torch, device)
            running.append(Running(c, opt, params, []))
        if args.compile:
            torch._dynamo.reset()
            c = Contender("reference_compiled", f"ours, reference engine, torch.compile(step, {args.compile})",
                          ours("reference", {}))  # fmt: skip
            params = fresh(torch, base, device, dtype)
            opt = c.build(params, dims["rank"], REGULAR_GAP)
            eager_step = opt.step
            opt.step = torch.compile(eager_step, backend=args.compile)  # type: ignore[method-assign]
            start = time.perf_counter()
            opt.step()  # refreshes, then compiles the regular step below
            first = time.perf_counter() - start
            start = time.perf_counter()
            opt.step()
            second = time.perf_counter() - start
            compile_info = {"backend": args.compile, "first_step_s": first, "second_step_s": second,
                            **dynamo_stats(torch)}  # fmt: skip
            running.append(Running(c, opt, params, []))
        before = len(launches.launches) if launches else 0
        interleaved(torch, device, running, steps, refresh=False, counter=counter)
        timed_launches = len(launches.launches) - before if launches else 0
        if compile_info is not None:
            after = dynamo_stats(torch)
            compile_info["recompiles_during_timed_steps"] = after["graphs"] - compile_info["graphs"]
        per_step: dict[str, dict[str, Any]] = {}
        for run in running:  # one more untimed step each: its launches, then its operators and host reads
            start = len(launches.launches) if launches else 0
            run.opt.step()
            sync(torch, device)
            if launches is not None:
                per_step[run.contender.name] = {"launches": launches.since(start)}
            if run.contender.name != "reference_compiled":
                per_step.setdefault(run.contender.name, {}).update(inspect_step(torch, run.opt.step, device))
    expected = sum(per_step[r.contender.name]["launches"]["total"] for r in running if r.contender.kernels) * steps
    if launches is not None:
        if timed_launches != expected:
            raise RuntimeError(f"timed steps made {timed_launches} launches, the counted steps imply {expected}")
        for run in running:
            made = per_step[run.contender.name]["launches"]["total"]
            if run.contender.kernels and made == 0:
                raise RuntimeError(f"{run.contender.name}: no kernel launch was intercepted (where did they go?)")
            if not run.contender.kernels and made:
                raise RuntimeError(f"{run.contender.name}: a non-triton optimizer launched {made} kernels")

    # Groups of same-shape matrices, as the Triton engine batches them (shape, dtype; one group's layouts).
    groups = len({(tuple(p.shape), p.dtype) for p in projected})
    n_params = len(base)
    results: dict[str, dict[str, Any]] = {}
    for run in running:
        name = run.contender.name
        step_s = statistics.median(run.times)
        row = {"label": run.contender.label, "triton": run.contender.kernels, "step_s": step_s,
               "step_s_runs": run.times, "us_per_parameter": step_s / n_params * 1e6,
               **per_step.get(name, {})}  # fmt: skip
        if "launches" in row:  # the step's two kernels per group, and the rest (the finiteness test: one per dtype)
            by_kernel = row["launches"]["by_kernel"]
            per_group = sum(by_kernel.get(k, 0) for k in STEP_KERNELS)
            row["launches"]["per_group"] = per_group / groups
            row["launches"]["other"] = row["launches"]["total"] - per_group
        results[name] = row
    fused, gal = results["adamw_fused"]["step_s"], results.get("galore", {}).get("step_s")
    for row in results.values():
        row["vs_adamw_fused"] = row["step_s"] / fused
        if gal:
            row["vs_galore"] = row["step_s"] / gal
    targets: dict[str, Any] = {}
    if gal:
        targets["reference_at_most_galore"] = results["reference"]["vs_galore"] <= 1.0
    if "triton" in results:
        made = results["triton"]["launches"]["total"]
        targets["triton_at_most_2x_fused_adamw"] = results["triton"]["vs_adamw_fused"] <= 2.0
        targets["triton_launches_beyond_2_per_group"] = made - 2 * groups  # the constant
    if compile_info is not None:
        results["reference_compiled"]["compile"] = compile_info

    def fmt(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    rows = []
    for r in results.values():
        launch = r.get("launches") if r["triton"] else None
        rows.append([
            r["label"], fmt(r["step_s"] * 1e3, ".2f"), fmt(r["us_per_parameter"], ".1f"),
            fmt(r["vs_adamw_fused"], ".2f"), fmt(r.get("vs_galore"), ".2f"),
            "-" if launch is None else f"{launch['total']} ({launch['per_group']:.3g}/group + {launch['other']})",
            fmt(r.get("torch_ops"), "d"), fmt(r.get("device_syncs"), "d"), fmt(r.get("host_built_tensors"), "d"),
        ])  # fmt: skip
    notes += [
        f"{n_params} parameter tensors ({n_proj} projected matrices in {groups} same-shape groups, "
        f"{n_params - n_proj} plain), LLaMA-7B's count and roles ({PRESET}.yaml, {dims['layers']} layers) at width "
        f"{dims['hidden']} (MLP {dims['intermediate']}, rank {dims['rank']}); {args.dtype} weights; medians of "
        f"{steps} interleaved rounds; refresh gap {REGULAR_GAP} (no timed step refreshes)",
        "torch ops: dispatched non-view operators of one step (on a GPU each launches at least one kernel); device "
        "syncs: item/bool/float/int/tolist of a tensor that lives on the device on a GPU (on CPU: every such read "
        "but torch.optim's _get_value of the CPU step counters; host_read_sites in the JSON lists them all); "
        "host-built: torch.tensor(...) from Python values (a host-to-device copy on a GPU)",
    ]
    if stub and kernels:
        notes.append(
            "triton rows: the kernels' launches are counted no-ops (no interpreter); their first, refreshing step "
            "ran on the reference engine. Launches are of one untimed step; every timed step's were counted too"
        )
    if args.smoke:
        notes.append("smoke run: checks the pipeline only; no claim is made from it")
    result = {
        "benchmark": "host",
        "model": f"{PRESET} count, width {dims['hidden']}",
        "dims": dims,
        "parameters": {"total": n_params, "projected": n_proj, "plain": n_params - n_proj, "groups": groups},
        "dtype": args.dtype,
        "device_kind": device,
        "stubbed_launches": stub,
        "steps": steps,
        "variants": VARIANTS,
        "environment": environment(torch, device),
        "results": results,
        "targets": targets,
        "notes": notes,
    }
    header = ["optimizer", "host ms/step", "µs/parameter", "x fused AdamW", "x galore-torch",
              "kernel launches/step", "torch ops/step", "device syncs/step", "host-built tensors/step"]  # fmt: skip
    write_outputs(result, rows, header, args, "Host time of a regular step")


if __name__ == "__main__":
    main()
