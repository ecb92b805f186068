"""higher.patch's 0.2.1 names that published code imports or uses, with their 0.2.1 behaviour."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import higher
from higher import patch


def test_monkey_patch_base_tells_an_fmodel_from_a_plain_module():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    fmodel = higher.monkeypatch(model)
    assert isinstance(fmodel, patch._MonkeyPatchBase) and isinstance(fmodel[0], patch._MonkeyPatchBase)
    assert not isinstance(model, patch._MonkeyPatchBase)
    # the 0.2.1 idiom: pass params only when the module is patched
    x = torch.randn(2, 3)
    params = [p * 2 for p in fmodel.parameters()]
    out = fmodel(x, params=params) if isinstance(fmodel, patch._MonkeyPatchBase) else model(x)
    assert torch.equal(out, torch.func.functional_call(model, dict(zip(dict(model.named_parameters()), params)), x))


def test_internal_attrs_and_placeholders():
    assert {"_parameters", "_buffers", "_modules", "_forward_hooks"} <= patch._internal_attrs
    assert repr(patch._ParameterPlaceholder("weight")) == 'Parameter placeholder ("weight")'
    assert patch._ParameterPlaceholder.__name__ == patch._ParameterPlaceholder.__qualname__ == "ParameterPlaceholder"


def test_assigning_fast_params_replaces_the_history():
    model = nn.Linear(3, 2)
    fmodel = higher.monkeypatch(model)
    x = torch.randn(4, 3)
    new = [torch.zeros(2, 3), torch.ones(2)]
    fmodel._fast_params = []  # 0.2.1 code clears the history, then sets new weights
    assert fmodel.fast_params is None
    fmodel.update_params(new)
    assert len(fmodel._fast_params) == 1 and torch.equal(fmodel(x), torch.ones(4, 2))
    fmodel._fast_params = [new, [p + 1 for p in new]]
    assert torch.equal(fmodel.parameters(time=0).__next__(), new[0])
    assert torch.equal(fmodel(x), F.linear(x, new[0] + 1, new[1] + 1))
    # Stored as 0.2.1 stored it; checked where it is used (the call), not at the write.
    fmodel._fast_params = [[torch.zeros(3, 3), torch.ones(2)]]
    with pytest.raises(ValueError, match=r"_fast_params\[-1\].*'weight' has shape \(3, 3\)"):
        fmodel(x)


def test_patched_parameters_modify_internally_and_make_functional():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    fmodel = higher.monkeypatch(model)
    assert [a is b for a, b in zip(patch._patched_parameters(fmodel, time=0), fmodel.parameters(time=0))] == [True] * 4
    with patch._modify_internally(fmodel):
        fmodel[0].bias = torch.zeros(4)
    assert torch.equal(fmodel[0].bias, torch.zeros(4))
    params = [torch.randn_like(p) for p in model.parameters()]
    offset, fmodule, cls = patch._make_functional(model, [params], 0)
    assert offset == 4 and cls is type(fmodule) and fmodule.fast_params == params
    assert patch._update_patched_params(fmodule, [[None, *params]], 1) == 5
    assert all(a is b for a, b in zip(fmodule.fast_params, params))


# ------------------------------------------------------------------ higher.patch._internal_attrs
INTERNAL_ATTRS_0_2_1 = {
    "_backend",
    "_parameters",
    "_buffers",
    "_backward_hooks",
    "_forward_hooks",
    "_forward_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
    "_modules",
}


@pytest.fixture
def internal_attrs():
    """``higher.patch._internal_attrs``, put back as it was after the test."""
    saved = set(patch._internal_attrs)
    yield patch._internal_attrs
    patch._internal_attrs.clear()
    patch._internal_attrs.update(saved)


def test_internal_attrs_is_0_2_1s_mutable_set(internal_attrs):
    assert type(internal_attrs) is set and internal_attrs == INTERNAL_ATTRS_0_2_1
    # Published code (DoubleAdapt) does this at import so that 0.2.1 runs the model's forward
    # pre-hooks in the patched model; here they run anyway.
    if "_forward_pre_hooks" in patch._internal_attrs:
        patch._internal_attrs.remove("_forward_pre_hooks")
    model = nn.Linear(3, 2)
    model.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    fmodel = higher.monkeypatch(model)
    x = torch.randn(4, 3)
    assert torch.allclose(fmodel(x), F.linear(2 * x, model.weight, model.bias))


class _Scaled(nn.Module):
    scale = 1.0  # the class's; each instance sets its own

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.scale = 3.0

    def forward(self, x):
        return self.lin(x) * self.scale


def test_a_name_added_to_internal_attrs_is_left_out_of_later_fmodels(internal_attrs):
    model = _Scaled()
    x = torch.randn(4, 3)
    before = higher.monkeypatch(model)
    internal_attrs.add("scale")  # 0.2.1 then did not copy the attribute onto patched modules
    after = higher.monkeypatch(model)
    assert torch.allclose(before(x), model(x))  # made before the edit: unchanged
    assert after.scale == 1.0 and torch.allclose(after(x), model.lin(x))  # the class attribute
    after.scale = 5.0  # set on the fmodel (0.2.1: on the patched module), which its forward reads
    assert torch.allclose(after(x), model.lin(x) * 5.0) and model.scale == 3.0
    internal_attrs.discard("scale")
    assert torch.allclose(higher.monkeypatch(model)(x), model(x))

    # One of nn.Module's own attributes: a fresh module's (here: no backward pre-hooks).
    calls = []
    model = nn.Linear(3, 2)
    model.register_full_backward_pre_hook(lambda module, grad_output: calls.append(module))
    x = x.requires_grad_()
    internal_attrs.add("_backward_pre_hooks")
    higher.monkeypatch(model)(x).sum().backward()
    assert calls == []
    internal_attrs.discard("_backward_pre_hooks")
    higher.monkeypatch(model)(x).sum().backward()
    assert len(calls) == 1


# ------------------------------------------------------------------ the fast-weight history
def test_history_placeholder_after_make_functional_is_filled_by_the_calls():
    """Published code (PLATIPUS, few_shot_meta_learning): ``make_functional(module=...)``, then
    ``track_higher_grads = False`` and ``_fast_params = [[]]``; each call's ``params=`` then
    replaces the one entry."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    f_net = patch.make_functional(module=model)
    f_net.track_higher_grads = False
    f_net._fast_params = [[]]
    assert f_net._fast_params == [[]] and f_net.fast_params == [] and list(f_net.parameters()) == []
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match="has 0 tensors but the module has 4 parameters"):
        f_net(x)  # checked where it is used
    with pytest.raises(ValueError, match="has 0 tensors but the module has 4 parameters"):
        _ = f_net[0].weight
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    for _ in range(2):
        grads = torch.autograd.grad(f_net(x, params=params).pow(2).sum(), params, create_graph=True)
        params = [p - 0.1 * g for p, g in zip(params, grads)]
    out = f_net(x, params=params)
    assert len(f_net._fast_params) == 1 and all(a is b for a, b in zip(f_net.fast_params, params))
    names = [name for name, _ in model.named_parameters()]
    assert torch.allclose(out, torch.func.functional_call(model, dict(zip(names, params)), x))

    # Tracking: a set appends after the placeholder, as in 0.2.1.
    f_net = patch.make_functional(model)
    f_net._fast_params = [[]]
    f_net.fast_params = params
    assert len(f_net._fast_params) == 2 and list(f_net.parameters(time=0)) == []
    f_net._fast_params = None  # 0.2.1's state before any fast weights
    assert f_net.fast_params is None

    # What works on any fmodel works on one holding the placeholder (e.g. a module holding it is moved).
    f_net._fast_params = [[]]
    f_net.float().detach_()
    f_net.load_state_dict(model.state_dict())
    assert torch.equal(f_net(x), model(x)) and all(p.requires_grad for p in f_net.parameters())


def test_writing_into_fast_params_replaces_the_latest_fast_weight():
    """0.2.1's ``fast_params`` was the latest history entry itself: ``fmodel.fast_params[i] = t``
    changed the fast weight that the next call and the next step use, without a history entry."""
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    with higher.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1)) as (fmodel, diffopt):
        diffopt.step(fmodel(x).pow(2).mean())
        assert fmodel.fast_params is fmodel._fast_params[-1]
        weight, bias = fmodel.fast_params[0], torch.zeros(2, requires_grad=True)
        fmodel.fast_params[1] = bias
        assert len(fmodel._fast_params) == 2 and list(fmodel.parameters())[1] is bias
        assert torch.equal(fmodel(x), F.linear(x, weight, bias))
        diffopt.step(fmodel(x).pow(2).mean())  # steps from the new bias
        grads = torch.autograd.grad(F.linear(x, weight, bias).pow(2).mean(), [weight, bias])
        for new, old, grad in zip(fmodel.parameters(), [weight, bias], grads):
            assert torch.allclose(new, old - 0.1 * grad)
        # A list kept across calls still writes through.
        latest = fmodel.fast_params
        fmodel(x)
        latest[1] = torch.ones(2)
        assert torch.equal(fmodel(x), F.linear(x, latest[0], torch.ones(2)))
        fmodel.fast_params[0] = torch.zeros(5)
        with pytest.raises(ValueError, match=r"'weight' has shape \(5,\)"):
            fmodel(x)


def test_the_list_a_step_returns_is_the_callers():
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    with higher.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1)) as (fmodel, diffopt):
        new = diffopt.step(fmodel(x).pow(2).mean())
        kept = list(fmodel.parameters())
        new[0] = torch.zeros(2, 3)  # 0.2.1's fmodel kept a copy: this changes nothing
        assert all(a is b for a, b in zip(fmodel.parameters(), kept))
        assert torch.equal(fmodel(x), F.linear(x, kept[0], kept[1]))


def test_writes_inside_modify_internally_record_no_history_entry():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    fmodel = higher.monkeypatch(model)
    assert fmodel[0]._being_modified_internally is False
    with patch._modify_internally(fmodel[0]):
        assert fmodel[0]._being_modified_internally is True
        fmodel[0].bias = torch.zeros(4)
    assert fmodel[0]._being_modified_internally is False
    assert len(fmodel._fast_params) == 1 and torch.equal(fmodel.fast_params[1], torch.zeros(4))
    x = torch.randn(2, 3)
    assert torch.equal(fmodel(x), fmodel[1](F.linear(x, fmodel[0].weight, torch.zeros(4))))
    fmodel[0].bias = torch.ones(4)  # outside: a new fast weight, one history entry
    assert len(fmodel._fast_params) == 2


# ------------------------------------------------------------------ 0.2.1's attributes of patched modules
class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 3)
        self.out = nn.Linear(3, 3)
        self.out.weight = self.embed.weight

    def forward(self, x):
        return self.out(torch.tanh(self.embed(x)))


def test_patched_module_attributes_of_0_2_1():
    model = _Tied()
    fmodel = higher.monkeypatch(model)
    x = torch.randn(4, 3)
    assert fmodel.is_root is True and fmodel.embed.is_root is False
    assert fmodel.root is fmodel and fmodel.embed.root is fmodel
    assert fmodel._root_ref is None and fmodel.out._root_ref() is fmodel
    assert fmodel.direct_submodule_call is True and fmodel.out.direct_submodule_call is True
    assert fmodel._param_mapping == higher.utils._get_param_mapping(model, [], []) == [0, 1, 0, 2]
    assert fmodel.out._param_mapping == []
    params = fmodel.fast_params
    assert [p is q for p, q in zip(fmodel._expand_params(params), [params[i] for i in (0, 1, 0, 2)])] == [True] * 4
    assert fmodel._wrapped_name == "_Tied" and fmodel.out._wrapped_name == "Linear"
    assert fmodel._param_names == [] and fmodel.out._param_names == ["weight", "bias"]
    assert [p is q for p, q in zip(fmodel._original_params, model.parameters())] == [True] * 3
    assert torch.equal(fmodel.boxed_forward(x), fmodel(x))
    new = [p * 2 for p in params]
    fmodel._refill_params_box(new)
    assert len(fmodel._fast_params) == 2 and all(a is b for a, b in zip(fmodel.fast_params, new))
    fmodel._refill_params_box(None)
    assert len(fmodel._fast_params) == 2
    with pytest.raises(ValueError, match="params keyword must be provided"):
        patch.make_functional(model)._refill_params_box(None)
    fmodel._track_higher_grads = False  # the attribute behind the property
    assert fmodel.track_higher_grads is False and fmodel._track_higher_grads is False
    with pytest.raises(AttributeError, match="_param_mapping cannot be assigned"):
        fmodel._param_mapping = [0, 1, 2, 3]


class _TreeNode(nn.Module):
    def __init__(self):
        super().__init__()
        self.root = nn.Linear(2, 2)  # a submodule named like 0.2.1's attribute
        self.is_root = "yes"

    @property
    def direct_submodule_call(self):
        return "mine"

    def forward(self, x):
        return self.root(x)


def test_the_users_attribute_wins_over_0_2_1s():
    fmodel = higher.monkeypatch(_TreeNode())
    assert fmodel.root is fmodel._modules["root"] and fmodel.root is not fmodel
    assert fmodel.is_root == "yes" and fmodel.direct_submodule_call == "mine"
    assert fmodel.root.root is fmodel and fmodel.root.is_root is False  # the Linear has none of its own


def test_update_patched_params_takes_0_2_1s_expanded_list():
    model = _Tied()
    fmodel = higher.monkeypatch(model)
    params = [torch.randn_like(p) for p in model.parameters()]
    # 0.2.1's update_params: set the fast weights, then write the expanded list into the slots.
    fmodel.fast_params = params
    assert patch._update_patched_params(fmodel, [fmodel._expand_params(params)], 0) == 4
    assert len(fmodel._fast_params) == 2  # the same tensors: nothing more recorded
    offset, fmodule, _ = patch._make_functional(model, [fmodel._expand_params(params)], 0)
    assert offset == 4 and all(a is b for a, b in zip(fmodule.fast_params, params))
    with pytest.raises(ValueError, match="tied"):
        patch._update_patched_params(fmodel, [[params[0], params[1], torch.zeros(3, 3), params[2]]], 0)


def test_flatten_parameters_does_nothing_on_the_fmodels_rnns(monkeypatch):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(3, 4, batch_first=True)

        def forward(self, x):
            self.rnn.flatten_parameters()  # common in RNN code; 0.2.1 made it a no-op
            return self.rnn(x)[0]

    model = Net()
    calls = []
    flatten = nn.RNNBase.flatten_parameters
    monkeypatch.setattr(nn.RNNBase, "flatten_parameters", lambda self: calls.append(self) or flatten(self))
    fmodel = higher.monkeypatch(model)
    x = torch.randn(2, 5, 3)
    out = fmodel(x)
    fmodel.rnn.flatten_parameters()
    assert calls == []
    assert torch.allclose(out, model(x)) and len(calls) == 1  # the model's own still flattens
