"""The counter stream of seeded projections: torch's Philox against Triton's bit for bit, the random signs'
statistics, and the Triton step that regenerates projections inside its tiles (signs and DCT columns) against the
same step reading them materialized, bit for bit."""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from subspace_optim import dct, linalg, philox, projections, quant, triton_runtime  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_runtime.available(), reason="needs triton")
SEEDS = [0, 12345, linalg.sketch_seed(7, 3, 2), (1 << 63) - 1]


@needs_triton
@pytest.mark.parametrize("seed", SEEDS)
def test_randint4x_is_tritons(seed):
    import triton
    import triton.language as tl

    @triton.jit
    def draw(out, counters, seed, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        c0, c1, c2, c3 = tl.randint4x(seed, tl.load(counters + offs, mask=ok, other=0))
        tl.store(out + offs * 4, c0.to(tl.int64), mask=ok)  # uint32 -> int64 zero-extends
        tl.store(out + offs * 4 + 1, c1.to(tl.int64), mask=ok)
        tl.store(out + offs * 4 + 2, c2.to(tl.int64), mask=ok)
        tl.store(out + offs * 4 + 3, c3.to(tl.int64), mask=ok)

    counters = torch.cat([torch.arange(200), torch.tensor([(1 << 31) - 1, (1 << 30) + 5, 1 << 20])])
    n = counters.numel()
    out = torch.empty(n, 4, dtype=torch.int64, device=DEVICE)
    draw[(triton.cdiv(n, 64),)](out, counters.to(torch.int32).to(DEVICE), seed, n, BLOCK=64)
    want = philox.randint4x(torch.tensor(seed), counters.to(torch.int64))
    assert torch.equal(out.cpu(), want)
    assert bool((want >= 0).all()) and bool((want < (1 << 32)).all())


def test_signs_statistics():
    """Entries exactly +-1/sqrt(r); balanced signs; P^T P = (d/r) I on the diagonal exactly and at the noise level
    off it; independent seeds are uncorrelated; norms preserved in expectation (APOLLO's scaling)."""
    d, r = 4096, 64
    p = philox.sign_projection(11, d, r)
    s = philox.scale_of(r)
    assert p.shape == (d, r) and p.dtype == torch.float32
    assert set(p.unique().tolist()) == {-s, s}
    positive = float((p > 0).double().mean())
    assert abs(positive - 0.5) < 5 * 0.5 / math.sqrt(d * r)
    gram = (p.double().mT @ p.double()) / (d * s * s)
    assert torch.equal(gram.diagonal(), torch.ones(r, dtype=torch.float64))
    off = gram - torch.eye(r, dtype=torch.float64)
    assert float(off.abs().max()) < 6 / math.sqrt(d)
    other = philox.sign_projection(linalg.sketch_seed(0, 5, 1), d, r)
    assert abs(float((p * other).sum() / (p.norm() * other.norm()))) < 5 / math.sqrt(d * r)
    g = torch.randn(d, 200, generator=torch.Generator().manual_seed(3))
    assert float((p.mT @ g).norm() / g.norm()) == pytest.approx(1.0, rel=0.05)


def test_signs_batched_ragged_and_refused_when_too_large():
    """A batch equals its members drawn one by one, for sizes that are not multiples of a Philox block; a
    projection beyond Triton's int32 counters is refused."""
    seeds = [3, 99, linalg.sketch_seed(1, 2, 3)]
    batch = philox.signs(seeds, 37, 5)
    for i, seed in enumerate(seeds):
        assert torch.equal(batch[i], philox.sign_projection(seed, 37, 5))
    assert torch.equal(philox.sign_projection(3, 37, 5).flatten()[:100], philox.sign_projection(3, 20, 5).flatten())
    with pytest.raises(ValueError, match="int32 counters"):
        philox.signs([1], 1 << 20, 1 << 19)


def test_counter_stream_is_the_same_for_either_side_and_the_apollo_stream_is_torchs():
    p = projections.seeded_projection(24, 3, "left", 5, torch.device("cpu"))
    assert torch.equal(p, projections.seeded_projection(24, 3, "right", 5, torch.device("cpu")))
    gen = torch.Generator().manual_seed(5)
    want = torch.randn(3, 24, generator=gen).div_(math.sqrt(3)).mT
    assert torch.equal(projections.seeded_projection(24, 3, "right", 5, torch.device("cpu"), "apollo"), want)


def _batch(side, shapes, rank, moments_dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ws, gs, ms, vs = [], [], [], []
    for m, n in shapes:
        rshape = (rank, n) if side == "left" else (m, rank)
        ws.append(torch.randn(m, n, generator=gen).to(DEVICE))
        gs.append(torch.randn(m, n, generator=gen).to(DEVICE))
        for out, values in (
            (ms, 0.1 * torch.randn(rshape, generator=gen)),
            (vs, 0.1 * torch.rand(rshape, generator=gen)),
        ):
            if moments_dtype == "int8":
                out.append(quant.Moment(*quant.quantize(values.to(DEVICE), signed=out is ms)))
            else:
                out.append(values.to(DEVICE))
    return ws, gs, ms, vs


def _copy(x):
    if isinstance(x, quant.Moment):
        return quant.Moment(x.values.clone(), x.absmax.clone())
    return x.clone()


def _values(x):
    return torch.cat([x.values.flatten().float(), x.absmax.flatten()]) if isinstance(x, quant.Moment) else x


@needs_triton
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(
    "kind, residual, moments_dtype",
    [
        ("signs", "apollo", "float32"),
        ("signs", "apollo_tensor", "int8"),
        ("signs", "none", "float32"),
        ("dct", "none", "float32"),
        ("dct", "fira", "int8"),
    ],
)
def test_step_regenerates_in_its_tiles_what_it_would_load(side, kind, residual, moments_dtype):
    """The Triton step given records (``projections.Signs`` / ``DctColumns``) writes the same bits as the same
    step given the materialized projections: the tiles hold the same fp32 numbers in the same order."""
    from subspace_optim.kernels import step as ks

    rank, shapes = 5, [(37, 21), (37, 21), (20, 44)]
    dims = [m if side == "left" else n for m, n in shapes]
    if kind == "signs":
        records = [projections.Signs(linalg.sketch_seed(9, i, 1), (d, rank)) for i, d in enumerate(dims)]
    else:
        records = [
            projections.DctColumns(
                torch.randperm(d, generator=torch.Generator().manual_seed(i))[:rank].sort().values.int().to(DEVICE),
                dct.dct_matrix(d, DEVICE),
            )
            for i, d in enumerate(dims)
        ]
    bases = [r.materialize(torch.device(DEVICE)).contiguous() for r in records]
    runs = []
    for ps in (records, bases):
        ws, gs, ms, vs = _batch(side, shapes, rank, moments_dtype)
        ms, vs = [_copy(m) for m in ms], [_copy(v) for v in vs]
        extra = {}
        if residual != "none":
            extra = {"residual": residual, "update_norms": [torch.zeros((), device=DEVICE) for _ in ws]}
        ks.subspace_adamw(
            ws, gs, ps, ms, vs, [3] * len(ws), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1,
            scale=0.25, sides=[side] * len(ws), **extra,
        )  # fmt: skip
        runs.append((ws, ms, vs))
    for got, want in zip(*runs, strict=True):
        for x, y in zip(got, want, strict=True):
            assert torch.equal(_values(x), _values(y))


def test_signs_into_a_workspace_are_the_fresh_ones_and_the_workspace_is_reused():
    seeds = [5, 6, 7]
    room = torch.empty(len(seeds) * philox.padded_entries(37, 5), dtype=torch.int32)
    assert torch.equal(philox.signs(seeds, 37, 5, out=room), philox.signs(seeds, 37, 5))
    states = [{"projection_seed": s} for s in seeds] + [{"projection_seed": 9}]
    cpu = torch.device("cpu")
    first = projections.draw(states, ["left"] * 4, [37, 37, 37, 20], 5, [cpu] * 4, "counter")
    dims = [37, 37, 37, 20]
    expected = [philox.sign_projection(s["projection_seed"], d, 5) for s, d in zip(states, dims, strict=True)]
    assert all(torch.equal(a, b) for a, b in zip(first, expected, strict=True))
    held = first[0].data_ptr()
    again = projections.draw(states, ["left"] * 4, [37, 37, 37, 20], 5, [cpu] * 4, "counter")
    assert again[0].data_ptr() == held  # the next step writes into the same memory (``workspace.kept``)
    assert all(torch.equal(a, b) for a, b in zip(again, expected, strict=True))
