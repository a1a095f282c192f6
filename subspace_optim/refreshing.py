"""Refresh scheduling: which matrices refresh at a step, who computes each basis, and how a new basis is
installed (moments carried along, metrics recorded, ranks checked for agreement).

Every rank walks the same due list in the same order, so the collectives inside a refresh (the sharded
range finder's all-reduces, round-robin broadcasts, consistency checks) line up across ranks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from . import dct, distributed, factored, functional, guards, linalg, projections, quant, stored_basis
from .distributed import is_dtensor, local
from .subspace import basis_dim, choose_side, oriented, transport_moments, transport_with_overlap


class Matrix(NamedTuple):
    """A projected parameter as one step sees it; ``engine`` is resolved ("reference" or "triton")."""

    index: int
    group: dict[str, Any]
    name: str
    p: Tensor
    state: dict[str, Any]
    side: str
    engine: str


def matrix_shape(p: Tensor) -> tuple[int, int]:
    """A weight viewed as a matrix: conv weights are (out, in * k * k)."""
    return p.shape[0], p.numel() // p.shape[0]


def local_matrix(t: Tensor) -> Tensor:
    """This rank's rows of ``t`` as a matrix (m_l x n; m_l may be 0 for an empty FSDP shard)."""
    t_local = local(t)
    return t_local.reshape(t_local.shape[0], matrix_shape(t)[1])


def projects(p: Tensor, group: dict[str, Any]) -> bool:
    """Whether ``p`` is projected: a >= 2-D weight in a rank group, with rank <= min(m, n) (else plain AdamW;
    ``rank_fallbacks`` says so to the user)."""
    rank = group["rank"]
    return rank is not None and p.dim() >= 2 and rank <= min(matrix_shape(p))


def rank_fallbacks(new: list[tuple[Tensor, dict[str, Any], str]]) -> None:
    """One warning for the newly seen matrices of rank groups whose rank exceeds a dimension (they train
    with plain AdamW), attributed to the user's line; several with the same rank share one warning."""
    by_rank: dict[int, list[tuple[str, tuple[int, int]]]] = {}
    for p, group, name in new:
        if group["rank"] is not None and p.dim() >= 2 and not projects(p, group):
            by_rank.setdefault(group["rank"], []).append((name, matrix_shape(p)))
    for rank, found in by_rank.items():
        if len(found) == 1:
            ((name, shape),) = found
            guards.warn_user(
                f"rank={rank} exceeds min{shape} of parameter {name}: it is trained with plain AdamW "
                f"(set rank <= {min(shape)} or leave this parameter out of the rank group)"
            )
            continue
        shown = ", ".join(f"{name} {shape}" for name, shape in found[:4])
        more = f" and {len(found) - 4} more" if len(found) > 4 else ""
        guards.warn_user(
            f"rank={rank} exceeds the smaller dimension of {len(found)} parameters ({shown}{more}): they are "
            "trained with plain AdamW (lower the rank, or leave them out of the rank group)"
        )


def side(p: Tensor, group: dict[str, Any]) -> str:
    """The projected side. A row-sharded (FSDP2) weight always projects on the right, whatever
    ``proj_type`` says: then a rank's rows project with the replicated basis and no communication."""
    return "right" if is_dtensor(p) else choose_side(group["proj_type"], *matrix_shape(p))


def due(matrices: list[Matrix]) -> list[Matrix]:
    return [matrix for matrix in matrices if matrix.state["step"] % matrix.group["update_gap"] == 0]


def _round_robin(matrix: Matrix, world: int) -> bool:
    return world > 1 and matrix.group["refresh_owner"] == "round_robin" and not is_dtensor(matrix.p)


def _refresh_input(matrix: Matrix) -> tuple[Tensor, linalg.Slab]:
    """The gradient a refresh of ``matrix`` reads here: the whole matrix, or this rank's rows and their slab."""
    if not is_dtensor(matrix.p):
        return local_matrix(matrix.p.grad), linalg.UNSHARDED
    if matrix.group["refresh"] == "svd":  # the exact SVD needs the whole matrix (the slow reproduction mode)
        full = matrix.p.grad.full_tensor()
        return full.reshape(full.shape[0], -1), linalg.UNSHARDED
    return local_matrix(matrix.p.grad), distributed.row_shard(matrix.p, matrix.name).slab()


def _compute(matrices: list[Matrix]) -> dict[int, tuple[linalg.Basis, float]]:
    """New bases for ``matrices``, one ``functional.refresh_bases`` call per (group, engine); each matrix is
    charged an equal share of its call's wall time."""
    calls: dict[tuple[int, str], list[Matrix]] = {}
    for matrix in matrices:
        calls.setdefault((id(matrix.group), matrix.engine), []).append(matrix)
    out = {}
    for (_, which), members in calls.items():
        group = members[0].group
        inputs = [_refresh_input(matrix) for matrix in members]
        start = time.perf_counter()
        bases = functional.refresh_bases(
            [g for g, _ in inputs],
            [stored_basis.load(matrix.state) if "basis" in matrix.state else None for matrix in members],
            [linalg.sketch_seed(group["seed"], matrix.index, matrix.state["refresh_count"]) for matrix in members],
            sides=[matrix.side for matrix in members],
            rank=group["rank"],
            policy=group["refresh"],
            oversample=group["oversample"],
            power_iters=group["power_iters"],
            slabs=[slab for _, slab in inputs],
            engine=which,
            matmul_precision="ieee",  # refreshes always use ieee fp32 products with fp64 Gram matrices
        )
        if bases and bases[0].basis.device.type == "cuda":
            torch.cuda.synchronize(bases[0].basis.device)
        seconds = (time.perf_counter() - start) / len(members)
        out.update({matrix.index: (b, seconds) for matrix, b in zip(members, bases, strict=True)})
    return out


def _broadcast(matrix: Matrix, owner: int, basis: linalg.Basis | None) -> linalg.Basis:
    """Round robin: the owner sends its d x r basis and its two energies (metrics) in one fp32 message."""
    if basis is not None:
        energies = torch.stack([basis.captured, basis.total]).float()
        buf = torch.cat([basis.basis.flatten().float(), energies])
    else:
        d = basis_dim(matrix.side, *matrix_shape(matrix.p))
        buf = torch.empty(d * matrix.group["rank"] + 2, dtype=torch.float32, device=matrix.p.device)
    dist.broadcast(buf, src=owner)
    if basis is not None:
        return basis
    return linalg.Basis(buf[:-2].view(-1, matrix.group["rank"]), buf[-2].double(), buf[-1].double())


def refresh(due_list: list[Matrix], metrics: dict[int, dict[str, Any]]) -> bool:
    """Refresh the bases of ``due_list`` (same list, same order on every rank) and carry their moments.

    Sharded matrices run the distributed range finder (collectives inside). With
    ``refresh_owner="round_robin"`` under a process group, each plain matrix is computed by one rank and
    its basis broadcast, so the refresh work divides by the world size. Returns whether a consistency
    check is due (``consistency_check_every``).
    """
    rank, world = distributed.world()
    stored = [matrix for matrix in due_list if not projections.regenerated(matrix.group)]
    computed = _compute(
        [matrix for matrix in stored if not _round_robin(matrix, world) or matrix.index % world == rank]
    )
    check = False
    for matrix in due_list:
        if projections.regenerated(matrix.group):
            _refresh_regenerated(matrix, metrics)
            continue
        here = matrix.index in computed
        basis, seconds = computed[matrix.index] if here else (None, 0.0)
        if _round_robin(matrix, world):
            start = time.perf_counter()
            basis = _broadcast(matrix, matrix.index % world, basis)
            seconds = seconds if here else time.perf_counter() - start
        install(matrix, basis, seconds, here, metrics)
        every = matrix.group["consistency_check_every"]
        check |= bool(every) and matrix.state["refresh_count"] % every == 0
    return check


def install(
    matrix: Matrix, new: linalg.Basis, seconds: float, computed_here: bool, metrics: dict[int, dict[str, Any]]
) -> None:
    """Make ``new`` the basis of ``matrix``: rotate/keep/reset the moments into it and record the metrics."""
    state = matrix.state
    overlap = None
    if "basis" not in state:
        projections.keep_only(state, "basis")  # a group that switched from a regenerated refresh
        state.update(
            distributed.replicated_entries(matrix.p, stored_basis.entries(new.basis, matrix.group["basis_dtype"]))
        )
    elif not bool(new.total.float() > 0):  # fp32: the value round-robin receivers get broadcast
        # An all-zero gradient (e.g. DCP's lr=0 state-initializing step) spans nothing: keep the basis
        # and the moments as they are instead of rotating them into an arbitrary one.
        overlap = torch.ones((), dtype=torch.float64)
    else:
        previous, target = stored_basis.replace(state, new.basis)
        how = (matrix.side, matrix.group["moments"])
        c = _carry_moments(matrix, lambda m, v: transport_moments(m, v, previous, target, *how))
        overlap = c.double().square().sum() / matrix.group["rank"]
    state["refresh_count"] += 1
    metrics[matrix.index] = {
        "refresh_time_s": seconds,
        "captured": new.captured,
        "total": new.total,
        "overlap": overlap,
        "computed_here": computed_here,
    }


def _carry_moments(matrix: Matrix, transport: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Run ``transport`` (in place on fp32 working copies of the moments: the stored tensors themselves when they
    are fp32), store the result back and restart the moments' age on a reset; returns what ``transport`` does."""
    moments = {k: local(v) for k, v in matrix.state.items() if k.startswith("exp_avg")}
    factors = factored.KEYS[0] in moments  # fp32 factors move in place
    m = quant.load(moments, "exp_avg")
    v = factored.Factored(*(moments[k] for k in factored.KEYS)) if factors else quant.load(moments, "exp_avg_sq")
    out = transport(m, v)
    if matrix.group["moments"] != "keep":
        quant.store(moments, "exp_avg", m)
        if not factors:
            quant.store(moments, "exp_avg_sq", v)
    if matrix.group["moments"] == "reset":
        matrix.state["moment_age"] = 0
    return out


def _refresh_regenerated(matrix: Matrix, metrics: dict[int, dict[str, Any]]) -> None:
    """A new projection for a matrix that stores none (``projections``), computed on every rank (a seed, or one
    transform's alignments): ``seeded`` draws the next seed; ``dct`` selects the best-aligned DCT columns, and its
    moments follow them exactly (C = P_new^T P_old is a 0/1 selection: kept columns carry their moments, new
    ones start at zero, with ``moments="rotate"``). A first refresh only installs."""
    state, group = matrix.state, matrix.group
    start = time.perf_counter()
    captured = total = overlap = None
    key = "projection_seed" if group["refresh"] == "seeded" else "basis_index"
    projections.keep_only(state, key)  # a first refresh, or a group that switched policies: install only
    if key == "projection_seed":
        first = "projection_seed" not in state
        state["projection_seed"] = projections.next_projection_seed(group, matrix.index, state)
        if not first:
            _carry_moments(matrix, lambda m, v: transport_with_overlap(m, v, None, matrix.side, group["moments"]))
    else:
        g, slab = _refresh_input(matrix)
        chosen = dct.select(oriented(g.float(), matrix.side), group["rank"], slab)
        captured, total = chosen.captured, chosen.total
        if "basis_index" not in state:
            state.update(distributed.replicated_entries(matrix.p, {"basis_index": chosen.indices}))
        elif bool(total > 0):  # an all-zero gradient spans nothing: keep the columns and the moments (as ``install``)
            old = local(state["basis_index"])
            c = dct.overlap(chosen.indices, old)
            _carry_moments(matrix, lambda m, v: transport_with_overlap(m, v, c, matrix.side, group["moments"]))
            overlap = c.double().sum() / group["rank"]
            old.copy_(chosen.indices)
    state["refresh_count"] += 1
    metrics[matrix.index] = {
        "refresh_time_s": time.perf_counter() - start,
        "captured": captured,
        "total": total,
        "overlap": overlap,
        "computed_here": True,
    }


def check_consistency(entries: list[tuple[str, Tensor]]) -> None:
    """Raise if data-parallel ranks hold different bases (a collective: call it on every rank).

    Compares a 3-number fingerprint of every basis across the default process group; a no-op when not
    distributed. Bases agree by construction (seeded sketches, identical gradients); a mismatch means
    nondeterministic kernels or ranks that saw different gradients.
    """
    if distributed.world()[1] == 1 or not entries:
        return
    fingerprints = torch.stack([distributed.checksum(b) for _, b in entries])
    wrong = distributed.disagreeing(fingerprints)
    if wrong:
        raise RuntimeError(
            f"subspace bases differ across ranks for {[entries[i][0] for i in wrong]}: ranks must see identical "
            "gradients (all-reduced, same loss scaling) and use deterministic kernels; see SubspaceAdamW(seed=...)"
        )
