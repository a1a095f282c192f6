"""The option table is the one list of SubspaceAdamW's options: the constructor, the Trainer's optim_args and
the pretrain flags all follow it, and every row's validation names the option."""

from __future__ import annotations

import inspect

import pytest
import torch

from subspace_optim import SubspaceAdamW, options


def test_constructor_signature_is_the_table():
    params = inspect.signature(SubspaceAdamW.__init__).parameters
    # ``preset`` names a dict of options (subspace_optim.presets), not an option itself.
    declared = {n: p.default for n, p in params.items() if n not in ("self", "params", "unexpected", "preset")}
    assert declared == options.DEFAULTS
    assert params["preset"].default is None


def test_every_option_reaches_optim_args_and_pretrain_flags():
    from subspace_optim.integrations.transformers import _ARGS_FIELDS, _OPTIM_ARGS
    from subspace_optim.pretrain.config import OPTION_FIELDS, PretrainConfig

    fields = set(PretrainConfig.__dataclass_fields__)
    for option in options.OPTIONS:
        if option.name not in _ARGS_FIELDS:  # lr, betas, eps, weight_decay come from TrainingArguments
            assert option.name in _OPTIM_ARGS, option.name
            assert OPTION_FIELDS.get(option.name, option.name) in fields, option.name
        if option.alias:
            assert option.alias in _OPTIM_ARGS


BAD = {
    "real": float("inf"),
    "int": -5,
    "rank": 0,
    "choice": "nope",
    "choice_or_none": "nope",
    "bool_or_none": "yes",
    "bool": 1,
    "lr": -1.0,
    "betas": (2.0, 0.5),
    "lr_or_none": -1.0,
}


@pytest.mark.parametrize("option", options.OPTIONS, ids=lambda o: o.name)
def test_every_option_is_validated_naming_itself(option):
    w = torch.nn.Parameter(torch.randn(4, 3))
    label = "beta parameter" if option.kind == "betas" else (option.label or option.name)
    bad = "7" if option.name == "seed" else BAD[option.kind]  # every int is a seed
    with pytest.raises((ValueError, TypeError), match=f"Invalid {label}"):
        SubspaceAdamW([w], **{option.name: bad})
    with pytest.raises((ValueError, TypeError), match=f"Invalid {label}.* in param group 0"):
        SubspaceAdamW([{"params": [w], option.name: bad}])
