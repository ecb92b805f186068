"""BatchNorm statistics back to the model (issue 5.2): sync_buffers_to and share_buffers."""

import copy

import torch
from torch import nn

import higher


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
