"""Layer-wise updates: each parameter is updated inside backward as soon as its gradient is complete, and
that gradient is freed at once, so the gradients of the whole model are never alive together.

``SubspaceAdamW.update_in_backward(model, accumulation_steps=..., max_grad_norm=...)`` returns a
``BackwardUpdate``. It is the same optimizer object, stepping parameter by parameter through the same
functional core (``SubspaceAdamW._apply`` restricted to those parameters): state, checkpoints and lr
schedulers are unchanged.

Where a gradient becomes final:

- a plain module: the parameter's post-accumulate-grad hook (autograd has accumulated ``.grad``);
- ``DistributedDataParallel``: a communication hook. It all-reduces the bucket, waits, averages, and
  updates the bucket's parameters from the averaged values (as torch's optimizer-overlap hooks do), on the
  calling thread, so every rank issues the range finder's collectives in bucket order. DDP's buckets keep a
  full copy of the gradients alive for the whole run, so under DDP this mode saves no gradient memory
  beyond ``param.grad`` between steps; use FSDP2 for that;
- FSDP2 (``fully_shard``): FSDP2 runs post-accumulate-grad hooks on the sharded parameter after its
  reduce-scatter; each rank updates its shard and drops the sharded gradient.

Micro-batches are counted by backward passes through ``model``: a forward hook marks the outputs, and the
first gradient reaching them (or any of the optimizer's parameters) opens a backward. Passes whose gradients
are not synchronized (``no_sync()``, ``set_requires_gradient_sync(False)``) count too, so those stay
optional. The ``accumulation_steps``-th backward of a cycle updates; the others only accumulate.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd import Variable
from torch.utils._pytree import tree_leaves

from . import distributed

if TYPE_CHECKING:
    from .optimizer import SubspaceAdamW

_CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s


def _is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def _grad_norm(p: Tensor) -> float:
    """The norm of ``p``'s whole gradient (a DTensor shard's norm is reduced over its mesh)."""
    g = p.grad
    if distributed.is_dtensor(g):
        sq = distributed.local(g).float().square().sum()
        sq = distributed.all_reduce_sum(sq, distributed.row_shard(p, "").group)
        return math.sqrt(float(sq))
    return float(torch.linalg.vector_norm(g, dtype=torch.float32))


class BackwardUpdate:
    """The handle ``update_in_backward`` returns; ``remove()`` returns the optimizer to regular stepping.

    While attached:

    - ``optimizer.step()`` applies only gradients still pending (an accumulation cycle cut short, e.g. the
      last micro-batches of an epoch, or parameters that received a gradient but whose hook did not run)
      and starts a new cycle; after a completing backward there is none and it does nothing. Under DDP
      pending gradients are averaged across ranks first (idempotent for gradients DDP already averaged).
    - ``optimizer.zero_grad()`` drops pending gradients, as usual, and starts a new cycle.
    - lr schedulers stepped after ``optimizer.step()`` work unchanged: the update of optimizer step t, made
      inside the t-th completing backward, reads each group's lr at t.
    - ``max_grad_norm``: global-norm clipping needs every gradient at once, which this mode exists to avoid.
      Parameter p's gradient is multiplied by ``min(1, max_grad_norm / (max(N_prev, |g_p|) + 1e-6))``, where
      N_prev is the global gradient norm of the previous optimizer step (before clipping) and |g_p| is p's own
      norm, a lower bound of this step's global norm. It equals torch's ``clip_grad_norm_`` when the norm
      changes slowly, and a spike in one tensor is still clipped by its own norm. ``last_grad_norm`` holds
      N of the last completed step (None without ``max_grad_norm``: computing it synchronizes per tensor).
    - ``nonfinite="skip"``: as in regular stepping, a parameter whose gradient is not finite is left untouched
      (weights, moments, basis, step) and the others update. A projected matrix's update decides that on the
      device, so it waits for nothing inside backward (unless its refresh is due: one host read); a plain
      parameter's update reads its flag on the host (a sync, as torch's AdamW keeps its step count there), and
      so does every update with ``max_grad_norm`` (the norms). ``"raise"``: ``FloatingPointError`` out of
      ``backward()`` at the first such parameter, which is untouched. Parameters updated earlier in that
      backward keep their update (the message counts them); every pending gradient of the optimizer is
      dropped and a new cycle starts. Under DDP the reducer is then mid-reduction: stop the process.
    """

    def __init__(
        self,
        optimizer: SubspaceAdamW,
        model: nn.Module,
        *,
        accumulation_steps: int = 1,
        max_grad_norm: float | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"update_in_backward: model must be an nn.Module, got {type(model).__name__}")
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"update_in_backward: accumulation_steps must be an int >= 1, got {accumulation_steps!r}")
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and 0 < max_grad_norm < math.inf):
            raise ValueError(
                f"update_in_backward: max_grad_norm must be a positive finite number or None, got {max_grad_norm!r}"
            )
        self.optimizer = optimizer
        self.model = model
        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.last_grad_norm: float | None = None
        self.kind = "ddp" if _is_ddp(model) else "module"
        self._params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        self._ids = {id(p) for p in self._params}
        if any(distributed.is_dtensor(p) for p in self._params):
            self.kind = "fsdp2"
        self._check_model()
        self._backwards = 0  # completed backward passes of this cycle
        self._open = False  # inside a backward already counted
        self._completing = False
        self._updated: set[int] = set()
        self._sq_norm = 0.0
        self._hooks: list[Any] = []
        if self.kind == "ddp":
            self._attach_ddp()  # may refuse the module: before any hook is registered
        else:
            self._hooks += [p.register_post_accumulate_grad_hook(self._on_grad) for p in self._params]
        inner = model.module if self.kind == "ddp" else model
        self._hooks.append(inner.register_forward_hook(self._on_forward))
        optimizer._backward_update = self

    # ------------------------------------------------------------------ set-up
    def _check_model(self) -> None:
        names = {id(p): n for n, p in self.model.named_parameters()}
        missing = [i for i, p in enumerate(self._params) if id(p) not in names]
        if missing:
            raise ValueError(
                f"update_in_backward: {len(missing)} trainable parameter(s) of the optimizer (flat indices "
                f"{missing[:5]}) are not parameters of the model given; pass the model that holds them (the "
                "DistributedDataParallel or fully_shard module being trained)"
            )
        if self.kind == "module" and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError(
                "update_in_backward: torch.distributed runs with several processes but the model given is neither "
                "a DistributedDataParallel module nor FSDP2-sharded: each rank would update with its own local "
                "gradient. Pass the DistributedDataParallel module (e.g. after accelerator.prepare), or shard it "
                "with fully_shard"
            )

    def _attach_ddp(self) -> None:
        ddp = self.model
        managed = {id(p) for p in ddp.parameters() if p.requires_grad} - {
            id(p) for n, p in ddp.module.named_parameters() if n in getattr(ddp, "parameters_to_ignore", ())
        }
        if not self._ids <= managed:
            raise ValueError(
                "update_in_backward: some of the optimizer's parameters are ignored by DistributedDataParallel, "
                "so no all-reduce would complete their gradients; train them in another optimizer"
            )
        router = getattr(ddp, "_subspace_backward_update", None)
        if router is None:  # DDP takes one communication hook, once: it routes to the attached handle, if any
            router = _DdpRouter(ddp.process_group)
            try:
                ddp.register_comm_hook(router, _ddp_comm_hook)
            except RuntimeError as error:
                raise ValueError(
                    "update_in_backward: this DistributedDataParallel module already has a communication hook "
                    f"({error}); layer-wise updates need to install their own (an all-reduce, then the update)"
                ) from error
            ddp._subspace_backward_update = router
        router.handle = self
        self._router = router

    def remove(self) -> None:
        """Return to regular stepping (a DDP module keeps a plain all-reduce communication hook)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self.kind == "ddp" and self._router.handle is self:
            self._router.handle = None
        if self.optimizer._backward_update is self:
            self.optimizer._backward_update = None

    # ------------------------------------------------------------------ counting backward passes
    def _on_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        leaves = [t for t in tree_leaves(output) if isinstance(t, Tensor) and t.requires_grad]
        if leaves:
            torch.autograd.graph.register_multi_grad_hook(leaves, lambda _: self._enter(), mode="any")

    def _enter(self) -> None:
        """The first gradient of a backward pass: count it and queue the end-of-backward bookkeeping."""
        if self._open or self.optimizer._backward_update is not self:
            return  # counted already, or removed (a forward before remove() left its output hook behind)
        self._open = True
        self._completing = self._backwards + 1 >= self.accumulation_steps
        self._updated = set()
        self._sq_norm = 0.0
        # Two stages: the second is queued while callbacks run, so it runs after every callback queued
        # before it (FSDP2's final reduce-scatter and its hooks, DDP's copy of buckets into .grad).
        Variable._execution_engine.queue_callback(
            lambda: Variable._execution_engine.queue_callback(self._end_of_backward)
        )

    def _end_of_backward(self) -> None:
        if self._completing:
            if self.kind != "ddp":
                leftover = [p for p in self._params if p.grad is not None and id(p) not in self._updated]
                if leftover:
                    self._update(leftover)
            else:
                for p in self._params:  # DDP copied the averaged buckets back into .grad after the update
                    p.grad = None
            if self.max_grad_norm is not None:
                self.last_grad_norm = math.sqrt(self._sq_norm)
            self._backwards = 0
        else:
            self._backwards += 1
        self._open = False

    def restart(self) -> None:
        """Start a new accumulation cycle (``zero_grad`` and ``step`` call this, never inside backward: a
        backward that died before its end, e.g. out of memory, is forgotten here)."""
        self._backwards, self._open = 0, False

    # ------------------------------------------------------------------ updates
    def _on_grad(self, p: Tensor) -> None:
        self._enter()
        if self._open and self._completing:
            self._update([p])

    def _update(self, params: list[Tensor]) -> None:
        """Clip (``max_grad_norm``), then step these parameters and free their gradients."""
        if self.max_grad_norm is not None:
            for p in params:
                norm = _grad_norm(p)
                if not math.isfinite(norm):
                    continue  # the optimizer's finite check skips or raises for it
                self._sq_norm += norm * norm
                coefficient = self.max_grad_norm / (max(self.last_grad_norm or 0.0, norm) + _CLIP_EPS)
                if coefficient < 1.0:
                    p.grad.mul_(coefficient)
        try:
            self.optimizer._apply({id(p) for p in params})
        except FloatingPointError as error:
            done = len(self._updated)
            for p in self._params:
                p.grad = None
            self._backwards, self._open = 0, False
            what = str(error).split(";")[0]  # the checks' text up to "nothing was changed"
            raise FloatingPointError(
                f"{what}; it was not changed; {done} parameter(s) reached earlier in this backward were updated "
                "(layer-wise mode updates inside backward), every pending gradient was dropped and a new "
                "accumulation cycle starts. Use nonfinite='skip' to leave such parameters untouched, or fix the "
                "loss scaling."
            ) from None
        for p in params:
            p.grad = None
            self._updated.add(id(p))

    def flush(self) -> None:
        """What ``optimizer.step()`` does while attached: apply pending gradients, start a new cycle."""
        pending = [p for p in self._params if p.grad is not None]
        if pending:
            if self.kind == "ddp":
                group = self.model.process_group
                for p in pending:
                    dist.all_reduce(p.grad, group=group)
                    p.grad.div_(dist.get_world_size(group))
            self._updated, self._sq_norm = set(), 0.0
            self._update(pending)
            if self.max_grad_norm is not None:
                self.last_grad_norm = math.sqrt(self._sq_norm)
        self.restart()


class _DdpRouter:
    """The DDP communication hook's state: DDP's process group and the attached handle (None: a plain
    all-reduce)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.handle: BackwardUpdate | None = None


def _ddp_comm_hook(router: _DdpRouter, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """All-reduce the bucket and average it; in a completing backward, then update its parameters."""
    handle, group = router.handle, router.group
    buffer = bucket.buffer()
    work = dist.all_reduce(buffer, group=group, async_op=True)
    if handle is not None:
        handle._enter()
    if handle is None or not handle._completing:
        return work.get_future().then(lambda fut: fut.value()[0].div_(dist.get_world_size(group)))
    work.wait()
    buffer.div_(dist.get_world_size(group))
    mine = []
    for p, g in zip(bucket.parameters(), bucket.gradients(), strict=True):
        if id(p) in handle._ids:
            p.grad = g  # the averaged gradient (a view of the bucket); DDP's own copy comes after backward
            mine.append(p)
    if mine:
        with torch.no_grad():
            handle._update(mine)
    done: torch.futures.Future[Tensor] = torch.futures.Future()
    done.set_result(buffer)
    return done


# DDP checks the hook's annotations as objects; this module's are strings (postponed evaluation).
_ddp_comm_hook.__annotations__.update({"bucket": dist.GradBucket, "return": torch.futures.Future[torch.Tensor]})
