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


class Products:
    """The products a refresh needs from an engine, for a batch of matrices A_b (d x c) given as a list.

    This is the only thing an engine supplies to the range finder and to CholeskyQR: the algorithm in this
    module is written once. Here every product is a plain torch matmul, one member at a time (the
    reference engine, bit-identical to the single-matrix code it replaced); ``kernels.refresh`` subclasses
    it with batched Triton GEMMs over pointer arrays and an in-kernel Gaussian sketch. Stacked operands
    are (batch, rows, cols) fp32; ``gram64`` returns fp64.

    With a ``slab``, each A_b is this rank's column slab of a row-sharded gradient's transpose, and the
    products that sum over columns (``sketch``, ``a``, ``energy`` and the Rayleigh-Ritz Gram) are
    all-reduced; the Gaussians are drawn in full from the same seed on every rank.
    """

    def __init__(self, mats: list[Tensor], seeds: list[int], slab: Slab | None = None) -> None:
        self.mats = [a.float() for a in mats]
        self.seeds = seeds
        self.slab = slab or UNSHARDED
        self.device = self.mats[0].device if self.mats else torch.device("cpu")

    @property
    def rows(self) -> int:
        return self.mats[0].shape[0]

    @property
    def columns(self) -> int:
        """Columns of the whole A (all slabs)."""
        return self.slab.columns(self.mats[0])

    def reduce(self, t: Tensor) -> Tensor:
        return self.slab.reduce(t)

    def energy(self) -> Tensor:
        """||A_b||_F^2 in fp64, shape (batch,)."""
        return torch.stack([energy(a, self.slab) for a in self.mats])

    def sketch(self, k: int) -> Tensor:
        """A_b Omega_b, Omega_b a seeded n x k Gaussian (this slab's rows of it)."""
        lo, n = self.slab.offset, self.columns
        return torch.stack(
            [
                self.slab.reduce(a @ gaussian(n, k, seed, a.device)[lo : lo + a.shape[1]])
                for a, seed in zip(self.mats, self.seeds, strict=True)
            ]
        )

    def gaussian(self, rows: int, cols: int) -> Tensor:
        """A seeded rows x cols Gaussian per member (a warm start's fresh directions)."""
        return torch.stack([gaussian(rows, cols, seed, self.device) for seed in self.seeds])

    def at(self, q: Tensor) -> Tensor:
        """A_b^T Q_b (this slab's rows)."""
        return torch.stack([a.mT @ q_b for a, q_b in zip(self.mats, q, strict=True)])

    def a(self, z: Tensor) -> Tensor:
        """A_b Z_b, summed over slabs."""
        return torch.stack([self.slab.reduce(a @ z_b) for a, z_b in zip(self.mats, z, strict=True)])

    def mm(self, x: Tensor, y: Tensor) -> Tensor:
        """X_b Y_b for small stacked operands (Y R^-1, Q W)."""
        return torch.stack([x_b @ y_b for x_b, y_b in zip(x, y, strict=True)])

    def gram64(self, y: Tensor) -> Tensor:
        """Y_b^T Y_b with exact products, in fp64."""
        return torch.stack([_gram64(y_b) for y_b in y])


def _gram64(y: Tensor) -> Tensor:
    y64 = y.double()
    return y64.mT @ y64


def _cholesky_qr(y: Tensor, products: Products, shift: float = 0.0) -> tuple[Tensor, Tensor]:
    """One batched CholeskyQR pass, Q = Y R^-1 with R^T R = Y^T Y + shift I (Gram in fp64).

    Returns Q and, per member, whether the (shifted) Gram matrix was numerically positive definite and Q
    finite. Failed members get R = I (Q = Y) so that the batch stays well defined; the caller redoes them.
    """
    gram = products.gram64(y)
    if shift:
        gram.diagonal(dim1=-2, dim2=-1).add_(shift)
    chol, info = torch.linalg.cholesky_ex(gram)
    ok = info == 0
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device).expand_as(gram)
    if not bool(ok.all()):
        chol = torch.where(ok[:, None, None], chol, eye)
    # R = chol^T, so R^-1 = (chol^-1)^T = solve(chol, I)^T.
    r_inv = torch.linalg.solve_triangular(chol, eye, upper=False).mT
    q = products.mm(y, r_inv.to(y.dtype))
    return q, ok & torch.isfinite(q).flatten(1).all(dim=1)


def _orthonormalize_hard(y: Tensor, products: Products) -> Tensor:
    """One member (d x k) whose CholeskyQR2 failed: shifted CholeskyQR3 with
    shift = 11 (d k + k (k+1)) u ||Y||_2^2 (Fukaya et al. 2020), then Householder QR. A non-finite Y gives a
    NaN Q, which the refresh turns into its failed-refresh fallback."""
    d, k = y.shape
    if not bool(torch.isfinite(y).all()):
        return torch.full_like(y, float("nan"))
    norm2 = float(torch.linalg.matrix_norm(y.double(), ord=2)) ** 2
    if 0.0 < norm2 < float("inf"):
        shift = 11.0 * (d * k + k * (k + 1)) * torch.finfo(torch.float64).eps * norm2
        q, ok = _cholesky_qr(y[None], products, shift=shift)
        for _ in range(2):
            if not bool(ok.all()):
                break
            q, ok = _cholesky_qr(q, products)
        if bool(ok.all()):
            return q[0]
    q, _ = torch.linalg.qr(y.double())
    return q.float()


def orthonormalize(y: Tensor, products: Products | None = None) -> Tensor:
    """An orthonormal basis of span(Y) for a tall fp32 Y (d x k, d >= k), or of each member of a stacked
    Y (batch, d, k).

    Q = CholeskyQR2(Y): two CholeskyQR passes, each Q <- Y R^{-1} with R^T R = Y^T Y computed in fp64. If
    a Gram matrix is not positive definite (an ill-conditioned power-iterated sketch), that member is
    redone with shifted CholeskyQR3 and, if the sketch is rank deficient even so, Householder QR
    (``torch.linalg.qr``), which always returns orthonormal columns. ``products`` supplies the GEMMs
    (default: torch's).
    """
    single = y.dim() == 2
    y = (y[None] if single else y).float()
    if y.shape[1] < y.shape[2]:
        raise ValueError(f"orthonormalize needs a tall matrix, got {y.shape[1]} x {y.shape[2]}")
    products = products or Products([], [])
    q, ok = _cholesky_qr(y, products)
    q, ok2 = _cholesky_qr(q, products)
    for i, good in enumerate((ok & ok2).tolist()):
        if not good:
            q[i] = _orthonormalize_hard(y[i], products)
    return q[0] if single else q


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
    """Best rank-``rank`` basis of one matrix ``A`` inside span(Q); see ``ritz_bases``."""
    products = Products([a], [0], slab)
    return ritz_bases(products, q[None], rank, products.energy() if total is None else total[None])[0]


def ritz_bases(products: Products, q: Tensor, rank: int, total: Tensor) -> list[Basis]:
    """Best rank-``rank`` basis of each A_b inside span(Q_b): P = Q W[:, :rank], W the top eigenvectors.

    With B = A^T Q (c x k), the eigendecomposition B^T B = W diag(lambda) W^T (fp64, k x k) gives the
    Ritz vectors; sum(lambda[:rank]) = ||P^T A||_F^2 is the captured energy, for free. ``total`` is
    ||A_b||_F^2 (batch,), which the range finder already has.
    """
    evals, evecs = torch.linalg.eigh(products.reduce(products.gram64(products.at(q))))
    order = torch.argsort(evals, dim=-1, descending=True)[:, :rank]
    w = torch.gather(evecs, 2, order[:, None, :].expand(-1, evecs.shape[1], -1)).to(q.dtype)
    p = products.mm(q, w)
    captured = torch.gather(evals, 1, order).clamp_min(0).sum(dim=1)
    # Each basis gets its own storage: state_dict would save a view's whole base.
    return [Basis(p[i].clone(), captured[i].clone(), total[i].clone()) for i in range(p.shape[0])]


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
    """``range_finder`` of one matrix with the reference products."""
    products = Products([a], [seed], slab)
    return range_finder(
        products, rank, oversample=oversample, power_iters=power_iters, start=None if start is None else start[None]
    )[0]


def range_finder(
    products: Products, rank: int, *, oversample: int, power_iters: int, start: Tensor | None = None
) -> list[Basis]:
    """Randomized range finder with subspace (power) iterations and a Rayleigh-Ritz finish, for every A_b.

    Cold: Y = A Omega, Omega a seeded Gaussian (n x k, k = rank + oversample); warm: Y = A A^T orth([start |
    Omega']), Omega' a seeded Gaussian (d x oversample). Then ``power_iters`` (warm: ``power_iters - 1``)
    times Y <- A (A^T orth(Y)); finally Q = orth(Y) and P = Rayleigh-Ritz(A, Q, rank).

    ``start`` (batch, d, r, orthonormal) holds the previous bases: subspace iteration from them ("warm")
    converges from where the last refresh ended instead of from noise, and the extra Gaussian columns let
    directions that were outside the old subspace enter the new one. Every A^T product that feeds another
    product with A is divided by ||A||_F, so a huge finite gradient cannot overflow fp32 (``inverse_norm``).
    The engine supplies the products (``Products``); the algorithm is this one for every engine.
    """
    d, n = products.rows, products.columns
    total = products.energy()  # computed (and, sharded, reduced) once: Rayleigh-Ritz reports it too
    inv_norm = inverse_norm(total)[:, None, None]

    def gram_times(y: Tensor) -> Tensor:
        return products.a(products.at(orthonormalize(y, products)) * inv_norm)

    if start is None:
        k = min(rank + oversample, d, n)
        y = products.sketch(k)
        iterations = power_iters
    else:
        r0 = start.shape[2]
        k = min(r0 + oversample, d)
        y = start.float()
        if k > r0:
            y = torch.cat([y, products.gaussian(d, k - r0)], dim=2)
        y = gram_times(y)
        iterations = max(power_iters - 1, 0)
    for _ in range(iterations):
        y = gram_times(y)
    return ritz_bases(products, orthonormalize(y, products), rank, total)


def random_basis(d: int, rank: int, seed: int, device: torch.device) -> Tensor:
    """A data-independent orthonormal basis: orth(Omega), Omega a seeded d x rank Gaussian."""
    return orthonormalize(gaussian(d, rank, seed, device))
