"""Reference linear algebra for subspace refreshes.

Every function here is the PyTorch oracle that a faster engine must reproduce. They all compute a
*left* orthonormal basis of a matrix ``A`` (d x n); a right basis of ``G`` is a left basis of ``G^T``,
so callers pass a transposed view instead of duplicating the math.

Precision rule: inputs are promoted to fp32 whatever the parameter dtype (bf16 has no CPU QR), and
the small k x k problems (Gram matrices, Rayleigh-Ritz) are solved in fp64, which is what keeps
CholeskyQR stable on power-iterated sketches whose condition number squares past fp32's range.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1
_TINY32 = torch.finfo(torch.float32).tiny


def sketch_seed(seed: int, index: int, refresh_count: int) -> int:
    """Mix (seed, parameter index, refresh count) into one 63-bit generator seed (splitmix64).

    A sketch must depend only on these three numbers, never on the global RNG: that is what makes
    every data-parallel rank draw the same Gaussian and so compute the same basis.
    """
    x = 0
    for part in (seed, index, refresh_count):
        x = (x ^ (int(part) & _MASK64)) & _MASK64
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        x = z ^ (z >> 31)
    return x & ((1 << 63) - 1)


def gaussian(rows: int, cols: int, seed: int, device: torch.device) -> Tensor:
    """A ``rows x cols`` fp32 standard Gaussian drawn from a private generator seeded with ``seed``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.randn(rows, cols, generator=gen, device=device, dtype=torch.float32)


def _gram64(y: Tensor) -> Tensor:
    y64 = y.double()
    return y64.mT @ y64


def _cholesky_qr(y: Tensor, shift: float = 0.0) -> Tensor | None:
    """One CholeskyQR pass, Q = Y R^-1 with R^T R = Y^T Y + shift I (Gram in fp64).

    Returns None when the (shifted) Gram matrix is not numerically positive definite.
    """
    gram = _gram64(y)
    if shift:
        gram.diagonal().add_(shift)
    chol, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        return None
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    # R = chol^T, so R^-1 = (chol^-1)^T = solve(chol, I)^T.
    r_inv = torch.linalg.solve_triangular(chol, eye, upper=False).mT
    q = y @ r_inv.to(y.dtype)
    return q if bool(torch.isfinite(q).all()) else None


def orthonormalize(y: Tensor) -> Tensor:
    """An orthonormal basis of span(Y) for a tall Y (d x k, d >= k), in fp32.

    Q = CholeskyQR2(Y): two CholeskyQR passes, each Q <- Y R^{-1} with R^T R = Y^T Y computed in fp64.
    If the Gram matrix is not positive definite (an ill-conditioned power-iterated sketch), a shifted
    pass with shift = 11 (d k + k (k+1)) u ||Y||_2^2 (shifted CholeskyQR3, Fukaya et al. 2020) is tried
    first; if the sketch is rank deficient even so, Householder QR (``torch.linalg.qr``) is used, which
    always returns orthonormal columns.
    """
    y = y.float()
    d, k = y.shape
    if d < k:
        raise ValueError(f"orthonormalize needs a tall matrix, got {d} x {k}")
    q = _cholesky_qr(y)
    if q is not None:
        q2 = _cholesky_qr(q)
        if q2 is not None:
            return q2
    norm2 = float(torch.linalg.matrix_norm(y.double(), ord=2)) ** 2
    if norm2 > 0.0 and torch.isfinite(torch.tensor(norm2)):
        shift = 11.0 * (d * k + k * (k + 1)) * torch.finfo(torch.float64).eps * norm2
        q = _cholesky_qr(y, shift=shift)
        if q is not None:
            q2 = _cholesky_qr(q)
            if q2 is not None:
                q3 = _cholesky_qr(q2)
                if q3 is not None:
                    return q3
    q, _ = torch.linalg.qr(y.double())
    return q.float()


class Basis(NamedTuple):
    """A refreshed basis ``P`` (d x r, orthonormal columns) and the energy it captures.

    ``captured`` is ||P^T A||_F^2 and ``total`` is ||A||_F^2, both 0-d fp64 tensors left on the device
    (reading them would synchronize; metrics read them lazily).
    """

    basis: Tensor
    captured: Tensor
    total: Tensor


def _no_reduce(t: Tensor) -> Tensor:
    return t


@dataclass(frozen=True)
class Slab:
    """Where the local columns a_l (d x n_l) of the full matrix A (d x n) sit, and how to sum over slabs.

    Unsharded: offset 0, total None (= n_l), no reduction. Row-sharded FSDP weights project on the right,
    so A = G^T and each rank holds a slab of its columns; every product below is then a sum of per-slab
    terms followed by one all-reduce of a small d x k (or k x k) matrix, never a gather of G.
    """

    offset: int = 0
    total: int | None = None
    reduce: Callable[[Tensor], Tensor] = _no_reduce

    def columns(self, a: Tensor) -> int:
        return a.shape[1] if self.total is None else self.total


UNSHARDED = Slab()


def energy(a: Tensor, slab: Slab = UNSHARDED) -> Tensor:
    """||A||_F^2 in fp64."""
    return slab.reduce(a.double().square().sum())


def captured_energy(a: Tensor, p: Tensor, slab: Slab = UNSHARDED) -> Tensor:
    """||P^T A||_F^2 in fp64."""
    return slab.reduce((p.mT @ a).double().square().sum())


def rayleigh_ritz(a: Tensor, q: Tensor, rank: int, slab: Slab = UNSHARDED, total: Tensor | None = None) -> Basis:
    """Best rank-``rank`` basis of ``A`` inside span(Q): P = Q W[:, :rank], W the top eigenvectors.

    With B = A^T Q (n x k), the eigendecomposition B^T B = W diag(lambda) W^T (fp64, k x k) gives the
    Ritz vectors; sum(lambda[:rank]) = ||P^T A||_F^2 is the captured energy, for free. ``total``
    (||A||_F^2, when the caller already has it) saves a pass over A and, sharded, an all-reduce.
    """
    b64 = (a.mT @ q).double()
    evals, evecs = torch.linalg.eigh(slab.reduce(b64.mT @ b64))
    order = torch.argsort(evals, descending=True)[:rank]
    p = q @ evecs[:, order].to(q.dtype)
    captured = evals[order].clamp_min(0).sum()
    return Basis(p, captured, energy(a, slab) if total is None else total)


def svd_basis(g: Tensor, rank: int, side: str) -> Basis:
    """Exact top-``rank`` singular vectors of G (m x n) via ``torch.linalg.svd`` in fp32.

    ``side="left"`` returns U[:, :rank] (m x r); ``side="right"`` returns Vh[:rank].T (n x r). The SVD is
    always of G itself, not of G^T, so the vectors (signs included) are the ones galore-torch uses.
    """
    g = g.float()
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    p = u[:, :rank] if side == "left" else vh[:rank].mT
    s64 = s.double().square()
    return Basis(p.contiguous(), s64[:rank].sum(), s64.sum())


def inverse_norm(total: Tensor) -> Tensor:
    """1 / ||A||_F from ``total`` = ||A||_F^2, in fp32 (1 for a zero matrix, never below fp32's smallest normal).

    A A^T Q grows like ||A||^2: a finite gradient of 1e19 would overflow fp32 there. Dividing the small
    middle product A^T Q by ||A||_F keeps every product at ||A||'s scale and leaves the span unchanged.
    """
    norm = total.sqrt()
    return torch.where(norm > 0, norm.reciprocal(), torch.ones_like(norm)).clamp_min(_TINY32).float()


def range_finder_basis(
    a: Tensor,
    rank: int,
    *,
    oversample: int,
    power_iters: int,
    seed: int,
    start: Tensor | None = None,
    slab: Slab = UNSHARDED,
) -> Basis:
    """Randomized range finder with subspace (power) iterations and a Rayleigh-Ritz finish.

    Cold: Y = A Omega, Omega a seeded Gaussian (n x k, k = rank + oversample); warm: Y = A A^T [start | Omega'],
    Omega' a seeded Gaussian (d x oversample). Then ``power_iters`` (warm: ``power_iters - 1``) times
    Y <- A (A^T orth(Y)); finally Q = orth(Y) and P = Rayleigh-Ritz(A, Q, rank).

    ``start`` (d x r, orthonormal) is the previous basis: subspace iteration from it ("warm") converges
    from where the last refresh ended instead of from noise, and the extra Gaussian columns let
    directions that were outside the old subspace enter the new one. With a ``slab``, ``a`` is the
    local column slab and each product is reduced over slabs (the Gaussians are drawn in full on every
    rank from the same seed, and each rank takes its own rows of Omega).
    """
    a = a.float()
    d = a.shape[0]
    n = slab.columns(a)
    total = energy(a, slab)  # computed (and, sharded, reduced) once: Rayleigh-Ritz reports it too
    inv_norm = inverse_norm(total)

    def gram_times(y: Tensor) -> Tensor:
        return slab.reduce(a @ ((a.mT @ orthonormalize(y)) * inv_norm))

    if start is None:
        k = min(rank + oversample, d, n)
        omega = gaussian(n, k, seed, a.device)[slab.offset : slab.offset + a.shape[1]]
        y = slab.reduce(a @ omega)
        iterations = power_iters
    else:
        k = min(start.shape[1] + oversample, d)
        y = start.float()
        if k > start.shape[1]:
            y = torch.cat([y, gaussian(d, k - start.shape[1], seed, a.device)], dim=1)
        y = gram_times(y)
        iterations = max(power_iters - 1, 0)
    for _ in range(iterations):
        y = gram_times(y)
    return rayleigh_ritz(a, orthonormalize(y), rank, slab, total)


def random_basis(d: int, rank: int, seed: int, device: torch.device) -> Tensor:
    """A data-independent orthonormal basis: orth(Omega), Omega a seeded d x rank Gaussian."""
    return orthonormalize(gaussian(d, rank, seed, device))
