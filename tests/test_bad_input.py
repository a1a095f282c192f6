"""Bad input: a clear error naming the parameter and the fix, raised before any state changes; and the
non-finite gradient policy, which never lets a NaN/Inf reach a basis, a moment or a weight."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_unchanged, snapshot
from torch import nn

from subspace_optim import SubspaceAdamW


def _w(*shape, seed=0):
    torch.manual_seed(seed)
    return nn.Parameter(torch.randn(*shape))


@pytest.mark.parametrize(
    "kwargs,exc,pattern",
    [
        (dict(rank=0), ValueError, r"Invalid rank: 0 in SubspaceAdamW\(\.\.\.\) - rank must be a positive int"),
        (dict(rank=-3), ValueError, r"Invalid rank"),
        (dict(rank=4.0), TypeError, r"Invalid rank: 4.0 in SubspaceAdamW\(\.\.\.\) - rank must be a positive int"),
        (dict(rank=True), TypeError, r"Invalid rank"),
        (dict(update_gap=0), ValueError, r"Invalid update_gap: 0 .*update_proj_gap"),
        (dict(update_gap=2.5), TypeError, r"Invalid update_gap"),
        (
            dict(lr=-1e-3),
            ValueError,
            r"Invalid learning rate: -0.001 in SubspaceAdamW\(\.\.\.\) - must be a finite number >= 0",
        ),
        (dict(lr=float("nan")), ValueError, r"Invalid learning rate: nan"),
        (dict(eps=-1.0), ValueError, r"Invalid epsilon value: -1.0"),
        (dict(eps=0.0), ValueError, r"Invalid epsilon value: 0.0 .*> 0"),
        (dict(betas=(1.0, 0.999)), ValueError, r"Invalid beta parameter at index 0"),
        (dict(betas=(0.9, -0.1)), ValueError, r"Invalid beta parameter at index 1"),
        (dict(betas=0.9), TypeError, r"Invalid betas: 0.9"),
        (dict(weight_decay=-0.1), ValueError, r"Invalid weight_decay value: -0.1"),
        (dict(scale=0.0), ValueError, r"Invalid scale"),
        (
            dict(refresh="qr"),
            ValueError,
            r"Invalid refresh: 'qr' .* - use one of 'warm', 'rsvd', 'svd', 'random'",
        ),
        (dict(moments="carry"), ValueError, r"Invalid moments: 'carry' .*use one of 'rotate', 'keep', 'reset'"),
        (dict(proj_type="full"), ValueError, r"Invalid proj_type: 'full' .*'std', 'reverse_std', 'left', 'right'"),
        (dict(nonfinite="ignore"), ValueError, r"Invalid nonfinite"),
        (dict(engine="cuda"), ValueError, r"Invalid engine"),
        (dict(oversample=-1), ValueError, r"Invalid oversample"),
        (dict(power_iters=1.5), ValueError, r"Invalid power_iters"),
        (dict(seed="0"), TypeError, r"Invalid seed"),
    ],
)
def test_constructor_rejects_bad_options(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        SubspaceAdamW([_w(4, 3)], **kwargs)


def test_bad_group_option_names_the_group_and_adds_nothing():
    opt = SubspaceAdamW([_w(4, 3)], rank=2)
    with pytest.raises(ValueError, match=r"Invalid rank: 0 in param group 1"):
        opt.add_param_group({"params": [_w(5, 5)], "rank": 0})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match=r"Invalid update_gap: 0 in param group 1"):
        SubspaceAdamW([{"params": [_w(3, 3)]}, {"params": [_w(4, 4)], "rank": 2, "update_proj_gap": 0}])


def test_galore_and_native_gap_must_agree():
    with pytest.raises(ValueError, match="update_proj_gap=5 and update_gap=7"):
        SubspaceAdamW([{"params": [_w(4, 4)], "rank": 2, "update_proj_gap": 5, "update_gap": 7}])
    opt = SubspaceAdamW([{"params": [_w(4, 4)], "rank": 2, "update_proj_gap": 5}])
    assert opt.param_groups[0]["update_gap"] == 5 and "update_proj_gap" not in opt.param_groups[0]


def test_sparse_gradient_is_rejected_before_any_state_changes():
    emb = nn.Embedding(10, 4, sparse=True)
    w = _w(6, 5)
    opt = SubspaceAdamW([{"params": [w], "rank": 2}, {"params": emb.parameters()}])
    w.grad = torch.randn(6, 5)
    opt.step()
    emb(torch.tensor([1, 2])).sum().backward()
    w.grad = torch.randn(6, 5)
    params = [w, emb.weight]
    snap = snapshot(opt, params)
    with pytest.raises(TypeError, match=r"sparse gradients \(parameter params\[1\]\).*SparseAdam"):
        opt.step()
    assert_unchanged(opt, params, snap)


def test_complex_parameter_is_rejected():
    z = nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))
    z.grad = torch.randn(3, 3, dtype=torch.complex64)
    with pytest.raises(TypeError, match="complex parameters.*view_as_real"):
        SubspaceAdamW([z], rank=2).step()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("refresh", ["warm", "svd"])
def test_nonfinite_gradient_just_before_a_refresh_is_skipped(bad, refresh):
    """A NaN/Inf arriving on the step that would refresh the basis: that parameter is left untouched
    (weights, moments, basis, counters), the other parameters step, and the refresh happens on the next
    finite gradient."""
    w, other = _w(12, 8, seed=1), _w(5, seed=2)
    opt = SubspaceAdamW([{"params": [w, other], "rank": 3, "update_gap": 3, "refresh": refresh}], lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):  # steps 0, 1, 2; the next one (step 3) refreshes
        w.grad, other.grad = torch.randn(12, 8, generator=gen), torch.randn(5, generator=gen)
        opt.step()
    before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[w].items()}
    w_before, other_before = w.detach().clone(), other.detach().clone()

    w.grad = torch.randn(12, 8, generator=gen)
    w.grad[3, 2] = bad
    other.grad = torch.randn(5, generator=gen)
    opt.step()
    assert torch.equal(w, w_before)
    for k, v in before.items():
        assert torch.equal(opt.state[w][k], v) if isinstance(v, torch.Tensor) else opt.state[w][k] == v, k
    assert not torch.equal(other, other_before)
    assert opt.subspace_metrics()["overall"]["nonfinite_skips"] == 1

    w.grad = torch.randn(12, 8, generator=gen)
    opt.step()
    state = opt.state[w]
    assert state["refresh_count"] == 2 and state["step"] == 4
    for key in ("basis", "exp_avg", "exp_avg_sq"):
        assert torch.isfinite(state[key]).all()
    assert torch.isfinite(w).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_raise_policy_changes_nothing(bad):
    w, v = _w(10, 6), _w(4)
    opt = SubspaceAdamW([{"params": [w], "rank": 2, "update_gap": 2}, {"params": [v]}], nonfinite="raise")
    w.grad, v.grad = torch.randn(10, 6), torch.randn(4)
    opt.step()
    snap = snapshot(opt, [w, v])
    w.grad = torch.randn(10, 6)
    v.grad = torch.randn(4)
    v.grad[0] = bad  # bad gradient in the *plain* group: the projected param must not step either
    with pytest.raises(FloatingPointError, match=r"non-finite gradient in parameter\(s\) \['params\[1\]'\]"):
        opt.step()
    assert_unchanged(opt, [w, v], snap)


def test_flattened_params_like_deepspeed_zero_are_refused_at_the_swap():
    """DeepSpeed ZeRO 1-3 replaces each group's params by a flat fp32 partition while building its
    optimizer wrapper; a projected group must refuse that there and then, pointing to FSDP2."""
    w, v = _w(6, 4), _w(4)
    opt = SubspaceAdamW([{"params": [w], "rank": 2}, {"params": [v]}])
    flat = torch.cat([w.detach().flatten()]).requires_grad_()
    with pytest.raises(ValueError, match=r"DeepSpeed ZeRO stages 1-3.*ZeRO stage 0.*FSDP2"):
        opt.param_groups[0]["params"] = [flat]
    assert opt.param_groups[0]["params"] == [w]
    with pytest.raises(ValueError, match="DeepSpeed ZeRO stages 1-3"):
        opt.param_groups[0]["params"] = []  # ZeRO-3 empties the list first
    opt.param_groups[1]["params"] = [torch.cat([v.detach()]).requires_grad_()]  # plain AdamW groups may be flat


def test_flattened_params_edited_in_place_are_refused_at_step():
    w = _w(6, 4)
    opt = SubspaceAdamW([{"params": [w], "rank": 2}])
    flat = w.detach().flatten().clone().requires_grad_()
    flat.grad = torch.randn(24)
    opt.param_groups[0]["params"][0] = flat
    with pytest.raises(ValueError, match="DeepSpeed ZeRO stages 1-3"):
        opt.step()
    assert not opt.state


def test_guard_survives_load_state_dict():
    w = _w(6, 4)
    opt = SubspaceAdamW([{"params": [w], "rank": 2}])
    w.grad = torch.randn(6, 4)
    opt.step()
    opt.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="DeepSpeed"):
        opt.param_groups[0]["params"] = [torch.zeros(24, requires_grad=True)]


def test_same_shape_param_swap_like_accelerate_prepare_is_accepted():
    """accelerate's FSDP2 prepare replaces each group's list with the sharded parameters; state is lazy,
    so the new parameters simply get fresh state and nothing refers to the old ones."""
    old = _w(6, 4)
    opt = SubspaceAdamW([{"params": [old], "rank": 2}], lr=1e-2)
    new = _w(6, 4, seed=3)
    opt.param_groups[0]["params"] = [new]
    new.grad = torch.randn(6, 4)
    opt.step()
    assert old not in opt.state and opt.state[new]["refresh_count"] == 1


def test_model_level_keywords_point_to_param_groups_and_the_trainer_factory():
    with pytest.raises(TypeError, match=r"target_modules.*param_groups\(model.*SubspaceAdamWFactory"):
        SubspaceAdamW([_w(4, 4)], rank=2, target_modules=["q_proj"])
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) lr_decay; its options are"):
        SubspaceAdamW([_w(4, 4)], lr_decay=0.1)


def test_galore_gap_spelling_is_accepted_by_the_constructor():
    assert SubspaceAdamW([_w(4, 4)], rank=2, update_proj_gap=7).defaults["update_gap"] == 7
    with pytest.raises(ValueError, match="update_gap=5 and update_proj_gap=7"):
        SubspaceAdamW([_w(4, 4)], rank=2, update_gap=5, update_proj_gap=7)


def test_numpy_scalar_options_are_stored_as_plain_numbers(tmp_path):
    """A numpy int rank must not make the checkpoint unloadable with weights_only=True."""
    np = pytest.importorskip("numpy")
    w = _w(6, 5)
    opt = SubspaceAdamW([w], lr=np.float64(1e-2), rank=np.int64(2), update_gap=np.int32(3))
    opt.add_param_group({"params": [_w(4, 4, seed=3)], "rank": np.int64(3), "scale": np.float32(0.5)})
    for group in opt.param_groups:
        for key in ("rank", "update_gap", "lr", "scale"):
            assert type(group[key]) in (int, float), (key, type(group[key]))
    w.grad = torch.randn(6, 5)
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    torch.load(tmp_path / "opt.pt", weights_only=True)


@pytest.mark.parametrize("refresh", ["warm", "rsvd", "svd"])
def test_huge_finite_gradient_on_a_refresh_step_gives_a_finite_basis(refresh):
    """Just under the overflow guard (9.2e18 / sqrt(12) ~ 2.7e18): G G^T products reach ~1e37 and the
    refresh must still give a real, orthonormal basis and finite moments."""
    w = _w(12, 8, seed=4)
    opt = SubspaceAdamW([w], lr=1e-2, rank=3, update_gap=2, refresh=refresh)
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        w.grad = torch.randn(12, 8, generator=gen) * (5e17 if step == 2 else 1.0)
        opt.step()
        state = opt.state[w]
        for key in ("basis", "exp_avg", "exp_avg_sq"):
            assert torch.isfinite(state[key]).all(), (step, key)
        assert torch.isfinite(w).all()
    basis = opt.state[w]["basis"]
    assert torch.allclose(basis.mT @ basis, torch.eye(3), atol=1e-5)
    assert opt.subspace_metrics()["params"]["params[0]"]["captured_energy"] > 0.3  # a real basis, not a fallback
    assert opt.subspace_metrics()["overall"]["nonfinite_skips"] == 0


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_gradient_whose_projection_overflows_fp32_follows_the_nonfinite_policy(policy):
    w, plain = _w(12, 8, seed=5), _w(4, 4, seed=6)
    opt = SubspaceAdamW([{"params": [w], "rank": 3, "update_gap": 5}, {"params": [plain]}], nonfinite=policy)
    w.grad, plain.grad = torch.randn(12, 8), torch.randn(4, 4)
    opt.step()
    snap = snapshot(opt, [w])
    w.grad = torch.full((12, 8), 3e38)  # finite, but P^T G overflows
    plain.grad = torch.full((4, 4), 3e38)  # plain AdamW takes it, as torch.optim.AdamW does
    if policy == "raise":
        with pytest.raises(FloatingPointError, match=r"params\[0\].*overflows fp32"):
            opt.step()
        return
    opt.step()
    assert torch.equal(w, snap[1][0])
    assert torch.isfinite(plain).all()
    assert opt.subspace_metrics()["overall"]["nonfinite_skips"] == 1


def test_a_failing_factorization_keeps_the_previous_basis(monkeypatch):
    w = _w(12, 8, seed=7)
    opt = SubspaceAdamW([w], lr=1e-2, rank=3, update_gap=2)
    for _ in range(2):
        w.grad = torch.randn(12, 8)
        opt.step()
    basis = opt.state[w]["basis"].clone()

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("simulated failure")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    w.grad = torch.randn(12, 8)
    opt.step()  # step 2 refreshes: the range finder's Rayleigh-Ritz fails
    assert opt.state[w]["refresh_count"] == 2
    assert torch.equal(opt.state[w]["basis"], basis)
    assert torch.isfinite(w).all()


def test_gradient_whose_projected_square_overflows_is_skipped_not_frozen_in():
    """|R| ~ 1e25 * sqrt(64): R itself is finite but R^2 is not, and an infinite second moment would stop
    the matrix from ever moving again. The guard skips that gradient; training then goes on."""
    w = _w(64, 128, seed=8)
    opt = SubspaceAdamW([w], lr=1e-2, rank=4, update_gap=10)
    w.grad = torch.randn(64, 128)
    opt.step()
    w.grad = torch.randn(64, 128) * 1e25
    before = w.detach().clone()
    opt.step()
    assert torch.equal(w, before)
    assert opt.subspace_metrics()["overall"]["nonfinite_skips"] == 1
    assert torch.isfinite(opt.state[w]["exp_avg_sq"]).all()
    w.grad = torch.randn(64, 128)
    opt.step()
    assert not torch.equal(w, before)
