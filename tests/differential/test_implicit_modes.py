"""Implicit hypergradients against the one reference, on generated problems whose inner loop converges.

The implicit function theorem gives the hypergradient at the inner minimiser; the reference is the
plain eager unroll (innerloop_ctx, diffopt.step in a loop, backward) run long enough to converge,
whose hypergradient then equals the implicit one to the inner loop's distance from the minimiser.
hypothesis draws strongly convex inner problems as users write them for hyperparameter
optimisation: ridge or logistic regression with an L2 penalty whose strength is the
hyperparameter (one for all weights through exp(log_lambda), or one per feature), inner SGD with
or without momentum. The same problems also run through higher.hypergradients.hypergradient with
every method (unrolled, checkpointed, forward: exact; implicit by conjugate gradient and by the
Neumann series: to convergence).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from harness import examples
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import higher

STEPS = 400


@dataclass(frozen=True)
class Convex:
    features: int
    samples: int
    loss: str  # "ridge" or "logistic"
    hyper: str  # "log_scalar" (lambda = exp(h)) or "per_feature" (lambda_j = h_j)
    bias: bool
    momentum: float
    seed: int


CONVEX = st.builds(
    Convex,
    features=st.sampled_from([2, 3, 5]),
    samples=st.sampled_from([12, 40]),
    loss=st.sampled_from(["ridge", "logistic"]),
    hyper=st.sampled_from(["log_scalar", "per_feature"]),
    bias=st.booleans(),
    momentum=st.sampled_from([0.0, 0.5]),
    seed=st.integers(0, 2**16),
)


def _setup(problem: Convex):
    g = torch.Generator().manual_seed(problem.seed)
    d, n = problem.features, problem.samples
    x_train, x_val = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    w = torch.randn(d, 1, generator=g)
    y_train, y_val = x_train @ w + 0.1 * torch.randn(n, 1, generator=g), x_val @ w
    if problem.loss == "logistic":
        y_train, y_val = (y_train > 0).double(), (y_val > 0).double()
    if problem.hyper == "log_scalar":
        hyper = torch.tensor([0.0]).add_(torch.empty(1).uniform_(-0.5, 0.5, generator=g))
    else:
        hyper = torch.empty(d).uniform_(0.5, 2.0, generator=g)
    torch.manual_seed(problem.seed)
    model = nn.Linear(d, 1, bias=problem.bias)

    def fit(out, y):
        return F.binary_cross_entropy_with_logits(out, y) if problem.loss == "logistic" else (out - y).pow(2).mean()

    def strength(h):
        return h[0].exp() if problem.hyper == "log_scalar" else h[0]

    def inner(fmodel, h):
        # the bias too gets an L2 term (fixed): strongly convex in every parameter, so the loop converges
        bias = 0.25 * (fmodel.bias**2).sum() if problem.bias else 0.0
        return fit(fmodel(x_train), y_train) + 0.5 * (strength(h) * fmodel.weight.squeeze(0) ** 2).sum() + bias

    def outer(fmodel, h):
        return fit(fmodel(x_val), y_val)

    # lr below 1 / L for the inner objective: L <= curvature of the fit (|X|^2 / n, a quarter for logistic) + lambda
    curvature = float(torch.linalg.matrix_norm(x_train, ord=2) ** 2 / n) * (0.25 if problem.loss == "logistic" else 2.0)
    lr = 0.9 / (curvature + 2.0 + float(hyper.max().exp() if problem.hyper == "log_scalar" else hyper.max()))
    opt = torch.optim.SGD(model.parameters(), lr=lr * (1 - problem.momentum), momentum=problem.momentum)
    return model, opt, [hyper], inner, outer


def _reference(model, opt, hyper, inner, outer):
    """The plain eager unroll: STEPS differentiable steps, then backward to the hyperparameters."""
    leaves = [h.clone().requires_grad_() for h in hyper]
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for _ in range(STEPS):
            diffopt.step(inner(fmodel, leaves))
        gradient_norm = float(
            torch.cat(
                [g.flatten() for g in torch.autograd.grad(inner(fmodel, leaves), list(fmodel.parameters()))]
            ).norm()
        )
        outer(fmodel, leaves).backward()
    return [h.grad for h in leaves], gradient_norm


def _close(actual, expected, tol):
    for a, e in zip(actual, expected):
        error = float((a - e).abs().max())
        assert error <= tol * max(float(e.abs().max()), 1e-6), f"off by {error:.3g}: {a} vs {e}"


@examples(ci=6, fuzz=300)
@given(problem=CONVEX)
def test_implicit_and_every_method_equal_the_converged_unroll(problem):
    model, opt, hyper, inner, outer = _setup(problem)
    expected, gradient_norm = _reference(model, opt, hyper, inner, outer)
    assert gradient_norm < 1e-9, f"the inner loop did not converge ({gradient_norm:.3g}): {problem}"
    for method, options, tol in [
        ("unrolled", {}, 1e-10),
        ("checkpointed", {"every": 37}, 1e-10),
        ("forward", {}, 1e-9),
        ("implicit", {"solver": "cg"}, 1e-7),
        ("implicit", {"solver": "neumann", "iterations": 2000}, 1e-6),
    ]:
        if method == "forward" and problem.hyper == "per_feature" and problem.features > 3:
            continue  # one pass per entry: covered by the smaller problems
        result = higher.hypergradients.hypergradient(method, model, opt, hyper, inner, outer, STEPS, **options)
        try:
            _close(result.hypergradients, expected, tol)
        except AssertionError as error:
            raise AssertionError(f"{method} {options}: {error}: {problem}") from None


@pytest.mark.parametrize("solver", ["cg", "neumann"])
def test_implicit_hypergradient_on_the_unrolls_end_point(solver):
    """implicit_hypergradient itself (not through hypergradient()), at the reference unroll's end point."""
    model, opt, hyper, inner, outer = _setup(Convex(3, 40, "logistic", "per_feature", True, 0.0, 5))
    expected, _ = _reference(model, opt, hyper, inner, outer)
    with higher.innerloop_ctx(model, opt, track_higher_grads=False) as (fmodel, diffopt):
        for _ in range(STEPS):
            diffopt.step(inner(fmodel, hyper))
        final = list(fmodel.parameters())
    view = higher.monkeypatch(model, track_higher_grads=False)

    def at(objective):
        def evaluate(params, h):
            view.update_params(params)
            return objective(view, h)

        return evaluate

    result = higher.implicit_hypergradient(at(inner), at(outer), final, hyper, solver=solver, iterations=2000)
    _close(result.hypergradients, expected, 1e-7 if solver == "cg" else 1e-6)
