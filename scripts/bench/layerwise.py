"""The time cost of layer-wise updates: whole training steps (forward, backward, optimizer) of a LLaMA,
SubspaceAdamW stepping regularly vs updating inside backward (``update_in_backward``), in one run.

Inside backward each matrix is stepped, and refreshed when due, on its own as its gradient completes;
regular steps batch every matrix into one core call per group and refresh them together. This script
measures what that costs on this machine. Rows, each timed on the same batches:

- regular steps (no refresh in the timed steps: update gap larger than the run);
- refresh steps (update gap 1: every step refreshes every matrix, warm refresh);
- each for ``regular`` and ``layerwise`` and, with ``--accum 2``, the same with 2 micro-batches per step.

The variants' steps are interleaved (one step of each in turn), so load from other processes falls on all
alike; the median over ``--steps`` timed steps is reported, with the layer-wise / regular ratio. The script
also checks what it timed: after every layer-wise step no gradient is left, and the weights of the
regular and layer-wise models agree (they take identical steps).

    python -m scripts.bench.layerwise --model 60m --json layerwise.json   # CPU, a few minutes
    python -m scripts.bench.layerwise --smoke                             # seconds

On CPU the reference engine runs; with ``--engine triton`` under ``TRITON_INTERPRET=1`` the interpreted
kernels run inside backward (a wiring check, not a speed). The GPU numbers (Triton step, one launch per
matrix inside backward) are owed until a device is lent.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from subspace_optim import SubspaceAdamW, param_groups

from . import common

COLUMNS = ["steps", "micro-batches", "regular (s)", "layer-wise (s)", "layer-wise / regular"]


def build(
    shape: common.LlamaShape,
    layerwise: bool,
    gap: int,
    args: argparse.Namespace,
) -> tuple[torch.nn.Module, SubspaceAdamW]:
    model = common.build_llama(shape, seed=0, max_positions=args.seq)
    groups = param_groups(model, ["self_attn", "mlp"], rank=shape.rank, update_gap=gap)
    opt = SubspaceAdamW(groups, lr=1e-3, engine=args.engine)
    if layerwise:
        opt.update_in_backward(model, accumulation_steps=args.accum)
    return model, opt


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batches: list[torch.Tensor]) -> None:
    for ids in batches:
        (common.next_token_loss(model, ids) / len(batches)).backward()
    opt.step()
    opt.zero_grad()


def time_row(shape: common.LlamaShape, kind: str, gap: int, args: argparse.Namespace) -> dict[str, Any]:
    """Regular and layer-wise training steps, interleaved on the same batches; the first (cold) one untimed.
    After every layer-wise step no gradient is left; at the end both models' weights agree."""
    variants = {name: build(shape, name == "layerwise", gap, args) for name in ("regular", "layerwise")}
    generator = torch.Generator().manual_seed(0)
    batches: list[torch.Tensor] = []

    def new_batches(_: int) -> None:
        batches[:] = [
            torch.randint(0, shape.vocab, (args.batch, args.seq + 1), generator=generator) for _ in range(args.accum)
        ]

    @contextlib.contextmanager
    def no_gradient_left(name: str) -> Iterator[None]:
        yield
        model = variants[name][0]
        assert name == "regular" or all(p.grad is None for p in model.parameters()), "layer-wise left a gradient"

    steps = {name: (lambda m=model, o=opt: train_step(m, o, batches)) for name, (model, opt) in variants.items()}
    common.interleaved(steps, 1, before_round=new_batches, watch=no_gradient_left)  # cold: state, first refresh
    timings = common.interleaved(steps, args.steps, before_round=new_batches, watch=no_gradient_left)
    regular, layerwise = variants["regular"][0], variants["layerwise"][0]
    for (name, a), b in zip(regular.named_parameters(), layerwise.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    summary = timings.summary("regular")
    return {
        "steps": kind,
        "accum": args.accum,
        "regular_s": timings.median("regular"),
        "layerwise_s": timings.median("layerwise"),
        "ratio": timings.median("layerwise") / timings.median("regular"),
        "ratio_paired": summary["layerwise"]["vs_regular"],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["60m", "130m"], default="60m", help="a size from configs/")
    parser.add_argument("--smoke", action="store_true", help="the tiny model, 2 timed steps")
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per row")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--engine", choices=["reference", "triton"], default="reference")
    common.add_output_args(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.steps, args.seq = "smoke", 2, 32
    return args


def run_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row of regular steps (no refresh in the timed steps) and one of refresh steps (every step refreshes)."""
    shape = common.llama_shape(args.model)
    return [time_row(shape, kind, gap, args) for kind, gap in (("regular steps", 10_000), ("refresh steps", 1))]


def rows_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    cells = [
        [r["steps"], str(r["accum"]), f"{r['regular_s']:.3f}", f"{r['layerwise_s']:.3f}", f"{r['ratio']:.3f}"]
        for r in rows
    ]
    title = f"Layer-wise step time: LLaMA {args.model}, {args.engine} engine"
    note = (
        f"batch {args.batch} x {args.seq} tokens, rank {common.llama_shape(args.model).rank}; medians of "
        f"{args.steps} interleaved steps"
    )
    return common.table(title, COLUMNS, cells, [note])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run_rows(args)
    result = {"benchmark": "layerwise", "rows": rows, "tables": [rows_table(rows, args)]}
    return common.write_result(result, args)


if __name__ == "__main__":
    main()
