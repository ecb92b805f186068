"""Inner loops under ``torch.compile``: what ``innerloop_ctx`` yields while dynamo traces it.

A meta-iteration written with the public API compiles as it is, into one graph::

    def meta_iteration():
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False, tasks=T) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(task_losses(fmodel(support_x), support_y))
            return task_losses(fmodel(query_x), query_y).mean()

    torch.compile(meta_iteration, fullgraph=True)().backward()   # meta-gradients in model's .grad

(per task too: a loop over tasks, each with its own ``innerloop_ctx``). While ``torch.compile``
traces such a function, :func:`higher.innerloop_ctx` yields a :class:`TracedFunctionalModule`
instead of the eager fmodel. The eager fmodel runs the user's module on a private replica of the
module tree, kept up to date with Python bookkeeping (reference counts, weak references,
per-call copies) that dynamo cannot follow; the traced one runs the user's own module with the
fast weights put into its parameter and buffer tables for the call, as
:func:`torch.func.functional_call` does, which dynamo traces without ever writing the user's
module (every entry is restored before the graph ends). The differentiable optimizer is the same
object in both modes (the same rules of :mod:`higher.rules`, options, ``override`` tensors and
hypergradients), and the numbers are the same.

Inner gradients. ``diffopt.step(loss)`` (or torch.optim's ``step(closure)`` form) takes the
gradient with ``torch.autograd.grad``, which dynamo traces into the graph only when its option
``trace_autograd_ops`` is on; the step turns it on for that call alone (see
:func:`_autograd_in_graph`), leaving the user's configuration as it is. A graph break anywhere
between the fast weights and an inner loss (a ``print(loss.item())``, an untraceable call) splits
the loop into graphs that AOTAutograd cannot differentiate twice, and torch then fails in the
backward pass (second-order meta-gradients; ``first_order=True`` needs no double backward):
``fullgraph=True`` names the break.

What the traced fmodel offers: calling it (``fmodel(x)``, ``fmodel(x, params=...)``),
``parameters(time=...)``, ``named_parameters()``, ``buffers()``/``named_buffers()``,
``fast_params``, ``init_fast_params``, ``update_params`` and, task-batched, ``tasks``. Submodule
views, module methods other than ``forward``, hooks registered on the fmodel and ``train()``/
``eval()`` inside the compiled function are eager-only and raise an error that says so (switch
the model's mode outside the compiled function: the traced fmodel follows it). Scalar optimizer
state (step counts) is a Python number inside the graph (dynamo folds it in); a warm start from
a torch optimizer that has stepped splits the graph at its tensor ``step``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ._fmodel.core import _check_tensors
from ._tracing import _guard_addmm_fusion, autograd_in_graph, fresh_leaf, tracing  # noqa: F401 (re-exported)
from .batched import BatchedFunctionalModule, _batch_core
from .patch import _given_initial_params, make_functional
from .utils import _check_task_dimension

__all__ = ["TracedFunctionalModule", "backward", "tracing"]


def backward(loss: Tensor, gradient: Tensor | None = None, inputs: Sequence[Tensor] | None = None) -> None:
    """``loss.backward(gradient, inputs=inputs)``, traced into the graph inside ``torch.compile``.

    Called inside the compiled meta-iteration (instead of ``.backward()`` on its result), the
    meta-gradient is computed by the same graph as the inner loop: one compiled function for the
    whole meta-iteration, 1.07-1.56x faster on the benchmark's workloads (``benchmarks/compiled.py``)
    than a compiled forward plus torch's backward pass of it. Gradients accumulate into ``.grad`` as with
    ``loss.backward()`` (which is what it is eagerly)::

        @torch.compile(fullgraph=True)
        def meta_iteration(batch):
            with higher.innerloop_ctx(model, opt, copy_initial_weights=False, tasks=T) as (fmodel, diffopt):
                ...
                meta_loss = task_losses(fmodel(query_x), query_y).mean()
            higher.compiled.backward(meta_loss)
            return meta_loss.detach()
    """
    options: dict[str, Any] = {} if inputs is None else {"inputs": inputs}  # dynamo refuses inputs=None
    if tracing():
        with autograd_in_graph():
            loss.backward(gradient, **options)
    else:
        loss.backward(gradient, **options)


class TracedFunctionalModule:
    """The fmodel of an inner loop traced by ``torch.compile`` (see the module docstring).

    Args:
        module: the user's model; only read (the tensors it is run with are swapped into its tables
            only symbolically, while dynamo traces).
        params: the initial fast weights, one per ``module.named_parameters()`` entry.
        buffers: the buffers the forward uses, one per ``module.named_buffers()`` entry.
        track_higher_grads: ``False`` keeps only the latest fast weights.
        tasks: the number of tasks of the task-batched mode (``None``: one task).
        randomness: ``torch.func.vmap``'s randomness for the task-batched mode.
    """

    _hg_is_root = False  # the optimizer adopts new weights through update_params

    def __init__(
        self,
        module: nn.Module,
        params: list[Tensor],
        buffers: list[Tensor],
        *,
        track_higher_grads: bool = True,
        tasks: int | None = None,
        randomness: str = "different",
        _tables: _Tables | None = None,
    ) -> None:
        tables = _tables if _tables is not None else _module_tables(module)
        self._hg_module = module
        self._hg_param_names = tables.param_names
        self._hg_buffer_names = tables.buffer_names
        self._hg_slots = tables.slots
        self._hg_originals = tables.params  # the model's own parameters (the optimizer's reference)
        self._hg_shapes = [p.shape for p in params]
        self._hg_history: list[list[Tensor]] = [list(params)]
        self._hg_buffers = list(buffers)
        self.track_higher_grads = track_higher_grads
        self._hg_tasks = tasks
        self._hg_randomness = randomness
        self._hg_eager: Any = None  # an eager fmodel, made if dynamo leaves part of the loop to Python

    # ------------------------------------------------------------------ running the module
    def __call__(self, *args: Any, params: Sequence[Tensor] | None = None, **kwargs: Any) -> Any:
        """Run the user's module with the latest fast weights, or with ``params`` (which become the latest)."""
        if params is not None:
            self.update_params(params)
        return self._hg_run(self._hg_history[-1], args, kwargs)

    forward = __call__

    def _hg_run(self, params: Sequence[Tensor], args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        if not tracing():
            return self._hg_run_eagerly(params, args, kwargs)
        module, slots = self._hg_module, self._hg_slots
        if self._hg_tasks is None:
            return _call_with(module, slots, [*params, *self._hg_buffers], tuple(args), dict(kwargs))
        _check_task_dimension([*args, *kwargs.values()], self._hg_tasks)
        args_dims = tuple(0 if isinstance(a, Tensor) else None for a in args)
        kwargs_dims = {k: 0 if isinstance(v, Tensor) else None for k, v in kwargs.items()}

        def one_task(tensors: list[Tensor], task_args: tuple[Any, ...], task_kwargs: dict[str, Any]) -> Any:
            return _call_with(module, slots, tensors, task_args, task_kwargs)

        return torch.func.vmap(one_task, in_dims=(0, args_dims, kwargs_dims), randomness=self._hg_randomness)(
            [*params, *self._hg_buffers], tuple(args), dict(kwargs)
        )

    def _hg_run_eagerly(self, params: Sequence[Tensor], args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        """The same call where dynamo gave up on a frame and runs it as plain Python.

        ``functional_call`` run eagerly puts the fast weights into the user's module for the
        duration of the call; the eager fmodel's private replica does not.
        """
        fmodel = self._hg_eager
        if fmodel is None:
            if self._hg_tasks is None:
                fmodel = make_functional(self._hg_module)
            else:
                fmodel = make_functional(self._hg_module, _view_base=BatchedFunctionalModule)
                _batch_core(fmodel._hg_core, self._hg_tasks, self._hg_randomness)
            fmodel.track_higher_grads = False  # keeps the latest weights only: the history is ours
            self._hg_eager = fmodel
        core = fmodel._hg_core
        core.buffers = list(self._hg_buffers)
        output = fmodel(*args, params=params, **kwargs)
        self._hg_buffers = list(core.buffers)
        return output

    # ------------------------------------------------------------------ fast weights and history
    @property
    def tasks(self) -> int | None:
        """The number of tasks in task-batched mode (``None`` otherwise)."""
        return self._hg_tasks

    def parameters(self, recurse: bool = True, time: int | None = None) -> Iterator[Tensor]:
        """The fast weights at history index ``time`` (``None``: latest; ``0``: initial)."""
        history = self._hg_history
        if time is None:
            return iter(history[-1])
        if not -len(history) <= time < len(history):
            raise IndexError(
                f"time={time} is out of range: the history holds fast weights for time=0..{len(history) - 1}."
            )
        return iter(history[time])

    def named_parameters(self, prefix: str = "", recurse: bool = True) -> Iterator[tuple[str, Tensor]]:
        dot = f"{prefix}." if prefix else ""
        return iter([(dot + name, p) for name, p in zip(self._hg_param_names, self._hg_history[-1])])

    def buffers(self, recurse: bool = True) -> Iterator[Tensor]:
        return iter(self._hg_buffers)

    def named_buffers(self, prefix: str = "", recurse: bool = True) -> Iterator[tuple[str, Tensor]]:
        dot = f"{prefix}." if prefix else ""
        return iter([(dot + name, b) for name, b in zip(self._hg_buffer_names, self._hg_buffers)])

    @property
    def fast_params(self) -> list[Tensor]:
        """The latest fast weights; setting them records a new history entry."""
        return list(self._hg_history[-1])

    @fast_params.setter
    def fast_params(self, value: Sequence[Tensor]) -> None:
        self.update_params(value)

    @property
    def init_fast_params(self) -> list[Tensor]:
        """The fast weights at time 0."""
        return list(self._hg_history[0])

    def update_params(self, params: Sequence[Tensor]) -> None:
        """Adopt ``params`` (one tensor per parameter, ``parameters()`` order) as the latest fast weights."""
        params = list(params)
        _check_tensors("params", params, self._hg_shapes, self._hg_param_names)
        if self.track_higher_grads:
            self._hg_history.append(params)
        else:
            self._hg_history = [params]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_hg_"):
            raise AttributeError(name)
        raise AttributeError(_eager_only(name))

    # Container views of a Sequential/ModuleList model (``fmodel[0]``, ``len(fmodel)``, ``for m in
    # fmodel``) are special methods, looked up on the class, so ``__getattr__`` does not see them.
    def __getitem__(self, index: Any) -> Any:
        raise TypeError(_eager_only(f"fmodel[{index!r}]"))

    def __len__(self) -> int:
        raise TypeError(_eager_only("len(fmodel)"))

    def __bool__(self) -> bool:  # a module is true (without this, ``bool`` would call ``__len__``)
        return True

    def __iter__(self) -> Iterator[Any]:
        raise TypeError(_eager_only("iter(fmodel)"))


#: Where one parameter or buffer of a module lives: the owning submodule's ``_parameters`` or
#: ``_buffers`` table, its key there, and its index in ``[*parameters, *buffers]``.
_Slot = tuple[dict[str, Any], str, int]


class _Tables(NamedTuple):
    """A module's parameters and buffers (``named_parameters()``/``named_buffers()`` order and names) and
    every table entry that holds one (:data:`_Slot`)."""

    param_names: list[str]
    params: list[Tensor]
    buffer_names: list[str]
    buffers: list[Tensor]
    slots: list[_Slot]


def _module_tables(module: nn.Module) -> _Tables:
    """``module``'s :class:`_Tables`, from one walk of its tree.

    Tied names are included: a tensor registered under two names (weight tying, a submodule in two
    places) takes the fast weight of its first name in both, as with ``functional_call(tie_weights=True)``.
    Resolved once per inner loop, so that each call of the traced fmodel swaps tensors in a flat loop:
    ``functional_call`` walks the module tree on every call, and dynamo traces each walk again (with
    ``named_parameters()`` and the like, the walks were half of the bytecode dynamo steps through in a
    per-task meta-iteration).
    """
    walk = list(module.named_modules(remove_duplicate=False))
    found: list[tuple[list[str], list[Tensor]]] = [([], []), ([], [])]
    seen: dict[Tensor, None] = {}  # (keyed by identity, as tensors hash)
    slots: list[tuple[dict[str, Any], str, Tensor]] = []
    for kind, (names, tensors) in zip(("_parameters", "_buffers"), found):
        for prefix, sub in walk:
            table = getattr(sub, kind)
            for key, tensor in table.items():
                if tensor is None:
                    continue
                if tensor not in seen:
                    seen[tensor] = None
                    names.append(f"{prefix}.{key}" if prefix else key)
                    tensors.append(tensor)
                slots.append((table, key, tensor))
    (param_names, params), (buffer_names, buffers) = found
    index = {t: i for i, t in enumerate([*params, *buffers])}
    return _Tables(param_names, params, buffer_names, buffers, [(t, k, index[x]) for t, k, x in slots])


def _call_with(module: nn.Module, slots: list[_Slot], tensors: Sequence[Tensor], args: tuple, kwargs: dict) -> Any:
    """``module(*args, **kwargs)`` with ``tensors`` as its parameters and buffers, its own put back after."""
    saved = [table[key] for table, key, _ in slots]
    for table, key, i in slots:
        table[key] = tensors[i]
    try:
        return module(*args, **kwargs)
    finally:
        for (table, key, _), tensor in zip(slots, saved):
            table[key] = tensor


def _eager_only(name: str) -> str:
    """The error for an fmodel feature the traced fmodel does not offer."""
    return (
        f"'{name}' of the fmodel is not available while torch.compile traces the inner loop: the traced "
        f"fmodel runs the model's forward with the fast weights (calling it, parameters(), "
        f"named_parameters(), buffers(), fast_params, update_params). Use '{name}' outside the compiled "
        f"function, or run this inner loop eagerly."
    )


def show_params(diffopt: Any, fmodel: TracedFunctionalModule) -> None:
    """Put the initial fast weights into ``diffopt.param_groups`` (placeholders until the first step).

    Where dynamo splits the function (``step(loss)`` without ``trace_autograd_ops``), it resumes
    with the optimizer as an input and, as for any ``torch.optim.Optimizer``, marks the tensors of
    its ``param_groups`` as static inputs; placeholders there make it fail.
    """
    params = fmodel._hg_history[-1]
    for group, indices in zip(diffopt.param_groups, diffopt._group_to_param_list):
        group["params"] = [params[i] for i in indices]


def traced_innerloop(
    model: nn.Module,
    *,
    device: torch.device | str | None,
    copy_initial_weights: bool,
    track_higher_grads: bool,
    share_buffers: bool,
    initial_params: Sequence[Tensor] | Mapping[str, Tensor] | None,
    tasks: int | None,
) -> TracedFunctionalModule:
    """The traced fmodel of ``model``, with the initial fast weights and buffers ``innerloop_ctx`` gives."""
    tables = _module_tables(model)
    names = tables.param_names
    params: list[Tensor] = []
    for p in tables.params:
        q = p if device is None else p.to(device)
        if copy_initial_weights:
            q = fresh_leaf(q.expand(tasks, *q.shape) if tasks is not None else q, p.requires_grad)
        else:
            # Contiguous per-task copies: an expanded view's strides make AOTAutograd's backward fail
            # when dynamo splits the function (torch 2.13 restrides such tangents in place).
            q = q.clone() if tasks is None else q.expand(tasks, *q.shape).contiguous()
        params.append(q)
    if initial_params is not None:  # (refused in task-batched mode by innerloop_ctx)
        params = _given_initial_params(names, params, initial_params)
        _check_tensors("initial_params", params, [p.shape for p in tables.params], names)
    buffers = []
    for b in tables.buffers:
        if share_buffers:
            buffers.append(b)
            continue
        c = (b if device is None else b.to(device)).detach()
        buffers.append((c.expand(tasks, *c.shape) if tasks is not None else c).clone())
    return TracedFunctionalModule(
        model, params, buffers, track_higher_grads=track_higher_grads, tasks=tasks, _tables=tables
    )
