"""MAML meta-gradients of higher against a hand-written torch.func unroll (issue 2, "Done when").

A 5-step SGD inner loop written as users write it (``innerloop_ctx``, ``copy_initial_weights=False``,
``meta_loss.backward()``) must give the meta-gradient of the same loop written with
``torch.func.functional_call`` + ``torch.autograd.grad(create_graph=True)`` (tests/reference_unroll.py)
to 1e-10 in float64, for an MLP, a conv+BatchNorm net, an LSTM and a net with tied weights; and the
hypergradient with respect to a learning-rate tensor given through ``override``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reference_unroll import (
    higher_meta_grads,
    largest_gradient,
    max_difference,
    reference_meta_grads,
    reference_unroll,
)

TOL = 1e-10
STEPS = 5


class MLP(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))


class ConvBatchNorm(nn.Module):
    """conv + BatchNorm with running statistics (updated at every inner step) + linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


class LSTMRegressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(2, 6, num_layers=2, batch_first=True)
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class TiedAutoencoder(nn.Module):
    """Embedding and output projection share one weight (as in tied language models)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 5)
        self.hidden = nn.Linear(5, 5)
        self.decode = nn.Linear(5, 7, bias=False)
        self.decode.weight = self.embed.weight

    def forward(self, tokens):
        return self.decode(torch.tanh(self.hidden(self.embed(tokens))))


def mlp_task():
    x = torch.rand(10, 1) * 6 - 3
    return (x,), torch.sin(x)


def conv_task():
    return (torch.randn(6, 1, 6, 6),), torch.randn(6, 3)


def lstm_task():
    x = torch.randn(4, 5, 2)
    return (x,), x.sum(dim=(1, 2)).unsqueeze(1)


def tied_task():
    tokens = torch.randint(0, 7, (8,))
    return (tokens,), nn.functional.one_hot(tokens, 7).double()


CASES = {
    "mlp": (MLP, mlp_task, 0.1),
    "conv_batchnorm": (ConvBatchNorm, conv_task, 0.1),
    "lstm": (LSTMRegressor, lstm_task, 0.1),
    "tied": (TiedAutoencoder, tied_task, 0.5),
}


def run_both(case: str, lr):
    factory, task, _ = CASES[case]
    model = factory()
    (support, support_target), (query, query_target) = task(), task()
    kwargs = dict(steps=STEPS, support_target=support_target, query_target=query_target, lr=lr)
    ref_loss, ref_grads = reference_meta_grads(model, support, query, **kwargs)
    loss, grads = higher_meta_grads(model, support, query, **kwargs)
    return model, (loss, grads), (ref_loss, ref_grads)


@pytest.mark.parametrize("case", list(CASES))
def test_maml_meta_gradients_match_hand_written_unroll(case):
    model, (loss, grads), (ref_loss, ref_grads) = run_both(case, lr=CASES[case][2])
    assert abs(float(loss - ref_loss)) <= TOL
    assert all(g is not None for g in grads.values())  # every parameter takes part
    assert largest_gradient(grads) > 1e-3
    assert max_difference(grads, ref_grads) <= TOL
    if case == "tied":
        assert [name for name in grads] == ["embed.weight", "hidden.weight", "hidden.bias"]
    if case == "conv_batchnorm":
        # the inner loop ran BatchNorm in train mode on the fmodel's copies of the statistics only
        assert int(model.bn.num_batches_tracked) == 0 and torch.equal(model.bn.running_mean, torch.zeros(4))


@pytest.mark.parametrize("case", list(CASES))
def test_learning_rate_hypergradient_matches_hand_written_unroll(case):
    """override={'lr': [lr_tensor]}: backward() also fills lr.grad, equal to the reference's d/d lr."""
    factory, task, value = CASES[case]
    model = factory()
    (support, support_target), (query, query_target) = task(), task()
    kwargs = dict(steps=STEPS, support_target=support_target, query_target=query_target)
    ref_lr = torch.tensor(value, requires_grad=True)
    ref_loss = reference_unroll(model, support, query, lr=ref_lr, **kwargs)
    names = [name for name, _ in model.named_parameters()]
    ref_lr_grad, *ref_param_grads = torch.autograd.grad(ref_loss, [ref_lr, *model.parameters()])
    lr = torch.tensor(value, requires_grad=True)
    loss, grads = higher_meta_grads(model, support, query, lr=lr, **kwargs)
    assert abs(float(loss - ref_loss.detach())) <= TOL
    assert max_difference(grads, dict(zip(names, ref_param_grads))) <= TOL
    assert abs(float(ref_lr_grad)) > 1e-4
    assert abs(float(lr.grad - ref_lr_grad)) <= TOL
