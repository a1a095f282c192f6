"""HuggingFace ``Trainer`` integration for ``SubspaceAdamW``.

All three ways in build the optimizer through ``build_optimizer``, so they give the same param groups:

- ``Trainer(optimizers=(create_optimizer(model, args), None))``;
- ``Trainer(optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args))``, i.e.
  ``(SubspaceAdamWFactory, kwargs)``: transformers calls a first element that is not an ``Optimizer``
  subclass as a factory, ``SubspaceAdamWFactory()(model, **kwargs)``, so the projected weights are chosen
  by module name when training starts, not by tensors that must exist when the Trainer is built; lr, betas,
  eps and weight_decay that ``kwargs`` leave out come from the Trainer's ``TrainingArguments``;
- ``create_optimizer(model, args)`` itself, which reads ``learning_rate``, ``adam_beta1/2``,
  ``adam_epsilon``, ``weight_decay``, ``optim_target_modules`` and a ``galore_adamw`` ``optim_args`` string,
  or, with ``optim="apollo_adamw"`` (``_layerwise``), an apollo-torch one, mapped to APOLLO's algorithm
  (``refresh="seeded"`` on apollo-torch's seed stream, in transformers' param group order; see
  ``parse_optim_args``).

``SubspaceMetricsCallback`` puts the optimizer's subspace metrics into the Trainer's logs.
"""

from __future__ import annotations

import math
import sys
import warnings
import weakref
from collections.abc import Iterable
from typing import Any

from torch import nn
from torch.optim import Optimizer
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .. import guards, metrics, options, presets
from ..optimizer import SubspaceAdamW
from ..targets import ALL_LINEAR, param_groups, select_target_modules

# Hyperparameters that TrainingArguments owns: read from its fields, refused in optim_args so that a
# value cannot be set in two places with one of them silently losing.
_ARGS_FIELDS = {
    "lr": "learning_rate",
    "learning_rate": "learning_rate",
    "betas": "adam_beta1 and adam_beta2",
    "beta1": "adam_beta1",
    "beta2": "adam_beta2",
    "adam_beta1": "adam_beta1",
    "adam_beta2": "adam_beta2",
    "eps": "adam_epsilon",
    "adam_epsilon": "adam_epsilon",
    "weight_decay": "weight_decay",
    "target_modules": "optim_target_modules",
    "accumulation_steps": "gradient_accumulation_steps",
    "max_grad_norm": "max_grad_norm",
}

# APOLLO's optim_args keys without a SubspaceAdamW option of that name (its rank, scale, update_proj_gap and
# proj_type are shared): mapped with optim="apollo_adamw*", refused otherwise.
_APOLLO_ONLY = {"proj": "random or svd projection", "scale_type": "channel or tensor scaling"}
_APOLLO_NAMES = ("apollo_adamw", "apollo_adamw_layerwise")  # transformers' OptimizerNames.APOLLO_*
# transformers 5.25 (trainer_optimizer._get_apollo_optimizer) reads these optim_args keys, with these defaults.
_APOLLO_DEFAULTS = {
    "rank": 128,
    "proj": "random",
    "scale_type": "channel",
    "update_proj_gap": 200,
    "scale": 1.0,
    "proj_type": "std",
}
# proj: APOLLO's projection -> our refresh. "random" is apollo-torch's GradientProjector: a Gaussian / sqrt(rank),
# redrawn every update_proj_gap steps from the parameter's seed chain: refresh="seeded" on seed_stream="apollo"
# regenerates exactly those draws. "svd" is its GaLoreProjector: the top-rank singular vectors of the gradient
# (galore-torch's computation), i.e. our refresh="svd"; apollo-torch leaves the moments as they are when it
# changes either projection, hence moments="keep" for both (and no seed stream for svd: nothing is drawn).
_APOLLO_PROJ: dict[str, dict[str, str]] = {
    "random": {"refresh": "seeded", "seed_stream": "apollo"},
    "svd": {"refresh": "svd"},
}
_APOLLO_SCALE_TYPE = {"channel": "apollo", "tensor": "apollo_tensor"}  # scale_type -> residual
# What APOLLO always does: keep the moments across projection changes; the norm-growth limiter in raw units.
_APOLLO_FIXED = {"moments": "keep", "limiter": "raw"}
# The options the mapping sets from APOLLO's keys or algorithm: a different value given in optim_args contradicts it.
_APOLLO_WHY = {
    "refresh": "proj=random maps to refresh='seeded', proj=svd to refresh='svd'",
    "seed_stream": "proj=random draws apollo-torch's own per-parameter seeds",
    "residual": "scale_type=channel maps to residual='apollo', scale_type=tensor to residual='apollo_tensor'",
    "moments": "APOLLO keeps its moments when the projection changes",
    "limiter": "APOLLO's norm-growth limiter acts on the update before bias correction",
}

_KINDS: dict[str, type] = {
    "int": int,
    "rank": int,
    "real": float,
    "choice": str,
    "choice_or_none": str,
    "bool_or_none": bool,
    "bool": bool,
    "lr_or_none": float,
}


# optim_args examples where an option's default would show nothing useful (None, or a value that is the default).
_EXAMPLES = {
    "rank": "128",
    "foreach": "false",
    "plain_lr": "3e-3",
    "plain_moments_dtype": "int4",
    "plain_second_moment": "full",
}


def _optim_args_table() -> dict[str, tuple[type, str]]:
    """Keys an optim_args string may hold, from the option table: every option TrainingArguments does not
    own, galore's aliases too, and ``project_output_head``. Value: (parser, example value)."""
    table: dict[str, tuple[type, str]] = {}
    for option in options.OPTIONS:
        if option.name in _ARGS_FIELDS:
            continue
        example = _EXAMPLES.get(option.name, str(option.default))
        table[option.name] = (_KINDS[option.kind], example)
        if option.alias:
            table[option.alias] = table[option.name]
    table["project_output_head"] = (bool, "true")
    table["layerwise"] = (bool, "true")
    table["preset"] = (str, "balanced")
    return table


_OPTIM_ARGS = _optim_args_table()
_APOLLO_ARGS = {"proj": (str, "random"), "scale_type": (str, "channel")}  # read with optim="apollo_adamw*" only
# Keys whose option may be None: optim_args spells that "none" (any case).
_NULLABLE = frozenset(
    option.name for option in options.OPTIONS if option.kind in ("bool_or_none", "lr_or_none", "choice_or_none")
)
_OPTIMIZER_OPTIONS = frozenset(options.DEFAULTS)
_LAYERWISE_OPTIONS = {"accumulation_steps", "max_grad_norm"}  # update_in_backward's, with layerwise=True only
_BUILD_OPTIONS = _OPTIMIZER_OPTIONS | {"target_modules", "project_output_head", "update_proj_gap", "layerwise"}
_BUILD_OPTIONS |= _LAYERWISE_OPTIONS | {"group_order", "preset"}
_GROUP_ORDERS = ("subspace", "apollo")  # build_optimizer's: param_groups' order, or transformers' apollo_adamw one
_TIED_HEAD = (
    "project_output_head=True, but the output head is tied to the input embedding: it stays in plain AdamW "
    "(projecting it would project the embedding too). Untie the embeddings to project the head."
)
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")
_EXAMPLE = "optim_args='rank=128, update_proj_gap=200, scale=0.25, proj_type=std'"


_suggest = options.suggest  # the one difflib hint, shared with the constructor and param groups


def _parse_value(key: str, value: str, kind: type, example: str) -> Any:
    nullable = key in _NULLABLE
    if nullable and value.lower() == "none":
        return None
    if kind is bool:
        if value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        alternatives = f"{key}=true, {key}=false or {key}=none" if nullable else f"{key}=true or {key}=false"
        raise ValueError(f"optim_args entry {key}={value!r} is not a boolean: write {alternatives}")
    try:
        return kind(value)
    except ValueError:
        what = "an int" if kind is int else "a number"
        alternatives = f"{key}={example}" + (f" or {key}=none" if nullable else "")
        raise ValueError(f"optim_args entry {key}={value!r} is not {what}: write e.g. {alternatives}") from None


def _apollo_optim(optim: Any) -> bool:
    """Whether ``optim`` (a ``TrainingArguments.optim`` value, or None) names one of transformers' APOLLO
    optimizers; another name starting with "apollo" is refused rather than read as either."""
    name = "" if optim is None else str(getattr(optim, "value", optim))
    if name.startswith("apollo") and name not in _APOLLO_NAMES:
        raise ValueError(
            f"optim={name!r}: transformers' APOLLO optimizers are {' and '.join(_APOLLO_NAMES)}, and those are the "
            "ones SubspaceAdamW maps to APOLLO's algorithm (apollo-torch's others, e.g. its 8-bit Q-APOLLO, are not "
            "reproduced). Use optim='apollo_adamw' or 'apollo_adamw_layerwise'."
        )
    return name in _APOLLO_NAMES


def parse_optim_args(optim_args: str | None, optim: Any = None) -> dict[str, Any]:
    """``build_optimizer`` keyword arguments from a ``TrainingArguments.optim_args`` string, read as ``optim``'s.

    Accepts everything ``optim="galore_adamw"`` reads (rank, update_proj_gap, scale, proj_type) plus our
    own option names, so a galore config migrates unchanged. Values are typed by the option table: ints,
    numbers, choice strings (``moments_dtype=int8``), booleans as true/false/1/0/yes/no, and ``none`` for the
    options that may be None (``plain_lr``, ``foreach``). transformers' parser fails with an unpacking
    error on a malformed entry and its galore path silently drops unknown keys; here both are a ValueError
    naming the entry and the fix. Values are range-checked later, by ``SubspaceAdamW`` itself.

    With ``optim="apollo_adamw"`` or ``"apollo_adamw_layerwise"`` the string is apollo-torch's, read as
    transformers' apollo path reads it (rank 128, proj random, scale_type channel, update_proj_gap 200, scale 1,
    proj_type std where left out), and mapped to APOLLO's algorithm: proj=random -> ``refresh="seeded",
    seed_stream="apollo"``, proj=svd -> ``refresh="svd"``; scale_type channel / tensor -> ``residual="apollo"`` /
    ``"apollo_tensor"``; APOLLO's scale s -> ``scale=sqrt(s)`` (apollo-torch multiplies its update by sqrt(s));
    always ``moments="keep"``, ``limiter="raw"`` and ``group_order="apollo"`` (transformers' param group order, so
    each projected weight has apollo-torch's seed). Our other options may be added (``moments_dtype=int8``); one
    that contradicts the mapping (``residual=fira``) is a ValueError. Without an apollo ``optim``, APOLLO's own
    keys (``proj``, ``scale_type``) are a ValueError.
    """
    apollo = _apollo_optim(optim)
    parsed = _parse_entries(optim_args, apollo)
    if "update_proj_gap" in parsed and "update_gap" in parsed:
        raise ValueError("optim_args sets both update_proj_gap and update_gap (the same option); keep one")
    return _apollo_options(parsed, str(getattr(optim, "value", optim))) if apollo else parsed


def _parse_entries(optim_args: str | None, apollo: bool) -> dict[str, Any]:
    """The typed entries of ``optim_args``, each key checked (``apollo``: APOLLO's own keys are accepted)."""
    if optim_args is None:
        return {}
    if not isinstance(optim_args, str):
        raise TypeError(f"optim_args must be a string such as {_EXAMPLE}, got {type(optim_args).__name__}")
    table = {**_OPTIM_ARGS, **_APOLLO_ARGS} if apollo else _OPTIM_ARGS
    parsed: dict[str, Any] = {}
    for raw in optim_args.split(","):
        entry = raw.strip()
        if not entry:
            continue
        key, sep, value = (part.strip() for part in entry.partition("="))
        if not sep or not key or not value or "=" in value:
            raise ValueError(
                f"Malformed optim_args entry {entry!r} in {optim_args!r}: expected comma-separated key=value "
                f"pairs, e.g. {_EXAMPLE}"
            )
        if key in _APOLLO_ONLY and not apollo:
            raise ValueError(
                f"optim_args key {key!r} is APOLLO's ({_APOLLO_ONLY[key]}): SubspaceAdamW has no option of that "
                "name, and only optim='apollo_adamw' maps it. Remove it (rank, update_proj_gap, scale and proj_type "
                "are shared with GaLore and accepted), or use TrainingArguments(optim='apollo_adamw') to have "
                "apollo-torch's optim_args mapped to APOLLO's algorithm (refresh='seeded', residual='apollo', ...)."
            )
        if key in _ARGS_FIELDS:
            raise ValueError(
                f"optim_args key {key!r} is not read from optim_args: set TrainingArguments({_ARGS_FIELDS[key]}=...) "
                "instead (the Trainer integration takes it from there)"
            )
        if key not in table:
            raise ValueError(
                f"Unknown optim_args key {key!r}{_suggest(key, table)}: SubspaceAdamW accepts "
                f"{', '.join(table)}. Remove it, or set it in TrainingArguments if it is a Trainer option."
            )
        if key in parsed:
            raise ValueError(f"optim_args sets {key!r} twice in {optim_args!r}; keep one")
        kind, example = table[key]
        parsed[key] = _parse_value(key, value, kind, example)
    return parsed


def _apollo_options(parsed: dict[str, Any], optim: str) -> dict[str, Any]:
    """apollo-torch ``optim_args`` entries (typed, ``parsed``) as ``build_optimizer`` keywords: see
    ``parse_optim_args``. Our own options in ``parsed`` pass through, unless they contradict the mapping."""
    given = {**_APOLLO_DEFAULTS, **parsed}
    proj, scale_type, scale, proj_type = (given.pop(key) for key in ("proj", "scale_type", "scale", "proj_type"))
    if proj not in _APOLLO_PROJ:
        raise ValueError(
            f"optim_args proj={proj!r} with optim={optim!r}: APOLLO projects with proj=random (a seeded Gaussian: "
            "refresh='seeded') or proj=svd (the gradient's top singular vectors: refresh='svd'); apollo-torch raises "
            "on anything else. Use one of those."
        )
    if scale_type not in _APOLLO_SCALE_TYPE:
        raise ValueError(
            f"optim_args scale_type={scale_type!r} with optim={optim!r}: APOLLO scales per channel "
            "(scale_type=channel: residual='apollo') or per matrix (scale_type=tensor, APOLLO-Mini: "
            "residual='apollo_tensor'); apollo-torch fails on anything else. Use one of those."
        )
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(
            f"optim_args scale={scale!r} with optim={optim!r}: APOLLO's scale must be a finite number > 0 "
            "(apollo-torch multiplies its update by sqrt(scale); APOLLO uses scale=1, APOLLO-Mini scale=128)."
        )
    _check_apollo_proj_type(proj_type, scale_type, optim)
    default_gap = given.pop("update_proj_gap")
    mapped = {
        "rank": given.pop("rank"),
        **_APOLLO_PROJ[proj],
        "residual": _APOLLO_SCALE_TYPE[scale_type],
        "scale": math.sqrt(scale),
        "update_gap": given.pop("update_gap", default_gap),
        "proj_type": proj_type,
        **_APOLLO_FIXED,
        "group_order": "apollo",
    }
    for key, why in _APOLLO_WHY.items():
        if key in mapped and key in given and given[key] != mapped[key]:
            raise ValueError(
                f"optim_args {key}={given[key]!r} contradicts optim={optim!r}, which sets {key}={mapped[key]!r} "
                f"({why}). Remove {key}, or train with optim='galore_adamw', whose optim_args choose SubspaceAdamW's "
                "options freely."
            )
    return {**given, **mapped}


def _check_apollo_proj_type(proj_type: str, scale_type: str, optim: str) -> None:
    """Refuse channel scaling with a proj_type apollo-torch cannot run it with.

    apollo-torch 1.0.3 takes the channel norms of the projected gradient along a side fixed by the shape (rows of
    a tall matrix, columns of a wide one), the side ``std`` leaves unprojected, and multiplies the full gradient
    by them: with ``reverse_std`` (any shape), ``left`` (tall) or ``right`` (wide) the factors have ``rank`` entries
    and do not broadcast (for rank 1 they do, degenerating into one factor per matrix: scale_type=tensor). There
    is no APOLLO run to reproduce then. Tensor scaling takes any proj_type.
    """
    if scale_type == "channel" and proj_type != "std":
        raise ValueError(
            f"optim_args proj_type={proj_type!r} with scale_type=channel and optim={optim!r}: apollo-torch 1.0.3 "
            "cannot run this pair (its channel factors are taken on the side proj_type=std leaves unprojected, so "
            "they do not match the gradient where the projection falls on the other side), so there is no APOLLO "
            "run to reproduce. Use proj_type=std (the projection apollo-torch runs with channel scaling), or "
            "scale_type=tensor (APOLLO-Mini's scaling, which takes any proj_type)."
        )


def _normalize_targets(target_modules: str | Iterable[str] | None) -> str | list[str]:
    """``None`` (not set in TrainingArguments) and transformers' ``all_linear`` spelling mean all-linear."""
    if target_modules is None:
        return ALL_LINEAR
    if isinstance(target_modules, str):
        return ALL_LINEAR if target_modules.replace("_", "-") == ALL_LINEAR else target_modules
    return list(target_modules)


def _project_output_head(model: nn.Module, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Move the output head's weight into the projected group (galore_adamw's "all-linear" projects it).

    A head tied to the input embedding stays in plain AdamW, with a warning: projecting it would project the
    embedding too (HF's "all-linear" also leaves a tied head out).
    """
    getter = getattr(model, "get_output_embeddings", None)
    head = getattr(getter() if callable(getter) else None, "weight", None)
    if head is None:
        raise ValueError("project_output_head=True, but the model has no output head (get_output_embeddings())")
    inputs = getattr(model, "get_input_embeddings", None)
    if callable(inputs) and getattr(inputs(), "weight", None) is head:
        guards.warn_user(_TIED_HEAD)
        return groups
    for group in groups[1:]:
        for index, (name, param) in enumerate(group["params"]):
            if param is head:
                groups[0]["params"].append((name, param))
                del group["params"][index]
                return [kept for kept in groups if kept["params"]]
    return groups  # already projected, or frozen


def _apollo_groups(
    model: nn.Module,
    target_modules: str | list[str],
    rank: int,
    weight_decay: float,
    project_output_head: bool | None,
) -> list[dict[str, Any]]:
    """Param groups in transformers' ``apollo_adamw`` order, so every projected weight has apollo-torch's seed.

    transformers 5.25 (``trainer_optimizer._setup_low_rank_optimizer``) gives apollo-torch two groups: every
    parameter that is not a targeted ``<module>.weight`` first, then the targeted weights, each in
    ``model.named_parameters()`` order, frozen parameters included; apollo-torch seeds each trainable parameter
    with its position from 1 over all groups. Here: the non-targets (frozen too) in plain groups, matrices
    (``weight_decay``) then 1-D parameters (no decay), then the targets (frozen too) in the projected group, last.
    The plain parameters' order inside their block differs from transformers' (they are never seeded), their
    count does not: every projected weight sits at apollo-torch's position. Targets are matched by parameter name,
    as transformers does, so a head tied to the input embedding is not projected; "all-linear" adds an untied
    output head unless ``project_output_head=False``.
    """
    modules = list(select_target_modules(model, target_modules))
    if project_output_head or (project_output_head is None and target_modules == ALL_LINEAR):
        modules += _head_module(model, explicit=bool(project_output_head))
    weights = {f"{name}.weight" for name in modules}
    projected, matrices, vectors = [], [], []
    for name, param in model.named_parameters():  # frozen ones too: apollo-torch's positions count them
        if name in weights:
            projected.append((name, param))
        else:
            (matrices if param.dim() >= 2 else vectors).append((name, param))
    groups = [
        {"params": matrices, "rank": None, "weight_decay": weight_decay},
        {"params": vectors, "rank": None, "weight_decay": 0.0},
        {"params": projected, "rank": rank, "weight_decay": weight_decay},
    ]
    return [group for group in groups if group["params"]]


def _head_module(model: nn.Module, explicit: bool) -> list[str]:
    """The output head's module name, for the apollo order's "all-linear"; none when the head is tied to the
    input embedding (``explicit``: ``project_output_head=True`` was asked for, so say why, or fail without head)."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if getattr(head, "weight", None) is None:
        if explicit:
            raise ValueError("project_output_head=True, but the model has no output head (get_output_embeddings())")
        return []
    inputs = getattr(model, "get_input_embeddings", None)
    if callable(inputs) and getattr(inputs(), "weight", None) is head.weight:
        if explicit:
            guards.warn_user(_TIED_HEAD)
        return []
    return [name for name, module in model.named_modules() if module is head][:1]


def build_optimizer(
    model: nn.Module,
    *,
    target_modules: str | Iterable[str] | None = ALL_LINEAR,
    rank: int | None = None,
    weight_decay: float = 0.0,
    project_output_head: bool | None = None,
    layerwise: bool = False,
    group_order: str = "subspace",
    preset: str | None = None,
    **options: Any,
) -> SubspaceAdamW:
    """``SubspaceAdamW`` for ``model``: weights of the targeted linear modules projected, the rest AdamW.

    ``target_modules`` follows ``optim_target_modules`` (``param_groups`` semantics; "all-linear" leaves
    the output head in AdamW unless ``project_output_head=True``). ``options`` are ``SubspaceAdamW``'s
    (lr, betas, eps, update_gap or galore's update_proj_gap, scale, proj_type, refresh, moments, ...).
    ``layerwise=True`` attaches ``update_in_backward(model, accumulation_steps=..., max_grad_norm=...)``
    (those two keywords go there); the Trainer integration fills them from ``TrainingArguments``.
    ``group_order``: ``"subspace"`` (``param_groups``: projected group first, frozen parameters left out) or
    ``"apollo"`` (transformers' ``apollo_adamw`` order, see ``_apollo_groups``; there "all-linear" projects an
    untied output head unless ``project_output_head=False``, as transformers does). ``preset``
    (``subspace_optim.presets``) gives the options and rank not given here; ``rank`` is 128 without either.
    """
    if group_order not in _GROUP_ORDERS:
        raise ValueError(f"group_order={group_order!r}: use one of {', '.join(map(repr, _GROUP_ORDERS))}")
    unknown = sorted(set(options) - _BUILD_OPTIONS)
    if unknown:
        raise ValueError(
            f"Unknown SubspaceAdamW option {unknown[0]!r}{_suggest(unknown[0], _BUILD_OPTIONS)}; "
            f"accepted: {', '.join(sorted(_BUILD_OPTIONS))}"
        )
    if "update_proj_gap" in options:
        gap = options.pop("update_proj_gap")
        if "update_gap" in options and options["update_gap"] != gap:
            raise ValueError(f"update_proj_gap={gap!r} and update_gap={options['update_gap']!r} disagree; keep one")
        options["update_gap"] = gap
    rank, options = _under_preset(preset, rank, options)
    in_backward = {key: options.pop(key) for key in _LAYERWISE_OPTIONS & set(options)}
    if in_backward and not layerwise:
        raise ValueError(
            f"{sorted(in_backward)} configure layer-wise updates: pass layerwise=True (optim_args 'layerwise=true') "
            "or leave them out"
        )
    targets = _normalize_targets(target_modules)
    if group_order == "apollo":
        groups = _apollo_groups(model, targets, rank, weight_decay, project_output_head)
    else:
        groups = param_groups(model, targets, rank, weight_decay=weight_decay)
        if project_output_head:
            groups = _project_output_head(model, groups)
    optimizer = SubspaceAdamW(groups, weight_decay=weight_decay, **options)
    _check_at_first_step(optimizer, model)
    if layerwise:
        optimizer.update_in_backward(model, **in_backward)
    return optimizer


def _under_preset(preset: str | None, rank: int | None, options: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """The rank and options with ``preset``'s under the ones given (``subspace_optim.presets``); rank 128 without."""
    if preset is not None:
        chosen = presets.options_of(preset)
        preset_rank = chosen.pop("rank", None)
        options = {**chosen, **options}
        rank = preset_rank if rank is None else rank
    return (128 if rank is None else rank), options


def _check_at_first_step(optimizer: SubspaceAdamW, model: nn.Module) -> None:
    """Refuse, before the first step changes anything, an optimizer that does not hold the trainable
    parameters ``model`` has by then.

    An optimizer built before a trainer wraps the model (TRL's ``SFTTrainer`` applying a ``peft_config``
    adds LoRA adapters and freezes the base weights) holds only frozen weights: training would silently do
    nothing. The check runs once, as a step pre-hook, against the model's parameters at that time.
    """
    ref = weakref.ref(model)
    passed = False  # the hook stays registered (removing it inside torch's hook loop is not allowed)

    def check(opt: Optimizer, args: Any, kwargs: Any) -> None:
        nonlocal passed
        current = ref()
        if passed or current is None:
            return
        held = {id(param) for group in opt.param_groups for param in group["params"]}
        missing = [name for name, param in current.named_parameters() if param.requires_grad and id(param) not in held]
        trains = any(param.requires_grad for group in opt.param_groups for param in group["params"])
        if trains and not missing:
            passed = True
            return
        what = "holds no trainable parameter" if not trains else f"misses {len(missing)} trainable parameter(s)"
        raise ValueError(
            f"SubspaceAdamW {what} of the model being trained (e.g. {missing[:3]}): it was built before the model "
            "changed, e.g. before TRL/PEFT wrapped it and added adapters. Build it when training starts: "
            "Trainer(optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args)), i.e. (SubspaceAdamWFactory, kwargs), "
            "from subspace_optim.integrations.transformers. Nothing was changed."
        )

    optimizer.register_step_pre_hook(check)


def _optim_name(args: TrainingArguments) -> str:
    return str(getattr(args.optim, "value", args.optim))


def _check_optim_name(args: TrainingArguments) -> None:
    """Refuse an "apollo..." ``optim`` that transformers does not define, and warn where part of a galore one is
    not reproduced.

    ``galore_adamw`` (``_layerwise``) and ``apollo_adamw`` (``_layerwise``) are mapped (``parse_optim_args``);
    galore's 8-bit and Adafactor variants get a warning; any other ``optim`` value is not read.
    """
    optim = _optim_name(args)
    _apollo_optim(optim)
    if optim.startswith("galore") and optim not in ("galore_adamw", "galore_adamw_layerwise"):
        warnings.warn(
            f"TrainingArguments(optim={optim!r}): SubspaceAdamW is an AdamW (its state's precision is moments_dtype "
            "and basis_dtype); the 8-bit or Adafactor part of that optimizer is not reproduced"
            + (" (its layer-wise part is: layer-wise updates are on)" if optim.endswith("_layerwise") else ""),
            stacklevel=3,
        )


def optimizer_kwargs(args: TrainingArguments) -> dict[str, Any]:
    """``build_optimizer`` keyword arguments from ``TrainingArguments``.

    The AdamW hyperparameters come from the usual fields (transformers' galore path passes only the
    learning rate and leaves betas, eps and weight decay at galore-torch's defaults; its apollo path passes
    betas and eps to the projected group only, and no weight decay); the target modules from
    ``optim_target_modules`` (default "all-linear"); everything else from ``optim_args``, read as ``optim``'s
    (``parse_optim_args``: an ``apollo_adamw`` string is mapped to APOLLO's algorithm).
    """
    _check_optim_name(args)
    kwargs: dict[str, Any] = {
        "target_modules": _normalize_targets(args.optim_target_modules),
        **_adamw_hyperparameters(args),
    }
    kwargs.update(parse_optim_args(args.optim_args, _optim_name(args)))
    if kwargs.get("group_order") == "apollo" and args.weight_decay:
        guards.warn_user(
            f"TrainingArguments(optim={_optim_name(args)!r}, "
            f"weight_decay={args.weight_decay}): transformers' apollo path passes no weight decay to apollo-torch, "
            "so an apollo_adamw run had none; SubspaceAdamW applies this one (decoupled, not to 1-D parameters). "
            "Set weight_decay=0 to reproduce the apollo_adamw run."
        )
    if _optim_name(args).endswith("_layerwise"):
        kwargs.setdefault("layerwise", True)  # galore's and apollo's *_layerwise optimizers: the same mode, done here
    if kwargs.get("layerwise"):
        # Clipping happens inside backward (the Trainer's own clip_grad_norm_ then finds no gradient).
        kwargs["accumulation_steps"] = args.gradient_accumulation_steps
        kwargs["max_grad_norm"] = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None
    return kwargs


def create_optimizer(model: nn.Module, args: TrainingArguments, **overrides: Any) -> SubspaceAdamW:
    """``SubspaceAdamW`` for ``model`` configured from ``args``; keyword ``overrides`` win over ``args``.

    For ``Trainer(model=model, args=args, optimizers=(create_optimizer(model, args), None))``: the Trainer
    then builds its lr scheduler from ``args`` around this optimizer, and saves and resumes its state.
    """
    return build_optimizer(model, **{**optimizer_kwargs(args), **overrides})


class SubspaceAdamWFactory:
    """First element of ``Trainer(optimizer_cls_and_kwargs=(SubspaceAdamWFactory, kwargs))``.

    transformers calls a first element that is not an ``Optimizer`` subclass as a factory,
    ``SubspaceAdamWFactory()(model, **kwargs)``, when it creates the optimizer; ``kwargs`` are those of
    ``build_optimizer`` (``target_modules``, ``rank``, ``lr``, ...), so no parameter tensor is needed up front.
    """

    def __init__(self, *params: Any, **kwargs: Any) -> None:
        if params or kwargs:
            # An older Trainer instantiates the first element as an optimizer class, with unnamed groups.
            raise TypeError(
                "SubspaceAdamWFactory was called as an optimizer class: this transformers version does not call "
                "optimizer factories from optimizer_cls_and_kwargs. Upgrade transformers, or pass "
                "optimizers=(create_optimizer(model, args), None) to the Trainer instead."
            )

    def __call__(self, model: nn.Module, **kwargs: Any) -> SubspaceAdamW:
        """``build_optimizer(model, **kwargs)``; called by a Trainer, the AdamW hyperparameters that ``kwargs``
        leave out (lr, betas, eps, weight_decay) come from its ``TrainingArguments``, as for any Trainer optimizer."""
        trainer = _calling_trainer()
        if trainer is not None:
            kwargs = {**_adamw_hyperparameters(trainer.args), **kwargs}
        optimizer = build_optimizer(model, **kwargs)
        if trainer is None and "lr" not in kwargs:
            guards.warn_user(
                f"SubspaceAdamWFactory got no lr and was not called by a Trainer: lr={options.DEFAULTS['lr']} "
                "(SubspaceAdamW's default) is used, not TrainingArguments.learning_rate. Pass lr=args.learning_rate, "
                "or build the kwargs with optimizer_cls_and_kwargs(args)"
            )
        return optimizer


def _adamw_hyperparameters(args: TrainingArguments) -> dict[str, Any]:
    """The AdamW hyperparameters TrainingArguments owns (see ``_ARGS_FIELDS``), as ``SubspaceAdamW`` keywords."""
    return {
        "lr": args.learning_rate,
        "betas": (args.adam_beta1, args.adam_beta2),
        "eps": args.adam_epsilon,
        "weight_decay": args.weight_decay,
    }


def _calling_trainer() -> Trainer | None:
    """The Trainer whose ``create_optimizer`` calls the factory (transformers passes the factory only the model,
    so its arguments are read from the caller's frame), or None when called otherwise."""
    frame = sys._getframe(2)  # 0: here, 1: SubspaceAdamWFactory.__call__, 2: its caller
    for _ in range(3):  # Trainer.create_optimizer, possibly behind a subclass's override
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, Trainer):
            return owner
        frame = frame.f_back
    return None


def optimizer_cls_and_kwargs(args: TrainingArguments, **overrides: Any) -> tuple[type, dict[str, Any]]:
    """``(SubspaceAdamWFactory, kwargs)`` with ``kwargs`` read from ``args``, for ``optimizer_cls_and_kwargs=``."""
    return SubspaceAdamWFactory, {**optimizer_kwargs(args), **overrides}


def unwrap_optimizer(optimizer: Optimizer | None) -> SubspaceAdamW | None:
    """The ``SubspaceAdamW`` inside the Trainer's optimizer (accelerate wraps it), or None; see
    ``subspace_optim.metrics.unwrap`` (and ``metrics.subspace_metrics(trainer.optimizer)`` for the metrics)."""
    return metrics.unwrap(optimizer)


class SubspaceMetricsCallback(TrainerCallback):
    """Adds ``subspace/*`` values to every training log, so they reach the loggers the Trainer reports to.

    Values: ``captured_energy`` (||P^T G||^2 / ||G||^2 over all projected weights at their latest refresh),
    ``refresh_time_s`` (wall time of the latest refresh of all weights), ``state_bytes`` (optimizer state),
    ``refresh_count``, ``nonfinite_skips`` and, with layer-wise updates clipping, ``grad_norm`` (the
    Trainer's own is 0 then: no gradient is left when it clips); with ``per_param=True`` also each weight's
    captured energy and basis overlap. Reading them synchronizes with the device, which is why it happens only when the
    Trainer logs. Callbacks run in order and the Trainer puts reporters (tensorboard, wandb, ...) before
    user callbacks: ``add_metrics_callback(trainer)`` puts this one first so that they see the values.
    """

    def __init__(self, prefix: str = "subspace/", per_param: bool = False) -> None:
        self.prefix = prefix
        self.per_param = per_param

    def metrics(self, optimizer: SubspaceAdamW) -> dict[str, float]:
        """The log entries for ``optimizer`` now; values not known yet (before a refresh) are left out."""
        metrics = optimizer.subspace_metrics()
        overall = metrics["overall"]
        out: dict[str, float] = {
            "state_bytes": overall["state_bytes"],
            "refresh_count": max((entry["refresh_count"] for entry in metrics["params"].values()), default=0),
            "nonfinite_skips": overall["nonfinite_skips"],
        }
        handle = optimizer._backward_update
        if handle is not None and handle.last_grad_norm is not None:  # layer-wise: the Trainer's grad_norm is 0
            out["grad_norm"] = handle.last_grad_norm
        # Refresh time and energy live in memory only: after a resume they are unknown until the next refresh.
        if any(entry["refresh_time_s"] is not None for entry in metrics["params"].values()):
            out["refresh_time_s"] = overall["last_refresh_time_s"]
        if overall["captured_energy"] is not None:
            out["captured_energy"] = overall["captured_energy"]
        if self.per_param:
            for name, entry in metrics["params"].items():
                for key in ("captured_energy", "overlap"):
                    if entry[key] is not None:
                        out[f"{name}/{key}"] = entry[key]
        return {self.prefix + key: value for key, value in out.items()}

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        optimizer: Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        """Extend the training log in place (the dict later callbacks get) and its ``log_history`` copy."""
        opt = unwrap_optimizer(optimizer)
        if opt is None or logs is None or "loss" not in logs:
            return  # not our optimizer, or an eval / end-of-training summary log
        values = self.metrics(opt)
        logs.update(values)
        # Trainer.log appends a copy of the logs to log_history before it calls the callbacks.
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and last.get("loss") == logs["loss"]:
            last.update(values)


def add_metrics_callback(trainer: Trainer, callback: SubspaceMetricsCallback | None = None) -> SubspaceMetricsCallback:
    """Put a ``SubspaceMetricsCallback`` first in ``trainer``'s callbacks (replacing any other instance).

    First, so that the reporting callbacks (which the Trainer places before user callbacks) log its values.
    """
    callback = callback if callback is not None else SubspaceMetricsCallback()
    callbacks = trainer.callback_handler.callbacks
    callbacks[:] = [existing for existing in callbacks if not isinstance(existing, SubspaceMetricsCallback)]
    callbacks.insert(0, callback)
    return callback


__all__ = [
    "SubspaceAdamWFactory",
    "SubspaceMetricsCallback",
    "add_metrics_callback",
    "build_optimizer",
    "create_optimizer",
    "optimizer_cls_and_kwargs",
    "optimizer_kwargs",
    "parse_optim_args",
    "unwrap_optimizer",
]
