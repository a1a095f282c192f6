"""Which weights are projected: build param groups from a model and target-module patterns."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from . import guards, presets

ALL_LINEAR = "all-linear"


def _linear_like(module: nn.Module) -> bool:
    """nn.Linear, or a transformers ``Conv1D`` (GPT-2 style transposed linear)."""
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None


def _output_embedding_weight(model: nn.Module) -> Tensor | None:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return getattr(head, "weight", None)


def _matches(name: str, target_modules: str | Iterable[str]) -> bool:
    """HF ``optim_target_modules`` semantics: a string is a regex that must match the whole module name;
    in a list, each entry matches if it is a substring of the name or a regex that matches all of it."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    for key in target_modules:
        if key in name:
            return True
        try:
            if re.fullmatch(key, name):
                return True
        except re.error:
            continue
    return False


def select_target_modules(model: nn.Module, target_modules: str | Iterable[str]) -> list[str]:
    """Names of the linear modules whose weight will be projected.

    ``"all-linear"`` selects every linear layer except the output head (lm_head): projecting the
    vocabulary projection hurts quality and it is often tied to the input embedding. A pattern that names
    the head explicitly (e.g. ``["lm_head"]``) does select it.
    """
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not all(isinstance(t, str) for t in target_modules):
            raise TypeError(f"target_modules must be a str or a list of str, got {target_modules!r}")
    head = _output_embedding_weight(model)
    selected = []
    for name, module in model.named_modules():
        if not _linear_like(module) or (module.weight is head and target_modules == ALL_LINEAR):
            continue
        if target_modules == ALL_LINEAR or _matches(name, target_modules):
            selected.append(name)
    if not selected:
        linear = [n for n, m in model.named_modules() if _linear_like(m)]
        raise ValueError(
            f"target_modules={target_modules!r} matched no linear layer; linear layers are, e.g. "
            f"{linear[:6]}. Use substrings such as ['attn', 'mlp'], a full-name regex, or 'all-linear'."
        )
    return selected


# Options about the parameters that are not projected: param_groups gives them to its plain groups too.
PLAIN_OPTIONS = ("plain_moments_dtype", "plain_second_moment")


def param_groups(
    model: nn.Module,
    target_modules: str | Iterable[str] = ALL_LINEAR,
    rank: int | None = None,
    *,
    weight_decay: float = 0.0,
    preset: str | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Param groups for ``SubspaceAdamW``: targeted linear weights projected, everything else AdamW.

    Returns up to three groups of named parameters (so metrics and errors carry names):
    1. weights of the selected linear modules, with ``rank`` (None: the ``preset``'s, else 128), ``weight_decay``
       and ``options`` (``update_gap``, ``scale``, ``refresh``, ``moments``, ...), over a ``preset``'s options
       (``subspace_optim.presets``);
    2. other matrices (embeddings, lm_head), plain AdamW with ``weight_decay``;
    3. 1-D parameters (biases, norms), plain AdamW with no weight decay.
    Groups 2 and 3 set ``rank=None`` explicitly so an optimizer-level ``rank`` default cannot reach them. The
    options that are about plain parameters (``plain_moments_dtype``, ``plain_second_moment``) go to every group,
    over the preset's.
    Frozen parameters (``requires_grad=False``) are left out; when every targeted weight is frozen, group 1
    is left out too, with a warning.
    """
    targets = set(select_target_modules(model, target_modules))
    target_weights = {id(model.get_submodule(name).weight) for name in targets}
    projected, matrices, vectors = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in target_weights:
            projected.append((name, p))
        elif p.dim() >= 2:
            matrices.append((name, p))
        else:
            vectors.append((name, p))
    if not (projected or matrices or vectors):
        raise ValueError(
            "the model has no trainable parameter (every requires_grad is False): nothing to optimize. Unfreeze "
            "what should train, or build the optimizer after wrapping the model (PEFT adds trainable adapters)."
        )
    given_rank = {} if rank is None else {"rank": rank}  # None: the preset's rank, else 128
    chosen = {"weight_decay": weight_decay, **options, **given_rank}
    projected_group = presets.under({"params": projected, **chosen}, preset)
    projected_group.setdefault("rank", 128)
    groups = [projected_group] if projected else []
    if not projected:
        frozen = [n for n, p in model.named_parameters() if id(p) in target_weights and not p.requires_grad]
        guards.warn_user(
            f"target_modules={target_modules!r} matched only frozen weights ({len(frozen)}, e.g. {frozen[:3]}): "
            "no matrix is projected and every trainable parameter gets plain AdamW. With PEFT adapters, target "
            "the adapter layers (e.g. 'lora_') or build the optimizer from the wrapped model."
        )
    # A preset's storage options (moments_dtype, second_moment) hold for the plain groups too; its projection
    # options are inert there (rank None).
    plain = {k: v for k, v in options.items() if k in PLAIN_OPTIONS}
    if matrices:
        groups.append(presets.under({"params": matrices, "rank": None, "weight_decay": weight_decay, **plain}, preset))
    if vectors:
        groups.append(presets.under({"params": vectors, "rank": None, "weight_decay": 0.0, **plain}, preset))
    return groups
