"""Stochastic rounding of fp32 results into bf16 weights (``stochastic_rounding=True``).

Why: most GaLore-style runs keep bf16 weights with no fp32 master copy, and round-to-nearest drops every update
smaller than half a bf16 ulp of its weight (8 significand bits: an update below ~0.2% of the weight is lost). Late in
a cosine decay most updates are that small. Rounding up with probability equal to the discarded fraction keeps the
expected weight equal to the fp32 result, so small updates survive on average (torchao's ``_AdamW`` and Q-GaLore
round so for the same reason).

How: the fp32 result's bit pattern plus a uniform 16-bit integer, then its low 16 bits cleared. That carries into the
kept bits with probability (discarded bits) / 2^16, for either sign (the pattern is sign and magnitude); an infinity
stays one (its low bits are zero). A value that is already a bf16 number (a skipped matrix's weight) is unchanged
whatever the bits. NaNs as arithmetic makes them (0x7FC00000, 0xFFC00000: torch's, the CPU's and CUDA's) stay NaNs;
only a NaN whose payload is all ones above bit 16 (0x7FFFxxxx, 0xFFFFxxxx: made by hand, never by a step) could carry
into the sign and become a zero. No step writes a NaN (``nonfinite``), so no pass is spent guarding against one.

Random bits: each parameter's come from its own generator seeded with ``rounding_seed(seed, index, step)``, never the
global RNG, so every data-parallel rank draws the same bits and a resumed run continues the same sequence (an FSDP2 row
shard's seed also holds its first row: below). The reference engine draws them with ``torch.randint`` on the weight's
device (fast on a CPU); the Triton step draws them inside its epilogue from Philox at the same seed
(``kernels/step.py``). The two streams differ, so the engines agree in distribution, as their sketches do, not bit for
bit.

An FSDP2 row shard mixes in the global index of its first row. With one seed every shard would repeat the first
shard's bits (row i of each shard rounding alike); with its first row the shards' bits are independent, and a rerun or
a resume at the same world size draws the same ones. At another world size they differ, as the reduce-scatter's fp32
sums already do. Drawing one process's bits and keeping a shard's rows would match one process, but would cost every
rank the whole matrix's draw and a whole-matrix temporary: a CPU's mt19937 cannot skip ahead to a row.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .linalg import sketch_seed

# Mixed into every rounding seed, so that a rounding never draws a sketch's numbers (sketch_seed(seed, index, k)).
_DOMAIN = 0x5352_0B16


def rounding_seed(seed: int, index: int, step: int, first_row: int = 0) -> int:
    """The generator seed of parameter ``index``'s rounding at its ``step``-th update (63 bits); ``first_row``: the
    global index of the first row an FSDP2 shard holds (``distributed.first_row``), so that shards draw independent
    bits (one process, and the first shard, draw with 0)."""
    return sketch_seed(sketch_seed(seed, index, step), _DOMAIN, first_row)


def rounding_bits(shape: torch.Size | tuple[int, ...], seed: int, device: torch.device) -> Tensor:
    """Uniform integers in [0, 2^16) as int32 of ``shape``, from a private generator seeded with ``seed``: full-range
    int64 draws cut into four 16-bit pieces (on a CPU a third of ``torch.randint``'s cost per number)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    count = math.prod(shape)
    words = torch.empty(-(-count // 4), dtype=torch.int64, device=device)
    words.random_(-(1 << 63), (1 << 63) - 1, generator=gen)  # 2^64 - 1 values: uniform but for one, in 2^64
    return words.view(torch.int16)[:count].to(torch.int32).bitwise_and_(0xFFFF).view(tuple(shape))


def round_stochastically(value: Tensor, bits: Tensor) -> Tensor:
    """``value`` (fp32) rounded to bf16 with the random ``bits`` (``rounding_bits``), as an fp32 tensor whose entries
    are bf16 numbers (its cast to bf16 is exact). ``value`` is overwritten."""
    value.view(torch.int32).add_(bits).bitwise_and_(-(1 << 16))
    return value


def store_(target: Tensor, value: Tensor, seed: int) -> None:
    """``target`` (bf16) <- ``value`` (fp32, same shape, overwritten) rounded stochastically with ``seed``'s bits."""
    target.copy_(round_stochastically(value, rounding_bits(value.shape, seed, value.device)))
