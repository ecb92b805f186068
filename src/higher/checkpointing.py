"""Checkpointed unrolls: exact meta-gradients of a long inner loop in O(T/k + k) memory.

A differentiable unroll of ``T`` steps keeps, for the backward pass, every step's fast weights,
optimizer state and the activations of its forward and inner backward: memory grows linearly
with ``T``. :func:`checkpointed_unroll` runs the same ``T`` steps but keeps only the state at
every ``every``-th step (fast weights, optimizer state, buffers, the step counter and the random
number generator state) and recomputes each segment of ``every`` steps from its checkpoint when
the backward pass reaches it (Griewank's checkpointing, "Achieving logarithmic growth of temporal
and spatial complexity in reverse automatic differentiation", 1992). The cost is one extra
forward pass of the unroll; the result is the same graph with the same values, so
``loss.backward()`` on any loss of the final fast weights gives the full unroll's meta-gradients
and hypergradients (in float64 they agree to rounding, in practice bitwise)::

    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, override={"lr": [lr]}) as (fmodel, diffopt):
        higher.checkpointed_unroll(fmodel, diffopt, lambda fmodel, t: F.mse_loss(fmodel(xs[t]), ys[t]), steps=1000)
        F.mse_loss(fmodel(x_val), y_val).backward()   # meta-gradients reach model and lr

How: each segment runs under ``torch.autograd.graph.saved_tensors_hooks``: the graph is recorded
as usual, but every tensor it saves for backward goes into a small holder that the segment
releases when its steps are done (during the segment the inner gradients need them). When the
backward pass first unpacks a released tensor, the segment is run again from its checkpoint
(fmodel and optimizer set back to that point, and afterwards to where they were), filling the
holders in the same order; one segment is materialized at a time. Since the graph itself is the
original one, every tensor the step function closes over (hyperparameters used in the loss,
data that requires grad) is handled without being declared. The last segment is not released
(backward starts there). ``torch.utils.checkpoint`` is not used: its non-reentrant form
recomputes the segment whenever a saved tensor is unpacked during the segment's own forward pass,
which the inner ``autograd.grad`` of every step does (quadratic cost), and its reentrant form
does not let ``torch.autograd.grad`` reach tensors outside the segment.

What the step function may do: anything deterministic given the fmodel, the optimizer and the
step index: draw random numbers (the generator state is restored for the recomputation), use
``PerStep`` schedules, ``override`` tensors, per-parameter values, BatchNorm (the fmodel's
buffers are restored), task-batched fmodels (``tasks=T``). It must not change Python state that
the recomputation cannot restore: a ``torch.optim.lr_scheduler`` stepping inside it would be
stepped again (use :class:`higher.PerStep` for schedules), and appending to lists happens twice
for recomputed segments.

The fmodel's history: during the unroll only the latest fast weights are kept (keeping them all
is exactly the memory this avoids); afterwards ``fmodel.parameters(time=0)`` is the final fast
weights, and the initial ones are in the returned :class:`CheckpointedUnroll`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .optim import DifferentiableOptimizer
from .patch import FunctionalModule

__all__ = ["CheckpointedUnroll", "checkpointed_unroll", "default_every"]

StepLoss = Callable[[FunctionalModule, Any], Tensor]


def default_every(steps: int) -> int:
    """The default checkpoint interval: ``ceil(sqrt(steps))`` (memory O(sqrt(T)), one recomputation)."""
    return max(1, math.ceil(math.sqrt(steps)))


@dataclass
class CheckpointedUnroll:
    """What :func:`checkpointed_unroll` did.

    Attributes:
        steps: the number of inner steps taken.
        every: the checkpoint interval (steps per segment).
        checkpoints: the number of checkpointed segments (the last segment is kept whole).
        initial_params: the fast weights before the first step (``fmodel.parameters(time=0)`` before the call).
        final_params: the fast weights after the last step (``fmodel.parameters()``).
        losses: the inner loss of every step (detached).
        recomputations: segments recomputed so far by backward passes (normally each checkpointed
            segment once per backward pass).
    """

    steps: int
    every: int
    checkpoints: int
    initial_params: list[Tensor]
    final_params: list[Tensor]
    losses: list[float] = field(default_factory=list)
    recomputations: int = 0


@dataclass
class _Snapshot:
    params: list[Tensor]
    state: list[dict[Any, dict[str, Any]]]
    hyper: list[dict[str, Any]]
    buffers: list[Tensor]
    modes: list[bool]
    steps_taken: int


def _snapshot(fmodel: FunctionalModule, diffopt: DifferentiableOptimizer) -> _Snapshot:
    """Everything a step reads from the fmodel and the optimizer, by reference (tensors are not changed in place
    by the update rules), except the buffers, which modules update in place and are therefore copied; and the training modes."""
    return _Snapshot(
        params=list(fmodel.parameters()),
        state=[{key: dict(value) for key, value in group.items()} for group in diffopt.state],
        hyper=[{key: value for key, value in group.items() if key != "params"} for group in diffopt.param_groups],
        buffers=[b.detach().clone() for b in fmodel.buffers()],
        modes=[m.training for m in fmodel.modules()],
        steps_taken=diffopt._steps_taken,
    )


def _restore(fmodel: FunctionalModule, diffopt: DifferentiableOptimizer, snapshot: _Snapshot) -> None:
    fmodel.update_params(snapshot.params)
    for group, saved in zip(diffopt.state, snapshot.state):
        group.clear()
        group.update({key: dict(value) for key, value in saved.items()})
    for group, hyper in zip(diffopt.param_groups, snapshot.hyper):
        group.update(hyper)
    with torch.no_grad():
        for buffer, saved in zip(fmodel.buffers(), snapshot.buffers):
            buffer.copy_(saved)
    for module, mode in zip(fmodel.modules(), snapshot.modes):
        module.training = mode
    diffopt._steps_taken = snapshot.steps_taken


def _check(fmodel: Any, diffopt: Any, steps: Any, every: Any) -> None:
    if not isinstance(fmodel, FunctionalModule):
        raise TypeError(f"checkpointed_unroll needs the fmodel of higher.innerloop_ctx, got {type(fmodel).__name__}")
    if not isinstance(diffopt, DifferentiableOptimizer):
        raise TypeError(
            f"checkpointed_unroll needs the differentiable optimizer of higher.innerloop_ctx, got "
            f"{type(diffopt).__name__}"
        )
    if diffopt._fmodel is None:
        raise ValueError(
            "the differentiable optimizer is not attached to an fmodel; build both with higher.innerloop_ctx "
            "(or get_diff_optim(..., fmodel=fmodel))."
        )
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every < 1):
        raise ValueError(f"every must be a positive integer (steps per checkpointed segment), got {every!r}")


class _Holder:
    """One saved tensor of a checkpointed segment: kept during the segment, then released."""

    __slots__ = ("segment", "index", "tensor", "shape", "dtype")

    def __init__(self, segment: _Segment, index: int, tensor: Tensor) -> None:
        self.segment = segment
        self.index = index
        self.tensor: Tensor | None = tensor
        self.shape = tensor.shape
        self.dtype = tensor.dtype


class _Segment:
    """Steps ``start..stop-1``, their saved tensors, and the state to recompute them from."""

    def __init__(self, unroll: _Unroll, start: int, stop: int) -> None:
        self.unroll = unroll
        self.start = start
        self.stop = stop
        self.begin = _snapshot(unroll.fmodel, unroll.diffopt)
        self.rng = _rng_states(unroll.devices)
        self.holders: list[_Holder] = []
        self.recomputing = -1  # the next holder to fill while recomputing; -1 when not

    def pack(self, tensor: Tensor) -> _Holder:
        if self.recomputing >= 0:
            index = self.recomputing
            if index >= len(self.holders):
                raise RuntimeError(_MISMATCH.format(start=self.start, stop=self.stop, what="more tensors"))
            holder = self.holders[index]
            if holder.shape != tensor.shape or holder.dtype != tensor.dtype:
                raise RuntimeError(_MISMATCH.format(start=self.start, stop=self.stop, what="different tensors"))
            holder.tensor = tensor
            self.recomputing += 1
            return holder
        holder = _Holder(self, len(self.holders), tensor)
        self.holders.append(holder)
        return holder

    def release(self) -> None:
        for holder in self.holders:
            holder.tensor = None

    def recompute(self) -> None:
        unroll = self.unroll
        if unroll.materialized is not None and unroll.materialized is not self:
            unroll.materialized.release()
        unroll.materialized = None
        fmodel, diffopt = unroll.fmodel, unroll.diffopt
        now = _snapshot(fmodel, diffopt)
        kept = len(unroll.result.losses)
        self.recomputing = 0
        try:
            with torch.random.fork_rng(devices=unroll.devices), torch.enable_grad():
                _set_rng_states(self.rng, unroll.devices)
                _restore(fmodel, diffopt, self.begin)
                with torch.autograd.graph.saved_tensors_hooks(self.pack, _unpack):
                    for t in range(self.start, self.stop):
                        unroll.take_step(t)
            if self.recomputing != len(self.holders):
                raise RuntimeError(_MISMATCH.format(start=self.start, stop=self.stop, what="fewer tensors"))
        finally:
            self.recomputing = -1
            del unroll.result.losses[kept:]
            _restore(fmodel, diffopt, now)
        unroll.result.recomputations += 1
        unroll.materialized = self


_MISMATCH = (
    "checkpointed_unroll: recomputing steps {start}..{stop} saved {what} for backward than the first run; the "
    "step function must compute the same operations for the same step (no Python state that changes between "
    "calls, e.g. an lr_scheduler stepped inside it: use higher.PerStep)."
)


def _unpack(holder: _Holder) -> Tensor:
    if holder.tensor is None:
        holder.segment.recompute()
    tensor = holder.tensor
    assert tensor is not None
    return tensor


def _rng_states(devices: list[int]) -> tuple[Tensor, list[Tensor]]:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _set_rng_states(states: tuple[Tensor, list[Tensor]], devices: list[int]) -> None:
    torch.set_rng_state(states[0])
    for device, state in zip(devices, states[1]):
        torch.cuda.set_rng_state(state, device)


@dataclass
class _Unroll:
    fmodel: FunctionalModule
    diffopt: DifferentiableOptimizer
    take_step: Callable[[int], None]
    result: CheckpointedUnroll
    devices: list[int]
    materialized: _Segment | None = None


def checkpointed_unroll(
    fmodel: FunctionalModule,
    diffopt: DifferentiableOptimizer,
    step_loss: StepLoss,
    steps: int | None = None,
    *,
    batches: Sequence[Any] | None = None,
    every: int | None = None,
) -> CheckpointedUnroll:
    """Take ``steps`` differentiable steps of ``diffopt``, keeping only every ``every``-th state for backward.

    Args:
        fmodel, diffopt: the pair from :func:`higher.innerloop_ctx` (per task or ``tasks=T``).
        step_loss: ``step_loss(fmodel, t)`` returns step ``t``'s inner loss (``t`` = 0, 1, ...);
            with ``batches``, ``step_loss(fmodel, batches[t])``. It is called again for
            recomputed segments, so it must give the same result for the same arguments (see the
            module docstring).
        steps: the number of steps (default: ``len(batches)``).
        batches: the steps' batches (optional), one per step.
        every: steps per checkpointed segment; default ``ceil(sqrt(steps))``. Memory holds
            ``steps / every`` checkpoints plus one segment's graph.

    Returns:
        A :class:`CheckpointedUnroll`; the fmodel holds the final fast weights, connected to
        the initial weights and hyperparameters exactly as after the plain loop.
    """
    if batches is not None:
        batches = list(batches)
        if steps is None:
            steps = len(batches)
        elif steps > len(batches):
            raise ValueError(f"steps={steps} but only {len(batches)} batches were given")
    if steps is None:
        raise ValueError("give steps=... (or batches=[...], one per step)")
    _check(fmodel, diffopt, steps, every)
    every = default_every(steps) if every is None else every
    initial = list(fmodel.parameters())
    losses: list[float] = []
    result = CheckpointedUnroll(steps, every, 0, initial, initial, losses)

    def take_step(t: int) -> None:
        loss = step_loss(fmodel, t if batches is None else batches[t])
        diffopt.step(loss)
        losses.append(float(loss.detach().sum()))

    devices = sorted({p.device.index or 0 for p in initial if p.device.type == "cuda"})
    unroll = _Unroll(fmodel, diffopt, take_step, result, devices)
    tracked = fmodel.track_higher_grads
    fmodel.track_higher_grads = False  # keep only the latest fast weights in the history
    try:
        boundaries = list(range(0, steps, every))
        for index, start in enumerate(boundaries):
            stop = min(start + every, steps)
            if index == len(boundaries) - 1:
                for t in range(start, stop):  # the last segment: backward starts here, keep its graph
                    take_step(t)
            else:
                segment = _Segment(unroll, start, stop)
                with torch.autograd.graph.saved_tensors_hooks(segment.pack, _unpack):
                    for t in range(start, stop):
                        take_step(t)
                segment.release()
                result.checkpoints += 1
    finally:
        fmodel.track_higher_grads = tracked
    result.final_params = list(fmodel.parameters())
    return result
