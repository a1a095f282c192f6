"""Test helpers: small LLaMA models built from a config, byte-level tokens, and a plain training loop.

The tests that train a real model (convergence, the Trainer integration, entry points, FSDP2 workers) share
these. They need ``transformers``; nothing is downloaded. Test files import this module as ``tiny_lm`` (pytest
puts tests/ on ``sys.path``; spawned workers inherit it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


def tiny_llama(
    hidden: int = 64,
    intermediate: int = 172,
    layers: int = 2,
    heads: int = 4,
    vocab: int = 256,
    max_positions: int = 256,
    seed: int = 0,
) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` (seeded, so every optimizer starts from the same W)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def byte_tokens(text: str) -> Tensor:
    """UTF-8 bytes as int64 token ids (vocabulary 256)."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def batches(tokens: Tensor, batch: int, seq: int, seed: int):
    """Endless random windows of ``seq + 1`` tokens, drawn from a private generator (same order for every
    optimizer compared)."""
    gen = torch.Generator().manual_seed(seed)
    limit = tokens.numel() - seq - 1
    while True:
        starts = torch.randint(0, limit, (batch,), generator=gen)
        yield torch.stack([tokens[s : s + seq + 1] for s in starts.tolist()])


@torch.no_grad()
def eval_loss(model: nn.Module, tokens: Tensor, seq: int, max_windows: int = 32) -> float:
    """Mean next-token loss over consecutive, non-overlapping windows of held-out tokens."""
    model.eval()
    n = min(max_windows, (tokens.numel() - 1) // seq)
    windows = torch.stack([tokens[i * seq : i * seq + seq + 1] for i in range(n)])
    out = model(input_ids=windows[:, :-1])
    model.train()
    logits = out.logits
    return float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)))


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    eval_loss: float = float("nan")
    seconds: float = 0.0


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_tokens: Tensor,
    eval_tokens: Tensor,
    *,
    steps: int,
    batch: int = 8,
    seq: int = 64,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train ``steps`` optimizer steps of next-token prediction; returns per-step loss and eval loss."""
    result = TrainResult()
    data = batches(train_tokens, batch, seq, seed)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        window = next(data)
        logits = model(input_ids=window[:, :-1]).logits
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        result.losses.append(loss.item())
        if on_step is not None:
            on_step(step, result.losses[-1])
    result.seconds = time.perf_counter() - start
    result.eval_loss = eval_loss(model, eval_tokens, seq)
    return result
