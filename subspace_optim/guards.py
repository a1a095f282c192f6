"""Compatibility guards: what other frameworks and older checkpoints do to an optimizer, and our answers.

- DeepSpeed ZeRO 1-3 swap each group's parameters for flattened 1-D partitions inside
  ``deepspeed.initialize``; a flattened weight has no matrix to project, so ``ParamGroup`` refuses the swap
  there, with the fix (ZeRO 0 or FSDP2).
- Checkpoints from older torch releases store a plain-AdamW ``step`` as a Python number; torch's AdamW
  converts it on load, and so do we (``upgrade_state``).
- ``Optimizer.__setstate__`` adds torch's ``differentiable`` flag to every group; SubspaceAdamW has no
  differentiable mode, and the key would make ``state_dict()`` differ across a round trip.
- Keywords that select modules by name belong to ``param_groups(model, ...)`` or the Trainer factory.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from typing import Any

import torch
from torch import Tensor

from .options import describe

FLATTENED = (
    "the params of a param group with rank={rank} were replaced by flattened 1-D tensors: this is what "
    "DeepSpeed ZeRO stages 1-3 do, and a flattened weight has no matrix to project (it would silently "
    "train as plain AdamW). Use ZeRO stage 0, or shard with FSDP2 (torch.distributed.fsdp.fully_shard, "
    "or accelerate's FSDP plugin with fsdp_version=2), which SubspaceAdamW supports."
)

_MODEL_KEYWORDS = {"target_modules", "optim_target_modules", "project_output_head", "model"}


def unexpected_keywords(names: list[str]) -> str:
    """The TypeError message for keywords SubspaceAdamW does not take, with the likely fix."""
    if _MODEL_KEYWORDS.intersection(names):
        return (
            f"SubspaceAdamW got {', '.join(names)}: it takes parameters, not a model, so it cannot pick "
            "modules by name. Build the groups with subspace_optim.param_groups(model, target_modules=..., "
            "rank=...), or with the HF Trainer pass optimizer_cls_and_kwargs=(SubspaceAdamWFactory, kwargs) "
            "from subspace_optim.integrations.transformers, which calls it with the model."
        )
    return f"SubspaceAdamW got unexpected keyword argument(s) {', '.join(names)}; its options are {describe()}"


def param_list(params: Any) -> list[Any]:
    """A group's ``params`` as torch reads them: a bare tensor is a one-element list, a set is refused
    (its order changes between runs, and so would the state's parameter ids)."""
    if isinstance(params, Tensor):
        return [params]
    if isinstance(params, set):
        raise TypeError(
            "optimizer parameters need to be organized in ordered collections, but the ordering of tensors "
            "in sets will change between runs. Please use a list instead."
        )
    return list(params)


class ParamGroup(dict):
    """A param group that refuses to have its projected matrices swapped for flat 1-D buffers.

    DeepSpeed ZeRO 1-3 rewrites ``group["params"]`` with flattened partitions inside
    ``deepspeed.initialize``; raising here stops it at construction, with an explanation, instead of
    letting the projection silently vanish. ``SubspaceAdamW`` reads its groups only in ``_prepare``, which
    ``torch.compile`` does not trace, so this subclass never reaches the tracer.
    """

    def __init__(self, group: dict[str, Any], known: set[int]) -> None:
        self._known = known  # the optimizer's set of ids of parameters handed over through groups
        self._had_matrices = False  # sticky, so a group that held matrices can never become flat
        super().__init__(group)
        if "params" in group:
            self["params"] = group["params"]

    def __setitem__(self, key: str, value: Any) -> None:
        # Attributes are read defensively: unpickling sets dict items before it restores __dict__.
        if key == "params" and "_known" in self.__dict__:
            value = param_list(value)
            tensors = [p for p in value if isinstance(p, Tensor)]
            # ZeRO-1/2 install the flat buffer directly; ZeRO-3 first empties the list, then installs it.
            flattened = all(p.dim() == 1 for p in tensors)
            if self.get("rank") is not None and self._had_matrices and flattened:
                raise ValueError(FLATTENED.format(rank=self["rank"]))
            self._had_matrices |= any(p.dim() >= 2 for p in tensors)
            # A whole-list swap of same-shape tensors is legitimate: accelerate's FSDP2 `prepare` swaps
            # each parameter for its sharded DTensor this way. State is lazy, so nothing is orphaned.
            self._known.update(id(p) for p in tensors)
        super().__setitem__(key, value)


def upgrade_state(state: dict[Any, dict[str, Any]], groups: list[dict[str, Any]]) -> None:
    """Bring state and groups loaded from older formats to this one, in place (see the module docstring)."""
    for group in groups:
        group.pop("differentiable", None)
    for entry in state.values():
        step = entry.get("step")
        if "refresh_count" not in entry and step is not None and not isinstance(step, Tensor):
            entry["step"] = torch.tensor(float(step), dtype=torch.float32)


def _package_dirs() -> tuple[str, ...]:
    """Folders whose frames are library code, not the user's: this package, torch and the trainers."""
    # The kernels ship as subspace_optim.kernels, a folder with no __init__.py (no __file__): its spec has the path.
    package = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.find_spec(f"{__package__}.kernels")
    kernels_dirs = [os.path.abspath(p) for p in (spec.submodule_search_locations or [])] if spec else []
    dirs = [d + os.sep for d in (package, *kernels_dirs, os.path.dirname(os.path.abspath(torch.__file__)))]
    for name in ("transformers", "accelerate", "trl", "peft", "contextlib"):
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__file__", None):
            path = os.path.abspath(module.__file__)
            dirs.append(os.path.dirname(path) + os.sep if name != "contextlib" else path)
    return tuple(dirs)


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside this package, torch and the trainers, so a
    warning raised deep inside ``optimizer.step()`` points at the user's line, not at torch's wrappers."""
    dirs = _package_dirs()
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename.startswith(dirs) or frame.f_code.co_filename.startswith("<")):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)
