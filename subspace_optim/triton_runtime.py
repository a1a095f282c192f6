"""Whether the Triton engine can run here: Triton installed, and on which devices.

The kernels themselves live in the repository's top-level ``kernels/`` folder and ship as
``subspace_optim.kernels``. That folder has no ``__init__.py`` on purpose (docs/kernels.md): a regular
package there would shadow the PyPI package ``kernels`` (which transformers imports) whenever the
repository root is on ``sys.path``. So these checks, which must import without Triton, live here, and
callers import a kernel module (``subspace_optim.kernels.step``) only when they launch it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any


@functools.cache
def available() -> bool:
    """True when Triton is importable (the kernels can then run on CUDA, or on CPU when interpreting). Asked
    per matrix on every step, and an install does not change inside a process: looked up once."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1``: kernels then run on CPU tensors, in numpy."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def runs_on(device: Any) -> bool:
    """Whether the kernels can run on tensors of ``device``: CUDA, or the CPU under the interpreter."""
    kind = getattr(device, "type", device)
    return available() and (kind == "cuda" or (kind == "cpu" and interpreting()))
