"""Fine-tune a causal LM with TRL's ``SFTTrainer`` (or the plain ``Trainer``) and SubspaceAdamW, fully or with LoRA.

The optimizer reaches the trainer through our factory, ``optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args)``:
the trainer calls it when training starts, with the model it actually trains. With ``--lora-r`` that is the PEFT
model TRL builds from ``peft_config``, whose only trainable tensors are the adapter matrices; an optimizer built
before (``optimizers=(create_optimizer(model, args), None)``) would hold the base weights that PEFT then freezes.

Nothing is downloaded by default: the model is a tiny LLaMA built from a config, the tokenizer a byte-level BPE
trained on the training text (cached in ``--output-dir``), the text the Python standard library's own source.
``--model`` (a local directory or a hub name) and ``--data`` (.txt, or .jsonl with a "text" field) replace them.

    python scripts/finetune.py                                  # full fine-tune, SFTTrainer, ~1 min on 2 CPU cores
    python scripts/finetune.py --lora-r 16                      # LoRA adapters only; --rank defaults to 8 <= r
    python scripts/finetune.py --resume                         # continue from the last checkpoint in --output-dir
    python scripts/finetune.py --trainer trainer --lora-r 16    # plain transformers.Trainer, same optimizer
    python scripts/finetune.py --moments-dtype int8 --basis-dtype bfloat16   # low-precision optimizer state
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast, Trainer, TrainingArguments

from subspace_optim.integrations.transformers import (
    add_metrics_callback,
    optimizer_cls_and_kwargs,
    unwrap_optimizer,
)
from subspace_optim.pretrain import corpus, lm, resuming
from subspace_optim.pretrain.tokenizer import EOS, cached_bpe

DOC_CHARS = 4_000  # the built-in corpus and .txt files are cut into documents of about this many characters


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


class Windows(torch.utils.data.Dataset):
    """For the plain Trainer: documents joined by EOS, tokenized, cut into ``seq``-token windows (what SFTTrainer's
    ``packing_strategy="wrapped"`` makes of the same text). Labels are the inputs; the model shifts them."""

    def __init__(self, docs: list[str], tok: PreTrainedTokenizerFast, seq: int) -> None:
        ids = [i for d in docs for i in tok(d + tok.eos_token, add_special_tokens=False)["input_ids"]]
        self.tokens, self.seq = torch.tensor(ids, dtype=torch.long), seq
        if self.tokens.numel() < seq:
            raise ValueError(f"{self.tokens.numel()} tokens are fewer than one window of --seq {seq}; give more text")

    def __len__(self) -> int:
        return self.tokens.numel() // self.seq

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = self.tokens[i * self.seq : (i + 1) * self.seq]
        return {"input_ids": x, "labels": x.clone()}


# --------------------------------------------------------------------------- model, PEFT, optimizer


def build_model(args: argparse.Namespace, tok: PreTrainedTokenizerFast) -> torch.nn.Module:
    """``--model`` loaded, else a tiny LLaMA built from a config (seeded: every run starts from the same weights)."""
    if args.model is not None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        if model.get_input_embeddings().weight.shape[0] < len(tok):
            model.resize_token_embeddings(len(tok))
        return model
    model = lm.tiny_llama(
        hidden=args.hidden,
        intermediate=args.hidden * 8 // 3,
        layers=args.layers,
        heads=max(1, args.hidden // 32),
        vocab=len(tok),
        max_positions=args.seq,
        seed=args.seed,
    )
    # The model's special tokens are the tokenizer's (else the trainer realigns them, with a warning).
    for config in (model.config, model.generation_config):
        config.bos_token_id, config.eos_token_id, config.pad_token_id = None, tok.eos_token_id, tok.pad_token_id
    return model


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
    """The ``TrainingArguments.optim_args`` string of our options (``--optim-args`` entries appended)."""
    entries = [f"rank={args.rank}", f"update_proj_gap={args.update_gap}", f"scale={args.scale}"]
    entries += [f"moments_dtype={args.moments_dtype}", f"basis_dtype={args.basis_dtype}"]
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


def build_trainer(args: argparse.Namespace, callbacks: list | None = None) -> Trainer:
    """Data, tokenizer, model and the trainer, with SubspaceAdamW given as a factory (built at train time)."""
    train_docs, heldout_docs = load_documents(args.data, args.max_bytes)
    tok = load_tokenizer(args, train_docs)
    model = build_model(args, tok)
    targs = training_arguments(args)
    peft_config = lora_config(args)
    # The factory: the trainer calls SubspaceAdamWFactory()(model, **kwargs) inside train(), with the model it
    # trains (after PEFT froze the base weights), so the optimizer holds exactly the trainable parameters.
    factory = optimizer_cls_and_kwargs(targs)
    if args.trainer == "sft":
        from datasets import Dataset
        from trl import SFTTrainer

        trainer = SFTTrainer(
            model=model,
            args=targs,
            train_dataset=Dataset.from_dict({"text": train_docs}),
            eval_dataset=Dataset.from_dict({"text": heldout_docs}),
            processing_class=tok,
            peft_config=peft_config,
            optimizer_cls_and_kwargs=factory,
            callbacks=callbacks,
        )
    else:
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        trainer = Trainer(
            model=model,
            args=targs,
            train_dataset=Windows(train_docs, tok, args.seq),
            eval_dataset=Windows(heldout_docs, tok, args.seq),
            processing_class=tok,
            optimizer_cls_and_kwargs=factory,
            callbacks=callbacks,
        )
    add_metrics_callback(trainer)
    return trainer


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = ap.add_argument_group("data and model")
    data.add_argument("--data", default=None, help=".txt, or .jsonl with a 'text' field (default: the stdlib's source)")
    data.add_argument("--max-bytes", type=int, default=1_000_000, help="use at most this much text")
    data.add_argument("--model", default=None, help="local directory or hub name (default: a tiny LLaMA from config)")
    data.add_argument("--tokenizer", default=None, help="local directory or hub name (default: --model's, else a BPE)")
    data.add_argument("--vocab", type=int, default=2048, help="vocabulary of the trained BPE (no --model/--tokenizer)")
    data.add_argument("--hidden", type=int, default=128, help="tiny LLaMA width (no --model)")
    data.add_argument("--layers", type=int, default=2, help="tiny LLaMA depth (no --model)")
    data.add_argument("--seq", type=int, default=128, help="tokens per training sequence")

    train = ap.add_argument_group("training")
    train.add_argument("--trainer", choices=["sft", "trainer"], default="sft", help="trl.SFTTrainer or plain Trainer")
    train.add_argument("--output-dir", default="runs/finetune")
    train.add_argument("--max-steps", type=int, default=200)
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
        help="resume from the last checkpoint in --output-dir (none there: start a new run); --max-steps must be "
        "the checkpointed run's",
    )
    train.add_argument("--bf16", action="store_true", help="bf16 autocast")
    train.add_argument("--gradient-checkpointing", action="store_true")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--report-to", nargs="*", default=[], help="e.g. tensorboard wandb (default: console only)")
    train.add_argument("--use-cpu", action=argparse.BooleanOptionalAction, default=True)
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest for tiny models)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")

    lora = ap.add_argument_group("LoRA (PEFT)")
    lora.add_argument("--lora-r", type=int, default=0, help="LoRA rank; 0 (default) is a full fine-tune")
    lora.add_argument("--lora-alpha", type=int, default=None, help="default: 2 * --lora-r")
    lora.add_argument("--lora-dropout", type=float, default=0.0)
    lora.add_argument(
        "--lora-targets", nargs="+", default=["all-linear"], help="peft target_modules (default: all-linear)"
    )

    opt = ap.add_argument_group("SubspaceAdamW")
    opt.add_argument("--rank", type=int, default=None, help="subspace rank; default 32 full, min(8, --lora-r) LoRA")
    opt.add_argument("--update-gap", type=int, default=50, help="refresh the subspace every N optimizer steps")
    opt.add_argument("--scale", type=float, default=0.25)
    opt.add_argument("--moments-dtype", default="float32", help="float32, bfloat16 or int8")
    opt.add_argument("--basis-dtype", default="float32", help="float32 or bfloat16")
    opt.add_argument(
        "--target-modules", nargs="+", default=["all-linear"], help="projected weights (optim_target_modules)"
    )
    opt.add_argument("--optim-args", default="", help="more optim_args entries, e.g. 'refresh=svd, moments=keep'")
    args = ap.parse_args(argv)
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
    so); one written with another ``--max-steps`` is refused (``resuming.ResumeMismatch``), because the trainer
    would rebuild the cosine schedule over the new length and change the lr of the remaining steps."""
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
    if saved is not None:  # no trainer state: the trainer refuses the checkpoint itself
        resuming.check_length(last, "--max-steps", saved, args.max_steps)
    return last


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    resume_from = resume_checkpoint(args)
    if args.quiet:
        import datasets

        datasets.disable_progress_bars()
    if args.threads:
        torch.set_num_threads(args.threads)
    trainer = build_trainer(args)
    model = trainer.model
    before = None if resume_from else trainer.evaluate()["eval_loss"]
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - start
    after = trainer.evaluate()["eval_loss"]
    final = Path(args.output_dir) / "final"
    trainer.save_model(str(final))  # the adapter only, with LoRA

    opt = unwrap_optimizer(trainer.optimizer)
    overall = opt.subspace_metrics()["overall"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    in_optimizer = {id(p) for g in opt.param_groups for p in g["params"]}
    adamw_bytes = 2 * sum(p.numel() * 4 for p in trainable)
    summary = {
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
        "rank": args.rank,
        "projected_params": overall["projected_params"],
        "optimizer_state_mib": round(overall["state_bytes"] / 2**20, 4),
        "adamw_state_mib": round(adamw_bytes / 2**20, 4),
        "captured_energy": overall["captured_energy"],
        "output_dir": args.output_dir,
        "saved_model": str(final),
    }
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
