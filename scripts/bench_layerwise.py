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

    python scripts/bench_layerwise.py --model 60m --markdown docs/benchmarks.md   # CPU, a few minutes
    python scripts/bench_layerwise.py --smoke                                      # seconds

On CPU the reference engine runs; with ``--engine triton`` under ``TRITON_INTERPRET=1`` the interpreted
kernels run inside backward (a wiring check, not a speed). The GPU numbers (Triton step, one launch per
matrix inside backward) are owed until a device is lent.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any

import torch

from subspace_optim import SubspaceAdamW, param_groups
from subspace_optim.pretrain.lm import tiny_llama

# name -> (hidden, intermediate, layers, heads, vocab, rank): the GaLore paper's shapes; smoke is tiny.
MODELS = {"smoke": (64, 172, 2, 4, 256, 8), "60m": (512, 1376, 8, 8, 32000, 128)}


def build(model_name: str, layerwise: bool, gap: int, accum: int, engine: str) -> tuple[Any, Any]:
    hidden, inter, layers, heads, vocab, rank = MODELS[model_name]
    model = tiny_llama(hidden=hidden, intermediate=inter, layers=layers, heads=heads, vocab=vocab, seed=0)
    groups = param_groups(model, ["self_attn", "mlp"], rank=rank, update_gap=gap)
    opt = SubspaceAdamW(groups, lr=1e-3, engine=engine)
    if layerwise:
        opt.update_in_backward(model, accumulation_steps=accum)
    return model, opt


def train_step(model: Any, opt: Any, batches: list[Any]) -> None:
    for ids in batches:
        logits = model(input_ids=ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        (loss / len(batches)).backward()
    opt.step()
    opt.zero_grad()


def run_rows(args: Any) -> list[dict[str, Any]]:
    vocab = MODELS[args.model][4]
    rows = []
    for kind, gap in (("regular steps", 10_000), ("refresh steps", 1)):
        variants = {lw: build(args.model, lw, gap, args.accum, args.engine) for lw in (False, True)}
        times: dict[bool, list[float]] = {False: [], True: []}
        gen = torch.Generator().manual_seed(0)
        for step in range(args.steps + 1):  # the first (cold: state created, first refresh) is not timed
            batches = [torch.randint(0, vocab, (args.batch, args.seq + 1), generator=gen) for _ in range(args.accum)]
            for lw, (model, opt) in variants.items():
                start = time.perf_counter()
                train_step(model, opt, batches)
                if step:
                    times[lw].append(time.perf_counter() - start)
                if lw:
                    assert all(p.grad is None for p in model.parameters()), "layer-wise left a gradient"
        (m0, _), (m1, _) = variants[False], variants[True]
        for (name, a), b in zip(m0.named_parameters(), m1.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        regular, layerwise = statistics.median(times[False]), statistics.median(times[True])
        rows.append({"steps": kind, "accum": args.accum, "regular_s": regular, "layerwise_s": layerwise,
                     "ratio": layerwise / regular})  # fmt: skip
    return rows


def markdown(rows: list[dict[str, Any]], args: Any, env: dict[str, Any]) -> str:
    lines = [
        f"\n### Layer-wise step time: LLaMA {args.model}, {args.engine} engine\n",
        f"`python scripts/bench_layerwise.py --model {args.model} --accum {args.accum} --steps {args.steps} "
        f"--batch {args.batch} --seq {args.seq} --threads {args.threads} --engine {args.engine}`; {env}\n",
        "| steps | micro-batches | regular (s) | layer-wise (s) | layer-wise / regular |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        times = f"{r['regular_s']:.3f} | {r['layerwise_s']:.3f} | {r['ratio']:.3f}"
        lines.append(f"| {r['steps']} | {r['accum']} | {times} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="60m")
    parser.add_argument("--smoke", action="store_true", help="the tiny model, 2 timed steps")
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per row")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--engine", choices=["reference", "triton"], default="reference")
    parser.add_argument("--json", help="write the rows here too")
    parser.add_argument("--markdown", help="append a markdown table to this file")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.steps, args.seq = "smoke", 2, 32
    torch.set_num_threads(args.threads)
    env = {"torch": torch.__version__, "python": platform.python_version(), "threads": args.threads,
           "machine": platform.machine(), "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    rows = run_rows(args)
    for r in rows:
        print(json.dumps(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "environment": env, "args": vars(args)}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(markdown(rows, args, env))


if __name__ == "__main__":
    main()
