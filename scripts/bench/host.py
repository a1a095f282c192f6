"""Host (Python + dispatch) time of one regular optimizer step at LLaMA-7B's parameter count.

Why: on a GPU the whole fused-AdamW step of a 1.3B model takes ~10 ms, so an optimizer whose host path
costs as much becomes the step. This measures that host path on any machine: the parameters have the
count and roles of ``configs/llama_7b.yaml``'s model (a ``LlamaForCausalLM`` built with the config's layer
count: 7 projected linear weights per layer, 224 in all, and 65 RMSNorm vectors; the embedding and head
only with ``--vocab``), but tiny widths (``--width``, 8: q/k/v/o 8x8, gate/up 22x8, down 8x22, the config's
aspect ratio; the rank scaled by the same factor), so the device work is negligible and what is timed is
the per-parameter Python, state lookups, checks, dispatches and host tables.

Compared in ONE interleaved run (one step of each optimizer in turn, round after round, as
``common.run_interleaved`` does, which also checks that no timed step refreshed a basis) on one CPU thread:
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

    python -m scripts.bench.host --json host.json              # CPU, 1 thread, 20 interleaved rounds
    python -m scripts.bench.host --smoke                       # CPU, 2 layers, seconds
    python -m scripts.bench.host --device cuda                 # GPU: real launches, host + launch time
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from subspace_optim import SubspaceAdamW, param_groups

from . import common

PRESET = "7b"
KERNEL_PACKAGE = "subspace_optim.kernels"
STEP_KERNELS = ("project_adam_kernel", "back_update_kernel")  # two per group of same-shape matrices
REGULAR_GAP = 10**9  # no timed step refreshes (common.run_interleaved checks it after every timed step)
COLUMNS = [
    "optimizer",
    "host ms/step",
    "µs/parameter",
    "x fused AdamW",
    "x galore-torch",
    "kernel launches/step",
    "torch ops/step",
    "device syncs/step",
    "host-built tensors/step",
]


# ------------------------------------------------------------------------------------------------ model
@dataclass
class HostModel:
    """The parameters stepped: projected matrices first, then the plain ones, with the preset's settings."""

    shape: common.LlamaShape
    projected: list[nn.Parameter]
    plain: list[nn.Parameter]
    config: dict[str, Any]

    @property
    def params(self) -> list[nn.Parameter]:
        return self.projected + self.plain

    def groups(self) -> int:
        """Groups of same-shape matrices, as the Triton engine batches them (shape, dtype)."""
        return len({(tuple(p.shape), p.dtype) for p in self.projected})

    def lr(self, name: str) -> float:
        """The preset's peak lr for this optimizer (a number for all, or per optimizer), else the library's."""
        lrs = self.config.get("lr", {})
        return lrs.get(name, common.library_default("lr")) if isinstance(lrs, dict) else lrs

    def setting(self, name: str) -> Any:
        return self.config.get(name, common.library_default(name))


def tiny_model(width: int, layers: int | None, vocab: bool) -> HostModel:
    """``configs/llama_7b.yaml``'s layer count (or ``layers``) and roles, its widths scaled to ``width`` (the MLP
    keeps the preset's aspect ratio, the rank the same fraction of the width, at least 1); the projected weights
    by ``subspace_optim.param_groups``' own rule, the plain ones the norms (with ``vocab`` the embedding and head)."""
    config, full = common.model_config(PRESET), common.llama_shape(PRESET)
    factor = width / full.hidden
    shape = common.LlamaShape(
        f"{PRESET} count, width {width}",
        width,
        max(1, round(full.intermediate * factor)),
        layers or full.layers,
        1,
        16,
        max(1, round(full.rank * factor)),
    )
    groups = param_groups(common.build_llama(shape), rank=shape.rank)
    projected = [p for _, p in groups[0]["params"]]
    plain = [p for g in groups[1:] for _, p in g["params"] if vocab or p.dim() < 2]
    return HostModel(shape, projected, plain, config)


def fresh(base: list[nn.Parameter], device: str, dtype: torch.dtype) -> list[nn.Parameter]:
    """Independent copies of the parameters, each with the same fixed gradient for every optimizer."""
    generator = torch.Generator().manual_seed(0)
    copies = []
    for param in base:
        copy = nn.Parameter(param.detach().to(device=device, dtype=dtype, copy=True))
        copy.grad = (1e-3 * torch.randn(param.shape, generator=generator)).to(device=device, dtype=dtype)
        copies.append(copy)
    return copies


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
        for root in (str(common.ROOT) + os.sep, os.sep + "site-packages" + os.sep):
            if root in path:
                path = path.split(root, 1)[1]
                break
        return f"{path}:{frame.lineno} {frame.name}"
    return "?"


def _cpu_counter(site: str) -> bool:
    """A read by torch.optim's ``_get_value``: of the step counters torch's AdamW keeps on the CPU
    (non-fused, non-capturable; ours too for plain parameters), never a device sync."""
    return "torch/optim/" in site and site.endswith(" _get_value")


def inspect_step(step: Callable[[], Any], device: str) -> dict[str, Any]:
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
def dynamo_stats() -> dict[str, int]:
    """Graphs compiled and graph breaks so far (dynamo's counters)."""
    from torch._dynamo.utils import counters

    breaks = counters["graph_break"]
    return {
        "graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": sum(breaks.values()),
        "graph_break_reasons": sorted({str(k).splitlines()[0][:200] for k in breaks}),
    }


# ------------------------------------------------------------------------------------------ optimizers
def plain_groups(params: list[nn.Parameter]) -> list[dict[str, Any]]:
    """Matrices and vectors apart, as the pretraining CLI builds every optimizer's plain groups."""
    groups = [{"params": [p for p in params if p.dim() >= 2]}, {"params": [p for p in params if p.dim() < 2]}]
    return [g for g in groups if g["params"]]


def adamw(model: HostModel, kind: str) -> common.Build:
    return lambda params, rank, gap: torch.optim.AdamW(plain_groups(params), lr=model.lr("adamw"), **{kind: True})


def galore(model: HostModel) -> common.Build:
    def build(params: list[nn.Parameter], rank: int, gap: int) -> torch.optim.Optimizer:
        from galore_torch import GaLoreAdamW

        count = len(model.projected)
        low_rank = {
            "rank": rank,
            "update_proj_gap": gap,
            "scale": model.setting("scale"),
            "proj_type": model.setting("proj_type"),
        }
        return GaLoreAdamW(
            [{"params": params[:count], **low_rank}, *plain_groups(params[count:])], lr=model.lr("galore")
        )

    return build


def ours(model: HostModel, engine: str, variant: dict[str, Any]) -> common.Build:
    def build(params: list[nn.Parameter], rank: int, gap: int) -> torch.optim.Optimizer:
        count = len(model.projected)
        projected = {"params": params[:count], "rank": rank, "update_gap": gap, "scale": model.setting("scale")}
        groups = [projected, *plain_groups(params[count:])]
        return SubspaceAdamW(groups, lr=model.lr("subspace"), engine=engine, **variant)

    return build


def describe(variant: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in variant.items() if v != common.library_default(k)) or "defaults"


def host_contenders(model: HostModel, stub: bool, kernels: bool, notes: list[str]) -> list[common.Contender]:
    found = [
        common.Contender("adamw_fused", "torch AdamW, fused", adamw(model, "fused")),
        common.Contender("adamw_foreach", "torch AdamW, foreach", adamw(model, "foreach")),
    ]
    if importlib.util.find_spec("galore_torch") is not None:
        found.append(common.Contender("galore", "galore-torch GaLoreAdamW", galore(model)))
    else:
        notes.append("galore-torch not installed: skipped")
    if not kernels:
        notes.append("triton not installed: the triton engine rows are skipped")
    triton_label = "triton engine, launches stubbed" if stub else "triton engine"
    for key, variant in common.VARIANTS.items():
        suffix = "" if key == "default" else f"_{key}"
        found.append(
            common.Contender(
                f"reference{suffix}", f"ours, reference engine, {describe(variant)}", ours(model, "reference", variant)
            )
        )
        if kernels:
            found.append(
                common.Contender(
                    f"triton{suffix}",
                    f"ours, {triton_label}, {describe(variant)}",
                    ours(model, "triton", variant),
                    kernels=True,
                )
            )
    return found


def start_running(
    model: HostModel, chosen: list[common.Contender], device: str, dtype: torch.dtype
) -> list[common.Running]:
    """Every optimizer built and stepped untimed: the first step refreshes every basis (the triton rows' on the
    reference engine: same state, and stubbed kernels would compute nothing); one more warms every cache."""
    running = []
    for contender in chosen:
        params = fresh(model.params, device, dtype)
        opt = contender.build(params, model.shape.rank, REGULAR_GAP)
        if contender.kernels:
            for group in opt.param_groups:
                group["engine"] = "reference"
            opt.step()
            for group in opt.param_groups:
                group["engine"] = "triton"
        for _ in range(1 if contender.kernels else 2):
            opt.step()
        common.sync(device)
        running.append(common.Running(contender, opt, params))
    return running


def compiled_running(model: HostModel, backend: str, device: str, dtype: torch.dtype) -> tuple[common.Running, dict]:
    """``torch.compile(step)`` of the reference engine at the defaults: its compile time (first steps) and stats."""
    torch._dynamo.reset()
    contender = common.Contender(
        "reference_compiled", f"ours, reference engine, torch.compile(step, {backend})", ours(model, "reference", {})
    )
    params = fresh(model.params, device, dtype)
    opt = contender.build(params, model.shape.rank, REGULAR_GAP)
    opt.step = torch.compile(opt.step, backend=backend)  # type: ignore[method-assign]
    seconds = []
    for _ in range(2):  # the first refreshes, then the regular step compiles
        start = time.perf_counter()
        opt.step()
        seconds.append(time.perf_counter() - start)
    info = {"backend": backend, "first_step_s": seconds[0], "second_step_s": seconds[1], **dynamo_stats()}
    return common.Running(contender, opt, params), info


# ------------------------------------------------------------------------------------------ measuring
@dataclass
class Measured:
    running: list[common.Running]
    per_step: dict[str, dict[str, Any]]
    compile_info: dict[str, Any] | None


def inspect_each(running: list[common.Running], launches: Launches | None, device: str) -> dict[str, dict]:
    """One more untimed step each: its launches, then its operators and host reads."""
    per_step: dict[str, dict[str, Any]] = {}
    for run in running:
        start = len(launches.launches) if launches else 0
        run.opt.step()
        common.sync(device)
        if launches is not None:
            per_step[run.contender.name] = {"launches": launches.since(start)}
        if run.contender.name != "reference_compiled":
            per_step.setdefault(run.contender.name, {}).update(inspect_step(run.opt.step, device))
    return per_step


def check_launches(measured: Measured, timed_launches: int, rounds: int) -> None:
    """Every timed step launched as its counted step did; only the triton rows launched."""
    kernel_runs = [r for r in measured.running if r.contender.kernels]
    expected = sum(measured.per_step[r.contender.name]["launches"]["total"] for r in kernel_runs) * rounds
    if timed_launches != expected:
        raise RuntimeError(f"timed steps made {timed_launches} launches, the counted steps imply {expected}")
    for run in measured.running:
        made = measured.per_step[run.contender.name]["launches"]["total"]
        if run.contender.kernels and made == 0:
            raise RuntimeError(f"{run.contender.name}: no kernel launch was intercepted (where did they go?)")
        if not run.contender.kernels and made:
            raise RuntimeError(f"{run.contender.name}: a non-triton optimizer launched {made} kernels")


def measure(args: argparse.Namespace, model: HostModel, chosen: list[common.Contender], kernels: bool) -> Measured:
    stub, dtype = args.device == "cpu", getattr(torch, args.dtype)
    launches = Launches(stub) if kernels else None
    with contextlib.ExitStack() as stack:
        counter = stack.enter_context(common.KernelCounter()) if kernels else None
        if launches is not None:
            stack.enter_context(launches)
            stack.enter_context(probe_passed(stub))
        running = start_running(model, chosen, args.device, dtype)
        compile_info = None
        if args.compile:
            compiled, compile_info = compiled_running(model, args.compile, args.device, dtype)
            running.append(compiled)
        before = len(launches.launches) if launches else 0
        common.run_interleaved(running, args.steps, args.device, refresh=False, counter=counter)
        timed_launches = len(launches.launches) - before if launches else 0
        if compile_info is not None:
            compile_info["recompiles_during_timed_steps"] = dynamo_stats()["graphs"] - compile_info["graphs"]
        measured = Measured(running, inspect_each(running, launches, args.device), compile_info)
    if launches is not None:
        check_launches(measured, timed_launches, args.steps)
    return measured


def host_results(model: HostModel, measured: Measured) -> dict[str, dict[str, Any]]:
    """Per optimizer: median step, µs per parameter, launches per group, ratios to fused AdamW and galore-torch."""
    results: dict[str, dict[str, Any]] = {}
    for run in measured.running:
        name, step_s = run.contender.name, common.median(run.times)
        row = {
            "label": run.contender.label,
            "triton": run.contender.kernels,
            "step_s": step_s,
            "step_s_runs": run.times,
            "us_per_parameter": step_s / len(model.params) * 1e6,
            **measured.per_step.get(name, {}),
        }
        if "launches" in row:  # the step's two kernels per group, and the rest (the finiteness test: one per dtype)
            per_group = sum(row["launches"]["by_kernel"].get(k, 0) for k in STEP_KERNELS)
            row["launches"]["per_group"] = per_group / model.groups()
            row["launches"]["other"] = row["launches"]["total"] - per_group
        results[name] = row
    timings = common.Timings({name: row["step_s_runs"] for name, row in results.items()})
    for name, row in results.items():
        row["vs_adamw_fused"] = row["step_s"] / results["adamw_fused"]["step_s"]
        row["vs_adamw_fused_paired"] = common.median(timings.ratios(name, "adamw_fused"))
        if "galore" in results:
            row["vs_galore"] = row["step_s"] / results["galore"]["step_s"]
    if measured.compile_info is not None:
        results["reference_compiled"]["compile"] = measured.compile_info
    return results


def host_targets(results: dict[str, dict[str, Any]], groups: int) -> dict[str, Any]:
    targets: dict[str, Any] = {}
    if "galore" in results:
        targets["reference_at_most_galore"] = results["reference"]["vs_galore"] <= 1.0
    if "triton" in results:
        targets["triton_at_most_2x_fused_adamw"] = results["triton"]["vs_adamw_fused"] <= 2.0
        targets["triton_launches_beyond_2_per_group"] = results["triton"]["launches"]["total"] - 2 * groups
    return targets


def host_rows(results: dict[str, dict[str, Any]]) -> list[list[str]]:
    cell, rows = common.cell, []
    for row in results.values():
        launch = row.get("launches") if row["triton"] else None
        launched = "-" if launch is None else f"{launch['total']} ({launch['per_group']:.3g}/group + {launch['other']})"
        rows.append(
            [
                row["label"],
                cell(row["step_s"], ".2f", 1e3),
                cell(row["us_per_parameter"], ".1f"),
                cell(row["vs_adamw_fused"], ".2f"),
                cell(row.get("vs_galore"), ".2f"),
                launched,
                cell(row.get("torch_ops"), "d"),
                cell(row.get("device_syncs"), "d"),
                cell(row.get("host_built_tensors"), "d"),
            ]
        )
    return rows


def host_notes(args: argparse.Namespace, model: HostModel, kernels: bool) -> list[str]:
    shape, count = model.shape, len(model.params)
    notes = [
        f"{count} parameter tensors ({len(model.projected)} projected matrices in {model.groups()} same-shape groups, "
        f"{len(model.plain)} plain), LLaMA-7B's count and roles (llama_{PRESET}.yaml, {shape.layers} layers) at width "
        f"{shape.hidden} (MLP {shape.intermediate}, rank {shape.rank}); {args.dtype} weights; medians of "
        f"{args.steps} interleaved rounds; refresh gap {REGULAR_GAP} (no timed step refreshes)",
        "torch ops: dispatched non-view operators of one step (on a GPU each launches at least one kernel); device "
        "syncs: item/bool/float/int/tolist of a tensor that lives on the device on a GPU (on CPU: every such read "
        "but torch.optim's _get_value of the CPU step counters; host_read_sites in the JSON lists them all); "
        "host-built: torch.tensor(...) from Python values (a host-to-device copy on a GPU)",
    ]
    if args.device == "cpu" and kernels:
        notes.append(
            "triton rows: the kernels' launches are counted no-ops (no interpreter); their first, refreshing "
            "step ran on the reference engine. Launches are of one untimed step; every timed step's were "
            "counted too"
        )
    return notes + (["smoke run: checks the pipeline only; no claim is made from it"] if args.smoke else [])


# ----------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="2 layers, 3 rounds: checks the pipeline (tests)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16", help="weights and gradients")
    parser.add_argument("--width", type=int, default=8, help="the tiny hidden size (default 8)")
    parser.add_argument("--layers", type=int, help="override the preset's layer count (smoke: 2)")
    parser.add_argument("--vocab", action="store_true", help="also step the embedding and head (plain AdamW)")
    parser.add_argument("--steps", type=int, help="interleaved timed rounds (default 20; smoke 3)")
    parser.add_argument(
        "--compile",
        choices=["eager", "aot_eager", "inductor"],
        help="also time torch.compile(step, backend=...) of the reference engine",
    )
    common.add_output_args(parser)
    args = parser.parse_args(argv)
    args.steps = args.steps or (3 if args.smoke else 20)
    args.layers = args.layers or (2 if args.smoke else None)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.device == "cpu":  # engine="triton" takes CPU tensors only under the interpreter (read at kernel import)
        os.environ["TRITON_INTERPRET"] = "1"
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    torch.set_num_threads(args.threads)
    model = tiny_model(args.width, args.layers, args.vocab)
    notes: list[str] = []
    kernels = importlib.util.find_spec("triton") is not None
    chosen = host_contenders(model, args.device == "cpu", kernels, notes)
    measured = measure(args, model, chosen, kernels)
    results = host_results(model, measured)
    notes += host_notes(args, model, kernels)
    count = len(model.params)
    result = {
        "benchmark": "host",
        "model": model.shape.name,
        "dims": vars(model.shape),
        "parameters": {
            "total": count,
            "projected": len(model.projected),
            "plain": len(model.plain),
            "groups": model.groups(),
        },
        "dtype": args.dtype,
        "device_kind": args.device,
        "stubbed_launches": args.device == "cpu",
        "steps": args.steps,
        "variants": common.VARIANTS,
        "results": results,
        "targets": host_targets(results, model.groups()),
        "notes": notes,
        "tables": [common.table(f"Host time of a regular step ({model.shape.name})", COLUMNS, host_rows(results))],
    }
    return common.write_result(result, args, args.device)


if __name__ == "__main__":
    main()
