"""torchao's int8 training weights stepped by SubspaceAdamW: every refresh, residual and state storage against a
dequantize-update-requantize reference with the same random bits, identical ranks, a bit-exact resume, and the
combinations refused with their message."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from conftest import roundtrip
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pytest.importorskip("torchao")

from torchao.prototype.quantized_training.int8 import quantize_int8_rowwise  # noqa: E402

from subspace_optim import SubspaceAdamW, int8_weights, rounding  # noqa: E402

SHAPES = [(24, 32), (16, 24), (40, 16)]  # two projected matrices, then a plain (head-like) one
GROUP_OPTIONS = [
    {},
    {"refresh": "svd", "moments": "keep", "residual": "none"},
    {"refresh": "dct", "moments_dtype": "int8"},
    {"refresh": "seeded", "residual": "apollo", "moments": "keep", "second_moment": "factored"},
    {"residual": "fira_tensor", "moments_dtype": "bfloat16", "basis_dtype": "bfloat16"},
]


def _linears(seed: int = 0) -> nn.ModuleList:
    torch.manual_seed(seed)
    return nn.ModuleList(nn.Linear(n, m, bias=False) for m, n in SHAPES)


def _optimizer(weights, seed=0, **options):
    groups = [{"params": weights[:2], "rank": 4, "update_gap": 3}, {"params": weights[2:]}]
    return SubspaceAdamW(groups, lr=1e-2, seed=seed, **options)


def _grads(step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=gen) for s in SHAPES]


def _requantized(value: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's stochastic requantization of ``value`` with the global generator seeded by ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return quantize_int8_rowwise(value, stochastic_rounding=True)


@pytest.mark.parametrize(
    "options", GROUP_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "defaults"
)
def test_each_step_is_the_fp32_step_requantized_with_the_same_bits(options):
    """Six steps (two refreshes): before each, an fp32 twin takes the int8 weights' values and the same gradients;
    after it, the int8 data and scales are exactly torchao's stochastic requantization of the twin's fp32 result
    with the seed of (seed, parameter index, step)."""
    layers = _linears()
    int8_weights.quantize_linears(layers)
    weights = [layer.weight for layer in layers]
    twin = [nn.Parameter(int8_weights.dequantized(w)) for w in weights]
    opt, ref = _optimizer(weights, **options), _optimizer(twin, **options)
    for step in range(1, 7):
        with torch.no_grad():
            for t, w in zip(twin, weights, strict=True):
                t.copy_(int8_weights.dequantized(w))
        for p, g in itertools.chain(zip(weights, _grads(step), strict=True), zip(twin, _grads(step), strict=True)):
            p.grad = g.clone()
        opt.step()
        ref.step()
        for index, (w, t) in enumerate(zip(weights, twin, strict=True)):
            data, scale = _requantized(t.detach(), rounding.rounding_seed(0, index, step))
            assert int8_weights.is_int8(w) and w.int_data.dtype == torch.int8
            assert torch.equal(w.int_data, data), (step, index)
            assert torch.equal(w.scale, scale), (step, index)


def test_ranks_agree_and_a_resume_is_bit_exact(tmp_path):
    """Two optimizers with the same seed (two data-parallel ranks) write the same int8 data; a run saved after three
    steps (model and optimizer, ``weights_only=True``) and resumed continues bit for bit; the global RNG is left as
    it was (the rounding forks it)."""

    def run(steps, start=0, layers=None, state=None):
        layers = layers or int8_weights.quantize_linears(_linears())
        weights = [layer.weight for layer in layers]
        opt = _optimizer(weights)
        if state is not None:
            opt.load_state_dict(state)
        for step in range(start, start + steps):
            for p, g in zip(weights, _grads(step), strict=True):
                p.grad = g
            opt.step()
        return layers, opt

    torch.manual_seed(123)
    a, _ = run(6)
    after = torch.rand(3)
    torch.manual_seed(123)
    b, _ = run(6)
    assert torch.equal(after, torch.rand(3))  # our rounding did not consume the global RNG
    assert all(torch.equal(x.weight.int_data, y.weight.int_data) for x, y in zip(a, b, strict=True))
    first, opt = run(3)
    int8_weights.allow_weights_only_checkpoints()
    torch.save({"model": first.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    fresh = int8_weights.quantize_linears(_linears(seed=7))  # other values: the checkpoint must replace them
    fresh.load_state_dict(saved["model"])
    resumed, _ = run(3, start=3, layers=fresh, state=roundtrip(saved["optimizer"]))
    for x, y in zip(a, resumed, strict=True):
        assert torch.equal(x.weight.int_data, y.weight.int_data) and torch.equal(x.weight.scale, y.weight.scale)


def test_a_skipped_matrix_keeps_its_data_and_scales():
    layers = int8_weights.quantize_linears(_linears())
    weights = [layer.weight for layer in layers]
    opt = _optimizer(weights)
    for p, g in zip(weights, _grads(0), strict=True):
        p.grad = g
    opt.step()
    before = [(w.int_data.clone(), w.scale.clone()) for w in weights]
    grads = _grads(1)
    grads[0][1, 2] = float("nan")
    for p, g in zip(weights, grads, strict=True):
        p.grad = g
    opt.step()
    assert torch.equal(weights[0].int_data, before[0][0]) and torch.equal(weights[0].scale, before[0][1])
    assert not torch.equal(weights[1].int_data, before[1][0])


def test_a_fused_group_steps_its_int8_weights_on_the_rounding_path():
    """``fused=True`` sends plain parameters to torch's fused AdamW, which torchao's weight does not implement: an
    int8 plain weight takes the rounding path instead, as with ``fused=False``, bit for bit."""
    results = []
    for fused in (False, True):
        layers = int8_weights.quantize_linears(_linears())
        weights = [layer.weight for layer in layers]
        opt = _optimizer(weights, fused=fused)
        for step in range(3):
            for p, g in zip(weights, _grads(step), strict=True):
                p.grad = g
            opt.step()
        results.append([w.int_data.clone() for w in weights])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_unsupported_combinations_are_refused_with_their_message():
    layers = int8_weights.quantize_linears(_linears())
    weights = [layer.weight for layer in layers]
    opt = _optimizer(weights, engine="triton")
    for p, g in zip(weights, _grads(0), strict=True):
        p.grad = g
    with pytest.raises(ValueError, match="engine='triton' cannot run parameter .*torchao int8 weight, which the "):
        opt.step()
    assert all(not opt.state[w] for w in weights)  # refused before any state was made
    with pytest.raises(ValueError, match=r"int8 weights: quantize an fp32 model \(its linear weights are"):
        int8_weights.quantize_linears(_linears().to(torch.bfloat16))


def test_dcp_state_dict_names_the_data_and_scales_and_shares_their_storage():
    """What DCP writes in place of an int8 weight: ``name.int_data`` and ``name.scale``, the weight's own tensors
    (a load into them is a load into the weight); other entries pass through. FSDP2 shards: tests/test_distributed."""
    layers = int8_weights.quantize_linears(_linears())
    layers.append(nn.LayerNorm(4))
    state = layers.state_dict()
    flat = int8_weights.dcp_state_dict(state)
    assert sorted(flat) == sorted(
        [f"{i}.weight.{part}" for i in range(3) for part in ("int_data", "scale")] + ["3.weight", "3.bias"]
    )
    assert flat["3.weight"] is state["3.weight"]
    w = layers[1].weight
    assert flat["1.weight.int_data"].dtype == torch.int8 and flat["1.weight.scale"].dtype == torch.float32
    flat["1.weight.int_data"].copy_(torch.randint(-127, 128, w.shape, dtype=torch.int8))
    flat["1.weight.scale"].fill_(0.5)
    assert torch.equal(w.int_data, flat["1.weight.int_data"]) and bool((w.scale == 0.5).all())
