"""Stochastic rounding of bf16 weights (``stochastic_rounding=True``): unbiased against a float64 reference, exact on
special values, identical on every rank and after a resume, small updates kept on average, both engines."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import roundtrip
from torch import nn

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from subspace_optim import SubspaceAdamW, rounding, triton_runtime  # noqa: E402

ENGINES = ["reference"] + (["triton"] if triton_runtime.available() else [])
SHAPES = [(24, 32), (16, 24)]


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """The bf16 grid spacing at each |x| (float64)."""
    exponent = torch.floor(torch.log2(x.abs().double().clamp_min(2.0**-126)))
    return torch.pow(2.0, exponent - 7)


def test_rounding_is_unbiased_against_float64():
    """Each result is one of the two bf16 neighbours of x, and over 512 seeds the mean is x (float64) within six
    standard errors, where rounding to nearest is off by up to half an ulp."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2048, generator=gen) * torch.logspace(-3, 3, 2048)
    down = x.to(torch.bfloat16).float()  # the neighbours, from the pattern truncated and truncated + 1 ulp
    low = (x.view(torch.int32) & -(1 << 16)).view(torch.float32)
    high = ((x.view(torch.int32) & -(1 << 16)) + (1 << 16)).view(torch.float32)
    total = torch.zeros_like(x, dtype=torch.float64)
    seeds = 512
    for seed in range(seeds):
        r = rounding.round_stochastically(x.clone(), rounding.rounding_bits(x.shape, seed, x.device))
        assert bool(((r == low) | (r == high)).all())
        assert torch.equal(r.to(torch.bfloat16).float(), r)  # already bf16 numbers: the cast is exact
        total += r.double()
    error = (total / seeds - x.double()).abs() / _ulp(x)
    assert float(error.max()) < 6 * 0.5 / seeds**0.5
    assert float((down.double() - x.double()).abs().div(_ulp(x)).max()) > 0.4  # nearest is biased here


def _rounding_kernel():
    """A kernel that applies the step epilogue's rounding to a vector (its globals must be this module's)."""
    import triton
    import triton.language as tl

    global round_bf16_stochastic
    from subspace_optim.kernels.step import round_bf16_stochastic

    @triton.jit
    def rounded(out, x, seed, n, BLOCK: tl.constexpr):
        e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = e < n
        tl.store(out + e, round_bf16_stochastic(tl.load(x + e, mask=ok), seed, e.to(tl.int64)), mask=ok)

    return rounded


@pytest.mark.skipif("triton" not in ENGINES, reason="needs triton")
def test_the_kernels_rounding_is_unbiased_and_keeps_special_values():
    """The Triton epilogue's rounding (``kernels.step.round_bf16_stochastic``, Philox bits): each result a bf16
    neighbour of x, the mean over 64 seeds x within six standard errors, special values as the reference keeps
    them."""
    rounded = _rounding_kernel()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1024, generator=gen) * torch.logspace(-3, 3, 1024)
    low = (x.view(torch.int32) & -(1 << 16)).view(torch.float32)
    high = ((x.view(torch.int32) & -(1 << 16)) + (1 << 16)).view(torch.float32)
    total = torch.zeros_like(x, dtype=torch.float64)
    out = torch.empty_like(x)
    seeds = 64
    for seed in range(seeds):
        rounded[(4,)](out, x, rounding.rounding_seed(0, 1, seed), x.numel(), BLOCK=256)
        assert bool(((out == low) | (out == high)).all())
        total += out.double()
    assert float(((total / seeds - x.double()).abs() / _ulp(x)).max()) < 6 * 0.5 / seeds**0.5
    nans = torch.tensor([0x7FC00000, -(1 << 22), 0x7FFEFFFF], dtype=torch.int32).view(torch.float32)
    special = torch.cat([torch.tensor([1.0, -2.5, 0.0, -0.0, float("inf"), float("-inf")]), nans])
    out = torch.empty_like(special)
    for seed in range(8):
        rounded[(1,)](out, special, seed, special.numel(), BLOCK=16)
        assert torch.equal(out[:6].view(torch.int32), special[:6].view(torch.int32))
        assert bool(out[6:].isnan().all())


def test_special_values_are_kept():
    """bf16 numbers, zeros and infinities come back unchanged whatever the bits; NaNs as arithmetic makes them stay
    NaNs (only a hand-made all-ones payload could carry into the sign)."""
    values = torch.tensor([1.0, -2.5, 0.0, -0.0, float("inf"), float("-inf"), 3.0e38])
    nans = torch.tensor([0x7FC00000, -(1 << 22), 0x7F80FFFF, 0x7FFEFFFF], dtype=torch.int32).view(torch.float32)
    x = torch.cat([values.to(torch.bfloat16).float(), nans])
    for seed in range(20):
        bits = (
            torch.full(x.shape, 0xFFFF, dtype=torch.int32)
            if seed == 0
            else rounding.rounding_bits(x.shape, seed, x.device)
        )
        r = rounding.round_stochastically(x.clone(), bits)
        assert torch.equal(r[: len(values)].view(torch.int32), x[: len(values)].view(torch.int32))
        assert bool(r[len(values) :].isnan().all())


def _run(engine, *, sr=True, dtype=torch.bfloat16, seed=0, steps=4, start=0, weights=None, opt_state=None, **kw):
    """SubspaceAdamW on two projected matrices and a plain vector, from bf16 numbers (held in ``dtype``), with
    bf16 gradients; ``weights``: the matrices to continue from (a resume)."""
    gen = torch.Generator().manual_seed(1)
    drawn = [torch.randn(s, generator=gen).to(torch.bfloat16).to(dtype) for s in [*SHAPES, (40,)]]
    ws = weights or [nn.Parameter(t) for t in drawn[:-1]]
    bias = nn.Parameter(drawn[-1])
    groups = [{"params": ws, "rank": 4, "update_gap": 3}, {"params": [bias]}]
    opt = SubspaceAdamW(groups, lr=3e-2, stochastic_rounding=sr, seed=seed, engine=engine, **kw)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    for t in range(start, start + steps):
        for p in (*ws, bias):
            g = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * t + p.numel()))
            p.grad = g.to(torch.bfloat16).to(dtype)
        opt.step()
    return opt, [*ws, bias]


@pytest.mark.parametrize("engine", ENGINES)
def test_ranks_agree_and_a_resume_is_bit_exact(engine):
    """Two optimizers with the same seed (two data-parallel ranks) write the same bits; a run saved after 3 steps
    and resumed from a weights_only checkpoint continues bit for bit; another seed rounds otherwise; without the
    option the run differs (it rounds to nearest)."""
    a, wa = _run(engine, steps=6)
    b, wb = _run(engine, steps=6)
    assert all(torch.equal(x, y) for x, y in zip(wa, wb, strict=True))
    first, w3 = _run(engine, steps=3)
    saved = roundtrip(first.state_dict())
    resumed_w = [nn.Parameter(w.detach().clone()) for w in w3[:2]]
    _, wr = _run(engine, steps=3, start=3, weights=resumed_w, opt_state=saved)
    assert all(torch.equal(x, y) for x, y in zip(wa[:2], wr[:2], strict=True))
    _, other = _run(engine, steps=6, seed=1)
    _, nearest = _run(engine, steps=6, sr=False)
    assert not torch.equal(wa[0], other[0]) and not torch.equal(wa[0], nearest[0])


@pytest.mark.parametrize("engine", ENGINES)
def test_fp32_weights_ignore_the_option(engine):
    _, a = _run(engine, dtype=torch.float32)
    _, b = _run(engine, dtype=torch.float32, sr=False)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    "engine, options",
    [
        ("reference", {}),
        ("reference", {"residual": "none", "moments_dtype": "int8"}),
        ("reference", {"second_moment": "factored"}),
        *([pytest.param("triton", {}, marks=pytest.mark.slow)] if "triton" in ENGINES else []),
    ],
)
def test_one_step_is_the_fp32_step_in_expectation(engine, options):
    """From bf16 weights and gradients, one step's bf16 result averaged over 64 seeds is the same step taken with
    fp32 weights (the same numbers, so the same fp32 update) within six standard errors of the rounding, for the
    projected matrices and the plain vector alike; rounding to nearest is off by up to half an ulp."""
    options = {**options, "matmul_precision": "ieee"}
    _, target = _run(engine, dtype=torch.float32, sr=False, steps=1, **options)
    seeds = 64
    total = [torch.zeros(t.shape, dtype=torch.float64) for t in target]
    for seed in range(seeds):
        _, got = _run(engine, steps=1, seed=seed, **options)
        for acc, w in zip(total, got, strict=True):
            acc += w.detach().double()
    for acc, t in zip(total, target, strict=True):
        t = t.detach()
        error = (acc / seeds - t.double()).abs() / _ulp(t)
        assert float(error.max()) < 6 * 0.5 / seeds**0.5, float(error.max())


def test_updates_below_half_an_ulp_survive_on_average():
    """A bf16 vector at 1.0 stepped 64 times by updates of about 1e-4 (a fortieth of its ulp below 1): rounding to
    nearest never moves it; stochastic rounding moves its mean where fp32 weights go (the updates do not depend on
    the weight), within five standard errors (each entry's walk has a standard deviation of about 1.3 ulps)."""
    finals = {}
    for dtype, sr in ((torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)):
        w = nn.Parameter(torch.ones(4096, dtype=dtype))
        opt = SubspaceAdamW([{"params": [w], "rank": None}], lr=1e-4, betas=(0.0, 0.999), stochastic_rounding=sr)
        for _ in range(64):
            w.grad = torch.ones_like(w)
            opt.step()
        finals[dtype, sr] = w.detach().double()
    target = float(finals[torch.float32, False][0])
    assert target == pytest.approx(1.0 - 64e-4, rel=1e-4)
    assert bool((finals[torch.bfloat16, False] == 1.0).all())
    stochastic = finals[torch.bfloat16, True]
    assert abs(float(stochastic.mean()) - target) < 5 * 1.3 * 2.0**-8 / stochastic.numel() ** 0.5


def test_the_option_is_validated():
    with pytest.raises(TypeError, match="Invalid stochastic_rounding.*must be True or False"):
        SubspaceAdamW([nn.Parameter(torch.ones(3))], stochastic_rounding="yes")


@pytest.mark.parametrize("engine", ENGINES)
def test_a_skipped_matrix_keeps_its_bits(engine):
    """A matrix whose gradient holds a NaN is skipped (``nonfinite="skip"``): with stochastic rounding its bf16
    weight keeps every bit, while the other matrix steps."""
    gen = torch.Generator().manual_seed(3)
    ws = [nn.Parameter(torch.randn(s, generator=gen).to(torch.bfloat16)) for s in SHAPES]
    opt = SubspaceAdamW([{"params": ws, "rank": 4}], lr=1e-2, stochastic_rounding=True, engine=engine)
    for w in ws:
        w.grad = torch.randn(w.shape, generator=gen).to(torch.bfloat16)
    opt.step()
    before = [w.detach().clone() for w in ws]
    ws[0].grad = torch.randn(ws[0].shape, generator=gen).to(torch.bfloat16)
    ws[0].grad[2, 3] = float("nan")
    ws[1].grad = torch.randn(ws[1].shape, generator=gen).to(torch.bfloat16)
    opt.step()
    assert torch.equal(ws[0].view(torch.int16), before[0].view(torch.int16))
    assert not torch.equal(ws[1], before[1])


def test_layerwise_updates_round_as_regular_steps():
    """Updates inside backward (``update_in_backward``) draw the same bits as ``step()``: the weights agree bit for
    bit after four steps."""
    from subspace_optim import param_groups

    def run(layerwise: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 16)).to(torch.bfloat16)
        opt = SubspaceAdamW(param_groups(model, "all-linear", rank=4), lr=1e-2, stochastic_rounding=True)
        if layerwise:
            opt.update_in_backward(model)
        for t in range(4):
            x = torch.randn(8, 32, generator=torch.Generator().manual_seed(t)).to(torch.bfloat16)
            model(x).float().square().mean().backward()
            if not layerwise:
                opt.step()
                opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(x, y) for x, y in zip(run(False), run(True), strict=True))


def test_a_rounded_plain_weight_is_fused_adamw_on_fp32_copies_then_the_rounding():
    """The plain bf16 path (``functional.adamw`` with seeds): torch's fused AdamW on fp32 copies of the weight, its
    gradient and its bf16 moments, the weight rounded with ``rounding_bits`` of its seed, the moments rounded to
    nearest; bit for bit, for two parameters of different shapes in one call (the kept CPU buffers serve both),
    twice (the second step reuses them)."""
    from torch.optim.adam import adam

    from subspace_optim import functional

    gen = torch.Generator().manual_seed(5)
    shapes, seeds = [(300, 40), (7, 9000)], [11, 12]
    ps = [torch.randn(s, generator=gen).bfloat16() for s in shapes]
    ms = [torch.randn(s, generator=gen).mul(0.01).bfloat16() for s in shapes]
    vs = [torch.rand(s, generator=gen).mul(1e-4).bfloat16() for s in shapes]
    want = [(p.float(), m.float(), v.float()) for p, m, v in zip(ps, ms, vs, strict=True)]
    hyper = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    kwargs = dict(decoupled_weight_decay=True, amsgrad=False, maximize=False, lr=1e-2, weight_decay=0.1, eps=1e-8)
    steps, ref_steps = [torch.tensor(3.0) for _ in ps], [torch.tensor(3.0) for _ in ps]
    for k in range(2):
        gs = [torch.randn(s, generator=gen).bfloat16() for s in shapes]
        run_seeds = [s + 100 * k for s in seeds]
        functional.adamw(ps, gs, ms, vs, steps, **hyper, foreach=None, rounding_seeds=run_seeds)
        for i, (w, m, v) in enumerate(want):
            adam(
                [w],
                [gs[i].float()],
                [m],
                [v],
                [],
                [ref_steps[i]],
                foreach=False,
                fused=True,
                beta1=0.9,
                beta2=0.95,
                **kwargs,
            )
            w.copy_(rounding.round_stochastically(w, rounding.rounding_bits(w.shape, run_seeds[i], w.device)))
            m.copy_(m.bfloat16().float())
            v.copy_(v.bfloat16().float())
        for p, m, v, (w, wm, wv) in zip(ps, ms, vs, want, strict=True):
            assert torch.equal(p.float(), w) and torch.equal(m.float(), wm) and torch.equal(v.float(), wv)
