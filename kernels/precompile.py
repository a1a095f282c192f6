"""Compile before launch: every kernel variant a step can launch is compiled before the step changes anything.

Triton compiles a variant at its first launch. A step launches batch after batch (and a refresh before
them), so a variant that failed to compile, or to load (more shared memory than this GPU has), would raise
after earlier batches had already updated their weights and moments: a half-applied step. Instead the
optimizer names, per projected matrix, the variants its step and its refresh can launch (``variants_for``,
built from the launchers' own ``*_config`` functions, the ones ``aot`` sweeps) and compiles them here first
(``ensure``). A failure then comes back before any tensor has moved, and ``engine.resolve`` falls back to
the reference (``engine="auto"``) or raises (``"triton"``).

A variant is named by its kernel and its constexprs and launch options, nothing else. Triton would also
specialize a launch on its runtime arguments (an int equal to 1 becomes a constant, a multiple of 16 or a
16-byte-aligned pointer gets a hint), so the same config could compile again at launch for other shapes. The
kernels therefore leave every integer and pointer argument unspecialized (``UNSPECIALIZED``): their pointers
are tables of per-matrix addresses and scalars, whose own alignment no load depends on, and the addresses
they hold are cast from integers, so Triton knows nothing of their alignment either way; a stride known to be
1 would only save an integer multiply per address. What remains is the integer width: an argument of 2**31
or more is an int64 (a different compile); no size or stride of a matrix with fewer than 2**31 entries per
row and column reaches it, and such a launch would compile on its own, as before.

Under ``TRITON_INTERPRET=1`` there is nothing to compile: ``ensure`` records the variants as ready (the
tests force a failure through ``_compile``).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch

from .. import quant
from ..triton_runtime import interpreting

# Each kernel's runtime integer arguments (``do_not_specialize`` there); every other non-constexpr argument
# is a pointer, to an int64 table of per-matrix addresses unless ``POINTER_DTYPES`` says otherwise.
INT_ARGUMENTS = {
    "project_adam_kernel": (
        "M",
        "N",
        "K",
        "sa0",
        "sa1",
        "sb0",
        "sb1",
        "sm0",
        "sm1",
        "sv0",
        "sv1",
        "sn0",
        "sn1",
        "smq0",
        "smq1",
        "svq0",
        "svq1",
    ),
    "back_update_kernel": ("M", "N", "K", "sa0", "sa1", "sb0", "sb1", "sw0", "sw1", "sg0", "sg1", "s_coef"),
    "batched_gemm_kernel": ("M", "N", "K", "sa0", "sa1", "sb0", "sb1", "sc0", "sc1"),
    "gaussian_kernel": ("seed", "rows", "cols"),
    "nonfinite_kernel": (),
}
POINTER_DTYPES = {
    "hyper": torch.float32,
    "m_table": torch.float32,
    "v_table": torch.float32,
    "coef": torch.float32,
    "out": torch.float32,
    "limits": torch.float32,
    "p_table": torch.float32,
}
# Runtime float arguments and a sample value for a compile (an fp32 scalar).
FLOAT_ARGUMENTS = {"p_scale": 0.5}
# Per kernel, pointers of another element type than POINTER_DTYPES gives (the flags kernel's out is int32).
KERNEL_POINTER_DTYPES = {"nonfinite_kernel": {"out": torch.int32}}
KERNEL_MODULES = {
    "project_adam_kernel": "step",
    "back_update_kernel": "step",
    "batched_gemm_kernel": "gemm",
    "gaussian_kernel": "gemm",
    "nonfinite_kernel": "flags",
}
# Sample values for the integer arguments of a compile: any value below 2**31 compiles the same variant
# (an int32); a sketch seed is 63 bits (``linalg.sketch_seed``), so the Gaussian's seed is an int64.
_SAMPLE_INTS = {"seed": (1 << 62) + 12345}
MOMENT_KINDS = {"float32": 0, "bfloat16": 1, "int8": 2}  # ``_common.MOMENT_FP32`` / ``_BF16`` / ``_INT8``


def jit(fn: Any) -> Any:
    """``triton.jit`` with the kernel's runtime arguments unspecialized (see the module docstring): its
    integers (``INT_ARGUMENTS``) entirely, its pointers on alignment."""
    import inspect

    import triton

    ints = INT_ARGUMENTS[fn.__name__]
    runtime = [p.name for p in inspect.signature(fn).parameters.values() if "constexpr" not in str(p.annotation)]
    pointers = [name for name in runtime if name not in ints and name not in FLOAT_ARGUMENTS]
    return triton.jit(fn, do_not_specialize=list(ints), do_not_specialize_on_alignment=pointers)


class Variant(NamedTuple):
    """One compile: the kernel's name and its constexprs and launch options (tl dtypes as their names)."""

    kernel: str
    config: tuple[tuple[str, Any], ...]

    @staticmethod
    def of(kernel: str, cfg: dict[str, Any]) -> Variant:
        import triton.language as tl

        return Variant(kernel, tuple((k, str(v) if isinstance(v, tl.dtype) else v) for k, v in cfg.items()))

    def describe(self) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in self.config if k not in ("GROUP_M", "enable_fp_fusion"))
        return f"{self.kernel}({shown})"


class KernelCompileError(RuntimeError):
    """A variant did not compile (or load) on a device; ``variant`` and ``device`` say which."""

    def __init__(self, variant: Variant, device: torch.device, why: str) -> None:
        super().__init__(f"{variant.describe()} did not compile on {device}: {why}")
        self.variant, self.device, self.why = variant, device, why


@functools.lru_cache(maxsize=4096)
def variants_for(
    side: str,
    w_dtype: torch.dtype,
    g_dtype: torch.dtype,
    basis_dtype: str,
    moments_dtype: str,
    residual: str,
    precision: str,
    cols: int,
    refresh: bool,
    interpreted: bool,
    regenerated: str | None = None,
    stochastic: bool = False,
) -> tuple[Variant, ...]:
    """Every variant one projected matrix can launch: its step's two launches (``cols``: its moments'
    columns, which pick an 8-bit tile; ``regenerated``: ``"signs"`` or ``"dct"`` for a basis the launches
    regenerate in their tiles, which the GEMM sees as fp32; ``stochastic``: a bf16 weight's stochastic rounding)
    and, with ``refresh`` (a ``warm``/``rsvd`` refresh on the kernels), the range finder's products with its
    gradient's dtype, its fp32 products, the fp64 Gram matrix and the Gaussian. Arguments as the launchers see
    them; cached (a step asks once per matrix)."""
    from . import operands
    from . import refresh as kr
    from . import step as ks

    how = {None: operands.BASIS_STORED, "signs": operands.BASIS_SIGNS, "dct": operands.BASIS_DCT}[regenerated]
    basis = torch.float32 if regenerated else quant.KERNEL_BASIS[basis_dtype]
    kind = MOMENT_KINDS[moments_dtype]
    resid = residual != "none"
    flags = dict(basis=how, interpreted=interpreted)
    project = ks.project_config(side, g_dtype, basis, kind, kind, resid, precision, cols, **flags)
    back = ks.back_config(side, w_dtype, g_dtype, basis, residual, precision, stochastic=stochastic, **flags)
    out = [Variant.of("project_adam_kernel", project), Variant.of("back_update_kernel", back)]
    if refresh:
        products = [
            (g_dtype, None, False),
            (g_dtype, torch.float32, False),
            (torch.float32, torch.float32, False),
            (torch.float32, torch.float32, True),
        ]
        for a, b, fp64 in products:
            out.append(Variant.of("batched_gemm_kernel", kr.gemm_config(a, b, fp64, "ieee", interpreted=interpreted)))
        out.append(Variant.of("gaussian_kernel", kr.gaussian_config()))
    return tuple(dict.fromkeys(out))  # in order, without repeats (fp32 gradients share the fp32 products)


# (device, variant) -> None once compiled and loaded there, else why it failed (not retried).
_READY: dict[tuple[str, Variant], str | None] = {}


def flags_variants(dtypes: Iterable[torch.dtype]) -> tuple[Variant, ...]:
    """The finiteness kernel's variants for gradients of these dtypes (``kernels.flags``)."""
    from . import flags

    return tuple(dict.fromkeys(Variant.of("nonfinite_kernel", flags.flags_config(d)) for d in dtypes))


def ensure(device: torch.device, variants: Iterable[Variant]) -> dict[Variant, str]:
    """Compile (and load) on ``device`` every variant not compiled there yet; return the failures
    ({variant: why}, empty when all are ready). A variant is tried once per process and device."""
    failed = {}
    for v in variants:
        key = (str(device), v)
        if key not in _READY:
            try:
                _compile(device, v)
                _READY[key] = None
            except Exception as err:  # noqa: BLE001 - any failure means: do not launch it
                _READY[key] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
        if _READY[key] is not None:
            failed[v] = _READY[key]
    return failed


def ready(device: torch.device, v: Variant) -> bool:
    """Whether ``v`` was compiled on ``device`` by ``ensure`` (the tests check launches against it)."""
    return _READY.get((str(device), v), "") is None


def arguments(kernel: Any, v: Variant, pointer: Any) -> dict[str, Any]:
    """Every argument of ``kernel`` (its ``JITFunction``) by name for a compile of ``v``: the constexprs and
    launch options from the config, a sample value for each integer, and ``pointer(dtype)`` for each pointer
    (``triton.runtime.jit.MockTensor`` for a warm-up; a small tensor for ``aot``'s ahead-of-time compile)."""
    import triton.language as tl

    cfg = dict(v.config)
    ints = INT_ARGUMENTS[v.kernel]
    args: dict[str, Any] = {}
    for p in kernel.params:
        if p.is_constexpr:
            value = cfg[p.name]
            args[p.name] = tl.dtype(value) if isinstance(value, str) and p.name.endswith("_DT") else value
        elif p.name in ints:
            args[p.name] = _SAMPLE_INTS.get(p.name, 0)
        elif p.name in FLOAT_ARGUMENTS:
            args[p.name] = FLOAT_ARGUMENTS[p.name]
        else:
            dtypes = {**POINTER_DTYPES, **KERNEL_POINTER_DTYPES.get(v.kernel, {})}
            args[p.name] = pointer(dtypes.get(p.name, torch.int64))
    return {**args, **{k: val for k, val in cfg.items() if k not in args}}


def jitted(name: str) -> Any:
    """The kernel object a launch uses (a ``JITFunction``; under the interpreter an interpreted one)."""
    import importlib

    return getattr(importlib.import_module(f"{__package__}.{KERNEL_MODULES[name]}"), name)


def _compile(device: torch.device, v: Variant) -> None:
    """Compile ``v`` for ``device`` as its first launch would, and load it there (a variant that needs more
    shared memory than the device has fails here, not at launch). Nothing to do when interpreting."""
    if interpreting():
        return
    from triton.runtime.jit import MockTensor

    from ._common import device_guard

    kernel = jitted(v.kernel)
    with device_guard(device):
        compiled = kernel.warmup(grid=(1,), **arguments(kernel, v, MockTensor))
        init = getattr(compiled, "_init_handles", None)  # loads the module; raises if it cannot run here
        if init is not None:
            init()
