"""Writes docs/options.md from the code that defines the options, so the reference cannot drift from it.

Every row comes from the option table (``options.OPTIONS``), the Trainer's ``optim_args`` parser tables
(``integrations.transformers``) and the ``subspace-optim pretrain`` argument parser (``pretrain.config``):
the same objects that validate, parse and expose the options at run time.

    python -m subspace_optim.options_doc           # rewrite docs/options.md
    python -m subspace_optim.options_doc --check   # exit 1 if docs/options.md differs from the code
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from . import options, presets

DOC = Path(__file__).resolve().parents[1] / "docs" / "options.md"
COMMAND = "python -m subspace_optim.options_doc"

# AdamW hyperparameters the pretrain job reads from its adam_* fields (pretrain.optimizers.build) rather than
# from a field named after the option; tests/test_docs.py checks that these fields exist.
PRETRAIN_ADAM_FIELDS: dict[str, tuple[str, ...]] = {"betas": ("adam_beta1", "adam_beta2"), "eps": ("adam_eps",)}


def _cell(text: Any) -> str:
    """Table-safe text: pipes and tag-like brackets escaped, newlines folded, argparse's %% unescaped."""
    return " ".join(str(text).replace("%%", "%").replace("|", "\\|").replace("<", "\\<").split())


def _code(values: Iterable[Any]) -> str:
    return ", ".join(f"`{v}`" for v in values)


def _values(option: options.Option) -> str:
    """What the validator accepts, in words, from the option's kind and bounds."""
    bound = "" if option.low is None else f" {'>' if option.open else '>='} {option.low:g}"
    kinds = {
        "lr": f"float{bound} (or a 1-element tensor)",
        "betas": "(beta1, beta2), each in [0, 1)",
        "real": f"float{bound}",
        "int": f"int{'' if option.low is None else f' >= {option.low:g}'}",
        "rank": "int > 0, or `None`",
        "bool_or_none": "`True`, `False` or `None`",
        "lr_or_none": f"float{bound}, or `None`",
    }
    if option.choices:
        none = ", or `None`" if option.kind == "choice_or_none" else ""
        return _code(option.choices) + none + _dtype_note(option)
    return kinds.get(option.kind, option.kind)


def _dtype_note(option: options.Option) -> str:
    """Choices that name torch dtypes also accept the dtype itself, where ``options.normalize_dtypes`` exists."""
    import torch

    if not hasattr(options, "normalize_dtypes"):
        return ""
    if all(isinstance(getattr(torch, c, None), torch.dtype) for c in option.choices):
        return f" (in Python also the torch dtype, e.g. `torch.{option.choices[-1]}`)"
    return ""


def _trainer_column(option: options.Option) -> str:
    from .integrations import transformers as hf

    if option.name in hf._ARGS_FIELDS:
        fields = hf._ARGS_FIELDS[option.name].split(" and ")
        return "`TrainingArguments(" + ", ".join(f"{field}=..." for field in fields) + ")`"
    if option.name in hf._OPTIM_ARGS:
        example = hf._OPTIM_ARGS[option.name][1]
        none = " (or `none`)" if option.name in getattr(hf, "_NULLABLE", ()) else ""
        return f'`optim_args="{option.name}={example}"`{none}'
    return "not accepted"


def _pretrain_column(option: options.Option) -> str:
    from .pretrain.config import FIELDS, OPTION_FIELDS, PretrainConfig

    names = PRETRAIN_ADAM_FIELDS.get(option.name) or (OPTION_FIELDS.get(option.name, option.name),)
    if not all(name in FIELDS for name in names):
        return "not a flag"
    text = ", ".join(f"`--{name.replace('_', '-')}`" for name in names)
    if len(names) == 1:
        built_in = getattr(PretrainConfig(), names[0])
        if not isinstance(built_in, dict) and built_in != option.default:
            text += f" (built-in default `{built_in}`)"
    return text


def _option_rows() -> list[str]:
    rows = [
        "| option (galore alias) | default | values | Trainer | `subspace-optim pretrain` | what it does |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for o in options.OPTIONS:
        name = f"`{o.name}`" + (f" (`{o.alias}`)" if o.alias else "")
        cells = (name, f"`{o.default!r}`", _values(o), _trainer_column(o), _pretrain_column(o), _cell(o.help))
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _trainer_extras() -> list[str]:
    """optim_args keys that are not optimizer options (what build_optimizer does with the model)."""
    from .integrations.transformers import _OPTIM_ARGS

    known = set(options.DEFAULTS) | set(options.ALIASES)
    extras = [key for key in _OPTIM_ARGS if key not in known]
    if not extras:
        return []
    kinds = {bool: "`true` or `false`", int: "an int", float: "a number", str: "a string"}
    lines = [
        "Besides the options, `optim_args` accepts these keys of the Trainer integration "
        "([trainer.md](trainer.md) says what they do):",
        "",
    ]
    lines += [f"- `{key}`: {kinds.get(_OPTIM_ARGS[key][0], 'a value')}" for key in extras]
    return lines + [""]


# What a flag's parser (pretrain.config, by function name) accepts, in words.
_FLAG_VALUES = {
    "int": "int",
    "float": "float",
    "str": "text",
    "_lr": "number, or name=number,...",
    "_names": "name,name,...",
    "_bool": "`true` or `false`",
}


def _flag_values(action: argparse.Action) -> str:
    if action.choices:
        return _code(action.choices)
    if isinstance(action, argparse.BooleanOptionalAction):
        return "switch"
    return _FLAG_VALUES.get(getattr(action.type, "__name__", ""), "")


def _pretrain_flags() -> list[str]:
    from .pretrain.config import build_parser

    parser = build_parser()
    lines = [_cell(parser.description.split("\n\n")[-1]) + " See [pretrain.md](pretrain.md).", ""]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.option_strings and a.dest != "help"]
        if not actions:
            continue
        lines += [f"### {group.title}", "", "| flag | values | meaning |", "| --- | --- | --- |"]
        for action in actions:
            flag = " / ".join(f"`{s}`" for s in action.option_strings)
            lines.append(f"| {flag} | {_flag_values(action)} | {_cell(action.help or '')} |")
        lines.append("")
    return lines


def _preset_rows() -> list[str]:
    """The presets (``subspace_optim.presets``), each as the options it sets."""
    rows = [
        "## Presets",
        "",
        "Named option dicts from the memory-quality frontier (`subspace_optim.presets`): "
        '`SubspaceAdamW(groups, preset="balanced")`, `param_groups(model, ..., preset=...)`, '
        '`optim_args="preset=balanced"`, `subspace-optim pretrain --preset balanced`. A preset fills the options '
        "a group does not set; options given with it win.",
        "",
        "| preset | options |",
        "| --- | --- |",
    ]
    for name, chosen in presets.PRESETS.items():
        rows.append(f"| `{name}` | {', '.join(f'`{k}={v!r}`' for k, v in chosen.items())} |")
    return [*rows, ""]


def render() -> str:
    """The whole of docs/options.md."""
    lines = [
        "# Options",
        "",
        f"<!-- Generated from subspace_optim/options.py and the code that parses it: run `{COMMAND}`. "
        "Do not edit by hand. -->",
        "",
        "Every option is a keyword of `SubspaceAdamW(...)`, which makes it the default of every param group, and "
        "a key a param group may set for itself (`param_groups(model, ..., **options)` puts options on the "
        "projected group). galore-torch's alias is accepted wherever the option is. The Trainer column is how "
        "`subspace_optim.integrations.transformers` reads it from `TrainingArguments`; the last but one column "
        "is the `subspace-optim pretrain` flag. What the choices mean, in depth: [optimizer.md](optimizer.md).",
        "",
        *_option_rows(),
        "",
        *_preset_rows(),
        *_trainer_extras(),
        "## `subspace-optim pretrain` flags",
        "",
        "Every flag is also a key of `configs/<model>.yaml`.",
        *_pretrain_flags(),
    ]
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=COMMAND, description="Write docs/options.md from the option table.")
    ap.add_argument("--check", action="store_true", help="exit 1 if the file differs from what the code renders")
    ap.add_argument("--path", type=Path, default=DOC, help=f"file to write or check (default: {DOC})")
    args = ap.parse_args(argv)
    text = render()
    current = args.path.read_text(encoding="utf-8") if args.path.exists() else None
    if args.check:
        if current != text:
            print(f"{args.path} is stale: run `{COMMAND}`", file=sys.stderr)
            return 1
        return 0
    if current != text:
        args.path.write_text(text, encoding="utf-8")
        print(f"wrote {args.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
