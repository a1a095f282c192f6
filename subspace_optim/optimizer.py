"""SubspaceAdamW: AdamW whose state for selected matrices lives in a low-rank gradient subspace.

The class holds groups and lazy state, and its ``step`` gathers lists and calls the functional core
(``functional.subspace_adamw``, torch's ``adam`` for plain parameters) after ``checks`` has passed every
gradient. Refresh scheduling lives in ``refreshing``, engine choice in ``engine``, options in ``options``,
compatibility guards in ``guards``, metrics in ``metrics``; ``docs/architecture.md`` maps them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from . import (
    adam_rule,
    checks,
    distributed,
    engine,
    factored,
    functional,
    guards,
    int8_weights,
    metrics,
    options,
    presets,
    projections,
    quant,
    refreshing,
    rounding,
)
from . import state as state_mod
from .distributed import local
from .factored import Factored
from .layerwise import BackwardUpdate
from .quant import Moment
from .refreshing import Matrix, local_matrix, matrix_shape
from .step_plan import DeviceFlags, SettlingState, StepPlan, Work, device_flags
from .subspace import basis_dim

# Options that decide the shape of a parameter's state (projected or not, side, rank): changing one on a live
# group would make the next step fail part-way, so ``step`` refuses it while it would reshape existing state.
SHAPE_OPTIONS = ("rank", "proj_type")
PARAM_GROUPS_HINT = "subspace_optim.param_groups(model, target_modules='all-linear', rank=128)"
# A step's plain (not projected) parameters with their state, per group (by id).
Plain = dict[int, list[tuple[Tensor, dict[str, Any]]]]
# One call of a step: (function, args, kwargs), holding only tensors, lists and plain values.
Call = tuple[Callable[..., None], tuple, dict[str, Any]]
# Options that shape a step's structure (which parameters are projected, on which engine and side, with which
# state and kernels): a step reuses the last step's checked structure (``StepPlan``) only while these, the
# parameters and their gradients' layouts are the same. The others (lr, betas, eps, weight_decay, scale,
# update_gap, seed, ...) are read at every step.
STRUCTURAL_OPTIONS = (
    "rank",
    "proj_type",
    "engine",
    "matmul_precision",
    "moments_dtype",
    "basis_dtype",
    "second_moment",
    "plain_moments_dtype",
    "plain_second_moment",
    "residual",
    "refresh",
    "nonfinite",
    "foreach",
    "fused",
    "refresh_owner",
)
# Parameter-name parts of input embeddings and output heads (HF, GPT-2 and Meta LLaMA spellings).
_VOCAB_NAMES = ("lm_head", "wte", "wpe")


def _rounds(p: Tensor, group: dict[str, Any]) -> bool:
    """Whether a parameter's update is rounded from seeded bits: bf16 weights with ``stochastic_rounding``, and
    torchao's int8 weights always (their requantization rounds stochastically: with our bits, not the global RNG)."""
    return int8_weights.is_int8(p) or (group["stochastic_rounding"] and p.dtype == torch.bfloat16)


def _this_step(step: int | Tensor) -> int:
    """The number of the step being taken, counting it: a projected matrix's count (an int, already advanced when
    its call is built), or torch AdamW's count plus one (a tensor, advanced by the update; on the CPU unless
    ``fused``)."""
    return step if isinstance(step, int) else int(step.item()) + 1


def _matrix(g: Tensor) -> Tensor:
    """A (not sharded) gradient as its matrix: itself when 2-D (no dispatch), else ``local_matrix``'s view."""
    return g if g.dim() == 2 else local_matrix(g)


def _regenerated_step(
    matrices: list[Matrix],
    params: list[Tensor],
    grads: list[Tensor],
    bases: list[Tensor],
    exp_avgs: list[Tensor | Moment],
    exp_avg_sqs: list[Tensor | Moment],
    steps: list[int],
    **kwargs: Any,
) -> None:
    """``functional.subspace_adamw`` for matrices whose projections a step makes from their state (``projections``:
    regenerated, or a stored 8-bit basis that ``stored_basis`` dequantizes).

    The Triton engine takes seeded signs and DCT columns as records it regenerates inside its GEMM tiles
    (``projections.in_kernel``): one call, nothing materialized. Everything else (the reference engine, apollo-torch's
    Gaussian stream, 8-bit bases) is materialized in chunks of at most ``projections.CHUNK_BYTES`` of fp32
    projections, each chunk's just before its step: their transient never approaches what stored bases would take.
    Every rank chunks alike (same matrices, same sizes), so a row-sharded call's reductions still line up."""
    del bases  # none read as stored
    group = matrices[0].group
    rank, stream = group["rank"], group["seed_stream"]
    dims = [basis_dim(m.side, *matrix_shape(m.p)) for m in matrices]
    triton = kwargs.get("engine") == "triton"
    if triton and all(projections.in_tiles(m.state, stream) for m in matrices):
        made = [
            projections.in_kernel(m.state, m.side, d, rank, g.device, stream)
            for m, d, g in zip(matrices, dims, grads, strict=True)
        ]
        functional.subspace_adamw(params, grads, made, exp_avgs, exp_avg_sqs, steps, **kwargs)
        return
    count = len(matrices)
    for chunk in projections.regenerated_chunks(dims, rank):
        at = [matrices[i] for i in chunk]
        drawn = projections.draw(
            [m.state for m in at],
            [m.side for m in at],
            [dims[i] for i in chunk],
            rank,
            [grads[i].device for i in chunk],
            stream,
        )
        drawn = [local(p).contiguous() if triton else local(p) for p in drawn]  # the launches' row-major layout
        pick = [[t[i] for i in chunk] for t in (params, grads, exp_avgs, exp_avg_sqs, steps)]
        sliced = {k: [v[i] for i in chunk] if isinstance(v, list) and len(v) == count else v for k, v in kwargs.items()}
        functional.subspace_adamw(pick[0], pick[1], drawn, *pick[2:], **sliced)


def _hyper(group: dict[str, Any]) -> dict[str, Any]:
    """The AdamW hyperparameters of a group, as the functional core takes them."""
    return {k: group[k] for k in ("lr", "betas", "eps", "weight_decay")}


def plain_lr(group: dict[str, Any]) -> float | Tensor:
    """The lr of a group's plain (not projected) parameters: ``plain_lr``, following the schedule.

    torch's lr schedulers rewrite ``group["lr"]`` only, and record the value they started from in
    ``group["initial_lr"]``; ``plain_lr`` is therefore scaled by lr / initial_lr, so the plain parameters
    follow the same warmup and decay from their own peak. Without a scheduler (no ``initial_lr``, which
    includes ``ReduceLROnPlateau``) it is used as given. ``plain_lr=None``: the group's lr, unchanged.
    """
    value = group.get("plain_lr")
    if value is None:
        return group["lr"]
    initial = group.get("initial_lr")
    if initial is None or isinstance(initial, Tensor) or initial == 0:
        return value
    return value * (group["lr"] / initial)


def _moments(
    states: list[dict[str, Any]], view: Callable[[Tensor], Tensor] | None
) -> tuple[list[Tensor | Moment], list[Tensor | Moment | Factored]]:
    """The (first, second) moments of a core call's states, each tensor through ``view`` when given (a DTensor's
    rank-local shard): the tensors themselves for float storage, ``quant.Moment`` records for 8-bit codes, and
    ``factored.Factored`` records for factored second moments."""
    if all("exp_avg_absmax" not in s and "exp_avg_sq" in s for s in states):  # float: no record per matrix
        if view is None:
            return [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        return [view(s["exp_avg"]) for s in states], [view(s["exp_avg_sq"]) for s in states]
    return [_one_moment(s, "exp_avg", view) for s in states], [_one_moment(s, "exp_avg_sq", view) for s in states]


def _one_moment(state: dict[str, Any], key: str, view: Callable[[Tensor], Tensor] | None) -> Tensor | Moment | Factored:
    """Moment ``key`` of ``state`` as the engines take it: a record for 8-bit codes and for factors, else the
    tensor (through ``view`` when given)."""
    look = view or (lambda t: t)
    if key == "exp_avg_sq" and factored.KEYS[0] in state:
        return Factored(*(look(state[k]) for k in factored.KEYS))
    if f"{key}_absmax" in state:
        return _record(state, key, view)
    return look(state[key])


def _record(state: dict[str, Any], key: str, view: Callable[[Tensor], Tensor] | None) -> Moment:
    """Moment ``key`` of ``state`` as a ``quant.Moment`` record, through ``view`` when given."""
    moment = quant.moment(state, key)
    return moment if view is None else moment.local(view)


def _same(t: Tensor) -> Tensor:
    """A tensor as a core call takes it when it is not sharded: itself."""
    return t


def _source_module(params: Any) -> nn.Module | None:
    """The module whose ``parameters()`` / ``named_parameters()`` generator ``params`` is, else None: its
    not-yet-started frame holds the module as ``self``."""
    frame = getattr(params, "gi_frame", None)
    owner = frame.f_locals.get("self") if frame is not None else None
    return owner if isinstance(owner, nn.Module) else None


def _vocab_weights(module: nn.Module | None, named: dict[int, str]) -> set[int]:
    """Ids of input-embedding and output-head weights: ``nn.Embedding`` weights and the HF model's input/output
    embeddings when the module is known, and parameters whose name says so (``embed``, ``lm_head``, ...)."""
    found = set()
    if module is not None:
        found |= {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
        for getter in ("get_input_embeddings", "get_output_embeddings"):
            get = getattr(module, getter, None)
            try:
                weight = getattr(get() if callable(get) else None, "weight", None)
            except (NotImplementedError, AttributeError):  # a PreTrainedModel subclass without the accessor
                weight = None
            if isinstance(weight, Tensor):
                found.add(id(weight))
    for pid, name in named.items():
        parts = name.split(".")[:-1]
        if any("embed" in part or part in _VOCAB_NAMES for part in parts) or name == "output.weight":
            found.add(pid)
    return found


def _layout(p: Tensor, group: dict[str, Any]) -> tuple[str, int | None]:
    """The shape of the state ``group``'s options give ``p``: ("plain", None) or (side, rank)."""
    return (refreshing.side(p, group), group["rank"]) if refreshing.projects(p, group) else ("plain", None)


def _by_storage(members: list[tuple[Tensor, dict[str, Any]]]) -> list[tuple[bool, list]]:
    """Plain parameters split by moment storage: (True, native: torch AdamW's own state, in the parameter's
    dtype), then (False, members) per other storage (another float dtype, or 8-bit; factored second moments
    apart); none is left out."""
    parts: dict[str, list] = {}
    for p, s in members:
        kind = "native" if state_mod.native(p, s) else quant.stored_kind(s, "exp_avg")
        parts.setdefault(kind + ("+factored" if factored.KEYS[0] in s else ""), []).append((p, s))
    return [(kind == "native", part) for kind, part in sorted(parts.items(), key=lambda kv: kv[0] != "native")]


def _constructor_options(given: dict[str, Any], unexpected: dict[str, Any]) -> dict[str, Any]:
    """The constructor's options, validated (``options``): galore-torch's ``update_proj_gap`` spelling accepted,
    any other unknown keyword refused with the likely option named, dtypes and numbers normalized."""
    if "update_proj_gap" in unexpected:  # galore-torch's spelling, accepted here as in param groups
        gap, update_gap = unexpected.pop("update_proj_gap"), given["update_gap"]
        if update_gap not in (options.DEFAULTS["update_gap"], gap):
            raise ValueError(f"SubspaceAdamW got update_gap={update_gap!r} and update_proj_gap={gap!r}; keep one")
        given["update_gap"] = gap
    if unexpected:
        names = sorted(unexpected)
        hint = options.suggest(names[0], [*options.DEFAULTS, *options.ALIASES])
        raise TypeError(guards.unexpected_keywords(names) + hint)
    if isinstance(given["betas"], list):
        given["betas"] = tuple(given["betas"])
    options.normalize_dtypes(given)
    options.validate(given, "in SubspaceAdamW(...)")
    options.plain_numbers(given)
    return given


def _refuse_model_or_tensor(params: Any) -> None:
    """A model or a bare tensor where parameters belong: a TypeError that says what to pass."""
    if isinstance(params, nn.Module):  # iterating a model fails, or (nn.Sequential) yields its layers
        raise TypeError(
            f"SubspaceAdamW got a model ({type(params).__name__}), not its parameters: pass model.parameters() "
            f"(every parameter gets the same options), or param groups such as {PARAM_GROUPS_HINT}, which "
            "projects the linear layers and leaves embeddings, the output head, norms and biases in plain AdamW"
        )
    if isinstance(params, Tensor):
        raise TypeError(
            "params argument given to the optimizer should be an iterable of Tensors or dicts, "
            f"but got {torch.typename(params)}"
        )


class SubspaceAdamW(Optimizer):
    r"""AdamW with GaLore-style low-rank projection of selected weight matrices.

    For a parameter whose group has a ``rank``, viewed as a matrix W (m x n), the optimizer keeps an
    orthonormal basis P of a rank-r subspace of the gradient (on the side chosen by ``proj_type``),
    refreshed every ``update_gap`` steps, and Adam's moments only for R = P^T G (or G P):

    .. math::
        M_t = \beta_1 M_{t-1} + (1-\beta_1) R_t,\quad V_t = \beta_2 V_{t-1} + (1-\beta_2) R_t^2

        W_t = W_{t-1}(1 - \eta\lambda)
              - \eta\,\alpha\,P\,\frac{M_t/(1-\beta_1^t)}{\sqrt{V_t/(1-\beta_2^t)}+\epsilon}

    Parameters in groups without ``rank``, 1-D parameters, and matrices with rank > min(m, n) take
    exactly ``torch.optim.AdamW``'s step (its own functional implementation is called).

    Args:
        params: parameters or param groups. Every option below can be set per group; galore-torch 1.0
            groups (``rank``, ``update_proj_gap``, ``scale``, ``proj_type``) work unchanged. A group key that is
            neither an option nor one torch and its lr schedulers add is a ValueError (with the likely key).
            ``rank`` at the top level over a model's flat parameters projects its embeddings and head too (a
            warning names them): build groups with ``subspace_optim.param_groups(model, ...)``.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (weight decay is decoupled and applied in
            full space, also to projected matrices).
        rank: subspace rank r; ``None`` (default) means plain AdamW for the group (when no group has a rank
            the first step warns). ``rank`` and ``proj_type`` of a group whose parameters have state may only
            change where no state would be reshaped; otherwise the next step raises, changing nothing.
        update_gap: refresh the basis every this many optimizer steps of the parameter.
        scale: multiplier alpha on the projected-back update (GaLore's ``scale``).
        refresh: ``"warm"`` | ``"rsvd"`` | ``"svd"`` | ``"random"`` (see ``subspace.refresh_basis``), or a basis
            that is never stored (``projections``): ``"seeded"`` (APOLLO's Gaussian projection regenerated from
            a seed; only with ``residual="apollo"``/``"apollo_tensor"`` and ``moments="keep"``/``"reset"``) or
            ``"dct"`` (the ``rank`` DCT-II columns most aligned with the gradient, kept as their indices).
        moments: ``"rotate"`` | ``"keep"`` | ``"reset"`` (see ``subspace.transport_moments``).
        proj_type: ``"std"`` | ``"reverse_std"`` | ``"left"`` | ``"right"`` (see ``subspace.choose_side``).
        oversample: extra sketch columns for ``rsvd``/``warm``.
        power_iters: power (subspace) iterations for ``rsvd``/``warm``.
        seed: sketches are seeded from (seed, parameter index, refresh count), never the global RNG.
        seed_stream: ``refresh="seeded"``'s generator seeds: ``"counter"`` (from seed, parameter index and
            refresh count, as sketches) or ``"apollo"`` (apollo-torch 1.0.3's: exact APOLLO trajectories).
        nonfinite: ``"skip"`` (a parameter whose gradient has a NaN/Inf is left untouched this step:
            weights, moments, basis and step count) or ``"raise"`` (FloatingPointError, nothing changed).
            A projected matrix's gradient so large that its projection's square would overflow fp32
            (max|G| > 9.2e18 / sqrt(max(m, n))) counts as non-finite. With ``"skip"`` a regular step of the
            projected matrices decides this on the device, with no host sync (as torch's fused AdamW does
            with ``found_inf``); the host reads the flags once on a step that may refresh a basis, and once,
            after the projected updates are queued, on a step with plain-AdamW parameters (torch's default
            AdamW keeps their step counts on the host; with ``fused=True`` they skip on the device too and
            nothing is read). ``"raise"`` must raise before anything changes, so it reads the flags on the
            host (one sync) at every step.
        engine: ``"auto"`` (Triton kernels for plain contiguous CUDA matrices once they pass their
            self-check there, else the reference), ``"triton"`` (obeyed: every projected matrix takes the
            kernels, on CUDA or on CPU under ``TRITON_INTERPRET=1``; one they cannot take is an error before
            the step changes anything) or ``"reference"`` (PyTorch only). See ``subspace_optim.engine``.
        foreach: passed to ``torch.optim.adam`` for the plain-AdamW parameters (``None``: torch's default; on the
            CPU its foreach path, which gives the same bits as its per-tensor default there, except in fp16).
        fused: ``True``: the plain-AdamW parameters step as ``torch.optim.AdamW(fused=True)`` (torch's fused
            kernel; its numbers differ from the default's in the last bits). Their step counts then live on the
            device, so with ``nonfinite="skip"`` a regular step skips them there too (torch's ``found_inf``, one
            flag per parameter) and reads nothing back. Not together with ``foreach=True``; 8-bit or
            other-dtype plain moments keep the per-tensor path.
        refresh_owner: ``"all"`` (every data-parallel rank computes every basis; identical by seeding) or
            ``"round_robin"`` (matrix i is refreshed on rank i mod world and its basis broadcast).
        consistency_check_every: every this many refreshes of a matrix, compare basis fingerprints
            across ranks and raise if they differ (0: only when ``check_consistency()`` is called).
        matmul_precision: operand precision of the Triton step's two GEMMs. ``"ieee"``: exact fp32
            products (the reference's numbers, no tensor cores). ``"tf32"``: tensor-core TF32 products,
            which round the basis and the normalized update to 10 mantissa bits. ``"auto"`` (default):
            ``"tf32"`` for bf16/fp16 weights, whose gradients TF32 holds exactly, ``"ieee"`` for fp32.
            Refreshes always use ieee fp32 with fp64 Gram matrices.
        moments_dtype, basis_dtype: storage of the moments (``"float32"``, ``"bfloat16"``, ``"int8"``:
            blockwise 8-bit, see ``quant``) and of the bases (``"float32"``, ``"bfloat16"``); math is fp32. The
            torch dtypes of those choices are accepted and stored as the strings; changed on a live group, the
            state is converted at the next step.
        second_moment: ``"full"`` (Adam's elementwise V) or ``"factored"`` (Adafactor's row and column factors,
            fp32, with Adam's bias correction and the first moment kept, each element's sqrt(V) floored at its
            |M|: ``factored``), for projected matrices and 2-D plain parameters; changed on a live group, the
            state is converted at the next step.
        residual: what a projected step does with the gradient its subspace discards (``residual_rule``):
            ``"none"`` (GaLore's step), ``"fira"`` (the default: adds phi_j (G - P P^T G) / scale with
            phi_j = ||N_j|| / ||R_j|| per channel j, Fira's rule; ahead of ``"none"`` at both measured sizes,
            docs/benchmarks.md), ``"fira_tensor"`` (one phi per matrix), ``"apollo"`` (steps
            along the whole gradient scaled per channel by phi_j, instead of P N), ``"apollo_tensor"`` (one phi
            per matrix: APOLLO-Mini). Each limits the growth of the residual's norm (apollo: the update's) to
            1% a step and keeps one 0-d tensor of state per matrix (``update_norm``). On FSDP2 row shards the
            channels are rows, so only per-matrix sums are all-reduced: one small collective per step.
        limiter: the units that limiter measures in: ``"corrected"`` (the bias-corrected step; the first step
            bounded by sqrt(d / r) ||N||) or ``"raw"`` (before bias corrections, first step unbounded: Fira's
            and APOLLO's own code, so apollo-torch's trajectory is reproduced).
        stochastic_rounding: bf16 weights (projected and plain) take each update computed in fp32 and rounded
            to bf16 stochastically (``subspace_optim.rounding``), so updates smaller than half a bf16 ulp survive
            on average; the bits come from (seed, parameter index, step), the same on every rank and after a
            resume (an FSDP2 row shard's also from its first row, so shards draw independent bits). Other weight
            dtypes ignore it.
        plain_moments_dtype, plain_second_moment: ``moments_dtype`` and ``second_moment`` for the parameters that
            are not projected (embeddings, the output head; ``None``: the group's own). ``plain_moments_dtype``
            also takes ``"int4"`` (4-bit blockwise codes, ``quant``) for 2-D parameters with an even number of
            columns. The ``balanced`` preset gives the embedding and head a full second moment in 4 bits: the
            factored one costs them quality (docs/benchmarks.md).
        plain_lr: learning rate of the parameters that are not projected (embeddings, the output head,
            norms, biases); ``None``: the group's ``lr``. lr schedulers scale it by lr / initial_lr
            (``plain_lr``).
        preset: a named configuration from ``subspace_optim.presets`` (``"best_quality"``, ``"balanced"``,
            ``"least_memory"``): its options fill what each group does not set itself, over the keywords above.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        rank: int | None = None,
        update_gap: int = 200,
        scale: float = 0.25,
        refresh: str = "warm",
        moments: str = options.DEFAULTS["moments"],
        proj_type: str = "std",
        oversample: int = 32,
        power_iters: int = 1,
        seed: int = 0,
        seed_stream: str = "counter",
        nonfinite: str = "skip",
        engine: str = "auto",
        foreach: bool | None = None,
        fused: bool | None = None,
        refresh_owner: str = "all",
        consistency_check_every: int = 0,
        matmul_precision: str = "auto",
        moments_dtype: str = "float32",
        basis_dtype: str = "float32",
        second_moment: str = "full",
        residual: str = "fira",
        limiter: str = "corrected",
        stochastic_rounding: bool = False,
        plain_moments_dtype: str | None = None,
        plain_second_moment: str | None = None,
        plain_lr: float | None = None,
        preset: str | None = None,
        **unexpected: Any,
    ) -> None:
        local_names = dict(locals())
        given = _constructor_options({name: local_names[name] for name in options.DEFAULTS}, unexpected)
        _refuse_model_or_tensor(params)
        self._metrics: dict[int, dict[str, Any]] = {}
        self._nonfinite_skips = 0
        # Per projected matrix (by id; ``_skips`` holds p too, so no id is reused while its entry lives): a 0-d int32
        # count of its steps skipped on its device not yet read (``_read``), and its steps decided there since.
        self._skips: dict[int, tuple[Tensor, Tensor]] = {}
        self._unread: dict[int, int] = {}
        self._known_params: set[int] = set()
        self._backward_update: BackwardUpdate | None = None
        self._rank_given = False  # some group named a rank (None included): plain AdamW there is deliberate
        self._plain_checked = False  # the first step's "no group has a rank" check has run
        self._layouts: dict[int, dict[str, Any]] = {}  # id(group) -> SHAPE_OPTIONS its state was built with
        self._plan: StepPlan | None = None
        self._indices: dict[int, int] = {}  # id(p) -> the parameter's index over every group (rounding seeds)
        module, params = _source_module(params), list(params)
        if preset is not None:  # under each group's own keys, over the keywords above (defaults for the groups)
            presets.options_of(preset)  # an unknown name is refused before anything else
            groups = params if params and isinstance(params[0], dict) else [{"params": params}]
            params = [presets.under(g, preset) for g in groups]
        super().__init__(params, given)
        self.state = SettlingState(self._settle, self.state)
        if rank is not None and params and not isinstance(params[0], dict):
            self._warn_projected_vocab(params, module, rank)

    # ------------------------------------------------------------------ groups
    def __setstate__(self, state: dict[str, Any]) -> None:
        """After unpickling, deepcopy or ``load_state_dict``: upgrade older formats, re-register the
        parameters (they are new objects), give old groups the options added since. Metrics restart."""
        super().__setstate__(state)
        guards.upgrade_state(self.state, self.param_groups)
        self._backward_update = getattr(self, "_backward_update", None)  # hooks belong to the live object only
        self._metrics = {}
        self._nonfinite_skips = 0
        self._skips, self._unread = {}, {}  # the state they counted for was replaced
        self.state = SettlingState(self._settle, self.state)
        self._known_params = set()
        self._rank_given = getattr(self, "_rank_given", True)  # a copy or a loaded optimizer: warned already
        self._plain_checked = getattr(self, "_plain_checked", True)
        self._layouts = {}
        self._plan = None  # the state and the groups were replaced
        self._indices = {}  # refilled by the next step
        for i, group in enumerate(self.param_groups):
            for key in options.DEFAULTS:  # not torch's "differentiable", which __setstate__ put in defaults
                # An option the saved group lacks keeps the behaviour it was saved with (``ABSENT_MEANS``).
                group.setdefault(key, options.ABSENT_MEANS.get(key, self.defaults[key]))
            self.param_groups[i] = guards.ParamGroup(dict(group), self._known_params)
            # Loaded state was built with the loaded groups' options (torch's loader keeps the saved ones).
            self._layouts[id(self.param_groups[i])] = {k: group[k] for k in SHAPE_OPTIONS}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate (and translate galore-torch keys of) a group before it is added."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param group must be a dict, got {type(param_group).__name__}")
        if getattr(self, "_backward_update", None) is not None:
            raise RuntimeError(
                "add_param_group while update_in_backward is attached: its hooks cover the parameters it was "
                "attached with. Call remove() on the handle, add the group, then attach again"
            )
        label = f"param group {len(self.param_groups)}"
        where = f"in {label}"
        group = options.translate_aliases(param_group, label)
        if "params" in group:
            group["params"] = guards.param_list(group["params"])
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        options.check_group_keys(group, label)
        options.normalize_dtypes(group)
        options.validate({**self.defaults, **group}, where)
        options.plain_numbers(group)
        super().add_param_group(guards.ParamGroup(group, self._known_params))
        self._plan = None
        self._rank_given |= "rank" in group
        added = self.param_groups[-1]
        self._layouts[id(added)] = {k: added[k] for k in SHAPE_OPTIONS}

    def _warn_projected_vocab(self, params: list[Any], module: nn.Module | None, rank: int) -> None:
        """Warn when a top-level ``rank`` over a whole model's flat parameter list projects its input embeddings
        or output head: GaLore-style training projects the attention and MLP weights only."""
        named = {id(item[1]): item[0] for item in params if isinstance(item, tuple)}
        if module is not None:
            named.update({id(p): n for n, p in module.named_parameters()})
        vocab = _vocab_weights(module, named)
        hit = [
            named.get(id(p), f"params[{i}]")
            for i, p in enumerate(self.param_groups[0]["params"])
            if id(p) in vocab and refreshing.projects(p, self.param_groups[0])
        ]
        if hit:
            guards.warn_user(
                f"rank={rank} was given for a flat list of parameters, so every matrix is projected, including the "
                f"input embedding / output head weights {hit[:4]}: projecting the vocabulary matrices usually hurts "
                f"quality (GaLore projects only attention and MLP weights). Build the groups with "
                f"{PARAM_GROUPS_HINT.replace('128', str(rank))}, which leaves embeddings, the head, norms and biases "
                "in plain AdamW; or pass explicit param groups to project them on purpose"
            )

    def _refuse_reshaped_groups(self) -> None:
        """Refuse, before anything changes, a group whose ``rank`` or ``proj_type`` was changed after some of its
        parameters got state that the new value would reshape (a step would fail part-way, with a raw shape error).
        A change that reshapes no existing state is accepted (and remembered)."""
        for i, group in enumerate(self.param_groups):
            now = {k: group[k] for k in SHAPE_OPTIONS}
            built = self._layouts.get(id(group))
            if built is not None and built != now:
                before = {**group, **built}
                for _, owner, name, p in self._named_params():
                    if owner is group and self._state_of(p, peek=True) and _layout(p, before) != _layout(p, group):
                        changes = [f"{k} from {built[k]!r} to {now[k]!r}" for k in SHAPE_OPTIONS if built[k] != now[k]]
                        side, r = _layout(p, before)
                        held = "plain AdamW state" if r is None else f"rank-{r} state projected on the {side}"
                        raise ValueError(
                            f"param group {i} changed {' and '.join(changes)} after its state was created: parameter "
                            f"{name} holds {held}, which the new value would reshape. Nothing was changed. Set it "
                            "back, or, to train with the new value, build a new SubspaceAdamW (its state starts "
                            "fresh) or load a checkpoint saved with it"
                        )
            self._layouts[id(group)] = now

    # ------------------------------------------------------------------ state
    # ------------------------------------------------------------------ step
    def _named_params(self) -> Iterable[tuple[int, dict[str, Any], str, Tensor]]:
        index = 0
        for group in self.param_groups:
            names = group.get("param_names")
            for j, p in enumerate(group["params"]):
                yield index, group, (names[j] if names else f"params[{index}]"), p
                index += 1

    def _checked_work(self, only: set[int] | None = None) -> tuple[list[Work], Tensor | None]:
        """Every parameter with a gradient (of ``only``, ids, when given), each checked (types, engine) before
        anything moves, and their non-finite flags (``checks.nonfinite_flags``: on the device, not read). The
        checks are those of the last step while ``_plan_key`` is the same (``StepPlan``)."""
        self._refuse_reshaped_groups()
        for i, group in enumerate(self.param_groups):
            options.check_combinations(group, f"in param group {i}")
        key = None if only is not None else self._plan_key()
        plan = self._plan
        if plan is None or key is None or not plan.holds(key, self.state):
            work = self._check_work(only)
            shard_groups = list(
                {
                    id(g): g
                    for g in (distributed.row_shard(p, n).group for _, _, n, p in work if distributed.is_dtensor(p))
                }.values()
            )
            limits = [checks.grad_limit(p, refreshing.projects(p, g)) for _, g, _, p in work]
            device = local(work[0][3]).device if work else None
            limits_t = adam_rule.device_vector(limits, torch.float32, device) if work else None
            plan = StepPlan(key, self.state, work, limits_t, shard_groups)
            self._plan = plan if key is not None else None
        if not plan.work:
            return plan.work, None
        grads = [p.grad for *_, p in plan.work]
        if plan.kernel_flags:
            from .kernels.flags import layout, nonfinite_flags

            if plan.flags_layout is None:  # the gradients' shapes and dtypes are the plan's
                plan.flags_layout = layout(grads)
            return plan.work, nonfinite_flags(grads, plan.limits, plan.flags_layout)
        return plan.work, checks.nonfinite_flags(grads, plan.limits, plan.shard_groups)

    @staticmethod
    def _use_kernel_flags(plan: StepPlan, projected: list[Matrix], devices: list[torch.device]) -> bool:
        """Whether the plan's steps take the finiteness test as Triton launches, per gradient dtype and size class
        (``kernels.flags``: the same flags as ``checks.nonfinite_flags``): when every projected matrix runs on the
        kernels, nothing is sharded, every gradient is a contiguous fp32/bf16/fp16 tensor on one device, and its
        variants compiled there (``kernels.precompile``)."""
        if (
            not projected
            or any(matrix.engine != "triton" for matrix in projected)
            or plan.shard_groups
            or len(set(devices)) != 1
        ):
            return False
        grads = [p.grad for *_, p in plan.work]
        if any(g.dtype not in engine.KERNEL_DTYPES or not g.is_contiguous() for g in grads):
            return False
        from .kernels import precompile

        return not precompile.ensure(devices[0], precompile.flags_variants({g.dtype for g in grads}))

    def _plan_key(self) -> tuple:
        """What the checks of a step depend on: per group its parameters and structural options, and per
        parameter its dtype, its strides and its gradient's presence, dtype, shape, strides, layout and device."""
        key: list[Any] = []
        for group in self.param_groups:
            params = group["params"]
            key.append((id(group), tuple(map(id, params)), tuple(group[k] for k in STRUCTURAL_OPTIONS)))
            for p in params:
                g = p.grad
                key.append(
                    p.dtype if g is None else (p.dtype, p.stride(), g.dtype, g.shape, g.stride(), g.layout, g.device)
                )
        return tuple(key)

    def _check_work(self, only: set[int] | None) -> list[Work]:
        work = []
        for index, group, name, p in self._named_params():
            if only is not None and id(p) not in only:
                continue
            checks.refuse_unknown(p, group, name, self._known_params)
            if p.grad is None:
                continue
            checks.refuse_bad_gradient(p, name)
            if refreshing.projects(p, group):
                engine.check(group["engine"], p, name)
            state = self._state_of(p, peek=True)  # creates no entry: a refused step leaves none behind
            if state and distributed.is_dtensor(p) and state_mod.mismatched(p, group, state):
                raise NotImplementedError(
                    f"parameter {name}: its sharded state is stored otherwise than moments_dtype, basis_dtype, "
                    "second_moment, plain_moments_dtype or plain_second_moment ask "
                    "(a checkpoint saved with other options, or changed groups); set the options it was saved with"
                )
            work.append((index, group, name, p))
        return work

    def _finite_only(self, work: list[Work], ok: list[bool]) -> list[Work]:
        """``work`` without its non-finite parameters, known on the host: raised (``nonfinite="raise"``, before
        anything moved) or skipped and counted."""
        bad = [w for w, fine in zip(work, ok, strict=True) if not fine]
        if any(g["nonfinite"] == "raise" for _, g, _, _ in bad):
            raise FloatingPointError(
                f"non-finite gradient in parameter(s) {[n for _, _, n, _ in bad]} (a NaN/Inf, or an entry so large "
                "that its projection overflows fp32); nothing was changed. Use nonfinite='skip' to leave such "
                "parameters untouched for the step, or fix the loss scaling."
            )
        self._nonfinite_skips += len(bad)
        return [w for w, fine in zip(work, ok, strict=True) if fine]

    def _must_read(self, work: list[Work], plan: StepPlan | None = None) -> bool:
        """Whether the host needs this step's flags before anything moves: a ``nonfinite="raise"`` group (it
        raises first), a matrix without state (its first step refreshes), or a refresh that may be due. A
        matrix counted at step t with k steps decided on the device since the last read is truly at one of
        t - k ... t, so a refresh may be due when a multiple of ``update_gap`` lies in [t - k, t]. The host
        count passes every multiple, so a due refresh is never missed, and without skips (the usual case)
        the host reads exactly on the refresh steps."""
        if plan is not None and plan.structure is not None and plan.holds(plan.key, self.state):
            # Every parameter has its state and the options are the plan's: only the counts can say "read".
            return plan.raises or any(
                self._may_refresh(matrix.p, matrix.group, matrix.state) for matrix in plan.structure[0]
            )
        for _, group, _, p in work:
            if group["nonfinite"] == "raise":
                return True
            state = self._state_of(p, peek=True)
            if not state or "refresh_count" not in state:
                if refreshing.projects(p, group):  # a projected matrix's first step refreshes
                    return True
                continue
            if self._may_refresh(p, group, state):
                return True
        return False

    def _may_refresh(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> bool:
        """Whether a multiple of ``update_gap`` lies in [t - k, t] for a matrix counted at t with k steps decided
        on the device since the last read (``_must_read``)."""
        t, gap = state["step"], group["update_gap"]
        return t // gap * gap >= t - self._unread.get(id(p), 0)

    def _read(self, flags: Tensor | None = None) -> list[bool]:
        """The host's one read of device values (a sync on a GPU): this step's non-finite ``flags`` when given,
        and every projected matrix's count of steps skipped on the device since the last read. The counts
        are settled: taken off the matrices' ``step`` and ``moment_age`` (which ran ahead, as if those steps
        had been taken), added to the skip total, and zeroed. Returns the flags as "finite" booleans."""
        owed = [(p, count) for key, (p, count) in self._skips.items() if self._unread.get(key, 0)]
        self._unread.clear()
        pieces = [] if flags is None else [flags.to(torch.int32)]
        if owed:
            dev = pieces[0].device if pieces else owed[0][1].device
            counts = [count for _, count in owed]
            same = all(count.device == dev for count in counts)  # usually: one device, no copies to queue
            pieces.append(torch.stack(counts if same else [count.to(dev) for count in counts]))
        if not pieces:
            return []
        values = torch.cat(pieces).tolist()
        taken = 0 if flags is None else flags.numel()
        nonzero = []
        for (p, count), skipped in zip(owed, values[taken:], strict=True):
            if skipped:
                state = self._state_of(p)
                if "refresh_count" in state:  # a plain parameter's fused step already took its skips off its count
                    state["step"] -= skipped
                    state["moment_age"] -= skipped
                self._nonfinite_skips += skipped
                nonzero.append(count)
        if nonzero:  # only counts that were read nonzero need zeroing (none, unless a step was skipped)
            torch._foreach_zero_(nonzero)
        return [not bad for bad in values[:taken]]

    def _state_of(self, p: Tensor, peek: bool = False) -> dict[str, Any] | None:
        """``p``'s state as the optimizer itself reads it: without settling (``SettlingState``); ``peek``: None when it
        has none (nothing is created). Also works if something replaced ``self.state`` by a plain dict."""
        state = self.state
        if isinstance(state, SettlingState):
            return state.peek(p) if peek else state.raw(p)
        return state.get(p) if peek else state[p]

    def _settle(self) -> None:
        """Read back the skip counts the device still holds, if any (``_read``; ``SettlingState`` calls this)."""
        if any(self._unread.values()):
            self._read()

    def _skip_count(self, p: Tensor) -> Tensor:
        """``p``'s device count of skipped steps not read yet (``_read``), created at its first masked step."""
        entry = self._skips.get(id(p))
        if entry is None:
            entry = self._skips[id(p)] = (p, torch.zeros((), dtype=torch.int32, device=local(p).device))
        return entry[1]

    def _plain_calls(self, plain: Plain) -> list[Call]:
        """torch's AdamW per group and moment storage, for plain parameters known to have finite gradients."""
        calls: list[Call] = []
        for group in self.param_groups:
            for native, members in _by_storage(plain.get(id(group), [])):
                # Low-precision storage is updated rank-locally; factors need the other ranks' rows, which
                # functional.adamw reaches through the DTensor itself.
                view = _same if native or factored.KEYS[0] in members[0][1] else local
                states = [s for _, s in members]
                args = (
                    [view(p) for p, _ in members],
                    [view(p.grad) for p, _ in members],
                    *_moments(states, view),
                    [s["step"] for s in states],
                )
                kwargs = {
                    **_hyper(group),
                    "lr": plain_lr(group),
                    "foreach": group["foreach"],
                    "fused": group["fused"] if native else None,
                }
                seeds = self._rounding_seeds(group, [(p, s) for p, s in members])
                if seeds is not None:
                    kwargs["rounding_seeds"] = seeds
                calls.append((functional.adamw, args, kwargs))
        return calls

    def _rounding_seeds(self, group: dict[str, Any], members: list[tuple[Tensor, dict[str, Any]]]) -> list | None:
        """Each parameter's rounding seed for this step (``rounding.rounding_seed`` of the group's seed, its index over
        every group, the number of this step, counting it, and an FSDP2 shard's first row): bf16 weights with
        ``stochastic_rounding``, and torchao's int8 weights always; None for the others, and None for all when no
        parameter rounds."""

        if not any(_rounds(p, group) for p, _ in members):
            return None
        return [
            rounding.rounding_seed(group["seed"], self._index(p), _this_step(s["step"]), distributed.first_row(p))
            if _rounds(p, group)
            else None
            for p, s in members
        ]

    def _index(self, p: Tensor) -> int:
        """A parameter's index over every group (the one its sketches and roundings are seeded with)."""
        if id(p) not in self._indices:  # a path that did not pass through ``_with_state`` (layer-wise updates)
            self._indices.update((id(q), index) for index, _, _, q in self._named_params())
        return self._indices[id(p)]

    def _plain_skipping_calls(
        self,
        plain: Plain,
        skip_of: dict[int, Tensor],
        counted: dict[int, Tensor],
        found: Callable[[], dict[int, Tensor]],
    ) -> tuple[list[Call], Plain]:
        """A masked step's plain parameters that skip on the device: those of ``fused`` groups in torch AdamW's
        own storage (their step counts are on the device; ``functional.fused_adamw_skipping``, one found_inf
        each), with their skips counted on the device like the matrices' (``_read`` settles them). Returns
        those calls and the plain parameters left for ``_plain_after_read``. ``found()``: every parameter's flag
        as fp32 (torch's found_inf) by id when they share one device, else {} (then converted one by one)."""
        calls: list[Call] = []
        rest: Plain = {}
        for group in self.param_groups:
            members = plain.get(id(group), [])
            # parameters whose result is rounded from our bits take functional.adamw's fp32 path, not torch's kernel
            skipping = [
                (p, s) for p, s in members if group["fused"] and state_mod.native(p, s) and not _rounds(p, group)
            ]
            if len(skipping) < len(members):
                taken = {id(p) for p, _ in skipping}
                rest[id(group)] = [(p, s) for p, s in members if id(p) not in taken]
            if not skipping:
                continue
            ps = [p for p, _ in skipping]
            floats = found()  # torch's found_inf: fp32, on the parameter's device
            found_inf = [floats[id(p)] if floats else skip_of[id(p)].float() for p in ps]
            args = (
                ps,
                [p.grad for p in ps],
                [s["exp_avg"] for _, s in skipping],
                [s["exp_avg_sq"] for _, s in skipping],
                [s["step"] for _, s in skipping],
                found_inf,
            )
            calls.append((functional.fused_adamw_skipping, args, {**_hyper(group), "lr": plain_lr(group)}))
            calls.append(self._count_device_skips(ps, counted))
        return calls, rest

    def _count_device_skips(self, params: list[Tensor], counted: dict[int, Tensor]) -> Call:
        """The call that adds this step's device flags (``counted``: int32, by id) to the parameters' skip counts
        (``_skip_count``), and the host's note that one more of their steps was decided on the device (``_read``
        settles both). Queued after the updates, which read the counts as lags."""
        for p in params:
            self._unread[id(p)] = self._unread.get(id(p), 0) + 1
        counts = [self._skip_count(p) for p in params]
        return torch._foreach_add_, (counts, [counted[id(p)] for p in params]), {}

    @torch._disable_dynamo
    def _plain_after_read(self, plain: Plain, flags: dict[int, Tensor]) -> None:
        """The plain parameters of a step whose projected matrices were masked on the device. torch's AdamW keeps
        a plain parameter's step count on the host and computes its bias corrections there, so whether it skips
        must be known there: one read (which settles the matrices' skip counts too), queued after every
        projected update of the step, so the device has that work while the host waits."""
        members = [(p, s) for group_members in plain.values() for p, s in group_members]
        ok = dict(
            zip((id(p) for p, _ in members), self._read(torch.stack([flags[id(p)] for p, _ in members])), strict=True)
        )
        self._nonfinite_skips += sum(not fine for fine in ok.values())
        finite = {key: [(p, s) for p, s in ms if ok[id(p)]] for key, ms in plain.items()}
        for function, args, kwargs in self._plain_calls(finite):
            function(*args, **kwargs)

    def _with_state(self, work: list[Work]) -> tuple[list[Matrix], Plain]:
        """The step's projected matrices (with their engines) and plain parameters per group, each with its
        state: created on a first step, converted where the group's storage options changed (``state.conform``).
        The engines are resolved first, before any state changes: the kernels a Triton matrix can launch are
        compiled then (``engine.resolve``)."""
        refreshing.rank_fallbacks([(p, g, n) for _, g, n, p in work if not self._state_of(p, peek=True)])
        entries = [(p, g, n, refreshing.side(p, g)) for _, g, n, p in work if refreshing.projects(p, g)]
        engines = dict(zip((id(p) for p, *_ in entries), engine.resolve(entries), strict=True))
        projected: list[Matrix] = []
        plain: Plain = {}
        for index, group, name, p in work:
            self._indices[id(p)] = index
            state = self._state_of(p)
            if state:
                state_mod.conform(p, group, state)
            else:
                state.update(state_mod.initial(p, group, name))
            if "refresh_count" in state:
                projected.append(Matrix(index, group, name, p, state, refreshing.side(p, group), engines[id(p)]))
            else:
                plain.setdefault(id(group), []).append((p, state))
        return projected, plain

    @staticmethod
    def _batches(projected: list[Matrix]) -> dict[tuple[int, str, str, Any], list[Matrix]]:
        """The projected matrices per core call: (group, engine, precision, shard group)."""
        batches: dict[tuple[int, str, str, Any], list[Matrix]] = {}
        for matrix in projected:
            precision = engine.matmul_precision(matrix.group["matmul_precision"], matrix.p.dtype)
            # row-sharded matrices batch by their process group: a residual sums across exactly those ranks
            shard = distributed.row_shard(matrix.p, matrix.name).group if distributed.is_dtensor(matrix.p) else None
            batches.setdefault((id(matrix.group), matrix.engine, precision, shard), []).append(matrix)
        return batches

    @torch._disable_dynamo
    def _prepare(self, only: set[int] | None = None) -> list[Call]:
        """Check, create state, refresh what is due, advance the counters, and return the core calls of this
        step: plain AdamW per group, then ``subspace_adamw`` per (group, engine, precision), as (function,
        args, kwargs) holding only tensors, lists and plain values. This host-side bookkeeping (syncs,
        collectives, param-group objects) is kept out of ``torch.compile``'s tracing; the calls are not.
        ``only`` (parameter ids) restricts the step to those parameters: the layer-wise mode's updates.

        With ``nonfinite="skip"`` and no refresh possibly due, the step is masked: the flags stay on the device,
        and the calls are the ``subspace_adamw`` calls with their ``skipped`` flags (and ``lags``), the count of
        the skips, and the plain parameters' (``_masked_plain_calls``). Otherwise the host reads the flags now,
        once, and the step runs on what it read."""
        work, bad = self._checked_work(only)
        masked = bad is not None and not self._must_read(work, self._plan if only is None else None)
        if bad is not None and not masked:
            work = self._finite_only(work, self._read(bad))
        self._warn_if_nothing_projected()
        plan = self._plan if masked and only is None else None  # a masked step's work is every checked parameter
        projected, plain, batches, devices = self._structure(work, plan)
        self._advance(projected)
        if not masked:
            return self._plain_calls(plain) + [
                self._projected_call(key, matrices, plan, None) for key, matrices in batches.items()
            ]
        flags = device_flags(work, bad, devices)
        calls = [self._projected_call(key, matrices, plan, flags) for key, matrices in batches.items()]
        if projected:  # after the updates, which read the counts as lags
            calls.append(self._count_device_skips([matrix.p for matrix in projected], flags.counted))
        return calls + self._masked_plain_calls(plain, flags)

    def _warn_if_nothing_projected(self) -> None:
        """At the first step: warn when no group has a rank, unless some group said ``rank=None`` on purpose."""
        if self._plain_checked:
            return
        self._plain_checked = True
        if not self._rank_given and all(g["rank"] is None for g in self.param_groups):
            guards.warn_user(
                "SubspaceAdamW: no param group has a rank, so every parameter trains as plain AdamW (nothing is "
                "projected). To project, give the weight matrices a group with rank=..., e.g. "
                f"SubspaceAdamW({PARAM_GROUPS_HINT}); to mean plain AdamW, set 'rank': None in the group"
            )

    def _structure(
        self, work: list[Work], plan: StepPlan | None
    ) -> tuple[list[Matrix], Plain, dict, list[torch.device]]:
        """The step's projected matrices, plain parameters per group, core-call batches and devices: the plan's
        while it holds (a masked step with every state created), else built (``_with_state``) and kept."""
        if plan is not None and plan.structure is not None:
            return plan.structure
        projected, plain = self._with_state(work)
        batches = self._batches(projected)
        devices = [local(p).device for *_, p in work]
        if plan is not None and plan.holds(plan.key, self.state):  # no state entry was created just now
            plan.structure = (projected, plain, batches, devices)
            plan.kernel_flags = self._use_kernel_flags(plan, projected, devices)
        return projected, plain, batches, devices

    def _advance(self, projected: list[Matrix]) -> None:
        """Refresh the bases that are due (``refreshing``), then count this step in every projected matrix's state;
        on a masked step the counts run ahead by the steps skipped on the device until the next read."""
        due = refreshing.due(projected)
        if due and refreshing.refresh(due, self._metrics):
            self.check_consistency()
        for matrix in projected:
            matrix.state["step"] += 1
            matrix.state["moment_age"] += 1

    def _projected_call(
        self, key: tuple[int, str, str, Any], matrices: list[Matrix], plan: StepPlan | None, flags: DeviceFlags | None
    ) -> Call:
        """The ``subspace_adamw`` call of one batch of projected matrices (``_batches``' key): rank-local views of
        sharded tensors, the residual's state and reduction, the plan's launch batches, and on a masked step
        the device flags and lags."""
        _, which, precision, shard = key
        states = [matrix.state for matrix in matrices]
        ages = [s["moment_age"] for s in states]
        group = matrices[0].group
        regenerate = any(projections.materialized(s) for s in states)
        bases = [] if regenerate else [s["basis"] for s in states]
        if shard is None:  # plain tensors: no rank-local views to take
            params, grads = [matrix.p for matrix in matrices], [_matrix(matrix.p.grad) for matrix in matrices]
            args = (params, grads, bases, *_moments(states, None), ages)
        else:
            params, grads = [local(matrix.p) for matrix in matrices], [local_matrix(m.p.grad) for m in matrices]
            args = (params, grads, [local(b) for b in bases], *_moments(states, local), ages)
        kwargs = {
            **_hyper(group),
            "scale": group["scale"],
            "sides": [matrix.side for matrix in matrices],
            "engine": which,
            "matmul_precision": precision,
        }
        if group["residual"] != "none":
            kwargs.update(
                residual=group["residual"], update_norms=[s["update_norm"] for s in states], limiter=group["limiter"]
            )
        if shard is not None:  # the residual's and the factored moment's sums over the ranks' rows
            kwargs["reduce"] = partial(distributed.all_reduce_sum, group=shard)
        if plan is not None and which == "triton" and shard is None and not regenerate:  # layouts fixed meanwhile
            kwargs["batches"] = plan.launch_batches(id(group), precision, args, kwargs)
        if flags is not None:
            kwargs["skipped"] = [flags.skip[id(matrix.p)] for matrix in matrices]
            if any(
                self._unread.get(id(matrix.p), 0) for matrix in matrices
            ):  # some count may run ahead of its matrix's age
                kwargs["lags"] = [self._skip_count(matrix.p) for matrix in matrices]
        seeds = self._rounding_seeds(group, [(m.p, m.state) for m in matrices])
        if seeds is not None:
            kwargs["rounding_seeds"] = seeds
        if regenerate:
            return _regenerated_step, (matrices, *args), kwargs
        return functional.subspace_adamw, args, kwargs

    def _masked_plain_calls(self, plain: Plain, flags: DeviceFlags) -> list[Call]:
        """A masked step's plain parameters: those that skip on the device (``_plain_skipping_calls``), then
        torch's AdamW with its host step counts for the rest, after one read (``_plain_after_read``)."""
        if not plain:
            return []
        calls, rest = self._plain_skipping_calls(plain, flags.skip, flags.counted, flags.found)
        if rest:
            calls.append((self._plain_after_read, (rest, flags.skip), {}))
        return calls

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One optimizer step. Bad gradients raise (or are skipped) before any parameter or state is touched.

        While ``update_in_backward`` is attached the parameters were already updated inside backward; this
        then only applies gradients still pending (an accumulation cycle cut short) and starts a new cycle.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._backward_update is not None:
            self._backward_update.flush()
            return loss
        self._apply()
        return loss

    @torch.no_grad()
    def _apply(self, only: set[int] | None = None) -> None:
        """Step the parameters (those in ``only``, ids, when given) that hold a gradient."""
        for function, args, kwargs in self._prepare(only):
            function(*args, **kwargs)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``Optimizer.zero_grad``; while ``update_in_backward`` is attached it also starts a new cycle."""
        super().zero_grad(set_to_none)
        if getattr(self, "_backward_update", None) is not None:
            self._backward_update.restart()

    def update_in_backward(
        self,
        model: nn.Module,
        *,
        accumulation_steps: int = 1,
        max_grad_norm: float | None = None,
    ) -> BackwardUpdate:
        """Update each parameter inside backward, as soon as its gradient is complete, and free that gradient.

        Every ``accumulation_steps``-th backward pass through ``model`` (a module, a
        ``DistributedDataParallel`` module or an FSDP2 ``fully_shard`` module) completes an optimizer step;
        ``step()`` and ``zero_grad()`` stay callable (see ``BackwardUpdate``), lr schedulers keep working, and
        ``max_grad_norm`` clips as ``BackwardUpdate`` documents. Returns the handle; ``handle.remove()``
        returns to regular stepping. ``subspace_optim.layerwise`` has the details.
        """
        if self._backward_update is not None:
            raise RuntimeError(
                "update_in_backward: this optimizer is already updating inside backward; call remove() on the "
                "handle it returned first"
            )
        return BackwardUpdate(self, model, accumulation_steps=accumulation_steps, max_grad_norm=max_grad_norm)

    # ------------------------------------------------------------------ checkpoints
    @torch._disable_dynamo
    def state_dict(self) -> dict[str, Any]:
        """``Optimizer.state_dict``, with the step counts the device still holds settled first (``_read``: a
        host read, at checkpoint time), so a checkpoint counts exactly the steps taken."""
        self._settle()
        return super().state_dict()

    def __getstate__(self) -> dict[str, Any]:
        """Pickling and ``copy.deepcopy`` see settled step counts too (see ``state_dict``)."""
        if getattr(self, "_unread", None):
            self._settle()
        return super().__getstate__()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state, keeping the bases and moments in the dtypes their options chose.

        ``Optimizer.load_state_dict`` casts every floating state tensor to its parameter's dtype; for a
        bf16 weight that would round fp32 bases and moments, and it would widen bf16 moments of an fp32
        weight. They are restored from the saved values, as the user's load-state-dict hooks see them:
        taken after every pre hook has run (a hook added last), put back before any post hook runs (a
        hook added first).
        """
        loaded: dict[str, Any] = {}
        capture = self.register_load_state_dict_pre_hook(lambda _, sd: loaded.update(sd=sd))
        restore = self.register_load_state_dict_post_hook(
            lambda _: state_mod.restore_dtypes(self, loaded["sd"]), prepend=True
        )
        try:
            super().load_state_dict(state_dict)
        finally:
            capture.remove()
            restore.remove()

    # ------------------------------------------------------------------ metrics
    def check_consistency(self) -> None:
        """Raise if data-parallel ranks hold different bases (a collective: call it on every rank); see
        ``refreshing.check_consistency``."""
        entries = [
            (n, self.state[p][key])
            for _, _, n, p in self._named_params()
            for key in ("basis", "basis_index")
            if key in self.state[p]
        ]
        refreshing.check_consistency(entries)

    def subspace_metrics(self) -> dict[str, Any]:
        """Per projected parameter and overall: last refresh time, captured energy, overlap, state bytes.

        Bytes are this rank's (a sharded moment counts its local rows). ``captured_energy`` is
        ||P^T G||^2 / ||G||^2 for the gradient G of the last refresh; ``overlap`` is ||P_new^T P_old||_F^2 / r
        (1: same subspace, 0: orthogonal), None after the first. Reading the metrics synchronizes with the
        device; call it at logging time. Overall, ``last_refresh_time_s`` sums every matrix's latest refresh
        time and ``captured_energy`` is energy-weighted over matrices. Refresh metrics are not
        checkpointed: after a resume they are empty until the next refresh. ``nonfinite_skips`` and each
        matrix's ``step`` include the skips the device decided since the last read (read here).
        """
        self._settle()
        entries = (
            (i, n, self.state[p], refreshing.side(p, g) if "refresh_count" in self.state[p] else None)
            for i, g, n, p in self._named_params()
            if self.state.get(p)
        )
        return metrics.collect(entries, self._metrics, self._nonfinite_skips)


__all__ = ["SubspaceAdamW"]
