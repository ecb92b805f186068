"""BatchNorm statistics back to the model (issue 5.2): sync_buffers_to and share_buffers; buffer_sync and
load_state_dict the other way; task-batched fmodels (issue 18.4)."""

import copy

import pytest
import torch
from torch import nn

import higher
from higher.patch import buffer_sync


def _model():
    return nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))


def _inner_loop(model, **options):
    torch.manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt, **options) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(fmodel(torch.randn(16, 3)).pow(2).mean())
    return fmodel


def test_fmodel_updates_its_own_statistics_and_sync_copies_them_back():
    model = _model()
    before = copy.deepcopy(model.state_dict())
    fmodel = _inner_loop(model)
    for name, value in before.items():
        if "running" in name or "num_batches" in name:
            torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0)  # untouched so far
    assert int(fmodel[1].num_batches_tracked) == 3
    fmodel.sync_buffers_to(model)
    for name, buffer in fmodel.named_buffers():
        torch.testing.assert_close(model.get_buffer(name), buffer, rtol=0, atol=0)
    assert int(model[1].num_batches_tracked) == 3
    assert model[1].running_mean.abs().sum() > 0


def test_share_buffers_updates_the_models_statistics_in_place_like_a_copy_would():
    copied_model, shared_model = _model(), None
    shared_model = copy.deepcopy(copied_model)
    fmodel = _inner_loop(copied_model)
    _inner_loop(shared_model, share_buffers=True)
    for name, buffer in fmodel.named_buffers():
        torch.testing.assert_close(shared_model.get_buffer(name), buffer, rtol=0, atol=0)
    assert int(shared_model[1].num_batches_tracked) == 3


def test_sync_buffers_to_a_different_architecture_is_refused():
    fmodel = _inner_loop(_model())
    try:
        fmodel.sync_buffers_to(nn.Sequential(nn.Linear(3, 8), nn.Linear(8, 1)))
    except KeyError as error:
        assert "do not match" in str(error)
    else:
        raise AssertionError("expected a KeyError")


# ------------------------------------------------------------------ task-batched fmodels (tasks=T)
# A task-batched fmodel holds one set of buffers per task ([T, ...]), the model one.
TASKS = 3


def _batched_inner_loop(model):
    torch.manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt, tasks=TASKS) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(fmodel(torch.randn(TASKS, 16, 3)).pow(2).flatten(1).mean(1))
    return fmodel


def test_sync_buffers_to_from_a_task_batched_fmodel_copies_the_chosen_tasks_buffers():
    model = _model()
    before = copy.deepcopy(model.state_dict())
    fmodel = _batched_inner_loop(model)
    with pytest.raises(ValueError, match=r"one set of buffers per task.*'1.running_mean' has shape \(3, 8\).*task=i"):
        fmodel.sync_buffers_to(model)
    for name, value in before.items():  # refused before anything was copied
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0)
    running_means = fmodel[1].running_mean
    assert not torch.equal(running_means[0], running_means[2])  # the tasks saw different data
    fmodel.sync_buffers_to(model, task=2)
    for name, buffer in fmodel.named_buffers():
        assert buffer.shape[0] == TASKS
        torch.testing.assert_close(model.get_buffer(name), buffer[2], rtol=0, atol=0)
    assert int(model[1].num_batches_tracked) == 3
    fmodel[1].sync_buffers_to(model[1], task=0)  # a submodule's view, into the submodule
    torch.testing.assert_close(model[1].running_mean, running_means[0], rtol=0, atol=0)


@pytest.mark.parametrize("task", [3, -1, True, 1.0, "0"])
def test_sync_buffers_to_refuses_a_task_that_is_not_one_of_the_fmodels(task):
    fmodel = _batched_inner_loop(_model())
    with pytest.raises(ValueError, match=r"task must be an int from 0 to 2"):
        fmodel.sync_buffers_to(task=task)


def test_sync_buffers_to_refuses_task_on_an_fmodel_that_is_not_task_batched():
    fmodel = _inner_loop(_model())
    with pytest.raises(ValueError, match=r"task= chooses .* task-batched"):
        fmodel.sync_buffers_to(task=0)


def test_buffer_sync_into_a_task_batched_fmodel_gives_every_task_the_models_buffers():
    model = _model()
    fmodel = _batched_inner_loop(model)
    buffer_sync(model, fmodel)
    for name, buffer in fmodel.named_buffers():
        assert buffer.shape == (TASKS, *model.get_buffer(name).shape)
        for t in range(TASKS):
            torch.testing.assert_close(buffer[t], model.get_buffer(name), rtol=0, atol=0)
        assert buffer.data_ptr() != model.get_buffer(name).data_ptr()
    assert fmodel(torch.randn(TASKS, 16, 3)).shape == (TASKS, 16, 1)  # and the fmodel runs on
    running_means = fmodel[1].running_mean
    assert not torch.equal(running_means[0], running_means[1])  # each task updated its own


def test_load_state_dict_refuses_a_buffer_of_another_shape():
    """A batched fmodel's buffers are [T, ...]: the model's state dict's buffer must be expanded first."""
    model = _model()
    fmodel = _batched_inner_loop(model)
    buffers = {k: v for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    fast = list(fmodel.parameters())
    with pytest.raises(RuntimeError, match=r"'1.running_mean'.*shape \(8,\).*\(3, 8\).*one per task"):
        fmodel.load_state_dict(buffers, strict=False)
    assert list(fmodel.parameters()) == fast
    fmodel.load_state_dict({k: v.expand(TASKS, *v.shape) for k, v in buffers.items()}, strict=False)
    torch.testing.assert_close(fmodel[1].running_mean, model[1].running_mean.expand(TASKS, 8), rtol=0, atol=0)
    assert fmodel(torch.randn(TASKS, 16, 3)).shape == (TASKS, 16, 1)
