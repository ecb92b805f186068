"""The algorithms of higher.algorithms against hand-written references and finite differences."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import higher
from higher.algorithms import (
    MetaSGD,
    adapt,
    adaptation_losses,
    anil_step,
    maml_step,
    unrolled_validation_loss,
)


def small_net() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3), nn.Tanh(), nn.Linear(3, 1))


def make_tasks(num: int, shots: int = 5) -> list[tuple[torch.Tensor, ...]]:
    tasks = []
    for _ in range(num):
        w = torch.randn(2, 1)
        sx, qx = torch.randn(shots, 2), torch.randn(shots, 2)
        tasks.append((sx, torch.sin(sx @ w), qx, torch.sin(qx @ w)))
    return tasks


def grads_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def reference_adapt(model, params: dict, x, y, lr: float, momentum: float, steps: int, create_graph: bool) -> dict:
    """Hand-written SGD with momentum on functional_call (torch.optim's update, written out)."""
    buffers = {}
    for _ in range(steps):
        loss = F.mse_loss(functional_call(model, params, (x,)), y)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
        new = {}
        for (name, p), g in zip(params.items(), grads):
            buf = g if name not in buffers else momentum * buffers[name] + g
            buffers[name] = buf
            new[name] = p - lr * buf
        params = new
    return params


@pytest.mark.parametrize("inner_steps", [1, 3])
def test_maml_matches_hand_written_functional_call_unroll(inner_steps):
    model, tasks = small_net(), make_tasks(3)
    inner_opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss = maml_step(model, inner_opt, tasks, F.mse_loss, inner_steps=inner_steps)
    ours = grads_of(model)

    names = [n for n, _ in model.named_parameters()]
    expected = [torch.zeros_like(p) for p in model.parameters()]
    expected_loss = 0.0
    for sx, sy, qx, qy in tasks:
        initial = dict(model.named_parameters())
        adapted = reference_adapt(model, initial, sx, sy, 0.1, 0.9, inner_steps, create_graph=True)
        query_loss = F.mse_loss(functional_call(model, adapted, (qx,)), qy)
        expected_loss += query_loss.item() / len(tasks)
        for e, g in zip(expected, torch.autograd.grad(query_loss / len(tasks), [initial[n] for n in names])):
            e += g
    assert loss == pytest.approx(expected_loss, rel=1e-12)
    for o, e in zip(ours, expected):
        torch.testing.assert_close(o, e, rtol=1e-10, atol=1e-12)
    # The second-order terms matter here: the first-order meta-gradient is different.
    model.zero_grad()
    maml_step(model, inner_opt, tasks, F.mse_loss, inner_steps=inner_steps, first_order=True)
    assert max((o - g).abs().max().item() for o, g in zip(ours, grads_of(model))) > 1e-6


@pytest.mark.parametrize("inner_steps", [0, 1, 4])
def test_first_order_meta_gradient_reaches_model_and_is_the_gradient_at_the_adapted_weights(inner_steps):
    model, tasks = small_net(), make_tasks(2)
    inner_opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    for p in model.parameters():
        assert p.grad is None
    maml_step(model, inner_opt, tasks, F.mse_loss, inner_steps=inner_steps, first_order=True)
    ours = grads_of(model)  # fails if the gradient did not reach model.parameters()

    names = [n for n, _ in model.named_parameters()]
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for sx, sy, qx, qy in tasks:
        start = {n: p.detach() for n, p in model.named_parameters()}
        for p in start.values():
            p.requires_grad_()
        adapted = reference_adapt(model, start, sx, sy, 0.2, 0.5, inner_steps, create_graph=False)
        adapted = {n: p.detach().requires_grad_() for n, p in adapted.items()}
        query_loss = F.mse_loss(functional_call(model, adapted, (qx,)), qy) / len(tasks)
        for e, g in zip(expected, torch.autograd.grad(query_loss, [adapted[n] for n in names])):
            e += g
    for o, e in zip(ours, expected):
        torch.testing.assert_close(o, e, rtol=1e-10, atol=1e-12)


def test_meta_gradients_accumulate_like_backward_and_skip_frozen_parameters():
    model, tasks = small_net(), make_tasks(2)
    model[0].bias.requires_grad_(False)
    inner_opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for first_order in (False, True):
        model.zero_grad()
        maml_step(model, inner_opt, tasks, F.mse_loss, first_order=first_order)
        once = grads_of(model[2:])
        maml_step(model, inner_opt, tasks, F.mse_loss, first_order=first_order)
        for a, b in zip(once, grads_of(model[2:])):
            torch.testing.assert_close(b, 2 * a)
        assert model[0].bias.grad is None


def test_maml_works_with_adam_as_inner_optimizer_and_matches_higher_directly():
    model, tasks = small_net(), make_tasks(2)
    inner_opt = torch.optim.Adam(model.parameters(), lr=0.05)
    maml_step(model, inner_opt, tasks, F.mse_loss, inner_steps=2)
    ours = grads_of(model)
    model.zero_grad()
    for sx, sy, qx, qy in tasks:
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(2):
                diffopt.step(F.mse_loss(fmodel(sx), sy))
            (F.mse_loss(fmodel(qx), qy) / 2).backward()
    for o, e in zip(ours, grads_of(model)):
        torch.testing.assert_close(o, e, rtol=1e-12, atol=1e-14)


def meta_sgd_loss(metasgd: MetaSGD, tasks, steps: int) -> torch.Tensor:
    total = 0.0
    for sx, sy, qx, qy in tasks:
        fmodel = metasgd.adapt(sx, sy, F.mse_loss, steps)
        total = total + F.mse_loss(fmodel(qx), qy) / len(tasks)
    return total


def test_meta_sgd_update_is_elementwise_learned_learning_rate():
    model, (sx, sy, _, _) = small_net(), make_tasks(1)[0]
    metasgd = MetaSGD(model, lr=0.1)
    with torch.no_grad():
        for lr in metasgd.lrs:
            lr.uniform_(0.01, 0.3)
    fmodel = metasgd.adapt(sx, sy, F.mse_loss, steps=1)
    grads = torch.autograd.grad(F.mse_loss(model(sx), sy), list(model.parameters()))
    for new, p, g, lr in zip(fmodel.parameters(), model.parameters(), grads, metasgd.lrs):
        torch.testing.assert_close(new, p - lr * g, rtol=1e-12, atol=1e-14)


def test_meta_sgd_learning_rates_receive_gradients_that_match_finite_differences():
    model, tasks = small_net(), make_tasks(2)
    metasgd = MetaSGD(model, lr=0.1)
    with torch.no_grad():
        for lr in metasgd.lrs:
            lr.uniform_(0.05, 0.2)
    loss = metasgd.meta_step(tasks, F.mse_loss, inner_steps=2)
    assert loss == pytest.approx(meta_sgd_loss(metasgd, tasks, 2).item(), rel=1e-12)
    for lr in metasgd.lrs:
        assert lr.grad is not None and lr.grad.abs().sum() > 0
    for p in model.parameters():
        assert p.grad is not None
    eps = 1e-6
    for lr in (metasgd.lrs[0], metasgd.lrs[3], metasgd.lrs[4]):
        for index in [(0,) * lr.dim(), tuple(s - 1 for s in lr.shape)]:
            values = []
            for shift in (eps, -2 * eps, eps):
                with torch.no_grad():
                    lr[index] += shift
                values.append(meta_sgd_loss(metasgd, tasks, 2).item())
            up, down = values[0], values[1]
            assert lr.grad[index].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-9)


def test_meta_sgd_with_another_optimizer_and_bad_kwargs():
    model, tasks = small_net(), make_tasks(1)
    metasgd = MetaSGD(model, lr=0.01, optimizer=torch.optim.Adam)
    metasgd.meta_step(tasks, F.mse_loss, inner_steps=2)
    assert all(lr.grad is not None and torch.isfinite(lr.grad).all() for lr in metasgd.lrs)
    with pytest.raises(ValueError, match="lr"):
        MetaSGD(model, optimizer_kwargs={"lr": 0.1})


@pytest.mark.parametrize("first_order", [False, True])
def test_anil_equals_maml_with_an_inner_optimizer_over_the_head_only(first_order):
    body = nn.Sequential(nn.Linear(2, 6), nn.Tanh())
    head = nn.Linear(6, 1)
    model = nn.Sequential(body, head)
    tasks = make_tasks(3)
    inner_opt = torch.optim.SGD(head.parameters(), lr=0.3, momentum=0.5)
    loss = anil_step(body, head, inner_opt, tasks, F.mse_loss, inner_steps=3, first_order=first_order)
    ours = grads_of(model)
    assert all(g.abs().sum() > 0 for g in ours[:2])  # the body is meta-learned
    model.zero_grad()
    expected_loss = maml_step(model, inner_opt, tasks, F.mse_loss, inner_steps=3, first_order=first_order)
    assert loss == pytest.approx(expected_loss, rel=1e-12)
    for o, e in zip(ours, grads_of(model)):
        torch.testing.assert_close(o, e, rtol=1e-10, atol=1e-12)


def test_anil_body_weights_stay_fixed_in_the_inner_loop():
    body = nn.Sequential(nn.Linear(2, 6), nn.Tanh())
    head = nn.Linear(6, 1)
    model = nn.Sequential(body, head)
    sx, sy, _, _ = make_tasks(1)[0]
    inner_opt = torch.optim.SGD(head.parameters(), lr=0.3)
    fmodel = adapt(model, inner_opt, sx, sy, F.mse_loss, steps=4)
    for t in range(1, 5):
        body_now, head_now = list(fmodel.parameters(time=t))[:2], list(fmodel.parameters(time=t))[2:]
        for now, initial in zip(body_now, body.parameters()):
            assert torch.equal(now, initial)
        for now, initial in zip(head_now, head.parameters()):
            assert not torch.equal(now, initial)


def test_unrolled_validation_loss_hypergradients_match_finite_differences():
    model = small_net()
    (sx, sy, qx, qy) = make_tasks(1)[0]
    inner_opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    batches = [(sx[:3], sy[:3]), (sx[3:], sy[3:]), (sx, sy)]

    def value(lr, momentum):
        loss, fmodel = unrolled_validation_loss(
            model, inner_opt, {"lr": lr, "momentum": momentum}, batches, (qx, qy), F.mse_loss
        )
        return loss, fmodel

    lr = torch.tensor(0.1, requires_grad=True)
    momentum = torch.tensor(0.5, requires_grad=True)
    loss, fmodel = value(lr, momentum)
    assert len(fmodel._fast_params) == 4
    d_lr, d_momentum = torch.autograd.grad(loss, [lr, momentum])
    eps = 1e-6
    for analytic, (bump_lr, bump_m) in ((d_lr, (eps, 0)), (d_momentum, (0, eps))):
        up = value(torch.tensor(0.1 + bump_lr), torch.tensor(0.5 + bump_m))[0].item()
        down = value(torch.tensor(0.1 - bump_lr), torch.tensor(0.5 - bump_m))[0].item()
        assert analytic.item() == pytest.approx((up - down) / (2 * eps), rel=1e-6)
    for p in model.parameters():
        assert p.grad is None  # copy_initial_weights=True: the model is not meta-learned here


def test_adaptation_losses_is_plain_fine_tuning_of_a_copy():
    model, task = small_net(), make_tasks(1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    curve = adaptation_losses(model, torch.optim.SGD(model.parameters(), lr=0.1), task, F.mse_loss, steps=3)
    copy = small_net()
    copy.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(copy.parameters(), lr=0.1)
    expected = []
    for step in range(4):
        expected.append(F.mse_loss(copy(task[2]), task[3]).item())
        if step < 3:
            opt.zero_grad()
            F.mse_loss(copy(task[0]), task[1]).backward()
            opt.step()
    assert curve == pytest.approx(expected, rel=1e-12)
    for b, p in zip(before, model.parameters()):
        assert torch.equal(b, p)


def test_bad_input_gets_clear_errors():
    model, tasks = small_net(), make_tasks(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="non-negative integer"):
        maml_step(model, opt, tasks, F.mse_loss, inner_steps=-1)
    with pytest.raises(ValueError, match="at least one task"):
        maml_step(model, opt, [], F.mse_loss)
    with pytest.raises(ValueError, match="support_x, support_y, query_x, query_y"):
        maml_step(model, opt, [tasks[0][:2]], F.mse_loss)


# ---------------------------------------------------------------------------------------------- iMAML
def test_imaml_meta_gradient_equals_the_proximal_closed_form():
    """Linear regression: theta* = (X'X + reg I)^-1 (X'y + reg phi), meta-gradient reg (X'X + reg I)^-1 g."""
    from higher.algorithms import imaml_step

    model = nn.Linear(4, 1, bias=False)
    phi = model.weight.detach().clone().squeeze(0)
    reg = 2.0
    loss_fn = lambda pred, y: 0.5 * (pred.squeeze(-1) - y).pow(2).sum()  # noqa: E731
    tasks = [(torch.randn(6, 4), torch.randn(6), torch.randn(5, 4), torch.randn(5)) for _ in range(2)]
    expected, losses = torch.zeros(4), []
    for x, y, xq, yq in tasks:
        a = x.T @ x + reg * torch.eye(4)
        theta = torch.linalg.solve(a, x.T @ y + reg * phi)
        expected += reg * torch.linalg.solve(a, xq.T @ (xq @ theta - yq)) / len(tasks)
        losses.append(float(0.5 * (xq @ theta - yq).pow(2).sum()))
    inner_opt = torch.optim.SGD(model.parameters(), lr=0.02)
    loss = imaml_step(model, inner_opt, tasks, loss_fn, inner_steps=1500, reg=reg, cg_iterations=20)
    assert torch.allclose(model.weight.grad.squeeze(0), expected, rtol=1e-8, atol=1e-10)
    assert abs(loss - sum(losses) / len(losses)) < 1e-9
    assert torch.equal(model.weight.detach().squeeze(0), phi)  # the model itself is not modified


def test_imaml_learns_a_sine_initialisation_and_checks_its_arguments():
    from higher.algorithms import imaml_step

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 20), nn.Tanh(), nn.Linear(20, 1))
    meta_opt = torch.optim.Adam(model.parameters(), lr=0.01)
    inner_opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def task():
        amplitude, phase = torch.rand(()) * 2 + 0.5, torch.rand(()) * 3
        x = torch.rand(20, 1) * 6 - 3
        y = amplitude * torch.sin(x + phase)
        return x[:10], y[:10], x[10:], y[10:]

    fixed = [task() for _ in range(4)]
    first = None
    for _ in range(15):
        meta_opt.zero_grad()
        loss = imaml_step(model, inner_opt, fixed, F.mse_loss, inner_steps=5, reg=5.0, cg_iterations=5)
        first = loss if first is None else first
        meta_opt.step()
    assert loss < first
    with pytest.raises(ValueError, match="reg must be positive"):
        imaml_step(model, inner_opt, fixed, F.mse_loss, reg=0.0)
    with pytest.raises(ValueError, match="all of model's parameters"):
        imaml_step(model, torch.optim.SGD(model[2].parameters(), lr=0.1), fixed, F.mse_loss)
    with pytest.raises(ValueError, match="at least one task"):
        imaml_step(model, inner_opt, [], F.mse_loss)


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
