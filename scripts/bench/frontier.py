"""The memory-quality frontier: optimizer-state bytes against held-out loss at equal steps, peers and ours.

Every row is ``subspace-optim pretrain`` runs (``quality.run_many``: same model init, data order, steps and rank;
only the optimizer changes) at each ``--seeds``, on the built-in data; the table gives the mean held-out loss over
the seeds, the state the run measured (``state_bytes`` of the optimizer), and the same configuration's weights +
state at LLaMA-7B in the APOLLO/SCALE/GaLore papers' accounting (``memory.seven_b_gb``; peers by their formulas).
The plot puts state against loss, one point per row.

Rows: torch AdamW and galore-torch at their tuned settings (the model file's, configs/), bitsandbytes AdamW8bit,
apollo-torch's APOLLO (channel scaling, scale 1) and APOLLO-Mini (rank 1, tensor scaling, scale 128), and
SubspaceAdamW over stored (fp32, bf16 or int8) / seeded / DCT bases, fp32 / int8 moments, full / factored second
moments and residual none / fira / apollo. Ours all take the default's tuning (lr 1e-2, plain lr 3e-2, the same in
both model files); the seeded rows take APOLLO's scale (1, and sqrt(128) for rank 1). The notes name, for each peer,
our best row at or below its state.

    python -m scripts.bench.frontier --model llama_9m --seeds 0 1 --out runs/frontier --json docs/results/frontier.json
    python -m scripts.bench.frontier --smoke                                                  # a pipeline check

``--keep EARLIER.json`` carries over the rows of an earlier result (same model and seeds) that this command did
not run, each marked with the commit, date and machine it was measured at: a table is then completed, or some of
its rows redone after a change of the code they exercise, without rerunning the rest (run caches do not outlive a
machine).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

from . import common, memory, quality

OURS_TUNED = {"plain_lr": 3e-2}
BALANCED = {"residual": "fira", "moments_dtype": "int8", "basis_dtype": "bfloat16", "second_moment": "factored"}
# (name, optimizer, lr, pretrain flags). A peer's lr None: the model file's lr and plain lr for that optimizer (its
# tuning where the file says it was tuned: AdamW and galore-torch), so each size runs its own.
ROWS: list[tuple[str, str, float | None, dict[str, Any]]] = [
    ("adamw", "adamw", None, {}),
    ("adamw8bit", "adamw8bit", None, {}),
    ("galore", "galore", None, {}),
    ("apollo", "apollo", None, {"apollo_scale": 1.0, "apollo_scale_type": "channel"}),
    ("apollo_mini", "apollo", None, {"apollo_scale": 128.0, "apollo_scale_type": "tensor", "rank": 1}),
    ("ours_stored_fira", "subspace", 1e-2, {**OURS_TUNED, "residual": "fira"}),
    (
        "ours_stored_fira_int8",
        "subspace",
        1e-2,
        {**OURS_TUNED, "residual": "fira", "moments_dtype": "int8", "basis_dtype": "bfloat16"},
    ),
    ("ours_stored_fira_factored", "subspace", 1e-2, {**OURS_TUNED, "residual": "fira", "second_moment": "factored"}),
    ("ours_stored_fira_int8basis", "subspace", 1e-2, {**OURS_TUNED, "residual": "fira", "basis_dtype": "int8"}),
    (
        "ours_stored_fira_int8_factored",
        "subspace",
        1e-2,
        {
            **OURS_TUNED,
            "residual": "fira",
            "moments_dtype": "int8",
            "basis_dtype": "bfloat16",
            "second_moment": "factored",
        },
    ),
    *(
        (
            f"ours_stored_fira_int8_factored_r{rank}",
            "subspace",
            1e-2,
            {**OURS_TUNED, "rank": rank, **BALANCED},
        )
        for rank in (16, 8)
    ),
    *(
        (
            f"ours_stored_fira_int8_factored_int8basis{suffix}",
            "subspace",
            1e-2,
            {**OURS_TUNED, **rank, **BALANCED, "basis_dtype": "int8"},
        )
        for suffix, rank in (("", {}), ("_r16", {"rank": 16}))
    ),
    # The embedding and head's moments in 4 bits with a full V (plain_moments_dtype="int4",
    # plain_second_moment="full"); the projected matrices' as in the row above.
    *(
        (
            f"ours_stored_fira_int8_factored_int8basis_plain4{suffix}",
            "subspace",
            1e-2,
            {
                **OURS_TUNED,
                **rank,
                **BALANCED,
                "basis_dtype": "int8",
                "plain_moments_dtype": "int4",
                "plain_second_moment": "full",
            },
        )
        for suffix, rank in (("", {}), ("_r16", {"rank": 16}))
    ),
    ("ours_dct_fira", "subspace", 1e-2, {**OURS_TUNED, "residual": "fira", "refresh": "dct"}),
    (
        "ours_dct_fira_int8_factored",
        "subspace",
        1e-2,
        {**OURS_TUNED, "residual": "fira", "refresh": "dct", "moments_dtype": "int8", "second_moment": "factored"},
    ),
    ("ours_dct_none", "subspace", 1e-2, {**OURS_TUNED, "residual": "none", "refresh": "dct"}),
    (
        "ours_seeded_apollo",
        "subspace",
        1e-2,
        {**OURS_TUNED, "refresh": "seeded", "residual": "apollo", "moments": "keep", "scale": 1.0},
    ),
    (
        "ours_seeded_apollo_int8_factored",
        "subspace",
        1e-2,
        {
            **OURS_TUNED,
            "refresh": "seeded",
            "residual": "apollo",
            "moments": "keep",
            "scale": 1.0,
            "moments_dtype": "int8",
            "second_moment": "factored",
        },
    ),
    *(
        (
            f"ours_seeded_mini_int8_factored{suffix}",
            "subspace",
            1e-2,
            {
                **OURS_TUNED,
                "refresh": "seeded",
                "seed_stream": stream,
                "rank": 1,
                "residual": "apollo_tensor",
                "moments": "keep",
                "scale": math.sqrt(128.0),
                "moments_dtype": "int8",
                "second_moment": "factored",
            },
        )
        for suffix, stream in (("", "apollo"), ("_signs", "counter"))
    ),
]
PEERS = ("adamw", "adamw8bit", "galore", "apollo", "apollo_mini")


def resolved(shape: dict[str, Any]) -> list[tuple[str, str, float, dict[str, Any]]]:
    """``ROWS`` with each peer's lr (and plain lr, where the model file gives one) from the model file."""
    out = []
    for name, optimizer, lr, flags in ROWS:
        if lr is None:
            lr = shape["lr"][optimizer]
            plain = shape.get("plain_lr", {}).get(optimizer)
            flags = flags if plain is None else {"plain_lr": plain, **flags}
        out.append((name, optimizer, lr, flags))
    return out


def _specs(table: list[tuple[str, str, float, dict]], seeds: list[int], only: list[str] | None) -> list[tuple]:
    return [
        (f"{name}-s{seed}", optimizer, lr, {**flags, "seed": seed})
        for name, optimizer, lr, flags in table
        if not only or name in only
        for seed in seeds
    ]


def kept_rows(path: Path, args: argparse.Namespace, measured: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of the earlier result at ``path`` that ``measured`` does not hold, each with ``measured_at`` (the
    commit, date and machine of that result, or of the result it was itself kept from: runs on another CPU model
    differ in their last bits, which training amplifies). Refuses a result of another model or other seeds: their
    losses would not compare."""
    earlier = json.loads(Path(path).read_text())
    if earlier.get("model") != args.model or earlier.get("args", {}).get("seeds") != args.seeds:
        raise SystemExit(
            f"--keep {path}: its runs are {earlier.get('model')} with seeds {earlier.get('args', {}).get('seeds')}, "
            f"this command's {args.model} with seeds {args.seeds}; keep only a result of the same model and seeds"
        )
    env = earlier.get("environment", {})
    stamp = f"{env.get('commit', '?')}, {env.get('date', '?')}, {env.get('device_name', '?')}"
    names = {r["name"] for r in measured}
    return [{"measured_at": stamp, **r} for r in earlier["rows"] if r["name"] not in names]


def rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The finished runs, one row per configuration: mean and per-seed held-out loss, measured state bytes."""
    table = resolved(common.model_config(args.model))
    done = quality.run_many(args, _specs(table, args.seeds, args.only))
    out = []
    for name, optimizer, lr, flags in table:
        runs = [r for r in done if r["name"].rsplit("-s", 1)[0] == name]
        if not runs:
            continue
        out.append(
            {
                "name": name,
                "optimizer": optimizer,
                "lr": lr,
                "flags": flags,
                "losses": [r["eval_loss"] for r in runs],
                "mean_loss": statistics.mean(r["eval_loss"] for r in runs),
                "state_bytes": runs[0]["state_bytes"],
                "seven_b_gb": seven_b_gb(optimizer, flags, args.model_rank, args.model_hidden),
            }
        )
    return out


def _state_formula(optimizer: str, flags: dict[str, Any]) -> Any:
    """The memory script's byte formula of a row's configuration (``scripts/bench/memory.py``)."""
    if optimizer == "subspace":
        kind = {"seeded": "seeded", "dct": "dct"}.get(flags.get("refresh", "warm"), "stored")
        return memory.ours(
            flags.get("moments_dtype", "float32"),
            flags.get("basis_dtype", "float32"),
            kind,
            flags.get("residual", "none"),
            flags.get("second_moment", "full"),
            flags.get("plain_moments_dtype"),
            flags.get("plain_second_moment"),
        )
    return {
        "adamw": memory.adamw,
        "adamw8bit": memory.bnb_adamw8bit,
        "galore": memory.galore,
        "apollo": memory.apollo_paper,
    }[optimizer]


def seven_b_gb(optimizer: str, flags: dict[str, Any], rank: int, hidden: int) -> float:
    """Weights (bf16) + the row's state at LLaMA-7B, GB, at the row's rank scaled to 7B's width (rank r of a
    ``hidden``-wide model: r * 4096 / hidden; rank 1 stays 1)."""
    big_hidden, inter, layers, vocab, _ = memory.MODELS["7b"]
    specs = memory.llama(big_hidden, inter, layers, vocab)
    r = int(flags.get("rank", rank))
    r = 1 if r == 1 else r * big_hidden // hidden
    state = _state_formula(optimizer, flags)(specs, r, 2)[1]
    return (sum(s.numel for s in specs) * 2 + state) / 1e9


def frontier_notes(table_rows: list[dict[str, Any]]) -> list[str]:
    """For each peer: our best row at or below its state, and whether its loss is lower (mean over seeds)."""
    ours = [r for r in table_rows if r["optimizer"] == "subspace"]
    notes = []
    for peer in (r for r in table_rows if r["name"] in PEERS):
        within = [r for r in ours if r["state_bytes"] <= peer["state_bytes"]]
        if not within:
            notes.append(f"{peer['name']}: no configuration of ours at or below its state")
            continue
        best = min(within, key=lambda r: r["mean_loss"])
        verdict = "beats" if best["mean_loss"] < peer["mean_loss"] else "does NOT beat"
        notes.append(
            f"{peer['name']} ({peer['state_bytes'] / 2**20:.2f} MiB, loss {peer['mean_loss']:.4f}): our best at or "
            f"below it, {best['name']} ({best['state_bytes'] / 2**20:.2f} MiB, loss {best['mean_loss']:.4f}), "
            f"{verdict} it"
        )
    return notes


def _table(args: argparse.Namespace, table_rows: list[dict[str, Any]]) -> dict[str, Any]:
    columns = ["configuration", "lr", "held-out loss (mean)", "per seed", "state (MiB)", "7B weights + state (GB)"]
    body = [
        [
            r["name"],
            f"{r['lr']:g}",
            f"{r['mean_loss']:.4f}",
            " / ".join(f"{x:.4f}" for x in r["losses"]),
            f"{r['state_bytes'] / 2**20:.2f}",
            common.cell(r["seven_b_gb"], ".2f"),
        ]
        for r in sorted(table_rows, key=lambda r: r["state_bytes"])
    ]
    stamps = sorted({r["measured_at"] for r in table_rows if "measured_at" in r})
    kept = [
        f"kept from an earlier result (--keep), measured at {stamp}: "
        + ", ".join(r["name"] for r in table_rows if r.get("measured_at") == stamp)
        for stamp in stamps
    ]
    notes = [
        f"{args.model}, seeds {', '.join(map(str, args.seeds))}, equal steps and data; state measured by each run.",
        "7B: bf16 weights (13.48 GB) + the configuration's state at LLaMA-7B in the papers' accounting, at the "
        "row's rank scaled to 7B's width (r x 4096 / hidden; rank 1 stays 1); the memory script's formulas.",
        *([f"{args.steps} steps (--steps), not the model file's"] if args.steps else []),
        *kept,
        *frontier_notes(table_rows),
    ]
    return common.table("Memory-quality frontier", columns, body, notes)


def plot(table_rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in table_rows:
        peer = r["optimizer"] != "subspace"
        ax.scatter(r["state_bytes"] / 2**20, r["mean_loss"], marker="s" if peer else "o", c="C1" if peer else "C0")
        ax.annotate(r["name"], (r["state_bytes"] / 2**20, r["mean_loss"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("optimizer state (MiB, log)")
    ax.set_ylabel("held-out loss (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama_9m")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=common.ROOT / "runs" / "frontier")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--only", nargs="*", help="row names to run (default: every row)")
    parser.add_argument("--plot", type=Path, help="write the plot here (PNG)")
    parser.add_argument("--keep", type=Path, help="an earlier result whose rows this command does not run are kept")
    parser.add_argument("--smoke", action="store_true", help="the tiny model, a few steps, one seed")
    common.add_output_args(parser)
    args = parser.parse_args(argv)
    args.extra_flags = []
    shape = common.model_config(args.model)
    args.model_rank, args.model_hidden = shape["rank"], shape["hidden_size"]
    if args.smoke:  # the tiny shape of quality's smoke runs (its flags), one seed
        args.steps, args.seeds = 4, [0]
        args.extra_flags = quality.SMOKE_FLAGS
    table_rows = rows(args)
    if args.keep:
        table_rows += kept_rows(args.keep, args, table_rows)
    result = {"benchmark": "frontier", "model": args.model, "rows": table_rows, "tables": [_table(args, table_rows)]}
    if args.plot:
        plot(table_rows, args.plot)
        result["plot"] = str(args.plot)
    common.write_result(result, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
