"""Bases that are never stored (``refresh="seeded"``, ``"dct"``) against stored ones: regular-step time, refresh
time and state bytes, on LLaMA projection shapes, the reference engine.

Four optimizers on the same matrices and gradients, interleaved by round (``common.interleaved``):

- ``warm``: the default stored basis (warm refresh), the default residual (fira), moments rotate;
- ``dct``: DCT columns kept as indices, regenerated at every step; the default residual, moments rotate;
- ``random+apollo``: a stored random orthonormal basis with APOLLO's channel scaling (residual apollo, moments
  keep): the stored counterpart of the seeded one;
- ``seeded+apollo``: APOLLO's seeded projection, regenerated at every step (residual apollo, moments keep), from the
  default stream: random signs from Philox, drawn in one batch per size.

Regular steps: a refresh gap longer than the run; one untimed step (the first refresh) and one warm-up, then
``--steps`` rounds. Refresh: a gap of 1, so every step refreshes every matrix; each round gives every optimizer
the same new gradients, and the time a refresh takes is read from ``subspace_metrics()`` (``last_refresh_time_s``:
the bases' computation; ours also counts the DCT's moment transport, the warm refresh's is not counted), next to the
whole refresh step's wall time.

    python -m scripts.bench.regenerated --model 60m --json docs/results/regenerated.json   # CPU, 1 thread
    python -m scripts.bench.regenerated --smoke                                              # seconds
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from subspace_optim import SubspaceAdamW

from . import common

CONFIGS: dict[str, dict[str, Any]] = {
    "warm": {},
    "dct": {"refresh": "dct"},
    "random+apollo": {"refresh": "random", "residual": "apollo", "moments": "keep"},
    "seeded+apollo": {"refresh": "seeded", "residual": "apollo", "moments": "keep"},
}
STORED_OF = {"dct": "warm", "seeded+apollo": "random+apollo"}  # each regenerated kind against its stored twin


def _build(shape: common.LlamaShape, gap: int, dtype: torch.dtype) -> dict[str, tuple[SubspaceAdamW, list]]:
    out = {}
    for name, options in CONFIGS.items():
        params = common.projected_params(shape, "cpu", dtype)
        opt = SubspaceAdamW(
            [{"params": params, "rank": shape.rank, "update_gap": gap}], lr=1e-3, engine="reference", **options
        )
        opt.step()  # the first refresh
        out[name] = (opt, params)
    return out


def _give(runs: dict[str, tuple[SubspaceAdamW, list]], seed: int) -> None:
    """The same new gradients for every optimizer."""
    first = next(iter(runs.values()))[1]
    grads = common.new_gradients(first, seed)
    for _, params in runs.values():
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()


def regular(shape: common.LlamaShape, steps: int, dtype: torch.dtype) -> dict[str, Any]:
    runs = _build(shape, 10**9, dtype)
    for opt, _ in runs.values():
        opt.step()  # warm-up
    timings = common.interleaved({name: opt.step for name, (opt, _) in runs.items()}, steps)
    return timings.summary("warm")


def refresh(shape: common.LlamaShape, steps: int, dtype: torch.dtype) -> dict[str, Any]:
    runs = _build(shape, 1, dtype)
    refresh_s: dict[str, list[float]] = {name: [] for name in runs}

    def timed(name: str, opt: SubspaceAdamW) -> Any:
        def step() -> None:
            opt.step()
            refresh_s[name].append(opt.subspace_metrics()["overall"]["last_refresh_time_s"])

        return step

    timings = common.interleaved(
        {name: timed(name, opt) for name, (opt, _) in runs.items()}, steps, before_round=lambda k: _give(runs, k)
    )
    summary = timings.summary("warm")
    for name in runs:
        summary[name]["refresh_median_s"] = common.median(refresh_s[name])
    return summary


def state_bytes(shape: common.LlamaShape, dtype: torch.dtype) -> dict[str, int]:
    return {
        name: opt.subspace_metrics()["overall"]["state_bytes"] for name, (opt, _) in _build(shape, 10**9, dtype).items()
    }


def _tables(result: dict[str, Any]) -> list[dict]:
    reg, ref, sizes = result["regular"], result["refresh"], result["state_bytes"]
    rows = []
    for name in CONFIGS:
        twin = STORED_OF.get(name)
        vs = common.median(
            [a / b for a, b in zip(reg[name]["runs_s"], reg[twin]["runs_s"], strict=True)] if twin else [1.0]
        )
        refresh_ratio = ref["warm"]["refresh_median_s"] / ref[name]["refresh_median_s"]
        rows.append(
            [
                name,
                common.cell(reg[name]["median_s"], ".1f", 1e3),
                f"{vs:.2f}x" if twin else "-",
                common.cell(ref[name]["refresh_median_s"], ".1f", 1e3),
                f"{refresh_ratio:.1f}x",
                common.cell(ref[name]["median_s"], ".1f", 1e3),
                common.cell(sizes[name] / 2**20, ".2f"),
            ]
        )
    columns = [
        "optimizer",
        "regular step (ms)",
        "vs its stored twin",
        "refresh (ms)",
        "refresh speed-up vs warm",
        "refresh step (ms)",
        "state (MiB)",
    ]
    notes = [
        f"LLaMA-{result['model']} projected matrices, {result['dtype']}, reference engine, rank {result['rank']}; "
        f"medians of {result['rounds']} interleaved rounds.",
        "vs its stored twin: per-round ratio of regular-step times, dct against warm, seeded+apollo against "
        "random+apollo (the same update with a stored random orthonormal basis).",
    ]
    return [common.table("Regenerated bases against stored ones", columns, rows, notes)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=common.CPU_MODELS, default="60m")
    parser.add_argument("--smoke", action="store_true", help="the tiny shape, 2 rounds")
    parser.add_argument("--steps", type=int, default=10, help="interleaved rounds of each timing")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    common.add_output_args(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.steps = "smoke", 2
    common.set_threads(args.threads, "cpu")
    shape, dtype = common.llama_shape(args.model), getattr(torch, args.dtype)
    result: dict[str, Any] = {
        "benchmark": "regenerated",
        "model": args.model,
        "dtype": args.dtype,
        "rank": shape.rank,
        "rounds": args.steps,
        "regular": regular(shape, args.steps, dtype),
        "refresh": refresh(shape, args.steps, dtype),
        "state_bytes": state_bytes(shape, dtype),
    }
    result["tables"] = _tables(result)
    common.write_result(result, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
