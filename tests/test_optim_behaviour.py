"""Behaviours of the differentiable optimizers that code written for 0.2.1 and torch.optim relies on.

One test (or parametrized family) per behaviour of issue 8's optimizer side: groups without
gradients are skipped, ``override`` takes any sequence, a tensor ``step`` stays a tensor and the
state can be handed back to torch.optim, clear errors (a loss that does not depend on the fast
weights, no-grad mode, complex losses, mis-shaped hyperparameter tensors), torch.optim's step
hooks, and Adagrad's eagerly created state.
"""

import copy

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

import higher

ALL = ["SGD", "Adam", "AdamW", "Adagrad", "Adadelta", "Adamax", "ASGD", "RMSprop", "Rprop", "NAdam", "RAdam"]
LR = {"SGD": 0.1, "Adadelta": 1.0, "Rprop": 0.01}


def _opt(name, params, **options):
    return getattr(torch.optim, name)(params, lr=LR.get(name, 0.01), **options)


def _model():
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def _data():
    return torch.randn(8, 3), torch.randn(8, 2)


def _torch_steps(model, make_opt, x, y, steps, loss_fn=None):
    reference = copy.deepcopy(model)
    opt = make_opt(reference)
    for _ in range(steps):
        opt.zero_grad()
        (loss_fn or nn.functional.mse_loss)(reference(x), y).backward()
        opt.step()
    return reference, opt


# ------------------------------------------------------------- 1. groups that get no gradient
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("tasks", [None, 3])
@pytest.mark.parametrize("cause", ["frozen_group", "unused_head", "grad_callback"])
def test_groups_without_gradients_are_skipped_like_torch_optim(name, tasks, cause):
    model = nn.ModuleDict({"body": nn.Linear(3, 4), "head": nn.Linear(4, 2), "spare": nn.Linear(4, 2)})

    def forward(m, x):
        return m["head"](torch.tanh(m["body"](x)))

    if cause == "frozen_group":
        for p in model["body"].parameters():
            p.requires_grad_(False)
    groups = [
        {"params": list(model["body"].parameters())},
        {"params": list(model["head"].parameters())},
        {"params": list(model["spare"].parameters())},  # never used by the forward: no gradient
    ]
    callback = None
    if cause == "grad_callback":  # the callback drops the head's gradients: its group gets Nones
        head = {id(p) for p in model["head"].parameters()}
        flags = [id(p) in head for p in model.parameters()]
        callback = lambda grads: [None if f else g for f, g in zip(flags, grads)]  # noqa: E731
    x, y = _data()
    steps = 3
    if tasks is None:
        reference = copy.deepcopy(model)
        torch_opt = _opt(name, [{"params": list(g.parameters())} for g in reference.values()])
        for _ in range(steps):
            torch_opt.zero_grad()
            nn.functional.mse_loss(forward(reference, x), y).backward()
            if callback is not None:
                for p in reference["head"].parameters():
                    p.grad = None
            torch_opt.step()
        opt = _opt(name, groups)
        with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
            for _ in range(steps):
                out = fmodel["head"](torch.tanh(fmodel["body"](x)))
                diffopt.step(nn.functional.mse_loss(out, y), grad_callback=callback)
        for a, b in zip(fmodel.parameters(), reference.parameters()):
            assert torch.equal(a, b)
        return
    xs, ys = x.expand(tasks, *x.shape), y.expand(tasks, *y.shape)
    opt = _opt(name, groups)
    with higher.innerloop_ctx(model, opt, tasks=tasks) as (fmodel, diffopt):
        for _ in range(steps):
            out = fmodel["head"](torch.tanh(fmodel["body"](xs)))
            diffopt.step(((out - ys) ** 2).flatten(1).mean(1), grad_callback=callback)
    per_task = [list(fmodel.parameters())]
    # Every task runs the same data, so each equals the per-task path.
    single_opt = _opt(name, [{"params": list(g.parameters())} for g in model.values()])
    with higher.innerloop_ctx(model, single_opt) as (single, single_diffopt):
        for _ in range(steps):
            out = single["head"](torch.tanh(single["body"](x)))
            single_diffopt.step(nn.functional.mse_loss(out, y), grad_callback=callback)
    for batched, one in zip(per_task[0], single.parameters()):
        assert torch.allclose(batched, one.expand_as(batched), rtol=1e-12, atol=1e-12)
    unchanged = [model["spare"].weight, model["spare"].bias]
    assert torch.equal(list(fmodel.parameters())[4][0], unchanged[0])


def test_a_grad_callback_dropping_every_gradient_is_a_no_op_step_as_in_torch_optim():
    model = _model()
    opt = torch.optim.Adam([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=0.1)
    x, y = _data()
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        before = list(fmodel.parameters())
        new = diffopt.step(nn.functional.mse_loss(fmodel(x), y), grad_callback=lambda grads: [None] * len(grads))
    assert all(a is b for a, b in zip(before, new))
    assert all(len(state) == 0 for state in diffopt.state)


# ------------------------------------------------------------- 3. override with any sequence
def test_override_takes_a_parameter_list_for_lr_and_a_parameter_list_slice_for_betas():
    model, (x, y) = _model(), _data()
    hyper = nn.ParameterList([nn.Parameter(torch.tensor(v)) for v in (0.01, 0.9, 0.99)])
    opt = torch.optim.Adam(model.parameters(), lr=0.5)
    override = {"lr": nn.ParameterList([hyper[0]]), "betas": [hyper[1:3]]}
    with higher.innerloop_ctx(model, opt, override=override) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(nn.functional.mse_loss(fmodel(x), y))
        nn.functional.mse_loss(fmodel(x), y).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad) for p in hyper)
    reference, _ = _torch_steps(model, lambda m: torch.optim.Adam(m.parameters(), lr=0.01, betas=(0.9, 0.99)), x, y, 3)
    for a, b in zip(fmodel.parameters(), reference.parameters()):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


def test_override_parameter_list_with_one_value_per_group():
    model, (x, y) = _model(), _data()
    lrs = nn.ParameterList([nn.Parameter(torch.tensor(0.1)), nn.Parameter(torch.tensor(0.05))])
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters()}]
    with higher.innerloop_ctx(model, torch.optim.SGD(groups, lr=1.0), override={"lr": lrs}) as (fmodel, diffopt):
        diffopt.step(nn.functional.mse_loss(fmodel(x), y))
    assert [g["lr"] for g in diffopt.param_groups] == [lrs[0], lrs[1]]
    with pytest.raises(ValueError, match="3 values but the optimizer has 2"):
        diffopt.step(nn.functional.mse_loss(fmodel(x), y), override={"lr": nn.ParameterList([lrs[0]] * 3)})


# ------------------------------------------------------------- 4 and 2. state in torch's form, handed back
@pytest.mark.parametrize("name", ALL)
def test_state_handed_back_to_torch_optim_continues_exactly(name):
    model, (x, y) = _model(), _data()
    make = lambda m: _opt(name, m.parameters())  # noqa: E731
    reference, _ = _torch_steps(model, make, x, y, 6)
    with higher.innerloop_ctx(model, make(model)) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(nn.functional.mse_loss(fmodel(x), y))
    # Three more steps with torch.optim, from the differentiable optimizer's weights and state.
    resumed = copy.deepcopy(model)
    with torch.no_grad():
        for p, fast in zip(resumed.parameters(), fmodel.parameters()):
            p.copy_(fast)
    torch_opt = make(resumed)
    for index, p in enumerate(resumed.parameters()):
        state = diffopt.state[0][index]
        torch_opt.state[p] = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    for _ in range(3):
        torch_opt.zero_grad()
        nn.functional.mse_loss(resumed(x), y).backward()
        torch_opt.step()
    for a, b in zip(resumed.parameters(), reference.parameters()):
        assert torch.equal(a, b)


def test_adam_tensor_step_from_torch_stays_a_tensor_and_goes_back():
    model, (x, y) = _model(), _data()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    warm = copy.deepcopy(model)
    warm_opt = torch.optim.Adam(warm.parameters(), lr=0.01)
    for _ in range(2):
        warm_opt.zero_grad()
        nn.functional.mse_loss(warm(x), y).backward()
        warm_opt.step()
    model.load_state_dict(warm.state_dict())
    opt.load_state_dict(warm_opt.state_dict())
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        diffopt.step(nn.functional.mse_loss(fmodel(x), y))
    step = diffopt.state[0][0]["step"]
    assert isinstance(step, torch.Tensor) and step.dtype == opt.state[model[0].weight]["step"].dtype
    assert float(step) == 3
    assert float(opt.state[model[0].weight]["step"]) == 2, "the torch optimizer's own state is untouched"


# ------------------------------------------------------------- 5. a loss without the fast weights
class _PlainListModule(nn.Module):
    """Keeps its weights in a plain Python list: nn.Module does not register them."""

    def __init__(self):
        super().__init__()
        self.registered = nn.Linear(3, 2)
        self.weights = [nn.Parameter(torch.randn(2, 3))]

    def forward(self, x):
        return x @ self.weights[0].t()


@pytest.mark.parametrize("name", ALL)
def test_a_loss_from_the_original_model_is_a_clear_error(name):
    model, (x, y) = _model(), _data()
    with higher.innerloop_ctx(model, _opt(name, model.parameters())) as (fmodel, diffopt):
        with pytest.raises(ValueError, match=r"model\(x\), instead of the fmodel"):
            diffopt.step(nn.functional.mse_loss(model(x), y))
    module = _PlainListModule()
    with higher.innerloop_ctx(module, _opt(name, module.parameters())) as (fmodel, diffopt):
        with pytest.raises(ValueError, match="plain\\s+Python list"):
            diffopt.step(fmodel(x).pow(2).mean())


# ------------------------------------------------------------- 6. no-grad mode, complex losses, shapes
@pytest.mark.parametrize(
    ("mode", "track_higher_grads"), [("no_grad", True), ("inference_mode", True), ("inference_mode", False)]
)
def test_step_under_no_grad_is_a_clear_error(mode, track_higher_grads):
    """(Under no_grad with track_higher_grads=False, which records no graph anyway, the step is
    taken: tests/test_optim.py.)"""
    model, (x, y) = _model(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt, track_higher_grads=track_higher_grads) as (fmodel, diffopt):
        loss = nn.functional.mse_loss(fmodel(x), y)
        before = list(fmodel.parameters())
        with getattr(torch, mode)():
            with pytest.raises(RuntimeError, match=rf"torch\.{mode}\(\)"):
                diffopt.step(loss)
        assert all(a is b for a, b in zip(before, fmodel.parameters())), "nothing changed"


def test_complex_loss_is_an_error():
    model, (x, _) = _model(), _data()
    with higher.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1)) as (fmodel, diffopt):
        loss = (fmodel(x) * (1 + 1j)).sum()
        with pytest.raises(ValueError, match="real-valued loss"):
            diffopt.step(loss)


def test_hyperparameter_tensor_shapes_must_keep_the_parameter_shapes():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"shape \(3, 1\).*shape \(4, 3\)|shape \(3, 1\).*shape \(4,\)"):
        higher.innerloop_ctx(model, opt, override={"lr": [torch.full((3, 1), 0.1)]}).__enter__()
    bias_model = nn.Linear(1, 3)
    with higher.innerloop_ctx(bias_model, torch.optim.SGD([bias_model.bias], lr=0.1)) as (fmodel, diffopt):
        schedule = higher.PerStep([torch.full((3,), 0.1), torch.full((3, 1), 0.1)])
        with pytest.raises(ValueError, match=r"'lr' is a tensor of shape \(3, 1\)"):
            diffopt.step(fmodel(torch.randn(4, 1)).pow(2).mean(), override={"lr": [schedule]})
        callable_schedule = higher.PerStep(lambda t: torch.full((3, 1), 0.1))
        with pytest.raises(ValueError, match=r"'lr' is a tensor of shape \(3, 1\)"):
            diffopt.step(fmodel(torch.randn(4, 1)).pow(2).mean(), override={"lr": [callable_schedule]})
    assert fmodel.bias.shape == (3,)
    # A tensor that broadcasts to every parameter of the group without changing it is fine.
    row = nn.Linear(3, 3)
    with higher.innerloop_ctx(
        row, torch.optim.SGD(row.parameters(), lr=0.1), override={"lr": [torch.full((3,), 0.1)]}
    ) as (
        fmodel,
        diffopt,
    ):
        diffopt.step(fmodel(torch.randn(2, 3)).pow(2).mean())
    assert [tuple(p.shape) for p in fmodel.parameters()] == [(3, 3), (3,)]


# ------------------------------------------------------------- 8. torch.optim's step hooks
def test_step_hooks_like_torch_optim():
    model, (x, y) = _model(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):

        def pre(optimizer, args, kwargs):
            seen.append(("pre", optimizer, args[0], list(fmodel.parameters())))

        def post(optimizer, args, kwargs):
            seen.append(("post", optimizer, args[0], list(fmodel.parameters())))

        before = list(fmodel.parameters())
        pre_handle = diffopt.register_step_pre_hook(pre)
        post_handle = diffopt.register_step_post_hook(post)
        loss = nn.functional.mse_loss(fmodel(x), y)
        new = diffopt.step(loss)
        assert [s[0] for s in seen] == ["pre", "post"]
        assert seen[0][1] is diffopt and seen[0][2] is loss and seen[1][1] is diffopt
        assert all(a is b for a, b in zip(seen[0][3], before)), "pre-hooks run before the update"
        assert all(a is b for a, b in zip(seen[1][3], new)), "post-hooks run after it"
        pre_handle.remove()
        post_handle.remove()
        diffopt.step(nn.functional.mse_loss(fmodel(x), y))
        assert len(seen) == 2

        # A pre-hook may replace the arguments, as with torch.optim.
        def double_lr(optimizer, args, kwargs):
            return args, {**kwargs, "override": {"lr": [0.2]}}

        diffopt.register_step_pre_hook(double_lr)
        diffopt.step(nn.functional.mse_loss(fmodel(x), y))
        assert diffopt.param_groups[0]["lr"] == 0.2
        diffopt.register_step_pre_hook(lambda *a: "bad")
        with pytest.raises(RuntimeError, match="pre-hook must return None or a tuple"):
            diffopt.step(nn.functional.mse_loss(fmodel(x), y))


def test_global_optimizer_hooks_fire_for_differentiable_optimizers():
    model, (x, y) = _model(), _data()
    calls = []
    handle = register_optimizer_step_post_hook(lambda o, a, k: calls.append(o))
    try:
        with higher.innerloop_ctx(model, torch.optim.Adam(model.parameters())) as (fmodel, diffopt):
            diffopt.step(nn.functional.mse_loss(fmodel(x), y))
    finally:
        handle.remove()
    assert calls == [diffopt]


# ------------------------------------------------------------- 11. Adagrad's eager state
def test_adagrad_warm_start_uses_the_state_torch_created_before_the_first_step():
    model, (x, y) = _model(), _data()

    def make(m):
        opt = torch.optim.Adagrad(
            [{"params": m[0].parameters(), "initial_accumulator_value": 0.5}, {"params": m[2].parameters()}],
            lr=0.1,
            initial_accumulator_value=0.1,
        )
        opt.state[m[2].weight]["sum"].fill_(2.0)  # a user-filled accumulator
        return opt

    reference, _ = _torch_steps(model, make, x, y, 4)
    with higher.innerloop_ctx(model, make(model)) as (fmodel, diffopt):
        for _ in range(4):
            diffopt.step(nn.functional.mse_loss(fmodel(x), y))
    for a, b in zip(fmodel.parameters(), reference.parameters()):
        assert torch.equal(a, b)


def test_adagrad_override_of_the_initial_accumulator_replaces_the_unstepped_state():
    model, (x, y) = _model(), _data()
    initial = torch.tensor(0.3, requires_grad=True)
    opt = torch.optim.Adagrad(model.parameters(), lr=0.1)
    override = {"initial_accumulator_value": [initial]}
    with higher.innerloop_ctx(model, opt, override=override) as (fmodel, diffopt):
        for _ in range(2):
            diffopt.step(nn.functional.mse_loss(fmodel(x), y))
        nn.functional.mse_loss(fmodel(x), y).backward()
    assert initial.grad is not None and initial.grad != 0
    reference, _ = _torch_steps(
        model, lambda m: torch.optim.Adagrad(m.parameters(), lr=0.1, initial_accumulator_value=0.3), x, y, 2
    )
    for a, b in zip(fmodel.parameters(), reference.parameters()):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


def test_per_parameter_betas_stay_one_pair_per_parameter():
    model, (x, y) = nn.Linear(3, 2), _data()
    pairs = higher.PerParameter([(0.9, 0.999), (0.8, 0.99)])
    with higher.innerloop_ctx(model, torch.optim.Adam(model.parameters(), lr=0.01), override={"betas": [pairs]}) as (
        fmodel,
        diffopt,
    ):
        for _ in range(3):
            diffopt.step(nn.functional.mse_loss(fmodel(x), y))
    assert diffopt.param_groups[0]["betas"] is pairs

    def make(m):
        return torch.optim.Adam(
            [{"params": [m.weight], "betas": (0.9, 0.999)}, {"params": [m.bias], "betas": (0.8, 0.99)}], lr=0.01
        )

    reference, _ = _torch_steps(model, make, x, y, 3)
    for a, b in zip(fmodel.parameters(), reference.parameters()):
        assert torch.equal(a, b)
