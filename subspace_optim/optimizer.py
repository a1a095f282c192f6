"""SubspaceAdamW: AdamW whose state for selected matrices lives in a low-rank gradient subspace.

The class holds groups and lazy state, and its ``step`` gathers lists and calls the functional core
(``functional.subspace_adamw``, torch's ``adam`` for plain parameters) after ``checks`` has passed every
gradient. Refresh scheduling lives in ``schedule``, engine choice in ``engine``, options in ``options``,
compatibility guards in ``compat``, metrics in ``metrics``; ``docs/architecture.md`` maps them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import checks, compat, distributed, engine, functional, metrics, options, quant, schedule
from .distributed import local
from .metrics import state_bytes
from .schedule import Matrix, local_matrix, matrix_shape
from .subspace import basis_dim

DEFAULT_MOMENTS = options.DEFAULTS["moments"]
# State keys that keep the dtype they were saved with (their options chose it), whatever the parameter's.
_OWN_DTYPE_STATE = ("basis", "exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax")


def _hyper(group: dict[str, Any]) -> dict[str, Any]:
    """The AdamW hyperparameters of a group, as the functional core takes them."""
    return {k: group[k] for k in ("lr", "betas", "eps", "weight_decay")}


def _absmaxes(states: list[dict[str, Any]]) -> dict[str, list[Tensor]]:
    """The 8-bit moments' absmax lists for a core call (nothing when the moments are not 8-bit)."""
    if "exp_avg_absmax" not in states[0]:
        return {}
    return {f"{k}_absmaxes": [local(s[f"{k}_absmax"]) for s in states] for k in ("exp_avg", "exp_avg_sq")}


def _by_storage(members: list[tuple[Tensor, dict[str, Any]]]) -> list[tuple[bool, list]]:
    """Plain parameters split by moment storage: (True, native: the parameter's dtype, torch's own AdamW
    state), then (False, bf16) and (False, 8-bit); empty parts left out."""
    parts: dict[str, list] = {}
    for p, s in members:
        parts.setdefault(quant.stored_kind(s, "exp_avg") if s["exp_avg"].dtype != p.dtype else "native", []).append(
            (p, s)
        )
    return [(kind == "native", parts[kind]) for kind in ("native", "bfloat16", "int8") if kind in parts]


def _plain_kind(p: Tensor, group: dict[str, Any]) -> str | None:
    """How a plain parameter's moments are stored: None for torch AdamW's own (the parameter's dtype),
    else a ``quant`` kind. int8 needs a >= 2-D tensor of ``quant.MIN_QUANTIZED_NUMEL`` elements or more
    (smaller ones are not worth 8 bits, bitsandbytes' rule)."""
    kind = group["moments_dtype"]
    if kind == "int8" and not (p.dim() >= 2 and quant.quantizable(p)):
        kind = "float32"
    return None if kind == "float32" or p.dtype == quant.TORCH_DTYPES.get(kind) else kind


def _conform(p: Tensor, group: dict[str, Any], state: dict[str, Any], name: str) -> None:
    """State loaded from a checkpoint saved with other ``moments_dtype`` / ``basis_dtype`` options is
    converted to the group's, once, through fp32 (documented: a conversion, not an error)."""
    projected = "refresh_count" in state
    kind = group["moments_dtype"] if projected else _plain_kind(p, group)
    if kind is None:
        kind = "bfloat16" if p.dtype == torch.bfloat16 else "float32"
    if quant.stored_kind(state, "exp_avg") != kind or (
        projected and "basis" in state and state["basis"].dtype != quant.TORCH_DTYPES[group["basis_dtype"]]
    ):
        if distributed.is_dtensor(p):
            raise NotImplementedError(
                f"parameter {name}: its sharded state was saved with other moments_dtype/basis_dtype options; "
                "load it with the options it was saved with"
            )
        for key in ("exp_avg", "exp_avg_sq"):
            quant.convert(state, key, kind)
        if projected and "basis" in state:
            state["basis"] = state["basis"].to(quant.TORCH_DTYPES[group["basis_dtype"]])


def _moment(p: Tensor, shape: tuple[int, ...], kind: str, key: str, name: str) -> dict[str, Tensor]:
    """Zero state for moment ``key`` of this rank's ``shape``; a row-sharded weight's moments (and their
    absmax) become DTensors sharded on rows like the weight."""
    entries = quant.zeros(shape, kind, local(p).device, key)
    if not distributed.is_dtensor(p):
        return entries
    distributed.row_shard(p, name)  # a clear error for layouts other than FSDP2's dim-0 sharding
    if any(v.dim() != 2 for v in entries.values()):
        raise NotImplementedError(
            f"parameter {name}: {kind} moments of a sharded {p.dim()}-D parameter are not supported; "
            "use moments_dtype='float32' for its group"
        )
    return {k: distributed.sharded_like(p, v, v.shape[1]) for k, v in entries.items()}


def _restore_dtypes(optimizer: Optimizer, state_dict: dict[str, Any]) -> None:
    """Projected state, and the moments of plain parameters whose group stores them in low precision,
    keep their saved dtypes (torch's loader cast them to the parameter's)."""
    saved = state_dict["state"]
    for saved_group, group in zip(state_dict["param_groups"], optimizer.param_groups, strict=True):
        own = group.get("moments_dtype", "float32") != "float32"
        for pid, p in zip(saved_group["params"], group["params"], strict=True):
            entry = saved.get(pid)
            if entry is None or not (own or "refresh_count" in entry):
                continue
            for key in _OWN_DTYPE_STATE:
                if key in entry:
                    optimizer.state[p][key] = entry[key].to(device=p.device, dtype=entry[key].dtype, copy=True)


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
            groups (``rank``, ``update_proj_gap``, ``scale``, ``proj_type``) work unchanged.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (weight decay is decoupled and applied in
            full space, also to projected matrices).
        rank: subspace rank r; ``None`` (default) means plain AdamW for the group.
        update_gap: refresh the basis every this many optimizer steps of the parameter.
        scale: multiplier alpha on the projected-back update (GaLore's ``scale``).
        refresh: ``"warm"`` | ``"rsvd"`` | ``"svd"`` | ``"random"`` (see ``subspace.refresh_basis``).
        moments: ``"rotate"`` | ``"keep"`` | ``"reset"`` (see ``subspace.transport_moments``).
        proj_type: ``"std"`` | ``"reverse_std"`` | ``"left"`` | ``"right"`` (see ``subspace.choose_side``).
        oversample: extra sketch columns for ``rsvd``/``warm``.
        power_iters: power (subspace) iterations for ``rsvd``/``warm``.
        seed: sketches are seeded from (seed, parameter index, refresh count), never the global RNG.
        nonfinite: ``"skip"`` (a parameter whose gradient has a NaN/Inf is left untouched this step:
            weights, moments, basis and step count) or ``"raise"`` (FloatingPointError, nothing changed).
            A projected matrix's gradient so large that its projection's square would overflow fp32
            (max|G| > 9.2e18 / sqrt(max(m, n))) counts as non-finite.
        engine: ``"auto"`` (Triton kernels for plain contiguous CUDA matrices once they pass their
            self-check there, else the reference), ``"triton"`` (obeyed: every projected matrix takes the
            kernels, on CUDA or on CPU under ``TRITON_INTERPRET=1``; one they cannot take is an error before
            the step changes anything) or ``"reference"`` (PyTorch only). See ``subspace_optim.engine``.
        foreach: passed to ``torch.optim.adam`` for the plain-AdamW parameters.
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
            blockwise 8-bit, see ``quant``) and of the bases (``"float32"``, ``"bfloat16"``); math is fp32.
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
        moments: str = DEFAULT_MOMENTS,
        proj_type: str = "std",
        oversample: int = 8,
        power_iters: int = 1,
        seed: int = 0,
        nonfinite: str = "skip",
        engine: str = "auto",
        foreach: bool | None = None,
        refresh_owner: str = "all",
        consistency_check_every: int = 0,
        matmul_precision: str = "auto",
        moments_dtype: str = "float32",
        basis_dtype: str = "float32",
        **unexpected: Any,
    ) -> None:
        given = dict(locals())
        given = {name: given[name] for name in options.DEFAULTS}
        if "update_proj_gap" in unexpected:  # galore-torch's spelling, accepted here as in param groups
            gap = unexpected.pop("update_proj_gap")
            if update_gap not in (options.DEFAULTS["update_gap"], gap):
                raise ValueError(f"SubspaceAdamW got update_gap={update_gap!r} and update_proj_gap={gap!r}; keep one")
            given["update_gap"] = gap
        if unexpected:
            raise TypeError(compat.unexpected_keywords(sorted(unexpected)))
        if isinstance(given["betas"], list):
            given["betas"] = tuple(given["betas"])
        options.validate(given, "in SubspaceAdamW(...)")
        options.plain_numbers(given)
        self._metrics: dict[int, dict[str, Any]] = {}
        self._nonfinite_skips = 0
        self._known_params: set[int] = set()
        if isinstance(params, Tensor):
            raise TypeError(
                "params argument given to the optimizer should be an iterable of Tensors or dicts, "
                f"but got {torch.typename(params)}"
            )
        super().__init__(params, given)

    # ------------------------------------------------------------------ groups
    def __setstate__(self, state: dict[str, Any]) -> None:
        """After unpickling, deepcopy or ``load_state_dict``: upgrade older formats, re-register the
        parameters (they are new objects), give old groups the options added since. Metrics restart."""
        super().__setstate__(state)
        compat.upgrade_state(self.state, self.param_groups)
        self._metrics = {}
        self._nonfinite_skips = 0
        self._known_params = set()
        for i, group in enumerate(self.param_groups):
            for key in options.DEFAULTS:  # not torch's "differentiable", which __setstate__ put in defaults
                group.setdefault(key, self.defaults[key])
            self.param_groups[i] = compat.ParamGroup(dict(group), self._known_params)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate (and translate galore-torch keys of) a group before it is added."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param group must be a dict, got {type(param_group).__name__}")
        where = f"in param group {len(self.param_groups)}"
        group = options.translate_aliases(param_group, f"param group {len(self.param_groups)}")
        if "params" in group:
            group["params"] = compat.param_list(group["params"])
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        unknown = set(group) - set(options.DEFAULTS) - options.GROUP_KEYS
        if unknown:
            warnings.warn(f"SubspaceAdamW ignores unknown param group keys {sorted(unknown)}", stacklevel=2)
        options.validate({**self.defaults, **group}, where)
        options.plain_numbers(group)
        super().add_param_group(compat.ParamGroup(group, self._known_params))

    # ------------------------------------------------------------------ state
    def _init_state(self, p: Tensor, group: dict[str, Any], name: str) -> dict[str, Any]:
        """Create a parameter's state on its first step: projected matrix state or AdamW state, with the
        moments stored as the group's ``moments_dtype`` says (``quant``)."""
        state = self.state[p]
        if not schedule.projects(p, group, name, warn=True):
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            kind = _plain_kind(p, group)
            for key in ("exp_avg", "exp_avg_sq"):
                if kind is None:  # torch.optim.AdamW's own state: the parameter's dtype and layout
                    state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
                else:
                    state.update(_moment(p, tuple(local(p).shape), kind, key, name))
            return state
        kind = group["moments_dtype"]
        # Counters are plain ints and the side is derived from (proj_type, shape), never stored: state
        # is tensors and numbers only, which is what torch.load(weights_only=True) and DCP accept.
        state["step"] = 0
        state["moment_age"] = 0
        state["refresh_count"] = 0
        rank = group["rank"]
        m, n = matrix_shape(p)
        if distributed.is_dtensor(p):  # right projection: m x r moments, sharded on rows like the weight
            shape = (distributed.row_shard(p, name).rows, rank)
        else:
            shape = (rank, n) if schedule.side(p, group) == "left" else (m, rank)
        for key in ("exp_avg", "exp_avg_sq"):
            state.update(_moment(p, shape, kind, key, name))
        # "basis" is created by the first refresh (d x rank, d = basis_dim(side, m, n)).
        return state

    # ------------------------------------------------------------------ step
    def _named_params(self) -> Iterable[tuple[int, dict[str, Any], str, Tensor]]:
        index = 0
        for group in self.param_groups:
            names = group.get("param_names")
            for j, p in enumerate(group["params"]):
                yield index, group, (names[j] if names else f"params[{index}]"), p
                index += 1

    def _checked_work(self) -> list[tuple[int, dict[str, Any], str, Tensor]]:
        """Every parameter with a gradient, each checked (types, engine, finiteness) before anything moves;
        non-finite ones are skipped or raised per ``nonfinite``."""
        work = []
        for index, group, name, p in self._named_params():
            checks.refuse_unknown(p, group, name, self._known_params)
            if p.grad is None:
                continue
            checks.refuse_bad_gradient(p, name)
            if schedule.projects(p, group, name):
                engine.check(group["engine"], p, name)
            work.append((index, group, name, p))
        if not work:
            return work
        shard_groups = {id(g): g for g in (distributed.row_shard(p, n).group for _, _, n, p in work
                                           if distributed.is_dtensor(p))}  # fmt: skip
        limits = [checks.grad_limit(p, schedule.projects(p, g, n)) for _, g, n, p in work]
        finite = checks.finite_flags([p.grad for *_, p in work], limits, list(shard_groups.values()))
        bad = [w for w, ok in zip(work, finite, strict=True) if not ok]
        if any(g["nonfinite"] == "raise" for _, g, _, _ in bad):
            raise FloatingPointError(
                f"non-finite gradient in parameter(s) {[n for _, _, n, _ in bad]} (a NaN/Inf, or an entry so large "
                "that its projection overflows fp32); nothing was changed. Use nonfinite='skip' to leave such "
                "parameters untouched for the step, or fix the loss scaling."
            )
        self._nonfinite_skips += len(bad)
        return [w for w, ok in zip(work, finite, strict=True) if ok]

    @torch._disable_dynamo
    def _prepare(self) -> list[tuple[Callable[..., None], tuple, dict[str, Any]]]:
        """Check, create state, refresh what is due, advance the counters, and return the core calls of this
        step: plain AdamW per group, then ``subspace_adamw`` per (group, engine, precision), as (function,
        args, kwargs) holding only tensors, lists and plain values. This host-side bookkeeping (syncs,
        collectives, param-group objects) is kept out of ``torch.compile``'s tracing; the calls are not."""
        plain: dict[int, list[tuple[Tensor, dict[str, Any]]]] = {}
        projected: list[Matrix] = []
        for index, group, name, p in self._checked_work():
            if len(self.state[p]):
                state = self.state[p]
                _conform(p, group, state, name)
            else:
                state = self._init_state(p, group, name)
            if "refresh_count" in state:
                which = engine.choose(group["engine"], p)
                projected.append(Matrix(index, group, name, p, state, schedule.side(p, group), which))
            else:
                plain.setdefault(id(group), []).append((p, state))
        due = schedule.due(projected)
        if due and schedule.refresh(due, self._metrics):
            self.check_consistency()
        for x in projected:
            x.state["step"] += 1
            x.state["moment_age"] += 1
        calls: list[tuple[Callable[..., None], tuple, dict[str, Any]]] = []
        for group in self.param_groups:
            for native, members in _by_storage(plain.get(id(group), [])):
                view = (lambda t: t) if native else local  # low-precision storage is updated rank-locally
                args = tuple([view(t) for t in ts] for ts in zip(*[(p, p.grad, s["exp_avg"], s["exp_avg_sq"])
                                                                   for p, s in members], strict=True))
                kwargs = {**_hyper(group), "foreach": group["foreach"], **_absmaxes([s for _, s in members])}
                calls.append((functional.adamw, (*args, [s["step"] for _, s in members]), kwargs))
        batches: dict[tuple[int, str, str], list[Matrix]] = {}
        for x in projected:
            precision = engine.matmul_precision(x.group["matmul_precision"], x.p.dtype)
            batches.setdefault((id(x.group), x.engine, precision), []).append(x)
        for (_, which, precision), xs in batches.items():
            args = ([local(x.p) for x in xs], [local_matrix(x.p.grad) for x in xs],
                    [local(x.state["basis"]) for x in xs], [local(x.state["exp_avg"]) for x in xs],
                    [local(x.state["exp_avg_sq"]) for x in xs], [x.state["moment_age"] for x in xs])  # fmt: skip
            kwargs = {**_hyper(xs[0].group), "scale": xs[0].group["scale"], "sides": [x.side for x in xs],
                      "engine": which, "matmul_precision": precision, **_absmaxes([x.state for x in xs])}  # fmt: skip
            calls.append((functional.subspace_adamw, args, kwargs))
        return calls

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One optimizer step. Bad gradients raise (or are skipped) before any parameter or state is touched."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for function, args, kwargs in self._prepare():
            function(*args, **kwargs)
        return loss

    # ------------------------------------------------------------------ checkpoints
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
        restore = self.register_load_state_dict_post_hook(lambda _: _restore_dtypes(self, loaded["sd"]), prepend=True)
        try:
            super().load_state_dict(state_dict)
        finally:
            capture.remove()
            restore.remove()

    # ------------------------------------------------------------------ metrics
    def check_consistency(self) -> None:
        """Raise if data-parallel ranks hold different bases (a collective: call it on every rank); see
        ``schedule.check_consistency``."""
        entries = [(n, self.state[p]["basis"]) for _, _, n, p in self._named_params() if "basis" in self.state[p]]
        schedule.check_consistency(entries)

    def subspace_metrics(self) -> dict[str, Any]:
        """Per projected parameter and overall: last refresh time, captured energy, overlap, state bytes.

        Bytes are this rank's (a sharded moment counts its local rows). ``captured_energy`` is
        ||P^T G||^2 / ||G||^2 for the gradient G of the last refresh; ``overlap`` is ||P_new^T P_old||_F^2 / r
        (1: same subspace, 0: orthogonal), None after the first. Reading the metrics synchronizes with the
        device; call it at logging time. Overall, ``last_refresh_time_s`` sums every matrix's latest refresh
        time and ``captured_energy`` is energy-weighted over matrices. Refresh metrics are not
        checkpointed: after a resume they are empty until the next refresh.
        """
        entries = (
            (i, n, self.state[p], schedule.side(p, g) if "refresh_count" in self.state[p] else None)
            for i, g, n, p in self._named_params()
            if self.state.get(p)
        )
        return metrics.subspace_metrics(entries, self._metrics, self._nonfinite_skips)


__all__ = ["SubspaceAdamW", "DEFAULT_MOMENTS", "state_bytes", "basis_dim"]
