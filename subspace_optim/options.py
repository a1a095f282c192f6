"""Every SubspaceAdamW option, once: name, default, kind, choices, galore alias and help.

The table drives the constructor's validation and error messages, the coercion of numbers to plain
Python values (a numpy scalar in a group would make ``torch.load(weights_only=True)`` refuse the state
dict), galore-torch's key aliases, the Trainer's ``optim_args`` parser and the ``subspace-optim pretrain``
flags. Adding an option is adding a row.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import triton_runtime
from .factored import SECOND_MOMENTS
from .quant import BASIS_DTYPES, MOMENT_DTYPES, PLAIN_MOMENT_DTYPES
from .residual_rule import LIMITERS, RESIDUALS, WHOLE_GRADIENT
from .subspace import MOMENT_POLICIES, PROJ_TYPES, REFRESH_POLICIES

NONFINITE_POLICIES = ("skip", "raise")
ENGINES = ("auto", "reference", "triton")
REFRESH_OWNERS = ("all", "round_robin")
SEED_STREAMS = ("counter", "apollo")
MATMUL_PRECISIONS = ("auto", "ieee", "tf32")


@dataclass(frozen=True)
class Option:
    """One option. ``kind`` is one of: ``lr`` (number or 1-element tensor >= 0), ``betas``, ``real``
    (finite number; ``low`` is its bound, ``open`` whether the bound is excluded), ``int`` (``low`` is
    the smallest allowed value, None for any int), ``rank`` (positive int or None), ``choice``,
    ``bool``, ``bool_or_none``, ``lr_or_none`` (None or a finite number >= 0), ``choice_or_none`` (None or a
    choice). ``label`` is the name in torch's error
    wording ("Invalid learning rate: ...")."""

    name: str
    default: Any
    kind: str
    help: str
    choices: tuple[str, ...] = ()
    alias: str | None = None
    low: float | None = None
    open: bool = False
    label: str | None = None
    fix: str = ""
    type_error: bool = False  # a value of the wrong type raises TypeError (else ValueError, as released)


OPTIONS: tuple[Option, ...] = (
    Option(
        "lr", 1e-3, "lr", "learning rate", low=0.0, label="learning rate",
        fix="must be a finite number >= 0, e.g. lr=1e-3",
    ),
    Option("betas", (0.9, 0.999), "betas", "Adam's moment decay rates (beta1, beta2), each in [0, 1)"),
    Option(
        "eps", 1e-8, "real", "added to sqrt(v_hat)", low=0.0, open=True, label="epsilon value",
        fix="must be a finite number > 0, e.g. eps=1e-8 (with 0 a zero gradient divides 0 by 0)",
    ),
    Option(
        "weight_decay", 0.0, "real", "decoupled weight decay, applied in full space", low=0.0,
        label="weight_decay value", fix="must be a finite number >= 0 (0 disables it)",
    ),
    Option(
        "rank", None, "rank", "subspace rank r; None: plain AdamW for the group",
        fix="rank must be a positive int (e.g. rank=128), or None for plain AdamW",
    ),
    Option(
        "update_gap", 200, "int", "refresh the basis every this many optimizer steps", alias="update_proj_gap",
        low=1, fix="update_gap (galore: update_proj_gap) must be a positive int, e.g. 200", type_error=True,
    ),
    Option(
        "scale", 0.25, "real", "multiplier alpha on the projected-back update (GaLore's scale)", low=0.0, open=True,
        fix="scale must be a finite number > 0 (GaLore uses 0.25)",
    ),
    Option("refresh", "warm", "choice",
           "how a basis is refreshed: warm, rsvd, svd (galore-torch's), random (a stored orthonormal Gaussian); "
           "seeded (APOLLO's random projection, regenerated from a seed, never stored: with residual='apollo' "
           "or 'apollo_tensor'), dct (the r columns of the DCT-II basis most aligned with the gradient, stored as "
           "r indices)", REFRESH_POLICIES),
    Option("moments", "rotate", "choice", "what Adam's moments do when the basis changes", MOMENT_POLICIES),
    Option("proj_type", "std", "choice", "which side carries the basis", PROJ_TYPES),
    Option("oversample", 32, "int", "extra sketch columns for warm/rsvd refreshes", low=0),
    Option("power_iters", 1, "int", "power (subspace) iterations for warm/rsvd refreshes", low=0),
    Option("seed", 0, "int", "sketch seed: sketches depend on (seed, parameter index, refresh count) only",
           type_error=True),
    Option("seed_stream", "counter", "choice",
           "refresh='seeded': each projection's numbers. counter: random signs +-1/sqrt(r) from Philox, seeded from "
           "(seed, parameter index, refresh count) as sketches, the same bits on every device and engine (the "
           "Triton step regenerates them in its tiles); apollo: apollo-torch 1.0.3's Gaussian and seeds (the "
           "parameter's position from 1, then its next_seed chain), so a run reproduces apollo-torch's trajectory",
           SEED_STREAMS),
    Option("nonfinite", "skip", "choice", "a NaN/Inf gradient skips that parameter's step, or raises",
           NONFINITE_POLICIES),
    Option("engine", "auto", "choice", "compute engine of the step and the refresh", ENGINES),
    Option("foreach", None, "bool_or_none", "torch's foreach AdamW for the unprojected parameters"),
    Option("fused", None, "bool_or_none",
           "torch's fused AdamW for the unprojected parameters (as torch.optim.AdamW(fused=True); their step counts "
           "then live on the device, so a regular step skips them there too and reads nothing back)"),
    Option("refresh_owner", "all", "choice",
           "data parallel: every rank refreshes every basis, or each basis on one rank and broadcast",
           REFRESH_OWNERS),
    Option("consistency_check_every", 0, "int",
           "data parallel: compare bases across ranks every this many refreshes (0: never)", low=0),
    Option("matmul_precision", "auto", "choice", "precision of the Triton step's GEMMs", MATMUL_PRECISIONS),
    Option("moments_dtype", "float32", "choice",
           "storage of Adam's moments: float32, bfloat16, or int8 (bitsandbytes-style blockwise 8-bit)",
           MOMENT_DTYPES),
    Option("basis_dtype", "float32", "choice",
           "storage of a stored basis: float32, bfloat16, or int8 (8-bit blockwise codes, as the moments', "
           "materialized to fp32 a chunk at a time when a step reads it)",
           BASIS_DTYPES),
    Option("second_moment", "full", "choice",
           "Adam's second moment: full, or factored (Adafactor's row and column factors, fp32, with Adam's bias "
           "correction, each element's sqrt(V) at least its |M|: rows + cols numbers instead of rows x cols) for "
           "projected matrices and 2-D plain parameters",
           SECOND_MOMENTS),
    Option("residual", "fira", "choice",
           "what the projected step does with the gradient outside the subspace: none (GaLore), fira (add it, "
           "rescaled per channel by Adam's norm ratio), fira_tensor (one ratio per matrix), apollo (the whole "
           "gradient, channel-scaled, instead of the low-rank update); all but none limit the growth of the "
           "residual's norm; apollo_tensor (APOLLO-Mini's tensor-wise scaling: one ratio per matrix)",
           RESIDUALS),
    Option("limiter", "corrected", "choice",
           "units of the residual's norm-growth limiter: corrected (the bias-corrected step: lr warmup and Adam's "
           "early bias never trigger it; the first step is bounded) or raw (before bias corrections, first step "
           "unbounded: Fira's and APOLLO's code, for apollo-torch parity)", LIMITERS),
    Option("stochastic_rounding", False, "bool",
           "bf16 weights (projected and plain) take each update computed in fp32 and rounded stochastically, so "
           "updates below half a bf16 ulp survive on average; random bits from (seed, parameter index, step; an "
           "FSDP2 shard's first row)"),
    Option("plain_moments_dtype", None, "choice_or_none",
           "storage of the plain parameters' moments (embeddings, head; small ones keep torch AdamW's own); None: "
           "moments_dtype. Also int4: 4-bit blockwise codes, for 2-D parameters with an even number of columns "
           "(others take int8)",
           PLAIN_MOMENT_DTYPES),
    Option("plain_second_moment", None, "choice_or_none",
           "the plain 2-D parameters' second moment (embeddings, head): full or factored; None: second_moment",
           SECOND_MOMENTS),
    Option("plain_lr", None, "lr_or_none",
           "learning rate of the parameters that are not projected (embeddings, head, norms); None: the group's "
           "lr. An lr scheduler scales it by lr / initial_lr", low=0.0,
           fix="plain_lr must be None or a finite number >= 0, e.g. plain_lr=3e-3"),
)  # fmt: skip

BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}
# What an option missing from a loaded param group means, where that differs from today's default: the behaviour
# the checkpoint was saved with. ``residual`` became ``"fira"`` by default after checkpoints without it were made;
# the plain_* storage options did not exist (None: the plain parameters follow moments_dtype and second_moment).
ABSENT_MEANS: dict[str, Any] = {"residual": "none", "plain_moments_dtype": None, "plain_second_moment": None}
DEFAULTS: dict[str, Any] = {o.name: o.default for o in OPTIONS}
ALIASES: dict[str, str] = {o.alias: o.name for o in OPTIONS if o.alias}
# Group keys that are not options but that torch, its lr schedulers, loggers or our helpers put into groups:
# torch's params / param_names (named parameters); initial_lr (every lr scheduler), max_lr, min_lr,
# max_momentum, base_momentum (OneCycleLR), swa_lr (SWALR); name (a label Lightning's LearningRateMonitor and
# others read); lr_scale (timm's schedulers multiply lr by it). A copied group carries them; none changes a step.
GROUP_KEYS = frozenset(
    {
        "params",
        "param_names",
        "initial_lr",
        "max_lr",
        "min_lr",
        "max_momentum",
        "base_momentum",
        "swa_lr",
        "name",
        "lr_scale",
    }
)
# torch.optim.AdamW's own group flags, at the values that describe this optimizer: a group copied from an AdamW
# (``SubspaceAdamW(adamw.param_groups)``) keeps them; any other value asks for a mode SubspaceAdamW lacks.
TORCH_ADAMW_FLAGS: dict[str, tuple[Any, ...]] = {
    "amsgrad": (False,),
    "maximize": (False,),
    "capturable": (False,),
    "differentiable": (False,),
    "decoupled_weight_decay": (True,),
}


def suggest(key: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'rank'?)`` for a near miss of one of ``choices`` (difflib), else ``""``: the one hint
    every unknown-name error (constructor keywords, param group keys, optim_args, factory options) gives."""
    close = difflib.get_close_matches(key, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_group_keys(group: dict[str, Any], where: str) -> None:
    """Refuse a param group key that is neither an option nor one torch or a scheduler puts there: a typo
    (``"rnak"``) would otherwise leave the group training as plain AdamW without a word."""
    for key in sorted(set(group) - set(DEFAULTS) - GROUP_KEYS, key=str):
        if key in TORCH_ADAMW_FLAGS:
            if group[key] not in TORCH_ADAMW_FLAGS[key]:
                raise ValueError(
                    f"{where} sets {key}={group[key]!r}: SubspaceAdamW has no such mode (torch.optim.AdamW's flag). "
                    f"Remove it, or set it to {TORCH_ADAMW_FLAGS[key][0]!r}"
                )
            continue
        raise ValueError(
            f"{where} has unknown key {key!r}{suggest(str(key), list(DEFAULTS) + list(ALIASES))}: a group takes "
            f"SubspaceAdamW's options ({describe()}) and params. Fix or remove the key"
        )


def normalize_dtypes(options: dict[str, Any]) -> None:
    """Store a torch dtype given for a dtype choice (``moments_dtype=torch.bfloat16``) as the choice's string,
    in place, so groups and state dicts hold plain values. A dtype that is not a choice is left to ``validate``."""
    for name, value in list(options.items()):
        option = BY_NAME.get(name) if isinstance(name, str) else None
        if option is not None and option.kind in ("choice", "choice_or_none") and isinstance(value, torch.dtype):
            spelled = str(value).removeprefix("torch.")
            if spelled in option.choices:
                options[name] = spelled


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _scalar(x: Any) -> Any:
    """A 1-element tensor's value (torch accepts tensor lr and betas); anything else unchanged."""
    return x.item() if isinstance(x, Tensor) and x.numel() == 1 else x


# A value that is right for another option, and what to use instead.
_HINTS = {
    ("moments_dtype", "int4"): (
        "; 4-bit moments are for the plain parameters only (embeddings, head: torch's AdamW on decoded copies; the "
        "projected step's kernels read 8 bits): plain_moments_dtype='int4'"
    ),
}


def _fail(option: Option, value: Any, where: str, why: str, exc: type[Exception] = ValueError) -> None:
    label = option.label or option.name
    raise exc(f"Invalid {label}: {value!r} {where} - {why}")


def _check_choice(option: Option, value: Any, where: str) -> None:
    """Refuse a value that is not one of the option's choices, naming them (and ``_HINTS``' better option)."""
    if value not in option.choices:
        choices = ", ".join(repr(c) for c in option.choices)
        _fail(option, value, where, f"use one of {choices}" + _HINTS.get((option.name, value), ""))


def _check_real(option: Option, value: Any, where: str) -> None:
    value = _scalar(value)
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and option.low is not None:
        ok = value > option.low if option.open else value >= option.low
    if not ok:
        _fail(option, value, where, option.fix)


def _check_betas(value: Any, foreach: bool | None, where: str) -> None:
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        _fail(BY_NAME["betas"], value, where, "betas must be a pair (beta1, beta2), e.g. betas=(0.9, 0.999)", TypeError)
    if isinstance(value[0], Tensor) != isinstance(value[1], Tensor):
        raise ValueError(f"betas must be either both floats or both Tensors {where}, got {value!r}")
    for i, beta in enumerate(value):
        if isinstance(beta, Tensor):
            if foreach:
                raise ValueError(f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True")
            if beta.numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")
        beta = _scalar(beta)
        if not (isinstance(beta, numbers.Real) and not isinstance(beta, bool) and 0.0 <= beta < 1.0):
            raise ValueError(f"Invalid beta parameter at index {i}: {beta!r} {where} - must be in [0, 1)")


def _check_lr(value: Any, foreach: bool | None, where: str) -> None:
    if isinstance(value, Tensor):
        if foreach:
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
        if value.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
    _check_real(BY_NAME["lr"], value, where)


def validate(options: dict[str, Any], where: str) -> None:
    """Raise a ValueError/TypeError naming the bad option, its value and the fix (torch's wording for the
    AdamW hyperparameters: "Invalid learning rate: -1.0 ...")."""
    foreach = options.get("foreach")
    for option in OPTIONS:
        value = options[option.name]
        kind = option.kind
        if kind == "lr":
            _check_lr(value, foreach, where)
        elif kind == "betas":
            _check_betas(value, foreach, where)
        elif kind == "real":
            _check_real(option, value, where)
        elif kind == "rank":
            if value is not None:
                if not _is_int(value):
                    _fail(option, value, where, option.fix, TypeError)
                if value <= 0:
                    _fail(option, value, where, option.fix)
        elif kind == "int":
            fix = option.fix or (f"{option.name} must be an int" + ("" if option.low is None else f" >= {option.low}"))
            if not _is_int(value):
                _fail(option, value, where, fix, TypeError if option.type_error else ValueError)
            if option.low is not None and value < option.low:
                _fail(option, value, where, fix)
        elif kind == "choice" or (kind == "choice_or_none" and value is not None):
            _check_choice(option, value, where)
        elif kind == "lr_or_none" and value is not None:
            _check_real(option, value, where)
        elif kind == "bool_or_none" and value is not None and not isinstance(value, bool):
            _fail(option, value, where, f"{option.name} must be True, False or None", TypeError)
        elif kind == "bool" and not isinstance(value, bool):
            _fail(option, value, where, f"{option.name} must be True or False", TypeError)
    check_combinations(options, where)
    if options.get("fused") and options.get("foreach"):  # torch.optim.AdamW's rule, for the plain parameters
        raise ValueError(f"`fused` and `foreach` cannot be `True` together {where}: set one of them")
    if options["engine"] == "triton" and not triton_runtime.available():
        _fail(BY_NAME["engine"], "triton", where, "engine='triton' needs the triton package (pip install triton)")


def check_combinations(options: dict[str, Any], where: str) -> None:
    """Refuse option pairs that cannot mean anything, naming the fix (also run on every group at every step:
    a few lookups, so a live group changed into a meaningless pair is refused before anything moves)."""
    if options.get("moments_dtype") == "int4":  # the constructor's check; here for a live group's change
        _check_choice(BY_NAME["moments_dtype"], "int4", where)
    if options["refresh"] != "seeded":
        return
    if options["residual"] not in WHOLE_GRADIENT:
        raise ValueError(
            f"refresh='seeded' with residual={options['residual']!r} {where}: a seeded projection is APOLLO's "
            "random Gaussian sketch, not orthonormal, so it can size the update's channels but cannot carry a "
            "low-rank update back. Set residual='apollo' (or 'apollo_tensor'), or use refresh='random' for a "
            "stored orthonormal random basis"
        )
    if options["moments"] == "rotate":
        raise ValueError(
            f"refresh='seeded' with moments='rotate' {where}: successive seeded projections are independent "
            "draws, so there is no rotation between them to carry Adam's moments along. Set moments='keep' "
            "(APOLLO's behaviour) or moments='reset'"
        )


def plain_numbers(options: dict[str, Any]) -> None:
    """Store validated numbers as Python int/float (tensor lr and betas stay tensors, as in torch)."""
    for name, value in list(options.items()):
        option = BY_NAME.get(name)
        if option is None or value is None:
            continue
        if option.kind in ("int", "rank"):
            options[name] = int(value)
        elif option.kind in ("real", "lr_or_none") or (option.kind == "lr" and not isinstance(value, Tensor)):
            options[name] = float(value)
        elif option.kind == "betas":
            options[name] = tuple(b if isinstance(b, Tensor) else float(b) for b in value)


def translate_aliases(group: dict[str, Any], where: str) -> dict[str, Any]:
    """A copy of ``group`` with galore-torch's key names replaced by ours (both given: they must agree)."""
    group = dict(group)
    for alias, name in ALIASES.items():
        if alias in group:
            value = group.pop(alias)
            if name in group and group[name] != value:
                raise ValueError(f"{where} sets both {alias}={value!r} and {name}={group[name]!r}; keep one")
            group[name] = value
    return group


def describe() -> str:
    """The option list for error messages: every name, with galore's alias."""
    return ", ".join(f"{o.name} (galore: {o.alias})" if o.alias else o.name for o in OPTIONS)
