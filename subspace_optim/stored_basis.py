"""A stored basis (``basis_dtype``): fp32, bf16, or 8-bit codes with a scale per block.

The basis P (d x r, orthonormal columns) of a ``warm``/``rsvd``/``svd``/``random`` refresh is kept in the state under
``"basis"``. fp32 and bf16 are the tensor itself. ``"int8"`` stores it in the 8-bit blockwise format of the moments
(``quant``: uint8 codes of the signed dynamic map, an fp32 absmax per 256 entries of a row, under ``"basis_absmax"``),
a quarter of fp32 and half of bf16: d r + 4 d ceil(r / 256) bytes. Q-GaLore keeps its projections in INT4 for the
same reason (Zhang et al., 2024); at LLaMA-1B rank 512 the bf16 bases are 336 MiB of the 759 MiB that int8 moments
and a factored second moment leave, and 8-bit codes halve them.

An 8-bit basis is never read as numbers by an engine: a step materializes it to fp32 (``load``) in the chunks a
regenerated projection takes (``projections``), and a refresh dequantizes the previous basis for its warm start and
the moments' rotation, then quantizes the new one in place (``store_``). Its error (at most half a code step of the
block's absmax, ~0.7% of it) leaves the columns orthonormal to ~1e-2, the accuracy a rank-r sketch refresh already
has; the rotation of the moments uses the dequantized bases, so they stay expressed in the projection steps use.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from . import quant
from .distributed import local

KEY, ABSMAX = "basis", "basis_absmax"


def kind(state: dict[str, Any]) -> str:
    """How a state's basis is stored: ``"int8"`` or its float dtype's name."""
    return "int8" if ABSMAX in state else quant.KIND_OF[state[KEY].dtype]


def load(state: dict[str, Any]) -> Tensor:
    """The rank-local basis as the engines take it: the stored float tensor itself, or the fp32 values of 8-bit
    codes (a fresh tensor)."""
    if ABSMAX not in state:
        return local(state[KEY])
    return quant.dequantize(local(state[KEY]), local(state[ABSMAX]), signed=True)


def entries(basis: Tensor, stored_as: str) -> dict[str, Tensor]:
    """A new basis as the state entries that store it as ``stored_as`` (contiguous)."""
    if stored_as != "int8":
        return {KEY: basis.to(quant.TORCH_DTYPES[stored_as]).contiguous()}
    codes, absmax = quant.quantize(basis, signed=True)
    return {KEY: codes, ABSMAX: absmax}


def replace(state: dict[str, Any], basis: Tensor) -> tuple[Tensor, Tensor]:
    """Store a refresh's new ``basis`` over the stored one; returns (previous, new) as the moments' rotation takes them
    (fp32). An 8-bit basis gives its dequantized codes before and after (the projections steps read), quantized
    once; a float basis its stored values (copied before they are overwritten) and the new basis as computed (its
    bf16 rounding left out, as it always was)."""
    previous = load(state).float()
    if ABSMAX not in state:
        previous = previous.clone() if previous is local(state[KEY]) else previous
        store_(state, basis)
        return previous, basis.float()
    store_(state, basis)
    return previous, load(state)


def store_(state: dict[str, Any], basis: Tensor) -> None:
    """Write ``basis`` over the stored one, in place, in its storage (a refresh after the first)."""
    if ABSMAX not in state:
        local(state[KEY]).copy_(basis)
        return
    quant.quantize(basis, True, local(state[KEY]), local(state[ABSMAX]))


def convert(state: dict[str, Any], stored_as: str) -> None:
    """Re-store a loaded basis as ``stored_as`` (a checkpoint saved with another ``basis_dtype``), through fp32."""
    if KEY not in state or kind(state) == stored_as:
        return
    value = load(state).float()
    state.pop(ABSMAX, None)
    state.update(entries(value, stored_as))


__all__ = ["ABSMAX", "KEY", "replace", "convert", "entries", "kind", "load", "store_"]
