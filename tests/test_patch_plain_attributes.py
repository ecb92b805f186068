"""Modules that reach their submodules or parameters through plain attributes (lists, dicts,
bound methods, closures, partials) use the fast weights, in every mode, and the user's objects
stay untouched; parameters resized in place between inner loops are seen.

The references are ``torch.optim`` itself on a second copy of the model (the first-order
trajectory) or a hand-written ``torch.func.functional_call`` unroll (the meta-gradient)."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

import higher


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean()


# ---------------------------------------------------------------------------------------------
# Modules that reach their submodules or parameters other than through their registered slots.
# torch.optim (and torch.func.functional_call, which swaps tensors into the module itself) sees
# the same tensors whichever way the forward reaches them; the fmodel must use the fast weights.


class PlainListOfModules(nn.Module):
    """Registered in a ModuleList, run in an order kept in a plain list."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 1)])
        self.order = [self.blocks[0], self.blocks[1]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.order:
            x = torch.tanh(block(x))
        return x


class PartlyThroughAList(nn.Module):
    """One head reached through its slot, the other only through a plain list (used partly)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 1)
        self.extra = [self.b]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.a(x)).sum(1, keepdim=True) + self.extra[0](x)


class BoundMethodChosenInInit(nn.Module):
    """``self.impl = self._forward_a``: a forward implementation chosen at construction."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 1)
        self.impl = self._forward_a

    def _forward_a(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.impl(x)


class ClosureOverSelf(nn.Module):
    """A function made in ``__init__`` that closes over ``self``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 1)
        self.fn = lambda x: self.a(torch.tanh(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class DictOfModules(nn.Module):
    """Heads looked up in a plain dict (and a tuple), registered as attributes too."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 1)
        self.b = nn.Linear(3, 1)
        self.table = {"a": self.a}
        self.pair = (self.a, self.b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table["a"](x) + self.pair[1](x) * self.b(x)


class ParameterInAList(nn.Module):
    """A registered parameter also used through a plain list."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 1)
        self.ws = [self.a.weight]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + x @ self.ws[0].t()


class SiblingReference(nn.Module):
    """A child holding an unregistered reference to a sibling (``object.__setattr__``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 1)
        self.b = nn.Linear(3, 1)
        object.__setattr__(self.b, "sibling", self.a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(x) * self.b.sibling(x)


class PartialOfASubmodule(nn.Module):
    """``functools.partial`` of a submodule's method, made in ``__init__``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 1)
        self.scaled = functools.partial(self._scaled, self.a, scale=2.0)

    @staticmethod
    def _scaled(layer: nn.Module, x: torch.Tensor, scale: float) -> torch.Tensor:
        return layer(x) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaled(torch.tanh(x))


ALIASING = [
    PartialOfASubmodule,
    PlainListOfModules,
    PartlyThroughAList,
    BoundMethodChosenInInit,
    ClosureOverSelf,
    DictOfModules,
    ParameterInAList,
    SiblingReference,
]


def twin(cls: type[nn.Module]) -> tuple[nn.Module, nn.Module]:
    """Two models of ``cls`` with equal parameters (built, not deep-copied: a deep copy shares
    functions, so its closures would still refer to the first model)."""
    model = cls()
    other = cls()
    other.load_state_dict(model.state_dict())
    return model, other


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cls", ALIASING, ids=lambda c: c.__name__)
def test_modules_reached_through_plain_attributes_use_the_fast_weights(cls: type[nn.Module], dtype) -> None:
    torch.set_default_dtype(dtype)
    model, reference = twin(cls)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(6, 3), torch.randn(6, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=0.05)
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(mse(fmodel(x), y))
            ref_opt.zero_grad()
            mse(reference(x), y).backward()
            ref_opt.step()
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        for fast, slow in zip(fmodel.parameters(), reference.parameters()):
            torch.testing.assert_close(fast, slow, atol=tol, rtol=tol)
        torch.testing.assert_close(fmodel(x), reference(x), atol=tol, rtol=tol)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("cls", [BoundMethodChosenInInit, ClosureOverSelf, PlainListOfModules])
def test_meta_gradient_through_plain_attributes_matches_functional_call(cls: type[nn.Module]) -> None:
    model = cls()
    x, y = torch.randn(6, 3), torch.randn(6, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(2):
            diffopt.step(mse(fmodel(x), y))
        ours = torch.autograd.grad(mse(fmodel(x), y), list(model.parameters()))
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    for _ in range(2):
        grads = torch.autograd.grad(
            mse(functional_call(model, dict(zip(names, params)), (x,)), y), params, create_graph=True
        )
        params = [p - 0.3 * g for p, g in zip(params, grads)]
    theirs = torch.autograd.grad(
        mse(functional_call(model, dict(zip(names, params)), (x,)), y), list(model.parameters())
    )
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


class CheckpointedThroughAList(nn.Module):
    """Activation checkpointing of a block reached through a plain list (the copy-on-write path)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 1)
        self.stages = [self.a, self.b]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = checkpoint(lambda t: torch.tanh(self.stages[0](t)), x, use_reentrant=False)
        return self.stages[1](h)


def test_aliases_follow_each_history_entry_under_checkpointing() -> None:
    """A loss summed over the steps, recomputed by checkpointing: each step's aliases keep that
    step's weights (the replicas are copied, not refilled, once something holds them)."""
    model = CheckpointedThroughAList()
    x, y = torch.randn(6, 3), torch.randn(6, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        total = 0.0
        for _ in range(3):
            loss = mse(fmodel(x), y)
            total = total + loss
            diffopt.step(loss)
        ours = torch.autograd.grad(total, list(model.parameters()))

    def plain(params: list[torch.Tensor]) -> torch.Tensor:
        w1, b1, w2, b2 = params
        return torch.tanh(x @ w1.t() + b1) @ w2.t() + b2

    params = list(model.parameters())
    total = 0.0
    for _ in range(3):
        loss = mse(plain(params), y)
        total = total + loss
        grads = torch.autograd.grad(loss, params, create_graph=True)
        params = [p - 0.3 * g for p, g in zip(params, grads)]
    theirs = torch.autograd.grad(total, list(model.parameters()))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_aliases_leave_the_user_objects_alone() -> None:
    model = DictOfModules()
    table, pair = model.table, model.pair
    fmodel = higher.monkeypatch(model)
    fmodel(torch.randn(2, 3))
    assert model.table is table and model.table["a"] is model.a
    assert model.pair is pair and pair[0] is model.a
    bound = BoundMethodChosenInInit()
    impl = bound.impl
    higher.monkeypatch(bound)(torch.randn(2, 3))
    assert bound.impl is impl and impl.__self__ is bound


@pytest.mark.parametrize("cls", [PlainListOfModules, BoundMethodChosenInInit, ParameterInAList])
def test_plain_attribute_aliases_in_task_batched_mode(cls: type[nn.Module]) -> None:
    """``tasks=T`` runs the same replicas per task: the aliases hold each task's fast weights."""
    model = cls()
    tasks = 3
    xs, ys = torch.randn(tasks, 6, 3), torch.randn(tasks, 6, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    losses = torch.func.vmap(mse)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, tasks=tasks) as (fmodel, diffopt):
        for _ in range(2):
            diffopt.step(losses(fmodel(xs), ys))
        batched = torch.autograd.grad(losses(fmodel(xs), ys).sum(), list(model.parameters()))
    total = 0.0
    for t in range(tasks):
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(2):
                diffopt.step(mse(fmodel(xs[t]), ys[t]))
            total = total + mse(fmodel(xs[t]), ys[t])
    per_task = torch.autograd.grad(total, list(model.parameters()))
    for a, b in zip(batched, per_task):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_a_parameter_resized_in_place_between_episodes() -> None:
    """Variable-way episodes: the head is resized with ``p.data = ...`` (same Parameter objects);
    passing fast weights of the new shape must be accepted (the tree analysis is redone)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5))
    x = torch.randn(6, 3)
    for n_way in (5, 3):
        with torch.no_grad():
            model[2].weight.data = torch.randn(n_way, 4)
            model[2].bias.data = torch.zeros(n_way)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
            params = [p * 1 for p in fmodel.parameters()]
            assert fmodel(x, params=params).shape == (6, n_way)
            new = diffopt.step(fmodel(x).pow(2).mean(), params=params)
            assert [tuple(p.shape) for p in new] == [tuple(p.shape) for p in model.parameters()]
            ref = [
                p - 0.1 * g for p, g in zip(params, torch.autograd.grad(fmodel(x, params=params).pow(2).mean(), params))
            ]
            for a, b in zip(new, ref):
                torch.testing.assert_close(a, b)
