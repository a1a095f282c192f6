"""refresh="dct": the DCT-II table, its columns, the FFT alignments and the selection, against float64 references."""

from __future__ import annotations

import math

import pytest
import torch

from subspace_optim import dct
from subspace_optim.linalg import Slab

DIMS = [1, 2, 7, 64, 100, 1376]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reference(d: int) -> torch.Tensor:
    """D from the definition, one math.cos per entry (float64), for small d."""
    rows = []
    for i in range(d):
        row = []
        for k in range(d):
            c = math.sqrt(0.5) if k == 0 else 1.0
            row.append(math.sqrt(2.0 / d) * c * math.cos(math.pi * (2 * i + 1) * k / (2 * d)))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


def _alignment64(a: torch.Tensor) -> torch.Tensor:
    d64 = dct.dct_matrix(a.shape[0], dtype=torch.float64)
    return (d64.mT @ a.double()).square().sum(1)


def _matrix(d: int, c: int, seed: int, transposed: bool = False) -> torch.Tensor:
    """A random d x c fp32 matrix, contiguous or a transposed view (the two orientations of a gradient)."""
    if transposed:
        return torch.randn(c, d, generator=_gen(seed)).mT
    return torch.randn(d, c, generator=_gen(seed))


@pytest.mark.parametrize("d", DIMS)
def test_table_is_orthonormal(d):
    d32 = dct.dct_matrix(d).double()
    eye = torch.eye(d, dtype=torch.float64)
    assert dct.dct_matrix(d).dtype == torch.float32 and d32.shape == (d, d)
    assert float((d32.mT @ d32 - eye).abs().max()) < 1e-6
    d64 = dct.dct_matrix(d, dtype=torch.float64)
    assert float((d64.mT @ d64 - eye).abs().max()) < 1e-13
    # The fp64 table is exactly structured: constant first column, exact mirror symmetry, fp32 = rounded fp64.
    assert torch.equal(d64[:, 0], torch.full((d,), math.sqrt(1.0 / d), dtype=torch.float64))
    sign = 1.0 - 2.0 * (torch.arange(d) % 2).double()
    assert torch.equal(d64.flip(0), d64 * sign)
    assert torch.equal(d64.float(), dct.dct_matrix(d))


@pytest.mark.parametrize("d", [1, 2, 7, 12, 64])
def test_table_matches_definition(d):
    assert float((dct.dct_matrix(d, dtype=torch.float64) - _reference(d)).abs().max()) < 1e-14


@pytest.mark.parametrize("d", DIMS)
def test_table_matches_scipy(d):
    fft = pytest.importorskip("scipy.fft")
    np = pytest.importorskip("numpy")
    expected = torch.from_numpy(fft.dct(np.eye(d), norm="ortho", axis=0)).mT
    assert float((dct.dct_matrix(d, dtype=torch.float64) - expected).abs().max()) < 1e-13


def test_table_cache_shared_bounded_and_counted():
    dct.clear_cache()
    assert dct.table_bytes() == 0
    table = dct.dct_matrix(100)
    assert dct.dct_matrix(100, device="cpu") is table
    assert dct.table_bytes() == 100 * 100 * 4
    dct.dct_matrix(100, dtype=torch.float64)
    assert dct.table_bytes() == 100 * 100 * 12
    for d in range(1, 20):
        dct.dct_matrix(d)
    assert len(dct._tables) <= dct._CACHE_SIZE
    dct.clear_cache()
    assert dct.table_bytes() == 0
    with pytest.raises(ValueError):
        dct.dct_matrix(0)


@pytest.mark.parametrize(("d", "r"), [(1, 1), (7, 3), (100, 17), (1376, 128)])
def test_columns_formula_equal_gather_equal_table(d, r):
    idx = torch.randperm(d, generator=_gen(d))[:r].to(torch.int32)
    dct.clear_cache()
    cols = dct.dct_columns(d, idx)
    assert dct.table_bytes() == 0  # the formula never builds the d x d table
    assert cols.shape == (d, r) and cols.dtype == torch.float32
    assert torch.equal(cols, dct.gather_columns(d, idx))
    assert torch.equal(cols, dct.dct_matrix(d)[:, idx.long()])
    assert torch.equal(dct.dct_columns(d, idx.tolist()), cols)
    cols64 = dct.dct_columns(d, idx, dtype=torch.float64)
    assert torch.equal(cols64, dct.gather_columns(d, idx, dtype=torch.float64))
    assert torch.equal(cols64.float(), cols)


@pytest.mark.parametrize(("d", "c"), [(1, 5), (2, 3), (7, 1), (7, 9), (100, 37), (512, 1376), (1376, 512)])
@pytest.mark.parametrize("transposed", [False, True])
def test_alignment_matches_float64(d, c, transposed):
    a = _matrix(d, c, d * c + transposed, transposed)
    ref = _alignment64(a)
    got = dct.alignment(a)
    assert got.shape == (d,) and got.dtype == torch.float64
    assert float((got - ref).abs().max()) <= 1e-6 * float(ref.sum())


def test_alignment_in_blocks(monkeypatch):
    """Columns processed in several blocks (a 7B-sized A does): the same sums."""
    for transposed in (False, True):
        a = _matrix(64, 301, 5, transposed)
        whole = dct.alignment(a)
        monkeypatch.setattr(dct, "_BLOCK_ELEMENTS", 64 * 40)
        blocked = dct.alignment(a)
        monkeypatch.undo()
        assert float((blocked - whole).abs().max()) <= 1e-6 * float(whole.sum())
        assert float((blocked - _alignment64(a)).abs().max()) <= 1e-6 * float(whole.sum())


def test_alignment_low_precision_input():
    a = _matrix(100, 30, 11).bfloat16()
    ref = _alignment64(a.float())
    assert float((dct.alignment(a) - ref).abs().max()) <= 1e-6 * float(ref.sum())


def _planted(d: int, c: int, chosen: list[int], seed: int, transposed: bool = False) -> torch.Tensor:
    """A = D[:, chosen] W + noise: alignments of the chosen columns far above the rest (distinct weights)."""
    gen = _gen(seed)
    weights = torch.linspace(2.0, 1.0, len(chosen), dtype=torch.float64)[:, None]
    w = torch.randn(len(chosen), c, generator=gen, dtype=torch.float64) * weights
    a = dct.dct_matrix(d, dtype=torch.float64)[:, chosen] @ w
    a = a + 1e-3 * torch.randn(d, c, generator=gen, dtype=torch.float64)
    return a.float().mT.contiguous().mT if transposed else a.float()


@pytest.mark.parametrize(("d", "c", "r"), [(7, 5, 2), (100, 64, 10), (512, 300, 64), (1376, 96, 32)])
@pytest.mark.parametrize("transposed", [False, True])
def test_select_recovers_planted_columns(d, c, r, transposed):
    chosen = torch.randperm(d, generator=_gen(d + r))[:r]
    a = _planted(d, c, chosen.tolist(), d * r, transposed)
    sel = dct.select(a, r)
    assert sel.indices.dtype == torch.int32 and sel.indices.shape == (r,)
    assert torch.equal(sel.indices.long(), chosen.sort().values)
    ref = _alignment64(a)
    assert torch.equal(sel.indices.long(), ref.topk(r).indices.sort().values)


def test_select_random_matrix_matches_float64_top_set():
    a = _matrix(200, 150, 3)
    ref = _alignment64(a)
    sel = dct.select(a, 20)
    assert torch.equal(sel.indices.long(), ref.topk(20).indices.sort().values)
    assert torch.all(sel.indices[1:] > sel.indices[:-1])


def test_ties_go_to_the_smaller_index():
    values = torch.tensor([1.0, 3.0, 2.0, 3.0, 3.0, 0.5, 2.0], dtype=torch.float64)
    assert dct.top(values, 2).tolist() == [1, 3]
    assert dct.top(values, 4).tolist() == [1, 2, 3, 4]
    assert dct.top(values, 5).tolist() == [1, 2, 3, 4, 6]
    flat = torch.full((9,), 0.25, dtype=torch.float64)
    assert dct.top(flat, 4).tolist() == [0, 1, 2, 3]
    a = _matrix(64, 20, 9)
    assert torch.equal(dct.select(a, 8).indices, dct.select(a.clone(), 8).indices)
    for bad in (0, 10):
        with pytest.raises(ValueError):
            dct.top(flat, bad)


@pytest.mark.parametrize(("d", "r"), [(7, 3), (100, 20), (512, 64)])
def test_overlap_is_exact_gram_of_columns(d, r):
    gen = _gen(r)
    old = torch.randperm(d, generator=gen)[:r].sort().values.to(torch.int32)
    keep = old[torch.randperm(r, generator=gen)[: r // 2]]
    taken = set(old.tolist())
    fresh = [i for i in torch.randperm(d, generator=gen).tolist() if i not in taken][: r - len(keep)]
    new = torch.tensor(sorted(keep.tolist() + fresh), dtype=torch.int32)
    c = dct.overlap(new, old)
    assert c.shape == (r, r) and c.dtype == torch.float32
    assert set(c.unique().tolist()) <= {0.0, 1.0}
    assert float(c.sum()) == len(keep)
    gram = dct.dct_columns(d, new).double().mT @ dct.dct_columns(d, old).double()
    assert float((c.double() - gram).abs().max()) < 1e-6
    assert torch.equal(dct.overlap(old, old), torch.eye(r))


@pytest.mark.parametrize("transposed", [False, True])
def test_energies_equal_float64_norms(transposed):
    a = _matrix(100, 70, 21, transposed)
    sel = dct.select(a, 12)
    assert sel.captured.dtype == sel.total.dtype == torch.float64 and sel.captured.dim() == 0
    p = dct.dct_matrix(100, dtype=torch.float64)[:, sel.indices.long()]
    a64 = a.double()
    total = float(a64.square().sum())
    assert float(sel.captured) == pytest.approx(float((p.mT @ a64).square().sum()), rel=1e-6)
    assert float(sel.total) == pytest.approx(total, rel=1e-6)
    assert float(sel.captured) <= float(sel.total)
    assert float(dct.captured_energy(a, sel.indices)) == float(sel.captured)


def test_slab_reduce_is_applied():
    """Row-sharded gradients: each rank holds some columns of A; the all-reduce sums their alignments."""
    a = _planted(128, 90, [3, 40, 41, 100], 7)
    left, right = a[:, :50], a[:, 50:]
    doubled = Slab(reduce=lambda t: 2 * t)
    assert torch.equal(dct.alignment(a, doubled), 2 * dct.alignment(a))
    whole = dct.select(a, 4)
    parts = [dct.alignment(left), dct.alignment(right)]
    assert float((parts[0] + parts[1] - dct.alignment(a)).abs().max()) <= 1e-6 * float(whole.total)
    for mine, other, offset in ((left, parts[1], 0), (right, parts[0], 50)):
        slab = Slab(offset=offset, total=90, reduce=lambda t, other=other: t + other)  # a two-rank all-reduce
        sel = dct.select(mine, 4, slab)
        assert torch.equal(sel.indices, whole.indices)
        assert float(sel.total) == pytest.approx(float(whole.total), rel=1e-6)
        assert float(sel.captured) == pytest.approx(float(whole.captured), rel=1e-6)
        assert float(dct.captured_energy(mine, sel.indices, slab)) == float(sel.captured)


def test_empty_slab_contributes_zero():
    assert torch.equal(dct.alignment(torch.empty(16, 0)), torch.zeros(16, dtype=torch.float64))
