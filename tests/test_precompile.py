"""All or nothing on a GPU too: every kernel variant a step can launch is compiled before the step changes
anything.

On the CPU the kernels run under Triton's interpreter, which compiles nothing, so a compile failure is forced
through ``precompile._compile`` (what the optimizer calls, through ``engine.resolve``, to compile a variant on a
GPU). What these tests hold on any machine: the optimizer asks for every variant before its first launch of
the step, every launch is one of those variants, and a variant that fails leaves the step either raised with
nothing changed (``engine="triton"``) or run on the reference for the matrices that need it (``"auto"``).
"""

from __future__ import annotations

import contextlib
import importlib.util

import pytest
import torch
from conftest import assert_unchanged, snapshot
from torch import nn

from subspace_optim import SubspaceAdamW, engine

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

# A right (12 x 8) and a left (8 x 20) projection, a batch of two same-shape matrices, and a plain vector.
SHAPES = [(12, 8), (8, 20), (12, 8)]
OPTIONS = [
    {},
    {"residual": "fira", "moments_dtype": "int8"},
    {"residual": "apollo", "basis_dtype": "bfloat16", "moments_dtype": "bfloat16", "refresh": "rsvd"},
]


@pytest.fixture
def fresh(monkeypatch):
    """No variant compiled or warned about yet in this process, and the probe already run (it launches its own
    kernels), so each test sees its own compiles; both restored afterwards."""
    from subspace_optim.kernels import precompile

    engine._passes_probe(torch.device("cpu"), "auto")
    monkeypatch.setattr(precompile, "_READY", {})
    monkeypatch.setattr(engine, "_WARNED", set())
    return precompile


def _model(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(*s, generator=gen).to(dtype)) for s in SHAPES]
    return params + [nn.Parameter(torch.randn(8, generator=gen).to(dtype))]


def _optimizer(params, engine_: str, **options) -> SubspaceAdamW:
    groups = [{"params": params[:3], "rank": 2, "update_gap": 3, **options}, {"params": params[3:]}]
    return SubspaceAdamW(groups, lr=1e-2, weight_decay=0.1, engine=engine_)


def _grads(params, step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


@contextlib.contextmanager
def _events(precompile):
    """Records, in order, ("compile", variant) for every compile the optimizer asks for and ("launch", variant)
    for every kernel launch (the kernels still run)."""
    events: list[tuple[str, object]] = []
    compile_ = precompile._compile

    def compiled(device, v):
        events.append(("compile", v))
        return compile_(device, v)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(precompile, "_compile", compiled)
        for name in precompile.KERNEL_MODULES:
            kernel = precompile.jitted(name)

            def run(*args, grid, warmup, _run=kernel.run, _name=name, **kwargs):
                events.append(("launch", precompile.Variant.of(_name, kwargs)))
                return _run(*args, grid=grid, warmup=warmup, **kwargs)

            patch.setattr(kernel, "run", run)
        yield events


@pytest.mark.parametrize("options", OPTIONS, ids=["default", "fira-int8", "apollo-bf16-rsvd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_variant_a_step_launches_is_compiled_before_its_first_launch(fresh, options, dtype):
    """A first step (which refreshes every basis on the kernels) and regular ones: the optimizer compiles every
    variant before the first launch of the step, and launches nothing else. The first regular step may add the
    finiteness kernel's variants (``kernels.flags``, used from the next step on); later steps compile nothing."""
    params = _model(dtype)
    opt = _optimizer(params, "triton", **options)
    for step in range(3):
        _grads(params, step)
        with _events(fresh) as events:
            opt.step()
        kinds = [kind for kind, _ in events]
        launched = {v for kind, v in events if kind == "launch"}
        assert "launch" in kinds
        assert "compile" not in kinds[kinds.index("launch") :]  # no compile after the first launch
        assert all(fresh.ready(torch.device("cpu"), v) for v in launched)
        if step == 0:  # the refresh's products ran on the kernels too, and were compiled first
            assert {v.kernel for v in launched} >= {"project_adam_kernel", "back_update_kernel", "batched_gemm_kernel"}
            assert launched <= {v for kind, v in events if kind == "compile"}
        elif step == 1:  # the finiteness kernel's variants at most
            assert {v.kernel for kind, v in events if kind == "compile"} <= {"nonfinite_kernel"}
        else:  # compiled once: a regular step asks for nothing new, and its flags come from the kernel
            assert "compile" not in kinds
            assert "nonfinite_kernel" in {v.kernel for v in launched}


def _fail(precompile, monkeypatch, when):
    """Make ``precompile._compile`` raise for the variants ``when`` selects; returns the list of their tries."""
    tried = []
    compile_ = precompile._compile

    def compiled(device, v):
        if when(v):
            tried.append(v)
            raise RuntimeError("out of resource: shared memory, Required: 262144, Hardware limit: 232448")
        return compile_(device, v)

    monkeypatch.setattr(precompile, "_compile", compiled)
    return tried


def _is_back_update(v) -> bool:
    return v.kernel == "back_update_kernel"


@pytest.mark.parametrize("first", [True, False], ids=["first-step", "regular-step"])
def test_engine_triton_raises_before_anything_moves_when_a_variant_fails(fresh, monkeypatch, first):
    """The failing variant is the back-projection, the step's last launch: without compiling first, the
    projection launches (moments) and earlier batches would already have run. The step raises, naming the
    parameters and the kernel, and the weights and every state entry are unchanged."""
    params = _model()
    opt = _optimizer(params, "triton", residual="fira")
    if not first:
        _grads(params, 0)
        opt.step()
        monkeypatch.setattr(fresh, "_READY", {})  # as if a new variant were needed now
    _grads(params, 1)
    _fail(fresh, monkeypatch, _is_back_update)
    snap = snapshot(opt, params)
    with _events(fresh) as events, pytest.raises(RuntimeError, match="back_update_kernel") as err:
        opt.step()
    assert "nothing was changed" in str(err.value) and "params[0]" in str(err.value)
    assert not [kind for kind, _ in events if kind == "launch"]
    assert_unchanged(opt, params, snap)


def test_engine_auto_falls_back_to_the_reference_for_the_matrices_that_need_a_failed_variant(fresh, monkeypatch):
    """``engine="auto"`` (made to consider CPU tensors): the left-projected matrix's projection variant fails,
    so it steps on the reference, bit for bit as an optimizer with ``engine="reference"``; the right-projected
    pair still takes the kernels. One warning, and the failed compile is not retried at the next step."""
    monkeypatch.setattr(engine, "AUTO_DEVICES", ("cuda", "cpu"))
    params, ref_params = _model(), _model()
    opt = _optimizer(params, "auto", refresh="svd")
    ref = _optimizer(ref_params, "reference", refresh="svd")
    tried = _fail(fresh, monkeypatch, lambda v: v.kernel == "project_adam_kernel" and dict(v.config)["SQ_OF_B"])
    for step in range(3):
        for ps in (params, ref_params):
            _grads(ps, step)
        with (
            _events(fresh) as events,
            pytest.warns(UserWarning, match="did not compile") if step == 0 else (contextlib.nullcontext()),
        ):
            opt.step()
        ref.step()
        launched = [v for kind, v in events if kind == "launch"]
        assert launched and not any(dict(v.config).get("SQ_OF_B") for v in launched)  # only the right pair
        assert torch.equal(params[1], ref_params[1])  # the left matrix: the reference's numbers
        assert torch.equal(params[3], ref_params[3])  # plain AdamW, untouched by the choice
        torch.testing.assert_close(params[0], ref_params[0], rtol=0, atol=1e-5)  # the kernels: fp32 rounding
    assert len(tried) == 1


def test_ensure_reports_each_failure_once_per_device(fresh, monkeypatch):
    """``ensure`` returns the failures (and compiles the rest), remembering a failure instead of retrying it."""
    v_ok = fresh.Variant("gaussian_kernel", (("BLOCK", 1024),))
    v_bad = fresh.Variant("gaussian_kernel", (("BLOCK", 2048),))
    tried = _fail(fresh, monkeypatch, lambda v: v == v_bad)
    cpu = torch.device("cpu")
    for _ in range(2):
        failed = fresh.ensure(cpu, [v_ok, v_bad])
        assert list(failed) == [v_bad] and "out of resource" in failed[v_bad]
    assert tried == [v_bad]
    assert fresh.ready(cpu, v_ok) and not fresh.ready(cpu, v_bad)
