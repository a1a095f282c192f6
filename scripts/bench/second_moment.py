"""How closely small second moments track Adam's, on the vocabulary matrices' real gradients.

A ``subspace-optim pretrain`` run (any optimizer and flags; by default our fp32 default at llama_20m) is trained as
usual; before each optimizer step a hook reads the gradients of the embedding and the output head and feeds them to
Adam's own moments (M, full V) and, beside them, to second moments that keep O(rows + cols) numbers per matrix:

- ``factored``: Adafactor's row and column factors, V ~ row col^T / sum(row) (``subspace_optim.factored``), with its
  floor |M_hat| (what ``second_moment="factored"`` steps by);
- ``rows`` / ``cols``: one average of the squares per row (per token) or per column, spread along the other side;
- ``sm3``: SM3's cover, exponential version: v = b2 min(row_i, col_j) + (1 - b2) g^2, row = max_j v, col = max_i v,
  an upper bound of Adam's V at every step (Anil et al., 2019);

and, every ``--every`` steps, compares each one's bias-corrected Adam direction M_hat / (sqrt(V_hat) + eps) with the
full V's: the relative error of the direction, and the ratio of norms (above 1: the estimate steps further than
Adam). Nothing here changes the run: the moments are shadows of the trajectory the optimizer takes.

    python -m scripts.bench.second_moment --model llama_20m --steps 600 --json docs/results/second-moment-20m.json
    python -m scripts.bench.second_moment --smoke                                                 # a pipeline check
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from subspace_optim.pretrain import config as pretrain_config
from subspace_optim.pretrain import loop

from . import common, quality

BLOCKS = (16, 128, 1024)
ESTIMATORS = ("factored", "rows", "cols", "sm3", *(f"blocks{k}" for k in BLOCKS))


class Shadow:
    """Adam's moments of one matrix and the small second moments beside them, all fp32."""

    def __init__(self, shape: tuple[int, int], betas: tuple[float, float], eps: float):
        self.b1, self.b2 = betas
        self.eps = eps
        rows, cols = shape
        self.t = 0
        self.m = torch.zeros(shape)
        self.v = torch.zeros(shape)
        blocks = [k for k in BLOCKS if rows % k == 0]  # row blocks of equal size only
        self.names = [n for n in ESTIMATORS if not n.startswith("blocks")] + [f"blocks{k}" for k in blocks]
        # factored, rows, cols and the blocks share the row factor; factored, rows and cols the column factor.
        shared_row, shared_col = torch.zeros(rows), torch.zeros(cols)
        self.row = {name: shared_row for name in self.names if name != "sm3"}
        self.col = {name: shared_col for name in ("factored", "rows", "cols")}
        self.col.update({f"blocks{k}": torch.zeros(k, cols) for k in blocks})
        self.row["sm3"], self.col["sm3"] = torch.zeros(rows), torch.zeros(cols)

    def update(self, g: Tensor) -> None:
        g = g.float()
        x = g.square()
        self.t += 1
        self.m.lerp_(g, 1 - self.b1)
        self.v.mul_(self.b2).add_(x, alpha=1 - self.b2)
        self.row["factored"].lerp_(x.sum(1), 1 - self.b2)
        self.col["factored"].lerp_(x.sum(0), 1 - self.b2)
        for name in (n for n in self.names if n.startswith("blocks")):
            col = self.col[name]
            col.lerp_(x.reshape(col.shape[0], -1, x.shape[1]).sum(-2), 1 - self.b2)
        cover = torch.minimum(self.row["sm3"][:, None], self.col["sm3"][None, :]).mul_(self.b2)
        cover.add_(x, alpha=1 - self.b2)
        self.row["sm3"] = cover.amax(1)
        self.col["sm3"] = cover.amax(0)

    def estimate(self, name: str) -> Tensor:
        row, col = self.row[name], self.col[name]
        rows, cols = self.v.shape
        if name == "factored":
            total = row.sum()
            return torch.outer(row, col) / total if total > 0 else torch.zeros_like(self.v)
        if name.startswith("blocks"):
            blocks = col.shape[0]
            totals = row.reshape(blocks, -1).sum(1, keepdim=True)
            per_block = col / torch.where(totals > 0, totals, 1.0)  # (blocks, cols)
            return (row.reshape(blocks, -1, 1) * per_block[:, None, :]).reshape(rows, cols)
        if name == "rows":
            return (row / cols)[:, None].expand(rows, cols)
        if name == "cols":
            return (col / rows)[None, :].expand(rows, cols)
        return torch.minimum(row[:, None], col[None, :])

    def direction(self, v: Tensor, floor: bool) -> Tensor:
        bias1, bias2 = 1 - self.b1**self.t, 1 - self.b2**self.t
        m_hat = self.m / bias1
        root = (v / bias2).sqrt()
        if floor:
            root = torch.maximum(root, m_hat.abs())
        return m_hat / (root + self.eps)

    def compare(self) -> dict[str, dict[str, float]]:
        adam = self.direction(self.v, floor=False)
        norm = adam.norm().item()
        out = {}
        for name in self.names:
            est = self.direction(self.estimate(name), floor=True)
            out[name] = {
                "rel_error": (est - adam).norm().item() / norm,
                "norm_ratio": est.norm().item() / norm,
                "max_abs": est.abs().max().item(),
            }
        out["adam"] = {"rms": norm / adam.numel() ** 0.5, "max_abs": adam.abs().max().item()}
        return out


def _vocab_matrices(model: nn.Module) -> dict[str, nn.Parameter]:
    """The embedding and the output head, by module name."""
    inner = getattr(model, "module", model)
    return {
        "embedding": inner.get_input_embeddings().weight,
        "head": inner.get_output_embeddings().weight,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    argv = ["--model", args.model, "--optimizer", args.optimizer, "--output-dir", str(args.out), "--no-progress"]
    argv += ["--save-every", "0", "--steps", str(args.steps), "--threads", str(args.threads), *args.extra_flags]
    cfg = pretrain_config.load_config(argv)
    if len(cfg.optimizer) != 1:
        raise SystemExit(f"--optimizer: one optimizer (the hook shadows every step it sees), got {cfg.optimizer}")
    holder: dict[str, Any] = {}
    build = loop.build_model

    def build_and_keep(*a: Any, **k: Any) -> nn.Module:
        holder["model"] = model = build(*a, **k)
        return model

    records: list[dict[str, Any]] = []
    shadows: dict[str, Shadow] = {}

    def hook(optimizer: torch.optim.Optimizer, *_: Any) -> None:
        if "model" not in holder or getattr(optimizer, "optimizer", None) is not None:
            return  # accelerate's wrapper calls the inner optimizer's step: count it once
        group = optimizer.param_groups[0]
        for name, p in _vocab_matrices(holder["model"]).items():
            if p.grad is None:
                continue
            shadow = shadows.setdefault(name, Shadow(tuple(p.shape), tuple(group["betas"]), group["eps"]))
            shadow.update(p.grad)
            if shadow.t % args.every == 0:
                records.append({"step": shadow.t, "matrix": name, **shadow.compare()})

    loop.build_model = build_and_keep
    handle = register_optimizer_step_pre_hook(hook)
    try:
        from subspace_optim import pretrain

        pretrain.run(cfg, command="scripts.bench.second_moment")
    finally:
        handle.remove()
        loop.build_model = build
    return {"records": records, "tables": [_table(records, args)]}


def _table(records: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for rec in records:
        cells = [str(rec["step"]), rec["matrix"], f"{rec['adam']['rms']:.3f}"]
        for name in ESTIMATORS:
            cells.append(f"{rec[name]['rel_error']:.3f} / {rec[name]['norm_ratio']:.2f}" if name in rec else "-")
        rows.append(cells)
    return {
        "title": f"Small second moments against Adam's V on the vocabulary matrices ({args.model}, {args.optimizer})",
        "columns": ["step", "matrix", "Adam direction rms", *(f"{n}: error / norm ratio" for n in ESTIMATORS)],
        "rows": rows,
        "notes": [
            "error: |N_est - N_adam| / |N_adam| of the bias-corrected direction N = M_hat / (sqrt(V_hat) + eps), "
            "each estimate with the floor |M_hat|; norm ratio: |N_est| / |N_adam| (above 1: steps further).",
        ],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama_20m")
    parser.add_argument("--optimizer", default="subspace")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/second-moment"))
    common.add_output_args(parser)
    parser.add_argument("--smoke", action="store_true", help="the tiny model, a few steps")
    parser.add_argument("extra_flags", nargs="*", help="more pretrain flags, after --")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.every = 4, 2
        args.extra_flags = [*quality.SMOKE_FLAGS, *args.extra_flags]
    common.write_result({"benchmark": "second_moment", **run(args)}, args)


if __name__ == "__main__":
    main()
