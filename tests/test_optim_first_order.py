"""First-order mode: cheap inner gradients, meta-gradient still reaches the model (issue 5.1)."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

import higher


def _task():
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1))
    xs, ys = torch.randn(10, 2), torch.randn(10, 1)
    xq, yq = torch.randn(12, 2), torch.randn(12, 1)
    return model, (xs, ys), (xq, yq)


def _loss(model, params, x, y):
    return nn.functional.mse_loss(functional_call(model, params, (x,)), y)


@pytest.mark.parametrize("opt_type", [torch.optim.SGD, torch.optim.Adam])
def test_first_order_gradient_is_the_query_gradient_at_the_adapted_weights(opt_type):
    model, (xs, ys), (xq, yq) = _task()
    opt = opt_type(model.parameters(), lr=0.05)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, first_order=True) as (fmodel, diffopt):
        for _ in range(4):
            diffopt.step(nn.functional.mse_loss(fmodel(xs), ys))
        adapted = [p.detach().requires_grad_() for p in fmodel.parameters()]
        nn.functional.mse_loss(fmodel(xq), yq).backward()
    names = [n for n, _ in model.named_parameters()]
    expected = torch.autograd.grad(_loss(model, dict(zip(names, adapted)), xq, yq), adapted)
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-12)


def test_first_order_differs_from_second_order_and_from_no_tracking():
    model, (xs, ys), (xq, yq) = _task()

    def meta_grad(**options):
        model.zero_grad()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False, **options) as (fmodel, diffopt):
            for _ in range(3):
                diffopt.step(nn.functional.mse_loss(fmodel(xs), ys))
            nn.functional.mse_loss(fmodel(xq), yq).backward()
        return [None if p.grad is None else p.grad.clone() for p in model.parameters()]

    first, second, untracked = meta_grad(first_order=True), meta_grad(), meta_grad(track_higher_grads=False)
    assert all(g is None for g in untracked), "0.2.1's track_higher_grads=False reaches no model parameter"
    assert max((a - b).abs().max().item() for a, b in zip(first, second)) > 1e-6


def test_first_order_hypergradient_of_lr_treats_gradients_as_constants():
    model, (xs, ys), (xq, yq) = _task()
    lr = torch.tensor(0.1, requires_grad=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt, first_order=True, override={"lr": lr}) as (fmodel, diffopt):
        inner_grads = []
        for _ in range(3):
            loss = nn.functional.mse_loss(fmodel(xs), ys)
            inner_grads.append(torch.autograd.grad(loss, list(fmodel.parameters()), retain_graph=True))
            diffopt.step(loss)
        query = nn.functional.mse_loss(fmodel(xq), yq)
        final_grads = torch.autograd.grad(query, list(fmodel.parameters()), retain_graph=True)
        (d_lr,) = torch.autograd.grad(query, lr)
    # theta_K = theta_0 - lr * sum_k g_k with every g_k constant: dL/dlr = -<dL/dtheta_K, sum_k g_k>.
    expected = -sum((gf * sum(gs[i] for gs in inner_grads)).sum() for i, gf in enumerate(final_grads))
    torch.testing.assert_close(d_lr, expected, rtol=1e-12, atol=1e-14)


def test_first_order_requires_tracking():
    model, _, _ = _task()
    with pytest.raises(ValueError, match="first_order"):
        with higher.innerloop_ctx(
            model, torch.optim.SGD(model.parameters(), lr=0.1), track_higher_grads=False, first_order=True
        ):
            pass


def test_first_order_in_task_batched_mode_equals_the_per_task_path():
    tasks = 3
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
    xs, ys = torch.randn(tasks, 5, 2), torch.randn(tasks, 5, 1)
    task_losses = torch.func.vmap(nn.functional.mse_loss)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, tasks=tasks, first_order=True) as (
        fmodel,
        diffopt,
    ):
        for _ in range(3):
            diffopt.step(task_losses(fmodel(xs), ys))
        task_losses(fmodel(xs), ys).sum().backward()
    batched = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for t in range(tasks):
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False, first_order=True) as (fmodel, diffopt):
            for _ in range(3):
                diffopt.step(nn.functional.mse_loss(fmodel(xs[t]), ys[t]))
            nn.functional.mse_loss(fmodel(xs[t]), ys[t]).backward()
    for a, p in zip(batched, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-10, atol=1e-12)


def test_task_batched_mode_refuses_options_it_cannot_honour():
    model, _, _ = _task()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(NotImplementedError, match="share_buffers and initial_params are not available"):
        with higher.innerloop_ctx(model, opt, tasks=2, share_buffers=True):
            pass
