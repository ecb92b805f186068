"""Step-by-step parity with torch.optim: 20 steps from the same start, on the same data."""

import copy

import pytest
import torch
from torch import nn

import higher

CASES = {
    "SGD": [
        dict(lr=0.1),
        dict(lr=0.1, momentum=0.9),
        dict(lr=0.1, momentum=0.9, dampening=0.1),
        dict(lr=0.1, momentum=0.9, nesterov=True),
        dict(lr=0.1, weight_decay=0.01),
        dict(lr=0.1, maximize=True),
        dict(lr=0.05, momentum=0.5, nesterov=True, weight_decay=0.1, maximize=True),
        dict(lr=0.1, momentum=0.9, foreach=True),
        dict(lr=0.1, momentum=0.9, differentiable=True),
    ],
    "Adam": [
        dict(lr=0.01),
        dict(lr=0.01, amsgrad=True),
        dict(lr=0.01, weight_decay=0.1),
        dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
        dict(lr=0.01, maximize=True),
        dict(lr=0.01, eps=1e-3, betas=(0.8, 0.99)),
        dict(lr=0.01, foreach=True),
        dict(lr=0.01, fused=True),
        dict(lr=0.01, differentiable=True),
    ],
    "AdamW": [dict(lr=0.01), dict(lr=0.01, amsgrad=True, weight_decay=0.1), dict(lr=0.01, maximize=True)],
    "Adagrad": [
        dict(lr=0.1),
        dict(lr=0.1, lr_decay=0.01),
        dict(lr=0.1, weight_decay=0.1),
        dict(lr=0.1, initial_accumulator_value=0.1, eps=1e-6),
        dict(lr=0.1, maximize=True),
    ],
    "Adadelta": [dict(), dict(lr=0.5, rho=0.8), dict(weight_decay=0.1), dict(maximize=True, eps=1e-4)],
    "Adamax": [dict(lr=0.01), dict(lr=0.01, weight_decay=0.1, betas=(0.8, 0.9)), dict(lr=0.01, maximize=True)],
    "ASGD": [
        dict(lr=0.01),
        dict(lr=0.01, t0=5),
        dict(lr=0.01, lambd=0.01, alpha=0.5, weight_decay=0.1),
        dict(lr=0.01, maximize=True),
    ],
    "RMSprop": [
        dict(lr=0.01),
        dict(lr=0.01, centered=True),
        dict(lr=0.01, momentum=0.9),
        dict(lr=0.01, centered=True, momentum=0.5, weight_decay=0.1),
        dict(lr=0.01, alpha=0.9, maximize=True),
    ],
    "Rprop": [dict(lr=0.01), dict(lr=0.01, etas=(0.3, 1.5), step_sizes=(1e-4, 0.05)), dict(lr=0.01, maximize=True)],
    "NAdam": [
        dict(lr=0.01),
        dict(lr=0.01, momentum_decay=0.01, weight_decay=0.1),
        dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
        dict(lr=0.01, maximize=True),
    ],
    "RAdam": [
        dict(lr=0.01),
        dict(lr=0.01, weight_decay=0.1),
        dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
        dict(lr=0.01, maximize=True),
    ],
}
PARAMS = [(name, options) for name, option_list in CASES.items() for options in option_list]


def _problem():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(16, 4), torch.randn(16, 3)
    return model, x, y


def _groups(model, two_groups, options):
    if not two_groups:
        return list(model.parameters())
    second = {"params": list(model[2].parameters())}
    if "lr" in options:
        second["lr"] = options["lr"] * 0.5
    return [{"params": list(model[0].parameters())}, second]


@pytest.mark.parametrize("two_groups", [False, True], ids=["one_group", "two_groups"])
@pytest.mark.parametrize(
    ("name", "options"), PARAMS, ids=[f"{n}-{'-'.join(map(str, o.items())) or 'defaults'}" for n, o in PARAMS]
)
def test_twenty_steps_match_torch_optim(name, options, two_groups):
    model, x, y = _problem()
    reference = copy.deepcopy(model)
    opt_type = getattr(torch.optim, name)
    # torch's own differentiable=True mode cannot step leaf parameters; the math is the same without it.
    reference_options = {k: v for k, v in options.items() if k != "differentiable"}
    torch_opt = opt_type(_groups(reference, two_groups, options), **reference_options)
    for _ in range(20):
        torch_opt.zero_grad()
        nn.functional.mse_loss(reference(x), y).backward()
        torch_opt.step()

    opt = opt_type(_groups(model, two_groups, options), **options)
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for _ in range(20):
            diffopt.step(nn.functional.mse_loss(fmodel(x), y))
        ours = list(fmodel.parameters())
    worst = max((a - b).abs().max().item() for a, b in zip(ours, reference.parameters()))
    assert worst <= 1e-10
    moved = max((a - b).abs().max().item() for a, b in zip(ours, model.parameters()))
    assert moved > 1e-4, "the parameters should have moved"
