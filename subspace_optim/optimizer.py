"""SubspaceAdamW: AdamW whose state for selected matrices lives in a low-rank gradient subspace."""

from __future__ import annotations

import math
import numbers
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.adam import adam as _torch_adam

# kernels: the Triton engine (kernels/ in the repository, subspace_optim.kernels once installed). It imports
# without Triton; `_kernels.available()` says whether the kernels can run.
from . import distributed, linalg, reference
from . import kernels as _kernels
from .distributed import local
from .subspace import MOMENT_POLICIES, PROJ_TYPES, REFRESH_POLICIES, basis_dim, choose_side, transport_moments

DEFAULT_MOMENTS = "rotate"
NONFINITE_POLICIES = ("skip", "raise")
ENGINES = ("auto", "reference", "triton")
REFRESH_OWNERS = ("all", "round_robin")
MATMUL_PRECISIONS = ("auto", "ieee", "tf32")

# State keys of projected matrices that must stay fp32 whatever the parameter dtype.
_FP32_STATE = ("basis", "exp_avg", "exp_avg_sq")
# galore-torch 1.0 group keys and ours.
_ALIASES = {"update_proj_gap": "update_gap"}


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _validate(options: dict[str, Any], where: str) -> None:
    """Raise a ValueError/TypeError naming the bad option, its value and the fix."""

    def bad(name: str, why: str, exc: type[Exception] = ValueError) -> None:
        raise exc(f"Invalid {name} {where}: {options[name]!r} - {why}")

    lr = options["lr"]
    lr_value = float(lr) if isinstance(lr, Tensor) and lr.numel() == 1 else lr
    if not isinstance(lr_value, numbers.Real) or not 0.0 <= lr_value < math.inf:
        bad("lr", "the learning rate must be a finite number >= 0 (e.g. lr=1e-3)")
    betas = options["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        bad("betas", "betas must be a pair (beta1, beta2), e.g. betas=(0.9, 0.999)", TypeError)
    for i, beta in enumerate(betas):
        if not isinstance(beta, numbers.Real) or not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i} {where}: {beta!r} - must be in [0, 1)")
    eps = options["eps"]
    if not isinstance(eps, numbers.Real) or not 0.0 < eps < math.inf:
        bad("eps", "eps must be a finite number > 0 (e.g. eps=1e-8); with 0 a zero gradient divides 0 by 0")
    wd = options["weight_decay"]
    if not isinstance(wd, numbers.Real) or not 0.0 <= wd < math.inf:
        bad("weight_decay", "weight_decay must be a finite number >= 0 (0 disables it)")
    rank = options["rank"]
    if rank is not None:
        if not _is_int(rank):
            bad("rank", "rank must be a positive int (e.g. rank=128), or None for plain AdamW", TypeError)
        if rank <= 0:
            bad("rank", "rank must be a positive int (e.g. rank=128), or None for plain AdamW")
    gap = options["update_gap"]
    if not _is_int(gap):
        bad("update_gap", "update_gap (galore: update_proj_gap) must be a positive int, e.g. 200", TypeError)
    if gap <= 0:
        bad("update_gap", "update_gap (galore: update_proj_gap) must be a positive int, e.g. 200")
    scale = options["scale"]
    if not isinstance(scale, numbers.Real) or not 0.0 < scale < math.inf:
        bad("scale", "scale must be a finite number > 0 (GaLore uses 0.25)")
    choices = {
        "refresh": REFRESH_POLICIES,
        "moments": MOMENT_POLICIES,
        "proj_type": PROJ_TYPES,
        "nonfinite": NONFINITE_POLICIES,
        "engine": ENGINES,
        "refresh_owner": REFRESH_OWNERS,
        "matmul_precision": MATMUL_PRECISIONS,
    }
    for name, allowed in choices.items():
        if options[name] not in allowed:
            bad(name, f"use one of {', '.join(repr(a) for a in allowed)}")
    for name in ("oversample", "power_iters", "consistency_check_every"):
        if not _is_int(options[name]) or options[name] < 0:
            bad(name, f"{name} must be an int >= 0")
    if not _is_int(options["seed"]):
        bad("seed", "seed must be an int", TypeError)
    if options["engine"] == "triton" and not _kernels.available():
        bad("engine", "engine='triton' needs the triton package (pip install triton); use engine='auto'")


_SQRT_FP32_MAX = math.sqrt(torch.finfo(torch.float32).max)
_INT_OPTIONS = ("rank", "update_gap", "oversample", "power_iters", "seed", "consistency_check_every")
_FLOAT_OPTIONS = ("eps", "weight_decay", "scale")


def _plain_numbers(options: dict[str, Any]) -> None:
    """Store validated numbers as Python int/float: a numpy scalar in a group would make the state dict
    unloadable with ``torch.load(weights_only=True)``."""
    for name in _INT_OPTIONS:
        if options.get(name) is not None:
            options[name] = int(options[name])
    for name in _FLOAT_OPTIONS:
        if name in options:
            options[name] = float(options[name])
    if "lr" in options and not isinstance(options["lr"], Tensor):
        options["lr"] = float(options["lr"])
    if "betas" in options:
        options["betas"] = tuple(float(b) for b in options["betas"])


# device -> None (the kernels passed their self-check there) or why they failed; probed once per process.
_PROBED: dict[str, str | None] = {}


def _kernels_pass_probe(device: torch.device, engine: str) -> bool:
    """Whether the Triton kernels may run on ``device``: on first use they are checked against the reference
    (``kernels.probe``). On failure ``engine="auto"`` warns once and keeps the reference path;
    ``engine="triton"`` raises, since the user asked for the kernels explicitly."""
    key = str(device)
    if key not in _PROBED:
        _PROBED[key] = _kernels.probe(device)
        if _PROBED[key] is not None and engine == "auto":
            warnings.warn(
                f"SubspaceAdamW: the Triton kernels failed their self-check on {key} ({_PROBED[key]}); "
                "using the PyTorch reference engine there (set engine='reference' to silence this)",
                stacklevel=4,
            )
    error = _PROBED[key]
    if error is not None and engine == "triton":
        raise RuntimeError(
            f"engine='triton': the Triton kernels failed their self-check on {key}: {error}. "
            "Use engine='auto' (falls back to the PyTorch path) or engine='reference'."
        )
    return error is None


_MODEL_KEYWORDS = {"target_modules", "optim_target_modules", "project_output_head", "model"}


def _unexpected_keywords(names: list[str]) -> str:
    """The TypeError message for keywords SubspaceAdamW does not take, with the likely fix."""
    if _MODEL_KEYWORDS.intersection(names):
        return (
            f"SubspaceAdamW got {', '.join(names)}: it takes parameters, not a model, so it cannot pick "
            "modules by name. Build the groups with subspace_optim.param_groups(model, target_modules=..., "
            "rank=...), or with the HF Trainer pass optimizer_cls_and_kwargs=(SubspaceAdamWFactory, kwargs) "
            "from subspace_optim.integrations.transformers, which calls it with the model."
        )
    return (
        f"SubspaceAdamW got unexpected keyword argument(s) {', '.join(names)}; its options are lr, betas, eps, "
        "weight_decay, rank, update_gap (galore: update_proj_gap), scale, refresh, moments, proj_type, oversample, "
        "power_iters, seed, nonfinite, engine, foreach, refresh_owner, consistency_check_every, matmul_precision"
    )


_FLATTENED = (
    "the params of a param group with rank={rank} were replaced by flattened 1-D tensors: this is what "
    "DeepSpeed ZeRO stages 1-3 do, and a flattened weight has no matrix to project (it would silently "
    "train as plain AdamW). Use ZeRO stage 0, or shard with FSDP2 (torch.distributed.fsdp.fully_shard, "
    "or accelerate's FSDP plugin with fsdp_version=2), which SubspaceAdamW supports."
)


class _ParamGroup(dict):
    """A param group that refuses to have its projected matrices swapped for flat 1-D buffers.

    DeepSpeed ZeRO 1-3 rewrites ``group["params"]`` with flattened partitions inside
    ``deepspeed.initialize``; raising here stops it at construction, with an explanation, instead of
    letting the projection silently vanish.
    """

    def __init__(self, group: dict[str, Any], known: set[int]) -> None:
        self._known = known  # the optimizer's set of ids of parameters handed over through groups
        self._had_matrices = False  # sticky, so a group that held matrices can never become flat
        super().__init__(group)
        if "params" in group:
            self["params"] = group["params"]

    def __setitem__(self, key: str, value: Any) -> None:
        # Attributes are read defensively: unpickling sets dict items before it restores __dict__.
        if key == "params" and "_known" in self.__dict__:
            value = list(value)
            tensors = [p for p in value if isinstance(p, Tensor)]
            # ZeRO-1/2 install the flat buffer directly; ZeRO-3 first empties the list, then installs it.
            flattened = all(p.dim() == 1 for p in tensors)
            if self.get("rank") is not None and self._had_matrices and flattened:
                raise ValueError(_FLATTENED.format(rank=self["rank"]))
            self._had_matrices |= any(p.dim() >= 2 for p in tensors)
            # A whole-list swap of same-shape tensors is legitimate: accelerate's FSDP2 `prepare` swaps
            # each parameter for its sharded DTensor this way. State is lazy, so nothing is orphaned.
            self._known.update(id(p) for p in tensors)
        super().__setitem__(key, value)


class _Matrix(NamedTuple):
    """A projected parameter as one step sees it."""

    index: int
    group: dict[str, Any]
    name: str
    p: Tensor
    state: dict[str, Any]
    side: str


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
        engine: ``"auto"`` (Triton kernels for CUDA matrices when Triton is installed, else the reference),
            ``"triton"`` (the same, but Triton must be installed) or ``"reference"`` (PyTorch only). CPU
            tensors, DTensors, non-contiguous weights and ``refresh="svd"``/``"random"`` always take the
            reference path.
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
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
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
        **unexpected: Any,
    ) -> None:
        if "update_proj_gap" in unexpected:  # galore-torch's spelling, accepted here as in param groups
            gap = unexpected.pop("update_proj_gap")
            if update_gap not in (200, gap):
                raise ValueError(f"SubspaceAdamW got update_gap={update_gap!r} and update_proj_gap={gap!r}; keep one")
            update_gap = gap
        if unexpected:
            raise TypeError(_unexpected_keywords(sorted(unexpected)))
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,
            eps=eps,
            weight_decay=weight_decay,
            rank=rank,
            update_gap=update_gap,
            scale=scale,
            refresh=refresh,
            moments=moments,
            proj_type=proj_type,
            oversample=oversample,
            power_iters=power_iters,
            seed=seed,
            nonfinite=nonfinite,
            engine=engine,
            foreach=foreach,
            refresh_owner=refresh_owner,
            consistency_check_every=consistency_check_every,
            matmul_precision=matmul_precision,
        )
        _validate(defaults, "in SubspaceAdamW(...)")
        _plain_numbers(defaults)
        self._metrics: dict[int, dict[str, Any]] = {}
        self._nonfinite_skips = 0
        self._known_params: set[int] = set()
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups
    def __setstate__(self, state: dict[str, Any]) -> None:
        """After unpickling or deepcopy the parameters are new objects: re-register them.

        ``Optimizer.__getstate__`` keeps only defaults, state and groups, so the metrics restart empty.
        """
        super().__setstate__(state)
        self._metrics = {}
        self._nonfinite_skips = 0
        self._guard_groups()
        self._fill_new_options()

    def _fill_new_options(self) -> None:
        """Give groups saved by an older version the options added since (at their defaults)."""
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def _guard_groups(self) -> None:
        self._known_params = set()
        self.param_groups[:] = [_ParamGroup(dict(group), self._known_params) for group in self.param_groups]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate (and translate galore-torch keys of) a group before it is added."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param group must be a dict, got {type(param_group).__name__}")
        group = dict(param_group)
        for alias, name in _ALIASES.items():
            if alias in group:
                value = group.pop(alias)
                if name in group and group[name] != value:
                    raise ValueError(f"param group sets both {alias}={value!r} and {name}={group[name]!r}; keep one")
                group[name] = value
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        unknown = set(group) - set(self.defaults) - {"params", "param_names", "initial_lr"}
        if unknown:
            warnings.warn(f"SubspaceAdamW ignores unknown param group keys {sorted(unknown)}", stacklevel=2)
        _validate({**self.defaults, **group}, f"in param group {len(self.param_groups)}")
        _plain_numbers(group)
        super().add_param_group(_ParamGroup(group, self._known_params))

    # ------------------------------------------------------------------ state
    def _matrix_shape(self, p: Tensor) -> tuple[int, int]:
        return p.shape[0], p.numel() // p.shape[0]

    def _local_matrix(self, t: Tensor) -> Tensor:
        """This rank's rows of ``t`` as a matrix (m_l x n; m_l may be 0 for an empty FSDP shard)."""
        t_local = local(t)
        return t_local.reshape(t_local.shape[0], self._matrix_shape(t)[1])

    def _init_state(self, p: Tensor, group: dict[str, Any], name: str) -> dict[str, Any]:
        """Create a parameter's state on its first step: projected matrix state or torch AdamW state."""
        state = self.state[p]
        rank = group["rank"]
        projected = rank is not None and p.dim() >= 2
        if projected:
            m, n = self._matrix_shape(p)
            if rank > min(m, n):
                warnings.warn(
                    f"rank={rank} exceeds min{(m, n)} of parameter {name}: it is trained with plain AdamW "
                    f"(set rank <= {min(m, n)} or leave this parameter out of the rank group)",
                    stacklevel=3,
                )
                projected = False
        if not projected:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            return state
        # Counters are plain ints and the side is derived from (proj_type, shape), never stored: state
        # is tensors and numbers only, which is what torch.load(weights_only=True) and DCP accept.
        state["step"] = 0
        state["moment_age"] = 0
        state["refresh_count"] = 0
        for key in ("exp_avg", "exp_avg_sq"):
            if distributed.is_dtensor(p):
                # Right projection: moments are m x r, sharded on rows exactly like the weight.
                shard = distributed.row_shard(p, name)
                zeros = torch.zeros(shard.rows, rank, dtype=torch.float32, device=local(p).device)
                state[key] = distributed.sharded_like(p, zeros, rank)
            else:
                shape = (rank, n) if self._side(p, group) == "left" else (m, rank)
                state[key] = torch.zeros(shape, dtype=torch.float32, device=p.device)
        # "basis" is created by the first refresh (d x rank, d = basis_dim(side, m, n)).
        return state

    @staticmethod
    def _is_projected(state: dict[str, Any]) -> bool:
        return "refresh_count" in state

    def _side(self, p: Tensor, group: dict[str, Any]) -> str:
        """The projected side. A row-sharded (FSDP2) weight always projects on the right, whatever
        ``proj_type`` says: then a rank's rows project with the replicated basis and no communication."""
        if distributed.is_dtensor(p):
            return "right"
        return choose_side(group["proj_type"], *self._matrix_shape(p))

    # ------------------------------------------------------------------ step
    def _named_params(self) -> Iterable[tuple[int, dict[str, Any], str, Tensor]]:
        index = 0
        for group in self.param_groups:
            names = group.get("param_names")
            for j, p in enumerate(group["params"]):
                yield index, group, (names[j] if names else f"params[{index}]"), p
                index += 1

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One optimizer step. Bad gradients raise before any parameter or state is touched."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        work = []
        for index, group, name, p in self._named_params():
            if group["rank"] is not None and id(p) not in self._known_params:
                # A group's list was edited behind add_param_group (DeepSpeed ZeRO does this in place too).
                raise ValueError(
                    _FLATTENED.format(rank=group["rank"])
                    if p.dim() == 1
                    else (f"parameter {name} was put into a param group directly; use optimizer.add_param_group()")
                )
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise TypeError(
                    f"SubspaceAdamW does not support sparse gradients (parameter {name}); "
                    "use torch.optim.SparseAdam for it, or a dense embedding (sparse=False)"
                )
            if torch.is_complex(p):
                raise TypeError(
                    f"SubspaceAdamW does not support complex parameters (parameter {name}); "
                    "optimize torch.view_as_real(param) instead"
                )
            work.append((index, group, name, p))
        if not work:
            return loss

        finite = self._finite_flags(work)
        bad = [name for (_, _, name, _), ok in zip(work, finite, strict=True) if not ok]
        if bad and any(g["nonfinite"] == "raise" for (_, g, n, _) in work if n in bad):
            raise FloatingPointError(
                f"non-finite gradient in parameter(s) {bad} (a NaN/Inf, or an entry so large that its projection "
                "overflows fp32); nothing was changed. Use nonfinite='skip' to leave such parameters untouched "
                "for the step, or fix the loss scaling."
            )
        self._nonfinite_skips += len(bad)

        plain: dict[int, list[tuple[Tensor, dict[str, Any]]]] = {}
        projected: list[_Matrix] = []
        for (index, group, name, p), ok in zip(work, finite, strict=True):
            if not ok:
                continue
            state = self.state[p] if len(self.state[p]) else self._init_state(p, group, name)
            if self._is_projected(state):
                projected.append(_Matrix(index, group, name, p, state, self._side(p, group)))
            else:
                plain.setdefault(id(group), []).append((p, state))

        due = [x for x in projected if x.state["step"] % x.group["update_gap"] == 0]
        if due:
            self._refresh(due)
        fast = [x for x in projected if self._use_kernels(x)]
        for x in projected:
            x.state["step"] += 1
            x.state["moment_age"] += 1
        by_precision: dict[str, list[_Matrix]] = {}
        for x in fast:
            by_precision.setdefault(self._matmul_precision(x), []).append(x)
        for precision, xs in by_precision.items():
            # Same-shape matrices share launches: two per (shape, dtype, side) batch.
            _kernels.step_projected_batch(
                [x.p for x in xs],
                [self._local_matrix(x.p.grad) for x in xs],
                [x.state["basis"] for x in xs],
                [x.state["exp_avg"] for x in xs],
                [x.state["exp_avg_sq"] for x in xs],
                [x.state["moment_age"] for x in xs],
                [x.group for x in xs],
                [x.side for x in xs],
                input_precision=precision,
            )
        done = {x.index for x in fast}
        for x in projected:
            if x.index in done:
                continue
            p_local = local(x.p)
            reference.projected_adamw(
                p_local,
                self._local_matrix(x.p.grad),
                local(x.state["basis"]),
                local(x.state["exp_avg"]),
                local(x.state["exp_avg_sq"]),
                x.state["moment_age"],
                x.group,
                x.side,
            )
        for group in self.param_groups:
            members = plain.get(id(group))
            if members:
                self._plain_adamw(group, members)
        return loss

    def _grad_limit(self, p: Tensor, group: dict[str, Any]) -> float:
        """The largest |gradient entry| a parameter's step can take without overflowing fp32.

        A projected coordinate sums d entries against a unit vector, so |R| <= max|G| sqrt(d), and the
        second moment needs R^2 finite: above sqrt(fp32max) / 2 / sqrt(d) (~9e18 / sqrt(d)) a finite
        gradient could make V infinite and freeze the matrix for good, so it is handled like a non-finite
        one. Plain AdamW parameters only need finite entries (torch.optim.AdamW's own behaviour)."""
        rank = group["rank"]
        if rank is None or p.dim() < 2 or rank > min(self._matrix_shape(p)):
            return math.inf
        return _SQRT_FP32_MAX / 2.0 / math.sqrt(max(self._matrix_shape(p)))

    def _finite_flags(self, work: list[tuple[int, dict[str, Any], str, Tensor]]) -> list[bool]:
        """One batched check of every gradient's largest entry (one host sync) against ``_grad_limit``:
        NaN, Inf and projection-overflowing entries all fail it. Ranks holding shards of the same
        parameters OR their flags, so a NaN on one rank's rows skips the parameter everywhere (and no
        rank waits in a refresh all-reduce that the others skipped)."""
        flags = []
        for _, group, _, p in work:
            g = local(p.grad)
            if g.numel() == 0:  # an empty FSDP shard: nothing here can be bad
                flags.append(torch.zeros((), dtype=torch.bool, device=g.device))
                continue
            peak = torch.linalg.vector_norm(g, float("inf")).float()  # NaN if any entry is NaN
            flags.append(~(peak < self._grad_limit(p, group)))  # False for NaN and for Inf (limit <= inf)
        bad = torch.stack(flags).to(torch.int32)
        groups = {}
        for _, _, name, p in work:
            if distributed.is_dtensor(p):
                shard_group = distributed.row_shard(p, name).group
                groups[id(shard_group)] = shard_group
        if groups:
            bad = distributed.any_across(bad, list(groups.values()))
        return [not b for b in bad.tolist()]

    def _refresh(self, due: list[_Matrix]) -> None:
        """Refresh the bases of ``due`` (same list, same order on every rank) and carry their moments.

        Sharded matrices run the distributed range finder (collectives inside). With
        ``refresh_owner="round_robin"`` under a process group, each plain matrix is computed by one rank
        and its basis broadcast, so the refresh work divides by the world size.
        """
        rank, world = distributed.world()
        results: dict[int, tuple[linalg.Basis, float, bool]] = {}
        pending = []

        def remote(x: _Matrix) -> bool:
            robin = world > 1 and x.group["refresh_owner"] == "round_robin" and not distributed.is_dtensor(x.p)
            return robin and x.index % world != rank

        start = time.perf_counter()
        batched = self._kernel_refresh([x for x in due if not remote(x)])
        share = (time.perf_counter() - start) / max(len(batched), 1)
        for x in due:
            robin = world > 1 and x.group["refresh_owner"] == "round_robin" and not distributed.is_dtensor(x.p)
            owner = x.index % world
            if robin and owner != rank:
                pending.append((x, owner))
                continue
            start = time.perf_counter()
            basis = batched[x.index] if x.index in batched else self._compute_basis(x)
            if basis.basis.device.type == "cuda":
                torch.cuda.synchronize(basis.basis.device)
            seconds = time.perf_counter() - start + (share if x.index in batched else 0.0)
            results[x.index] = (basis, seconds, True)
            if robin:
                pending.append((x, owner))
        for x, owner in pending:
            start = time.perf_counter()
            if owner == rank:
                basis = results[x.index][0]
                # One fp32 message per matrix: the d x r basis, then its two energies (metrics only).
                energies = torch.stack([basis.captured, basis.total]).float()
                buf = torch.cat([basis.basis.flatten().float(), energies])
            else:
                m, n = self._matrix_shape(x.p)
                d = basis_dim(x.side, m, n)
                buf = torch.empty(d * x.group["rank"] + 2, dtype=torch.float32, device=x.p.device)
            dist.broadcast(buf, src=owner)
            if owner != rank:
                p_new = buf[:-2].view(d, x.group["rank"])
                captured, total = buf[-2].double(), buf[-1].double()
                results[x.index] = (linalg.Basis(p_new, captured, total), time.perf_counter() - start, False)
        check = False
        for x in due:
            self._install_basis(x, *results[x.index])
            every = x.group["consistency_check_every"]
            check |= bool(every) and x.state["refresh_count"] % every == 0
        if check:
            self.check_consistency()

    def _use_kernels(self, x: _Matrix) -> bool:
        """Whether matrix ``x`` takes the Triton engine: a plain (non-DTensor), contiguous CUDA weight and
        gradient of a supported dtype, in a group whose engine is not "reference"."""
        if x.group["engine"] == "reference" or distributed.is_dtensor(x.p):
            return False
        ok_dtype = x.p.dtype in (torch.float32, torch.bfloat16, torch.float16) and x.p.grad.dtype == x.p.dtype
        if not (_kernels.supports(x.p) and ok_dtype and x.p.is_contiguous() and x.p.grad.is_contiguous()):
            return False
        return _kernels_pass_probe(x.p.device, x.group["engine"])

    @staticmethod
    def _matmul_precision(x: _Matrix) -> str:
        """The Triton step's GEMM precision for ``x``. ``"auto"`` picks TF32 only where it cannot round the
        gradient: a bf16 (8-bit mantissa) or fp16 (10-bit) value is exact in TF32 (10-bit)."""
        choice = x.group["matmul_precision"]
        if choice != "auto":
            return choice
        return "tf32" if x.p.dtype in (torch.bfloat16, torch.float16) else "ieee"

    def _kernel_refresh(self, due: list[_Matrix]) -> dict[int, linalg.Basis]:
        """``warm``/``rsvd`` bases of the Triton-engine matrices in ``due``, same-shape ones batched.

        Keeps ``reference.compute_basis``'s guarantee: a non-finite basis is replaced by the previous one
        (or, on a first refresh, by the seeded random basis).
        """
        todo = [x for x in due if x.group["refresh"] in ("warm", "rsvd") and self._use_kernels(x)]
        by_options: dict[tuple[int, int], list[_Matrix]] = {}
        for x in todo:
            by_options.setdefault((x.group["oversample"], x.group["power_iters"]), []).append(x)
        out: dict[int, linalg.Basis] = {}
        for (oversample, power_iters), xs in by_options.items():
            seeds = [linalg.sketch_seed(x.group["seed"], x.index, x.state["refresh_count"]) for x in xs]
            previous = [x.state.get("basis") if x.group["refresh"] == "warm" else None for x in xs]
            try:
                items = _kernels.refresh_batch(
                    [self._local_matrix(x.p.grad) for x in xs],
                    [x.side for x in xs],
                    [x.group["rank"] for x in xs],
                    oversample=oversample,
                    power_iters=power_iters,
                    seeds=seeds,
                    previous=previous,
                )
            except torch.linalg.LinAlgError:
                # A factorization refused one member's numbers: leave this batch to the reference path,
                # matrix by matrix, with its own fallbacks (``_refresh`` computes what is missing here).
                continue
            finite = torch.stack([torch.isfinite(item[0]).all() for item in items]).tolist()
            for x, seed, prev, item, ok in zip(xs, seeds, previous, items, finite, strict=True):
                new = linalg.Basis(*item)
                if not ok:
                    new = reference.kept_basis(prev, new.basis.shape[0], x.group["rank"], seed, x.p.device, new.total)
                out[x.index] = new
        return out

    def _compute_basis(self, x: _Matrix) -> linalg.Basis:
        state, p = x.state, x.p
        seed = linalg.sketch_seed(x.group["seed"], x.index, state["refresh_count"])
        previous = local(state["basis"]) if "basis" in state else None
        if not distributed.is_dtensor(p):
            return reference.compute_basis(p.grad.reshape(p.shape[0], -1), previous, x.group, x.side, seed)
        if x.group["refresh"] == "svd":
            # The exact SVD needs the whole matrix: gather it (this is the slow reproduction mode).
            full = p.grad.full_tensor()
            return reference.compute_basis(full.reshape(full.shape[0], -1), previous, x.group, x.side, seed)
        g_local = self._local_matrix(p.grad)
        slab = distributed.row_shard(p, x.name).slab()
        return reference.compute_basis(g_local, previous, x.group, x.side, seed, slab)

    def _install_basis(self, x: _Matrix, new: linalg.Basis, seconds: float, computed_here: bool) -> None:
        state = x.state
        overlap = None
        if "basis" not in state:
            basis = new.basis.contiguous()
            state["basis"] = distributed.replicated_like(x.p, basis) if distributed.is_dtensor(x.p) else basis
        elif not bool(new.total.float() > 0):  # fp32: the value round-robin receivers get broadcast
            # An all-zero gradient (e.g. DCP's lr=0 state-initializing step) spans nothing: keep the basis
            # and the moments as they are instead of rotating them into an arbitrary one.
            overlap = torch.ones((), dtype=torch.float64)
        else:
            previous = local(state["basis"])
            c = transport_moments(
                local(state["exp_avg"]), local(state["exp_avg_sq"]), previous, new.basis, x.side, x.group["moments"]
            )
            overlap = c.double().square().sum() / x.group["rank"]
            previous.copy_(new.basis)
            if x.group["moments"] == "reset":
                state["moment_age"] = 0
        state["refresh_count"] += 1
        self._metrics[x.index] = {
            "refresh_time_s": seconds,
            "captured": new.captured,
            "total": new.total,
            "overlap": overlap,
            "computed_here": computed_here,
        }

    def check_consistency(self) -> None:
        """Raise if data-parallel ranks hold different bases (a collective: call it on every rank).

        Compares a 3-number fingerprint of every basis across the default process group; a no-op when
        not distributed. Bases should agree by construction (seeded sketches, identical gradients); a
        mismatch means nondeterministic kernels or ranks that saw different gradients.
        """
        if distributed.world()[1] == 1:
            return
        entries = [(name, self.state[p]["basis"]) for _, _, name, p in self._named_params() if "basis" in self.state[p]]
        if not entries:
            return
        fingerprints = torch.stack([distributed.checksum(b) for _, b in entries])
        wrong = distributed.disagreeing(fingerprints)
        if wrong:
            names = [entries[i][0] for i in wrong]
            raise RuntimeError(
                f"subspace bases differ across ranks for {names}: ranks must see identical gradients "
                "(all-reduced, same loss scaling) and use deterministic kernels; see SubspaceAdamW(seed=...)"
            )

    @staticmethod
    def _plain_adamw(group: dict[str, Any], members: list[tuple[Tensor, dict[str, Any]]]) -> None:
        beta1, beta2 = group["betas"]
        _torch_adam(
            [p for p, _ in members],
            [p.grad for p, _ in members],
            [s["exp_avg"] for _, s in members],
            [s["exp_avg_sq"] for _, s in members],
            [],
            [s["step"] for _, s in members],
            foreach=group["foreach"],
            decoupled_weight_decay=True,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )

    # ------------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state, keeping projected bases and moments fp32 on low-precision parameters.

        ``Optimizer.load_state_dict`` casts every floating state tensor to its parameter's dtype; for a
        bf16 weight that would round the basis and the moments. They are restored from the saved fp32
        values after the base class has done its work.
        """
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        # The base class rebuilds the groups as plain dicts; keep the flattening guard on them.
        self._guard_groups()
        self._fill_new_options()
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for pid, p in zip(saved_ids, params, strict=True):
            entry = saved.get(pid)
            if entry is None or "refresh_count" not in entry:
                continue
            state = self.state[p]
            for key in _FP32_STATE:
                if key in entry:
                    state[key] = entry[key].to(device=p.device, dtype=torch.float32, copy=True)

    # ------------------------------------------------------------------ metrics
    def subspace_metrics(self) -> dict[str, Any]:
        """Per projected parameter and overall: last refresh time, captured energy, overlap, state bytes.

        Bytes are this rank's (a sharded moment counts its local rows).

        ``captured_energy`` is ||P^T G||^2 / ||G||^2 for the gradient G of the last refresh;
        ``overlap`` is ||P_new^T P_old||_F^2 / r (1: same subspace, 0: orthogonal), None after the first.
        Reading the metrics synchronizes with the device; call it at logging time, not every step.
        Overall, ``last_refresh_time_s`` sums every matrix's latest refresh time (with the usual
        aligned refreshes, the optimizer-side cost of the last refresh step) and ``captured_energy``
        is energy-weighted over matrices. Refresh metrics are not checkpointed: after a resume they
        are empty until the next refresh.
        """
        per_param: dict[str, dict[str, Any]] = {}
        total_bytes = 0
        total_time = 0.0
        captured = total = 0.0
        for index, group, name, p in self._named_params():
            state = self.state.get(p)
            if not state:
                continue
            nbytes = sum(local(v).numel() * v.element_size() for v in state.values() if isinstance(v, Tensor))
            total_bytes += nbytes
            if not self._is_projected(state):
                continue
            info = self._metrics.get(index, {})
            entry: dict[str, Any] = {
                "rank": state["exp_avg"].shape[0 if self._side(p, group) == "left" else 1],
                "side": self._side(p, group),
                "step": state["step"],
                "refresh_count": state["refresh_count"],
                "state_bytes": nbytes,
                "refresh_time_s": info.get("refresh_time_s"),
                "captured_energy": None,
                "overlap": None,
                "computed_here": info.get("computed_here"),
            }
            if info:
                t = float(info["total"])
                c = float(info["captured"])
                entry["captured_energy"] = c / t if t > 0 else None
                entry["overlap"] = None if info["overlap"] is None else float(info["overlap"])
                total_time += info["refresh_time_s"]
                captured += c
                total += t
            per_param[name] = entry
        overall = {
            "projected_params": len(per_param),
            "state_bytes": total_bytes,
            "last_refresh_time_s": total_time,
            "captured_energy": captured / total if total > 0 else None,
            "nonfinite_skips": self._nonfinite_skips,
            # With refresh_owner="round_robin", how many of the last bases this rank computed itself.
            "refreshes_computed_here": sum(bool(e["computed_here"]) for e in per_param.values()),
        }
        return {"params": per_param, "overall": overall}


def state_bytes(optimizer: Optimizer) -> int:
    """Bytes this rank holds in an optimizer's state tensors (any torch optimizer; DTensors count locally)."""
    return sum(
        local(v).numel() * v.element_size()
        for s in optimizer.state.values()
        for v in s.values()
        if isinstance(v, Tensor)
    )


__all__ = ["SubspaceAdamW", "DEFAULT_MOMENTS", "state_bytes", "basis_dim"]
