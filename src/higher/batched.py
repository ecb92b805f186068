"""Task-batched inner loops: the inner loops of a whole meta-batch, run as one.

Meta-learning runs the same inner loop for every task of a meta-batch. Instead of a Python loop
over tasks, the task-batched mode keeps the fast weights of all tasks in one tensor per
parameter, with a leading task dimension (``[tasks, *parameter.shape]``), runs the model on all
tasks at once (``torch.func.vmap`` over the tasks of the same replica mechanism as the per-task
fmodel: the user's own ``forward``, no rewrite) and updates all tasks with one differentiable
optimizer step::

    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, tasks=T) as (fmodel, diffopt):
        for _ in range(steps):
            losses = torch.func.vmap(F.mse_loss)(fmodel(support_x), support_y)  # shape [T]
            diffopt.step(losses)
        torch.func.vmap(F.mse_loss)(fmodel(query_x), query_y).mean().backward()

Here ``support_x`` is ``[T, n, ...]``: every tensor argument of ``fmodel(...)`` has the task
dimension first, and so does every tensor it returns (other arguments and outputs, such as a
Python number, are the same for all tasks). ``diffopt.step`` takes the per-task losses
(shape ``[T]``; a mean over tasks would scale every task's step by ``1/T``, so a scalar is
refused). The result is, task by task, what the per-task path computes: the same optimizers
(every one of :mod:`higher.rules`, unchanged: they are elementwise), the same options, the same
``copy_initial_weights``, ``track_higher_grads``, ``override`` and ``parameters(time=...)``, and
the same meta-gradients (to rounding).

The initial fast weights are the model's parameters expanded to ``[T, ...]``: with
``copy_initial_weights=False`` the meta-gradient of all tasks reaches ``model.parameters()``
(summed over tasks, as the per-task path accumulates it); with ``True`` they are leaves with one
copy per task, whose ``.grad`` holds the per-task meta-gradients. Buffers (BatchNorm statistics)
are per task too (``fmodel.sync_buffers_to(model, task=i)`` copies task ``i``'s into the model).
Random operations (dropout) draw independently per task.

Hyperparameters may differ per task: give a tensor of shape ``[T]`` in ``override``
(``override={"lr": lr_per_task}``; a list ``[t0, t1, ...]`` still gives one value per parameter
group); it is reshaped to broadcast against each parameter. A differentiable optimizer written
as a subclass with its own ``_update`` (higher 0.2.1 style) sees ``[T, ...]`` tensors and the
hyperparameters as given.

When to use it: batching pays where the per-task work is small (the per-operation and Python
overhead of a loop over tasks dominates): on one CPU thread it runs the 25-task sine MLP
meta-batch of the benchmark about 6x faster than the per-task loop, and the 16-layer MLP about
2x. Where one task already keeps the processor busy (the convolutional network on CPU),
``vmap``'s batched kernels are slower than the per-task loop (1.3-1.4x its time there); keep the
per-task loop then. ``benchmarks/run.py`` measures both.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable, cast

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import optim as _optim
from . import patch as _patch
from .utils import _check_task_dimension, _copy_tensor

__all__ = ["BatchedFunctionalModule", "innerloop_ctx", "monkeypatch", "get_diff_optim"]


class BatchedFunctionalModule(_patch.FunctionalModule):
    """An fmodel whose fast weights and buffers have a leading task dimension.

    Calling it (or one of its submodules, or a method of the user's class) runs the user's module
    on every task at once, vmapped over the leading dimension of the fast weights, the buffers
    and every tensor argument.
    """

    #: An fmodel that can carry a task dimension (see :func:`_task_batched`).
    _hg_batchable = True

    @property
    def tasks(self) -> int:
        """The number of tasks (the size of the leading dimension)."""
        return self._hg_core.tasks

    def _hg_compute(
        self, target: Callable[[nn.Module], Callable[..., Any]], args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> Any:
        core = self._hg_core
        params = core.latest
        if params is None:
            raise ValueError("this functional module has no fast weights yet; pass params=[...] to it first.")
        rebuild: Callable[[Sequence[Tensor]], tuple[Sequence[Any], Mapping[str, Any]]] | None = None
        if not kwargs and all(isinstance(a, Tensor) for a in args):  # the usual call: no pytree to walk
            tensors = list(args)
        else:
            leaves, spec = tree_flatten((tuple(args), dict(kwargs)))
            positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
            tensors = [leaves[i] for i in positions]

            def rebuild_call(task_tensors: Sequence[Tensor]) -> tuple[Sequence[Any], Mapping[str, Any]]:
                filled = list(leaves)
                for i, tensor in zip(positions, task_tensors):
                    filled[i] = tensor
                return tree_unflatten(filled, spec)

            rebuild = rebuild_call

        _check_task_dimension(tensors, core.tasks)
        call_on = self._hg_call_on
        # vmap returns tensors only: other outputs (the same for every task, since the function
        # runs once for all tasks) are kept aside and put back.
        output: dict[str, Any] = {}

        def call(task_params: list[Tensor], task_buffers: list[Tensor], task_tensors: list[Tensor]) -> Any:
            # Replicas made for this call only: their slots hold this vmap level's per-task tensors.
            replicas = core.copy_replicas(task_params, task_buffers)
            if rebuild is None:
                out = call_on(replicas, task_buffers, target, task_tensors, {})
            else:
                call_args, call_kwargs = rebuild(task_tensors)
                out = call_on(replicas, task_buffers, target, call_args, call_kwargs)
            if isinstance(out, Tensor):
                return out
            output["leaves"], output["spec"] = tree_flatten(out)
            return [leaf for leaf in output["leaves"] if isinstance(leaf, Tensor)]

        randomness = core.randomness
        try:
            if not core.buffers:
                out = torch.func.vmap(lambda p, t: call(p, [], t), randomness=randomness)(params, tensors)
            else:

                def with_buffers(
                    task_params: list[Tensor], task_buffers: list[Tensor], task_tensors: list[Tensor]
                ) -> Any:
                    task_buffers = list(task_buffers)
                    return call(task_params, task_buffers, task_tensors), task_buffers  # replaced buffers come back

                out, buffers = torch.func.vmap(with_buffers, randomness=randomness)(params, core.buffers, tensors)
                core.buffers = list(buffers)
        except RuntimeError as error:
            missing = re.search(r"Batching rule not implemented for ([\w.:]+)", str(error))
            if missing is not None:
                raise RuntimeError(
                    f"in task-batched mode the model runs under torch.func.vmap, which has no batching rule for "
                    f"{missing.group(1)} in this torch release (fused RNN kernels such as nn.RNN, nn.LSTM and "
                    f"nn.GRU are among them): run the tasks one by one (innerloop_ctx without tasks=), or write "
                    f"the layer with operations vmap supports (e.g. an RNN cell in a Python loop)."
                ) from error
            if not any(sign in str(error) for sign in _PER_TASK_NUMBER):
                raise
            raise RuntimeError(
                "in task-batched mode the model runs under torch.func.vmap, which cannot read a per-task tensor "
                "as a Python number (.item(), float(), int(), or a tensor in an `if`). A common cause is "
                "BatchNorm with momentum=None, which reads num_batches_tracked as a number: give it a number "
                "(momentum=0.1), or run the tasks one by one (innerloop_ctx without tasks=)."
            ) from error
        if not output:
            return out
        batched_tensors = iter(out)
        leaves = [next(batched_tensors) if isinstance(leaf, Tensor) else leaf for leaf in output["leaves"]]
        return tree_unflatten(leaves, output["spec"])

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        _, (snapshot, path) = super().__reduce_ex__(protocol)
        core = self._hg_core
        return (_restore, (snapshot, path, core.tasks, core.randomness))


# What torch.func.vmap's errors say when the function reads a batched tensor as a Python number.
_PER_TASK_NUMBER = ("calling .item() on a Tensor", "data-dependent control flow")


def _restore(snapshot: dict[str, Any], path: str, tasks: int, randomness: str) -> _patch.FunctionalModule:
    fmodel = _patch._restore(snapshot, "", BatchedFunctionalModule)
    _batch_core(fmodel._hg_core, tasks, randomness)
    return cast(_patch.FunctionalModule, fmodel.get_submodule(path)) if path else fmodel


def _batch_core(core: Any, tasks: int, randomness: str) -> None:
    core.batched = True
    core.tasks = tasks
    core.randomness = randomness
    core.param_shapes = [torch.Size((tasks, *shape)) for shape in core.param_shapes]


def _refuse_unbatched_options(share_buffers: bool, initial_params: Any) -> None:
    """``innerloop_ctx``'s options that the task-batched mode does not offer."""
    if share_buffers or initial_params is not None:
        raise NotImplementedError(
            "share_buffers and initial_params are not available in task-batched mode (tasks=...): "
            "the batched fmodel keeps one copy of the buffers and of the initial weights per task."
        )


def _check_tasks(tasks: Any) -> int:
    if isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 1:
        raise ValueError(f"tasks must be a positive int (the number of tasks in the meta-batch), got {tasks!r}")
    return tasks


def monkeypatch(
    module: nn.Module,
    tasks: int,
    device: torch.device | str | None = None,
    copy_initial_weights: bool = True,
    track_higher_grads: bool = True,
    randomness: str = "different",
) -> BatchedFunctionalModule:
    """A task-batched fmodel of ``module`` for ``tasks`` tasks (see the module docstring).

    Args:
        module: the model (left unchanged).
        tasks: the number of tasks, the size of the leading dimension of the fast weights.
        device: where to put the fast weights and buffers (default: where they are).
        copy_initial_weights: ``True``: the initial fast weights are leaves, one copy per task
            (meta-gradients stop there; their ``.grad`` holds each task's). ``False``: they are
            the parameters expanded over tasks, so meta-gradients reach ``module.parameters()``.
        track_higher_grads: ``False`` for a loop without a graph through the updates.
        randomness: ``torch.func.vmap``'s: ``"different"`` (default: each task draws its own
            dropout mask, as separate runs would), ``"same"`` or ``"error"``.
    """
    tasks = _check_tasks(tasks)
    if randomness not in ("different", "same", "error"):
        raise ValueError(f"randomness must be 'different', 'same' or 'error', got {randomness!r}")
    fmodel = _patched(module, tasks, device, copy_initial_weights, True, randomness)
    fmodel.track_higher_grads = track_higher_grads  # checked by the setter
    return fmodel


def _patched(
    module: nn.Module,
    tasks: int,
    device: torch.device | str | None,
    copy_initial_weights: bool,
    track_higher_grads: bool,
    randomness: str,
) -> BatchedFunctionalModule:
    """:func:`monkeypatch` with its options already checked."""
    fmodel = _patch.make_functional(module, _view_base=BatchedFunctionalModule)
    core = fmodel._hg_core
    _batch_core(core, tasks, randomness)
    params = []
    for p in core.params:
        if copy_initial_weights:
            initial = _copy_tensor(p, True, device).detach().expand(tasks, *p.shape).clone()
            params.append(initial.requires_grad_(p.requires_grad))
        else:
            initial = p.clone() if device is None else p.clone().to(device)
            params.append(initial.expand(tasks, *p.shape))
    core.push(params)
    core.buffers = [_copy_tensor(b, True, device).expand(tasks, *b.shape).clone() for b in core.buffers]
    core.track_higher_grads = track_higher_grads
    assert isinstance(fmodel, BatchedFunctionalModule)
    return fmodel


class _TaskBatchedOptimizer(_optim.DifferentiableOptimizer):
    """What the task-batched mode changes in a differentiable optimizer (mixed in before its class)."""

    _tasks: int

    def _batch(self, tasks: int, reference_params: list[Tensor]) -> None:
        self._tasks = tasks
        self._reference_shapes = [torch.Size((tasks, *p.shape)) for p in reference_params]
        # A torch optimizer's state (warm start) holds one tensor per parameter: one per task now.
        for group_state, indices in zip(self.state, self._group_to_param_list):
            for index, param_state in group_state.items():
                shape = reference_params[indices[index]].shape
                for key, value in param_state.items():
                    if isinstance(value, Tensor) and value.shape == shape and value.dim() > 0:
                        param_state[key] = value.expand(tasks, *shape)

    def _apply_override(self, override: _optim._OverrideType) -> None:
        tasks = getattr(self, "_tasks", None)
        if isinstance(override, dict) and tasks is not None:
            # A bare tensor with a dimension is one value per task (for every group).
            override = {
                name: [value] if isinstance(value, Tensor) and value.dim() == 1 else value
                for name, value in override.items()
            }
        super()._apply_override(override)

    def _check_shape(self, name: str, value: Any, shapes: list[torch.Size]) -> None:
        """A tensor with dimensions is one value per task here: checked by _hyperparameters_for."""

    def _objective(self, loss: Any) -> Tensor:
        tasks = self._tasks
        if not isinstance(loss, Tensor) or tuple(loss.shape) != (tasks,):
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(
                f"in task-batched mode step() needs the per-task losses, a tensor of shape ({tasks},), "
                f"got {shape}. Reduce each task's loss separately, e.g. torch.func.vmap(F.mse_loss)(out, y) "
                f"or F.mse_loss(out, y, reduction='none').flatten(1).mean(1); a mean over tasks would "
                f"divide every task's gradient by {tasks}."
            )
        # The tasks are independent, so the gradient of the sum is every task's own gradient.
        return super()._objective(loss.sum())

    def _hyperparameters_for(self, group: dict[str, Any]) -> Callable[[Tensor], Mapping[str, Any]] | None:
        per_task = False
        for name, value in group.items():
            if name == "params":
                continue
            for v in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(v, Tensor) and v.dim() > 0:
                    if tuple(v.shape) != (self._tasks,):
                        raise ValueError(
                            f"hyperparameter '{name}' has shape {tuple(v.shape)}; in task-batched mode a "
                            f"tensor hyperparameter is a number (0-dim) or one value per task, shape "
                            f"({self._tasks},)."
                        )
                    per_task = True
        if not per_task:
            return None
        return lambda param: _PerTaskHyperparameters(group, param.dim())


class _PerTaskHyperparameters(Mapping):
    """A parameter group's hyperparameters with each per-task tensor shaped ``[T, 1, ..., 1]``."""

    def __init__(self, group: Mapping[str, Any], dims: int) -> None:
        self._group = group
        self._trailing = (1,) * (dims - 1)

    def _shaped(self, value: Any) -> Any:
        if isinstance(value, Tensor) and value.dim() == 1:
            return value.reshape(value.shape + self._trailing)
        if isinstance(value, (tuple, list)):
            return type(value)(self._shaped(v) for v in value)
        return value

    def __getitem__(self, name: str) -> Any:
        return self._shaped(self._group[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._group)

    def __len__(self) -> int:
        return len(self._group)


_BATCHED_CLASSES: dict[type, type] = {}


def _batched_class(cls: type[_optim.DifferentiableOptimizer]) -> type[_optim.DifferentiableOptimizer]:
    if cls not in _BATCHED_CLASSES:
        name = f"TaskBatched{cls.__name__}"
        _BATCHED_CLASSES[cls] = type(name, (_TaskBatchedOptimizer, cls), {"__module__": __name__, "__qualname__": name})
    return _BATCHED_CLASSES[cls]


for _registered in set(_optim._opt_mapping.values()):
    _batched_class(_registered)
_optim._ON_REGISTER.append(_batched_class)


def _task_batched(fmodel: Any) -> bool:
    """Whether ``fmodel`` is a task-batched fmodel: a :class:`BatchedFunctionalModule`, or the fmodel
    that :mod:`higher.compiled` traces, with a task dimension (both classes say ``_hg_batchable``)."""
    return getattr(type(fmodel), "_hg_batchable", False) and fmodel.tasks is not None


def get_diff_optim(
    opt: torch.optim.Optimizer,
    reference_params: Sequence[Tensor],
    fmodel: BatchedFunctionalModule,
    device: torch.device | str | None = None,
    override: _optim._OverrideType | None = None,
    track_higher_grads: bool = True,
    **kwargs: Any,
) -> _optim.DifferentiableOptimizer:
    """The task-batched differentiable optimizer for ``opt`` (its registered class, batched)."""
    if not _task_batched(fmodel):
        raise TypeError("the task-batched optimizer needs a task-batched fmodel (higher.batched.monkeypatch).")
    return _optimizer(opt, reference_params, fmodel, fmodel.tasks, device, override, track_higher_grads, **kwargs)


def _optimizer(
    opt: torch.optim.Optimizer,
    reference_params: Sequence[Tensor],
    fmodel: Any,
    tasks: int,
    device: torch.device | str | None,
    override: _optim._OverrideType | None,
    track_higher_grads: bool,
    **kwargs: Any,
) -> _optim.DifferentiableOptimizer:
    """:func:`get_diff_optim` for a task-batched ``fmodel`` (eager or traced) of ``tasks`` tasks."""
    reference_params = list(reference_params)
    cls = _batched_class(_optim._diff_optim_type(opt))
    attached = cast(_patch.FunctionalModule, fmodel)  # a traced fmodel offers what the optimizer uses
    diffopt = cls(
        opt, reference_params, fmodel=attached, device=device, track_higher_grads=track_higher_grads, **kwargs
    )
    cast(_TaskBatchedOptimizer, diffopt)._batch(tasks, reference_params)
    if override is not None:
        diffopt._apply_override(override)
    return diffopt


@contextlib.contextmanager
def innerloop_ctx(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    tasks: int,
    device: torch.device | str | None = None,
    copy_initial_weights: bool = True,
    override: _optim._OverrideType | None = None,
    track_higher_grads: bool = True,
    first_order: bool = False,
) -> Iterator[tuple[BatchedFunctionalModule, _optim.DifferentiableOptimizer]]:
    """``higher.innerloop_ctx(..., tasks=T)``: a task-batched fmodel and differentiable optimizer."""
    fmodel = monkeypatch(
        model, tasks, device, copy_initial_weights=copy_initial_weights, track_higher_grads=track_higher_grads
    )
    diffopt = get_diff_optim(
        opt,
        fmodel._hg_core.params,
        fmodel=fmodel,
        device=device,
        override=override,
        track_higher_grads=track_higher_grads,
        first_order=first_order,
    )
    yield fmodel, diffopt
