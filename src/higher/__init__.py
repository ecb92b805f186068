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
from .innerloop import innerloop_ctx
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
