"""The command line: ``python -m higher demo`` (also installed as the ``higher`` command).

* ``higher demo`` -- MAML on sinusoid regression with the setup of Finn et al. (2017): a 40-40
  ReLU network, K=10 support points, one inner SGD step with learning rate 0.01 in training,
  25 tasks per meta-batch, Adam with meta learning rate 0.001. Then 600 seeded test tasks:
  the MSE with a 95% interval after 0, 1 and 10 inner steps, for MAML and for a pretrained
  baseline (one network trained on all tasks jointly, fine-tuned the same way), and a PNG with
  test tasks (as the paper's Figure 2) and the MSE against the number of steps.
* ``higher demo digits`` -- few-shot classification on scikit-learn's bundled digits, with
  disjoint meta-train and meta-test classes: accuracy after adaptation, MAML against a
  pretrained baseline.
* ``higher demo hyper`` -- learning the inner loop's learning rate and momentum by
  hypergradient descent; a PNG with their trajectories.

Plots need matplotlib and the progress bar uses tqdm when present (``pip install 'higher[demo]'``);
the digits need scikit-learn. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import __version__, innerloop_ctx
from .algorithms import adaptation_losses, maml_step, unrolled_validation_loss
from .data import DigitsTasks, SinusoidTasks

__all__ = ["main", "build_parser"]

# Defaults of each experiment for the options shared by all of them.
DEFAULTS: dict[str, dict[str, Any]] = {
    # Measured on the 2-core development machine, one thread: 16.3 ms per iteration, so 16000
    # iterations take about 4.4 minutes, and `make demo` on a fresh clone (install included)
    # about 5 (see docs/reference-run.md).
    "sinusoid": {"iterations": 16000, "shots": 10, "out": "higher-demo.png"},
    "digits": {"iterations": 1500, "shots": 1, "out": "higher-demo-digits.png"},
    "hyper": {"iterations": 200, "shots": 20, "out": "higher-demo-hyper.png"},
}
TEST_SEED = 2017  # the test tasks are the same whatever --seed is, so that tables compare


class CliError(Exception):
    """A bad option or environment: printed as ``higher: error: ...`` with exit status 2."""


# ------------------------------------------------------------------------------------ options
def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("device 'cuda' requested but torch.cuda.is_available() is False; use cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"device {text!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError("device 'mps' requested but it is not available; use cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}; use cpu, cuda, cuda:N or mps")
    return device


def _png_path(text: str) -> Path:
    path = Path(text)
    if path.suffix.lower() != ".png":
        raise argparse.ArgumentTypeError(f"--out must be a .png file, got {text!r}")
    if path.exists() and path.is_dir():
        raise argparse.ArgumentTypeError(f"--out {text!r} is a directory; give a file name ending in .png")
    return path


def _add_common_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """The options of every experiment. In the subcommands they default to "not given"."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--iterations", type=_non_negative_int, default=default(None), help="meta-training iterations (0: none)"
    )
    parser.add_argument(
        "--shots", type=_positive_int, default=default(None), help="K, support examples per task (per class)"
    )
    parser.add_argument("--out", type=_png_path, default=default(None), help="where to write the PNG")
    parser.add_argument("--seed", type=int, default=default(0), help="seed of the initialisation and training tasks")
    parser.add_argument("--device", type=_device, default=default(torch.device("cpu")), help="cpu, cuda, cuda:N or mps")
    parser.add_argument(
        "--test-tasks", type=_positive_int, default=default(600), help="number of seeded test tasks (default 600)"
    )
    parser.add_argument(
        "--threads", type=_positive_int, default=default(1), help="torch CPU threads (default 1: fastest for this size)"
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        default=default(False),
        help="no progress bar: print a line every 10%% of the iterations instead",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``higher`` command."""
    parser = argparse.ArgumentParser(prog="higher", description="higher: differentiate through optimization loops.")
    parser.add_argument("--version", action="version", version=f"higher {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    demo = commands.add_parser(
        "demo",
        help="meta-learning demos (default: MAML on sinusoid regression)",
        description=(
            "MAML on sinusoid regression (Finn et al. 2017) by default; 'digits' and 'hyper' run the other "
            "demos. Defaults: sinusoid 16000 iterations, K=10; digits 1500 iterations, 5-way 1-shot; "
            "hyper 200 iterations, 20 points."
        ),
    )
    _add_common_options(demo, suppress=False)
    experiments = demo.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    sinusoid = experiments.add_parser("sinusoid", help="MAML on sinusoid regression (the default)")
    _add_common_options(sinusoid, suppress=True)
    sinusoid.add_argument("--first-order", action="store_true", help="first-order MAML instead of second order")
    digits = experiments.add_parser("digits", help="few-shot classification of sklearn's digits, MAML vs baseline")
    _add_common_options(digits, suppress=True)
    digits.add_argument("--ways", type=_positive_int, default=5, help="classes per task (default 5)")
    hyper = experiments.add_parser("hyper", help="learn the inner learning rate and momentum by hypergradient")
    _add_common_options(hyper, suppress=True)
    hyper.add_argument("--inner-steps", type=_positive_int, default=50, help="unrolled SGD steps (default 50)")
    return parser


# ------------------------------------------------------------------------------------ helpers
def _progress(iterations: int, enabled: bool, label: str) -> _Progress:
    return _Progress(iterations, enabled, label)


class _Progress:
    """A tqdm progress bar with the running meta-loss; plain lines (every 10%) without tqdm or when disabled."""

    def __init__(self, total: int, enabled: bool, label: str) -> None:
        self.total, self.enabled, self.label = total, enabled, label
        self.running: float | None = None
        self.bar = None
        self.start = time.perf_counter()
        self.next_line = 0
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                print(f"{label}: {total} iterations (install tqdm, or 'higher[demo]', for a progress bar)")
            else:
                self.bar = tqdm(total=total, desc=label, unit="it", dynamic_ncols=True, mininterval=0.5)

    def update(self, iteration: int, loss: float) -> None:
        self.running = loss if self.running is None else 0.98 * self.running + 0.02 * loss
        if self.bar is not None:
            self.bar.update(1)
            if iteration % 20 == 0 or iteration == self.total:
                self.bar.set_postfix(meta_loss=f"{self.running:.3f}", refresh=False)
        elif iteration >= self.next_line or iteration == self.total:
            elapsed = time.perf_counter() - self.start
            print(
                f"{self.label}: {iteration}/{self.total}  running meta-loss {self.running:.3f}  {elapsed:.0f}s",
                flush=True,
            )
            self.next_line = iteration + max(1, self.total // 10)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _mean_interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% confidence interval (normal approximation)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, 1.96 * math.sqrt(variance / n)


def _format_table(
    title: str, columns: Sequence[str], rows: dict[str, Sequence[tuple[float, float]]], digits: int
) -> str:
    cells = {name: [f"{m:.{digits}f} ± {h:.{digits}f}" for m, h in values] for name, values in rows.items()}
    width = max(len(c) for c in columns + [c for row in cells.values() for c in row])
    name_width = max(len("method"), *(len(n) for n in rows))
    lines = [title, "  ".join(["method".ljust(name_width)] + [c.rjust(width) for c in columns])]
    for name, row in cells.items():
        lines.append("  ".join([name.ljust(name_width)] + [c.rjust(width) for c in row]))
    return "\n".join(lines)


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise CliError("the plot needs matplotlib: pip install 'higher[demo]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _steps_label(step: int) -> str:
    return f"{step} step" + ("" if step == 1 else "s")


# ------------------------------------------------------------------------------------ sinusoid
def sinusoid_model() -> nn.Module:
    """The network of Finn et al. (2017) for regression: two hidden layers of 40 ReLU units."""
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))


@dataclass
class SinusoidConfig:
    iterations: int
    shots: int = 10
    meta_batch: int = 25
    inner_lr: float = 0.01
    inner_steps: int = 1
    meta_lr: float = 1e-3
    eval_steps: int = 10
    test_tasks: int = 600
    test_query: int = 100
    first_order: bool = False
    seed: int = 0


def train_maml_sinusoid(config: SinusoidConfig, device: torch.device, progress: bool) -> nn.Module:
    """Meta-train the initial weights with MAML (second order unless ``first_order``)."""
    torch.manual_seed(config.seed)
    model = sinusoid_model().to(device)
    sampler = SinusoidTasks(shots=config.shots, seed=config.seed)
    meta_opt = torch.optim.Adam(model.parameters(), lr=config.meta_lr)
    inner_opt = torch.optim.SGD(model.parameters(), lr=config.inner_lr)
    bar = _progress(config.iterations, progress, "MAML" if not config.first_order else "first-order MAML")
    for iteration in range(1, config.iterations + 1):
        tasks = sampler.sample(config.meta_batch).to(device).tasks()
        meta_opt.zero_grad()
        loss = maml_step(model, inner_opt, tasks, F.mse_loss, config.inner_steps, first_order=config.first_order)
        meta_opt.step()
        bar.update(iteration, loss)
    bar.close()
    return model


def train_pretrained_sinusoid(config: SinusoidConfig, device: torch.device) -> nn.Module:
    """The baseline: one network fit to the points of all training tasks jointly (plain regression)."""
    torch.manual_seed(config.seed + 1)
    model = sinusoid_model().to(device)
    sampler = SinusoidTasks(shots=config.shots, seed=config.seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=config.meta_lr)
    for _ in range(config.iterations):
        batch = sampler.sample(config.meta_batch).to(device)
        x = torch.cat([batch.support_x, batch.query_x], dim=1)
        y = torch.cat([batch.support_y, batch.query_y], dim=1)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    return model


def evaluate_sinusoid(
    model: nn.Module, config: SinusoidConfig, device: torch.device, plot_tasks: int = 3
) -> tuple[list[list[float]], dict[str, Any]]:
    """Fine-tune on each test task's K points with SGD(lr=inner_lr); MSE on its query points per step.

    Returns the per-task MSE after 0..eval_steps steps, and the predictions on a grid for the
    first ``plot_tasks`` tasks after 0, 1 and eval_steps steps.
    """
    sampler = SinusoidTasks(shots=config.shots, query=config.test_query, seed=TEST_SEED)
    batch = sampler.sample(config.test_tasks).to(device)
    inner_opt = torch.optim.SGD(model.parameters(), lr=config.inner_lr)
    grid = torch.linspace(-5, 5, 200, device=device).reshape(-1, 1)
    shown_steps = sorted({0, 1, config.eval_steps})
    curves: list[list[float]] = []
    predictions: dict[str, Any] = {"grid": grid.cpu(), "tasks": []}
    for index, (support_x, support_y, query_x, query_y) in enumerate(batch.tasks()):
        if index >= plot_tasks:
            curves.append(
                adaptation_losses(
                    model, inner_opt, (support_x, support_y, query_x, query_y), F.mse_loss, config.eval_steps
                )
            )
            continue
        with innerloop_ctx(model, inner_opt, track_higher_grads=False) as (fmodel, diffopt):
            mse, shown = [], {}
            for step in range(config.eval_steps + 1):
                with torch.no_grad():
                    mse.append(float(F.mse_loss(fmodel(query_x), query_y)))
                    if step in shown_steps:
                        shown[step] = fmodel(grid).squeeze(-1).cpu()
                if step < config.eval_steps:
                    diffopt.step(F.mse_loss(fmodel(support_x), support_y))
        curves.append(mse)
        amplitude, phase = batch.amplitude[index], batch.phase[index]
        predictions["tasks"].append(
            {
                "support_x": support_x.squeeze(-1).cpu(),
                "support_y": support_y.squeeze(-1).cpu(),
                "true": SinusoidTasks.curve(grid.unsqueeze(0), amplitude.reshape(1), phase.reshape(1))[0]
                .squeeze(-1)
                .cpu(),
                "predictions": shown,
            }
        )
    return curves, predictions


def sinusoid_table(results: dict[str, list[list[float]]], config: SinusoidConfig) -> str:
    steps = sorted({0, 1, config.eval_steps})
    rows = {name: [_mean_interval([c[s] for c in curves]) for s in steps] for name, curves in results.items()}
    title = (
        f"MSE on {config.test_tasks} test tasks after fine-tuning on K={config.shots} points with SGD "
        f"(lr {config.inner_lr}); mean ± 95% interval"
    )
    return _format_table(title, [_steps_label(s) for s in steps], rows, digits=3)


def plot_sinusoid(
    path: Path, results: dict[str, list[list[float]]], shown: dict[str, dict[str, Any]], config: SinusoidConfig
) -> None:
    plt = _pyplot()
    names = list(results)
    num_tasks = len(shown[names[0]]["tasks"])
    fig = plt.figure(figsize=(4 * (num_tasks + 1), 3.3 * len(names)), layout="constrained")
    grid_spec = fig.add_gridspec(len(names), num_tasks + 1)
    colors = {0: "tab:red", 1: "tab:olive", config.eval_steps: "tab:green"}
    for row, name in enumerate(names):
        grid = shown[name]["grid"].squeeze(-1)
        for col, task in enumerate(shown[name]["tasks"]):
            ax = fig.add_subplot(grid_spec[row, col])
            ax.plot(grid, task["true"], color="black", lw=2, label="true function")
            for step, prediction in task["predictions"].items():
                ax.plot(
                    grid, prediction, color=colors.get(step, "tab:blue"), ls="--", label=f"after {_steps_label(step)}"
                )
            ax.scatter(
                task["support_x"],
                task["support_y"],
                color="tab:purple",
                marker="^",
                zorder=3,
                label=f"{config.shots} support points",
            )
            ax.set_title(f"{name}, test task {col + 1}")
            ax.set_ylim(-6, 6)
            if row == 0 and col == 0:
                ax.legend(fontsize=7, loc="lower left")
    ax = fig.add_subplot(grid_spec[:, num_tasks])
    steps = list(range(config.eval_steps + 1))
    for name, curves in results.items():
        stats = [_mean_interval([c[s] for c in curves]) for s in steps]
        means = [m for m, _ in stats]
        line = ax.plot(steps, means, marker="o", label=name)[0]
        low = [m - h for m, h in stats]
        high = [m + h for m, h in stats]
        ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.25, lw=0)
    ax.set_xlabel("inner SGD steps at test time")
    ax.set_ylabel(f"mean MSE on {config.test_tasks} test tasks (band: 95% interval)")
    ax.set_title(f"K={config.shots}: MSE against steps")
    ax.set_yscale("log")
    ax.legend()
    _save(fig, path)
    plt.close(fig)


def run_sinusoid(args: argparse.Namespace, config: SinusoidConfig) -> dict[str, list[list[float]]]:
    device = args.device
    start = time.perf_counter()
    method = "first-order MAML" if config.first_order else "MAML"
    print(
        f"{method} on sinusoid regression (Finn et al. 2017): 40-40 ReLU MLP, K={config.shots}, "
        f"{config.inner_steps} inner SGD step (lr {config.inner_lr}), meta-batch {config.meta_batch}, "
        f"Adam (lr {config.meta_lr}), {config.iterations} iterations, seed {config.seed}, {device}",
        flush=True,
    )
    maml = train_maml_sinusoid(config, device, progress=not args.no_progress)
    trained = time.perf_counter()
    print(f"meta-training took {trained - start:.0f}s; training the pretrained baseline...", flush=True)
    pretrained = train_pretrained_sinusoid(config, device)
    results, shown = {}, {}
    for name, model in ((method, maml), ("pretrained", pretrained)):
        results[name], shown[name] = evaluate_sinusoid(model, config, device)
    print(sinusoid_table(results, config))
    plot_sinusoid(args.out, results, shown, config)
    print(f"wrote {args.out}  (total {time.perf_counter() - start:.0f}s)")
    return results


# ------------------------------------------------------------------------------------ digits
def digits_model(ways: int, hidden: int = 64) -> nn.Module:
    """A small MLP over the 64 pixels, ending in ``ways`` logits."""
    return nn.Sequential(
        nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, ways)
    )


def _accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    return (logits.argmax(-1) == labels).double().mean()


def run_digits(args: argparse.Namespace) -> dict[str, list[list[float]]]:
    """MAML against a pretrained baseline on few-shot digits classification (disjoint classes)."""
    device, ways, shots, iterations = args.device, args.ways, args.shots, args.iterations
    inner_lr, train_steps, eval_steps, meta_batch = 0.4, 5, 10, 10
    start = time.perf_counter()
    try:
        train_tasks = DigitsTasks("train", ways=ways, shots=shots, query=15, seed=args.seed)
        test_tasks = DigitsTasks("test", ways=ways, shots=shots, query=15, seed=TEST_SEED)
    except ValueError as error:
        raise CliError(f"{error} (options --ways/--shots)") from None
    print(
        f"MAML, {ways}-way {shots}-shot digits (sklearn, rotations as classes): meta-train classes "
        f"{len(train_tasks.classes)} (digits 0-4), meta-test classes {len(test_tasks.classes)} (digits 5-8); "
        f"{train_steps} inner SGD steps (lr {inner_lr}), meta-batch {meta_batch}, {iterations} iterations, {device}",
        flush=True,
    )
    torch.manual_seed(args.seed)
    maml = digits_model(ways).to(device)
    meta_opt = torch.optim.Adam(maml.parameters(), lr=1e-3)
    inner_opt = torch.optim.SGD(maml.parameters(), lr=inner_lr)
    bar = _progress(iterations, not args.no_progress, "MAML digits")
    for iteration in range(1, iterations + 1):
        tasks = [[t.to(device) for t in train_tasks.sample()] for _ in range(meta_batch)]
        meta_opt.zero_grad()
        loss = maml_step(maml, inner_opt, tasks, F.cross_entropy, train_steps)
        meta_opt.step()
        bar.update(iteration, loss)
    bar.close()

    # Baseline: a classifier of all meta-train classes, trained jointly; for a test task its body
    # is kept and a new zero-initialised head of `ways` outputs is fine-tuned with the whole net.
    torch.manual_seed(args.seed + 1)
    num_classes = len(train_tasks.classes)
    pretrained = digits_model(num_classes).to(device)
    opt = torch.optim.Adam(pretrained.parameters(), lr=1e-3)
    images = torch.cat(train_tasks.images_by_class).to(device)
    labels = torch.cat([torch.full((len(x),), i) for i, x in enumerate(train_tasks.images_by_class)]).to(device)
    generator = torch.Generator().manual_seed(args.seed + 1)
    for _ in range(max(1, iterations // 2)):
        index = torch.randint(len(images), (128,), generator=generator).to(device)
        opt.zero_grad()
        F.cross_entropy(pretrained(images[index]), labels[index]).backward()
        opt.step()
    baseline = digits_model(ways).to(device)
    baseline.load_state_dict({k: v for k, v in pretrained.state_dict().items() if not k.startswith("4.")}, strict=False)
    nn.init.zeros_(baseline[4].weight)
    nn.init.zeros_(baseline[4].bias)

    results = {}
    for name, model in (("MAML", maml), ("pretrained", baseline)):
        opt = torch.optim.SGD(model.parameters(), lr=inner_lr)
        results[name] = [
            adaptation_losses(
                model, opt, [t.to(device) for t in test_tasks.sample()], F.cross_entropy, eval_steps, metric=_accuracy
            )
            for _ in range(args.test_tasks)
        ]
    steps = [0, 1, train_steps, eval_steps]
    rows = {n: [tuple(100 * v for v in _mean_interval([c[s] for c in r])) for s in steps] for n, r in results.items()}
    print(
        _format_table(
            f"accuracy (%) on {args.test_tasks} test tasks ({ways}-way {shots}-shot, unseen digits) after "
            f"fine-tuning with SGD (lr {inner_lr}); mean ± 95% interval",
            [_steps_label(s) for s in steps],
            rows,
            digits=1,
        )
    )
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for name, curves in results.items():
        stats = [_mean_interval([c[s] for c in curves]) for s in range(eval_steps + 1)]
        ax.errorbar(
            range(eval_steps + 1),
            [100 * m for m, _ in stats],
            yerr=[100 * h for _, h in stats],
            marker="o",
            capsize=3,
            label=name,
        )
    ax.axhline(100 / ways, color="gray", ls=":", label="chance")
    ax.set_xlabel("inner SGD steps at test time")
    ax.set_ylabel("query accuracy (%)")
    ax.set_title(f"{ways}-way {shots}-shot digits, meta-test classes unseen")
    ax.legend()
    _save(fig, args.out)
    plt.close(fig)
    print(f"wrote {args.out}  (total {time.perf_counter() - start:.0f}s)")
    return results


# ------------------------------------------------------------------------------------ hyper
def run_hyper(args: argparse.Namespace) -> dict[str, list[float]]:
    """Learn SGD's learning rate and momentum by hypergradient descent on sinusoid fitting.

    Each outer iteration samples a sinusoid task, trains a fixed random initialisation of the
    40-40 network with ``--inner-steps`` full-batch steps of SGD with momentum on ``--shots``
    points, and differentiates the loss on 100 validation points of the same task with respect to
    the learning rate and the momentum, through the whole unrolled training
    (:func:`higher.algorithms.unrolled_validation_loss`). They are learned as ``log(lr)`` and
    ``logit(momentum)`` with Adam, so they stay in range.
    """
    device, steps, iterations = args.device, args.inner_steps, args.iterations
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    model = sinusoid_model().to(device)
    sampler = SinusoidTasks(shots=args.shots, query=100, seed=args.seed)
    initial_lr, initial_momentum = 0.001, 0.5
    log_lr = torch.tensor(math.log(initial_lr), device=device, requires_grad=True)
    logit_momentum = torch.tensor(
        math.log(initial_momentum / (1 - initial_momentum)), device=device, requires_grad=True
    )
    hyper_opt = torch.optim.Adam([log_lr, logit_momentum], lr=0.1)
    inner_opt = torch.optim.SGD(model.parameters(), lr=initial_lr, momentum=initial_momentum)
    print(
        f"Hypergradient descent on SGD's lr and momentum: {steps} unrolled full-batch steps on "
        f"{args.shots} points of a sinusoid task, validation on 100 points; {iterations} outer iterations, {device}",
        flush=True,
    )

    def validation_loss(task: Any, lr: Tensor, momentum: Tensor) -> Tensor:
        train = [(task.support_x, task.support_y)] * steps
        loss, _ = unrolled_validation_loss(
            model, inner_opt, {"lr": lr, "momentum": momentum}, train, (task.query_x, task.query_y), F.mse_loss
        )
        return loss

    test = SinusoidTasks(shots=args.shots, query=100, seed=TEST_SEED).sample(args.test_tasks).to(device).tasks()

    def test_loss() -> tuple[float, float]:
        with torch.no_grad():
            lr, momentum = log_lr.exp(), torch.sigmoid(logit_momentum)
        losses = [float(validation_loss(task, lr, momentum).detach()) for task in test]
        return _mean_interval(losses)

    before = test_loss()
    history: dict[str, list[float]] = {"lr": [], "momentum": [], "validation loss": []}
    bar = _progress(iterations, not args.no_progress, "hypergradient")
    for iteration in range(1, iterations + 1):
        task = sampler.sample(1).to(device).tasks()[0]
        hyper_opt.zero_grad()
        loss = validation_loss(task, log_lr.exp(), torch.sigmoid(logit_momentum))
        loss.backward()
        history["lr"].append(log_lr.exp().item())
        history["momentum"].append(torch.sigmoid(logit_momentum).item())
        history["validation loss"].append(loss.item())
        hyper_opt.step()
        bar.update(iteration, loss.item())
    bar.close()
    after = test_loss()
    lr, momentum = log_lr.exp().item(), torch.sigmoid(logit_momentum).item()
    print(f"validation MSE on {args.test_tasks} test tasks after {steps} SGD steps; mean ± 95% interval")
    print(f"{'':24}  {'lr':>8}  {'momentum':>8}  validation MSE")
    for name, (lr_value, momentum_value, (mean, half)) in (
        ("initial hyperparameters", (initial_lr, initial_momentum, before)),
        ("learned hyperparameters", (lr, momentum, after)),
    ):
        print(f"{name:24}  {lr_value:8.5f}  {momentum_value:8.3f}  {mean:.3f} ± {half:.3f}")
    plt = _pyplot()
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
    axes[2].set_yscale("log")
    fig.suptitle(f"hypergradient descent through {steps} unrolled SGD steps")
    _save(fig, args.out)
    plt.close(fig)
    print(f"wrote {args.out}  (total {time.perf_counter() - start:.0f}s)")
    return history


# ------------------------------------------------------------------------------------ main
def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    experiment = args.experiment or "sinusoid"
    args.experiment = experiment
    for name, value in DEFAULTS[experiment].items():
        if getattr(args, name, None) is None:
            setattr(args, name, _png_path(value) if name == "out" else value)
    if experiment == "sinusoid" and not hasattr(args, "first_order"):
        args.first_order = False
    if experiment == "digits" and args.ways > 16:
        raise CliError(f"--ways {args.ways}: the meta-test split has 16 classes; use at most 16")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m higher`` and of the ``higher`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args = _resolve(args)
        torch.set_num_threads(args.threads)
        if args.experiment == "sinusoid":
            config = SinusoidConfig(
                iterations=args.iterations,
                shots=args.shots,
                test_tasks=args.test_tasks,
                first_order=args.first_order,
                seed=args.seed,
            )
            run_sinusoid(args, config)
        elif args.experiment == "digits":
            run_digits(args)
        else:
            run_hyper(args)
    except CliError as error:
        parser.exit(2, f"higher: error: {error}\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
