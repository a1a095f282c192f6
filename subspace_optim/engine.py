"""Which engine runs a matrix: the user's ``engine`` option resolved against the tensors and the device.

``"reference"`` is PyTorch everywhere. ``"auto"`` takes the Triton kernels for plain, contiguous CUDA
matrices of a supported dtype once the kernels pass their first-use self-check there (``kernels/probe.py``),
and the reference otherwise. ``"triton"`` is obeyed: every projected matrix takes the kernels, on CUDA or,
under ``TRITON_INTERPRET=1``, on the CPU; a matrix they cannot take is an error before anything changes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import guards, int8_weights, triton_runtime
from .distributed import is_dtensor, local
from .refreshing import matrix_shape

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Device types where engine="auto" considers the kernels (the CPU runs them only interpreted: slow).
AUTO_DEVICES = ("cuda",)

# device -> None (the kernels passed their self-check there) or why they failed; probed once per process.
_PROBED: dict[str, str | None] = {}


def _passes_probe(device: torch.device, engine: str) -> bool:
    """Whether the kernels passed their self-check on ``device`` (run on first use). On failure ``"auto"``
    warns once and keeps the reference path; ``"triton"`` raises, since the user asked for the kernels."""
    key = str(device)
    if key not in _PROBED:
        from .kernels.probe import probe

        _PROBED[key] = probe(device)
        if _PROBED[key] is not None and engine == "auto":
            guards.warn_user(
                f"SubspaceAdamW: the Triton kernels failed their self-check on {key} ({_PROBED[key]}); "
                "using the PyTorch reference engine there (set engine='reference' to silence this)"
            )
    error = _PROBED[key]
    if error is not None and engine == "triton":
        raise RuntimeError(
            f"engine='triton': the Triton kernels failed their self-check on {key}: {error}. "
            "Use engine='auto' (falls back to the PyTorch path) or engine='reference'."
        )
    return error is None


def kernel_refusal(p: Tensor, grad: Tensor) -> str | None:
    """Why the kernels cannot take this matrix (None: they can)."""
    if not triton_runtime.available():
        return "the triton package is not installed (pip install triton)"
    if int8_weights.is_int8(p):
        return "it is a torchao int8 weight, which the reference requantizes (the kernels store fp32/bf16/fp16 weights)"
    device = local(p).device
    if not triton_runtime.runs_on(device):
        return f"it is on {device}: the kernels run on CUDA, or on the CPU only under TRITON_INTERPRET=1"
    if p.dtype not in KERNEL_DTYPES or grad.dtype != p.dtype:
        return f"weight {p.dtype} / gradient {grad.dtype}: the kernels take fp32, bf16 or fp16, the same for both"
    try:  # the kernels update the weight in place through a (rows, rest) view of it
        local(p).view(local(p).shape[0], -1)
    except RuntimeError:
        return f"its memory layout (strides {local(p).stride()}) cannot be viewed as a matrix"
    return None


def check(engine: str, p: Tensor, name: str) -> None:
    """Raise, before a step changes anything, if ``engine="triton"`` was asked for a matrix it cannot take."""
    if engine == "triton":
        why = kernel_refusal(p, p.grad)
        if why is not None:
            raise ValueError(f"engine='triton' cannot run parameter {name}: {why}. Use engine='auto' or 'reference'.")


def choose(engine: str, p: Tensor) -> str:
    """``"triton"`` or ``"reference"`` for one projected matrix with a gradient (``check`` has passed)."""
    if engine == "reference":
        return "reference"
    if engine == "auto":
        plain = not is_dtensor(p) and p.is_contiguous() and p.grad.is_contiguous() and p.device.type in AUTO_DEVICES
        if not (plain and kernel_refusal(p, p.grad) is None):
            return "reference"
    return "triton" if _passes_probe(local(p).device, engine) else "reference"


def matmul_precision(choice: str, dtype: torch.dtype) -> str:
    """The Triton step's GEMM precision. ``"auto"`` picks TF32 only where it cannot round the gradient: a
    bf16 (8-bit mantissa) or fp16 (10-bit) value is exact in TF32 (10-bit)."""
    if choice != "auto":
        return choice
    return "tf32" if dtype in (torch.bfloat16, torch.float16) else "ieee"


def resolve(entries: list[tuple[Tensor, dict[str, Any], str, str]]) -> list[str]:
    """The engine of each projected matrix of a step, ``(p, group, name, side)`` (``check`` has passed), with
    every kernel variant a Triton matrix can launch in this step, its refresh included, compiled and loaded
    on its device first (``kernels.precompile``), before the step changes anything. A variant that fails
    there makes the step raise for ``engine="triton"`` (nothing changed) and sends the matrices that need
    it to the reference for ``"auto"`` (a warning, once per variant and device: failures are not retried)."""
    choices = [choose(group["engine"], p) for p, group, _, _ in entries]
    wanted: dict[torch.device, dict[Any, list[int]]] = {}
    for i, (p, group, _, side) in enumerate(entries):
        if choices[i] == "triton":
            for v in _variants(p, group, side):
                wanted.setdefault(local(p).device, {}).setdefault(v, []).append(i)
    if not wanted:
        return choices
    from .kernels import precompile

    for device, needs in wanted.items():
        for v, why in precompile.ensure(device, needs).items():
            hit = needs[v]
            forced = [entries[i][2] for i in hit if entries[i][1]["engine"] == "triton"]
            if forced:
                raise RuntimeError(
                    f"engine='triton': the kernel {v.describe()} that parameter(s) {forced} need did not compile "
                    f"on {device} ({why}); nothing was changed. Use engine='auto' (falls back to the PyTorch "
                    "path for these matrices) or engine='reference'"
                )
            if _warn_once(device, v):
                guards.warn_user(
                    f"SubspaceAdamW: the Triton kernel {v.describe()} did not compile on {device} ({why}); "
                    f"{len(hit)} matrices that need it (e.g. {entries[hit[0]][2]}) use the PyTorch reference engine"
                )
            for i in hit:
                choices[i] = "reference"
    return choices


_WARNED: set[tuple[str, Any]] = set()


def _warn_once(device: torch.device, variant: Any) -> bool:
    key = (str(device), variant)
    fresh = key not in _WARNED
    _WARNED.add(key)
    return fresh


def _variants(p: Tensor, group: dict[str, Any], side: str) -> tuple:
    """``precompile.variants_for`` one Triton matrix (its refresh on the kernels: ``warm``/``rsvd``, unsharded)."""
    from . import projections
    from .kernels import precompile

    cols = matrix_shape(p)[1] if side == "left" else group["rank"]  # the moments: r x n (left), m x r (right)
    refresh = group["refresh"] in ("warm", "rsvd") and not is_dtensor(p)
    # factored batches take their bases materialized (``kernels.step``)
    regenerated = None if group["second_moment"] == "factored" else projections.kernel_kind(group)
    return precompile.variants_for(
        side,
        p.dtype,
        p.grad.dtype,
        group["basis_dtype"],
        group["moments_dtype"],
        group["residual"],
        matmul_precision(group["matmul_precision"], p.dtype),
        cols,
        refresh,
        triton_runtime.interpreting(),
        regenerated,
        group["stochastic_rounding"],
    )
