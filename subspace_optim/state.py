"""A parameter's optimizer state: how it is created, how its storage follows the group's options, and how
it keeps its dtypes through ``load_state_dict``.

Projected matrices hold ``step``, ``moment_age``, ``refresh_count`` (plain ints), ``basis``, the two
low-rank moments and, with a ``residual``, ``update_norm`` (the limiter's 0-d fp32 scalar); plain
parameters hold torch AdamW's ``step``, ``exp_avg`` and ``exp_avg_sq``. Moments are stored as the
group's ``moments_dtype`` says (``quant``): plain parameters keep torch AdamW's own state (the parameter's
dtype and layout) with ``"float32"``, and with ``"int8"`` when they are too small or not 2-D enough for 8
bits; ``plain_moments_dtype`` stores them otherwise than the projected moments (``"int4"``: 4 bits).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import distributed, factored, quant, refreshing, stored_basis
from .distributed import local

# State keys that keep the dtype they were saved with (their options chose it), whatever the parameter's.
OWN_DTYPE_KEYS = (
    "basis",
    "basis_absmax",
    "basis_index",
    "exp_avg",
    "exp_avg_sq",
    "exp_avg_absmax",
    "exp_avg_sq_absmax",
    "exp_avg_sq_row",
    "exp_avg_sq_col",
    "update_norm",
)
MOMENTS = ("exp_avg", "exp_avg_sq")


def native(p: Tensor, state: dict[str, Any]) -> bool:
    """Whether a plain parameter's moments are torch AdamW's own state: not 8-bit, not factored, in the parameter's
    dtype."""
    return "exp_avg_absmax" not in state and "exp_avg_sq" in state and state["exp_avg"].dtype == p.dtype


def factors(p: Tensor, group: dict[str, Any], projected: bool) -> bool:
    """Whether the group's options factor this parameter's second moment: every projected matrix
    (``second_moment``), and plain parameters (``plain_second_moment``, else ``second_moment``) of 2 dimensions or
    more (viewed as rows x the rest; 2-D when row-sharded) with both sides above 1."""
    if projected:
        return group["second_moment"] == "factored"
    if (group.get("plain_second_moment") or group["second_moment"]) != "factored":
        return False
    # A row-sharded plain parameter is factored when 2-D (FSDP2's dim-0 shards: its column sums are all-reduced).
    matrix = p.dim() == 2 or (p.dim() > 2 and not distributed.is_dtensor(p))
    return matrix and min(refreshing.matrix_shape(p)) > 1


def plain_kind(p: Tensor, group: dict[str, Any]) -> str | None:
    """How a plain parameter's moments are stored (``plain_moments_dtype``, else ``moments_dtype``): None for torch
    AdamW's own state (the parameter's dtype), else a ``quant`` kind. int8 needs a 2-D (>= 2-D unsharded) tensor of
    at least ``quant.MIN_QUANTIZED_NUMEL`` elements (smaller ones are not worth 8 bits, bitsandbytes' rule); int4
    also an even number of columns in exactly 2 dimensions (``quant.fits_4bit``), else it is int8 by that rule."""
    kind = group.get("plain_moments_dtype") or group["moments_dtype"]
    if kind == "int4" and not quant.fits_4bit(p):
        kind = "int8"
    if kind == "int8":
        enough = p.dim() == 2 or (p.dim() > 2 and not distributed.is_dtensor(p))
        kind = kind if enough and quant.quantizable(p) else "float32"
    return None if kind == "float32" or p.dtype == quant.TORCH_DTYPES.get(kind) else kind


def _moment(p: Tensor, shape: tuple[int, ...], kind: str | None, key: str, projected: bool) -> dict[str, Tensor]:
    """Zero state for moment ``key``: this rank's ``shape`` stored as ``kind`` (None: torch AdamW's own).
    A row-sharded weight's moments (and 8-bit scales) are DTensors sharded on rows like the weight."""
    if kind is None:
        return {key: torch.zeros_like(p, memory_format=torch.preserve_format)}
    if distributed.is_dtensor(p) and not projected and kind not in quant.QUANTIZED:
        return {key: torch.zeros_like(p, dtype=quant.TORCH_DTYPES[kind])}  # sharded like p, any rank
    entries = quant.zeros(shape, kind, local(p).device, key)
    if not distributed.is_dtensor(p):
        return entries
    return {k: distributed.sharded_like(p, v, v.shape[1]) for k, v in entries.items()}


def initial(p: Tensor, group: dict[str, Any], name: str) -> dict[str, Any]:
    """A parameter's state before its first step, built whole before the optimizer keeps any of it."""
    if distributed.is_dtensor(p):
        distributed.row_shard(p, name)  # a clear error for layouts other than FSDP2's dim-0 sharding
    if not refreshing.projects(p, group):
        kind = plain_kind(p, group)
        state: dict[str, Any] = {"step": torch.tensor(0.0, dtype=torch.float32)}
        state.update(_moment(p, tuple(local(p).shape), kind, "exp_avg", projected=False))
        if factors(p, group, projected=False):
            state.update(_factors(p, (local(p).shape[0], refreshing.matrix_shape(p)[1]), None))
        else:
            state.update(_moment(p, tuple(local(p).shape), kind, "exp_avg_sq", projected=False))
        _place_step(p, group, state)
        return state
    # Counters are plain ints and the side is derived from (proj_type, shape), never stored: state is
    # tensors and numbers only, which is what torch.load(weights_only=True) and DCP accept.
    state = {"step": 0, "moment_age": 0, "refresh_count": 0}
    rank = group["rank"]
    m, n = refreshing.matrix_shape(p)
    if distributed.is_dtensor(p):  # right projection: m x r moments, sharded on rows like the weight
        shape = (distributed.row_shard(p, name).rows, rank)
    else:
        shape = (rank, n) if refreshing.side(p, group) == "left" else (m, rank)
    state.update(_moment(p, shape, group["moments_dtype"], "exp_avg", projected=True))
    if factors(p, group, projected=True):
        state.update(_factors(p, shape, refreshing.side(p, group)))
    else:
        state.update(_moment(p, shape, group["moments_dtype"], "exp_avg_sq", projected=True))
    _residual_state(p, group, state)
    # "basis" is created by the first refresh (d x rank, d = basis_dim(side, m, n)).
    return state


def _factors(p: Tensor, shape: tuple[int, int], side: str | None) -> dict[str, Tensor]:
    """Zero factors of a (rows, cols) second moment (``factored``; rows: this rank's), fp32 on the weight's (local)
    device. On a row-sharded weight (projected on the right, or plain: rows are the weight's) the row factor is
    sharded like it and the column factor is replicated (every rank holds the same sums over all rows)."""
    entries = factored.zeros(*shape, local(p).device)
    if not distributed.is_dtensor(p):
        return entries
    del side  # a row-sharded weight always projects on the right (a plain one has no side)
    return {
        "exp_avg_sq_row": distributed.sharded_vector_like(p, entries["exp_avg_sq_row"]),
        "exp_avg_sq_col": distributed.replicated_like(p, entries["exp_avg_sq_col"]),
    }


def _residual_state(p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
    """A projected matrix with a residual keeps its limiter's previous update norm: one fp32 scalar (0: no
    step yet), on the weight's (local) device. Created when the group first asks for a residual."""
    if group["residual"] != "none" and "update_norm" not in state:
        state["update_norm"] = torch.zeros((), dtype=torch.float32, device=local(p).device)


def _wanted(p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> tuple[str, str | None]:
    """The moment kind and basis storage (``basis_dtype``) the group's options ask for."""
    if "refresh_count" in state:
        return group["moments_dtype"], group["basis_dtype"]
    kind = plain_kind(p, group)
    return (quant.KIND_OF[p.dtype] if kind is None else kind), None


def mismatched(p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> bool:
    """Whether loaded state is stored otherwise than the group's options ask (``conform`` converts it)."""
    kind, basis = _wanted(p, group, state)
    wrong_basis = basis is not None and "basis" in state and stored_basis.kind(state) != basis
    wrong_second = factors(p, group, "refresh_count" in state) != (factored.KEYS[0] in state)
    return quant.stored_kind(state, "exp_avg") != kind or wrong_basis or wrong_second


def _place_step(p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
    """A plain parameter's step count where torch's AdamW keeps it: on the parameter's device for the fused
    kernel (``fused=True``, torch AdamW's own state), on the CPU otherwise (the per-tensor and foreach paths
    read it on the host). Moved when the option changes or a checkpoint put it elsewhere."""
    fused = bool(group.get("fused")) and native(p, state)
    want = local(p).device if fused else torch.device("cpu")
    if state["step"].device != want:
        state["step"] = state["step"].to(want)


def conform(p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
    """Convert state saved with other ``moments_dtype`` / ``basis_dtype`` options to the group's, through
    fp32 (a documented conversion; ``checks`` refuses it for FSDP2 shards before anything changes), give a
    projected matrix the residual's state when its group has turned a residual on, and put a plain
    parameter's step count where ``fused`` wants it (``_place_step``)."""
    if "refresh_count" in state:
        _residual_state(p, group, state)
    if mismatched(p, group, state):
        _convert(p, group, state)
    if "refresh_count" not in state:
        _place_step(p, group, state)


def _convert(p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
    kind, basis = _wanted(p, group, state)
    quant.convert(state, "exp_avg", kind)
    projected = "refresh_count" in state
    side = refreshing.side(p, group) if projected else None
    if factors(p, group, projected) and factored.KEYS[0] not in state:  # V -> its row and column sums
        full = quant.load(state, "exp_avg_sq")
        state.update(factored.from_full(quant.as_matrix(full)))  # a plain N-D V: rows x the rest
        state.pop("exp_avg_sq")
        state.pop("exp_avg_sq_absmax", None)
    elif not factors(p, group, projected) and factored.KEYS[0] in state:  # the V the factors stand for
        full = factored.expand(factored.Factored(*(state.pop(k) for k in factored.KEYS)), side)
        state["exp_avg_sq"] = full if projected else full.reshape(local(p).shape)  # a plain N-D V: its own shape
        quant.convert(state, "exp_avg_sq", kind)
    else:
        if factored.KEYS[0] not in state:
            quant.convert(state, "exp_avg_sq", kind)
    if basis is not None:
        stored_basis.convert(state, basis)


def restore_dtypes(optimizer: Optimizer, state_dict: dict[str, Any]) -> None:
    """Projected state, and plain moments that are not torch AdamW's own (8-bit, or another dtype than the
    parameter's), keep their saved dtypes: torch's loader cast every floating tensor to the parameter's."""
    saved = state_dict["state"]
    for saved_group, group in zip(state_dict["param_groups"], optimizer.param_groups, strict=True):
        for pid, p in zip(saved_group["params"], group["params"], strict=True):
            entry = saved.get(pid)
            if entry is None:
                continue
            if "refresh_count" not in entry and "exp_avg" in entry and native(p, entry):
                continue
            for key in OWN_DTYPE_KEYS:
                if key in entry:
                    optimizer.state[p][key] = entry[key].to(device=p.device, dtype=entry[key].dtype, copy=True)
