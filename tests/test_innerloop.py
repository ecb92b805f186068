"""higher.innerloop: innerloop_ctx checks its options once and picks its mode in one place."""

import pytest
import torch
from torch import nn

import higher
from higher import innerloop


def _model_and_opt():
    model = nn.Linear(3, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_the_mode_is_chosen_in_one_place():
    options = innerloop._Options(None, True, None, True, False, False, None, None)
    assert innerloop._mode_for(False, options) is innerloop._per_task
    assert innerloop._mode_for(False, options._replace(tasks=4)) is innerloop._task_batched
    assert innerloop._mode_for(True, options) is innerloop._data_parallel


@pytest.mark.parametrize("tasks", [None, 2])
def test_options_are_checked_before_the_mode_builds_anything(tasks, monkeypatch):
    model, opt = _model_and_opt()
    built = []
    monkeypatch.setattr(innerloop, "_per_task", lambda *a: built.append(a) or iter(()))
    monkeypatch.setattr(innerloop, "_task_batched", lambda *a: built.append(a) or iter(()))
    with pytest.raises(ValueError, match="track_higher_grads must be a bool"):
        with higher.innerloop_ctx(model, opt, track_higher_grads=1, tasks=tasks):  # type: ignore[arg-type]
            pass
    assert built == []


@pytest.mark.parametrize("tasks", [None, 2])
def test_each_mode_yields_an_fmodel_and_its_optimizer(tasks):
    model, opt = _model_and_opt()
    x = torch.randn(5, 3) if tasks is None else torch.randn(tasks, 5, 3)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, tasks=tasks) as (fmodel, diffopt):
        loss = fmodel(x).pow(2).flatten(1 if tasks else 0).mean(-1)
        diffopt.step(loss if tasks else loss.mean())
        assert len(list(fmodel.parameters(time=1))) == 2
    fmodel(x).sum().backward()
    assert model.weight.grad is not None
