"""``fused=True``: the parameters that are not projected step as ``torch.optim.AdamW(fused=True)``, bit for bit,
through skips, checkpoints and option changes (the device-side skip itself: ``tests/test_syncs.py``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from subspace_optim import SubspaceAdamW

SHAPES = [(12, 8), (8, 20), (8,), (5, 3)]  # two projected matrices, then a vector and a small plain matrix


def _params(dtype: torch.dtype, seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(*s, generator=gen).to(dtype)) for s in SHAPES]


def _ours(params, **options) -> SubspaceAdamW:
    groups = [{"params": params[:2], "rank": 2, "update_gap": 3}, {"params": params[2:]}]
    return SubspaceAdamW(groups, lr=1e-2, weight_decay=0.1, fused=True, **options)


def _grads(params, step: int, nan_at: int | None = None) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        if i == nan_at:
            p.grad[0] = float("nan")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_parameters_step_as_torch_fused_adamw(dtype):
    """Regular (device-masked) and refresh (host-read) steps alike, and a NaN step that torch's AdamW meets as
    a parameter without a gradient: the plain parameters equal torch.optim.AdamW(fused=True)'s bit for bit."""
    ours_p, ref_p = _params(dtype), _params(dtype)
    ours = _ours(ours_p)
    ref = torch.optim.AdamW(ref_p[2:], lr=1e-2, weight_decay=0.1, fused=True)
    for step in range(8):
        nan_at = 2 if step == 4 else None
        _grads(ours_p, step, nan_at)
        _grads(ref_p, step)
        if nan_at is not None:
            ref_p[nan_at].grad = None  # torch's AdamW skips a parameter without a gradient, its count too
        ours.step()
        ref.step()
        for a, b in zip(ours_p[2:], ref_p[2:], strict=True):
            assert torch.equal(a, b), step
    for a, b in zip(ours_p[2:], ref_p[2:], strict=True):
        sa, sb = ours.state[a], ref.state[b]
        assert torch.equal(sa["step"], sb["step"]) and sa["step"].device == b.device
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


def test_a_checkpoint_resumes_bit_identically():
    """state_dict / load_state_dict mid-run (the steps' counts saved from the device), then the same steps."""
    full_p, half_p = _params(torch.float32), _params(torch.float32)
    full, half = _ours(full_p), _ours(half_p)
    for step in range(4):
        for ps, opt in ((full_p, full), (half_p, half)):
            _grads(ps, step)
            opt.step()
    saved = half.state_dict()
    resumed_p = [nn.Parameter(p.detach().clone()) for p in half_p]
    resumed = _ours(resumed_p)
    resumed.load_state_dict(saved)
    for step in range(4, 8):
        for ps, opt in ((full_p, full), (resumed_p, resumed)):
            _grads(ps, step)
            opt.step()
    for a, b in zip(full_p, resumed_p, strict=True):
        assert torch.equal(a, b)


def test_turning_fused_on_and_off_on_a_live_group_keeps_the_counts():
    """A group switched to ``fused`` and back: the plain counts move to and from the device and keep counting."""
    params = _params(torch.float32)
    opt = _ours(params)
    for step in range(6):
        opt.param_groups[1]["fused"] = step % 2 == 0
        _grads(params, step)
        opt.step()
    assert [float(opt.state[p]["step"]) for p in params[2:]] == [6.0, 6.0]


def test_fused_and_foreach_together_are_refused():
    with pytest.raises(ValueError, match="`fused` and `foreach` cannot be `True` together"):
        SubspaceAdamW([nn.Parameter(torch.randn(3))], fused=True, foreach=True)
