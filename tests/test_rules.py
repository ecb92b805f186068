"""Exact derivatives through unrolled differentiable optimizers (float64).

For every optimizer and a set of options that exercises each branch of its update rule,
``torch.autograd.gradcheck`` compares the analytical derivative of the loss after 3 inner steps
with central finite differences, with respect to the initial parameters and with respect to each
numeric hyperparameter given through ``override`` as a tensor that requires grad. Then:
``gradgradcheck`` for SGD and Adam; the two hypergradients higher 0.2.1 dropped (Adam's beta2
through the bias correction, ASGD's alpha); finite meta-gradients when gradient entries are
exactly zero (dead units) and the ``sqrt0`` convention behind them.

The problem is a 3 -> 4 -> 2 tanh MLP written as a function of its parameter list, regressing on
8 fixed points (inner loss) and evaluated on 8 other points (outer loss), so that every check
takes a fraction of a second.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import higher
from higher import rules
from higher.rules import PAIR_HYPERPARAMETERS, RULES, sqrt0

SHAPES = [(4, 3), (4,), (2, 4), (2,)]


def _data():
    generator = torch.Generator().manual_seed(1)
    return tuple(torch.randn(8, n, generator=generator, dtype=torch.float64) for n in (3, 2, 3, 2))


X, Y, XQ, YQ = _data()


def _mlp(params, x):
    w1, b1, w2, b2 = params
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


def _inner_loss(params):
    return ((_mlp(params, X) - Y) ** 2).mean()


def _outer_loss(params):
    return ((_mlp(params, XQ) - YQ) ** 2).mean()


def _initial_params(requires_grad=True):
    generator = torch.Generator().manual_seed(2)
    return [
        (0.7 * torch.randn(s, generator=generator, dtype=torch.float64)).requires_grad_(requires_grad) for s in SHAPES
    ]


def _build(name, options, warm_steps=0):
    """A torch.optim optimizer over copies of the initial parameters, after ``warm_steps`` real steps."""
    tracked = _initial_params()
    opt = getattr(torch.optim, name)(tracked, **options)
    for _ in range(warm_steps):
        opt.zero_grad()
        _inner_loss(tracked).backward()
        opt.step()
    return opt, tracked


def _unroll(name, options, params, override=None, steps=3, warm_steps=0, keep=None):
    """Outer loss after ``steps`` differentiable steps of ``torch.optim.<name>(**options)`` from ``params``."""
    opt, tracked = _build(name, options, warm_steps)
    diffopt = higher.get_diff_optim(opt, tracked, override=override)
    params = list(params)
    for _ in range(steps):
        params = diffopt.step(_inner_loss(params), params=params)
    if keep is not None:
        keep.append(diffopt)
    return _outer_loss(params)


def _as_leaves(value):
    """The hyperparameter value(s) as float64 leaf tensors that require grad (pairs stay pairs)."""
    if isinstance(value, (tuple, list)):
        return tuple(torch.tensor(float(v), dtype=torch.float64, requires_grad=True) for v in value)
    return (torch.tensor(float(value), dtype=torch.float64, requires_grad=True),)


# Options per optimizer, chosen so that together they take every branch of the update rule, and
# so that the unrolled loss is smooth at the evaluation point (see the notes at each entry). Values
# of eps are moderate (1e-4 .. 1e-3) because gradcheck perturbs every input, eps included, by 1e-6.
CASES = {
    "SGD": [
        dict(lr=0.1),
        dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.1),
        dict(lr=0.1, momentum=0.8, nesterov=True, weight_decay=0.05, maximize=True),
    ],
    "Adam": [
        dict(lr=0.05, eps=1e-4, weight_decay=0.1),
        dict(lr=0.05, eps=1e-4, weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
        # amsgrad: the max is not differentiable at ties; with beta2=0.5 and decaying gradients the
        # running max keeps an older, strictly larger value for some entries and the new one for
        # others (checked in test_branches_are_exercised), with no entry within 1e-6 of a tie.
        dict(lr=0.05, eps=1e-4, betas=(0.8, 0.5), amsgrad=True),
    ],
    "AdamW": [dict(lr=0.05, eps=1e-4, weight_decay=0.1, amsgrad=True, betas=(0.8, 0.5))],
    "Adagrad": [
        dict(lr=0.1, eps=1e-4),
        dict(lr=0.1, eps=1e-4, lr_decay=0.2, weight_decay=0.1, initial_accumulator_value=0.3, maximize=True),
    ],
    # eps sits under the square roots (with acc_delta = 0 at the start), so it must be >> 1e-6.
    "Adadelta": [dict(lr=0.5, eps=1e-3), dict(lr=0.5, rho=0.8, eps=1e-3, weight_decay=0.1, maximize=True)],
    # max(beta2 u, |g| + eps) takes either side (checked below); |g| is far from 0 for every entry.
    "Adamax": [dict(lr=0.05, eps=1e-4, betas=(0.8, 0.5), weight_decay=0.1), dict(lr=0.05, maximize=True)],
    "ASGD": [
        dict(lr=0.1, lambd=0.05, alpha=0.5, weight_decay=0.1),
        # t0 = 0.5: mu = 1 / max(1, t - t0) < 1 from the 2nd step on, so averaging into ax is active
        # (and t - t0 is never within 1e-6 of the kink at 1). Parameters do not depend on ax, so the
        # gradient with respect to t0 is 0 both analytically and numerically.
        dict(lr=0.1, lambd=0.05, alpha=0.75, t0=0.5, maximize=True),
    ],
    "RMSprop": [
        dict(lr=0.01, eps=1e-4),
        dict(lr=0.01, eps=1e-4, alpha=0.9, centered=True, momentum=0.5, weight_decay=0.1),
        dict(lr=0.01, eps=1e-4, momentum=0.5, maximize=True),
    ],
    # Rprop only uses signs of gradients: with lr=0.3 some entries overshoot (sign flips: the
    # etaminus branch and zeroed gradient) and others keep their sign (etaplus). In the first case
    # both clamps are active (0.3 * 1.2 > 0.33 and 0.3 * 0.4 < 0.2; the step sizes get gradients,
    # the etas none), in the second neither (the etas get gradients). No gradient entry comes
    # within 1e-6 of 0 and no step size within 1e-6 of a bound, so every sign and clamp decision
    # is locally constant: the loss is smooth in the parameters and every hyperparameter.
    "Rprop": [
        dict(lr=0.3, etas=(0.4, 1.2), step_sizes=(0.2, 0.33)),
        dict(lr=0.3, etas=(0.4, 1.2), step_sizes=(0.01, 50.0)),
        dict(lr=0.01, maximize=True),
    ],
    "NAdam": [
        dict(lr=0.05, eps=1e-4, momentum_decay=0.1, weight_decay=0.1),
        dict(lr=0.05, eps=1e-4, weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
    ],
    # RAdam rectifies only once rho_t > 5, i.e. from t = 6 on. Four real torch steps first (warm
    # start), then t = 5, 6, 7: rho_5 = 4.80 (plain branch), rho_6 = 5.70, rho_7 = 6.59 (rectified),
    # far from 5 compared with the change a 1e-6 perturbation of beta2 makes.
    "RAdam": [
        dict(lr=0.05, eps=1e-4, betas=(0.9, 0.95), weight_decay=0.1),
        dict(lr=0.05, eps=1e-4, betas=(0.9, 0.95), weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
    ],
}
WARM_STEPS = {"RAdam": 4}

PARAMS = [(name, options) for name, option_list in CASES.items() for options in option_list]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for n, o in PARAMS]


def test_every_optimizer_is_covered():
    assert set(CASES) == set(RULES)


@pytest.mark.parametrize(("name", "options"), PARAMS, ids=IDS)
def test_gradcheck_initial_parameters(name, options):
    warm = WARM_STEPS.get(name, 0)

    def loss(*params):
        return _unroll(name, options, params, warm_steps=warm)

    assert gradcheck(loss, tuple(_initial_params()))


@pytest.mark.parametrize(("name", "options"), PARAMS, ids=IDS)
def test_gradcheck_every_hyperparameter(name, options):
    warm = WARM_STEPS.get(name, 0)
    opt, _ = _build(name, options)
    checked = []
    for hyper in RULES[name].hyperparameters:
        leaves = _as_leaves(opt.param_groups[0][hyper])

        def loss(*values, hyper=hyper):
            value = tuple(values) if hyper in PAIR_HYPERPARAMETERS else values[0]
            return _unroll(name, options, _initial_params(), override={hyper: [value]}, warm_steps=warm)

        assert gradcheck(loss, leaves), hyper
        checked.append(hyper)
    assert checked == list(RULES[name].hyperparameters)


def test_every_hyperparameter_reaches_the_loss_in_some_case():
    """The gradchecks above are not vacuous: each hyperparameter has a nonzero gradient in some case.

    The exception is ASGD's t0, which only changes the running average ``ax`` that the parameters
    never read (its gradient is 0 where averaging is active, as gradcheck confirms).
    """
    reached = {name: set() for name in CASES}
    for name, options in PARAMS:
        opt, _ = _build(name, options)
        for hyper in RULES[name].hyperparameters:
            leaves = _as_leaves(opt.param_groups[0][hyper])
            value = leaves if hyper in PAIR_HYPERPARAMETERS else leaves[0]
            loss = _unroll(name, options, _initial_params(), {hyper: [value]}, warm_steps=WARM_STEPS.get(name, 0))
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            reached[name].update(f"{hyper}[{i}]" for i, g in enumerate(grads) if g is not None and g.abs() > 1e-6)
    for name, rule in RULES.items():
        expected = {
            f"{hyper}[{i}]"
            for hyper in rule.hyperparameters
            for i in range(2 if hyper in PAIR_HYPERPARAMETERS else 1)
            if (name, hyper) != ("ASGD", "t0")
        }
        assert expected <= reached[name], (name, expected - reached[name])


def _last_diffopt(name, options):
    kept = []
    _unroll(name, options, _initial_params(), warm_steps=WARM_STEPS.get(name, 0), keep=kept)
    return kept[0]


def test_branches_are_exercised():
    """The non-smooth choices in the cases above go both ways (otherwise a branch is untested)."""
    # amsgrad: the running max keeps an older larger value for some entries, the new one for others.
    for name in ("Adam", "AdamW"):
        (options,) = [o for o in CASES[name] if o.get("amsgrad")]
        state = _last_diffopt(name, options).state[0]
        kept_old = [(s["max_exp_avg_sq"] > s["exp_avg_sq"]).sum().item() for s in state.values()]
        took_new = [(s["max_exp_avg_sq"] == s["exp_avg_sq"]).sum().item() for s in state.values()]
        assert sum(kept_old) > 0 and sum(took_new) > 0, name

    # Adamax: exp_inf is beta2 * exp_inf for some entries and |g| + eps for others at the last step.
    options = CASES["Adamax"][0]
    diffopt = _last_diffopt("Adamax", options)
    beta2 = options["betas"][1]
    decayed, fresh = 0, 0
    opt, tracked = _build("Adamax", options)
    replay = higher.get_diff_optim(opt, tracked)
    params = _initial_params()
    for _ in range(2):
        params = replay.step(_inner_loss(params), params=params)
    for index, previous in replay.state[0].items():
        final = diffopt.state[0][index]["exp_inf"]
        decayed += (final == previous["exp_inf"] * beta2).sum().item()
        fresh += (final != previous["exp_inf"] * beta2).sum().item()
    assert decayed > 0 and fresh > 0

    # Rprop: some step sizes clamped at step_size_max, some shrunk by etaminus (sign flip).
    options = CASES["Rprop"][0]
    state = _last_diffopt("Rprop", options).state[0]
    sizes = torch.cat([s["step_size"].flatten() for s in state.values()])
    assert (sizes == options["step_sizes"][1]).any()
    assert (sizes < options["lr"]).any()

    # ASGD with t0 = 0.5: averaging active (mu < 1, ax differs from the parameters).
    options = CASES["ASGD"][1]
    state = _last_diffopt("ASGD", options).state[0]
    assert all(0 < s["mu"] < 1 for s in state.values())

    # RAdam: the three differentiable steps are t = 5 (rho_t <= 5) and t = 6, 7 (rho_t > 5).
    beta2 = CASES["RAdam"][0]["betas"][1]
    rho_inf = 2 / (1 - beta2) - 1
    rho = {t: rho_inf - 2 * t * beta2**t / (1 - beta2**t) for t in (5, 6, 7)}
    assert rho[5] < 5 - 0.1 and rho[6] > 5 + 0.1
    assert all(s["step"] == 7 for s in _last_diffopt("RAdam", CASES["RAdam"][0]).state[0].values())


# ------------------------------------------------------------------------------ second order
@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)),
        ("Adam", dict(lr=0.05, eps=1e-4, weight_decay=0.1)),
    ],
)
def test_gradgradcheck_initial_parameters_and_lr(name, options):
    def loss(lr, *params):
        return _unroll(name, options, params, override={"lr": [lr]})

    inputs = (torch.tensor(options["lr"], requires_grad=True), *_initial_params())
    assert gradgradcheck(loss, inputs)


# ------------------------------------------------------------------- hypergradients 0.2.1 dropped
def _central_difference(function, value, h=1e-6):
    """(f(value + h) - f(value - h)) / 2h, for a function of a float returning a scalar tensor."""
    return (function(torch.tensor(value + h)).item() - function(torch.tensor(value - h)).item()) / (2 * h)


def _hand_written_adam(beta2, cut_bias_correction, lr=0.05, beta1=0.9, eps=1e-4, steps=3):
    """Adam (Kingma & Ba, Algorithm 1) in plain torch; optionally with beta2 detached in the bias correction."""
    params = _initial_params(requires_grad=False)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t in range(1, steps + 1):
        current = [p.detach().requires_grad_() if p.grad_fn is None else p for p in params]
        grads = torch.autograd.grad(_inner_loss(current), current, create_graph=True)
        m = [beta1 * mi + (1 - beta1) * g for mi, g in zip(m, grads)]
        v = [beta2 * vi + (1 - beta2) * g * g for vi, g in zip(v, grads)]
        corrected_beta2 = beta2.detach() if cut_bias_correction else beta2
        bias_correction2 = 1 - corrected_beta2**t
        params = [
            p - lr / (1 - beta1**t) * mi / (vi.sqrt() / bias_correction2.sqrt() + eps)
            for p, mi, vi in zip(current, m, v)
        ]
    return _outer_loss(params)


def test_adam_beta2_hypergradient_includes_the_bias_correction():
    options = dict(lr=0.05, eps=1e-4)

    def ours(beta2):
        beta1 = torch.tensor(0.9)
        return _unroll("Adam", options, _initial_params(), override={"betas": (beta1, beta2)})

    beta2 = torch.tensor(0.99, requires_grad=True)
    (gradient,) = torch.autograd.grad(ours(beta2), beta2)
    assert gradient.item() == pytest.approx(_central_difference(ours, 0.99), rel=1e-6, abs=1e-9)

    full = torch.autograd.grad(_hand_written_adam(beta2, cut_bias_correction=False), beta2)[0]
    cut = torch.autograd.grad(_hand_written_adam(beta2, cut_bias_correction=True), beta2)[0]
    assert torch.allclose(gradient, full, rtol=1e-10, atol=1e-12)
    # Dropping the bias-correction path (what higher 0.2.1 did) gives a clearly different number.
    assert (gradient - cut).abs() > 0.1 * gradient.abs()


def test_asgd_alpha_hypergradient():
    options = dict(lr=0.1, lambd=0.5, alpha=0.75)

    def ours(alpha):
        return _unroll("ASGD", options, _initial_params(), override={"alpha": [alpha]})

    alpha = torch.tensor(0.75, requires_grad=True)
    (gradient,) = torch.autograd.grad(ours(alpha), alpha)
    assert gradient.item() == pytest.approx(_central_difference(ours, 0.75), rel=1e-6, abs=1e-12)
    # alpha reaches the loss only through the step size eta of steps 2 and 3; 0.2.1 gave None.
    assert gradient.abs() > 1e-4


# ---------------------------------------------------------------- dead units: sqrt at 0
def _relu_mlp(params, x):
    w1, b1, w2, b2 = params
    return torch.relu(x @ w1.T + b1) @ w2.T + b2


def _dead_problem():
    """A ReLU MLP with a dead hidden unit and an input feature that is 0 in every example.

    The gradient entries of the dead unit's incoming and outgoing weights and of the first layer's
    column for the zero feature are exactly 0 at every step.
    """
    x, y, xq, yq = _data()
    x[:, 2] = 0.0
    xq[:, 2] = 0.0
    params = _initial_params(requires_grad=False)
    params[1][:3] = 1.0  # hidden units 0..2 fire on some of the data, ...
    params[1][3] = -100.0  # ... hidden unit 3 never does
    return params, (x, y, xq, yq)


ADAPTIVE = [
    ("Adam", dict(lr=0.05)),
    ("Adam", dict(lr=0.05, amsgrad=True)),
    ("AdamW", dict(lr=0.05)),
    ("Adagrad", dict(lr=0.1)),
    ("RMSprop", dict(lr=0.01)),
    ("RMSprop", dict(lr=0.01, centered=True, momentum=0.5)),
    ("NAdam", dict(lr=0.05)),
    ("RAdam", dict(lr=0.05)),
    ("Adamax", dict(lr=0.05)),
    ("Adadelta", dict(lr=1.0)),
]


def _dead_unroll(name, options, params, lr, data, steps=3):
    x, y, xq, yq = data
    opt = getattr(torch.optim, name)([torch.zeros_like(p, requires_grad=True) for p in params], **options)
    diffopt = higher.get_diff_optim(opt, opt.param_groups[0]["params"], override={"lr": [lr]})
    # RAdam needs rho_t > 5 to use the square root at all: start it at t = 6 (state of 5 steps of
    # zero gradients, which leave the moments at 0), so that steps 6..8 go through sqrt(0).
    if name == "RAdam":
        for index in range(len(params)):
            diffopt.state[0][index] = {**rules.radam_init(params[index], diffopt.param_groups[0]), "step": 5}
    params = list(params)
    for _ in range(steps):
        loss = ((_relu_mlp(params, x) - y) ** 2).mean()
        params = diffopt.step(loss, params=params)
    return ((_relu_mlp(params, xq) - yq) ** 2).mean()


@pytest.mark.parametrize(("name", "options"), ADAPTIVE, ids=[f"{n}-{o}" for n, o in ADAPTIVE])
def test_finite_meta_gradients_with_exactly_zero_gradient_entries(name, options):
    start, data = _dead_problem()
    dead = [torch.zeros(s, dtype=torch.bool) for s in SHAPES]
    dead[0][3, :] = True  # into the dead unit
    dead[0][:, 2] = True  # from the zero feature
    dead[1][3] = True
    dead[2][:, 3] = True  # out of the dead unit

    params = [p.clone().requires_grad_() for p in start]
    lr = torch.tensor(options["lr"], requires_grad=True)
    grads = torch.autograd.grad(((_relu_mlp(params, data[0]) - data[1]) ** 2).mean(), params)
    assert all(((g == 0) == d).all() for g, d in zip(grads, dead)), "the dead entries are exactly the zero gradients"

    meta_loss = _dead_unroll(name, options, params, lr, data)
    meta_grads = torch.autograd.grad(meta_loss, [*params, lr])
    assert all(torch.isfinite(g).all() for g in meta_grads)

    # Central differences on every entry that moves, and on the learning rate.
    def outer(shift_index=None, shift_flat=None, h=0.0, lr=options["lr"]):
        moved = [p.clone() for p in start]
        if shift_index is not None:
            moved[shift_index].view(-1)[shift_flat] += h
        moved = [p.requires_grad_() for p in moved]
        return _dead_unroll(name, options, moved, torch.tensor(lr), data).item()

    for index, mask in enumerate(dead):
        for flat in torch.nonzero(~mask.flatten()).flatten().tolist():
            numerical = (outer(index, flat, 1e-6) - outer(index, flat, -1e-6)) / 2e-6
            assert meta_grads[index].view(-1)[flat].item() == pytest.approx(numerical, rel=1e-5, abs=1e-8)
        # A dead entry never moves and does not reach the outer loss: its meta-gradient is 0.
        assert (meta_grads[index][mask] == 0).all()
    numerical_lr = (outer(lr=options["lr"] + 1e-6) - outer(lr=options["lr"] - 1e-6)) / 2e-6
    assert meta_grads[-1].item() == pytest.approx(numerical_lr, rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("name", ["Adam", "Adagrad", "RMSprop"])
def test_plain_sqrt_would_give_nan_on_the_dead_problem(name, monkeypatch):
    """The finite meta-gradients above are due to sqrt0: with torch.sqrt they are NaN."""
    start, data = _dead_problem()
    options = dict(ADAPTIVE)[name]
    monkeypatch.setattr(rules, "sqrt0", torch.sqrt)
    params = [p.clone().requires_grad_() for p in start]
    meta_grads = torch.autograd.grad(_dead_unroll(name, options, params, torch.tensor(options["lr"]), data), params)
    assert any(torch.isnan(g).any() for g in meta_grads)


@pytest.mark.parametrize("name", ["Adam", "AdamW", "Adagrad", "RMSprop"])
def test_exact_derivative_through_a_zero_gradient(name):
    """At a stationary point the first gradient is exactly 0, but its derivative is not.

    L(theta) = (theta - 1)^2 at theta0 = 1. For each of these optimizers the first update is
    lr * g / (|g| + eps) (bias corrections and (1 - beta) factors cancel), so
    d theta1 / d theta0 = 1 - lr * 2 / eps exactly. With sqrt0 autograd gets this number; with
    torch.sqrt it gets NaN.
    """
    lr, eps = 1e-4, 1e-3
    options = dict(lr=lr, eps=eps, weight_decay=0.0)

    def first_step(theta0):
        opt = getattr(torch.optim, name)([torch.zeros(1, requires_grad=True)], **options)
        diffopt = higher.get_diff_optim(opt, opt.param_groups[0]["params"])
        (theta1,) = diffopt.step(((theta0 - 1) ** 2).sum(), params=[theta0])
        return theta1

    theta0 = torch.ones(1, requires_grad=True)
    (derivative,) = torch.autograd.grad(first_step(theta0).sum(), theta0)
    assert derivative.item() == pytest.approx(1 - 2 * lr / eps, rel=1e-12)
    h = 1e-9  # << eps / 2, the scale on which g / (|g| + eps) bends
    shifted = [(torch.ones(1) + shift).requires_grad_() for shift in (h, -h)]
    numerical = (first_step(shifted[0]).item() - first_step(shifted[1]).item()) / (2 * h)
    assert numerical == pytest.approx(1 - 2 * lr / eps, rel=1e-5)


def test_sqrt0_values_and_derivatives():
    x = torch.tensor([0.0, 1e-12, 0.3, 2.0, 50.0], requires_grad=True)
    assert torch.equal(sqrt0(x), x.sqrt())
    # First and second derivatives equal those of sqrt away from 0.
    positive = torch.tensor([0.3, 1.5, 4.0], requires_grad=True)
    assert gradcheck(sqrt0, (positive,))
    assert gradgradcheck(sqrt0, (positive,))
    (first,) = torch.autograd.grad(sqrt0(positive).sum(), positive, create_graph=True)
    assert torch.allclose(first, 0.5 / positive.sqrt())
    (second,) = torch.autograd.grad(first.sum(), positive)
    assert torch.allclose(second, -0.25 * positive ** (-1.5))
    # At 0: derivative exactly 0, at first and second order, and finite everywhere.
    zero = torch.zeros(3, requires_grad=True)
    (first,) = torch.autograd.grad(sqrt0(zero).sum(), zero, create_graph=True)
    assert torch.equal(first, torch.zeros(3))
    (second,) = torch.autograd.grad(first.sum(), zero, allow_unused=True)
    assert second is None or torch.equal(second, torch.zeros(3))
    # Without autograd it is just torch.sqrt.
    with torch.no_grad():
        assert torch.equal(sqrt0(x), x.sqrt())
