"""Communication and refresh time of SubspaceAdamW under DDP and FSDP2, against world size.

Spawns gloo process groups on this machine (CPU) or NCCL on GPUs (``--backend nccl``), trains a few steps
of LLaMA-shaped matrices, and measures, for the optimizer alone (not DDP's or FSDP's own gradient
traffic): bytes it sends per regular step and per refresh step, and the wall time of a regular step and
of a refresh step (max over ranks).

    python -m scripts.bench.distributed --world-sizes 1 2 --json distributed.json

The matrices are ``--layers`` blocks of ``--model``'s shapes (``configs/llama_<model>.yaml``, its rank unless
``--rank``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from subspace_optim import SubspaceAdamW

from . import common

_SENT = {"bytes": 0}
_ORIGINAL: dict = {}


def _count_optimizer_traffic() -> None:
    """Wrap the collectives SubspaceAdamW calls so that every tensor it sends is counted."""
    for name in ("all_reduce", "broadcast"):
        fn = getattr(dist, name)
        _ORIGINAL[name] = fn

        def counted(tensor: torch.Tensor, *args: Any, _fn: Any = fn, **kwargs: Any) -> Any:
            _SENT["bytes"] += tensor.numel() * tensor.element_size()
            return _fn(tensor, *args, **kwargs)

        setattr(dist, name, counted)


class Block(nn.Module):
    """One LLaMA block's projected matrices (q, k, v, o, gate, up, down); the optimizer only sees shapes."""

    def __init__(self, shape: common.LlamaShape):
        super().__init__()
        one_layer = shape.projected()[:7]
        self.linears = nn.ModuleList(nn.Linear(cols, rows, bias=False) for rows, cols in one_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # fully_shard wants a forward; never called
        return x


class Blocks(nn.Module):
    def __init__(self, shape: common.LlamaShape, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(Block(shape) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _worker(rank: int, world: int, store_file: str, args: argparse.Namespace, mode: str, out: str) -> None:
    torch.set_num_threads(max(1, args.threads // world))
    device = torch.device("cuda", rank) if args.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        # One GPU per rank: NCCL, FSDP2 and the Triton kernels all use the current device, so make it ours
        # before the process group exists (otherwise every rank would start on cuda:0).
        torch.cuda.set_device(device)
    # Ranks meet through a file, as the 2-process tests do (tests/dist_workers.py says why): no port to probe.
    dist.init_process_group(args.backend, init_method=f"file://{store_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = Blocks(common.llama_shape(args.model), args.layers).to(device)
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
    owner = "round_robin" if mode == "ddp-round-robin" else "all"
    opt = SubspaceAdamW(
        model.parameters(),
        lr=1e-3,
        rank=args.rank,
        update_gap=args.update_gap,
        refresh=args.refresh,
        refresh_owner=owner,
    )
    _count_optimizer_traffic()
    gen = torch.Generator(device=device).manual_seed(1)
    records = []
    for step in range(args.steps):
        for p in model.parameters():
            g = torch.randn(p.shape, generator=gen, device=device)
            if mode == "fsdp2":
                from torch.distributed.tensor import distribute_tensor

                g = distribute_tensor(g, p.device_mesh, p.placements)
            p.grad = g
        dist.barrier()
        _SENT["bytes"] = 0
        start = time.perf_counter()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        # NCCL reduces CUDA tensors only; gloo takes CPU ones.
        seconds = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
        sent = _SENT["bytes"]
        _ORIGINAL["all_reduce"](seconds, op=dist.ReduceOp.MAX)  # bookkeeping, not counted
        records.append({"step": step, "refresh": step % args.update_gap == 0, "seconds": float(seconds), "bytes": sent})
    if rank == 0:
        Path(out).write_text(json.dumps(records))
    dist.barrier()
    dist.destroy_process_group()


def measure(args: argparse.Namespace, mode: str, world: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "records.json")
        store_file = str(Path(tmp) / "rendezvous")
        mp.start_processes(_worker, args=(world, store_file, args, mode, out), nprocs=world, start_method="spawn")
        records = json.loads(Path(out).read_text())
    refresh = [r for r in records if r["refresh"] and r["step"] > 0] or [r for r in records if r["refresh"]]
    regular = [r for r in records if not r["refresh"]]
    return {
        "mode": mode,
        "world": world,
        "refresh_seconds": min(r["seconds"] for r in refresh),
        "step_seconds": min(r["seconds"] for r in regular),
        "refresh_bytes_per_rank": refresh[-1]["bytes"],
        "step_bytes_per_rank": regular[-1]["bytes"],
    }


COLUMNS = ["mode", "world", "refresh step (s)", "regular step (s)", "sent per rank: refresh", "sent per rank: regular"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--modes", nargs="+", default=["ddp", "ddp-round-robin", "fsdp2"])
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--model", default="60m", help="a size from configs/: its matrices' shapes and rank")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rank", type=int, help="default: the model config's")
    parser.add_argument("--refresh", default=common.library_default("refresh"))
    parser.add_argument("--update-gap", type=int, default=4)
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads shared by all ranks")
    common.add_output_args(parser)
    args = parser.parse_args(argv)
    args.rank = args.rank or common.llama_shape(args.model).rank
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    rows = []
    for mode in args.modes:
        for world in args.world_sizes:
            if world == 1 and mode != "ddp":
                continue
            rows.append(measure(args, mode, world))
            print(json.dumps(rows[-1]), flush=True)
    cells = [
        [
            r["mode"],
            str(r["world"]),
            f"{r['refresh_seconds']:.3f}",
            f"{r['step_seconds']:.4f}",
            f"{r['refresh_bytes_per_rank'] / 2**20:.2f} MiB",
            f"{r['step_bytes_per_rank']} B",
        ]
        for r in rows
    ]
    shape = common.llama_shape(args.model)
    title = (
        f"distributed: {args.layers} LLaMA blocks of hidden {shape.hidden} / intermediate {shape.intermediate}, "
        f"rank {args.rank}, refresh {args.refresh}"
    )
    note = f"{args.backend}, {args.threads} threads shared by all ranks"
    result = {"benchmark": "distributed", "rows": rows, "tables": [common.table(title, COLUMNS, cells, [note])]}
    return common.write_result(result, args, "cuda" if args.backend == "nccl" else "cpu")


if __name__ == "__main__":
    main()
