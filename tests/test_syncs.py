"""A regular step with ``nonfinite="skip"`` reads nothing back from the device.

On a GPU every read of a device value on the host (``Tensor.item``, ``tolist``, ``bool``/``float``/``int`` of a
tensor, a Python ``if`` on one) waits for everything queued before it: the pipeline stalls. These tests run on
the CPU, where no read waits, so they make every such read raise instead (``_host_reads_raise``) while regular
steps run, on both engines. Reads inside PyTorch's C++ (a blocking host-to-device copy, ``nonzero``) are not
Python calls and cannot be caught here; ``test_cuda_regular_step_never_synchronizes`` catches those with
``torch.cuda.set_sync_debug_mode`` when a GPU is present.

What the device decides instead: a matrix whose gradient is not finite is left untouched bit for bit by its own
update (``functional.subspace_adamw``'s ``skipped`` flags), its step count is settled at the next read, and the
steps it takes before that use its true age (``lags``).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os

import pytest
import torch
from torch import nn

from subspace_optim import SubspaceAdamW, functional

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

NO_TRITON = importlib.util.find_spec("triton") is None
ENGINES = ["reference", pytest.param("triton", marks=pytest.mark.skipif(NO_TRITON, reason="triton is not installed"))]
# Every host read of a tensor's value that Python code can make.
READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")
OPTIONS = [
    {},
    {"residual": "fira"},
    {"residual": "apollo", "proj_type": "reverse_std"},
    {"moments_dtype": "int8", "basis_dtype": "bfloat16"},
]
SHAPES = [(12, 8), (8, 20), (12, 8)]  # a right and a left projection; two matrices share a batch


@contextlib.contextmanager
def _host_reads_raise():
    """Every Python-level read of a tensor's value raises while the block runs."""

    def refuse(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"Tensor.{name} during a regular step: a device-to-host read (a sync on a GPU)")

        return read

    with pytest.MonkeyPatch.context() as patch:
        for name in READS:
            patch.setattr(torch.Tensor, name, refuse(name))
        yield


@contextlib.contextmanager
def _counted_launches():
    """Counts the step kernels' launches (yields the list of their grids); the kernels still run. Under
    ``TRITON_INTERPRET=1`` they run in Triton's interpreter, which reads CPU tensors through their data
    pointers, never through the methods ``_host_reads_raise`` patches: the whole Triton engine, launches
    included, runs under the check, so no launch needs to be stubbed."""
    from subspace_optim.kernels import step as ks

    launches = []
    with pytest.MonkeyPatch.context() as patch:
        for kernel in (ks.project_adam_kernel, ks.back_update_kernel):

            def counted(*args, grid, _run=kernel.run, **kwargs):
                launches.append(grid)
                return _run(*args, grid=grid, **kwargs)

            patch.setattr(kernel, "run", counted)
        yield launches


def _matrices(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(shape, generator=gen).to(dtype)) for shape in SHAPES]


def _optimizer(params, engine: str, gap: int = 10, plain=(), **options) -> SubspaceAdamW:
    groups = [{"params": params, "rank": 3, "update_gap": gap, "engine": engine, **options}]
    if plain:
        groups.append({"params": list(plain)})
    return SubspaceAdamW(groups, lr=1e-2, weight_decay=0.1, nonfinite="skip")


def _gradients(params, steps: int, seed: int = 1, nan: dict[int, int] | None = None) -> list[list[torch.Tensor]]:
    """Per step, one gradient per parameter, made before any check runs; ``nan``: step -> parameter index."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        grads = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]
        if nan and step in nan:
            grads[nan[step]][1, 2] = float("nan")
        out.append(grads)
    return out


def _step(opt, params, grads) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    opt.step()


def _snapshot(opt, p) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()}


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("engine", ENGINES)
def test_regular_steps_read_nothing_from_the_device(engine, options):
    """After the first (refreshing) step, regular steps, one with a NaN gradient, make no host read; the skip
    is then counted, and the skipped matrix's count settled, when the metrics or a checkpoint ask for them."""
    params = _matrices()
    opt = _optimizer(params, engine, **options)
    grads = _gradients(params, 5, nan={2: 0})
    _step(opt, params, grads[0])
    counted = _counted_launches() if engine == "triton" else contextlib.nullcontext([])
    with counted as launches, _host_reads_raise():
        for g in grads[1:]:
            _step(opt, params, g)
    if engine == "triton":
        assert len(launches) == 4 * 2 * 2  # 4 steps, 2 batches (2 shapes), 2 launches each
    assert opt.subspace_metrics()["overall"]["nonfinite_skips"] == 1
    steps = [entry["step"] for entry in opt.state_dict()["state"].values()]
    assert steps == [4, 5, 5]
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("engine", ENGINES)
def test_layerwise_updates_read_nothing_from_the_device(engine):
    """``update_in_backward``: each matrix's regular update inside backward reads nothing either."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12, bias=False), nn.Tanh(), nn.Linear(12, 20, bias=False))
    params = list(model.parameters())
    opt = _optimizer(params, engine)
    opt.update_in_backward(model)
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(4, 8, generator=gen), torch.randn(4, 20, generator=gen)) for _ in range(3)]
    (model(batches[0][0]) - batches[0][1]).square().mean().backward()  # the first step refreshes
    with _host_reads_raise():
        for x, y in batches[1:]:
            (model(x) - y).square().mean().backward()
    assert [entry["step"] for entry in opt.state_dict()["state"].values()] == [3, 3]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_on_a_regular_step_leaves_that_matrix_untouched(engine, options, bad, monkeypatch):
    """Decided on the device (no host read happens: ``_read`` is not called), the matrix with the bad gradient
    keeps its weight and every state tensor bit for bit, its NaN/Inf reaches nothing, and the others step."""
    params = _matrices()
    opt = _optimizer(params, engine, **options)
    grads = _gradients(params, 3)
    for g in grads[:2]:
        _step(opt, params, g)
    before = [p.detach().clone() for p in params]
    state = _snapshot(opt, params[0])
    grads[2][0][3, 1] = bad
    reads = []
    monkeypatch.setattr(SubspaceAdamW, "_read", lambda self, flags=None: reads.append(flags) or [])
    _step(opt, params, grads[2])
    monkeypatch.undo()
    assert reads == []
    assert torch.equal(params[0], before[0])
    now = opt.state[params[0]]  # reading the state settles the counts the device held: the step did not count
    assert now.keys() == state.keys()
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(now[key], value) and now[key].dtype == value.dtype, key
        else:
            assert now[key] == value, key
    for p, b in zip(params[1:], before[1:], strict=True):
        assert not torch.equal(p, b) and torch.isfinite(p).all()
    assert opt.state_dict()["state"][0]["step"] == state["step"]
    assert opt.subspace_metrics()["overall"]["nonfinite_skips"] == 1


@pytest.mark.parametrize("engine", ENGINES)
def test_a_step_skipped_on_the_device_does_not_age_the_matrix(engine):
    """Until the host reads the flags, a skipped matrix's count runs ahead; its next steps must still use its
    true age in the bias corrections. It then follows, within rounding, an optimizer that never stepped it."""
    params, twins = _matrices(), _matrices()
    opt, twin = _optimizer(params, engine), _optimizer(twins, engine)
    grads = _gradients(params, 6, nan={1: 0})
    for i, g in enumerate(grads):
        _step(opt, params, g)
        _step(twin, twins, [None, *[t.clone() for t in g[1:]]] if i == 1 else [t.clone() for t in g])
    for p, q in zip(params, twins, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert opt.state_dict()["state"][0]["step"] == twin.state_dict()["state"][0]["step"] == 5
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(opt.state[params[0]][key], twin.state[twins[0]][key], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("engine", ENGINES)
def test_finite_steps_are_bit_identical_whether_or_not_the_flags_were_read(engine, monkeypatch):
    """The device-decided path changes no bit for finite gradients: the same steps with the flags read on the
    host every step (the path a refresh or ``nonfinite="raise"`` takes) give the same weights and state."""
    params, twins = _matrices(), _matrices()
    opt = _optimizer(params, engine, gap=3, residual="fira")
    twin = _optimizer(twins, engine, gap=3, residual="fira")
    monkeypatch.setattr(twin, "_must_read", lambda work, plan=None: True)
    for g in _gradients(params, 7):
        _step(opt, params, g)
        _step(twin, twins, [t.clone() for t in g])
    for p, q in zip(params, twins, strict=True):
        assert torch.equal(p, q)
    mine, theirs = opt.state_dict()["state"], twin.state_dict()["state"]
    for pid, entry in mine.items():
        for key, value in entry.items():
            other = theirs[pid][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, (pid, key)


def test_plain_parameters_read_once_after_the_projected_updates(monkeypatch):
    """torch's AdamW keeps a plain parameter's step count on the host, so a step with plain parameters reads
    the flags once, after every projected update is queued; a step without them reads nothing, and a
    refresh step reads once, before anything moves."""
    params, bias = _matrices(), nn.Parameter(torch.randn(5))
    opt = _optimizer(params, "reference", gap=3, plain=[bias])
    order = []
    original_read, original_core = SubspaceAdamW._read, functional.subspace_adamw
    monkeypatch.setattr(
        SubspaceAdamW, "_read", lambda self, flags=None: order.append("read") or original_read(self, flags)
    )
    monkeypatch.setattr(
        "subspace_optim.functional.subspace_adamw", lambda *a, **k: order.append("core") or original_core(*a, **k)
    )
    gen = torch.Generator().manual_seed(3)
    expected = [["read", "core"], ["core", "read"], ["core", "read"], ["read", "core"]]  # step 3 refreshes
    for i, want in enumerate(expected):
        for p in (*params, bias):
            p.grad = torch.randn(p.shape, generator=gen)
        if i == 1:
            bias.grad[0] = float("nan")
        order.clear()
        opt.step()
        assert order == want
    assert opt.subspace_metrics()["overall"]["nonfinite_skips"] == 1
    order.clear()
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    bias.grad = None
    opt.step()
    assert order == ["core"]


@pytest.mark.parametrize("engine", ENGINES)
def test_plain_parameters_of_a_fused_group_skip_on_the_device_too(engine):
    """``fused=True``: the plain parameters step as torch's fused AdamW, whose step counts live on the device,
    so regular steps with plain parameters, one with a NaN in a plain gradient, read nothing back; the skipped
    parameter (weight, moments, count) is untouched, and the skip is counted when the metrics ask."""
    params, bias, gain = _matrices(), nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(7))
    groups = [{"params": params, "rank": 3, "update_gap": 10, "engine": engine}, {"params": [bias, gain]}]
    opt = SubspaceAdamW(groups, lr=1e-2, weight_decay=0.1, fused=True)
    everything = [*params, bias, gain]
    grads = _gradients(everything, 5)
    grads[2][3][1] = float("nan")  # step 2: a NaN in the bias's gradient
    _step(opt, everything, grads[0])
    before = None
    with _host_reads_raise():
        for i, g in enumerate(grads[1:], start=1):
            if i == 2:
                before = (bias.detach().clone(), {k: v.clone() for k, v in opt.state.raw(bias).items()})
            _step(opt, everything, g)
            if i == 2:
                assert torch.equal(bias, before[0])
                assert all(torch.equal(v, before[1][k]) for k, v in opt.state.raw(bias).items())
    assert opt.subspace_metrics()["overall"]["nonfinite_skips"] == 1
    assert float(opt.state[bias]["step"]) == 4 and float(opt.state[gain]["step"]) == 5
    assert all(torch.isfinite(p).all() for p in everything)


def test_deepcopy_and_checkpoints_count_only_steps_taken():
    """A copy, a pickle or a checkpoint taken while skips are still on the device counts exactly the steps
    taken, and training resumed from it continues identically."""
    params = _matrices()
    opt = _optimizer(params, "reference")
    grads = _gradients(params, 6, nan={2: 1})
    for g in grads[:4]:
        _step(opt, params, g)
    clone_params = [nn.Parameter(p.detach().clone()) for p in params]
    copied = copy.deepcopy(opt)
    assert [s["step"] for s in copied.state.values()] == [4, 3, 4]
    resumed = _optimizer(clone_params, "reference")
    resumed.load_state_dict(opt.state_dict())
    for g in grads[4:]:
        _step(opt, params, g)
        _step(resumed, clone_params, [t.clone() for t in g])
    for p, q in zip(params, clone_params, strict=True):
        assert torch.equal(p, q)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: syncs inside PyTorch's C++ are only seen there")
@pytest.mark.parametrize("engine", ["reference", "auto"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_cuda_regular_step_never_synchronizes(engine, options, request):
    """On a GPU: ``torch.cuda.set_sync_debug_mode("error")`` raises at any synchronizing CUDA call (a blocking
    copy, ``item``, ``nonzero``, ...) during the regular steps."""
    if engine == "reference" and options.get("moments_dtype") == "int8":
        request.applymarker(
            pytest.mark.xfail(
                reason="quant.dequantize copies the 8-bit code map to the GPU at every "
                "call (a blocking host-to-device copy); cache it per device as "
                "quant._midpoints does",
                strict=False,
            )
        )
    params = [nn.Parameter(p.detach().cuda()) for p in _matrices()]
    opt = _optimizer(params, engine, **options)
    grads = [[t.cuda() for t in g] for g in _gradients(params, 4, nan={2: 0})]
    _step(opt, params, grads[0])
    _step(opt, params, grads[1])  # warm: caches, pinned blocks, compiled kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for g in grads[2:]:
            _step(opt, params, g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert opt.subspace_metrics()["overall"]["nonfinite_skips"] == 1
