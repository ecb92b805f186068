"""Forward-mode hypergradients: memory independent of the number of inner steps.

Reverse mode (``outer_loss.backward()`` through the unroll) keeps the whole unroll for the
backward pass. Forward mode (Franceschi, Donini, Frasconi & Pontil 2017, "Forward and Reverse
Gradient-Based Hyperparameter Optimization", ICML) instead carries, along with the inner loop,
the derivative of the fast weights and optimizer state with respect to one hyperparameter
direction: at every step ``d theta_{t+1} = (d Phi/d theta) d theta_t + (d Phi/d s) d s_t + d Phi/d lambda``,
and at the end ``d outer/d lambda . e = (d outer/d theta_T) d theta_T + d outer/d lambda``. Nothing
of earlier steps is kept, so memory is that of one step however long the unroll; the price is
one pass per scalar hyperparameter (per entry of a hyperparameter tensor). It pays when there
are few hyperparameters (learning rate, momentum, weight decay, a few per-layer values) and many
steps; reverse mode (or :func:`higher.checkpointed_unroll`) pays for many hyperparameters.

Here the tangents are carried by ``torch.autograd.forward_ad`` dual tensors through higher's own
inner loop: the hyperparameters enter as dual tensors (through ``override`` and the inner loss),
the inner gradient is taken by reverse mode on dual tensors (forward-over-reverse: the tangent of
the gradient is the Hessian-vector product), and the update rules of :mod:`higher.rules` run on
dual tensors unchanged. After each step the fast weights and optimizer state are cut from the
reverse graph, and each step runs in its own forward-AD level with the tangents carried across as
plain tensors (a level keeps every tangent made in it until it exits), so memory stays flat.

The update rules' square roots keep :func:`higher.rules.sqrt0`'s convention in forward mode too
(tangent 0 where a second-moment entry is exactly 0, e.g. a bias before BatchNorm), so adaptive
optimizers give reverse mode's finite hypergradients. Random forwards (dropout) draw the same
numbers in every pass: each pass starts from the random generators' state at the call.

Limits: one pass per scalar hyperparameter; no task-batched mode (``tasks=T``; a first
attempt failed in the batched optimizer's gradient step, not investigated yet);
``F.mse_loss`` with ``reduction='mean'`` cannot be differentiated forward-over-reverse in
torch 2.13 (write it out).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from .implicit import _scalar_result
from .innerloop import innerloop_ctx
from .patch import FunctionalModule
from .utils import get_random_state, random_devices, set_random_state

__all__ = ["ForwardHypergradient", "forward_hypergradient"]

InnerLoss = Callable[[FunctionalModule, int, list[Tensor]], Tensor]
OuterLoss = Callable[[FunctionalModule, list[Tensor]], Tensor]
Override = Callable[[list[Tensor]], dict[str, Any]]


@dataclass
class ForwardHypergradient:
    """The result of :func:`forward_hypergradient`.

    Attributes:
        hypergradients: d outer loss / d hyperparameter, one tensor per hyperparameter (its shape).
        outer_loss: the outer loss at the end of the unroll (detached).
        passes: the number of unrolls run (one per scalar hyperparameter entry).
    """

    hypergradients: list[Tensor]
    outer_loss: Tensor
    passes: int


_ZERO_TENSOR = (
    "forward_hypergradient: torch could not differentiate the inner loss in forward-over-reverse mode "
    "('ZeroTensors are immutable'). In torch 2.13 this happens with F.mse_loss(..., reduction='mean') when the "
    "target has no tangent; write the loss out, e.g. (prediction - target).pow(2).mean(), or use reduction='sum'."
)


def _duals(values: list[Tensor], tangents: list[Tensor]) -> list[Tensor]:
    return [fwAD.make_dual(v, t) for v, t in zip(values, tangents)]


def _split(value: Any, zeros: bool) -> Any:
    """``(primal, tangent)`` of a tensor, detached (tangent ``None`` if it has none, or zeros)."""
    if not isinstance(value, Tensor):
        return value
    primal, tangent = fwAD.unpack_dual(value)
    if tangent is None and zeros and value.is_floating_point():
        tangent = torch.zeros_like(primal)
    return (primal.detach(), None if tangent is None else tangent.detach())


def _carry(params: list[Tensor], diffopt: Any, zeros: bool = False) -> tuple[list[Any], list[Any]]:
    """The fast weights and optimizer state as plain ``(primal, tangent)`` pairs, to cross a level."""
    state = [
        {k: {key: _split(v, zeros) for key, v in st.items()} for k, st in group.items()} for group in diffopt.state
    ]
    return [_split(p, True) for p in params], state


def _join(pair: Any, requires_grad: bool = False) -> Any:
    if not isinstance(pair, tuple):
        return pair
    primal, tangent = pair
    primal = primal.detach()
    if requires_grad:
        primal = primal.requires_grad_()
    return primal if tangent is None else fwAD.make_dual(primal, tangent)


def _install(fmodel: Any, diffopt: Any, carried: tuple[list[Any], list[Any]], flags: list[bool]) -> None:
    params, state = carried
    fmodel.update_params([_join(p, f) for p, f in zip(params, flags)])
    for group, saved in zip(diffopt.state, state):
        for k, st in saved.items():
            group[k] = {key: _join(v) for key, v in st.items()}


def _check(hyperparameters: Any, steps: Any) -> list[Tensor]:
    hyperparameters = list(hyperparameters)
    if not hyperparameters:
        raise ValueError("forward_hypergradient needs at least one hyperparameter tensor")
    for i, h in enumerate(hyperparameters):
        if not isinstance(h, Tensor) or not h.is_floating_point():
            raise TypeError(f"hyperparameters[{i}] must be a floating-point tensor, got {type(h).__name__}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    return hyperparameters


@torch.enable_grad()  # the inner gradients need reverse mode, also when called inside torch.no_grad()
def forward_hypergradient(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    hyperparameters: Sequence[Tensor],
    inner_loss: InnerLoss,
    outer_loss: OuterLoss,
    steps: int,
    *,
    override: Override | None = None,
    device: torch.device | str | None = None,
) -> ForwardHypergradient:
    """The hypergradient of ``outer_loss`` after ``steps`` inner steps, by forward mode.

    Args:
        model, opt: the model and the inner ``torch.optim`` optimizer (as for
            :func:`higher.innerloop_ctx`, with ``copy_initial_weights=True``); never modified.
        hyperparameters: the tensors to differentiate with respect to (their values are used;
            they need not require grad).
        inner_loss: ``inner_loss(fmodel, t, hyper)``: step ``t``'s loss, where ``hyper`` are the
            hyperparameters to use (the same values, carrying tangents); use them instead of
            ``hyperparameters`` wherever they enter the inner loss (e.g. a regularisation strength).
        outer_loss: ``outer_loss(fmodel, hyper)``: the loss of the final fast weights.
        steps: the number of inner steps.
        override: ``override(hyper)`` returns the ``override`` dictionary of
            :func:`higher.innerloop_ctx` built from ``hyper`` (e.g. ``lambda h: {"lr": [h[0]]}``,
            ``{"lr": [higher.PerStep(list(h[0]))]}`` for a learned schedule,
            ``{"lr": [higher.PerParameter(h)]}`` for per-parameter rates).
        device: as for :func:`higher.innerloop_ctx`.

    Gradients are enabled inside (the result is the same when called under ``torch.no_grad()``).

    Returns:
        A :class:`ForwardHypergradient`. Memory is that of one inner step; time is one unroll per
        scalar entry of the hyperparameters.
    """

    hyperparameters = _check(hyperparameters, steps)
    if override is not None and not callable(override):
        raise TypeError(
            f"override must be a function of the hyperparameters that returns innerloop_ctx's override "
            f"(e.g. override=lambda h: {{'lr': [h[0]]}}), got a {type(override).__name__}: the hyperparameters "
            f"must enter it as the tangent-carrying tensors forward_hypergradient passes."
        )
    values = [h.detach() for h in hyperparameters]
    sizes = [h.numel() for h in values]
    total = sum(sizes)
    flat = torch.zeros(total, dtype=values[0].dtype, device=values[0].device)
    out_value: Tensor | None = None
    # Every direction's unroll must see the same random numbers (dropout): each starts from the
    # generators' state at the call, and the call leaves them as one unroll would.
    devices = random_devices(model.parameters())
    random_state = get_random_state(devices)
    for direction in range(total):
        if direction:
            set_random_state(random_state, devices)
        tangents = []
        offset = 0
        for value, size in zip(values, sizes):
            tangent = torch.zeros(size, dtype=value.dtype, device=value.device)
            if offset <= direction < offset + size:
                tangent[direction - offset] = 1
            tangents.append(tangent.view_as(value))
            offset += size
        # Each step runs in its own forward-AD level, the tangents carried across as plain tensors:
        # a level keeps every tangent created in it until it exits (memory growing with the steps).
        with fwAD.dual_level():
            hyper = _duals(values, tangents)
            with innerloop_ctx(
                model,
                opt,
                device=device,
                copy_initial_weights=True,
                override=override(hyper) if override is not None else None,
                first_order=True,
            ) as (fmodel, diffopt):
                fmodel.track_higher_grads = False  # keep only the latest fast weights
                diffopt._steps_without_graph = True  # the updates below run under no_grad on purpose
                flags = [p.requires_grad for p in fmodel.parameters()]
                # Explicit zero tangents: the autograd engine cannot accumulate into the implicit
                # (immutable) zero tangent of a tensor without one.
                carried = _carry(list(fmodel.parameters()), diffopt, zeros=True)
        for t in range(steps):
            with fwAD.dual_level():
                hyper = _duals(values, tangents)
                _install(fmodel, diffopt, carried, flags)
                loss = inner_loss(fmodel, t, hyper)
                try:
                    # The update needs no reverse-mode graph (the fast weights are cut after it
                    # anyway); forward mode works without one. Under no_grad, sqrt0 is torch.sqrt.
                    with torch.no_grad():
                        diffopt.step(loss, override=override(hyper) if override is not None else None)
                except RuntimeError as error:
                    if "ZeroTensors are immutable" not in str(error):
                        raise
                    raise RuntimeError(_ZERO_TENSOR) from error
                carried = _carry(list(fmodel.parameters()), diffopt)
        with fwAD.dual_level():
            hyper = _duals(values, tangents)
            _install(fmodel, diffopt, carried, flags)
            loss = _scalar_result(outer_loss(fmodel, hyper), "outer_loss")
            primal, tangent = fwAD.unpack_dual(loss)
            flat[direction] = 0 if tangent is None else tangent.detach().reshape(())
            out_value = primal.detach().reshape(())
    grads = list(torch.split(flat, sizes)) if total else []
    assert out_value is not None or total == 0
    return ForwardHypergradient(
        [g.view_as(v) for g, v in zip(grads, values)],
        out_value if out_value is not None else torch.tensor(math.nan),
        total,
    )
