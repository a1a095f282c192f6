"""Tier 1: the reference math (orthonormalization, range finder, Rayleigh-Ritz) against float64 torch."""

from __future__ import annotations

import pytest
import torch
from conftest import gradient_like, orthonormality_error, subspace_distance

from subspace_optim import linalg, subspace


@pytest.mark.parametrize("shape", [(7, 3), (123, 17), (64, 64), (300, 1)])
def test_orthonormalize_spans_same_subspace_as_householder(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    y = torch.randn(*shape, generator=gen)
    q = linalg.orthonormalize(y)
    assert q.dtype == torch.float32 and q.shape == y.shape
    assert orthonormality_error(q) < 1e-5
    ref, _ = torch.linalg.qr(y.double())
    assert subspace_distance(q, ref) < 1e-4


def test_orthonormalize_survives_power_iterated_sketch():
    """A sketch (G G^T)^3 G Omega has condition > 1e8: plain CholeskyQR fails, ours must not."""
    g = gradient_like(400, 300, 16, decay=0.5, noise=1e-6)
    omega = torch.randn(300, 24, generator=torch.Generator().manual_seed(1))
    y = g @ omega
    for _ in range(3):
        y = g @ (g.T @ y)
    cond = torch.linalg.cond(y.double())
    assert cond > 1e8  # cond^2 > 1/eps(fp64): even an fp64 Gram is not numerically definite
    q = linalg.orthonormalize(y)
    assert torch.isfinite(q).all()
    assert orthonormality_error(q) < 1e-5
    # span(Q) holds Y: the range finder loses nothing to the orthonormalization.
    resid = y.double() - q.double() @ (q.double().T @ y.double())
    assert float(resid.norm()) < 1e-5 * float(y.double().norm())


def test_orthonormalize_shifted_retry_when_fp64_gram_is_indefinite(monkeypatch):
    """Singular values down to 1e-10: the fp64 Gram (condition 1e20) is not numerically positive
    definite, so the shifted CholeskyQR path must run and still return an orthonormal basis."""
    gen = torch.Generator().manual_seed(4)
    u, _ = torch.linalg.qr(torch.randn(200, 12, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=torch.float64))
    y = ((u * torch.logspace(0, -10, 12, dtype=torch.float64)) @ v.T).float()
    shifts = []
    original = linalg._cholesky_qr

    def spy(x, products, shift=0.0):
        shifts.append(shift)
        return original(x, products, shift)

    monkeypatch.setattr(linalg, "_cholesky_qr", spy)
    q = linalg.orthonormalize(y)
    assert any(s > 0 for s in shifts), shifts
    assert torch.isfinite(q).all()
    assert orthonormality_error(q) < 1e-5
    resid = y.double() - q.double() @ (q.double().T @ y.double())
    assert float(resid.norm()) < 1e-5 * float(y.double().norm())


@pytest.mark.parametrize("true_rank", [0, 1, 3])
def test_orthonormalize_rank_deficient_falls_back_to_orthonormal(true_rank):
    gen = torch.Generator().manual_seed(3)
    y = torch.randn(50, true_rank, generator=gen) @ torch.randn(true_rank, 8, generator=gen)
    q = linalg.orthonormalize(y)
    assert torch.isfinite(q).all()
    assert orthonormality_error(q) < 1e-5
    if true_rank:
        # span(Y) is inside span(Q).
        resid = y.double() - q.double() @ (q.double().T @ y.double())
        assert float(resid.norm()) < 1e-4 * float(y.norm())


def test_orthonormalize_rejects_wide():
    with pytest.raises(ValueError, match="tall"):
        linalg.orthonormalize(torch.randn(3, 5))


def test_rayleigh_ritz_energy_is_exact():
    a = gradient_like(90, 60, 8)
    q = linalg.orthonormalize(torch.randn(90, 20, generator=torch.Generator().manual_seed(0)))
    res = linalg.rayleigh_ritz(a, q, 8)
    assert orthonormality_error(res.basis) < 1e-5
    captured = (res.basis.double().T @ a.double()).square().sum()
    torch.testing.assert_close(res.captured, captured, rtol=1e-5, atol=0)
    torch.testing.assert_close(res.total, a.double().square().sum())


@pytest.mark.parametrize("side,shape", [("left", (80, 50)), ("right", (80, 50)), ("left", (40, 90))])
def test_svd_basis_matches_float64_svd(side, shape):
    g = gradient_like(*shape, rank=6, seed=5)
    res = subspace.refresh_basis(g, side, 6, policy="svd", previous=None, oversample=0, power_iters=0, seed=0)
    u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
    ref = u[:, :6] if side == "left" else vh[:6].T
    assert subspace_distance(res.basis, ref) < 1e-4
    torch.testing.assert_close(float(res.captured / res.total), float(s[:6].square().sum() / s.square().sum()))


@pytest.mark.parametrize("policy", ["rsvd", "warm"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_randomized_refresh_captures_97_percent_of_svd(policy, side):
    """On gradient-like matrices the range finder (cold) and one warm subspace iteration from the
    previous step's basis both keep >= 97% of the exact rank-r energy."""
    rank = 12
    g_prev = gradient_like(160, 96, rank, seed=10)
    g = g_prev + 0.3 * gradient_like(160, 96, rank, seed=11)  # the gradient drifted since last refresh
    exact = subspace.refresh_basis(g, side, rank, policy="svd", previous=None, oversample=0, power_iters=0, seed=0)
    previous = None
    if policy == "warm":
        previous = subspace.refresh_basis(
            g_prev, side, rank, policy="rsvd", previous=None, oversample=8, power_iters=1, seed=1
        ).basis
    res = subspace.refresh_basis(g, side, rank, policy=policy, previous=previous, oversample=8, power_iters=1, seed=2)
    assert res.basis.shape == exact.basis.shape
    assert orthonormality_error(res.basis) < 1e-5
    ratio = float(res.captured / exact.captured)
    assert 0.97 <= ratio <= 1.0 + 1e-6


def test_random_refresh_is_orthonormal_and_seeded():
    g = gradient_like(30, 20, 4)
    a = subspace.refresh_basis(g, "left", 5, policy="random", previous=None, oversample=0, power_iters=0, seed=7)
    b = subspace.refresh_basis(g * 3, "left", 5, policy="random", previous=None, oversample=0, power_iters=0, seed=7)
    c = subspace.refresh_basis(g, "left", 5, policy="random", previous=None, oversample=0, power_iters=0, seed=8)
    assert orthonormality_error(a.basis) < 1e-5
    assert torch.equal(a.basis, b.basis)  # independent of the gradient
    assert not torch.equal(a.basis, c.basis)


def test_sketch_seed_depends_on_every_part_and_not_on_global_rng():
    seeds = {linalg.sketch_seed(s, i, c) for s in range(3) for i in range(3) for c in range(3)}
    assert len(seeds) == 27
    assert all(0 <= s < 2**63 for s in seeds)
    torch.manual_seed(0)
    x = linalg.gaussian(4, 3, linalg.sketch_seed(1, 2, 3), torch.device("cpu"))
    torch.manual_seed(12345)
    torch.randn(10)
    y = linalg.gaussian(4, 3, linalg.sketch_seed(1, 2, 3), torch.device("cpu"))
    assert torch.equal(x, y)


def test_choose_side_matches_galore_proj_types():
    assert subspace.choose_side("std", 10, 4) == "right"
    assert subspace.choose_side("std", 4, 10) == "left"
    assert subspace.choose_side("std", 6, 6) == "right"
    assert subspace.choose_side("reverse_std", 10, 4) == "left"
    assert subspace.choose_side("reverse_std", 4, 10) == "right"
    assert subspace.choose_side("left", 10, 4) == "left"
    assert subspace.choose_side("right", 4, 10) == "right"
    with pytest.raises(ValueError, match="proj_type"):
        subspace.choose_side("full", 4, 10)
