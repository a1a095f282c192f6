"""4-bit moments for the plain parameters (``plain_moments_dtype="int4"``) and the plain parameters' own second
moment (``plain_second_moment``): the format against a float64 reference, the update against torch's AdamW through
the same codes, where the option applies and where it falls back, checkpoints, and the errors."""

from __future__ import annotations

import pytest
import torch
from conftest import roundtrip
from torch import nn

from subspace_optim import SubspaceAdamW, param_groups, quant, state_bytes


def _reference_codes(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per element the index of the nearest map value to x / absmax (absmax per 128 values of a row), in float64,
    and the absmax: written from the format's description, not from ``quant``."""
    x = x.double()
    rows, cols = x.shape
    magnitudes = [0.02, 0.06, 0.12, 0.25, 0.45, 0.7, 1.0]
    values = torch.tensor(
        sorted([-m for m in magnitudes] + [0.0] + magnitudes + [1.0]) if signed else [(k + 1) / 16 for k in range(16)],
        dtype=torch.float64,
    )
    codes = torch.empty(rows, cols, dtype=torch.long)
    absmax = torch.empty(rows, -(-cols // 128), dtype=torch.float64)
    for b in range(absmax.shape[1]):
        block = x[:, b * 128 : (b + 1) * 128]
        scale = block.abs().amax(1, keepdim=True)
        absmax[:, b] = scale[:, 0]
        normed = block / torch.where(scale > 0, scale, 1.0)
        codes[:, b * 128 : (b + 1) * 128] = (normed[..., None] - values).abs().argmin(-1)
    return codes, absmax


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    raw = packed.view(torch.uint8).long()
    return torch.stack((raw // 16, raw % 16), dim=-1).reshape(raw.shape[0], -1)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(6, 256), (5, 300), (3, 2)])
def test_codes_are_the_nearest_map_values_in_float64(signed, shape):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(shape, generator=gen) * torch.logspace(-3, 1, shape[1])  # values across decades
    x = x if signed else x.square()
    packed, absmax = quant.quantize4(x, signed)
    assert packed.dtype == torch.int8 and packed.shape == (shape[0], shape[1] // 2)
    codes, ref_absmax = _reference_codes(x, signed)
    torch.testing.assert_close(absmax.double(), ref_absmax, rtol=0, atol=0)
    assert torch.equal(_unpack(packed), codes)  # even columns in the high nibble, odd in the low one
    decoded = quant.dequantize4(packed, absmax, signed)
    assert torch.equal(decoded, quant.map4(signed)[codes] * absmax.repeat_interleave(128, 1)[:, : shape[1]])


def test_second_moment_map_and_codes_are_torchaos_4bit_optimizer_states():
    """torchao's AdamW4bit (Li et al.'s format) for the second moment: the same 16 values, and for rows of 128
    values the same codes, scales and packed bytes as its quantizer. The first moment's map is ours (``quant``)."""
    pytest.importorskip("torchao")
    from torchao.optim import quant_utils
    from torchao.optim.subclass_4bit import get_qmap_signed, get_qmap_unsigned

    qmap = torch.tensor(get_qmap_unsigned())
    assert torch.equal(quant.map4(False), qmap)
    assert not torch.equal(quant.map4(True), torch.tensor(get_qmap_signed()))  # measured worse here (quant)
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(24, 256, generator=gen) * torch.logspace(-2, 1, 256)).square()
    packed, absmax = quant.quantize4(x, False)
    scaled, scale = quant_utils.scale_tensor(x.reshape(-1), 128)
    theirs = quant_utils.quantize_4bit_with_qmap(scaled, qmap).reshape(24, 256).long()
    assert torch.equal(absmax.reshape(-1), scale)
    assert torch.equal(_unpack(packed), theirs)
    flat = theirs.reshape(-1)
    assert torch.equal(packed.view(torch.uint8).reshape(-1), (flat[::2] << 4 | flat[1::2]).byte())


def test_second_moment_codes_never_decode_to_zero_and_zero_blocks_stay_zero():
    """V's map has no zero: a value far below its block's maximum decodes to max / 16, never to 0 (its step would
    be M / eps); an all-zero block decodes to zeros."""
    v = torch.rand(4, 256, generator=torch.Generator().manual_seed(2)) + 1e-3
    v[0, :128] = 0.0
    v[1, 5] = 1e-12
    packed, absmax = quant.quantize4(v, False)
    out = quant.dequantize4(packed, absmax, False)
    assert torch.equal(out[0, :128], torch.zeros(128))
    assert bool((out[1:] > 0).all()) and bool((out[0, 128:] > 0).all())
    assert float(out[1, 5]) == pytest.approx(float(absmax[1, 0]) / 16)


def test_store_load_and_convert_round_trip():
    gen = torch.Generator().manual_seed(4)
    value = torch.randn(7, 260, generator=gen)
    state = quant.zeros((7, 260), "int4", torch.device("cpu"), "exp_avg")
    assert quant.stored_kind(state, "exp_avg") == "int4"
    assert torch.equal(quant.load(state, "exp_avg"), torch.zeros(7, 260))
    quant.store(state, "exp_avg", value)
    step = quant.map4(True).diff().max() / 2 * state["exp_avg_absmax"].repeat_interleave(128, 1)[:, :260]
    assert bool(((quant.load(state, "exp_avg") - value).abs() <= step * (1 + 1e-6)).all())
    decoded = quant.load(state, "exp_avg").clone()
    quant.convert(state, "exp_avg", "int8")
    assert quant.stored_kind(state, "exp_avg") == "int8" and state["exp_avg"].dtype == torch.uint8
    torch.testing.assert_close(quant.load(state, "exp_avg"), decoded, rtol=0.02, atol=0.02)


def _adamw_through_int4(start: torch.Tensor, grads: list[torch.Tensor], lr: float, wd: float) -> torch.Tensor:
    """torch's AdamW whose two moments are stored in 4 bits between steps: decoded, stepped in fp32, re-encoded."""
    w = nn.Parameter(start.clone())
    opt = torch.optim.AdamW([w], lr=lr, weight_decay=wd, foreach=False)
    stored = {key: quant.quantize4(torch.zeros_like(start), key == "exp_avg") for key in ("exp_avg", "exp_avg_sq")}
    for g in grads:
        w.grad = g.clone()
        if opt.state[w]:
            for key, (codes, absmax) in stored.items():
                opt.state[w][key].copy_(quant.dequantize4(codes, absmax, key == "exp_avg"))
        opt.step()
        stored = {key: quant.quantize4(opt.state[w][key], key == "exp_avg") for key in stored}
    return w.detach()


def test_plain_int4_adamw_is_torch_adamw_through_the_codes():
    """A plain weight with 4-bit moments steps exactly as torch's AdamW whose moments pass through the 4-bit codes
    between steps (same bits), and stays near the fp32 trajectory."""
    torch.manual_seed(1)
    start = torch.randn(64, 256)
    grads = [torch.randn(64, 256) * (1 + i) for i in range(5)]
    w = nn.Parameter(start.clone())
    opt = SubspaceAdamW([{"params": [w], "rank": None}], lr=1e-2, weight_decay=0.1, plain_moments_dtype="int4")
    for g in grads:
        w.grad = g.clone()
        opt.step()
    assert opt.state[w]["exp_avg"].dtype == torch.int8 and opt.state[w]["exp_avg_sq"].dtype == torch.int8
    assert torch.equal(w.detach(), _adamw_through_int4(start, grads, 1e-2, 0.1))
    fp32 = nn.Parameter(start.clone())
    ref = torch.optim.AdamW([fp32], lr=1e-2, weight_decay=0.1)
    for g in grads:
        fp32.grad = g.clone()
        ref.step()
    moved = (fp32.detach() - start).norm()
    assert float((w.detach() - fp32.detach()).norm() / moved) < 0.2  # measured 0.12


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(300, 63), nn.Linear(63, 300), nn.Tanh(), nn.Linear(300, 64), nn.LayerNorm(64))


def _step(net, opt, i):
    x = torch.randint(0, 300, (16, 8), generator=torch.Generator().manual_seed(i))
    opt.zero_grad()
    net(x).float().square().mean().backward()
    opt.step()


def test_where_int4_applies_and_what_the_others_take():
    """int4 goes to the plain 2-D parameters with an even number of columns; a plain one with an odd number takes
    int8, a small one fp32; projected moments keep ``moments_dtype``. ``plain_second_moment`` gives the plain ones
    a full V under a factored ``second_moment``."""
    net = _net()
    groups = param_groups(net, ["1"], rank=8)  # net[3] stays plain
    opt = SubspaceAdamW(groups, lr=1e-2, moments_dtype="int8", second_moment="factored", plain_moments_dtype="int4",
                        plain_second_moment="full")  # fmt: skip
    _step(net, opt, 0)
    odd, proj, even, norm = (opt.state[p] for p in (net[0].weight, net[1].weight, net[3].weight, net[4].weight))
    assert quant.stored_kind(even, "exp_avg") == quant.stored_kind(even, "exp_avg_sq") == "int4"
    assert quant.stored_kind(proj, "exp_avg") == "int8" and "exp_avg_sq_row" in proj  # projected: factored
    assert quant.stored_kind(odd, "exp_avg") == "int8" and "exp_avg_sq" in odd  # 63 columns
    assert norm["exp_avg"].dtype == torch.float32
    before = state_bytes(opt)
    # and the other way round: full V for the projected matrices, factors for the plain ones
    net = _net()
    opt = SubspaceAdamW(param_groups(net, ["1"], rank=8), lr=1e-2, plain_second_moment="factored")
    _step(net, opt, 0)
    assert "exp_avg_sq_row" in opt.state[net[3].weight] and "exp_avg_sq" in opt.state[net[1].weight]
    assert before > 0


def test_int4_state_bytes_are_half_of_int8():
    net = _net()
    sizes = {}
    weight = net[3].weight  # 64 x 300
    for kind in ("int8", "int4"):
        opt = SubspaceAdamW([{"params": [weight], "rank": None}], lr=1e-2, plain_moments_dtype=kind)
        weight.grad = torch.randn_like(weight)
        opt.step()
        sizes[kind] = state_bytes(opt)
    codes = 64 * 300
    assert sizes["int8"] == 4 + 2 * (codes + 64 * 2 * 4)  # step, codes and an absmax per 256 of a row
    assert sizes["int4"] == 4 + 2 * (codes // 2 + 64 * 3 * 4)  # and per 128


def test_resume_is_bit_identical_and_a_live_change_converts():
    net = _net()

    def make(module):
        return SubspaceAdamW(param_groups(module, ["1"], rank=8, update_gap=3), lr=1e-2, preset="balanced",
                             plain_moments_dtype="int4", plain_second_moment="full")  # fmt: skip

    opt = make(net)
    for i in range(4):
        _step(net, opt, i)
    saved_net = {k: v.clone() for k, v in net.state_dict().items()}
    saved = roundtrip(opt.state_dict())  # torch.save / torch.load(weights_only=True)
    for i in range(4, 7):
        _step(net, opt, i)
    expected = [p.detach().clone() for p in net.parameters()]
    other = _net()
    other.load_state_dict(saved_net)
    resumed = make(other)
    resumed.load_state_dict(saved)
    assert resumed.state[other[3].weight]["exp_avg"].dtype == torch.int8
    for i in range(4, 7):
        _step(other, resumed, i)
    assert all(torch.equal(a, b) for a, b in zip(expected, other.parameters(), strict=True))
    for group in resumed.param_groups:  # a live change: converted through fp32 at the next step
        group["plain_moments_dtype"] = "float32"
        group["plain_second_moment"] = None
    _step(other, resumed, 7)
    emb = resumed.state[other[3].weight]
    assert emb["exp_avg"].dtype == torch.float32 and "exp_avg_sq_row" in emb  # balanced: factored again


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"plain_moments_dtype": "int3"}, r"plain_moments_dtype.*'int4'"),
        ({"plain_second_moment": "diagonal"}, r"plain_second_moment.*'factored'"),
        ({"moments_dtype": "int4"}, r"moments_dtype: 'int4'.*plain_moments_dtype='int4'"),
    ],
)
def test_bad_values_are_refused_by_the_constructor_and_add_param_group(kwargs, match):
    w, v = nn.Parameter(torch.randn(64, 64)), nn.Parameter(torch.randn(64, 64))
    with pytest.raises(ValueError, match=match):
        SubspaceAdamW([w], lr=1e-2, **kwargs)
    opt = SubspaceAdamW([w], lr=1e-2)
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": [v], **kwargs})
    assert len(opt.param_groups) == 1


def test_layerwise_updates_equal_regular_steps_with_4bit_plain_moments():
    """update_in_backward steps a 4-bit plain embedding inside backward as ``step()`` does after it: the same bits."""

    def train(layerwise: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(300, 64), nn.Linear(64, 64))
        groups = param_groups(model, ["1"], rank=8, update_gap=2)
        opt = SubspaceAdamW(groups, lr=1e-2, moments_dtype="int8", second_moment="factored",
                            plain_moments_dtype="int4", plain_second_moment="full")  # fmt: skip
        handle = opt.update_in_backward(model) if layerwise else None
        for i in range(4):
            x = torch.randint(0, 300, (16, 8), generator=torch.Generator().manual_seed(i))
            model(x).square().mean().backward()
            if not layerwise:
                opt.step()
                opt.zero_grad()
        if handle is not None:
            handle.remove()
        assert opt.state[model[0].weight]["exp_avg"].dtype == torch.int8
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(train(False), train(True), strict=True))


@pytest.mark.parametrize("start", ["factored", "full"])
def test_a_plain_3d_parameter_converts_between_factored_and_full_v(start):
    """A live change of ``plain_second_moment`` on a plain parameter of 3 dimensions (viewed as rows x the rest):
    V becomes its factors and the factors the V they stand for, in the parameter's shape, and training goes on."""
    w = nn.Parameter(torch.randn(4, 8, 300))
    other = "full" if start == "factored" else "factored"
    opt = SubspaceAdamW([{"params": [w], "rank": None}], lr=1e-2, plain_second_moment=start)
    gen = torch.Generator().manual_seed(0)
    for i in range(3):
        w.grad = torch.randn(4, 8, 300, generator=gen)
        if i == 2:
            opt.param_groups[0]["plain_second_moment"] = other
        opt.step()
    state = opt.state[w]
    if other == "full":
        assert state["exp_avg_sq"].shape == w.shape and "exp_avg_sq_row" not in state
    else:
        assert state["exp_avg_sq_row"].shape == (4,) and state["exp_avg_sq_col"].shape == (2400,)
    assert bool(torch.isfinite(w).all()) and int(state["step"]) == 3


def test_an_empty_row_shard_steps_with_4bit_moments():
    """A rank holding none of a row-sharded plain weight's rows (FSDP2 over more ranks than rows) steps its empty
    4-bit state, as the 8-bit one does."""
    from subspace_optim import functional

    for kind in ("int8", "int4"):
        p, g = torch.zeros(0, 4096), torch.zeros(0, 4096)
        m, v = (
            quant.moment(quant.zeros((0, 4096), kind, torch.device("cpu"), k), k) for k in ("exp_avg", "exp_avg_sq")
        )
        count = torch.tensor(0.0)
        functional.adamw(
            [p], [g], [m], [v], [count], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, foreach=None
        )
        assert float(count) == 1.0
    with pytest.raises(ValueError, match="even number of columns"):
        quant.zeros((4, 7), "int4", torch.device("cpu"), "exp_avg")


def test_param_groups_gives_the_plain_options_to_the_plain_groups_over_the_preset():
    net = _net()
    for kwargs, want in (
        ({"plain_moments_dtype": "int4"}, ("int4", None)),
        (
            {"preset": "balanced", "plain_moments_dtype": "int8", "plain_second_moment": "factored"},
            ("int8", "factored"),
        ),
    ):
        groups = param_groups(net, ["1"], rank=8, **kwargs)
        assert [(g.get("plain_moments_dtype"), g.get("plain_second_moment")) for g in groups] == [want] * len(groups)
    opt = SubspaceAdamW(param_groups(net, ["1"], rank=8, plain_moments_dtype="int4"), lr=1e-2)
    _step(net, opt, 0)
    assert quant.stored_kind(opt.state[net[3].weight], "exp_avg") == "int4"


def test_a_live_group_asking_4bit_projected_moments_is_refused_before_anything_moves():
    w = nn.Parameter(torch.randn(64, 256))
    opt = SubspaceAdamW([{"params": [w], "rank": 8}], lr=1e-2)
    opt.param_groups[0]["moments_dtype"] = "int4"
    w.grad = torch.randn(64, 256)
    before = w.detach().clone()
    with pytest.raises(ValueError, match=r"moments_dtype: 'int4' in param group 0.*plain_moments_dtype='int4'"):
        opt.step()
    assert torch.equal(w.detach(), before) and not opt.state[w]
