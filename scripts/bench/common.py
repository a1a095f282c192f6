"""What every benchmark shares, written once: model shapes read from ``configs/``, the library's defaults read
from its option table, models built as ``subspace-optim pretrain`` builds them, one environment record, one
interleaved timer, and one result-file format that ``scripts.bench.render`` turns into markdown.

A result file is JSON: ``{"benchmark": name, "environment": {...}, "tables": [table, ...], ...data}``, where a
table is ``{"title", "columns", "rows", "notes"}`` with formatted cells; with ``--csv`` every table is also
written as CSV beside it. Docs tables are rendered from these files, never appended by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from subspace_optim import options
from subspace_optim.pretrain.config import PretrainConfig, model_file, read_yaml

ROOT = Path(__file__).resolve().parents[2]
# Distributions whose versions go into every environment record (when installed).
VERSIONED = ("torch", "triton", "transformers", "galore-torch", "bitsandbytes", "apollo-torch")


# ------------------------------------------------------------------------------------------------ shapes
@dataclass(frozen=True)
class LlamaShape:
    """A LLaMA size as ``configs/llama_<name>.yaml`` gives it (``layers`` may be cut, e.g. 7b-layer)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    rank: int

    def projected(self) -> list[tuple[int, int]]:
        """(out, in) shapes of the projected matrices: per layer q, k, v, o, gate, up, down."""
        layer = [(self.hidden, self.hidden)] * 4 + [(self.intermediate, self.hidden)] * 2
        return (layer + [(self.hidden, self.intermediate)]) * self.layers


CPU_MODELS = ("smoke", "60m")  # what the step and refresh benchmarks time on CPU
# SubspaceAdamW configurations timed by the host benchmark and compiled by gpu_check, as options over the
# library's defaults (an empty dict: the defaults).
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "fira": {"residual": "fira"},
    "int8_bf16": {"moments_dtype": "int8", "basis_dtype": "bfloat16"},
    "fused": {"fused": True},  # the plain parameters on torch's fused AdamW: they skip on the device too
}
# The tiny shape every ``--smoke`` run uses (not a LLaMA size: a pipeline check, seconds on CPU).
SMOKE = LlamaShape("smoke", hidden=64, intermediate=172, layers=2, heads=4, vocab=320, rank=16)


def projected_params(shape: LlamaShape, device: str, dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """The projected matrices of ``shape``, seeded, each with a gradient."""
    generator = torch.Generator(device=device).manual_seed(0)
    params = []
    for rows, cols in shape.projected():
        weight = 0.02 * torch.randn(rows, cols, device=device, generator=generator)
        param = torch.nn.Parameter(weight.to(dtype))
        param.grad = (1e-3 * torch.randn(rows, cols, device=device, generator=generator)).to(dtype)
        params.append(param)
    return params


def model_config(name: str) -> dict[str, Any]:
    """The keys of ``configs/llama_<name>.yaml`` (``name`` as ``1b`` or ``llama_1b``), by the pretrain reader."""
    return read_yaml(model_file(name if name.startswith("llama_") else f"llama_{name}"))


def llama_shape(name: str) -> LlamaShape:
    """The size ``name`` from ``configs/``; ``<size>-layer`` is one layer of it; ``smoke`` is ``SMOKE``."""
    if name == "smoke":
        return SMOKE
    size, _, one_layer = name.partition("-")
    cfg = model_config(size)
    layers = 1 if one_layer == "layer" else cfg["num_hidden_layers"]
    return LlamaShape(
        name,
        cfg["hidden_size"],
        cfg["intermediate_size"],
        layers,
        cfg["num_attention_heads"],
        cfg["tokenizer_vocab"],
        cfg["rank"],
    )


def library_default(name: str) -> Any:
    """A SubspaceAdamW option's default, from the library's option table (never restated here)."""
    return options.DEFAULTS[name]


def build_llama(shape: LlamaShape, seed: int = 0, max_positions: int = 256) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` of ``shape``, built as ``subspace-optim pretrain`` builds it."""
    from subspace_optim.pretrain import loop

    cfg = PretrainConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        seq_len=max_positions,
        seed=seed,
    )
    return loop.build_model(cfg, shape.vocab)


# -------------------------------------------------------------------------------------------- training
def byte_tokens(text: str) -> Tensor:
    """UTF-8 bytes as int64 token ids (vocabulary 256)."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def corpus_tokens(train_bytes: int = 2_000_000, heldout_bytes: int = 200_000) -> tuple[Tensor, Tensor]:
    """(train, held-out) byte tokens of the built-in standard-library corpus (on every machine)."""
    from subspace_optim.pretrain import corpus

    held = byte_tokens(corpus.stdlib_text(heldout_bytes, split="heldout")) if heldout_bytes else byte_tokens("")
    return byte_tokens(corpus.stdlib_text(train_bytes)), held


def token_windows(tokens: Tensor, batch: int, seq: int, seed: int) -> Iterator[Tensor]:
    """Endless random windows of ``seq + 1`` tokens from a private generator (the same for every optimizer)."""
    generator = torch.Generator().manual_seed(seed)
    limit = tokens.numel() - seq - 1
    while True:
        starts = torch.randint(0, limit, (batch,), generator=generator)
        yield torch.stack([tokens[start : start + seq + 1] for start in starts.tolist()])


def next_token_loss(model: nn.Module, window: Tensor) -> Tensor:
    logits = model(input_ids=window[:, :-1]).logits
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), window[:, 1:].reshape(-1))


def train_steps(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    windows: Iterator[Tensor],
    steps: int,
    around_step: Callable[[int], AbstractContextManager[Any]] | None = None,
) -> tuple[list[float], float]:
    """``steps`` steps of next-token prediction, ``around_step(k)`` around each ``opt.step()`` (after backward):
    (the losses, the seconds they took)."""
    losses = []
    start = time.perf_counter()
    for k in range(steps):
        loss = next_token_loss(model, next(windows))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with around_step(k) if around_step is not None else nullcontext():
            opt.step()
        losses.append(loss.item())
    return losses, time.perf_counter() - start


@torch.no_grad()
def heldout_loss(model: nn.Module, tokens: Tensor, seq: int, max_windows: int = 32) -> float:
    """Mean next-token loss over consecutive, non-overlapping windows of held-out tokens."""
    model.eval()
    count = min(max_windows, (tokens.numel() - 1) // seq)
    windows = torch.stack([tokens[i * seq : i * seq + seq + 1] for i in range(count)])
    loss = float(next_token_loss(model, windows))
    model.train()
    return loss


# ---------------------------------------------------------------------------------------- environment
def pick_device(requested: str = "auto", smoke: bool = False) -> str:
    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() and not smoke else "cpu"


def set_threads(threads: int | None, device: str) -> None:
    """``threads`` torch threads; on CPU one by default (benchmarks share machines), torch's choice on CUDA."""
    threads = threads or (1 if device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            found = (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
            return next(found, None) or platform.machine()
    except OSError:
        return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    """Python's and every ``VERSIONED`` distribution's version (those installed)."""
    found = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True, timeout=10
    ).stdout.strip()
    return done.stdout.strip() + ("+changes" if dirty else "")


def command_line() -> str:
    """How this benchmark was started, as one would type it from the repository root."""
    main = sys.modules.get("__main__")
    module = getattr(getattr(main, "__spec__", None), "name", None)
    start = ["python", "-m", module] if module else ["python", *sys.argv[:1]]
    return shlex.join([*start, *sys.argv[1:]])


def environment(device: str = "cpu") -> dict[str, Any]:
    """The one environment record every result carries."""
    on_gpu = device == "cuda" and torch.cuda.is_available()
    return {
        "device": device,
        "device_name": torch.cuda.get_device_name() if on_gpu else f"{cpu_name()} CPU",
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(),
        "versions": versions(),
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "command": command_line(),
    }


# ---------------------------------------------------------------------------------------------- timing
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timings:
    """Seconds per round of every variant, in the order they ran (each round ran every variant once)."""

    runs: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.runs[name])

    def ratios(self, name: str, baseline: str) -> list[float]:
        """Per round, ``name``'s time over the baseline's: the steps of a round ran back to back, under one load."""
        return [ours / base for ours, base in zip(self.runs[name], self.runs[baseline], strict=True)]

    def summary(self, baseline: str) -> dict[str, dict[str, Any]]:
        """Per variant: its rounds, their median, and the median of its per-round ratios against ``baseline``."""
        return {
            name: {
                "median_s": self.median(name),
                "runs_s": times,
                f"vs_{baseline}": statistics.median(self.ratios(name, baseline)),
            }
            for name, times in self.runs.items()
        }


def interleaved(
    steps: Mapping[str, Callable[[], Any]],
    rounds: int,
    device: str = "cpu",
    before_round: Callable[[int], Any] | None = None,
    watch: Callable[[str], AbstractContextManager[Any]] | None = None,
) -> Timings:
    """``rounds`` rounds; each calls ``before_round(k)`` (untimed), then every step once, in order, timed alone
    (device synchronized), inside ``watch(name)`` (untimed checks around each step), so that load from other
    processes falls on every variant alike."""
    timings = Timings({name: [] for name in steps})
    for k in range(rounds):
        if before_round is not None:
            before_round(k)
        for name, step in steps.items():
            with watch(name) if watch is not None else nullcontext():
                sync(device)
                start = time.perf_counter()
                step()
                sync(device)
                timings.runs[name].append(time.perf_counter() - start)
    return timings


# --------------------------------------------------------------------------------------------- results
def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], notes: Sequence[str] = ()) -> dict:
    """A rendered table: ``columns`` and ``rows`` of cells (formatted by the benchmark), and notes under it."""
    return {
        "title": title,
        "columns": list(columns),
        "rows": [[str(c) for c in row] for row in rows],
        "notes": list(notes),
    }


def cell(value: float | None, spec: str, scale: float = 1.0) -> str:
    """``value * scale`` formatted by ``spec``; ``-`` for a missing value."""
    if value is None:
        return "-"
    return format(value if scale == 1.0 else value * scale, spec)


def add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, help="write the result file here (render: python -m scripts.bench.render)")
    parser.add_argument("--csv", action="store_true", help="also write each table as CSV beside the JSON")


def write_result(result: dict[str, Any], args: argparse.Namespace, device: str = "cpu") -> dict[str, Any]:
    """Stamp ``result`` with the benchmark's arguments and the environment record, print its tables and write
    it to ``--json`` (and its tables to CSV files with ``--csv``)."""
    from .render import render

    result.setdefault("args", {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    result["environment"] = environment(device)
    print(render(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        if getattr(args, "csv", False):
            write_csv(result, Path(args.json))
    return result


def write_csv(result: dict[str, Any], path: Path) -> list[Path]:
    """Each table as ``<stem>.csv`` (one table) or ``<stem>-<n>.csv``."""
    tables = result.get("tables", [])
    written = []
    for n, tab in enumerate(tables, 1):
        target = path.with_suffix(".csv") if len(tables) == 1 else path.with_name(f"{path.stem}-{n}.csv")
        with open(target, "w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(tab["columns"])
            writer.writerows(tab["rows"])
        written.append(target)
    return written


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


# ------------------------------------------------------------------------------- timing optimizer steps
# The Triton entry points and their modules (``functional`` imports them from there when it launches).
KERNEL_ENTRIES = {"subspace_adamw": "subspace_optim.kernels.step", "refresh_bases": "subspace_optim.kernels.refresh"}
Build = Callable[[list[nn.Parameter], int, int], torch.optim.Optimizer]


def new_gradients(params: list[torch.nn.Parameter], seed: int) -> list[torch.Tensor]:
    """A fresh gradient per matrix, the same for a given seed whatever the optimizer."""
    generator = torch.Generator(device=params[0].device).manual_seed(seed)
    return [(1e-3 * torch.randn(p.shape, device=p.device, generator=generator)).to(p.dtype) for p in params]


@dataclass
class Contender:
    """One optimizer configuration: ``build(params, rank, gap)`` makes it with refresh gap ``gap``."""

    name: str
    label: str
    build: Build
    regular: bool = True  # timed on regular steps
    refresh: str | None = None  # what its refresh step does (timed on refresh steps); None: no refresh rows
    kernels: bool = False  # its steps must run the Triton kernels (and only its steps)


@dataclass
class Running:
    contender: Contender
    opt: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    times: list[float] = field(default_factory=list)


def refresh_marks(opt: torch.optim.Optimizer) -> list[Any]:
    """Per projected matrix, a token that changes when its basis is refreshed: galore-torch replaces its
    projector's ``ortho_matrix`` tensor (the new one is made while the old one lives, so the ids differ),
    ours counts ``refresh_count``."""
    marks = []
    for state in opt.state.values():
        if "projector" in state:
            marks.append(id(state["projector"].ortho_matrix))
        elif "refresh_count" in state:
            marks.append(state["refresh_count"])
    return marks


class KernelCounter:
    """Wraps ``subspace_optim.kernels.step.subspace_adamw`` and ``.refresh.refresh_bases`` (``functional``
    looks them up there at each call) and counts the calls: the proof that a timed step ran the kernels."""

    def __init__(self) -> None:
        self.calls = dict.fromkeys(KERNEL_ENTRIES, 0)
        self.originals: dict[str, tuple[Any, Callable[..., Any]]] = {}

    def __enter__(self) -> KernelCounter:
        for name, module_name in KERNEL_ENTRIES.items():
            module = importlib.import_module(module_name)  # imports Triton
            self.originals[name] = (module, getattr(module, name))

            def counted(*args: Any, _name: str = name, _original: Any = self.originals[name][1], **kw: Any) -> Any:
                self.calls[_name] += 1
                return _original(*args, **kw)

            setattr(module, name, counted)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, (module, original) in self.originals.items():
            setattr(module, name, original)

    def snapshot(self) -> dict[str, int]:
        return dict(self.calls)


def checked_steps(running: list[Running], refresh: bool, counter: KernelCounter | None) -> Callable[[str], Any]:
    """``interleaved``'s watch: after each timed step (untimed), it refreshed every basis (``refresh``)
    or none, and ran the kernels iff its contender says so."""
    by_name = {run.contender.name: run for run in running}

    @contextlib.contextmanager
    def watch(name: str) -> Iterator[None]:
        run = by_name[name]
        before = refresh_marks(run.opt)
        calls = counter.snapshot() if counter else None
        yield
        after = refresh_marks(run.opt)
        if refresh and any(a == b for a, b in zip(after, before, strict=True)):
            raise RuntimeError(f"{name}: a timed refresh step did not refresh every basis")
        if not refresh and after != before:
            raise RuntimeError(f"{name}: a timed regular step refreshed a basis")
        if counter is None or calls is None:
            return
        made = {key: counter.calls[key] - calls[key] for key in KERNEL_ENTRIES}
        want = {"subspace_adamw": 1, "refresh_bases": int(refresh)} if run.contender.kernels else None
        if want is None and any(made.values()):
            raise RuntimeError(f"{name}: a reference step called the kernels ({made})")
        if want is not None and made != want:
            raise RuntimeError(f"{name}: a timed step made kernel calls {made}, expected {want}")

    return watch


def run_interleaved(
    running: list[Running], rounds: int, device: str, refresh: bool, counter: KernelCounter | None, seed: int = 1000
) -> None:
    """``rounds`` checked rounds of one step of each optimizer; refresh rounds give every optimizer the same
    new gradient first. Each run's ``times`` gets its rounds."""

    def new_round(k: int) -> None:
        if refresh:
            grads = new_gradients(running[0].params, seed + k)
            for run in running:
                for param, grad in zip(run.params, grads, strict=True):
                    param.grad.copy_(grad)

    steps = {run.contender.name: run.opt.step for run in running}
    timings = interleaved(steps, rounds, device, new_round, checked_steps(running, refresh, counter))
    for run in running:
        run.times += timings.runs[run.contender.name]
