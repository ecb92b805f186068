"""The differentiable optimizer front end: warm start, options, registration, override semantics,
grad_callback, create_diff_optim and the trainable-hyperparameter helpers.

References are torch.optim itself (same steps on copies of the same tensors) and central finite
differences; all in float64 (see conftest.py).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import higher
from higher.optim import (
    DifferentiableAdam,
    DifferentiableOptimizer,
    apply_trainable_opt_params,
    get_trainable_opt_params,
)
from higher.rules import RULES
from small_problems import small_problem

SHAPES = [(4, 3), (4,), (2, 4), (2,)]


def _data():
    generator = torch.Generator().manual_seed(1)
    return tuple(torch.randn(12, n, generator=generator, dtype=torch.float64) for n in (3, 2, 3, 2))


def _mlp(params, x):
    w1, b1, w2, b2 = params
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


def _loss(params, batch=0):
    x, y, xq, yq = _data()
    x, y = (x, y) if batch == 0 else (xq, yq)
    return ((_mlp(params, x) - y) ** 2).mean()


def _initial_params():
    generator = torch.Generator().manual_seed(2)
    return [(0.7 * torch.randn(s, generator=generator, dtype=torch.float64)).requires_grad_() for s in SHAPES]


def _torch_steps(opt, params, steps):
    for _ in range(steps):
        opt.zero_grad()
        _loss(params).backward()
        opt.step()


def _diff_steps(diffopt, params, steps, **step_kwargs):
    for _ in range(steps):
        params = diffopt.step(_loss(params), params=params, **step_kwargs)
    return params


def _max_difference(ours, theirs):
    return max((a - b).abs().max().item() for a, b in zip(ours, theirs))


def _model():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


# ------------------------------------------------------------------------------------ warm start
WARM = {
    "Adam": dict(lr=0.01, amsgrad=True, weight_decay=0.1),
    "AdamW": dict(lr=0.01),
    "SGD": dict(lr=0.1, momentum=0.9, nesterov=True),
    "Adagrad": dict(lr=0.1, lr_decay=0.1, initial_accumulator_value=0.2),
    "Adadelta": dict(lr=0.5),
    "Adamax": dict(lr=0.01),
    "ASGD": dict(lr=0.05, lambd=0.01, t0=2),
    "RMSprop": dict(lr=0.01, centered=True, momentum=0.5),
    "Rprop": dict(lr=0.01),
    "NAdam": dict(lr=0.01),
    "RAdam": dict(lr=0.01),
}


def test_warm_start_covers_every_optimizer():
    assert set(WARM) == set(RULES)


@pytest.mark.parametrize("name", list(WARM))
def test_warm_start_from_torch_state_continues_like_torch(name):
    """Take 4 real torch steps, copy the state, then 10 more steps each way must agree."""
    params = _initial_params()
    opt = getattr(torch.optim, name)(params, **WARM[name])
    _torch_steps(opt, params, 4)
    step = next(iter(opt.state.values())).get("step")
    assert step is None or (isinstance(step, torch.Tensor) and float(step) == 4)  # torch 2.x: a tensor

    diffopt = higher.get_diff_optim(opt, params)
    fast = _diff_steps(diffopt, [p.detach().clone().requires_grad_() for p in params], 10)
    _torch_steps(opt, params, 10)
    assert _max_difference(fast, params) <= 1e-10
    # The copy is detached: the torch optimizer's state is untouched by the differentiable steps.
    assert all(not t.requires_grad for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))


def test_warm_start_through_innerloop_ctx():
    model = _model()
    reference = copy.deepcopy(model)
    x, y, _, _ = _data()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    reference_opt = torch.optim.Adam(reference.parameters(), lr=0.01)
    for target, optimizer in ((model, opt), (reference, reference_opt)):
        for _ in range(3):
            optimizer.zero_grad()
            ((target(x) - y) ** 2).mean().backward()
            optimizer.step()
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for _ in range(5):
            diffopt.step(((fmodel(x) - y) ** 2).mean())
            reference_opt.zero_grad()
            ((reference(x) - y) ** 2).mean().backward()
            reference_opt.step()
        assert _max_difference(fmodel.parameters(), reference.parameters()) <= 1e-10


def test_fresh_adagrad_honours_initial_accumulator_value_override():
    # torch creates Adagrad's state (step 0, sum filled) in the constructor, from its own value 0.
    params = _initial_params()
    opt = torch.optim.Adagrad(params, lr=0.1)
    assert float(opt.state[params[0]]["step"]) == 0
    diffopt = higher.get_diff_optim(opt, params, override={"initial_accumulator_value": [0.7]})
    ours = _diff_steps(diffopt, params, 5)

    reference = [p.detach().clone().requires_grad_() for p in params]
    _torch_steps(torch.optim.Adagrad(reference, lr=0.1, initial_accumulator_value=0.7), reference, 5)
    assert _max_difference(ours, reference) <= 1e-10

    # ... and a tensor override gets its hypergradient, equal to central differences.
    def outer(value):
        diffopt = higher.get_diff_optim(opt, params, override={"initial_accumulator_value": [value]})
        return _loss(_diff_steps(diffopt, params, 3), batch=1)

    value = torch.tensor(0.7, requires_grad=True)
    (gradient,) = torch.autograd.grad(outer(value), value)
    numerical = (outer(torch.tensor(0.7 + 1e-6)) - outer(torch.tensor(0.7 - 1e-6))).item() / 2e-6
    assert gradient.item() == pytest.approx(numerical, rel=1e-6)
    assert abs(numerical) > 1e-4


# ------------------------------------------------------------------------------------ options
def _accepted_flag_sets():
    cases = []
    for name in RULES:
        for flag in ("foreach", "fused", "capturable", "differentiable"):
            try:
                getattr(torch.optim, name)([torch.zeros(2, requires_grad=True)], **{flag: True})
            except (TypeError, RuntimeError, ValueError):
                continue  # torch itself does not offer this flag for this optimizer
            cases.append((name, flag))
    return cases


FLAG_CASES = _accepted_flag_sets()


def test_implementation_flags_cover_every_optimizer():
    by_flag = {flag: {n for n, f in FLAG_CASES if f == flag} for flag in ("foreach", "differentiable")}
    assert by_flag["foreach"] == set(RULES) and by_flag["differentiable"] == set(RULES)
    assert {n for n, f in FLAG_CASES if f == "fused"} >= {"SGD", "Adam", "AdamW", "Adagrad"}
    assert {n for n, f in FLAG_CASES if f == "capturable"} >= {"Adam", "RMSprop", "NAdam"}


@pytest.mark.parametrize(("name", "flag"), FLAG_CASES, ids=[f"{n}-{f}" for n, f in FLAG_CASES])
def test_implementation_flags_change_nothing(name, flag):
    options = dict(WARM[name])

    def run(extra):
        params = _initial_params()
        opt = getattr(torch.optim, name)(params, **options, **extra)
        lr = torch.tensor(opt.param_groups[0]["lr"], requires_grad=True)
        diffopt = higher.get_diff_optim(opt, params, override={"lr": [lr]})
        outer = _loss(_diff_steps(diffopt, params, 4), batch=1)
        return outer, torch.autograd.grad(outer, [lr, *params])

    plain_loss, plain_grads = run({})
    flagged_loss, flagged_grads = run({flag: True})
    assert torch.equal(plain_loss, flagged_loss)
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, flagged_grads))


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the optimizer registry, so registrations made by a test do not leak."""
    monkeypatch.setattr(higher.optim, "_opt_mapping", dict(higher.optim._opt_mapping))
    return higher.optim._opt_mapping


def test_an_option_the_rule_cannot_honour_raises(registry):
    class AdamWithLookahead(torch.optim.Adam):
        """An Adam variant with an option of its own (pretend it changes the math)."""

        def __init__(self, params, lookahead_steps=5, **kwargs):
            super().__init__(params, **kwargs)
            self.defaults["lookahead_steps"] = lookahead_steps
            for group in self.param_groups:
                group["lookahead_steps"] = lookahead_steps

    higher.register_optim(AdamWithLookahead, DifferentiableAdam)
    params = _initial_params()
    with pytest.raises(ValueError, match="lookahead_steps") as error:
        higher.get_diff_optim(AdamWithLookahead(params), params)
    assert "does not support" in str(error.value)
    # A key that is not one of the optimizer's options (an LR scheduler's bookkeeping) is fine.
    opt = torch.optim.Adam(params)
    torch.optim.lr_scheduler.StepLR(opt, step_size=3)
    assert "initial_lr" in opt.param_groups[0]
    higher.get_diff_optim(opt, params)


@pytest.mark.parametrize("bad", [float("nan"), torch.tensor(float("nan"))], ids=["float", "tensor"])
def test_nan_hyperparameter_raises(bad):
    params = _initial_params()
    opt = torch.optim.Adam(params)
    nan_opt = torch.optim.Adam(params)
    nan_opt.param_groups[0]["lr"] = bad  # torch validates at construction; set it afterwards
    with pytest.raises(ValueError, match="'lr'.*NaN"):
        higher.get_diff_optim(nan_opt, params)
    with pytest.raises(ValueError, match="'eps'.*NaN"):
        higher.get_diff_optim(opt, params, override={"eps": [bad]})
    with pytest.raises(ValueError, match="'betas'.*NaN"):
        higher.get_diff_optim(opt, params, override={"betas": (0.9, bad)})
    diffopt = higher.get_diff_optim(opt, params)
    with pytest.raises(ValueError, match="'weight_decay'.*NaN"):
        diffopt.step(_loss(params), params=params, override={"lr": [0.5], "weight_decay": [bad]})
    # The refused override changed nothing: the optimizer still steps with its own values.
    assert diffopt.param_groups[0]["lr"] == 0.001 and diffopt.param_groups[0]["weight_decay"] == 0
    fast = diffopt.step(_loss(params), params=params)
    reference = higher.get_diff_optim(opt, params).step(_loss(params), params=params)
    assert all(torch.equal(a, b) for a, b in zip(fast, reference))


def test_unregistered_subclass_names_register_optim():
    class MyAdam(torch.optim.Adam):
        pass

    params = _initial_params()
    with pytest.raises(ValueError, match=r"register_optim\(MyAdam, higher.optim.DifferentiableAdam\)"):
        higher.get_diff_optim(MyAdam(params), params)
    with pytest.raises(ValueError, match="register_optim"):
        with higher.innerloop_ctx(_model(), MyAdam(_model().parameters())):
            pass


def test_unsupported_optimizer_raises_value_error():
    params = _initial_params()
    with pytest.raises(ValueError, match="LBFGS is not supported"):
        higher.get_diff_optim(torch.optim.LBFGS(params), params)
    with pytest.raises(ValueError, match="not supported"):
        higher.create_diff_optim(torch.optim.SparseAdam, params=[torch.zeros(3)])


class MomentumSignSGD(torch.optim.Optimizer):
    """A user optimizer: p <- p - lr / sqrt(t) * b,  b <- momentum * b + sign(g)."""

    def __init__(self, params, lr=0.01, momentum=0.9):
        super().__init__(params, dict(lr=lr, momentum=momentum))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["buf"] = torch.zeros_like(p)
                state["step"] += 1
                state["buf"].mul_(group["momentum"]).add_(p.grad.sign())
                p.add_(state["buf"], alpha=-group["lr"] / math.sqrt(state["step"]))


class DifferentiableMomentumSignSGD(DifferentiableOptimizer):
    """Its differentiable version, written the higher 0.2.1 way (README recipe)."""

    def _update(self, grouped_grads, **kwargs):
        for group_idx, (group, grads) in enumerate(zip(self.param_groups, grouped_grads)):
            for p_idx, (p, g) in enumerate(zip(group["params"], grads)):
                if g is None:
                    continue
                state = self.state[group_idx][p_idx]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["buf"] = torch.zeros_like(p)
                state["step"] = state["step"] + 1
                state["buf"] = state["buf"] * group["momentum"] + g.sign()
                group["params"][p_idx] = p - group["lr"] / math.sqrt(state["step"]) * state["buf"]


@pytest.mark.parametrize("warm_steps", [0, 2])
def test_user_optimizer_written_the_0_2_1_way(registry, warm_steps):
    higher.register_optim(MomentumSignSGD, DifferentiableMomentumSignSGD)
    model = _model()
    reference = copy.deepcopy(model)
    x, y, xq, yq = _data()
    opt = MomentumSignSGD(model.parameters(), lr=0.05)
    reference_opt = MomentumSignSGD(reference.parameters(), lr=0.05)
    for target, optimizer in ((model, opt), (reference, reference_opt)):
        for _ in range(warm_steps):
            optimizer.zero_grad()
            ((target(x) - y) ** 2).mean().backward()
            optimizer.step()

    lr = torch.tensor(0.05, requires_grad=True)
    with higher.innerloop_ctx(model, opt, override={"lr": [lr]}) as (fmodel, diffopt):
        assert isinstance(diffopt, DifferentiableMomentumSignSGD)
        for _ in range(4):
            diffopt.step(((fmodel(x) - y) ** 2).mean())
            reference_opt.zero_grad()
            ((reference(x) - y) ** 2).mean().backward()
            reference_opt.step()
        assert _max_difference(fmodel.parameters(), reference.parameters()) <= 1e-12
        (gradient,) = torch.autograd.grad(((fmodel(xq) - yq) ** 2).mean(), lr)
    assert torch.isfinite(gradient) and gradient != 0


# ----------------------------------------------------------------------------- override semantics
def _two_group_outer(lr_override, steps=3, **step_kwargs):
    params = _initial_params()
    opt = torch.optim.SGD([{"params": params[:2]}, {"params": params[2:]}], lr=0.1, momentum=0.5)
    diffopt = higher.get_diff_optim(opt, params, override={"lr": lr_override})
    return _loss(_diff_steps(diffopt, params, steps, **step_kwargs), batch=1)


def test_override_one_value_per_group_gives_each_group_its_hypergradient():
    lr_first = torch.tensor(0.1, requires_grad=True)
    lr_second = torch.tensor(0.3, requires_grad=True)
    grads = torch.autograd.grad(_two_group_outer([lr_first, lr_second]), [lr_first, lr_second])

    def numerical(first, second, h=1e-6):
        def outer(a, b):
            return _two_group_outer([torch.tensor(a), torch.tensor(b)]).item()

        return (
            (outer(first + h, second) - outer(first - h, second)) / (2 * h),
            (outer(first, second + h) - outer(first, second - h)) / (2 * h),
        )

    expected = numerical(0.1, 0.3)
    assert grads[0].item() == pytest.approx(expected[0], rel=1e-6)
    assert grads[1].item() == pytest.approx(expected[1], rel=1e-6)
    assert abs(grads[0] - grads[1]) > 1e-3  # two different numbers, not one shared

    # The same per-group values given as one 1-d tensor.
    both = torch.tensor([0.1, 0.3], requires_grad=True)
    (joint,) = torch.autograd.grad(_two_group_outer(both), both)
    assert torch.allclose(joint, torch.stack(grads), rtol=1e-12, atol=0)


def test_override_one_value_for_all_groups():
    shared = torch.tensor(0.2, requires_grad=True)
    (gradient,) = torch.autograd.grad(_two_group_outer([shared]), shared)
    first, second = torch.tensor(0.2, requires_grad=True), torch.tensor(0.2, requires_grad=True)
    separate = torch.autograd.grad(_two_group_outer([first, second]), [first, second])
    assert gradient.item() == pytest.approx((separate[0] + separate[1]).item(), rel=1e-12)
    # A bare number or 0-dim tensor also means "every group".
    bare = torch.tensor(0.2, requires_grad=True)
    (bare_gradient,) = torch.autograd.grad(_two_group_outer(bare), bare)
    assert bare_gradient.item() == pytest.approx(gradient.item(), rel=1e-12)
    assert _two_group_outer(0.2).item() == pytest.approx(_two_group_outer([0.2, 0.2]).item(), rel=1e-14)


def test_override_pairs_as_tuples_of_tensors():
    def outer(betas_override):
        params = _initial_params()
        opt = torch.optim.Adam([{"params": params[:2]}, {"params": params[2:]}], lr=0.05)
        diffopt = higher.get_diff_optim(opt, params, override={"betas": betas_override})
        return _loss(_diff_steps(diffopt, params, 3), batch=1)

    results = []
    for form in ("bare", "list of one", "per group"):
        beta1, beta2 = torch.tensor(0.8, requires_grad=True), torch.tensor(0.95, requires_grad=True)
        pair = (beta1, beta2)
        betas = {"bare": pair, "list of one": [pair], "per group": [pair, pair]}[form]
        loss = outer(betas)
        results.append((loss, torch.autograd.grad(loss, pair)))
    for loss, grads in results[1:]:
        assert loss.item() == pytest.approx(results[0][0].item(), rel=1e-14)
        assert all(a.item() == pytest.approx(b.item(), rel=1e-12) for a, b in zip(grads, results[0][1]))
    assert all(g != 0 for g in results[0][1])

    # And they equal torch.optim.Adam with those betas.
    params = _initial_params()
    reference = [p.detach().clone().requires_grad_() for p in params]
    diffopt = higher.get_diff_optim(
        torch.optim.Adam(params, lr=0.05), params, override={"betas": (torch.tensor(0.8), torch.tensor(0.95))}
    )
    ours = _diff_steps(diffopt, params, 5)
    _torch_steps(torch.optim.Adam(reference, lr=0.05, betas=(0.8, 0.95)), reference, 5)
    assert _max_difference(ours, reference) <= 1e-10


def test_step_level_override_persists():
    params = _initial_params()
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    diffopt = higher.get_diff_optim(opt, params)
    lr = torch.tensor(0.02, requires_grad=True)
    fast = diffopt.step(_loss(params), params=params, override={"lr": [lr]})
    fast = _diff_steps(diffopt, fast, 3)  # no override: lr stays 0.02
    assert diffopt.param_groups[0]["lr"] is lr

    reference = [p.detach().clone().requires_grad_() for p in params]
    _torch_steps(torch.optim.SGD(reference, lr=0.02, momentum=0.9), reference, 4)
    assert _max_difference(fast, reference) <= 1e-12
    (gradient,) = torch.autograd.grad(_loss(fast, batch=1), lr)
    assert gradient != 0
    assert opt.param_groups[0]["lr"] == 0.1  # the torch optimizer is not modified


def test_grad_callback_constructor_and_step_level():
    params = _initial_params()
    calls = {"constructor": [], "step": []}

    def halve(grads):
        calls["constructor"].append(grads)
        return [g * 0.5 for g in grads]

    def negate(grads):
        calls["step"].append(grads)
        return tuple(-g for g in grads)

    opt = torch.optim.SGD(params, lr=0.1)
    diffopt = higher.get_diff_optim(opt, params, grad_callback=halve)
    fast = diffopt.step(_loss(params), params=params)
    assert len(calls["constructor"]) == 1 and isinstance(calls["constructor"][0], tuple)
    assert len(calls["constructor"][0]) == len(params)
    expected = [p - 0.05 * g for p, g in zip(params, torch.autograd.grad(_loss(params), params))]
    assert _max_difference(fast, expected) <= 1e-14

    # A step-level callback replaces the constructor's for that step only.
    again = diffopt.step(_loss(fast), params=fast, grad_callback=negate)
    assert len(calls["step"]) == 1 and len(calls["constructor"]) == 1
    expected = [p + 0.1 * g for p, g in zip(fast, torch.autograd.grad(_loss(fast), fast))]
    assert _max_difference(again, expected) <= 1e-14
    diffopt.step(_loss(again), params=again)
    assert len(calls["constructor"]) == 2

    # innerloop_ctx/get_diff_optim pass grad_callback through; a wrong length is refused.
    with pytest.raises(ValueError, match="grad_callback returned 3 gradients for 4 parameters"):
        diffopt.step(_loss(params), params=params, grad_callback=lambda grads: grads[:3])
    # None for a gradient leaves that parameter unchanged.
    kept = diffopt.step(_loss(params), params=params, grad_callback=lambda grads: (None, *grads[1:]))
    assert kept[0] is params[0] and not torch.equal(kept[1], params[1])


# ------------------------------------------------------------------------- create_diff_optim
@pytest.mark.parametrize("name", ["SGD", "Adam", "RMSprop"])
def test_create_diff_optim_over_arbitrary_tensors(name):
    """Optimize the input of an energy function (not module parameters), as torch.optim would."""
    torch.manual_seed(4)
    matrix, target = torch.randn(5, 3), torch.randn(5)

    def energy(z):
        return ((torch.tanh(matrix @ z) - target) ** 2).sum() + 0.1 * (z**4).sum()

    z0 = torch.randn(3, requires_grad=True)
    z0_before = z0.detach().clone()
    options = dict(lr=0.05) if name != "SGD" else dict(lr=0.05, momentum=0.9)
    diffopt = higher.create_diff_optim(getattr(torch.optim, name), options, params=[z0])
    z = [z0]
    for _ in range(8):
        z = diffopt.step(energy(z[0]), params=z)

    reference = z0.detach().clone().requires_grad_()
    torch_opt = getattr(torch.optim, name)([reference], **options)
    for _ in range(8):
        torch_opt.zero_grad()
        energy(reference).backward()
        torch_opt.step()
    assert (z[0] - reference).abs().max() <= 1e-12
    assert torch.equal(z0.detach(), z0_before)  # the starting tensor itself is never modified
    (gradient,) = torch.autograd.grad(energy(z[0]), z0)  # differentiable back to the start
    assert torch.isfinite(gradient).all()


def test_create_diff_optim_over_parameter_groups():
    params = _initial_params()
    groups = [{"params": params[:2], "lr": 0.01}, {"params": params[2:]}]
    diffopt = higher.create_diff_optim(torch.optim.Adam, {"lr": 0.05}, params=groups)
    assert [g["lr"] for g in diffopt.param_groups] == [0.01, 0.05]
    ours = _diff_steps(diffopt, params, 6)

    reference = [p.detach().clone().requires_grad_() for p in params]
    torch_opt = torch.optim.Adam([{"params": reference[:2], "lr": 0.01}, {"params": reference[2:]}], lr=0.05)
    _torch_steps(torch_opt, reference, 6)
    assert _max_difference(ours, reference) <= 1e-10


# ------------------------------------------------------------- trainable optimizer hyperparameters
def test_get_trainable_opt_params():
    params = _initial_params()
    opt = torch.optim.Adam([{"params": params[:2]}, {"params": params[2:], "lr": 0.01}], lr=0.05, amsgrad=True)
    trainable = get_trainable_opt_params(opt)
    assert set(trainable) == {"lr", "betas", "eps", "weight_decay"}  # no amsgrad/maximize/... flags
    assert [v.item() for v in trainable["lr"]] == [0.05, 0.01]
    for pair in trainable["betas"]:
        assert isinstance(pair, tuple) and len(pair) == 2
        assert [b.item() for b in pair] == [0.9, 0.999]
    leaves = [
        v for values in trainable.values() for item in values for v in (item if isinstance(item, tuple) else (item,))
    ]
    assert all(v.is_leaf and v.requires_grad and v.dtype == torch.float64 for v in leaves)

    # The result is a valid override: every leaf receives a hypergradient through the unroll.
    diffopt = higher.get_diff_optim(opt, params, override=trainable)
    outer = _loss(_diff_steps(diffopt, params, 3), batch=1)
    grads = torch.autograd.grad(outer, leaves)
    assert all(torch.isfinite(g) for g in grads)


def test_get_trainable_opt_params_skips_bookkeeping_keys_and_keeps_tensor_hyperparameters():
    params = _initial_params()
    opt = torch.optim.Adam(params, lr=torch.tensor(0.05))
    torch.optim.lr_scheduler.StepLR(opt, step_size=3)  # adds 'initial_lr' to every group
    trainable = get_trainable_opt_params(opt)
    assert set(trainable) == {"lr", "betas", "eps", "weight_decay"}
    learned_lr = trainable["lr"][0]
    assert learned_lr.item() == pytest.approx(0.05) and learned_lr.is_leaf and learned_lr.requires_grad
    assert learned_lr is not opt.param_groups[0]["lr"] and not opt.param_groups[0]["lr"].requires_grad
    higher.get_diff_optim(opt, params, override=trainable)


def test_apply_trainable_opt_params_writes_back_floats_and_tensors():
    params = _initial_params()
    lr_tensor = torch.tensor(0.05)
    opt = torch.optim.Adam([{"params": params[:2]}, {"params": params[2:], "lr": lr_tensor}], lr=0.05)
    assert isinstance(opt.param_groups[0]["weight_decay"], int)  # torch's default is the int 0
    learned = {
        "lr": [torch.tensor(0.02, requires_grad=True), torch.tensor(0.03, requires_grad=True)],
        "betas": [(torch.tensor(0.85), torch.tensor(0.99))],
        "weight_decay": [torch.tensor(0.003, requires_grad=True)],
    }
    apply_trainable_opt_params(opt, learned)
    first, second = opt.param_groups
    assert first["lr"] == pytest.approx(0.02) and isinstance(first["lr"], float)
    assert second["lr"] is lr_tensor and lr_tensor.item() == pytest.approx(0.03)  # updated in place
    assert not lr_tensor.requires_grad
    for group in opt.param_groups:
        assert group["betas"] == pytest.approx((0.85, 0.99)) and isinstance(group["betas"], tuple)
        assert all(isinstance(b, float) for b in group["betas"])
        assert group["weight_decay"] == pytest.approx(0.003) and isinstance(group["weight_decay"], float)
    assert opt.param_groups[0]["amsgrad"] is False
    opt.zero_grad()
    _loss(params).backward()
    opt.step()  # still a working torch optimizer


def test_step_refuses_parameters_that_do_not_require_grad():
    """Updating tensors without requires_grad cannot work (no gradient): say so instead of returning them."""
    params = _initial_params()
    diffopt = higher.get_diff_optim(torch.optim.SGD(params, lr=0.1), params)
    frozen = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="requires_grad"):
        diffopt.step(_loss(frozen), params=frozen)


def test_not_tracking_keeps_no_graph_in_the_optimizer_state():
    """With track_higher_grads=False (test mode) a tensor hyperparameter must not chain the steps' graphs."""
    params = _initial_params()
    beta1 = torch.tensor(0.9, requires_grad=True)
    opt = torch.optim.Adam(params, lr=0.05)
    diffopt = higher.get_diff_optim(opt, params, override={"betas": (beta1, 0.999)}, track_higher_grads=False)
    fast = _diff_steps(diffopt, params, 3)
    assert all(p.grad_fn is None for p in fast)
    assert all(t.grad_fn is None for s in diffopt.state[0].values() for t in s.values() if isinstance(t, torch.Tensor))
    tracked = higher.get_diff_optim(opt, params, override={"betas": (beta1, 0.999)})
    reference = _diff_steps(tracked, params, 3)
    assert _max_difference(fast, reference) <= 1e-14


def test_a_pair_hyperparameter_that_is_not_a_pair_is_refused():
    """With two groups, a list of two numbers reads as one beta per group: refuse it clearly."""
    params = _initial_params()
    opt = torch.optim.Adam([{"params": params[:2]}, {"params": params[2:]}])
    with pytest.raises(ValueError, match=r"'betas'.*must be a pair"):
        higher.get_diff_optim(opt, params, override={"betas": [0.8, 0.95]})
    rprop = torch.optim.Rprop(params)
    with pytest.raises(ValueError, match=r"'step_sizes'.*must be a pair"):
        higher.get_diff_optim(rprop, params, override={"step_sizes": [(0.1, 0.2, 0.3)]})
    # A pair per group, or one 2-element tensor, is fine.
    higher.get_diff_optim(opt, params, override={"betas": [(0.8, 0.95), (0.9, 0.99)]})
    betas = torch.tensor([0.8, 0.95], requires_grad=True)
    diffopt = higher.get_diff_optim(opt, params, override={"betas": [betas]})
    (gradient,) = torch.autograd.grad(_loss(_diff_steps(diffopt, params, 3), batch=1), betas)
    assert torch.isfinite(gradient).all() and (gradient != 0).all()


@pytest.mark.parametrize("name", ["Adam", "AdamW", "NAdam", "RAdam"])
def test_groups_from_torch_versions_without_decoupled_weight_decay(name):
    """Older torch 2.x had no 'decoupled_weight_decay' key (AdamW was its own class): behave as it did."""
    params = _initial_params()
    opt = getattr(torch.optim, name)(params, lr=0.01, weight_decay=0.1)
    expected_flag = opt.param_groups[0].pop("decoupled_weight_decay")
    del opt.defaults["decoupled_weight_decay"]
    diffopt = higher.get_diff_optim(opt, params)
    assert diffopt.param_groups[0]["decoupled_weight_decay"] is expected_flag
    assert "decoupled_weight_decay" not in opt.param_groups[0]  # the torch optimizer is not modified
    ours = _diff_steps(diffopt, params, 5)
    reference = [p.detach().clone().requires_grad_() for p in params]
    _torch_steps(getattr(torch.optim, name)(reference, lr=0.01, weight_decay=0.1), reference, 5)
    assert _max_difference(ours, reference) <= 1e-10


# ------------------------------------------------------------- the fmodel changes dtype or device
# After fmodel.double() / .float() / .to(...), the optimizer state follows the fast weights as
# torch.optim's load_state_dict makes a state follow its parameters: the floating-point state is
# cast to the parameter's dtype and device, `step` is left as it is. The reference is torch.optim
# itself: at each change, a converted copy of the model and a new optimizer that loads the
# previous one's state_dict.
CONVERTED = {
    "SGD": dict(lr=0.1, momentum=0.9),
    "Adam": dict(lr=0.01),
    "AdamW": dict(lr=0.01, amsgrad=True, weight_decay=0.1),
    "Adagrad": dict(lr=0.1, lr_decay=0.01),
    "Adadelta": dict(lr=0.5),
    "Adamax": dict(lr=0.01),
    "ASGD": dict(lr=0.05, t0=1),
    "RMSprop": dict(lr=0.01, centered=True, momentum=0.5),
    "Rprop": dict(lr=0.01),
    "NAdam": dict(lr=0.01),
    "RAdam": dict(lr=0.01),
}
PHASES = [("cpu", torch.float32), ("cpu", torch.float64), ("cpu", torch.float32)]  # fmodel.to(device, dtype)


def _phase_data(device, dtype, steps=3):
    generator = torch.Generator().manual_seed(5)
    return [
        (
            torch.randn(8, 3, generator=generator).to(device, dtype),
            torch.randn(8, 2, generator=generator).to(device, dtype),
        )
        for _ in range(steps)
    ]


def _torch_through_phases(model, name, options, phases):
    opt = None
    for device, dtype in phases:
        model = copy.deepcopy(model).to(device, dtype)
        converted = getattr(torch.optim, name)(model.parameters(), **options)
        if opt is not None:
            converted.load_state_dict(opt.state_dict())  # casts and moves the floating-point state but `step`
        opt = converted
        for x, y in _phase_data(device, dtype):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
    return model


def _higher_through_phases(model, name, options, phases, override=None):
    """The same steps as _torch_through_phases, in one inner loop: fmodel.to(...) at each change.
    The final fmodel, and the state tensors in the graph when the first change came."""
    opt = getattr(torch.optim, name)(model.parameters(), **options)
    before = []
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, override=override) as (fmodel, diffopt):
        for phase, (device, dtype) in enumerate(phases):
            if phase == 1:
                before = [
                    v for s in diffopt.state[0].values() for v in s.values() if torch.is_tensor(v) and v.requires_grad
                ]
            fmodel.to(device, dtype)
            for x, y in _phase_data(device, dtype):
                diffopt.step(((fmodel(x) - y) ** 2).mean())
                assert all(p.dtype == dtype and p.device.type == device for p in fmodel.parameters())
        for state in diffopt.state[0].values():
            for key, value in state.items():
                if key != "step" and torch.is_tensor(value) and value.dim() > 0:
                    assert value.dtype == dtype and value.device.type == device
    return fmodel, before


def test_dtype_change_cases_cover_every_optimizer():
    assert set(CONVERTED) == set(RULES)


@pytest.mark.parametrize("default", [torch.float32, torch.float64], ids=["default_float32", "default_float64"])
@pytest.mark.parametrize("name", sorted(CONVERTED))
def test_optimizer_state_follows_fmodel_double_and_float_like_torch(name, default):
    torch.set_default_dtype(default)  # float32: torch's scalar state (step, mu_product, eta) is float32
    model = _model().float()
    reference = _torch_through_phases(model, name, CONVERTED[name], PHASES)
    fmodel, before = _higher_through_phases(model, name, CONVERTED[name], PHASES)
    for ours, theirs in zip(fmodel.parameters(), reference.parameters()):
        assert ours.dtype == theirs.dtype == torch.float32
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # The meta-gradient reaches the model and the state as it was before the conversions.
    meta_loss = fmodel(_phase_data("cpu", torch.float32)[0][0]).pow(2).mean()
    assert before
    grads = torch.autograd.grad(meta_loss, before + list(model.parameters()), allow_unused=True)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if name != "Rprop":  # Rprop's state reaches the update only through sign() and clamp: a zero gradient
        assert any(g.abs().sum() > 0 for g in grads[: len(before)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("name", ["SGD", "Adam", "NAdam", "ASGD"])
def test_optimizer_state_follows_fmodel_to_another_device_like_torch(name):
    """fmodel.to("cuda") and back: the state moves with the fast weights (torch hosts `step` where it was)."""
    model = _model().float()
    options = {**CONVERTED[name], "foreach": False}  # torch's one-tensor kernels, as the rules
    phases = [("cpu", torch.float32), ("cuda", torch.float64), ("cpu", torch.float32)]
    reference = _torch_through_phases(model, name, options, phases)
    fmodel, before = _higher_through_phases(model, name, options, phases)
    for ours, theirs in zip(fmodel.parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs)
    meta_loss = fmodel(_phase_data("cpu", torch.float32)[0][0]).pow(2).mean()
    grads = torch.autograd.grad(meta_loss, before + list(model.parameters()), allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    assert all(g is not None for g in grads[len(before) :])


def _numeric_hyperparameters(opt, dtype):
    """Every numeric hyperparameter of ``opt``'s group as a 0-dim tensor of ``dtype`` that requires grad."""
    rule = higher.optim._opt_mapping[type(opt)].rule
    override = {}
    for name in rule.hyperparameters:
        value = opt.param_groups[0][name]
        if isinstance(value, tuple):
            override[name] = tuple(torch.tensor(float(v), dtype=dtype, requires_grad=True) for v in value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            override[name] = torch.tensor(float(value), dtype=dtype, requires_grad=True)
    return override


@pytest.mark.parametrize("hyper_dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", sorted(CONVERTED))
def test_zero_dim_hyperparameter_tensors_of_another_dtype_work_by_type_promotion(name, hyper_dtype):
    """Through fmodel.double() and .float(), 0-dim tensor hyperparameters keep their dtype and the fast weights
    theirs (a 0-dim tensor does not decide the result's dtype); the numbers are those of plain numbers, and
    every hypergradient arrives, in the hyperparameter's dtype."""
    model = _model().float()
    opt = getattr(torch.optim, name)(model.parameters(), **CONVERTED[name])
    override = _numeric_hyperparameters(opt, hyper_dtype)
    plain = {k: tuple(v.item() for v in t) if isinstance(t, tuple) else t.item() for k, t in override.items()}
    results = [
        _higher_through_phases(model, name, CONVERTED[name], PHASES, override={k: [v] for k, v in hyper.items()})[0]
        for hyper in (override, plain)
    ]
    for ours, plain_numbers in zip(*(fmodel.parameters() for fmodel in results)):
        torch.testing.assert_close(ours, plain_numbers, rtol=1e-5, atol=1e-6)
    leaves = [t for v in override.values() for t in (v if isinstance(v, tuple) else (v,))]
    grads = torch.autograd.grad(next(results[0].parameters()).sum(), leaves, allow_unused=True)
    assert grads[leaves.index(override["lr"])] is not None  # (ASGD's t0 only reaches the averaged weights: None)
    assert all(g is None or g.dtype == hyper_dtype and torch.isfinite(g) for g in grads)


@pytest.mark.parametrize("kind", ["PerParameter", "broadcast", "PerStep"])
def test_a_hyperparameter_tensor_with_dimensions_of_a_wider_dtype_is_refused(kind):
    """After fmodel.float(), a float64 hyperparameter with dimensions would turn the fast weights into float64
    (type promotion) and the next forward would fail on mixed dtypes: refused before anything changes, and
    the fix the message gives works."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    lrs = [torch.full(p.shape, 0.1, dtype=torch.float64, requires_grad=True) for p in model.parameters()]
    wide = torch.full((1,), 0.1, dtype=torch.float64, requires_grad=True)
    hyper = {
        "PerParameter": higher.optim.PerParameter(lrs),
        "broadcast": wide,
        "PerStep": higher.PerStep(lambda step: wide),
    }[kind]
    x = torch.randn(8, 3, dtype=torch.float64)
    with higher.innerloop_ctx(model, opt, override={"lr": [hyper]}) as (fmodel, diffopt):
        diffopt.step(fmodel(x).pow(2).mean())  # float64 fast weights: fine
        fmodel.float()
        fast, state = list(fmodel.parameters()), [dict(s) for s in diffopt.state[0].values()]
        with pytest.raises(ValueError, match=r"'lr' is a torch.float64 tensor .* are torch.float32.*lr.to\(torch.fl"):
            diffopt.step(fmodel(x.float()).pow(2).mean())
        assert all(a is b for a, b in zip(fmodel.parameters(), fast)) and diffopt._steps_taken == 1
        for now, before in zip(diffopt.state[0].values(), state):  # (PerStep: converted for the new dtype)
            assert all(torch.equal(now[k], before[k].to(now[k].dtype)) for k in now)
        narrow = [t.to(torch.float32) for t in lrs] if kind == "PerParameter" else wide.to(torch.float32)
        value = higher.optim.PerParameter(narrow) if kind == "PerParameter" else narrow
        diffopt.step(fmodel(x.float()).pow(2).mean(), override={"lr": [value]})
        assert all(p.dtype == torch.float32 for p in fmodel.parameters())
        grads = torch.autograd.grad(fmodel(x.float()).pow(2).mean(), lrs if kind == "PerParameter" else [wide])
    assert all(g.dtype == torch.float64 and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


# ------------------------------------------------------------------ diffopt.step under no_grad
def test_step_under_no_grad_without_tracking_takes_the_plain_step():
    model, opt, inner, _ = small_problem()
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


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean()


# ---------------------------------------------------------------------------------------------
# The user's optimizer is never modified.


def test_a_scheduler_on_the_diffopt_leaves_the_torch_optimizers_tensor_lr_alone() -> None:
    """torch optimizers accept tensor hyperparameters, and torch's schedulers update a tensor
    ``lr`` in place (``fill_``): the differentiable optimizer must hold its own copy."""
    model = nn.Linear(3, 1)
    reference = nn.Linear(3, 1)
    reference.load_state_dict(model.state_dict())
    x, y = torch.randn(6, 3), torch.randn(6, 1)
    lr, betas = torch.tensor(0.1), (torch.tensor(0.9), torch.tensor(0.99))
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=betas)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=torch.tensor(0.1), betas=(0.9, 0.99))
    ref_sched = torch.optim.lr_scheduler.ExponentialLR(ref_opt, 0.5)
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        sched = torch.optim.lr_scheduler.ExponentialLR(diffopt, 0.5)
        for _ in range(3):
            diffopt.step(mse(fmodel(x), y))
            sched.step()
            ref_opt.zero_grad()
            mse(reference(x), y).backward()
            ref_opt.step()
            ref_sched.step()
        for fast, slow in zip(fmodel.parameters(), reference.parameters()):
            torch.testing.assert_close(fast, slow, atol=1e-15, rtol=1e-14)
    assert opt.param_groups[0]["lr"] is lr and lr.item() == 0.1
    held = opt.param_groups[0]["betas"]
    assert held[0].item() == 0.9 and held[1].item() == 0.99
    assert "initial_lr" not in opt.param_groups[0]


def test_a_tensor_hyperparameter_that_requires_grad_in_the_torch_optimizer_still_learns() -> None:
    """Copying tensor hyperparameters must not cut the hypergradient of one that requires grad."""
    model = nn.Linear(3, 1)
    x, y = torch.randn(6, 3), torch.randn(6, 1)
    lr = torch.tensor(0.1, requires_grad=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.param_groups[0]["lr"] = lr  # as a hyperparameter-learning program may set it
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        diffopt.step(mse(fmodel(x), y))
        (grad,) = torch.autograd.grad(mse(fmodel(x), y), lr)
    w, b = model.weight, model.bias
    g = torch.autograd.grad(mse(x @ w.t() + b, y), [w, b])
    lr_ = torch.tensor(0.1, requires_grad=True)
    (expected,) = torch.autograd.grad(mse(x @ (w - lr_ * g[0]).t() + (b - lr_ * g[1]), y), lr_)
    torch.testing.assert_close(grad, expected)
