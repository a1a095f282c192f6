"""Communication and refresh time of SubspaceAdamW under DDP and FSDP2, against world size.

Spawns gloo process groups on this machine (CPU) or NCCL on GPUs (``--backend nccl``), trains a few steps
of LLaMA-shaped matrices, and measures, for the optimizer alone (not DDP's or FSDP's own gradient
traffic): bytes it sends per regular step and per refresh step, and the wall time of a regular step and
of a refresh step (max over ranks).

    python scripts/bench_distributed.py --world-sizes 1 2 --markdown docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from subspace_optim import SubspaceAdamW

_SENT = {"bytes": 0}
_ORIGINAL: dict = {}


def _count_optimizer_traffic() -> None:
    """Wrap the collectives SubspaceAdamW calls so that every tensor it sends is counted."""
    for name in ("all_reduce", "broadcast"):
        fn = getattr(dist, name)
        _ORIGINAL[name] = fn

        def counted(tensor, *args, _fn=fn, **kwargs):
            _SENT["bytes"] += tensor.numel() * tensor.element_size()
            return _fn(tensor, *args, **kwargs)

        setattr(dist, name, counted)


class Block(nn.Module):
    """One LLaMA block's projected matrices (q, k, v, o, gate, up, down); the optimizer only sees shapes."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        shapes = [(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + [(hidden, intermediate)]
        self.linears = nn.ModuleList(nn.Linear(i, o, bias=False) for o, i in shapes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # fully_shard wants a forward; never called
        return x


class Blocks(nn.Module):
    def __init__(self, hidden: int, intermediate: int, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(Block(hidden, intermediate) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, mode: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, args.threads // world))
    device = torch.device("cuda", rank) if args.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        # One GPU per rank: NCCL, FSDP2 and the Triton kernels all use the current device, so make it ours
        # before the process group exists (otherwise every rank would start on cuda:0).
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend, rank=rank, world_size=world)
    torch.manual_seed(0)
    model = Blocks(args.hidden, args.intermediate, args.layers).to(device)
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(args: argparse.Namespace, mode: str, world: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "records.json")
        mp.start_processes(_worker, args=(world, _free_port(), args, mode, out), nprocs=world, start_method="spawn")
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


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--modes", nargs="+", default=["ddp", "ddp-round-robin", "fsdp2"])
    ap.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1376)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--refresh", default="warm")
    ap.add_argument("--update-gap", type=int, default=4)
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads shared by all ranks")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path, help="append the table to this file")
    args = ap.parse_args(argv)

    rows = []
    for mode in args.modes:
        for world in args.world_sizes:
            if world == 1 and mode != "ddp":
                continue
            row = measure(args, mode, world)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    lines = [
        "| mode | world | refresh step (s) | regular step (s) | sent per rank: refresh | sent per rank: regular |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['world']} | {r['refresh_seconds']:.3f} | {r['step_seconds']:.4f} | "
            f"{r['refresh_bytes_per_rank'] / 2**20:.2f} MiB | {r['step_bytes_per_rank']} B |"
        )
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        device = torch.cuda.get_device_name() if args.backend == "nccl" else f"CPU ({platform.machine()})"
        header = (
            f"\n### distributed: {args.layers} LLaMA blocks of hidden {args.hidden} / intermediate "
            f"{args.intermediate}, rank {args.rank}, refresh {args.refresh}\n\n"
            f"{device}, {args.backend}, torch {torch.__version__}, {args.threads} threads shared by all ranks.\n"
            f"Command: `python scripts/bench_distributed.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
        )
        with args.markdown.open("a") as fh:
            fh.write(header + table + "\n")
    return rows


if __name__ == "__main__":
    main()
