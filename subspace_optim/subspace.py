"""One matrix's subspace: which side is projected, how its basis is refreshed, and how Adam's moments
follow the basis when it changes.

Conventions (used by every engine). A projected weight is viewed as a matrix G (m x n); conv weights
are flattened to (out, rest). The basis P always has orthonormal *columns*:

- ``side="left"``:  P is m x r, R = P^T G (r x n), update = P N.
- ``side="right"``: P is n x r, R = G P   (m x r), update = N P^T.

A right basis of G is a left basis of G^T, so the refresh code only ever computes left bases.
"""

from __future__ import annotations

from torch import Tensor

from . import factored, linalg
from .factored import Factored

PROJ_TYPES = ("std", "reverse_std", "left", "right")
REFRESH_POLICIES = ("warm", "rsvd", "svd", "random", "seeded", "dct")
# Policies whose basis is never stored: regenerated from a few numbers kept in the state (``projections``).
REGENERATED = ("seeded", "dct")
MOMENT_POLICIES = ("rotate", "keep", "reset")


def choose_side(proj_type: str, m: int, n: int) -> str:
    """The projected side for a G of shape (m, n), with galore-torch 1.0's ``proj_type`` meanings.

    ``std`` keeps the basis on the smaller side (right when m >= n), which is galore-torch's default
    and also the side that lets a row-sharded (FSDP) weight project its local rows without
    communication. ``reverse_std`` puts the basis on the larger side: the moments are then
    2 r min(m, n) instead of 2 r max(m, n), the smallest total state when m != n.
    """
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("left", "right"):
        return proj_type
    raise ValueError(f"Invalid proj_type: {proj_type!r} - use one of {PROJ_TYPES}")


def basis_dim(side: str, m: int, n: int) -> int:
    return m if side == "left" else n


def oriented(g: Tensor, side: str) -> Tensor:
    """The matrix whose *left* basis is wanted: G for a left projection, G^T (a view) for a right one."""
    return g if side == "left" else g.mT


def project(g: Tensor, p: Tensor, side: str) -> Tensor:
    """R = P^T G (left) or G P (right)."""
    return p.mT @ g if side == "left" else g @ p


def project_back(n: Tensor, p: Tensor, side: str) -> Tensor:
    """Full-space update P N (left) or N P^T (right)."""
    return p @ n if side == "left" else n @ p.mT


def refresh_basis(
    g: Tensor,
    side: str,
    rank: int,
    *,
    policy: str,
    previous: Tensor | None,
    oversample: int,
    power_iters: int,
    seed: int,
    slab: linalg.Slab = linalg.UNSHARDED,
) -> linalg.Basis:
    """A new basis for G with the refresh ``policy`` (see ``REFRESH_POLICIES``).

    - ``warm``: subspace iteration started from ``previous`` plus ``oversample`` fresh Gaussian columns,
      finished by Rayleigh-Ritz; the first refresh (no previous basis) is an ``rsvd``.
    - ``rsvd``: randomized range finder with ``oversample`` extra columns and ``power_iters`` power
      iterations, finished by Rayleigh-Ritz.
    - ``svd``: exact ``torch.linalg.svd`` of G (galore-torch's refresh).
    - ``random``: a seeded Gaussian, orthonormalized; ignores the gradient.

    ``slab`` describes a row-sharded G (right side only): ``g`` is then the local rows and every
    product is all-reduced (see ``linalg.Slab``). ``svd`` needs the whole matrix and takes no slab.
    """
    g = g.float()
    if policy == "svd":
        if slab is not linalg.UNSHARDED:
            raise ValueError("refresh='svd' needs the whole gradient; gather it before calling")
        return linalg.svd_basis(g, rank, side)
    a = oriented(g, side)
    if policy == "random":
        p = linalg.random_basis(a.shape[0], rank, seed, g.device)
        return linalg.Basis(p, linalg.captured_energy(a, p, slab), linalg.energy(a, slab))
    start = previous if policy == "warm" else None
    return linalg.range_finder_basis(
        a, rank, oversample=oversample, power_iters=power_iters, seed=seed, start=start, slab=slab
    )


def transport_moments(
    exp_avg: Tensor, exp_avg_sq: Tensor, p_old: Tensor, p_new: Tensor, side: str, policy: str
) -> Tensor:
    """Carry Adam's moments from the basis ``p_old`` into ``p_new`` in place; returns the overlap C.

    With C = P_new^T P_old (r x r), a projected gradient expressed in the old basis, x_old, reads
    x_new = C x_old in the new one (exactly, for the part of the gradient inside span(P_old)).

    - ``rotate``: first moment M <- C M (exact: the moving average is linear). Second moment: the
      elementwise V = E[x_old^2] has no exact image without the cross terms E[x_i x_j]; assuming them
      zero (the same diagonal model Adam itself makes) gives V <- (C o C) V, o the Hadamard product.
      It is non-negative by construction, keeps |M_i| / sqrt(V_i) bounded by the old ratios
      (Cauchy-Schwarz), and since the rows of C have norm <= 1 it never inflates the second moment;
      directions new to the subspace start with small M and V together.
    - ``keep``: leave M and V as they are (galore-torch's behaviour: old coordinates are reused as if
      the basis had not changed).
    - ``reset``: zero M and V (the caller also restarts bias correction).

    For a right projection the moments are m x r (coordinates along rows' columns), so C acts from the
    right: M <- M C^T, V <- V (C o C)^T.
    """
    overlap = p_new.mT @ p_old
    transport_with_overlap(exp_avg, exp_avg_sq, overlap, side, policy)
    return overlap


def transport_with_overlap(
    exp_avg: Tensor, exp_avg_sq: Tensor | Factored, overlap: Tensor | None, side: str, policy: str
) -> None:
    """``transport_moments`` given the overlap C = P_new^T P_old itself (a DCT selection's exact 0/1 matrix;
    None where only ``keep`` and ``reset`` are allowed, as between independent seeded projections). A factored
    second moment moves by its factors (``factored.transport``: exactly V <- (C o C) V)."""
    if policy not in MOMENT_POLICIES:
        raise ValueError(f"Invalid moments policy: {policy!r} - use one of {MOMENT_POLICIES}")
    if policy == "rotate" and overlap is None:
        raise ValueError("moments='rotate' needs the overlap of the old and new bases")
    if type(exp_avg_sq) is Factored:
        factored.transport(exp_avg_sq, overlap, side, policy)
    if policy == "rotate":
        c2 = overlap.square()
        if side == "left":
            exp_avg.copy_(overlap @ exp_avg)
            if type(exp_avg_sq) is not Factored:
                exp_avg_sq.copy_(c2 @ exp_avg_sq)
        else:
            exp_avg.copy_(exp_avg @ overlap.mT)
            if type(exp_avg_sq) is not Factored:
                exp_avg_sq.copy_(exp_avg_sq @ c2.mT)
    elif policy == "reset":
        exp_avg.zero_()
        if type(exp_avg_sq) is not Factored:
            exp_avg_sq.zero_()
