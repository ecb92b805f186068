"""The reference itself: the plain eager per-task unroll's meta-gradient is the derivative of its meta-loss.

Every mode is compared with the per-task unroll (test_modes.py), so the unroll is checked first,
on generated problems, against central finite differences of its own meta-loss along a random
direction of the model's parameters and the hyperparameter leaves (float64; the random generator
reseeded for every evaluation, so a dropout model draws the same masks). First-order problems are
left out: their meta-gradient is by design not the derivative (tests/test_optim_first_order.py checks
it against a hand-written first-order unroll).
"""

from __future__ import annotations

from harness import assert_finite_differences, examples, problems, unsupported
from hypothesis import given


@examples(ci=60, fuzz=3000)
@given(problem=problems(first_order=(False,), max_steps=3))
def test_reference_meta_gradient_equals_finite_differences(problem):
    if unsupported(problem, "per_task"):
        return  # a combination the reference refuses (test_modes.py checks the error)
    assert_finite_differences(problem, "per_task")
