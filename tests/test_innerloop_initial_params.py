"""Non-leaf inner targets (issue 5.5): fast weights that start from a hypernetwork's output."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

import higher


def _setup():
    target = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))
    sizes = [p.numel() for p in target.parameters()]
    hyper = nn.Linear(3, sum(sizes))
    task_embedding = torch.randn(3)
    x, y = torch.randn(8, 2), torch.randn(8, 1)
    return target, hyper, sizes, task_embedding, x, y


def _generate(target, hyper, sizes, embedding):
    flat = hyper(embedding)
    return [chunk.view_as(p) for chunk, p in zip(flat.split(sizes), target.parameters())]


def test_meta_gradient_reaches_the_generating_network():
    target, hyper, sizes, embedding, x, y = _setup()
    generated = _generate(target, hyper, sizes, embedding)
    opt = torch.optim.SGD(target.parameters(), lr=0.1, momentum=0.9)
    with higher.innerloop_ctx(target, opt, initial_params=generated) as (fmodel, diffopt):
        assert all(a is b for a, b in zip(fmodel.parameters(time=0), generated))
        for _ in range(3):
            diffopt.step(nn.functional.mse_loss(fmodel(x), y))
        nn.functional.mse_loss(fmodel(x), y).backward()
    ours = [p.grad.clone() for p in hyper.parameters()]
    assert all(p.grad is None for p in target.parameters()), "the target network's own weights are not used"

    hyper.zero_grad()
    names = [n for n, _ in target.named_parameters()]
    fast, buffers = _generate(target, hyper, sizes, embedding), None
    for _ in range(3):
        loss = nn.functional.mse_loss(functional_call(target, dict(zip(names, fast)), (x,)), y)
        grads = torch.autograd.grad(loss, fast, create_graph=True)
        buffers = list(grads) if buffers is None else [b * 0.9 + g for b, g in zip(buffers, grads)]
        fast = [p - 0.1 * b for p, b in zip(fast, buffers)]
    nn.functional.mse_loss(functional_call(target, dict(zip(names, fast)), (x,)), y).backward()
    for a, p in zip(ours, hyper.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-10, atol=1e-12)


def test_some_weights_by_name():
    target, hyper, sizes, embedding, x, y = _setup()
    head = nn.Linear(3, 5)(embedding)
    weight, bias = head[:4].view(1, 4), head[4:]
    opt = torch.optim.SGD(target.parameters(), lr=0.1)
    with higher.innerloop_ctx(
        target, opt, copy_initial_weights=False, initial_params={"2.weight": weight, "2.bias": bias}
    ) as (
        fmodel,
        diffopt,
    ):
        diffopt.step(nn.functional.mse_loss(fmodel(x), y))
        nn.functional.mse_loss(fmodel(x), y).backward()
    assert target[0].weight.grad is not None, "the body starts from the model (copy_initial_weights=False)"
    assert target[2].weight.grad is None, "the head starts from the generated tensors"


def test_unknown_names_and_bad_shapes_are_refused():
    target, *_ = _setup()
    opt = torch.optim.SGD(target.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"\['head.weight'\] are not parameters of the model"):
        higher.innerloop_ctx(target, opt, initial_params={"head.weight": torch.zeros(1, 4)}).__enter__()
    with pytest.raises(ValueError, match="has shape"):
        higher.innerloop_ctx(target, opt, initial_params={"2.weight": torch.zeros(4, 1)}).__enter__()
