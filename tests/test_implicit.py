"""implicit_hypergradient against the ridge-regression closed form and long unrolls.

The equalities take the ``device`` fixture (CUDA too where present: the Neumann solver's private
generator is then a CUDA one); the tests of errors run on the CPU.
"""

from __future__ import annotations

import pytest
import torch

import higher
from higher.hypergradients import hypergradient


def _ridge(n=30, d=5, nv=20, device="cpu"):
    x, y = torch.randn(n, d, device=device), torch.randn(n, device=device)
    xv, yv = torch.randn(nv, d, device=device), torch.randn(nv, device=device)
    return x, y, xv, yv


def _closed_form(x, y, xv, yv, lam):
    """theta* = (X'X + lam I)^-1 X'y; dL/dlam = -theta*' (X'X + lam I)^-1 grad_theta L."""
    a = x.T @ x + lam * torch.eye(x.shape[1], device=x.device)
    theta = torch.linalg.solve(a, x.T @ y)
    grad_outer = xv.T @ (xv @ theta - yv)
    return theta, -(theta @ torch.linalg.solve(a, grad_outer))


def _objectives(x, y, xv, yv):
    inner = lambda p, h: 0.5 * (x @ p[0] - y).pow(2).sum() + 0.5 * h[0] * p[0].pow(2).sum()  # noqa: E731
    outer = lambda p, h: 0.5 * (xv @ p[0] - yv).pow(2).sum()  # noqa: E731
    return inner, outer


@pytest.mark.parametrize("solver", ["cg", "neumann"])
def test_ridge_regularisation_strength_closed_form(solver, device):
    x, y, xv, yv = _ridge(device=device)
    lam = torch.tensor(3.0, device=device)
    theta, expected = _closed_form(x, y, xv, yv, lam)
    inner, outer = _objectives(x, y, xv, yv)
    iterations = 50 if solver == "cg" else 3000
    result = higher.implicit_hypergradient(inner, outer, [theta], [lam], solver=solver, iterations=iterations)
    assert abs(result.hypergradients[0].item() - expected.item()) <= 1e-8 * max(1.0, abs(expected.item()))
    assert result.residual < 1e-8
    assert result.inner_gradient_norm < 1e-9
    assert result.iterations <= iterations
    if solver == "cg":
        assert result.iterations <= x.shape[1] + 1  # exact in d steps (up to rounding)


def test_per_feature_regularisation_and_an_early_stopped_solve_reports_its_residual(device):
    x, y, xv, yv = _ridge(device=device)
    lam = torch.rand(5, device=device) + 0.5
    a = x.T @ x + torch.diag(lam)
    theta = torch.linalg.solve(a, x.T @ y)
    expected = -theta * torch.linalg.solve(a, xv.T @ (xv @ theta - yv))  # d/d lam_j: -theta_j v_j
    inner = lambda p, h: 0.5 * (x @ p[0] - y).pow(2).sum() + 0.5 * (h[0] * p[0].pow(2)).sum()  # noqa: E731
    outer = lambda p, h: 0.5 * (xv @ p[0] - yv).pow(2).sum()  # noqa: E731
    result = higher.implicit_hypergradient(inner, outer, [theta], [lam])
    assert torch.allclose(result.hypergradients[0], expected, rtol=1e-8, atol=1e-10)
    rough = higher.implicit_hypergradient(inner, outer, [theta], [lam], iterations=1)
    assert rough.iterations == 1 and rough.residual > 1e-6


def test_long_unroll_of_a_strongly_convex_problem(device):
    """Reverse mode through 400 GD steps (converged) equals the implicit hypergradient."""
    x, y, xv, yv = _ridge(device=device)
    model = torch.nn.Linear(5, 1, bias=False).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    inner = lambda fm, h: 0.5 * (fm(x).squeeze(-1) - y).pow(2).sum() + 0.5 * h[0] * fm.weight.pow(2).sum()  # noqa: E731
    outer = lambda fm, h: 0.5 * (fm(xv).squeeze(-1) - yv).pow(2).sum()  # noqa: E731
    lam = [torch.tensor(3.0, device=device)]
    unrolled = hypergradient("unrolled", model, opt, lam, inner, outer, 400)
    implicit = hypergradient("implicit", model, opt, lam, inner, outer, 400)
    _, expected = _closed_form(x, y, xv, yv, lam[0])
    assert implicit.extra["inner_gradient_norm"] < 1e-9
    for r in (unrolled, implicit):
        assert abs(r.hypergradients[0].item() - expected.item()) <= 1e-8 * abs(expected.item())
    # Stopped early, the unroll and the implicit formula differ, and the latter says why.
    early = hypergradient("implicit", model, opt, lam, inner, outer, 20)
    assert early.extra["inner_gradient_norm"] > 1e-3
    assert abs(early.hypergradients[0].item() - expected.item()) > 1e-6


def test_meta_parameters_of_a_proximal_objective(device):
    """d theta*/d phi for f = 1/2 |X theta - y|^2 + reg/2 |theta - phi|^2: reg (X'X + reg I)^-1."""
    x, y, xv, yv = _ridge(device=device)
    phi, reg = torch.randn(5, device=device), 2.0
    a = x.T @ x + reg * torch.eye(5, device=device)
    theta = torch.linalg.solve(a, x.T @ y + reg * phi)
    expected = reg * torch.linalg.solve(a, xv.T @ (xv @ theta - yv))
    inner = lambda p, h: 0.5 * (x @ p[0] - y).pow(2).sum() + reg / 2 * (p[0] - h[0]).pow(2).sum()  # noqa: E731
    outer = lambda p, h: 0.5 * (xv @ p[0] - yv).pow(2).sum()  # noqa: E731
    result = higher.implicit_hypergradient(inner, outer, [theta], [phi])
    assert torch.allclose(result.hypergradients[0], expected, rtol=1e-9, atol=1e-10)


def test_bad_arguments_and_indefinite_hessians():
    x, y, xv, yv = _ridge()
    inner, outer = _objectives(x, y, xv, yv)
    theta, lam = torch.zeros(5), torch.tensor(1.0)
    with pytest.raises(ValueError, match="solver must be"):
        higher.implicit_hypergradient(inner, outer, [theta], [lam], solver="lu")
    with pytest.raises(ValueError, match="at least one"):
        higher.implicit_hypergradient(inner, outer, [theta], [])
    concave = lambda p, h: -p[0].pow(2).sum() * h[0]  # noqa: E731
    with pytest.raises(ValueError, match="positive definite"):
        higher.implicit_hypergradient(concave, outer, [theta], [lam])
    linear = lambda p, h: (2 * p[0]).sum()  # noqa: E731
    with pytest.raises(ValueError, match="no Hessian"):
        higher.implicit_hypergradient(linear, outer, [theta], [lam])


def test_the_neumann_solver_leaves_the_global_random_generator_alone(device):
    """Its power iteration (for the default step size) drew its start vector from torch's global
    generator, shifting the user's random stream (issue 19); now a private generator (on the
    parameters' device), and the result is reproducible whatever the global state."""
    x, y, xv, yv = _ridge(device=device)
    lam = torch.tensor(3.0, device=device)
    theta, _ = _closed_form(x, y, xv, yv, lam)
    inner, outer = _objectives(x, y, xv, yv)
    torch.manual_seed(5)
    first = higher.implicit_hypergradient(inner, outer, [theta], [lam], solver="neumann", iterations=50)
    after = torch.rand(3, device=device)
    torch.manual_seed(5)
    expected_after = torch.rand(3, device=device)
    assert torch.equal(after, expected_after)
    torch.manual_seed(123)
    second = higher.implicit_hypergradient(inner, outer, [theta], [lam], solver="neumann", iterations=50)
    assert torch.equal(first.hypergradients[0], second.hypergradients[0])


# ------------------------------------------------------------------ implicit_hypergradient
def _ridge_problem():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(30, 5, generator=g), torch.randn(30, generator=g)
    xv, yv = torch.randn(20, 5, generator=g), torch.randn(20, generator=g)
    lam = torch.tensor(0.7)
    a = x.T @ x + lam * torch.eye(5)
    theta = torch.linalg.solve(a, x.T @ y)
    expected = -(theta @ torch.linalg.solve(a, xv.T @ (xv @ theta - yv)))  # the closed form
    inner = lambda p, h: 0.5 * (x @ p[0] - y).pow(2).sum() + 0.5 * h[0] * p[0].pow(2).sum()  # noqa: E731
    outer = lambda p, h: 0.5 * (xv @ p[0] - yv).pow(2).sum()  # noqa: E731
    return theta, lam, expected, inner, outer


@pytest.mark.parametrize("solver", ["cg", "neumann"])
def test_implicit_with_a_parameter_that_neither_objective_uses(solver):
    """An extra parameter tensor (an unused head, say) used to crash the Hessian-vector product
    ('element 0 of tensors does not require grad'); its block of the solve is zero."""
    theta, lam, expected, inner, outer = _ridge_problem()
    unused = torch.ones(3)
    result = higher.implicit_hypergradient(
        lambda p, h: inner(p[:1], h),
        lambda p, h: outer(p[:1], h),
        [theta, unused],
        [lam],
        solver=solver,
        iterations=50 if solver == "cg" else 3000,
    )
    assert abs(result.hypergradients[0].item() - expected.item()) <= 1e-9 * max(1.0, abs(expected.item()))
    assert torch.equal(result.vector[1], torch.zeros(3))


def test_implicit_outer_objective_that_reads_nothing_gives_zero():
    theta, lam, _, inner, _ = _ridge_problem()
    result = higher.implicit_hypergradient(inner, lambda p, h: torch.tensor(2.0), [theta], [lam])
    assert torch.equal(result.hypergradients[0], torch.zeros(()))


def test_implicit_bad_arguments_get_clear_errors():
    theta, lam, _, inner, outer = _ridge_problem()
    with pytest.raises(TypeError, match=r"params\[0\] must be a floating-point tensor"):
        higher.implicit_hypergradient(inner, outer, theta.tolist(), [lam])
    with pytest.raises(TypeError, match=r"hyperparameters\[0\] must be a floating-point tensor"):
        higher.implicit_hypergradient(inner, outer, [theta], [0.7])
    with pytest.raises(TypeError, match=r"hyperparameters\[0\] must be a floating-point tensor"):
        higher.implicit_hypergradient(inner, outer, [theta], [torch.tensor(1)])
    with pytest.raises(TypeError, match="outer_objective must return a tensor"):
        higher.implicit_hypergradient(inner, lambda p, h: 1.0, [theta], [lam])
    with pytest.raises(TypeError, match="inner_objective must return a tensor"):
        higher.implicit_hypergradient(lambda p, h: 1.0, outer, [theta], [lam])
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        higher.implicit_hypergradient(inner, outer, [theta], [lam], solver="neumann", alpha=-1.0)
    with pytest.raises(ValueError, match="tol must be a non-negative number"):
        higher.implicit_hypergradient(inner, outer, [theta], [lam], tol=-1.0)
    with pytest.raises(ValueError, match="iterations must be"):
        higher.implicit_hypergradient(inner, outer, [theta], [lam], iterations=True)
