"""Bases that are never stored (``refresh="seeded"`` and ``"dct"``): what the state holds, the regenerated
projection's statistics, its equality across ranks and after a resume, the chunked step, bad combinations, and the
engines against each other."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_same_state, roundtrip
from torch import nn

from subspace_optim import SubspaceAdamW, dct, projections, triton_runtime

SHAPES = [(24, 10), (10, 24), (16, 16), (33, 20)]
SEEDED = {"refresh": "seeded", "moments": "keep", "residual": "apollo"}
DCT = {"refresh": "dct"}
ENGINES = ["reference"] + (["triton"] if triton_runtime.available() else [])


def _weights(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(*s, generator=gen)) for s in SHAPES]


def _grads(step, seed=1):
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    return [torch.randn(*s, generator=gen) for s in SHAPES]


def _train(opt, weights, steps, start=0):
    for step in range(start, start + steps):
        for w, g in zip(weights, _grads(step), strict=True):
            w.grad = g
        opt.step()


def _optimizer(weights, **options):
    return SubspaceAdamW([{"params": weights, "rank": 3, "update_gap": 4}], lr=1e-2, **options)


@pytest.mark.parametrize("options", [SEEDED, DCT, {**SEEDED, "residual": "apollo_tensor", "moments": "reset"}])
def test_state_holds_a_seed_or_indices_and_no_basis(options):
    weights = _weights()
    opt = _optimizer(weights, **options)
    _train(opt, weights, 9)
    for w in weights:
        state = opt.state[w]
        assert "basis" not in state and state["refresh_count"] == 3
        if options["refresh"] == "seeded":
            assert type(state["projection_seed"]) is int and "basis_index" not in state
        else:
            index = state["basis_index"]
            assert index.dtype == torch.int32 and index.shape == (3,) and "projection_seed" not in state
    stored = _optimizer(_weights(), **{**options, "refresh": "random"} if options["refresh"] == "seeded" else {})
    _train(stored, list(stored.param_groups[0]["params"]), 1)
    assert opt.subspace_metrics()["overall"]["state_bytes"] < stored.subspace_metrics()["overall"]["state_bytes"]


def test_apollo_stream_statistics():
    """apollo-torch's stream: entries N(0, 1/r), and independent draws from one refresh to the next (the counter
    stream's signs: ``test_philox``)."""
    d, r = 4096, 64
    cpu = torch.device("cpu")
    p = projections.seeded_projection(d, r, "left", 11, cpu, "apollo")
    assert p.shape == (d, r)
    assert abs(float(p.mean())) < 4 / math.sqrt(d * r) * math.sqrt(1 / r) * 10
    assert float(p.var() * r) == pytest.approx(1.0, rel=0.02)
    right = projections.seeded_projection(d, r, "right", 11, cpu, "apollo")
    assert right.shape == (d, r) and not torch.equal(right, p)
    a, b = (
        projections.seeded_projection(d, r, "left", projections.linalg.sketch_seed(0, 5, k), cpu, "apollo")
        for k in (0, 1)
    )
    corr = float((a * b).sum() / (a.norm() * b.norm()))
    assert abs(corr) < 5 / math.sqrt(d * r)  # independent draws: correlation at the noise level
    # Norms are preserved in expectation (APOLLO's scaling): ||P^T g|| ~ ||g||.
    g = torch.randn(d, 200, generator=torch.Generator().manual_seed(3))
    ratio = float((p.mT @ g).norm() / g.norm())
    assert ratio == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("options", [SEEDED, DCT], ids=["seeded", "dct"])
def test_ranks_draw_the_same_projection_and_a_resume_is_bit_exact(options):
    """Two optimizers with the same seed (two data-parallel ranks) hold the same state; a run saved after 6 steps,
    loaded with weights_only into a fresh optimizer and resumed matches the uninterrupted run bit for bit."""
    ws_a, ws_b = _weights(), _weights()
    a, b = _optimizer(ws_a, **options), _optimizer(ws_b, **options)
    _train(a, ws_a, 6)
    _train(b, ws_b, 6)
    assert_same_state(a.state_dict(), b.state_dict())
    saved_weights = [w.detach().clone() for w in ws_a]
    saved = roundtrip(a.state_dict())
    _train(a, ws_a, 7, start=6)
    resumed_w = [nn.Parameter(w.clone()) for w in saved_weights]
    resumed = _optimizer(resumed_w, **options)
    resumed.load_state_dict(saved)
    _train(resumed, resumed_w, 7, start=6)
    assert_same_state(a.state_dict(), resumed.state_dict())
    for x, y in zip(ws_a, resumed_w, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("options", [SEEDED, DCT], ids=["seeded", "dct"])
def test_chunked_step_is_the_one_call_step(options, monkeypatch):
    """Projections drawn in small chunks give the same bits as all at once."""
    ws_a, ws_b = _weights(), _weights()
    a = _optimizer(ws_a, **options)
    _train(a, ws_a, 5)
    monkeypatch.setattr(projections, "CHUNK_BYTES", 1)
    b = _optimizer(ws_b, **options)
    _train(b, ws_b, 5)
    assert_same_state(a.state_dict(), b.state_dict())
    for x, y in zip(ws_a, ws_b, strict=True):
        assert torch.equal(x, y)
    assert len(list(projections.regenerated_chunks([10, 24, 16], 3, budget=1))) == 3


@pytest.mark.skipif(len(ENGINES) < 2, reason="needs triton")
@pytest.mark.parametrize(
    "options",
    [SEEDED, {**SEEDED, "residual": "apollo_tensor"}, DCT, {**DCT, "residual": "fira"}, {**DCT, "moments": "reset"}],
    ids=["seeded", "seeded-tensor", "dct", "dct-fira", "dct-reset"],
)
def test_engines_agree(options):
    ws_a, ws_b = _weights(), _weights()
    a, b = _optimizer(ws_a, engine="reference", **options), _optimizer(ws_b, engine="triton", **options)
    _train(a, ws_a, 9)
    _train(b, ws_b, 9)
    for x, y in zip(ws_a, ws_b, strict=True):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "options, fix",
    [
        ({"refresh": "seeded"}, "residual='apollo'"),
        ({"refresh": "seeded", "residual": "fira", "moments": "keep"}, "residual='apollo'"),
        ({"refresh": "seeded", "residual": "apollo"}, "moments='keep'"),
    ],
)
def test_bad_combinations_are_refused_before_anything_changes(options, fix):
    """At construction, and on a live group changed into the combination: at the next step, before it moves."""
    weights = _weights()
    with pytest.raises(ValueError, match="seed_stream.*'counter', 'apollo'"):
        _optimizer(weights, **SEEDED, seed_stream="mt")
    with pytest.raises(ValueError, match=fix):
        _optimizer(weights, **options)
    opt = _optimizer(weights, **DCT)
    _train(opt, weights, 1)
    before = [w.detach().clone() for w in weights]
    state = {k: dict(v) for k, v in opt.state.items()}
    opt.param_groups[0].update(options)
    with pytest.raises(ValueError, match=fix):
        _train(opt, weights, 1, start=1)
    assert all(torch.equal(w, b) for w, b in zip(weights, before, strict=True))
    assert all(opt.state[p]["step"] == s["step"] for p, s in state.items())


def test_a_group_switches_between_stored_and_regenerated_bases_at_its_refresh():
    weights = _weights()
    opt = _optimizer(weights)
    _train(opt, weights, 2)
    opt.param_groups[0].update(DCT)
    _train(opt, weights, 2, start=2)  # still the stored basis until the refresh at step 4
    assert all("basis" in opt.state[w] for w in weights)
    _train(opt, weights, 1, start=4)
    assert all("basis" not in opt.state[w] and "basis_index" in opt.state[w] for w in weights)
    opt.param_groups[0].update(SEEDED)
    _train(opt, weights, 4, start=5)
    assert all("basis_index" not in opt.state[w] and "projection_seed" in opt.state[w] for w in weights)
    opt.param_groups[0].update(refresh="warm", residual="none", moments="rotate")
    _train(opt, weights, 4, start=9)
    assert all(set(opt.state[w]) & set(projections.BASIS_KEYS) == {"basis"} for w in weights)
    assert all(torch.isfinite(w).all() for w in weights)


def test_dct_moments_follow_their_columns_exactly():
    """At a DCT refresh with moments='rotate', the moments of columns kept move with them and new columns start
    at zero (C = P_new^T P_old is a 0/1 selection)."""
    w = nn.Parameter(torch.randn(40, 12))
    opt = SubspaceAdamW([{"params": [w], "rank": 4, "update_gap": 3}], lr=1e-2, refresh="dct", proj_type="left")
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        w.grad = torch.randn(40, 12, generator=gen)
        opt.step()
    state = opt.state[w]
    old_index, old_m = state["basis_index"].clone(), state["exp_avg"].clone()
    w.grad = torch.randn(40, 12, generator=gen)
    new_index = dct.select(w.grad.float(), 4).indices
    opt.step()
    assert torch.equal(state["basis_index"], new_index)
    r = dct.dct_columns(40, new_index).mT @ w.grad
    for i, k in enumerate(new_index.tolist()):
        carried = old_m[old_index.tolist().index(k)] if k in old_index.tolist() else torch.zeros(12)
        torch.testing.assert_close(state["exp_avg"][i], 0.9 * carried + 0.1 * r[i], rtol=1e-5, atol=1e-6)
