"""Run configuration: dataclass defaults, then a model-size YAML from ``configs/``, then command-line flags.

Every field is one flag (``rank`` is ``--rank``, ``update_gap`` is ``--update-gap``) and one YAML key, so
anything a config file sets can be overridden on the command line and nothing has two names.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import options, presets

OPTIMIZERS = ("adamw", "subspace", "galore", "galore8bit", "apollo", "adamw8bit")
CONFIGS_ENV = "SUBSPACE_OPTIM_CONFIGS"
CACHE_ENV = "SUBSPACE_OPTIM_CACHE"


def _bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def _optional(parse: Callable[[str], Any]) -> Callable[[Any], Any]:
    def parse_optional(text: Any) -> Any:
        if text is None or (isinstance(text, str) and text.strip().lower() in ("", "none", "null", "auto")):
            return None
        return parse(text)

    parse_optional.__name__ = getattr(parse, "__name__", "value")
    return parse_optional


def _names(text: str | Sequence[str]) -> list[str]:
    """A comma-separated list (CLI) or a YAML list of optimizer names, validated."""
    raw = text.split(",") if isinstance(text, str) else text
    items = [str(item).strip() for item in raw]
    items = [item for item in items if item]
    if not items:
        raise ValueError("expected at least one optimizer name")
    for name in items:
        if name not in OPTIMIZERS:
            hint = difflib.get_close_matches(name, OPTIMIZERS, n=1)
            raise ValueError(
                f"unknown optimizer {name!r}: choose from {', '.join(OPTIMIZERS)}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
            )
    if len(set(items)) != len(items):
        raise ValueError(f"optimizer listed twice in {items}")
    return items


def _lr(value: Any) -> float | dict[str, float]:
    """One learning rate for every optimizer (``3e-3``) or one per optimizer (``adamw=3e-3,subspace=1e-2``)."""
    if isinstance(value, dict):
        return {str(name): float(rate) for name, rate in value.items()}
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    if "=" not in text:
        return float(text)
    out: dict[str, float] = {}
    for item in text.split(","):
        name, _, number = item.partition("=")
        out[name.strip()] = float(number)
    return out


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse_choice(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"{text!r} is not one of {', '.join(allowed)}")
        return text

    parse_choice.__name__ = "choice"
    parse_choice.choices = allowed  # type: ignore[attr-defined]
    return parse_choice


def _opt(default: Any, text: str, parse: Callable[[Any], Any] | None = None, group: str = "training") -> Any:
    parse = parse or type(default)
    if parse is bool:
        parse = _bool
    mutable = isinstance(default, (list, dict))
    factory = {"default_factory": lambda: type(default)(default)} if mutable else {"default": default}
    return field(metadata={"help": text, "parse": parse, "group": group}, **factory)


_TABLE = object()


def _option(name: str, default: Any = _TABLE, scope: str = "subspace") -> Any:
    """A SubspaceAdamW option as a flag: help text, choices and default from ``options.OPTIONS``."""
    option = options.BY_NAME[name]
    default = option.default if default is _TABLE else default
    parse = {
        "choice": _choice(*option.choices),
        "choice_or_none": _optional(_choice(*option.choices)),
        "bool_or_none": _optional(_bool),
        "bool": _bool,
    }.get(option.kind, type(default))
    alias = f" (galore: {option.alias})" if option.alias else ""
    return _opt(default, f"{scope}: {option.help}{alias}", parse, group="optimizer")


# Options added after runs were checkpointed, recorded in a run's trajectory only when set (None follows another).
_RECORDED_WHEN_SET = ("plain_moments_dtype", "plain_second_moment")
# The config field of each SubspaceAdamW option whose flag has another name.
OPTION_FIELDS = {"seed": "subspace_seed", "fused": "subspace_fused"}


@dataclass
class PretrainConfig:
    """Everything a pretraining run depends on. Defaults here; a model YAML and flags override them."""

    # --- model (a size from configs/, whose keys below override these) ---------------------------------
    model: str = _opt(
        "llama_9m",
        "model size: a name in configs/ (llama_9m, llama_20m, llama_60m, llama_130m, "
        "llama_350m, llama_1b, llama_7b) or a path to a YAML file with the same keys",
        group="model",
    )
    hidden_size: int = _opt(128, "LLaMA hidden size", group="model")
    intermediate_size: int = _opt(352, "LLaMA MLP width", group="model")
    num_hidden_layers: int = _opt(4, "number of transformer blocks", group="model")
    num_attention_heads: int = _opt(4, "attention heads (hidden_size must divide by it)", group="model")
    num_key_value_heads: int | None = _opt(
        None,
        "key/value heads for grouped-query attention (default: num_attention_heads)",
        _optional(int),
        group="model",
    )
    rms_norm_eps: float = _opt(1e-6, "RMSNorm epsilon", group="model")
    initializer_range: float = _opt(0.02, "std of the normal weight init", group="model")
    tie_word_embeddings: bool = _opt(
        False, "share the input embedding and the output head (GaLore: false)", group="model"
    )

    # --- optimizers -------------------------------------------------------------------------------------
    optimizer: list[str] = _opt(
        ["adamw", "subspace"],
        "optimizer to train with, or a comma-separated list to "
        "compare (same as --compare); one of " + ", ".join(OPTIMIZERS),
        _names,
        group="optimizer",
    )
    lr: Any = _opt(
        {"adamw": 3e-3, "subspace": 1e-2, "galore": 1e-2, "galore8bit": 1e-2, "apollo": 1e-2, "adamw8bit": 3e-3},
        "peak learning rate: one number for every optimizer, or per optimizer as "
        "adamw=3e-3,subspace=1e-2 (subspace methods want a larger lr than AdamW)",
        _lr,
        group="optimizer",
    )
    lr_tuning: str = _opt(
        "not tuned for this model: the built-in defaults",
        "what chose --lr and --plain-lr (printed in the report, so a reader knows what was tuned)",
        group="optimizer",
    )
    weight_decay: float = _opt(0.0, "decoupled weight decay on matrices (never on norms/biases)", group="optimizer")
    adam_beta1: float = _opt(0.9, "Adam beta1", group="optimizer")
    adam_beta2: float = _opt(0.999, "Adam beta2", group="optimizer")
    adam_eps: float = _opt(1e-8, "Adam epsilon", group="optimizer")
    fused: bool | None = _opt(
        None, "adamw: torch's fused kernel (default: when the device supports it)", _optional(_bool), group="optimizer"
    )
    target_modules: str = _opt(
        "all-linear",
        "which linear layers are projected (subspace/galore/apollo): "
        "'all-linear' (every one but lm_head), a full-name regex, or a comma list of "
        "substrings such as attn,mlp",
        group="optimizer",
    )
    # SubspaceAdamW's options: help, choices and defaults from its option table (rank and update_gap get
    # defaults for the small built-in models); optimizers.build passes each one on by name.
    rank: int = _option("rank", 32, "subspace/galore/apollo")
    update_gap: int = _option("update_gap", 50, "subspace/galore/apollo")
    scale: float = _option("scale", scope="subspace/galore")
    refresh: str = _option("refresh")
    moments: str = _option("moments")
    proj_type: str = _option("proj_type", scope="subspace/galore/apollo")
    oversample: int = _option("oversample")
    power_iters: int = _option("power_iters")
    subspace_seed: int = _option("seed")
    seed_stream: str = _option("seed_stream")
    nonfinite: str = _option("nonfinite")
    engine: str = _option("engine")
    foreach: bool | None = _option("foreach")
    subspace_fused: bool | None = _option("fused")
    refresh_owner: str = _option("refresh_owner")
    consistency_check_every: int = _option("consistency_check_every")
    matmul_precision: str = _option("matmul_precision")
    moments_dtype: str = _option("moments_dtype")
    basis_dtype: str = _option("basis_dtype")
    second_moment: str = _option("second_moment")
    plain_moments_dtype: str | None = _option("plain_moments_dtype")
    plain_second_moment: str | None = _option("plain_second_moment")
    preset: str | None = _opt(
        None,
        "subspace: a named configuration (subspace_optim.presets: best_quality, balanced, least_memory); its options "
        "replace the model file's, and flags given with it replace its",
        _optional(_choice(*presets.PRESETS)),
        group="optimizer",
    )
    residual: str = _option("residual")
    limiter: str = _option("limiter")
    stochastic_rounding: bool = _option("stochastic_rounding")
    plain_lr: Any = _opt(
        None,
        "peak lr of the parameters that are not projected (embeddings, output head, norms), one number or per "
        "optimizer as adamw=1e-3,subspace=3e-3; none: the optimizer's --lr. subspace: SubspaceAdamW's plain_lr; "
        "adamw/adamw8bit/galore/apollo: those parameters' own groups, the selected linear layers keep --lr",
        _optional(_lr),
        group="optimizer",
    )
    apollo_scale: float = _opt(1.0, "apollo: update scale (APOLLO-Mini uses 128 with rank 1)", group="optimizer")
    apollo_proj: str = _opt("random", "apollo: projection", _choice("random", "svd"), group="optimizer")
    apollo_scale_type: str = _opt(
        "channel", "apollo: gradient scaling granularity", _choice("channel", "tensor"), group="optimizer"
    )

    # --- schedule and steps -----------------------------------------------------------------------------
    steps: int = _opt(300, "optimizer steps per optimizer")
    seq_len: int = _opt(256, "tokens per training sequence")
    batch_size: int = _opt(8, "sequences per micro-batch on each process")
    grad_accum: int = _opt(1, "micro-batches accumulated per optimizer step")
    global_batch_size: int | None = _opt(
        None, "sequences per optimizer step over all processes; when set, grad_accum is derived from it", _optional(int)
    )
    warmup_steps: int | None = _opt(None, "linear warmup steps (default: 10%% of --steps)", _optional(int))
    min_lr_ratio: float = _opt(0.1, "cosine decay ends at this fraction of the peak lr")
    max_grad_norm: float = _opt(1.0, "clip the global gradient norm to this (0: no clipping)")
    layerwise: bool = _opt(
        False,
        "subspace: update each weight inside backward as soon as its gradient is complete and free it "
        "(SubspaceAdamW.update_in_backward), so gradients are never all alive; --max-grad-norm then clips by the "
        "layer-wise rule (docs/pretrain.md). The other optimizers step as usual",
        group="optimizer",
    )
    precision: str = _opt(
        "auto", "auto: bf16 autocast on a GPU that supports it, fp32 otherwise", _choice("auto", "fp32", "bf16")
    )
    weights: str = _opt(
        "fp32",
        "the dtype the model's parameters are stored and updated in: fp32; bf16 (no fp32 master copy: an update "
        "below half a bf16 ulp is rounded away unless --stochastic-rounding); int8 (the linear layers' weights as "
        "torchao's int8 training weights with fp32 row scales, requantized stochastically; needs torchao; refused "
        "under an accelerate FSDP config, whose checkpoints cannot hold them)",
        _choice("fp32", "bf16", "int8"),
    )
    cpu: bool = _opt(False, "train on the CPU even when a GPU is present")
    seed: int = _opt(
        0,
        "model init and data order (identical for every compared optimizer); each process's "
        "global RNG is then seeded with seed + rank",
    )
    threads: int | None = _opt(None, "torch CPU threads per process (default: torch's choice)", _optional(int))

    # --- data -------------------------------------------------------------------------------------------
    dataset: str = _opt(
        "builtin",
        "'builtin' (Python standard library source, no network), a local "
        ".txt/.jsonl/.json/.parquet file, directory or glob, or a Hugging Face hub dataset name "
        "(streamed)",
        group="data",
    )
    dataset_config: str | None = _opt(
        None, "hub dataset configuration, e.g. 'en' for allenai/c4", _optional(str), group="data"
    )
    text_field: str = _opt("text", "jsonl/parquet/hub column that holds the text", group="data")
    max_train_bytes: int = _opt(8_000_000, "read at most this much training text", group="data")
    max_eval_bytes: int = _opt(1_000_000, "read at most this much held-out text", group="data")
    heldout_fraction: float = _opt(
        0.05,
        "share of documents held out for evaluation (local files; hub "
        "datasets use their validation split when there is one)",
        group="data",
    )
    tokenizer: str | None = _opt(
        None,
        "a tokenizer.json file, a directory or hub name for "
        "transformers.AutoTokenizer; default: a byte-level BPE trained on the "
        "training text and cached",
        _optional(str),
        group="data",
    )
    tokenizer_vocab: int = _opt(8192, "vocabulary size of the trained BPE tokenizer", group="data")
    tokenizer_train_bytes: int = _opt(4_000_000, "train the BPE tokenizer on this much text", group="data")
    cache_dir: str | None = _opt(
        None,
        f"tokenizer and token cache (default: ${CACHE_ENV} or ~/.cache/subspace_optim)",
        _optional(str),
        group="data",
    )

    # --- evaluation, logging, checkpoints ---------------------------------------------------------------
    eval_every: int = _opt(
        50,
        "evaluate on held-out text every this many steps, and at the start, the end and --stop-at (0: only those)",
        group="output",
    )
    eval_windows: int = _opt(32, "held-out sequences per evaluation", group="output")
    eval_batch_size: int = _opt(16, "sequences per evaluation forward pass", group="output")
    output_dir: str | None = _opt(
        None, "where runs and the report go (default: runs/<model>)", _optional(str), group="output"
    )
    save_every: int = _opt(100, "checkpoint every this many steps, and at the end (0: only at the end)", group="output")
    keep_checkpoints: int = _opt(1, "complete checkpoints kept per run", group="output")
    resume: bool = _opt(
        False,
        "continue each run from its latest checkpoint in --output-dir (runs without "
        "one start fresh; finished runs are reported, not retrained)",
        group="output",
    )
    stop_at: int | None = _opt(
        None,
        "end this invocation after this many steps, with a checkpoint (for "
        "splitting a run across jobs; --resume continues)",
        _optional(int),
        group="output",
    )
    progress: bool = _opt(True, "show a progress bar", group="output")
    report: bool = _opt(True, "write the comparison report (markdown table and plots)", group="output")

    def lr_for(self, optimizer: str) -> float:
        if isinstance(self.lr, dict):
            if optimizer not in self.lr:
                raise ValueError(
                    f"no learning rate for optimizer {optimizer!r} in lr={self.lr}: add {optimizer}=<lr> to --lr"
                )
            return float(self.lr[optimizer])
        return float(self.lr)

    def plain_lr_for(self, optimizer: str) -> float | None:
        """The separate lr of the parameters that are not projected, or None (they take ``lr_for``)."""
        if isinstance(self.plain_lr, dict):
            value = self.plain_lr.get(optimizer)
            return None if value is None else float(value)
        return None if self.plain_lr is None else float(self.plain_lr)

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 10)

    def validate(self) -> None:
        """Reject impossible settings before any data or model is built. Each optimizer's lr is checked later, by
        ``check_lrs`` in ``preflight``, after whether the optimizer can run here at all (package, CUDA)."""
        positive = (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "steps",
            "seq_len",
            "batch_size",
            "grad_accum",
            "rank",
            "update_gap",
            "eval_windows",
            "eval_batch_size",
            "tokenizer_vocab",
            "max_train_bytes",
            "max_eval_bytes",
            "keep_checkpoints",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"--{_flag(name)} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads {self.num_attention_heads}"
            )
        for name in ("eval_every", "save_every", "oversample", "power_iters", "consistency_check_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{_flag(name)} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"--heldout-fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"--warmup-steps must be in [0, --steps={self.steps}], got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.stop_at is not None and self.stop_at <= 0:
            raise ValueError(f"--stop-at must be a positive step, got {self.stop_at}")

    def check_lrs(self) -> None:
        """Every optimizer of the run has a learning rate above 0 (a per-optimizer --lr may leave one out)."""
        for name in self.optimizer:
            lr = self.lr_for(name)
            if not lr > 0:
                raise ValueError(f"learning rate for {name} must be > 0, got {lr}")

    def trajectory_fields(self, optimizer: str) -> dict[str, Any]:
        """The settings a resumed run of ``optimizer`` must share with its checkpoint to be the same run.

        The learning-rate schedule is part of it, in its effective form: this optimizer's peak lr (so another
        optimizer's entry in a per-optimizer ``--lr`` may change), the warmup actually used (``--warmup-steps``
        or its default, 10% of ``--steps``), and ``--steps``, which the cosine decay spans: a resumed scheduler
        restores its base lrs from the checkpoint, so a different value would otherwise be logged but not used,
        or (warmup, steps) change the lr of the remaining steps mid-run.
        """
        skip = {
            "optimizer",
            "eval_every",
            "eval_windows",
            "eval_batch_size",
            "output_dir",
            "save_every",
            "keep_checkpoints",
            "resume",
            "stop_at",
            "progress",
            "report",
            "cache_dir",
            "threads",
            "lr",  # replaced by this optimizer's effective lr below
            "plain_lr",  # likewise
            "lr_tuning",  # a note for the report
            "warmup_steps",  # replaced by the effective warmup below
        }
        if optimizer != "subspace":
            skip.add("layerwise")  # only SubspaceAdamW updates inside backward
        fields = {name: value for name, value in dataclasses.asdict(self).items() if name not in skip}
        fields["lr"] = self.lr_for(optimizer)
        fields["plain_lr"] = self.plain_lr_for(optimizer)
        fields["warmup"] = self.warmup
        for key in _RECORDED_WHEN_SET:  # unset, they change nothing: checkpoints from before them still resume
            if fields[key] is None:
                fields.pop(key)
        return fields


FIELDS = {spec.name: spec for spec in dataclasses.fields(PretrainConfig)}


def _flag(name: str) -> str:
    return name.replace("_", "-")


# ------------------------------------------------------------------------------------------- config files
def configs_dir() -> Path:
    """The directory of model-size YAMLs.

    Looked up in order: ``$SUBSPACE_OPTIM_CONFIGS``, the repository's ``configs/`` (an editable install or
    a clone), ``<prefix>/share/subspace-optim/configs`` (where a wheel would install them as data files),
    ``./configs``.
    """
    candidates = []
    env = os.environ.get(CONFIGS_ENV)
    if env:
        candidates.append(Path(env).expanduser())
    candidates.append(Path(__file__).resolve().parents[2] / "configs")
    candidates.append(Path(sys.prefix) / "share" / "subspace-optim" / "configs")  # a wheel's data-files
    candidates.append(Path.cwd() / "configs")
    for candidate in candidates:
        if candidate.is_dir() and any(candidate.glob("llama_*.yaml")):
            return candidate
    tried = ", ".join(str(candidate) for candidate in candidates)
    raise FileNotFoundError(
        f"no model configs found (looked in {tried}). Run from a clone of the repository (pip install -e .), "
        f"or set {CONFIGS_ENV} to a directory holding llama_*.yaml, or pass --model path/to/model.yaml"
    )


def _size_key(name: str) -> tuple[float, str]:
    match = re.fullmatch(r"llama_(\d+)([mb])", name)
    return (int(match.group(1)) * (1e9 if match.group(2) == "b" else 1e6), name) if match else (math.inf, name)


def model_names() -> list[str]:
    """Model sizes in configs/, smallest first."""
    return sorted((path.stem for path in configs_dir().glob("llama_*.yaml")), key=_size_key)


def model_file(model: str) -> Path:
    """Resolve ``--model`` (a size name or a YAML path) to a file, or raise naming the choices."""
    as_path = Path(model).expanduser()
    if model.endswith((".yaml", ".yml")) or os.sep in model:
        if not as_path.is_file():
            raise FileNotFoundError(f"model config file {model} does not exist")
        return as_path
    if model.startswith("accelerate_"):
        raise ValueError(
            f"--model {model}: configs/{model}.yaml is an accelerate launch config; pass it to "
            f"`accelerate launch --config_file`, and choose a model size with --model ({', '.join(model_names())})"
        )
    path = configs_dir() / f"{model}.yaml"
    if not path.is_file():
        names = model_names()
        hint = difflib.get_close_matches(model, names, n=1)
        raise ValueError(
            f"unknown model size {model!r}: choose one of {', '.join(names)}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + f", or pass a YAML file path (sizes live in {configs_dir()})"
        )
    return path


def read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
    return data


def _coerce(name: str, value: Any, where: str) -> Any:
    if name not in FIELDS:
        hint = difflib.get_close_matches(name, list(FIELDS), n=1)
        raise ValueError(f"{where}: unknown option {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    parse = FIELDS[name].metadata["parse"]
    try:
        if value is None or parse in (_names, _lr) or isinstance(value, str):
            return parse(value)
        if parse is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if parse is int and isinstance(value, bool):
            raise ValueError("expected an integer")
        return parse(value) if not isinstance(value, (list, dict)) else value
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: bad value for {name}: {value!r} ({err})") from err


# ------------------------------------------------------------------------------------------- command line
def build_parser(prog: str = "subspace-optim pretrain") -> argparse.ArgumentParser:
    """The pretraining flags, one per config field, all defaulting to 'not given' so a YAML value survives."""
    parser = argparse.ArgumentParser(
        prog=prog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Pretrain a LLaMA built from configs/ (no weights downloaded) with one or several optimizers on "
            "identical data, and write a comparison report.\n\nPrecedence: built-in defaults < the model's "
            "YAML < flags. Defaults shown are the built-in ones; the YAML usually changes some of them."
        ),
        argument_default=argparse.SUPPRESS,
    )
    groups = {
        "model": parser.add_argument_group("model"),
        "optimizer": parser.add_argument_group("optimizers"),
        "training": parser.add_argument_group("training"),
        "data": parser.add_argument_group("data"),
        "output": parser.add_argument_group("evaluation, output and checkpoints"),
    }
    defaults = PretrainConfig()
    for name, spec in FIELDS.items():
        parse = spec.metadata["parse"]
        default = getattr(defaults, name)
        shown = ",".join(default) if isinstance(default, list) else default
        if isinstance(default, dict):
            shown = ",".join(f"{key}={value:g}" for key, value in default.items())
        help_text = spec.metadata["help"] + ("" if default is None else f" (default: {shown})")
        target = groups[spec.metadata["group"]]
        flag = f"--{_flag(name)}"
        if parse is _bool:
            target.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
            continue
        kwargs: dict[str, Any] = {"type": _argparse_type(parse), "help": help_text, "metavar": name.upper()}
        choices = getattr(parse, "choices", None)
        if choices:
            kwargs.update(choices=choices, metavar=None)
        target.add_argument(flag, **kwargs)
    groups["optimizer"].add_argument(
        "--compare",
        dest="optimizer",
        type=_argparse_type(_names),
        metavar="A,B,...",
        help="train each listed optimizer on identical data and seed, then write one report",
    )
    return parser


def _argparse_type(parse: Callable[[Any], Any]) -> Callable[[str], Any]:
    """Wrap a parser so argparse prints its message instead of a bare 'invalid value'."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except (TypeError, ValueError) as err:
            raise argparse.ArgumentTypeError(str(err)) from err

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def load_config(argv: Sequence[str] | None = None, **overrides: Any) -> PretrainConfig:
    """Parse flags, read the model's YAML, and merge: built-in defaults < YAML < flags < ``overrides``."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    flags = {**args, **overrides}
    model = flags.get("model", PretrainConfig.model)
    path = model_file(model)
    merged: dict[str, Any] = {}
    for key, value in read_yaml(path).items():
        if key == "model":
            raise ValueError(f"{path}: 'model' cannot be set inside a model file")
        merged[key] = _coerce(key, value, str(path))
    for key, value in flags.items():
        merged[key] = _coerce(key, value, "command line") if key not in args else value
    if merged.get("preset"):  # over the model file, under the flags given with it
        for key, value in presets.options_of(merged["preset"]).items():
            if OPTION_FIELDS.get(key, key) not in flags:
                merged[OPTION_FIELDS.get(key, key)] = value
    merged["model"] = model
    config = PretrainConfig(**merged)
    config.validate()
    return config
