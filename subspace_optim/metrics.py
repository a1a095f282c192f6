"""What the optimizer reports: state bytes (any torch optimizer) and per-matrix refresh metrics."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from .distributed import local


def state_bytes(optimizer: Optimizer) -> int:
    """Bytes this rank holds in an optimizer's state tensors (any torch optimizer; DTensors count locally)."""
    return sum(_tensor_bytes(s) for s in optimizer.state.values())


def _tensor_bytes(state: dict[str, Any]) -> int:
    return sum(local(v).numel() * v.element_size() for v in state.values() if isinstance(v, Tensor))


def _entry(state: dict[str, Any], side: str, nbytes: int, info: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "rank": state["exp_avg"].shape[0 if side == "left" else 1],
        "side": side,
        "step": state["step"],
        "refresh_count": state["refresh_count"],
        "state_bytes": nbytes,
        "refresh_time_s": info.get("refresh_time_s"),
        "captured_energy": None,
        "overlap": None,
        "computed_here": info.get("computed_here"),
    }
    if info:
        t, c = float(info["total"]), float(info["captured"])
        entry["captured_energy"] = c / t if t > 0 else None
        entry["overlap"] = None if info["overlap"] is None else float(info["overlap"])
    return entry


def subspace_metrics(
    matrices: Iterable[tuple[int, str, dict[str, Any], str | None]],
    metrics: dict[int, dict[str, Any]],
    nonfinite_skips: int,
) -> dict[str, Any]:
    """Per projected parameter and overall (see ``SubspaceAdamW.subspace_metrics``). ``matrices`` yields
    (index, name, state, side) for every parameter with state; side is None for plain AdamW ones."""
    per_param: dict[str, dict[str, Any]] = {}
    total_bytes = 0
    total_time = captured = total = 0.0
    for index, name, state, side in matrices:
        nbytes = _tensor_bytes(state)
        total_bytes += nbytes
        if side is None:
            continue
        info = metrics.get(index, {})
        per_param[name] = _entry(state, side, nbytes, info)
        if info:
            total_time += info["refresh_time_s"]
            captured += float(info["captured"])
            total += float(info["total"])
    return {
        "params": per_param,
        "overall": {
            "projected_params": len(per_param),
            "state_bytes": total_bytes,
            "last_refresh_time_s": total_time,
            "captured_energy": captured / total if total > 0 else None,
            "nonfinite_skips": nonfinite_skips,
            # With refresh_owner="round_robin", how many of the last bases this rank computed itself.
            "refreshes_computed_here": sum(bool(e["computed_here"]) for e in per_param.values()),
        },
    }
