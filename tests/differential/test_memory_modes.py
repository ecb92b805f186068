"""Repeated meta-iterations keep memory flat in every mode (no leaked inner loops, graphs or tensors).

For each mode, one generated problem's meta-iteration runs on the same objects (model, optimizer,
hyperparameter leaves) again and again; after a warm-up, the number of live tensors and fmodels
(counted by Python's garbage collector, which sees every tensor that a Python object still holds)
must not grow. A reference cycle through the autograd graph (a segment node holding the fmodel
whose fast weights hold the node) shows up here as a count growing by the same amount every time.
"""

from __future__ import annotations

import pytest
from harness import META_LOSS, _backward, _dtype_and_seed, _forward_mode, build, examples, problems, unsupported
from hypothesis import given

from live_objects import growth
from torch_versions import needs_compile

EAGER_MODES = ["per_task", "batched", "checkpointed_1", "checkpointed_2", "checkpointed_batched_2", "forward"]


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
        grown = growth(iteration, repeats)
    assert grown == (0, 0), (
        f"{mode}: {grown} more (fmodels, tensors) alive after {repeats} meta-iterations than after one: {problem.describe()}"
    )


@pytest.mark.parametrize("mode", EAGER_MODES)
@examples(ci=2, fuzz=40)
@given(problem=problems(hypers=("leaf", "transformed", "per_step", "per_parameter", "unpacked"), schedulers=(None,)))
def test_memory_stays_flat(mode, problem):
    if unsupported(problem, mode) or (mode == "forward" and problem.first_order):
        return
    _assert_flat(problem, mode)


@needs_compile
@pytest.mark.parametrize("mode", ["compiled_per_task", "compiled_batched", "compiled_whole_batched"])
def test_memory_stays_flat_compiled(mode):
    from harness import Problem

    problem = Problem("mlp", "Adam", (("lr", 0.01),), "leaf", None, 1, 1, 2, False, "mse", 0)  # one step: compiles fast
    _assert_flat(problem, mode, warmup=2, repeats=3)
