"""Checkpointed unrolls: exact meta-gradients of a long inner loop in O(T/k + k) memory.

A differentiable unroll of ``T`` steps keeps, for the backward pass, every step's fast weights,
optimizer state and the activations of its forward and inner backward: memory grows linearly
with ``T``. :func:`checkpointed_unroll` runs the same ``T`` steps but keeps only the state at
every ``every``-th step (fast weights, optimizer state, buffers, the step counter and the random
number generator state) and recomputes each segment of ``every`` steps from its checkpoint when
the backward pass reaches it (Griewank's checkpointing, "Achieving logarithmic growth of temporal
and spatial complexity in reverse automatic differentiation", 1992). The cost is one extra
forward pass of the unroll; the recomputed steps give the same values, so ``loss.backward()`` on
any loss of the final fast weights gives the full unroll's meta-gradients and hypergradients, up
to the order in which gradient contributions are summed (in float64 they agree to about 1e-14)::

    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, override={"lr": [lr]}) as (fmodel, diffopt):
        higher.checkpointed_unroll(fmodel, diffopt, lambda fmodel, t: F.mse_loss(fmodel(xs[t]), ys[t]), steps=1000)
        F.mse_loss(fmodel(x_val), y_val).backward()   # meta-gradients reach model and lr

How: each checkpointed segment becomes one autograd node (a ``torch.autograd.Function``). The
steps run from detached copies of the segment's starting fast weights and optimizer state; their
graph is dropped at once and only the end state is kept, as the node's outputs. The node's inputs
are the starting tensors plus every tensor from outside the segment that the steps read: found
by walking the segment's graph before dropping it (leaf tensors such as ``override``
hyperparameters, model parameters, data that requires grad; and non-leaf hyperparameter tensors
in the optimizer's groups, ``PerStep`` lists or ``inputs=[...]``). Its backward restores the
segment's start (fast weights, optimizer state, buffers, training modes, step counter, random
number generator), runs the steps again with the graph, and differentiates them with
``torch.autograd.grad``. Memory: one checkpoint per segment plus one segment's graph; the graph
of the other steps is not kept at all (not even its nodes, which in a deep network's unroll weigh
as much as the saved tensors). The last segment is not checkpointed (backward starts there).
``torch.utils.checkpoint`` is not used: its non-reentrant form keeps every node and recomputes
the segment whenever a saved tensor is unpacked during the segment's own forward pass, which the
inner ``autograd.grad`` of every step does (quadratic cost).

What the step function may do: anything deterministic given the fmodel, the optimizer and the
step index: draw random numbers (the generator state is restored for the recomputation), use
``PerStep`` schedules, ``override`` tensors, per-parameter values, BatchNorm (the fmodel's
buffers are restored), task-batched fmodels (``tasks=T``). It must not change Python state that
the recomputation cannot restore: a ``torch.optim.lr_scheduler`` stepping inside it would be
stepped again (use :class:`higher.PerStep` for schedules), and appending to lists happens twice
for recomputed segments.

First derivatives only: a backward pass with ``create_graph=True`` through a checkpointed segment
(a second derivative of the meta-loss) raises an error instead of missing the segment's terms.
An exception (or ``KeyboardInterrupt``) inside the step function leaves the fmodel and the
optimizer at the start of the interrupted segment (``diffopt._steps_taken`` steps done), still
connected to the initial weights, so a loop can resume from there.

The fmodel's history: during the unroll only the latest fast weights are kept (keeping them all
is exactly the memory this avoids); afterwards ``fmodel.parameters(time=0)`` is the final fast
weights, and the initial ones are in the returned :class:`CheckpointedUnroll`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor

from .optim import DifferentiableOptimizer, PerStep
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
        group["params"] = [None] * len(group["params"])  # step() fills them; do not keep a recomputed graph
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
    if not torch.is_grad_enabled():
        raise RuntimeError(
            "checkpointed_unroll was called under torch.no_grad(): its steps would not be differentiable. "
            "Call it outside torch.no_grad() (for a loop without meta-gradients, use diffopt.step in a loop "
            "with track_higher_grads=False)."
        )
    if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every < 1):
        raise ValueError(f"every must be a positive integer (steps per checkpointed segment), got {every!r}")


def _tensors_in(value: Any) -> list[Tensor]:
    """The tensors in a hyperparameter value (numbers, tensors, tuples, PerParameter, PerStep lists)."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, PerStep):
        value = value.values
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors_in(v)]
    return []


def _next_sequence_number() -> int:
    probe = torch.zeros((), requires_grad=True) * 1
    return probe.grad_fn._sequence_nr()  # type: ignore[union-attr]


class _SegmentFunction(torch.autograd.Function):
    """Steps ``start..stop-1`` as one autograd node: inputs the state at ``start`` and the tensors the steps read,
    outputs the state at ``stop``; backward runs the steps again and differentiates that run."""

    @staticmethod
    def forward(ctx: Any, segment: _Segment, *inputs: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.segment = segment
        ctx.save_for_backward(*inputs)
        outputs = segment.outputs
        segment.outputs = []
        return tuple(outputs)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if torch.is_grad_enabled():  # create_graph=True: the recomputation below has no graph of its own
            raise RuntimeError(
                "checkpointed_unroll gives first derivatives only: a backward pass with create_graph=True "
                "(second derivatives, e.g. a Hessian-vector product of the meta-loss or differentiating a "
                "hypergradient again) would silently miss the checkpointed segments' terms. Use a plain "
                "unroll (diffopt.step in a loop) for higher-order derivatives."
            )
        segment: _Segment = ctx.segment
        inputs = ctx.saved_tensors
        result = segment.recompute(list(inputs), list(grads))
        return (None, *result)


class _Segment:
    """One checkpointed segment: the state to start from and how to run and differentiate its steps."""

    def __init__(self, unroll: _Unroll, start: int, stop: int) -> None:
        self.unroll = unroll
        self.start = start
        self.stop = stop
        self.rng = _rng_states(unroll.devices)
        self.outputs: list[Tensor] = []
        self.output_slots: list[tuple[str, Any]] = []

    def _install(self, starts: list[Tensor]) -> None:
        """Restore the state at ``start`` with its tensors replaced by ``starts`` (detached leaves)."""
        begin = self.begin
        params = list(begin.params)
        state = [{k: dict(v) for k, v in g.items()} for g in begin.state]
        for (kind, where), tensor in zip(self.in_slots, starts):
            if kind == "param":
                params[where] = tensor
            else:
                g, k, key = where
                state[g][k][key] = tensor
        _restore(
            self.unroll.fmodel,
            self.unroll.diffopt,
            _Snapshot(params, state, begin.hyper, begin.buffers, begin.modes, begin.steps_taken),
        )

    def _run(self) -> None:
        for t in range(self.start, self.stop):
            self.unroll.take_step(t)

    def forward(self) -> list[Tensor]:
        """Run the steps; return the inputs of the segment node (start tensors, then the external tensors read)."""
        unroll = self.unroll
        fmodel, diffopt = unroll.fmodel, unroll.diffopt
        self.begin = _snapshot(fmodel, diffopt)
        kept = len(unroll.result.losses)
        try:
            return self._forward()
        except BaseException:
            # An error or KeyboardInterrupt inside the segment: leave the fmodel and the optimizer at
            # the segment's start, connected to the graph (not at the detached copies being stepped).
            del unroll.result.losses[kept:]
            _restore(fmodel, diffopt, self.begin)
            raise

    def _forward(self) -> list[Tensor]:
        unroll = self.unroll
        fmodel, diffopt = unroll.fmodel, unroll.diffopt
        self.in_slots = _slots(self.begin.params, self.begin.state)
        starts = [_at(self.begin.params, self.begin.state, slot) for slot in self.in_slots]
        copies = [t.detach().requires_grad_(t.requires_grad) for t in starts]
        self._install(copies)
        first = _next_sequence_number()
        # This run only needs values (backward recomputes the segment with the full graph), so the
        # inner gradients are taken without a graph, as in first-order mode. They enter the update
        # as fresh leaves that require grad: every tensor derived from them requires grad exactly
        # when it would in the full run, and the graph still reaches every tensor the steps read
        # (through the losses and the updates), which is how the external ones are found.
        marked: list[Tensor] = []
        user_callback = diffopt._grad_callback

        def mark(grads: tuple[Tensor | None, ...]) -> tuple[Tensor | None, ...]:
            leaves = tuple(None if g is None else g.detach().requires_grad_() for g in grads)
            marked.extend(g for g in leaves if g is not None)
            return leaves if user_callback is None else tuple(user_callback(leaves))

        losses: list[Tensor] = []
        first_order = diffopt._first_order
        diffopt._first_order = diffopt._track_higher_grads  # no graph through the inner gradients
        try:
            with torch.enable_grad():
                for t in range(self.start, self.stop):
                    losses.append(unroll.take_step(t, mark if diffopt._track_higher_grads else None))
        finally:
            diffopt._first_order = first_order
        params, state = list(fmodel.parameters()), diffopt.state
        self.out_slots = [slot for slot in _slots(params, state) if _at(params, state, slot).requires_grad]
        outputs = [_at(params, state, slot) for slot in self.out_slots]
        externals = _externals(outputs + losses, copies + marked, first, unroll.known_tensors(), self.start, self.stop)
        self.external_count = len(externals)
        # Everything else (tensors that need no gradient, step counters) stays as the run left it, detached.
        fmodel.update_params([p.detach().requires_grad_(p.requires_grad) for p in params])
        diffopt._detach_state()
        self.outputs = [o.detach() for o in outputs]
        return starts + externals

    def install_outputs(self, outputs: Sequence[Tensor]) -> None:
        fmodel, diffopt = self.unroll.fmodel, self.unroll.diffopt
        params = list(fmodel.parameters())
        for (kind, where), tensor in zip(self.out_slots, outputs):
            if kind == "param":
                params[where] = tensor
            else:
                g, k, key = where
                diffopt.state[g][k][key] = tensor
        fmodel.update_params(params)

    def recompute(self, inputs: list[Tensor], grads: list[Tensor]) -> list[Tensor | None]:
        unroll = self.unroll
        fmodel, diffopt = unroll.fmodel, unroll.diffopt
        now = _snapshot(fmodel, diffopt)
        kept = len(unroll.result.losses)
        count = len(inputs) - self.external_count
        starts, externals = inputs[:count], inputs[count:]
        tracked = fmodel.track_higher_grads
        fmodel.track_higher_grads = False  # the history keeps only the latest entry while recomputing
        try:
            with torch.random.fork_rng(devices=unroll.devices), torch.enable_grad():
                _set_rng_states(self.rng, unroll.devices)
                copies = [t.detach().requires_grad_(t.requires_grad) for t in starts]
                self._install(copies)
                self._run()
                params, state = list(fmodel.parameters()), diffopt.state
                outputs = [_at(params, state, slot) for slot in self.out_slots]
                pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad and g is not None]
                wrt = [(i, x) for i, x in enumerate(copies + externals) if x.requires_grad]
                computed: Sequence[Tensor | None] = [None] * len(wrt)
                if pairs and wrt:
                    computed = torch.autograd.grad(
                        [o for o, _ in pairs], [x for _, x in wrt], [g for _, g in pairs], allow_unused=True
                    )
        finally:
            del unroll.result.losses[kept:]
            _restore(fmodel, diffopt, now)
            fmodel.track_higher_grads = tracked
        unroll.result.recomputations += 1
        result: list[Tensor | None] = [None] * len(inputs)
        for (i, _), g in zip(wrt, computed):
            result[i] = g
        return result


Slot = tuple[str, Any]


def _slots(params: list[Tensor], state: list[Any]) -> list[Slot]:
    """Where the floating-point tensors of the fast weights and the optimizer state are."""
    slots: list[Slot] = [("param", i) for i, p in enumerate(params) if isinstance(p, Tensor)]
    for g, group in enumerate(state):
        for k, st in group.items():
            for key, value in st.items():
                if isinstance(value, Tensor) and value.is_floating_point():
                    slots.append(("state", (g, k, key)))
    return slots


def _at(params: list[Tensor], state: list[Any], slot: Slot) -> Tensor:
    kind, where = slot
    if kind == "param":
        return params[where]
    g, k, key = where
    return state[g][k][key]


def _externals(
    outputs: list[Tensor], copies: list[Tensor], first: int, known: dict[Any, Tensor], start: int, stop: int
) -> list[Tensor]:
    """The tensors outside the segment that its outputs depend on (found by walking the segment's graph)."""
    mine = {id(c) for c in copies}
    found: dict[int, Tensor] = {}
    seen: set[Any] = set()
    stack = [o.grad_fn for o in outputs if o.grad_fn is not None]
    leaf_type = _accumulate_grad_type()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if type(node) is leaf_type:
            variable = cast(Any, node).variable
            if id(variable) not in mine:
                found.setdefault(id(variable), variable)
            continue
        if node._sequence_nr() < first:  # made before the segment: an external non-leaf tensor
            tensor = known.get(node)
            if tensor is None:
                raise ValueError(
                    f"checkpointed_unroll: steps {start}..{stop - 1} depend on a tensor computed before the unroll "
                    f"(its graph node is {type(node).__name__}) that the function cannot recompute from: pass it as "
                    f"inputs=[...] (e.g. the hyperparameter tensor your step function or PerStep callable reads), "
                    f"or compute it inside the step function from leaf tensors."
                )
            found.setdefault(id(tensor), tensor)
            continue
        for next_node, _ in node.next_functions:
            if next_node is not None and next_node not in seen:
                stack.append(next_node)
    return list(found.values())


def _accumulate_grad_type() -> type:
    return type(torch.zeros((), requires_grad=True).clone().grad_fn.next_functions[0][0])  # type: ignore[union-attr]


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
    take_step: Callable[..., Tensor]
    result: CheckpointedUnroll
    devices: list[int]
    inputs: list[Tensor]

    def known_tensors(self) -> dict[Any, Tensor]:
        """Non-leaf tensors the steps may read, by graph node: hyperparameters and ``inputs``."""
        tensors = list(self.inputs)
        for group in self.diffopt.param_groups:
            for key, value in group.items():
                if key != "params":
                    tensors += _tensors_in(value)
        return {t.grad_fn: t for t in tensors if t.grad_fn is not None}


def checkpointed_unroll(
    fmodel: FunctionalModule,
    diffopt: DifferentiableOptimizer,
    step_loss: StepLoss,
    steps: int | None = None,
    *,
    batches: Sequence[Any] | None = None,
    every: int | None = None,
    inputs: Sequence[Tensor] | Tensor = (),
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
        inputs: non-leaf tensors (a sequence, or one tensor) that the step function reads from outside (e.g.
            ``lr = log_lr.exp()`` computed before the unroll and used in the loss or in a ``PerStep``
            callable). Leaf tensors and the optimizer's own hyperparameter tensors are found
            automatically; a missing one raises an error naming this argument.

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
    inputs = [inputs] if isinstance(inputs, Tensor) else list(inputs)  # one tensor is not its elements
    for i, tensor in enumerate(inputs):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"inputs[{i}] must be a tensor (one the step function reads), got {type(tensor).__name__}")
    every = default_every(steps) if every is None else every
    initial = list(fmodel.parameters())
    losses: list[float] = []
    result = CheckpointedUnroll(steps, every, 0, initial, initial, losses)

    def take_step(t: int, grad_callback: Callable[..., Any] | None = None) -> Tensor:
        loss = step_loss(fmodel, t if batches is None else batches[t])
        diffopt.step(loss, grad_callback=grad_callback)
        losses.append(float(loss.detach().sum()))
        return loss

    devices = sorted({p.device.index or 0 for p in initial if p.device.type == "cuda"})
    unroll = _Unroll(fmodel, diffopt, take_step, result, devices, inputs)
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
                node_inputs = segment.forward()
                segment.install_outputs(_SegmentFunction.apply(segment, *node_inputs))
                result.checkpoints += 1
    finally:
        fmodel.track_higher_grads = tracked
    result.final_params = list(fmodel.parameters())
    return result
