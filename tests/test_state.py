"""Tier 3: state round trips. save -> torch.load(weights_only=True) -> load must continue bit-identically."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import numbers
import platform
from pathlib import Path

import pytest
import torch
from conftest import roundtrip
from torch import nn

from subspace_optim import SubspaceAdamW

DATA = Path(__file__).parent / "data"


def _release_module():
    """tests/data/make_release_checkpoint.py, which froze the release checkpoint: its network, optimizer settings
    and training step are the ones every test here uses, so the release cases and the round trips below train
    the same problem."""
    spec = importlib.util.spec_from_file_location("make_release_checkpoint", DATA / "make_release_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_RELEASE = _release_module()
_FROZEN = torch.load(DATA / "release_checkpoint.pt", weights_only=True)
_net = _RELEASE.net  # the seeded 16 -> 24 -> 12 -> 5 MLP, in a weight dtype
_step = _RELEASE.step  # one regression step on batch ``i`` of a seeded stream


def _optimizer(net: nn.Module, **overrides) -> SubspaceAdamW:
    """Rank 4, a refresh every 3 steps, scale 0.5, weight decay 0.01: the warm refresh with rotated moments
    unless ``overrides`` say otherwise."""
    return _RELEASE.optimizer(net, {"refresh": "warm", "moments": "rotate", **overrides})


def _trained(steps: int, dtype: torch.dtype = torch.float32, **overrides) -> tuple[nn.Module, SubspaceAdamW]:
    """A fresh network and optimizer after ``steps`` steps."""
    net = _net(dtype)
    opt = _optimizer(net, **overrides)
    for step in range(steps):
        _step(net, opt, step)
    return net, opt


@pytest.mark.parametrize("refresh", ["warm", "rsvd", "svd", "random"])
@pytest.mark.parametrize("moments", ["rotate", "keep", "reset"])
@pytest.mark.parametrize("split", [4, 6])  # mid-phase (step 4 of gap 3) and on a refresh boundary
def test_resume_is_bit_identical(refresh, moments, split):
    total = 11
    net_a, opt_a = _trained(total, refresh=refresh, moments=moments)

    net_b, opt_b = _trained(split, refresh=refresh, moments=moments)
    saved_model = roundtrip(net_b.state_dict())
    saved_opt = roundtrip(opt_b.state_dict())

    net_c = _net(torch.float32)
    net_c.load_state_dict(saved_model)
    opt_c = _optimizer(net_c, refresh=refresh, moments=moments)
    opt_c.load_state_dict(saved_opt)
    for step in range(split, total):
        _step(net_c, opt_c, step)

    for a, c in zip(net_a.parameters(), net_c.parameters(), strict=True):
        assert torch.equal(a, c)
    state_a, state_c = opt_a.state_dict()["state"], opt_c.state_dict()["state"]
    assert state_a.keys() == state_c.keys()
    for pid in state_a:
        for key, value in state_a[pid].items():
            other = state_c[pid][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, (
                pid,
                key,
            )


def test_state_holds_only_tensors_and_numbers():
    _, opt = _trained(4)
    sd = opt.state_dict()
    projected = 0
    for entry in sd["state"].values():
        projected += "basis" in entry
        for key, value in entry.items():
            assert isinstance(value, (torch.Tensor, numbers.Number)), (key, type(value))
    assert projected == 3
    # Groups hold plain data only (what weights_only=True unpickles).
    roundtrip(sd)


def test_state_is_lazy():
    net, opt = _trained(0)
    assert len(opt.state) == 0
    _step(net, opt, 0)
    assert len(opt.state) == len(list(net.parameters()))


def test_bf16_params_keep_fp32_basis_and_moments_after_load():
    net, opt = _trained(4, torch.bfloat16)
    saved = roundtrip(opt.state_dict())
    fresh = _optimizer(net)
    fresh.load_state_dict(saved)
    checked = 0
    for p in net.parameters():
        state, original = fresh.state[p], opt.state[p]
        if "basis" not in state:
            # Plain AdamW params follow torch's policy: moments in the param dtype.
            assert state["exp_avg"].dtype == torch.bfloat16
            continue
        for key in ("basis", "exp_avg", "exp_avg_sq"):
            assert original[key].dtype == torch.float32
            assert state[key].dtype == torch.float32
            assert torch.equal(state[key], original[key])  # not rounded through bf16 on the way
            checked += 1
    assert checked == 9
    _step(net, fresh, 4)  # and the loaded optimizer keeps working


def test_load_keeps_loaded_tensors_independent_of_the_source_dict():
    net, opt = _trained(2)
    sd = opt.state_dict()
    fresh = _optimizer(net)
    fresh.load_state_dict(sd)
    for p in net.parameters():
        if "basis" in fresh.state[p]:
            assert fresh.state[p]["basis"].data_ptr() != opt.state[p]["basis"].data_ptr()


def test_optimizer_deepcopies_and_pickles():
    """Some training frameworks deepcopy or pickle the optimizer; the guarded param groups must survive."""
    import copy
    import pickle

    _, opt = _trained(1)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert [g["rank"] for g in clone.param_groups] == [g["rank"] for g in opt.param_groups]
        assert len(clone.state) == len(opt.state)
        for p in (q for g in clone.param_groups for q in g["params"]):
            p.grad = torch.randn_like(p)
        clone.step()  # the copied parameters are recognised as the optimizer's own
        with pytest.raises(ValueError, match="DeepSpeed"):
            clone.param_groups[0]["params"] = [torch.zeros(3, requires_grad=True)]


def test_checkpoint_from_before_an_option_existed_loads_with_its_default():
    """Groups saved by an older version lack options added since (matmul_precision, refresh_owner, ...):
    loading gives them the defaults, and the optimizer steps on."""
    net, opt = _trained(1)
    sd = opt.state_dict()
    for group in sd["param_groups"]:
        group.pop("matmul_precision")
        group.pop("refresh_owner")
    fresh = _optimizer(net)
    fresh.load_state_dict(sd)
    for group in fresh.param_groups:
        assert group["matmul_precision"] == "auto" and group["refresh_owner"] == "all"
    _step(net, fresh, 1)


@contextlib.contextmanager
def _threads(count: int):
    """Run with ``count`` intra-op threads (CPU reductions sum in an order that depends on it), then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cpu_model() -> str:
    """This machine's CPU model name (/proc/cpuinfo's first ``model name``; ``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


# Bit for bit only on the CPU model the release ran on (``_RELEASE.CPU``); elsewhere its GEMMs round differently.
_RELEASE_CPU = _RELEASE.CPU in _cpu_model()


def _same_numbers(expected: torch.Tensor, got: torch.Tensor, what: object) -> None:
    """Equal bit for bit (and in dtype) on the release's CPU model; on another, equal to the dtype's float
    tolerance (``assert_close``'s defaults: a few ulps of drift over the resumed steps, far below what any change
    of the math leaves)."""
    assert got.dtype == expected.dtype, what
    if _RELEASE_CPU:
        assert torch.equal(got, expected), what
    else:
        torch.testing.assert_close(got, expected, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("ambient", [1, 2, 3])
@pytest.mark.parametrize("case", range(len(_FROZEN["cases"])))
def test_release_checkpoint_resumes_bit_identically(case, ambient):
    """A checkpoint saved by the release at 552fb61 (tests/data/make_release_checkpoint.py) resumes with the
    current code to exactly the weights and state that release reached. Bit-exact holds for one thread count
    (the one the release ran with), so the test pins it: the suite's own count (``ambient``) must not matter;
    and for one CPU model (the release's): on another the numbers must agree to float tolerance
    (``_same_numbers``), every key, option and integer still exactly."""
    with _threads(ambient), _threads(_RELEASE.THREADS):
        _resume_release_case(case)


def _resume_release_case(case: int) -> None:
    frozen = _FROZEN["cases"][case]
    dtype = getattr(torch, frozen["dtype"].removeprefix("torch."))
    model = _RELEASE.net(dtype)
    model.load_state_dict(frozen["model"])
    opt = _RELEASE.optimizer(model, frozen["options"])
    opt.load_state_dict(torch.load(io.BytesIO(frozen["optimizer"]), weights_only=True))
    for i in range(_FROZEN["split"], _FROZEN["total"]):
        _RELEASE.step(model, opt, i)
    for key, value in frozen["final_model"].items():
        _same_numbers(value, model.state_dict()[key], key)
    expected = torch.load(io.BytesIO(frozen["final_optimizer"]), weights_only=True)
    got = roundtrip(opt.state_dict())
    from subspace_optim import options

    # Options added since the release appear at their defaults; every saved key is unchanged.
    # (or, where the default changed since, the behaviour the checkpoint was saved with: options.ABSENT_MEANS)
    added = {
        k: options.ABSENT_MEANS.get(k, v) for k, v in options.DEFAULTS.items() if k not in expected["param_groups"][0]
    }
    assert got["param_groups"] == [{**g, **added} for g in expected["param_groups"]]
    since = {"moments_dtype", "basis_dtype", "residual", "plain_lr", "fused", "seed_stream", "limiter", "second_moment"}
    since |= {"stochastic_rounding", "plain_moments_dtype", "plain_second_moment"}
    assert set(added) <= since
    for pid, entry in expected["state"].items():
        assert got["state"][pid].keys() == entry.keys(), pid
        for key, value in entry.items():
            other = got["state"][pid][key]
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                _same_numbers(value, other, (pid, key))
            elif isinstance(value, torch.Tensor):
                assert torch.equal(value, other) and value.dtype == other.dtype, (pid, key)
            else:
                assert value == other, (pid, key)


def test_optimizer_pickled_before_the_guards_rename_loads():
    """A whole optimizer pickled when its param groups' class lived in ``subspace_optim.compat`` (renamed
    ``guards``) still loads, with the same groups and state."""
    import pickle

    w = torch.nn.Parameter(torch.randn(6, 5, generator=torch.Generator().manual_seed(0)))
    opt = SubspaceAdamW([{"params": [w], "rank": 2}], lr=1e-2)
    w.grad = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    opt.step()
    data = pickle.dumps(opt, protocol=0)  # protocol 0 names classes as plain text lines
    assert b"subspace_optim.guards\nParamGroup" in data
    loaded = pickle.loads(data.replace(b"subspace_optim.guards\nParamGroup", b"subspace_optim.compat\nParamGroup"))
    assert loaded.param_groups[0]["rank"] == 2
    (p,) = loaded.param_groups[0]["params"]
    assert torch.equal(loaded.state[p]["basis"], opt.state[w]["basis"])
