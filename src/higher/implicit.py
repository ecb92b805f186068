"""Implicit hypergradients: differentiate the inner problem's solution, not the inner loop.

If the inner loop converges to a minimiser ``theta*(lambda)`` of an inner objective
``f(theta, lambda)``, the implicit function theorem gives its derivative without the loop:
``grad f(theta*, lambda) = 0`` for all ``lambda``, so ``d theta*/d lambda = -H^-1 d^2 f/d theta d lambda``
with ``H = d^2 f/d theta^2``, and the hypergradient of an outer loss ``L(theta*, lambda)`` is

    dL/dlambda = dL/dlambda (direct) - (d^2 f / d lambda d theta) v,   where  H v = dL/dtheta.

Memory and time do not depend on how many steps the inner loop took (or which optimizer it
used); the cost is a linear solve with Hessian-vector products (double backward), by conjugate
gradient (``H`` symmetric positive definite: a strongly convex inner problem near its minimum) or
a truncated Neumann series ``v = alpha sum_j (I - alpha H)^j dL/dtheta`` (Lorraine, Vicol &
Duvenaud 2020, "Optimizing Millions of Hyperparameters by Implicit Differentiation", AISTATS).
The answer is exact at an exact minimiser with an exact solve; :class:`ImplicitHypergradient`
reports both errors (the inner gradient norm and the solve's relative residual).

iMAML (Rajeswaran, Finn, Kakade & Levine 2019) is this with the proximal inner objective
``loss(theta) + reg/2 |theta - phi|^2`` and meta-parameters ``phi``: see
:func:`higher.algorithms.imaml_step`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ImplicitHypergradient", "implicit_hypergradient"]

Objective = Callable[[list[Tensor], list[Tensor]], Tensor]


@dataclass
class ImplicitHypergradient:
    """The result of :func:`implicit_hypergradient`.

    Attributes:
        hypergradients: d outer / d hyperparameter, one tensor per hyperparameter.
        outer_loss: the outer loss at the given parameters (detached).
        residual: ``|H v - dL/dtheta| / |dL/dtheta|`` of the linear solve (0 when ``dL/dtheta = 0``).
        iterations: iterations the solver ran.
        inner_gradient_norm: ``|grad_theta f|`` at the given parameters: how far they are from a
            stationary point (the theorem assumes 0).
        vector: the solution ``v`` of ``H v = dL/dtheta`` (one tensor per parameter).
    """

    hypergradients: list[Tensor]
    outer_loss: Tensor
    residual: float
    iterations: int
    inner_gradient_norm: float
    vector: list[Tensor]


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))  # type: ignore[return-value]


def _norm(a: Sequence[Tensor]) -> float:
    return float(_dot(a, a).sqrt())


def _grads(
    outputs: Tensor | Sequence[Tensor],
    inputs: Sequence[Tensor],
    grad_outputs: Sequence[Tensor] | None = None,
    **kwargs: object,
) -> list[Tensor]:
    """Gradients of ``outputs`` (weighted by ``grad_outputs``), zero where an input is not reached.

    Outputs that do not require grad (a constant objective, or the gradient of a parameter that
    the objective does not use or uses linearly) contribute nothing instead of failing.
    """
    if isinstance(outputs, Tensor):
        outputs, grad_outputs = [outputs], None
    weights = [None] * len(outputs) if grad_outputs is None else list(grad_outputs)
    pairs = [(o, w) for o, w in zip(outputs, weights) if o.requires_grad]
    grads: Sequence[Tensor | None] = [None] * len(inputs)
    if pairs:
        grads = torch.autograd.grad(
            [o for o, _ in pairs],
            inputs,
            grad_outputs=None if grad_outputs is None else [w for _, w in pairs],
            allow_unused=True,
            **kwargs,  # type: ignore[arg-type]
        )
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


def _tensors(values: Sequence[Tensor], what: str) -> list[Tensor]:
    values = list(values)
    for i, value in enumerate(values):
        if not isinstance(value, Tensor) or not value.is_floating_point():
            found = f"a {value.dtype} tensor" if isinstance(value, Tensor) else type(value).__name__
            raise TypeError(f"{what}[{i}] must be a floating-point tensor, got {found}")
    return values


def _scalar_result(value: object, what: str) -> Tensor:
    """``value``, the result of the user's ``what``, if it is a one-element tensor (else a clear error)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{what} must return a tensor (a scalar loss), got {type(value).__name__}")
    if value.numel() != 1:
        raise ValueError(f"{what} must return a scalar, got shape {tuple(value.shape)}")
    return value


def implicit_hypergradient(
    inner_objective: Objective,
    outer_objective: Objective,
    params: Sequence[Tensor],
    hyperparameters: Sequence[Tensor],
    *,
    solver: str = "cg",
    iterations: int = 100,
    tol: float = 1e-10,
    alpha: float | None = None,
) -> ImplicitHypergradient:
    """The implicit-function-theorem hypergradient of ``outer_objective`` at an inner minimiser.

    Args:
        inner_objective: ``f(params, hyperparameters)``, the objective the inner loop minimises
            (the whole of it, e.g. full-batch training loss plus regulariser).
        outer_objective: ``L(params, hyperparameters)``, e.g. the validation loss.
        params: the (approximate) minimiser of ``f`` reached by any inner loop (values are used,
            detached).
        hyperparameters: the tensors to differentiate with respect to (values used, detached);
            hyperparameters or meta-parameters (iMAML's initialisation).
        solver: ``"cg"`` (conjugate gradient; needs ``H`` positive definite) or ``"neumann"``.
        iterations: maximum solver iterations (Neumann: number of series terms after the first).
        tol: stop when the relative residual ``|H v - b| / |b|`` is below it (CG).
        alpha: Neumann step size, below ``2 / lambda_max(H)``; default ``1 / lambda_max`` estimated
            by 20 power iterations (from a start vector of a private, fixed-seed generator: the global
            random generator is not used).

    Returns:
        An :class:`ImplicitHypergradient` (hypergradients, residual, iterations, inner gradient norm).
    """
    if solver not in ("cg", "neumann"):
        raise ValueError(f"solver must be 'cg' or 'neumann', got {solver!r}")
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 0:
        raise ValueError(f"iterations must be a non-negative integer, got {iterations!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"tol must be a non-negative number (a relative residual), got {tol!r}")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0):
        raise ValueError(
            f"alpha must be a positive number (the Neumann step size, below 2 / lambda_max), got {alpha!r}"
        )
    params = [p.detach().requires_grad_() for p in _tensors(params, "params")]
    hyper = [h.detach().requires_grad_() for h in _tensors(hyperparameters, "hyperparameters")]
    if not params or not hyper:
        raise ValueError("implicit_hypergradient needs at least one parameter and one hyperparameter tensor")
    with torch.enable_grad():
        outer = _scalar_result(outer_objective(params, hyper), "outer_objective")
        outer_grads = _grads(outer, params + hyper)
        b, direct = outer_grads[: len(params)], outer_grads[len(params) :]
        inner = _scalar_result(inner_objective(params, hyper), "inner_objective")
        inner_grad = _grads(inner, params, create_graph=True)
        if not any(g.requires_grad for g in inner_grad):
            raise ValueError("the inner objective's gradient does not depend on the parameters: no Hessian to invert")

        def hvp(v: list[Tensor]) -> list[Tensor]:
            return _grads(inner_grad, params, grad_outputs=v, retain_graph=True)

        b_norm = _norm(b)
        steps = 0
        if b_norm == 0:
            v = [torch.zeros_like(x) for x in b]
        elif solver == "cg":
            v = [torch.zeros_like(x) for x in b]
            r = [x.clone() for x in b]
            d = [x.clone() for x in b]
            rr = _dot(r, r)
            for steps in range(1, iterations + 1):  # noqa: B007 - the count is reported
                hd = hvp(d)
                curvature = _dot(d, hd)
                if curvature <= 0:
                    raise ValueError(
                        "conjugate gradient met non-positive curvature: the inner objective's Hessian is not "
                        "positive definite at these parameters (not a strict minimum); use solver='neumann' or "
                        "add a regulariser."
                    )
                step = rr / curvature
                v = [x + step * y for x, y in zip(v, d)]
                r = [x - step * y for x, y in zip(r, hd)]
                new_rr = _dot(r, r)
                if float(new_rr.sqrt()) <= tol * b_norm:
                    break
                d = [x + (new_rr / rr) * y for x, y in zip(r, d)]
                rr = new_rr
        else:
            if alpha is None:
                # A private generator (fixed seed): the power iteration's start vector must not shift the
                # user's random stream (dropout masks, data order), and the estimate is reproducible.
                generator = torch.Generator(device=b[0].device).manual_seed(0)
                u = [torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device) for x in b]
                top = 0.0
                for _ in range(20):
                    norm = _norm(u)
                    u = [x / norm for x in u]
                    hu = hvp(u)
                    top = float(_dot(u, hu))
                    u = hu
                if top <= 0:
                    raise ValueError("the inner objective's Hessian has no positive curvature; give alpha=...")
                alpha = 1.0 / top
            term = [alpha * x for x in b]
            v = [x.clone() for x in term]
            for steps in range(1, iterations + 1):  # noqa: B007
                term = [x - alpha * y for x, y in zip(term, hvp(term))]
                v = [x + y for x, y in zip(v, term)]
        residual = 0.0 if b_norm == 0 else _norm([x - y for x, y in zip(hvp(v), b)]) / b_norm
        mixed = _grads(inner_grad, hyper, grad_outputs=v, retain_graph=True)
        hypergradients = [d - m for d, m in zip(direct, mixed)]
    return ImplicitHypergradient(
        [g.detach() for g in hypergradients],
        outer.detach(),
        residual,
        steps,
        _norm([g.detach() for g in inner_grad]),
        [x.detach() for x in v],
    )
