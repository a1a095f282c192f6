"""Ahead-of-time compile sweep: every kernel variant the launchers can choose, compiled for sm_80 and sm_90.

No GPU is needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` runs Triton's
whole pipeline and the ptxas that ships in the Triton wheel. The interpreter, which runs the CPU tests,
follows Python and misses what only the code generator checks (a return type mismatch made 8-bit moments
with a residual fail to compile on every GPU), and it says nothing about registers or spills.

The variants are not a hand list. The launch configuration lives in three functions,
``step.project_config``, ``step.back_config`` and ``refresh.gemm_config`` (plus ``refresh.gaussian_config``),
which the launchers call to get the constexprs and launch options they pass. This module calls the same
functions over the domain of their arguments, which comes from the option tables (``engine.KERNEL_DTYPES``,
``quant.KERNEL_BASIS``, ``quant.MOMENT_DTYPES``, ``residual_rule.RESIDUALS``, ``options.MATMUL_PRECISIONS`` resolved
by ``engine.matmul_precision``), and keeps each distinct result. Nothing else enters a compile: the kernels
leave their runtime arguments (sizes, strides, pointer tables) unspecialized (``precompile``), so a config is
one compiled variant whatever the shapes, and the same variants are what a step compiles before it launches
(``precompile.variants_for``).

Registers and spills come from ``ptxas -v``; shared memory from Triton's metadata. A "default path" is the
optimizer's precision for the weight dtype (``matmul_precision="auto"``: TF32 for bf16/fp16 weights, ieee
for fp32) and ieee for the refresh (``schedule`` always asks for it); there no variant may spill more than
``SPILL_LIMIT`` bytes or be allocated at 32 registers with spills (ptxas's pathological allocation for some
mixed-dtype ieee dots, with kilobytes of spills; a small kernel that needs only 32 registers is fine).

    python -m subspace_optim.kernels.aot --targets 80,90 [--representatives] [--markdown] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import multiprocessing
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .. import engine, options, quant, residual_rule
from . import precompile

# Nothing here imports Triton at module level: a compile worker imports this module first and must turn
# the interpreter off before the kernel modules (and triton.language's own jit functions) are decorated.

SPILL_LIMIT = 256  # bytes of spill stores allowed on a default path
SIDES = ("left", "right")
MOMENT_KINDS = precompile.MOMENT_KINDS
MOMENT_INT8 = MOMENT_KINDS["int8"]
# The basis dtypes a launch sees (an int8 basis reaches it as fp32: ``quant.KERNEL_BASIS``).
_KERNEL_BASES = tuple(name for name, dtype in quant.KERNEL_BASIS.items() if quant.TORCH_DTYPES.get(name) == dtype)
REFRESH_PRECISION = "ieee"  # what ``schedule`` passes to every refresh


@dataclass(frozen=True)
class Variant:
    """One compile of the sweep: a kernel and the constexprs/options its launcher passes, with what asked for it."""

    kernel: str
    label: str  # what the launcher was asked for (side, dtypes, storage, residual, precision)
    klass: str  # the combination class (see ``step_variants``); ``--representatives`` compiles one of each
    default: bool  # on a default path (see the module docstring)
    config: tuple[tuple[str, Any], ...]  # constexprs and launch options, tl dtypes as their names

    @property
    def compiled(self) -> precompile.Variant:
        """The runtime's name for this compile (``precompile.Variant``)."""
        return precompile.Variant(self.kernel, self.config)


@dataclass
class Result:
    """What compiling one variant for one target gave (``error`` None: it compiled)."""

    variant: Variant
    arch: int
    error: str | None = None
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    shared: int = 0
    seconds: float = 0.0
    violations: list[str] = field(default_factory=list)


def _dtype_name(dtype: torch.dtype | None) -> str:
    return {None: "gauss", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _dtype_class(dtype: torch.dtype | None) -> str:
    """bf16 and fp16 take the same code paths: one class ("16")."""
    return {None: "gauss", torch.float32: "fp32", torch.bfloat16: "16", torch.float16: "16"}[dtype]


def _precisions() -> list[str]:
    """Every precision a step can run at: the option's choices, "auto" resolved for every weight dtype."""
    out = {engine.matmul_precision(c, w) for c in options.MATMUL_PRECISIONS for w in engine.KERNEL_DTYPES}
    return sorted(out)


def _int8_columns() -> list[int]:
    """Moment widths that reach every distinct 8-bit tile (``step.projection_blocks`` turns them into BN):
    the powers of two up to twice the quantization block, widest first (the first width giving a config is
    the one compiled)."""
    return [2**i for i in reversed(range((2 * quant.BLOCK).bit_length()))]


def _variant(kernel: str, label: str, klass: str, default: bool, cfg: dict[str, Any]) -> Variant:
    return Variant(kernel, label, klass, default, precompile.Variant.of(kernel, cfg).config)


def step_variants() -> list[Variant]:
    """Both step launches for every side, weight / basis dtype, moment storage, residual and precision."""
    from . import step

    out: list[Variant] = []
    for side, wd, pname, prec in itertools.product(SIDES, engine.KERNEL_DTYPES, _KERNEL_BASES, _precisions()):
        pd = quant.KERNEL_BASIS[pname]
        default = prec == engine.matmul_precision("auto", wd)
        dts = f"{_dtype_name(wd)} weights, {_dtype_name(pd)} basis"
        # A class is a kernel's structural constexprs (side, storage, residual, precision) and, on a default
        # path only, the operand dtypes: off the default paths only compile failures count, and those are
        # structural (registers differ with the dtypes, and only the default paths have spill limits). The
        # 8-bit classes leave out the basis dtype: it only enters the GEMM's operand loads, which the other
        # storage classes cover with every mix, and 8-bit compiles are the slow ones (~4x the others).
        classes = f"{side} {_dtype_class(wd)}/{_dtype_class(pd)}" if default else f"{side} any-dtype"
        int8_classes = f"{side} {_dtype_class(wd)}/any" if default else f"{side} any-dtype"
        for mname, resid in itertools.product(quant.MOMENT_DTYPES, (False, True)):
            kind = MOMENT_KINDS[mname]
            for cols in _int8_columns() if kind == MOMENT_INT8 else [0]:
                cfg = step.project_config(side, wd, pd, kind, kind, resid, prec, cols, interpreted=False)
                tile, block = "", ""
                if kind == MOMENT_INT8:
                    tile, block = f" (BN {cfg['BN']})", "-256" if cfg["BN"] == quant.BLOCK else "-short"
                what = "residual" if resid else "no residual"
                label = f"{side}, {dts}, {mname} moments{tile}, {what}, {prec}"
                klass = f"project {int8_classes if block else classes} {mname}{block} {what} {prec}"
                out.append(_variant("project_adam_kernel", label, klass, default, cfg))
        for residual, stochastic in itertools.product(residual_rule.RESIDUALS, (False, True)):
            if stochastic and wd != torch.bfloat16:  # stochastic rounding rounds bf16 weights only
                continue
            cfg = step.back_config(side, wd, wd, pd, residual, prec, stochastic=stochastic, interpreted=False)
            mode = "apollo" if residual in residual_rule.WHOLE_GRADIENT else residual if residual == "none" else "fira"
            rounding = ", stochastic rounding" if stochastic else ""
            label = f"{side}, {dts}, residual {residual}{rounding}, {prec}"
            klass = f"back {classes} {mode}{' stochastic' if stochastic else ''} {prec}"
            out.append(_variant("back_update_kernel", label, klass, default, cfg))
    return _dedup(out)


def regenerated_variants() -> list[Variant]:
    """Both step launches with a basis regenerated in the tile (``operands``), as ``precompile.variants_for`` names
    them for ``refresh="seeded"`` (signs) and ``"dct"``: the GEMM sees an fp32 basis; every side, weight dtype,
    moment storage, residual and precision. The regeneration only changes how the basis operand's tiles are made,
    so a class is a side, a kind, 8-bit or float storage and whether a residual is summed (the first of each is on
    a default path); a back launch without a GEMM (apollo) reads no basis and is the stored one's variant."""
    from . import operands, step

    out: list[Variant] = []
    kinds = {"signs": operands.BASIS_SIGNS, "dct": operands.BASIS_DCT}
    for side, wd, prec, (kname, how) in itertools.product(SIDES, engine.KERNEL_DTYPES, _precisions(), kinds.items()):
        default = prec == engine.matmul_precision("auto", wd)
        where = f"{side}, {_dtype_name(wd)} weights, {kname} basis"
        for mname, resid in itertools.product(quant.MOMENT_DTYPES, (False, True)):
            kind = MOMENT_KINDS[mname]
            for cols in _int8_columns() if kind == MOMENT_INT8 else [0]:
                cfg = step.project_config(
                    side, wd, torch.float32, kind, kind, resid, prec, cols, basis=how, interpreted=False
                )
                what = "residual" if resid else "no residual"
                storage = "8-bit" if kind == MOMENT_INT8 else "float"
                label = f"{where}, {mname} moments (BN {cfg['BN']}), {what}, {prec}"
                out.append(
                    _variant("project_adam_kernel", label, f"project {side} {kname} {storage} {what}", default, cfg)
                )
        for residual in residual_rule.RESIDUALS:
            if residual in residual_rule.WHOLE_GRADIENT:
                continue
            for stochastic in (False, True) if wd == torch.bfloat16 else (False,):
                cfg = step.back_config(
                    side, wd, wd, torch.float32, residual, prec, basis=how, stochastic=stochastic, interpreted=False
                )
                mode = ("none" if residual == "none" else "fira") + (" stochastic" if stochastic else "")
                label = f"{where}, residual {residual}{', stochastic rounding' if stochastic else ''}, {prec}"
                out.append(_variant("back_update_kernel", label, f"back {side} {kname} {mode}", default, cfg))
    return _dedup(out)


def refresh_variants() -> list[Variant]:
    """The refresh's GEMM for every operand dtype it can see (a gradient: fp32/bf16/fp16, or an fp32
    intermediate), the in-kernel Gaussian or a loaded B, both precisions; the fp64 Gram; and the standalone
    Gaussian. (Row- or column-major operands are the same compile: strides are runtime arguments.)"""
    from . import refresh

    out: list[Variant] = []
    for prec, ad, bd in itertools.product(_precisions(), engine.KERNEL_DTYPES, (None, torch.float32)):
        cfg = refresh.gemm_config(ad, bd, False, prec, interpreted=False)
        label = f"A {_dtype_name(ad)}, B {_dtype_name(bd)}, {prec}"
        dtypes = (
            f"{_dtype_class(ad)}/{_dtype_class(bd)}"
            if prec == REFRESH_PRECISION
            else "any/" + ("gauss" if bd is None else "loaded")
        )
        out.append(_variant("batched_gemm_kernel", label, f"gemm {dtypes} {prec}", prec == REFRESH_PRECISION, cfg))
    cfg = refresh.gemm_config(torch.float32, torch.float32, True, REFRESH_PRECISION, interpreted=False)
    out.append(_variant("batched_gemm_kernel", "fp64 Gram Y^T Y", "gram", True, cfg))
    out.append(_variant("gaussian_kernel", "Gaussian", "gaussian", True, refresh.gaussian_config()))
    return _dedup(out)


def flags_variants() -> list[Variant]:
    """The finiteness kernel for every gradient dtype (``kernels.flags``)."""
    from . import flags

    return [
        _variant(
            "nonfinite_kernel", f"{_dtype_name(d)} gradients", f"flags {_dtype_class(d)}", True, flags.flags_config(d)
        )
        for d in engine.KERNEL_DTYPES
    ]


def variants(representatives: bool = False) -> list[Variant]:
    """The sweep: every variant, or (``representatives``) the first variant of each combination class."""
    every = step_variants() + regenerated_variants() + refresh_variants() + flags_variants()
    if not representatives:
        return every
    seen: set[str] = set()
    out = []
    for v in every:
        if v.klass not in seen:
            seen.add(v.klass)
            out.append(v)
    return out


def _dedup(vs: Iterable[Variant]) -> list[Variant]:
    """One variant per distinct compile (kernel, config), the first request's label. (Whether a compile is
    on a default path follows from its config: the precision, and the weight dtype it holds.)"""
    first: dict[tuple, Variant] = {}
    for v in vs:
        first.setdefault((v.kernel, v.config), v)
    return list(first.values())


# --- compiling ---------------------------------------------------------------------------------------------


def _jitted(name: str) -> Any:
    """The kernel's ``JITFunction``. Compiles run in worker processes that start with the interpreter off
    (``_worker_init``): under ``TRITON_INTERPRET=1`` ``@triton.jit`` makes interpreted functions instead,
    triton.language's own helpers (``tl.randn``, ``tl.sum``'s combine) included, which cannot compile."""
    from triton.runtime.jit import JITFunction

    kernel = precompile.jitted(name)
    if not isinstance(kernel, JITFunction):
        raise RuntimeError(f"{name} was imported under TRITON_INTERPRET=1: compile it through sweep()")
    return kernel


_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


def compile_variant(v: Variant, arch: int) -> Result:
    """Compile ``v`` for sm_``arch`` (no GPU needed) and read ptxas's register and spill report."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    result = Result(v, arch)
    start = time.perf_counter()
    try:
        jitted = _jitted(v.kernel)
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        kwargs = precompile.arguments(jitted, v.compiled, lambda dtype: torch.zeros(4, dtype=dtype))
        kwargs.update(
            debug=False,
            instrumentation_mode=triton.knobs.compilation.instrumentation_mode,
            fpsan_homomorphic_casts=triton.knobs.compilation.fpsan_homomorphic_casts,
        )  # as ``run`` adds
        # Exactly what a launch does: Triton's binder specializes the arguments, ``_pack_args`` turns that
        # into the signature, constants and divisibility attributes a launch would compile with.
        binder = create_function_from_signature(jitted.signature, jitted.params, backend)
        bound, specialization, opts = binder(**kwargs)
        parsed, signature, constexprs, attrs = jitted._pack_args(backend, opts, bound, specialization, opts)
        log = io.StringIO()
        with triton.knobs.compilation.scope(), triton.knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            triton.knobs.compilation.always_compile = True  # run ptxas even if cached: its -v report is the data
            triton.knobs.nvidia.dump_ptxas_log = True
            kernel = triton.compile(
                ASTSource(jitted, signature, constexprs, attrs), target=target, options=parsed.__dict__
            )
        text = log.getvalue()
        for name, pattern in _PTXAS.items():
            found = [int(x) for x in pattern.findall(text)]
            setattr(result, name, max(found) if found else 0)
        result.shared = int(kernel.metadata.shared)
    except Exception as err:  # noqa: BLE001 - a failed compile is a result of the sweep
        result.error = _describe(err)
    result.seconds = time.perf_counter() - start
    result.violations = violations(result)
    return result


def _describe(err: BaseException) -> str:
    """One line for a failed compile: the innermost cause (Triton nests a callee's error in its caller's),
    where it was raised (``at line:col``, the first line of each CompilationError) and its message."""
    chain = [err]
    while chain[-1].__cause__ is not None and len(chain) < 16:
        chain.append(chain[-1].__cause__)
    places = [str(e).splitlines()[0] for e in chain if type(e).__name__ == "CompilationError" and str(e)]
    root = chain[-1]
    detail = getattr(root, "error_message", None)  # a CompilationError's own cause, e.g. a TypeError
    text = repr(detail) if detail is not None else (str(root).strip().splitlines() or [""])[-1]
    return f"{type(root).__name__} {' / '.join(places)} {text}"[:500]


def _pathological(r: Result) -> bool:
    """ptxas's pathological allocation: 32 registers *and* spills (the mixed-dtype ieee projection once got 32
    registers and 9-12 KB of spill stores). A kernel that needs no more than 32, like the finiteness test, is
    not one."""
    return r.registers == 32 and r.spill_stores > 0


def violations(r: Result) -> list[str]:
    """Why a result breaks the sweep's rules: a compile failure anywhere; on a default path, more than
    ``SPILL_LIMIT`` bytes of spill stores or an allocation at 32 registers with spills (``_pathological``)."""
    if r.error:
        return ["compile failure"]
    out = []
    if r.variant.default and r.spill_stores > SPILL_LIMIT:
        out.append(f"{r.spill_stores} B of spill stores > {SPILL_LIMIT}")
    if r.variant.default and _pathological(r):
        out.append("allocated at 32 registers with spills")
    return out


def _worker_init(cache_dir: str) -> None:
    """A compile worker: the interpreter off before anything imports Triton (see ``_jitted``), a private
    cache, one thread."""
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    torch.set_num_threads(1)


def _compile_job(job: tuple[Variant, int]) -> Result:
    return compile_variant(*job)


def sweep(vs: Sequence[Variant], archs: Sequence[int], jobs: int = 1, progress: bool = False) -> list[Result]:
    """Compile every variant for every target in ``jobs`` spawned worker processes (each starts from a clean
    interpreter with ``TRITON_INTERPRET`` off, whatever this process runs under) and a private Triton cache
    that is removed afterwards. Results come back in order. Like any spawn pool, it needs a ``__main__``
    that can be re-imported: a module, a script or pytest, not ``python -`` reading stdin."""
    work = [(v, arch) for arch in archs for v in vs]
    results: list[Result] = []
    ctx = multiprocessing.get_context("spawn")
    with (
        tempfile.TemporaryDirectory(prefix="aot-cache-") as cache,
        ProcessPoolExecutor(max(1, jobs), mp_context=ctx, initializer=_worker_init, initargs=(cache,)) as pool,
    ):
        for i, result in enumerate(pool.map(_compile_job, work, chunksize=1)):
            results.append(result)
            _report(progress, i, len(work), result)
    return results


def _report(progress: bool, i: int, total: int, r: Result) -> None:
    if progress and (r.error or r.violations or (i + 1) % 50 == 0 or i + 1 == total):
        state = r.error or ", ".join(r.violations) or "ok"
        print(f"[{i + 1}/{total}] sm_{r.arch} {r.variant.kernel} {r.variant.label}: {state}", file=sys.stderr)


# --- reporting ---------------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    """Triton's version and the ptxas it runs per target (sm_90 and up use the wheel's newer ptxas)."""
    import triton
    from triton.backends.nvidia.compiler import get_ptxas_version

    out = {"triton": triton.__version__, "torch": torch.__version__}
    for arch in (80, 90):
        text = get_ptxas_version(arch)
        found = re.search(r"release ([\d.]+), (V[\d.]+)", text)
        out[f"ptxas sm_{arch}"] = " ".join(found.groups()) if found else text.strip().splitlines()[-1]
    return out


def summary(results: Sequence[Result]) -> list[dict[str, Any]]:
    """One row per (kernel, target, default path or not): counts, failures, register range, worst spills
    and shared memory."""
    rows: dict[tuple, dict[str, Any]] = {}
    for r in results:
        key = (r.variant.kernel, r.arch, r.variant.default)
        row = rows.setdefault(
            key,
            {
                "kernel": key[0],
                "arch": key[1],
                "default": key[2],
                "variants": 0,
                "failures": 0,
                "min_regs": None,
                "max_regs": 0,
                "max_spill_stores": 0,
                "spilling": 0,
                "over_limit": 0,
                "at_32_regs": 0,
                "max_shared": 0,
            },
        )
        row["variants"] += 1
        if r.error:
            row["failures"] += 1
            continue
        row["min_regs"] = r.registers if row["min_regs"] is None else min(row["min_regs"], r.registers)
        row["max_regs"] = max(row["max_regs"], r.registers)
        row["max_spill_stores"] = max(row["max_spill_stores"], r.spill_stores)
        row["spilling"] += r.spill_stores > 0
        row["over_limit"] += r.spill_stores > SPILL_LIMIT
        row["at_32_regs"] += _pathological(r)
        row["max_shared"] = max(row["max_shared"], r.shared)
    return [rows[k] for k in sorted(rows, key=lambda k: (k[0], k[1], not k[2]))]


def markdown(results: Sequence[Result], command: str, seconds: float) -> str:
    """The sweep's summary table (for docs/kernels.md), with versions, the command, and any failures or
    default-path violations listed."""
    v = versions()
    lines = [
        f"`{command}`: {len({r.variant for r in results})} variants x {len({r.arch for r in results})} targets, "
        f"{sum(r.error is not None for r in results)} failures, {seconds / 60:.1f} min on "
        f"{os.cpu_count()} CPU cores. " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
        "| kernel | target | path | variants | failures | registers (min-max) | max spill stores (B) | "
        f"spilling | > {SPILL_LIMIT} B | 32 regs + spills | max shared (B) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary(results):
        regs = "-" if row["min_regs"] is None else f"{row['min_regs']}-{row['max_regs']}"
        lines.append(
            f"| {row['kernel']} | sm_{row['arch']} | {'default' if row['default'] else 'other'} | "
            f"{row['variants']} | {row['failures']} | {regs} | {row['max_spill_stores']} | {row['spilling']} | "
            f"{row['over_limit']} | {row['at_32_regs']} | {row['max_shared']} |"
        )
    bad = [r for r in results if r.violations]
    if bad:
        lines += ["", "Violations:", ""]
        lines += [
            f"- sm_{r.arch} {r.variant.kernel} ({r.variant.label}): {'; '.join(r.violations)}"
            + (f" - {r.error}" if r.error else "")
            for r in bad
        ]
    return "\n".join(lines) + "\n"


def _as_json(r: Result) -> dict[str, Any]:
    out = asdict(r)
    out["variant"] = {**asdict(r.variant), "config": dict(r.variant.config)}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: exit status 1 when anything failed to compile or a default path broke a limit."""
    parser = argparse.ArgumentParser(prog="python -m subspace_optim.kernels.aot", description=__doc__.split("\n")[0])
    parser.add_argument("--targets", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    parser.add_argument("--representatives", action="store_true", help="one variant of each combination class")
    parser.add_argument("--markdown", nargs="?", const="-", help="write the summary table here (default stdout)")
    parser.add_argument("--json", help="write every result here")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    parser.add_argument("--kernel", action="append", help="only these kernels (repeatable)")
    parser.add_argument("--default-only", action="store_true", help="only the default paths")
    args = parser.parse_args(argv)
    archs = [int(a) for a in args.targets.split(",") if a.strip()]
    vs = variants(args.representatives)
    vs = [v for v in vs if (not args.kernel or v.kernel in args.kernel) and (v.default or not args.default_only)]
    command = "python -m subspace_optim.kernels.aot " + " ".join(argv if argv is not None else sys.argv[1:])
    start = time.perf_counter()
    results = sweep(vs, archs, jobs=args.jobs, progress=True)
    seconds = time.perf_counter() - start
    table = markdown(results, command.strip(), seconds)
    if args.markdown in (None, "-"):
        print(table)
    else:
        with open(args.markdown, "w") as f:
            f.write(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"versions": versions(), "seconds": seconds, "results": [_as_json(r) for r in results]}, f)
    return 1 if any(r.violations for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
