"""Bad input gets a clear error naming the problem (issue 2, point 5): one test each."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import higher
from higher.optim import DifferentiableSGD, get_diff_optim
from higher.patch import TimeIndexError, make_functional


def model_and_opt(groups: int = 1):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    if groups == 1:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
    else:
        opt = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=0.1)
    return model, opt


def loss_of(fmodel) -> torch.Tensor:
    return fmodel(torch.ones(2, 3)).pow(2).mean()


@pytest.mark.parametrize("where", ["constructor", "step"])
def test_override_list_of_wrong_length(where):
    model, opt = model_and_opt(groups=2)
    bad = {"lr": [0.1, 0.2, 0.3]}
    with pytest.raises(ValueError, match=r"override\['lr'\] has 3 values but the optimizer has 2 parameter group"):
        with higher.innerloop_ctx(model, opt, override=bad if where == "constructor" else None) as (fmodel, diffopt):
            diffopt.step(loss_of(fmodel), override=bad)


def test_override_unknown_hyperparameter():
    model, opt = model_and_opt()
    with pytest.raises(ValueError, match="unknown hyperparameter 'learning_rate'.*it has: lr, momentum"):
        higher.innerloop_ctx(model, opt, override={"learning_rate": [0.1]}).__enter__()


def test_optimizer_over_a_tensor_not_in_the_model():
    model, _ = model_and_opt()
    stranger = torch.zeros(4, 3, requires_grad=True)
    opt = torch.optim.SGD([*model.parameters(), stranger], lr=0.1)
    with pytest.raises(ValueError, match="Could not find parameter of shape \\(4, 3\\).*not in the model"):
        higher.innerloop_ctx(model, opt).__enter__()


def test_time_out_of_range_when_tracking():
    model, opt = model_and_opt()
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        diffopt.step(loss_of(fmodel))
        diffopt.step(loss_of(fmodel))
        assert len(list(fmodel.parameters(time=-3))) == 4  # time=0..2 exist
        for time in (3, -4):
            with pytest.raises(IndexError, match=f"time={time} is out of range.*time=0..2"):
                fmodel.parameters(time=time)
            with pytest.raises(TimeIndexError):
                fmodel.parameters(time=time)


def test_time_out_of_range_when_not_tracking():
    model, opt = model_and_opt()
    with higher.innerloop_ctx(model, opt, track_higher_grads=False) as (fmodel, diffopt):
        diffopt.step(loss_of(fmodel))
        diffopt.step(loss_of(fmodel))
        with pytest.raises(ValueError, match="time=1 is not available: with track_higher_grads=False"):
            fmodel.parameters(time=1)


def test_fmodel_params_of_wrong_length():
    model, _ = model_and_opt()
    fmodel = higher.monkeypatch(model)
    with pytest.raises(ValueError, match=r"params has 2 tensors but the module has 4 parameters.*0\.weight, 0\.bias"):
        fmodel(torch.ones(2, 3), params=[torch.zeros(4, 3), torch.zeros(4)])
    assert len(fmodel._fast_params) == 1  # nothing was recorded


def test_fmodel_params_of_wrong_shape():
    model, _ = model_and_opt()
    fmodel = make_functional(model)
    params = [torch.zeros(4, 3), torch.zeros(4), torch.zeros(4, 1), torch.zeros(1)]
    with pytest.raises(ValueError, match=r"'2\.weight' has shape \(4, 1\), the parameter has shape \(1, 4\)"):
        fmodel(torch.ones(2, 3), params=params)


def test_step_params_of_wrong_length():
    model, opt = model_and_opt()
    diffopt = DifferentiableSGD(opt, model.parameters())
    params = [p.clone() for p in model.parameters()][:3]
    with pytest.raises(ValueError, match="step\\(\\) got 3 parameters but the optimizer was built for 4"):
        diffopt.step(params[0].sum(), params=params)


def test_step_params_of_wrong_shape():
    model, opt = model_and_opt()
    diffopt = DifferentiableSGD(opt, model.parameters())
    params = [torch.zeros(3, 4, requires_grad=True), *[p.clone() for p in list(model.parameters())[1:]]]
    with pytest.raises(ValueError, match=r"params\[0\] has shape \(3, 4\) but .* shape \(4, 3\)"):
        diffopt.step(params[0].sum(), params=params)


def test_non_scalar_loss():
    model, opt = model_and_opt()
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        with pytest.raises(ValueError, match=r"needs a scalar loss, got \(2, 1\); reduce it first"):
            diffopt.step(fmodel(torch.ones(2, 3)))


def test_step_with_neither_fmodel_nor_params():
    model, opt = model_and_opt()
    diffopt = get_diff_optim(opt, model.parameters())
    with pytest.raises(
        ValueError, match=r"no parameters to update: pass params=\[\.\.\.\] or build the optimizer with fmodel"
    ):
        diffopt.step(model(torch.ones(2, 3)).sum())


def test_monkeypatching_an_fmodel():
    model, opt = model_and_opt()
    fmodel = higher.monkeypatch(model)
    for patch in (higher.monkeypatch, make_functional, lambda m: higher.innerloop_ctx(m, opt).__enter__()):
        with pytest.raises(ValueError, match="already a functional \\(patched\\) module; patch the original"):
            patch(fmodel)


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean()


def test_a_loss_computed_before_the_previous_step_is_named_in_the_error() -> None:
    """0.2.1 silently took a no-op step; the message must name this cause and its fix."""
    model = nn.Linear(3, 1)
    x, y = torch.randn(6, 3), torch.randn(6, 1)
    with higher.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1)) as (fmodel, diffopt):
        loss = mse(fmodel(x), y)
        diffopt.step(loss)
        with pytest.raises(ValueError, match=r"before the previous step\(\)"):
            diffopt.step(loss)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
@pytest.mark.parametrize("where", ["inside", "root"])
def test_torchscript_modules_are_refused_with_a_clear_error(where: str) -> None:
    """0.2.1 and torch.func.functional_call cannot run them either; ours failed inside torch's
    ScriptModule internals with an unrelated TypeError."""
    if where == "inside":
        model = nn.Sequential(torch.jit.script(nn.Linear(3, 4)), nn.Linear(4, 1))
    else:
        model = torch.jit.trace(nn.Linear(3, 1), torch.randn(2, 3))
    with pytest.raises(TypeError, match="TorchScript"):
        higher.monkeypatch(model)
