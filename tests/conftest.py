"""Shared test setup: one thread, float64 by default, fixed seeds, and the ``device`` fixture."""

import pytest
import torch

from devices import DEVICES

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _float64_and_seed():
    """Numerical tests run in float64 (as does torch.optim's scalar state then) with a fixed seed."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(params=DEVICES)
def device(request):
    """The device a test builds its model and data on (``model.to(device)``, ``torch.randn(..., device=device)``).

    Parametrized over :data:`devices.DEVICES`: ``cpu`` always and ``cuda`` where
    ``torch.cuda.is_available()``, so a test that takes it has a ``[cpu]`` and, on a GPU machine, a
    ``[cuda]`` case (``pytest -k cuda`` runs those). Only the tests whose paths differ on a GPU take
    it: per-task and task-batched meta-gradients, checkpointed (with peak CUDA memory), forward-mode
    and implicit hypergradients, autocast. Optimizer parity and the demos' ``--device`` runs
    parametrize over ``DEVICES`` themselves, to run a subset of their cases on CUDA.
    """
    return torch.device(request.param)
