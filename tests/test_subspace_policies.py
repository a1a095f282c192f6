"""Tier 2: moment transport, refresh determinism, conv weights and metrics of the optimizer."""

from __future__ import annotations

import pytest
import torch
from conftest import orthonormality_error
from torch import nn

from subspace_optim import SubspaceAdamW, linalg, subspace


def _signed_permutation(r, seed):
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(r, generator=gen)
    signs = torch.randint(0, 2, (r,), generator=gen).float() * 2 - 1
    return torch.eye(r)[:, perm] * signs


@pytest.mark.parametrize("side", ["left", "right"])
def test_rotate_is_exact_for_a_relabelled_basis(side):
    """If the new basis is the old one with columns permuted and signs flipped, the subspace has not
    changed: "rotate" must map the moments so that the next Adam step is the same full-space update."""
    d, other, r = 10, 7, 4
    gen = torch.Generator().manual_seed(0)
    p_old = linalg.orthonormalize(torch.randn(d, r, generator=gen))
    p_new = p_old @ _signed_permutation(r, 1)
    shape = (r, other) if side == "left" else (other, r)
    m, v = torch.randn(*shape, generator=gen), torch.rand(*shape, generator=gen)
    m2, v2 = m.clone(), v.clone()
    subspace.transport_moments(m2, v2, p_old, p_new, side, "rotate")
    direction_old = subspace.project_back(m / (v.sqrt() + 1e-8), p_old, side)
    direction_new = subspace.project_back(m2 / (v2.sqrt() + 1e-8), p_new, side)
    torch.testing.assert_close(direction_new, direction_old, rtol=1e-5, atol=1e-6)
    # "keep" reuses old coordinates in the relabelled basis: a different update (this is its flaw).
    m3, v3 = m.clone(), v.clone()
    subspace.transport_moments(m3, v3, p_old, p_new, side, "keep")
    assert not torch.allclose(subspace.project_back(m3 / (v3.sqrt() + 1e-8), p_new, side), direction_old)


def test_rotate_first_moment_is_exact_projection_and_second_is_nonnegative():
    d, n, r = 12, 5, 3
    gen = torch.Generator().manual_seed(2)
    p_old = linalg.orthonormalize(torch.randn(d, r, generator=gen))
    p_new = linalg.orthonormalize(torch.randn(d, r, generator=gen))
    m, v = torch.randn(r, n, generator=gen), torch.rand(r, n, generator=gen)
    m2, v2 = m.clone(), v.clone()
    c = subspace.transport_moments(m2, v2, p_old, p_new, "left", "rotate")
    # M_new = P_new^T (P_old M_old): the old first moment, seen from the new basis.
    torch.testing.assert_close(m2, p_new.T @ (p_old @ m))
    torch.testing.assert_close(v2, c.square() @ v)
    assert (v2 >= 0).all()
    # The second moment never grows in total: rows of C have norm <= 1.
    assert float(v2.sum()) <= float(v.sum()) * (1 + 1e-6)


def test_reset_zeroes_moments_and_restarts_bias_correction():
    w = nn.Parameter(torch.randn(8, 6))
    opt = SubspaceAdamW([w], rank=2, update_gap=3, moments="reset", lr=1e-2)
    for step in range(4):
        w.grad = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))
        opt.step()
    state = opt.state[w]
    assert state["step"] == 4 and state["moment_age"] == 1 and state["refresh_count"] == 2


def _two_rank_bases(global_seed, refresh, seed=0):
    torch.manual_seed(global_seed)  # a different global RNG state per "rank"
    w = nn.Parameter(torch.ones(20, 14))
    opt = SubspaceAdamW([w], rank=4, update_gap=2, refresh=refresh, seed=seed, lr=1e-2)
    bases = []
    for step in range(6):
        w.grad = torch.sin(torch.arange(280.0).reshape(20, 14) * (step + 1)) + 0.01 * w.detach()
        torch.randn(100)  # consume global randomness between steps, as dropout would
        opt.step()
        bases.append(opt.state[w]["basis"].clone())
    return bases, w.detach().clone()


@pytest.mark.parametrize("refresh", ["warm", "rsvd", "random"])
def test_basis_ignores_global_rng_and_follows_seed(refresh):
    bases_a, w_a = _two_rank_bases(1, refresh)
    bases_b, w_b = _two_rank_bases(999, refresh)
    for a, b in zip(bases_a, bases_b, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(w_a, w_b)
    bases_c, _ = _two_rank_bases(1, refresh, seed=5)
    assert not torch.equal(bases_a[-1], bases_c[-1])


def test_bases_of_different_parameters_use_different_sketches():
    w1, w2 = nn.Parameter(torch.zeros(9, 6)), nn.Parameter(torch.zeros(9, 6))
    opt = SubspaceAdamW([w1, w2], rank=3, refresh="random")
    w1.grad, w2.grad = torch.randn(9, 6), torch.randn(9, 6)
    opt.step()
    assert not torch.equal(opt.state[w1]["basis"], opt.state[w2]["basis"])


def test_conv_weight_is_projected_as_out_by_rest():
    conv = nn.Conv2d(4, 16, kernel_size=3)  # weight 16 x 4 x 3 x 3 -> matrix 16 x 36
    opt = SubspaceAdamW(conv.parameters(), rank=5, lr=1e-2, residual="none")  # the update lies in the subspace
    x = torch.randn(2, 4, 8, 8)
    before = conv.weight.detach().clone()
    conv(x).square().mean().backward()
    opt.step()
    state = opt.state[conv.weight]
    assert state["basis"].shape == (16, 5)  # std: m=16 < n=36, so the left side
    assert state["exp_avg"].shape == (5, 36)
    assert orthonormality_error(state["basis"]) < 1e-5
    delta = (conv.weight.detach() - before).reshape(16, 36).double()
    p = state["basis"].double()
    # The update lies in span(P): P P^T delta = delta.
    torch.testing.assert_close(p @ (p.T @ delta), delta, rtol=0, atol=1e-7)
    assert "refresh_count" not in opt.state[conv.bias]


def test_metrics_report_energy_overlap_time_and_bytes():
    w = nn.Parameter(torch.randn(30, 12))
    v = nn.Parameter(torch.randn(12))
    opt = SubspaceAdamW(
        [{"params": [("layer.weight", w)], "rank": 4, "update_gap": 2}, {"params": [("v", v)]}], lr=1e-2
    )
    grads = [torch.randn(30, 12, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    for g in grads:
        w.grad, v.grad = g.clone(), torch.randn(12)
        opt.step()
    metrics = opt.subspace_metrics()
    entry = metrics["params"]["layer.weight"]
    p = opt.state[w]["basis"].double()
    g = grads[2].double()  # the last refresh (step index 2) saw this gradient
    side = entry["side"]
    projected = p.T @ g if side == "left" else g @ p
    expected = float(projected.square().sum() / g.square().sum())
    assert entry["captured_energy"] == pytest.approx(expected, rel=1e-5)
    assert 0.0 <= entry["overlap"] <= 1.0 + 1e-6
    assert entry["refresh_count"] == 2 and entry["rank"] == 4 and entry["refresh_time_s"] > 0
    state_bytes = sum(t.numel() * t.element_size() for t in opt.state[w].values() if isinstance(t, torch.Tensor))
    assert entry["state_bytes"] == state_bytes == 4 * (12 * 4 + 2 * 30 * 4) + 4  # + the default residual's scalar
    overall = metrics["overall"]
    assert overall["projected_params"] == 1
    assert overall["state_bytes"] == state_bytes + 4 * 2 * 12 + 4  # + AdamW moments and step of v
    assert overall["captured_energy"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("refresh", ["warm", "rsvd"])
def test_oversample_and_power_iters_reach_the_range_finder(monkeypatch, refresh):
    calls = []
    original = linalg.range_finder_basis

    def recording(a, rank, **kwargs):
        calls.append((rank, kwargs["oversample"], kwargs["power_iters"], kwargs["start"] is not None))
        return original(a, rank, **kwargs)

    monkeypatch.setattr(linalg, "range_finder_basis", recording)
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(20, 14))
    opt = SubspaceAdamW([w], rank=3, update_gap=2, refresh=refresh, oversample=5, power_iters=3)
    for _ in range(3):
        w.grad = torch.randn(20, 14)
        opt.step()
    # First refresh is cold for both; the second starts from the previous basis only for "warm".
    assert calls == [(3, 5, 3, False), (3, 5, 3, refresh == "warm")]


def test_overlap_metric_is_the_subspace_overlap_of_consecutive_bases():
    torch.manual_seed(1)
    w = nn.Parameter(torch.randn(16, 12))
    opt = SubspaceAdamW([w], rank=4, update_gap=2, refresh="svd")
    for step in range(3):
        if step == 2:
            old = opt.state[w]["basis"].clone()
        w.grad = torch.randn(16, 12)
        opt.step()
    new = opt.state[w]["basis"]
    expected = float((new.mT @ old).double().square().sum() / 4)
    got = opt.subspace_metrics()["params"]["params[0]"]["overlap"]
    assert 0.0 < expected < 1.0
    assert got == pytest.approx(expected, rel=1e-5)
