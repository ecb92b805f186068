"""Per-parameter learned rates (issue 5.4, Meta-SGD): one hyperparameter tensor per parameter."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

import higher


def _problem():
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))
    return model, torch.randn(10, 3), torch.randn(10, 1)


@pytest.mark.parametrize("shaped", [True, False], ids=["shaped_like_param", "broadcast_rows"])
def test_per_parameter_learning_rates_get_exact_hypergradients(shaped):
    model, x, y = _problem()
    params = list(model.parameters())
    if shaped:
        lrs = [torch.full_like(p, 0.1).add_(0.01 * torch.rand_like(p)).requires_grad_() for p in params]
    else:  # one rate per output row, broadcast over the row
        lrs = [torch.full((p.shape[0],) + (1,) * (p.dim() - 1), 0.1).requires_grad_() for p in params]
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.5)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, override={"lr": higher.PerParameter(lrs)}) as (
        fmodel,
        diffopt,
    ):
        for _ in range(3):
            diffopt.step(nn.functional.mse_loss(fmodel(x), y))
        meta_loss = nn.functional.mse_loss(fmodel(x), y)
    ours = torch.autograd.grad(meta_loss, lrs + params)

    names = [n for n, _ in model.named_parameters()]
    fast, buffers = list(params), [None] * len(params)
    for _ in range(3):
        loss = nn.functional.mse_loss(functional_call(model, dict(zip(names, fast)), (x,)), y)
        grads = torch.autograd.grad(loss, fast, create_graph=True)
        buffers = [g if b is None else b * 0.5 + g for b, g in zip(buffers, grads)]
        fast = [p - lr * b for p, lr, b in zip(fast, lrs, buffers)]
    reference = nn.functional.mse_loss(functional_call(model, dict(zip(names, fast)), (x,)), y)
    theirs = torch.autograd.grad(reference, lrs + params)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_per_parameter_with_adam_matches_separate_optimizers():
    model, x, y = _problem()
    lrs = [0.01, 0.02, 0.03, 0.04]
    torch_opts = []
    reference = [p.detach().clone().requires_grad_() for p in model.parameters()]
    for p, lr in zip(reference, lrs):
        torch_opts.append(torch.optim.Adam([p], lr=lr))
    names = [n for n, _ in model.named_parameters()]
    for _ in range(5):
        loss = nn.functional.mse_loss(functional_call(model, dict(zip(names, reference)), (x,)), y)
        for opt in torch_opts:
            opt.zero_grad()
        loss.backward()
        for opt in torch_opts:
            opt.step()
    opt = torch.optim.Adam(model.parameters(), lr=1.0)
    with higher.innerloop_ctx(model, opt, override={"lr": higher.PerParameter(lrs)}) as (fmodel, diffopt):
        for _ in range(5):
            diffopt.step(nn.functional.mse_loss(fmodel(x), y))
    for ours, theirs in zip(fmodel.parameters(), reference):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


def test_wrong_count_or_shape_is_refused():
    model, _, _ = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="has 2 values but the parameter group has 4"):
        higher.innerloop_ctx(model, opt, override={"lr": higher.PerParameter([0.1, 0.1])}).__enter__()
    bad = [torch.ones(5, 3), torch.ones(5), torch.ones(2, 5), torch.ones(1)]
    with pytest.raises(ValueError, match=r"shape \(2, 5\), which does not broadcast to its parameter's shape \(1, 5\)"):
        higher.innerloop_ctx(model, opt, override={"lr": higher.PerParameter(bad)}).__enter__()


def test_per_parameter_rates_in_task_batched_mode_equal_the_per_task_path():
    tasks = 3
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))
    xs, ys = torch.randn(tasks, 5, 2), torch.randn(tasks, 5, 1)
    task_losses = torch.func.vmap(nn.functional.mse_loss)
    lrs = [torch.full_like(p, 0.1).add_(0.01 * torch.rand_like(p)).requires_grad_() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    override = {"lr": higher.PerParameter(lrs)}
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, tasks=tasks, override=override) as (f, d):
        for _ in range(2):
            d.step(task_losses(f(xs), ys))
        batched = torch.autograd.grad(task_losses(f(xs), ys).sum(), lrs)
    per_task = [torch.zeros_like(lr) for lr in lrs]
    for t in range(tasks):
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False, override=override) as (f, d):
            for _ in range(2):
                d.step(nn.functional.mse_loss(f(xs[t]), ys[t]))
            for total, g in zip(per_task, torch.autograd.grad(nn.functional.mse_loss(f(xs[t]), ys[t]), lrs)):
                total += g
    for a, b in zip(batched, per_task):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
