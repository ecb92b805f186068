"""Learning SGD's learning rate and momentum by hypergradient descent: ``python -m higher demo hyper``.

Each outer iteration samples a sinusoid task, trains a fixed random initialisation of the 40-40
network with ``inner_steps`` full-batch steps of SGD with momentum on ``shots`` points, and
differentiates the loss on 100 validation points of the same task with respect to the learning
rate and the momentum (Maclaurin et al. 2015; Franceschi et al. 2017). They are learned as
``log(lr)`` and ``logit(momentum)`` with Adam, so they stay in range. Before and after, the
validation MSE on the seeded test tasks, all fine-tuned at once (task-batched) unless
``--per-task``.

How the hypergradient is computed is a :data:`METHODS` entry (``--method``): ``"unrolled"``
backpropagates through the whole unrolled loop
(:func:`higher.algorithms.unrolled_validation_loss`). A method is a function of the problem and
the two unconstrained hyperparameter tensors that accumulates their ``.grad`` and returns the
validation loss; implicit or forward-mode methods register themselves there.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import innerloop_ctx
from ..algorithms import unrolled_validation_loss
from ..data import SinusoidTasks, Task
from .common import TEST_SEED, Progress, mean_interval, pyplot, save_figure
from .sinusoid import sinusoid_model, task_mse

__all__ = ["DEFAULTS", "METHODS", "HyperConfig", "HyperProblem", "run"]

DEFAULTS: dict[str, Any] = {"iterations": 200, "shots": 20, "out": "higher-demo-hyper.png"}


@dataclass
class HyperConfig:
    """The experiment's settings."""

    iterations: int
    shots: int = 20
    inner_steps: int = 50
    query: int = 100
    initial_lr: float = 0.001
    initial_momentum: float = 0.5
    hyper_lr: float = 0.1
    test_tasks: int = 600
    method: str = "unrolled"
    per_task: bool = False
    seed: int = 0


@dataclass
class HyperProblem:
    """The inner problem: the fixed initialisation, the inner optimizer, and the number of steps."""

    model: nn.Module
    inner_opt: torch.optim.Optimizer
    steps: int


def hyperparameters(log_lr: Tensor, logit_momentum: Tensor) -> dict[str, Tensor]:
    """The inner optimizer's ``lr`` and ``momentum`` from their unconstrained parameters."""
    return {"lr": log_lr.exp(), "momentum": torch.sigmoid(logit_momentum)}


def unrolled(problem: HyperProblem, task: Task, log_lr: Tensor, logit_momentum: Tensor) -> float:
    """Reverse-mode hypergradient through every unrolled step; accumulates into ``.grad``."""
    train = [(task.support_x, task.support_y)] * problem.steps
    loss, _ = unrolled_validation_loss(
        problem.model,
        problem.inner_opt,
        hyperparameters(log_lr, logit_momentum),
        train,
        (task.query_x, task.query_y),
        F.mse_loss,
    )
    loss.backward()
    return float(loss.detach())


#: ``--method`` name -> ``method(problem, task, log_lr, logit_momentum) -> validation loss``.
METHODS: dict[str, Callable[[HyperProblem, Task, Tensor, Tensor], float]] = {"unrolled": unrolled}


def test_losses(problem: HyperProblem, batch: Task, lr: float, momentum: float, per_task: bool) -> list[float]:
    """The validation MSE of each test task after ``problem.steps`` steps with these hyperparameters."""
    device = batch.support_x.device
    override = {"lr": torch.tensor(lr, device=device), "momentum": torch.tensor(momentum, device=device)}
    if per_task:
        losses = []
        for task in (Task(*parts) for parts in zip(*batch)):
            with innerloop_ctx(problem.model, problem.inner_opt, override=override, track_higher_grads=False) as (
                fmodel,
                diffopt,
            ):
                for _ in range(problem.steps):
                    diffopt.step(F.mse_loss(fmodel(task.support_x), task.support_y))
                with torch.no_grad():
                    losses.append(float(F.mse_loss(fmodel(task.query_x), task.query_y)))
        return losses
    with innerloop_ctx(
        problem.model, problem.inner_opt, override=override, track_higher_grads=False, tasks=batch.support_x.shape[0]
    ) as (fmodel, diffopt):
        for _ in range(problem.steps):
            diffopt.step(task_mse(fmodel(batch.support_x), batch.support_y))
        with torch.no_grad():
            return task_mse(fmodel(batch.query_x), batch.query_y).tolist()


def run(config: HyperConfig, device: torch.device, out: Path, progress: bool = True) -> dict[str, Any]:
    """The whole demo; returns the record printed by ``--json``."""
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    model = sinusoid_model().to(device)
    sampler = SinusoidTasks(shots=config.shots, query=config.query, seed=config.seed)
    log_lr = torch.tensor(math.log(config.initial_lr), device=device, requires_grad=True)
    logit_momentum = torch.tensor(
        math.log(config.initial_momentum / (1 - config.initial_momentum)), device=device, requires_grad=True
    )
    hyper_opt = torch.optim.Adam([log_lr, logit_momentum], lr=config.hyper_lr)
    inner_opt = torch.optim.SGD(model.parameters(), lr=config.initial_lr, momentum=config.initial_momentum)
    problem = HyperProblem(model, inner_opt, config.inner_steps)
    method = METHODS[config.method]
    print(
        f"Hypergradient descent on SGD's lr and momentum ({config.method}): {config.inner_steps} unrolled "
        f"full-batch steps on {config.shots} points of a sinusoid task, validation on {config.query} points; "
        f"{config.iterations} outer iterations, {device}",
        flush=True,
    )
    test_batch = SinusoidTasks(shots=config.shots, query=config.query, seed=TEST_SEED).sample(config.test_tasks)
    test = Task(*(t.to(device) for t in test_batch[:4]))
    before = mean_interval(test_losses(problem, test, config.initial_lr, config.initial_momentum, config.per_task))
    history: dict[str, list[float]] = {"lr": [], "momentum": [], "validation loss": []}
    bar = Progress(config.iterations, progress, "hypergradient")
    for iteration in range(1, config.iterations + 1):
        task = Task(*(t.to(device) for t in sampler.sample(1).tasks()[0]))
        hyper_opt.zero_grad()
        history["lr"].append(log_lr.exp().item())
        history["momentum"].append(torch.sigmoid(logit_momentum).item())
        loss = method(problem, task, log_lr, logit_momentum)
        history["validation loss"].append(loss)
        hyper_opt.step()
        bar.update(iteration, loss)
    train_seconds = bar.close()
    lr, momentum = log_lr.exp().item(), torch.sigmoid(logit_momentum).item()
    tested = time.perf_counter()
    after = mean_interval(test_losses(problem, test, lr, momentum, config.per_task))
    test_seconds = time.perf_counter() - tested
    print(f"validation MSE on {config.test_tasks} test tasks after {config.inner_steps} SGD steps; mean ± 95% interval")
    print(f"{'':24}  {'lr':>8}  {'momentum':>8}  validation MSE")
    rows = {
        "initial hyperparameters": (config.initial_lr, config.initial_momentum, before),
        "learned hyperparameters": (lr, momentum, after),
    }
    for name, (lr_value, momentum_value, (mean, half)) in rows.items():
        print(f"{name:24}  {lr_value:8.5f}  {momentum_value:8.3f}  {mean:.3f} ± {half:.3f}")
    plot(out, history, config)
    total = time.perf_counter() - start
    print(f"wrote {out}  (total {total:.0f}s)", flush=True)
    return {
        "experiment": "hyper",
        "options": {**asdict(config), "device": device, "out": out},
        "table": {
            name: {"lr": lr_value, "momentum": momentum_value, "validation_mse": {"mean": mean, "ci95": half}}
            for name, (lr_value, momentum_value, (mean, half)) in rows.items()
        },
        "history": history,
        "timings": {
            "hypergradient_s": train_seconds,
            "per_iteration_ms": 1e3 * train_seconds / config.iterations if config.iterations else None,
            "test_evaluation_s": test_seconds,
            "total_s": total,
        },
    }


def plot(path: Path, history: dict[str, list[float]], config: HyperConfig) -> None:
    """The learning rate, the momentum and the validation loss against the outer iterations."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), layout="constrained")
    for ax, (name, values) in zip(axes, history.items()):
        ax.plot(range(1, len(values) + 1), values, lw=1, alpha=0.4 if name == "validation loss" else 1.0)
        ax.set_xlabel("outer iteration")
        ax.set_title(name)
    window = 20
    losses = history["validation loss"]
    running = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
        for i in range(len(losses))
    ]
    axes[2].plot(range(1, len(losses) + 1), running, color="black", label=f"mean of the last {window}")
    axes[2].set_title("validation loss (one task per iteration)")
    axes[2].legend()
    axes[0].set_yscale("log")
    if losses:
        axes[2].set_yscale("log")
    fig.suptitle(f"hypergradient descent through {config.inner_steps} unrolled SGD steps")
    save_figure(fig, path)
    plt.close(fig)
