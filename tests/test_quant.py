"""The 8-bit quantizer against bitsandbytes: same maps, same absmax, same dequantization bit for bit, and
codes that are the exact nearest map values. bitsandbytes' CPU code search is approximate (it can pick a
neighbour of the nearest value, most often for tiny values, where the map is dense); where the codes
differ, ours is never the farther one."""

from __future__ import annotations

import pytest
import torch

from subspace_optim import quant

F = pytest.importorskip("bitsandbytes.functional")


@pytest.mark.parametrize("signed", [True, False])
def test_maps_are_bitsandbytes_maps(signed):
    ours = quant.dynamic_map(signed)
    assert ours.dtype == torch.float32 and ours.shape == (256,)
    assert torch.equal(ours, F.create_dynamic_map(signed=signed))


@pytest.mark.parametrize("spread", ["normal", "decades"])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(64, 512), (300, 128), (37, 256)])
def test_quantize_matches_bitsandbytes_blockwise(spread, signed, shape):
    """Rows of 512 and 256 columns are bitsandbytes' blocks of 256 on the flattened tensor; rows of 128 are
    its blocks of 128. "decades" spreads values over six orders of magnitude, like Adam's second moment:
    there bitsandbytes' CPU search often misses the nearest code of tiny values, and ours never does."""
    gen = torch.Generator().manual_seed(sum(shape) + signed)
    x = torch.randn(shape, generator=gen)
    if spread == "decades":
        x = x * torch.logspace(-6, 0, shape[1])
    x = x if signed else x.square()
    codes, absmax = quant.quantize(x, signed)
    block = min(256, shape[1])
    q, st = F.quantize_blockwise(x.reshape(-1), code=F.create_dynamic_map(signed=signed), blocksize=block)
    assert torch.equal(absmax.reshape(-1), st.absmax)
    # Dequantization is the same function: bit for bit on bitsandbytes' own codes.
    ref = F.dequantize_blockwise(q, st).reshape(shape)
    assert torch.equal(quant.dequantize(q.reshape(shape), absmax, signed), ref)
    # Our codes are the nearest map values; bitsandbytes' differ only near a midpoint, where ours is nearer.
    code_map = quant.dynamic_map(signed)
    normed = x / absmax.repeat_interleave(block, dim=1)[:, : shape[1]]
    ours_err = (normed - code_map[codes.long()]).abs()
    bnb_err = (normed - code_map[q.reshape(shape).long()]).abs()
    assert bool((ours_err <= bnb_err).all())
    assert bool((ours_err <= (normed[..., None] - code_map).abs().amin(-1)).all())
    if spread == "normal":  # the two searches then agree almost everywhere
        assert float((codes == q.reshape(shape)).float().mean()) > 0.95


def test_quantization_error_is_half_a_step_and_zero_blocks_stay_zero():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 300, generator=gen)
    x[2] = 0.0
    codes, absmax = quant.quantize(x, True)
    assert torch.equal(absmax[2], torch.zeros(2))
    y = quant.dequantize(codes, absmax, True)
    assert torch.equal(y[2], torch.zeros(300))
    half_step = absmax.repeat_interleave(256, dim=1)[:, :300] * quant.dynamic_map(True).diff().max() / 2
    assert bool(((y - x).abs() <= half_step * (1 + 1e-4)).all())  # -1 sits half a step below the map's -0.993


def test_store_and_load_round_trip_each_kind():
    gen = torch.Generator().manual_seed(4)
    value = torch.rand(7, 260, generator=gen)
    for kind in quant.MOMENT_DTYPES:
        state = quant.zeros((7, 260), kind, torch.device("cpu"), "exp_avg_sq")
        assert quant.stored_kind(state, "exp_avg_sq") == kind
        assert torch.equal(quant.load(state, "exp_avg_sq"), torch.zeros(7, 260))
        quant.store(state, "exp_avg_sq", value)
        tol = {"float32": 0.0, "bfloat16": 2**-8, "int8": 0.02}[kind]
        torch.testing.assert_close(quant.load(state, "exp_avg_sq"), value, rtol=tol, atol=tol)
        quant.convert(state, "exp_avg_sq", "float32")
        assert quant.stored_kind(state, "exp_avg_sq") == "float32" and "exp_avg_sq_absmax" not in state
