"""INT8 weights through torchao's quantized training: SubspaceAdamW steps ``Int8QuantizedTrainingLinearWeight``s.

Why torchao's format and not ours: torchao 0.18 already trains linear layers whose weights are int8 with an fp32 (or
bf16) scale per row (``torchao.prototype.quantized_training.int8_weight_only_quantized_training``): its forward and
backward run on the int8 data, FSDP2 all-gathers it, and it requantizes every update with stochastic rounding.

What this module adds is determinism. The subclass requantizes with ``torch.rand_like`` from the global RNG, which
data-parallel ranks do not share and a resumed run does not restore; and of the in-place ops only ``add_``, ``addcdiv_``
and ``copy_`` exist (``mul_``, ``lerp_``, the ``_foreach_`` ops raise). So a weight is updated as dequantize (fp32),
update, requantize with torchao's own ``quantize_int8_rowwise`` under a generator state seeded with
``rounding.rounding_seed(seed, parameter index, step)`` (forked: the global RNG is left as it was), then the int8 data
and the scales are copied into the weight exactly. Every data-parallel rank draws the same bits, a resumed run the same
ones as the uninterrupted run (an FSDP2 shard's seed also holds its first row: below). A matrix whose step is skipped (a
non-finite gradient) keeps its data and scales as they were.

FSDP2 (``fully_shard``) shards the subclass by rows (its data and scales alike) and all-gathers the int8 data for the
forward; a rank updates its own rows, which carry their scales, with bits seeded also by its first row (``rounding``).
torchao's all-gather needs every weight's rows to divide evenly among the ranks (else FSDP2 stops at the first forward
with "fsdp_pre_all_gather must return all-gather inputs with the padded sharded size").

The model should be fp32 when quantized: with bf16 scales torchao's arithmetic rounds small updates to nearest before
it rounds stochastically, which loses them (measured: about half of a 0.05-step drift came through).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from . import distributed
from .distributed import local

CLASS_NAME = "Int8QuantizedTrainingLinearWeight"
INSTALL = "pip install torchao (or subspace-optim[int8])"


def is_int8(p: Tensor) -> bool:
    """Whether ``p`` is torchao's int8 training weight, or an FSDP2 row shard of one (a DTensor whose local tensor is
    one); checked by class name, so torchao need not be imported."""
    return type(local(p)).__name__ == CLASS_NAME


def _quantizer() -> Any:
    try:
        from torchao.prototype.quantized_training.int8 import quantize_int8_rowwise
    except ImportError as err:  # a weight of the class exists, so torchao is installed; keep the message useful
        raise ImportError(f"int8 weights need torchao: {INSTALL}") from err
    return quantize_int8_rowwise


def dequantized(p: Tensor) -> Tensor:
    """The weight's values as a plain fp32 tensor (int data x row scale)."""
    return p.dequantize().float()


def store_(p: Tensor, value: Tensor, seed: int | None, skip: Tensor | None = None) -> None:
    """Requantize ``value`` (fp32, the weight's shape) into ``p``'s int8 data and row scales with torchao's
    stochastic rounding, its uniform numbers drawn from a generator state seeded with ``seed``; where ``skip`` (0-d
    bool on the device) is set, ``p`` keeps its data and scales. A direct functional call without a seed rounds with
    seed 0 (the optimizer always passes one)."""
    devices = [value.device] if value.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0 if seed is None else seed)
        data, scale = _quantizer()(value, stochastic_rounding=True)
    if skip is not None:
        data = torch.where(skip, p.int_data, data)
        scale = torch.where(skip, p.scale, scale.to(p.scale.dtype))
    p.int_data.copy_(data)
    p.scale.copy_(scale)


def quantize_linears(model: nn.Module, exclude: tuple[str, ...] = ()) -> nn.Module:
    """Make every ``nn.Linear`` weight of ``model`` an int8 training weight (torchao's ``quantize_``), in place, but
    those of modules whose qualified name ends with one of ``exclude``.

    The model must be fp32 (see the module docstring); biases, embeddings and norms stay as they are."""
    try:
        from torchao.prototype.quantized_training import int8_weight_only_quantized_training
        from torchao.quantization import quantize_
    except ImportError as err:
        raise ImportError(f"--weights int8 needs torchao: {INSTALL}") from err
    dtypes = {m.weight.dtype for m in model.modules() if isinstance(m, nn.Linear)}
    if dtypes - {torch.float32}:
        raise ValueError(
            f"int8 weights: quantize an fp32 model (its linear weights are {sorted(map(str, dtypes))}): with bf16 "
            "row scales torchao rounds small updates to nearest before its stochastic rounding and loses them"
        )

    def chosen(module: nn.Module, name: str) -> bool:
        return isinstance(module, nn.Linear) and not any(name.endswith(e) for e in exclude)

    quantize_(model, int8_weight_only_quantized_training(), filter_fn=chosen)
    return model


def allow_weights_only_checkpoints() -> None:
    """Let ``torch.load(weights_only=True)`` read state dicts holding int8 weights (torchao does not register its
    class as a safe global)."""
    from torchao.prototype.quantized_training.int8 import Int8QuantizedTrainingLinearWeight

    torch.serialization.add_safe_globals([Int8QuantizedTrainingLinearWeight])


def dcp_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A model state dict (``get_model_state_dict``) in which each int8 weight ``name`` is two entries, its int8
    data ``name.int_data`` and its row scales ``name.scale``, that share the weight's storage.

    Why: torch.distributed.checkpoint cannot write torchao's subclass (it stops at ``aten.is_pinned``, and has no
    storage of its own to write), but writes int8 and fp32 tensors. FSDP2 row shards stay shards (DTensors sharded
    on rows, like the weight). ``dcp.save`` the result; to resume, ``dcp.load`` into this function's result for the
    fresh model: the loaded data and scales land in the weights themselves, exactly."""
    out: dict[str, Any] = {}
    for name, value in state_dict.items():
        if not (isinstance(value, Tensor) and is_int8(value)):
            out[name] = value
            continue
        shard = local(value)
        data, scale = shard.int_data, shard.scale
        if distributed.is_dtensor(value):
            data = distributed.sharded_like(value, data, value.shape[1])
            scale = distributed.sharded_vector_like(value, scale)
        out[f"{name}.int_data"], out[f"{name}.scale"] = data, scale
    return out
