"""subspace_optim: AdamW with Adam state kept only in a low-rank subspace of each weight's gradient.

The public API is what ``__all__`` names, and the functional core ``subspace_optim.functional`` (see its
``__all__``); other modules are internal (docs/architecture.md).
"""

from . import functional
from .metrics import state_bytes, subspace_metrics
from .optimizer import SubspaceAdamW
from .targets import param_groups, select_target_modules

__version__ = "0.1.0"

__all__ = [
    "SubspaceAdamW",
    "functional",
    "param_groups",
    "select_target_modules",
    "state_bytes",
    "subspace_metrics",
]
