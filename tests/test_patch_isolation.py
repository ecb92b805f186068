"""The user's model is never written, not even during a call: the fmodel runs a private replica.

Each test checks a way the swap-into-the-model design (higher 0.2.1 and our earlier versions)
went wrong: threads sharing a model, a model call from another thread during an fmodel call, an
interrupt in the middle of a call, attributes a forward stores on its modules, activation
checkpointing recomputing with other weights, and fmodels made inside another fmodel's forward.
References are hand-written unrolls with ``torch.func.functional_call`` / plain tensor code.
"""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

import higher


def snapshot(model: nn.Module) -> list[tuple[int, str, int]]:
    """Identity of everything in every module's __dict__ and slot dicts (what a swap would change)."""
    state = []
    for i, m in enumerate(model.modules()):
        for key, value in m.__dict__.items():
            state.append((i, key, id(value)))
            if isinstance(value, dict):
                state.extend((i, f"{key}[{k}]", id(v)) for k, v in value.items())
    return state


def sgd_unroll(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> list[torch.Tensor]:
    """Hand-written reference: meta-gradient of the query loss after ``steps`` SGD steps."""
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    fast = params
    for _ in range(steps):
        loss = F.mse_loss(functional_call(model, dict(zip(names, fast)), (x,)), y)
        grads = torch.autograd.grad(loss, fast, create_graph=True)
        fast = [p - lr * g for p, g in zip(fast, grads)]
    return list(torch.autograd.grad(F.mse_loss(functional_call(model, dict(zip(names, fast)), (x,)), y), params))


def ours(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> list[torch.Tensor]:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(F.mse_loss(fmodel(x), y))
        loss = F.mse_loss(fmodel(x), y)
    return list(torch.autograd.grad(loss, list(model.parameters())))


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))


def test_the_model_is_untouched_during_a_call():
    model = mlp()
    x = torch.randn(8, 3)
    expected_output = model(x).detach()
    before = snapshot(model)
    seen = []
    inside = {"now": False}

    def look_at_the_model(module, args):
        # runs inside the fmodel's call, on the replica: the model must be as it was
        if inside["now"]:
            return
        inside["now"] = True
        seen.append((snapshot(model) == before, torch.equal(model(x), expected_output), module is not model[2]))
        inside["now"] = False

    model[2].register_forward_pre_hook(look_at_the_model)
    before = snapshot(model)
    fmodel = higher.monkeypatch(model)
    fmodel.fast_params = [p * 0 for p in fmodel.parameters()]
    seen.clear()  # model(x) above ran the hook too
    fmodel(x)
    assert seen == [(True, True, True)]
    assert snapshot(model) == before


def test_two_threads_with_their_own_fmodels_of_one_model_get_exact_results():
    torch.manual_seed(0)
    model = mlp()
    data = [(torch.randn(10, 3), torch.randn(10, 1)) for _ in range(4)]
    expected = [ours(model, x, y, 3, 0.1) for x, y in data]
    for (x, y), got in zip(data, expected):
        assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-15) for a, b in zip(got, sgd_unroll(model, x, y, 3, 0.1)))
    before = snapshot(model)
    results: dict[int, list[list[torch.Tensor]]] = {}
    barrier = threading.Barrier(4)

    def worker(k: int) -> None:
        torch.set_num_threads(1)
        barrier.wait()
        results[k] = [ours(model, x, y, 3, 0.1) for x, y in data for _ in range(5)][::5]

    def plain_calls(k: int) -> None:
        barrier.wait()
        x = data[0][0]
        reference = model(x).detach()
        results[k] = [[model(x).detach() - reference] for _ in range(200)]

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    threads.append(threading.Thread(target=plain_calls, args=(3,)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(3):
        for got, want in zip(results[k], expected):
            assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert all(float(d[0].abs().max()) == 0 for d in results[3])  # plain calls never saw fast weights
    assert snapshot(model) == before
    assert all(type(p) is nn.Parameter for p in model.parameters())


class Interrupt(BaseException):
    pass


@pytest.mark.parametrize("where", [0, 2, 4])
def test_an_interrupt_inside_a_call_leaves_the_model_and_the_fmodel_usable(where):
    torch.manual_seed(0)
    model = mlp()
    x, y = torch.randn(10, 3), torch.randn(10, 1)
    armed = {"on": False}

    def interrupt(module, args):
        if armed["on"]:
            armed["on"] = False
            raise KeyboardInterrupt

    model[where].register_forward_pre_hook(interrupt)
    before = snapshot(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        diffopt.step(F.mse_loss(fmodel(x), y))
        armed["on"] = True
        with pytest.raises(KeyboardInterrupt):
            fmodel(x)
        assert snapshot(model) == before
        diffopt.step(F.mse_loss(fmodel(x), y))  # the loop goes on as if nothing happened
        got = torch.autograd.grad(F.mse_loss(fmodel(x), y), list(model.parameters()))
    want = sgd_unroll(model, x, y, 2, 0.1)
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-14) for a, b in zip(got, want))


class Remembers(nn.Module):
    """A forward that stores its activation in an attribute set to None in __init__, and appends
    to a list attribute: both stay with the fmodel."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 4)
        self.last = None
        self.trace: list[torch.Tensor] = []

    def forward(self, x):
        h = torch.tanh(self.layer(x))
        self.last = h
        self.trace.append(h)
        return h.sum(1, keepdim=True)


def test_attributes_a_forward_stores_stay_with_the_fmodel():
    model = Remembers()
    x, y = torch.randn(6, 3), torch.randn(6, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(F.mse_loss(fmodel(x), y))
        F.mse_loss(fmodel(x), y).backward()
        last = weakref.ref(fmodel.last)
        assert fmodel.last.grad_fn is not None and len(fmodel.trace) == 4
        fast = weakref.ref(fmodel.layer.weight)
    assert model.last is None and model.trace == []
    del fmodel, diffopt
    gc.collect()
    assert last() is None and fast() is None  # the model keeps no graph alive


class Checkpointed(nn.Module):
    def __init__(self, use_checkpoint: str) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, 1)
        self.use_checkpoint = use_checkpoint

    def forward(self, x):
        if self.use_checkpoint == "module":  # checkpoint keeps the block
            h = checkpoint(self.block, x, use_reentrant=False)
        elif self.use_checkpoint == "closure":  # checkpoint keeps a function that reads self.block later
            h = checkpoint(lambda inputs: self.block(inputs), x, use_reentrant=False)
        else:
            h = self.block(x)
        return self.head(h)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("use_checkpoint", ["module", "closure"])
def test_activation_checkpointing_inside_the_model_gives_exact_meta_gradients(use_checkpoint, first_order):
    def meta_gradients(use_checkpoint: str) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = Checkpointed(use_checkpoint)
        x, y = torch.randn(4, 5, 3), torch.randn(4, 5, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False, first_order=first_order) as (f, d):
            total = torch.zeros(())
            for t in range(3):
                d.step(F.mse_loss(f(x[t]), y[t]))
                # a loss after every step (MAML++): its backward recomputes segments of old steps
                total = total + F.mse_loss(f(x[3]), y[3])
            total.backward()
        return [p.grad for p in model.parameters()]

    plain, checkpointed = meta_gradients("none"), meta_gradients(use_checkpoint)
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-15) for a, b in zip(plain, checkpointed))


class Nested(nn.Module):
    """A forward that adapts its own head with an inner loop of its own (nested meta-learning)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.head = nn.Linear(4, 1)
        self.head_opt = torch.optim.SGD(self.head.parameters(), lr=0.1)

    def forward(self, x, y):
        h = torch.tanh(self.body(x))
        with higher.innerloop_ctx(self.head, self.head_opt, copy_initial_weights=False) as (fhead, diffopt):
            for _ in range(2):
                diffopt.step(F.mse_loss(fhead(h), y))
            return F.mse_loss(fhead(h), y)


def nested_reference(params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    weight, bias, head_weight, head_bias = params
    h = torch.tanh(F.linear(x, weight, bias))
    fast = [head_weight, head_bias]
    for _ in range(2):
        grads = torch.autograd.grad(F.mse_loss(F.linear(h, *fast), y), fast, create_graph=True)
        fast = [p - 0.1 * g for p, g in zip(fast, grads)]
    return F.mse_loss(F.linear(h, *fast), y)


def test_an_inner_loop_inside_an_fmodels_forward_gives_exact_nested_meta_gradients():
    model = Nested()
    x, y = torch.randn(5, 3), torch.randn(5, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(2):
            diffopt.step(fmodel(x, y))
        fmodel(x, y).backward()
    params = list(model.parameters())
    fast = params
    for _ in range(2):
        grads = torch.autograd.grad(nested_reference(fast, x, y), fast, create_graph=True)
        fast = [p - 0.05 * g for p, g in zip(fast, grads)]
    reference = torch.autograd.grad(nested_reference(fast, x, y), params)
    assert all(torch.allclose(p.grad, r, rtol=1e-12, atol=1e-15) for p, r in zip(params, reference))
    # the plain model still runs its own inner loop on its own parameters
    assert float(model(x, y).detach()) == pytest.approx(float(nested_reference(params, x, y).detach()), rel=1e-12)


class RegistersHooks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 1)

    def forward(self, x):
        self.layer.register_forward_hook(lambda module, args, output: output * 2)
        return self.layer(x)


def test_registering_a_hook_on_a_replica_during_a_call_is_refused_clearly():
    model = RegistersHooks()
    fmodel = higher.monkeypatch(model)
    with pytest.raises(RuntimeError, match="Register the hook on the model before patching"):
        fmodel(torch.randn(2, 3))
    assert not model.layer._forward_hooks


def test_patching_again_sees_every_change_to_the_model():
    """The analysis of a model's tree is reused between patches only while the model is unchanged."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 1))
    x = torch.randn(50, 3)
    first = higher.monkeypatch(model)
    model[1].p = 0.0  # an attribute of the same type
    model[0].weight = nn.Parameter(torch.zeros(4, 3))  # a new parameter object
    calls = []
    model[2].register_forward_hook(lambda module, args, output: calls.append(1))  # a hook added later
    model.add_module("3", nn.Tanh())  # a new submodule
    second = higher.monkeypatch(model)
    out = second(x)
    assert torch.equal(out, model(x)) and len(calls) == 2  # the fmodel and the model ran the hook
    assert second[0].weight.abs().max() == 0 and len(list(second.parameters())) == 4
    assert len(first._hg_core.modules) == 4 and len(second._hg_core.modules) == 5
    calls.clear()
    first(x)
    assert calls == []  # hooks registered on the model after patching do not reach an existing fmodel
