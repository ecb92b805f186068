"""Across ranks: DistributedDataParallel models on 2 gloo ranks against the one-process reference.

One launch of 2 ranks runs a fixed sample of generated problems (per task with ``no_sync``, and
task-batched), each rank adapting its share of the tasks; the averaged meta-gradient must equal
the per-task reference's over the whole meta-batch, and the hyperparameters' gradients summed
over ranks (each rank's own: they are not DDP's) must equal the reference's times the world size.
Problems whose forward draws random numbers are left out: each rank draws its own.
"""

from __future__ import annotations

import pytest
import torch
from harness import FUZZ, Outcome, assert_same, problems, run, sample, unsupported

from test_distributed import WORLD, _results

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available in this torch build",
)

DETERMINISTIC = ("mlp", "batchnorm", "conv", "rnn", "parametrized", "shared", "unused")


def _combined(outcomes: list[Outcome]) -> Outcome:
    """What the ranks computed together: the (all-reduced, equal) model gradients; the hyperparameters' summed."""
    grads = dict(outcomes[0].grads)
    for key in grads:
        if key.startswith("hyper."):
            parts = [o.grads[key] for o in outcomes]
            grads[key] = None if all(g is None for g in parts) else sum(g for g in parts if g is not None) / WORLD
    return Outcome(sum(o.loss for o in outcomes) / WORLD, grads)


MODES = ("per_task", "batched")


def test_ddp_on_two_ranks_equals_the_reference():
    drawn = sample(problems(models=DETERMINISTIC, max_tasks=4), 30 if FUZZ else 6)
    cases = [(p, mode) for mode in MODES for p in drawn if not unsupported(p, mode)]
    per_rank = _results("harness:distributed_outcomes", cases)  # one launch of the ranks for all cases
    for i, (problem, mode) in enumerate(cases):
        outcomes = [rank_outcomes[i] for rank_outcomes in per_rank]
        for other in outcomes[1:]:  # DDP leaves every rank with the same model gradients
            for key, g in outcomes[0].grads.items():
                if key.startswith("model.") and g is not None:
                    assert torch.equal(g, other.grads[key]), f"{key} differs between ranks: {problem.describe()}"
        reference = run(problem, "per_task")
        combined = _combined(outcomes)
        assert_same(combined, reference, problem, f"ddp_{mode}", keys=list(reference.grads))
