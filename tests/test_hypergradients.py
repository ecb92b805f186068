"""The four methods agree on hypertorch's logistic-regression problem; its published numbers reproduce."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import higher
from higher.hypergradients import _logreg_losses, hypergradient, logreg_comparison, logreg_hpo, logreg_problem
from small_problems import logreg_validation_after_descent, small_problem

# What hypertorch's examples/logistic_regression.ipynb prints (float32 throughout): the inner loss
# at t = 0, 10, ..., 90, 99 (the loss at w_t, after t gradient steps), the validation loss at
# w_100 with lambda = 1 (its HPO cell, o_step=0), and after 10 and 20 steps of its outer loop.
PUBLISHED_INNER = {
    0: 0.6931472420692444,
    10: 0.6285591125488281,
    20: 0.6243906021118164,
    30: 0.6241106390953064,
    40: 0.6240913271903992,
    50: 0.6240900754928589,
    60: 0.6240900754928589,
    70: 0.6240899562835693,
    80: 0.6240898966789246,
    90: 0.6240898370742798,
    99: 0.6240898370742798,
}
PUBLISHED_VALIDATION = 0.5743989944458008
PUBLISHED_OUTER = {10: 0.5337678790092468, 20: 0.3615218698978424}
ULP = 2.0**-24  # float32's spacing in [0.5, 1), where the inner losses and the first validation loss lie


def _draw_like_the_notebook(n, d, seed):
    """The notebook's cell, on numpy's global generator, with scikit-learn's own train_test_split."""
    from sklearn.model_selection import train_test_split

    np.random.seed(seed)
    w_oracle = np.random.randn(d)
    x = np.random.randn(n, d)
    y = x @ w_oracle + 0.1 * np.random.randn(n)
    y = (y > 0.0).astype(float)
    return train_test_split(x, y, test_size=0.5)  # x_train, x_val, y_train, y_val


@pytest.mark.parametrize(("n", "d", "seed"), [(1000, 20, 1), (999, 3, 1), (7, 2, 5)])
def test_the_data_and_split_are_the_notebooks(n, d, seed):
    """The same samples, split and order as np.random.seed + scikit-learn's train_test_split (random_state=None)."""
    pytest.importorskip("sklearn")
    state = np.random.get_state()
    try:
        x_train, x_val, y_train, y_val = _draw_like_the_notebook(n, d, seed)
        np.random.set_state(state)
        _, xt, yt, xv, yv = logreg_problem(n, d, seed)
        after = np.random.get_state()
    finally:
        np.random.set_state(state)
    for ours, theirs in ((xt, x_train), (yt, y_train), (xv, x_val), (yv, y_val)):
        assert ours.dtype == torch.float64 and np.array_equal(ours.numpy(), theirs)
    assert len(xv) == -(-n // 2) and len(xt) == n // 2  # test_size=0.5: ceil(n/2) validate
    # logreg_problem draws from a RandomState of its own: numpy's global generator is untouched.
    assert all(np.array_equal(a, b) for a, b in zip(state[1:], after[1:]))


def test_the_published_inner_and_validation_losses_reproduce_in_float64():
    """The notebook's t is the number of steps taken: its t=10 is our inner_losses[10], the loss at w_10.

    In float64 the printed t=10 and t=50 inner losses and the validation loss at lambda = 1 come out
    within one float32 ulp (6e-8) of the published float32 numbers, the other printed inner losses
    within three; the neighbouring steps (t=9, t=11) are off by 1e-3.
    """
    results = logreg_comparison(100, methods=("unrolled",))
    losses = results["inner_losses"]
    assert len(losses) == 100 and losses[0] == pytest.approx(np.log(2), abs=1e-15)
    for t in (10, 50):
        assert abs(losses[t] - PUBLISHED_INNER[t]) < ULP
    assert abs(results["methods"]["unrolled"]["outer_loss"] - PUBLISHED_VALIDATION) < ULP
    for t, published in PUBLISHED_INNER.items():
        assert abs(losses[t] - published) < 3 * ULP
    for t in (9, 11):
        assert abs(losses[t] - PUBLISHED_INNER[10]) > 1e-3

    # The same curve from a hand-written gradient descent on the returned data (lr 0.1, lambda = 1).
    model, x, y, xv, yv = logreg_problem()
    assert x.shape == (500, 20) and xv.shape == (500, 20) and set(y.unique().tolist()) == {0.0, 1.0}
    w = torch.zeros(20, requires_grad=True)
    hand = []
    for _ in range(100):
        loss = F.binary_cross_entropy_with_logits(x @ w, y) + 0.5 * w.pow(2).sum()
        hand.append(float(loss.detach()))
        (g,) = torch.autograd.grad(loss, w)
        w = (w - 0.1 * g).detach().requires_grad_()
    assert losses == pytest.approx(hand, rel=1e-12)


def test_the_notebooks_float32_computation_gives_its_printed_numbers():
    """float32 data and the notebook's penalty ``0.5 * w^T diag(lambda) w``: its printed numbers to a few ulps."""
    _, x, y, xv, yv = logreg_problem(dtype=torch.float32)
    lam = torch.ones(20, dtype=torch.float32)
    w = torch.zeros(20, dtype=torch.float32, requires_grad=True)
    losses = []
    for _ in range(100):
        loss = (
            F.binary_cross_entropy_with_logits(x @ w, y)
            + 0.5 * (w.unsqueeze(0) @ torch.diag(lam) @ w.unsqueeze(1)).sum()
        )
        losses.append(loss.item())
        (g,) = torch.autograd.grad(loss, w)
        w = (w - 0.1 * g).detach().requires_grad_()
    validation = F.binary_cross_entropy_with_logits(xv @ w, yv).item()
    for t in (10, 50):
        assert abs(losses[t] - PUBLISHED_INNER[t]) <= 4 * ULP
    assert abs(validation - PUBLISHED_VALIDATION) <= 4 * ULP


def test_the_notebooks_own_outer_loop_reproduces_its_later_validation_losses():
    """Its HPO cell (SGD lr 1, momentum 0.9 on lambda, clamped at 1e-8; hypergradient through the last
    K=10 of the T=100 inner steps) on our data, in float64: its o_step=10 and 20 losses to 1.2e-7."""
    _, x, y, xv, yv = logreg_problem()

    def step(w, lam):
        loss = F.binary_cross_entropy_with_logits(x @ w, y) + 0.5 * (lam * w * w).sum()
        return w - 0.1 * torch.autograd.grad(loss, w, create_graph=True)[0]

    lam = torch.ones(20, requires_grad=True)
    opt = torch.optim.SGD([lam], lr=1.0, momentum=0.9)
    printed = {}
    for o_step in range(21):
        w = torch.zeros(20)
        for _ in range(90):  # the untracked part: hypertorch's reverse() starts from w_90 detached
            w = step(w.requires_grad_(), lam.detach()).detach()
        w.requires_grad_()
        for _ in range(10):
            w = step(w, lam)
        validation = F.binary_cross_entropy_with_logits(xv @ w, yv)
        opt.zero_grad()
        validation.backward()
        opt.step()
        with torch.no_grad():
            lam.clamp_(min=1e-8)
        printed[o_step] = float(validation.detach())
    assert abs(printed[0] - PUBLISHED_VALIDATION) < ULP
    for o_step, published in PUBLISHED_OUTER.items():
        assert abs(printed[o_step] - published) < 2 * ULP


def test_four_methods_agree_on_the_published_problem():
    """T=100, lambda = 1: every method's outer loss is the published one; checkpointed and forward
    mode give the unrolled hypergradient to rounding, implicit to within 10 |grad f| of it
    (|theta_T - theta*| <= |grad f| / mu with mu >= 1 from the L2 term at lambda = 1)."""
    results = logreg_comparison(100)
    methods = results["methods"]
    assert set(methods) == {"unrolled", "checkpointed", "forward", "implicit"}
    for info in methods.values():
        assert abs(info["outer_loss"] - PUBLISHED_VALIDATION) < ULP
    for name in ("checkpointed", "forward"):
        assert methods[name]["max_abs_difference"] < 1e-15  # exact methods
    largest = max(abs(g) for g in methods["unrolled"]["hypergradient"])
    assert largest > 1e-2
    implicit = methods["implicit"]
    assert implicit["residual"] < 1e-10 and implicit["inner_gradient_norm"] < 1e-5
    assert 0 < implicit["max_abs_difference"] <= 10 * implicit["inner_gradient_norm"]


def test_implicit_is_off_before_the_inner_loop_converges():
    """Implicit is exact at the minimiser only; after 30 steps the inner gradient is not yet 0."""
    methods = logreg_comparison(30, methods=("unrolled", "implicit"))["methods"]
    largest = max(abs(g) for g in methods["unrolled"]["hypergradient"])
    assert 1e-5 < methods["implicit"]["inner_gradient_norm"] < 1e-2
    assert 1e-5 < methods["implicit"]["max_abs_difference"] < 0.2 * largest
    assert methods["implicit"]["residual"] < 1e-10


def test_hpo_reports_the_validation_loss_after_its_last_step():
    """history[k] is the loss at the lambda outer step k started from (k=0: lambda = 1, the published
    0.5743990); validation_loss is the loss at final_lambda, after the last step."""
    result = logreg_hpo("unrolled", steps=100, outer_steps=2)
    history = [h["validation_loss"] for h in result["history"]]
    assert len(history) == 2 and abs(history[0] - PUBLISHED_VALIDATION) < ULP
    expected = logreg_validation_after_descent(torch.tensor(result["final_lambda"]), 100)
    assert result["validation_loss"] == pytest.approx(expected, rel=1e-12)
    assert result["validation_loss"] < history[1] < history[0]
    assert logreg_hpo("unrolled", steps=100, outer_steps=0)["validation_loss"] == pytest.approx(history[0], rel=1e-12)


def test_hpo_lowers_the_validation_loss_and_refuses_unknown_methods():
    result = logreg_hpo("implicit", steps=50, outer_steps=5, outer_lr=0.3)
    losses = [h["validation_loss"] for h in result["history"]]
    assert losses[-1] < losses[0] and result["validation_loss"] < losses[-1]
    assert len(result["first_hypergradient"]) == 20 and result["peak_rss_mib"] > 0
    model, *data = logreg_problem()
    inner, outer = _logreg_losses(*data)
    with pytest.raises(ValueError, match="method must be one of"):
        hypergradient("reversible", model, torch.optim.SGD(model.parameters(), lr=0.1), [], inner, outer, 1)


# ------------------------------------------------------------------ torch.no_grad around the calls
@pytest.mark.parametrize("method", ["unrolled", "checkpointed", "forward", "implicit"])
def test_hypergradients_under_no_grad_are_those_computed_outside_it(method, device):
    """A hypergradient asked for inside torch.no_grad() (an evaluation block) used to fail with an
    unrelated error (AttributeError '_sequence_nr' for checkpointed, 'does not depend on any
    parameter' for forward, a no_grad step error for the others): it computes its own gradients.
    Every method on the ``device`` (CUDA too where present)."""
    from higher.hypergradients import hypergradient

    model, opt, inner, outer = small_problem(device)
    hyper = [torch.tensor(0.05, device=device)]
    expected = hypergradient(method, model, opt, hyper, inner, outer, 30).hypergradients
    with torch.no_grad():
        got = hypergradient(method, model, opt, hyper, inner, outer, 30).hypergradients
        forward = higher.forward_hypergradient(
            model, opt, hyper, lambda fm, t, h: inner(fm, h), outer, 30
        ).hypergradients
    assert expected[0].abs().item() > 0
    assert torch.equal(got[0], expected[0])
    if method == "forward":
        assert torch.equal(forward[0], expected[0])


# ------------------------------------------------------------------ hypergradient(method="implicit")
@pytest.mark.parametrize("hyperparameter", ["lr", "weight_decay", "schedule"])
def test_implicit_method_refuses_hyperparameters_that_only_the_optimizer_reads(hyperparameter):
    """The implicit function theorem sees the inner objective only: through `override`, lr gave a
    silent zero and weight_decay a wrong hypergradient (the unrolled one is nonzero/different)."""
    from higher.hypergradients import hypergradient

    model, opt, inner, outer = small_problem()
    overrides = {
        "lr": lambda h: {"lr": [h[0]]},
        "weight_decay": lambda h: {"weight_decay": [h[0]]},
        "schedule": lambda h: {"lr": [higher.PerStep(lambda t: h[0] / (1 + t))]},
    }
    override = overrides[hyperparameter]
    hyper = [torch.tensor(0.05)]
    unrolled = hypergradient("unrolled", model, opt, hyper, inner, outer, 30, override=override).hypergradients
    assert unrolled[0].abs().item() > 1e-6
    with pytest.raises(ValueError, match="override"):
        hypergradient("implicit", model, opt, hyper, inner, outer, 30, override=override)
    # An override that does not read the hyperparameters is fine.
    result = hypergradient("implicit", model, opt, hyper, inner, outer, 30, override=lambda h: {"lr": [0.1]})
    expected = hypergradient("implicit", model, opt, hyper, inner, outer, 30).hypergradients
    assert torch.equal(result.hypergradients[0], expected[0])
