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
from typing import Any, cast

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
    "IMAMLResult",
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


class IMAMLResult(float):
    """What :func:`imaml_step` returns: the mean query loss (a ``float``, as before) with the solves' report.

    It *is* the mean query loss over the tasks after adaptation: arithmetic, comparisons,
    formatting and ``float(result)`` behave as for the plain float that ``imaml_step`` returned
    before. The attributes say, task by task (in the order of the tasks), how exact each implicit
    meta-gradient is, as :class:`higher.ImplicitHypergradient` does for one solve:

    Attributes:
        losses: each task's query loss after adaptation.
        residuals: each task's relative residual ``|(H + reg I) v - g| / |g|`` of the
            conjugate-gradient solve (``g`` the query loss's gradient at the adapted weights;
            0 when ``g = 0``). Far above ``tol``: the solve did not converge in ``cg_iterations``,
            and that task's meta-gradient is approximate.
        cg_iterations: the conjugate-gradient iterations each task ran (at most ``cg_iterations``
            of the call; fewer once its residual fell below ``tol``).
        inner_gradient_norms: ``|grad support_loss + reg (theta - phi)|`` at each task's adapted
            weights: how far the inner loop stopped from the proximal problem's solution, which the
            implicit meta-gradient assumes (0 there).
        tol: the tolerance the residuals were solved to.
    """

    losses: list[float]
    residuals: list[float]
    cg_iterations: list[int]
    inner_gradient_norms: list[float]
    tol: float

    def __new__(
        cls,
        losses: Sequence[float],
        residuals: Sequence[float],
        cg_iterations: Sequence[int],
        inner_gradient_norms: Sequence[float],
        tol: float,
    ) -> IMAMLResult:
        result = super().__new__(cls, sum(losses) / len(losses))
        result.losses, result.residuals = list(losses), list(residuals)
        result.cg_iterations, result.inner_gradient_norms = list(cg_iterations), list(inner_gradient_norms)
        result.tol = tol
        return result

    @property
    def loss(self) -> float:
        """The mean query loss, as a plain ``float``."""
        return float(self)

    @property
    def max_residual(self) -> float:
        """The largest relative residual over the tasks."""
        return max(self.residuals)

    @property
    def converged(self) -> bool:
        """Whether every task's solve reached ``tol``."""
        return all(r <= self.tol for r in self.residuals)

    def __repr__(self) -> str:
        return (
            f"IMAMLResult({float(self)!r}, tasks={len(self.losses)}, max_residual={self.max_residual:.3g}, "
            f"tol={self.tol!r})"
        )

    def __reduce__(self) -> Any:  # pickling keeps the report
        args = (self.losses, self.residuals, self.cg_iterations, self.inner_gradient_norms, self.tol)
        return (IMAMLResult, args)


def _curvature_error(tasks: Sequence[int], num_tasks: int, reg: float, damping: float, batched: bool) -> ValueError:
    which = f"task {tasks[0]}" if len(tasks) == 1 else f"tasks {', '.join(str(t) for t in tasks)}"
    where = "index in the task dimension" if batched else "position in tasks"
    return ValueError(
        f"imaml_step: conjugate gradient met non-positive curvature on {which} (of {num_tasks}; {where}, from 0): "
        f"the support loss's Hessian plus {'(reg + cg_damping)' if damping else 'reg'} times the identity is not "
        f"positive definite at that task's adapted weights (the inner loop stopped where the support loss curves "
        f"down more steeply than {'reg + cg_damping' if damping else 'reg'} = {reg + damping}), so the solve has no "
        f"answer there. Increase reg (now {reg}), or cg_damping (now {damping}), so that it dominates the negative "
        f"curvature, or solve the inner problem more exactly (at its minimum the Hessian plus reg is never negative)."
    )


def imaml_step(
    model: nn.Module,
    inner_opt: torch.optim.Optimizer,
    tasks: Iterable[TaskLike] | TaskLike,
    loss_fn: LossFn,
    inner_steps: int = 10,
    reg: float = 1.0,
    cg_iterations: int = 10,
    tol: float = 1e-10,
    *,
    batched: bool = False,
    cg_damping: float = 0.0,
) -> IMAMLResult:
    """Accumulate the iMAML meta-gradient of a batch of tasks into ``model.parameters()``' ``.grad``.

    Implicit MAML (Rajeswaran, Finn, Kakade & Levine 2019, "Meta-Learning with Implicit
    Gradients", NeurIPS): each task adapts a copy of the meta-parameters ``phi`` (the model's
    weights) by minimising the proximal objective ``support_loss(theta) + reg/2 |theta - phi|^2``
    with ``inner_steps`` steps of ``inner_opt`` (no graph is kept), and the meta-gradient of the
    query loss is taken at the adapted weights by the implicit function theorem:
    ``(I + H/reg)^-1 grad query_loss(theta)``, ``H`` the support loss's Hessian, solved by
    conjugate gradient with Hessian-vector products (:func:`higher.implicit_hypergradient`).
    Memory and time do not grow with ``inner_steps`` beyond the steps themselves; the result is
    exact when the inner problem is solved exactly (and CG converges). Whether it did is reported
    in the returned :class:`IMAMLResult` (residual, CG iterations and inner gradient norm per task).

    Task-batched mode (``batched=True``): ``tasks`` is *one* ``(support_x, support_y, query_x,
    query_y)`` whose tensors have a leading task dimension ``T`` (``support_x`` ``[T, n, ...]``),
    as for ``innerloop_ctx(..., tasks=T)``. The inner loops of all tasks run as one
    (``innerloop_ctx(..., tasks=T)``, ``loss_fn`` applied to each task by ``torch.func.vmap``), and
    so does conjugate gradient: one solve per task, vectorised (per-task inner products and step
    sizes, one batched Hessian-vector product per iteration for all tasks; a task stops once its
    residual is below ``tol``). Task by task, it computes what the per-task path computes (to
    rounding), much faster for small models.

    Args:
        model: the model whose weights are meta-learned (never modified here).
        inner_opt: a ``torch.optim`` optimizer over *all* of ``model``'s trainable parameters,
            without weight decay or ``maximize`` (they would move its fixed point).
        tasks, loss_fn: as for :func:`maml_step` (``batched=True``: one stacked task, above).
        inner_steps: steps of the inner optimizer on the proximal objective.
        reg: the proximal regularisation strength (iMAML's lambda). Conjugate gradient needs
            ``H + reg I`` positive definite at every task's adapted weights; where it is not, a
            ``ValueError`` names the task(s) and asks for a larger ``reg``.
        cg_iterations, tol: conjugate-gradient iterations and relative residual tolerance.
        batched: run all tasks at once (above).
        cg_damping: ``c >= 0`` added to the solve's diagonal: CG solves ``(H + (reg + c) I) v = g``
            and the meta-gradient is ``(reg + c) v = (I + H/(reg + c))^-1 g``, the implicit gradient
            of a stiffer proximal term (the inner loop keeps ``reg``). It keeps the system positive
            definite where the inner loop stops short of its minimum, at the price of an
            approximate meta-gradient (``c -> infinity``: the query loss's gradient at the adapted
            weights, first-order). 0 (the default): exact iMAML.

    Returns:
        An :class:`IMAMLResult`: the mean query loss over the tasks after adaptation (a float
        subclass, so code that used the float it returned before is unchanged), whose attributes
        hold each task's query loss, CG residual and iterations, and inner gradient norm. A solve
        that stops above ``tol`` (``cg_iterations`` reached) is neither an error nor a warning, as
        for :func:`higher.implicit_hypergradient`: check ``result.converged`` or
        ``result.max_residual`` (and ``result.inner_gradient_norms``: the implicit gradient also
        assumes the inner problem solved)::

            result = imaml_step(model, inner_opt, tasks, loss_fn, batched=False)
            if result.max_residual > 1e-3:
                ...  # more cg_iterations, or a larger reg
    """
    _check_steps(inner_steps)
    if not reg > 0:
        raise ValueError(
            f"reg must be positive (the proximal term makes the inner problem strongly convex), got {reg!r}"
        )
    if isinstance(cg_damping, bool) or not isinstance(cg_damping, (int, float)) or not cg_damping >= 0:
        raise ValueError(f"cg_damping must be a non-negative number, got {cg_damping!r}")
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
    position = [i for i, p in enumerate(model.parameters()) if p.requires_grad]
    if batched:
        stacked = _unpack(tasks)  # type: ignore[arg-type]
        if not all(isinstance(t, Tensor) and t.dim() > 0 for t in stacked):
            raise ValueError(
                "imaml_step(batched=True) takes one task (support_x, support_y, query_x, query_y) of tensors with a "
                "leading task dimension"
            )
        sizes = {t.shape[0] for t in stacked}
        if len(sizes) != 1 or 0 in sizes:
            shapes = ", ".join(str(tuple(t.shape)) for t in stacked)
            raise ValueError(
                f"imaml_step(batched=True): support_x, support_y, query_x and query_y need the same leading task "
                f"dimension, at least 1; got shapes {shapes}"
            )
        return _imaml_batched(
            model, inner_opt, stacked, loss_fn, inner_steps, reg, cg_iterations, tol, float(cg_damping), position
        )
    task_list = list(cast("Iterable[TaskLike]", tasks))
    if not task_list:
        raise ValueError("imaml_step needs at least one task")
    return _imaml_per_task(
        model, inner_opt, task_list, loss_fn, inner_steps, reg, cg_iterations, tol, float(cg_damping), position
    )


def _imaml_per_task(
    model: nn.Module,
    inner_opt: torch.optim.Optimizer,
    tasks: list[TaskLike],
    loss_fn: LossFn,
    inner_steps: int,
    reg: float,
    cg_iterations: int,
    tol: float,
    damping: float,
    position: list[int],
) -> IMAMLResult:
    """:func:`imaml_step` task by task: one :func:`higher.implicit_hypergradient` per task."""
    from .implicit import implicit_hypergradient
    from .patch import monkeypatch

    trainable = [p for p in model.parameters() if p.requires_grad]
    view = monkeypatch(model, track_higher_grads=False)  # runs the model with the weights given to it
    losses, residuals, iterations, inner_norms = [], [], [], []
    for index, task in enumerate(tasks):
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

        def inner(
            theta: list[Tensor],
            meta: list[Tensor],
            x: Tensor = support_x,
            y: Tensor = support_y,
            adapted: list[Tensor] = adapted,
        ) -> Tensor:
            proximal = sum(((t - m) ** 2).sum() for t, m in zip(theta, meta))
            objective = loss_fn(view(x, params=full(theta)), y) + reg / 2 * proximal
            if damping:  # damping I in the Hessian; no gradient at the adapted weights, none towards phi
                objective = objective + damping / 2 * sum(
                    ((t - adapted[i]) ** 2).sum() for i, t in zip(position, theta)
                )
            return objective

        def outer(theta: list[Tensor], meta: list[Tensor], x: Tensor = query_x, y: Tensor = query_y) -> Tensor:
            return loss_fn(view(x, params=full(theta)), y)

        try:
            result = implicit_hypergradient(
                inner, outer, [adapted[i] for i in position], phi, solver="cg", iterations=cg_iterations, tol=tol
            )
        except ValueError as error:
            if "non-positive curvature" not in str(error):
                raise
            raise _curvature_error([index], len(tasks), reg, damping, batched=False) from error
        for p, g in zip(trainable, result.hypergradients):
            # implicit_hypergradient gives reg v; the damped Jacobian is (reg + damping) v (see imaml_step).
            g = (g if not damping else g * ((reg + damping) / reg)) / len(tasks)
            p.grad = g.clone() if p.grad is None else p.grad + g
        losses.append(float(result.outer_loss))
        residuals.append(result.residual)
        iterations.append(result.iterations)
        inner_norms.append(result.inner_gradient_norm)
    return IMAMLResult(losses, residuals, iterations, inner_norms, tol)


def _imaml_batched(
    model: nn.Module,
    inner_opt: torch.optim.Optimizer,
    task: tuple[Tensor, Tensor, Tensor, Tensor],
    loss_fn: LossFn,
    inner_steps: int,
    reg: float,
    cg_iterations: int,
    tol: float,
    damping: float,
    position: list[int],
) -> IMAMLResult:
    """:func:`imaml_step` with all tasks at once: a task-batched inner loop and conjugate gradient.

    Every quantity of the per-task solve gets a leading task dimension: the fast weights
    ``theta`` ``[T, ...]``, the right-hand side ``g`` (the query loss's gradient, per task), the
    CG iterates. The tasks' losses do not interact, so the gradient of their sum is each task's
    gradient, and one double backward gives every task's Hessian-vector product at once. The
    scalars of CG (residual norms, curvature ``d'(H + reg I)d``, step sizes) are per task (shape
    ``[T]``); a task whose residual fell below ``tol`` is frozen (step 0) while the others go on.
    """
    from . import batched as batched_api
    from .implicit import _grads

    support_x, support_y, query_x, query_y = task
    num_tasks = support_x.shape[0]
    trainable = [p for p in model.parameters() if p.requires_grad]
    phi = [p.detach() for p in trainable]  # broadcasts against the [T, ...] fast weights
    task_loss = torch.func.vmap(loss_fn)  # one loss per task: [T]
    with innerloop_ctx(model, inner_opt, track_higher_grads=False, tasks=num_tasks) as (fmodel, diffopt):
        for _ in range(inner_steps):
            params = list(fmodel.parameters())
            proximal = sum(((params[i] - f) ** 2).reshape(num_tasks, -1).sum(1) for i, f in zip(position, phi))
            diffopt.step(task_loss(fmodel(support_x), support_y) + reg / 2 * proximal)
        adapted = [p.detach() for p in fmodel.parameters()]
    view = batched_api.monkeypatch(model, num_tasks, track_higher_grads=False)
    theta = [adapted[i].clone().requires_grad_() for i in position]

    def full(values: list[Tensor]) -> list[Tensor]:
        weights = list(adapted)
        for i, t in zip(position, values):
            weights[i] = t
        return weights

    sizes = [t[0].numel() for t in theta]

    def flat(tensors: Sequence[Tensor]) -> Tensor:  # [T, ...] per parameter -> one [T, P]
        return torch.cat([x.reshape(num_tasks, -1) for x in tensors], dim=1)

    def unflat(vector: Tensor) -> list[Tensor]:
        return [x.reshape(t.shape) for x, t in zip(vector.split(sizes, dim=1), theta)]

    with torch.enable_grad():
        query = task_loss(view(query_x, params=full(theta)), query_y)
        b = flat(_grads(query.sum(), theta))
        support = task_loss(view(support_x, params=full(theta)), support_y)
        support_grad = _grads(support.sum(), theta, create_graph=True)

        def hvp(vector: Tensor) -> Tensor:
            hessian = flat(_grads(support_grad, theta, grad_outputs=unflat(vector), retain_graph=True))
            return hessian + (reg + damping) * vector

        # Conjugate gradient, one solve per task: every scalar of the per-task solve is a [T] tensor.
        b_norm = b.norm(dim=1)
        v, r, d = torch.zeros_like(b), b.clone(), b.clone()
        rr = (r * r).sum(1)
        active = b_norm > 0
        steps = torch.zeros(num_tasks, dtype=torch.long, device=b.device)
        for _ in range(cg_iterations):
            if not bool(active.any()):
                break
            hd = hvp(d)
            curvature = (d * hd).sum(1)
            bad = active & ~(curvature > 0)
            if bool(bad.any()):
                raise _curvature_error(bad.nonzero().flatten().tolist(), num_tasks, reg, damping, batched=True)
            step = torch.where(active, rr / torch.where(active, curvature, torch.ones_like(curvature)), 0.0)
            v = v + step[:, None] * d
            r = r - step[:, None] * hd
            steps += active.long()
            new_rr = (r * r).sum(1)
            active = active & ~(new_rr.sqrt() <= tol * b_norm)
            beta = torch.where(active, new_rr / torch.where(active, rr, torch.ones_like(rr)), 0.0)
            d = torch.where(active[:, None], r + beta[:, None] * d, d)
            rr = torch.where(active, new_rr, rr)
        error = (hvp(v) - b).norm(dim=1)  # the residual of the system solved (damping included)
        residual = torch.where(b_norm > 0, error / torch.where(b_norm > 0, b_norm, torch.ones_like(b_norm)), 0.0)
        inner_grad = flat([g.detach() + reg * (t.detach() - f) for g, t, f in zip(support_grad, theta, phi)])
        inner_norm = inner_grad.norm(dim=1)
    # d meta-loss / d phi = -(d^2 f / d phi d theta) v = reg v per task (the query loss does not
    # depend on phi directly), (reg + damping) v with damping (see imaml_step); the mean over tasks.
    for p, x in zip(trainable, unflat(v)):
        g = ((reg + damping) * x).sum(0) / num_tasks
        p.grad = g if p.grad is None else p.grad + g
    return IMAMLResult(query.detach().tolist(), residual.tolist(), steps.tolist(), inner_norm.tolist(), tol)
