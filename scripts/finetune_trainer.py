"""Fine-tune a small causal LM with the HuggingFace Trainer and SubspaceAdamW, on local text, on CPU.

The model is built from a config (a tiny LLaMA by default, or ``--config DIR`` with a config.json), never
downloaded. Text comes from ``--text-file`` or, by default, the Python standard library's own source;
tokens are UTF-8 bytes unless ``--tokenizer DIR`` names a local tokenizer. The optimizer is configured the
way a ``galore_adamw`` run is: ``optim_target_modules`` and an ``optim_args`` string in TrainingArguments.

    python scripts/finetune_trainer.py                          # under a minute on 2 CPU cores
    python scripts/finetune_trainer.py --max-steps 400 --resume # continue from the last checkpoint
    python scripts/finetune_trainer.py --way factory --bf16 --gradient-accumulation-steps 2
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from subspace_optim.integrations.transformers import (
    SubspaceMetricsCallback,
    add_metrics_callback,
    create_optimizer,
    optimizer_cls_and_kwargs,
    unwrap_optimizer,
)
from subspace_optim.pretrain import corpus, lm


class Windows(torch.utils.data.Dataset):
    """Non-overlapping ``seq``-token windows of one long token stream; labels are the inputs (the model
    shifts them by one)."""

    def __init__(self, tokens: torch.Tensor, seq: int) -> None:
        if tokens.numel() < seq + 1:
            raise ValueError(f"{tokens.numel()} tokens are fewer than one window of --seq {seq}; give more text")
        self.tokens, self.seq = tokens, seq
        self.n = tokens.numel() // seq

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = self.tokens[i * self.seq : (i + 1) * self.seq]
        return {"input_ids": x, "labels": x.clone()}


def load_text(args: argparse.Namespace) -> tuple[str, str]:
    """(train, held-out) text: the file's last 5% is held out; the stdlib corpus splits by file."""
    if args.text_file is None:
        return corpus.stdlib_text(args.max_bytes), corpus.stdlib_text(args.max_bytes // 20, split="heldout")
    text = Path(args.text_file).read_text(encoding="utf-8", errors="replace")[: args.max_bytes]
    cut = int(len(text) * 0.95)
    return text[:cut], text[cut:]


def tokenize(args: argparse.Namespace):
    """A function from text to a 1-D LongTensor, and the vocabulary size it needs."""
    if args.tokenizer is None:
        return lm.byte_tokens, 256
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)

    def encode(text: str) -> torch.Tensor:
        return torch.tensor(tok(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)

    return encode, len(tok)


def build_model(args: argparse.Namespace, vocab: int) -> torch.nn.Module:
    if args.config is None:
        return lm.tiny_llama(
            hidden=args.hidden,
            intermediate=args.hidden * 8 // 3,
            layers=args.layers,
            heads=max(1, args.hidden // 32),
            vocab=vocab,
            max_positions=args.seq,
        )
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(args.config, local_files_only=True)
    if config.vocab_size < vocab:
        raise ValueError(f"--config has vocab_size {config.vocab_size} but the tokens need {vocab}")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text-file", default=None, help="local UTF-8 text (default: the Python stdlib's source)")
    ap.add_argument("--max-bytes", type=int, default=1_000_000, help="use at most this much text")
    ap.add_argument("--tokenizer", default=None, help="local tokenizer directory (default: byte-level tokens)")
    ap.add_argument("--config", default=None, help="local model config directory (default: a tiny LLaMA)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--output-dir", default="runs/finetune_trainer")
    ap.add_argument("--max-steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--gradient-accumulation-steps", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-2, help="GaLore-style methods want a larger lr than AdamW")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--target-modules", nargs="+", default=["self_attn", "mlp"], help="optim_target_modules")
    ap.add_argument(
        "--optim-args",
        default="rank=32, update_proj_gap=50, scale=0.25, proj_type=std",
        help="galore_adamw-style optim_args string (our own options such as moments=rotate work too)",
    )
    ap.add_argument("--way", choices=["optimizers", "factory"], default="optimizers", help="how the Trainer gets it")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (Trainer's bf16=True)")
    ap.add_argument("--save-steps", type=int, default=None, help="checkpoint every N steps (default: at the end)")
    ap.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output-dir")
    ap.add_argument("--report-to", nargs="*", default=[], help="e.g. tensorboard wandb (default: console only)")
    ap.add_argument("--use-cpu", action=argparse.BooleanOptionalAction, default=True)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    train_text, heldout_text = load_text(args)
    encode, vocab = tokenize(args)
    train_set, eval_set = Windows(encode(train_text), args.seq), Windows(encode(heldout_text), args.seq)
    model = build_model(args, vocab)

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=args.batch,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.max_steps // 20),
        logging_steps=max(1, args.max_steps // 10),
        save_strategy="steps",
        save_steps=args.save_steps or args.max_steps,
        bf16=args.bf16,
        use_cpu=args.use_cpu,
        report_to=args.report_to,
        optim_target_modules=args.target_modules,
        optim_args=args.optim_args,
        seed=0,
    )
    if args.way == "optimizers":
        way = {"optimizers": (create_optimizer(model, training_args), None)}
    else:
        way = {"optimizer_cls_and_kwargs": optimizer_cls_and_kwargs(training_args)}
    trainer = Trainer(model=model, args=training_args, train_dataset=train_set, eval_dataset=eval_set, **way)
    add_metrics_callback(trainer, SubspaceMetricsCallback())

    # Before training: the freshly initialised model (a resumed run loads its weights inside train()).
    before = None if args.resume else trainer.evaluate()["eval_loss"]
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    seconds = time.perf_counter() - start
    after = trainer.evaluate()["eval_loss"]

    opt = unwrap_optimizer(trainer.optimizer)
    metrics = opt.subspace_metrics()["overall"]
    adamw_bytes = 2 * sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    summary = {
        "steps": trainer.state.global_step,
        "train_seconds": round(seconds, 1),
        "eval_loss_before": None if before is None else round(before, 4),
        "eval_loss_after": round(after, 4),
        "eval_perplexity_after": round(math.exp(min(after, 50.0)), 2),
        "projected_params": metrics["projected_params"],
        "optimizer_state_mib": round(metrics["state_bytes"] / 2**20, 3),
        "adamw_state_mib": round(adamw_bytes / 2**20, 3),
        "captured_energy": metrics["captured_energy"],
        "output_dir": args.output_dir,
    }
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
