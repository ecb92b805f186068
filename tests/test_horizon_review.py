"""Defects found by a skeptical-user review of the long-horizon features, one test each.

Every number is checked against a reference: the plain (non-checkpointed) unroll, reverse mode
and central finite differences in float64, or the closed form of ridge regression.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import higher

STEPS = 9


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))


def _data():
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(STEPS, 5, 3, generator=g),
        torch.randn(STEPS, 5, 2, generator=g),
        torch.randn(6, 3, generator=g),
        torch.randn(6, 2, generator=g),
    )


# ------------------------------------------------------------------ checkpointed_unroll
def test_second_derivatives_through_a_checkpointed_unroll_are_refused_not_wrong():
    """create_graph=True through the segment nodes used to give a silently wrong second derivative
    (-2.65 against the plain unroll's 14.4): the recomputation differentiates without a graph."""
    xs, ys, xq, yq = _data()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lr = torch.tensor(0.1, requires_grad=True)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, override={"lr": [lr]}) as (fmodel, diffopt):
        higher.checkpointed_unroll(fmodel, diffopt, lambda fm, t: F.mse_loss(fm(xs[t]), ys[t]), STEPS, every=3)
        outer = F.mse_loss(fmodel(xq), yq)
        with pytest.raises(RuntimeError, match="create_graph"):
            torch.autograd.grad(outer, lr, create_graph=True)
        # First derivatives still work afterwards (the refused backward left nothing behind).
        (g,) = torch.autograd.grad(outer, lr)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, override={"lr": [lr]}) as (fmodel, diffopt):
        for t in range(STEPS):
            diffopt.step(F.mse_loss(fmodel(xs[t]), ys[t]))
        (reference,) = torch.autograd.grad(F.mse_loss(fmodel(xq), yq), lr)
    assert abs(g.item() - reference.item()) <= 1e-12 * max(1.0, abs(reference.item()))


def test_an_interrupted_checkpointed_unroll_leaves_the_loop_connected_to_the_model():
    """A KeyboardInterrupt inside a checkpointed segment used to leave detached copies as the fast
    weights: continuing the loop then gave no meta-gradient at all (grads None). Now the fmodel and
    optimizer are back at the start of the interrupted segment, connected to the model."""
    xs, ys, xq, yq = _data()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step_loss = lambda fm, t: F.mse_loss(fm(xs[t]), ys[t])  # noqa: E731

    def interrupted(fm, t):
        if t == 4:
            raise KeyboardInterrupt
        return step_loss(fm, t)

    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        with pytest.raises(KeyboardInterrupt):
            higher.checkpointed_unroll(fmodel, diffopt, interrupted, STEPS, every=3)
        assert fmodel.track_higher_grads and not diffopt._first_order
        done = diffopt._steps_taken
        assert done == 3  # the completed segment (steps 0-2); the interrupted one (3-5) is undone
        for t in range(done, STEPS):
            diffopt.step(step_loss(fmodel, t))
        resumed = torch.autograd.grad(F.mse_loss(fmodel(xq), yq), list(model.parameters()), allow_unused=True)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for t in range(STEPS):
            diffopt.step(step_loss(fmodel, t))
        reference = torch.autograd.grad(F.mse_loss(fmodel(xq), yq), list(model.parameters()))
    for a, b in zip(resumed, reference):
        assert a is not None
        assert (a - b).abs().max().item() <= 1e-12


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
def test_forward_mode_hyperparameters_that_enter_scalar_optimizer_state(name, options, hyper):
    xs, ys, xq, yq = _data()
    model = _model()
    opt = getattr(torch.optim, name)(model.parameters(), **options)
    names = list(hyper)
    values = [torch.tensor(v) for v in hyper.values()]

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
        model, opt, values, lambda fm, t, h: inner(fm, t), lambda fm, h: outer(fm), STEPS, override=override
    ).hypergradients
    reverse, central = _reverse_and_finite_differences(model, opt, values, override, inner, outer, STEPS)
    for f, r, c in zip(forward, reverse, central):
        assert abs(r.item() - c) <= 1e-6 * max(1.0, abs(c))  # the reference itself
        assert abs(f.item() - r.item()) <= 1e-8 * max(1.0, abs(r.item()))


# ------------------------------------------------------------------ implicit_hypergradient
def _ridge():
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
    theta, lam, expected, inner, outer = _ridge()
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
    theta, lam, _, inner, _ = _ridge()
    result = higher.implicit_hypergradient(inner, lambda p, h: torch.tensor(2.0), [theta], [lam])
    assert torch.equal(result.hypergradients[0], torch.zeros(()))


def test_implicit_bad_arguments_get_clear_errors():
    theta, lam, _, inner, outer = _ridge()
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


# ------------------------------------------------------------------ torch.no_grad around the calls
def _small_problem():
    g = torch.Generator().manual_seed(3)
    model = nn.Linear(3, 1)  # with the L2 term below, a strongly convex inner problem (for "implicit")
    x, y = torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    inner = lambda fm, h: (fm(x) - y).pow(2).mean() + h[0] * sum(p.pow(2).sum() for p in fm.parameters())  # noqa: E731
    outer = lambda fm, h: (fm(x) - y).pow(2).mean()  # noqa: E731
    return model, opt, inner, outer


@pytest.mark.parametrize("method", ["unrolled", "checkpointed", "forward", "implicit"])
def test_hypergradients_under_no_grad_are_those_computed_outside_it(method):
    """A hypergradient asked for inside torch.no_grad() (an evaluation block) used to fail with an
    unrelated error (AttributeError '_sequence_nr' for checkpointed, 'does not depend on any
    parameter' for forward, a no_grad step error for the others): it computes its own gradients."""
    from higher.hypergradients import hypergradient

    model, opt, inner, outer = _small_problem()
    hyper = [torch.tensor(0.05)]
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


def test_checkpointed_unroll_under_no_grad_gets_a_clear_error():
    model, opt, inner, _ = _small_problem()
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        with torch.no_grad(), pytest.raises(RuntimeError, match="no_grad"):
            higher.checkpointed_unroll(fmodel, diffopt, lambda fm, t: inner(fm, [0.0]), 9)


def test_forward_hypergradient_bad_override_and_outer_loss_get_clear_errors():
    model, opt, inner, outer = _small_problem()
    hyper = [torch.tensor(0.1)]
    step = lambda fm, t, h: inner(fm, h)  # noqa: E731
    with pytest.raises(TypeError, match="override must be a function of the hyperparameters"):
        higher.forward_hypergradient(model, opt, hyper, step, outer, 2, override={"lr": [hyper[0]]})
    with pytest.raises(TypeError, match="outer_loss must return a tensor"):
        higher.forward_hypergradient(model, opt, hyper, step, lambda fm, h: 1.0, 2)


# ------------------------------------------------------------------ task-batched mode
def test_batched_model_reading_a_per_task_number_gets_a_clear_error():
    """BatchNorm with momentum=None reads num_batches_tracked as a Python number, which vmap cannot
    do per task: torch's message ("calling .item() on a Tensor ... file a bug report") named
    neither the cause nor the fix."""
    model = nn.Sequential(nn.Linear(2, 5), nn.BatchNorm1d(5, momentum=None), nn.Linear(5, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(3, 6, 2)
    with higher.innerloop_ctx(model, opt, tasks=3) as (fmodel, _):
        with pytest.raises(RuntimeError, match=r"momentum=None.*without tasks="):
            fmodel(x)
        fmodel.eval()  # no statistics update: runs
        assert fmodel(x).shape == (3, 6, 1)


# ------------------------------------------------------------------ hypergradient(method="implicit")
@pytest.mark.parametrize("hyperparameter", ["lr", "weight_decay", "schedule"])
def test_implicit_method_refuses_hyperparameters_that_only_the_optimizer_reads(hyperparameter):
    """The implicit function theorem sees the inner objective only: through `override`, lr gave a
    silent zero and weight_decay a wrong hypergradient (the unrolled one is nonzero/different)."""
    from higher.hypergradients import hypergradient

    model, opt, inner, outer = _small_problem()
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


# ------------------------------------------------------------------ diffopt.step under no_grad
def test_step_under_no_grad_without_tracking_takes_the_plain_step():
    model, opt, inner, _ = _small_problem()
    results = []
    for no_grad in (False, True):
        with higher.innerloop_ctx(model, opt, track_higher_grads=False) as (fmodel, diffopt):
            for _ in range(3):
                loss = inner(fmodel, [0.01])  # computed with gradients enabled
                if no_grad:
                    with torch.no_grad():
                        diffopt.step(loss)
                else:
                    diffopt.step(loss)
            results.append([p.detach() for p in fmodel.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ algorithms.imaml_step
@pytest.mark.parametrize("options", [{"weight_decay": 0.5}, {"maximize": True}])
def test_imaml_refuses_inner_optimizer_options_that_move_the_minimiser(options):
    """The implicit meta-gradient assumes the inner loop minimises support loss + proximal term. An
    inner optimizer with weight decay converges elsewhere (maximize: away), and the meta-gradient
    came out silently wrong (against the closed form of what the loop actually solves)."""
    from higher.algorithms import imaml_step

    model = nn.Linear(4, 1, bias=False)
    loss_fn = lambda pred, y: 0.5 * (pred.squeeze(-1) - y).pow(2).sum()  # noqa: E731
    g = torch.Generator().manual_seed(4)
    tasks = [(torch.randn(6, 4, generator=g), torch.randn(6, generator=g), torch.randn(5, 4, generator=g),
              torch.randn(5, generator=g))]  # fmt: skip
    inner_opt = torch.optim.SGD(model.parameters(), lr=0.02, **options)
    with pytest.raises(ValueError, match=next(iter(options))):
        imaml_step(model, inner_opt, tasks, loss_fn, inner_steps=10, reg=2.0)
    assert model.weight.grad is None


def test_checkpointed_unroll_inputs_one_tensor_or_a_sequence_of_tensors():
    """inputs=tensor used to be iterated over (a 1-d tensor became its elements, and the error then
    asked for the very tensor given); a non-tensor raised AttributeError 'grad_fn'."""
    xs, ys, xq, yq = _data()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    log_scale = torch.zeros(2, requires_grad=True)
    scale = log_scale.exp()  # non-leaf, computed before the unroll
    step_loss = lambda fm, t: (scale * (fm(xs[t]) - ys[t]).pow(2)).mean()  # noqa: E731
    grads = []
    for inputs in (None, [scale], scale):
        with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
            if inputs is None:
                for t in range(STEPS):
                    diffopt.step(step_loss(fmodel, t))
            else:
                higher.checkpointed_unroll(fmodel, diffopt, step_loss, STEPS, every=3, inputs=inputs)
            grads.append(torch.autograd.grad(F.mse_loss(fmodel(xq), yq), log_scale, retain_graph=True)[0])
    assert grads[0].abs().max() > 0
    for g in grads[1:]:
        assert (g - grads[0]).abs().max().item() <= 1e-12
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        with pytest.raises(TypeError, match=r"inputs\[0\] must be a tensor"):
            higher.checkpointed_unroll(fmodel, diffopt, step_loss, STEPS, inputs=[0.5])
