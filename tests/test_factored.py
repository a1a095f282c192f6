"""The factored second moment (``second_moment="factored"``): against a hand-written Adafactor-in-subspace
reference in float64, for projected matrices on both sides and for plain 2-D parameters; both engines; exact
transport at a refresh; conversions; skips; resume."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_state, roundtrip
from torch import nn

from subspace_optim import SubspaceAdamW, factored, functional, triton_runtime
from subspace_optim.factored import Factored

ENGINES = ["reference"] + (["triton"] if triton_runtime.available() else [])
HYPER = {"lr": 0.02, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1, "scale": 0.5}


def _adafactor_in_subspace(w, p, gs, side, hyper=HYPER, floor=True):
    """float64: R = P^T G (left) or G P (right); M, row and column EMAs of R o R; V = row col^T / s with s the
    sum of the factor along the side that is not projected; torch AdamW's update with V in Adam's place, its
    bias-corrected sqrt(V) raised to |M_hat| where lower (``floor``: the library's rule, ``factored``)."""
    b1, b2 = hyper["betas"]
    w, p = w.double().clone(), p.double()
    m = row = col = None
    for t, g in enumerate(gs, start=1):
        g = g.double()
        r = p.T @ g if side == "left" else g @ p
        if m is None:
            m, row, col = (
                torch.zeros_like(r),
                torch.zeros(r.shape[0], dtype=torch.float64),
                torch.zeros(r.shape[1], dtype=torch.float64),
            )
        m = b1 * m + (1 - b1) * r
        row = b2 * row + (1 - b2) * (r * r).sum(1)
        col = b2 * col + (1 - b2) * (r * r).sum(0)
        s = col.sum() if side == "left" else row.sum()
        v = torch.outer(row, col) / s
        root = (v / (1 - b2**t)).sqrt()
        if floor:
            root = torch.maximum(root, (m / (1 - b1**t)).abs())
        n = (m / (1 - b1**t)) / (root + hyper["eps"])
        u = p @ n if side == "left" else n @ p.T
        w = w * (1 - hyper["lr"] * hyper["weight_decay"]) - hyper["lr"] * hyper["scale"] * u
    return w, m, row, col


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_projected_step_matches_adafactor_in_subspace_in_float64(engine, side):
    gen = torch.Generator().manual_seed(7)
    m_, n_, r_ = 29, 17, 5
    d = m_ if side == "left" else n_
    p = torch.linalg.qr(torch.randn(d, r_, generator=gen, dtype=torch.float64))[0].float()
    w0 = torch.randn(m_, n_, generator=gen)
    gs = [torch.randn(m_, n_, generator=gen) * (1 + t) for t in range(4)]
    w = w0.clone()
    rshape = (r_, n_) if side == "left" else (m_, r_)
    m = torch.zeros(rshape)
    f = Factored(torch.zeros(rshape[0]), torch.zeros(rshape[1]))
    for t, g in enumerate(gs, start=1):
        functional.subspace_adamw([w], [g], [p], [m], [f], [t], **HYPER, sides=[side], engine=engine)
    w_ref, m_ref, row_ref, col_ref = _adafactor_in_subspace(w0, p, gs, side)
    unfloored = _adafactor_in_subspace(w0, p, gs, side, floor=False)[0]
    assert (w_ref - unfloored).abs().max() > 1e-3  # the floor binds in these steps: the test sees it
    torch.testing.assert_close(m.double(), m_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f.row.double(), row_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f.col.double(), col_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.double(), w_ref, rtol=0, atol=2e-5)


def test_plain_parameter_matches_adamw_with_factored_v_in_float64():
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(13, 6, generator=gen)
    gs = [torch.randn(13, 6, generator=gen) for _ in range(4)]
    w = nn.Parameter(w0.clone())
    hyper = {k: v for k, v in HYPER.items() if k != "scale"}
    opt = SubspaceAdamW([w], **hyper, second_moment="factored")
    for g in gs:
        w.grad = g.clone()
        opt.step()
    state = opt.state[w]
    assert set(state) == {"step", "exp_avg", "exp_avg_sq_row", "exp_avg_sq_col"}
    # A plain parameter is its own "projection" with P = I on the right: the same formula, s = sum(row).
    w_ref, m_ref, row_ref, col_ref = _adafactor_in_subspace(w0, torch.eye(6), gs, "right", {**hyper, "scale": 1.0})
    torch.testing.assert_close(state["exp_avg"].double(), m_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state["exp_avg_sq_row"].double(), row_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.detach().double(), w_ref, rtol=0, atol=2e-5)
    bias = nn.Parameter(torch.randn(6))  # 1-D: Adam's full V, torch AdamW's own state
    opt = SubspaceAdamW([bias], second_moment="factored")
    bias.grad = torch.randn(6)
    opt.step()
    assert "exp_avg_sq" in opt.state[bias]


def _model_weights(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(*s, generator=gen)) for s in [(24, 10), (10, 24), (16, 16), (30, 8)]]


def _train(opt, weights, steps, start=0):
    for step in range(start, start + steps):
        gen = torch.Generator().manual_seed(100 + step)
        for w in weights:
            w.grad = torch.randn(w.shape, generator=gen)
        opt.step()


def _opt(weights, **options):
    groups = [{"params": weights[:3], "rank": 3, "update_gap": 3}, {"params": weights[3:]}]
    return SubspaceAdamW(groups, lr=1e-2, second_moment="factored", **options)


CASES = [
    {},
    {"moments_dtype": "int8"},
    {"residual": "fira"},
    {"refresh": "dct", "residual": "fira_tensor"},
    {"refresh": "seeded", "residual": "apollo", "moments": "keep"},
    {"moments": "reset"},
]


@pytest.mark.skipif(len(ENGINES) < 2, reason="needs triton")
@pytest.mark.parametrize("options", CASES, ids=lambda o: "-".join(f"{v}" for v in o.values()) or "default")
def test_engines_agree(options):
    a_w, b_w = _model_weights(), _model_weights()
    a, b = _opt(a_w, engine="reference", **options), _opt(b_w, engine="triton", **options)
    _train(a, a_w, 7)
    _train(b, b_w, 7)
    # The engines' weights differ by fp32 rounding after one step; an 8-bit first moment at a code's midpoint may
    # then store the neighbouring code (tests/test_kernels.py checks one step code by code), which later steps
    # carry: one code of the map, times lr.
    tol = dict(rtol=0, atol=1e-3) if options.get("moments_dtype") == "int8" else dict(rtol=1e-4, atol=1e-5)
    for x, y in zip(a_w, b_w, strict=True):
        torch.testing.assert_close(y, x, **tol)


@pytest.mark.parametrize("options", CASES[:2] + CASES[3:5], ids=["fp32", "int8", "dct", "seeded"])
def test_resume_is_bit_exact_and_state_is_tensors_and_numbers(options):
    a_w = _model_weights()
    a = _opt(a_w, **options)
    _train(a, a_w, 4)
    saved, saved_w = roundtrip(a.state_dict()), [w.detach().clone() for w in a_w]
    _train(a, a_w, 5, start=4)
    b_w = [nn.Parameter(w) for w in saved_w]
    b = _opt(b_w, **options)
    b.load_state_dict(saved)
    for w in b_w[:3]:
        assert b.state[w]["exp_avg_sq_row"].dtype == torch.float32 and "exp_avg_sq" not in b.state[w]
    _train(b, b_w, 5, start=4)
    assert_same_state(a.state_dict(), b.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(a_w, b_w, strict=True))


@pytest.mark.parametrize("side", ["left", "right"])
def test_rotation_maps_the_factored_v_exactly(side):
    """V <- (C o C) V along the projected side is exactly a new projected-side factor over the same total."""
    gen = torch.Generator().manual_seed(1)
    f = Factored(torch.rand(5, generator=gen) + 0.1, torch.rand(7, generator=gen) + 0.1)
    if side == "right":
        f = Factored(torch.rand(7, generator=gen) + 0.1, torch.rand(5, generator=gen) + 0.1)
    c = torch.linalg.qr(torch.randn(5, 5, generator=gen))[0]
    v = factored.expand(f, side)
    expected = c.square() @ v if side == "left" else v @ c.square().mT
    factored.transport(f, c, side, "rotate")
    torch.testing.assert_close(factored.expand(f, side), expected, rtol=1e-5, atol=1e-7)


def test_skipped_matrix_keeps_its_factors_bit_for_bit():
    weights = _model_weights()
    opt = _opt(weights, moments_dtype="int8")
    _train(opt, weights, 2)
    before = {id(w): {k: v.clone() for k, v in opt.state[w].items() if torch.is_tensor(v)} for w in weights}
    w_before = [w.detach().clone() for w in weights]
    gen = torch.Generator().manual_seed(9)
    for w in weights:
        w.grad = torch.randn(w.shape, generator=gen)
    weights[0].grad[2, 3] = float("nan")
    opt.step()
    assert torch.equal(weights[0], w_before[0])
    for k, v in before[id(weights[0])].items():
        assert torch.equal(opt.state[weights[0]][k], v), k
    assert not torch.equal(weights[1], w_before[1])


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_skipped_step_is_as_if_it_never_happened(side):
    """A non-finite gradient skips the step on the device; the later steps' bias corrections (and the floor's:
    ``adam_rule``) use the matrix's true age, so the run equals the float64 reference that never saw that step."""
    gen = torch.Generator().manual_seed(11)
    m_, n_ = (17, 29) if side == "left" else (29, 17)  # the library projects the shorter side
    w = nn.Parameter(torch.randn(m_, n_, generator=gen))
    w0 = w.detach().clone()
    gs = [torch.randn(m_, n_, generator=gen) * (1 + t) for t in range(4)]
    bad = gs[1].clone()
    bad[3, 4] = float("inf")
    opt = SubspaceAdamW(
        [{"params": [w], "rank": 5, "update_gap": 100, "scale": HYPER["scale"]}],
        **{k: v for k, v in HYPER.items() if k != "scale"},
        second_moment="factored",
        residual="none",
    )
    for g in [gs[0], bad, *gs[2:]]:
        w.grad = g.clone()
        opt.step()
    state = opt.state[w]
    assert state["basis"].shape[0] == min(m_, n_)  # one basis, from step 1 (no refresh since)
    w_ref, m_ref, _, _ = _adafactor_in_subspace(w0, state["basis"], [gs[0], *gs[2:]], side)
    torch.testing.assert_close(state["exp_avg"].double(), m_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.detach().double(), w_ref, rtol=0, atol=2e-5)


def test_switching_second_moment_converts_state():
    weights = _model_weights()
    opt = SubspaceAdamW([{"params": weights[:3], "rank": 3, "update_gap": 3}, {"params": weights[3:]}], lr=1e-2)
    _train(opt, weights, 2)
    full = opt.state[weights[0]]["exp_avg_sq"].clone()
    for group in opt.param_groups:
        group["second_moment"] = "factored"
    _train(opt, weights, 1, start=2)
    state = opt.state[weights[0]]
    assert "exp_avg_sq" not in state and state["exp_avg_sq_row"].shape == (full.shape[0],)
    for group in opt.param_groups:
        group["second_moment"] = "full"
    _train(opt, weights, 1, start=3)
    assert "exp_avg_sq" in opt.state[weights[0]] and "exp_avg_sq_row" not in opt.state[weights[0]]
    assert all(torch.isfinite(w).all() for w in weights)


def test_factored_state_is_rows_plus_columns():
    weights = _model_weights()
    full, fact = SubspaceAdamW([{"params": weights[:3], "rank": 3}], lr=1e-2), _opt(_model_weights())
    _train(full, weights, 1)
    _train(fact, list(fact.param_groups[0]["params"]) + list(fact.param_groups[1]["params"]), 1)
    for w_full, w_fact in zip(weights[:3], fact.param_groups[0]["params"], strict=True):
        v = full.state[w_full]["exp_avg_sq"]
        row, col = fact.state[w_fact]["exp_avg_sq_row"], fact.state[w_fact]["exp_avg_sq_col"]
        assert (row.numel(), col.numel()) == tuple(v.shape)
