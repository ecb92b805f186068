"""What opening an inner loop reuses from the previous one, and that every change in between is seen.

MAML opens one inner loop per task with the same model and optimizer, so the analysis of the
model's tree (``higher.patch._Tree``) and the layout of the optimizer's groups
(``higher.optim._Layout``) are kept between opens. These tests change the model or the optimizer
between two opens in the ways that invalidate them and check the second inner loop against
hand-written references.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import higher
from higher import optim as hoptim


class Traced(nn.Module):
    """Appends its activations to ``self.trace`` when that is a list (a forward that keeps state)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 2)
        self.trace = None
        self.extra = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer(x)
        if isinstance(self.trace, list):
            self.trace.append(h)
        return h


def test_an_attribute_that_becomes_a_list_is_the_fmodels_own_on_the_next_patch():
    model = Traced()
    x = torch.randn(4, 3)
    higher.monkeypatch(model)(x)  # the tree is analysed while trace is None
    model.trace = []  # same attribute names, another type
    fmodel = higher.monkeypatch(model)
    fmodel(x)
    assert model.trace == []  # the forward appended to the fmodel's copy, not to the model's list
    assert len(fmodel.trace) == 1


def test_a_removed_and_a_new_attribute_are_seen_on_the_next_patch():
    model = Traced()
    x = torch.randn(4, 3)
    higher.monkeypatch(model)(x)
    del model.extra
    model.trace = []
    model.other = []  # as many attributes as before, one renamed
    fmodel = higher.monkeypatch(model)
    fmodel(x)
    assert model.trace == [] and model.other == []
    assert fmodel.other is not model.other


def test_a_parameter_put_directly_into_the_slot_dict_is_seen_on_the_next_patch():
    model = nn.Sequential(nn.Linear(3, 2))
    x = torch.randn(4, 3)
    higher.monkeypatch(model)(x)
    model[0]._parameters["weight"] = nn.Parameter(torch.zeros(2, 3))  # no __setattr__ involved
    fmodel = higher.monkeypatch(model)
    assert torch.equal(fmodel(x), model(x))
    assert torch.equal(fmodel(x), model[0].bias.expand(4, 2))


def test_modes_and_requires_grad_changed_between_opens_are_seen():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 3)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, _):
        assert fmodel.training
    model.eval()
    model[2].bias.requires_grad_(False)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        assert not fmodel.training and not fmodel[1].training
        assert torch.equal(fmodel(x), model(x))  # no dropout
        diffopt.step(fmodel(x).pow(2).mean())
        assert torch.equal(fmodel[2].bias, model[2].bias)  # a tensor without grad is not updated
    model.train()
    model[2].bias.requires_grad_(True)


def _sgd_reference(model: nn.Module, lrs: dict[int, float], x: torch.Tensor) -> list[torch.Tensor]:
    """One plain SGD step by hand, each parameter (by position) with its learning rate."""
    params = list(model.parameters())
    loss = torch.func.functional_call(model, dict(zip([n for n, _ in model.named_parameters()], params)), (x,))
    grads = torch.autograd.grad(loss.pow(2).mean(), params)
    return [(p - lrs[i] * g).detach() for i, (p, g) in enumerate(zip(params, grads))]


def _one_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> list[torch.Tensor]:
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        diffopt.step(fmodel(x).pow(2).mean())
        return [p.detach() for p in fmodel.parameters()]


def test_a_learning_rate_changed_between_opens_is_used():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(5, 3)
    _one_step(model, opt, x)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step()  # (no gradients: nothing changes but the schedule)
    scheduler.step()
    assert opt.param_groups[0]["lr"] == 0.05
    got = _one_step(model, opt, x)
    for a, b in zip(got, _sgd_reference(model, dict.fromkeys(range(4), 0.05), x)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)


def test_groups_added_or_reshuffled_between_opens_are_used():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    first, second = list(model[0].parameters()), list(model[2].parameters())
    opt = torch.optim.SGD(first, lr=0.1)
    x = torch.randn(5, 3)
    _one_step(model, opt, x)
    opt.add_param_group({"params": second, "lr": 0.3})  # a new group
    got = _one_step(model, opt, x)
    expected = _sgd_reference(model, {0: 0.1, 1: 0.1, 2: 0.3, 3: 0.3}, x)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)
    # The groups swap their tensors: each tensor now steps with the other learning rate.
    opt.param_groups[0]["params"], opt.param_groups[1]["params"] = second, first
    got = _one_step(model, opt, x)
    expected = _sgd_reference(model, {0: 0.3, 1: 0.3, 2: 0.1, 3: 0.1}, x)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)


def test_an_unsupported_option_added_between_opens_is_refused():
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _one_step(model, opt, torch.randn(2, 3))
    opt.param_groups[0]["differentiable"] = True  # an implementation flag: accepted
    _one_step(model, opt, torch.randn(2, 3))
    opt.param_groups[0]["made_up"] = 1  # not an option of torch.optim.SGD, but in its defaults now
    opt.defaults["made_up"] = 1
    with pytest.raises(ValueError, match="does not support the option made_up"):
        _one_step(model, opt, torch.randn(2, 3))


def test_an_optimizer_over_replaced_parameters_is_refused_after_a_successful_open():
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _one_step(model, opt, torch.randn(2, 3))
    model.weight = nn.Parameter(torch.randn(1, 3))  # opt still tracks the old weight
    with pytest.raises(ValueError, match="tracks a tensor that is not in the model"):
        _one_step(model, opt, torch.randn(2, 3))


def test_the_same_optimizer_over_other_reference_orders_maps_each_tensor():
    torch.manual_seed(0)
    a, b = torch.randn(3, requires_grad=True), torch.randn(2, requires_grad=True)
    opt = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.2}])
    for reference in ([a, b], [b, a], [a, b]):
        diffopt = hoptim.get_diff_optim(opt, reference)
        x, y = (reference[0], reference[1])
        new = diffopt.step(x.sum() * 2 + y.sum() * 3, params=[x, y])
        lr_x, lr_y = (0.1, 0.2) if x is a else (0.2, 0.1)
        torch.testing.assert_close(new[0], x - lr_x * 2, rtol=0, atol=1e-15)
        torch.testing.assert_close(new[1], y - lr_y * 3, rtol=0, atol=1e-15)


def test_nothing_cached_is_shared_between_two_differentiable_optimizers():
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt) as (_, first), higher.innerloop_ctx(model, opt) as (_, second):
        first.param_groups[0]["lr"] = 0.5  # as a scheduler on the differentiable optimizer would
        assert second.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["lr"] == 0.1
        assert first.param_groups[0] is not second.param_groups[0]
        assert first.state is not second.state and first.state[0] is not second.state[0]


def test_the_layout_is_reused_while_nothing_changes():
    """Guards the cache itself (the speed of the one-step case depends on it)."""
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt) as (_, first), higher.innerloop_ctx(model, opt) as (_, second):
        assert first._group_to_param_list is second._group_to_param_list
    opt.param_groups[0]["lr"] = 0.2
    with higher.innerloop_ctx(model, opt) as (_, third):
        assert third._group_to_param_list is first._group_to_param_list and third.param_groups[0]["lr"] == 0.2
    opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)]})
    with pytest.raises(ValueError, match="tracks a tensor that is not in the model"):
        with higher.innerloop_ctx(model, opt):
            pass
