"""The four methods agree on hypertorch's logistic-regression problem; its published numbers reproduce."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from higher.hypergradients import hypergradient, logreg_comparison, logreg_hpo, logreg_problem


def test_logreg_problem_matches_the_published_inner_loss_curve():
    """Inner loss log 2 at the start and about 0.62 by step 50 (hypertorch: 0.69315 -> ~0.624)."""
    model, x, y, xv, yv = logreg_problem()
    assert x.shape == (500, 20) and xv.shape == (500, 20) and set(y.unique().tolist()) == {0.0, 1.0}
    w = torch.zeros(20, requires_grad=True)
    losses = []
    for _ in range(50):  # hand-written gradient descent, lr 0.1, L2 coefficients 1
        loss = F.binary_cross_entropy_with_logits(x @ w, y) + 0.5 * w.pow(2).sum()
        losses.append(float(loss.detach()))
        (g,) = torch.autograd.grad(loss, w)
        w = (w - 0.1 * g).detach().requires_grad_()
    assert abs(losses[0] - 0.69315) < 1e-5
    assert 0.615 < losses[-1] < 0.63
    results = logreg_comparison(50, methods=("unrolled",))
    assert results["inner_losses"] == pytest.approx(losses, rel=1e-12)


def test_four_methods_agree():
    results = logreg_comparison(30)
    methods = results["methods"]
    assert set(methods) == {"unrolled", "checkpointed", "forward", "implicit"}
    for name in ("checkpointed", "forward"):
        assert methods[name]["max_abs_difference"] < 1e-12  # exact methods
    # Implicit is exact at the minimiser only (tested on ridge regression); after 30 steps the inner
    # gradient is not yet 0, and the implicit hypergradient is close to, not equal to, the unrolled one.
    largest = max(abs(g) for g in methods["unrolled"]["hypergradient"])
    assert largest > 1e-3
    assert methods["implicit"]["inner_gradient_norm"] < 1e-2
    assert 0 < methods["implicit"]["max_abs_difference"] < 0.2 * largest
    assert methods["implicit"]["residual"] < 1e-10


def test_hpo_lowers_the_validation_loss_and_refuses_unknown_methods():
    result = logreg_hpo("implicit", steps=50, outer_steps=5, outer_lr=0.3)
    losses = [h["validation_loss"] for h in result["history"]]
    assert losses[-1] < losses[0]
    assert len(result["first_hypergradient"]) == 20 and result["peak_rss_mib"] > 0
    model, *_ = logreg_problem()
    with pytest.raises(ValueError, match="method must be one of"):
        hypergradient("reversible", model, torch.optim.SGD(model.parameters(), lr=0.1), [], None, None, 1)
