"""Learning-rate schedules (issue 5.3): torch.optim.lr_scheduler on a differentiable optimizer,
and per-step hyperparameters given as a sequence or a callable, learnable by hypergradient."""

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.optim import lr_scheduler

import higher

SCHEDULES = {
    "StepLR": lambda opt: lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
    "ExponentialLR": lambda opt: lr_scheduler.ExponentialLR(opt, gamma=0.8),
    "CosineAnnealingLR": lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=7, eta_min=0.001),
    "LambdaLR": lambda opt: lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step)),
    "MultiStepLR": lambda opt: lr_scheduler.MultiStepLR(opt, milestones=[2, 5, 9], gamma=0.3),
}


def _problem():
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    return model, torch.randn(12, 3), torch.randn(12, 2)


@pytest.mark.parametrize("opt_type", [torch.optim.SGD, torch.optim.Adam])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_scheduler_changes_lr_exactly_as_for_the_torch_optimizer(schedule, opt_type):
    model, x, y = _problem()
    reference = copy.deepcopy(model)
    torch_opt = opt_type(reference.parameters(), lr=0.1)
    torch_schedule = SCHEDULES[schedule](torch_opt)
    torch_lrs = []
    for _ in range(12):
        torch_lrs.append(torch_opt.param_groups[0]["lr"])
        torch_opt.zero_grad()
        nn.functional.mse_loss(reference(x), y).backward()
        torch_opt.step()
        torch_schedule.step()

    opt = opt_type(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        schedule_ = SCHEDULES[schedule](diffopt)
        lrs = []
        for _ in range(12):
            lrs.append(diffopt.param_groups[0]["lr"])
            diffopt.step(nn.functional.mse_loss(fmodel(x), y))
            schedule_.step()
    assert lrs == pytest.approx(torch_lrs, abs=1e-15)
    assert len(set(lrs)) > 1
    for ours, theirs in zip(fmodel.parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)


def _hand_written_unroll(model, lrs, x, y):
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    start = params
    for lr in lrs:
        loss = nn.functional.mse_loss(functional_call(model, dict(zip(names, params)), (x,)), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        params = [p - lr * g for p, g in zip(params, grads)]
    return nn.functional.mse_loss(functional_call(model, dict(zip(names, params)), (x,)), y), start


@pytest.mark.parametrize("as_callable", [False, True], ids=["sequence", "callable"])
def test_learned_schedule_receives_exact_hypergradients(as_callable):
    model, x, y = _problem()
    lrs = [torch.tensor(v, requires_grad=True) for v in (0.3, 0.2, 0.1, 0.05)]
    schedule = higher.PerStep((lambda step: lrs[step]) if as_callable else lrs)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with higher.innerloop_ctx(model, opt, override={"lr": schedule}) as (fmodel, diffopt):
        for _ in range(4):
            diffopt.step(nn.functional.mse_loss(fmodel(x), y))
        meta_loss = nn.functional.mse_loss(fmodel(x), y)
    ours = torch.autograd.grad(meta_loss, lrs)
    reference_loss, _ = _hand_written_unroll(model, lrs, x, y)
    theirs = torch.autograd.grad(reference_loss, lrs)
    torch.testing.assert_close(meta_loss, reference_loss, rtol=0, atol=1e-12)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert len({round(g.item(), 12) for g in ours}) == 4, "each step's lr has its own hypergradient"


def test_per_step_values_run_out():
    model, x, y = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with higher.innerloop_ctx(model, opt, override={"lr": higher.PerStep([0.1, 0.1])}) as (fmodel, diffopt):
        diffopt.step(nn.functional.mse_loss(fmodel(x), y))
        diffopt.step(nn.functional.mse_loss(fmodel(x), y))
        with pytest.raises(IndexError, match="PerStep holds 2 values but step 2"):
            diffopt.step(nn.functional.mse_loss(fmodel(x), y))


def test_per_step_nan_is_refused():
    model, x, y = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(ValueError, match="NaN"):
        higher.innerloop_ctx(model, opt, override={"lr": higher.PerStep([0.1, float("nan")])}).__enter__()


@pytest.mark.parametrize("form", ["transformed", "indexed"])
def test_scheduler_on_a_learned_tensor_lr_is_refused_with_the_fix(form):
    """torch's schedulers overwrite a tensor lr in place (fill_). On a tensor that receives
    hypergradients computed from a leaf (log_lr.exp(), or one entry of a per-task tensor) this
    replaced its history: the hypergradient was cut or wrong, or backward failed far away with a
    version-counter error. The next step now names the cause and the fix (found by the
    differential harness: scheduler with non-leaf learned lr)."""
    model, x, y = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    log_lr = torch.tensor([-2.0, -2.5], requires_grad=True)
    lr = log_lr.exp() if form == "transformed" else log_lr.exp()[1]
    lr = lr[0] if form == "transformed" else lr
    with higher.innerloop_ctx(model, opt, override={"lr": [lr]}) as (fmodel, diffopt):
        lr_scheduler.StepLR(diffopt, step_size=1, gamma=0.5)  # its constructor writes lr already
        with pytest.raises(RuntimeError, match="changed in place.*lr_scheduler.*higher.PerStep"):
            diffopt.step(nn.functional.mse_loss(fmodel(x), y))


def test_scheduler_on_a_tensor_lr_without_grad_still_works():
    model, x, y = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=torch.tensor(0.1))
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        schedule = lr_scheduler.StepLR(diffopt, step_size=1, gamma=0.5)
        for _ in range(3):
            diffopt.step(nn.functional.mse_loss(fmodel(x), y))
            schedule.step()
    assert float(diffopt.param_groups[0]["lr"]) == 0.1 * 0.5**3
    assert float(opt.param_groups[0]["lr"]) == 0.1
