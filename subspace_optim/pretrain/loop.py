"""One optimizer's pretraining run under accelerate: the step, evaluation, metrics and checkpoints.

A run lives in ``<output_dir>/<optimizer>/``: ``log.json`` (rewritten atomically as the run goes) and
``checkpoints/step-NNNNNNNN/`` (accelerate's ``save_state`` plus ``trainer_state.json``). A checkpoint is
written into a hidden temporary directory and renamed into place only when every process has finished
writing, then ``checkpoints/latest`` is switched to it: a run killed while saving still resumes from the
previous checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import int8_weights
from ..metrics import state_bytes
from . import files, optimizers, resuming
from .config import PretrainConfig
from .data import TokenData

LATEST = "latest"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


# ------------------------------------------------------------------------------------------------ model
def build_model(cfg: PretrainConfig, vocab_size: int) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` from the config: no weights are downloaded, and the
    init depends on ``cfg.seed`` only, so every compared optimizer starts from the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads or cfg.num_attention_heads,
        max_position_embeddings=cfg.seq_len,
        rms_norm_eps=cfg.rms_norm_eps,
        initializer_range=cfg.initializer_range,
        tie_word_embeddings=cfg.tie_word_embeddings,
        use_cache=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(config)
    return stored_as(model, cfg.weights)


def stored_as(model: nn.Module, weights: str, exclude: tuple[str, ...] = ()) -> nn.Module:
    """``model`` (fp32) with its parameters stored as ``--weights`` says: fp32 as it is, bf16, or torchao's int8
    training weights on its linear layers but those named by ``exclude`` (``int8_weights.quantize_linears``; their
    class becomes a global ``torch.load(weights_only=True)`` accepts, for a resume)."""
    if weights == "int8":
        int8_weights.allow_weights_only_checkpoints()
        return int8_weights.quantize_linears(model, exclude)
    return model.to(torch.bfloat16) if weights == "bf16" else model


def lr_multiplier(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to the peak over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------------ memory
class PeakMemory:
    """Peak memory of this process since ``reset``: CUDA allocations on a GPU, resident set size on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "CUDA max allocated" if device.type == "cuda" else "process peak RSS"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:  # Linux: writing 5 to clear_refs resets VmHWM, the peak RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def peak(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        try:
            with open("/proc/self/status") as f:
                match = re.search(r"VmHWM:\s+(\d+)\s+kB", f.read())
            if match:
                return int(match.group(1)) * 1024
        except OSError:
            pass
        try:
            import resource  # Unix only
        except ImportError:  # pragma: no cover - Windows
            return 0
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, kB on Linux
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def weights_digest(model: nn.Module) -> str:
    """sha256 of every weight's bytes: equal digests mean bitwise-identical weights. torchao's int8 weights are hashed
    as their codes and row scales (``int8_weights.dcp_state_dict``: DTensor cannot gather the subclass itself), any
    other tensor subclass that flattens through its inner tensors."""
    digest = hashlib.sha256()
    for name, tensor in sorted(int8_weights.dcp_state_dict(model.state_dict()).items()):
        if hasattr(tensor, "full_tensor"):  # a sharded DTensor (FSDP2): gather it; every rank calls this
            tensor = tensor.full_tensor()
        inner = tensor.__tensor_flatten__()[0] if hasattr(tensor, "__tensor_flatten__") else None
        parts = [getattr(tensor, key) for key in inner] if inner else [tensor]
        digest.update(name.encode())
        for part in parts:
            digest.update(part.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ checkpoints
class Checkpoints:
    """Atomic checkpoints of one run (see the module docstring)."""

    def __init__(self, run_dir: Path, keep: int, safe_serialization: bool = True) -> None:
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = keep
        # safetensors cannot hold tensor subclasses (torchao's int8 weights): those runs pickle (torch.save), and
        # load back with weights_only once the class is an allowed global (``int8_weights``).
        self.safe_serialization = safe_serialization

    def complete(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        found = [entry for entry in self.dir.iterdir() if entry.is_dir() and _STEP_DIR.match(entry.name)]
        complete = [checkpoint for checkpoint in found if (checkpoint / STATE_FILE).is_file()]
        return sorted(complete, key=lambda checkpoint: int(checkpoint.name[5:]))

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` names, or else the newest complete one (a kill between the rename and
        the pointer update leaves the pointer one checkpoint behind, which is still a valid choice)."""
        pointer = self.dir / LATEST
        if pointer.is_file():
            candidate = self.dir / pointer.read_text().strip()
            if (candidate / STATE_FILE).is_file():
                return candidate
        done = self.complete()
        return done[-1] if done else None

    def save(self, accelerator, step: int, state: dict[str, Any]) -> Path:
        final = self.dir / f"step-{step:08d}"
        tmp = self.dir / f".tmp-step-{step:08d}"
        if accelerator.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            self.dir.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=self.safe_serialization)
        if accelerator.is_main_process:
            files.write_json(tmp / STATE_FILE, state)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _fsync_tree(tmp)
            if final.exists():
                trash = self.dir / f".old-{final.name}"
                shutil.rmtree(trash, ignore_errors=True)
                os.replace(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(tmp, final)
            files.write_text(self.dir / LATEST, final.name + "\n")
            for old in self.complete()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            for stale in self.dir.glob(".tmp-step-*"):
                shutil.rmtree(stale, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------------ run state
@dataclass
class RunState:
    """Everything besides model/optimizer/scheduler/RNG that a resumed run needs to continue exactly."""

    step: int = 0
    train_seconds: float = 0.0
    first_step_seconds: float | None = None
    tokens: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    refreshes: int = 0
    refresh_seconds: float = 0.0


@dataclass
class _Run:
    """What the set-up, step, evaluation and checkpoint helpers of one run share."""

    name: str
    cfg: PretrainConfig
    data: TokenData
    accelerator: Any
    run_dir: Path
    ckpts: Checkpoints
    model: nn.Module
    optimizer: Any
    scheduler: Any
    accum: int
    rows: int
    seed: int
    identity: dict[str, Any]
    log: dict[str, Any] = field(default_factory=dict)
    state: RunState = field(default_factory=RunState)
    last_refreshes: int | None = None

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def layerwise(self) -> bool:
        """Whether this run's optimizer updates inside backward (then nothing is left to clip here)."""
        return getattr(getattr(self.optimizer, "optimizer", self.optimizer), "_backward_update", None) is not None

    @property
    def tokens_per_step(self) -> int:
        return self.rows * self.cfg.seq_len

    @property
    def inner(self) -> torch.optim.Optimizer:
        """The optimizer accelerate wraps: refresh counts and state sizes live there."""
        return getattr(self.optimizer, "optimizer", self.optimizer)


@torch.no_grad()
def evaluate(accelerator, model: nn.Module, windows: Tensor, batch_size: int) -> float:
    """Mean next-token loss over the held-out ``windows``, split across processes."""
    net = accelerator.unwrap_model(model)
    was_training = net.training
    net.eval()
    mine = windows[accelerator.process_index :: accelerator.num_processes]
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for chunk in mine.split(batch_size):
        chunk = chunk.to(accelerator.device)
        with accelerator.autocast():
            logits = net(input_ids=chunk[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="sum")
        totals += torch.stack(
            [loss.double(), torch.tensor(chunk[:, 1:].numel(), dtype=torch.float64, device=totals.device)]
        )
    net.train(was_training)
    totals = accelerator.reduce(totals, "sum")
    return float(totals[0] / totals[1])


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def _ensure_fresh(run_dir: Path) -> None:
    """Remove a previous run of the same name (only if it is one of ours) so a new run starts clean."""
    if not run_dir.exists():
        return
    ours = (run_dir / "log.json").exists() or (run_dir / "checkpoints").exists()
    if not ours and any(run_dir.iterdir()):
        raise FileExistsError(f"{run_dir} exists and is not a run directory; choose another --output-dir")
    shutil.rmtree(run_dir)


def train_run(
    name: str, cfg: PretrainConfig, data: TokenData, output_dir: Path, mixed_precision: str, cpu: bool = False
) -> dict:
    """Train ``cfg.steps`` steps (or up to ``--stop-at``) with optimizer ``name``; returns the run's log."""
    run, resume_from = _set_up(name, cfg, data, output_dir, mixed_precision, cpu)
    if resume_from is not None:
        saved = _resume(run, resume_from)
        if run.state.step >= cfg.steps:
            return _already_finished(run, saved)

    windows = data.eval_windows(cfg.seq_len, cfg.eval_windows)
    memory = PeakMemory(run.accelerator.device)
    memory.reset()
    run.last_refreshes = optimizers.refresh_count(run.inner)  # after resuming: the count is in the state
    if run.state.step == 0:
        _evaluate_now(run, windows)
    _write_log(run)

    end = cfg.steps if cfg.stop_at is None else min(cfg.steps, cfg.stop_at)
    progress = _progress_bar(run)
    run.model.train()
    while run.state.step < end:
        loss, lr, elapsed = _train_step(run)
        _record_step(run, loss, lr, elapsed)
        if progress is not None:
            rate = run.tokens_per_step / max(elapsed, 1e-9)
            progress.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{rate:.0f}", refresh=False)
            progress.update(1)
        _evaluate_and_save(run, windows, end, progress)
    if progress is not None:
        progress.close()
    return _finish(run, memory)


# ------------------------------------------------------------------------------------------------ set-up
def _no_initial_sync() -> Any:
    """accelerate's DDP options with DDP's initial broadcast of the parameters turned off (``init_sync=False``):
    torchao's int8 weights cannot take part in it (they are not plain tensors), and there is nothing to sync, since
    every process builds the same model from ``cfg.seed`` (``build_model``; the run's weight digests check that
    the ranks end equal). accelerate 1.16 has no field for it and matches its handlers by exact class, so the
    handler is set on the accelerator rather than passed in ``kwargs_handlers``."""
    from accelerate.utils import DistributedDataParallelKwargs

    @dataclasses.dataclass
    class NoInitialSync(DistributedDataParallelKwargs):
        init_sync: bool = True

    return NoInitialSync(init_sync=False)


def refuse_unsavable(weights: str, distributed_type: Any) -> None:
    """Refuse, before anything trains, a run whose checkpoints accelerate cannot write: torchao's int8 weights under
    FSDP (every run saves at least at its end). accelerate's ``save_state`` either gathers each weight whole
    (DTensor cannot gather the subclass) or writes it with DCP (which cannot write the subclass)."""
    from accelerate.utils import DistributedType

    if weights == "int8" and distributed_type == DistributedType.FSDP:
        raise ValueError(
            "--weights int8 under FSDP: accelerate's save_state cannot write torchao's int8 weights (DCP cannot "
            "write the subclass, nor DTensor gather it), and every run saves at least at its end. Use a DDP config "
            "(configs/accelerate_ddp.yaml), or --weights bf16 --stochastic-rounding under FSDP; a loop of your own "
            "can save FSDP2 int8 shards through int8_weights.dcp_state_dict"
        )


def _batch_layout(cfg: PretrainConfig, world: int) -> tuple[int, int]:
    """(micro-batches per step, sequences per step): --global-batch-size fixes the second for any world."""
    accum = cfg.grad_accum
    if cfg.global_batch_size is not None:
        per_step = cfg.batch_size * world
        if cfg.global_batch_size % per_step:
            raise ValueError(
                f"--global-batch-size {cfg.global_batch_size} is not a multiple of --batch-size {cfg.batch_size} "
                f"x {world} process(es)"
            )
        accum = cfg.global_batch_size // per_step
    return accum, cfg.batch_size * accum * world


def _set_up(
    name: str, cfg: PretrainConfig, data: TokenData, output_dir: Path, mixed_precision: str, cpu: bool
) -> tuple[_Run, Path | None]:
    """The prepared run, and the checkpoint to resume from (None: the run directory was cleared)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    refuse_unsavable(cfg.weights, accelerator.distributed_type)
    if cfg.weights == "int8":
        accelerator.ddp_handler = _no_initial_sync()
    run_dir = output_dir / name
    ckpts = Checkpoints(run_dir, cfg.keep_checkpoints, safe_serialization=cfg.weights != "int8")
    resume_from = ckpts.latest() if cfg.resume else None
    if accelerator.is_main_process and resume_from is None:
        if cfg.resume:
            print(f"[{name}] {resuming.no_checkpoint(ckpts.dir)}", flush=True)
        _ensure_fresh(run_dir)
    accelerator.wait_for_everyone()
    accum, rows = _batch_layout(cfg, accelerator.num_processes)

    model = build_model(cfg, data.tokenizer.vocab_size)
    n_params = sum(param.numel() for param in model.parameters())
    optimizer = optimizers.build(name, model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
    )
    # The scheduler is registered, not prepared: a prepared one steps once per process per call.
    model, optimizer = accelerator.prepare(model, optimizer)
    if cfg.layerwise and name == "subspace":
        # On the prepared model (DDP or FSDP2 under accelerate); resuming loads into this same optimizer.
        inner = getattr(optimizer, "optimizer", optimizer)
        inner.update_in_backward(model, accumulation_steps=accum, max_grad_norm=cfg.max_grad_norm or None)
    accelerator.register_for_checkpointing(scheduler)
    seed = cfg.seed + accelerator.process_index  # each process's global RNG differs on purpose
    set_seed(seed)

    identity = {
        "optimizer": name,
        "trajectory": cfg.trajectory_fields(name),
        "vocab_size": data.tokenizer.vocab_size,
        "tokenizer": data.tokenizer.fingerprint,
        "global_batch_rows": rows,  # the data of a step depends on it (not on how it is split)
    }
    run = _Run(name, cfg, data, accelerator, run_dir, ckpts, model, optimizer, scheduler, accum, rows, seed, identity)
    run.log = _log_header(run, n_params, mixed_precision)
    return run, resume_from


def _log_header(run: _Run, n_params: int, mixed_precision: str) -> dict[str, Any]:
    """The fixed part of ``log.json``; ``status`` changes as the run goes."""
    cfg, data = run.cfg, run.data
    return {
        "optimizer": run.name,
        "lr": cfg.lr_for(run.name),
        "model": {"name": cfg.model, "parameters": n_params, "vocab_size": data.tokenizer.vocab_size},
        "data": data.description,
        "tokenizer": data.tokenizer.name,
        "world_size": run.world,
        "grad_accum": run.accum,
        "tokens_per_step": run.tokens_per_step,
        "device": str(run.accelerator.device),
        "mixed_precision": mixed_precision,
        "config": dataclasses.asdict(cfg),
        "status": "running",
    }


def _progress_bar(run: _Run):
    """A tqdm bar on the main process when --progress asks for one, else None."""
    if not (run.accelerator.is_main_process and run.cfg.progress):
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=run.cfg.steps, initial=run.state.step, desc=run.name, unit="step", mininterval=0.5, file=sys.stdout
    )


# ------------------------------------------------------------------------------------------------ resume
def _resume(run: _Run, where: Path) -> dict[str, Any]:
    """Load the checkpoint at ``where`` only after checking it was written with this run's settings;
    returns its state file."""
    saved = json.loads((where / STATE_FILE).read_text())
    _check_resumable(saved["identity"], run.identity, where)
    run.accelerator.load_state(str(where), load_kwargs=optimizers.load_kwargs(run.name))
    run.state = RunState(**saved["state"])
    if run.accelerator.is_main_process:
        print(f"[{run.name}] resumed from {where} at step {run.state.step}", flush=True)
    return saved


def _already_finished(run: _Run, saved: dict[str, Any]) -> dict:
    """A resumed run with no steps left reports the summary its final checkpoint saved."""
    run.log["status"] = "finished"
    summary = saved.get("summary") or {}
    _write_log(run, summary)
    run.accelerator.free_memory()
    return _result(run, summary)


# ------------------------------------------------------------------------------------------------ step
def _train_step(run: _Run) -> tuple[float, float, float]:
    """One optimizer step over ``accum`` micro-batches; returns (mean loss, lr used, seconds).

    Only the last micro-batch synchronises gradients across processes."""
    cfg, accelerator, model = run.cfg, run.accelerator, run.model
    start = time.perf_counter()
    batch = run.data.batch(run.state.step, cfg.seed, run.rows, cfg.seq_len)
    batch = batch.view(run.accum, run.world, cfg.batch_size, cfg.seq_len + 1)[:, accelerator.process_index]
    batch = batch.to(accelerator.device)
    total = torch.zeros((), device=accelerator.device)
    for micro in range(run.accum):
        ids = batch[micro]
        sync = micro == run.accum - 1
        with nullcontext() if sync else accelerator.no_sync(model):
            logits = model(input_ids=ids[:, :-1]).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
            accelerator.backward(loss / run.accum)
        total += loss.detach()
    if cfg.max_grad_norm > 0 and not run.layerwise:
        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    loss_value = float(accelerator.reduce(total / run.accum, "mean"))
    return loss_value, lr, time.perf_counter() - start


def _record_step(run: _Run, loss: float, lr: float, elapsed: float) -> None:
    """Advance the run state by the step just taken; a non-finite loss stops the run."""
    state = run.state
    state.step += 1
    state.train_seconds += elapsed
    state.tokens += run.tokens_per_step
    if state.first_step_seconds is None:
        state.first_step_seconds = elapsed
    state.history.append({"step": state.step, "loss": loss, "lr": lr, "time_s": state.train_seconds})
    refreshes = optimizers.refresh_count(run.inner)
    if refreshes is not None and refreshes != run.last_refreshes:
        state.refreshes += 1
        state.refresh_seconds += run.inner.subspace_metrics()["overall"]["last_refresh_time_s"]
        run.last_refreshes = refreshes
    if not math.isfinite(loss):
        raise FloatingPointError(f"[{run.name}] training loss is {loss} at step {state.step - 1}; lower --lr")


# ------------------------------------------------------------------------------------------------ evaluation
def _evaluate_now(run: _Run, windows: Tensor) -> float:
    """Evaluate and append the result to the run's eval history."""
    loss = evaluate(run.accelerator, run.model, windows, run.cfg.eval_batch_size)
    state = run.state
    state.evals.append({"step": state.step, "loss": loss, "ppl": perplexity(loss), "time_s": state.train_seconds})
    return loss


def _evaluate_and_save(run: _Run, windows: Tensor, end: int, progress) -> None:
    """Evaluate and checkpoint when the schedule says so, after a step."""
    cfg, step = run.cfg, run.state.step
    at_end = step == cfg.steps
    # Also at --stop-at, so a stopped run reports where it stands, not its step-0 evaluation.
    if at_end or step == end or (cfg.eval_every and step % cfg.eval_every == 0):
        loss = _evaluate_now(run, windows)
        if progress is not None:
            progress.write(f"[{run.name}] step {step}: eval loss {loss:.4f} (ppl {perplexity(loss):.1f})")
        _write_log(run)
    if not at_end and (step == end or (cfg.save_every and step % cfg.save_every == 0)):
        if step == end:
            run.log["status"] = "stopped"
        _checkpoint(run)
        run.log["status"] = "running"


# ------------------------------------------------------------------------------------------------ output
def _write_log(run: _Run, summary: dict[str, Any] | None = None) -> None:
    if run.accelerator.is_main_process:
        state = dataclasses.asdict(run.state)
        files.write_json(run.run_dir / "log.json", {**run.log, "state": state, "summary": summary})


def _checkpoint(run: _Run, summary: dict[str, Any] | None = None) -> None:
    payload = {
        "identity": run.identity,
        "state": dataclasses.asdict(run.state),
        "summary": summary,
        "status": run.log["status"],
    }
    run.ckpts.save(run.accelerator, run.state.step, payload)


def _result(run: _Run, summary: dict[str, Any] | None) -> dict:
    return {**run.log, "state": dataclasses.asdict(run.state), "summary": summary, "run_dir": str(run.run_dir)}


def _finish(run: _Run, memory: PeakMemory) -> dict:
    """Write the final log; a run that reached --steps also gets a summary, a last checkpoint and a check
    that every process holds the same weights."""
    from accelerate.utils import gather_object

    accelerator, state = run.accelerator, run.state
    summary = None
    run.log["status"] = "stopped"
    if state.step >= run.cfg.steps:
        run.log["status"] = "finished"
        model = accelerator.unwrap_model(run.model)
        digests = gather_object([weights_digest(model)]) if run.world > 1 else None
        seeds = gather_object([run.seed])
        summary = _summary(state, run.inner, memory, run.tokens_per_step, digests, seeds)
        _checkpoint(run, summary)
        if digests is not None and len(set(digests)) != 1:
            raise RuntimeError(f"[{run.name}] processes ended with different weights (digests {digests})")
    _write_log(run, summary)
    accelerator.wait_for_everyone()
    result = _result(run, summary)
    accelerator.free_memory()
    return result


# What a changed identity entry means, in terms of the flags that set it.
_IDENTITY_FLAGS = {
    "optimizer": "the optimizer",
    "vocab_size": "the tokenizer's vocabulary (--tokenizer, --tokenizer-vocab)",
    "tokenizer": "the tokenizer (--tokenizer, --tokenizer-vocab, --tokenizer-train-bytes, the training text)",
    "global_batch_rows": "the global batch in sequences (--batch-size x processes x --grad-accum, "
    "or --global-batch-size)",
}
_TRAJECTORY_FLAGS = {"warmup": "--warmup-steps (the warmup in effect; default 10% of --steps)"}


def _check_resumable(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    """Refuse a checkpoint whose run had other settings, naming each flag with its checkpoint and current value."""
    if saved == current:
        return

    def shown(table: dict[str, Any], key: str) -> str:
        return repr(table[key]) if key in table else "(not recorded)"

    diffs = []
    for key in ("optimizer", "vocab_size", "tokenizer", "global_batch_rows"):
        if saved.get(key) != current.get(key):
            diffs.append(f"{_IDENTITY_FLAGS[key]}: {shown(saved, key)} -> {shown(current, key)}")
    old, new = saved.get("trajectory", {}), current["trajectory"]
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key) or (key in old) != (key in new):
            if key == "lr":
                flag = f"--lr ({current['optimizer']})"
            else:
                flag = _TRAJECTORY_FLAGS.get(key, f"--{key.replace('_', '-')}")
            diffs.append(f"{flag}: {shown(old, key)} -> {shown(new, key)}")
    notes = ""
    if old.get("steps") != new.get("steps"):
        notes += " " + resuming.length_note("--steps")
    if any(key not in old for key in new):
        notes += " The checkpoint predates recording some of these settings, so it cannot be checked against them."
    raise resuming.mismatch(where, diffs, notes)


def _summary(
    state: RunState,
    optimizer: torch.optim.Optimizer,
    memory: PeakMemory,
    tokens_per_step: int,
    digests: list[str] | None,
    seeds: list[int],
) -> dict[str, Any]:
    losses = [record["loss"] for record in state.history]
    tail = losses[-10:]
    steady = state.step - 1
    step_time = (
        (state.train_seconds - (state.first_step_seconds or 0.0)) / steady if steady > 0 else state.train_seconds
    )
    final = state.evals[-1]
    return {
        "steps": state.step,
        "first_train_loss": losses[0] if losses else None,
        "final_train_loss": sum(tail) / len(tail) if tail else None,
        "initial_eval_loss": state.evals[0]["loss"],
        "final_eval_loss": final["loss"],
        "final_eval_ppl": final["ppl"],
        "state_bytes": state_bytes(optimizer),
        "peak_memory_bytes": memory.peak(),
        "peak_memory_kind": memory.kind,
        "step_time_s": step_time,
        "tokens_per_s": tokens_per_step / step_time if step_time > 0 else None,
        "train_seconds": state.train_seconds,
        "refreshes": state.refreshes if optimizers.refresh_count(optimizer) is not None else None,
        "refresh_seconds_total": state.refresh_seconds if optimizers.refresh_count(optimizer) is not None else None,
        "weight_digests": digests,
        "global_seeds": seeds,
    }
