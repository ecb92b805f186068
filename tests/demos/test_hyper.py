"""The hyperparameter experiment: batched test evaluation, the method registry, the run."""

import math

import pytest
import torch
import torch.nn.functional as F

from higher.algorithms import unrolled_validation_loss
from higher.data import SinusoidTasks, Task
from higher.demos import hyper
from higher.demos.sinusoid import sinusoid_model

from .helpers import is_png


def _problem(steps=3):
    model = sinusoid_model()
    return hyper.HyperProblem(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5), steps)


def test_batched_test_losses_equal_the_per_task_ones():
    problem = _problem()
    batch = Task(*SinusoidTasks(shots=5, query=7, seed=1).sample(4)[:4])
    a = hyper.test_losses(problem, batch, 0.02, 0.7, per_task=True)
    b = hyper.test_losses(problem, batch, 0.02, 0.7, per_task=False)
    assert len(a) == 4
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-10, atol=1e-12)


def test_unrolled_method_accumulates_the_hypergradient():
    problem = _problem()
    task = SinusoidTasks(shots=5, query=7, seed=2).sample(1).tasks()[0]
    log_lr = torch.tensor(math.log(0.01), requires_grad=True)
    logit = torch.tensor(0.0, requires_grad=True)
    loss = hyper.METHODS["unrolled"](problem, task, log_lr, logit)
    # The same loss and gradient directly from unrolled_validation_loss.
    lr2, logit2 = log_lr.detach().clone().requires_grad_(), logit.detach().clone().requires_grad_()
    expected, _ = unrolled_validation_loss(
        problem.model,
        problem.inner_opt,
        hyper.hyperparameters(lr2, logit2),
        [(task.support_x, task.support_y)] * 3,
        (task.query_x, task.query_y),
        F.mse_loss,
    )
    expected.backward()
    assert loss == pytest.approx(float(expected.detach()))
    torch.testing.assert_close(log_lr.grad, lr2.grad)
    torch.testing.assert_close(logit.grad, logit2.grad)


def test_run_learns_and_reports(tmp_path, capsys):
    out = tmp_path / "hyper.png"
    config = hyper.HyperConfig(iterations=3, inner_steps=2, test_tasks=2)
    record = hyper.run(config, torch.device("cpu"), out, progress=False)
    printed = capsys.readouterr().out
    assert "learned hyperparameters" in printed and "initial hyperparameters" in printed
    assert record["table"]["initial hyperparameters"]["lr"] == 0.001
    assert record["table"]["learned hyperparameters"]["lr"] != 0.001
    assert len(record["history"]["lr"]) == 3 and is_png(out)
