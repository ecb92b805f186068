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
(:func:`higher.algorithms.unrolled_validation_loss`); ``"checkpointed"`` does the same through
:func:`higher.checkpointed_unroll` (memory O(sqrt T), the same numbers); ``"forward"`` carries
the tangents of the two hyperparameters forward with the loop
(:func:`higher.forward_hypergradient`: memory flat in T, one unroll per hyperparameter, about
5x the time of ``"unrolled"`` here, so its default is 50 outer iterations instead of 200). A
method is a function of the problem and the two unconstrained hyperparameter tensors that
accumulates their ``.grad`` and returns the validation loss. Every run prints the hypergradient
of its first outer iteration (with respect to ``log(lr)`` and ``logit(momentum)``), the time
spent in hypergradients and the process's peak resident memory.

``"implicit"`` has no place on this problem: the learning rate and the momentum do not enter the
inner objective, so the implicit function theorem gives a zero hypergradient for them at any
minimiser (and 50 steps of SGD on a 40-40 network reach none). ``--problem logreg`` (:func:`run_logreg`)
is the problem on which all four methods learn the same hyperparameters: hypertorch's
logistic-regression example (:func:`higher.hypergradients.logreg_hpo`), 20 per-feature L2
coefficients of a strongly convex inner problem on the data of hypertorch's notebook (its
validation loss 0.5743990 at ``lambda = 1``), where the implicit hypergradient at the end of the
inner loop agrees with the unrolled one (to 6e-7, on entries up to 0.017, after T=100 steps).
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
from ..hypergradients import hypergradient, logreg_hpo
from .common import TEST_SEED, DemoError, Progress, mean_interval, peak_rss_mib, pyplot, save_figure
from .sinusoid import sinusoid_model, task_mse

__all__ = ["DEFAULTS", "METHODS", "ALL_METHODS", "PROBLEMS", "HyperConfig", "HyperProblem", "run", "run_logreg"]

DEFAULTS: dict[str, Any] = {"iterations": 200, "shots": 20, "out": "higher-demo-hyper.png"}
#: Defaults that differ from :data:`DEFAULTS`: forward mode on the sinusoid problem (about 5x the
#: time per outer iteration of ``"unrolled"``) and the logistic-regression problem (hypertorch's T=100).
FORWARD_ITERATIONS = 50
LOGREG_DEFAULTS: dict[str, Any] = {"iterations": 10, "inner_steps": 100, "inner_lr": 0.1}
#: Every ``--method`` (``"implicit"`` on ``--problem logreg`` only) and the ``--problem`` choices.
ALL_METHODS = ("unrolled", "checkpointed", "forward", "implicit")
PROBLEMS = ("sinusoid", "logreg")


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
    problem: str = "sinusoid"


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


def _library_method(name: str) -> Callable[[HyperProblem, Task, Tensor, Tensor], float]:
    """A method by :func:`higher.hypergradients.hypergradient` (``"checkpointed"`` or ``"forward"``)."""

    def method(problem: HyperProblem, task: Task, log_lr: Tensor, logit_momentum: Tensor) -> float:
        # The MSE written out: forward mode cannot differentiate F.mse_loss forward-over-reverse.
        def inner(fmodel: Any, hyper: list[Tensor]) -> Tensor:
            return (fmodel(task.support_x) - task.support_y).pow(2).mean()

        def outer(fmodel: Any, hyper: list[Tensor]) -> Tensor:
            return (fmodel(task.query_x) - task.query_y).pow(2).mean()

        result = hypergradient(
            name,
            problem.model,
            problem.inner_opt,
            [log_lr, logit_momentum],
            inner,
            outer,
            problem.steps,
            override=lambda hyper: hyperparameters(hyper[0], hyper[1]),
        )
        for tensor, grad in zip((log_lr, logit_momentum), result.hypergradients):
            tensor.grad = grad.clone() if tensor.grad is None else tensor.grad + grad
        return result.outer_loss

    method.__name__ = method.__qualname__ = name
    method.__doc__ = f"The hypergradient by ``higher.hypergradients.hypergradient({name!r}, ...)``; into ``.grad``."
    return method


#: ``--method`` name -> ``method(problem, task, log_lr, logit_momentum) -> validation loss``.
METHODS: dict[str, Callable[[HyperProblem, Task, Tensor, Tensor], float]] = {
    "unrolled": unrolled,
    "checkpointed": _library_method("checkpointed"),
    "forward": _library_method("forward"),
}

_NO_IMPLICIT = (
    "--method implicit does not apply to the sinusoid problem: its hyperparameters (SGD's lr and momentum) do "
    "not enter the inner objective, so the implicit function theorem gives them a zero hypergradient at any "
    "minimiser, and 50 SGD steps on a 40-40 network reach none. Use --problem logreg (hypertorch's per-feature "
    "L2 coefficients, on which all four methods learn the same hyperparameters)."
)


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
    if config.problem not in PROBLEMS:
        raise DemoError(f"unknown problem {config.problem!r}; use one of {', '.join(PROBLEMS)}")
    if config.method not in ALL_METHODS:
        raise DemoError(f"unknown method {config.method!r}; use one of {', '.join(ALL_METHODS)}")
    pyplot()  # without matplotlib, say so now rather than after the whole run
    if config.problem == "logreg":
        return run_logreg(config, device, out, progress)
    if config.method not in METHODS:
        raise DemoError(_NO_IMPLICIT)
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
    first: list[float] = []
    bar = Progress(config.iterations, progress, "hypergradient")
    for iteration in range(1, config.iterations + 1):
        task = Task(*(t.to(device) for t in sampler.sample(1).tasks()[0]))
        hyper_opt.zero_grad()
        history["lr"].append(log_lr.exp().item())
        history["momentum"].append(torch.sigmoid(logit_momentum).item())
        loss = method(problem, task, log_lr, logit_momentum)
        if not first:
            first = [0.0 if t.grad is None else float(t.grad) for t in (log_lr, logit_momentum)]
        history["validation loss"].append(loss)
        hyper_opt.step()
        bar.update(iteration, loss)
    train_seconds = bar.close()
    peak = peak_rss_mib()
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
    if first:
        print(
            f"{config.method} hypergradient at the first outer iteration: d loss/d log(lr) {first[0]:.6g}, "
            f"d loss/d logit(momentum) {first[1]:.6g}"
        )
    per_iteration = f" ({1e3 * train_seconds / config.iterations:.1f} ms per outer iteration)" if first else ""
    print(f"hypergradients: {train_seconds:.2f}s{per_iteration}; peak memory of the process {peak:.0f} MiB")
    plot(out, history, config)
    total = time.perf_counter() - start
    print(f"wrote {out}  (total {total:.0f}s)", flush=True)
    return {
        "experiment": "hyper",
        "options": {**asdict(config), "device": device, "out": out},
        "hypergradient": {
            "method": config.method,
            "with_respect_to": ["log_lr", "logit_momentum"],
            "first": first,
            "seconds": train_seconds,
            "peak_rss_mib": peak,
        },
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


def run_logreg(config: HyperConfig, device: torch.device, out: Path, progress: bool = True) -> dict[str, Any]:
    """``--problem logreg``: hypertorch's per-feature L2 coefficients learned with ``config.method``.

    :func:`higher.hypergradients.logreg_hpo` in float64 on the CPU, on the data of hypertorch's
    notebook (:func:`higher.hypergradients.logreg_problem`): ``config.inner_steps`` steps of
    gradient descent (lr 0.1) on the regularised training BCE, ``config.iterations`` outer Adam
    steps (lr ``config.hyper_lr``) on ``log(lambda)``. Prints the first hypergradient (with respect
    to ``lambda``), the validation loss at ``lambda = 1`` and after the last outer step, the time
    and the peak memory. The record's ``history["validation loss"]`` has ``iterations + 1``
    entries, the validation loss after 0, 1, ..., ``iterations`` outer steps, and its
    ``options`` only the settings this problem uses (the sinusoid problem's shots, query points,
    initial lr and momentum, test tasks, per-task evaluation and seed do not apply).
    """
    if device.type != "cpu":
        raise DemoError("--problem logreg runs on the CPU in float64 (hypertorch's setup); drop --device")
    start = time.perf_counter()
    print(
        f"hypertorch's logistic regression (n=1000, d=20, 50/50 split): 20 per-feature L2 coefficients learned by "
        f"{config.method} hypergradients through {config.inner_steps} gradient-descent steps (lr "
        f"{LOGREG_DEFAULTS['inner_lr']}); {config.iterations} outer Adam steps (lr {config.hyper_lr}), float64",
        flush=True,
    )
    result = logreg_hpo(
        config.method, config.inner_steps, config.iterations, config.hyper_lr, lr=LOGREG_DEFAULTS["inner_lr"]
    )
    seconds = sum(h["seconds"] for h in result["history"])
    # The validation loss after 0, 1, ..., iterations outer steps (the last one at the learned lambda).
    losses = [h["validation_loss"] for h in result["history"]] + [result["validation_loss"]]
    first = result["first_hypergradient"]
    if first:
        shown = ", ".join(f"{g:.6g}" for g in first[:4])
        print(f"{config.method} hypergradient at the first outer iteration (d validation BCE/d lambda, 20 values):")
        print(f"  [{shown}, ...]  norm {math.sqrt(sum(g * g for g in first)):.6g}")
        per_iteration = f" ({1e3 * seconds / config.iterations:.1f} ms per outer iteration)"
    else:
        per_iteration = ""
    print(
        f"validation BCE {losses[0]:.7f} (lambda = 1) -> {losses[-1]:.7f} after {config.iterations} outer steps; "
        f"lambda from {min(result['final_lambda']):.3g} to {max(result['final_lambda']):.3g}"
    )
    print(f"hypergradients: {seconds:.2f}s{per_iteration}; peak memory of the process {result['peak_rss_mib']:.0f} MiB")
    plot_logreg(out, losses, result["final_lambda"], config)
    total = time.perf_counter() - start
    print(f"wrote {out}  (total {total:.0f}s)", flush=True)
    used = ("iterations", "inner_steps", "hyper_lr", "method", "problem")
    options = {name: getattr(config, name) for name in used}
    return {
        "experiment": "hyper",
        "options": {**options, "inner_lr": LOGREG_DEFAULTS["inner_lr"], "device": device, "out": out},
        "hypergradient": {
            "method": config.method,
            "with_respect_to": "lambda (20 per-feature L2 coefficients)",
            "first": first,
            "seconds": seconds,
            "peak_rss_mib": result["peak_rss_mib"],
        },
        "history": {"validation loss": losses, "seconds": [h["seconds"] for h in result["history"]]},
        "final_lambda": result["final_lambda"],
        "timings": {
            "hypergradient_s": seconds,
            "per_iteration_ms": 1e3 * seconds / config.iterations if config.iterations else None,
            "total_s": total,
        },
    }


def plot_logreg(path: Path, losses: list[float], final_lambda: list[float], config: HyperConfig) -> None:
    """The validation loss after each outer step (0 = ``lambda = 1``), and the learned coefficients."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    axes[0].plot(range(len(losses)), losses, marker="o")
    axes[0].set_xlabel("outer steps")
    axes[0].set_title("validation BCE after each outer step")
    axes[1].bar(range(1, len(final_lambda) + 1), final_lambda)
    axes[1].set_xlabel("feature")
    axes[1].set_title("learned L2 coefficient lambda")
    fig.suptitle(f"hypertorch's logistic regression: {config.method} hypergradients, T={config.inner_steps}")
    save_figure(fig, path)
    plt.close(fig)
