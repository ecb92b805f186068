"""The multi-tensor forms of the update rules compute exactly what the one-tensor rules compute.

``UpdateRule.update_many`` (SGD, Adam, AdamW) runs a whole parameter group with
``torch._foreach_*`` kernels. Its values must be bitwise those of ``update`` (and so of
torch.optim, see test_optim_parity.py), and its derivatives, first and second order, those of
``update``.
"""

import math

import pytest
import torch

from higher import rules

SHAPES = [(4, 3), (4,), (1, 4), (1,), (2, 3, 2), (5,)]  # many tensors: torch's foreach derivatives once broke past 3

SGD_OPTIONS = [
    {},
    {"momentum": 0.9},
    {"momentum": 0.9, "dampening": 0.2},
    {"momentum": 0.8, "nesterov": True},
    {"weight_decay": 0.1},
    {"maximize": True, "momentum": 0.5, "weight_decay": 0.05},
]
ADAM_OPTIONS = [
    {},
    {"amsgrad": True},
    {"weight_decay": 0.1},
    {"weight_decay": 0.1, "decoupled_weight_decay": True},
    {"maximize": True, "betas": (0.8, 0.95), "eps": 1e-3},
]
CASES = [("SGD", o) for o in SGD_OPTIONS] + [("Adam", o) for o in ADAM_OPTIONS] + [("AdamW", {"weight_decay": 0.1})]


def _hyper(name, options):
    params = [torch.zeros(1, requires_grad=True)]
    lr = 0.1 if name == "SGD" else 0.01
    return {
        k: v for k, v in getattr(torch.optim, name)(params, lr=lr, **options).param_groups[0].items() if k != "params"
    }


def _unroll(rule, hyper, params, grads_per_step, many):
    states = [rule.init(p, hyper) for p in params]
    trajectory = []
    for grads in grads_per_step:
        if many:
            result = rule.update_many(params, grads, states, hyper)
            assert result is not None
            params, states = result
        else:
            updated = [rule.update(p, g, s, hyper) for p, g, s in zip(params, grads, states)]
            params, states = [p for p, _ in updated], [s for _, s in updated]
        trajectory.append((list(params), [dict(s) for s in states]))
    return trajectory


@pytest.mark.parametrize(("name", "options"), CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_multi_tensor_update_equals_the_one_tensor_rule(name, options):
    rule = rules.RULES[name]
    hyper = _hyper(name, options)
    start = [torch.randn(s, requires_grad=True) for s in SHAPES]
    grad_leaves = [[torch.randn(s, requires_grad=True) for s in SHAPES] for _ in range(3)]
    grad_leaves[0][1] = torch.zeros(SHAPES[1], requires_grad=True)  # exact zeros: sqrt0 at 0
    one = _unroll(rule, hyper, start, grad_leaves, many=False)
    many = _unroll(rule, hyper, start, grad_leaves, many=True)
    for (params_one, states_one), (params_many, states_many) in zip(one, many):
        assert all(torch.equal(a, b) for a, b in zip(params_one, params_many))
        for s1, s2 in zip(states_one, states_many):
            assert s1.keys() == s2.keys()
            for key in s1:
                assert torch.equal(torch.as_tensor(s1[key]), torch.as_tensor(s2[key])), key

    # Derivatives of a function of the last parameters, with respect to the start and every
    # gradient, to first order and (through create_graph) second order.
    inputs = start + [g for step in grad_leaves for g in step]
    weights = [torch.randn(s) for s in SHAPES]

    def derivatives(trajectory):
        final = trajectory[-1][0]
        objective = sum(((p * w).sum() ** 2) for p, w in zip(final, weights))
        first = torch.autograd.grad(objective, inputs, create_graph=True, allow_unused=True)
        first = [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, first)]
        second = torch.autograd.grad(sum((g * g).sum() for g in first), inputs, allow_unused=True)
        return first, [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, second)]

    for ours, reference in zip(derivatives(many), derivatives(one)):
        for a, b in zip(ours, reference):
            assert torch.isfinite(a).all()
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_multi_tensor_update_declines_tensor_hyperparameters(name):
    rule = rules.RULES[name]
    hyper = _hyper(name, {})
    hyper["lr"] = torch.tensor(0.1, requires_grad=True)
    params = [torch.randn(s, requires_grad=True) for s in SHAPES]
    states = [rule.init(p, hyper) for p in params]
    assert rule.update_many(params, [torch.randn_like(p) for p in params], states, hyper) is None


def test_sqrt0_many_equals_sqrt0_with_zeros():
    xs = [torch.rand(s) for s in SHAPES]
    xs[0][0, 0] = 0.0
    xs[3][0] = 0.0
    xs = [x.requires_grad_() for x in xs]
    ours, reference = rules.sqrt0_many(xs), [rules.sqrt0(x) for x in xs]
    assert all(torch.equal(a, b) for a, b in zip(ours, reference))
    weights = [torch.randn(s) for s in SHAPES]
    for outputs in (ours, reference):
        objective = sum((y * w).sum() for y, w in zip(outputs, weights))
        grads = torch.autograd.grad(objective, xs, create_graph=True)
        assert all(torch.isfinite(g).all() for g in grads)
        assert grads[0][0, 0] == 0 and grads[3][0] == 0
    first = [torch.autograd.grad(sum((y * w).sum() for y, w in zip(out, weights)), xs)[0] for out in (ours, reference)]
    assert torch.equal(first[0], first[1])
    positive = tuple((x.detach() + 0.5).requires_grad_() for x in xs)
    assert torch.autograd.gradcheck(lambda *a: tuple(rules.sqrt0_many(list(a))), positive)
    assert torch.autograd.gradgradcheck(lambda *a: tuple(rules.sqrt0_many(list(a))), positive)


class _LoggedTensor(torch.Tensor):
    """A tensor subclass: step() must take it through torch.autograd.grad (its __torch_function__)."""


@pytest.mark.parametrize("create_graph", [True, False])
def test_the_direct_gradient_call_equals_torch_autograd_grad(create_graph):
    from higher.optim import _grad

    x, unused = torch.randn(3, requires_grad=True), torch.randn(2, requires_grad=True)
    ours = _grad((x**3).sum(), [x, unused], create_graph)
    theirs = torch.autograd.grad((x**3).sum(), [x, unused], create_graph=create_graph, allow_unused=True)
    assert torch.equal(ours[0], theirs[0]) and ours[1] is None and theirs[1] is None
    assert ours[0].requires_grad == create_graph
    if create_graph:
        assert torch.equal(torch.autograd.grad(ours[0].sum(), x)[0], torch.autograd.grad(theirs[0].sum(), x)[0])
    subclass_loss = (x**3).sum().as_subclass(_LoggedTensor)
    assert torch.equal(_grad(subclass_loss, [x], create_graph)[0], theirs[0])


def _saved_bytes(fn):
    """Bytes of the tensors autograd saves for the backward pass while ``fn`` runs."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved)


@pytest.mark.parametrize(("name", "options"), CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_multi_tensor_update_saves_no_more_for_backward_than_the_one_tensor_rule(name, options):
    """A long unroll keeps what every step saves: the multi-tensor form must not save more.

    (torch's ``_foreach_add(xs, ys, alpha)`` saves both lists although its derivative needs
    neither: with it, SGD kept every step's gradients alive, 60 MiB over a 200-step unroll of a
    74k-parameter MLP; see benchmarks/long_unroll.py.)
    """
    rule = rules.RULES[name]
    hyper = _hyper(name, options)
    params = [torch.randn(s, requires_grad=True) for s in SHAPES]
    grads = [torch.randn(s, requires_grad=True) for s in SHAPES]
    states = [rule.init(p, hyper) for p in params]
    for _ in range(2):  # the second step has momentum buffers and moments
        many = _saved_bytes(lambda ps=params, ss=states: rule.update_many(ps, grads, ss, hyper))
        one = _saved_bytes(lambda ps=params, ss=states: [rule.update(*args, hyper) for args in zip(ps, grads, ss)])
        assert many <= one
        updated = [rule.update(p, g, s, hyper) for p, g, s in zip(params, grads, states)]
        params, states = [p for p, _ in updated], [s for _, s in updated]
    if name == "SGD" and not options.get("weight_decay") and not options.get("momentum"):
        assert many == 0, "plain SGD's update p - lr g needs nothing saved"


def test_sqrt0_many_mixed_dtypes_first_and_second_order():
    """The backward pass (in place at first order, out of place when building a graph) gives
    sqrt0's derivatives for tensors of different dtypes in one call, including float64 roots
    below float32's smallest normal number."""
    xs = [
        torch.tensor([0.0, 0.25, 4.0], dtype=torch.float32),
        torch.tensor([0.0, 1e-200, 2.0], dtype=torch.float64),
    ]
    xs = [x.requires_grad_() for x in xs]
    weights = [torch.tensor([3.0, -1.0, 0.5], dtype=x.dtype) for x in xs]
    ours = rules.sqrt0_many(xs)
    reference = [rules.sqrt0(x) for x in xs]
    first = [torch.autograd.grad(sum((y * w).sum() for y, w in zip(out, weights)), xs) for out in (ours, reference)]
    assert all(torch.equal(a, b) for a, b in zip(*first))
    assert first[0][1][1] == -1.0 / (2 * math.sqrt(1e-200))  # not clamped to float32's tiny
    second = []
    for out in (rules.sqrt0_many(xs), [rules.sqrt0(x) for x in xs]):
        grads = torch.autograd.grad(sum((y * w).sum() for y, w in zip(out, weights)), xs, create_graph=True)
        second.append(torch.autograd.grad(sum(g.sum() for g in grads), xs))
    assert all(torch.equal(a, b) for a, b in zip(*second))
    assert all(torch.isfinite(g).all() for g in second[0])
