"""Few-shot classification of scikit-learn's digits, MAML against a tuned pretrained baseline.

``python -m higher demo digits``: N-way K-shot tasks from the bundled 8x8 digits
(:class:`higher.data.DigitsTasks`: rotations by 90, 180 and 270 degrees make new classes),
with three disjoint sets of classes: meta-training on digits 0-2 (12 classes), meta-validation
on digits 3-4 (8 classes), meta-test on digits 5-8 (16 classes).

* MAML: a 64-64 ReLU MLP meta-trained with 5 inner SGD steps (lr 0.4), 10 tasks per
  meta-batch, Adam (1e-3); task-batched (all tasks of a meta-batch at once) unless ``--per-task``.
* Pretrained baseline (Chen et al. 2019, "A Closer Look at Few-shot Classification"): one
  classifier of all meta-training classes, trained jointly; for a task, its body is kept and a
  new zero-initialised head of N outputs is fine-tuned.

The fine-tuning of each method is chosen the same way, on meta-validation tasks: the SGD learning
rate from :data:`LR_GRID` for both, and for the baseline also whether to fine-tune the head only
or the whole network; the setting with the best mean accuracy after 10 steps wins. The test table
then uses the chosen settings; the validation accuracies of the whole grid are printed too.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed, innerloop_ctx
from ..algorithms import adaptation_losses
from ..data import DigitsTasks, Task
from .common import (
    TEST_SEED,
    DemoError,
    Progress,
    format_table,
    mean_interval,
    pyplot,
    save_figure,
    steps_label,
    table_json,
)

__all__ = ["DEFAULTS", "LR_GRID", "DigitsConfig", "digits_model", "run"]

DEFAULTS: dict[str, Any] = {"iterations": 1500, "shots": 1, "out": "higher-demo-digits.png"}
#: The fine-tuning learning rates tried on the meta-validation tasks, for every method alike.
LR_GRID = (0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.8)
TRAIN_DIGITS, VAL_DIGITS, TEST_DIGITS = (0, 1, 2), (3, 4), (5, 6, 7, 8)
MAX_WAYS = 4 * len(VAL_DIGITS)  # the smallest split: meta-validation, 4 rotations per digit


@dataclass
class DigitsConfig:
    """The experiment's settings."""

    iterations: int
    ways: int = 5
    shots: int = 1
    query: int = 15
    inner_lr: float = 0.4
    train_steps: int = 5
    eval_steps: int = 10
    meta_batch: int = 10
    meta_lr: float = 1e-3
    test_tasks: int = 600
    val_tasks: int = 300
    lr_grid: tuple[float, ...] = field(default=LR_GRID)
    per_task: bool = False
    seed: int = 0


def digits_model(ways: int, hidden: int = 64) -> nn.Sequential:
    """A small MLP over the 64 pixels, ending in ``ways`` logits."""
    return nn.Sequential(
        nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, ways)
    )


def task_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """The cross-entropy of each task of task-batched logits ``[T, n, ways]``: shape ``[T]``."""
    tasks = logits.shape[0]
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(tasks, -1).mean(1)


def accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """The fraction of correct predictions (over the last dimension of ``labels``)."""
    return (logits.argmax(-1) == labels).double().mean(-1)


def samplers(config: DigitsConfig) -> dict[str, DigitsTasks]:
    """The meta-train, meta-validation and meta-test task samplers (disjoint classes)."""
    splits = {"train": config.seed, "val": TEST_SEED + 1, "test": TEST_SEED}
    try:
        return {
            split: DigitsTasks(
                split,
                ways=config.ways,
                shots=config.shots,
                query=config.query,
                seed=seed,
                train_digits=TRAIN_DIGITS,
                val_digits=VAL_DIGITS,
                test_digits=TEST_DIGITS,
            )
            for split, seed in splits.items()
        }
    except ValueError as error:
        raise DemoError(f"{error} (options --ways/--shots)") from None
    except ImportError as error:  # no scikit-learn: the message says what to install
        raise DemoError(str(error)) from None


# ------------------------------------------------------------------------------------ training
def train_maml(
    config: DigitsConfig, tasks: DigitsTasks, device: torch.device, progress: bool
) -> tuple[nn.Module, float]:
    """Meta-train the MLP's initialisation with MAML; returns it and the seconds taken."""
    torch.manual_seed(config.seed)
    model = digits_model(config.ways).to(device)
    # Under torchrun every rank samples the same meta-batches and adapts its share of the tasks;
    # DDP's all-reduce (higher.distributed) makes the meta-gradient the whole batch's.
    distributed_run = distributed.rank_and_world_size()[1] > 1
    net = nn.parallel.DistributedDataParallel(model) if distributed_run else model
    meta_opt = torch.optim.Adam(model.parameters(), lr=config.meta_lr)
    inner_opt = torch.optim.SGD(model.parameters(), lr=config.inner_lr)
    bar = Progress(config.iterations, progress, "MAML digits")
    for iteration in range(1, config.iterations + 1):
        batch = Task(*(t.to(device) for t in tasks.sample_batch(config.meta_batch)))
        meta_opt.zero_grad()
        if config.per_task:  # higher.algorithms.maml_step, or its split across ranks
            loss = distributed.maml_step(net, inner_opt, _unstack(batch), F.cross_entropy, config.train_steps)
        else:
            mine = Task(*distributed.share(*batch)) if distributed_run else batch
            with innerloop_ctx(net, inner_opt, copy_initial_weights=False, tasks=mine.support_x.shape[0]) as (
                fmodel,
                diffopt,
            ):
                for _ in range(config.train_steps):
                    diffopt.step(task_cross_entropy(fmodel(mine.support_x), mine.support_y))
                query_losses = task_cross_entropy(fmodel(mine.query_x), mine.query_y)
            if distributed_run:
                (query_losses.sum() * distributed.task_weight(config.meta_batch)).backward()
                loss = distributed.mean_over_ranks(query_losses.detach().sum(), config.meta_batch)
            else:
                query_loss = query_losses.mean()
                query_loss.backward()
                loss = float(query_loss.detach())
        meta_opt.step()
        bar.update(iteration, loss)
    return model, bar.close()


def _unstack(batch: Task) -> list[Task]:
    return [Task(*parts) for parts in zip(*batch)]


def train_pretrained(config: DigitsConfig, tasks: DigitsTasks, device: torch.device) -> nn.Sequential:
    """The baseline's body: a classifier of all meta-training classes, trained jointly (Adam, batches of 128).

    Returns a network with a new zero-initialised head of ``ways`` outputs on that body.
    """
    torch.manual_seed(config.seed + 1)
    pretrained = digits_model(len(tasks.classes)).to(device)
    opt = torch.optim.Adam(pretrained.parameters(), lr=config.meta_lr)
    images = torch.cat(tasks.images_by_class).to(device)
    labels = torch.cat([torch.full((len(x),), i) for i, x in enumerate(tasks.images_by_class)]).to(device)
    generator = torch.Generator().manual_seed(config.seed + 1)
    for _ in range(max(1, config.iterations // 2)):
        index = torch.randint(len(images), (128,), generator=generator).to(device)
        opt.zero_grad()
        F.cross_entropy(pretrained(images[index]), labels[index]).backward()
        opt.step()
    baseline = digits_model(config.ways).to(device)
    body = {k: v for k, v in pretrained.state_dict().items() if not k.startswith("4.")}
    baseline.load_state_dict(body, strict=False)
    head = baseline[4]
    assert isinstance(head, nn.Linear)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return baseline


# ------------------------------------------------------------------------------------ evaluation
def accuracy_curves(
    model: nn.Module, inner_opt: torch.optim.Optimizer, batch: Task, steps: int, per_task: bool
) -> list[list[float]]:
    """Per task, the query accuracy after 0..``steps`` fine-tuning steps of ``inner_opt``."""
    if per_task:
        return [
            adaptation_losses(model, inner_opt, task, F.cross_entropy, steps, metric=accuracy)
            for task in _unstack(batch)
        ]
    by_step = []
    with innerloop_ctx(model, inner_opt, track_higher_grads=False, tasks=batch.support_x.shape[0]) as (
        fmodel,
        diffopt,
    ):
        for step in range(steps + 1):
            with torch.no_grad():
                by_step.append(accuracy(fmodel(batch.query_x), batch.query_y))
            if step < steps:
                diffopt.step(task_cross_entropy(fmodel(batch.support_x), batch.support_y))
    return torch.stack(by_step, dim=1).tolist()


def fine_tuning_opt(model: nn.Module, lr: float, head_only: bool) -> torch.optim.Optimizer:
    """SGD over the whole network, or over its last layer only (the body then stays fixed)."""
    if head_only and not isinstance(model, nn.Sequential):
        raise TypeError("head-only fine-tuning takes the last layer of an nn.Sequential")
    params = model[-1].parameters() if isinstance(model, nn.Sequential) and head_only else model.parameters()
    return torch.optim.SGD(params, lr=lr)


def choose_fine_tuning(
    candidates: dict[str, tuple[nn.Module, list[bool]]], val: Task, config: DigitsConfig
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """For each method, the fine-tuning setting with the best mean validation accuracy after eval_steps.

    ``candidates`` maps a method to its model and the head-only choices to try; every learning
    rate of ``config.lr_grid`` is tried with each. Returns the chosen settings per method and all
    tried settings with their validation accuracy (mean, half-width of the 95% interval).
    """
    tried: list[dict[str, Any]] = []
    chosen: dict[str, dict[str, Any]] = {}
    for name, (model, head_only_choices) in candidates.items():
        for head_only in head_only_choices:
            for lr in config.lr_grid:
                curves = accuracy_curves(
                    model, fine_tuning_opt(model, lr, head_only), val, config.eval_steps, config.per_task
                )
                mean, half = mean_interval([c[-1] for c in curves])
                entry = {"method": name, "lr": lr, "head_only": head_only, "accuracy": mean, "ci95": half}
                tried.append(entry)
                if name not in chosen or mean > chosen[name]["accuracy"]:
                    chosen[name] = entry
    return chosen, tried


def run(config: DigitsConfig, device: torch.device, out: Path, progress: bool = True) -> dict[str, Any]:
    """The whole demo; returns the record printed by ``--json``."""
    if config.ways > MAX_WAYS:
        raise DemoError(
            f"--ways {config.ways}: the meta-validation split has {MAX_WAYS} classes; use at most {MAX_WAYS}"
        )
    pyplot()  # without matplotlib, say so now rather than after the whole run
    start = time.perf_counter()
    tasks = samplers(config)
    ways, shots = config.ways, config.shots
    mode = "per-task loop" if config.per_task else "task-batched"
    world = distributed.rank_and_world_size()[1]
    if world > 1:
        mode += f", split across {world} ranks"
    print(
        f"MAML, {ways}-way {shots}-shot digits (sklearn, rotations as classes): meta-train classes "
        f"{len(tasks['train'].classes)} (digits 0-2), meta-validation {len(tasks['val'].classes)} (digits 3-4), "
        f"meta-test {len(tasks['test'].classes)} (digits 5-8); {config.train_steps} inner SGD steps "
        f"(lr {config.inner_lr}), meta-batch {config.meta_batch} ({mode}), {config.iterations} iterations, {device}",
        flush=True,
    )
    rank = distributed.rank_and_world_size()[0]
    maml, maml_seconds = train_maml(config, tasks["train"], device, progress and rank == 0)
    if rank != 0:  # the other ranks of a torchrun job only share the meta-training
        return {}
    trained = time.perf_counter()
    baseline = train_pretrained(config, tasks["train"], device)
    baseline_done = time.perf_counter()

    val = Task(*(t.to(device) for t in tasks["val"].sample_batch(config.val_tasks)))
    chosen, tried = choose_fine_tuning({"MAML": (maml, [False]), "pretrained": (baseline, [False, True])}, val, config)
    chose = time.perf_counter()
    lines = [
        f"fine-tuning chosen on {config.val_tasks} meta-validation tasks (accuracy after {config.eval_steps} steps):"
    ]
    for name, entry in chosen.items():
        where = "head only" if entry["head_only"] else "whole network"
        lines.append(f"  {name}: lr {entry['lr']}, {where} ({100 * entry['accuracy']:.1f}%)")
    print("\n".join(lines), flush=True)

    test = Task(*(t.to(device) for t in tasks["test"].sample_batch(config.test_tasks)))
    results = {}
    for name, model in (("MAML", maml), ("pretrained", baseline)):
        opt = fine_tuning_opt(model, chosen[name]["lr"], chosen[name]["head_only"])
        results[name] = accuracy_curves(model, opt, test, config.eval_steps, config.per_task)
    evaluated = time.perf_counter()
    steps = sorted({0, 1, config.train_steps, config.eval_steps})
    columns = [steps_label(s) for s in steps]
    rows = {
        n: [(100 * m, 100 * h) for m, h in (mean_interval([c[s] for c in r]) for s in steps)]
        for n, r in results.items()
    }
    print(
        format_table(
            f"accuracy (%) on {config.test_tasks} test tasks ({ways}-way {shots}-shot, unseen digits) after "
            f"fine-tuning with SGD as chosen above; mean ± 95% interval",
            columns,
            rows,
            digits=1,
        )
    )
    plot(out, results, chosen, config)
    total = time.perf_counter() - start
    print(f"wrote {out}  (total {total:.0f}s)", flush=True)
    return {
        "experiment": "digits",
        "options": {**asdict(config), "device": device, "out": out},
        "table": table_json(columns, rows),
        "chosen": chosen,
        "validation": tried,
        "timings": {
            "meta_training_s": maml_seconds,
            "per_iteration_ms": 1e3 * maml_seconds / config.iterations if config.iterations else None,
            "baseline_s": baseline_done - trained,
            "selection_s": chose - baseline_done,
            "evaluation_s": evaluated - chose,
            "total_s": total,
        },
    }


def plot(path: Path, results: dict[str, list[list[float]]], chosen: dict[str, Any], config: DigitsConfig) -> None:
    """Accuracy against fine-tuning steps, each method with its chosen setting."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for name, curves in results.items():
        stats = [mean_interval([c[s] for c in curves]) for s in range(config.eval_steps + 1)]
        setting = f"lr {chosen[name]['lr']}" + (", head only" if chosen[name]["head_only"] else "")
        ax.errorbar(
            range(config.eval_steps + 1),
            [100 * m for m, _ in stats],
            yerr=[100 * h for _, h in stats],
            marker="o",
            capsize=3,
            label=f"{name} ({setting})",
        )
    ax.axhline(100 / config.ways, color="gray", ls=":", label="chance")
    ax.set_xlabel("inner SGD steps at test time")
    ax.set_ylabel("query accuracy (%)")
    ax.set_title(f"{config.ways}-way {config.shots}-shot digits, meta-test classes unseen")
    ax.legend()
    save_figure(fig, path)
    plt.close(fig)
