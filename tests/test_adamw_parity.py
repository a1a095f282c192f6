"""Tier 2: where the math says SubspaceAdamW *is* AdamW, it must match torch.optim.AdamW."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from subspace_optim import SubspaceAdamW


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.LayerNorm(20), nn.Linear(20, 7))


def _loss(model, step):
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 12, generator=gen)
    y = torch.randn(16, 7, generator=gen)
    return (model(x) - y).square().mean()


def _train(model, opt, steps):
    for step in range(steps):
        opt.zero_grad()
        _loss(model, step).backward()
        opt.step()


def test_plain_groups_equal_torch_adamw_with_weight_decay():
    ref_model, our_model = _model(), _model()
    kwargs = dict(lr=3e-3, betas=(0.85, 0.99), eps=1e-7, weight_decay=0.1)
    ref = torch.optim.AdamW(ref_model.parameters(), **kwargs)
    ours = SubspaceAdamW(our_model.parameters(), **kwargs)
    _train(ref_model, ref, 50)
    _train(our_model, ours, 50)
    for a, b in zip(ref_model.parameters(), our_model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    for p_ref, p_our in zip(ref_model.parameters(), our_model.parameters(), strict=True):
        torch.testing.assert_close(ours.state[p_our]["exp_avg_sq"], ref.state[p_ref]["exp_avg_sq"], rtol=0, atol=1e-6)


def test_vectors_and_oversized_rank_in_a_rank_group_fall_back_to_adamw():
    """1-D params in a rank group, and a matrix with rank > min(m, n), take the AdamW step (with a warning
    for the matrix, which names it and the fix). Each param's gradient depends only on itself, so the
    projected neighbour cannot leak into the comparison."""
    torch.manual_seed(1)
    init = {"bias": torch.randn(5), "wide": torch.randn(7, 20), "tall": torch.randn(20, 12)}
    ours = {k: nn.Parameter(v.clone()) for k, v in init.items()}
    refs = {k: nn.Parameter(v.clone()) for k, v in init.items()}
    ref_opt = torch.optim.AdamW(refs.values(), lr=1e-2, weight_decay=0.05)
    opt = SubspaceAdamW([{"params": list(ours.items()), "rank": 8}], lr=1e-2, weight_decay=0.05)
    with pytest.warns(UserWarning, match=r"rank=8 exceeds min\(7, 20\) of parameter wide"):
        for step in range(20):
            for params in (ours, refs):
                for p in params.values():
                    p.grad = torch.sin(p.detach() * (step + 1)) + 0.1 * p.detach()
            opt.step()
            ref_opt.step()
    for name in ["bias", "wide"]:
        torch.testing.assert_close(ours[name], refs[name], rtol=0, atol=1e-6)
    # The 20x12 matrix *is* projected (rank 8 < 12) and so differs from AdamW.
    assert "refresh_count" in opt.state[ours["tall"]]
    assert not torch.allclose(ours["tall"], refs["tall"], atol=1e-4)


@pytest.mark.parametrize("side_shape", [(9, 6), (6, 9)])
def test_full_rank_fixed_basis_equals_adam_in_rotated_coordinates(side_shape):
    """With rank = min(m, n) and a basis that never changes (refresh="random", huge update_gap), the
    optimizer is exactly Adam on X = W P (right) or X = P^T W (left), scaled by ``scale``."""
    m, n = side_shape
    torch.manual_seed(3)
    w = nn.Parameter(torch.randn(m, n, dtype=torch.float64).float())
    targets = [torch.randn(m, n) for _ in range(4)]
    lr, scale, wd, (b1, b2), eps = 1e-2, 0.5, 0.0, (0.9, 0.99), 1e-8
    opt = SubspaceAdamW(
        [w],
        lr=lr,
        betas=(b1, b2),
        eps=eps,
        weight_decay=wd,
        rank=min(m, n),
        update_gap=10**6,
        scale=scale,
        refresh="random",
        proj_type="std",
    )
    w0 = w.detach().clone()

    def grad_of(weight, step):
        return (weight - targets[step % 4]) * (1 + step % 3)

    # Our trajectory.
    for step in range(30):
        w.grad = grad_of(w.detach(), step)
        opt.step()
    p = opt.state[w]["basis"].double()
    side = "right" if m >= n else "left"
    assert p.shape == (min(m, n), min(m, n))

    # Adam in rotated coordinates, float64, written out from the textbook formulas.
    def to_x(weight):
        return weight @ p if side == "right" else p.T @ weight

    def from_x(x):
        return x @ p.T if side == "right" else p @ x

    x = to_x(w0.double())
    mom = torch.zeros_like(x)
    vel = torch.zeros_like(x)
    for t in range(1, 31):
        gx = to_x(grad_of(from_x(x), t - 1).double())
        mom = b1 * mom + (1 - b1) * gx
        vel = b2 * vel + (1 - b2) * gx * gx
        x = x - lr * scale * (mom / (1 - b1**t)) / ((vel / (1 - b2**t)).sqrt() + eps)
    torch.testing.assert_close(w.detach().double(), from_x(x), rtol=0, atol=2e-5)


def test_all_zero_gradients_with_lr_zero_change_nothing():
    """What torch.distributed.checkpoint does to initialize state: zero grads, lr=0, one step."""
    model = _model(2)
    before = copy.deepcopy(model.state_dict())
    opt = SubspaceAdamW(model.parameters(), lr=0.0, weight_decay=0.1, rank=4, refresh="warm")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(len(s) for s in opt.state.values())
    for s in opt.state.values():
        for v in s.values():
            if isinstance(v, torch.Tensor):
                assert torch.isfinite(v).all()
            else:
                assert math.isfinite(v)


def test_zero_gradient_at_a_refresh_keeps_the_basis_and_does_not_rotate_the_moments():
    """A zero gradient spans nothing: the refresh it lands on must keep the basis (lr=0 here, as DCP)."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(10, 6))
    opt = SubspaceAdamW([w], lr=1e-2, rank=3, update_gap=3, moments="rotate")
    for _ in range(3):
        w.grad = torch.randn(10, 6)
        opt.step()
    state = opt.state[w]
    basis, m, v = state["basis"].clone(), state["exp_avg"].clone(), state["exp_avg_sq"].clone()
    w_before = w.detach().clone()
    opt.param_groups[0]["lr"] = 0.0
    w.grad = torch.zeros_like(w)
    opt.step()
    assert state["refresh_count"] == 2
    assert torch.equal(state["basis"], basis)
    beta1, beta2 = opt.param_groups[0]["betas"]
    torch.testing.assert_close(state["exp_avg"], m * beta1, rtol=1e-6, atol=0)  # decayed, not rotated
    torch.testing.assert_close(state["exp_avg_sq"], v * beta2, rtol=1e-6, atol=0)
    assert torch.equal(w, w_before)
