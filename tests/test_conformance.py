"""Conformance with the contracts PyTorch's optimizer suite (``TestOptimRenewed``) checks, for SubspaceAdamW.

The configurations are described with torch's own ``OptimizerInfo`` / ``OptimizerInput`` /
``ErrorOptimizerInput`` machinery. A config whose kwargs hold a projection option (``rank``, ``update_gap``,
...) is a *projected* config: the test puts those options on a param group holding the weight matrices and
the vectors in a second group without ``rank``, e.g. ``[{"params": [W1, W2], "rank": 2, ...}, {"params":
[b1, b2]}]``. Any other config is *plain* and must behave exactly like ``torch.optim.AdamW``.

Where a contract is subtle, ``torch.optim.AdamW`` itself runs through the same test (config
``torch.optim.AdamW``), so a failure of SubspaceAdamW there cannot be a mistake of the test.
"""

from __future__ import annotations

import copy
import io
import pickle
import sys
import types
import unittest

import pytest
import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

try:  # torch.testing._internal imports expecttest (torch's own test dependency; not one of ours)
    import expecttest  # noqa: F401
except ImportError:  # it is only used there as the base of torch's unittest TestCase, which we do not use
    _expecttest = types.ModuleType("expecttest")
    _expecttest.TestCase = unittest.TestCase
    _expecttest.ACCEPT = False
    sys.modules["expecttest"] = _expecttest

from torch.testing._internal.common_optimizers import (  # noqa: E402
    ErrorOptimizerInput,
    OptimizerInfo,
    OptimizerInput,
    get_error_inputs_for_all_optims,
)

from subspace_optim import SubspaceAdamW  # noqa: E402

# Options that make a param group projected; everything else is a constructor keyword.
GROUP_KEYS = frozenset(
    {
        "rank",
        "update_gap",
        "scale",
        "refresh",
        "moments",
        "proj_type",
        "oversample",
        "power_iters",
        "seed",
        "nonfinite",
        "engine",
    }
)

TENSOR_LR_FOREACH = "lr as a Tensor is not supported for capturable=False and foreach=True"
BETAS_MIXED = "betas must be either both floats or both Tensors"


# ---------------------------------------------------------------------------------------------- OptimizerInfo
def optim_inputs_func_subspace_adamw(device, dtype=None):
    """Configs without the global-cliquey flag ``foreach`` (tests add it), as torch's own inputs funcs do."""
    return [
        OptimizerInput(params=None, kwargs={}, desc="default"),
        OptimizerInput(params=None, kwargs={"lr": 1e-2}, desc="non-default lr"),
        OptimizerInput(
            params=None,
            kwargs={"lr": 3e-3, "weight_decay": 0.1, "betas": (0.85, 0.99), "eps": 1e-7},
            desc="weight_decay betas eps",
        ),
        OptimizerInput(
            params=None,
            kwargs={"lr": 1e-2, "weight_decay": 0.1, "rank": 2, "update_gap": 2},
            desc="projected warm rotate",
        ),
        OptimizerInput(
            params=None,
            kwargs={
                "lr": 1e-2,
                "rank": 2,
                "update_gap": 2,
                "refresh": "rsvd",
                "moments": "keep",
                "proj_type": "reverse_std",
                "scale": 0.5,
            },
            desc="projected rsvd keep reverse_std",
        ),
        OptimizerInput(
            params=None,
            kwargs={"lr": 1e-2, "rank": 2, "update_gap": 2, "refresh": "svd", "moments": "reset", "proj_type": "left"},
            desc="projected svd reset left",
        ),
        OptimizerInput(
            params=None,
            kwargs={
                "lr": 1e-2,
                "weight_decay": 0.05,
                "rank": 2,
                "update_gap": 2,
                "refresh": "random",
                "proj_type": "right",
                "nonfinite": "raise",
                "engine": "reference",
            },
            desc="projected random right raise reference",
        ),
    ]


def optim_error_inputs_func_subspace_adamw(device, dtype):
    """torch's errors common to all optimizers, plus AdamW's CPU errors, with torch's types and wording."""
    inputs = get_error_inputs_for_all_optims(device, dtype)

    def err(kwargs, desc, regex, error_type=ValueError):
        return ErrorOptimizerInput(
            OptimizerInput(params=None, kwargs=kwargs, desc=desc), error_type=error_type, error_regex=regex
        )

    return inputs + [
        err({"lr": -1e-2}, "negative lr", r"^Invalid learning rate: -0\.01"),
        err({"lr": 1e-2, "eps": -1e-8}, "negative eps", r"^Invalid epsilon value: -1e-08"),
        err({"lr": 1e-2, "betas": (1.0, 0.0)}, "beta1 not in [0, 1)", r"^Invalid beta parameter at index 0: 1\.0"),
        err({"lr": 1e-2, "betas": (0.0, 1.0)}, "beta2 not in [0, 1)", r"^Invalid beta parameter at index 1: 1\.0"),
        err({"lr": 1e-2, "weight_decay": -1}, "negative weight_decay", r"^Invalid weight_decay value: -1"),
        err({"lr": torch.tensor(0.001), "foreach": True}, "tensor lr with foreach", TENSOR_LR_FOREACH),
        err({"lr": 1e-2, "betas": (0.9, torch.tensor(0.99))}, "betas float and tensor", BETAS_MIXED),
        err({"lr": 1e-2, "betas": (torch.tensor(0.9), 0.99)}, "betas tensor and float", BETAS_MIXED),
        err(
            {"lr": 1e-2, "betas": (torch.tensor(0.9), torch.tensor(0.99)), "foreach": True},
            "tensor betas with foreach",
            r"betas\[0\] as a Tensor is not supported for capturable=False and foreach=True",
        ),
    ]


subspace_adamw_info = OptimizerInfo(
    SubspaceAdamW,
    optim_inputs_func=optim_inputs_func_subspace_adamw,
    optim_error_inputs_func=optim_error_inputs_func_subspace_adamw,
    # foreach and fused are options for the plain-AdamW parameters; the suite's fused tests drive torch's
    # GradScaler found_inf protocol (``_step_supports_amp_scaling``), which SubspaceAdamW does not take, so only
    # foreach is declared (fused is held to torch.optim.AdamW(fused=True) in tests/test_fused_plain.py).
    supported_impls=("foreach",),
    # Documented unsupported: complex parameters and sparse gradients raise TypeError at step (tested below
    # instead of skipped), so no skips are declared.
    supports_complex=False,
    supports_sparse=False,
    has_capturable_arg=False,
    skips=(),
)

INPUTS = {oi.desc: oi for oi in subspace_adamw_info.optim_inputs_func("cpu")}
PLAIN = [d for d, oi in INPUTS.items() if not GROUP_KEYS & set(oi.kwargs)]
PROJECTED = [d for d, oi in INPUTS.items() if GROUP_KEYS & set(oi.kwargs)]
# The reference: torch's AdamW through the same test, to show the contract holds for torch.
REFERENCE = "torch.optim.AdamW"
REFERENCE_INPUT = OptimizerInput(params=None, kwargs={"lr": 1e-2, "weight_decay": 0.1}, desc=REFERENCE)
ALL_WITH_REFERENCE = [REFERENCE, *INPUTS]
SHORT_WITH_REFERENCE = [REFERENCE, "weight_decay betas eps", "projected warm rotate"]


# ------------------------------------------------------------------------------------------------- helpers
def _make_params(seed: int = 0) -> list[nn.Parameter]:
    """W1 (8x6, projected on the right with proj_type std), b1, W2 (3x8, left), b2: random, never zeros."""
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(shape, generator=gen)) for shape in [(8, 6), (8,), (3, 8), (3,)]]


def _clone(params: list[Tensor]) -> list[nn.Parameter]:
    return [nn.Parameter(p.detach().clone()) for p in params]


def _loss(params: list[Tensor], step: int) -> Tensor:
    w1, b1, w2, b2 = params
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(5, 6, generator=gen)
    y = torch.randn(5, 3, generator=gen)
    return (torch.tanh(x @ w1.T + b1) @ w2.T + b2 - y).square().mean()


def _closure(opt, params, step):
    def closure():
        opt.zero_grad()
        loss = _loss(params, step)
        loss.backward()
        return loss

    return closure


def _train(opt, params, steps: int, start: int = 0) -> None:
    for step in range(start, start + steps):
        opt.step(_closure(opt, params, step))


def _split(kwargs: dict) -> tuple[dict, dict]:
    kwargs = copy.deepcopy(kwargs)  # tensor lr/betas: each optimizer gets its own
    group = {k: kwargs.pop(k) for k in list(kwargs) if k in GROUP_KEYS}
    return group, kwargs


def _params_arg(params: list[Tensor], group: dict):
    if not group:
        return list(params)
    return [{"params": [p for p in params if p.dim() >= 2], **group}, {"params": [p for p in params if p.dim() < 2]}]


def _build(config: str, params: list[Tensor], **extra):
    """The optimizer of ``config`` (a desc of INPUTS, or REFERENCE) over ``params``."""
    if config == REFERENCE:
        return torch.optim.AdamW(list(params), **{**copy.deepcopy(REFERENCE_INPUT.kwargs), **extra})
    group, kwargs = _split(INPUTS[config].kwargs)
    return SubspaceAdamW(_params_arg(params, group), **{**kwargs, **extra})


def _adamw_kwargs(kwargs: dict) -> dict:
    """torch.optim.AdamW keywords for the same update as SubspaceAdamW(**kwargs): SubspaceAdamW's documented
    default weight_decay is 0.0 (AdamW's is 1e-2); everything else is AdamW's default."""
    return {"weight_decay": 0.0, **kwargs}


def _flat(opt) -> list[Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def _differences(a, b, path: str = "state_dict") -> list[str]:
    """Every place where two (nested) state dicts differ: keys, types, tensor dtype/shape/values, numbers."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            return [f"{path}: {type(a).__name__} {a!r} vs {type(b).__name__} {b!r}"]
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            return [f"{path}: tensors differ ({a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)})"]
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        if set(a) != set(b):
            only_a = sorted(set(a) - set(b), key=repr)
            only_b = sorted(set(b) - set(a), key=repr)
            out.append(f"{path}: keys differ, only in first {only_a}, only in second {only_b}")
        for k in set(a) & set(b):
            out += _differences(a[k], b[k], f"{path}[{k!r}]")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if type(a) is not type(b) or len(a) != len(b):
            return [f"{path}: {a!r} vs {b!r}"]
        out = []
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            out += _differences(x, y, f"{path}[{i}]")
        return out
    if type(a) is not type(b) or a != b:
        return [f"{path}: {type(a).__name__} {a!r} vs {type(b).__name__} {b!r}"]
    return []


def _assert_same(a, b, what: str) -> None:
    diffs = _differences(a, b)
    assert not diffs, f"{what}:\n  " + "\n  ".join(sorted(diffs))


def _assert_params_equal(actual: list[Tensor], expected: list[Tensor], what: str) -> None:
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert torch.equal(a, e), f"{what}: parameter {i} differs by {float((a - e).abs().max()):.3g}"


def _torch_roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ------------------------------------------------------------------------------------------- state dicts
@pytest.mark.parametrize("how", ["load_state_dict", "deepcopy", "pickle"])
@pytest.mark.parametrize("config", ALL_WITH_REFERENCE)
def test_state_dict_unchanged_by_roundtrip(config, how):
    """state_dict() is the same (keys, values, group keys) before and after a roundtrip of the optimizer,
    and a copied optimizer keeps stepping exactly like the original."""
    params = _make_params()
    opt = _build(config, params)
    _train(opt, params, 3)
    before = copy.deepcopy(opt.state_dict())
    if how == "load_state_dict":
        opt.load_state_dict(opt.state_dict())
        other, other_params = opt, params
    elif how == "deepcopy":
        other = copy.deepcopy(opt)
        public = {k for k in vars(opt) if not k.startswith("_")}
        assert {k for k in vars(other) if not k.startswith("_")} == public
        other_params = _flat(other)
    else:
        other = pickle.loads(pickle.dumps(opt))
        other_params = _flat(other)
    _assert_same(other.state_dict(), before, f"state_dict after {how} vs before")
    if other is not opt:
        assert all(p is not q for p, q in zip(other_params, _flat(opt), strict=True))
        _train(opt, params, 3, start=3)
        _train(other, [other_params[i] for i in _order(opt, params)], 3, start=3)
        _assert_params_equal(other_params, _flat(opt), f"stepping after {how}")
        _assert_same(other.state_dict(), opt.state_dict(), f"state_dict after {how} and 3 more steps")


def _order(opt, params) -> list[int]:
    """Index in ``_flat(opt)`` of each of ``params`` (groups reorder matrices and vectors)."""
    flat = _flat(opt)
    return [next(i for i, q in enumerate(flat) if q is p) for p in params]


@pytest.mark.parametrize("config", ALL_WITH_REFERENCE)
def test_optimizers_loaded_from_one_state_dict_stay_bit_identical(config):
    """Two fresh optimizers loading (copies of) the same state dict step exactly like the original, through
    a refresh, and end with equal state dicts; loading must not change the dict it was given."""
    params = _make_params()
    opt = _build(config, params)
    _train(opt, params, 3)
    saved = copy.deepcopy(opt.state_dict())
    twins = []
    for _ in range(2):
        twin_params = _clone(params)
        twin = _build(config, twin_params)
        given = copy.deepcopy(saved)
        twin.load_state_dict(given)
        _assert_same(given, saved, "the state dict given to load_state_dict (right after loading)")
        _assert_same(twin.state_dict(), saved, "state_dict() right after load_state_dict")
        twins.append((twin, twin_params))
    for step in range(3, 7):
        opt.step(_closure(opt, params, step))
        for twin, twin_params in twins:
            twin.step(_closure(twin, twin_params, step))
            _assert_params_equal(twin_params, params, f"twin after step {step}")
    for twin, _ in twins:
        _assert_same(twin.state_dict(), opt.state_dict(), "state dicts after stepping in parallel")


@pytest.mark.parametrize("config", SHORT_WITH_REFERENCE)
def test_state_dict_survives_torch_save_weights_only(config):
    params = _make_params()
    opt = _build(config, params)
    _train(opt, params, 3)
    loaded = _torch_roundtrip(opt.state_dict())
    twin_params = _clone(params)
    twin = _build(config, twin_params)
    twin.load_state_dict(loaded)
    _train(opt, params, 3, start=3)
    _train(twin, twin_params, 3, start=3)
    _assert_params_equal(twin_params, params, "after torch.save/torch.load(weights_only=True)")
    _assert_same(twin.state_dict(), opt.state_dict(), "state dicts after stepping")


@pytest.mark.parametrize(
    "config", [REFERENCE, "weight_decay betas eps", "projected warm rotate", "projected svd reset left"]
)
def test_state_dict_with_python_float_steps_loads_and_steps(config):
    """Older torch saved AdamW's ``state["step"]`` as a Python float. Such a dict loads and steps, with the
    result of the tensor-step dict."""
    params = _make_params()
    opt = _build(config, params)
    _train(opt, params, 3)
    saved = copy.deepcopy(opt.state_dict())
    old = copy.deepcopy(saved)
    converted = 0
    for state in old["state"].values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].item()
            converted += 1
    assert converted, "the config has no parameter with a tensor step (no plain-AdamW parameter)"

    new_params, old_params = _clone(params), _clone(params)
    new_opt, old_opt = _build(config, new_params), _build(config, old_params)
    new_opt.load_state_dict(saved)
    old_opt.load_state_dict(old)
    for step in range(3, 6):
        new_opt.step(_closure(new_opt, new_params, step))
        before = [p.detach().clone() for p in old_params]
        try:
            old_opt.step(_closure(old_opt, old_params, step))
        except Exception as e:  # report what had already changed when it failed
            moved = [i for i, (p, b) in enumerate(zip(old_params, before, strict=True)) if not torch.equal(p, b)]
            pytest.fail(
                f"step {step} after loading float steps raised {type(e).__name__}: {e}; "
                f"parameters already updated by that step: {moved}"
            )
        _assert_params_equal(old_params, new_params, f"float-step vs tensor-step dict, step {step}")
    _assert_same(old_opt.state_dict(), new_opt.state_dict(), "state dicts (float-step vs tensor-step loads)")


@pytest.mark.parametrize("config", ["weight_decay betas eps", "projected warm rotate"])
def test_state_dict_without_newer_group_keys_loads_with_defaults(config):
    """A dict saved before an option existed (here: ``foreach`` and ``matmul_precision`` missing from the
    groups) loads with the defaults and continues like the full dict."""
    params = _make_params()
    opt = _build(config, params)
    _train(opt, params, 3)
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:
        del group["foreach"]
        del group["matmul_precision"]
    twin_params = _clone(params)
    twin = _build(config, twin_params)
    twin.load_state_dict(saved)
    _assert_same(twin.state_dict(), opt.state_dict(), "state_dict after loading a dict without the newer keys")
    _train(opt, params, 3, start=3)
    _train(twin, twin_params, 3, start=3)
    _assert_params_equal(twin_params, params, "after loading a dict without the newer keys")


# ------------------------------------------------------------------------------------------- param inputs
@pytest.mark.parametrize("how", ["constructor", "add_param_group"])
@pytest.mark.parametrize("layout", ["plain", "projected"])
def test_bare_tensor_in_param_group_is_one_param(layout, how):
    """``{"params": w}`` with w a tensor is the group ``{"params": [w]}`` (torch wraps it in a list)."""
    group = {"rank": 2, "update_gap": 2} if layout == "projected" else {}
    params, ref_params = _make_params(), _make_params()

    def build(ps, bare):
        w1, b1 = ps[0], ps[1]
        if how == "constructor":
            return SubspaceAdamW([{"params": w1 if bare else [w1], **group}, {"params": [b1]}], lr=1e-2)
        opt = SubspaceAdamW([{"params": [b1]}], lr=1e-2)
        opt.add_param_group({"params": w1 if bare else [w1], **group})
        return opt

    opt = build(params, bare=True)
    ref = build(ref_params, bare=False)
    groups = [g["params"] for g in opt.param_groups]
    w_group = groups[0] if how == "constructor" else groups[1]
    assert len(w_group) == 1 and w_group[0] is params[0], f"group params are {[tuple(p.shape) for p in w_group]}"
    _train(opt, params, 3)
    _train(ref, ref_params, 3)
    _assert_params_equal(params, ref_params, "bare tensor vs one-element list")


@pytest.mark.parametrize("how", ["constructor", "add_param_group"])
@pytest.mark.parametrize("layout", ["plain", "projected"])
def test_set_of_params_in_group_raises_type_error(layout, how):
    """A set has no order, so the state dict could not be matched to it: torch raises TypeError."""
    params = _make_params()
    group = {"rank": 2} if layout == "projected" else {}
    as_set = {"params": {params[0], params[2]}, **group}
    with pytest.raises(TypeError, match="optimizer parameters need to be organized in ordered collections"):
        if how == "constructor":
            SubspaceAdamW([as_set], lr=1e-2)
        else:
            SubspaceAdamW([{"params": [params[1]]}], lr=1e-2).add_param_group(as_set)


# ------------------------------------------------------------------------------------ tensor lr and betas
@pytest.mark.parametrize(
    "config", ["default", "weight_decay betas eps", "projected warm rotate", "projected svd reset left"]
)
def test_tensor_lr_matches_float_lr(config):
    """``lr=torch.tensor(x)`` trains like ``lr=x`` (also through an LR scheduler that edits the tensor in place);
    the group keeps the tensor. Plain configs also match torch.optim.AdamW(lr=tensor) exactly."""
    lr = INPUTS[config].kwargs.get("lr", 1e-3)
    runs = {}
    for kind in ("float", "tensor"):
        params = _make_params()
        opt = _build(config, params, lr=torch.tensor(lr) if kind == "tensor" else lr)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.7)
        for step in range(5):
            opt.step(_closure(opt, params, step))
            sched.step()
        runs[kind] = (opt, params)
    opt, params = runs["tensor"]
    assert all(isinstance(g["lr"], Tensor) for g in opt.param_groups), "a group lost its tensor lr"
    for a, b in zip(params, runs["float"][1], strict=True):
        torch.testing.assert_close(a, b)
    if config in PLAIN:
        ref_params = _make_params()
        _, kwargs = _split(INPUTS[config].kwargs)
        ref = torch.optim.AdamW(ref_params, **_adamw_kwargs({**kwargs, "lr": torch.tensor(lr)}))
        sched = torch.optim.lr_scheduler.ExponentialLR(ref, gamma=0.7)
        for step in range(5):
            ref.step(_closure(ref, ref_params, step))
            sched.step()
        _assert_params_equal(params, ref_params, "tensor lr vs torch.optim.AdamW with tensor lr")


@pytest.mark.parametrize("layout", ["plain", "projected"])
def test_tensor_lr_with_foreach_raises_at_construction(layout):
    """As torch.optim.AdamW: refused with ValueError by the constructor, so no step can half-apply."""
    params = _make_params()
    group = {"rank": 2, "update_gap": 2} if layout == "projected" else {}
    try:
        opt = SubspaceAdamW(_params_arg(params, group), lr=torch.tensor(1e-3), foreach=True)
    except ValueError as e:
        assert TENSOR_LR_FOREACH in str(e), str(e)
        return
    # Not refused: report what a step then does.
    _loss(params, 0).backward()
    before = [p.detach().clone() for p in params]
    try:
        opt.step()
        outcome = "a step then ran"
    except Exception as e:
        moved = [i for i, (p, b) in enumerate(zip(params, before, strict=True)) if not torch.equal(p, b)]
        outcome = f"a step then raised {type(e).__name__} ({e}) after updating parameters {moved}"
    pytest.fail(f"the constructor accepted lr=tensor with foreach=True; {outcome}")


@pytest.mark.parametrize("config", ["default", "projected warm rotate"])
def test_tensor_betas_match_float_betas(config):
    """torch.optim.AdamW accepts 1-element tensor betas (without foreach); they train like float betas."""
    runs = []
    for betas in ((0.9, 0.99), (torch.tensor(0.9), torch.tensor(0.99))):
        params = _make_params()
        opt = _build(config, params, betas=betas)
        _train(opt, params, 4)
        runs.append(params)
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------- errors
def _error_cases():
    cases = []
    for e in subspace_adamw_info.optim_error_inputs_func("cpu", torch.float32):
        desc = e.optimizer_error_input.desc
        layouts = ["plain", "projected"] if e.optimizer_error_input.params is None else ["given"]
        cases += [pytest.param(e, layout, id=f"{desc}-{layout}") for layout in layouts]
    return cases


@pytest.mark.parametrize(("error_input", "layout"), _error_cases())
def test_errors(error_input: ErrorOptimizerInput, layout):
    """Bad constructor input raises torch's exception type with torch's message (or warns, for warnings)."""
    oi = error_input.optimizer_error_input
    if layout == "given":
        args = oi.params
    else:
        args = _params_arg(_make_params(), {"rank": 2, "update_gap": 2} if layout == "projected" else {})
    kwargs = copy.deepcopy(oi.kwargs)
    if issubclass(error_input.error_type, Warning):
        with pytest.warns(error_input.error_type, match=error_input.error_regex):
            SubspaceAdamW(args, **kwargs)
    else:
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            SubspaceAdamW(args, **kwargs)


@pytest.mark.parametrize("layout", ["plain", "projected"])
def test_complex_params_raise_type_error_and_change_nothing(layout):
    """Complex parameters are documented unsupported: the step raises TypeError before changing anything."""
    gen = torch.Generator().manual_seed(3)
    z = nn.Parameter(torch.randn(6, 4, dtype=torch.complex64, generator=gen))
    w = nn.Parameter(torch.randn(6, 4, generator=gen))
    group = {"rank": 2} if layout == "projected" else {}
    opt = SubspaceAdamW([{"params": [w, z], **group}], lr=1e-2)
    z.grad = torch.randn(6, 4, dtype=torch.complex64, generator=gen)
    w.grad = torch.randn(6, 4, generator=gen)
    z0, w0 = z.detach().clone(), w.detach().clone()
    with pytest.raises(TypeError, match="complex"):
        opt.step()
    assert torch.equal(z, z0) and torch.equal(w, w0)
    assert not opt.state.get(z) and not opt.state.get(w)


@pytest.mark.parametrize("layout", ["plain", "projected"])
def test_sparse_grads_raise_type_error_and_change_nothing(layout):
    """Sparse gradients are documented unsupported: the step raises TypeError before changing anything."""
    torch.manual_seed(4)
    emb = nn.Embedding(10, 4, sparse=True)
    w = nn.Parameter(torch.randn(10, 4))
    group = {"rank": 2} if layout == "projected" else {}
    opt = SubspaceAdamW([{"params": [w, emb.weight], **group}], lr=1e-2)
    (emb(torch.tensor([1, 3, 3, 7])).square().sum() + w.square().sum()).backward()
    assert emb.weight.grad.is_sparse
    e0, w0 = emb.weight.detach().clone(), w.detach().clone()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    assert torch.equal(emb.weight, e0) and torch.equal(w, w0)


# -------------------------------------------------------------------------------------------------- hooks
@pytest.mark.parametrize("config", SHORT_WITH_REFERENCE)
def test_step_hooks(config):
    """Global and per-optimizer step pre/post hooks run in torch's order around the update, a pre hook may
    replace the step's arguments (here: pass a closure), and removed hooks stop running."""
    params = _make_params()
    opt = _build(config, params)
    calls, seen = [], {}

    def global_pre(o, args, kwargs):
        if o is opt:
            calls.append("global_pre")

    def pre(o, args, kwargs):
        assert o is opt
        calls.append("pre")
        seen["pre"] = [p.detach().clone() for p in params]

    def post(o, args, kwargs):
        assert o is opt
        calls.append("post")
        seen["post"] = [p.detach().clone() for p in params]

    def global_post(o, args, kwargs):
        if o is opt:
            calls.append("global_post")

    handles = [
        register_optimizer_step_pre_hook(global_pre),
        opt.register_step_pre_hook(pre),
        opt.register_step_post_hook(post),
        register_optimizer_step_post_hook(global_post),
    ]
    try:
        _loss(params, 0).backward()
        start = [p.detach().clone() for p in params]
        opt.step()
        assert calls == ["global_pre", "pre", "post", "global_post"]
        _assert_params_equal(seen["pre"], start, "pre hook saw parameters already updated")
        _assert_params_equal(seen["post"], [p.detach() for p in params], "post hook ran before the update ended")
        assert all(not torch.equal(p, s) for p, s in zip(params, start, strict=True)), (
            "the step did not update every parameter"
        )

        # A pre hook returning (args, kwargs) replaces the step's arguments.
        closure_calls = []

        def closure():
            closure_calls.append(1)
            opt.zero_grad()
            loss = _loss(params, 1)
            loss.backward()
            return loss

        # args holds the optimizer itself (the bound step's self), then the positional arguments.
        inject = opt.register_step_pre_hook(lambda o, args, kwargs: (args[:1], {"closure": closure}))
        expected = _loss([p.detach() for p in params], 1)
        loss = opt.step()
        inject.remove()
        assert closure_calls == [1], "the closure returned by the pre hook was not used"
        assert isinstance(loss, Tensor) and torch.equal(loss.detach(), expected)
    finally:
        for h in handles:
            h.remove()
    calls.clear()
    _loss(params, 2).backward()
    opt.step()
    assert calls == [], f"removed hooks still ran: {calls}"


@pytest.mark.parametrize("config", SHORT_WITH_REFERENCE)
def test_step_pre_hook_can_change_hyperparameters(config):
    """A pre hook runs before the step reads its groups: lr=0 set there leaves every parameter exactly as it
    was (the step itself still happens: step counts advance)."""
    params = _make_params()
    opt = _build(config, params)

    def zero_lr(o, args, kwargs):
        for g in o.param_groups:
            g["lr"] = 0.0

    handle = opt.register_step_pre_hook(zero_lr)
    _loss(params, 0).backward()
    start = [p.detach().clone() for p in params]
    opt.step()
    handle.remove()
    _assert_params_equal(params, start, "lr=0 set by a step pre hook")
    assert all(float(opt.state[p]["step"]) == 1 for p in params)


@pytest.mark.parametrize("config", SHORT_WITH_REFERENCE)
def test_state_dict_hooks(config):
    """state_dict pre hooks run before the dict is built (what they add is in it), post hooks get the dict and
    may return a replacement."""
    params = _make_params()
    opt = _build(config, params)
    _train(opt, params, 2)
    order = []

    def pre(o):
        order.append("pre")
        o.state["ran_state_dict_pre_hook"] = True

    def post(o, sd):
        order.append("post")
        assert sd["state"].pop("ran_state_dict_pre_hook") is True
        new = dict(sd)
        new["ran_state_dict_post_hook"] = True
        return new

    h1 = opt.register_state_dict_pre_hook(pre)
    h2 = opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    opt.state.pop("ran_state_dict_pre_hook")
    h1.remove()
    h2.remove()
    assert order == ["pre", "post"]
    assert sd.pop("ran_state_dict_post_hook") is True
    _assert_same(sd, opt.state_dict(), "state_dict with hooks (their marks removed) vs without")


@pytest.mark.parametrize("config", SHORT_WITH_REFERENCE)
def test_load_state_dict_pre_hooks(config):
    """load_state_dict pre hooks run in order (prepend first); one may edit the dict in place, one may return
    a new dict, and the optimizer loads exactly what the last hook returned, state included."""
    params = _make_params()
    opt = _build(config, params)
    _train(opt, params, 3)
    saved = copy.deepcopy(opt.state_dict())
    order = []

    def edit_in_place(o, sd):
        order.append("edit_in_place")
        sd["param_groups"][0]["lr"] = 2e-3

    def replace(o, sd):
        order.append("replace")
        assert sd["param_groups"][0]["lr"] == 2e-3
        new = copy.deepcopy(sd)
        new["param_groups"][0]["lr"] = 3e-3
        for state in new["state"].values():
            state["exp_avg"] = state["exp_avg"] * 2  # e.g. a hook converting an older moment convention
        return new

    def first(o, sd):
        order.append("first")

    twin_params = _clone(params)
    twin = _build(config, twin_params)
    twin.register_load_state_dict_pre_hook(edit_in_place)
    twin.register_load_state_dict_pre_hook(replace)
    twin.register_load_state_dict_pre_hook(first, prepend=True)
    twin.load_state_dict(copy.deepcopy(saved))
    assert order == ["first", "edit_in_place", "replace"]
    assert twin.param_groups[0]["lr"] == 3e-3
    wrong = []
    for pid, p in enumerate(_flat(twin)):
        if not torch.equal(twin.state[p]["exp_avg"], saved["state"][pid]["exp_avg"] * 2):
            wrong.append(f"param {pid} {tuple(p.shape)}")
    assert not wrong, f"exp_avg not taken from the dict the pre hook returned for {wrong}"


@pytest.mark.parametrize("config", SHORT_WITH_REFERENCE)
def test_load_state_dict_post_hooks(config):
    """load_state_dict post hooks run after the load is complete: they see the loaded values, and what they
    change (here: halving every first moment) is the optimizer's state afterwards."""
    params = _make_params()
    opt = _build(config, params)
    _train(opt, params, 3)
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0]["lr"] = 5e-3
    seen = []

    def post(o):
        seen.append(o.param_groups[0]["lr"])
        for p in _flat(o):
            o.state[p]["exp_avg"] = o.state[p]["exp_avg"] * 0.5

    twin_params = _clone(params)
    twin = _build(config, twin_params)
    twin.register_load_state_dict_post_hook(post)
    twin.load_state_dict(copy.deepcopy(saved))
    assert seen == [5e-3]
    wrong = []
    for pid, p in enumerate(_flat(twin)):
        if not torch.equal(twin.state[p]["exp_avg"], saved["state"][pid]["exp_avg"] * 0.5):
            wrong.append(f"param {pid} {tuple(p.shape)}")
    assert not wrong, f"the post hook's change was overwritten after it ran for {wrong}"


# ------------------------------------------------------------------------------------------- basic usage
@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("config", ["default", "projected warm rotate"])
def test_zero_grad(config, set_to_none):
    params = _make_params()
    opt = _build(config, params)
    _loss(params, 0).backward()
    opt.zero_grad(set_to_none=set_to_none)
    for p in params:
        if set_to_none:
            assert p.grad is None
        else:
            assert p.grad is not None and p.grad.shape == p.shape and not p.grad.any()


@pytest.mark.parametrize("config", ["default", "projected warm rotate", "projected svd reset left"])
def test_step_with_closure_returns_its_loss(config):
    """step(closure) calls the closure once (with grad enabled), uses its gradients and returns its loss."""
    params, twin_params = _make_params(), _make_params()
    opt, twin = _build(config, params), _build(config, twin_params)
    for step in range(3):
        calls = []

        def closure(calls=calls, step=step):
            calls.append(torch.is_grad_enabled())
            opt.zero_grad()
            loss = _loss(params, step)
            loss.backward()
            return loss

        expected = _loss([p.detach() for p in params], step)
        loss = opt.step(closure)
        assert calls == [True]
        assert isinstance(loss, Tensor) and torch.equal(loss.detach(), expected)
        twin.zero_grad()
        _loss(twin_params, step).backward()
        assert twin.step() is None
        _assert_params_equal(params, twin_params, f"step(closure) vs backward + step(), step {step}")


@pytest.mark.parametrize("config", ["default", "projected warm rotate"])
def test_params_without_grad_are_skipped(config):
    """A parameter whose grad is None is not touched: same values, no state (its neighbours do train)."""
    params = _make_params()
    opt = _build(config, params)
    frozen = [params[2], params[1]]  # a projected-group matrix and a vector
    start = [p.detach().clone() for p in frozen]
    for step in range(3):
        opt.zero_grad()
        _loss(params, step).backward()
        for p in frozen:
            p.grad = None
        opt.step()
    _assert_params_equal(frozen, start, "parameters without grad")
    assert all(len(opt.state.get(p, {})) == 0 for p in frozen), "state was created for a parameter without grad"
    assert all(len(opt.state[p]) > 0 for p in (params[0], params[3]))


@pytest.mark.parametrize("config", ["default", "projected warm rotate"])
def test_add_param_group_trains_the_new_params(config):
    """Parameters added with add_param_group after some steps are trained from then on; a plain group trains
    exactly like torch.optim.AdamW started at that point."""
    params = _make_params()
    group, kwargs = _split(INPUTS[config].kwargs)
    opt = SubspaceAdamW(_params_arg([params[0], params[1]], group), **kwargs)
    _train(opt, params, 2)
    w2, b2 = params[2], params[3]
    (ref_b2,) = _clone([b2])
    ref = torch.optim.AdamW([ref_b2], **_adamw_kwargs(kwargs))
    start_w2 = w2.detach().clone()
    opt.add_param_group({"params": [w2], **group})
    opt.add_param_group({"params": [b2]})
    for step in range(2, 6):
        opt.step(_closure(opt, params, step))
        ref_b2.grad = b2.grad.clone()  # the gradient the step just used
        ref.step()
    assert not torch.equal(w2, start_w2) and float(opt.state[w2]["step"]) == 4
    if group:
        assert "basis" in opt.state[w2], "the added matrix was not projected"
    _assert_params_equal([b2], [ref_b2], "added plain group vs torch.optim.AdamW")


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("config", PLAIN)
def test_plain_config_matches_torch_adamw_exactly(config, foreach):
    params, ref_params = _make_params(), _make_params()
    opt = _build(config, params, foreach=foreach)
    _, kwargs = _split(INPUTS[config].kwargs)
    ref = torch.optim.AdamW(ref_params, **_adamw_kwargs(kwargs), foreach=foreach)
    for step in range(6):
        opt.step(_closure(opt, params, step))
        ref.step(_closure(ref, ref_params, step))
        _assert_params_equal(params, ref_params, f"vs torch.optim.AdamW at step {step}")
    for p, q in zip(params, ref_params, strict=True):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], ref.state[q][key]), key


@pytest.mark.parametrize("config", PROJECTED)
def test_projected_config_decreases_the_loss(config):
    """The step goes downhill: 30 steps on one fixed batch lower its loss."""
    params = _make_params()
    opt = _build(config, params)
    first = float(_loss(params, 0))
    for _ in range(30):
        opt.step(_closure(opt, params, 0))
    assert float(_loss(params, 0)) < 0.9 * first


def test_optimizer_can_be_printed():
    params = _make_params()
    for config in ("default", "projected warm rotate"):
        text = repr(_build(config, params))
        assert text.startswith("SubspaceAdamW (") and "Parameter Group 0" in text


# ---------------------------------------------------------------------------------------- torch.compile
_INDUCTOR_PROBE: list[str | None] = []


def _inductor_unavailable() -> str | None:
    """Why inductor cannot compile anything on this machine (e.g. no C++ compiler), or None."""
    if not _INDUCTOR_PROBE:
        torch._dynamo.reset()
        try:
            torch.compile(lambda x: x.sin() + 1, backend="inductor")(torch.randn(4))
            _INDUCTOR_PROBE.append(None)
        except Exception as e:  # noqa: BLE001 - any failure of this trivial function is the machine's
            _INDUCTOR_PROBE.append(f"inductor cannot compile a trivial function here: {type(e).__name__}: {e}")
        finally:
            torch._dynamo.reset()
    return _INDUCTOR_PROBE[0]


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_compiled_step_matches_eager(backend):
    """torch.compile(opt.step) (graph breaks allowed) gives eager's numbers: a model with a projected matrix
    group and a plain group, 3 steps with update_gap=2 (so a refresh of an existing basis is compiled too)."""
    if backend == "inductor" and (why := _inductor_unavailable()):
        pytest.skip(why)

    def build():
        torch.manual_seed(0)
        layer = nn.Linear(6, 8)
        opt = SubspaceAdamW(
            [{"params": [layer.weight], "rank": 2, "update_gap": 2}, {"params": [layer.bias]}],
            lr=1e-2,
            weight_decay=0.1,
        )
        return layer, opt

    gen = torch.Generator().manual_seed(7)
    readout = torch.randn(8, 3, generator=gen)
    batches = [(torch.randn(5, 6, generator=gen), torch.randn(5, 3, generator=gen)) for _ in range(3)]
    eager_layer, eager_opt = build()
    layer, opt = build()
    torch._dynamo.reset()
    try:
        step = torch.compile(opt.step, backend=backend, fullgraph=False)
        for i, (x, y) in enumerate(batches):
            for lay, o, do_step in ((eager_layer, eager_opt, eager_opt.step), (layer, opt, step)):
                o.zero_grad()
                (torch.tanh(lay(x)) @ readout - y).square().mean().backward()
                do_step()
            for name, p, q in (("weight", layer.weight, eager_layer.weight), ("bias", layer.bias, eager_layer.bias)):
                torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5, msg=lambda m, n=name, i=i: f"{n} step {i}: {m}")
                s, t = opt.state[p], eager_opt.state[q]
                assert set(s) == set(t), f"{name} state keys"
                for key in s:
                    if isinstance(t[key], Tensor):
                        torch.testing.assert_close(s[key], t[key], atol=1e-5, rtol=1e-5)
                    else:
                        assert s[key] == t[key], f"{name} state[{key!r}] step {i}"
    finally:
        torch._dynamo.reset()
