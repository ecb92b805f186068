"""Hand-written references for the patched model: a MAML unroll written with torch.func only.

``reference_meta_grads`` is what ``higher.innerloop_ctx(model, SGD, copy_initial_weights=False)``
must reproduce: ``torch.func.functional_call`` for the forward (parameters and buffers swapped in,
buffers copied first so that the model's own are never touched), ``torch.autograd.grad`` with
``create_graph=True`` for the inner gradients, plain SGD ``p - lr * g``, and the gradient of the
query loss with respect to the model's parameters. ``higher_meta_grads`` is the same loop written
with higher, as a user writes it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

import higher


def first_tensor(output: Any) -> Tensor:
    """The first tensor of a module output (an LSTM returns ``(out, (h, c))``)."""
    while isinstance(output, (tuple, list)):
        output = output[0]
    return output


def mean_square(output: Any, target: Tensor | None = None) -> Tensor:
    """Mean squared error to ``target`` (to zero if ``None``) of the first output tensor."""
    output = first_tensor(output)
    return (output if target is None else output - target).pow(2).mean()


def higher_meta_grads(
    model: nn.Module,
    support: Sequence[Any],
    query: Sequence[Any],
    *,
    steps: int,
    support_target: Tensor | None = None,
    query_target: Tensor | None = None,
    lr: float | Tensor = 0.1,
    loss_fn: Callable[[Any, Tensor | None], Tensor] = mean_square,
) -> tuple[Tensor, dict[str, Tensor | None]]:
    """MAML with higher: SGD inner loop, ``copy_initial_weights=False``, ``meta_loss.backward()``."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    # A tensor lr (a hyperparameter to differentiate) goes through override, as users write it.
    opt = torch.optim.SGD(trainable, lr=0.0 if isinstance(lr, Tensor) else lr)
    override = {"lr": [lr]} if isinstance(lr, Tensor) else None
    model.zero_grad(set_to_none=True)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, override=override) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(loss_fn(fmodel(*support), support_target))
        meta_loss = loss_fn(fmodel(*query), query_target)
    meta_loss.backward()
    return meta_loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def reference_unroll(
    model: nn.Module,
    support: Sequence[Any],
    query: Sequence[Any],
    *,
    steps: int,
    support_target: Tensor | None = None,
    query_target: Tensor | None = None,
    lr: float | Tensor = 0.1,
    loss_fn: Callable[[Any, Tensor | None], Tensor] = mean_square,
) -> Tensor:
    """The meta-loss of the same MAML loop, written with torch.func.functional_call."""
    fast = dict(model.named_parameters())  # tied parameters appear once; functional_call re-ties them
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    for _ in range(steps):
        loss = loss_fn(functional_call(model, (fast, buffers), tuple(support)), support_target)
        names = [name for name, p in fast.items() if p.requires_grad]
        grads = torch.autograd.grad(loss, [fast[n] for n in names], create_graph=True, allow_unused=True)
        fast = {**fast, **{n: fast[n] - lr * g for n, g in zip(names, grads) if g is not None}}
    return loss_fn(functional_call(model, (fast, buffers), tuple(query)), query_target)


def reference_meta_grads(
    model: nn.Module,
    support: Sequence[Any],
    query: Sequence[Any],
    *,
    steps: int,
    support_target: Tensor | None = None,
    query_target: Tensor | None = None,
    lr: float | Tensor = 0.1,
    loss_fn: Callable[[Any, Tensor | None], Tensor] = mean_square,
) -> tuple[Tensor, dict[str, Tensor | None]]:
    """Meta-loss and its gradient with respect to every trainable parameter of ``model``."""
    meta_loss = reference_unroll(
        model,
        support,
        query,
        steps=steps,
        support_target=support_target,
        query_target=query_target,
        lr=lr,
        loss_fn=loss_fn,
    )
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(meta_loss, [p for _, p in named], allow_unused=True)
    result: dict[str, Tensor | None] = {name: None for name, _ in model.named_parameters()}
    result.update({name: g for (name, _), g in zip(named, grads)})
    return meta_loss.detach(), result


def max_difference(ours: dict[str, Tensor | None], reference: dict[str, Tensor | None]) -> float:
    """Largest absolute difference between two gradient dicts; they must agree on which are None."""
    assert ours.keys() == reference.keys()
    worst = 0.0
    for name in ours:
        a, b = ours[name], reference[name]
        assert (a is None) == (b is None), f"{name}: gradient {'missing' if a is None else 'unexpected'}"
        if a is not None:
            worst = max(worst, float((a - b).abs().max()))
    return worst


def largest_gradient(grads: dict[str, Tensor | None]) -> float:
    return max((float(g.abs().max()) for g in grads.values() if g is not None), default=0.0)
