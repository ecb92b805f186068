"""Meta-learning algorithms in a few lines each, on higher's public API.

Every function here works with any ``nn.Module`` and any ``torch.optim`` optimizer that higher
supports as the inner optimizer (build it over the model's parameters, or over the part that the
inner loop should adapt). A *task* is any 4-tuple ``(support_x, support_y, query_x, query_y)``,
for instance a :class:`higher.data.Task`; ``loss_fn(prediction, target)`` returns a scalar.

The meta-gradient functions follow the ``loss.backward()`` convention: they *accumulate* into
``.grad`` of the meta-parameters (``model.parameters()``, learned learning rates, hyperparameter
tensors) and leave the outer optimizer step to the caller::

    meta_opt.zero_grad()
    loss = maml_step(model, inner_opt, tasks, F.mse_loss, inner_steps=1)
    meta_opt.step()

* :func:`maml_step` -- MAML, second order (Finn et al. 2017), or first order (``first_order=True``;
  Finn et al. 2017, discussed by Nichol et al. 2018).
* :class:`MetaSGD` -- learned per-parameter inner learning rates (Li et al. 2017).
* :func:`anil_step` -- ANIL: the inner loop adapts the head only (Raghu et al. 2020).
* :func:`unrolled_validation_loss` -- hypergradients of a validation loss with respect to the
  inner optimizer's hyperparameters, e.g. learning rate and momentum (Maclaurin et al. 2015;
  Franceschi et al. 2017).
* :func:`imaml_step` -- iMAML: implicit meta-gradients of a proximal inner problem (Rajeswaran
  et al. 2019), by conjugate gradient (:mod:`higher.implicit`).
* :func:`adapt` and :func:`adaptation_losses` -- fine-tune a copy of a model on a support set,
  the building block of all of the above and of evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .innerloop import innerloop_ctx
from .optim import PerParameter
from .patch import FunctionalModule

__all__ = [
    "adapt",
    "adaptation_losses",
    "maml_step",
    "MetaSGD",
    "anil_step",
    "unrolled_validation_loss",
    "imaml_step",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
TaskLike = Sequence[Tensor]


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"the number of inner steps must be a non-negative integer, got {steps!r}")


def _unpack(task: TaskLike) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if len(task) != 4:
        raise ValueError(f"a task is (support_x, support_y, query_x, query_y); got a sequence of {len(task)} items")
    support_x, support_y, query_x, query_y = task
    return support_x, support_y, query_x, query_y


def adapt(
    model: nn.Module,
    inner_opt: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    steps: int,
    *,
    copy_initial_weights: bool = False,
    track_higher_grads: bool = True,
    first_order: bool = False,
    override: Mapping[str, Any] | None = None,
) -> FunctionalModule:
    """Take ``steps`` differentiable steps of ``inner_opt`` on ``loss_fn(fmodel(x), y)``.

    Returns the fmodel, whose ``parameters()`` are the adapted weights and whose
    ``parameters(time=t)`` are the weights after ``t`` steps (see ``higher.innerloop_ctx`` for
    ``copy_initial_weights``, ``track_higher_grads`` and ``first_order``). The defaults give the
    MAML graph: a meta-loss computed from the fmodel backpropagates through all steps into
    ``model.parameters()``. ``first_order=True`` gives the first-order MAML gradient instead.
    With ``track_higher_grads=False`` it is plain fine-tuning of a copy (``model`` itself is
    never modified).
    """
    _check_steps(steps)
    with innerloop_ctx(
        model,
        inner_opt,
        copy_initial_weights=copy_initial_weights,
        track_higher_grads=track_higher_grads,
        override=dict(override) if override is not None else None,
        first_order=first_order,
    ) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(loss_fn(fmodel(x), y))
    return fmodel


def adaptation_losses(
    model: nn.Module,
    inner_opt: torch.optim.Optimizer,
    task: TaskLike,
    loss_fn: LossFn,
    steps: int,
    metric: LossFn | None = None,
) -> list[float]:
    """Fine-tune a copy of ``model`` on the support set; the query ``metric`` after 0..``steps`` steps.

    ``metric`` defaults to ``loss_fn`` (e.g. pass an accuracy function for classification).
    No graph is kept: this is for evaluation.
    """
    _check_steps(steps)
    support_x, support_y, query_x, query_y = _unpack(task)
    metric = loss_fn if metric is None else metric
    with innerloop_ctx(model, inner_opt, track_higher_grads=False) as (fmodel, diffopt):
        values = []
        for step in range(steps + 1):
            with torch.no_grad():
                values.append(float(metric(fmodel(query_x), query_y)))
            if step < steps:
                diffopt.step(loss_fn(fmodel(support_x), support_y))
    return values


def maml_step(
    model: nn.Module,
    inner_opt: torch.optim.Optimizer,
    tasks: Iterable[TaskLike],
    loss_fn: LossFn,
    inner_steps: int = 1,
    first_order: bool = False,
) -> float:
    """Accumulate the MAML meta-gradient of a batch of tasks into ``model.parameters()``' ``.grad``.

    Model-Agnostic Meta-Learning (Finn, Abbeel & Levine 2017, "Model-Agnostic Meta-Learning for
    Fast Adaptation of Deep Networks", ICML): for each task, adapt a copy of ``model`` with
    ``inner_steps`` steps of ``inner_opt`` on the support set, and differentiate the query loss
    of the adapted weights with respect to the *initial* weights, through the inner steps (second
    order). The meta-loss is the mean query loss over the tasks; its gradient is added to
    ``.grad`` (call ``meta_opt.zero_grad()`` before and ``meta_opt.step()`` after).

    ``first_order=True`` is first-order MAML (FOMAML; proposed in Finn et al. 2017 and analysed
    by Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms"): the inner
    gradients are taken without a graph (``innerloop_ctx(..., first_order=True)``), so the
    meta-gradient deposited into ``model.parameters()``' ``.grad`` is the gradient of the query
    loss *at the adapted weights* (the Jacobian of the adapted weights with respect to the
    initial ones is taken to be the identity). It needs no second derivatives.

    Args:
        model: the model whose initial weights are meta-learned (never modified here).
        inner_opt: a ``torch.optim`` optimizer over (some of) ``model``'s parameters; its
            hyperparameters and state define the inner loop. Parameters it does not track stay
            fixed in the inner loop and still receive meta-gradients.
        tasks: ``(support_x, support_y, query_x, query_y)`` tuples.
        loss_fn: ``loss_fn(prediction, target)``, used in the inner loop and for the query loss.
        inner_steps: the number of inner steps per task.
        first_order: use the first-order approximation.

    Returns:
        The mean query loss over the tasks after adaptation (a float).
    """
    _check_steps(inner_steps)
    tasks = list(tasks)
    if not tasks:
        raise ValueError("maml_step needs at least one task")
    losses = [
        _task_meta_gradient(model, inner_opt, task, loss_fn, inner_steps, first_order, len(tasks)) for task in tasks
    ]
    return sum(losses) / len(tasks)


def _task_meta_gradient(
    model: nn.Module,
    inner_opt: torch.optim.Optimizer,
    task: TaskLike,
    loss_fn: LossFn,
    inner_steps: int,
    first_order: bool,
    num_tasks: int,
) -> float:
    """Adapt on one task and backpropagate its query loss / ``num_tasks``; return the query loss."""
    support_x, support_y, query_x, query_y = _unpack(task)
    fmodel = adapt(model, inner_opt, support_x, support_y, loss_fn, inner_steps, first_order=first_order)
    query_loss = loss_fn(fmodel(query_x), query_y)
    (query_loss / num_tasks).backward()
    return float(query_loss.detach())


class MetaSGD(nn.Module):
    """Meta-SGD: meta-learn the initial weights *and* one inner learning rate per weight.

    Li, Zhou, Chen & Li 2017, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning": the
    inner update is ``w' = w - alpha * grad`` with ``alpha`` a learned tensor of the same shape as
    ``w`` (elementwise product), and both ``w`` and ``alpha`` are trained by the meta-gradient of
    the query loss.

    Implementation: the inner optimizer's ``lr`` is replaced (``override``) by
    ``higher.PerParameter(self.lrs)``, one learned tensor of each parameter's shape. higher's
    update rules are elementwise, so that tensor is exactly a per-weight learning rate, and its
    gradient is exact. With the default ``optimizer=torch.optim.SGD`` this is the paper's
    Meta-SGD; any other optimizer (``torch.optim.Adam``, ...) gives the same idea with that
    optimizer's update direction.

    Args:
        model: the model whose initial weights are meta-learned; kept as ``self.model``, so
            ``MetaSGD(model).parameters()`` holds both the weights and the learning rates.
        lr: the initial value of every learning rate.
        optimizer: the torch optimizer type whose update is used (default SGD).
        optimizer_kwargs: other hyperparameters of that optimizer (e.g. ``{"momentum": 0.9}``).

    Attributes:
        lrs: ``nn.ParameterList``, one learning-rate tensor per parameter of ``model``.
        inner_opt: the ``optimizer`` over ``model.parameters()``, never stepped itself: the inner
            loop's update rule and its other hyperparameters.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.01,
        optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        optimizer_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.lrs = nn.ParameterList([nn.Parameter(torch.full_like(p.detach(), float(lr))) for p in model.parameters()])
        options = dict(optimizer_kwargs or {})
        if "lr" in options:
            raise ValueError("give the initial learning rate as MetaSGD(model, lr=...), not in optimizer_kwargs")
        # Never stepped itself: it gives the inner loop its update rule and other hyperparameters.
        options["lr"] = float(lr)
        self.inner_opt = optimizer(model.parameters(), **options)

    def adapt(self, x: Tensor, y: Tensor, loss_fn: LossFn, steps: int = 1) -> FunctionalModule:
        """``steps`` inner updates with the learned learning rates; returns the adapted fmodel.

        The graph is kept, so a loss of the returned fmodel backpropagates into
        ``self.model.parameters()`` and into ``self.lrs``.
        """
        override = {"lr": PerParameter(list(self.lrs))}
        return adapt(self.model, self.inner_opt, x, y, loss_fn, steps, override=override)

    def meta_step(self, tasks: Iterable[TaskLike], loss_fn: LossFn, inner_steps: int = 1) -> float:
        """Accumulate the meta-gradient of the mean query loss into the weights' and ``lrs``' ``.grad``.

        Returns the mean query loss after adaptation.
        """
        tasks = list(tasks)
        if not tasks:
            raise ValueError("meta_step needs at least one task")
        total = 0.0
        for task in tasks:
            support_x, support_y, query_x, query_y = _unpack(task)
            fmodel = self.adapt(support_x, support_y, loss_fn, inner_steps)
            query_loss = loss_fn(fmodel(query_x), query_y)
            (query_loss / len(tasks)).backward()
            total += float(query_loss.detach())
        return total / len(tasks)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The unadapted model."""
        return self.model(*args, **kwargs)


def anil_step(
    body: nn.Module,
    head: nn.Module,
    inner_opt: torch.optim.Optimizer,
    tasks: Iterable[TaskLike],
    loss_fn: LossFn,
    inner_steps: int = 1,
    first_order: bool = False,
) -> float:
    """ANIL ("Almost No Inner Loop"): MAML whose inner loop adapts the head only.

    Raghu, Raghu, Bengio & Vinyals 2020, "Rapid Learning or Feature Reuse? Towards Understanding
    the Effectiveness of MAML" (ICLR): the model is ``head(body(x))``; in the inner loop the
    body's weights stay fixed and only the head is adapted, but both are meta-learned: the
    meta-gradient reaches the body through the features of the query set and (second order)
    through the features of the support set, which shape the head's update.

    The body runs once per task on the support and once on the query set (the inner loop never
    runs it again), so an inner step costs only the head's forward and backward pass.

    Args:
        body: the feature extractor (meta-learned, fixed in the inner loop).
        head: the part adapted in the inner loop.
        inner_opt: a ``torch.optim`` optimizer over ``head``'s parameters.
        tasks, loss_fn, inner_steps, first_order: as for :func:`maml_step`.

    Returns:
        The mean query loss over the tasks after adaptation. Meta-gradients are accumulated into
        ``.grad`` of the body's and the head's parameters.
    """
    _check_steps(inner_steps)
    tasks = list(tasks)
    if not tasks:
        raise ValueError("anil_step needs at least one task")
    total = 0.0
    for task in tasks:
        support_x, support_y, query_x, query_y = _unpack(task)
        support_features = body(support_x)
        if first_order:
            support_features = support_features.detach()
        head_task = (support_features, support_y, body(query_x), query_y)
        total += _task_meta_gradient(head, inner_opt, head_task, loss_fn, inner_steps, first_order, len(tasks))
    return total / len(tasks)


def unrolled_validation_loss(
    model: nn.Module,
    inner_opt: torch.optim.Optimizer,
    hyperparameters: Mapping[str, Any],
    train_batches: Iterable[tuple[Tensor, Tensor]],
    validation_batch: tuple[Tensor, Tensor],
    loss_fn: LossFn,
    copy_initial_weights: bool = True,
) -> tuple[Tensor, FunctionalModule]:
    """The validation loss after an unrolled inner loop, differentiable in the hyperparameters.

    Gradient-based hyperparameter optimization (Maclaurin, Duvenaud & Adams 2015, "Gradient-based
    Hyperparameter Optimization through Reversible Learning"; Franceschi, Donini, Frasconi &
    Pontil 2017, "Forward and Reverse Gradient-Based Hyperparameter Optimization"): train a copy
    of ``model`` with ``inner_opt`` for one step per batch of ``train_batches``, with the
    hyperparameters replaced by the given tensors (``override``), and return the loss on
    ``validation_batch`` of the trained weights. Its gradient with respect to those tensors
    (``loss.backward()``) is the exact hypergradient through every step of the loop (reverse
    mode). Any numeric hyperparameter of the optimizer can be learned (``lr``, ``momentum``,
    ``weight_decay``, ``betas``...); pass a transformed tensor, e.g. ``{"lr": log_lr.exp()}``,
    to keep a value in its valid range while learning an unconstrained one.

    Args:
        model: the model to train in the inner loop (never modified).
        inner_opt: the ``torch.optim`` optimizer whose hyperparameters are learned.
        hyperparameters: ``{name: tensor}``, as for ``innerloop_ctx(override=...)``.
        train_batches: ``(x, y)`` pairs, one inner step each.
        validation_batch: ``(x, y)`` on which the trained weights are evaluated.
        loss_fn: ``loss_fn(prediction, target)``.
        copy_initial_weights: ``False`` also sends the gradient into ``model.parameters()``.

    Returns:
        ``(validation_loss, fmodel)``; ``fmodel.parameters(time=t)`` are the weights after t steps.
    """
    with innerloop_ctx(model, inner_opt, copy_initial_weights=copy_initial_weights, override=dict(hyperparameters)) as (
        fmodel,
        diffopt,
    ):
        for x, y in train_batches:
            diffopt.step(loss_fn(fmodel(x), y))
        validation_x, validation_y = validation_batch
        return loss_fn(fmodel(validation_x), validation_y), fmodel


def imaml_step(
    model: nn.Module,
    inner_opt: torch.optim.Optimizer,
    tasks: Iterable[TaskLike],
    loss_fn: LossFn,
    inner_steps: int = 10,
    reg: float = 1.0,
    cg_iterations: int = 10,
    tol: float = 1e-10,
) -> float:
    """Accumulate the iMAML meta-gradient of a batch of tasks into ``model.parameters()``' ``.grad``.

    Implicit MAML (Rajeswaran, Finn, Kakade & Levine 2019, "Meta-Learning with Implicit
    Gradients", NeurIPS): each task adapts a copy of the meta-parameters ``phi`` (the model's
    weights) by minimising the proximal objective ``support_loss(theta) + reg/2 |theta - phi|^2``
    with ``inner_steps`` steps of ``inner_opt`` (no graph is kept), and the meta-gradient of the
    query loss is taken at the adapted weights by the implicit function theorem:
    ``(I + H/reg)^-1 grad query_loss(theta)``, ``H`` the support loss's Hessian, solved by
    conjugate gradient with Hessian-vector products (:func:`higher.implicit_hypergradient`).
    Memory and time do not grow with ``inner_steps`` beyond the steps themselves; the result is
    exact when the inner problem is solved exactly (and CG converges).

    Args:
        model: the model whose weights are meta-learned (never modified here).
        inner_opt: a ``torch.optim`` optimizer over *all* of ``model``'s trainable parameters,
            without weight decay or ``maximize`` (they would move its fixed point).
        tasks, loss_fn: as for :func:`maml_step`.
        inner_steps: steps of the inner optimizer on the proximal objective.
        reg: the proximal regularisation strength (iMAML's lambda).
        cg_iterations, tol: conjugate-gradient iterations and relative residual tolerance.

    Returns:
        The mean query loss over the tasks after adaptation (a float).
    """
    from .implicit import implicit_hypergradient
    from .patch import monkeypatch

    _check_steps(inner_steps)
    if not reg > 0:
        raise ValueError(
            f"reg must be positive (the proximal term makes the inner problem strongly convex), got {reg!r}"
        )
    trainable = [p for p in model.parameters() if p.requires_grad]
    tracked = {id(p) for group in inner_opt.param_groups for p in group["params"]}
    if {id(p) for p in trainable} != tracked:
        raise ValueError(
            "imaml_step adapts every trainable parameter (the proximal term covers them all): build inner_opt "
            "over all of model's parameters that require grad."
        )
    for group in inner_opt.param_groups:
        if group.get("weight_decay", 0) != 0 or group.get("maximize", False):
            option = "weight_decay" if group.get("weight_decay", 0) != 0 else "maximize"
            raise ValueError(
                f"imaml_step: the inner optimizer's {option}={group[option]!r} moves the point the inner loop "
                f"converges to away from the minimiser of support loss + reg/2 |theta - phi|^2, which the implicit "
                f"meta-gradient assumes; build inner_opt with weight_decay=0 and maximize=False (add an L2 term to "
                f"loss_fn for weight decay)."
            )
    tasks = list(tasks)
    if not tasks:
        raise ValueError("imaml_step needs at least one task")
    position = [i for i, p in enumerate(model.parameters()) if p.requires_grad]
    view = monkeypatch(model, track_higher_grads=False)  # runs the model with the weights given to it
    total = 0.0
    for task in tasks:
        support_x, support_y, query_x, query_y = _unpack(task)
        phi = [p.detach() for p in trainable]
        with innerloop_ctx(model, inner_opt, track_higher_grads=False) as (fmodel, diffopt):
            for _ in range(inner_steps):
                params = list(fmodel.parameters())
                proximal = sum(((params[i] - f) ** 2).sum() for i, f in zip(position, phi))
                diffopt.step(loss_fn(fmodel(support_x), support_y) + reg / 2 * proximal)
            adapted = [p.detach() for p in fmodel.parameters()]

        def full(theta: list[Tensor], adapted: list[Tensor] = adapted) -> list[Tensor]:
            weights = list(adapted)
            for i, t in zip(position, theta):
                weights[i] = t
            return weights

        def inner(theta: list[Tensor], meta: list[Tensor], x: Tensor = support_x, y: Tensor = support_y) -> Tensor:
            proximal = sum(((t - m) ** 2).sum() for t, m in zip(theta, meta))
            return loss_fn(view(x, params=full(theta)), y) + reg / 2 * proximal

        def outer(theta: list[Tensor], meta: list[Tensor], x: Tensor = query_x, y: Tensor = query_y) -> Tensor:
            return loss_fn(view(x, params=full(theta)), y)

        try:
            result = implicit_hypergradient(
                inner, outer, [adapted[i] for i in position], phi, solver="cg", iterations=cg_iterations, tol=tol
            )
        except ValueError as error:
            if "positive definite" not in str(error):
                raise
            raise ValueError(
                f"imaml_step: {error} For iMAML the matrix is the support loss's Hessian plus reg times the "
                f"identity: increase reg (now {reg}) so that it dominates the negative curvature."
            ) from error
        for p, g in zip(trainable, result.hypergradients):
            g = g / len(tasks)
            p.grad = g.clone() if p.grad is None else p.grad + g
        total += float(result.outer_loss)
    return total / len(tasks)
