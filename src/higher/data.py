"""Offline task data for meta-learning demos and tests: nothing is downloaded.

* :class:`SinusoidTasks`: the sinusoid regression tasks of Finn et al. (2017), "Model-Agnostic
  Meta-Learning for Fast Adaptation of Deep Networks", section 5.1: amplitude ~ U[0.1, 5.0],
  phase ~ U[0, pi], inputs ~ U[-5, 5], ``K`` support and ``K`` query points per task.
* :class:`DigitsTasks`: N-way K-shot classification tasks built from scikit-learn's bundled
  8x8 handwritten digits (``sklearn.datasets.load_digits`` ships with scikit-learn: optional
  extra ``higher[demo]``). Rotations by 90, 180 and 270 degrees make new classes, as is done
  for Omniglot, and the meta-train and meta-test classes are disjoint.

Both samplers draw everything from their own seeded ``torch.Generator``: the same seed gives
the same tasks, whatever else the program does with torch's global random state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["Task", "TaskBatch", "SinusoidTasks", "DigitsTasks"]


class Task(NamedTuple):
    """One few-shot task: a support set to adapt on and a query set to evaluate on."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor


class TaskBatch(NamedTuple):
    """Several sinusoid tasks stacked along a leading task dimension, with their true curves."""

    support_x: Tensor  # (tasks, K, 1)
    support_y: Tensor  # (tasks, K, 1)
    query_x: Tensor  # (tasks, Q, 1)
    query_y: Tensor  # (tasks, Q, 1)
    amplitude: Tensor  # (tasks,)
    phase: Tensor  # (tasks,)

    def tasks(self) -> list[Task]:
        """The tasks one by one (views into the stacked tensors)."""
        return [Task(*parts) for parts in zip(self.support_x, self.support_y, self.query_x, self.query_y)]

    def to(self, device: torch.device | str) -> TaskBatch:
        """The same tasks on ``device``."""
        return TaskBatch(*(t.to(device) for t in self))


class SinusoidTasks:
    """Sinusoid regression tasks ``y = amplitude * sin(x - phase)`` (Finn et al. 2017, section 5.1).

    Args:
        shots: ``K``, the number of support points per task (the paper uses 5, 10 and 20).
        query: the number of query points per task (default ``K``, as in the paper's training).
        seed: seed of the sampler's own ``torch.Generator``.
        amplitude_range, phase_range, x_range: the task distribution; the defaults are the paper's.
        dtype: dtype of the returned tensors (default: torch's default dtype).

    Calling :meth:`sample` twice gives different tasks; two samplers with the same seed give the
    same sequence of tasks.
    """

    def __init__(
        self,
        shots: int = 10,
        query: int | None = None,
        seed: int = 0,
        amplitude_range: tuple[float, float] = (0.1, 5.0),
        phase_range: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
        dtype: torch.dtype | None = None,
    ) -> None:
        query = shots if query is None else query
        for name, value in (("shots", shots), ("query", query)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name, (low, high) in (
            ("amplitude_range", amplitude_range),
            ("phase_range", phase_range),
            ("x_range", x_range),
        ):
            if not low <= high:
                raise ValueError(f"{name} must be (low, high) with low <= high, got {(low, high)!r}")
        self.shots = shots
        self.query = query
        self.amplitude_range = amplitude_range
        self.phase_range = phase_range
        self.x_range = x_range
        self.dtype = dtype
        self.generator = torch.Generator().manual_seed(seed)

    def _uniform(self, shape: Sequence[int], bounds: tuple[float, float]) -> Tensor:
        low, high = bounds
        u = torch.rand(*shape, generator=self.generator, dtype=self.dtype or torch.get_default_dtype())
        return low + (high - low) * u

    def sample(self, num_tasks: int) -> TaskBatch:
        """``num_tasks`` new tasks, stacked (use ``.tasks()`` for a list of :class:`Task`)."""
        if not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive integer, got {num_tasks!r}")
        amplitude = self._uniform((num_tasks,), self.amplitude_range)
        phase = self._uniform((num_tasks,), self.phase_range)
        support_x = self._uniform((num_tasks, self.shots, 1), self.x_range)
        query_x = self._uniform((num_tasks, self.query, 1), self.x_range)
        return TaskBatch(
            support_x,
            self.curve(support_x, amplitude, phase),
            query_x,
            self.curve(query_x, amplitude, phase),
            amplitude,
            phase,
        )

    @staticmethod
    def curve(x: Tensor, amplitude: Tensor, phase: Tensor) -> Tensor:
        """The true function of each task at ``x`` (``x`` has a leading task dimension)."""
        shape = (-1,) + (1,) * (x.dim() - 1)
        return amplitude.reshape(shape) * torch.sin(x - phase.reshape(shape))


class DigitsTasks:
    """N-way K-shot classification tasks from scikit-learn's bundled 8x8 digits.

    The 1797 images of ``sklearn.datasets.load_digits`` (shipped with scikit-learn, no download)
    are scaled to [0, 1]. Every (digit, rotation) pair with rotation in 0, 90, 180, 270 degrees is
    a class, as rotations are used to make new classes for Omniglot (Santoro et al. 2016; Finn et
    al. 2017). The split is by *digit*, so no meta-test digit is seen in any rotation during
    meta-training: by default digits 0-4 (20 classes) are for meta-training and 5-8 (16 classes)
    for meta-testing. Digit 9 is left out because a 9 turned by 180 degrees is a 6. (Within a
    split a few classes remain alike, e.g. an 8 and an 8 turned by 180 degrees; this caps the
    accuracy any method can reach, for every method alike.)

    A third, meta-validation split (``"val"``) takes its classes from ``val_digits``, for choosing
    hyperparameters on classes that are neither trained on nor tested on; it is empty by default.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        ways: classes per task (N).
        shots: support examples per class (K).
        query: query examples per class.
        seed: seed of the sampler's own ``torch.Generator``.
        train_digits, test_digits, val_digits: the digits of each split (must not overlap).
        dtype: dtype of the images (default: torch's default dtype).

    Labels in each task are ``0 .. ways-1`` in a random order of the sampled classes. Images are
    flattened to 64 features.
    """

    ROTATIONS = (0, 1, 2, 3)  # quarter turns

    def __init__(
        self,
        split: str = "train",
        ways: int = 5,
        shots: int = 1,
        query: int = 15,
        seed: int = 0,
        train_digits: Sequence[int] = (0, 1, 2, 3, 4),
        test_digits: Sequence[int] = (5, 6, 7, 8),
        dtype: torch.dtype | None = None,
        val_digits: Sequence[int] = (),
    ) -> None:
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        named = {
            "train_digits": tuple(train_digits),
            "val_digits": tuple(val_digits),
            "test_digits": tuple(test_digits),
        }
        names = list(named)
        for i, first in enumerate(names):
            for second in names[i + 1 :]:
                if set(named[first]) & set(named[second]):
                    raise ValueError(
                        f"{first} {named[first]} and {second} {named[second]} overlap; "
                        f"meta-train, meta-validation and meta-test classes must be disjoint."
                    )
        if split == "val" and not named["val_digits"]:
            raise ValueError("split 'val' needs val_digits, e.g. DigitsTasks('val', val_digits=(3, 4), ...)")
        for name, value in (("ways", ways), ("shots", shots), ("query", query)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        digits = named[f"{split}_digits"]
        if any(not 0 <= d <= 9 for d in digits):
            raise ValueError(f"digits must lie in 0..9, got {digits}")
        self.classes: list[tuple[int, int]] = [(d, r) for d in digits for r in self.ROTATIONS]
        if ways > len(self.classes):
            raise ValueError(f"ways={ways} but the {split} split has only {len(self.classes)} classes")
        images, labels = _load_digits(dtype or torch.get_default_dtype())
        self.images_by_class: list[Tensor] = []
        for digit, quarter_turns in self.classes:
            images_of_digit = images[labels == digit]
            self.images_by_class.append(torch.rot90(images_of_digit, quarter_turns, dims=(1, 2)).reshape(-1, 64))
        smallest = min(len(x) for x in self.images_by_class)
        if shots + query > smallest:
            raise ValueError(f"shots + query = {shots + query} exceeds the {smallest} images of the smallest class")
        self.split, self.ways, self.shots, self.query = split, ways, shots, query
        self.generator = torch.Generator().manual_seed(seed)

    def sample_batch(self, num_tasks: int) -> Task:
        """``num_tasks`` tasks stacked along a leading task dimension (for task-batched mode)."""
        if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive integer, got {num_tasks!r}")
        tasks = [self.sample() for _ in range(num_tasks)]
        return Task(*(torch.stack(parts) for parts in zip(*tasks)))

    def sample(self) -> Task:
        """One task: ``support_x`` (ways*shots, 64), ``support_y`` (ways*shots,), and the query set."""
        chosen = torch.randperm(len(self.classes), generator=self.generator)[: self.ways].tolist()
        parts: list[list[Tensor]] = [[], [], [], []]
        for label, class_index in enumerate(chosen):
            pool = self.images_by_class[class_index]
            order = torch.randperm(len(pool), generator=self.generator)
            support, query = pool[order[: self.shots]], pool[order[self.shots : self.shots + self.query]]
            parts[0].append(support)
            parts[1].append(torch.full((self.shots,), label, dtype=torch.long))
            parts[2].append(query)
            parts[3].append(torch.full((self.query,), label, dtype=torch.long))
        return Task(*(torch.cat(p) for p in parts))


def _load_digits(dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """sklearn's bundled digits as (1797, 8, 8) images in [0, 1] and (1797,) labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "DigitsTasks needs scikit-learn (it ships the digits data): pip install 'higher[demo]'"
        ) from error
    bunch: Any = load_digits()  # a Bunch (sklearn's stubs also allow the (X, y) tuple of return_X_y=True)
    images = torch.as_tensor(bunch.images, dtype=dtype) / 16.0
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    return images, labels
