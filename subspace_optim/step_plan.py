"""What a ``SubspaceAdamW`` step keeps between steps, and what a masked step's flags look like.

``StepPlan``: the per-parameter checks, engines, batches and launch batches of the last step, reused while
nothing structural changed (a regular step then checks nothing per parameter again). ``SettlingState``: the
optimizer's ``state`` mapping, whose readers see step counts settled for the skips the device decided.
``DeviceFlags``: a masked step's non-finite flags, per parameter, on each parameter's device.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

# One parameter a step works on: (flat index, its group, its name, the parameter).
Work = tuple[int, dict[str, Any], str, Tensor]


class DeviceFlags(NamedTuple):
    """A masked step's non-finite flags, per parameter (by id) on its device: a bool for the updates, an int32
    to count the skips, and (``found()``) every flag as torch's fp32 ``found_inf`` when all parameters share
    one device, else {} (then converted one by one)."""

    skip: dict[int, Tensor]
    counted: dict[int, Tensor]
    found: Callable[[], dict[int, Tensor]]


def device_flags(work: list[Work], bad: Tensor, devices: list[torch.device]) -> DeviceFlags:
    """Split the step's flags (one per parameter of ``work``, on ``bad``'s device) onto each parameter's device."""
    ids = [id(p) for *_, p in work]
    single = len(set(devices)) == 1  # the usual case: every parameter on one device
    skip_of: dict[int, Tensor] = {}
    counted: dict[int, Tensor] = {}
    for dev in set(devices):
        here = bad if dev == bad.device else bad.to(dev)
        flags, ints = here.unbind(0), here.to(torch.int32).unbind(0)
        if single:
            skip_of, counted = dict(zip(ids, flags, strict=True)), dict(zip(ids, ints, strict=True))
            break
        for j, key in enumerate(ids):
            if devices[j] == dev:
                skip_of[key], counted[key] = flags[j], ints[j]
    found = functools.cache(lambda: dict(zip(ids, bad.float().unbind(0), strict=True)) if single else {})
    return DeviceFlags(skip_of, counted, found)


class StepPlan:
    """What the per-parameter checks of a step decided, kept for the next steps while ``key`` holds (the
    groups' parameters and structural options, every gradient's presence and layout, every parameter's dtype):
    the checked work list and the fp32 limits of its non-finite test, and, once a masked step has built them,
    the projected matrices, the plain parameters and the engine batches. A regular step then does no
    per-parameter checking, engine choice or state lookup beyond its counters: the host work that would
    otherwise grow by microseconds per parameter. Dropped whenever the state or the groups are replaced."""

    def __init__(
        self, key: tuple, state: Any, work: list[Work], limits: Tensor | None, shard_groups: list[Any]
    ) -> None:
        self.key, self.work, self.limits, self.shard_groups = key, work, limits, shard_groups
        # The optimizer's ``state`` mapping and its version when this plan was made: replacing, adding or
        # removing any entry (``load_state_dict``, ``opt.state[p] = ...``, a parameter's first state) drops it.
        self.state, self.version = state, getattr(state, "version", None)
        self.structure: tuple | None = None
        self._launch_batches: dict[tuple[int, str], list[list[int]]] = {}
        self.kernel_flags = False  # the finiteness test runs as the Triton kernel (``_use_kernel_flags``)
        self.flags_layout: Any = None  # its launches' ``kernels.flags.Layout``, made at its first use
        self.raises = any(group["nonfinite"] == "raise" for _, group, _, _ in work)  # a structural option

    def holds(self, key: tuple, state: Any) -> bool:
        """Whether the plan still describes a step with this key and this state."""
        return self.key == key and self.state is state and self.version == getattr(state, "version", None)

    def launch_batches(self, group: int, precision: str, args: tuple, kwargs: dict[str, Any]) -> list[list[int]]:
        """The Triton engine's launch batches of one core call (``kernels.step.layout_batches``), computed at the
        first masked step of the plan: its tensors' layouts cannot change while the plan holds (the key covers
        the weights' and gradients' layouts and the options that shape the state, and any state entry replaced
        drops the plan)."""
        key = (group, precision)
        if key not in self._launch_batches:
            from .kernels.step import layout_batches

            self._launch_batches[key] = layout_batches(*args[:5], kwargs["sides"])
        return self._launch_batches[key]


class SettlingState(defaultdict):
    """``optimizer.state``, whose readers see settled step counts: with ``nonfinite="skip"`` a matrix's counts
    run ahead of the steps it took by its skips the device decided and the host has not read yet
    (``SubspaceAdamW._read``); reading an entry (``[p]``, ``get``, ``items``, ``values``) reads those first,
    once (a host sync only while some are owed). The optimizer's own bookkeeping reads through ``raw`` and
    ``peek``, which read nothing back. Copies and pickles are plain ``defaultdict``s (re-wrapped on load)."""

    def __init__(self, settle: Callable[[], None], entries: Any = ()) -> None:
        self.version = 0  # bumped whenever an entry is added, replaced or removed (``StepPlan`` compares it)
        super().__init__(dict, entries)
        self._settle = settle

    def __setitem__(self, p: Tensor, value: dict[str, Any]) -> None:  # also entries ``__missing__`` creates
        self.version += 1
        super().__setitem__(p, value)

    def __delitem__(self, p: Tensor) -> None:
        self.version += 1
        super().__delitem__(p)

    def clear(self) -> None:
        self.version += 1
        super().clear()

    def pop(self, *args: Any) -> Any:
        self.version += 1
        return super().pop(*args)

    def popitem(self) -> Any:
        self.version += 1
        return super().popitem()

    def update(self, *args: Any, **kwargs: Any) -> None:
        self.version += 1
        super().update(*args, **kwargs)

    def setdefault(self, p: Tensor, default: Any = None) -> Any:
        self.version += 1
        return super().setdefault(p, default)

    def __ior__(self, other: Any) -> SettlingState:  # ``state |= {...}``: dict's C update, not ``update``
        self.version += 1
        return super().__ior__(other)

    def raw(self, p: Tensor) -> dict[str, Any]:
        return super().__getitem__(p)

    def peek(self, p: Tensor) -> dict[str, Any] | None:
        return super().get(p)

    def __getitem__(self, p: Tensor) -> dict[str, Any]:
        self._settle()
        return super().__getitem__(p)

    def get(self, p: Tensor, default: Any = None) -> Any:
        self._settle()
        return super().get(p, default)

    def items(self) -> Any:
        self._settle()
        return super().items()

    def values(self) -> Any:
        self._settle()
        return super().values()

    def __reduce__(self) -> tuple:
        return (defaultdict, (dict,), None, None, iter(super().items()))
