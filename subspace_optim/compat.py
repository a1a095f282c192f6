"""The module path that whole-optimizer pickles made before ``compat`` was renamed ``guards`` name for their
param groups (``subspace_optim.compat.ParamGroup``): kept so that they still load. New code imports ``guards``."""

from .guards import ParamGroup

__all__ = ["ParamGroup"]
