"""The optimizers a run can train with, built the same way for every size and compared on equal terms.

All of them get the same split of parameters: the selected linear layers (``--target-modules``) are the
low-rank candidates; embeddings, the output head, norms and biases always get plain Adam. Weight decay
never touches 1-D parameters.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .. import options as subspace_options
from ..optimizer import SubspaceAdamW
from ..targets import ALL_LINEAR, param_groups, select_target_modules
from .config import OPTION_FIELDS, PretrainConfig

# name -> (module to import, pip requirement) for the optional ones.
OPTIONAL = {
    "galore": ("galore_torch", "galore-torch"),
    "galore8bit": ("galore_torch", "galore-torch"),
    "apollo": ("apollo_torch", "apollo-torch"),
    "adamw8bit": ("bitsandbytes", "bitsandbytes"),
}


class MissingOptimizer(ImportError):
    """An optional optimizer's package is not installed (or does not work here)."""


def _import(name: str):
    module, requirement = OPTIONAL[name]
    # bitsandbytes (also imported by galore-torch) warns on CPU-only machines about kernels it does not need.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingOptimizer(
            f"optimizer {name!r} needs the {requirement} package, which is not installed here "
            f"({err}). Install it with `pip install {requirement}`, or leave {name} out of --optimizer/--compare."
        ) from err


def require(name: str, device: torch.device | str = "cpu") -> None:
    """Raise ``MissingOptimizer`` (with the install line) unless optimizer ``name`` can run on ``device``."""
    if name not in OPTIONAL:
        return
    module = _import(name)
    if name == "adamw8bit":
        _probe_8bit(module, torch.device(device))
    if name == "galore8bit":
        _require_cuda_galore8bit(torch.device(device))
        _probe_8bit(_import("adamw8bit"), torch.device(device), name)


def target_modules(cfg: PretrainConfig) -> str | list[str]:
    spec = cfg.target_modules
    if spec == ALL_LINEAR or "," not in spec:
        return spec
    return [name.strip() for name in spec.split(",") if name.strip()]


def check_rank(model: nn.Module, cfg: PretrainConfig) -> None:
    """A rank above a projected weight's smaller side would silently train that weight with full AdamW;
    for a pretraining comparison that is a configuration error, so say which weight and the largest rank."""
    smallest = None
    for name in select_target_modules(model, target_modules(cfg)):
        weight = model.get_submodule(name).weight
        side = min(weight.shape[0], weight.numel() // weight.shape[0])
        if smallest is None or side < smallest[1]:
            smallest = (name, side, tuple(weight.shape))
    if smallest is not None and cfg.rank > smallest[1]:
        name, side, shape = smallest
        raise ValueError(
            f"--rank {cfg.rank} is larger than the model's dimensions: {name}.weight is {shape[0]} x {shape[1]}, "
            f"so the rank can be at most {side} (GaLore uses about hidden_size/4 = {max(1, cfg.hidden_size // 4)})"
        )


def _split(model: nn.Module, cfg: PretrainConfig) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """(projected weights, other matrices, 1-D parameters), by the rule ``param_groups`` applies."""
    projected = [param for _, param in param_groups(model, target_modules(cfg), rank=cfg.rank)[0]["params"]]
    chosen = {id(param) for param in projected}
    rest = [param for param in model.parameters() if param.requires_grad and id(param) not in chosen]
    return projected, [param for param in rest if param.dim() >= 2], [param for param in rest if param.dim() < 2]


def _plain_groups(model: nn.Module, weight_decay: float, cfg: PretrainConfig, name: str) -> list[dict[str, Any]]:
    """AdamW's groups: matrices with weight decay, 1-D parameters without. With ``--plain-lr`` for this
    optimizer, the parameters a subspace method would not project (embeddings, head, norms) get that lr in
    their own groups, so AdamW can be tuned with a separate embedding lr on the same terms."""
    separate = cfg.plain_lr_for(name)
    if separate is None:
        trainable = [param for param in model.parameters() if param.requires_grad]
        matrices = [param for param in trainable if param.dim() >= 2]
        vectors = [param for param in trainable if param.dim() < 2]
        return [{"params": matrices, "weight_decay": weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    projected, matrices, vectors = _split(model, cfg)
    groups = [
        {"params": projected, "weight_decay": weight_decay},
        {"params": matrices, "weight_decay": weight_decay, "lr": separate},
        {"params": vectors, "weight_decay": 0.0, "lr": separate},
    ]
    return [group for group in groups if group["params"]]


def build(name: str, model: nn.Module, cfg: PretrainConfig) -> torch.optim.Optimizer:
    """The optimizer ``name`` for ``model`` with the run's hyperparameters (lr is the schedule's peak).

    Whether the optimizer can run here (its package, CUDA) is checked before its lr is looked up, as in
    ``preflight``: a missing lr is not the first thing to fix for an optimizer that cannot run."""
    if name in OPTIONAL:
        _import(name)
    if name == "galore8bit":
        _require_cuda_galore8bit(next(model.parameters()).device)
    adam_args = {"lr": cfg.lr_for(name), "betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_eps}
    if name == "adamw":
        return _adamw(model, cfg, adam_args)
    if name == "subspace":
        return _subspace_adamw(model, cfg, adam_args)
    if name in ("galore", "galore8bit", "apollo"):
        return _low_rank_peer(name, model, cfg, adam_args)
    if name == "adamw8bit":
        bitsandbytes = _import(name)
        return bitsandbytes.optim.AdamW8bit(_plain_groups(model, cfg.weight_decay, cfg, name), **adam_args)
    raise ValueError(f"unknown optimizer {name!r}")


def _adamw(model: nn.Module, cfg: PretrainConfig, adam_args: dict[str, Any]) -> torch.optim.AdamW:
    """torch's AdamW, fused wherever torch has the fused kernel for the model's device (unless the config sets
    ``fused``)."""
    fused = cfg.fused
    if fused is None:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        fused = next(model.parameters()).device.type in _get_fused_kernels_supported_devices()
    return torch.optim.AdamW(_plain_groups(model, cfg.weight_decay, cfg, "adamw"), **adam_args, fused=fused)


def _subspace_adamw(model: nn.Module, cfg: PretrainConfig, adam_args: dict[str, Any]) -> SubspaceAdamW:
    """SubspaceAdamW with every option of the table that the config holds (lr, betas, eps and weight decay come
    from ``adam_args`` and the config)."""
    check_rank(model, cfg)
    settings = {
        key: getattr(cfg, OPTION_FIELDS.get(key, key))
        for key in subspace_options.DEFAULTS
        if key not in ("lr", "betas", "eps", "weight_decay")
    }
    settings["plain_lr"] = cfg.plain_lr_for("subspace")
    # plain groups too: the engine, foreach/fused, matmul precision, moment storage and their lr
    everywhere_keys = (
        "engine",
        "foreach",
        "fused",
        "matmul_precision",
        "moments_dtype",
        "second_moment",
        "plain_moments_dtype",
        "plain_second_moment",
        "stochastic_rounding",
        "plain_lr",
    )
    everywhere = {key: settings.pop(key) for key in everywhere_keys}
    groups = param_groups(model, target_modules(cfg), weight_decay=cfg.weight_decay, **settings)
    return SubspaceAdamW(groups, **adam_args, **everywhere)


def _low_rank_peer(name: str, model: nn.Module, cfg: PretrainConfig, adam_args: dict[str, Any]) -> Optimizer:
    """galore-torch's GaLoreAdamW / GaLoreAdamW8bit or apollo-torch's APOLLOAdamW, on the same split of parameters
    as SubspaceAdamW: the projected weights in a low-rank group, the rest plain (with ``--plain-lr`` if set)."""
    module = _import(name)
    check_rank(model, cfg)
    projected, matrices, vectors = _split(model, cfg)
    low_rank: dict[str, Any] = {"rank": cfg.rank, "update_proj_gap": cfg.update_gap, "proj_type": cfg.proj_type}
    if name in ("galore", "galore8bit"):
        low_rank["scale"] = cfg.scale
        optimizer_class = module.GaLoreAdamW8bit if name == "galore8bit" else module.GaLoreAdamW
    else:
        low_rank.update(scale=cfg.apollo_scale, proj=cfg.apollo_proj, scale_type=cfg.apollo_scale_type)
        optimizer_class = module.APOLLOAdamW
    separate = cfg.plain_lr_for(name)  # the parameters galore/apollo do not project, as for adamw
    plain = {} if separate is None else {"lr": separate}
    groups = [
        {"params": matrices, "weight_decay": cfg.weight_decay, **plain},
        {"params": vectors, "weight_decay": 0.0, **plain},
        {"params": projected, "weight_decay": cfg.weight_decay, **low_rank},
    ]
    kwargs: dict[str, Any] = dict(adam_args)
    if "no_deprecation_warning" in inspect.signature(optimizer_class).parameters:
        kwargs["no_deprecation_warning"] = True
    optimizer = optimizer_class([group for group in groups if group["params"]], **kwargs)
    return fix_galore8bit_args(optimizer) if name == "galore8bit" else optimizer


def _probe_8bit(bnb, device: torch.device, name: str = "adamw8bit") -> None:
    """bitsandbytes imports on machines where its kernels do not run; find out now, not at step 1."""
    probe = nn.Parameter(torch.zeros(64, 128, device=device))
    probe.grad = torch.ones_like(probe)
    try:
        bnb.optim.AdamW8bit([probe], lr=1e-3).step()
    except Exception as err:
        raise MissingOptimizer(
            f"optimizer {name!r}: bitsandbytes is installed but its 8-bit AdamW does not run on {device} "
            f"here ({type(err).__name__}: {err}). Leave {name} out of --optimizer/--compare."
        ) from err


def fix_galore8bit_args(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """galore-torch 1.0's GaLoreAdamW8bit passes ``percentile_clipping=100, block_wise=True`` to
    bitsandbytes' ``Optimizer2State`` positionally; bitsandbytes releases without those two parameters
    (0.50 has none) take them as ``max_unorm=100.0, skip_zeros=True``, which galore-torch never meant (and
    which adds update-norm clipping state). Put bitsandbytes' defaults back before the first step, when the
    state is made; nothing changes where the signature still has ``percentile_clipping``."""
    from bitsandbytes.optim.optimizer import Optimizer2State

    args = getattr(opt, "args", None)
    if args is not None and "percentile_clipping" not in inspect.signature(Optimizer2State.__init__).parameters:
        args.max_unorm = 0.0
        args.skip_zeros = False
    return opt


def _require_cuda_galore8bit(device: torch.device) -> None:
    """galore-torch 1.0's GaLoreAdamW8bit calls ``torch.cuda.synchronize()`` after every parameter's
    update, whatever the device: it cannot run without CUDA. Say so before any training, not at step 1."""
    if device.type != "cuda" or not torch.cuda.is_available():
        raise MissingOptimizer(
            f"optimizer 'galore8bit': galore-torch's GaLoreAdamW8bit needs a CUDA GPU (it calls "
            f"torch.cuda.synchronize() in every step), and this run is on {device.type}. "
            "Leave galore8bit out of --optimizer/--compare, or run on a GPU."
        )


def load_kwargs(name: str) -> dict[str, Any]:
    """``torch.load`` options for this optimizer's checkpoint: galore-torch and apollo-torch keep a
    projector *object* in their state, which ``weights_only`` loading refuses."""
    return {"weights_only": False} if name in ("galore", "galore8bit", "apollo") else {}


def refresh_count(optimizer: torch.optim.Optimizer) -> int | None:
    """Total basis refreshes so far (SubspaceAdamW), or None for optimizers that do not report them."""
    if not isinstance(optimizer, SubspaceAdamW):
        return None
    return sum(state.get("refresh_count", 0) for state in optimizer.state.values())
