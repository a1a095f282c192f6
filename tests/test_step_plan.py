"""A regular step reuses the last step's per-parameter checks and engine choices (``step_plan.StepPlan``)
only while nothing they depend on changed: the plan is invisible in the numbers.

Each test runs the same script of steps and changes on two optimizers, one with the plan disabled, and
requires bit-identical weights and state after every step, and the same errors.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from subspace_optim import SubspaceAdamW, checks, engine


def _params(seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(12, 8), (8, 20), (12, 8), (6, 2, 3), (8,)]  # right, left, a batch of two, a 3-D weight, a vector
    return [nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]


def _pair():
    """Two optimizers over equal parameters; the second never keeps a plan."""
    out = []
    for planned in (True, False):
        params = _params()
        opt = SubspaceAdamW(
            [{"params": params[:4], "rank": 2, "update_gap": 4}, {"params": params[4:]}], lr=1e-2, weight_decay=0.1
        )
        if not planned:
            opt._plan_key = lambda: None  # type: ignore[method-assign]
        out.append((opt, params))
    return out


def _grads(params, step: int, skip: tuple[int, ...] = (), nan: tuple[int, ...] = ()) -> None:
    gen = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen).to(p.dtype)
        if i in nan:
            g[0] = float("nan")
        p.grad = None if i in skip else g


def _same(a, b) -> None:
    (opt_a, pa), (opt_b, pb) = a, b
    for x, y in zip(pa, pb, strict=True):
        assert torch.equal(x, y)
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].keys() == sb[k].keys(), k
        for key, v in sa[k].items():
            assert torch.equal(v, sb[k][key]) if isinstance(v, torch.Tensor) else v == sb[k][key], (k, key)


def _run(pair, script) -> None:
    """``script``: a list of (change, grads kwargs); ``change(opt, params)`` runs before the step."""
    for step, (change, kwargs) in enumerate(script):
        outcomes = []
        for opt, params in pair:
            if change is not None:
                change(opt, params)
            _grads(params, step, **kwargs)
            try:
                opt.step()
                outcomes.append(None)
            except (ValueError, TypeError, RuntimeError, FloatingPointError) as err:
                outcomes.append(type(err))
        assert outcomes[0] == outcomes[1], (step, outcomes)
        _same(*pair)


def _set(key, value, group=0):
    def change(opt, params):
        opt.param_groups[group][key] = value

    return change


def test_the_plan_is_invisible_through_option_gradient_and_state_changes():
    pair = _pair()
    script = [
        (None, {}),  # first step: state, refresh
        (None, {}),
        (None, {"nan": (1,)}),  # a skipped matrix (device-side), then regular steps that settle it
        (None, {}),
        (None, {"skip": (2, 4)}),  # some gradients missing
        (None, {}),
        (_set("residual", "fira"), {}),  # structural: the limiter's state appears
        (None, {}),
        (_set("moments_dtype", "bfloat16"), {}),  # structural: the state is converted
        (None, {}),
        (_set("lr", 3e-3), {}),  # not structural: read every step
        (None, {}),
        (lambda opt, ps: opt.load_state_dict(opt.state_dict()), {}),  # the state is replaced
        (None, {}),
        (_set("nonfinite", "raise"), {"nan": (0,)}),  # raises on both, nothing changed
        (_set("nonfinite", "skip"), {}),
    ]
    _run(pair, script)


def test_gradient_layout_and_dtype_changes_are_rechecked():
    """A gradient that changes layout (strided), or a weight that changes dtype, is checked again."""
    pair = _pair()
    _run(pair, [(None, {}), (None, {})])
    for opt, params in pair:
        _grads(params, 7)
        params[0].grad = params[0].grad.t().contiguous().t()  # same values, column-major
        opt.step()
    _same(*pair)
    outcomes = []
    for opt, params in pair:  # the weight itself becomes bf16 (``p.data`` swapped): its dtype is in the key
        params[1].data = params[1].data.bfloat16()
        _grads(params, 8)
        try:
            opt.step()
            outcomes.append(None)
        except (ValueError, TypeError, RuntimeError) as err:
            outcomes.append(type(err))
    assert outcomes[0] == outcomes[1]
    _same(*pair)


def test_a_parameter_put_into_a_group_behind_its_back_is_still_refused():
    """DeepSpeed-style in-place edits of ``group["params"]`` change the plan's key: refused as on a first step."""
    pair = _pair()
    _run(pair, [(None, {}), (None, {})])
    for opt, _ in pair:
        extra = nn.Parameter(torch.randn(8, 8))
        extra.grad = torch.randn(8, 8)
        opt.param_groups[0]["params"].append(extra)
        with pytest.raises(ValueError, match="put into a param group directly"):
            opt.step()


def test_regular_steps_check_nothing_per_parameter(monkeypatch):
    """Once planned, a regular step makes no per-parameter check or engine decision."""
    (opt, params), _ = _pair()
    for step in range(2):
        _grads(params, step)
        opt.step()
    calls = {"check": 0, "resolve": 0}
    check, resolve = checks.refuse_bad_gradient, engine.resolve

    def counted_check(*args, **kwargs):
        calls["check"] += 1
        return check(*args, **kwargs)

    def counted_resolve(*args, **kwargs):
        calls["resolve"] += 1
        return resolve(*args, **kwargs)

    monkeypatch.setattr(checks, "refuse_bad_gradient", counted_check)
    monkeypatch.setattr(engine, "resolve", counted_resolve)
    for step in range(2, 4):  # update_gap 4: no refresh at steps 2 and 3
        _grads(params, step)
        opt.step()
    assert calls == {"check": 0, "resolve": 0}


@pytest.mark.parametrize("how", ["clear", "del", "assign", "plain", "ior"])
def test_replacing_state_entries_drops_the_plan(how):
    """``opt.state.clear()``, ``del opt.state[p]``, ``opt.state[p] = {...}`` (a matrix's or a plain parameter's) or
    ``opt.state |= {...}``
    between steps: the next step starts from the state the mapping now holds, as without a plan."""
    pair = _pair()
    _run(pair, [(None, {}), (None, {})])

    def change(opt, params):
        if how == "clear":
            opt.state.clear()
        elif how == "del":
            del opt.state[params[0]]
        elif how == "assign":
            opt.state[params[1]] = {}
        elif how == "plain":
            opt.state[params[4]] = {}
        else:  # dict's in-place union: C code, not ``update``
            opt.state |= {params[1]: {}}

    _run(pair, [(change, {}), (None, {}), (None, {})])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_plain_parameters_step_as_torch_adamw_default_in_every_dtype(dtype):
    """Plain parameters on the CPU take torch's foreach AdamW where it rounds as torch's default per-tensor loop
    (not fp16, where its scalar multiply rounds otherwise): bit-identical to ``torch.optim.AdamW()``."""
    gen = torch.Generator().manual_seed(3)
    base = [torch.randn(4, 6, generator=gen).to(dtype), torch.randn(6, generator=gen).to(dtype)]
    ours_p = [nn.Parameter(t.clone()) for t in base]
    ref_p = [nn.Parameter(t.clone()) for t in base]
    ours = SubspaceAdamW(ours_p, lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(ref_p, lr=1e-2, weight_decay=0.1)
    for step in range(6):
        for ps in (ours_p, ref_p):
            g = torch.Generator().manual_seed(50 + step)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g).to(dtype)
        with pytest.warns(UserWarning) if step == 0 else contextlib.nullcontext():
            ours.step()
        ref.step()
    for a, b in zip(ours_p, ref_p, strict=True):
        assert torch.equal(a, b)
