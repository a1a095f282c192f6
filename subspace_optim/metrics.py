"""What the optimizer reports: state bytes (any torch optimizer) and per-matrix refresh metrics."""

from __future__ import annotations

import types
from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .distributed import local


def state_bytes(optimizer: Optimizer, retained: bool = False) -> int:
    """Bytes this rank holds in an optimizer's state (any torch optimizer), each tensor counted once.

    Counted: tensors in ``optimizer.state[p]`` (also inside dicts, lists and tuples) and tensors reachable
    one level deep from Python objects kept there (galore-torch's and apollo-torch's ``projector``, whose
    ``ortho_matrix`` is the basis, or a list of two for proj_type "full"). DTensors count their local
    tensor; tensor subclasses that flatten (``__tensor_flatten__``, e.g. torchao's 8-bit state) count their
    inner tensors, not ``numel`` at the outer dtype.

    ``retained=False`` (logical): the bytes of each distinct tensor, ``numel * element_size``.
    ``retained=True``: the whole storage each tensor keeps alive, each storage once (galore-torch's fp32
    basis is a slice of the SVD factor and keeps all of it alive), i.e. what freeing the state would free.
    """
    logical, kept = state_footprint(optimizer)
    return kept if retained else logical


def state_footprint(optimizer: Optimizer) -> tuple[int, int]:
    """(logical, retained) state bytes in one walk; see ``state_bytes``."""
    walk = _StateWalk()
    for state in optimizer.state.values():
        walk.value(state, objects=True)
    return walk.logical, sum(walk.storages.values())


class _StateWalk:
    """Adds up the tensors in optimizer state: logical bytes per distinct view, retained bytes per storage."""

    def __init__(self) -> None:
        self.logical = 0
        self.views: set[tuple[Any, ...]] = set()
        self.storages: dict[int, int] = {}

    def value(self, value: Any, objects: bool) -> None:
        if isinstance(value, Tensor):
            self.tensor(value)
        elif isinstance(value, dict):
            for v in value.values():
                self.value(v, objects)
        elif isinstance(value, (list, tuple, set, frozenset)):
            for v in value:
                self.value(v, objects)
        elif objects and _holds_state(value):
            for v in vars(value).values():  # one level deep: objects inside it are not entered
                self.value(v, objects=False)

    def tensor(self, t: Tensor) -> None:
        t = local(t)
        if is_traceable_wrapper_subclass(t):
            names, _ = t.__tensor_flatten__()
            for name in names:
                self.value(getattr(t, name), objects=False)
            return
        nbytes = t.numel() * t.element_size()
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # no storage (sparse and other layouts): its own bytes
            key: tuple[Any, ...] = ("tensor", id(t))
            if key not in self.views:
                self.views.add(key)
                self.logical += nbytes
                self.storages[-len(self.views)] = nbytes  # negative keys: never a storage's
            return
        sid = storage._cdata
        key = (sid, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if key not in self.views:
            self.views.add(key)
            self.logical += nbytes
        self.storages[sid] = storage.nbytes()


def _holds_state(value: Any) -> bool:
    """A Python object an optimizer keeps in its state (a projector), not a class, module or function."""
    return hasattr(value, "__dict__") and not isinstance(
        value, (type, nn.Module, types.ModuleType, types.FunctionType, types.MethodType)
    )


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
        if info["captured"] is not None:  # a seeded projection is a sketch, not a subspace: it captures no energy
            t, c = float(info["total"]), float(info["captured"])
            entry["captured_energy"] = c / t if t > 0 else None
        entry["overlap"] = None if info["overlap"] is None else float(info["overlap"])
    return entry


def unwrap(optimizer: Any) -> Optimizer | None:
    """The ``SubspaceAdamW`` inside ``optimizer`` or inside the wrappers around it, else None.

    Trainers hand out wrappers: accelerate's ``AcceleratedOptimizer`` (what ``Trainer.optimizer`` is), DeepSpeed's
    and others keep the optimizer they wrap as ``.optimizer``; that chain is followed (8 levels at most).
    """
    from .optimizer import SubspaceAdamW  # here: optimizer imports this module

    for _ in range(9):
        if optimizer is None or isinstance(optimizer, SubspaceAdamW):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def subspace_metrics(optimizer: Any) -> dict[str, Any]:
    """``SubspaceAdamW.subspace_metrics()`` of ``optimizer`` or of the SubspaceAdamW it wraps.

    Use it on ``trainer.optimizer``: accelerate wraps the optimizer in an ``AcceleratedOptimizer``, which does not
    forward ``subspace_metrics``. A TypeError when no SubspaceAdamW is found.
    """
    inner = unwrap(optimizer)
    if inner is None:
        raise TypeError(
            f"subspace_metrics needs a SubspaceAdamW, or a wrapper that keeps one as .optimizer (accelerate's "
            f"AcceleratedOptimizer); got {type(optimizer).__name__}, which holds none"
        )
    return inner.subspace_metrics()


def collect(
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
            if info["captured"] is not None:
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
