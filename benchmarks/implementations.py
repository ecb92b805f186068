"""The implementations compared: one MAML meta-iteration each, written as their users write it.

A meta-iteration is: for every task of the meta-batch, ``inner_steps`` differentiable optimizer
steps on the support set from the model's weights, then the query loss after them; the mean of
the query losses over tasks is backpropagated to ``model.parameters()`` (their ``.grad``).
Per-task implementations call ``backward`` once per task (the usual higher/TorchOpt pattern,
which frees each task's graph early); batched ones once per meta-batch.

The inner optimizer is ``"sgd"`` (plain SGD) or ``"adam"`` (``torch.optim.Adam``'s math, default
betas and eps). ``build(workload, model, data, optimizer)`` returns a function that runs one
meta-iteration on ``model`` (each implementation gets its own copy of the same model).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from . import competitors
from .workloads import Workload

Data = tuple[Tensor, Tensor, Tensor, Tensor]
MetaIteration = Callable[[], None]
BETAS, EPS = (0.9, 0.999), 1e-8


@dataclass(frozen=True)
class Implementation:
    """A competitor: its name in tables, whether it runs tasks one by one or batched, how to build it."""

    name: str
    label: str
    batched: bool
    build: Callable[[Workload, nn.Module, Data, str], MetaIteration]
    competitor: bool = False  # needs .bench/ (benchmarks/run.py --setup)
    note: str = ""


# ------------------------------------------------------------------ hand-written update rules
# What a user writes by hand: plain tensor arithmetic, new tensors every step.
def sgd_update(params: list[Tensor], grads: list[Tensor], lr: float) -> list[Tensor]:
    return [p - lr * g for p, g in zip(params, grads)]


def _sqrt_zero_slope(x: Tensor) -> Tensor:
    """sqrt whose derivative at 0 is 0 (plain sqrt's is infinite: 0 * inf = NaN meta-gradients)."""
    positive = x > 0
    return torch.where(positive, x, torch.ones_like(x)).sqrt() * positive


def adam_update(
    params: list[Tensor], grads: list[Tensor], state: dict, lr: float, sqrt: Callable[[Tensor], Tensor] = torch.sqrt
) -> tuple[list[Tensor], dict]:
    """torch.optim.Adam's math (bias-corrected moments, eps added after the bias correction).

    With the plain ``sqrt`` (as users write it, and as timed), a gradient entry that is exactly 0
    at every step so far (a dead ReLU unit) makes the meta-gradient NaN; the meta-gradient check
    uses ``_sqrt_zero_slope`` instead, the convention of the original higher and of ours.
    """
    beta1, beta2 = BETAS
    step = state.get("step", 0) + 1
    m = [beta1 * m + (1 - beta1) * g for m, g in zip(state.get("m") or [torch.zeros_like(p) for p in params], grads)]
    v = [
        beta2 * v + (1 - beta2) * g * g for v, g in zip(state.get("v") or [torch.zeros_like(p) for p in params], grads)
    ]
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    new = [
        p - (lr / bias_correction1) * mi / (sqrt(vi) / bias_correction2_sqrt + EPS) for p, mi, vi in zip(params, m, v)
    ]
    return new, {"step": step, "m": m, "v": v}


#: Set by the meta-gradient check: hand-written Adam with a derivative of 0 at sqrt(0).
CHECKING = {"safe_sqrt": False}


@contextlib.contextmanager
def safe_sqrt() -> Iterator[None]:
    """The meta-gradient check's setting, for the loops built inside the block: hand-written Adam takes
    a ``sqrt`` whose derivative at 0 is 0 (with the plain one, an exactly-zero gradient entry, such as
    a dead ReLU unit's, makes the whole meta-gradient NaN)."""
    previous = CHECKING["safe_sqrt"]
    CHECKING["safe_sqrt"] = True
    try:
        yield
    finally:
        CHECKING["safe_sqrt"] = previous


def _hand_update(optimizer: str, lr: float):
    """An ``update(params, grads, state) -> (params, state)`` closure for the hand-written loops."""
    if optimizer == "sgd":
        return lambda params, grads, state: (sgd_update(params, grads, lr), state)
    sqrt = _sqrt_zero_slope if CHECKING["safe_sqrt"] else torch.sqrt
    return lambda params, grads, state: adam_update(params, grads, state, lr, sqrt)


# ------------------------------------------------------------------ per task
def build_loop(workload: Workload, model: nn.Module, data: Data, optimizer: str) -> MetaIteration:
    """Hand-written: torch.func.functional_call + torch.autograd.grad(create_graph=True)."""
    support_x, support_y, query_x, query_y = data
    names = [name for name, _ in model.named_parameters()]
    params = list(model.parameters())
    update = _hand_update(optimizer, workload.lr[optimizer])
    loss_fn, tasks, steps = workload.loss, workload.tasks, workload.inner_steps

    def meta_iteration() -> None:
        for t in range(tasks):
            fast, state = params, {}
            for _ in range(steps):
                loss = loss_fn(functional_call(model, dict(zip(names, fast)), (support_x[t],)), support_y[t])
                grads = torch.autograd.grad(loss, fast, create_graph=True)
                fast, state = update(fast, grads, state)
            query_loss = loss_fn(functional_call(model, dict(zip(names, fast)), (query_x[t],)), query_y[t])
            (query_loss / tasks).backward()

    return meta_iteration


def _torch_optimizer(model: nn.Module, workload: Workload, optimizer: str) -> torch.optim.Optimizer:
    lr = workload.lr[optimizer]
    if optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    return torch.optim.Adam(model.parameters(), lr=lr, betas=BETAS, eps=EPS)


def _build_higher_style(package) -> Callable[[Workload, nn.Module, Data, str], MetaIteration]:
    """The higher (0.2.1 or ours) MAML loop, exactly as users write it."""

    def build(workload: Workload, model: nn.Module, data: Data, optimizer: str) -> MetaIteration:
        support_x, support_y, query_x, query_y = data
        inner_opt = _torch_optimizer(model, workload, optimizer)
        loss_fn, tasks, steps = workload.loss, workload.tasks, workload.inner_steps

        def meta_iteration() -> None:
            for t in range(tasks):
                with package.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
                    for _ in range(steps):
                        diffopt.step(loss_fn(fmodel(support_x[t]), support_y[t]))
                    (loss_fn(fmodel(query_x[t]), query_y[t]) / tasks).backward()

        return meta_iteration

    return build


def build_ours(workload: Workload, model: nn.Module, data: Data, optimizer: str) -> MetaIteration:
    import higher

    return _build_higher_style(higher)(workload, model, data, optimizer)


def build_original(workload: Workload, model: nn.Module, data: Data, optimizer: str) -> MetaIteration:
    return _build_higher_style(competitors.load_original())(workload, model, data, optimizer)


def build_torchopt(workload: Workload, model: nn.Module, data: Data, optimizer: str) -> MetaIteration:
    """TorchOpt's object-oriented API (MetaSGD/MetaAdam), as in its MAML examples."""
    torchopt = competitors.load_torchopt()
    support_x, support_y, query_x, query_y = data
    lr = workload.lr[optimizer]
    if optimizer == "sgd":
        inner_opt = torchopt.MetaSGD(model, lr=lr)
    else:
        inner_opt = torchopt.MetaAdam(model, lr=lr, betas=BETAS, eps=EPS)
    loss_fn, tasks, steps = workload.loss, workload.tasks, workload.inner_steps

    def meta_iteration() -> None:
        net_state = torchopt.extract_state_dict(model, by="reference", detach_buffers=True)
        opt_state = torchopt.extract_state_dict(inner_opt, by="reference")
        for t in range(tasks):
            for _ in range(steps):
                inner_opt.step(loss_fn(model(support_x[t]), support_y[t]))
            (loss_fn(model(query_x[t]), query_y[t]) / tasks).backward()
            torchopt.recover_state_dict(model, net_state)
            torchopt.recover_state_dict(inner_opt, opt_state)

    return meta_iteration


# ------------------------------------------------------------------ batched over tasks
def build_vmap(workload: Workload, model: nn.Module, data: Data, optimizer: str) -> MetaIteration:
    """Hand-written: fast weights with a task dimension, the forward vmapped over tasks."""
    support_x, support_y, query_x, query_y = data
    names = [name for name, _ in model.named_parameters()]
    params = list(model.parameters())
    update = _hand_update(optimizer, workload.lr[optimizer])
    tasks, steps = workload.tasks, workload.inner_steps
    forward = vmap(lambda fast, x: functional_call(model, dict(zip(names, fast)), (x,)))
    task_losses = vmap(workload.loss)

    def meta_iteration() -> None:
        fast, state = [p.expand(tasks, *p.shape) for p in params], {}
        for _ in range(steps):
            loss = task_losses(forward(fast, support_x), support_y).sum()
            grads = torch.autograd.grad(loss, fast, create_graph=True)
            fast, state = update(fast, grads, state)
        task_losses(forward(fast, query_x), query_y).mean().backward()

    return meta_iteration


def vmap_grad_meta_loss(workload: Workload, model: nn.Module, optimizer: str) -> Callable[..., Tensor]:
    """torch.func style: ``meta_loss(params, sx, sy, qx, qy)``, the mean over tasks (``vmap``) of the
    query loss after an inner loop written with ``torch.func.grad``."""
    update = _hand_update(optimizer, workload.lr[optimizer])
    loss_fn, steps = workload.loss, workload.inner_steps

    def task_loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(functional_call(model, params, (x,)), y)

    task_grad = grad(task_loss)

    def query_loss(params: dict[str, Tensor], sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
        names, fast, state = list(params), list(params.values()), {}
        for _ in range(steps):
            grads = task_grad(dict(zip(names, fast)), sx, sy)
            fast, state = update(fast, list(grads.values()), state)
        return task_loss(dict(zip(names, fast)), qx, qy)

    def meta_loss(params: dict[str, Tensor], sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
        return vmap(query_loss, in_dims=(None, 0, 0, 0, 0))(params, sx, sy, qx, qy).mean()

    return meta_loss


def build_vmap_grad(workload: Workload, model: nn.Module, data: Data, optimizer: str) -> MetaIteration:
    """Hand-written, torch.func style: vmap over tasks of an inner loop built with torch.func.grad."""
    meta_loss = vmap_grad_meta_loss(workload, model, optimizer)

    def meta_iteration() -> None:
        meta_loss(dict(model.named_parameters()), *data).backward()

    return meta_iteration


def build_ours_batched(workload: Workload, model: nn.Module, data: Data, optimizer: str) -> MetaIteration:
    """Ours, task-batched: ``innerloop_ctx(..., tasks=T)``; the step takes the per-task losses."""
    import higher

    support_x, support_y, query_x, query_y = data
    inner_opt = _torch_optimizer(model, workload, optimizer)
    task_losses = vmap(workload.loss)
    tasks, steps = workload.tasks, workload.inner_steps

    def meta_iteration() -> None:
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False, tasks=tasks) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(task_losses(fmodel(support_x), support_y))
            task_losses(fmodel(query_x), query_y).mean().backward()

    return meta_iteration


IMPLEMENTATIONS: dict[str, Implementation] = {
    impl.name: impl
    for impl in (
        Implementation("loop", "hand-written loop", False, build_loop),
        Implementation("original", "higher 0.2.1", False, build_original, competitor=True),
        Implementation("torchopt", "TorchOpt 0.7.3", False, build_torchopt, competitor=True),
        Implementation("ours", "ours (innerloop_ctx)", False, build_ours),
        Implementation("vmap", "hand-written vmap", True, build_vmap),
        Implementation("vmap_grad", "hand-written vmap(grad)", True, build_vmap_grad),
        Implementation("ours_batched", "ours batched (tasks=T)", True, build_ours_batched),
    )
}
