"""higher.patch's 0.2.1 names that published code imports or uses, with their 0.2.1 behaviour."""

from __future__ import annotations

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
    try:
        fmodel._fast_params = [[torch.zeros(3, 3), torch.ones(2)]]
    except ValueError as error:
        assert "shape" in str(error)
    else:
        raise AssertionError("a wrongly shaped history entry must be refused")


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
