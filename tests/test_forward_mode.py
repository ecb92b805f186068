"""forward_hypergradient equals reverse mode through the unroll (float64, 1e-8).

The equalities take the ``device`` fixture (CUDA too where present: the passes replay the CUDA
random generator's draws); the tests of structure and errors run on the CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import higher
from small_problems import LONG_STEPS, seeded_data, seeded_model, small_problem

STEPS = 6


def _setup(steps: int = STEPS, device="cpu"):
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).to(device)
    xs, ys = torch.randn(steps, 8, 3, device=device), torch.randn(steps, 8, 1, device=device)
    xq, yq = torch.randn(8, 3, device=device), torch.randn(8, 1, device=device)
    inner = lambda fmodel, t, hyper: (fmodel(xs[t]) - ys[t]).pow(2).mean()  # noqa: E731
    outer = lambda fmodel, hyper: (fmodel(xq) - yq).pow(2).mean()  # noqa: E731
    return model, inner, outer


def _reverse(model, opt, hyper, inner, outer, steps, override):
    leaves = [h.clone().requires_grad_() for h in hyper]
    with higher.innerloop_ctx(model, opt, override=override(leaves) if override else None) as (fmodel, diffopt):
        for t in range(steps):
            diffopt.step(inner(fmodel, t, leaves))
        return torch.autograd.grad(outer(fmodel, leaves), leaves)


def _check(model, opt, hyper, inner, outer, override, steps=STEPS):
    result = higher.forward_hypergradient(model, opt, hyper, inner, outer, steps, override=override)
    expected = _reverse(model, opt, hyper, inner, outer, steps, override)
    assert result.passes == sum(h.numel() for h in hyper)
    for got, want in zip(result.hypergradients, expected):
        assert got.shape == want.shape and not got.requires_grad
        assert (got - want).abs().max().item() <= 1e-8 * max(1.0, want.abs().max().item())
        assert want.abs().sum() > 0
    return result


def test_sgd_lr_momentum_weight_decay(device):
    model, inner, outer = _setup(device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    hyper = [torch.tensor(v, device=device) for v in (0.1, 0.9, 0.01)]
    _check(model, opt, hyper, inner, outer, lambda h: {"lr": [h[0]], "momentum": [h[1]], "weight_decay": [h[2]]})


def test_adam_betas_and_a_learned_schedule(device):
    model, inner, outer = _setup(device=device)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    hyper = [torch.linspace(0.02, 0.01, STEPS, device=device), torch.tensor(0.8, device=device)]  # per-step lr, beta1
    _check(
        model,
        opt,
        hyper,
        inner,
        outer,
        lambda h: {"lr": [higher.PerStep(list(h[0].unbind()))], "betas": [(h[1], 0.999)]},
    )


def test_per_parameter_rates_and_a_hyperparameter_of_the_inner_loss():
    model, inner, outer = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    shapes = [p.shape for p in model.parameters()]
    hyper = [torch.full((len(shapes),), 0.1), torch.tensor(0.05)]

    def inner_l2(fmodel, t, h):
        return inner(fmodel, t, h) + h[1] * sum(p.pow(2).sum() for p in fmodel.parameters())

    _check(model, opt, hyper, inner_l2, outer, lambda h: {"lr": [higher.PerParameter(list(h[0].unbind()))]})


def test_adam_with_a_gradient_that_is_exactly_zero_gives_reverse_modes_finite_hypergradient():
    """An input feature that is always 0 gives its first-layer weights exactly zero gradients, so
    Adam's second moment stays 0 there; forward mode's tangent was NaN (sqrt's derivative at 0)
    until sqrt0's convention (derivative 0 at 0) got a forward-mode rule too. Found by the
    differential harness (Adam, a bias before BatchNorm)."""
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))
    xs, ys = torch.randn(2, 8, 3), torch.randn(2, 8, 1)
    xs[..., 0] = 0
    inner = lambda fmodel, t, hyper: (fmodel(xs[t]) - ys[t]).pow(2).mean()  # noqa: E731
    outer = lambda fmodel, hyper: (fmodel(xs[0] + 1) - ys[0]).pow(2).mean()  # noqa: E731
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    result = _check(model, opt, [torch.tensor(0.03)], inner, outer, lambda h: {"lr": [h[0]]}, steps=2)
    assert torch.isfinite(result.hypergradients[0]).all()


def test_every_pass_sees_the_same_random_numbers(device):
    """With dropout, each pass (one per hyperparameter entry) must draw the masks the reverse-mode
    unroll draws; the passes used to continue the global generator, so every entry of the
    hypergradient belonged to other masks (0.79 relative error in the harness's case)."""
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.3), nn.Tanh(), nn.Linear(8, 1)).to(device)
    _, inner, outer = _setup(device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hyper = [torch.tensor([0.1, 0.05], device=device)]  # two passes
    override = lambda h: {"lr": [h[0][0]], "weight_decay": [h[0][1]]}  # noqa: E731
    torch.manual_seed(7)
    result = higher.forward_hypergradient(model, opt, hyper, inner, outer, 3, override=override)
    after_forward = torch.rand(1, device=device)
    torch.manual_seed(7)
    expected = _reverse(model, opt, hyper, inner, outer, 3, override)
    after_reverse = torch.rand(1, device=device)
    assert (result.hypergradients[0] - expected[0]).abs().max() <= 1e-10 * expected[0].abs().max()
    assert torch.equal(after_forward, after_reverse)  # the generator is left as one unroll leaves it


def test_memory_does_not_keep_earlier_steps():
    """After every step the fast weights are cut from the reverse graph (their tangent kept)."""
    model, inner, outer = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    seen = []

    def depth(node):
        return 0 if node is None else 1 + max((depth(n) for n, _ in node.next_functions), default=0)

    def probe(fmodel, t, h):
        seen.append([depth(p.grad_fn) for p in fmodel.parameters()])
        return inner(fmodel, t, h)

    higher.forward_hypergradient(
        model, opt, [torch.tensor(0.1)], probe, outer, STEPS, override=lambda h: {"lr": [h[0]]}
    )
    # At most the view that makes a dual tensor of a fresh leaf (ViewBackward -> AccumulateGrad).
    assert len(seen) == STEPS and all(d <= 2 for step in seen for d in step)


def test_float32(device):
    torch.set_default_dtype(torch.float32)
    model, inner, outer = _setup(device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lr = torch.tensor(0.1, device=device)
    result = higher.forward_hypergradient(model, opt, [lr], inner, outer, STEPS, override=lambda h: {"lr": [h[0]]})
    (expected,) = _reverse(model, opt, [lr], inner, outer, STEPS, lambda h: {"lr": [h[0]]})
    assert result.hypergradients[0].dtype == torch.float32
    assert torch.allclose(result.hypergradients[0], expected, rtol=1e-4, atol=1e-6)


def test_mse_loss_limitation_gets_a_clear_error():
    """torch 2.13 cannot take F.mse_loss(mean) forward-over-reverse; if this starts passing, drop the note."""
    model, _, outer = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3), torch.randn(4, 1)
    with pytest.raises(RuntimeError, match=r"pow\(2\).mean\(\)"):
        higher.forward_hypergradient(
            model,
            opt,
            [torch.tensor(0.1)],
            lambda fm, t, h: F.mse_loss(fm(x), y),
            outer,
            2,
            override=lambda h: {"lr": [h[0]]},
        )


def test_bad_arguments():
    model, inner, outer = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="at least one"):
        higher.forward_hypergradient(model, opt, [], inner, outer, 2)
    with pytest.raises(TypeError, match="floating-point"):
        higher.forward_hypergradient(model, opt, [torch.tensor(1)], inner, outer, 2)
    with pytest.raises(ValueError, match="steps"):
        higher.forward_hypergradient(model, opt, [torch.tensor(0.1)], inner, outer, -1)


# ------------------------------------------------------------------ forward_hypergradient
def _reverse_and_finite_differences(model, opt, hyper, override, inner, outer, steps, eps=1e-6):
    def unroll(values, grad):
        with higher.innerloop_ctx(model, opt, override=override(values)) as (fmodel, diffopt):
            for t in range(steps):
                diffopt.step(inner(fmodel, t))
            loss = outer(fmodel)
            return torch.autograd.grad(loss, values) if grad else loss.item()

    reverse = unroll([h.clone().requires_grad_() for h in hyper], True)
    central = []
    for i, h in enumerate(hyper):
        up = [x.clone() for x in hyper]
        down = [x.clone() for x in hyper]
        up[i] = h + eps
        down[i] = h - eps
        central.append((unroll(up, False) - unroll(down, False)) / (2 * eps))
    return reverse, central


@pytest.mark.parametrize(
    ("name", "options", "hyper"),
    [
        ("ASGD", {"lr": 0.05, "t0": 2}, {"lr": 0.05, "lambd": 1e-3, "alpha": 0.75}),
        ("NAdam", {"lr": 0.01}, {"momentum_decay": 0.004, "beta1": 0.9}),
    ],
)
def test_forward_mode_hyperparameters_that_enter_scalar_optimizer_state(name, options, hyper, device):
    """ASGD's eta and mu, NAdam's mu_product carry tangents (on CUDA: device tensors beside torch's CPU scalars)."""
    xs, ys, xq, yq = seeded_data(device)
    model = seeded_model(device)
    opt = getattr(torch.optim, name)(model.parameters(), **options)
    names = list(hyper)
    values = [torch.tensor(v, device=device) for v in hyper.values()]

    def override(h):
        out = {}
        for key, value in zip(names, h):
            if key == "beta1":
                out["betas"] = [(value, 0.999)]
            else:
                out[key] = [value]
        return out

    inner = lambda fm, t: (fm(xs[t]) - ys[t]).pow(2).mean()  # noqa: E731
    outer = lambda fm: (fm(xq) - yq).pow(2).mean()  # noqa: E731
    forward = higher.forward_hypergradient(
        model, opt, values, lambda fm, t, h: inner(fm, t), lambda fm, h: outer(fm), LONG_STEPS, override=override
    ).hypergradients
    reverse, central = _reverse_and_finite_differences(model, opt, values, override, inner, outer, LONG_STEPS)
    for f, r, c in zip(forward, reverse, central):
        assert abs(r.item() - c) <= 1e-6 * max(1.0, abs(c))  # the reference itself
        assert abs(f.item() - r.item()) <= 1e-8 * max(1.0, abs(r.item()))


def test_forward_hypergradient_bad_override_and_outer_loss_get_clear_errors():
    model, opt, inner, outer = small_problem()
    hyper = [torch.tensor(0.1)]
    step = lambda fm, t, h: inner(fm, h)  # noqa: E731
    with pytest.raises(TypeError, match="override must be a function of the hyperparameters"):
        higher.forward_hypergradient(model, opt, hyper, step, outer, 2, override={"lr": [hyper[0]]})
    with pytest.raises(TypeError, match="outer_loss must return a tensor"):
        higher.forward_hypergradient(model, opt, hyper, step, lambda fm, h: 1.0, 2)
