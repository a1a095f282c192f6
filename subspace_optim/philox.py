"""Triton's Philox4x32-10 in torch, bit for bit, and the random-sign projections drawn from it.

Why a second implementation of a generator: a seeded projection (``refresh="seeded"``) is regenerated at every step,
so it must be the same matrix wherever that happens: the reference engine on CPU or CUDA, the Triton step inside its
GEMM tiles, every data-parallel rank, a resumed run. torch's generators differ by device (mt19937 on CPU, Philox with
its own offsets on CUDA) and none can be evaluated inside a kernel. A counter-based generator can: entry o of a
projection is a pure function of (seed, o). Triton's ``tl.randint4x`` is the one the kernels have, so this module
reproduces its integers exactly (tested against the kernel under the interpreter).

Why signs, not Gaussians: each entry is +-1/sqrt(r), one bit of Philox output. A random-sign matrix preserves norms
as a Gaussian one does (E[P^T P] = (d/r) I, with lighter tails: Achlioptas, "Database-friendly random projections",
2003), its entries are exact (no log, sqrt or cos whose last bits differ between libm and a GPU), so every engine and
device draws the very same bits, and it is cheap: 128 entries per Philox evaluation, about 4x faster than
``torch.randn`` on CPU (``scripts/bench/regenerated.py``). apollo-torch's Gaussian stays available for exact APOLLO
parity (``seed_stream="apollo"``, ``projections``).

Layout: entry (i, j) of the d x r projection is o = i r + j; it takes bit (o mod 32) of word ((o >> 5) mod 4) of
Philox(seed, counter o >> 7), and is -1/sqrt(r) where that bit is set.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF
# Philox4x32's Weyl key increments and round multipliers (Salmon et al., SC'11; triton.language.random).
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
ROUNDS = 10
ENTRIES_PER_COUNTER = 128  # four 32-bit words
MAX_ENTRIES = ENTRIES_PER_COUNTER << 31  # Triton's counters are int32


def randint4x(seeds: Tensor, counters: Tensor) -> Tensor:
    """Philox4x32-10 of each counter under each seed: ``tl.randint4x(seed, counter)`` for int32 counters, as int64
    values in [0, 2^32), stacked on a new last axis of 4. ``seeds`` (int64, below 2^63) and ``counters`` (int64,
    in [0, 2^31)) broadcast. uint32 arithmetic runs in int64: a product of two 32-bit numbers wraps modulo 2^64,
    which leaves its high word, bits 32-63, exact after the mask."""
    k0, k1 = seeds & _M32, (seeds >> 32) & _M32
    c0 = counters.expand(torch.broadcast_shapes(seeds.shape, counters.shape)) & _M32
    c1 = c2 = c3 = torch.zeros_like(c0)
    for _ in range(ROUNDS):
        pa, pb = c0 * _ROUND_A, c2 * _ROUND_B
        c0, c2 = ((pb >> 32) & _M32) ^ c1 ^ k0, ((pa >> 32) & _M32) ^ c3 ^ k1
        c1, c3 = pb & _M32, pa & _M32
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return torch.stack((c0, c1, c2, c3), dim=-1)


def scale_of(rank: int) -> float:
    """1/sqrt(r) as the fp32 every engine multiplies by (the kernels take it as an fp32 argument)."""
    return struct.unpack("<f", struct.pack("<f", 1.0 / math.sqrt(rank)))[0]


def padded_entries(d: int, rank: int) -> int:
    """The int32 words ``signs`` writes per projection: d x r rounded up to whole Philox calls."""
    return -(-d * rank // ENTRIES_PER_COUNTER) * ENTRIES_PER_COUNTER


def signs(
    seeds: Sequence[int], d: int, rank: int, device: torch.device | str = "cpu", out: Tensor | None = None
) -> Tensor:
    """The (len(seeds), d, r) fp32 random-sign projections of ``seeds``: entries exactly +-``scale_of(r)``.

    The sign bit is written straight into the fp32 bit pattern of 1/sqrt(r): three integer passes over the
    entries after one Philox evaluation per 128 of them. ``out``: an int32 workspace of len(seeds) x
    ``padded_entries(d, rank)`` words to write into (the result is a view of it) instead of a fresh allocation."""
    n = d * rank
    if n > MAX_ENTRIES:
        raise ValueError(f"a {d} x {rank} projection has more than {MAX_ENTRIES} entries (Triton's int32 counters)")
    counters = torch.arange(-(-n // ENTRIES_PER_COUNTER), dtype=torch.int64, device=device)
    seed_column = torch.tensor(list(seeds), dtype=torch.int64, device=device).unsqueeze(1)
    words = randint4x(seed_column, counters).to(torch.int32)  # (b, counters, 4); wraps to the same 32 bits
    shifts = torch.arange(31, -1, -1, dtype=torch.int32, device=device)  # entry k of a word: bit k to the sign
    if out is None:
        bits = words.unsqueeze(-1) << shifts
    else:
        bits = torch.bitwise_left_shift(words.unsqueeze(-1), shifts, out=out.view(*words.shape, 32))
    scale_bits = struct.unpack("<i", struct.pack("<f", scale_of(rank)))[0]
    bits.bitwise_and_(-(1 << 31)).bitwise_or_(scale_bits)
    return bits.view(len(seeds), -1)[:, :n].view(torch.float32).reshape(len(seeds), d, rank)


def sign_projection(seed: int, d: int, rank: int, device: torch.device | str = "cpu") -> Tensor:
    """One d x r random-sign projection (``signs``)."""
    return signs([seed], d, rank, device)[0]
