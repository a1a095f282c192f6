"""Low-precision optimizer state (moments_dtype, basis_dtype): what is stored, what it costs, and that every
path (step, refresh transport, plain AdamW, checkpoints) goes through the same fp32 working copies."""

from __future__ import annotations

import pytest
import torch
from conftest import roundtrip
from torch import nn

from subspace_optim import SubspaceAdamW, param_groups, quant, state_bytes
from subspace_optim.subspace import transport_moments

COMBOS = [(m, b) for m in quant.MOMENT_DTYPES for b in quant.BASIS_DTYPES]


def _net(dtype=torch.float32):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(300, 64), nn.Linear(64, 300), nn.Tanh(), nn.Linear(300, 64), nn.LayerNorm(64))
    return net.to(dtype)


def _opt(net, **kw):
    return SubspaceAdamW(param_groups(net, "all-linear", rank=8, update_gap=3), lr=1e-2, **kw)


def _step(net, opt, i):
    x = torch.randint(0, 300, (16, 8), generator=torch.Generator().manual_seed(i))
    opt.zero_grad()
    net(x).float().square().mean().backward()
    opt.step()


@pytest.mark.parametrize("moments_dtype,basis_dtype", COMBOS)
def test_state_is_stored_as_asked(moments_dtype, basis_dtype):
    net = _net()
    opt = _opt(net, moments_dtype=moments_dtype, basis_dtype=basis_dtype)
    _step(net, opt, 0)
    projected, embed, norm = opt.state[net[1].weight], opt.state[net[0].weight], opt.state[net[4].weight]
    want = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.uint8}[moments_dtype]
    assert projected["basis"].dtype == {**quant.TORCH_DTYPES, "int8": torch.uint8}[basis_dtype]
    assert ("basis_absmax" in projected) == (basis_dtype == "int8")
    for state in (projected, embed):  # the embedding (19200 values) is large enough for 8 bits
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == want
        assert ("exp_avg_absmax" in state) == (moments_dtype == "int8")
    if moments_dtype == "int8":  # 64 values: kept fp32 (bitsandbytes' min_8bit_size rule)
        assert norm["exp_avg"].dtype == torch.float32
    if moments_dtype == "int8":
        assert projected["exp_avg_absmax"].shape == (300, 1)  # right projection: 300 x 8 moments, one block a row


def test_int8_moments_and_bf16_basis_cut_state_to_a_third():
    """LLaMA-60M's MLP shape at its rank: 8-bit moments and a bf16 basis hold <= 0.36x the fp32 state."""
    w = nn.Parameter(torch.randn(1376, 512) * 0.02)
    sizes = {}
    for dtypes in ({}, {"moments_dtype": "int8", "basis_dtype": "bfloat16"}):
        opt = SubspaceAdamW([w], rank=128, **dtypes)
        w.grad = torch.randn(1376, 512)
        opt.step()
        sizes[bool(dtypes)] = state_bytes(opt)
    assert sizes[True] <= 0.36 * sizes[False], sizes


@pytest.mark.parametrize("moments_dtype,basis_dtype", [("int8", "bfloat16"), ("bfloat16", "float32"), ("int8", "int8")])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_resume_is_bit_identical(moments_dtype, basis_dtype, wdtype):
    """Saved after step 4 (mid-gap), loaded with weights_only=True: the resumed run equals the uninterrupted
    one bit for bit, and every state tensor keeps its stored dtype (torch's loader would cast to the weight's)."""
    kw = dict(moments_dtype=moments_dtype, basis_dtype=basis_dtype)
    net_a, net_b = _net(wdtype), _net(wdtype)
    opt_a, opt_b = _opt(net_a, **kw), _opt(net_b, **kw)
    for i in range(10):
        _step(net_a, opt_a, i)
    for i in range(4):
        _step(net_b, opt_b, i)
    saved_net, saved_opt = roundtrip(net_b.state_dict()), roundtrip(opt_b.state_dict())
    net_c = _net(wdtype)
    net_c.load_state_dict(saved_net)
    opt_c = _opt(net_c, **kw)
    opt_c.load_state_dict(saved_opt)
    for pid, entry in saved_opt["state"].items():
        p = [q for g in opt_c.param_groups for q in g["params"]][pid]
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                assert opt_c.state[p][key].dtype == value.dtype, (pid, key)
    for i in range(4, 10):
        _step(net_c, opt_c, i)
    for a, c in zip(net_a.parameters(), net_c.parameters(), strict=True):
        assert torch.equal(a, c)
    for pid, entry in opt_a.state_dict()["state"].items():
        other = opt_c.state_dict()["state"][pid]
        for key, value in entry.items():
            assert torch.equal(value, other[key]) if isinstance(value, torch.Tensor) else value == other[key]


def test_rotate_at_a_refresh_dequantizes_once_and_requantizes_once():
    """At a refresh the 8-bit moments are rotated as fp32 values: the stored result is exactly
    quantize(rotate(dequantize(stored))), with the previous and new bases as the optimizer holds them."""
    net = _net()
    opt = _opt(net, moments_dtype="int8", basis_dtype="bfloat16")
    for i in range(3):
        _step(net, opt, i)
    state = opt.state[net[1].weight]
    before = {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
    _step(net, opt, 3)  # step 3 refreshes (update_gap 3), then steps in the new basis
    assert state["refresh_count"] == 2
    # Recompute the refresh's transport from the saved state and the new basis, then undo nothing: compare
    # with a fresh optimizer stopped right after its transport instead.
    m = quant.load(before, "exp_avg").clone()
    v = quant.load(before, "exp_avg_sq").clone()
    new_basis = state["basis"].float()
    transport_moments(m, v, before["basis"].float(), new_basis, "right", "rotate")
    expected = {}
    expected.update(quant.zeros(tuple(m.shape), "int8", m.device, "exp_avg"))
    expected.update(quant.zeros(tuple(v.shape), "int8", v.device, "exp_avg_sq"))
    quant.store(expected, "exp_avg", m)
    quant.store(expected, "exp_avg_sq", v)
    # The step after the transport changed the moments again; the transported values are its input, so
    # re-running that step's moment update from them must give the stored moments.
    g = net[1].weight.grad.float()
    r = g @ new_basis
    m_new = quant.load(expected, "exp_avg").lerp(r, 0.1)
    step = float(state["exp_avg_absmax"].max()) * 0.02
    torch.testing.assert_close(quant.load(state, "exp_avg"), m_new, rtol=0, atol=step)


def _set_dtypes(opt, **dtypes):
    for group in opt.param_groups:
        group.update(dtypes)


def test_checkpoint_keeps_its_dtypes_and_converts_when_the_groups_are_changed():
    """load_state_dict restores the saved groups' options, moments_dtype and basis_dtype included, as torch
    does for every hyperparameter: a checkpoint keeps its storage. Changing the groups' options after loading
    converts the state at the next step, through fp32 (and back), and training continues."""
    net = _net()
    opt = _opt(net)
    for i in range(4):
        _step(net, opt, i)
    saved = roundtrip(opt.state_dict())
    low = _opt(net, moments_dtype="int8", basis_dtype="bfloat16")
    low.load_state_dict(saved)
    assert {g["moments_dtype"] for g in low.param_groups} == {"float32"}
    _set_dtypes(low, moments_dtype="int8", basis_dtype="bfloat16")
    m_before = low.state[net[1].weight]["exp_avg"].clone()
    _step(net, low, 4)
    state = low.state[net[1].weight]
    assert state["exp_avg"].dtype == torch.uint8 and state["basis"].dtype == torch.bfloat16
    assert float((quant.load(state, "exp_avg") - m_before).abs().max()) < 0.5 * float(m_before.abs().max())
    back = _opt(net)
    back.load_state_dict(roundtrip(low.state_dict()))
    _set_dtypes(back, moments_dtype="float32", basis_dtype="float32")
    _step(net, back, 5)
    assert back.state[net[1].weight]["exp_avg"].dtype == torch.float32
    assert "exp_avg_absmax" not in back.state[net[0].weight]


def test_plain_int8_adamw_follows_fp32_adamw():
    """A plain (unprojected) weight with 8-bit moments takes torch's AdamW update on dequantized moments:
    close to the fp32 trajectory."""
    torch.manual_seed(1)
    start = torch.randn(128, 64)
    grads = [torch.randn(128, 64) for _ in range(5)]
    runs = {}
    for kind in ("float32", "int8"):
        w = nn.Parameter(start.clone())
        opt = SubspaceAdamW([w], lr=1e-2, moments_dtype=kind)
        for g in grads:
            w.grad = g.clone()
            opt.step()
        runs[kind] = w.detach()
        assert opt.state[w]["exp_avg"].dtype == (torch.uint8 if kind == "int8" else torch.float32)
    torch.testing.assert_close(runs["int8"], runs["float32"], rtol=0, atol=2e-3)
    assert not torch.equal(runs["int8"], runs["float32"])


def test_fp16_plain_weight_with_fp32_moments_still_steps():
    """An fp16 plain weight whose moments were converted to fp32 (its group changed from int8 to float32
    after a step) keeps training: every storage kind gets its AdamW update."""
    w = nn.Parameter((torch.randn(128, 64) * 0.1).half())
    opt = SubspaceAdamW([w], lr=1e-2, moments_dtype="int8")
    w.grad = torch.randn(128, 64).half()
    opt.step()
    opt.param_groups[0]["moments_dtype"] = "float32"
    before = w.detach().clone()
    w.grad = torch.randn(128, 64).half()
    opt.step()
    assert opt.state[w]["exp_avg"].dtype == torch.float16  # torch AdamW's own state for an fp16 weight
    assert not torch.equal(w.detach(), before) and int(opt.state[w]["step"]) == 2


def test_a_failing_state_initialization_keeps_nothing(monkeypatch):
    """State is built whole before the optimizer keeps it: an error while creating it leaves no partial
    entry behind, so a retry starts clean."""
    w = nn.Parameter(torch.randn(64, 64))
    opt = SubspaceAdamW([w], lr=1e-2, rank=4, moments_dtype="int8")
    w.grad = torch.randn(64, 64)
    original = quant.zeros
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated allocation failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(quant, "zeros", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        opt.step()
    assert not opt.state[w]
    monkeypatch.setattr(quant, "zeros", original)
    opt.step()
    assert opt.state[w]["step"] == 1


def test_explicit_triton_engine_refuses_a_weight_it_cannot_view_before_anything_moves():
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("a CPU test")
    conv = nn.Conv2d(8, 16, 3).to(memory_format=torch.channels_last)
    opt = SubspaceAdamW([conv.weight], lr=1e-2, rank=4, engine="triton")
    conv.weight.grad = torch.randn_like(conv.weight)
    before = conv.weight.detach().clone()
    with pytest.raises(ValueError, match=r"engine='triton' cannot run parameter params\[0\].*cannot be viewed"):
        opt.step()
    assert torch.equal(conv.weight.detach(), before) and not opt.state


@pytest.mark.parametrize(
    "moments_dtype,dtype", [("int8", torch.bfloat16), ("int8", torch.float32), ("bfloat16", torch.float32)]
)
def test_plain_low_precision_update_in_row_chunks_is_bit_identical(monkeypatch, moments_dtype, dtype):
    """Plain tensors with low-precision moments are updated in row chunks (bounded fp32 working copies):
    the same weights and state, bit for bit, as one chunk, and the step count advances once."""
    from subspace_optim import SubspaceAdamW, functional

    def run(chunk_elements: int):
        monkeypatch.setattr(functional, "_CHUNK_ELEMENTS", chunk_elements)
        torch.manual_seed(0)
        weight = torch.nn.Parameter(torch.randn(40, 300, dtype=dtype))
        calls = []
        monkeypatch.setattr(functional, "_chunk_adamw", lambda *a: calls.append(1) or chunk_adamw(*a))
        opt = SubspaceAdamW([weight], lr=1e-2, weight_decay=0.1, moments_dtype=moments_dtype)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            weight.grad = torch.randn(40, 300, generator=gen).to(dtype)
            opt.step()
        return weight.detach().clone(), opt.state[weight], len(calls)

    chunk_adamw = functional._chunk_adamw
    whole_w, whole_s, whole_calls = run(1 << 22)
    split_w, split_s, split_calls = run(7 * 300)  # 7 rows per chunk: 6 chunks, the last one short
    assert (whole_calls, split_calls) == (3, 18)
    assert torch.equal(whole_w, split_w)
    assert float(split_s["step"]) == 3.0
    for key, value in whole_s.items():
        assert torch.equal(value, split_s[key]), key
