"""The hyperparameter experiment: batched test evaluation, the methods and their agreement, the run."""

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


def _first_hypergradients(method, steps=4):
    """The hypergradient of one outer iteration by ``method`` on a fixed problem and task."""
    torch.manual_seed(0)
    problem = _problem(steps)
    task = SinusoidTasks(shots=5, query=7, seed=2).sample(1).tasks()[0]
    log_lr = torch.tensor(math.log(0.01), requires_grad=True)
    logit = torch.tensor(0.3, requires_grad=True)
    loss = hyper.METHODS[method](problem, task, log_lr, logit)
    return loss, torch.stack([log_lr.grad, logit.grad])


def test_checkpointed_and_forward_methods_equal_the_unrolled_one():
    """float64: checkpointed is the same computation (1e-10), forward mode a different one (1e-8)."""
    loss, reference = _first_hypergradients("unrolled")
    assert reference.abs().min() > 1e-6  # both hyperparameters matter
    for method, tol in (("checkpointed", 1e-10), ("forward", 1e-8)):
        other_loss, other = _first_hypergradients(method)
        assert other_loss == pytest.approx(loss, rel=1e-12)
        torch.testing.assert_close(other, reference, rtol=tol, atol=0)


def test_implicit_is_refused_on_the_sinusoid_problem(tmp_path):
    config = hyper.HyperConfig(iterations=1, inner_steps=2, test_tasks=2, method="implicit")
    with pytest.raises(hyper.DemoError, match="--problem logreg"):
        hyper.run(config, torch.device("cpu"), tmp_path / "x.png", progress=False)


def test_run_reports_the_first_hypergradient_time_and_memory(tmp_path, capsys):
    config = hyper.HyperConfig(iterations=2, inner_steps=3, test_tasks=2, method="checkpointed")
    record = hyper.run(config, torch.device("cpu"), tmp_path / "x.png", progress=False)
    printed = capsys.readouterr().out
    first = record["hypergradient"]["first"]
    assert len(first) == 2 and all(math.isfinite(g) and g != 0 for g in first)
    assert f"d loss/d log(lr) {first[0]:.6g}" in printed and "peak memory of the process" in printed
    assert record["hypergradient"]["peak_rss_mib"] > 0 and record["hypergradient"]["seconds"] > 0
