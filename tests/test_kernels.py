"""The Triton engine against the reference engine, in float64, on fresh random inputs.

Without CUDA the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set before Triton is
imported) on CPU tensors; with CUDA the same tests run on the GPU unchanged. Shapes are tiny and ragged
(never multiples of the 16-wide interpreter tiles) so the whole file stays fast on two cores.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from conftest import gradient_like, orthonormality_error, subspace_distance  # noqa: E402

from subspace_optim import adam_rule, engine, linalg, refreshing, subspace  # noqa: E402
from subspace_optim.kernels import probe as kprobe  # noqa: E402
from subspace_optim.kernels import refresh as kr  # noqa: E402
from subspace_optim.kernels import step as ks  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(5, 13), (33, 17), (64, 40)]
GROUP = {"betas": (0.9, 0.999), "lr": 1e-2, "eps": 1e-8, "weight_decay": 0.1, "scale": 0.25}


@pytest.fixture
def float64_reference(monkeypatch):
    """``adam_rule.projected_adamw`` promotes G with ``.float()``; make its projection follow the basis
    dtype so that a float64 basis gives a float64 oracle (G itself is fp32/bf16, so nothing is lost)."""
    original = subspace.project
    monkeypatch.setattr(adam_rule, "project", lambda g, p, side: original(g.to(p.dtype), p, side))

    def oracle(w, g, p, exp_avg, exp_avg_sq, age, group, side):
        adam_rule.projected_adamw(w, g, p, exp_avg, exp_avg_sq, adam_rule.adam_scalars(**group, age=age), side)

    return oracle


def _launches(monkeypatch) -> list[int]:
    """Records the batch size of every fused-step batch (two kernel launches each)."""
    from subspace_optim.kernels import step as ks

    sizes: list[int] = []
    original = ks._project_launch

    def counted(ws, *args, **kwargs):
        sizes.append(len(ws))
        return original(ws, *args, **kwargs)

    monkeypatch.setattr(ks, "_project_launch", counted)
    return sizes


def _step(ws, gs, ps, ms, vs, ages, group, sides, **kwargs):
    """The kernel step for matrices of one param group (the twin's signature)."""
    ks.subspace_adamw(ws, gs, ps, ms, vs, ages, **group, sides=sides, **kwargs)


def _refresh(grads, sides, rank, *, oversample, power_iters, seeds, previous=None):
    previous = previous if previous is not None else [None] * len(grads)
    return kr.refresh_bases(
        grads, previous, seeds, sides=sides, rank=rank, oversample=oversample, power_iters=power_iters
    )


def _problem(m, n, rank, side, wdtype, seed, *, age=3):
    gen = torch.Generator().manual_seed(seed)
    d = m if side == "left" else n
    rshape = (rank, n) if side == "left" else (m, rank)
    g = torch.randn(m, n, generator=gen).to(wdtype)
    w = torch.randn(m, n, generator=gen).to(wdtype)
    p, _ = torch.linalg.qr(torch.randn(d, rank, generator=gen, dtype=torch.float64))
    exp_avg = 0.1 * torch.randn(rshape, generator=gen)
    exp_avg_sq = 0.1 * torch.rand(rshape, generator=gen)
    tensors = [t.to(DEVICE) for t in (w, g, p.float(), exp_avg, exp_avg_sq)]
    return tensors, age


def _check_step(oracle, w, g, p, exp_avg, exp_avg_sq, age, group, side, before):
    """Compare the kernel's in-place results with the float64 reference run from ``before``."""
    w0, m0, v0 = (t.double().cpu() for t in before)
    oracle(w0, g.cpu(), p.double().cpu(), m0, v0, age, group, side)
    torch.testing.assert_close(exp_avg.double().cpu(), m0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(exp_avg_sq.double().cpu(), v0, rtol=1e-5, atol=1e-7)
    err = (w.double().cpu() - w0).abs()
    if w.dtype == torch.bfloat16:  # one rounding to bf16 (8-bit significand): half an ulp, relative 2^-8
        assert bool((err <= w0.abs() * 2.0**-8 + 1e-6).all()), float(err.max())
    elif w.dtype == torch.float16:  # one rounding to fp16 (11-bit significand): half an ulp, relative 2^-11
        assert bool((err <= w0.abs() * 2.0**-11 + 1e-6).all()), float(err.max())
    else:
        assert float(err.max()) < 2e-6


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank_kind", ["one", "near_full"])
def test_fused_step_matches_float64_reference(monkeypatch, float64_reference, shape, side, wdtype, rank_kind):
    m, n = shape
    rank = 1 if rank_kind == "one" else min(m, n) - 1
    (w, g, p, exp_avg, exp_avg_sq), age = _problem(m, n, rank, side, wdtype, seed=m * n + rank)
    before = (w.clone(), exp_avg.clone(), exp_avg_sq.clone())
    batches = _launches(monkeypatch)
    _step([w], [g], [p], [exp_avg], [exp_avg_sq], [age], GROUP, [side])
    assert batches == [1]
    _check_step(float64_reference, w, g, p, exp_avg, exp_avg_sq, age, GROUP, side, before)


def test_fused_step_first_step_and_zero_weight_decay(float64_reference):
    """Age 1 (largest bias correction), zero moments, no decay, full rank: the AdamW-from-scratch case."""
    group = dict(GROUP, weight_decay=0.0, betas=(0.5, 0.99))
    (w, g, p, exp_avg, exp_avg_sq), _ = _problem(17, 33, 17, "left", torch.float32, seed=1)
    exp_avg.zero_()
    exp_avg_sq.zero_()
    before = (w.clone(), exp_avg.clone(), exp_avg_sq.clone())
    _step([w], [g], [p], [exp_avg], [exp_avg_sq], [1], group, ["left"])
    _check_step(float64_reference, w, g, p, exp_avg, exp_avg_sq, 1, group, "left", before)


def test_batched_step_groups_same_shapes(monkeypatch, float64_reference):
    """Three same-shape right projections (one batch, per-member ages) and one left projection of another
    shape (a batch with one member): two batches, every member equal to the reference."""
    specs = [(33, 17, 4, "right", torch.bfloat16, 2), (33, 17, 4, "right", torch.bfloat16, 7)]
    specs += [(33, 17, 4, "right", torch.bfloat16, 1), (40, 64, 5, "left", torch.float32, 3)]
    problems = []
    for i, (m, n, rank, side, wdtype, age) in enumerate(specs):
        tensors, _ = _problem(m, n, rank, side, wdtype, seed=100 + i)
        problems.append((tensors, age, side, [t.clone() for t in (tensors[0], tensors[3], tensors[4])]))
    batches = _launches(monkeypatch)
    _step(*[[t[0][j] for t in problems] for j in range(5)], [t[1] for t in problems], GROUP, [t[2] for t in problems])
    assert sorted(batches) == [1, 3]
    for (w, g, p, m_, v_), age, side, before in problems:
        _check_step(float64_reference, w, g, p, m_, v_, age, GROUP, side, before)


def test_in_kernel_gaussian_is_the_materialized_one():
    """The sketch product A Omega with Omega generated inside the GEMM equals A @ gaussian(...) (same
    Philox numbers)."""
    a = torch.randn(33, 17, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    seed = linalg.sketch_seed(0, 5, 2)
    omega = kr.gaussian(17, 7, seed, DEVICE)
    assert torch.equal(omega, kr.gaussian(17, 7, seed, DEVICE))
    assert not torch.equal(omega, kr.gaussian(17, 7, seed + 1, DEVICE))
    seeds = torch.tensor([seed], device=DEVICE)
    y = kr.bmm(kr.Mat.of([a]), None, torch.empty(1, 33, 7, device=DEVICE), seeds=seeds)
    torch.testing.assert_close(y[0].double(), a.double() @ omega.double(), rtol=1e-6, atol=1e-5)


def test_gaussian_statistics():
    x = kr.gaussian(64, 40, 12345, DEVICE).double()
    assert abs(float(x.mean())) < 0.1 and abs(float(x.std()) - 1.0) < 0.1


def test_gram_kernel_is_exact_product_fp64():
    y = torch.randn(3, 64, 19, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    h = kr.gram(y)
    assert h.dtype == torch.float64
    torch.testing.assert_close(h, y.double().mT @ y.double(), rtol=1e-13, atol=1e-12)


def test_batched_orthonormalize_handles_ill_conditioned_member():
    """One well-conditioned member and one power-iterated sketch with condition > 1e8 (plain
    CholeskyQR fails) in the same batch: both come back orthonormal and spanning their Y."""
    g = gradient_like(64, 40, 4, decay=0.5, noise=1e-6)
    y_bad = g @ torch.randn(40, 9, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        y_bad = g @ (g.T @ y_bad)
    y_good = torch.randn(64, 9, generator=torch.Generator().manual_seed(2))
    y = torch.stack([y_good, y_bad]).to(DEVICE)
    q = kr.orthonormalize(y)
    for i in range(2):
        assert orthonormality_error(q[i].cpu()) < 1e-5
        yi, qi = y[i].double().cpu(), q[i].double().cpu()
        assert float((yi - qi @ (qi.T @ yi)).norm()) < 1e-5 * float(yi.norm())
    single = kr.orthonormalize(y[:1].clone())
    assert subspace_distance(single[0].cpu(), q[0].cpu()) < 1e-5


@pytest.mark.parametrize("shape", [(33, 17), (40, 64)])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("warm", [False, True])
@pytest.mark.parametrize("rank_kind", ["one", "near_full"])
def test_refresh_matches_linalg(shape, side, warm, rank_kind):
    """Captured energy within 1e-3 of the reference range finder and of the exact SVD, and the same
    subspace as the SVD where the spectrum has a gap (the Gaussians differ, so no bitwise match)."""
    m, n = shape
    rank = 1 if rank_kind == "one" else min(m, n) - 2
    g = gradient_like(m, n, rank, decay=0.6, seed=m + n + rank).to(DEVICE)
    a = subspace.oriented(g, side)
    svd = linalg.svd_basis(g.cpu(), rank, side)
    previous = svd.basis.to(DEVICE) + 0.05 * torch.randn(svd.basis.shape, device=DEVICE) if warm else None
    previous = linalg.orthonormalize(previous) if warm else None
    ref = linalg.range_finder_basis(a, rank, oversample=4, power_iters=1, seed=7, start=previous)
    ((p, captured, total),) = _refresh(
        [g], [side], rank, oversample=4, power_iters=1, seeds=[7], previous=[previous] if warm else None
    )
    assert p.shape == ref.basis.shape and p.dtype == torch.float32
    assert orthonormality_error(p.cpu()) < 1e-5
    frac = float(captured / total)
    assert abs(frac - float(linalg.captured_energy(a, p) / total)) < 1e-5  # Ritz values are the energy
    assert abs(float(total) - float(linalg.energy(a))) < 1e-6 * float(total)
    assert frac > float(ref.captured / ref.total) - 1e-3
    assert frac > float(svd.captured / svd.total) - 1e-3
    assert subspace_distance(p.cpu(), svd.basis) < 0.1


def test_batched_refresh_equals_one_by_one():
    """Batching changes launches, not numbers: members of a batch (and a singleton) match solo runs."""
    grads = [gradient_like(33, 17, 3, seed=s).to(DEVICE) for s in range(2)] + [gradient_like(64, 40, 3).to(DEVICE)]
    sides, seeds = ["right", "right", "left"], [11, 12, 13]
    together = _refresh(grads, sides, 3, oversample=2, power_iters=2, seeds=seeds)
    for i, g in enumerate(grads):
        ((p, c, t),) = _refresh([g], [sides[i]], 3, oversample=2, power_iters=2, seeds=[seeds[i]])
        assert torch.equal(p, together[i][0]) and torch.equal(t, together[i][2])
        torch.testing.assert_close(c, together[i][1], rtol=1e-12, atol=0)  # batched eigh: last-bit freedom


def test_package_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None; import importlib.util as u; "
        "u.find_spec = lambda name, *a: None if name == 'triton' else None; "
        "from subspace_optim import triton_runtime; assert not triton_runtime.available(); "
        "assert not triton_runtime.runs_on('cuda'); print('ok')"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA run; on CPU the interpreter tests cover the wiring")
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_optimizer_30_steps_triton_engine_matches_reference(wdtype):
    """30 steps of SubspaceAdamW with engine="triton" vs engine="reference" on a small MLP (both sides,
    a batch of same-shape matrices). refresh="svd" makes both engines' bases identical, so weights must
    agree to fp32 GEMM rounding; the warm refresh is then checked on captured energy."""
    from subspace_optim import SubspaceAdamW

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        layers = [torch.nn.Linear(48, 96), torch.nn.Linear(96, 96), torch.nn.Linear(96, 96), torch.nn.Linear(96, 40)]
        return torch.nn.Sequential(*layers).cuda().to(wdtype)

    def run(engine: str, refresh: str) -> tuple[torch.nn.Module, SubspaceAdamW]:
        net = model()
        mats = [p for p in net.parameters() if p.dim() == 2]
        rest = [p for p in net.parameters() if p.dim() != 2]
        groups = [{"params": rest}, {"params": mats, "rank": 8, "update_gap": 10, "scale": 0.25}]
        opt = SubspaceAdamW(groups, lr=1e-2, weight_decay=0.01, engine=engine, refresh=refresh)
        gen = torch.Generator(device="cuda").manual_seed(1)
        for _ in range(30):
            x = torch.randn(64, 48, device="cuda", generator=gen).to(wdtype)
            net(x).float().square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return net, opt

    ref_net, _ = run("reference", "svd")
    tri_net, _ = run("triton", "svd")
    tol = 2e-2 if wdtype == torch.bfloat16 else 1e-4
    for a, b in zip(ref_net.parameters(), tri_net.parameters(), strict=True):
        torch.testing.assert_close(b.float(), a.float(), rtol=tol, atol=tol)
    _, ref_opt = run("reference", "warm")
    _, tri_opt = run("triton", "warm")
    ref_e = ref_opt.subspace_metrics()["overall"]["captured_energy"]
    tri_e = tri_opt.subspace_metrics()["overall"]["captured_energy"]
    assert abs(ref_e - tri_e) < 0.05


@pytest.fixture
def probed():
    """The engine's first-use self-check (kernels/probe.py) launches the kernels through the same entry points:
    run it before a test counts or patches the optimizer's launches, so the count does not depend on test order."""
    engine._passes_probe(torch.device(DEVICE), "auto")


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_optimizer_wiring_under_interpreter_matches_reference(probed, monkeypatch, wdtype):
    """The optimizer's Triton path (batched step and batched warm refresh), forced onto CPU tensors under
    the interpreter: with refresh="svd" both engines share bases, so weights agree to fp32 rounding (one
    bf16 ulp for bf16 weights); with refresh="warm" the kernel refresh captures the same energy."""
    if torch.cuda.is_available():
        pytest.skip("covered on CUDA by the 30-step test above")
    from subspace_optim import SubspaceAdamW

    monkeypatch.setattr(engine, "AUTO_DEVICES", ("cuda", "cpu"))
    calls = {"step": 0, "refresh": 0}
    step_fn, refresh_fn = ks.subspace_adamw, kr.refresh_bases

    def counted_step(*args, **kwargs):
        calls["step"] += 1
        return step_fn(*args, **kwargs)

    def counted_refresh(*args, **kwargs):
        calls["refresh"] += 1
        return refresh_fn(*args, **kwargs)

    monkeypatch.setattr(ks, "subspace_adamw", counted_step, raising=False)
    monkeypatch.setattr(kr, "refresh_bases", counted_refresh, raising=False)

    def run(engine: str, refresh: str):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.Linear(20, 20), torch.nn.Linear(20, 9)).to(wdtype)
        mats = [p for p in net.parameters() if p.dim() == 2]
        rest = [p for p in net.parameters() if p.dim() != 2]
        groups = [{"params": rest}, {"params": mats, "rank": 3, "update_gap": 4}]
        opt = SubspaceAdamW(groups, lr=1e-2, weight_decay=0.01, engine=engine, refresh=refresh)
        gen = torch.Generator().manual_seed(1)
        for _ in range(6):
            net(torch.randn(16, 12, generator=gen).to(wdtype)).float().square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return net, opt

    ref_net, _ = run("reference", "svd")
    assert calls == {"step": 0, "refresh": 0}
    tri_net, _ = run("auto", "svd")
    assert calls["step"] == 6 and calls["refresh"] == 0  # svd refreshes stay on the reference path
    tol = 1e-2 if wdtype == torch.bfloat16 else 1e-5
    for a, b in zip(ref_net.parameters(), tri_net.parameters(), strict=True):
        torch.testing.assert_close(b.float(), a.float(), rtol=tol, atol=tol)
    _, ref_opt = run("reference", "warm")
    _, tri_opt = run("auto", "warm")
    assert calls["refresh"] == 2  # steps 0 and 4, each one batched launch sequence for the 3 matrices
    ref_e = ref_opt.subspace_metrics()["overall"]["captured_energy"]
    tri_e = tri_opt.subspace_metrics()["overall"]["captured_energy"]
    assert abs(ref_e - tri_e) < 0.05


# ---------------------------------------------------------------------------- layouts, devices, dtypes


def _relayout(t: torch.Tensor, layout: str, pad: float = 7.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The values of ``t`` in another memory layout: "col" (column-major), "slice" (a window of a larger
    buffer filled with ``pad``, returned too so that writes outside the window can be detected), or
    "row" (unchanged)."""
    if layout == "col":
        return t.mT.contiguous().mT, None
    if layout == "slice":
        big = torch.full((t.shape[0] + 3, t.shape[1] + 5), pad, dtype=t.dtype, device=t.device)
        view = big[1 : 1 + t.shape[0], 2 : 2 + t.shape[1]]
        view.copy_(t)
        return view, big
    return t, None


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(
    "layouts",
    [
        {"m": "col", "v": "col"},  # a checkpoint saved column-major moments: load_state_dict keeps strides
        {"m": "slice", "v": "slice"},
        {"w": "col", "g": "slice", "p": "col", "m": "slice", "v": "col"},  # every operand strided, M != V
    ],
    ids=["col_moments", "sliced_moments", "all_strided"],
)
def test_fused_step_non_contiguous_operands(monkeypatch, float64_reference, side, layouts):
    """Each operand is addressed with its own strides: a batch of two members whose weights, gradients,
    bases and moments are column-major or sliced views matches the reference, and nothing outside a
    sliced view is written (N, the temporary, used to be written with the moments' strides)."""
    m, n, rank = 33, 17, 4
    members, pads = [], []
    for i, seed in enumerate((21, 22)):
        tensors, age = _problem(m, n, rank, side, torch.float32, seed=seed)
        laid = []
        for key, t in zip("wgpmv", tensors, strict=True):
            view, big = _relayout(t, layouts.get(key, "row"))
            laid.append(view)
            if big is not None:
                pads.append((big, view))
        members.append((laid, age + 2 * i, (laid[0].clone(), laid[3].clone(), laid[4].clone())))
    assert not members[0][0][3].is_contiguous() and not members[0][0][4].is_contiguous()
    operands = [[laid[j] for laid, _, _ in members] for j in range(5)]
    ages = [age for _, age, _ in members]
    batches = _launches(monkeypatch)
    _step(*operands, ages, GROUP, [side] * 2)
    assert batches == [2]
    for (w, g, p, m_, v_), age, before in members:
        _check_step(float64_reference, w, g, p, m_, v_, age, GROUP, side, before)
    for big, view in pads:
        outside = torch.ones_like(big, dtype=torch.bool)
        outside[1 : 1 + view.shape[0], 2 : 2 + view.shape[1]] = False
        assert bool((big[outside] == 7.0).all())


def test_fused_step_refuses_self_overlapping_outputs():
    """Outputs written tile by tile in parallel must not alias themselves (torch's in-place rule);
    any non-overlapping layout is accepted (see test_fused_step_non_contiguous_operands)."""
    from subspace_optim.kernels._common import check_writable

    (w, g, p, exp_avg, exp_avg_sq), age = _problem(9, 7, 2, "right", torch.float32, seed=3)
    shared = exp_avg[:1].expand(9, 2)  # stride 0: every row is the same memory
    with pytest.raises(ValueError, match="overlaps itself"):
        _step([w], [g], [p], [shared], [exp_avg_sq], [age], GROUP, ["right"])
    flat = torch.zeros(64, device=DEVICE)
    with pytest.raises(ValueError, match="overlaps itself"):
        check_writable(flat.as_strided((4, 4), (2, 1)), "rows overlapping")
    for ok in (flat.as_strided((4, 4), (4, 1)), flat.as_strided((4, 4), (1, 4)), flat.as_strided((3, 4), (9, 2))):
        check_writable(ok, "fine")
    check_writable(flat.as_strided((1, 5), (0, 1)), "a single row may have any row stride")


def test_every_launch_runs_under_its_tensors_device(monkeypatch):
    """Triton launches on torch.cuda.current_device(), so each entry point must make the tensors' device
    current first (on a multi-GPU host, cuda:1 tensors would otherwise be launched on cuda:0). The guard
    is a no-op on CPU, so it is replaced here by a recorder, and every kernel launch checks that it runs
    inside a guard for the device of its batch."""
    import contextlib

    from subspace_optim.kernels import _common, gemm
    from subspace_optim.kernels import step as ks

    assert isinstance(_common.device_guard(torch.device("cpu")), contextlib.nullcontext)
    guard = _common.device_guard(torch.device("cuda", 1))  # constructing it does not touch CUDA
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1

    active: list[torch.device] = []
    launches: list[tuple[str, torch.device | None]] = []

    @contextlib.contextmanager
    def recorder(device):
        active.append(torch.device(device))
        try:
            yield
        finally:
            active.pop()

    for module in (ks, kr):
        monkeypatch.setattr(module, "device_guard", recorder)
    for kernel in (ks.project_adam_kernel, ks.back_update_kernel, gemm.batched_gemm_kernel, gemm.gaussian_kernel):
        original = kernel.run

        def run(*args, _original=original, _name=kernel.__name__, **kwargs):
            launches.append((_name, active[-1] if active else None))
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", run)

    (w, g, p, exp_avg, exp_avg_sq), age = _problem(9, 7, 2, "right", torch.float32, seed=4)
    _step([w], [g], [p], [exp_avg], [exp_avg_sq], [age], GROUP, ["right"])
    _refresh([g], ["left"], 2, oversample=1, power_iters=1, seeds=[1])
    _refresh([g], ["right"], 2, oversample=1, power_iters=1, seeds=[1], previous=[p])
    kr.orthonormalize(torch.randn(1, 9, 3, device=DEVICE))
    kr.gaussian(4, 3, 0, DEVICE)
    names = {name for name, _ in launches}
    assert names == {"project_adam_kernel", "back_update_kernel", "batched_gemm_kernel", "gaussian_kernel"}
    assert all(device == g.device for _, device in launches), launches


def _low_rank_gradient(m: int, n: int, spectrum: list[float], gen: torch.Generator, noise: float) -> torch.Tensor:
    """U diag(spectrum) V^T + noise: a gradient with a clear gap after len(spectrum) directions."""
    k = len(spectrum)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    g = (u * torch.tensor(spectrum, dtype=torch.float64)) @ v.T
    return (g + noise * torch.randn(m, n, generator=gen, dtype=torch.float64) / (m * n) ** 0.5).float()


def test_optimizer_warm_refresh_loop_under_interpreter_matches_reference(probed, monkeypatch):
    """SubspaceAdamW with the kernels forced on CPU tensors (interpreter) against engine="reference"
    (``reference.projected_adamw`` + ``linalg.range_finder_basis``), refresh="warm": 8 steps with
    update_gap 3 (refreshes at steps 0, 3 and 6, the last two warm-started), three same-shape right
    projections (one batch) and a left one. Gradients are fed directly, identical for both engines,
    with a dominant subspace that moves between refreshes; the Gaussians of the two engines differ, so
    bases are compared as subspaces (projector distance) and weights to a tolerance set by that
    distance."""
    if torch.cuda.is_available():
        pytest.skip("on CUDA the 30-step optimizer test covers the real wiring")
    from subspace_optim import SubspaceAdamW

    shapes = [(20, 11)] * 3 + [(9, 26)]
    gen = torch.Generator().manual_seed(8)
    windows = [[_low_rank_gradient(m, n, [1.0, 0.6, 0.35], gen, 1e-3) for m, n in shapes] for _ in range(3)]
    grads = []
    for step in range(8):  # within a window: the same subspace, the weights of its directions vary
        scale = 1.0 + 0.2 * torch.rand(len(shapes), generator=gen)
        grads.append([g * float(c) for g, c in zip(windows[step // 3], scale, strict=True)])

    calls = {"refresh": 0}
    refresh_fn = kr.refresh_bases

    def counted_refresh(*args, **kwargs):
        calls["refresh"] += 1
        return refresh_fn(*args, **kwargs)

    def run(choice: str):
        params = [
            torch.nn.Parameter(torch.randn(m, n, generator=torch.Generator().manual_seed(i)))
            for i, (m, n) in enumerate(shapes)
        ]
        opt = SubspaceAdamW(
            params,
            lr=1e-2,
            weight_decay=0.01,
            rank=3,
            update_gap=3,
            refresh="warm",
            oversample=2,
            power_iters=1,
            engine=choice,
        )
        with monkeypatch.context() as patch:
            if choice != "reference":
                patch.setattr(engine, "AUTO_DEVICES", ("cuda", "cpu"))
                patch.setattr(kr, "refresh_bases", counted_refresh, raising=False)
            for step_grads in grads:
                for p, g in zip(params, step_grads, strict=True):
                    p.grad = g.clone()
                opt.step()
        return params, opt

    ref_params, ref_opt = run("reference")
    tri_params, tri_opt = run("auto")
    assert calls["refresh"] == 3  # one batched call per refresh step, both shapes in it
    for i, (a, b) in enumerate(zip(ref_params, tri_params, strict=True)):
        ref_state, tri_state = ref_opt.state[a], tri_opt.state[b]
        assert ref_state["refresh_count"] == tri_state["refresh_count"] == 3
        assert subspace_distance(tri_state["basis"], ref_state["basis"]) < 1e-4
        # the last warm refresh followed the subspace to the third window's
        target = linalg.svd_basis(grads[6][i], 3, refreshing.side(b, tri_opt.param_groups[0])).basis
        assert subspace_distance(tri_state["basis"], target) < 1e-2
        start = torch.randn(shapes[i], generator=torch.Generator().manual_seed(i))
        assert float((b.detach() - start).abs().max()) > 1e-2  # the weights did move
        torch.testing.assert_close(b.detach(), a.detach(), rtol=0, atol=2e-6)  # a few fp32 ulps of |W| ~ 3


@pytest.mark.parametrize("side", ["left", "right"])
def test_warm_refresh_starts_from_the_previous_basis(side):
    """With no power iteration and one extra column, a cold sketch of a gradient whose top-3 directions
    sit on a flat tail captures far from the optimum; a warm start from the basis that spans those
    directions captures all of it, and a warm start from an unrelated basis does not: the previous
    basis is really used."""
    gen = torch.Generator().manual_seed(9)
    d, c, rank = 40, 33, 3
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(c, c, generator=gen, dtype=torch.float64))
    s = torch.full((c,), 0.35, dtype=torch.float64)
    s[:rank] = torch.tensor([1.0, 0.9, 0.8])
    a = (u[:, :c] * s) @ v.T  # A (d x c): the oriented gradient
    g = (a if side == "left" else a.T).float().to(DEVICE)
    previous = u[:, :rank].float().contiguous().to(DEVICE)
    unrelated = linalg.orthonormalize(torch.randn(d, rank, generator=gen)).to(DEVICE)
    best = float((s[:rank] ** 2).sum() / (s**2).sum())

    def fraction(start):
        kw = dict(oversample=1, power_iters=0, seeds=[5], previous=None if start is None else [start])
        ((p, captured, total),) = _refresh([g], [side], rank, **kw)
        return p, float(captured / total) / best

    p_warm, warm = fraction(previous)
    _, cold = fraction(None)
    _, wrong = fraction(unrelated)
    assert warm > 0.9999 and subspace_distance(p_warm.cpu(), previous.cpu()) < 1e-4
    assert cold < 0.9 and wrong < 0.95


@pytest.mark.parametrize("side", ["left", "right"])
def test_fused_step_fp16_weights(float64_reference, side):
    """fp16 weights and gradients (the optimizer allows them): fp32 math, one round-to-nearest to fp16."""
    (w, g, p, exp_avg, exp_avg_sq), age = _problem(33, 17, 4, side, torch.float16, seed=31)
    before = (w.clone(), exp_avg.clone(), exp_avg_sq.clone())
    _step([w], [g], [p], [exp_avg], [exp_avg_sq], [age], GROUP, [side])
    assert w.dtype == torch.float16
    _check_step(float64_reference, w, g, p, exp_avg, exp_avg_sq, age, GROUP, side, before)


@pytest.mark.parametrize("side", ["left", "right"])
def test_refresh_bf16_gradient(side):
    """A bf16 gradient is read as bf16 and multiplied in fp32: the basis equals the one of the same values
    held in fp32 (same Philox sketch), and it captures the exact SVD's energy of those values."""
    g32 = gradient_like(33, 17, 3, decay=0.5, seed=13).to(torch.bfloat16).float().to(DEVICE)
    g16 = g32.to(torch.bfloat16)
    assert torch.equal(g16.float(), g32)
    kw = dict(oversample=3, power_iters=1, seeds=[3])
    ((p16, c16, t16),) = _refresh([g16], [side], 3, **kw)
    ((p32, c32, t32),) = _refresh([g32], [side], 3, **kw)
    assert p16.dtype == torch.float32 and orthonormality_error(p16.cpu()) < 1e-5
    assert torch.equal(t16, t32) and subspace_distance(p16.cpu(), p32.cpu()) < 1e-5
    svd = linalg.svd_basis(g32.cpu(), 3, side)
    assert abs(float(c16 / t16) - float(svd.captured / svd.total)) < 1e-3
    torch.testing.assert_close(c16, c32, rtol=1e-6, atol=0)


def test_orthonormalize_takes_shifted_cholesky_qr_before_householder(monkeypatch):
    """A member with condition number ~1e10 whose fp64 Gram matrix is singular to working precision
    (two columns that differ only by 1e-9 in one row): plain CholeskyQR2 fails, the shifted CholeskyQR3
    retry succeeds, and Householder QR is never called. The well-conditioned member stays on the fast
    path. Both results are orthonormal and span their Y."""
    gen = torch.Generator().manual_seed(10)
    d, k = 24, 5
    y_bad = torch.zeros(d, k)
    y_bad[: d - 1] = torch.randn(d - 1, k, generator=gen)
    y_bad[: d - 1, k - 1] = y_bad[: d - 1, 0]
    y_bad[d - 1, k - 1] = 1e-9
    assert 1e9 < float(torch.linalg.cond(y_bad.double())) < 1e11
    y = torch.stack([torch.randn(d, k, generator=gen), y_bad]).to(DEVICE)

    passes, householder = [], []
    cholesky_qr, qr = linalg._cholesky_qr, torch.linalg.qr

    def spy_cholesky_qr(x, products, shift=0.0):
        q, ok = cholesky_qr(x, products, shift)
        passes.append((x.shape[0], shift != 0.0, ok.tolist()))
        return q, ok

    monkeypatch.setattr(linalg, "_cholesky_qr", spy_cholesky_qr)
    monkeypatch.setattr(torch.linalg, "qr", lambda *a, **kw: householder.append(1) or qr(*a, **kw))
    q = kr.orthonormalize(y)
    assert passes[:2] == [(2, False, [True, False]), (2, False, [True, False])]  # batched CholeskyQR2
    assert passes[2:] == [(1, True, [True]), (1, False, [True]), (1, False, [True])]  # shifted CholeskyQR3
    assert householder == []
    for i in range(2):
        qi, yi = q[i].double().cpu(), y[i].double().cpu()
        assert orthonormality_error(qi) < 1e-6
        assert float((yi - qi @ (qi.T @ yi)).norm()) < 1e-6 * float(yi.norm())


def test_optimizer_resumes_column_major_moments_under_interpreter(probed, monkeypatch):
    """The audit's case end to end: a checkpoint holding column-major moments is loaded (load_state_dict
    keeps their strides) and the Triton step, forced onto CPU tensors, continues exactly like the
    reference engine resumed from the same values."""
    if torch.cuda.is_available():
        pytest.skip("the interpreter-forced wiring is a CPU test")
    from subspace_optim import SubspaceAdamW

    gen = torch.Generator().manual_seed(12)
    grads = [torch.randn(20, 11, generator=gen) for _ in range(5)]
    start = torch.randn(20, 11, generator=gen)

    def make(engine):
        p = torch.nn.Parameter(start.clone())
        return p, SubspaceAdamW([p], lr=1e-2, weight_decay=0.01, rank=3, update_gap=100, refresh="svd", engine=engine)

    p, opt = make("auto")  # CPU tensors: the reference path, until the kernels are forced below
    for g in grads[:2]:
        p.grad = g.clone()
        opt.step()
    saved = opt.state_dict()
    col_major = {**saved, "state": {0: dict(saved["state"][0])}}
    for key in ("exp_avg", "exp_avg_sq"):
        col_major["state"][0][key] = saved["state"][0][key].mT.contiguous().mT
    saved = {**saved, "param_groups": [dict(g, engine="reference") for g in saved["param_groups"]]}

    p_ref, opt_ref = make("reference")
    p_tri, opt_tri = make("auto")
    with torch.no_grad():
        p_ref.copy_(p)
        p_tri.copy_(p)
    opt_ref.load_state_dict(saved)
    opt_tri.load_state_dict(col_major)
    assert not opt_tri.state[p_tri]["exp_avg"].is_contiguous() and opt_ref.state[p_ref]["exp_avg"].is_contiguous()
    calls = []
    step_fn = ks.subspace_adamw
    monkeypatch.setattr(engine, "AUTO_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(ks, "subspace_adamw", lambda *a, **kw: calls.append(1) or step_fn(*a, **kw), raising=False)
    for g in grads[2:]:
        for q, o in ((p_ref, opt_ref), (p_tri, opt_tri)):
            q.grad = g.clone()
            o.step()
    assert len(calls) == 3  # the resumed "auto" optimizer ran the kernels, the reference one did not
    torch.testing.assert_close(p_tri.detach(), p_ref.detach(), rtol=0, atol=2e-6)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(opt_tri.state[p_tri][key], opt_ref.state[p_ref][key], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("warm", [False, True])
def test_refresh_of_a_huge_finite_gradient(warm):
    """A finite gradient of norm ~1e25 overflows fp32 in A A^T Y unless the middle product is taken at
    the gradient's scale (as ``linalg.range_finder_basis`` does): the basis must come out finite and the
    same subspace as for the gradient at unit scale."""
    g = gradient_like(33, 17, 3, decay=0.5, seed=14).to(DEVICE)
    previous = [linalg.svd_basis(g.cpu(), 3, "left").basis.to(DEVICE)] if warm else None
    kw = dict(oversample=2, power_iters=2, seeds=[4], previous=previous)
    ((p, captured, total),) = _refresh([g], ["left"], 3, **kw)
    ((p_big, captured_big, total_big),) = _refresh([g * 1e25], ["left"], 3, **kw)
    assert bool(torch.isfinite(p_big).all()) and orthonormality_error(p_big.cpu()) < 1e-5
    assert subspace_distance(p_big.cpu(), p.cpu()) < 1e-4
    assert abs(float(captured_big / total_big) - float(captured / total)) < 1e-5


@pytest.mark.parametrize(
    "wdtype,choice,expected",
    [
        (torch.float32, "auto", "ieee"),
        (torch.bfloat16, "auto", "tf32"),
        (torch.float16, "auto", "tf32"),
        (torch.bfloat16, "ieee", "ieee"),
        (torch.float32, "tf32", "tf32"),
    ],
)
def test_matmul_precision_reaches_the_step_kernels(probed, monkeypatch, wdtype, choice, expected):
    """``matmul_precision`` picks the step GEMMs' operand precision; "auto" uses TF32 only on low-precision
    weights, whose gradients TF32 holds exactly. Run through the interpreter, the TF32 step still follows
    the reference within the rounding of the weights."""
    if torch.cuda.is_available():
        pytest.skip("the interpreter-forced wiring is a CPU test")
    from subspace_optim import SubspaceAdamW

    monkeypatch.setattr(engine, "AUTO_DEVICES", ("cuda", "cpu"))
    seen = []
    step_fn = ks.subspace_adamw

    def recording(*args, matmul_precision="ieee", **kwargs):
        seen.append(matmul_precision)
        return step_fn(*args, matmul_precision=matmul_precision, **kwargs)

    monkeypatch.setattr(ks, "subspace_adamw", recording, raising=False)

    def run(engine: str):
        torch.manual_seed(3)
        w = torch.nn.Parameter(torch.randn(20, 17).to(wdtype))
        opt = SubspaceAdamW([w], lr=1e-2, rank=4, update_gap=3, refresh="svd", engine=engine, matmul_precision=choice)
        gen = torch.Generator().manual_seed(4)
        for _ in range(4):
            w.grad = torch.randn(20, 17, generator=gen).to(wdtype)
            opt.step()
        return w.detach().float()

    kernel_w = run("auto")
    assert seen == [expected] * 4
    reference_w = run("reference")
    ulp = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[wdtype]
    torch.testing.assert_close(kernel_w, reference_w, rtol=ulp, atol=ulp)


def test_matmul_precision_is_validated():
    from subspace_optim import SubspaceAdamW

    with pytest.raises(ValueError, match=r"Invalid matmul_precision: .*'auto', 'ieee', 'tf32'"):
        SubspaceAdamW([torch.nn.Parameter(torch.randn(4, 4))], rank=2, matmul_precision="bf16")


def test_probe_passes_on_this_device_under_the_interpreter():
    from subspace_optim.kernels import probe

    assert probe.probe(torch.device("cpu") if not torch.cuda.is_available() else torch.device("cuda")) is None


def test_probe_catches_kernels_that_compute_wrong_numbers(monkeypatch):
    from subspace_optim.kernels import probe, step

    monkeypatch.setattr(step, "subspace_adamw", lambda *args, **kwargs: None)  # "launches", changes nothing
    error = probe.probe(torch.device("cpu"))
    assert error is not None and "fused step" in error and "differs from the reference" in error


def test_probe_reports_a_failing_compile(monkeypatch):
    from subspace_optim.kernels import probe, refresh

    def broken(*args, **kwargs):
        raise RuntimeError("simulated PTX compile failure")

    monkeypatch.setattr(refresh, "refresh_bases", broken)
    assert probe.probe(torch.device("cpu")) == "RuntimeError: simulated PTX compile failure"


@pytest.mark.parametrize("choice", ["auto", "triton"])
def test_failed_probe_falls_back_for_auto_and_raises_for_triton(monkeypatch, choice):
    """Kernels that fail their first-use self-check are never launched: "auto" warns and trains on the
    reference path (same weights as engine="reference"), "triton" raises naming the device."""
    if torch.cuda.is_available():
        pytest.skip("the interpreter-forced wiring is a CPU test")
    from subspace_optim import SubspaceAdamW

    monkeypatch.setattr(engine, "AUTO_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(engine, "_PROBED", {})
    monkeypatch.setattr(kprobe, "probe", lambda device: "simulated failure")

    def never(*args, **kwargs):
        raise AssertionError("a kernel was launched after a failed probe")

    monkeypatch.setattr(ks, "subspace_adamw", never, raising=False)
    monkeypatch.setattr(kr, "refresh_bases", never, raising=False)

    def run(engine_name):
        torch.manual_seed(5)
        w = torch.nn.Parameter(torch.randn(12, 9))
        opt = SubspaceAdamW([w], lr=1e-2, rank=3, update_gap=2, engine=engine_name)
        for _ in range(3):
            w.grad = torch.randn(12, 9)
            opt.step()
        return w.detach().clone()

    if choice == "triton":
        with pytest.raises(RuntimeError, match=r"engine='triton'.*self-check on cpu: simulated failure"):
            run("triton")
        return
    with pytest.warns(UserWarning, match=r"failed their self-check on cpu \(simulated failure\)"):
        fallback = run("auto")
    assert torch.equal(fallback, run("reference"))


def test_kernel_refresh_that_a_factorization_refuses_falls_back_to_the_reference(probed, monkeypatch):
    """If the batched kernel refresh raises LinAlgError (eigh on a member's numbers), the batch is
    refreshed by the reference path instead of failing the step: same bases as engine="reference"."""
    if torch.cuda.is_available():
        pytest.skip("the interpreter-forced wiring is a CPU test")
    from subspace_optim import SubspaceAdamW

    monkeypatch.setattr(engine, "AUTO_DEVICES", ("cuda", "cpu"))

    def refused(*args, **kwargs):
        raise torch.linalg.LinAlgError("simulated: eigh got a non-finite Gram matrix")

    monkeypatch.setattr(kr, "refresh_bases", refused, raising=False)

    def run(engine):
        torch.manual_seed(6)
        w = torch.nn.Parameter(torch.randn(14, 10))
        opt = SubspaceAdamW([w], lr=1e-2, rank=3, update_gap=2, engine=engine)
        gen = torch.Generator().manual_seed(7)
        for _ in range(3):
            w.grad = torch.randn(14, 10, generator=gen)
            opt.step()
        return opt.state[w]["basis"].clone(), w.detach().clone()

    (basis_k, w_k), (basis_r, w_r) = run("auto"), run("reference")
    assert torch.equal(basis_k, basis_r)
    torch.testing.assert_close(w_k, w_r, rtol=1e-6, atol=1e-6)


def test_functional_core_engines_are_twins():
    """``functional.subspace_adamw`` and ``functional.refresh_bases`` take one signature for both engines: the
    same call with engine="triton" (interpreted on CPU, no patching) matches engine="reference"."""
    from subspace_optim import functional

    problems = [_problem(33, 17, 4, side, torch.float32, seed=40 + i)[0] for i, side in enumerate(["left", "right"])]
    results = {}
    for which in ("reference", "triton"):
        tensors = [[t.clone() for t in problem] for problem in problems]
        ws, gs, ps, ms, vs = (list(x) for x in zip(*tensors, strict=True))
        functional.subspace_adamw(ws, gs, ps, ms, vs, [3, 3], **GROUP, sides=["left", "right"], engine=which)
        spectral = [gradient_like(33, 17, 4, decay=0.5, seed=s).to(DEVICE) for s in (1, 2)]  # a gap after rank 4
        bases = functional.refresh_bases(
            spectral,
            ps,
            [1, 2],
            sides=["left", "right"],
            rank=4,
            policy="warm",
            oversample=2,
            power_iters=1,
            engine=which,
        )
        results[which] = (ws, ms, vs, bases)
    for a, b in zip(
        results["reference"][0] + results["reference"][1], results["triton"][0] + results["triton"][1], strict=True
    ):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=2e-6)
    for ref, tri in zip(results["reference"][3], results["triton"][3], strict=True):
        assert orthonormality_error(tri.basis.cpu()) < 1e-5
        assert abs(float(tri.captured / tri.total) - float(ref.captured / ref.total)) < 1e-3


def test_explicit_triton_engine_is_obeyed_on_cpu_and_refuses_what_it_cannot_take():
    """engine="triton" runs the kernels for CPU tensors under the interpreter, without any patching, and
    matches engine="reference" with shared (svd) bases; a float64 weight, which the kernels do not take, is
    refused with the parameter's name before anything changes."""
    if torch.cuda.is_available():
        pytest.skip("a CPU test")
    from subspace_optim import SubspaceAdamW

    def run(choice: str) -> torch.Tensor:
        torch.manual_seed(3)
        w = torch.nn.Parameter(torch.randn(20, 17))
        opt = SubspaceAdamW([w], lr=1e-2, rank=4, update_gap=3, refresh="svd", engine=choice)
        gen = torch.Generator().manual_seed(4)
        for _ in range(4):
            w.grad = torch.randn(20, 17, generator=gen)
            opt.step()
        return w.detach()

    torch.testing.assert_close(run("triton"), run("reference"), rtol=1e-6, atol=2e-6)
    w64 = torch.nn.Parameter(torch.randn(8, 6, dtype=torch.float64))
    opt = SubspaceAdamW([w64], rank=2, engine="triton")
    w64.grad = torch.randn(8, 6, dtype=torch.float64)
    before = w64.detach().clone()
    with pytest.raises(ValueError, match=r"engine='triton' cannot run parameter params\[0\].*float64"):
        opt.step()
    assert torch.equal(w64.detach(), before) and not opt.state


# Low-precision state: the kernels convert bf16 / 8-bit moments and bf16 bases in their epilogues
# and must match functional.subspace_adamw(engine="reference"), which goes through quant.load / quant.store.

from subspace_optim import functional, quant  # noqa: E402

WDTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _state_problem(m, n, rank, side, kind, bdtype, wdtype, seed):
    """W, G, P (orthonormal, stored as ``bdtype``) and a state dict {exp_avg, exp_avg_sq(, *_absmax)} whose
    moments are random values stored as ``kind`` ("float32", "bfloat16" or "int8")."""
    gen = torch.Generator().manual_seed(seed)
    d = m if side == "left" else n
    rshape = (rank, n) if side == "left" else (m, rank)
    w = torch.randn(m, n, generator=gen).to(wdtype)
    g = torch.randn(m, n, generator=gen).to(wdtype)
    p = torch.linalg.qr(torch.randn(d, rank, generator=gen, dtype=torch.float64))[0].to(bdtype)
    state = quant.zeros(rshape, kind, torch.device(DEVICE), "exp_avg")
    state.update(quant.zeros(rshape, kind, torch.device(DEVICE), "exp_avg_sq"))
    quant.store(state, "exp_avg", (0.1 * torch.randn(rshape, generator=gen)).to(DEVICE))
    quant.store(state, "exp_avg_sq", (0.1 * torch.rand(rshape, generator=gen)).to(DEVICE))
    return {"w": w.to(DEVICE), "g": g.to(DEVICE), "p": p.to(DEVICE), "side": side, "state": state}


def _twin(engine_name, problems, age=3):
    """One ``functional.subspace_adamw`` call over copies of ``problems``; returns the copies."""
    out = [dict(pr, w=pr["w"].clone(), state={k: v.clone() for k, v in pr["state"].items()}) for pr in problems]
    functional.subspace_adamw(
        [pr["w"] for pr in out],
        [pr["g"] for pr in out],
        [pr["p"] for pr in out],
        [quant.moment(pr["state"], "exp_avg") for pr in out],
        [quant.moment(pr["state"], "exp_avg_sq") for pr in out],
        [age] * len(out),
        **GROUP,
        sides=[pr["side"] for pr in out],
        engine=engine_name,
    )
    return out


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype``'s values at |x| (float64)."""
    fi = torch.finfo(dtype)
    _, e = torch.frexp(x.double().abs().clamp_min(fi.smallest_normal))
    return fi.eps * torch.pow(2.0, (e - 1).double())


def _check_low_precision(pr, ref, tri):
    """The Triton result ``tri`` against the reference result ``ref`` of problem ``pr``."""
    w_ref, w_tri = ref["w"].double().cpu(), tri["w"].double().cpu()
    if pr["w"].dtype == torch.float32:
        torch.testing.assert_close(w_tri, w_ref, rtol=1e-6, atol=1e-6)
    else:  # the same fp32 value up to fp32 rounding, then one rounding: at most one ulp of W's dtype apart
        tol = torch.maximum(_ulp(w_ref, pr["w"].dtype), _ulp(w_tri, pr["w"].dtype))
        assert bool(((w_tri - w_ref).abs() <= tol).all()), float((w_tri - w_ref).abs().max())
    # The reference's fp32 new moments, before storage: the reference step on fp32 copies of the loaded state.
    loaded = {key: quant.load(pr["state"], key).clone() for key in ("exp_avg", "exp_avg_sq")}
    exact = _twin("reference", [dict(pr, state=loaded)])
    for key in ("exp_avg", "exp_avg_sq"):
        a, b = ref["state"][key].cpu(), tri["state"][key].cpu()
        assert b.dtype == a.dtype and b.shape == a.shape
        kind = quant.stored_kind(ref["state"], key)
        if kind == "float32":
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
        elif kind == "bfloat16":
            err = (b.double() - a.double()).abs()
            assert bool((err <= torch.maximum(_ulp(a, torch.bfloat16), _ulp(b, torch.bfloat16))).all()), key
            # Rounded to nearest (not truncated): values differ only where the fp32 value is at a tie.
            x = exact[0]["state"][key].cpu().double()
            tie = (x - (a.double() + b.double()) / 2).abs() <= 1e-5 * x.abs() + 1e-7 * x.abs().max()
            assert bool(tie[err > 0].all()), (key, int((err > 0).sum()))
        else:
            signed = key == "exp_avg"
            am_ref, am_tri = ref["state"][key + "_absmax"].cpu(), tri["state"][key + "_absmax"].cpu()
            torch.testing.assert_close(am_tri, am_ref, rtol=1e-6, atol=0.0)
            x = exact[0]["state"][key].cpu()
            codes, _ = quant.quantize(x, signed)
            assert torch.equal(codes, a)  # the reference stored quantize(x): x is its fp32 new moment
            ci, ri = b.long(), a.long()
            differ = ci != ri
            assert int((ci - ri).abs().max()) <= 1, key
            normed = quant._blocked(x) / torch.where(am_ref > 0, am_ref, 1.0)[..., None]
            normed = normed.reshape(x.shape[0], -1)[:, : x.shape[1]]
            mids = quant._midpoints(signed, "cpu")
            near = (normed - mids[torch.minimum(ci, ri).clamp_max(254)]).abs() <= 1e-5
            assert bool(near[differ].all()), (key, int(differ.sum()))
            table = quant.dynamic_map(signed)
            step = torch.maximum(table[ri.clamp_max(254) + 1] - table[ri], table[ri] - table[(ri - 1).clamp_min(0)])
            scale = quant._blocked(torch.ones_like(x)) * am_ref[..., None]
            scale = scale.reshape(x.shape[0], -1)[:, : x.shape[1]]
            deq_ref = quant.dequantize(a, am_ref, signed)
            deq_tri = quant.dequantize(b, am_tri, signed)
            assert bool(((deq_tri - deq_ref).abs() <= step * scale * (1 + 1e-5) + 1e-12).all()), key


@pytest.mark.parametrize("kind", quant.MOMENT_DTYPES)
@pytest.mark.parametrize("bdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("side", ["left", "right"])
def test_fused_step_low_precision_state_matches_reference(monkeypatch, kind, bdtype, side):
    """Every (moments, basis, side) storage combination through ``functional.subspace_adamw``: engine="triton"
    against engine="reference" on the same inputs. Two same-shape pairs per call: moment rows shorter than
    one quantization block, and rows of 3 or 2 blocks (cols 300 / 260, not multiples of 256); the pairs'
    weight dtypes rotate through fp32, bf16 and fp16 over the cases."""
    # Left: moments (rank, n), the blocks run along n; right: moments (m, rank), they run along the rank.
    shapes = [(13, 37, 4), (11, 300, 5)] if side == "left" else [(19, 45, 6), (5, 263, 260)]
    j = 2 * [torch.float32, torch.bfloat16].index(bdtype) + ["left", "right"].index(side)
    problems = []
    for pair, (m, n, rank) in enumerate(shapes):
        wdtype = WDTYPES[(2 * j + pair) % 3]
        problems += [_state_problem(m, n, rank, side, kind, bdtype, wdtype, seed=40 * j + 2 * pair + k) for k in (0, 1)]
    ref = _twin("reference", problems)
    batches = _launches(monkeypatch)
    tri = _twin("triton", problems)
    assert batches == [2, 2]
    for pr, a, b in zip(problems, ref, tri, strict=True):
        assert b["p"] is pr["p"] and b["p"].dtype == bdtype
        _check_low_precision(pr, a, b)


@pytest.mark.parametrize("side", ["left", "right"])
def test_fused_step_int8_zero_block_stays_zero(side):
    """An 8-bit moment block that is zero and receives a zero projected gradient stays exactly zero: absmax
    0 (no division by it) and the code of 0, and N = 0 there. Left: the second block (cols 256..299) of
    every row, via zero gradient columns; right: the first row, via a zero gradient row."""
    m, n, rank = (9, 300, 3) if side == "left" else (9, 40, 5)
    pr = _state_problem(m, n, rank, side, "int8", torch.float32, torch.float32, seed=77)
    st = pr["state"]
    x = {key: quant.load(st, key).clone() for key in ("exp_avg", "exp_avg_sq")}
    if side == "left":
        pr["g"][:, 256:] = 0
        zero = (slice(None), slice(256, None))
    else:
        pr["g"][0] = 0
        zero = (0, slice(None))
    for key in x:
        x[key][zero] = 0
        quant.store(st, key, x[key])
        assert not bool(st[key + "_absmax"].eq(0).all())
    ref, tri = _twin("reference", [pr])[0], _twin("triton", [pr])[0]
    _check_low_precision(pr, ref, tri)
    for key in ("exp_avg", "exp_avg_sq"):
        absmax = tri["state"][key + "_absmax"]
        zero_code = int(quant.zeros((1, 1), "int8", absmax.device, key)[key])
        assert bool((absmax[:, 1] == 0).all() if side == "left" else (absmax[0] == 0).all())
        assert bool((tri["state"][key][zero] == zero_code).all())
        assert bool((quant.load(tri["state"], key)[zero] == 0).all())
        assert bool((quant.load(tri["state"], key) != 0).any())


def test_fused_step_batches_by_storage(monkeypatch):
    """Same-shape matrices with different storage in one call split into batches by moment dtype, basis
    dtype and absmax/code layout (column-major codes and absmax are addressed through their strides), and
    every member matches the reference run alone."""
    specs = [("float32", torch.float32), ("float32", torch.float32), ("bfloat16", torch.float32)]
    specs += [("int8", torch.float32), ("int8", torch.float32), ("int8", torch.bfloat16), ("int8", torch.float32)]
    problems = [_state_problem(13, 300, 5, "left", k, b, torch.float32, seed=90 + i) for i, (k, b) in enumerate(specs)]
    for key, t in list(problems[-1]["state"].items()):
        problems[-1]["state"][key] = t.t().contiguous().t()  # column-major codes and absmax
    ref = [_twin("reference", [pr])[0] for pr in problems]
    batches = _launches(monkeypatch)
    out = [dict(pr, w=pr["w"].clone(), state={k: v.clone() for k, v in pr["state"].items()}) for pr in problems]
    for pr, o in zip(problems, out, strict=True):
        for key, t in pr["state"].items():
            o["state"][key] = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)
    ks.subspace_adamw(
        [o["w"] for o in out],
        [o["g"] for o in out],
        [o["p"] for o in out],
        [quant.moment(o["state"], "exp_avg") for o in out],
        [quant.moment(o["state"], "exp_avg_sq") for o in out],
        [3] * len(out),
        **GROUP,
        sides=["left"] * len(out),
    )
    assert sorted(batches) == [1, 1, 1, 2, 2]
    assert out[-1]["state"]["exp_avg"].stride() == (1, 5) and out[-1]["state"]["exp_avg_absmax"].stride() == (1, 5)
    for pr, a, b in zip(problems, ref, out, strict=True):
        _check_low_precision(pr, a, b)


def test_fused_step_int8_ties_go_to_the_smaller_code():
    """Exact ties: with beta1 = 0, zero moments and P = the first columns of the identity, M's new value is
    exactly rows of G; row 0 holds 1 and every midpoint of the signed map (block 0), and 2 and twice some
    midpoints (block 1, cols 256..299), so normed = x / absmax lands exactly on midpoints. The kernel's
    binary search must give torch.bucketize's code (the smaller index) for every one, bit for bit."""
    m, n, rank = 6, 300, 2
    pr = _state_problem(m, n, rank, "left", "int8", torch.float32, torch.float32, seed=5)
    for key in ("exp_avg", "exp_avg_sq"):
        pr["state"].update(quant.zeros((rank, n), "int8", torch.device(DEVICE), key))
    mids = quant._midpoints(True, "cpu")
    row = torch.cat([torch.ones(1), mids, torch.full((1,), -2.0), 2 * mids[::6][:43]])
    pr["g"][0] = row.to(DEVICE)
    pr["p"] = torch.eye(m, rank, device=DEVICE)
    group = dict(GROUP, betas=(0.0, 0.999))
    outs = {}
    for which in ("reference", "triton"):
        out = dict(pr, w=pr["w"].clone(), state={k: v.clone() for k, v in pr["state"].items()})
        st = out["state"]
        functional.subspace_adamw(
            [out["w"]],
            [out["g"]],
            [out["p"]],
            [quant.moment(st, "exp_avg")],
            [quant.moment(st, "exp_avg_sq")],
            [1],
            **group,
            sides=["left"],
            engine=which,
        )
        outs[which] = out
    ref, tri = outs["reference"]["state"], outs["triton"]["state"]
    assert torch.equal(ref["exp_avg_absmax"][0].cpu(), torch.tensor([1.0, 2.0]))
    assert torch.equal(ref["exp_avg"][0, 1:256].cpu().long(), torch.arange(255))  # ties: the smaller index
    for key in ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax"):
        assert torch.equal(tri[key], ref[key]), key
    torch.testing.assert_close(outs["triton"]["w"], outs["reference"]["w"], rtol=1e-6, atol=1e-6)


def test_fused_step_refuses_state_it_cannot_read():
    """uint8 codes without an absmax, an absmax of the wrong block layout, an fp16 basis: TypeError, W untouched."""
    pr = _state_problem(7, 300, 3, "left", "int8", torch.float32, torch.float32, seed=8)
    st, before = pr["state"], pr["w"].clone()
    args = ([pr["w"]], [pr["g"]], [pr["p"]], [st["exp_avg"]], [st["exp_avg_sq"]], [2])
    kw = dict(GROUP, sides=["left"])
    with pytest.raises(TypeError, match="moments must be fp32, bf16, or uint8 codes"):
        ks.subspace_adamw(*args, **kw)
    with pytest.raises(TypeError, match=r"absmax of shape \(3, 2\)"):
        moments = [quant.Moment(st["exp_avg"], st["exp_avg_absmax"][:, :1])], [quant.moment(st, "exp_avg_sq")]
        ks.subspace_adamw(*args[:3], *moments, *args[5:], **kw)
    fp16 = _state_problem(7, 30, 3, "left", "float32", torch.float32, torch.float32, seed=9)
    with pytest.raises(TypeError, match="bases must be fp32 or bf16"):
        ks.subspace_adamw(
            [fp16["w"]],
            [fp16["g"]],
            [fp16["p"].half()],
            [fp16["state"]["exp_avg"]],
            [fp16["state"]["exp_avg_sq"]],
            [2],
            **kw,
        )
    assert torch.equal(pr["w"], before)
