"""subspace_optim: AdamW with Adam state kept only in a low-rank subspace of each weight's gradient."""

from .metrics import subspace_metrics
from .optimizer import DEFAULT_MOMENTS, SubspaceAdamW, state_bytes
from .targets import param_groups, select_target_modules

__version__ = "0.1.0"

__all__ = [
    "SubspaceAdamW",
    "param_groups",
    "select_target_modules",
    "state_bytes",
    "subspace_metrics",
    "DEFAULT_MOMENTS",
]
