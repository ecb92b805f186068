"""The benchmark's workloads: a model, a meta-batch of tasks and an inner-loop setting each.

Every workload is small enough for one CPU thread and is the kind of problem meta-learning code
runs all day: few-shot sine regression (Finn et al. 2017), a deep narrow MLP (many small
layers: the per-operation overhead dominates) and the 4-block convolutional network of few-shot
image classification (5-way 1-shot, 28x28 grey images). Data are synthetic (no downloads); only
the shapes matter for timing.

The tasks of a meta-batch are stacked along a leading task dimension: ``support_x[t]`` is task
``t``'s support set. Per-task implementations index it, task-batched ones use it as is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Workload:
    """One benchmark problem: how to build the model and the data, and the inner loop's settings."""

    name: str
    description: str
    make_model: Callable[[], nn.Module]
    make_data: Callable[[torch.Generator], tuple[Tensor, Tensor, Tensor, Tensor]]
    loss: Callable[[Tensor, Tensor], Tensor]
    tasks: int
    inner_steps: int = 5
    #: inner learning rate per optimizer name ("sgd" is plain SGD, "adam" is torch.optim.Adam's math)
    lr: dict[str, float] = field(default_factory=lambda: {"sgd": 0.01, "adam": 0.001})


def _sine_data(
    tasks: int, support: int, query: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    amplitude = torch.empty(tasks, 1, 1).uniform_(0.1, 5.0, generator=generator)
    phase = torch.empty(tasks, 1, 1).uniform_(0.0, math.pi, generator=generator)
    x = torch.empty(tasks, support + query, 1).uniform_(-5.0, 5.0, generator=generator)
    y = amplitude * torch.sin(x + phase)
    return x[:, :support], y[:, :support], x[:, support:], y[:, support:]


def sine_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))


def deep_mlp(layers: int = 16, width: int = 64) -> nn.Module:
    modules: list[nn.Module] = [nn.Linear(1, width), nn.Tanh()]
    for _ in range(layers - 2):
        modules += [nn.Linear(width, width), nn.Tanh()]
    modules.append(nn.Linear(width, 1))
    return nn.Sequential(*modules)


def conv_net(ways: int = 5, channels: int = 32) -> nn.Module:
    """4 x (conv 3x3, BatchNorm with batch statistics only, ReLU, max-pool 2): 28x28 -> 1x1."""
    blocks: list[nn.Module] = []
    for i in range(4):
        blocks += [
            nn.Conv2d(1 if i == 0 else channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels, track_running_stats=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
    return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(channels, ways))


def _image_data(
    tasks: int, ways: int, shots: int, queries: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    support_x = torch.randn(tasks, ways * shots, 1, 28, 28, generator=generator)
    query_x = torch.randn(tasks, ways * queries, 1, 28, 28, generator=generator)
    support_y = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).contiguous()
    query_y = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).contiguous()
    return support_x, support_y, query_x, query_y


WORKLOADS: dict[str, Workload] = {
    "sine": Workload(
        "sine",
        "MLP 1-40-40-1 (ReLU), 25 tasks, 10+10 points",
        sine_mlp,
        lambda g: _sine_data(25, 10, 10, g),
        F.mse_loss,
        tasks=25,
    ),
    "sine1": Workload(
        "sine1",
        "as sine, one inner step (the MAML paper's setting): opening the inner loop weighs most",
        sine_mlp,
        lambda g: _sine_data(25, 10, 10, g),
        F.mse_loss,
        tasks=25,
        inner_steps=1,
    ),
    "deep": Workload(
        "deep",
        "16-layer tanh MLP, width 64, 8 tasks, 10+10 points",
        deep_mlp,
        lambda g: _sine_data(8, 10, 10, g),
        F.mse_loss,
        tasks=8,
    ),
    "conv": Workload(
        "conv",
        "4x(conv3x3 32, BatchNorm (batch stats), ReLU, maxpool) on 1x28x28, 5-way 1-shot (15 queries/class), 4 tasks",
        conv_net,
        lambda g: _image_data(4, 5, 1, 15, g),
        F.cross_entropy,
        tasks=4,
        lr={"sgd": 0.1, "adam": 0.001},
    ),
}


def tiny(workload: Workload) -> Workload:
    """A seconds-long version of ``workload`` (2 tasks, 2 steps) for smoke tests."""
    data = workload.make_data
    return Workload(
        workload.name,
        workload.description + " (tiny: 2 tasks, 2 steps)",
        workload.make_model,
        lambda g: tuple(t[:2] for t in data(g)),  # type: ignore[return-value]
        workload.loss,
        tasks=2,
        inner_steps=2,
        lr=workload.lr,
    )
