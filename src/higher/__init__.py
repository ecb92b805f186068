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
from collections.abc import Iterator
from typing import Any

import torch

from . import batched, optim, patch, rules, utils
from .optim import DifferentiableOptimizer, create_diff_optim, get_diff_optim, register_optim
from .patch import FunctionalModule, monkeypatch

__version__ = "1.0.0.dev0"

__all__ = [
    "DifferentiableOptimizer",
    "FunctionalModule",
    "batched",
    "create_diff_optim",
    "get_diff_optim",
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
        tasks: run the inner loops of ``tasks`` tasks at once (task-batched mode, see
            :mod:`higher.batched`): fast weights get a leading task dimension, ``fmodel(x)``
            takes ``x`` with a leading task dimension, and ``diffopt.step`` takes the per-task
            losses (shape ``[tasks]``).

    Nothing is torn down on exit: both objects stay usable after the ``with`` block.
    """
    if tasks is not None:
        with batched.innerloop_ctx(
            model,
            opt,
            tasks,
            device=device,
            copy_initial_weights=copy_initial_weights,
            override=override,
            track_higher_grads=track_higher_grads,
        ) as pair:
            yield pair
        return
    fmodel = monkeypatch(
        model, device, copy_initial_weights=copy_initial_weights, track_higher_grads=track_higher_grads
    )
    diffopt = get_diff_optim(
        opt,
        fmodel._hg_core.params,
        fmodel=fmodel,
        device=device,
        override=override,
        track_higher_grads=track_higher_grads,
    )
    yield fmodel, diffopt
