"""One command for the day a GPU is lent: every GPU-only check in one run, one JSON and one markdown summary.

Why: no GPU has been lent to this project so far, so the kernels have only run under the CPU interpreter and
every GPU number in the docs is owed. A lent GPU comes with minutes of device time, so this runs the checks
that need it in a fixed order, each in its own subprocess with its own time budget (a crash, a hang or a
failure in one part is recorded and the next part runs), all within ``--budget`` seconds (default 300):

1. ``versions``: torch, CUDA, Triton, ptxas, the driver, the GPU.
2. ``probe``: ``subspace_optim.kernels.probe.probe(cuda)``, the engine's first-use self-check.
2b. ``precompile``: optimizer steps with ``engine="triton"`` compile nothing at launch (``kernels.precompile``
   compiled every variant first; Triton's post-compile hook counts).
3. ``aot``: a compile, for this GPU's architecture, of every kernel variant the LLaMA-1B and -7B presets launch
   (weights fp32 and bf16; the options of ``common.VARIANTS``) through ``subspace_optim.kernels.aot``
   (registers, spills, failures); "aot module missing" when that module is not there. CPU work: it runs
   beside parts 4 and 5; the timed parts (6, 7) start when it is done.
4. ``kernel_tests``: ``pytest tests/test_kernels.py`` on CUDA (``TRITON_INTERPRET`` unset).
5. ``memory``: peak ``torch.cuda.max_memory_allocated`` of LLaMA-1B training steps (``configs/llama_1b.yaml``,
   random weights, bf16, the preset's batch): SubspaceAdamW at the preset's options, then fused AdamW.
6. ``bench_step``: ``python -m scripts.bench.step --model 1b`` (regular and refresh steps against torch fused AdamW
   and galore-torch; few steps: galore-torch's full-SVD refresh takes ~40 s per pass at 1B).
7. ``bench_refresh``: ``python -m scripts.bench.refresh --model 1b`` when the budget left allows it (it runs three
   full SVD passes, ~2 min), else at ``--model 7b-layer``; the JSON says which.

    python -m scripts.bench.gpu_check --out $OUT                 # on the GPU machine: $OUT/gpu_check.{json,md}
    python -m scripts.bench.gpu_check --dry-run                  # anywhere: what it would run
    python -m scripts.bench.gpu_check --budget 540 --out $OUT    # enough for bench_refresh at 1B too

The budgets are estimates made without a GPU (from the H100 numbers in ../shared/DESIGN.md: galore-torch's
SVD refresh of the 1B matrices takes ~40 s, and bench_step needs three of them, bench_refresh three more
including the exact SVD it measures energy against). In 300 s everything but a 1B bench_refresh should fit.

Without CUDA (and without ``--dry-run``) it exits with status 2. Exit status 1: some part failed or ran out of
time (the outputs are written all the same).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .common import ROOT, VARIANTS, model_config
from .render import render

MODULE = "scripts.bench.gpu_check"
NEEDS_GPU = 2
PRESETS = ("llama_1b", "llama_7b")
WEIGHT_DTYPES = ("float32", "bfloat16")


@dataclass
class Part:
    """One check: a subprocess ``command`` (``None``: this script's own ``--part name``), its time cap, and
    ``fallbacks``: cheaper (command, seconds it needs) alternatives taken when the budget left is short."""

    name: str
    what: str
    budget_s: int
    command: list[str] | None = None
    needs_s: int = 0  # below this much time left, take a fallback (or skip)
    background: bool = False  # runs beside the next parts (CPU-only work), finished before any timed part
    timed: bool = False  # measures time: nothing else runs meanwhile
    fallbacks: list[tuple[list[str], int, str]] = field(default_factory=list)


@dataclass
class Record:
    name: str
    status: str  # ok | failed | timeout | skipped
    seconds: float = 0.0
    budget_s: float = 0.0
    command: str = ""
    returncode: int | None = None
    result: Any = None
    output_tail: str = ""
    note: str = ""


def plan(out: Path) -> list[Part]:
    """The parts in the order they run (cheap and decisive first; the galore-torch SVD benchmarks last)."""
    py = sys.executable
    step_out, refresh_out = out / "bench_step", out / "bench_refresh"

    def bench(module: str, dest: Path, *flags: str) -> list[str]:
        return [py, "-m", f"scripts.bench.{module}", *flags, "--json", f"{dest}.json"]

    return [
        Part("versions", "torch, CUDA, Triton, ptxas, driver and GPU versions", 30),
        Part("probe", "subspace_optim.kernels.probe.probe(cuda): the engine's self-check", 90),
        Part(
            "precompile",
            "optimizer steps with engine='triton' compile every variant before launching (Triton's "
            "compile hook counts compiles at launch: 0 expected)",
            90,
        ),
        Part(
            "aot",
            "compile every kernel variant the 1B and 7B presets launch (kernels.aot), this GPU's arch; "
            "CPU work, beside the next two parts",
            120,
            background=True,
        ),
        Part(
            "kernel_tests",
            "pytest tests/test_kernels.py on CUDA",
            120,
            [py, "-m", "pytest", str(ROOT / "tests" / "test_kernels.py"), "-q", "-p", "no:cacheprovider"],
        ),
        Part(
            "memory", "peak CUDA memory of LLaMA-1B bf16 training steps (ours at the preset's options, fused AdamW)", 90
        ),
        Part(
            "bench_step",
            "scripts.bench.step --model 1b vs fused AdamW and galore-torch",
            200,
            bench("step", step_out, "--model", "1b", "--steps", "5", "--refresh-steps", "1"),
            needs_s=140,
            timed=True,
        ),
        Part(
            "bench_refresh",
            "scripts.bench.refresh --model 1b vs galore-torch (7b-layer if time is short)",
            200,
            bench("refresh", refresh_out, "--model", "1b", "--repeats", "1"),
            needs_s=150,
            timed=True,
            fallbacks=[
                (
                    bench("refresh", refresh_out, "--model", "7b-layer", "--repeats", "3"),
                    45,
                    "ran at --model 7b-layer: the budget left was too short for 1b (three full-SVD passes)",
                )
            ],
        ),
    ]


# ------------------------------------------------------------------------------------------ the parts
def part_versions() -> dict[str, Any]:
    """Versions that decide what a GPU number means."""
    import torch
    import triton

    from .common import versions

    out: dict[str, Any] = {
        **versions(),
        "triton": triton.__version__,
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
    }
    with contextlib.suppress(Exception):  # a version that cannot be read is left out
        import transformers

        out["transformers"] = transformers.__version__
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, capability=f"{props.major}.{props.minor}", gpu_memory_gib=props.total_memory / 2**30)
    smi = shutil.which("nvidia-smi")
    if smi:
        with contextlib.suppress(Exception):  # a version that cannot be read is left out
            text = subprocess.run(
                [smi, "--query-gpu=driver_version,name", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout
            out["driver"] = text.strip().splitlines()[0].split(",")[0].strip()
    if "driver" not in out:
        with contextlib.suppress(Exception):  # a version that cannot be read is left out
            import ctypes

            version = ctypes.c_int()
            ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version))
            out["driver"] = f"CUDA driver API {version.value // 1000}.{version.value % 1000 // 10} (no nvidia-smi)"
    with contextlib.suppress(Exception):  # a version that cannot be read is left out
        from triton.backends.nvidia.compiler import get_ptxas_version

        for arch in (80, 90):
            text = get_ptxas_version(arch)
            found = re.search(r"release ([\d.]+), (V[\d.]+)", text)
            out[f"ptxas_sm_{arch}"] = " ".join(found.groups()) if found else text.strip().splitlines()[-1]
    return out


def part_probe() -> dict[str, Any]:
    """The self-check ``engine="auto"`` runs before its first launch on a device: None means it passed."""
    import torch

    from subspace_optim.kernels.probe import probe

    start = time.perf_counter()
    error = probe(torch.device("cuda"))
    return {"passed": error is None, "error": error, "seconds": time.perf_counter() - start}


def preset_requests() -> dict[Any, str]:
    """``precompile.Variant`` -> a label, for every variant the 1B and 7B presets launch: each projected matrix
    shape of each preset, weights fp32 and bf16, the options of ``common.VARIANTS`` over the library's
    defaults, asked of ``precompile.variants_for`` (what the optimizer compiles before a step on a GPU; its
    refresh on the kernels included)."""
    import torch

    from subspace_optim import engine, options, subspace
    from subspace_optim.kernels import precompile

    wanted: dict[Any, str] = {}
    for name in PRESETS:
        cfg = model_config(name)
        hidden, inter, rank = cfg["hidden_size"], cfg["intermediate_size"], cfg["rank"]
        shapes = {(hidden, hidden), (inter, hidden), (hidden, inter)}
        for wname, (key, variant) in itertools.product(WEIGHT_DTYPES, VARIANTS.items()):
            o = {**options.DEFAULTS, **variant}
            wd = getattr(torch, wname)
            precision = engine.matmul_precision(o["matmul_precision"], wd)
            for m, n in shapes:
                side = subspace.choose_side(o["proj_type"], m, n)
                cols = n if side == "left" else rank  # the moments' columns
                for v in precompile.variants_for(
                    side, wd, wd, o["basis_dtype"], o["moments_dtype"], o["residual"], precision, cols, True, False
                ):
                    wanted.setdefault(v, f"{name} {wname} weights {key}, {side} {m}x{n}")
    return wanted


def aot_selection() -> tuple[Any, list[Any], list[str]]:
    """The ``kernels.aot`` module, its variants the presets launch, and the requests no ``aot`` variant covers
    (there should be none: ``tests/test_aot.py`` checks that the sweep holds every variant a step can ask for)."""
    aot = importlib.import_module("subspace_optim.kernels.aot")
    wanted = preset_requests()
    chosen = [v for v in aot.variants() if v.compiled in wanted]
    covered = {v.compiled for v in chosen}
    missing = [f"{v.kernel}: {label}" for v, label in wanted.items() if v not in covered]
    return aot, chosen, missing


def part_aot() -> dict[str, Any]:
    """Compile the presets' variants for this GPU's architecture with ``aot.sweep`` (spawned workers, a private
    Triton cache); "aot module missing" when ``subspace_optim.kernels.aot`` cannot be imported."""
    import torch

    try:
        aot, chosen, missing = aot_selection()
    except ModuleNotFoundError as err:
        return {"status": "aot module missing", "error": str(err)}
    major, minor = torch.cuda.get_device_capability()
    arch = 10 * major + minor
    start = time.perf_counter()
    results = aot.sweep(chosen, [arch], jobs=os.cpu_count() or 1)
    failed = [r for r in results if r.error]
    # What the optimizer does before a step here: compile through Triton's own launch path and load each
    # variant on this device (a variant over the device's shared memory fails here, not in the sweep).
    from subspace_optim.kernels import precompile

    not_loaded = precompile.ensure(torch.device("cuda"), [v.compiled for v in chosen])
    return {
        "status": "ok" if not failed and not missing and not not_loaded else "failed",
        "not_loaded": [f"{v.describe()}: {why}" for v, why in not_loaded.items()],
        "arch": arch,
        "variants": len(chosen),
        "requests_not_in_aot": missing,
        "failures": [f"{r.variant.kernel} ({r.variant.label}): {r.error}" for r in failed],
        "violations": [
            f"{r.variant.kernel} ({r.variant.label}): {'; '.join(r.violations)}"
            for r in results
            if r.violations and not r.error
        ],
        "summary": aot.summary(results),
        "seconds": time.perf_counter() - start,
    }


def part_memory(preset_name: str = "llama_1b", device: str = "cuda") -> dict[str, Any]:
    """Peak CUDA memory of LLaMA-1B training steps: the model from ``configs/llama_1b.yaml`` with random
    weights (no download) in bf16, the preset's batch of random tokens, one forward/backward/step per step.
    Step 1 refreshes every basis; step 2 is a regular step. Then the same for fused AdamW, for the ratio.
    (``preset_name``/``device``: a small preset on the CPU checks the wiring; peaks are then not measured.)"""
    import torch

    from subspace_optim.metrics import state_bytes
    from subspace_optim.pretrain import optimizers
    from subspace_optim.pretrain.config import load_config
    from subspace_optim.pretrain.loop import build_model

    cfg = load_config(["--model", preset_name])
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    out: dict[str, Any] = {
        "model": preset_name,
        "batch": [cfg.batch_size, cfg.seq_len],
        "dtype": "bfloat16",
        "rank": cfg.rank,
    }
    for name in ("subspace", "adamw"):
        if cuda:
            torch.cuda.empty_cache()
        with dev:
            model = build_model(cfg, cfg.tokenizer_vocab).to(torch.bfloat16)
        opt = optimizers.build(name, model, cfg)
        gen = torch.Generator(device=dev).manual_seed(0)
        row: dict[str, Any] = {"weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
        for k in (1, 2):
            tokens = torch.randint(cfg.tokenizer_vocab, (cfg.batch_size, cfg.seq_len), device=dev, generator=gen)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            row[f"step{k}_seconds"] = time.perf_counter() - start
            row[f"step{k}_peak_bytes"] = int(torch.cuda.max_memory_allocated()) if cuda else None
            row[f"step{k}_loss"] = float(loss.detach())
        row["state_bytes"] = state_bytes(opt)
        row["peak_gib"] = max(row["step1_peak_bytes"], row["step2_peak_bytes"]) / 2**30 if cuda else None
        out[name] = row
        del model, opt, loss
    if cuda:
        out["peak_vs_adamw"] = out["subspace"]["peak_gib"] / out["adamw"]["peak_gib"]
    return out


def part_precompile() -> dict[str, Any]:
    """A step compiles nothing at launch: Triton's post-compile hook counts every compile while optimizers with
    ``engine="triton"`` take a first (refreshing) step and two regular ones, for fp32 and bf16 weights and the
    options of ``common.VARIANTS``, on a right and a left projection and a batch of two. After the probe
    (which compiles its own variants as it launches them), every compile must be a warm-up from
    ``kernels.precompile``: one at launch would be a variant ``variants_for`` missed (a step that could fail
    half-applied)."""
    import torch
    import triton

    from subspace_optim import SubspaceAdamW, engine

    device = torch.device("cuda")
    engine._passes_probe(device, "triton")
    compiles: list[tuple[str, bool]] = []

    def hook(*, fn: Any, is_manual_warmup: bool, **_: Any) -> bool:
        compiles.append((fn.name, bool(is_manual_warmup)))
        return False  # compile as usual

    saved = triton.knobs.runtime.jit_post_compile_hook
    triton.knobs.runtime.jit_post_compile_hook = hook
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        for variant, wname in itertools.product(VARIANTS.values(), WEIGHT_DTYPES):
            dtype = getattr(torch, wname)
            params = [
                torch.nn.Parameter(torch.randn(*shape, generator=gen).to(device, dtype))
                for shape in ((96, 64), (64, 300), (96, 64), (64,))
            ]
            opt = SubspaceAdamW(
                [{"params": params[:3], "rank": 8, "update_gap": 3}, {"params": params[3:]}],
                lr=1e-3,
                engine="triton",
                **variant,
            )
            for _ in range(3):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen).to(device, dtype)
                opt.step()
        torch.cuda.synchronize()
    finally:
        triton.knobs.runtime.jit_post_compile_hook = saved
    at_launch = sorted({name for name, warm in compiles if not warm})
    return {
        "status": "ok" if not at_launch else "failed",
        "warm_ups": sum(warm for _, warm in compiles),
        "compiled_at_launch": at_launch,
    }


PARTS: dict[str, Callable[[], dict[str, Any]]] = {
    "versions": part_versions,
    "probe": part_probe,
    "precompile": part_precompile,
    "aot": part_aot,
    "memory": part_memory,
}


# ------------------------------------------------------------------------------------------- running
@dataclass
class Pending:
    """A started part: its process (its own process group), deadline and where its result lands."""

    part: Part
    proc: subprocess.Popen
    command: list[str]
    note: str
    budget: float
    start: float
    result_file: Path


def start_command(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    """The command in its own process group (pytest and the compile sweep start children of their own, which
    a timeout must kill too), output captured."""
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT, start_new_session=True
    )


def wait_command(proc: subprocess.Popen, timeout: float) -> tuple[int | None, str]:
    """(return code, or None when it ran out of time and its group was killed; the output's tail)."""
    try:
        output, _ = proc.communicate(timeout=max(1.0, timeout))
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        code = None
    return code, (output or "")[-6000:]


def run_command(command: list[str], timeout: float, env: dict[str, str]) -> tuple[int | None, str, float]:
    """(return code or None on timeout, the output's tail, seconds)."""
    start = time.perf_counter()
    code, tail = wait_command(start_command(command, env), timeout)
    return code, tail, time.perf_counter() - start


def start_part(part: Part, left: float, out: Path, env: dict[str, str]) -> Pending | Record:
    """Start one part with ``min(its budget, left)`` seconds, or a fallback (or a skip) when ``left`` is short."""
    command, note = part.command, ""
    if command is not None and left < part.needs_s:
        for alt, needs, why in part.fallbacks:
            if left >= needs:
                command, note = alt, why
                break
        else:
            return Record(part.name, "skipped", budget_s=left, note=f"needs ~{part.needs_s} s, {left:.0f} s were left")
    result_file = out / f"part_{part.name}.json"
    if command is None:
        command = [sys.executable, "-m", MODULE, "--part", part.name, "--part-out", str(result_file)]
    budget = min(part.budget_s, left)
    return Pending(part, start_command(command, env), command, note, budget, time.perf_counter(), result_file)


def finish_part(p: Pending) -> Record:
    """Wait for a started part (until its deadline) and record what happened."""
    code, tail = wait_command(p.proc, p.start + p.budget - time.perf_counter())
    status = "ok" if code == 0 else ("timeout" if code is None else "failed")
    record = Record(
        p.part.name, status, time.perf_counter() - p.start, p.budget, " ".join(p.command), code, None, tail, p.note
    )
    name, command = p.part.name, p.command
    if name == "kernel_tests":
        record.result = pytest_summary(tail)
    elif name.startswith("bench_"):
        dest = Path(command[command.index("--json") + 1])
        if dest.exists():
            record.result = json.loads(dest.read_text())
            record.result["markdown"] = render(record.result)
    elif p.result_file.exists():
        record.result = json.loads(p.result_file.read_text())
    res = record.result if isinstance(record.result, dict) else {}
    if name == "probe" and status == "ok" and not res.get("passed"):
        record.status = "failed"
    if name == "aot" and status == "ok" and res.get("status") != "ok":
        record.status = "failed" if res.get("status") == "failed" else "skipped"
    return record


def pytest_summary(output: str) -> dict[str, Any]:
    """pytest's final line ("3 failed, 40 passed, 2 skipped in 61.2s") and its counts; None when it never
    got there (killed at its deadline)."""
    lines = [
        ln.strip(" =") for ln in output.splitlines() if re.search(r"\d+ (passed|failed|errors?)\b.* in [\d.]+s", ln)
    ]
    if not lines:
        return {"summary": None, "counts": {}}
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", lines[-1])}
    return {"summary": lines[-1], "counts": counts}


def run_part(part: Part, left: float, out: Path, env: dict[str, str]) -> Record:
    """Run one part to its end (or its deadline) and record what happened."""
    started = start_part(part, left, out, env)
    return started if isinstance(started, Record) else finish_part(started)


def headline(r: Record) -> str:
    """One line of what a part found, for the summary table."""
    res = r.result if isinstance(r.result, dict) else {}
    if not res:  # nothing came back: why (the output's last line)
        last = (r.output_tail.strip().splitlines() or [""])[-1][:200]
        return "; ".join(x for x in (r.note, last) if x) or r.status
    if r.name == "versions":
        return ", ".join(f"{k} {res.get(k)}" for k in ("gpu", "driver", "torch", "cuda_runtime", "triton") if k in res)
    if r.name == "probe":
        return "passed" if res.get("passed") else f"FAILED: {res.get('error')}"
    if r.name == "aot":
        if res.get("status") == "aot module missing":
            return "aot module missing"
        return (
            f"sm_{res.get('arch')}: {res.get('variants')} variants, {len(res.get('failures', []))} failures, "
            f"{len(res.get('violations', []))} over the spill/register rules, "
            f"{len(res.get('requests_not_in_aot', []))} requests not enumerated by aot"
        )
    if r.name == "kernel_tests":
        return res.get("summary") or str(res.get("counts"))
    if r.name == "memory" and "subspace" in res:
        return (
            f"ours {res['subspace']['peak_gib']:.2f} GiB, fused AdamW {res['adamw']['peak_gib']:.2f} GiB "
            f"({res['peak_vs_adamw']:.3f}x)"
        )
    if r.name == "bench_step" and res.get("results"):
        rows = res["results"]
        return ", ".join(f"{k} {v['step_s'] * 1e3:.1f} ms" for k, v in rows.items()) + (f"; {r.note}" if r.note else "")
    if r.name == "bench_refresh" and res.get("results"):
        rows = res["results"]
        text = ", ".join(f"{k} {v['refresh_s'] * 1e3:.0f} ms" for k, v in rows.items())
        return f"{res.get('model')}: {text}" + (f"; {r.note}" if r.note else "")
    return r.note or (r.output_tail.strip().splitlines() or [""])[-1][:200]


def markdown(records: list[Record], total: float, budget: float) -> str:
    """The summary: one row per part, then the benchmark scripts' own tables and any failure's output."""
    versions = next((r.result for r in records if r.name == "versions" and isinstance(r.result, dict)), {})
    lines = [
        "## GPU check",
        "",
        f"- GPU: {versions.get('gpu', '?')}; driver {versions.get('driver', '?')}; torch {versions.get('torch', '?')} "
        f"(CUDA {versions.get('cuda_runtime', '?')}); triton {versions.get('triton', '?')}; "
        f"ptxas {versions.get('ptxas_sm_90', '?')}",
        f"- command: `{' '.join([sys.executable, *sys.argv])}`; {total:.0f} s of a {budget:.0f} s budget; "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}",
        "",
        "| part | status | seconds (budget) | result |",
        "|---|---|---|---|",
    ]
    for r in records:
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.0f} ({r.budget_s:.0f}) | {headline(r)} |")
    for r in records:
        res = r.result if isinstance(r.result, dict) else {}
        if res.get("markdown"):
            lines += ["", res["markdown"].strip()]
        if r.name == "aot" and res.get("summary"):
            lines += [
                "",
                f"### AOT compile of the presets' variants (sm_{res.get('arch')})",
                "",
                "| kernel | variants | failures | registers | max spill stores (B) | max shared (B) |",
                "|---|---|---|---|---|---|",
            ]
            for row in res["summary"]:
                lines.append(
                    f"| {row['kernel']} | {row['variants']} | {row['failures']} | "
                    f"{row['min_regs']}-{row['max_regs']} | {row['max_spill_stores']} | {row['max_shared']} |"
                )
        if r.status in ("failed", "timeout") and r.output_tail.strip():
            lines += ["", f"### {r.name}: {r.status}", "", "```", r.output_tail[-3000:].strip(), "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "outputs" / "gpu_check"), help="output folder")
    parser.add_argument("--json", help="the result (default OUT/gpu_check.json); with --dry-run, the plan")
    parser.add_argument("--markdown", help="the summary (default OUT/gpu_check.md)")
    parser.add_argument("--budget", type=float, default=300, help="seconds for everything (default 300)")
    parser.add_argument("--only", help="comma-separated part names to run (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="list what would run, run nothing; no GPU needed")
    parser.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)  # internal: one in-process part
    parser.add_argument("--part-out", help=argparse.SUPPRESS)
    parser.add_argument("--without-gpu", action="store_true", help=argparse.SUPPRESS)  # tests: the loop on a CPU
    args = parser.parse_args()
    if args.part:
        result = PARTS[args.part]()
        Path(args.part_out).write_text(json.dumps(result, indent=1, default=str))
        return 0
    out = Path(args.out)
    parts = plan(out)
    if args.only:
        keep = set(args.only.split(","))
        unknown = keep - {p.name for p in parts}
        if unknown:
            parser.error(f"--only: unknown parts {sorted(unknown)}; parts are {[p.name for p in parts]}")
        parts = [p for p in parts if p.name in keep]
    if args.dry_run:
        return dry_run(parts, args)
    import torch

    if not torch.cuda.is_available() and not args.without_gpu:
        print(
            "gpu_check needs a CUDA GPU: torch.cuda.is_available() is False here (torch "
            f"{torch.__version__}). Run it on the GPU machine; `--dry-run` lists what it would run.",
            file=sys.stderr,
        )
        return NEEDS_GPU
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    records = run_parts(parts, out, args.budget)
    records = {p.name: records[p.name] for p in parts}  # in the plan's order
    total = time.perf_counter() - start
    result = {
        "benchmark": "gpu_check",
        "seconds": total,
        "budget_s": args.budget,
        "command": " ".join([sys.executable, *sys.argv]),
        "parts": [asdict(r) for r in records.values()],
    }
    json_path = Path(args.json or out / "gpu_check.json")
    md_path = Path(args.markdown or out / "gpu_check.md")
    json_path.write_text(json.dumps(result, indent=1, default=str))
    md_path.write_text(markdown(list(records.values()), total, args.budget))
    print(md_path.read_text())
    return 0 if all(r.status == "ok" for r in records.values()) else 1


def run_parts(parts: list[Part], out: Path, budget: float) -> dict[str, Record]:
    """Every part in turn within ``budget`` seconds (background parts beside the next ones; timed parts alone)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the kernels compile for the GPU
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    start = time.perf_counter()
    records: dict[str, Record] = {}
    background: list[Pending] = []

    def settle(pending: list[Pending]) -> None:
        for p in pending:
            records[p.part.name] = record = finish_part(p)
            print(f"[gpu_check] {p.part.name}: {record.status} in {record.seconds:.0f} s", file=sys.stderr)
        pending.clear()

    for part in parts:
        if part.timed:  # timings share the machine with nothing: background work ends first
            settle(background)
        left = budget - (time.perf_counter() - start)
        if left < 5:
            records[part.name] = Record(part.name, "skipped", note="the budget was spent")
            continue
        print(f"[gpu_check] {part.name} (up to {min(part.budget_s, left):.0f} s): {part.what}", file=sys.stderr)
        started = start_part(part, left, out, env)
        if isinstance(started, Record):
            records[part.name] = started
        elif part.background:
            background.append(started)
        else:
            settle([started])
    settle(background)
    return records


def dry_run(parts: list[Part], args: Any) -> int:
    """Print (and with ``--json`` write) the plan: each part, its budget and command, and which preset
    variants the aot part would compile (or why it cannot)."""
    try:
        _, chosen, missing = aot_selection()
        aot_line = f"{len(chosen)} aot variants selected; {len(missing)} preset requests not enumerated by aot"
    except ModuleNotFoundError as err:
        aot_line = f"aot module missing ({err})"
    except Exception as err:  # noqa: BLE001 - the aot module is being written concurrently: report, go on
        aot_line = f"aot selection failed: {type(err).__name__}: {err}"
    rows = []
    for p in parts:
        command = " ".join(p.command) if p.command else f"python -m {MODULE} --part {p.name} (in a subprocess)"
        rows.append(
            {
                "name": p.name,
                "what": p.what,
                "budget_s": p.budget_s,
                "command": command,
                "fallbacks": [" ".join(c) for c, _, _ in p.fallbacks],
            }
        )
    print(f"gpu_check plan (budget {args.budget:.0f} s; each part in its own subprocess):")
    for row in rows:
        print(f"- {row['name']} (up to {row['budget_s']} s): {row['what']}\n    {row['command']}")
        for alt in row["fallbacks"]:
            print(f"    if time is short: {alt}")
    print(f"- aot: {aot_line}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"benchmark": "gpu_check", "dry_run": True, "budget_s": args.budget, "parts": rows, "aot": aot_line},
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
