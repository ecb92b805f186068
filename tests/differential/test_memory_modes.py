"""Repeated meta-iterations keep memory flat in every mode (no leaked inner loops, graphs or tensors).

For each mode, one generated problem's meta-iteration runs on the same objects (model, optimizer,
hyperparameter leaves) again and again; after a warm-up, the number of live tensors and fmodels
(counted by Python's garbage collector, which sees every tensor that a Python object still holds)
must not grow. A reference cycle through the autograd graph (a segment node holding the fmodel
whose fast weights hold the node) shows up here as a count growing by the same amount every time.
"""

from __future__ import annotations

import gc

import pytest
import torch
from harness import META_LOSS, _backward, _dtype_and_seed, _forward_mode, build, examples, problems, unsupported
from hypothesis import given

import higher

EAGER_MODES = ["per_task", "batched", "checkpointed_1", "checkpointed_2", "checkpointed_batched_2", "forward"]


def _live() -> tuple[int, int]:
    gc.collect()
    objects = gc.get_objects()
    tensors = sum(1 for o in objects if isinstance(o, torch.Tensor))
    fmodels = sum(1 for o in objects if isinstance(o, higher.patch.FunctionalModule))
    return tensors, fmodels


def _assert_flat(problem, mode: str, warmup: int = 2, repeats: int = 3) -> None:
    built = build(problem)
    with _dtype_and_seed(problem, 0):
        if mode == "forward":
            iteration = lambda: _forward_mode(built)  # noqa: E731
        else:
            meta_loss = META_LOSS[mode](built)
            iteration = lambda: _backward(built, meta_loss)  # noqa: E731
        for _ in range(warmup):
            iteration()
        before = _live()
        for _ in range(repeats):
            iteration()
        after = _live()
    # (fewer is fine: objects of earlier tests, such as compiled code, may be freed meanwhile)
    assert after[0] <= before[0] and after[1] <= before[1], f"{mode}: live (tensors, fmodels) {before} -> {after} over {repeats} meta-iterations: {problem.describe()}"


@pytest.mark.parametrize("mode", EAGER_MODES)
@examples(ci=2, fuzz=40)
@given(problem=problems(hypers=("leaf", "transformed", "per_step", "per_parameter", "unpacked"), schedulers=(None,)))
def test_memory_stays_flat(mode, problem):
    if unsupported(problem, mode) or (mode == "forward" and problem.first_order):
        return
    _assert_flat(problem, mode)


@pytest.mark.parametrize("mode", ["compiled_per_task", "compiled_batched", "compiled_whole_batched"])
def test_memory_stays_flat_compiled(mode):
    from harness import Problem

    problem = Problem("mlp", "Adam", (("lr", 0.01),), "leaf", None, 1, 1, 2, False, "mse", 0)  # one step: compiles fast
    _assert_flat(problem, mode, warmup=2, repeats=3)
