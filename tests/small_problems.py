"""Small seeded problems that tests of several modules share (checkpointing, forward mode,
hypergradients, the optimizer's no_grad step, the CLI's hyper demo)."""

from __future__ import annotations

import torch
from torch import nn

LONG_STEPS = 9


def seeded_model(device="cpu") -> nn.Module:
    """A 3-8-2 tanh MLP with fixed initial weights (the same on every device)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).to(device)


def seeded_data(device="cpu"):
    """``LONG_STEPS`` support batches for :func:`seeded_model`, and one query batch (drawn on the CPU, then moved)."""
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(LONG_STEPS, 5, 3, generator=g).to(device),
        torch.randn(LONG_STEPS, 5, 2, generator=g).to(device),
        torch.randn(6, 3, generator=g).to(device),
        torch.randn(6, 2, generator=g).to(device),
    )


def small_problem(device="cpu"):
    """A linear model, its SGD optimizer, an inner objective with an L2 term weighted by the
    hyperparameter ``h[0]`` (strongly convex, so the implicit method applies) and an outer one."""
    g = torch.Generator().manual_seed(3)
    model = nn.Linear(3, 1).to(device)
    x, y = torch.randn(8, 3, generator=g).to(device), torch.randn(8, 1, generator=g).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def inner(fm, h):
        return (fm(x) - y).pow(2).mean() + h[0] * sum(p.pow(2).sum() for p in fm.parameters())

    def outer(fm, h):
        return (fm(x) - y).pow(2).mean()

    return model, opt, inner, outer


def logreg_validation_after_descent(lam: torch.Tensor, steps: int) -> float:
    """hypertorch's validation loss after ``steps`` steps of gradient descent (lr 0.1) at the per-feature
    L2 coefficients ``lam``, written out (the reference for the hyperparameter searches' final losses)."""
    from higher.hypergradients import logreg_problem

    _, x, y, x_val, y_val = logreg_problem()
    w = torch.zeros(20, dtype=torch.float64, requires_grad=True)
    for _ in range(steps):
        loss = nn.functional.binary_cross_entropy_with_logits(x @ w, y) + 0.5 * (lam * w.pow(2)).sum()
        (g,) = torch.autograd.grad(loss, w)
        w = (w - 0.1 * g).detach().requires_grad_()
    return float(nn.functional.binary_cross_entropy_with_logits(x_val @ w, y_val).detach())
