"""``innerloop_ctx``: one entry point, five modes, chosen in one place.

:func:`innerloop_ctx` checks its options once (:meth:`_Options.checked`), picks the mode that fits
the model and the caller (:func:`_mode_for`), and yields what that mode opens. A mode is a
generator function ``mode(model, opt, options)`` that yields ``(fmodel, diffopt)`` once, as the
body of a ``contextlib.contextmanager`` does, and may run code after the ``with`` block or around
it (the data-parallel mode reports the errors raised inside it to the other ranks):

* :func:`_per_task`: the eager fmodel (:mod:`higher.patch`) and the optimizer's registered
  differentiable class (:mod:`higher.optim`);
* :func:`_task_batched` (``tasks=T``): the task-batched fmodel and optimizer (:mod:`higher.batched`);
* :func:`_traced`: while ``torch.compile`` traces the caller, the traced fmodel
  (:mod:`higher.compiled`) with the same optimizers (per task or task-batched);
* :func:`_data_parallel`: a ``DistributedDataParallel`` model; the per-task or task-batched mode
  runs on the model it wraps, and the meta-gradients are averaged over ranks once per backward
  pass (:mod:`higher.distributed`);
* ``_fsdp._fully_sharded``: a model wrapped by FSDP2's ``fully_shard``; sharded fast weights, per
  task or task-batched (:mod:`higher._fsdp`, public face :mod:`higher.distributed`).

The modes receive checked options and build with the unchecked builders of their layers
(``patch._patched``, ``batched._patched``, ``batched._optimizer``); the public builders
(``monkeypatch``, ``higher.batched.monkeypatch``...) check the same options with the same
functions for their own callers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, cast

import torch

from . import _ddp, _fsdp, _tracing, batched, compiled
from .optim import DifferentiableOptimizer, get_diff_optim
from .patch import FunctionalModule, _check_shared_buffers, _check_track_higher_grads, _patched

__all__ = ["innerloop_ctx"]


@contextlib.contextmanager
def innerloop_ctx(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    device: torch.device | str | None = None,
    copy_initial_weights: bool = True,
    override: dict[str, Any] | None = None,
    track_higher_grads: bool = True,
    *,
    first_order: bool = False,
    share_buffers: bool = False,
    initial_params: Sequence[torch.Tensor] | Mapping[str, torch.Tensor] | None = None,
    tasks: int | None = None,
) -> Iterator[tuple[FunctionalModule, DifferentiableOptimizer]]:
    """Yield ``(fmodel, diffopt)``: a functional view of ``model`` and a differentiable ``opt``.

    Args:
        model: the model whose inner-loop optimization is unrolled; never modified.
        opt: a ``torch.optim`` optimizer over (some of) ``model``'s parameters; its
            hyperparameters, parameter groups and state are copied.
        device: where to put the fast weights, buffers and optimizer state.
        copy_initial_weights: ``True`` (default): the initial fast weights are detached copies,
            so meta-gradients stop at ``fmodel.parameters(time=0)``. ``False``: they stay
            connected to ``model.parameters()``, which receive the meta-gradient (MAML).
        override: hyperparameters to replace, e.g. ``{'lr': [lr_tensor]}``; tensors requiring
            grad receive hypergradients.
        track_higher_grads: ``False`` for a cheap loop without a graph through the updates.
        first_order: ``True`` for first-order meta-gradients: inner gradients are taken without
            a graph (cheap), but the fast weights stay connected to ``model``'s parameters (with
            ``copy_initial_weights=False``) through the updates, so ``meta_loss.backward()``
            deposits the first-order MAML gradient in ``model.parameters()``.
        share_buffers: ``True`` to let the fmodel use (and update) ``model``'s own buffers, e.g.
            BatchNorm running statistics, instead of copies.
        initial_params: initial fast weights to use instead of copies of ``model``'s parameters
            (all of them as a list, or some of them by name as a dict), e.g. produced by a
            hypernetwork; meta-gradients flow back into them.
        tasks: run the inner loops of ``tasks`` tasks at once (task-batched mode, see
            :mod:`higher.batched`): fast weights get a leading task dimension, ``fmodel(x)``
            takes ``x`` with a leading task dimension, and ``diffopt.step`` takes the per-task
            losses (shape ``[tasks]``).

    A ``torch.nn.parallel.DistributedDataParallel`` model works too: the inner loops run on the
    model it wraps, and the meta-gradient is averaged over ranks once per backward pass, as DDP
    does (see :mod:`higher.distributed`). So does a model wrapped by FSDP2's ``fully_shard``: the
    fast weights stay sharded, each FSDP unit's full weights are gathered for its forward, and the
    meta-gradient arrives in the sharded ``.grad``, averaged over ranks as FSDP does.

    Nothing is torn down on exit: both objects stay usable after the ``with`` block.
    """
    ddp = _ddp.is_ddp(model)
    options = _Options.checked(
        cast(torch.nn.Module, model.module) if ddp else model,
        device,
        copy_initial_weights,
        override,
        track_higher_grads,
        first_order,
        share_buffers,
        initial_params,
        tasks,
    )
    yield from _mode_for(ddp, options, fsdp=_fsdp.is_fsdp(model))(model, opt, options)


class _Options(NamedTuple):
    """``innerloop_ctx``'s options, checked once (:meth:`checked`) for whichever mode runs them."""

    device: torch.device | str | None
    copy_initial_weights: bool
    override: dict[str, Any] | None
    track_higher_grads: bool
    first_order: bool
    share_buffers: bool
    initial_params: Sequence[torch.Tensor] | Mapping[str, torch.Tensor] | None
    tasks: int | None

    @classmethod
    def checked(
        cls,
        model: torch.nn.Module,
        device: torch.device | str | None,
        copy_initial_weights: bool,
        override: dict[str, Any] | None,
        track_higher_grads: bool,
        first_order: bool,
        share_buffers: bool,
        initial_params: Sequence[torch.Tensor] | Mapping[str, torch.Tensor] | None,
        tasks: int | None,
    ) -> _Options:
        """The options, after the checks that do not depend on the mode (``model`` is the model the
        inner loops run on: a DDP model's ``module``). The optimizer checks its own (``override``,
        ``first_order`` with ``track_higher_grads``) when the mode builds it."""
        if tasks is not None:
            batched._refuse_unbatched_options(share_buffers, initial_params)
            tasks = batched._check_tasks(tasks)
        _check_shared_buffers(model, share_buffers, device)
        _check_track_higher_grads(track_higher_grads)
        return cls(
            device,
            copy_initial_weights,
            override,
            track_higher_grads,
            first_order,
            share_buffers,
            initial_params,
            tasks,
        )


#: A mode: ``mode(model, opt, options)`` yields ``(fmodel, diffopt)`` once (a context manager's body).
_Mode = Callable[[Any, torch.optim.Optimizer, _Options], Iterator[tuple[Any, DifferentiableOptimizer]]]


def _mode_for(ddp: bool, options: _Options, fsdp: bool = False) -> _Mode:
    """The mode that runs an inner loop (the one place where it is chosen)."""
    if _tracing.tracing():  # torch.compile is tracing this inner loop
        if fsdp:
            raise NotImplementedError(
                "innerloop_ctx of an FSDP (fully_shard) model cannot be traced by torch.compile; run it eagerly."
            )
        if ddp:
            raise NotImplementedError(
                "innerloop_ctx of a DistributedDataParallel model cannot be traced by torch.compile; compile "
                "the inner loop of ddp.module (and all-reduce the meta-gradients outside), or run it eagerly."
            )
        _tracing.require_compile_support()
        return _traced
    if ddp:
        return _data_parallel
    if fsdp:
        return _fsdp._fully_sharded
    return _local_mode(options)


def _local_mode(options: _Options) -> _Mode:
    """The mode of an inner loop in this process: per task, or task-batched."""
    return _per_task if options.tasks is None else _task_batched


def _per_task(
    model: torch.nn.Module, opt: torch.optim.Optimizer, options: _Options
) -> Iterator[tuple[FunctionalModule, DifferentiableOptimizer]]:
    """One task's inner loop: the eager fmodel (a replica of ``model``) and its differentiable optimizer."""
    device, track_higher_grads = options.device, options.track_higher_grads
    fmodel = _patched(
        model, device, options.copy_initial_weights, track_higher_grads, options.share_buffers, options.initial_params
    )
    diffopt = get_diff_optim(
        opt,
        fmodel._hg_core.origins,
        fmodel=fmodel,
        device=device,
        override=options.override,
        track_higher_grads=track_higher_grads,
        first_order=options.first_order,
    )
    yield fmodel, diffopt


def _task_batched(
    model: torch.nn.Module, opt: torch.optim.Optimizer, options: _Options
) -> Iterator[tuple[FunctionalModule, DifferentiableOptimizer]]:
    """The inner loops of ``options.tasks`` tasks as one: fast weights with a leading task dimension."""
    tasks, device, track_higher_grads = cast(int, options.tasks), options.device, options.track_higher_grads
    fmodel = batched._patched(model, tasks, device, options.copy_initial_weights, track_higher_grads, "different")
    diffopt = batched._optimizer(
        opt,
        fmodel._hg_core.params,
        fmodel,
        tasks,
        device,
        options.override,
        track_higher_grads,
        first_order=options.first_order,
    )
    yield fmodel, diffopt


def _traced(
    model: torch.nn.Module, opt: torch.optim.Optimizer, options: _Options
) -> Iterator[tuple[FunctionalModule, DifferentiableOptimizer]]:
    """An inner loop that ``torch.compile`` traces: the traced fmodel, per task or task-batched."""
    device, track_higher_grads = options.device, options.track_higher_grads
    traced = compiled.traced_innerloop(
        model,
        device=device,
        copy_initial_weights=options.copy_initial_weights,
        track_higher_grads=track_higher_grads,
        share_buffers=options.share_buffers,
        initial_params=options.initial_params,
        tasks=options.tasks,
    )
    reference = traced._hg_originals
    if options.tasks is None:
        diffopt = get_diff_optim(
            opt,
            reference,
            fmodel=cast(Any, traced),
            device=device,
            override=options.override,
            track_higher_grads=track_higher_grads,
            first_order=options.first_order,
        )
    else:
        diffopt = batched._optimizer(
            opt,
            reference,
            traced,
            options.tasks,
            device,
            options.override,
            track_higher_grads,
            first_order=options.first_order,
        )
    compiled.show_params(diffopt, traced)
    yield cast(FunctionalModule, traced), diffopt


def _data_parallel(
    ddp: Any, opt: torch.optim.Optimizer, options: _Options
) -> Iterator[tuple[FunctionalModule, DifferentiableOptimizer]]:
    """A ``DistributedDataParallel`` model: the local mode runs on ``ddp.module``, and the
    meta-gradients that reach the model are averaged over ranks once per backward pass."""
    sync = _ddp._sync_for(ddp)
    model = cast(torch.nn.Module, ddp.module)
    try:
        with _opened(_local_mode(options), model, opt, options) as (fmodel, diffopt):
            if not options.copy_initial_weights or options.initial_params is not None:  # meta-gradients reach the model
                _ddp._attach(fmodel, ddp, sync)
            yield fmodel, diffopt
    except Exception as error:
        _ddp._report_error(sync.group, error)  # the other ranks fail with it instead of hanging
        raise


@contextlib.contextmanager
def _opened(
    mode: _Mode, model: Any, opt: torch.optim.Optimizer, options: _Options
) -> Iterator[tuple[Any, DifferentiableOptimizer]]:
    """``mode`` as a context manager (for a mode that runs another inside it)."""
    yield from mode(model, opt, options)
