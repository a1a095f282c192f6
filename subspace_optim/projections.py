"""Bases that are never stored: a matrix keeps a few numbers, and the step regenerates its projection from them.

- ``refresh="seeded"``: APOLLO's random projection, a Gaussian with entries N(0, 1/r) drawn from a generator seed.
  The state holds that seed (``projection_seed``, a plain int). It is not orthonormal (P^T P ~ (d/r) I): it is a
  sketch that preserves norms in expectation, which is all APOLLO's channel scaling needs, so it serves only the
  residual modes that step along the whole gradient (``options`` refuses the others).
- ``refresh="dct"``: the ``rank`` columns of the orthonormal DCT-II matrix most aligned with the gradient
  (``dct``). The state holds their indices (``basis_index``, int32): r numbers instead of d x r. A step gathers
  the columns from one d x d table per size and device, shared by every matrix (``dct.dct_matrix``'s cache;
  LLaMA-7B: one 4096 x 4096 fp32 table, 64 MiB, for all 224 matrices): on CPU 4-10x faster than evaluating the
  cosines (measured, d x r from 512 x 128 to 4096 x 1024), for a table far smaller than the bases it replaces.

A projection is drawn the way apollo-torch draws it, so its own stream (``seed_stream="apollo"``) reproduces
apollo-torch's trajectory: a (d x r) Gaussian for a left basis, the transpose of an (r x d) one for a right basis,
each from ``torch.Generator(device).manual_seed(seed)``. Generators of the same device type give every
data-parallel rank, and a resumed run, the same numbers; the seeds depend on (seed, parameter index, refresh count)
only (``seed_stream="counter"``) or on apollo-torch's chain from the parameter's position.

Regenerating costs one Gaussian draw (or one DCT gather) of d x r per matrix and step; ``regenerated_chunks``
bounds how many of them exist at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from . import dct, linalg
from .distributed import local
from .subspace import REGENERATED

# Regenerated projections alive at once in a step: matrices are stepped in chunks of at most this many bytes of
# fp32 projections (at least one matrix per chunk), so the transient stays far below what stored bases take.
CHUNK_BYTES = 64 << 20
_INT64_MAX = torch.iinfo(torch.int64).max
_APOLLO_ADVANCE = 15  # apollo-torch's next_seed draws this many int64s and keeps the last


def regenerated(group: dict[str, Any]) -> bool:
    """Whether a group's projected matrices keep no basis (``subspace.REGENERATED`` refresh policies)."""
    return group["refresh"] in REGENERATED


def apollo_next_seed(seed: int) -> int:
    """The seed apollo-torch 1.0.3 moves to after drawing a projection: the last of 15 int64s in [0, 2^63 - 1)
    drawn from a CPU generator seeded with ``seed`` (its ``next_seed``)."""
    gen = torch.Generator().manual_seed(seed)
    return int(torch.randint(0, _INT64_MAX, (_APOLLO_ADVANCE,), generator=gen)[-1])


def next_projection_seed(group: dict[str, Any], index: int, state: dict[str, Any]) -> int:
    """The seed of a seeded matrix's next projection (its ``refresh_count``-th).

    ``counter``: ``linalg.sketch_seed(seed, index, refresh_count)``, as every sketch. ``apollo``: apollo-torch's,
    the parameter's 1-based position over every parameter of every group (``index + 1``) for the first
    projection, then ``apollo_next_seed`` of the previous one."""
    if group["seed_stream"] == "apollo":
        return index + 1 if "projection_seed" not in state else apollo_next_seed(state["projection_seed"])
    return linalg.sketch_seed(group["seed"], index, state["refresh_count"])


def seeded_projection(d: int, rank: int, side: str, seed: int, device: torch.device) -> Tensor:
    """The d x r seeded projection: N(0, 1/r) entries, drawn as a (d, r) Gaussian (left) or the transpose of an
    (r, d) one (right), fp32 on ``device``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (d, rank) if side == "left" else (rank, d)
    z = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).div_(math.sqrt(rank))
    return z if side == "left" else z.mT


# The state key that holds each kind of basis. A refresh installs its policy's key and drops the others, so a
# group whose ``refresh`` changes between kinds keeps stepping with the basis it has until its next refresh.
BASIS_KEYS = ("basis", "projection_seed", "basis_index")


def stores_none(state: dict[str, Any]) -> bool:
    """Whether a projected matrix's basis is regenerated (its state holds no ``basis``)."""
    return "basis" not in state


def keep_only(state: dict[str, Any], key: str) -> None:
    """Drop the basis kinds other than ``key`` (a refresh that installs ``key`` calls this)."""
    for other in BASIS_KEYS:
        if other != key:
            state.pop(other, None)


def projection(state: dict[str, Any], side: str, d: int, rank: int, device: torch.device) -> Tensor:
    """The projection a step of this matrix uses: its stored basis, or the one regenerated from its state."""
    if "basis" in state:
        return state["basis"]
    if "projection_seed" in state:
        return seeded_projection(d, rank, side, state["projection_seed"], device)
    return dct.gather_columns(d, local(state["basis_index"]), device=device)


def regenerated_chunks(dims: Sequence[int], rank: int, budget: int = CHUNK_BYTES) -> Iterator[range]:
    """Consecutive matrices whose fp32 d x r projections together take at most ``budget`` bytes (one at least)."""
    start, total = 0, 0
    for i, d in enumerate(dims):
        size = 4 * d * rank
        if i > start and total + size > budget:
            yield range(start, i)
            start, total = i, 0
        total += size
    if dims:
        yield range(start, len(dims))
