"""The ``residual`` option (what a projected step does with the gradient outside its subspace) and
``plain_lr`` (the lr of the parameters that are not projected).

The residual's math is checked against an independent float64 formula on both engines (the Triton one
under ``TRITON_INTERPRET=1`` on CPU, set by conftest), the limiter against its bound over a run whose
gradients grow, and each mode by training a tiny LLaMA. Inputs are fresh random numbers, never zeros.
"""

from __future__ import annotations

import io
import math
import shlex

import pytest
import torch
from torch import nn

import subspace_optim as so
from subspace_optim import adam_rule, functional, residual_rule, triton_runtime

MODES = [m for m in residual_rule.RESIDUALS if m != "none"]
ENGINES = ["reference"] + (["triton"] if triton_runtime.available() else [])
HYPER = {"lr": 0.05, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1, "scale": 0.25}


def _problem(m, n, r, side, seed):
    gen = torch.Generator().manual_seed(seed)
    d = m if side == "left" else n
    rshape = (r, n) if side == "left" else (m, r)
    basis, _ = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64))
    return {
        "w": torch.randn(m, n, generator=gen),
        "g": torch.randn(m, n, generator=gen),
        "p": basis.float(),
        "m": 0.1 * torch.randn(rshape, generator=gen),
        "v": 0.01 + 0.1 * torch.rand(rshape, generator=gen),
    }


def _oracle(x, side, mode, age, previous, limiter="corrected"):
    """The documented update, written out in float64 without the engines' folding: with D the bias-corrected
    Adam direction and phi_j = ||D_j|| / ||R_j||, fira: U = P D + c S, S = phi o (G - P P^T G) / scale (Fira's
    rule: the residual is not scaled by GaLore's scale, and only it is limited); apollo: U = c phi o G. The
    ``_tensor`` modes take one phi for the whole matrix. The limiter c bounds ||S|| (apollo: ||phi o G||) by
    1.01 ``previous`` (first step: sqrt(d/r) ||D||, divided by scale for fira). ``limiter="raw"`` measures the
    same part as apollo-torch does, with the uncorrected direction m / (sqrt(v) + eps) in phi, and leaves the
    first step unbounded."""
    b1, b2 = HYPER["betas"]
    g, p = x["g"].double(), x["p"].double()
    r = p.T @ g if side == "left" else g @ p
    m = b1 * x["m"].double() + (1 - b1) * r
    v = b2 * x["v"].double() + (1 - b2) * r * r
    d = (m / (1 - b1**age)) / ((v / (1 - b2**age)).sqrt() + HYPER["eps"])
    d_raw = m / (v.sqrt() + HYPER["eps"])
    axis = 0 if side == "left" else 1
    whole = mode in ("apollo", "apollo_tensor")

    def phi_of(direction):
        if mode in ("fira_tensor", "apollo_tensor"):
            return ((direction.norm() / r.norm()) * torch.ones(r.shape[1 - axis], dtype=torch.float64)).unsqueeze(axis)
        return (direction.norm(dim=axis) / r.norm(dim=axis)).unsqueeze(axis)

    phi = phi_of(d)
    back = (lambda t: p @ t) if side == "left" else (lambda t: t @ p.T)
    weight = 1.0 if whole else 1.0 / HYPER["scale"]
    outside = g if whole else g - back(r)
    limited = weight * phi * outside  # the part the limiter bounds
    if limiter == "raw":
        measured = float((weight * phi_of(d_raw) * outside).norm())
        c = min(1.0, 1.01 * previous / measured) if previous > 0 else 1.0
    else:
        measured = float(limited.norm())
        limit = 1.01 * previous if previous > 0 else weight * math.sqrt(p.shape[0] / p.shape[1]) * float(d.norm())
        c = min(1.0, limit / measured)
    u = c * limited if whole else back(d) + c * limited
    w = x["w"].double() * (1 - HYPER["lr"] * HYPER["weight_decay"]) - HYPER["lr"] * HYPER["scale"] * u
    return w, m, v, c * measured, c


def _run_core(x, side, mode, age, previous, engine, **kwargs):
    w, m, v = x["w"].clone(), x["m"].clone(), x["v"].clone()
    norm = torch.tensor(previous, dtype=torch.float32)
    functional.subspace_adamw(
        [w],
        [x["g"]],
        [x["p"]],
        [m],
        [v],
        [age],
        **HYPER,
        sides=[side],
        engine=engine,
        residual=mode,
        update_norms=[norm],
        **kwargs,
    )
    return w, m, v, norm


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("previous", ["first", "bound", "free"])
@pytest.mark.parametrize("limiter", ["corrected", "raw"])
def test_residual_matches_float64_formula(engine, side, mode, previous, limiter):
    x = _problem(37, 21, 5, side, seed=hash((side, mode, previous)) % 1000)
    free = _oracle(x, side, mode, age=3, previous=1e9, limiter=limiter)[3]  # the unlimited update's norm
    prev = {"first": 0.0, "bound": 0.5 * free, "free": 10.0 * free}[previous]
    w0, m0, v0, norm0, c = _oracle(x, side, mode, age=3, previous=prev, limiter=limiter)
    if previous == "bound":
        assert c < 0.6  # the limiter acts: the limited part is scaled to 1.01 x the previous norm
    if previous == "free" or (previous == "first" and limiter == "raw"):
        assert c == 1.0
    w, m, v, norm = _run_core(x, side, mode, 3, prev, engine, limiter=limiter)
    torch.testing.assert_close(m.double(), m0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v.double(), v0, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w.double(), w0, rtol=0, atol=5e-6)
    assert float(norm) == pytest.approx(norm0, rel=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("mode", MODES)
def test_fp32_update_without_u_matches_the_formed_update(side, mode, monkeypatch):
    """An fp32 weight is updated by addmm into W plus coef o G in place; the path that forms U (bf16
    weights, compiled graphs) is the same math: both agree to fp32 rounding, and both match the oracle."""
    x = _problem(29, 45, 6, side, seed=17)
    fused = _run_core(x, side, mode, 4, 0.0, "reference")
    monkeypatch.setattr(adam_rule.torch.compiler, "is_compiling", lambda: True)  # takes the U path
    formed = _run_core(x, side, mode, 4, 0.0, "reference")
    torch.testing.assert_close(fused[0], formed[0], rtol=1e-6, atol=1e-6)
    assert not torch.equal(fused[0], x["w"])
    w0 = _oracle(x, side, mode, age=4, previous=0.0)[0]
    for w in (fused[0], formed[0]):
        torch.testing.assert_close(w.double(), w0, rtol=0, atol=5e-6)


@pytest.mark.parametrize("dim", [0, 1])
def test_channel_sumsq_in_bands_matches_float64(dim, monkeypatch):
    """Per-channel sums of squares down columns are taken in bands of rows (bounded temporaries); the
    bands' sum equals the float64 sum, for bands that do and do not divide the rows."""
    t = torch.randn(103, 37, generator=torch.Generator().manual_seed(2))
    want = t.double().square().sum(dim)
    for band in (1 << 22, 37 * 10, 37 * 7 + 3, 1):
        monkeypatch.setattr(residual_rule, "_SUMSQ_BAND", band)
        torch.testing.assert_close(residual_rule.channel_sumsq(t, dim).double(), want, rtol=1e-6, atol=0)


@pytest.mark.skipif("triton" not in ENGINES, reason="triton not installed")
@pytest.mark.parametrize("moments_dtype", ["bfloat16", "int8"])
@pytest.mark.parametrize("mode", MODES)
def test_engines_agree_with_low_precision_moments(moments_dtype, mode):
    """Both engines through the optimizer: low-precision moments, bf16 bases, both sides, 4 steps with a refresh
    (an exact SVD refresh, the same on both engines, so that only the steps are compared)."""
    results = []
    for engine in ("reference", "triton"):
        torch.manual_seed(3)
        model = nn.Sequential(nn.Linear(40, 24, bias=False), nn.Linear(24, 40, bias=False))
        opt = so.SubspaceAdamW(
            [{"params": list(model.parameters()), "rank": 4, "update_gap": 3, "refresh": "svd"}],
            lr=1e-2,
            engine=engine,
            residual=mode,
            moments_dtype=moments_dtype,
            basis_dtype="bfloat16",
        )
        gen = torch.Generator().manual_seed(5)
        for _ in range(4):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5)


def test_residual_none_is_the_plain_step_bit_for_bit():
    """``residual="none"`` is today's step: no state added, the same numbers bit for bit."""
    x = _problem(19, 11, 3, "right", seed=1)
    a = [x["w"].clone(), x["m"].clone(), x["v"].clone()]
    adam_rule.projected_adamw(a[0], x["g"], x["p"], a[1], a[2], adam_rule.adam_scalars(**HYPER, age=2), "right")
    b = _run_core(x, "right", "none", 2, 0.7, "reference")
    for u, v in zip(a, b, strict=False):
        assert torch.equal(u, v)
    assert float(b[3]) == pytest.approx(0.7)  # the limiter's state is not touched
    w = nn.Parameter(torch.randn(8, 6))
    w.grad = torch.randn(8, 6)
    opt = so.SubspaceAdamW([w], rank=2, residual="none")
    opt.step()
    assert "update_norm" not in opt.state[w] and opt.param_groups[0]["residual"] == "none"
    default = so.SubspaceAdamW([w], rank=2)  # the library default is Fira's residual
    default.step()
    assert default.param_groups[0]["residual"] == "fira" and "update_norm" in default.state[w]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mode", MODES)
def test_limiter_bounds_update_norm_growth(engine, mode):
    """Gradients whose part outside the subspace grows 30% a step: the norm of what the limiter bounds (read
    back from the weights: for fira the update's part outside the subspace, for apollo the whole update)
    grows by at most 1% a step, the state holds it, and the limiter does act."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(24, 17))
    lr, scale = 1e-3, 0.25
    opt = so.SubspaceAdamW([w], lr=lr, rank=3, update_gap=1000, scale=scale, residual=mode, engine=engine)
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(24, 17, generator=gen)
    norms = []
    for t in range(12):
        w.grad = base + (1.3**t) * torch.randn(24, 17, generator=gen)
        before = w.detach().clone()
        opt.step()
        delta = (w.detach() - before).double()
        if (
            mode not in residual_rule.WHOLE_GRADIENT
        ):  # P N lies inside the subspace; the limited residual is what lies outside it
            p = opt.state[w]["basis"].double()
            delta = delta - (p @ (p.T @ delta) if p.shape[0] == delta.shape[0] else (delta @ p) @ p.T)
        norms.append(float(delta.norm()) / (lr * scale))  # in units of the bias-corrected step
        assert float(opt.state[w]["update_norm"]) == pytest.approx(norms[-1], rel=1e-3)
    ratios = [b / a for a, b in zip(norms, norms[1:], strict=False)]
    assert max(ratios) <= 1.01 * (1 + 1e-4), ratios
    assert any(r > 1.009 for r in ratios), ratios  # it bound at least once


@pytest.mark.parametrize("mode", ["fira", "fira_tensor"])
def test_limiter_state_of_a_vanishing_residual_does_not_depend_on_rounding(mode):
    """A residual that vanishes (a fresh basis holding the whole gradient) is ||G_j||^2 - ||R_j||^2: exactly 0
    on one rank or engine, fp32 rounding noise on another. Both must leave the same limiter state (the
    floor), and the next step's residual must then be limited alike; stored noise would hold it near 0."""
    gen = torch.Generator().manual_seed(3)
    nn_, rr = torch.rand(5, generator=gen) + 0.5, torch.rand(5, generator=gen) + 0.5
    lengths = torch.tensor([5]) if mode == "fira" else None
    bias1, first, prev0 = (
        torch.tensor([0.5], dtype=torch.float64),
        torch.tensor([2.0], dtype=torch.float64),
        torch.zeros(1),
    )

    def factors(gg, previous):
        sumsq = torch.stack((nn_, rr, gg), 1)
        if lengths is None:
            sumsq = sumsq.sum(0, keepdim=True)
        return residual_rule.residual_factors(sumsq, lengths, previous, bias1, mode, first, 0.25)

    states = [factors(rr * (1 + noise), torch.full((1,), 7.0))[1] for noise in (0.0, 3e-7)]
    assert float(states[0]) > 0 and torch.equal(states[0], states[1])
    want = 0.01 * math.sqrt(float(nn_.sum())) / 0.25 / 0.5  # the floor: 1% of ||N|| / bias1, over scale
    assert float(states[0]) == pytest.approx(want, rel=1e-6)
    grown = rr * 3.0  # next step: a stale basis, a large residual
    coefs = [factors(grown, state)[0] for state in states]
    torch.testing.assert_close(coefs[0], coefs[1], rtol=0, atol=0)
    free = factors(grown, torch.full((1,), 1e9))[0]
    assert float(coefs[0].max()) < 0.1 * float(free.max())  # limited to 1.01 x the floor
    assert float(factors(grown, prev0)[0].max()) == pytest.approx(float(free.max()))  # the first step: unlimited here


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mode", MODES)
def test_residual_never_writes_nonfinite_weights(engine, mode):
    """A channel whose projection vanishes (exactly, or to 1e-30) while Adam's moment remembers it, next to
    a gradient near the largest the optimizer accepts: phi would be unbounded; the weights stay finite."""
    m, n, r = 20, 9, 2
    p = torch.zeros(m, r)
    p[0, 0] = p[1, 1] = 1.0  # a left basis: R = rows 0 and 1 of G
    g = torch.randn(m, n, generator=torch.Generator().manual_seed(2)) * 1e17
    g[:2, 0] = 0.0  # channel 0: R_0 = 0 exactly
    g[:2, 1] = 1e-30  # channel 1: R_1 tiny
    x = {"w": torch.randn(m, n), "g": g, "p": p, "m": torch.randn(r, n), "v": torch.rand(r, n) + 0.1}
    for previous in (0.0, 1e30):
        w, *_, norm = _run_core(x, "left", mode, 5, previous, engine)
        assert bool(torch.isfinite(w).all()) and math.isfinite(float(norm))


def _tiny(mode: str, dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 50)).to(dtype)
    opt = so.SubspaceAdamW(so.param_groups(model, "all-linear", rank=4, update_gap=3), lr=1e-2, residual=mode)
    return model, opt


def _train_steps(model, opt, steps, start=0):
    for i in range(start, start + steps):
        x = torch.randint(0, 50, (8,), generator=torch.Generator().manual_seed(i))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x).float(), (x + 1) % 50).backward()
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_checkpoint_carries_the_limiter_and_resumes_bit_exactly(mode, dtype):
    model, opt = _tiny(mode, dtype)
    _train_steps(model, opt, 7)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    model, opt = _tiny(mode, dtype)
    _train_steps(model, opt, 4)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    norms = [s["update_norm"] for s in saved["opt"]["state"].values() if "update_norm" in s]
    assert len(norms) == 2 and all(t.dtype == torch.float32 and float(t) > 0 for t in norms)
    model, opt = _tiny(mode, dtype)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    assert all(s["update_norm"].dtype == torch.float32 for s in opt.state.values() if "update_norm" in s)
    _train_steps(model, opt, 3, start=4)
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_residual_turned_on_for_a_resumed_run_creates_its_state():
    model, opt = _tiny("none")
    _train_steps(model, opt, 2)
    opt.param_groups[0]["residual"] = "fira"
    _train_steps(model, opt, 1, start=2)
    assert sum("update_norm" in s for s in opt.state.values()) == 2


def test_residual_option_is_validated():
    w = nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match="Invalid residual: 'fira_channel'.*'none', 'fira', 'fira_tensor', 'apollo'"):
        so.SubspaceAdamW([w], residual="fira_channel")
    with pytest.raises(ValueError, match="Invalid plain_lr: -0.1 in param group 0"):
        so.SubspaceAdamW([{"params": [w], "plain_lr": -0.1}])
    with pytest.raises(ValueError, match="residual must be one of"):
        functional.subspace_adamw([], [], [], [], [], [], **HYPER, sides=[], residual="fira_channel")
    with pytest.raises(ValueError, match="needs update_norms"):
        functional.subspace_adamw([w], [w], [w], [w], [w], [1], **HYPER, sides=["left"], residual="fira")


# --------------------------------------------------------------------------------------------- plain_lr
def _plain_and_projected(plain_lr, schedule=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(30, 12), nn.Linear(12, 30))
    groups = so.param_groups(model, "all-linear", rank=3, update_gap=4)
    opt = so.SubspaceAdamW(groups, lr=1e-2, plain_lr=plain_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule) if schedule else None
    return model, opt, sched


def _steps_with(model, opt, sched, steps=6):
    for i in range(steps):
        x = torch.randint(0, 30, (5,), generator=torch.Generator().manual_seed(i))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), x).backward()
        opt.step()
        if sched:
            sched.step()


@pytest.mark.parametrize("schedule", [None, lambda s: (s + 1) / 4 if s < 3 else 0.5 ** (s - 2)])
def test_plain_lr_trains_plain_parameters_as_adamw_at_that_lr_following_the_schedule(schedule):
    model, opt, sched = _plain_and_projected(3e-3, schedule)
    assert all(g["plain_lr"] == 3e-3 for g in opt.param_groups)
    # torch's AdamW on copies of the plain parameters (embedding, bias), its own scheduler at peak 3e-3
    plain_names = ["0.weight", "1.bias"]
    twin = {n: nn.Parameter(dict(model.named_parameters())[n].detach().clone()) for n in plain_names}
    adamw = torch.optim.AdamW(list(twin.values()), lr=3e-3, weight_decay=0.0)
    twin_sched = torch.optim.lr_scheduler.LambdaLR(adamw, schedule) if schedule else None
    reference, ref_opt, ref_sched = _plain_and_projected(None, schedule)
    for i in range(6):
        x = torch.randint(0, 30, (5,), generator=torch.Generator().manual_seed(i))
        for mod in (model, reference):
            mod.zero_grad()
            nn.functional.cross_entropy(mod(x), x).backward()
        for n in plain_names:
            twin[n].grad = dict(model.named_parameters())[n].grad.clone()
        opt.step()
        ref_opt.step()
        adamw.step()
        for s in (sched, ref_sched, twin_sched):
            if s:
                s.step()
    params = dict(model.named_parameters())
    for n in plain_names:
        torch.testing.assert_close(params[n].detach(), twin[n].detach(), rtol=1e-6, atol=1e-7)
    ref = dict(reference.named_parameters())
    assert not torch.allclose(params["0.weight"], ref["0.weight"])  # the group lr (1e-2) differs from 3e-3


def test_plain_lr_leaves_projected_matrices_alone():
    a, opt_a, _ = _plain_and_projected(1e-4)
    b, opt_b, _ = _plain_and_projected(None)
    # same gradients for both: feed b's gradients into a
    for i in range(4):
        x = torch.randint(0, 30, (5,), generator=torch.Generator().manual_seed(i))
        b.zero_grad()
        nn.functional.cross_entropy(b(x), x).backward()
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            pa.grad = pb.grad.clone()
        opt_a.step()
        opt_b.step()
    assert torch.equal(a[1].weight, b[1].weight)  # projected: group lr either way
    assert not torch.equal(a[0].weight, b[0].weight)


def test_plain_lr_through_trainer_optim_args_and_pretrain_flags():
    from subspace_optim.integrations.transformers import parse_optim_args
    from subspace_optim.pretrain import loop, optimizers
    from subspace_optim.pretrain.config import load_config

    assert parse_optim_args("rank=8, plain_lr=3e-3, residual=fira") == {"rank": 8, "plain_lr": 3e-3, "residual": "fira"}
    argv = shlex.split(
        "--hidden-size 32 --intermediate-size 64 --num-hidden-layers 1 --num-attention-heads 2 --plain-lr "
        "adamw=1e-3,subspace=2e-3 --lr adamw=3e-3,subspace=1e-2"
    )
    cfg = load_config(argv)
    model = loop.build_model(cfg, 64)
    adamw = optimizers.build("adamw", model, cfg)
    lrs = sorted({g["lr"] for g in adamw.param_groups})
    assert lrs == [1e-3, 3e-3]
    projected = {id(p) for _, p in so.param_groups(model, "all-linear", rank=cfg.rank)[0]["params"]}
    for g in adamw.param_groups:
        assert (g["lr"] == 3e-3) == all(id(p) in projected for p in g["params"])
    ours = optimizers.build("subspace", model, cfg)
    assert {g["plain_lr"] for g in ours.param_groups} == {2e-3}
    pytest.importorskip("galore_torch")
    cfg = load_config([*argv[:-4], "--optimizer", "galore", "--plain-lr", "galore=4e-3", "--lr", "galore=1e-2"])
    galore = optimizers.build("galore", model, cfg)
    for g in galore.param_groups:  # galore-torch's own groups: the projected ones carry "rank"
        assert g["lr"] == (1e-2 if "rank" in g else 4e-3)
    assert any("rank" in g for g in galore.param_groups) and any("rank" not in g for g in galore.param_groups)
