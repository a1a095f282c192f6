"""Fine-tune a causal LM with SubspaceAdamW under TRL's ``SFTTrainer`` or the plain ``Trainer``, fully or with LoRA.

Two modes share the trainer, optimizer, checkpoint and summary code; they differ in data, tokens and defaults:

- ``--mode recipe`` (the default): TRL's ``SFTTrainer`` (``--trainer trainer``: the plain ``Trainer`` on the same
  windows), documents joined by EOS, a byte-level BPE trained on the training text (cached in ``--output-dir``).
  The optimizer reaches the trainer as a factory (``--way factory``).
- ``--mode basic``: the plain ``Trainer`` set up the way an ``optim="galore_adamw"`` run is
  (``optim_target_modules`` and an ``optim_args`` string), on UTF-8 bytes (or a local ``--tokenizer``). The
  optimizer is built before the trainer (``--way optimizers``, ``create_optimizer(model, args)``) unless
  ``--way factory``. ``--resume`` may extend a finished run with a larger ``--max-steps``.

The factory, ``optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args)``, is called by the trainer when training
starts, with the model it actually trains. With ``--lora-r`` that is the PEFT model, whose only trainable tensors
are the adapter matrices; an optimizer built before TRL applies ``peft_config`` would hold the base weights that
PEFT then freezes (the optimizer refuses that at its first step).

Nothing is downloaded by default: the model is a tiny LLaMA built from a config and the text the Python standard
library's own source. ``--model`` (a local directory or a hub name) or ``--config`` (a local config.json: random
weights), ``--data`` (.txt, or .jsonl with a "text" field) and ``--tokenizer`` replace them.

    python scripts/finetune.py                                  # full fine-tune, SFTTrainer, ~1 min on 2 CPU cores
    python scripts/finetune.py --lora-r 16                      # LoRA adapters only; --rank defaults to 8 <= r
    python scripts/finetune.py --resume                         # continue from the last checkpoint in --output-dir
    python scripts/finetune.py --trainer trainer --lora-r 16    # plain transformers.Trainer, same optimizer
    python scripts/finetune.py --moments-dtype int8 --basis-dtype bfloat16   # low-precision optimizer state
    python scripts/finetune.py --mode basic                     # plain Trainer on byte tokens, under a minute
    python scripts/finetune.py --mode basic --max-steps 400 --resume         # extend a finished 300-step run
    python scripts/finetune.py --mode basic --way factory --bf16 --gradient-accumulation-steps 2
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast, Trainer, TrainingArguments

from subspace_optim.integrations.transformers import (
    add_metrics_callback,
    create_optimizer,
    optimizer_cls_and_kwargs,
    parse_optim_args,
    unwrap_optimizer,
)
from subspace_optim.pretrain import corpus, loop, resuming
from subspace_optim.pretrain.config import PretrainConfig
from subspace_optim.pretrain.tokenizer import EOS, cached_bpe

DOC_CHARS = 4_000  # the built-in corpus and .txt files are cut into documents of about this many characters

# What each --mode fills in for the flags left unset.
MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    "recipe": {
        "trainer": "sft",
        "way": "factory",
        "max_steps": 200,
        "output_dir": "runs/finetune",
        "target_modules": ["all-linear"],
    },
    "basic": {
        "trainer": "trainer",
        "way": "optimizers",
        "max_steps": 300,
        "output_dir": "runs/finetune_trainer",
        "target_modules": ["self_attn", "mlp"],
    },
}


# --------------------------------------------------------------------------- data


def _documents(text: str) -> list[str]:
    """Cut one long text into documents at line ends (every document ends up non-empty)."""
    docs, start = [], 0
    while start < len(text):
        end = text.find("\n", start + DOC_CHARS)
        end = len(text) if end < 0 else end + 1
        if text[start:end].strip():
            docs.append(text[start:end])
        start = end
    return docs


def load_documents(data: str | None, max_bytes: int) -> tuple[list[str], list[str]]:
    """(train, held-out) documents from ``data``: a .txt file, a .jsonl file with a "text" field per line, or
    (None) the Python standard library's source, split by file. A file's last 5% is held out."""
    if data is None:
        train = corpus.stdlib_text(max_bytes)
        heldout = corpus.stdlib_text(max(max_bytes // 20, 2 * DOC_CHARS), split="heldout")
        return _documents(train), _documents(heldout)
    path = Path(data)
    if path.suffix == ".jsonl":
        docs, size = [], 0
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{number}: expected a JSON object with a string field 'text'")
            docs.append(record["text"])
            size += len(record["text"])
            if size >= max_bytes:
                break
    elif path.suffix in (".txt", ".text", ".md", ".py"):
        docs = _documents(path.read_text(encoding="utf-8", errors="replace")[:max_bytes])
    else:
        raise ValueError(f"--data {data}: expected a .txt file or a .jsonl file with a 'text' field per line")
    if len(docs) < 2:
        raise ValueError(f"--data {data}: {len(docs)} document(s); give more text (one is held out)")
    cut = min(len(docs) - 1, max(1, round(len(docs) * 0.95)))
    return docs[:cut], docs[cut:]


def load_text(data: str | None, max_bytes: int) -> tuple[str, str]:
    """``--mode basic``'s (train, held-out) text: ``data`` read as UTF-8 text whatever its suffix, its last 5% held
    out, or (None) the standard library's source, split by file."""
    if data is None:
        return corpus.stdlib_text(max_bytes), corpus.stdlib_text(max_bytes // 20, split="heldout")
    text = Path(data).read_text(encoding="utf-8", errors="replace")[:max_bytes]
    cut = int(len(text) * 0.95)
    return text[:cut], text[cut:]


def load_tokenizer(args: argparse.Namespace, train_docs: list[str]) -> PreTrainedTokenizerFast:
    """``--tokenizer``, else the tokenizer of ``--model``, else a byte-level BPE trained on the training text
    (cached under ``--output-dir`` by a hash of text and vocabulary size, so a resumed run gets the same one)."""
    name = args.tokenizer or args.model
    if name is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name)
    else:
        trained = cached_bpe(train_docs, args.vocab, Path(args.output_dir))
        tok = PreTrainedTokenizerFast(tokenizer_file=str(trained.path), eos_token=EOS, pad_token=EOS)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def byte_tokens(text: str) -> torch.Tensor:
    """UTF-8 bytes as int64 token ids (vocabulary 256)."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def text_encoder(tokenizer: str | None) -> tuple[Callable[[str], torch.Tensor], int]:
    """``--mode basic``'s tokens: a function from text to a 1-D LongTensor, and the vocabulary size it needs.
    UTF-8 bytes, or the local tokenizer directory ``tokenizer`` (never downloaded)."""
    if tokenizer is None:
        return byte_tokens, 256
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)

    def encode(text: str) -> torch.Tensor:
        return torch.tensor(tok(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)

    return encode, len(tok)


def document_tokens(docs: list[str], tok: PreTrainedTokenizerFast) -> torch.Tensor:
    """The documents joined by EOS as one token stream (what SFTTrainer's ``packing_strategy="wrapped"`` packs)."""
    ids = [i for doc in docs for i in tok(doc + tok.eos_token, add_special_tokens=False)["input_ids"]]
    return torch.tensor(ids, dtype=torch.long)


class Windows(torch.utils.data.Dataset):
    """For the plain Trainer: a token stream cut into non-overlapping ``seq``-token windows. Labels are the inputs;
    the model shifts them."""

    def __init__(self, tokens: torch.Tensor, seq: int) -> None:
        self.tokens, self.seq = tokens, seq
        if self.tokens.numel() < seq:
            raise ValueError(f"{self.tokens.numel()} tokens are fewer than one window of --seq {seq}; give more text")

    def __len__(self) -> int:
        return self.tokens.numel() // self.seq

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        window = self.tokens[i * self.seq : (i + 1) * self.seq]
        return {"input_ids": window, "labels": window.clone()}


def training_data(args: argparse.Namespace) -> tuple[Any, Any, PreTrainedTokenizerFast | None, int]:
    """(train set, eval set, the trainer's ``processing_class``, vocabulary size) of ``--mode``: texts for
    SFTTrainer, ``Windows`` for the plain Trainer. basic hands the trainer no tokenizer (its batches are the
    windows as they are)."""
    if args.mode == "basic":
        train_text, heldout_text = load_text(args.data, args.max_bytes)
        encode, vocab = text_encoder(args.tokenizer)
        return Windows(encode(train_text), args.seq), Windows(encode(heldout_text), args.seq), None, vocab
    train_docs, heldout_docs = load_documents(args.data, args.max_bytes)
    tok = load_tokenizer(args, train_docs)
    if args.trainer == "sft":
        from datasets import Dataset

        return Dataset.from_dict({"text": train_docs}), Dataset.from_dict({"text": heldout_docs}), tok, len(tok)
    train_set = Windows(document_tokens(train_docs, tok), args.seq)
    return train_set, Windows(document_tokens(heldout_docs, tok), args.seq), tok, len(tok)


# --------------------------------------------------------------------------- model, PEFT, optimizer


def build_model(args: argparse.Namespace, vocab: int, tok: PreTrainedTokenizerFast | None = None) -> torch.nn.Module:
    """``--model`` loaded, else ``--config``'s model or a tiny LLaMA, randomly initialised from ``--seed`` (every
    run starts from the same weights). With ``tok``, the model's special tokens are the tokenizer's (else the
    trainer realigns them, with a warning)."""
    if args.model is not None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        if model.get_input_embeddings().weight.shape[0] < vocab:
            model.resize_token_embeddings(vocab)
    elif args.config is not None:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(args.config, local_files_only=True)
        if config.vocab_size < vocab:
            raise ValueError(f"--config has vocab_size {config.vocab_size} but the tokens need {vocab}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            model = AutoModelForCausalLM.from_config(config)
    else:  # built as `subspace-optim pretrain` builds its models
        shape = PretrainConfig(
            hidden_size=args.hidden,
            intermediate_size=args.hidden * 8 // 3,
            num_hidden_layers=args.layers,
            num_attention_heads=max(1, args.hidden // 32),
            seq_len=args.seq,
            seed=args.seed,
        )
        model = loop.build_model(shape, vocab)
        model.config.use_cache = True  # pretraining turns the KV cache off; the saved model generates with it
    if tok is not None and args.model is None:
        for config in (model.config, model.generation_config):
            config.bos_token_id, config.eos_token_id, config.pad_token_id = None, tok.eos_token_id, tok.pad_token_id
    # int8: the head stays fp32, since TRL's fused loss transposes it, which torchao's weight cannot
    return loop.stored_as(model, args.weights, exclude=("lm_head",))


def lora_config(args: argparse.Namespace):
    """The ``peft.LoraConfig`` of ``--lora-r`` (None for a full fine-tune)."""
    if not args.lora_r:
        return None
    from peft import LoraConfig

    targets = args.lora_targets[0] if args.lora_targets == ["all-linear"] else args.lora_targets
    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha if args.lora_alpha is not None else 2 * args.lora_r,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )


def optim_args(args: argparse.Namespace) -> str:
    """The ``TrainingArguments.optim_args`` string: an entry per optimizer flag, then the ``--optim-args`` entries,
    which replace the flag entries they name (so a whole galore_adamw string such as 'rank=4, update_proj_gap=2'
    works as it is; update_gap and galore's update_proj_gap are one option)."""
    given = set(parse_optim_args(args.optim_args))
    if "update_gap" in given:
        given.add("update_proj_gap")
    flags = {
        "rank": args.rank,
        "update_proj_gap": args.update_gap,
        "scale": args.scale,
        "moments_dtype": args.moments_dtype,
        "basis_dtype": args.basis_dtype,
    }
    if args.weights == "bf16":
        flags["stochastic_rounding"] = "true"
    entries = [f"{key}={value}" for key, value in flags.items() if key not in given]
    if args.optim_args:
        entries.append(args.optim_args)
    return ", ".join(entries)


def training_arguments(args: argparse.Namespace) -> TrainingArguments:
    """``SFTConfig`` for ``--trainer sft``, ``TrainingArguments`` for ``--trainer trainer``: the same fields."""
    fields: dict[str, Any] = dict(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=args.batch,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_steps if args.warmup_steps is not None else max(1, args.max_steps // 20),
        logging_steps=max(1, args.max_steps // 10),
        save_strategy="steps",
        save_steps=args.save_steps or args.max_steps,
        bf16=args.bf16,
        use_cpu=args.use_cpu,
        report_to=args.report_to,
        disable_tqdm=args.quiet,
        optim_target_modules=args.target_modules[0] if args.target_modules == ["all-linear"] else args.target_modules,
        optim_args=optim_args(args),
        seed=args.seed,
        data_seed=args.seed,
    )
    if args.trainer == "trainer":
        return TrainingArguments(**fields)
    from trl import SFTConfig

    # SFTConfig turns checkpointing on by default; off is faster here. transformers >= 5.24 renamed the field.
    renamed = "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    fields["activation_checkpointing" if renamed else "gradient_checkpointing"] = args.gradient_checkpointing
    return SFTConfig(
        **fields,
        max_length=args.seq,
        packing=True,
        packing_strategy="wrapped",  # fixed seq-token windows across documents, like the plain Trainer's Windows
        dataset_text_field="text",
        dataset_num_proc=None,
    )


def optimizer_handover(args: argparse.Namespace, model: torch.nn.Module, training_args: TrainingArguments) -> dict:
    """The trainer keyword that gives it SubspaceAdamW. ``--way factory``: ``optimizer_cls_and_kwargs``, which the
    trainer calls inside ``train()`` with the model it trains (after PEFT froze the base weights), so the optimizer
    holds exactly the trainable parameters. ``--way optimizers``: an optimizer built now, from ``model``."""
    if args.way == "factory":
        return {"optimizer_cls_and_kwargs": optimizer_cls_and_kwargs(training_args)}
    return {"optimizers": (create_optimizer(model, training_args), None)}


def build_trainer(args: argparse.Namespace, callbacks: list | None = None) -> Trainer:
    """Data, tokenizer, model and the trainer of ``--mode`` and ``--trainer``, with SubspaceAdamW handed over
    ``--way``."""
    train_set, eval_set, tok, vocab = training_data(args)
    model = build_model(args, vocab, tok)
    training_args = training_arguments(args)
    peft_config = lora_config(args)
    common = {"args": training_args, "train_dataset": train_set, "eval_dataset": eval_set, "processing_class": tok}
    if args.trainer == "sft":
        from trl import SFTTrainer

        handover = optimizer_handover(args, model, training_args)
        trainer = SFTTrainer(model=model, peft_config=peft_config, callbacks=callbacks, **common, **handover)
    else:
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        handover = optimizer_handover(args, model, training_args)
        trainer = Trainer(model=model, callbacks=callbacks, **common, **handover)
    add_metrics_callback(trainer)
    return trainer


# --------------------------------------------------------------------------- command line


def _add_data_flags(ap: argparse.ArgumentParser) -> None:
    data = ap.add_argument_group("data and model")
    data.add_argument(
        "--data",
        "--text-file",
        default=None,
        help="recipe: .txt, or .jsonl with a 'text' field; basic: any UTF-8 text file (default: the stdlib's source)",
    )
    data.add_argument("--max-bytes", type=int, default=1_000_000, help="use at most this much text")
    data.add_argument("--model", default=None, help="local directory or hub name (default: a tiny LLaMA from config)")
    data.add_argument("--config", default=None, help="local model config directory: random weights from --seed")
    data.add_argument(
        "--tokenizer",
        default=None,
        help="recipe: local directory or hub name (default: --model's, else a BPE); basic: a local directory "
        "(default: UTF-8 bytes)",
    )
    data.add_argument("--vocab", type=int, default=2048, help="vocabulary of the trained BPE (no --model/--tokenizer)")
    data.add_argument("--hidden", type=int, default=128, help="tiny LLaMA width (no --model/--config)")
    data.add_argument("--layers", type=int, default=2, help="tiny LLaMA depth (no --model/--config)")
    data.add_argument("--seq", type=int, default=128, help="tokens per training sequence")


def _add_training_flags(ap: argparse.ArgumentParser) -> None:
    train = ap.add_argument_group("training")
    train.add_argument("--mode", choices=sorted(MODE_DEFAULTS), default="recipe", help="see above (default: recipe)")
    train.add_argument("--trainer", choices=["sft", "trainer"], default=None, help="trl.SFTTrainer or plain Trainer")
    train.add_argument(
        "--way", choices=["optimizers", "factory"], default=None, help="how the trainer gets the optimizer"
    )
    train.add_argument("--output-dir", default=None, help="default: runs/finetune (basic: runs/finetune_trainer)")
    train.add_argument("--max-steps", type=int, default=None, help="default: 200 (basic: 300)")
    train.add_argument("--batch", type=int, default=8)
    train.add_argument("--gradient-accumulation-steps", type=int, default=1)
    train.add_argument("--lr", type=float, default=None, help="default: 1e-2 full, 2e-3 LoRA")
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--max-grad-norm", type=float, default=1.0)
    train.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of --max-steps")
    train.add_argument("--save-steps", type=int, default=None, help="checkpoint every N steps (default: at the end)")
    train.add_argument(
        "--resume",
        action="store_true",
        help="resume from the last checkpoint in --output-dir (none there: start a new run); with --mode recipe, "
        "--max-steps must be the checkpointed run's",
    )
    train.add_argument("--bf16", action="store_true", help="bf16 autocast")
    train.add_argument(
        "--weights",
        choices=["fp32", "bf16", "int8"],
        default="fp32",
        help="the dtype the base weights are stored in: fp32; bf16 (no master copy; SubspaceAdamW rounds "
        "stochastically); int8 (torchao's int8 training weights on the linear layers, fp32 row scales; needs "
        "torchao, and --lora-r: transformers cannot save int8 weights, so a full fine-tune could not checkpoint)",
    )
    train.add_argument("--gradient-checkpointing", action="store_true")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--report-to", nargs="*", default=[], help="e.g. tensorboard wandb (default: console only)")
    train.add_argument("--use-cpu", action=argparse.BooleanOptionalAction, default=True)
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest for tiny models)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_lora_flags(ap: argparse.ArgumentParser) -> None:
    lora = ap.add_argument_group("LoRA (PEFT)")
    lora.add_argument("--lora-r", type=int, default=0, help="LoRA rank; 0 (default) is a full fine-tune")
    lora.add_argument("--lora-alpha", type=int, default=None, help="default: 2 * --lora-r")
    lora.add_argument("--lora-dropout", type=float, default=0.0)
    lora.add_argument(
        "--lora-targets", nargs="+", default=["all-linear"], help="peft target_modules (default: all-linear)"
    )


def _add_optimizer_flags(ap: argparse.ArgumentParser) -> None:
    opt = ap.add_argument_group("SubspaceAdamW")
    opt.add_argument("--rank", type=int, default=None, help="subspace rank; default 32 full, min(8, --lora-r) LoRA")
    opt.add_argument("--update-gap", type=int, default=50, help="refresh the subspace every N optimizer steps")
    opt.add_argument("--scale", type=float, default=0.25)
    opt.add_argument("--moments-dtype", default="float32", help="float32, bfloat16 or int8")
    opt.add_argument("--basis-dtype", default="float32", help="float32 or bfloat16")
    opt.add_argument(
        "--target-modules",
        nargs="+",
        default=None,
        help="projected weights (optim_target_modules; default: all-linear, basic: self_attn mlp)",
    )
    opt.add_argument(
        "--optim-args",
        default="",
        help="more optim_args entries, e.g. 'refresh=svd, moments=keep'; an entry replaces the flag above it "
        "names, so a galore_adamw string such as 'rank=4, update_proj_gap=2' works as it is",
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_data_flags(ap)
    _add_training_flags(ap)
    _add_lora_flags(ap)
    _add_optimizer_flags(ap)
    args = ap.parse_args(argv)
    for name, value in MODE_DEFAULTS[args.mode].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.mode == "basic" and args.trainer == "sft":
        ap.error("--mode basic trains with the plain Trainer: SFTTrainer needs the recipe's documents and tokenizer")
    if args.weights == "int8" and not args.lora_r:
        ap.error(
            "--weights int8 needs --lora-r: transformers 5's save_pretrained writes safetensors only, which cannot "
            "hold torchao's int8 weights, so a full fine-tune could not save a checkpoint (subspace-optim pretrain "
            "--weights int8 trains them, saving with torch.save)"
        )
    if args.rank is None:
        # With LoRA the projected matrices are the adapters, (r, n) and (m, r): a rank above r cannot be projected
        # (that matrix falls back to AdamW with a warning), and rank == r saves nothing.
        args.rank = min(8, args.lora_r) if args.lora_r else 32
    if args.lr is None:
        args.lr = 2e-3 if args.lora_r else 1e-2
    return args


def resume_checkpoint(args: argparse.Namespace) -> str | None:
    """The checkpoint ``--resume`` continues from, checked before anything is built or written, by the rules
    ``subspace-optim pretrain --resume`` follows: none in ``--output-dir`` starts a new run (one printed line says
    so); in ``--mode recipe``, one written with another ``--max-steps`` is refused (``resuming.ResumeMismatch``),
    because the trainer would rebuild the cosine schedule over the new length and change the lr of the remaining
    steps. ``--mode basic`` lets a run be extended that way, as transformers' own resume does."""
    if not args.resume:
        return None
    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_utils import get_last_checkpoint

    out = Path(args.output_dir)
    last = get_last_checkpoint(str(out)) if out.is_dir() else None
    if last is None:
        print(resuming.no_checkpoint(out), flush=True)
        return None
    state = Path(last) / TRAINER_STATE_NAME
    saved = json.loads(state.read_text()).get("max_steps") if state.is_file() else None
    if saved is not None and args.mode == "recipe":  # no trainer state: the trainer refuses the checkpoint itself
        resuming.check_length(last, "--max-steps", saved, args.max_steps)
    return last


def summarize(args: argparse.Namespace, trainer: Trainer, before: float | None, after: float, seconds: float) -> dict:
    """The run's summary: losses, parameter counts, and the optimizer's state size against AdamW's."""
    model = trainer.model
    opt = unwrap_optimizer(trainer.optimizer)
    overall = opt.subspace_metrics()["overall"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    in_optimizer = {id(p) for group in opt.param_groups for p in group["params"]}
    adamw_bytes = 2 * sum(p.numel() * 4 for p in trainable)
    return {
        "trainer": type(trainer).__name__,
        "mode": f"lora r={args.lora_r}" if args.lora_r else "full",
        "steps": trainer.state.global_step,
        "train_seconds": round(seconds, 1),
        "eval_loss_before": None if before is None else round(before, 4),
        "eval_loss_after": round(after, 4),
        "eval_perplexity_after": round(math.exp(min(after, 50.0)), 2),
        "trainable_params": sum(p.numel() for p in trainable),
        "total_params": sum(p.numel() for p in model.parameters()),
        "optimizer_holds_exactly_the_trainable_params": in_optimizer == {id(p) for p in trainable},
        "rank": parse_optim_args(optim_args(args))["rank"],  # --optim-args may replace --rank
        "projected_params": overall["projected_params"],
        "optimizer_state_mib": round(overall["state_bytes"] / 2**20, 4),
        "adamw_state_mib": round(adamw_bytes / 2**20, 4),
        "captured_energy": overall["captured_energy"],
        "output_dir": args.output_dir,
        "saved_model": str(Path(args.output_dir) / "final"),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    resume_from = resume_checkpoint(args)
    if args.quiet:
        import datasets

        datasets.disable_progress_bars()
    if args.threads:
        torch.set_num_threads(args.threads)
    trainer = build_trainer(args)
    # Before training: the freshly initialised model (a resumed run loads its weights inside train()).
    before = None if resume_from else trainer.evaluate()["eval_loss"]
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - start
    after = trainer.evaluate()["eval_loss"]
    trainer.save_model(str(Path(args.output_dir) / "final"))  # the adapter only, with LoRA

    summary = summarize(args, trainer, before, after, seconds)
    (Path(args.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return summary


def cli(argv: list[str] | None = None) -> int:
    """The command line: a refused resume prints one line and returns 2, as ``subspace-optim pretrain`` does."""
    try:
        main(argv)
    except resuming.ResumeMismatch as err:
        print(f"finetune.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
