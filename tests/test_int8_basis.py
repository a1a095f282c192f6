"""8-bit stored bases (``basis_dtype="int8"``, ``stored_basis``): the codes are the moments' quantizer applied to the
basis a refresh computes, a step uses exactly their dequantized values, the moments rotate between dequantized bases,
and the Triton engine, conversions, refusals and resumes agree with that."""

from __future__ import annotations

import pytest
import torch
from conftest import roundtrip

from subspace_optim import SubspaceAdamW, quant, stored_basis
from subspace_optim.subspace import transport_moments

SHAPES = ((48, 80), (96, 40))  # a left and a right basis


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in SHAPES]


def _grads(params: list[torch.nn.Parameter], step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def _opt(params, **options) -> SubspaceAdamW:
    group = {"params": params, "rank": 8, "update_gap": 3, **options}
    return SubspaceAdamW([group], lr=1e-2, weight_decay=0.01)


def _run(params, opt, steps: range) -> None:
    for step in steps:
        _grads(params, step)
        opt.step()


def test_a_refresh_stores_the_basis_quantized_by_the_moments_quantizer():
    """Same gradients and seeds: the 8-bit state is ``quant.quantize`` of the fp32 basis the fp32 run stores, codes
    and absmax bit for bit, at the first refresh and after a warm refresh that started from the dequantized basis."""
    exact, low = _params(), _params()
    opt_exact, opt_low = _opt(exact), _opt(low, basis_dtype="int8")
    _run(exact, opt_exact, range(1))
    _run(low, opt_low, range(1))
    for p, q in zip(exact, low, strict=True):
        codes, absmax = quant.quantize(opt_exact.state[p]["basis"], signed=True)
        state = opt_low.state[q]
        assert state["basis"].dtype == torch.uint8 and state["basis_absmax"].dtype == torch.float32
        assert torch.equal(state["basis"], codes) and torch.equal(state["basis_absmax"], absmax)
        assert stored_basis.kind(state) == "int8"
    _run(low, opt_low, range(1, 4))  # step 3 refreshes, warm-started from the dequantized basis
    for q in low:
        state = opt_low.state[q]
        assert state["refresh_count"] == 2
        basis = stored_basis.load(state)
        gram = basis.T @ basis  # 8-bit codes keep the columns orthonormal to the quantizer's accuracy
        torch.testing.assert_close(gram, torch.eye(8), atol=3e-2, rtol=0)


@pytest.mark.parametrize("options", [{}, {"moments_dtype": "int8", "second_moment": "factored"}, {"residual": "none"}])
def test_a_step_equals_the_same_step_with_the_dequantized_basis_stored_fp32(options):
    """A run with 8-bit bases, and its checkpoint converted to fp32 bases (``stored_basis.convert``: the dequantized
    values), take the same non-refresh steps bit for bit: a step reads exactly the dequantized basis."""
    low = _params()
    opt_low = _opt(low, basis_dtype="int8", **options)
    _run(low, opt_low, range(4))
    twin = [torch.nn.Parameter(p.detach().clone()) for p in low]
    opt_twin = _opt(twin, **options)
    opt_twin.load_state_dict(roundtrip(opt_low.state_dict()))
    for group in opt_twin.param_groups:
        group["basis_dtype"] = "float32"
    _run(low, opt_low, range(4, 6))  # no refresh at steps 4 and 5 (update_gap 3)
    _run(twin, opt_twin, range(4, 6))
    for p, q in zip(low, twin, strict=True):
        assert opt_twin.state[q]["basis"].dtype == torch.float32
        assert torch.equal(opt_twin.state[q]["basis"], stored_basis.load(opt_low.state[p]))
        assert torch.equal(p, q)


def test_moments_rotate_between_the_dequantized_bases():
    """At a refresh the moments move from the previous dequantized basis to the new basis, as
    ``transport_moments`` does in fp32 (then the step's own update follows)."""
    params = _params()
    opt = _opt(params, basis_dtype="int8", residual="none")
    _run(params, opt, range(3))
    p = params[0]  # 48 x 80: a left basis, r x n moments
    state = opt.state[p]
    previous = stored_basis.load(state).clone()
    m, v = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
    _run(params, opt, range(3, 4))  # refresh, then a step in the new basis
    new = stored_basis.load(state)
    transport_moments(m, v, previous, stored_basis.load(state), "left", "rotate")
    r = new.T @ p.grad
    torch.testing.assert_close(state["exp_avg"], m.lerp(r, 0.1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state["exp_avg_sq"], v.lerp(r.square(), 0.001), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(
    "options", [{}, {"moments_dtype": "int8"}, {"moments_dtype": "int8", "second_moment": "factored"}]
)
def test_triton_engine_steps_an_int8_basis_as_the_reference_does(options):
    """From the same state, the kernels (reading the 8-bit basis materialized to fp32, a chunk at a time) take the
    reference's non-refresh steps to float tolerance, and leave the codes untouched."""
    ref = _params()
    opt_ref = _opt(ref, basis_dtype="int8", **options)
    _run(ref, opt_ref, range(4))
    tri = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    opt_tri = _opt(tri, basis_dtype="int8", engine="triton", **options)
    opt_tri.load_state_dict(roundtrip(opt_ref.state_dict()))
    opt_tri.param_groups[0]["engine"] = "triton"  # the checkpoint brought the reference's groups
    _run(ref, opt_ref, range(4, 6))
    _run(tri, opt_tri, range(4, 6))
    for p, q in zip(ref, tri, strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        assert torch.equal(opt_tri.state[q]["basis"], opt_ref.state[p]["basis"])


def test_converting_between_basis_dtypes_goes_through_fp32():
    """bf16 -> int8 -> fp32: each conversion stores the previous values in the new storage (a checkpoint resumed
    with another ``basis_dtype``), and an int8 re-store of its own dequantized values is a fixed point."""
    params = _params()
    opt = _opt(params, basis_dtype="bfloat16")
    _run(params, opt, range(2))
    state = opt.state[params[0]]
    values = state["basis"].float()
    stored_basis.convert(state, "int8")
    codes, absmax = quant.quantize(values, signed=True)
    assert torch.equal(state["basis"], codes) and torch.equal(state["basis_absmax"], absmax)
    dequantized = stored_basis.load(state)
    stored_basis.convert(state, "float32")
    assert "basis_absmax" not in state and torch.equal(state["basis"], dequantized)
    stored_basis.convert(state, "int8")
    again = stored_basis.load(state)
    stored_basis.convert(state, "int8")  # already int8: nothing changes
    assert torch.equal(stored_basis.load(state), again)


def test_regenerated_refreshes_drop_the_stored_basis_and_its_absmax():
    """A group switched from a stored 8-bit basis to a DCT refresh keeps neither codes nor absmax after its next
    refresh (``projections.keep_only``)."""
    params = _params()
    opt = _opt(params, basis_dtype="int8")
    _run(params, opt, range(2))
    opt.param_groups[0]["refresh"] = "dct"
    _run(params, opt, range(2, 4))  # step 3 refreshes with the new policy
    for p in params:
        assert "basis" not in opt.state[p] and "basis_absmax" not in opt.state[p]
        assert "basis_index" in opt.state[p]


def test_int8_basis_is_a_quarter_of_fp32_in_state_bytes():
    """d r codes and d ceil(r / 256) fp32 scales instead of 4 d r bytes."""
    from subspace_optim import state_bytes

    sizes = {}
    for dtype in ("float32", "int8"):
        params = _params()
        opt = _opt(params, basis_dtype=dtype, residual="none")
        _run(params, opt, range(1))
        moments = sum(opt.state[p][k].numel() * 4 for p in params for k in ("exp_avg", "exp_avg_sq"))
        sizes[dtype] = state_bytes(opt) - moments
    d_total = 48 + 40  # left basis of 48 x 80 (48 x 8), right basis of 96 x 40 (40 x 8)
    assert sizes["float32"] == 4 * 8 * d_total
    assert sizes["int8"] == 8 * d_total + 4 * d_total
