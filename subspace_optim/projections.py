"""Bases that are never stored: a matrix keeps a few numbers, and the step regenerates its projection from them.

- ``refresh="seeded"``: APOLLO's random projection, entries of variance 1/r regenerated from a generator seed. The
  state holds that seed (``projection_seed``, a plain int). It is not orthonormal (P^T P ~ (d/r) I): it is a
  sketch that preserves norms in expectation, which is all APOLLO's channel scaling needs, so it serves only the
  residual modes that step along the whole gradient (``options`` refuses the others).
- ``refresh="dct"``: the ``rank`` columns of the orthonormal DCT-II matrix most aligned with the gradient
  (``dct``). The state holds their indices (``basis_index``, int32): r numbers instead of d x r. A step gathers
  the columns from one d x d table per size and device, shared by every matrix (``dct.dct_matrix``'s cache;
  LLaMA-7B: one 4096 x 4096 fp32 table, 64 MiB, for all 224 matrices): on CPU 4-10x faster than evaluating the
  cosines (measured, d x r from 512 x 128 to 4096 x 1024), for a table far smaller than the bases it replaces.

A seeded projection comes from one of two streams (``seed_stream``):

- ``"counter"`` (the default): random signs +-1/sqrt(r) from Philox (``philox``), the same bits on every device
  and engine, so the Triton step regenerates it inside its GEMM tiles (``Signs``) and the reference draws it in
  torch; seeds from (seed, parameter index, refresh count), as every sketch's.
- ``"apollo"``: apollo-torch 1.0.3's own Gaussian, so a run reproduces apollo-torch's trajectory: a (d x r)
  ``torch.randn`` for a left basis, the transpose of an (r x d) one for a right basis, each from
  ``torch.Generator(device).manual_seed(seed)``, seeds from the parameter's position and apollo-torch's chain.
  torch's generators differ by device type, so this stream is the same on every rank of one device type, and the
  Triton step takes it materialized.

Regenerating costs one draw (or one DCT gather) of d x r per matrix and step, unless the kernels do it in their
tiles; ``regenerated_chunks`` bounds how many materialized projections exist at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import dct, linalg, philox, stored_basis, workspace
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


def seeded_projection(d: int, rank: int, side: str, seed: int, device: torch.device, stream: str = "counter") -> Tensor:
    """The d x r seeded projection, fp32 on ``device``: ``philox.sign_projection`` (stream ``"counter"``, both sides
    alike), or apollo-torch's N(0, 1/r) Gaussian (``"apollo"``: a (d, r) draw for a left basis, the transpose of an
    (r, d) one for a right basis)."""
    if stream == "counter":
        return philox.sign_projection(seed, d, rank, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (d, rank) if side == "left" else (rank, d)
    z = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).div_(math.sqrt(rank))
    return z if side == "left" else z.mT


class Signs(NamedTuple):
    """A counter-stream seeded projection that the Triton step regenerates in its tiles (``kernels/operands.py``)."""

    seed: int
    shape: tuple[int, int]

    def materialize(self, device: torch.device) -> Tensor:
        """The same matrix drawn in torch (``philox.sign_projection``)."""
        return philox.sign_projection(self.seed, *self.shape, device)


class DctColumns(NamedTuple):
    """DCT columns that the Triton step gathers in its tiles: int32 indices into the shared d x d table."""

    index: Tensor
    table: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (self.table.shape[0], self.index.shape[0])

    def materialize(self, device: torch.device) -> Tensor:
        """The same columns gathered in torch (``dct.gather_columns``, from the same cached table)."""
        return dct.gather_columns(self.shape[0], self.index, device=device)


Regenerated = Signs | DctColumns


# The state keys that hold each kind of basis (a stored one: ``stored_basis``, with its absmax when 8-bit). A refresh
# installs its policy's kind and drops the others, so a group whose ``refresh`` changes between kinds keeps
# stepping with the basis it has until its next refresh.
BASIS_KEYS = {
    "basis": ("basis", stored_basis.ABSMAX),
    "projection_seed": ("projection_seed",),
    "basis_index": ("basis_index",),
}


def materialized(state: dict[str, Any]) -> bool:
    """Whether a step makes this projected matrix's projection from its state instead of reading a float basis: a
    regenerated one (no ``basis``), or a stored 8-bit one (``stored_basis``)."""
    return "basis" not in state or stored_basis.ABSMAX in state


def in_tiles(state: dict[str, Any], stream: str) -> bool:
    """Whether the Triton step regenerates this matrix's projection inside its GEMM tiles (``in_kernel`` gives a
    record): DCT columns, or counter-stream signs. Others it reads materialized (``draw``)."""
    return "basis" not in state and ("basis_index" in state or stream == "counter")


def keep_only(state: dict[str, Any], key: str) -> None:
    """Drop the basis kinds other than ``key`` (a refresh that installs ``key`` calls this)."""
    for other, keys in BASIS_KEYS.items():
        if other != key:
            for k in keys:
                state.pop(k, None)


def projection(state: dict[str, Any], side: str, d: int, rank: int, device: torch.device, stream: str) -> Tensor:
    """The projection a step of this matrix uses: its stored basis, or the one regenerated from its state (the
    record ``in_kernel`` gives the kernels, materialized)."""
    made = in_kernel(state, side, d, rank, device, stream)
    return made if isinstance(made, Tensor) else made.materialize(device)


def draw(
    states: Sequence[dict[str, Any]],
    sides: Sequence[str],
    dims: Sequence[int],
    rank: int,
    devices: Sequence[torch.device],
    stream: str,
) -> list[Tensor]:
    """The projections a chunk of matrices steps with (``projection`` of each): the counter stream's signs are drawn
    in one Philox batch per size and device, since at these sizes a draw's cost is its ~130 torch operations,
    not its entries (one batch of 56 LLaMA-60M projections: ~4x faster than 56 ``torch.randn``)."""
    out: list[Tensor | None] = [None] * len(states)
    batches: dict[tuple[int, torch.device], list[int]] = {}
    for i, state in enumerate(states):
        if stream == "counter" and "basis" not in state and "projection_seed" in state:
            batches.setdefault((dims[i], devices[i]), []).append(i)
        else:
            out[i] = projection(state, sides[i], dims[i], rank, devices[i], stream)
    sizes = {key: len(members) * philox.padded_entries(key[0], rank) for key, members in batches.items()}
    offsets: dict[torch.device, int] = {}
    for (d, device), members in batches.items():
        start = offsets.get(device, 0)
        offsets[device] = start + sizes[d, device]
        room = _workspace(device, sum(n for (_, dev), n in sizes.items() if dev == device))[start : offsets[device]]
        drawn = philox.signs([states[i]["projection_seed"] for i in members], d, rank, device, out=room)
        for j, i in enumerate(members):
            out[i] = drawn[j]
    return out  # type: ignore[return-value]


# The reference's sign draws write into one int32 buffer per device (``workspace.kept``), reused from chunk to chunk
# and step to step (at most ``CHUNK_BYTES`` plus Philox's padding): a fresh 15 MB allocation per step (LLaMA-60M)
# made the glibc allocator map and fault its pages in every time, 1.14x the stored step instead of 1.02x. Each
# chunk's projections are views of it, used by that chunk's step before the next chunk draws.
def _workspace(device: torch.device, words: int) -> Tensor:
    return workspace.kept("sign_draws", (words,), torch.int32, device)


def in_kernel(
    state: dict[str, Any], side: str, d: int, rank: int, device: torch.device, stream: str
) -> Tensor | Regenerated:
    """What the Triton step takes for this matrix: its stored basis (rank-local; an 8-bit one dequantized), a record
    it regenerates from (``Signs``, ``DctColumns``), or for the apollo stream the materialized Gaussian."""
    if "basis" in state:
        return stored_basis.load(state)
    if "projection_seed" in state:
        if stream == "counter":
            return Signs(int(state["projection_seed"]), (d, rank))
        return seeded_projection(d, rank, side, state["projection_seed"], device, stream)
    index = local(state["basis_index"])
    return DctColumns(index.to(device=device, dtype=torch.int32).contiguous(), dct.dct_matrix(d, device))


def kernel_kind(group: dict[str, Any]) -> str | None:
    """How the Triton step regenerates a group's projections in its tiles (``in_kernel``): ``"signs"``, ``"dct"``, or
    None (a stored basis, or apollo-torch's Gaussian, which it reads materialized)."""
    if group["refresh"] == "dct":
        return "dct"
    return "signs" if group["refresh"] == "seeded" and group["seed_stream"] == "counter" else None


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
