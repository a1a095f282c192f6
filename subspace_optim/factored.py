"""A factored second moment (``second_moment="factored"``): Adafactor's row and column factors in place of V.

For a moment of shape (rows, cols) with X_t = R_t o R_t (R the projected gradient), the state is two vectors,

    row_t = b2 row_{t-1} + (1 - b2) X_t 1      (rows,)      col_t = b2 col_{t-1} + (1 - b2) 1^T X_t     (cols,)

and V_t = row_t col_t^T / s_t stands in for Adam's elementwise average, with Adam's own bias correction
(V_t / (1 - b2^t)) and the first moment kept whole. Both factors are exponential averages of the same totals, so
s_t may be either factor's sum; we take the factor of the side that is *not* projected (``normalizer``): a refresh
that rotates the moments (``moments="rotate"``: V <- (C o C) V along the projected side) then maps the factored V
exactly, since only the projected side's factor changes (``transport``) and s_t does not. State per matrix:
rows + cols numbers instead of rows x cols.

One departure from Adafactor: each element's bias-corrected sqrt(V) is raised to |M_hat| where it is lower
(``adam_rule``), so |M_hat / sqrt(V_hat)| <= 1. A second moment is never below the square of the mean, and Adam's
own V keeps that (up to the two averages' different windows); the rank-one estimate does not: an element whose
squares run above its row's and column's averages gets a normalized step of many units. The first moment, kept
whole, gives every element its floor without any more state. It matters most while the factors hold few steps (early
training, just after a reset); docs/benchmarks.md ("Factored second moment: the floor") has what it changes and what
it does not.

On FSDP2 row shards (a right projection: V is m_local x r) the row factor is the rank's rows and the column factor
and s_t are sums over every rank's rows: one all-reduce of r + 1 numbers per matrix and step (``reduce``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

SECOND_MOMENTS = ("full", "factored")
KEYS = ("exp_avg_sq_row", "exp_avg_sq_col")


class Factored(NamedTuple):
    """A factored second moment, as stored and as it travels to the engines: fp32 ``row`` (rows,) and ``col``
    (cols,). Which sum normalizes it follows the matrix's side (``normalizer``)."""

    row: Tensor
    col: Tensor


def normalizer(side: str | None) -> int:
    """The factor whose sum is s_t: 1 (the column factor) for a left projection, whose columns are the weight's
    (not projected); 0 (the row factor) for a right projection and for a plain parameter (``side`` None)."""
    return 1 if side == "left" else 0


def update(
    f: Factored,
    r: Tensor,
    square_weight: float,
    skip: Tensor | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> Factored:
    """The factors after this step's X = R o R (b2 f + (1 - b2) sums, a lerp by ``square_weight`` = 1 - b2), in
    place (a ``skip``ped matrix keeps its factors bit for bit);
    returns the new factors (the stored ones, or out-of-place values where ``skip`` may hold). ``reduce`` sums the
    column sums over the ranks holding the other rows of a row-sharded R."""
    x = r.square()
    row_sum, col_sum = x.sum(1), x.sum(0)
    if reduce is not None:
        col_sum = reduce(col_sum)
    new = Factored(
        torch.lerp(f.row, row_sum, square_weight) if skip is not None else f.row.lerp_(row_sum, square_weight),
        torch.lerp(f.col, col_sum, square_weight) if skip is not None else f.col.lerp_(col_sum, square_weight),
    )
    if skip is not None:
        torch.where(skip, f.row, new.row, out=f.row)
        torch.where(skip, f.col, new.col, out=f.col)
    return new


def roots(f: Factored, side: str | None, reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """sqrt(V) = sqrt(row) sqrt(col)^T / sqrt(s), s the ``normalizer`` factor's sum (0 where s is 0: nothing
    seen yet). ``reduce``: the row factor's sum over the ranks of a row-sharded V."""
    total = (f.row if normalizer(side) == 0 else f.col).sum()
    if reduce is not None and normalizer(side) == 0:
        total = reduce(total.reshape(1)).reshape(())
    scale = torch.where(total > 0, total.rsqrt(), 0.0)
    return torch.outer(f.row.sqrt(), f.col.sqrt() * scale)


def expand(f: Factored, side: str | None) -> Tensor:
    """The full V the factors stand for (tests, conversions)."""
    return roots(f, side).square()


def transport(f: Factored, overlap: Tensor | None, side: str, policy: str) -> None:
    """``subspace.transport_with_overlap`` for factored V, in place: ``rotate`` maps the projected side's factor
    by C o C (exactly V <- (C o C) V, the normalizer's factor being the other one); ``reset`` zeroes both."""
    if policy == "rotate":
        projected = f.row if side == "left" else f.col
        projected.copy_(overlap.square() @ projected)
    elif policy == "reset":
        f.row.zero_()
        f.col.zero_()


def from_full(v: Tensor) -> dict[str, Tensor]:
    """Factors standing for a full V (a state converted to ``factored``): its row and column sums, fp32, whose
    product over the total is V itself when V has rank one, and Adafactor's estimate of it otherwise."""
    v = v.float()
    return {"exp_avg_sq_row": v.sum(1).contiguous(), "exp_avg_sq_col": v.sum(0).contiguous()}


def zeros(rows: int, cols: int, device: torch.device) -> dict[str, Tensor]:
    """Zero factors for a (rows, cols) moment, as state entries."""
    return {
        "exp_avg_sq_row": torch.zeros(rows, dtype=torch.float32, device=device),
        "exp_avg_sq_col": torch.zeros(cols, dtype=torch.float32, device=device),
    }
