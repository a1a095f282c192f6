"""Data-parallel and sharded execution: DTensor views, reductions, round-robin refresh, consistency checks.

Three regimes, decided per parameter:

- plain tensor, no process group or DDP: every rank holds the same (all-reduced) gradient, and sketches
  are seeded from (seed, index, refresh count), so every rank computes the same basis with no
  communication. ``refresh_owner="round_robin"`` instead refreshes each matrix on one rank and
  broadcasts the d x r basis, dividing refresh work by the world size.
- FSDP2 DTensor sharded on dim 0 (``fully_shard``): the basis sits on the column side (n x r, replicated)
  so a rank's rows project locally, G_l P; moments are m_l x r, sharded like the weight. The refresh is a
  distributed range finder whose only traffic is all-reduces of n x k and k x k matrices.
- anything else (other placements, 2-D meshes): a clear error at the first step.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor

from .linalg import Slab

try:  # DTensor is public since torch 2.4; keep the import soft for minimal builds.
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - torch without distributed
    DTensor = None  # type: ignore[assignment,misc]


def is_dtensor(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The rank-local tensor of a DTensor (shares storage: in-place ops update the DTensor), or ``t``."""
    return t.to_local() if is_dtensor(t) else t


@dataclass(frozen=True)
class RowShard:
    """A parameter sharded on dim 0 over a 1-D mesh: this rank holds rows [offset, offset + rows)."""

    offset: int
    rows: int
    global_rows: int
    group: dist.ProcessGroup

    def slab(self) -> Slab:
        """G^T's column slab for this rank (a right projection's refresh operates on A = G^T)."""
        return Slab(offset=self.offset, total=self.global_rows, reduce=partial(all_reduce_sum, group=self.group))


def row_shard(p: Tensor, name: str) -> RowShard:
    """Describe how DTensor ``p`` is sharded, or raise an error naming the parameter and what is supported."""
    mesh = p.device_mesh
    if mesh.ndim != 1 or len(p.placements) != 1 or not isinstance(p.placements[0], Shard) or p.placements[0].dim != 0:
        raise NotImplementedError(
            f"parameter {name} is a DTensor with placements {p.placements} on a {mesh.ndim}-D mesh; "
            "SubspaceAdamW supports FSDP2's dim-0 sharding on a 1-D mesh (fully_shard) and plain tensors (DDP)"
        )
    rows = local(p).shape[0]
    return RowShard(offset=first_row(p), rows=rows, global_rows=p.shape[0], group=mesh.get_group())


def first_row(p: Tensor) -> int:
    """The global index of the first row this rank holds of a dim-0 sharded DTensor ``p`` (0 for a plain tensor).
    Other placements are refused before any step (``row_shard``, when the parameter's state is made).

    fully_shard splits dim 0 like torch.chunk: ceil(m / world) rows per rank, the last ranks possibly empty."""
    if not is_dtensor(p):
        return 0
    mesh, m = p.device_mesh, p.shape[0]
    return min(mesh.get_local_rank() * -(-m // mesh.size()), m)


def all_reduce_sum(t: Tensor, group: dist.ProcessGroup) -> Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def sharded_like(p: Tensor, local_tensor: Tensor, cols: int) -> Tensor:
    """Wrap a rank-local m_l x cols tensor as a DTensor sharded on dim 0 like the weight ``p``."""
    m = p.shape[0]
    return DTensor.from_local(
        local_tensor, p.device_mesh, [Shard(0)], run_check=False, shape=torch.Size((m, cols)), stride=(cols, 1)
    )


def sharded_vector_like(p: Tensor, local_vector: Tensor) -> Tensor:
    """Wrap a rank-local vector of the weight's rows (one number per local row) as a DTensor sharded like ``p``."""
    return DTensor.from_local(
        local_vector, p.device_mesh, [Shard(0)], run_check=False, shape=torch.Size((p.shape[0],)), stride=(1,)
    )


def replicated_like(p: Tensor, local_tensor: Tensor) -> Tensor:
    """Wrap a tensor that is identical on every rank (a basis) as a replicated DTensor on ``p``'s mesh."""
    return DTensor.from_local(local_tensor, p.device_mesh, [Replicate()], run_check=False)


def replicated_entries(p: Tensor, made: dict[str, Tensor]) -> dict[str, Tensor]:
    """State entries that are identical on every rank (a basis, its absmax, DCT column indices) as the state of ``p``
    holds them: replicated DTensors on a sharded weight's mesh, the tensors themselves otherwise."""
    if not is_dtensor(p):
        return made
    return {k: replicated_like(p, v) for k, v in made.items()}


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def any_across(flags: Tensor, groups: list[dist.ProcessGroup]) -> Tensor:
    """Element-wise logical OR of int flags over each group (ranks of a sharded run must agree on skips)."""
    for group in groups:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    return flags


def checksum(t: Tensor) -> Tensor:
    """A cheap fingerprint of a basis: (sum, sum of squares, a position-weighted sum) in fp64.

    Two ranks holding different bases disagree in it except with negligible probability; the weighted
    term catches permuted columns, which the first two do not.
    """
    x = local(t).double().flatten()
    weights = torch.arange(1, x.numel() + 1, dtype=torch.float64, device=x.device) / max(x.numel(), 1)
    return torch.stack([x.sum(), x.square().sum(), (x * weights).sum()])


def disagreeing(fingerprints: Tensor, group: dist.ProcessGroup | None = None) -> list[int]:
    """Indices (rows of ``fingerprints``) where ranks hold different values."""
    low, high = fingerprints.clone(), fingerprints.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    return torch.nonzero((low != high).any(dim=1)).flatten().tolist()
