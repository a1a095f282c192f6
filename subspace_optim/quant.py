"""Low-precision optimizer state: bf16 tensors, and 8-bit blockwise dynamic quantization.

The 8-bit format is bitsandbytes' (Dettmers et al., "8-bit Optimizers via Block-wise Quantization", 2022):
each block of values is scaled by its absolute maximum into [-1, 1] and stored as the index of the
nearest of 256 values of a *dynamic* map, whose values are spread over seven decades (fine near zero,
coarse near one). Adam's first moment uses the signed map, the second moment (never negative) the
unsigned one, which spends its 256 values on [0, 1]. The maps are bitsandbytes' own, value for value
(``tests/test_quant.py`` checks them against ``bitsandbytes.functional.create_dynamic_map``), so the
quantized numbers are directly comparable with its 8-bit optimizers.

Layout. A 2-D tensor (rows x cols) is quantized in blocks of ``BLOCK`` = 256 consecutive values *within a
row* (a row shorter than 256 is one block), with ``absmax`` of shape (rows, ceil(cols / 256)). When cols
is a multiple of 256, or below 256, this is exactly bitsandbytes' blocking of the flattened tensor (block
size 256, or cols); keeping blocks inside rows is what lets a row-sharded (FSDP2) moment and its absmax be
sharded alike, each rank quantizing its own rows.

In the optimizer state, a moment stored as ``int8`` is two entries: ``key`` (uint8 codes, the moment's
shape) and ``key + "_absmax"`` (fp32). Outside the state a moment travels as one ``Moment`` record (values,
and the absmax of 8-bit codes), so no signature carries absmax lists beside the moments. ``load_moment``
gives a working fp32 copy of any stored moment and ``store_moment`` writes one back (rounding to bf16, or
requantizing): every engine and the moment transport read and write state through these two functions,
which work on values, never on (values, absmax) pairs.

4-bit (``int4``, plain parameters only: ``plain_moments_dtype``). Half the bytes of 8-bit, for the embedding and
the output head, whose full second moment the factored one cannot replace without a loss (docs/benchmarks.md,
"Factored second moment: the floor") and whose 8-bit moments are most of a small model's state. The format follows
Li et al. ("Memory Efficient Optimizers with 4-bit States", 2023): blocks of ``BLOCK4`` = 128 values within a row
(smaller than 8-bit's, as they find 4 bits need), and for the second moment a linear map *without zero*: its 16
values are 1/16 ... 16/16 of the block's maximum, so no element's V is ever rounded to 0 (which would turn its
next step into M / eps). That map and the codes it gives are torchao's (``torchao.optim.AdamW4bit``), value for
value where a row's length is a multiple of 128 (``tests/test_int4_moments.py``). The first moment's map is ours:
0 and seven magnitudes a side, 0.02, 0.06, 0.12, 0.25, 0.45, 0.7 and 1, closer together between 0.05 and 0.5 of a
block's maximum, where most of a block's values lie, than torchao's (the dynamic map with 3 exponent bits: nothing
between 0.0775 and 0.2125). On Gaussian blocks of 128 its error is 14% of the values' norm against torchao's 15%,
and the `balanced` preset trained better with it at both built-in sizes (docs/benchmarks.md, "Where the factored
cost sits"). torchao blocks the flattened tensor, we block within rows, as for 8 bits. Two codes share a byte (the
even column in the high nibble, as torchao packs them); the packed bytes are stored as ``torch.int8``, so a state
says its format by dtype alone (uint8: 8-bit codes, int8: pairs of 4-bit codes), under the same
``key + "_absmax"`` scales entry.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

BLOCK = 256
BLOCK4 = 128
MOMENT_DTYPES = ("float32", "bfloat16", "int8")
# Plain parameters' storage may also be 4-bit (``plain_moments_dtype``); the projected moments' kernels read 8 bits.
PLAIN_MOMENT_DTYPES = (*MOMENT_DTYPES, "int4")
QUANTIZED = ("int8", "int4")
BASIS_DTYPES = ("float32", "bfloat16", "int8")
# The dtype a stored basis reaches a step launch in, per ``basis_dtype``: an 8-bit one (``stored_basis``) is
# materialized to fp32 first.
KERNEL_BASIS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.float32}
# Plain-AdamW parameters with fewer elements keep fp32 moments, as bitsandbytes' 8-bit optimizers do
# (their min_8bit_size): norms and biases are too small for the saving to matter.
MIN_QUANTIZED_NUMEL = 4096
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The name of a stored float dtype; float64 only as torch AdamW's own state of an fp64 plain parameter.
KIND_OF = {**{dtype: kind for kind, dtype in TORCH_DTYPES.items()}, torch.float64: "float64"}


def dynamic_map(signed: bool, device: torch.device | str = "cpu") -> Tensor:
    """The 256 sorted values of the dynamic quantization map (bitsandbytes' ``create_dynamic_map`` with 7
    exponent bits). Decade e = 0..6 contributes the midpoints of 2^e + 1 (signed; 2^(e+1) + 1 unsigned)
    evenly spaced points on [0.1, 1], scaled by 10^(e - 6), with their negatives when signed; then 0 and
    1. All arithmetic in fp32, as in bitsandbytes, so the values agree bit for bit."""
    return _dynamic_map(signed).to(device)


@functools.lru_cache(maxsize=2)
def _dynamic_map(signed: bool) -> Tensor:
    values: list[float] = []
    for e in range(7):
        points = torch.linspace(0.1, 1, (2**e if signed else 2 ** (e + 1)) + 1, dtype=torch.float32)
        mids = (10 ** (e - 6)) * ((points[:-1] + points[1:]) / 2.0)
        values += mids.tolist()
        if signed:
            values += (-mids).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


@functools.lru_cache(maxsize=4)
def _midpoints(signed: bool, device: str) -> Tensor:
    code = _dynamic_map(signed).to(device)
    return (code[1:] + code[:-1]) / 2


def num_blocks(cols: int, block: int = BLOCK) -> int:
    return -(-cols // block)


def _blocked(x: Tensor, size: int = BLOCK) -> Tensor:
    """x (rows, cols) as (rows, blocks, block) with zero padding; a view when nothing needs padding."""
    rows, cols = x.shape
    block = min(size, max(cols, 1))
    nb = -(-cols // block)
    if nb * block != cols:
        x = torch.nn.functional.pad(x, (0, nb * block - cols))
    return x.reshape(rows, nb, block)


def _unblocked(blocks: Tensor, cols: int) -> Tensor:
    rows, nb, block = blocks.shape
    return blocks.reshape(rows, nb * block)[:, :cols]


def quantize(
    x: Tensor, signed: bool, codes: Tensor | None = None, absmax: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Blockwise 8-bit quantization of a 2-D ``x``: (uint8 codes, fp32 absmax), written into ``codes`` and
    ``absmax`` when given. Each value becomes the index of the nearest map value to x / absmax (ties to the
    smaller); an all-zero block has absmax 0 and the code of 0."""
    index, scale = _nearest_codes(x, _midpoints(signed, str(x.device)), BLOCK)
    return _written(index, scale, codes, absmax)


def _nearest_codes(x: Tensor, midpoints: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Per value of a 2-D ``x`` the index (uint8, x's shape) of the nearest map value to x / its block's absmax,
    given the map's ``midpoints`` (ties to the smaller), and the fp32 absmax per ``block`` values of a row."""
    cols = x.shape[1]
    blocks = _blocked(x.float(), block)
    scale = blocks.abs().amax(dim=-1, keepdim=True)
    normed = blocks / torch.where(scale > 0, scale, torch.ones_like(scale))
    return _unblocked(torch.bucketize(normed, midpoints), cols).to(torch.uint8), scale.squeeze(-1)


def _written(new_codes: Tensor, scale: Tensor, codes: Tensor | None, absmax: Tensor | None) -> tuple[Tensor, Tensor]:
    """(codes, absmax): the new ones, or copied into the given tensors."""
    if codes is None:
        return new_codes, scale
    codes.copy_(new_codes)
    absmax.copy_(scale)  # type: ignore[union-attr]
    return codes, absmax


def dequantize(codes: Tensor, absmax: Tensor, signed: bool) -> Tensor:
    """The fp32 values of 8-bit ``codes`` (rows, cols) with their per-block ``absmax``: map[code] * absmax."""
    values = dynamic_map(signed, codes.device)[codes.long()]
    return _unblocked(_blocked(values) * absmax[..., None], codes.shape[1])


@functools.lru_cache(maxsize=2)
def _map4(signed: bool) -> Tensor:
    """The 16 sorted values of a 4-bit map (module docstring): 1/16 ... 16/16 (no zero) for the second moment; for
    the first, 0 and seven magnitudes a side (its 16th value repeats 1.0 and is never written: ``bucketize`` gives
    a tie the lower index)."""
    if not signed:
        return torch.linspace(0, 1, 17, dtype=torch.float32)[1:]
    magnitudes = [0.02, 0.06, 0.12, 0.25, 0.45, 0.7, 1.0]
    return torch.tensor(sorted([-m for m in magnitudes] + [0.0] + magnitudes + [1.0]), dtype=torch.float32)


def map4(signed: bool, device: torch.device | str = "cpu") -> Tensor:
    """``_map4`` on ``device``."""
    return _map4(signed).to(device)


@functools.lru_cache(maxsize=4)
def _midpoints4(signed: bool, device: str) -> Tensor:
    code = map4(signed, device)
    return (code[1:] + code[:-1]) / 2


def fits_4bit(t: Tensor) -> bool:
    """Whether a moment of ``t``'s shape can be stored in 4 bits: 2-D with an even number of columns (two codes a
    byte, the codes' shape then giving the moment's), and ``quantizable``."""
    return t.dim() == 2 and t.shape[1] % 2 == 0 and quantizable(t)


def quantize4(
    x: Tensor, signed: bool, codes: Tensor | None = None, absmax: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Blockwise 4-bit quantization of a 2-D ``x`` with an even number of columns: (int8 bytes of code pairs,
    (rows, cols / 2); fp32 absmax per ``BLOCK4`` values of a row), written into ``codes`` and ``absmax`` when given.
    Each value becomes the nearest of ``map4``'s values to x / absmax (ties to the smaller); an all-zero block has
    absmax 0 (its values are then 0 whatever the codes)."""
    index, scale = _nearest_codes(x, _midpoints4(signed, str(x.device)), BLOCK4)
    packed = ((index[:, 0::2] << 4) | index[:, 1::2]).view(torch.int8)  # torchao's order: the even code high
    return _written(packed, scale, codes, absmax)


def dequantize4(codes: Tensor, absmax: Tensor, signed: bool) -> Tensor:
    """The fp32 values (rows, 2 x codes' columns) of packed 4-bit ``codes`` with their per-block ``absmax``."""
    raw = codes.view(torch.uint8)
    index = torch.stack((raw >> 4, raw & 15), dim=-1).reshape(raw.shape[0], 2 * raw.shape[1])
    values = map4(signed, codes.device)[index.long()]
    return _unblocked(_blocked(values, BLOCK4) * absmax[..., None], index.shape[1])


def as_matrix(t: Tensor) -> Tensor:
    """The 2-D view quantization works on: (shape[0], rest); a 1-D tensor is one row. Sizes are explicit,
    so an empty FSDP shard (0 rows) is a 0 x rest matrix."""
    if t.dim() < 2:
        return t.reshape(1, t.numel())
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))


def quantizable(t: Tensor) -> bool:
    return t.numel() >= MIN_QUANTIZED_NUMEL


def zeros(shape: tuple[int, ...], kind: str, device: torch.device, key: str) -> dict[str, Tensor]:
    """Fresh zero state for moment ``key`` stored as ``kind``: {key: values} (+ {key_absmax} for 8 and 4 bits;
    4-bit codes are (rows, cols / 2) bytes of a 2-D moment, ``fits_4bit``)."""
    if kind not in QUANTIZED:
        return {key: torch.zeros(shape, dtype=TORCH_DTYPES[kind], device=device)}
    rows, cols = as_matrix(torch.empty(shape, device="meta")).shape
    if kind == "int4":
        if len(shape) != 2 or cols % 2:
            raise ValueError(f"4-bit moments need a 2-D shape with an even number of columns, got {shape}")
        return {
            key: torch.zeros(rows, cols // 2, dtype=torch.int8, device=device),  # absmax 0: every value is 0
            key + "_absmax": torch.zeros(rows, num_blocks(cols, BLOCK4), dtype=torch.float32, device=device),
        }
    zero = int(torch.searchsorted(_dynamic_map(key == "exp_avg"), torch.tensor(0.0)))
    return {
        key: torch.full(shape, zero, dtype=torch.uint8, device=device),
        key + "_absmax": torch.zeros(rows, num_blocks(cols), dtype=torch.float32, device=device),
    }


class Moment(NamedTuple):
    """One stored moment on its way to an engine: ``values`` (fp32 or bf16; uint8 codes for 8-bit storage, int8
    bytes of code pairs for 4-bit) and, for codes only, their fp32 ``absmax`` per block. Which map the codes index
    is the moment's role, not part of the record: Adam's first moment (``exp_avg``) uses the signed map, the second
    the unsigned one."""

    values: Tensor
    absmax: Tensor | None = None

    @property
    def kind(self) -> str:
        """How the moment is stored: "int8" (uint8 codes), "int4" (int8 bytes of code pairs), or its float dtype's
        name (``KIND_OF``)."""
        if self.absmax is None:
            return KIND_OF[self.values.dtype]
        return "int4" if self.values.dtype == torch.int8 else "int8"

    def local(self, view: Any) -> Moment:
        """The record with ``view`` applied to each tensor (e.g. a DTensor's rank-local shard)."""
        return Moment(view(self.values), None if self.absmax is None else view(self.absmax))


def parts(moment: Tensor | Moment) -> tuple[Tensor, Tensor | None]:
    """(values, absmax) of a moment given as a record or as a bare float tensor (no absmax), with no record made."""
    return moment if type(moment) is Moment else (moment, None)


def as_moment(moment: Tensor | Moment) -> Moment:
    """A moment given as a record, or as a bare float tensor (a moment without an absmax)."""
    return moment if isinstance(moment, Moment) else Moment(moment)


def moment(state: dict[str, Any], key: str) -> Moment:
    """Moment ``key`` of an optimizer state as a record (its ``key + "_absmax"`` entry, if any, included)."""
    return Moment(state[key], state.get(key + "_absmax"))


def stored_kind(state: dict[str, Any], key: str) -> str:
    """How moment ``key`` is stored in ``state``: "int8", "int4", or its float dtype's name ("float32", "bfloat16",
    "float16": the last only as torch AdamW's own state of an fp16 weight)."""
    return moment(state, key).kind


def _refuse_codes_without_absmax(values: Tensor) -> None:
    """8-bit codes (or any dtype that is not a float storage) given without their absmax: a TypeError, as the
    kernels raise (``kernels._common.moment_kind``), instead of reading the codes as numbers."""
    if values.dtype not in KIND_OF:
        raise TypeError(
            "moments must be fp32, bf16, or uint8 codes with an absmax (a quant.Moment(codes, absmax)); got "
            f"{values.dtype} without an absmax"
        )


def load_moment(moment: Tensor | Moment, signed: bool) -> Tensor:
    """A working fp32 copy of a stored moment, a record or a bare float tensor (the stored tensor itself when it
    is fp32). ``signed``: the first moment's map (8-bit codes only)."""
    values, absmax = parts(moment)
    if absmax is not None and values.dtype == torch.int8:  # 2-D by construction (``fits_4bit``)
        return dequantize4(values, absmax, signed)
    if absmax is not None:
        return dequantize(as_matrix(values), absmax, signed).reshape(values.shape)
    _refuse_codes_without_absmax(values)
    return values if values.dtype == torch.float32 else values.float()


def store_moment(moment: Tensor | Moment, signed: bool, value: Tensor) -> None:
    """Write an fp32 working copy back into a stored moment (nothing to do when it is the stored tensor)."""
    target, absmax = parts(moment)
    if value is target:
        return
    if absmax is not None and target.dtype == torch.int8:
        quantize4(value.reshape(target.shape[0], 2 * target.shape[1]), signed, target, absmax)  # 0 rows too
        return
    if absmax is not None:
        quantize(as_matrix(value), signed, as_matrix(target), absmax)
        return
    _refuse_codes_without_absmax(target)
    target.copy_(value)


def load(state: dict[str, Any], key: str) -> Tensor:
    """``load_moment`` of moment ``key`` of an optimizer state."""
    return load_moment(moment(state, key), key == "exp_avg")


def store(state: dict[str, Any], key: str, value: Tensor) -> None:
    """``store_moment`` into moment ``key`` of an optimizer state."""
    store_moment(moment(state, key), key == "exp_avg", value)


def convert(state: dict[str, Any], key: str, kind: str) -> None:
    """Re-store moment ``key`` as ``kind`` (a checkpoint saved with another moments_dtype): through fp32."""
    if stored_kind(state, key) == kind:
        return
    value = load(state, key).clone()
    state.pop(key + "_absmax", None)
    state.update(zeros(tuple(value.shape), kind, value.device, key))
    store(state, key, value)
