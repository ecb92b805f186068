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
        higher.checkpointed_unroll(fmodel, diffopt, lambda fm, t: F.mse_loss(fm(xs[t]), ys[t]), steps=1000)
        F.mse_loss(fmodel(x_val), y_val).backward()   # meta-gradients reach model and lr

How: each checkpointed segment becomes one autograd node (a ``torch.autograd.Function``). The
steps run from detached copies of the segment's starting fast weights and optimizer state; their
graph is dropped at once and only the end state is kept, as the node's outputs. The node's inputs
are the starting tensors plus every tensor from outside the segment that the steps read: found
by walking the segment's graph before dropping it (leaf tensors such as ``override``
hyperparameters, model parameters, data that requires grad; the fast weights from before the
unroll; and non-leaf hyperparameter tensors in the optimizer's groups, ``PerStep`` lists or
``inputs=[...]``). Its backward restores the segment's start (fast weights, optimizer state,
buffers, training modes, step counter, random number generator), runs the steps again with the
graph, and differentiates them with ``torch.autograd.grad``. Memory: one checkpoint per segment
plus one segment's graph; the graph of the other steps is not kept at all (not even its nodes,
which in a deep network's unroll weigh as much as the saved tensors). The last segment is not
checkpointed (backward starts there). ``torch.utils.checkpoint`` is not used: its non-reentrant
form keeps every node and recomputes the segment whenever a saved tensor is unpacked during the
segment's own forward pass, which the inner ``autograd.grad`` of every step does (quadratic cost).

The steps run on a private copy of the fmodel and of the optimizer (same module, buffers' values,
training modes, hooks and attributes registered on the fmodel; same hyperparameters, callbacks and
step hooks), in the forward pass and in the recomputation; the fmodel and optimizer given to the
function receive the final state at the end. The reason: a segment node must keep what it
recomputes with for as long as the graph lives, and if that were the user's fmodel, which holds
the final fast weights, whose graph holds the node, the loop would be a reference cycle through
the autograd graph's C++ side, which Python's garbage collector cannot see: every inner loop
would leak. The private copy holds only tensors from before the unroll between steps, so there
is no cycle, whether the meta-loss is backpropagated (``backward``, ``autograd.grad``,
``retain_graph=True``) or never. So the step function must compute the loss from the fmodel it is
called with, not from the one given to :func:`checkpointed_unroll` (a closure over that one raises
an error while the unroll runs, instead of silently reading stale weights). What still leaks: the
nodes keep the step function, the ``grad_callback``, the optimizer's step hooks and ``PerStep``
callables alive as long as the graph; if one of these refers to something that holds the
unroll's later tensors (the optimizer given to the function, whose state becomes the final one;
the returned :class:`CheckpointedUnroll`, whose ``final_params`` are the final fast weights; a list
the step function appends its outputs to), that is the same cycle, and the inner loop is never
freed. Read hyperparameters from tensors you hold, not from ``diffopt.param_groups``.

What the step function may do: anything deterministic given the fmodel, the optimizer and the
step index: draw random numbers (the generator state is restored for the recomputation), use
``PerStep`` schedules, ``override`` tensors, per-parameter values, BatchNorm (the fmodel's
buffers are restored), task-batched fmodels (``tasks=T``), the initial fast weights
(``fm.parameters(time=0)``, e.g. a proximal term as in iMAML, with exact meta-gradients through
them). It must not change Python state that the recomputation cannot restore: a
``torch.optim.lr_scheduler`` stepping inside it would be stepped again (use
:class:`higher.PerStep` for schedules), and appending to lists happens twice for recomputed
segments.

First derivatives only: a backward pass with ``create_graph=True`` through a checkpointed segment
(a second derivative of the meta-loss) raises an error instead of missing the segment's terms.
An exception (or ``KeyboardInterrupt``) inside the step function leaves the fmodel and the
optimizer at the start of the interrupted segment (``diffopt._steps_taken`` steps done), still
connected to the initial weights, so a loop can resume from there.

The fmodel's history: the fast weights of the steps in between are not kept (keeping them all
is exactly the memory this avoids). During the unroll and after it, ``parameters(time=...)``
gives the entries from before the unroll (``time=0``: the initial fast weights) and the latest
ones; another index in between raises :class:`higher.patch.TimeIndexError`, and later steps
count on from there (after ``T`` checkpointed steps from the start, ``time=T`` is the final
weights). With ``track_higher_grads=False`` only the latest are kept, as in a plain loop.
"""

from __future__ import annotations

import math
import weakref
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor

from .optim import DifferentiableOptimizer, PerStep
from .patch import _HOOK_DICTS, FunctionalModule, make_functional

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
        initial_params: the fast weights before the first step (``fmodel.parameters()`` before the call).
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
class _State:
    """Everything a step reads from the fmodel and the optimizer, at one point of the unroll."""

    entry: list[Tensor]  # the fast weights of the whole model
    state: list[dict[Any, dict[str, Any]]]
    hyper: list[dict[str, Any]]
    buffers: list[Tensor]
    modes: list[bool]
    steps_taken: int


_CLOSURE_ERROR = (
    "checkpointed_unroll: the step function used the fmodel (or the optimizer's step) given to checkpointed_unroll, "
    "e.g. through a closure, instead of the fmodel it is called with. The steps run on a private copy of the fmodel "
    "(it is run again during the backward pass, and the unroll's graph must not keep your fmodel alive), so your "
    "fmodel still holds the weights from before the unroll: the loss would be silently wrong. Compute the loss from "
    "the first argument: step_loss = lambda fm, t: loss_fn(fm(x[t]), y[t])."
)


class _InUse:
    """Stands for the history of the fmodel given to :func:`checkpointed_unroll` while its steps run on the
    private copy: any use of that fmodel's fast weights by the step function raises instead of reading stale ones."""

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(_CLOSURE_ERROR)

    __getitem__ = __setitem__ = __len__ = __iter__ = __bool__ = __contains__ = append = _refuse


def _copy_buffers(targets: Sequence[Tensor], sources: Sequence[Tensor]) -> None:
    """Give the user's buffers the values of ``sources`` in place, as a module's own update does (BatchNorm updates
    its running statistics without bumping their version counter: graphs that saved them stay usable); a buffer
    computed with a graph is the same tensor (see _buffer_copies), left as it is."""
    for target, source in zip(targets, sources):
        if target is not source:
            target.data.copy_(source)


def _buffer_copies(buffers: Sequence[Tensor]) -> list[Tensor]:
    """Copies of the buffers' values (modules update them in place); one computed with a graph is the same tensor
    (a value the steps read, which they never update in place)."""
    return [b if b.requires_grad else b.detach().clone() for b in buffers]


def _set_modes(core: Any, modes: Sequence[bool]) -> None:
    for replica, mode in zip(core.replicas, modes):
        replica.__dict__["training"] = mode


def _put_state(diffopt: DifferentiableOptimizer, saved: _State) -> None:
    """Set the optimizer's state, hyperparameters and step counter to ``saved``'s."""
    for group, state in zip(diffopt.state, saved.state):
        group.clear()
        group.update({key: dict(value) for key, value in state.items()})
    for group, hyper in zip(diffopt.param_groups, saved.hyper):
        group.update(hyper)
        group["params"] = [None] * len(group["params"])  # step() fills them
    diffopt._steps_taken = saved.steps_taken


def _private_fmodel(fmodel: FunctionalModule) -> FunctionalModule:
    """A new fmodel (root) of the same module with the same buffers' values, modes, assigned attributes and hooks as
    ``fmodel``'s, and no fast weights yet."""
    core = cast(Any, fmodel._hg_core)
    root = make_functional(core.module, _view_base=core.view_base)
    mine = cast(Any, root._hg_core)
    if core.batched:
        from .batched import _batch_core

        _batch_core(mine, core.tasks, core.randomness)
    mine.track_higher_grads = core.track_higher_grads
    mine.buffers = _buffer_copies(core.buffers)
    _set_modes(mine, [replica.training for replica in core.replicas])
    for (index, name), value in core.overrides.items():  # attributes assigned through the fmodel
        mine.replicas[index].__dict__[name] = value
        mine.overrides[(index, name)] = value
    # Hooks registered on the fmodel's views (and attributes set on them) apply to the private one too.
    for index, ref in list(core.views.items()):
        view = ref()
        if view is None:
            continue
        path = core.paths[index]
        twin = root.get_submodule(path) if path else root
        theirs, ours = view.__dict__, twin.__dict__
        for key, value in theirs.items():
            if key in _HOOK_DICTS:
                if value:
                    ours[key] = value.copy()
            elif key == "_is_full_backward_hook" or (key not in ours and not key.startswith("_hg_")):
                ours[key] = value
    mine.view_hooks = core.view_hooks
    return root


def _view_at(root: FunctionalModule, path: str) -> FunctionalModule:
    return cast(FunctionalModule, root.get_submodule(path)) if path else root


def _private_optimizer(diffopt: DifferentiableOptimizer, fmodel: FunctionalModule) -> DifferentiableOptimizer:
    """A copy of ``diffopt`` (same class, hyperparameters, callbacks and hooks; its own groups and state) that
    updates ``fmodel``."""
    opt = object.__new__(type(diffopt))
    opt.__dict__.update(diffopt.__dict__)
    opt.param_groups = [dict(group) for group in diffopt.param_groups]
    opt.state = cast(Any, [defaultdict(dict, {k: dict(v) for k, v in group.items()}) for group in diffopt.state])
    opt._fmodel = fmodel
    return opt


class _Shadow:
    """The private fmodel and optimizer that the steps run on, forward and during the backward pass.

    The segment nodes refer to it, so it must never hold a tensor computed by the unroll after the node is made
    (outside a step): that would be a reference cycle through the autograd graph, which Python's garbage collector
    cannot see. Between steps it is :meth:`park` ed at the state from before the unroll.
    """

    def __init__(self, fmodel: FunctionalModule, diffopt: DifferentiableOptimizer) -> None:
        core = fmodel._hg_core
        self.tracking = core.track_higher_grads
        # The history from before the unroll (its own lists: fmodel.to() converts entries in place).
        self.prefix: list[list[Tensor] | None] = [None if entry is None else list(entry) for entry in core.history]
        self.root = _private_fmodel(fmodel)  # keeps the views alive
        self.core = cast(Any, self.root._hg_core)
        self.view = _view_at(self.root, cast(str, fmodel._hg_path))
        attached = cast(FunctionalModule, diffopt._fmodel)
        self.opt = _private_optimizer(diffopt, _view_at(self.root, cast(str, attached._hg_path)))
        self.core.history = self.history_at(0, list(cast(list[Tensor], core.latest)))
        self.start = self.snapshot()

    def history_at(self, done: int, entry: list[Tensor]) -> list[list[Tensor] | None]:
        """The history after ``done`` steps of the unroll, ``entry`` the latest: the entries from before the unroll,
        then those of the steps in between, not kept (``None``), then ``entry``."""
        if not self.tracking:
            return [entry]
        if done == 0:
            return [*self.prefix[:-1], entry]
        return [*self.prefix, *([None] * (done - 1)), entry]

    def trim(self) -> None:
        """After a step: drop the previous fast weights from the history, unless they are from before the unroll."""
        history = self.core.history
        previous = len(history) - 2
        if self.tracking and previous >= len(self.prefix):
            history[previous] = None

    def snapshot(self) -> _State:
        core, opt = self.core, self.opt
        return _State(
            entry=list(core.latest),
            state=[{key: dict(value) for key, value in group.items()} for group in opt.state],
            hyper=[{key: value for key, value in group.items() if key != "params"} for group in opt.param_groups],
            buffers=_buffer_copies(core.buffers),
            modes=[replica.training for replica in core.replicas],
            steps_taken=opt._steps_taken,
        )

    def restore(self, saved: _State, history: list[list[Tensor] | None]) -> None:
        core = self.core
        core.history = history
        _put_state(self.opt, saved)
        # New tensors, never written in place: the graph of the steps run so far may have saved the current ones.
        core.buffers = [b if b.requires_grad else b.clone() for b in saved.buffers]
        _set_modes(core, saved.modes)
        if not core.batched:
            core.realize()  # the replicas let go of the tensors they held

    def park(self) -> None:
        """Back to the state from before the unroll (tensors the segment nodes may refer to without a cycle)."""
        self.restore(self.start, self.history_at(0, self.start.entry))

    def hand_over(
        self, fmodel: FunctionalModule, diffopt: DifferentiableOptimizer, saved: _State, done: int, finished: bool
    ) -> None:
        """Give the fmodel and the optimizer of the user the state ``saved``, ``done`` steps into the unroll."""
        core = cast(Any, fmodel._hg_core)
        core.history = [None if entry is None else list(entry) for entry in self.history_at(done, saved.entry)]
        _put_state(diffopt, saved)
        if finished:  # as after diffopt.step: the groups hold the latest fast weights
            for group, mine in zip(diffopt.param_groups, self.opt.param_groups):
                group["params"] = list(mine["params"])
        _copy_buffers(core.buffers, saved.buffers)
        _set_modes(core, saved.modes)
        for key, value in self.core.overrides.items():  # attributes the step function assigned (fm.layer.p = ...)
            if core.overrides.get(key, self) is not value:
                index, name = key
                core.replicas[index].__dict__[name] = value
                core.overrides[key] = value


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
    if diffopt._fmodel._hg_core is not fmodel._hg_core:
        raise ValueError(
            "the differentiable optimizer updates another fmodel than the one given to checkpointed_unroll; pass "
            "the pair that higher.innerloop_ctx made together (or get_diff_optim(..., fmodel=fmodel))."
        )
    if fmodel._hg_path is None or diffopt._fmodel._hg_path is None:
        raise TypeError(
            "checkpointed_unroll needs the fmodel (or the view of one of its submodules), not a container made from "
            "its modules (e.g. a slice of a Sequential)."
        )
    if fmodel._hg_core.latest is None:
        raise ValueError("the fmodel has no fast weights yet; give it its initial weights first (params=[...]).")
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

    def __init__(self, unroll: _Unroll, start: int, stop: int, begin: _State) -> None:
        self.unroll = unroll
        self.start = start
        self.stop = stop
        self.begin = begin
        self.rng = _rng_states(unroll.devices)
        self.outputs: list[Tensor] = []

    def _install(self, starts: list[Tensor]) -> None:
        """Restore the state at ``start`` with its tensors replaced by ``starts`` (detached leaves)."""
        begin = self.begin
        entry = list(begin.entry)
        state = [{k: dict(v) for k, v in g.items()} for g in begin.state]
        for (kind, where), tensor in zip(self.in_slots, starts):
            if kind == "param":
                entry[where] = tensor
            else:
                g, k, key = where
                state[g][k][key] = tensor
        shadow = self.unroll.shadow
        saved = _State(entry, state, begin.hyper, begin.buffers, begin.modes, begin.steps_taken)
        shadow.restore(saved, shadow.history_at(self.start, entry))

    def forward(self) -> list[Tensor]:
        """Run the steps; return the inputs of the segment node (start tensors, then the external tensors read)."""
        unroll = self.unroll
        shadow = unroll.shadow
        opt = shadow.opt
        self.in_slots = _slots(self.begin.entry, self.begin.state)
        starts = [_at(self.begin.entry, self.begin.state, slot) for slot in self.in_slots]
        copies = [t.detach().requires_grad_(t.requires_grad) for t in starts]
        self._install(copies)
        first = _next_sequence_number()
        # This run only needs values (backward recomputes the segment with the full graph), so the
        # inner gradients are taken without a graph, as in first-order mode. They enter the update
        # as fresh leaves that require grad: every tensor derived from them requires grad exactly
        # when it would in the full run, and the graph still reaches every tensor the steps read
        # (through the losses and the updates), which is how the external ones are found.
        marked: list[Tensor] = []
        user_callback = opt._grad_callback

        def mark(grads: tuple[Tensor | None, ...]) -> tuple[Tensor | None, ...]:
            leaves = tuple(None if g is None else g.detach().requires_grad_() for g in grads)
            marked.extend(g for g in leaves if g is not None)
            return leaves if user_callback is None else tuple(user_callback(leaves))

        losses: list[Tensor] = []
        first_order = opt._first_order
        opt._first_order = opt._track_higher_grads  # no graph through the inner gradients
        try:
            with torch.enable_grad():
                for t in range(self.start, self.stop):
                    losses.append(unroll.take_step(t, mark if opt._track_higher_grads else None))
        finally:
            opt._first_order = first_order
        entry, state = list(shadow.core.latest), opt.state
        self.out_slots = [slot for slot in _slots(entry, state) if _at(entry, state, slot).requires_grad]
        outputs = [_at(entry, state, slot) for slot in self.out_slots]
        externals = _externals(outputs + losses, copies + marked, first, unroll.known_tensors(), self.start, self.stop)
        self.external_count = len(externals)
        # Everything else (tensors that need no gradient, step counters) stays as the run left it, detached.
        shadow.core.history[-1] = [p.detach().requires_grad_(p.requires_grad) for p in entry]
        opt._detach_state()
        self.outputs = [o.detach() for o in outputs]
        return starts + externals

    def install_outputs(self, outputs: Sequence[Tensor]) -> None:
        shadow = self.unroll.shadow
        entry = list(shadow.core.latest)
        for (kind, where), tensor in zip(self.out_slots, outputs):
            if kind == "param":
                entry[where] = tensor
            else:
                g, k, key = where
                shadow.opt.state[g][k][key] = tensor
        shadow.core.history[-1] = entry

    def recompute(self, inputs: list[Tensor], grads: list[Tensor]) -> list[Tensor | None]:
        unroll = self.unroll
        shadow = unroll.shadow
        # Normally the shadow is parked here; a backward pass run by a step function finds it mid-unroll.
        now, history = shadow.snapshot(), list(shadow.core.history)
        count = len(inputs) - self.external_count
        starts, externals = inputs[:count], inputs[count:]
        try:
            with torch.random.fork_rng(devices=unroll.devices), torch.enable_grad():
                _set_rng_states(self.rng, unroll.devices)
                copies = [t.detach().requires_grad_(t.requires_grad) for t in starts]
                self._install(copies)
                for t in range(self.start, self.stop):
                    unroll.take_step(t, record=False)
                entry, state = list(shadow.core.latest), shadow.opt.state
                outputs = [_at(entry, state, slot) for slot in self.out_slots]
                pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad and g is not None]
                wrt = [(i, x) for i, x in enumerate(copies + externals) if x.requires_grad]
                computed: Sequence[Tensor | None] = [None] * len(wrt)
                if pairs and wrt:
                    computed = torch.autograd.grad(
                        [o for o, _ in pairs], [x for _, x in wrt], [g for _, g in pairs], allow_unused=True
                    )
        finally:
            shadow.restore(now, history)
        result = unroll.result()
        if result is not None:
            result.recomputations += 1
        gradients: list[Tensor | None] = [None] * len(inputs)
        for (i, _), g in zip(wrt, computed):
            gradients[i] = g
        return gradients


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
    """What the segment nodes share. Nothing here may refer to the user's fmodel, optimizer or result (see _Shadow)."""

    shadow: _Shadow
    take_step: Callable[..., Tensor]
    result: weakref.ReferenceType[CheckpointedUnroll]
    devices: list[int]
    inputs: list[Tensor]

    def known_tensors(self) -> dict[Any, Tensor]:
        """Non-leaf tensors the steps may read, by graph node: hyperparameters, ``inputs``, the fast weights from
        before the unroll (``fmodel.parameters(time=0)``) and buffers computed with a graph."""
        tensors = list(self.inputs)
        for group in self.shadow.opt.param_groups:
            for key, value in group.items():
                if key != "params":
                    tensors += _tensors_in(value)
        for entry in self.shadow.prefix:
            tensors += entry or []
        tensors += [b for b in self.shadow.core.buffers if b.requires_grad]
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
        step_loss: ``step_loss(fm, t)`` returns step ``t``'s inner loss (``t`` = 0, 1, ...);
            with ``batches``, ``step_loss(fm, batches[t])``. ``fm`` is a private copy of
            ``fmodel`` holding the current fast weights: compute the loss from it, not from
            ``fmodel`` (which raises an error while the unroll runs). ``fm.parameters(time=0)``
            are the initial fast weights (e.g. for a proximal term, as in iMAML), with exact
            meta-gradients through them; the fast weights of the steps in between are not kept
            (``time=1..t-1`` raises :class:`higher.patch.TimeIndexError`). The function is called
            again for recomputed segments, so it must give the same result for the same arguments
            (see the module docstring).
        steps: the number of steps (default: ``len(batches)``).
        batches: the steps' batches (optional), one per step.
        every: steps per checkpointed segment; default ``ceil(sqrt(steps))``. Memory holds
            ``steps / every`` checkpoints plus one segment's graph.
        inputs: non-leaf tensors (a sequence, or one tensor) that the step function reads from outside (e.g.
            ``lr = log_lr.exp()`` computed before the unroll and used in the loss or in a ``PerStep``
            callable). Leaf tensors, the optimizer's own hyperparameter tensors and the fast weights
            from before the unroll are found automatically; a missing one raises an error naming this
            argument.

    Returns:
        A :class:`CheckpointedUnroll`; the fmodel holds the final fast weights, connected to
        the initial weights and hyperparameters exactly as after the plain loop, and the optimizer
        the final state. The fmodel's history keeps the entries from before the call (``time=0``:
        the initial weights) and the final weights, not those in between.
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
    shadow = _Shadow(fmodel, diffopt)
    view, opt = shadow.view, shadow.opt

    def take_step(t: int, grad_callback: Callable[..., Any] | None = None, record: bool = True) -> Tensor:
        loss = step_loss(view, t if batches is None else batches[t])
        opt.step(loss, grad_callback=grad_callback)
        shadow.trim()
        if record:
            losses.append(float(loss.detach().sum()))
        return loss

    devices = sorted({p.device.index or 0 for p in shadow.start.entry if p.device.type == "cuda"})
    unroll = _Unroll(shadow, take_step, weakref.ref(result), devices, inputs)
    core = fmodel._hg_core
    history = core.history
    blocked = core.history = cast(Any, _InUse())  # the step function must use its argument, not fmodel
    begin, done = shadow.start, 0
    try:
        boundaries = list(range(0, steps, every))
        for index, start in enumerate(boundaries):
            stop = min(start + every, steps)
            if start:
                begin, done = shadow.snapshot(), start
            if index == len(boundaries) - 1:
                for t in range(start, stop):  # the last segment: backward starts here, keep its graph
                    take_step(t)
            else:
                segment = _Segment(unroll, start, stop, begin)
                node_inputs = segment.forward()
                segment.install_outputs(_SegmentFunction.apply(segment, *node_inputs))
                result.checkpoints += 1
        shadow.hand_over(fmodel, diffopt, shadow.snapshot(), steps, finished=True)
    except BaseException:
        # An error or KeyboardInterrupt inside a segment: leave the fmodel and the optimizer at the
        # segment's start, connected to the graph, so that a loop can resume from there.
        del losses[done:]
        shadow.hand_over(fmodel, diffopt, begin, done, finished=False)
        raise
    finally:
        if core.history is blocked:  # (only if handing over failed)
            core.history = history
        shadow.park()
    result.final_params = list(fmodel.parameters())
    return result
