"""Worker bodies for the 2-process gloo tests (importable by spawned children).

Each worker writes what it measured to ``out_dir/rank{r}.pt`` and the test process compares ranks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from subspace_optim import SubspaceAdamW, param_groups


def run(rank: int, world: int, store_file: str, fn_name: str, out_dir: str, kwargs: dict) -> None:
    """Ranks meet through a file store, as PyTorch's own multi-process tests do. With the TCP store, rank 0 hosts the
    store's server thread, and on torch 2.13 rank 0 now and then (twice in ~600 launches) aborted with "terminate
    called without an active exception", a C++ thread torn down unjoined; the TCP store also needs a free port,
    which another process may take between the probe and the bind."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world)
    # No barrier in a finally: a rank that failed must exit (and fail the test), not wait for the others.
    result = globals()[fn_name](rank=rank, world=world, **kwargs)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    # Saved, met and left: end as a forked child ends, without the interpreter's teardown, where torch's C++ objects
    # are destroyed in no set order (the other place the abort above may come from). The test reads only the file.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _batch(step: int, batch: int, dim: int, rank_slice: slice | None = None):
    gen = torch.Generator().manual_seed(10_000 + step)
    x = torch.randn(batch, dim, generator=gen)
    y = torch.randn(batch, 4, generator=gen)
    return (x, y) if rank_slice is None else (x[rank_slice], y[rank_slice])


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 33), nn.Tanh(), nn.Linear(33, 20), nn.Tanh(), nn.Linear(20, 4))


def _low_precision(module: nn.Module, weights: str) -> nn.Module:
    """``module`` with bf16 weights, or torchao's int8 training weights on its linear layers (fp32: as it is)."""
    if weights == "bf16":
        return module.to(torch.bfloat16)
    if weights == "int8":
        from subspace_optim import int8_weights

        return int8_weights.quantize_linears(module)
    return module


def _weight_bits(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight's stored bits (an int8 weight's data and scales)."""
    out = {}
    for k, v in module.state_dict().items():
        if hasattr(v, "int_data"):
            out[k + ".int_data"], out[k + ".scale"] = v.int_data.clone(), v.scale.clone()
        else:
            out[k] = v.detach().clone()
    return out


def ddp_train(
    rank: int, world: int, steps: int, refresh_owner: str, refresh: str, weights: str = "fp32", **dtypes: str
) -> dict:
    """DDP with a *different global seed per rank*: bases (and roundings) must still agree, so weights stay
    identical. ``weights``: fp32, bf16 or int8 (torchao)."""
    assert dist.get_world_size() == 2
    module = _low_precision(_mlp(), weights)
    # torchao's int8 weight cannot be concatenated with plain tensors, which DDP's first broadcast does; every rank
    # builds the same weights from the same seed, so that broadcast is skipped for it.
    model = nn.parallel.DistributedDataParallel(module, init_sync=weights != "int8")
    torch.manual_seed(1234 + 77 * rank)  # global RNG differs between ranks from here on
    opt = SubspaceAdamW(
        param_groups(model.module, "all-linear", rank=3, update_gap=2, refresh=refresh),
        lr=1e-2,
        refresh_owner=refresh_owner,
        consistency_check_every=1,
        **dtypes,
    )
    half = slice(rank * 8, (rank + 1) * 8)
    dtype = torch.bfloat16 if weights == "bf16" else torch.float32
    for step in range(steps):
        x, y = _batch(step, 16, 12, half)
        torch.randn(5)  # rank-dependent global RNG use between steps, as dropout would do
        opt.zero_grad()
        (model(x.to(dtype)) - y.to(dtype)).float().square().mean().backward()
        opt.step()
    opt.check_consistency()
    return {
        "world": dist.get_world_size(),
        "weights": _weight_bits(model.module),
        "refresh_counts": [s["refresh_count"] for s in opt.state.values() if "refresh_count" in s],
        "computed_here": opt.subspace_metrics()["overall"]["refreshes_computed_here"],
    }


def ddp_detects_divergence(rank: int, world: int) -> dict:
    model = _mlp()
    opt = SubspaceAdamW(param_groups(model, "all-linear", rank=3, update_gap=2), lr=1e-2)
    x, y = _batch(0, 8, 12)
    (model(x) - y).square().mean().backward()
    opt.step()
    if rank == 1:
        opt.state[model[2].weight]["basis"][0, 0] += 1e-3
    try:
        opt.check_consistency()
    except RuntimeError as err:
        return {"error": str(err)}
    return {"error": None}


# ----------------------------------------------------------------------------- FSDP2
def _llama(seed: int = 0, vocab: int = 64, weights: str = "fp32", even: bool = False):
    from tiny_lm import tiny_llama

    # intermediate 33: gate/up weights are 33 x 32, sharded 17 / 16 rows over two ranks. vocab 128: the embedding
    # and head (4096 values each) are large enough for quantized plain moments; the batches use tokens below 64.
    # torchao's int8 weights need rows that divide evenly among the ranks (its all-gather): they (and ``even``) get 34.
    intermediate = 34 if even or weights == "int8" else 33
    return _low_precision(
        tiny_llama(hidden=32, intermediate=intermediate, layers=2, heads=2, vocab=vocab, seed=seed), weights
    )


def _lm_loss(model, step: int, rows: slice | None):
    gen = torch.Generator().manual_seed(500 + step)
    ids = torch.randint(0, 64, (4, 17), generator=gen)
    if rows is not None:
        ids = ids[rows]
    logits = model(input_ids=ids[:, :-1]).logits
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _subspace_for(model, refresh: str, proj_type: str = "std", **dtypes: str):
    groups = param_groups(model, "all-linear", rank=4, update_gap=3, refresh=refresh, proj_type=proj_type)
    return SubspaceAdamW(groups, lr=5e-3, weight_decay=0.0, **dtypes)


def single_process_llama(
    steps: int, refresh: str, stats: dict | None = None, vocab: int = 64, **dtypes
) -> dict[str, torch.Tensor]:
    """The reference trajectory: one process, whole batch, right projections (what FSDP2 uses). With
    ``stats`` (a dict), each step's inputs of an error bound are appended to ``stats[name]``
    (``_bound_inputs``)."""
    model = _llama(vocab=vocab)
    opt = _subspace_for(model, refresh, proj_type="right", **dtypes)
    for step in range(steps):
        opt.zero_grad()
        _lm_loss(model, step, None).backward()
        before = None if stats is None else _bound_inputs(model, opt, None)
        opt.step()
        if stats is not None:
            for name, record in _bound_inputs(model, opt, before).items():
                stats.setdefault(name, []).append(record)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def _bound_inputs(model, opt, before: dict | None) -> dict[str, dict]:
    """Before a step (``before`` None): each parameter's weight and refresh count. After it: per parameter
    the step's largest |dW| ("dw"), and per projected matrix (right basis P: a channel is a row j of G, R = G P)
    kappa = max_j ||G_j|| / ||R_j||, rho = max_jk ||G_j|| eps / (s (s + eps)) over Adam's s = sqrt(V / (1 -
    b2^t)) > 0 (eps's sensitivity), and on a refresh "spread" = sigma_1 / (sigma_r - sigma_r+1) of G."""
    out, names = {}, {q: n for n, q in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            name = names[p]
            state = opt.state.get(p, {})
            if before is None:
                out[name] = (p.detach().clone(), state.get("refresh_count", 0))
                continue
            record = {"dw": float((p.detach() - before[name][0]).abs().max())}
            if "basis" in state:
                g, basis = p.grad.double(), state["basis"].double()
                rows = g.norm(dim=1)
                record["kappa"] = float((rows / (g @ basis).norm(dim=1)).max())
                eps = group["eps"]
                s = (state["exp_avg_sq"].double() / (1 - group["betas"][1] ** state["moment_age"])).sqrt()
                record["rho"] = float((rows[:, None] * eps / (s * (s + eps)))[s > 0].max())
                if state["refresh_count"] != before[name][1]:
                    sv, r = torch.linalg.svdvals(g), basis.shape[1]
                    record["spread"] = float(sv[0] / (sv[r - 1] - sv[r]))
            out[name] = record
    return out


def _fsdp_llama(rank: int, vocab: int = 64, weights: str = "fp32", even: bool = False):
    from torch.distributed.fsdp import fully_shard

    model = _llama(vocab=vocab, weights=weights, even=even)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    torch.manual_seed(99 + rank)
    return model


def _full_weights(model) -> dict[str, torch.Tensor]:
    """Every weight, gathered whole; a torchao int8 weight as its int8 data and its scales (``.int_data``,
    ``.scale``: ``int8_weights.dcp_state_dict``), which DTensor cannot gather through the subclass."""
    from subspace_optim import int8_weights

    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
        for k, v in int8_weights.dcp_state_dict(model.state_dict()).items()
    }


def fsdp_train(rank: int, world: int, steps: int, refresh: str, vocab: int = 64, **dtypes: str) -> dict:
    assert dist.get_world_size() == 2
    model = _fsdp_llama(rank, vocab)
    opt = _subspace_for(model, refresh, **dtypes)
    for step in range(steps):
        opt.zero_grad()
        _lm_loss(model, step, slice(rank * 2, rank * 2 + 2)).backward()
        opt.step()
    opt.check_consistency()
    gate = model.model.layers[0].mlp.gate_proj.weight
    state = opt.state[gate]
    return {
        "world": dist.get_world_size(),
        "weights": _full_weights(model),
        "gate_local_rows": gate.to_local().shape[0],
        "gate_moment_type": type(state["exp_avg"]).__name__,
        "gate_moment_placements": str(state["exp_avg"].placements),
        "gate_moment_local_rows": state["exp_avg"].to_local().shape[0],
        "gate_refresh_count": state["refresh_count"],
        "gate_state_dtypes": {k: str(v.dtype) for k, v in state.items() if hasattr(v, "dtype")},
        "gate_absmax_local_rows": state["exp_avg_absmax"].to_local().shape[0] if "exp_avg_absmax" in state else None,
        "embed_state_dtypes": {k: str(v.dtype) for k, v in opt.state[model.model.embed_tokens.weight].items()},
        "embed_codes_local_shape": tuple(opt.state[model.model.embed_tokens.weight]["exp_avg"].to_local().shape),
        "gate_update_norm": state["update_norm"].clone() if "update_norm" in state else None,
    }


def fsdp_empty_shard(rank: int, world: int, **dtypes: str) -> dict:
    """A 1-row weight sharded over two ranks leaves rank 1 with no rows: it must still take part in the
    refresh collectives (no hang) and the result must match the unsharded computation."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 1, bias=False))
    reference_w = model[0].weight.detach().clone()
    fully_shard(model)
    opt = SubspaceAdamW([{"params": [model[0].weight], "rank": 1, "update_gap": 2}], lr=1e-2, **dtypes)
    ref_param = nn.Parameter(reference_w)
    ref_group = {"params": [ref_param], "rank": 1, "update_gap": 2, "proj_type": "right"}
    ref_opt = SubspaceAdamW([ref_group], lr=1e-2, **dtypes)
    for step in range(5):
        x, _ = _batch(step, 8, 6)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        ref_param.grad = (2 * (x @ ref_param.detach().T) * x).mean(0, keepdim=True)
        ref_opt.step()
    weight = model[0].weight
    return {
        "local_rows": weight.to_local().shape[0],
        "weight": weight.full_tensor().detach().clone(),
        "reference": ref_param.detach().clone(),
        "update_norm": opt.state[model[0].weight].get("update_norm"),
        "reference_update_norm": ref_opt.state[ref_param].get("update_norm"),
    }


def fsdp_low_precision_twin(
    rank: int, world: int, steps: int, weights: str, refresh: str = "warm", vocab: int = 64, **options
) -> dict:
    """FSDP2 row shards of low-precision weights (torchao's int8, or bf16 rounded stochastically) against an fp32
    twin sharded alike: before each step the twin takes the weights' values and gradients; after it, each rank's
    rows must be exactly the twin's fp32 result rounded with the bits of ``rounding_seed(seed, index, step, first
    row)``, and every other weight the twin's own bits. Returns the names that differ."""
    from subspace_optim import int8_weights, rounding
    from subspace_optim.distributed import first_row, local

    model, twin = _fsdp_llama(rank, vocab, weights), _fsdp_llama(rank, vocab, even=weights == "int8")
    # bf16: the plain weights' moments are bf16 (torch AdamW's own state), the twin's fp32, so the twin takes them
    # before each step too; their rounded update runs torch's fused kernel, so the twin's does.
    bf16 = weights == "bf16"
    opt = _subspace_for(model, refresh, **options, **({"stochastic_rounding": True} if bf16 else {}))
    twin_opt = _subspace_for(twin, refresh, **options, **({"fused": True} if bf16 else {}))
    pairs = list(zip(model.parameters(), twin.parameters(), strict=True))
    twin_of, names = dict(pairs), {p: n for n, p in model.named_parameters()}
    differ, rounded = set(), 0
    for step in range(steps):
        with torch.no_grad():
            for p, q in pairs:
                shard = local(p)
                local(q).copy_(int8_weights.dequantized(shard) if int8_weights.is_int8(p) else shard.float())
                for key, moment in opt.state[p].items() if p in opt.state else ():
                    if key.startswith("exp_avg") and moment.dtype == torch.bfloat16:
                        local(twin_opt.state[q][key]).copy_(local(moment))
        opt.zero_grad()
        _lm_loss(model, step, slice(rank * 2, rank * 2 + 2)).backward()
        for p, q in pairs:
            q.grad = p.grad.to(torch.float32)
        opt.step()
        twin_opt.step()
        for group in opt.param_groups:
            for p in group["params"]:
                q = twin_of[p]
                seed = rounding.rounding_seed(group["seed"], opt._index(p), step + 1, first_row(p))
                shard, want = local(p), local(q).detach().clone()
                if int8_weights.is_int8(p):
                    from torchao.prototype.quantized_training.int8 import quantize_int8_rowwise

                    rounded += 1
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(seed)
                        data, scale = quantize_int8_rowwise(want, stochastic_rounding=True)
                    same = torch.equal(shard.int_data, data) and torch.equal(shard.scale, scale)
                elif p.dtype == torch.bfloat16:
                    rounded += 1
                    expected = torch.empty_like(shard)
                    rounding.store_(expected, want, seed)
                    same = torch.equal(shard, expected)
                else:
                    same = torch.equal(shard, want)
                if not same:
                    differ.add(names[p])
    gate = model.model.layers[0].mlp.gate_proj.weight
    from subspace_optim.pretrain.loop import weights_digest

    return {
        # pretrain's rank check gathers every shard (int8: its codes and scales, which DTensor cannot gather as the
        # subclass): equal on the ranks by construction; what is checked is that it runs
        "digest": weights_digest(model),
        "differ": sorted(differ),
        "plain_exp_avg": {
            name: str(opt.state[q]["exp_avg"].dtype)
            for name, q in model.named_parameters()
            if name in ("lm_head.weight", "model.embed_tokens.weight")
        },
        "rounded": rounded,
        "gate_local": type(local(gate)).__name__,
        "gate_first_row": first_row(gate),
        "weights": _full_weights(model),
    }


def fsdp_dcp_resume(
    rank: int, world: int, steps: int, split: int, ckpt_dir: str, weights: str = "fp32", **options
) -> dict:
    """DCP save after ``split`` steps, load into a fresh model and optimizer, continue: must equal an
    uninterrupted run of ``steps`` steps. torchao's int8 weights are saved and loaded through
    ``int8_weights.dcp_state_dict``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from subspace_optim import int8_weights

    def train(model, opt, start, stop):
        for step in range(start, stop):
            opt.zero_grad()
            _lm_loss(model, step, slice(rank * 2, rank * 2 + 2)).backward()
            opt.step()

    savable = int8_weights.dcp_state_dict if weights == "int8" else dict
    model_a = _fsdp_llama(rank, weights=weights)
    opt_a = _subspace_for(model_a, "warm", **options)
    train(model_a, opt_a, 0, steps)

    model_b = _fsdp_llama(rank, weights=weights)
    opt_b = _subspace_for(model_b, "warm", **options)
    train(model_b, opt_b, 0, split)
    dcp.save(
        {"model": savable(get_model_state_dict(model_b)), "optim": get_optimizer_state_dict(model_b, opt_b)},
        checkpoint_id=ckpt_dir,
    )
    gate_b = model_b.model.layers[0].mlp.gate_proj.weight
    basis_type = type(opt_b.state[gate_b]["basis"]).__name__

    model_c = _fsdp_llama(rank, weights=weights)
    opt_c = _subspace_for(model_c, "warm", **options)
    weights_c = get_model_state_dict(model_c)
    state = {"model": savable(weights_c), "optim": get_optimizer_state_dict(model_c, opt_c)}
    dcp.load(state, checkpoint_id=ckpt_dir)
    set_model_state_dict(model_c, weights_c)  # int8 weights: already loaded in place (their entries share storage)
    set_optimizer_state_dict(model_c, opt_c, state["optim"])
    gate_c = model_c.model.layers[0].mlp.gate_proj.weight
    restored = {k: opt_c.state[gate_c][k] for k in ("step", "refresh_count", "moment_age")}
    train(model_c, opt_c, split, steps)
    return {
        "straight": _full_weights(model_a),
        "resumed": _full_weights(model_c),
        "basis_type": basis_type,
        "restored_counters": restored,
    }


# ----------------------------------------------------------------------------- traffic
def _counted_step(opt) -> dict[str, int]:
    """The collectives one ``opt.step()`` issues, by op name (c10d and functional collectives alike)."""
    from torch.distributed.tensor.debug import CommDebugMode

    mode = CommDebugMode()
    with mode:
        opt.step()
    return {str(op).split("'")[1] if "'" in str(op) else str(op): n for op, n in mode.get_comm_counts().items()}


def collective_counts(rank: int, world: int, steps: int) -> dict:
    """What the optimizer itself sends: DDP (refresh_owner="all") nothing; FSDP2 never gathers a gradient."""
    assert dist.get_world_size() == 2
    ddp = nn.parallel.DistributedDataParallel(_mlp())
    # residual none: the base traffic (a residual adds one small all-reduce per FSDP2 step, counted elsewhere)
    opt = SubspaceAdamW(param_groups(ddp.module, "all-linear", rank=3, update_gap=2), lr=1e-2, residual="none")
    half = slice(rank * 8, (rank + 1) * 8)
    ddp_counts = []
    for step in range(steps):
        x, y = _batch(step, 16, 12, half)
        opt.zero_grad()
        (ddp(x) - y).square().mean().backward()
        ddp_counts.append(_counted_step(opt))

    model = _fsdp_llama(rank)
    opt = _subspace_for(model, "warm", residual="none")  # update_gap 3: steps 0 and 3 refresh
    fsdp_counts = []
    for step in range(steps):
        opt.zero_grad()
        _lm_loss(model, step, slice(rank * 2, rank * 2 + 2)).backward()
        fsdp_counts.append(_counted_step(opt))
    return {"world": dist.get_world_size(), "ddp": ddp_counts, "fsdp": fsdp_counts}


def _micro_batch(step: int, micro: int, rank_slice: slice | None):
    return _batch(100 * step + micro, 16, 12, rank_slice)


def ddp_layerwise(rank: int, world: int, steps: int, accum: int, no_sync: bool, **options) -> dict:
    """Layer-wise updates through DDP's communication hook, with accumulation (and ``no_sync`` on the
    micro-batches that do not complete a step); the test compares with one process on the whole batch."""
    from contextlib import nullcontext

    model = nn.parallel.DistributedDataParallel(_mlp())
    torch.manual_seed(1234 + 77 * rank)
    opt = SubspaceAdamW(param_groups(model.module, "all-linear", rank=3, update_gap=2), lr=1e-2, **options)
    handle = opt.update_in_backward(model, accumulation_steps=accum)
    half = slice(rank * 8, (rank + 1) * 8)
    kept, freed = [], []
    for step in range(steps):
        for micro in range(accum):
            x, y = _micro_batch(step, micro, half)
            with model.no_sync() if no_sync and micro < accum - 1 else nullcontext():
                ((model(x) - y).square().mean() / accum).backward()
            grads = [p.grad is not None for p in model.parameters()]
            (kept if micro < accum - 1 else freed).append(all(grads) if micro < accum - 1 else not any(grads))
        opt.step()
        opt.zero_grad()
    handle.remove()
    return {
        "weights": {k: v.detach().clone() for k, v in model.module.state_dict().items()},
        "refresh_counts": [opt.state[p]["refresh_count"] for p in model.parameters() if p.dim() == 2],
        "kept": all(kept),
        "freed": all(freed),
    }


def single_process_mlp_accum(steps: int, accum: int, **options) -> dict[str, torch.Tensor]:
    """The DDP reference: one process, every micro-batch whole (both ranks' halves), regular stepping."""
    model = _mlp()
    opt = SubspaceAdamW(param_groups(model, "all-linear", rank=3, update_gap=2), lr=1e-2, **options)
    for step in range(steps):
        for micro in range(accum):
            x, y = _micro_batch(step, micro, None)
            ((model(x) - y).square().mean() / accum).backward()
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _llama_micro_loss(model, step: int, micro: int, rows: slice | None):
    return _lm_loss(model, 1000 * (step + 1) + micro, rows)


def fsdp_layerwise(
    rank: int, world: int, steps: int, accum: int, no_sync: bool, weights: str = "fp32", layerwise: bool = True
) -> dict:
    """Layer-wise updates through FSDP2's sharded-parameter hooks, with accumulation (and
    ``set_requires_gradient_sync(False)`` on the micro-batches that do not complete a step); ``layerwise=False``:
    the same run stepped by ``step()``. ``weights``: fp32, bf16 (rounded stochastically) or int8 (torchao)."""
    model = _fsdp_llama(rank, weights=weights)
    opt = _subspace_for(model, "warm", **({"stochastic_rounding": True} if weights == "bf16" else {}))
    if layerwise:
        opt.update_in_backward(model, accumulation_steps=accum)
    freed = []
    for step in range(steps):
        for micro in range(accum):
            if no_sync:
                model.set_requires_gradient_sync(micro == accum - 1)
            (_llama_micro_loss(model, step, micro, slice(rank * 2, rank * 2 + 2)) / accum).backward()
        freed.append(all(p.grad is None for p in model.parameters()))
        opt.step()
        opt.zero_grad()
    gate = model.model.layers[0].mlp.gate_proj.weight
    refreshes = opt.state[gate]["refresh_count"]
    return {"weights": _full_weights(model), "freed": all(freed), "gate_refresh_count": refreshes}


def single_process_llama_accum(steps: int, accum: int) -> dict[str, torch.Tensor]:
    """The FSDP2 reference: one process, whole micro-batches, right projections, regular stepping."""
    model = _llama()
    opt = _subspace_for(model, "warm", proj_type="right")
    for step in range(steps):
        for micro in range(accum):
            (_llama_micro_loss(model, step, micro, None) / accum).backward()
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
