"""higher 0.2.1's importable surface resolves, with 0.2.1's behaviour.

Published code imports private names too (``higher.optim._add``, ``higher.optim._GroupedGradsType``,
``higher.utils._recursive_map``...), so every name of 0.2.1's top level, ``higher.optim`` and
``higher.utils`` is listed here, imported, and (for the helpers) checked against what 0.2.1 does
(see the interface notes, sections 2.4 and 2.5). ``diffopt.state`` has 0.2.1's layout,
``state[group_index][param_index]``, with torch.optim's key names, and can be handed back to a
torch optimizer.
"""

import collections
import copy
import importlib

import pytest
import torch
from torch import nn

import higher

TOP_LEVEL = ["innerloop_ctx", "monkeypatch", "get_diff_optim", "create_diff_optim", "register_optim"]
TOP_LEVEL_MODULES = ["patch", "optim", "utils"]
OPTIM = [
    "DifferentiableOptimizer",
    "DifferentiableSGD",
    "DifferentiableAdam",
    "DifferentiableAdamW",  # 0.2.1's repository HEAD
    "DifferentiableAdadelta",
    "DifferentiableAdagrad",
    "DifferentiableAdamax",
    "DifferentiableASGD",
    "DifferentiableRMSprop",
    "DifferentiableRprop",
    "get_diff_optim",
    "create_diff_optim",
    "register_optim",
    "get_trainable_opt_params",
    "apply_trainable_opt_params",
    "_add",
    "_addcdiv",
    "_addcmul",
    "_get_mask_closure",
    "_maybe_mask",
    "_recursive_apply",
    "_opt_mapping",
    "_OverrideType",
    "_GradCallbackType",
    "_GroupedGradsType",
    "_StateType",
]
UTILS = [
    "get_func_params",
    "flatten",
    "_copy_tensor",
    "_recursive_copy_and_cast",
    "_recursive_map",
    "_is_container",
    "_find_param_in_list",
    "_get_param_mapping",
]
# ---------------------------------------------------------------------------------------------
# higher.patch: 0.2.1's names (their behaviour: tests/test_patch_compat.py).
PATCH = [
    "make_functional",
    "monkeypatch",
    "buffer_sync",
    "_MonkeyPatchBase",
    "_make_functional",
    "_update_patched_params",
    "_patched_parameters",
    "_ParameterPlaceholder",
    "_modify_internally",
    "_internal_attrs",
    "_BufferType",
    "_EncapsulatorType",
]
# ---------------------------------------------------------------------------------------------

SURFACE = (
    [("higher", name) for name in TOP_LEVEL + TOP_LEVEL_MODULES]
    + [("higher.optim", name) for name in OPTIM]
    + [("higher.utils", name) for name in UTILS]
    + [("higher.patch", name) for name in PATCH]
)


@pytest.mark.parametrize(("module", "name"), SURFACE, ids=[f"{m}.{n}" for m, n in SURFACE])
def test_name_resolves(module, name):
    assert getattr(importlib.import_module(module), name) is not None
    exec(f"from {module} import {name}", {})


def test_top_level_all_and_reexports():
    assert "innerloop_ctx" in higher.__all__
    assert higher.monkeypatch is higher.patch.monkeypatch
    for name in ["get_diff_optim", "create_diff_optim", "register_optim"]:
        assert getattr(higher, name) is getattr(higher.optim, name)


# ------------------------------------------------------------------------------ higher.optim
def test_arithmetic_helpers_use_the_old_positional_value_convention():
    t, a, b = torch.randn(3), torch.randn(3), torch.rand(3) + 0.5
    from higher.optim import _add, _addcdiv, _addcmul

    assert torch.equal(_add(t, a), t + a)
    assert torch.allclose(_add(t, 0.5, a), t + 0.5 * a)
    assert torch.allclose(_addcmul(t, a, b), t + a * b)
    assert torch.allclose(_addcmul(t, 0.5, a, b), t + 0.5 * a * b)
    assert torch.allclose(_addcdiv(t, a, b), t + a / b)
    assert torch.allclose(_addcdiv(t, 0.5, a, b), t + 0.5 * a / b)
    leaf = t.clone().requires_grad_()
    assert _add(leaf, 0.5, a) is not leaf and leaf.grad_fn is None, "out of place"


def test_mask_closure_zeroes_masked_gradient_entries_at_every_order():
    from higher.optim import _get_mask_closure, _maybe_mask

    x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    mask = torch.tensor([True, False, True])
    y = x * 1.0
    _maybe_mask(y, mask)
    (grad,) = torch.autograd.grad((y**3).sum(), x, create_graph=True)
    assert torch.equal(grad.detach(), torch.tensor([0.0, 12.0, 0.0]))
    (second,) = torch.autograd.grad(grad.sum(), x)
    assert torch.equal(second, torch.tensor([0.0, 12.0, 0.0]))
    assert torch.equal(_get_mask_closure(mask)(torch.ones(3)), torch.tensor([0.0, 1.0, 0.0]))
    frozen = torch.ones(3)
    _maybe_mask(frozen, mask)  # no grad: nothing registered, no error
    assert not frozen._backward_hooks


def test_recursive_apply_writes_learned_values_in_the_target_form():
    from higher.optim import _recursive_apply

    target_tensor = torch.tensor(0.1)
    result = _recursive_apply(torch.tensor(0.25, requires_grad=True), target_tensor)
    assert result is target_tensor and float(target_tensor) == 0.25 and not target_tensor.requires_grad
    assert _recursive_apply(torch.tensor(0.5), 0.1) == 0.5 and type(_recursive_apply(torch.tensor(3.0), 1)) is int
    assert _recursive_apply((torch.tensor(0.8), torch.tensor(0.9)), (0.9, 0.999)) == (
        pytest.approx(0.8),
        pytest.approx(0.9),
    )
    assert _recursive_apply({"a": torch.tensor(2.0)}, {"b": 1.0}) == {"b": 2.0}
    with pytest.raises(ValueError, match="same structure"):
        _recursive_apply([torch.tensor(1.0)], 0.1)


def test_registry_and_type_aliases():
    from higher.optim import _GradCallbackType, _GroupedGradsType, _opt_mapping, _OverrideType, _StateType

    assert _opt_mapping[torch.optim.SGD] is higher.optim.DifferentiableSGD
    assert _opt_mapping[torch.optim.Adam] is higher.optim.DifferentiableAdam
    for alias in (_GradCallbackType, _GroupedGradsType, _OverrideType, _StateType):
        assert alias is not None and str(alias)


def test_custom_optimizer_written_for_0_2_1_with_the_old_helpers():
    """The README recipe of 0.2.1: subclass, port ``_update`` with ``_add``, register."""
    from higher.optim import _add, _GroupedGradsType

    class MySGD(torch.optim.SGD):
        pass

    class DifferentiableMySGD(higher.optim.DifferentiableOptimizer):
        def _update(self, grouped_grads: _GroupedGradsType, **kwargs) -> None:
            for group, grads in zip(self.param_groups, grouped_grads):
                for index, (p, g) in enumerate(zip(group["params"], grads)):
                    if g is not None:
                        group["params"][index] = _add(p, -group["lr"], g)

    higher.register_optim(MySGD, DifferentiableMySGD)
    model = nn.Linear(3, 1)
    x, y = torch.randn(5, 3), torch.randn(5, 1)
    with higher.innerloop_ctx(model, MySGD(model.parameters(), lr=0.1)) as (fmodel, diffopt):
        diffopt.step(nn.functional.mse_loss(fmodel(x), y))
    with higher.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1)) as (reference, ref_opt):
        ref_opt.step(nn.functional.mse_loss(reference(x), y))
    for a, b in zip(fmodel.parameters(), reference.parameters()):
        assert torch.allclose(a, b)


# ------------------------------------------------------------------------------ diffopt.state
def test_state_layout_is_0_2_1s_with_torch_key_names():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    opt = torch.optim.Adam([{"params": model[0].parameters()}, {"params": model[1].parameters(), "lr": 0.1}])
    x = torch.randn(6, 3)
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        diffopt.step(fmodel(x).pow(2).mean())
    assert isinstance(diffopt.state, list) and len(diffopt.state) == 2
    for group_state in diffopt.state:
        assert isinstance(group_state, collections.defaultdict)
        assert sorted(group_state) == [0, 1]
        for param_state in group_state.values():
            assert set(param_state) == {"step", "exp_avg", "exp_avg_sq"}
    # The same keys and types as torch.optim.Adam's own state.
    reference = copy.deepcopy(model)
    torch_opt = torch.optim.Adam(reference.parameters())
    reference(x).pow(2).mean().backward()
    torch_opt.step()
    theirs = torch_opt.state[reference[0].weight]
    mine = diffopt.state[0][0]
    assert {k: type(v) for k, v in theirs.items()} == {k: type(v) for k, v in mine.items()}
    assert mine["step"].dtype == theirs["step"].dtype


def test_a_step_written_against_0_2_1s_private_attributes():
    """Published code replaces ``DifferentiableOptimizer.step`` with its own, written against
    0.2.1's private attributes (``_fmodel``, ``_group_to_param_list``, ``_track_higher_grads``,
    ``_grad_callback``, ``_update``, ``param_groups[g]["params"]``); here as a subclass."""

    class OwnStep(higher.optim.DifferentiableAdam):
        def step(self, loss, params=None, override=None, grad_callback=None, **kwargs):
            if override is not None:
                self._apply_override(override)
            params = list(self._fmodel.fast_params if params is None else params)
            grads = torch.autograd.grad(loss, params, create_graph=self._track_higher_grads, allow_unused=True)
            callback = grad_callback or self._grad_callback
            if callback is not None:
                grads = callback(grads)
            grouped = []
            for group, indices in zip(self.param_groups, self._group_to_param_list):
                for i, index in enumerate(indices):
                    group["params"][i] = params[index]
                grouped.append([grads[index] for index in indices])
            self._update(grouped)
            new = params[:]
            for group, indices in zip(self.param_groups, self._group_to_param_list):
                for p, index in zip(group["params"], indices):
                    new[index] = p if self._track_higher_grads else p.detach().requires_grad_()
            self._fmodel.update_params(new)
            return new

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    x = torch.randn(8, 3)
    opt = torch.optim.Adam([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.1}])
    results = []
    for cls in (OwnStep, higher.optim.DifferentiableAdam):
        fmodel = higher.monkeypatch(model, copy_initial_weights=False)
        diffopt = cls(opt, model.parameters(), fmodel=fmodel, grad_callback=lambda gs: [g * 0.5 for g in gs])
        for _ in range(3):
            diffopt.step(fmodel(x).pow(2).mean())
        meta = fmodel(x).pow(2).mean()
        results.append((list(fmodel.parameters()), torch.autograd.grad(meta, list(model.parameters()))))
        diffopt._track_higher_grads = False  # written directly, as 0.2.1 code does: the next step cuts the graph
        assert all(p.is_leaf for p in diffopt.step(fmodel(x).pow(2).mean()))
    for ours, theirs in zip(*results):
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b)
