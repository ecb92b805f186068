"""Step-by-step parity with torch.optim: 20 steps from the same start, on the same data.

Every configuration runs under torch's default dtype float32 as well as float64 (torch keeps some
scalar state, such as NAdam's mu_product and ASGD's eta and mu, in float32 under a float32
default, even for a float64 model), and, for the rules with a multi-tensor form (SGD, Adam,
AdamW), through both the multi-tensor and the one-tensor update path. The rules run torch's own
kernels in torch's order, so the parameters must be bitwise equal (torch's fused and foreach
kernels round differently: a tolerance there).
"""

import copy
import dataclasses

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


def _problem(dtype):
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    x, y = torch.randn(16, 4, dtype=dtype), torch.randn(16, 3, dtype=dtype)
    return model, x, y


def _groups(model, two_groups, options):
    if not two_groups:
        return list(model.parameters())
    second = {"params": list(model[2].parameters())}
    if "lr" in options:
        second["lr"] = options["lr"] * 0.5
    return [{"params": list(model[0].parameters())}, second]


# (default dtype, model dtype, two groups)
SETTINGS = [
    ("float64", "float64", False),
    ("float64", "float64", True),
    ("float32", "float64", False),
    ("float32", "float64", True),
    ("float32", "float32", True),
]


def _paths(name):
    has_many = higher.optim._opt_mapping[getattr(torch.optim, name)].rule.update_many is not None
    return ["multi_tensor", "one_tensor"] if has_many else ["one_tensor"]


MATRIX = [(name, options, setting, path) for name, options in PARAMS for setting in SETTINGS for path in _paths(name)]


def _id(name, options, setting, path):
    default, model_dtype, two_groups = setting
    described = "-".join(map(str, options.items())) or "defaults"
    groups = "two_groups" if two_groups else "one_group"
    return f"{name}-{described}-default_{default}-model_{model_dtype}-{groups}-{path}"


def force_path(monkeypatch, opt_type, path):
    """Make the differentiable class of ``opt_type`` use one update path; a counter of multi-tensor calls."""
    cls = higher.optim._opt_mapping[opt_type]
    rule = cls.rule
    calls = []
    if path == "one_tensor":
        monkeypatch.setattr(cls, "rule", dataclasses.replace(rule, update_many=None))
    else:

        def counted(*args):
            result = rule.update_many(*args)
            calls.append(result is not None)
            return result

        monkeypatch.setattr(cls, "rule", dataclasses.replace(rule, update_many=counted))
    return calls


@pytest.mark.parametrize(("name", "options", "setting", "path"), MATRIX, ids=[_id(*case) for case in MATRIX])
def test_twenty_steps_match_torch_optim(name, options, setting, path, monkeypatch):
    default, model_dtype, two_groups = setting
    torch.set_default_dtype(getattr(torch, default))  # the conftest fixture restores it
    model, x, y = _problem(getattr(torch, model_dtype))
    reference = copy.deepcopy(model)
    opt_type = getattr(torch.optim, name)
    # torch's own differentiable=True mode cannot step leaf parameters; the math is the same without it.
    reference_options = {k: v for k, v in options.items() if k != "differentiable"}
    torch_opt = opt_type(_groups(reference, two_groups, options), **reference_options)
    for _ in range(20):
        torch_opt.zero_grad()
        nn.functional.mse_loss(reference(x), y).backward()
        torch_opt.step()

    calls = force_path(monkeypatch, opt_type, path)
    opt = opt_type(_groups(model, two_groups, options), **options)
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for _ in range(20):
            diffopt.step(nn.functional.mse_loss(fmodel(x), y))
        ours = list(fmodel.parameters())
    if path == "multi_tensor":
        assert calls and all(calls), "the multi-tensor path should have run"
    # torch's fused and foreach kernels round differently from its one-tensor kernels (ours).
    tolerance = 0.0
    if options.get("fused") or options.get("foreach"):
        tolerance = 1e-13 if model_dtype == "float64" else 1e-6
    for a, b in zip(ours, reference.parameters()):
        assert a.dtype == b.dtype
        assert (a - b).abs().max().item() <= tolerance
    moved = max((a - b).abs().max().item() for a, b in zip(ours, model.parameters()))
    assert moved > 1e-4, "the parameters should have moved"
    # The state has torch's layout and types: scalar state in torch's scalar dtype (fused kernels
    # keep their step in float32 whatever the default).
    if options.get("fused"):
        return
    for group_state, torch_group in zip(diffopt.state, torch_opt.param_groups):
        for index, p in enumerate(torch_group["params"]):
            theirs, mine = torch_opt.state[p], group_state[index]
            assert set(mine) == set(theirs)
            for key, value in theirs.items():
                assert type(mine[key]) is type(value), key
                if isinstance(value, torch.Tensor):
                    assert mine[key].dtype == value.dtype and torch.equal(mine[key].detach(), value), key
