"""``subspace-optim pretrain``: LLaMA pretraining under accelerate, comparing optimizers on identical data.

Python use::

    from subspace_optim.pretrain import load_config, run
    cfg = load_config(["--model", "llama_9m", "--compare", "adamw,subspace", "--steps", "100"])
    report_path = run(cfg)

Modules: ``config`` (flags and YAML), ``data`` (corpora, splits, per-step batches), ``tokenizer`` (cached
BPE), ``optimizers`` (the compared optimizers), ``loop`` (one run: step, eval, checkpoints), ``resuming`` (the
``--resume`` rules scripts/finetune.py shares), ``report``.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .config import PretrainConfig, load_config

__all__ = ["PretrainConfig", "load_config", "run", "main"]


def _mixed_precision(cfg: PretrainConfig) -> str:
    if cfg.precision == "fp32":
        return "no"
    if cfg.precision == "bf16":
        return "bf16"
    gpu = torch.cuda.is_available() and not _use_cpu(cfg)
    return "bf16" if gpu and torch.cuda.is_bf16_supported() else "no"


def _use_cpu(cfg: PretrainConfig) -> bool:
    """accelerate only sets up multi-process CPU training (gloo) when told the run is on CPU, so say so
    whenever there is no GPU, not just with --cpu or ACCELERATE_USE_CPU=1."""
    from accelerate.utils import parse_flag_from_env

    return cfg.cpu or parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()


def preflight(cfg: PretrainConfig) -> None:
    """Fail in seconds, before any data is read: missing optional packages, CUDA-only optimizers on CPU, missing
    learning rates, impossible ranks. Whether each optimizer can run here comes first: asking for the lr of an
    optimizer that cannot run on this machine would send the user round twice."""
    from . import loop, optimizers

    device = "cuda" if torch.cuda.is_available() and not _use_cpu(cfg) else "cpu"
    for name in cfg.optimizer:
        optimizers.require(name, device)
    cfg.check_lrs()
    if any(name in ("subspace", "galore", "apollo") for name in cfg.optimizer):
        with torch.device("meta"):
            model = loop.build_model(cfg, cfg.tokenizer_vocab)
        optimizers.check_rank(model, cfg)


def run(cfg: PretrainConfig, command: str | None = None) -> Path | None:
    """Train every optimizer in ``cfg.optimizer`` and write the report; returns its path (on process 0)."""
    from accelerate import PartialState

    from . import data as data_mod
    from . import files, loop, report, tokenizer

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    preflight(cfg)
    cpu = _use_cpu(cfg)
    state = PartialState(cpu=cpu)
    main = state.is_main_process
    out = Path(cfg.output_dir) if cfg.output_dir else Path("runs") / Path(cfg.model).stem
    cache = files.cache_root(cfg.cache_dir)
    started = time.perf_counter()
    with state.main_process_first():  # process 0 trains/caches the tokenizer and tokens; the others read them
        corpus = data_mod.load_corpus(cfg)
        if cfg.tokenizer:
            tok = tokenizer.named_tokenizer(cfg.tokenizer)
        else:
            tok = tokenizer.cached_bpe(corpus.sample(cfg.tokenizer_train_bytes), cfg.tokenizer_vocab, cache)
        tokens = data_mod.TokenData(
            train=data_mod.tokenize(corpus.train, tok, cache),
            heldout=data_mod.tokenize(corpus.heldout, tok, cache),
            tokenizer=tok,
            description=corpus.description,
        )
    tokens.check(cfg.seq_len)
    if main:
        print(
            f"data: {corpus.description}\ntokenizer: {tok.name} ({tok.vocab_size} tokens"
            f"{', ' + str(tok.path) if tok.path else ''})\ntokens: {tokens.train.numel():,} train, "
            f"{tokens.heldout.numel():,} held-out (prepared in {time.perf_counter() - started:.1f} s)\n"
            f"processes: {state.num_processes}, device: {state.device}",
            flush=True,
        )
    precision = _mixed_precision(cfg)
    results = [loop.train_run(name, cfg, tokens, out, precision, cpu) for name in cfg.optimizer]
    if not main:
        return None
    for result in results:
        summary = result.get("summary") or {}
        state = result["state"]
        line = f"{result['optimizer']}: step {state['step']}/{cfg.steps}, eval loss {report.eval_span(state)}"
        if summary.get("tokens_per_s"):
            line += f", {summary['train_seconds']:.0f} s training, {summary['tokens_per_s']:.0f} tokens/s"
        print(line, flush=True)
    if not cfg.report:
        return None
    path = report.write(results, out, command or "subspace-optim pretrain")
    print(f"Report: {path} (plots: {path.parent / 'loss_vs_step.png'}, {path.parent / 'loss_vs_time.png'})", flush=True)
    return path


def main(argv: Sequence[str] | None = None, prog: str = "subspace-optim pretrain") -> int:
    """Command-line entry point; configuration and setup errors print one clear line and return 2."""
    from .optimizers import MissingOptimizer

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(argv)
        run(cfg, command=shlex.join([*prog.split(), *argv]))
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError, MissingOptimizer) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """End a launched run as PyTorch's documentation asks: every rank meets, then destroys its process group while
    the interpreter is whole. A gloo process that leaves it to interpreter exit can abort there, after a run that
    finished, because the group's worker threads may still hold work that refers to Python objects."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
