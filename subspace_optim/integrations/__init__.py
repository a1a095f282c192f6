"""Integrations with training frameworks.

Each submodule imports its framework on import, so ``import subspace_optim`` never needs them:
``from subspace_optim.integrations.transformers import create_optimizer`` needs ``transformers``.
"""
