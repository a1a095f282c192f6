"""The orthonormal DCT-II basis, for ``refresh="dct"``: an SVD-free subspace chosen among fixed directions.

Instead of computing singular vectors, a refresh picks the ``rank`` columns of the d x d orthonormal DCT-II matrix
D most aligned with the oriented gradient A (d x c): the alignment of column k is ||(D^T A)[k]||^2, and the basis
is P = D[:, idx] for the ``rank`` largest. The state keeps only ``idx`` (r int32s instead of d x r floats) and
every step regenerates P from the cosine formula. Because the columns are orthonormal, P^T A holds exactly the
selected rows of D^T A, so the captured energy ||P^T A||_F^2 is the sum of the selected alignments (no second
product), and two bases overlap in an exact 0/1 matrix, which makes moment transport exact.

Precision: every cosine is evaluated in fp64 after an exact integer angle reduction ((2i + 1) k mod 4d, folded
into the first quadrant), so the tables are correctly structured (exact zeros and symmetries) and their fp32
casts are the same bits however they are produced (``dct_matrix``, ``dct_columns``, ``gather_columns``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Cached tables, keyed by (d, device, dtype); the least recently used is dropped beyond _CACHE_SIZE entries.
_CACHE_SIZE = 8
_tables: dict[tuple[int, torch.device, torch.dtype], Tensor] = {}
# D^T A is computed in column blocks of at most this many elements, so the d x c transient stays bounded.
_BLOCK_ELEMENTS = 1 << 24


def _device(device: torch.device | str | None) -> torch.device:
    """A cache key for ``device``: ``cuda`` resolved to its current index."""
    device = torch.device("cpu" if device is None else device)
    if device.type != "cpu" and device.index is None:
        module = getattr(torch, device.type, None)
        if module is not None and hasattr(module, "current_device"):
            device = torch.device(device.type, module.current_device())
    return device


def _lookup(d: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The 8d entries every DCT-II element is one of: row ``s`` (0 for column 0, 1 for the others) holds
    sqrt((1 + s) / d) cos(pi n / (2d)) for n in [0, 4d), computed in fp64 and cast to ``dtype``.

    n is folded to m in [0, d] with a sign (cos is even, 4d-periodic and odd about n = d), and cos(pi n / (2d))
    = sin(pi (d - m) / (2d)) is evaluated on [0, pi/2], where sin has full relative accuracy: exactly 1 at m = 0
    and exactly 0 at m = d, so the table's zeros and symmetries are exact.
    """
    n = torch.arange(4 * d, device=device, dtype=torch.int64)
    n = torch.where(n > 2 * d, 4 * d - n, n)
    negative = n > d
    m = torch.where(negative, 2 * d - n, n)
    values = torch.sin((d - m).to(torch.float64) * (math.pi / (2 * d)))
    values = torch.where(negative, -values, values)
    scales = torch.tensor([math.sqrt(1.0 / d), math.sqrt(2.0 / d)], dtype=torch.float64, device=device)
    return (scales[:, None] * values).to(dtype).flatten()


def _elements(d: int, rows: Tensor, cols: Tensor, dtype: torch.dtype) -> Tensor:
    """D[rows, cols] for integer ``rows`` (a column) and ``cols`` (a row), by exact angle reduction and lookup:
    (2i + 1) k mod 4d, offset by 4d for k > 0 (the sqrt(2/d) scale), indexes ``_lookup``."""
    wide = 2 * d * d + 4 * d >= 2**31
    itype = torch.int64 if wide else torch.int32
    rows, cols = rows.to(itype), cols.to(itype)
    n = torch.remainder((2 * rows + 1) * cols, 4 * d).add_(torch.where(cols > 0, 4 * d, 0).to(itype))
    return _lookup(d, rows.device, dtype).index_select(0, n.flatten()).view(n.shape)


def dct_matrix(d: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """The d x d orthonormal DCT-II matrix, basis vectors as columns, cached per (d, device, dtype).

    D[i, k] = sqrt(2/d) c_k cos(pi (2i + 1) k / (2d)), c_0 = 1/sqrt(2), c_k = 1 otherwise. The returned tensor is
    shared: do not modify it.
    """
    if d < 1:
        raise ValueError(f"dct_matrix needs d >= 1, got {d}")
    key = (d, _device(device), dtype)
    table = _tables.pop(key, None)
    if table is None:
        idx = torch.arange(d, device=key[1], dtype=torch.int64)
        table = _elements(d, idx[:, None], idx[None, :], dtype)
        while len(_tables) >= _CACHE_SIZE:
            _tables.pop(next(iter(_tables)))
    _tables[key] = table  # (re)inserted last: the dict's order is the recency order
    return table


def clear_cache() -> None:
    """Drop every cached DCT table."""
    _tables.clear()


def table_bytes() -> int:
    """Bytes held by the cached DCT tables (all devices)."""
    return sum(t.numel() * t.element_size() for t in _tables.values())


def _indices(d: int, indices: Tensor | list[int], device: torch.device) -> Tensor:
    idx = torch.as_tensor(indices, device=device).to(torch.int64)
    if idx.dim() != 1:
        raise ValueError(f"DCT column indices must be 1-D, got shape {tuple(idx.shape)}")
    return idx


def dct_columns(
    d: int, indices: Tensor | list[int], device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """D[:, indices] (d x r) from the cosine formula, without building the d x d table.

    Bit-identical to ``gather_columns`` (both cast the same fp64 values). ``device`` defaults to the indices'.
    """
    device = _device(indices.device if device is None and isinstance(indices, Tensor) else device)
    idx = _indices(d, indices, device)
    rows = torch.arange(d, device=device, dtype=torch.int64)
    return _elements(d, rows[:, None], idx[None, :], dtype)


def gather_columns(
    d: int, indices: Tensor | list[int], device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """D[:, indices] (d x r) gathered from the cached table (see ``dct_columns``)."""
    device = _device(indices.device if device is None and isinstance(indices, Tensor) else device)
    return dct_matrix(d, device, dtype).index_select(1, _indices(d, indices, device))
