"""Every mode against the one reference (the plain eager per-task unroll), on generated problems.

For each mode, hypothesis draws problems as users write them (harness.problems) and the mode must
either give the reference's meta-loss and gradients (float64, 1e-9 relative) or raise the clear
error that harness.unsupported names. Problems whose forward draws random numbers (dropout) are
compared exactly in the modes that draw the same numbers as the reference (harness.exact_rng);
in the others (task-batched, compiled) the mode's meta-gradient must be the derivative of the
meta-loss it computed (finite differences under the same seed).

``make test`` runs a fixed (derandomized) sample; ``make fuzz`` (HIGHER_FUZZ=1) draws fresh ones.
"""

from __future__ import annotations

import torch
from harness import (
    applies,
    assert_finite_differences,
    assert_same,
    exact_rng,
    examples,
    expect_clear_error,
    problems,
    run,
    unsupported,
)
from hypothesis import assume, given
from hypothesis import strategies as st

from torch_versions import needs_compile

BOTH = (torch.float64, torch.float32)


def check_mode(problem, mode: str) -> None:
    assume(applies(problem, mode))
    reasons = unsupported(problem, mode)
    if reasons:
        with expect_clear_error(reasons):
            run(problem, mode)
        return
    if problem.random and not exact_rng(mode):
        # Another mode's random numbers: its meta-gradient must be the derivative of its own meta-loss. A
        # first-order meta-gradient is by design not one (the deterministic problems check first order).
        # (Finite differences need float64.)
        assume(not problem.first_order and problem.dtype == torch.float64)
        assert_finite_differences(problem, mode)
        return
    expected = run(problem, "per_task")
    actual = run(problem, mode)
    keys = [k for k in expected.grads if k.startswith("hyper.")] if mode == "forward" else None
    assert_same(actual, expected, problem, mode, keys=keys)
    # The global random generator is left as the reference leaves it (untouched without random layers).
    assert actual.after == expected.after, f"{mode} drew other random numbers than the reference: {problem.describe()}"


@examples(ci=80, fuzz=4000)
@given(problem=problems())
def test_task_batched(problem):
    check_mode(problem, "batched")


@examples(ci=50, fuzz=3000)
@given(problem=problems(), every=st.sampled_from([1, 2]))
def test_checkpointed(problem, every):
    check_mode(problem, f"checkpointed_{every}")


@examples(ci=20, fuzz=1000)
@given(problem=problems())
def test_checkpointed_task_batched(problem):
    check_mode(problem, "checkpointed_batched_2")


@examples(ci=15, fuzz=1000)
@given(
    problem=problems(
        hypers=("leaf", "transformed", "unpacked", "per_task", "per_step", "per_parameter"),
        first_order=(False,),
        schedulers=(None,),
    )
)
def test_forward_mode(problem):
    check_mode(problem, "forward")


# Compiled modes also in float32, torch's default dtype (the reference then in float32 too; 2e-3 relative).
@needs_compile
@examples(ci=3, fuzz=25)
@given(problem=problems(max_steps=2, max_tasks=2, dtypes=BOTH))
def test_compiled_per_task(problem):
    check_mode(problem, "compiled_per_task")


@needs_compile
@examples(ci=3, fuzz=25)
@given(problem=problems(max_steps=2, max_tasks=3, dtypes=BOTH))
def test_compiled_task_batched(problem):
    check_mode(problem, "compiled_batched")


@needs_compile
@examples(ci=2, fuzz=15)
@given(problem=problems(max_steps=2, max_tasks=3, dtypes=BOTH))
def test_compiled_with_the_backward_inside(problem):
    check_mode(problem, "compiled_whole_batched")
