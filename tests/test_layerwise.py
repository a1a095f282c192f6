"""Layer-wise updates inside backward (``SubspaceAdamW.update_in_backward``) on one process: equal to regular
stepping, gradients freed when a step completes, schedulers, clipping, non-finite gradients, resume."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from subspace_optim import SubspaceAdamW, param_groups


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 33), nn.Tanh(), nn.Linear(33, 20), nn.Tanh(), nn.Linear(20, 4))


def _optimizer(model: nn.Module, **options) -> SubspaceAdamW:
    group_options = {k: options.pop(k) for k in ("refresh", "moments", "proj_type") if k in options}
    groups = param_groups(model, "all-linear", rank=3, update_gap=2, **group_options)
    return SubspaceAdamW(groups, lr=1e-2, weight_decay=0.1, **options)


def _micro(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(8, 12, generator=gen), torch.randn(8, 4, generator=gen)


def _train(
    layerwise: bool,
    *,
    accum: int = 1,
    steps: int = 6,
    clip: float | None = None,
    schedule=None,
    seed: int = 1,
    **options,
) -> tuple[nn.Module, SubspaceAdamW]:
    """``steps`` optimizer steps of ``accum`` micro-batches each, regular or layer-wise; regular clipping
    reproduces the layer-wise rule (previous step's global norm, bounded below by the tensor's own)."""
    model = _mlp()
    opt = _optimizer(model, **options)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, schedule) if schedule else None
    handle = opt.update_in_backward(model, accumulation_steps=accum, max_grad_norm=clip) if layerwise else None
    gen = torch.Generator().manual_seed(seed)
    previous = None
    for _ in range(steps):
        for micro in range(accum):
            x, y = _micro(gen)
            ((model(x) - y).square().mean() / accum).backward()
            grads = [p.grad for p in model.parameters()]
            if layerwise and micro < accum - 1:
                assert all(g is not None for g in grads), "an intermediate backward must keep its gradients"
            if layerwise and micro == accum - 1:
                assert all(g is None for g in grads), "the completing backward must free every gradient"
        if not layerwise and clip is not None:
            norms = [float(p.grad.norm()) for p in model.parameters()]
            for p, norm in zip(model.parameters(), norms, strict=True):
                coefficient = clip / (max(previous or 0.0, norm) + 1e-6)
                if coefficient < 1:
                    p.grad.mul_(coefficient)
            previous = math.sqrt(sum(n * n for n in norms))
        opt.step()
        if scheduler:
            scheduler.step()
        opt.zero_grad()
        if layerwise and clip is not None:
            assert handle.last_grad_norm is not None
    return model, opt


def _assert_same(a: nn.Module, b: nn.Module, exact: bool = True) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        if exact:
            assert torch.equal(p, q), name
        else:
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("accum", [1, 3])
@pytest.mark.parametrize("refresh", ["warm", "rsvd", "svd", "random"])
def test_layerwise_equals_regular_stepping(accum, refresh):
    regular, _ = _train(False, accum=accum, refresh=refresh)
    layerwise, _ = _train(True, accum=accum, refresh=refresh)
    _assert_same(regular, layerwise)


@pytest.mark.parametrize(
    "options",
    [
        {"moments": "keep", "proj_type": "right"},
        {"moments_dtype": "int8"},
        {"basis_dtype": "bfloat16", "moments_dtype": "bfloat16"},
        {"basis_dtype": "int8", "moments_dtype": "int8", "second_moment": "factored"},
        {"refresh": "dct", "second_moment": "factored"},
        {
            "refresh": "seeded",
            "residual": "apollo",
            "moments": "keep",
            "second_moment": "factored",
            "moments_dtype": "int8",
        },
    ],
)
def test_layerwise_equals_regular_with_other_state(options):
    regular, _ = _train(False, accum=2, **dict(options))
    layerwise, _ = _train(True, accum=2, **dict(options))
    _assert_same(regular, layerwise)


def test_layerwise_triton_engine_equals_regular_triton_engine():
    """Inside backward the kernels run one matrix per launch (regular steps batch the matrices)."""
    regular, _ = _train(False, accum=2, steps=4, engine="triton")
    layerwise, _ = _train(True, accum=2, steps=4, engine="triton")
    _assert_same(regular, layerwise, exact=False)


def test_scheduler_lr_applies_at_its_step_and_zero_freezes():
    schedule = lambda step: [1.0, 0.5, 0.0, 0.0, 1.0, 0.3, 1.0][step]  # noqa: E731
    regular, _ = _train(False, accum=2, schedule=schedule)
    layerwise, _ = _train(True, accum=2, schedule=schedule)
    _assert_same(regular, layerwise)
    frozen, _ = _train(True, accum=2, steps=4, schedule=schedule)
    before, _ = _train(True, accum=2, steps=2, schedule=schedule)
    _assert_same(frozen, before)  # steps 3 and 4 ran at lr 0 (decay is lr * wd, so 0 too)


def test_clipping_follows_its_documented_rule_and_reports_the_norm():
    regular, _ = _train(False, accum=2, clip=0.05)
    layerwise, opt = _train(True, accum=2, clip=0.05)
    _assert_same(regular, layerwise, exact=False)
    unclipped, _ = _train(True, accum=2)
    assert not torch.equal(unclipped[0].weight, layerwise[0].weight)  # the bound was active


def test_last_grad_norm_is_the_unclipped_global_norm():
    model = _mlp()
    opt = _optimizer(model)
    handle = opt.update_in_backward(model, max_grad_norm=1e-3)
    x, y = _micro(torch.Generator().manual_seed(3))
    reference = _mlp()
    (reference(x) - y).square().mean().backward()
    expected = float(torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()]))
    (model(x) - y).square().mean().backward()
    assert handle.last_grad_norm == pytest.approx(expected, rel=1e-5)


def test_cycle_cut_short_is_applied_by_step():
    """Two backward passes of a 3-step cycle, then step(): applied then, as regular stepping would."""
    regular, layerwise = _mlp(), _mlp()
    opts = [_optimizer(regular), _optimizer(layerwise)]
    opts[1].update_in_backward(layerwise, accumulation_steps=3)
    gen = torch.Generator().manual_seed(5)
    for cycle in (2, 3, 1, 3):
        batches = [_micro(gen) for _ in range(cycle)]
        for model, opt in zip((regular, layerwise), opts, strict=True):
            for x, y in batches:
                ((model(x) - y).square().mean() / 3).backward()
            opt.step()
            opt.zero_grad()
    _assert_same(regular, layerwise)


def test_remove_returns_to_regular_stepping():
    model = _mlp()
    opt = _optimizer(model)
    handle = opt.update_in_backward(model)
    x, y = _micro(torch.Generator().manual_seed(2))
    (model(x) - y).square().mean().backward()
    assert all(p.grad is None for p in model.parameters())
    handle.remove()
    before = [p.detach().clone() for p in model.parameters()]
    (model(x) - y).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    opt.step()
    assert not any(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    opt.update_in_backward(model).remove()  # attachable again


def test_nonfinite_skip_leaves_that_parameter_untouched():
    model = _mlp()
    opt = _optimizer(model, nonfinite="skip")
    opt.update_in_backward(model)
    x, y = _micro(torch.Generator().manual_seed(4))
    (model(x) - y).square().mean().backward()  # a first step creates state
    saved = {k: v.clone() for k, v in opt.state[model[2].weight].items() if torch.is_tensor(v)}
    before = [p.detach().clone() for p in model.parameters()]
    model[2].weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    (model(x) - y).square().mean().backward()
    after = list(model.parameters())
    assert torch.equal(before[2], after[2])
    for k, v in saved.items():
        assert torch.equal(v, opt.state[model[2].weight][k]), k
    assert all(not torch.equal(before[i], after[i]) for i in (0, 1, 3, 4, 5))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.subspace_metrics()["overall"]["nonfinite_skips"] == 1


def test_nonfinite_raise_stops_backward_and_drops_pending_gradients():
    model = _mlp()
    opt = _optimizer(model, nonfinite="raise")
    opt.update_in_backward(model)
    x, y = _micro(torch.Generator().manual_seed(4))
    (model(x) - y).square().mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    remove = model[2].weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    with pytest.raises(FloatingPointError, match=r"\['2.weight'\].* it was not changed; 3 parameter\(s\) reached"):
        (model(x) - y).square().mean().backward()
    after = list(model.parameters())
    # backward reached 4.weight, 4.bias and 2.bias (updated) before 2.weight; 0.* were never reached
    assert [torch.equal(a, b) for a, b in zip(before, after, strict=True)] == [True, True, True, False, False, False]
    assert all(p.grad is None for p in model.parameters())
    remove.remove()
    (model(x) - y).square().mean().backward()  # training goes on: a new cycle
    assert all(not torch.equal(a, b) for a, b in zip(before[:4], model.parameters(), strict=False))


def test_checkpoint_resume_is_bit_identical():
    full, _ = _train(True, accum=2, steps=6)
    model = _mlp()
    opt = _optimizer(model)
    opt.update_in_backward(model, accumulation_steps=2)
    gen = torch.Generator().manual_seed(1)
    for step in range(6):
        if step == 3:  # save, then resume into fresh objects
            buffer = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
            buffer.seek(0)
            saved = torch.load(buffer, weights_only=True)
            model = _mlp(seed=9)
            model.load_state_dict(saved["model"])
            opt = _optimizer(model)
            opt.load_state_dict(saved["opt"])
            opt.update_in_backward(model, accumulation_steps=2)
        for _ in range(2):
            x, y = _micro(gen)
            ((model(x) - y).square().mean() / 2).backward()
        opt.step()
        opt.zero_grad()
    _assert_same(full, model)


def test_live_gradients_stay_within_one_layer():
    """The point of the mode: at no time during backward are more than a few gradients alive (regular
    stepping keeps all of them). Wide margin: the largest gradient plus the one being formed."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64, bias=False) for _ in range(8)])
    opt = SubspaceAdamW(param_groups(model, "all-linear", rank=4), lr=1e-3)
    peaks = {}

    def measure(label: str) -> None:
        live = [0]

        def record(_: torch.Tensor) -> None:
            now = sum(p.grad.numel() for p in model.parameters() if p.grad is not None)
            live[0] = max(live[0], now)

        hooks = [p.register_post_accumulate_grad_hook(record) for p in model.parameters()]
        model(torch.randn(4, 64)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        for h in hooks:
            h.remove()
        peaks[label] = live[0]

    measure("regular")
    handle = opt.update_in_backward(model)
    measure("layerwise")
    handle.remove()
    largest = max(p.numel() for p in model.parameters())
    assert peaks["regular"] == sum(p.numel() for p in model.parameters())
    assert peaks["layerwise"] <= 2 * largest


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"accumulation_steps": 0}, "accumulation_steps must be an int >= 1"),
        ({"accumulation_steps": 2.0}, "accumulation_steps must be an int >= 1"),
        ({"max_grad_norm": 0.0}, "max_grad_norm must be a positive finite number"),
        ({"max_grad_norm": float("inf")}, "max_grad_norm must be a positive finite number"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    model = _mlp()
    opt = _optimizer(model)
    with pytest.raises(ValueError, match=match):
        opt.update_in_backward(model, **kwargs)
    assert opt._backward_update is None


def test_model_must_hold_the_optimizers_parameters_and_attach_once():
    model, other = _mlp(), _mlp(seed=1)
    opt = _optimizer(model)
    with pytest.raises(ValueError, match="not parameters of the model given"):
        opt.update_in_backward(other)
    with pytest.raises(TypeError, match="must be an nn.Module"):
        opt.update_in_backward(list(model.parameters()))
    opt.update_in_backward(model)
    with pytest.raises(RuntimeError, match="already updating inside backward"):
        opt.update_in_backward(model)


def test_bench_layerwise_smoke_times_equal_trajectories(monkeypatch):
    """scripts/bench/layerwise.py checks, as it times, that layer-wise and regular steps agree."""
    import importlib
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    layerwise = importlib.import_module("scripts.bench.layerwise")
    render = importlib.import_module("scripts.bench.render").render
    args = layerwise.parse_args(["--smoke", "--accum", "2", "--steps", "1", "--batch", "1", "--seq", "16"])
    args.steps, args.seq = 1, 16
    rows = layerwise.run_rows(args)
    assert [r["steps"] for r in rows] == ["regular steps", "refresh steps"]
    assert all(r["regular_s"] > 0 and r["layerwise_s"] > 0 for r in rows)
    assert "| refresh steps | 2 |" in render({"tables": [layerwise.rows_table(rows, args)]})


def test_add_param_group_while_attached_is_refused():
    model, extra = _mlp(), nn.Linear(3, 3)
    opt = _optimizer(model)
    handle = opt.update_in_backward(model)
    with pytest.raises(RuntimeError, match="remove\\(\\) on the handle, add the group, then attach again"):
        opt.add_param_group({"params": list(extra.parameters())})
    assert len(opt.param_groups) == 2
    handle.remove()
    opt.add_param_group({"params": list(extra.parameters()), "param_names": ["extra.weight", "extra.bias"]})


@pytest.mark.parametrize("residual", ["fira", "fira_tensor", "apollo"])
def test_layerwise_equals_regular_with_a_residual(residual):
    """The residual's limiter scalar is per matrix, so updating one matrix at a time changes nothing."""
    regular, opt = _train(False, accum=2, steps=4, residual=residual)
    layerwise, _ = _train(True, accum=2, steps=4, residual=residual)
    _assert_same(regular, layerwise)
    assert any("update_norm" in s for s in opt.state.values())


def test_a_backward_that_died_is_forgotten_by_zero_grad():
    """An error inside backward (not ours: e.g. out of memory) skips its end-of-backward bookkeeping; the
    next zero_grad() starts a clean cycle and the following backward updates again."""
    model = _mlp()
    opt = _optimizer(model)
    opt.update_in_backward(model, accumulation_steps=2)
    x, y = _micro(torch.Generator().manual_seed(6))

    def die(_):
        raise RuntimeError("simulated failure")

    hook = model[2].weight.register_hook(die)
    with pytest.raises(RuntimeError, match="simulated failure"):
        (model(x) - y).square().mean().backward()
    hook.remove()
    opt.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    (model(x) - y).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())  # the first of a new cycle
    (model(x) - y).square().mean().backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
