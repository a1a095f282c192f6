"""Triton engine of subspace_optim: the fused projected-AdamW step and the refresh's GEMMs.

``subspace_adamw`` and ``refresh_bases`` are the Triton twins of ``subspace_optim.functional``'s functions
of the same names and signatures. Importing this package never needs Triton: ``available()`` says
whether the kernels can run, and the entry points are imported lazily on first use. They run on CUDA
tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests drive them).
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .probe import probe
    from .refresh import gaussian, refresh_bases
    from .step import subspace_adamw

__all__ = ["available", "gaussian", "interpreting", "probe", "refresh_bases", "runs_on", "subspace_adamw"]

_LAZY = {"subspace_adamw": ".step", "refresh_bases": ".refresh", "gaussian": ".refresh", "probe": ".probe"}


def available() -> bool:
    """True when Triton is importable (the kernels can then run on CUDA, or on CPU when interpreting)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1``: kernels then run on CPU tensors, in numpy."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def runs_on(device: Any) -> bool:
    """Whether the kernels can run on tensors of ``device``: CUDA, or the CPU under the interpreter."""
    kind = getattr(device, "type", device)
    return available() and (kind == "cuda" or (kind == "cpu" and interpreting()))


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name], __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
