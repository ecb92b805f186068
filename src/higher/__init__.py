"""higher: differentiate through optimization loops in PyTorch.

The drop-in successor of facebookresearch/higher 0.2.1: wrap an ``nn.Module`` and a
``torch.optim`` optimizer, unroll the optimizer differentiably, and backpropagate through the
whole inner loop (meta-learning, hyperparameter optimization, learned optimizers)::

    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for x, y in support:
            diffopt.step(loss_fn(fmodel(x), y))
        loss_fn(fmodel(xq), yq).backward()   # meta-gradient reaches model.parameters()
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, cast

import torch

from . import (
    batched,
    checkpointing,
    compiled,
    distributed,
    forward_mode,
    hypergradients,
    implicit,
    optim,
    patch,
    rules,
    utils,
)
from .checkpointing import CheckpointedUnroll, checkpointed_unroll
from .forward_mode import ForwardHypergradient, forward_hypergradient
from .implicit import ImplicitHypergradient, implicit_hypergradient
from .optim import DifferentiableOptimizer, PerParameter, PerStep, create_diff_optim, get_diff_optim, register_optim
from .patch import FunctionalModule, monkeypatch

__version__ = "1.0.0.dev0"

__all__ = [
    "CheckpointedUnroll",
    "DifferentiableOptimizer",
    "ForwardHypergradient",
    "FunctionalModule",
    "ImplicitHypergradient",
    "PerParameter",
    "PerStep",
    "batched",
    "checkpointed_unroll",
    "checkpointing",
    "compiled",
    "create_diff_optim",
    "distributed",
    "forward_hypergradient",
    "forward_mode",
    "get_diff_optim",
    "hypergradients",
    "implicit",
    "implicit_hypergradient",
    "innerloop_ctx",
    "monkeypatch",
    "optim",
    "patch",
    "register_optim",
    "rules",
    "utils",
]


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
    does (see :mod:`higher.distributed`).

    Nothing is torn down on exit: both objects stay usable after the ``with`` block.
    """
    if compiled.tracing():  # torch.compile is tracing this inner loop: the traced fmodel (higher.compiled)
        if distributed.is_ddp(model):
            raise NotImplementedError(
                "innerloop_ctx of a DistributedDataParallel model cannot be traced by torch.compile; compile "
                "the inner loop of ddp.module (and all-reduce the meta-gradients outside), or run it eagerly."
            )
        if tasks is not None:
            batched._refuse_unbatched_options(share_buffers, initial_params)
        traced = compiled.traced_innerloop(
            model,
            device=device,
            copy_initial_weights=copy_initial_weights,
            track_higher_grads=track_higher_grads,
            share_buffers=share_buffers,
            initial_params=initial_params,
            tasks=None if tasks is None else batched._check_tasks(tasks),
        )
        make_optimizer = get_diff_optim if tasks is None else batched.get_diff_optim
        diffopt = make_optimizer(
            opt,
            list(model.parameters()),
            fmodel=cast(Any, traced),
            device=device,
            override=override,
            track_higher_grads=track_higher_grads,
            first_order=first_order,
        )
        compiled.show_params(diffopt, traced)
        yield cast(FunctionalModule, traced), diffopt
        return
    ddp = model if distributed.is_ddp(model) else None
    if ddp is not None:  # the inner loops run on the wrapped model; the all-reduce is arranged below
        sync = distributed._sync_for(ddp)
        model = cast(torch.nn.Module, ddp.module)
        try:
            with innerloop_ctx(
                model,
                opt,
                device,
                copy_initial_weights,
                override,
                track_higher_grads,
                first_order=first_order,
                share_buffers=share_buffers,
                initial_params=initial_params,
                tasks=tasks,
            ) as (fmodel, diffopt):
                if not copy_initial_weights or initial_params is not None:  # meta-gradients reach the model
                    distributed._attach(fmodel, ddp, sync)
                yield fmodel, diffopt
        except Exception as error:
            distributed._report_error(sync.group, error)  # the other ranks fail with it instead of hanging
            raise
        return
    if tasks is not None:
        batched._refuse_unbatched_options(share_buffers, initial_params)
        with batched.innerloop_ctx(
            model,
            opt,
            tasks,
            device=device,
            copy_initial_weights=copy_initial_weights,
            override=override,
            track_higher_grads=track_higher_grads,
            first_order=first_order,
        ) as pair:
            yield pair
        return
    fmodel = monkeypatch(
        model,
        device,
        copy_initial_weights=copy_initial_weights,
        track_higher_grads=track_higher_grads,
        share_buffers=share_buffers,
        initial_params=initial_params,
    )
    diffopt = get_diff_optim(
        opt,
        fmodel._hg_core.origins,
        fmodel=fmodel,
        device=device,
        override=override,
        track_higher_grads=track_higher_grads,
        first_order=first_order,
    )
    yield fmodel, diffopt
