"""Triton engine of subspace_optim: fused projected-AdamW step and fast subspace refresh.

Importing this package never needs Triton: ``available()`` says whether the kernels can run, and the
kernel entry points are imported lazily on first use. The optimizer uses them for CUDA tensors only;
CPU tensors always take the reference path (tests drive the kernels on CPU with ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .probe import probe
    from .refresh import gaussian, refresh_batch
    from .step import step_projected_batch

__all__ = ["available", "gaussian", "probe", "refresh_batch", "step_projected_batch", "supports"]

_LAZY = {"step_projected_batch": ".step", "refresh_batch": ".refresh", "gaussian": ".refresh", "probe": ".probe"}


def available() -> bool:
    """True when Triton is importable (the kernels can then run on CUDA, or on CPU when interpreting)."""
    return importlib.util.find_spec("triton") is not None


def supports(t: Any) -> bool:
    """Whether the optimizer should use the kernels for tensor ``t``: a CUDA tensor and Triton present."""
    return getattr(getattr(t, "device", None), "type", None) == "cuda" and available()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name], __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
