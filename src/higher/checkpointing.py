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
graph is dropped at once and only the end state is kept, as the node's outputs. The node's
inputs are the starting tensors plus every tensor from outside the segment that the steps read:
found by walking the segment's graph before dropping it (leaf tensors such as ``override``
hyperparameters, model parameters, data that requires grad; the fast weights from before the
unroll; and non-leaf hyperparameter tensors in the optimizer's groups, ``PerStep`` lists or
``inputs=[...]``). Its backward restores the segment's start (fast weights, optimizer state,
buffers, training modes, step counter, random number generator), runs the steps again with the
graph, and differentiates them with ``torch.autograd.grad``. The optimizer's hyperparameter
tensors enter the steps as detached stand-ins, so that their gradient is taken on the recomputed
graph alone, never in the graph outside (hooks on them and a retained ``.grad`` see the whole
gradient, once, as after a plain loop); a tensor that the step function reads itself is
differentiated where it is (its hooks run once per segment, on that segment's part). Memory: one
checkpoint per segment plus one segment's graph; the graph of the other steps is not kept at all
(not even its nodes, which in a deep network's unroll weigh as much as the saved tensors). The
last segment is not checkpointed (backward starts there). ``torch.utils.checkpoint`` is not
used: its non-reentrant form keeps every node and recomputes the segment whenever a saved tensor
is unpacked during the segment's own forward pass, which the inner ``autograd.grad`` of every
step does (quadratic cost).

The steps run on a private copy of the fmodel and of the optimizer (same module, buffers'
values, training modes, hooks and attributes registered on the fmodel; same hyperparameters,
callbacks and step hooks, as they are at the call: hooks registered or removed later do not
change the recomputation), in the forward pass and in the recomputation; the fmodel and
optimizer given to the function receive the final state at the end. The reason: a segment node
must keep what it recomputes with for as long as the graph lives, and if that were the user's
fmodel, which holds the final fast weights, whose graph holds the node, the loop would be a
reference cycle through the autograd graph's C++ side, which Python's garbage collector cannot
see: every inner loop would leak. The private copy holds only tensors from before the unroll
between steps, so there is no cycle, whether the meta-loss is backpropagated (``backward``,
``autograd.grad``, ``retain_graph=True``) or never. So the step function must compute the loss
from the fmodel it is called with, not from the one given to :func:`checkpointed_unroll` (a
closure over that one raises an error while the unroll runs, instead of silently reading stale
weights). What still leaks: the nodes keep the step function, the ``grad_callback``, the
optimizer's step hooks and ``PerStep`` callables alive as long as the graph; if one of these
refers to something that holds the unroll's later tensors (the optimizer given to the function,
whose state becomes the final one; the returned :class:`CheckpointedUnroll`, whose
``final_params`` are the final fast weights; a list the step function appends its outputs to),
that is the same cycle, and the inner loop is never freed. Read hyperparameters from tensors you
hold, not from ``diffopt.param_groups``.

What the step function may do: anything deterministic given the fmodel, the optimizer and the
step index: draw random numbers (the generator state is restored for the recomputation), use
``PerStep`` schedules, ``override`` tensors, per-parameter values, BatchNorm (the fmodel's
buffers are restored), task-batched fmodels (``tasks=T``), the initial fast weights
(``fm.parameters(time=0)``, e.g. a proximal term as in iMAML, with exact meta-gradients through
them). It must not change Python state that the recomputation cannot restore: appending to lists
happens twice for recomputed segments. A ``torch.optim.lr_scheduler`` attached to the optimizer
may be stepped between unrolls (the recomputation keeps the values its steps read); one stepped
inside the step function (or any change of the given optimizer's ``param_groups`` while the
unroll runs) raises an error, since the steps never read it: use :class:`higher.PerStep` for a
schedule within an unroll. A step hook receives the private optimizer: hyperparameter tensors it
sets (``param_groups`` or an ``override`` in the step's arguments) are carried from segment to
segment with their gradients.

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

import inspect
import math
import weakref
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FunctionType, MethodType
from typing import Any, cast

import torch
from torch import Tensor

from ._fmodel.tree import _HOOK_DICTS
from .optim import DifferentiableOptimizer, PerParameter, PerStep
from .patch import FunctionalModule, make_functional

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
    """A copy of ``diffopt`` (same class, hyperparameters, callbacks and hooks; its own groups, state and hook
    dictionaries) that updates ``fmodel``."""
    opt = object.__new__(type(diffopt))
    opt.__dict__.update(diffopt.__dict__)
    for name, value in diffopt.__dict__.items():
        if not isinstance(inspect.getattr_static(type(diffopt), name, None), (FunctionType, staticmethod, classmethod)):
            continue
        # An instance attribute replacing a method: it would run on the given optimizer, not on this copy.
        if getattr(value, "_wrapped_by_lr_sched", False):
            # torch.optim.lr_scheduler's wrapper of step (it records that step was called, see checkpointed_unroll)
            del opt.__dict__[name]
        elif isinstance(value, MethodType) and value.__self__ is diffopt:
            opt.__dict__[name] = MethodType(value.__func__, opt)
        else:
            raise TypeError(
                f"checkpointed_unroll: the optimizer's method {name} was replaced on the instance by {value!r}, "
                f"which checkpointed_unroll cannot apply to the private copy of the optimizer its steps run on. "
                f"Use the optimizer's step hooks (register_step_pre_hook / register_step_post_hook) instead."
            )
    # Hyperparameter tensors that need no gradient are copied: a scheduler stepped between the unroll and the
    # backward pass fills a tensor lr in place, which the recomputation must not read.
    opt.param_groups = [
        {key: value if key == "params" else _replace_tensors(value, _value_copy) for key, value in group.items()}
        for group in diffopt.param_groups
    ]
    opt.state = cast(Any, [defaultdict(dict, {k: dict(v) for k, v in group.items()}) for group in diffopt.state])
    # The hooks as they are now: hooks registered or removed later must not change the recomputation.
    opt._optimizer_step_pre_hooks = OrderedDict(diffopt._optimizer_step_pre_hooks)
    opt._optimizer_step_post_hooks = OrderedDict(diffopt._optimizer_step_post_hooks)
    opt._learned_versions = list(diffopt._learned_versions)
    opt._fmodel = fmodel
    return opt


def _value_copy(tensor: Tensor) -> Tensor:
    return tensor if tensor.requires_grad else tensor.clone()


def _replace_tensors(value: Any, replace: Callable[[Tensor], Tensor]) -> Any:
    """``value`` (a hyperparameter: a number, a tensor, or tuples, lists, ``PerParameter`` and ``PerStep`` lists
    of them) with every tensor ``t`` replaced by ``replace(t)``; ``value`` itself where nothing changed."""
    if isinstance(value, Tensor):
        return replace(value)
    if isinstance(value, PerStep):
        if callable(value.values):
            return value  # (what the callable reads, it reads itself)
        values = _replace_tensors(value.values, replace)
        return value if values is value.values else PerStep(values)
    if type(value) in (tuple, list, PerParameter):
        items = [_replace_tensors(v, replace) for v in value]
        return value if all(a is b for a, b in zip(items, value)) else type(value)(items)
    return value


def _hyperparameters(diffopt: DifferentiableOptimizer) -> list[dict[str, tuple[Any, list[int]]]]:
    """The optimizer's hyperparameters, with the version counters of the tensors among them."""
    return [
        {key: (value, [t._version for t in _tensors_in(value)]) for key, value in group.items() if key != "params"}
        for group in diffopt.param_groups
    ]


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, (bool, int, float)) and isinstance(b, (bool, int, float)):
        return a == b
    if type(a) is type(b) and isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return False


def _check_unchanged(diffopt: DifferentiableOptimizer | None, given: list[dict[str, tuple[Any, list[int]]]]) -> None:
    """Refuse a change of the given optimizer's hyperparameters while its steps run on the private copy."""
    if diffopt is None:
        return
    change = _first_change(given, _hyperparameters(diffopt))
    if change is not None:
        raise RuntimeError(
            f"checkpointed_unroll: the optimizer given to checkpointed_unroll {change} while the unroll ran (a "
            f"torch.optim.lr_scheduler stepped inside the step function does this, as does a step function or "
            f"hook writing diffopt.param_groups). The steps run on a private copy of the optimizer, which never "
            f"sees that change, and are run again in the backward pass: the result would be silently wrong. For a "
            f"schedule within an unroll use higher.PerStep (e.g. override={{'lr': higher.PerStep(lambda t: "
            f"0.1 * 0.5 ** t)}}); a scheduler may be stepped between unrolls, not inside one."
        )


def _first_change(
    given: list[dict[str, tuple[Any, list[int]]]], now: list[dict[str, tuple[Any, list[int]]]]
) -> str | None:
    if len(now) != len(given):
        return f"went from {len(given)} to {len(now)} parameter groups"
    for g, (before, after) in enumerate(zip(given, now)):
        for key in sorted(set(before) | set(after)):
            if key not in before or key not in after:
                return f"{'lost' if key in before else 'gained'} the hyperparameter '{key}' in parameter group {g}"
            if not _same(before[key][0], after[key][0]):
                return f"had its hyperparameter '{key}' of parameter group {g} changed"
            if before[key][1] != after[key][1]:
                return f"had its hyperparameter '{key}' of parameter group {g} changed in place"
    return None


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
        # The given optimizer's hyperparameter values by the copy's (which may be copies of them).
        self.theirs = [
            {key: (group[key], value) for key, value in mine.items() if key != "params"}
            for group, mine in zip(diffopt.param_groups, self.opt.param_groups)
        ]
        self.core.history = self.history_at(0, list(cast(list[Tensor], core.latest)))
        self.start = self.snapshot()
        self.learned = list(self.opt._learned_versions)

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
        self.opt._learned_versions = list(self.learned)  # (an override given during the unroll recorded its tensor)

    def hand_over(
        self, fmodel: FunctionalModule, diffopt: DifferentiableOptimizer, saved: _State, done: int, finished: bool
    ) -> None:
        """Give the fmodel and the optimizer of the user the state ``saved``, ``done`` steps into the unroll."""
        core = cast(Any, fmodel._hg_core)
        core.history = [None if entry is None else list(entry) for entry in self.history_at(done, saved.entry)]
        hyper = [
            {
                key: theirs[key][0] if key in theirs and theirs[key][1] is value else value
                for key, value in group.items()
            }
            for group, theirs in zip(saved.hyper, self.theirs)
        ]  # (the given optimizer keeps its own values where the steps left them as they were)
        _put_state(diffopt, _State(saved.entry, saved.state, hyper, saved.buffers, saved.modes, saved.steps_taken))
        if finished:  # as after diffopt.step: the groups hold the latest fast weights
            for group, mine in zip(diffopt.param_groups, self.opt.param_groups):
                group["params"] = list(mine["params"])
        diffopt._learned_versions = list(self.opt._learned_versions)  # (an override given to step by a hook)
        diffopt._shaped_hyperparameters = self.opt._shaped_hyperparameters
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

    def _install(self, starts: list[Tensor]) -> _StandIns:
        """Restore the state at ``start`` with its tensors replaced by ``starts`` (detached leaves), and the tensors
        from outside the segment that the private copy holds by stand-ins (see _StandIns)."""
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
        stand_ins = _StandIns()
        stand_ins.installed = [{key: stand_ins.of(value) for key, value in group.items()} for group in begin.hyper]
        saved = _State(entry, state, stand_ins.installed, begin.buffers, begin.modes, begin.steps_taken)
        shadow.restore(saved, shadow.history_at(self.start, entry))
        return stand_ins

    def forward(self) -> list[Tensor]:
        """Run the steps; return the inputs of the segment node (start tensors, then the external tensors read)."""
        unroll = self.unroll
        shadow = unroll.shadow
        opt = shadow.opt
        begin = self.begin
        self.in_slots = _slots(begin.entry, begin.state)
        starts = [_at(begin.entry, begin.state, begin.hyper, slot) for slot in self.in_slots]
        copies = [t.detach().requires_grad_(t.requires_grad) for t in starts]
        stand_ins = self._install(copies)
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
        entry, state, groups = list(shadow.core.latest), opt.state, opt.param_groups
        # The outputs: the fast weights, the optimizer state and hyperparameter tensors that the steps put into
        # the groups (a step hook's override or assignment), which later segments read.
        slots = _slots(entry, state) + [
            ("hyper", (g, key))
            for g, (group, before) in enumerate(zip(groups, stand_ins.installed))
            for key, value in group.items()
            if key != "params" and isinstance(value, Tensor) and value is not before.get(key)
        ]
        self.out_slots = [slot for slot in slots if _at(entry, state, groups, slot).requires_grad]
        outputs = [_at(entry, state, groups, slot) for slot in self.out_slots]
        known = unroll.known_tensors(begin.hyper)
        externals, self.direct = _externals(
            outputs + losses, copies + marked, stand_ins, first, known, self.start, self.stop
        )
        self.external_count = len(externals)
        # Everything else (tensors that need no gradient, step counters) stays as the run left it, detached; what
        # the stand-ins stood for is back.
        stand_ins.remove(shadow.opt, self.begin)
        shadow.core.history[-1] = [p.detach().requires_grad_(p.requires_grad) for p in entry]
        opt._detach_state()
        self.outputs = [o.detach() for o in outputs]
        return starts + externals

    def install_outputs(self, outputs: Sequence[Tensor]) -> None:
        shadow = self.unroll.shadow
        opt = shadow.opt
        entry = list(shadow.core.latest)
        for (kind, where), tensor in zip(self.out_slots, outputs):
            if kind == "param":
                entry[where] = tensor
            elif kind == "hyper":
                g, key = where
                # (a tensor an override recorded as receiving hypergradients is the node's output now)
                opt._learned_versions = [
                    (h, name, tensor, tensor._version)
                    if (h, name) == where and old is opt.param_groups[g][key]
                    else (h, name, old, version)
                    for h, name, old, version in opt._learned_versions
                ]
                opt.param_groups[g][key] = tensor
            else:
                g, k, key = where
                opt.state[g][k][key] = tensor
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
                stand_ins = self._install(copies)
                for t in range(self.start, self.stop):
                    unroll.take_step(t, record=False)
                entry, state, groups = list(shadow.core.latest), shadow.opt.state, shadow.opt.param_groups
                outputs = [_at(entry, state, groups, slot) for slot in self.out_slots]
                pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad and g is not None]
                gradients = _segment_gradients(pairs, copies, externals, self.direct, stand_ins)
        finally:
            shadow.restore(now, history)
        result = unroll.result()
        if result is not None:
            result.recomputations += 1
        return gradients


class _StandIns:
    """Detached leaves standing in, while a segment's steps run, for the hyperparameter tensors in the private
    optimizer's groups (also in ``PerStep`` lists, ``PerParameter`` and tuples), one per tensor.

    The gradient with respect to such a tensor is then taken at its stand-in, on the recomputed graph alone. Taken
    at the tensor itself, autograd would run its hooks and fill its retained ``.grad`` with this segment's part of
    the gradient; and where one of them is computed from another (``lr, wd = h`` gives two tensors of one node;
    ``lr * 2``), it would run the graph between them, and free it (the meta-loss's backward pass then fails). The
    other tensors from outside the segment (``inputs=[...]``, leaves the step function reads, ``time=0``) are
    differentiated where they are (see _segment_gradients).
    """

    def __init__(self) -> None:
        self.leaves: dict[int, Tensor] = {}  # id of the tensor -> its stand-in
        self.tensors: dict[int, Tensor] = {}  # id of a stand-in -> the tensor
        self.installed: list[dict[str, Any]] = []  # the groups' hyperparameters with the stand-ins

    def of(self, value: Any) -> Any:
        """``value`` with its tensors that require grad replaced by their stand-ins (itself if it has none)."""
        return _replace_tensors(value, self._stand_in)

    def _stand_in(self, tensor: Tensor) -> Tensor:
        if not tensor.requires_grad:
            return tensor
        leaf = self.leaves.get(id(tensor))
        if leaf is None:
            leaf = self.leaves[id(tensor)] = tensor.detach().requires_grad_()
            self.tensors[id(leaf)] = tensor
        return leaf

    def remove(self, opt: DifferentiableOptimizer, begin: _State) -> None:
        """Put back the hyperparameters that the steps left as they were installed."""
        for group, installed, original in zip(opt.param_groups, self.installed, begin.hyper):
            for key, value in installed.items():
                if group.get(key) is value:
                    group[key] = original[key]


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


def _at(params: list[Tensor], state: list[Any], groups: Sequence[dict[str, Any]], slot: Slot) -> Tensor:
    kind, where = slot
    if kind == "param":
        return params[where]
    if kind == "hyper":
        g, key = where
        return groups[g][key]
    g, k, key = where
    return state[g][k][key]


Edge = tuple[Any, int]  # (graph node, output index): one tensor of the graph


def _externals(
    outputs: list[Tensor],
    copies: list[Tensor],
    stand_ins: _StandIns,
    first: int,
    known: dict[Edge, Tensor],
    start: int,
    stop: int,
) -> tuple[list[Tensor], list[bool]]:
    """The tensors outside the segment that its outputs depend on (found by walking the segment's graph), and for
    each whether the steps read it directly (not only through its stand-in).

    A non-leaf tensor is told by its graph edge, (node, output index), not by its node alone: the tensors that
    one node made (``lr, wd = h`` unbinds ``h``) are different inputs of the segment."""
    mine = {id(c) for c in copies}
    found: dict[int, Tensor] = {}
    direct: set[int] = set()
    seen: set[Any] = set()
    stack: list[Edge] = [(o.grad_fn, o.output_nr) for o in outputs if o.grad_fn is not None]
    leaf_type = _accumulate_grad_type()
    while stack:
        node, index = stack.pop()
        if type(node) is leaf_type:
            variable = cast(Any, node).variable
            if id(variable) in mine:
                continue
            tensor = stand_ins.tensors.get(id(variable))
            if tensor is None:
                tensor = variable
                direct.add(id(tensor))
            found.setdefault(id(tensor), tensor)
            continue
        if node._sequence_nr() < first:  # made before the segment: an external non-leaf tensor
            tensor = known.get((node, index))
            if tensor is None:
                raise ValueError(
                    f"checkpointed_unroll: steps {start}..{stop - 1} depend on a tensor computed before the unroll "
                    f"(its graph node is {type(node).__name__}) that the function cannot recompute from: pass it as "
                    f"inputs=[...] (e.g. the hyperparameter tensor your step function or PerStep callable reads), "
                    f"or compute it inside the step function from leaf tensors."
                )
            found.setdefault(id(tensor), tensor)
            direct.add(id(tensor))
            continue
        if node in seen:
            continue
        seen.add(node)
        stack.extend((n, i) for n, i in node.next_functions if n is not None and n not in seen)
    tensors = list(found.values())
    return tensors, [id(t) in direct for t in tensors]


def _segment_gradients(
    pairs: list[tuple[Tensor, Tensor]],
    copies: list[Tensor],
    externals: Sequence[Tensor],
    direct: list[bool],
    stand_ins: _StandIns,
) -> list[Tensor | None]:
    """The gradients of the outputs in ``pairs`` (weighted by their gradients) with respect to ``copies`` (the
    segment's starting tensors), then ``externals`` (the tensors from outside the segment that it read): at their
    stand-ins, and at themselves where the steps read them directly (``direct``)."""
    offset = len(copies)
    wrt: list[tuple[int, Tensor]] = [(i, c) for i, c in enumerate(copies) if c.requires_grad]
    nodes: dict[Any, None] = {}
    for i, (tensor, read) in enumerate(zip(externals, direct)):
        leaf = stand_ins.leaves.get(id(tensor))
        if leaf is not None:
            wrt.append((offset + i, leaf))
        if read:
            wrt.append((offset + i, tensor))
            if tensor.grad_fn is not None:
                nodes[tensor.grad_fn] = None
    gradients: list[Tensor | None] = [None] * (offset + len(externals))
    if not pairs or not wrt:
        return gradients
    # Where one tensor read directly is computed from another (the step function reads h and lr = h[0] * 2),
    # autograd runs the graph between them to reach the second: it must carry nothing there (the meta-loss's
    # backward pass carries that part), and it must not be freed (retain_graph; it is not the recomputed graph).
    handles = [node.register_prehook(_nothing) for node in nodes]
    try:
        computed = torch.autograd.grad(
            [o for o, _ in pairs],
            [x for _, x in wrt],
            [g for _, g in pairs],
            allow_unused=True,
            retain_graph=bool(nodes),
        )
    finally:
        for handle in handles:
            handle.remove()
    for (i, _), grad in zip(wrt, computed):
        if grad is not None:
            before = gradients[i]
            gradients[i] = grad if before is None else before + grad
    return gradients


def _nothing(grads: tuple[Tensor | None, ...]) -> tuple[Tensor | None, ...]:
    return tuple(None if g is None else torch.zeros_like(g) for g in grads)


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

    def known_tensors(self, hyper: list[dict[str, Any]]) -> dict[Edge, Tensor]:
        """Non-leaf tensors the steps may read, by graph edge: hyperparameters (those of the optimizer's groups now
        and ``hyper``, the groups' at the segment's start), ``inputs``, the fast weights from before the unroll
        (``fmodel.parameters(time=0)``) and buffers computed with a graph."""
        tensors = list(self.inputs)
        for group in [*self.shadow.opt.param_groups, *hyper]:
            for key, value in group.items():
                if key != "params":
                    tensors += _tensors_in(value)
        for entry in self.shadow.prefix:
            tensors += entry or []
        tensors += [b for b in self.shadow.core.buffers if b.requires_grad]
        return {(t.grad_fn, t.output_nr): t for t in tensors if t.grad_fn is not None}


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
    # The given optimizer's hyperparameters must not change while the steps run on the copy (a scheduler stepped
    # in the step function). Watched through a weak reference: the segment nodes keep take_step.
    given, watched = _hyperparameters(diffopt), weakref.ref(diffopt)

    def take_step(t: int, grad_callback: Callable[..., Any] | None = None, record: bool = True) -> Tensor:
        loss = step_loss(view, t if batches is None else batches[t])
        if record:
            _check_unchanged(watched(), given)
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
        _check_unchanged(diffopt, given)
        shadow.hand_over(fmodel, diffopt, shadow.snapshot(), steps, finished=True)
        if steps and getattr(diffopt.__dict__.get("step"), "_wrapped_by_lr_sched", False):
            diffopt._opt_called = True  # type: ignore[attr-defined]  # as the scheduler's wrapper of step would
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
