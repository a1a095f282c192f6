"""Every kernel variant the launchers can choose compiles for a real GPU (sm_90), without a GPU.

The interpreter, which runs the other kernel tests, follows Python and cannot see what only Triton's code
generator and ptxas see: a type error in one constexpr branch (8-bit moments with a residual once failed
to compile on every GPU), or register spills. ``subspace_optim.kernels.aot`` compiles through the real
pipeline (ptxas ships in the Triton wheel); the full sweep over both targets is one command
(``python -m subspace_optim.kernels.aot --targets 80,90``), and here one representative of every
combination class is compiled for sm_90.
"""

from __future__ import annotations

import subprocess
import time

import pytest
import torch

from subspace_optim import quant
from subspace_optim.kernels import aot, precompile


def _ptxas_or_skip() -> None:
    """Skip unless Triton's NVIDIA backend and its ptxas can run here."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except Exception as err:  # noqa: BLE001 - any import problem means no NVIDIA backend
        pytest.skip(f"triton's NVIDIA backend is unavailable: {err}")
    try:
        subprocess.run([get_ptxas(90).path, "--version"], check=True, capture_output=True, timeout=60)
    except Exception as err:  # noqa: BLE001 - missing, not executable, wrong platform
        pytest.skip(f"ptxas is unavailable: {err}")


def test_representatives_cover_every_class_and_the_full_sweep_every_launch_choice():
    """The representative set has one variant per combination class of the full sweep; the full sweep has
    every distinct launch configuration (8-bit tiles included), each once."""
    every = aot.variants()
    reps = aot.variants(representatives=True)
    assert {v.klass for v in reps} == {v.klass for v in every}
    assert len({v.klass for v in reps}) == len(reps)
    assert {v.kernel for v in every} == set(precompile.KERNEL_MODULES)
    assert len({v.compiled for v in every}) == len(every)
    # Every 8-bit tile width a moment can need: 16 ... 256 columns.
    bns = {dict(v.config)["BN"] for v in every if v.kernel == "project_adam_kernel" and dict(v.config)["M_KIND"] == 2}
    assert bns == {16, 32, 64, 128, quant.BLOCK}
    from subspace_optim.kernels import _common

    assert aot.MOMENT_KINDS == {"float32": _common.MOMENT_FP32, "bfloat16": _common.MOMENT_BF16, "int8": 2}
    assert aot.MOMENT_INT8 == _common.MOMENT_INT8
    # The bug's class is in the representative set: a left basis, 8-bit moments (BM != BN), a residual.
    assert any(
        dict(v.config)["SQ_OF_B"] and dict(v.config)["RESID"] and dict(v.config)["BM"] != dict(v.config)["BN"]
        for v in reps
        if v.kernel == "project_adam_kernel"
    )


def test_every_combination_class_compiles_for_sm90_within_the_spill_limits():
    """One variant of every class compiles for sm_90 (0 failures), and on the default paths none spills
    more than ``aot.SPILL_LIMIT`` bytes or is allocated at 32 registers. Runs under the suite's
    TRITON_INTERPRET=1: the compile workers turn the interpreter off themselves."""
    _ptxas_or_skip()
    reps = aot.variants(representatives=True)
    start = time.perf_counter()
    results = aot.sweep(reps, [90], jobs=2)
    elapsed = time.perf_counter() - start
    failures = [f"{r.variant.kernel} ({r.variant.label}): {r.error}" for r in results if r.error]
    assert not failures, "\n".join(failures)
    broken = [f"{r.variant.kernel} ({r.variant.label}): {'; '.join(r.violations)}" for r in results if r.violations]
    assert not broken, "\n".join(broken)
    assert all(r.registers > 0 for r in results)  # ptxas's report was read
    print(f"{len(results)} sm_90 compiles in {elapsed:.0f} s")


def _capture(monkeypatch, kernel) -> list[dict]:
    """Record every launch of ``kernel`` (arguments by name) instead of running it."""
    calls: list[dict] = []

    def run(*args, grid, warmup, **kwargs):
        calls.append({**dict(zip(kernel.arg_names, args, strict=False)), **kwargs})

    monkeypatch.setattr(kernel, "run", run)
    return calls


def _check_against(call: dict, kernel: str, config: dict, wanted: tuple) -> None:
    """A captured launch passes exactly the config function's constexprs and options (so it is the variant
    ``precompile`` compiles first, one of ``wanted``), pointers of the element types ``precompile`` gives
    them, and plain ints for exactly the kernel's unspecialized integer arguments."""
    from subspace_optim.kernels import precompile

    assert {k: call[k] for k in config} == config
    assert precompile.Variant.of(kernel, config) in wanted
    ints = {name for name, value in call.items() if name not in config and not isinstance(value, torch.Tensor)}
    floats = set(precompile.FLOAT_ARGUMENTS) & ints
    assert all(type(call[name]) is float for name in floats)
    assert ints - floats == set(precompile.INT_ARGUMENTS[kernel])
    for name, value in call.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == precompile.POINTER_DTYPES.get(name, torch.int64), name


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("moments", ["float32", "int8"])
@pytest.mark.parametrize("residual", ["none", "fira"])
def test_step_launches_are_the_variants_precompile_names(monkeypatch, side, moments, residual):
    """A real (not executed) launch of the step passes ``project_config`` / ``back_config``'s constexprs, which
    ``precompile.variants_for`` names for that matrix, and its runtime arguments are the declared kinds."""
    from subspace_optim.kernels import precompile
    from subspace_optim.kernels import step as ks

    projected, back = _capture(monkeypatch, ks.project_adam_kernel), _capture(monkeypatch, ks.back_update_kernel)
    m, n, r = (40, 300, 8) if side == "left" else (300, 40, 8)
    shape = (r, n) if side == "left" else (m, r)
    w, g = torch.randn(m, n), torch.randn(m, n)
    p = torch.randn(m if side == "left" else n, r).to(torch.bfloat16)
    st = {**quant.zeros(shape, moments, "cpu", "exp_avg"), **quant.zeros(shape, moments, "cpu", "exp_avg_sq")}
    ks.subspace_adamw(
        [w],
        [g],
        [p],
        [quant.moment(st, "exp_avg")],
        [quant.moment(st, "exp_avg_sq")],
        [1],
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        scale=1.0,
        sides=[side],
        matmul_precision="ieee",
        residual=residual,
        update_norms=[torch.zeros(())],
    )
    assert len(projected) == 1 and len(back) == 1
    wanted = precompile.variants_for(
        side, w.dtype, g.dtype, "bfloat16", moments, residual, "ieee", shape[1], False, True
    )
    kind = precompile.MOMENT_KINDS[moments]
    cfg = ks.project_config(side, w.dtype, p.dtype, kind, kind, residual != "none", "ieee", shape[1])
    _check_against(projected[0], "project_adam_kernel", cfg, wanted)
    cfg = ks.back_config(side, w.dtype, g.dtype, p.dtype, residual, "ieee")
    _check_against(back[0], "back_update_kernel", cfg, wanted)


@pytest.mark.parametrize("a_cm", [False, True])
@pytest.mark.parametrize("b", ["row", "col", "gauss"])
def test_refresh_launches_are_the_variants_precompile_names(monkeypatch, a_cm, b):
    """The same for the refresh's GEMM, with row- and column-major operands and the in-kernel Gaussian:
    the layout is runtime arguments only, never another variant."""
    from subspace_optim.kernels import gemm, precompile
    from subspace_optim.kernels import refresh as kr

    calls = _capture(monkeypatch, gemm.batched_gemm_kernel)
    m, n, r = 48, 37, 5
    a = torch.randn(n, m).mT if a_cm else torch.randn(m, n)
    bt = None if b == "gauss" else (torch.randn(r, n).mT if b == "col" else torch.randn(n, r))
    out = torch.empty(1, m, r)
    seeds = torch.zeros(1, dtype=torch.int64) if bt is None else None
    kr.bmm(kr.Mat.of([a]), None if bt is None else kr.Mat.of([bt]), out, seeds=seeds)
    cfg = kr.gemm_config(a.dtype, None if bt is None else bt.dtype, False, "ieee")
    wanted = precompile.variants_for("left", a.dtype, a.dtype, "float32", "float32", "none", "ieee", r, True, True)
    _check_against(calls[0], "batched_gemm_kernel", cfg, wanted)


def test_the_sweep_holds_every_variant_a_step_can_compile_on_a_gpu():
    """Whatever the options and shapes, the variants the optimizer compiles before a step on a GPU
    (``precompile.variants_for``, GPU tiles) are all in the full sweep: the sweep's statistics cover them."""
    import itertools

    from subspace_optim import engine, options, residual_rule

    swept = {v.compiled for v in aot.variants()}
    for side, w, basis, moments, residual, choice, cols, refresh, regenerated, stochastic in itertools.product(
        ("left", "right"),
        engine.KERNEL_DTYPES,
        quant.BASIS_DTYPES,
        quant.MOMENT_DTYPES,
        residual_rule.RESIDUALS,
        options.MATMUL_PRECISIONS,
        (5, 40, 256, 300, 4096),
        (False, True),
        (None, "signs", "dct"),
        (False, True),
    ):
        precision = engine.matmul_precision(choice, w)
        wanted = precompile.variants_for(
            side, w, w, basis, moments, residual, precision, cols, refresh, False, regenerated, stochastic
        )
        assert set(wanted) <= swept, (side, w, basis, moments, residual, precision, cols, regenerated, stochastic)


_SAME_BINDING = r"""
import json, sys
import torch
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import make_backend
from triton.runtime.jit import MockTensor, create_function_from_signature
from subspace_optim import quant
from subspace_optim.kernels import precompile, step as ks

backend = make_backend(GPUTarget("cuda", 90, 32))
calls = {}
for name in ("project_adam_kernel", "back_update_kernel"):
    kernel = precompile.jitted(name)
    kernel.run = lambda *a, grid, warmup, _n=name, _k=kernel, **kw: calls.setdefault(_n, (a, kw))

def bind(kernel, *args, **kwargs):
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs.update(debug=False, instrumentation_mode="", fpsan_homomorphic_casts=False)
    _, specialization, options = binder(*args, **kwargs)
    return [str(s) for s in specialization], str(options)

out = []
side, moments, residual = sys.argv[1], sys.argv[2], sys.argv[3]
m, n, r = (40, 300, 8) if side == "left" else (301, 40, 7)
shape = (r, n) if side == "left" else (m, r)
st = {**quant.zeros(shape, moments, "cpu", "exp_avg"), **quant.zeros(shape, moments, "cpu", "exp_avg_sq")}
w, g = torch.randn(m, n).to(torch.bfloat16), torch.randn(m, n).to(torch.bfloat16)
basis = torch.randn((m if side == "left" else n) + 1, r)[1:]  # an offset view: its address may be unaligned
ks.subspace_adamw([w], [g], [basis], [quant.moment(st, "exp_avg")], [quant.moment(st, "exp_avg_sq")], [1], lr=1e-3,
                  betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, scale=1.0, sides=[side], matmul_precision="tf32",
                  residual=residual, update_norms=[torch.zeros(())])
wanted = precompile.variants_for(side, w.dtype, g.dtype, "float32", moments, residual, "tf32", shape[1], False, False)
for v in wanted:
    kernel = precompile.jitted(v.kernel)
    args, kwargs = calls[v.kernel]
    launch = bind(kernel, *args, **kwargs)
    warm = bind(kernel, **precompile.arguments(kernel, v, MockTensor))
    out.append({"kernel": v.kernel, "same": launch == warm, "launch": launch, "warm": warm})
print(json.dumps(out))
"""


@pytest.mark.parametrize(
    ("side", "moments", "residual"),
    [("left", "float32", "none"), ("right", "int8", "fira"), ("left", "int8", "apollo")],
)
def test_a_warm_up_binds_exactly_what_a_launch_binds(side, moments, residual):
    """``precompile._compile`` warms a variant up with mock pointers and sample ints; Triton's own binder (as a
    GPU launch runs it, for sm_90, interpreter off) must give the warm-up and a real launch of that matrix the
    same specialization and options, so the launch finds the warmed-up kernel and compiles nothing. The launch
    uses ragged sizes, strides of 1 and odd addresses, which Triton would have specialized on."""
    _ptxas_or_skip()
    import json
    import os
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run(
        [sys.executable, "-c", _SAME_BINDING, side, moments, residual],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert {r["kernel"] for r in results} == {"project_adam_kernel", "back_update_kernel"}
    for r in results:
        assert r["same"], (r["kernel"], r["launch"], r["warm"])
