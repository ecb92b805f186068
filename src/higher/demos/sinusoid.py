"""MAML on sinusoid regression (Finn, Abbeel & Levine 2017, section 5.1): ``python -m higher demo``.

The paper's protocol: a 40-40 ReLU network, K=10 support and K query points per task, one inner
SGD step with learning rate 0.01, 25 tasks per meta-batch, Adam with meta learning rate 0.001,
70,000 iterations. Then 600 seeded test tasks (the same whatever ``--seed`` is): the MSE on 100
query points with a 95% interval after 0, 1 and 10 fine-tuning steps, for the meta-learned
network and for a pretrained baseline (one network fit to all tasks jointly, fine-tuned the same
way), and a PNG with three test tasks (as the paper's Figure 2) and the MSE against the steps.

Meta-training runs the 25 inner loops of a meta-batch as one (``innerloop_ctx(..., tasks=25)``,
see :mod:`higher.batched`), about 8x faster than a loop over tasks for this small network; the
per-task path (``per_task=True``, ``--per-task``) runs :mod:`higher.algorithms` task by task and
computes the same numbers up to floating-point summation order.

Compilation (``--compile``, ``--no-compile``). The task-batched meta-iteration of MAML, first-order
MAML, Meta-SGD and ANIL -- from ``innerloop_ctx`` through the mean query loss to its backward pass
(:meth:`Learner.batched_iteration`: the meta-gradient is taken inside the graph by
:func:`higher.compiled.backward`; Adam's step stays eager) -- compiles with
``torch.compile(fullgraph=True)`` into one graph, once per run: every iteration has the same
shapes, so it is never recompiled. What changes from one iteration to the next is an input of the
graph (the weights, Meta-SGD's learning rates, the meta-batch, sampled outside); the fixed settings
(inner learning rate, number of inner steps) are constants that dynamo guards (changing them
recompiles); nothing random runs inside and the network has no dropout or BatchNorm.

Speed, side by side in one process (one thread, torch 2.13.0 CPU, inductor, the 2-core
development machine shared with other jobs, load average 3.6-5.0; time per iteration with
Adam's step, mean over 1,500 iterations; compile seconds of a cold inductor cache, the first
compilation in a process also paying dynamo's and inductor's start-up):

=================  =======  ========  ===============  ==================  ==========
algorithm          eager    compiled  compiled, with   compile s           break-even
                   ms/it    ms/it     ``.backward()``  (cold cache)        iterations
                                      outside, ms/it
=================  =======  ========  ===============  ==================  ==========
MAML               6.7      2.8       4.2              37 (fresh process)  9,500
first-order MAML   4.9      1.9       2.9              13 (after MAML)     4,400
Meta-SGD           10.2     3.7       5.8              22 (after MAML)     3,400
ANIL               5.9      2.4       3.9              18 (after MAML)     5,200
=================  =======  ========  ===============  ==================  ==========

(break-even: compile seconds / seconds saved per iteration). The backward pass inside the graph
(:func:`higher.compiled.backward`) computes bit-identical weights to the compiled forward with
``.backward()`` outside (checked over 1,000 iterations of seed 0, and the 70,000-iteration runs of
seeds 0 and 1 print the same tables both ways) and is 1.5-1.7x faster per iteration. The medians,
less disturbed by the other jobs, differ more: MAML 7.2 ms eager, 1.4 ms compiled. The whole
default run (MAML, 70,000 iterations, each in a fresh process with an empty inductor cache, two
runs at a time at load average about 4): compiled, 237-428 s in all, 33-58 s of compilation
included (then 1.4-3.3 ms per iteration; meta-training 144-284 s; 8 runs); eager, 546-683 s
(6.0-7.7 ms per iteration; meta-training 422-543 s; 6 runs), the pretrained baseline (eager in
both) and the evaluation taking the rest. Hence the rule (:data:`COMPILE_BY_DEFAULT`): runs of
:data:`COMPILE_FROM` = 20,000 iterations and more compile on CPU, above the cold break-even of a
fresh process with a margin for compile times that vary with the load, so that the paper's
70,000-iteration run is clearly faster compiled and the short runs of the tests and of quick tries
never wait for a compiler; ``--no-compile`` keeps them eager and ``--compile`` compiles a shorter
run. The rule was measured on CPU: on other devices the demo compiles only with ``--compile``. The
per-task path, iMAML and ``torchrun`` runs stay eager (``--compile`` there is an error).

Results. Compiled and eager compute the same meta-gradient up to float32 rounding. At the same
weights and batch the two differ by at most 1.6e-6 of the largest gradient entry (every iteration
of the first 1,000 of seed 0; every 5,000th of the full compiled runs below; and every one of the
70,000 iterations of the compiled seed-1 run), except at 5 iterations of those 70,000, where a
hidden unit's pre-activation lies within 3e-7 of ReLU's kink: the two roundings put it on different
sides, and the meta-gradients differ by 0.4-5%. At two of the three such iterations checked against
float64 (2,277 and 37,304: pre-activations 9e-9 and 3e-8 from the kink) the compiled meta-gradient
is the one that agrees with float64 (to 1e-6), at the third (32,659: 2.5e-7) the eager one:
rounding, on either path. They are not bit-identical (inductor's kernels sum in other orders than
eager PyTorch, exactly as the per-task path does): with seed 0 the weights differ by at most 7e-9
after one iteration and 6e-7 after 300, and the 300-iteration table is the same to every printed
digit; then Adam amplifies the rounding into a different trajectory (weights 0.05 apart after 1,000
iterations, as for the per-task path), so a 70,000-iteration table differs from the eager one of
the same seed as a run of another seed does. The full default runs (MSE after 1 and 10 fine-tuning
steps, mean over the 600 test tasks; seeds 0-1 compiled and 0-3 eager measured earlier, when only
the forward pass was compiled, which gives bit-identical weights):

====  ======================  ======================
seed  eager: 1 / 10 steps     compiled: 1 / 10 steps
====  ======================  ======================
0     0.336 / 0.112           0.361 / 0.142
1     0.346 / 0.106           0.332 / 2.5e12 (diverged)
2     (not recorded) / 0.115  0.343 / 0.103
3     (not recorded) / 0.107  0.338 / 0.107
4     0.338 / 0.111           0.354 / 0.107
5     0.354 / inf (diverged)  0.322 / 0.195
6     0.330 / 0.106           0.363 / 0.108
7     0.356 / 0.112           0.329 / 0.196
8     0.339 / 0.106
9     0.365 / 0.143
====  ======================  ======================

The MSE after 10 steps is not a stable statistic of a run: the meta-objective trains one inner step
only, and from some learned initialisations SGD with lr 0.01 diverges, or climbs for a few steps,
on a few test tasks of large amplitude, whichever way the initialisation was computed. One such
task out of 600 moves the mean from 0.11 to 2.5e12 (compiled, seed 1) or to infinity (eager, seed
5; printed ``inf ± nan``). Over these runs, after 1 step: 0.346 ± 0.012 eager (mean ± standard
deviation over 8 seeds, 0.330-0.365) and 0.343 ± 0.015 compiled (8 seeds, 0.322-0.363); after 10
steps, leaving out the one diverged run of each: 0.113 ± 0.012 eager (9 seeds, 0.106-0.143) and
0.137 ± 0.042 compiled (7 seeds, 0.103-0.196); fine-tuning diverged in 1 of 10 eager and 1 of 8
compiled runs. A permutation test of the means finds no significant difference (p = 0.70 after 1
step, 0.17 after 10), nor does a rank test of the 10-step MSE over all runs (p = 0.61). The
compiled sample holds more runs with a raised 10-step MSE (0.14 or more, diverged ones included: 4
of 8 against 2 of 10 eager, Fisher's p = 0.32); at these sample sizes that is within chance, and
the per-iteration checks above found no mechanism for a systematic difference. Compiled and eager
runs are indistinguishable to within the seed-to-seed spread.

Algorithms (``--algorithm``): each is a :class:`Learner` in :data:`ALGORITHMS` (MAML, first-order
MAML, Meta-SGD, ANIL, iMAML). A new one is a subclass with ``meta_step`` (and ``fine_tuning`` if it
fine-tunes test tasks otherwise than by SGD on the whole network) registered there under its option name; the command line offers whatever the registry holds. To
be compiled, it also defines ``batched_loss`` and sets ``compiles = True`` (see :class:`Learner`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _tracing, distributed, innerloop_ctx
from .. import compiled as compiled_api
from ..algorithms import MetaSGD, anil_step, imaml_step
from ..data import SinusoidTasks, TaskBatch
from .common import (
    TEST_SEED,
    DemoError,
    Progress,
    Summary,
    format_table,
    pyplot,
    save_figure,
    steps_label,
    summarize,
    table_json,
)

__all__ = [
    "DEFAULTS",
    "ALGORITHMS",
    "SinusoidConfig",
    "Learner",
    "FineTuning",
    "IMAML",
    "DIVERGED_ABOVE",
    "sinusoid_model",
    "COMPILE_FROM",
    "COMPILE_BY_DEFAULT",
    "compile_choice",
    "train_meta",
    "train_pretrained",
    "evaluate",
    "table",
    "plot",
    "run",
]

# The defaults of the options shared by all demos. 70,000 iterations: the paper's protocol, which
# the task-batched path meta-trains in about 3.2 minutes (2.7 ms per iteration) eagerly on one thread
# of the 2-core development machine when it is quiet (see docs/reference-run.md); compiled (the
# default from COMPILE_FROM iterations on, on CPU), in about 0.45x the time per iteration plus
# 35-60 s of compilation (module docstring).
DEFAULTS: dict[str, Any] = {"iterations": 70000, "shots": 10, "out": "higher-demo.png"}

#: From this many iterations on compiling pays; the default when :data:`COMPILE_BY_DEFAULT` (module docstring).
COMPILE_FROM = 20000
#: Whether the :data:`COMPILE_FROM` rule applies without ``--compile`` (module docstring).
COMPILE_BY_DEFAULT = True
#: torch.compile's backend for the meta-iteration (the tests use ``"aot_eager"``: the same graph, no C++ compilation).
COMPILE_BACKEND: str | Callable[..., Any] = "inductor"


def sinusoid_model() -> nn.Module:
    """The network of Finn et al. (2017) for regression: two hidden layers of 40 ReLU units."""
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))


#: A test task's fine-tuning *diverged* at a step where its query MSE is not finite or above this. The
#: targets lie within ±5, so predicting 0 scores at most 12.5 on a task; 100 is far beyond any sane
#: prediction. Such tasks are counted in the table, and the means are over the others (:func:`table`).
DIVERGED_ABOVE = 100.0


@dataclass
class SinusoidConfig:
    """The experiment's settings; the defaults are the paper's (but ``iterations``, always given).

    ``inner_steps`` ``None`` (the default) is the algorithm's own (:attr:`Learner.default_inner_steps`:
    1, the paper's, for MAML, first-order MAML and Meta-SGD; 10 for ANIL and iMAML), filled in at
    construction.
    """

    iterations: int
    shots: int = 10
    meta_batch: int = 25
    inner_lr: float = 0.01
    inner_steps: int | None = None
    meta_lr: float = 1e-3
    eval_steps: int = 10
    test_tasks: int = 600
    test_query: int = 100
    algorithm: str = "maml"
    per_task: bool = False
    seed: int = 0
    #: Compile the task-batched meta-iteration: ``True`` (``--compile``), ``False`` (``--no-compile``) or
    #: ``None``, decided by :func:`compile_choice` (compiled from :data:`COMPILE_FROM` iterations on, on CPU).
    compile: bool | None = None

    def __post_init__(self) -> None:
        if self.inner_steps is None and self.algorithm in ALGORITHMS:
            self.inner_steps = ALGORITHMS[self.algorithm].default_inner_steps

    @property
    def first_order(self) -> bool:
        return self.algorithm == "fomaml"


def task_mse(prediction: Tensor, target: Tensor) -> Tensor:
    """The MSE of each task of a task-batched prediction ``[T, n, 1]``: shape ``[T]``."""
    return (prediction - target).pow(2).flatten(1).mean(1)


# ------------------------------------------------------------------------------------ algorithms
@dataclass
class FineTuning:
    """How a test task is fine-tuned: the optimizer, what it adapts, and how each step is taken.

    :func:`evaluate` runs ``innerloop_ctx(model, inner_opt, override=override)`` and steps on
    the support MSE, plus ``proximal/2 |theta - theta_0|^2`` when ``proximal`` is set (iMAML's
    inner objective), with ``step_override(step)`` (step counted from 0) as the step's
    ``override`` when given (an override holds from its step on, until another replaces it).
    ``description`` is printed under the table.
    """

    model: nn.Module
    inner_opt: torch.optim.Optimizer
    description: str
    override: dict[str, Any] | None = None
    step_override: Callable[[int], dict[str, Any] | None] | None = None
    proximal: float = 0.0


class Learner:
    """A meta-learning algorithm on the sinusoid network: its meta-parameters, step and fine-tuning.

    ``model`` is the network whose initialisation is meta-learned. Subclasses define
    :meth:`meta_step`, which accumulates the meta-gradient of one meta-batch into ``.grad`` of
    :meth:`meta_parameters` and returns the mean query loss. :meth:`fine_tuning` says how a test
    task is fine-tuned (used by :func:`evaluate` for the meta-learned model): as the algorithm
    adapts in meta-training, so that the table measures what was meta-learned. Learners whose
    task-batched meta-step compiles (``compiles = True``) define :meth:`batched_loss`, and their
    ``meta_step`` goes through :meth:`compiled_step` once :meth:`compile` was called.
    """

    label = "?"
    #: Inner steps per task in meta-training when ``SinusoidConfig.inner_steps`` is not given.
    default_inner_steps = 1
    #: Meta-training iterations of ``higher demo sinusoid --algorithm NAME`` without ``--iterations``.
    default_iterations: int = 70000

    def __init__(self, model: nn.Module, config: SinusoidConfig) -> None:
        self.model, self.config = model, config
        self.inner_opt = torch.optim.SGD(model.parameters(), lr=config.inner_lr)
        #: The inner steps of meta-training (the config's, or :attr:`default_inner_steps`).
        self.steps = config.inner_steps if config.inner_steps is not None else self.default_inner_steps

    @classmethod
    def describe(cls, config: SinusoidConfig) -> str:
        """The inner loop of meta-training in words (the run's first line)."""
        steps = config.inner_steps if config.inner_steps is not None else cls.default_inner_steps
        return f"{steps} inner SGD step{'' if steps == 1 else 's'} (lr {config.inner_lr})"

    def meta_parameters(self) -> Iterable[nn.Parameter]:
        """What the outer optimizer (Adam) trains."""
        return self.model.parameters()

    def meta_step(self, batch: TaskBatch, per_task: bool) -> float:
        raise NotImplementedError

    def distribute(self) -> None:
        """Split each meta-batch across the ranks of the ``torchrun`` job (``higher.distributed``)."""
        raise DemoError(f"{self.label} does not run distributed (torchrun) yet; --algorithm maml and fomaml do")

    def fine_tuning(self) -> FineTuning:
        """How a test task is fine-tuned: SGD (``inner_lr``) on the whole network, as in the inner loop."""
        return FineTuning(self.model, self.inner_opt, f"SGD (lr {self.config.inner_lr}), whole network")

    def report(self) -> dict[str, Any] | None:
        """What the run prints and records (``--json``) about meta-training beyond the loss, if anything."""
        return None

    #: Whether :meth:`batched_loss` compiles into one graph and runs faster compiled (measured; see the
    #: module docstring). Only such learners are compiled, and only on the task-batched path.
    compiles = False
    #: The compiled meta-iteration once :meth:`compile` was called (then used by every task-batched step):
    #: the batch's four tensors in, the detached mean query loss out, the meta-gradient accumulated in ``.grad``.
    compiled: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor] | None = None
    #: Seconds of the first compiled meta-step (compilation and one iteration), set by :func:`train_meta`.
    compile_seconds: float | None = None
    #: Why compiling by default failed, after which :func:`train_meta` ran eagerly (``None``: it did not fail).
    compile_error: str | None = None
    #: The compiled :meth:`batched_loss` of ``compile(backward_inside=False)`` (the comparison's variant).
    _compiled_loss: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

    def batched_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> Tensor:
        """The mean query loss of a task-batched meta-batch, as a tensor: the part that is compiled."""
        raise NotImplementedError(f"{self.label} has no compiled task-batched meta-step")

    def batched_iteration(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> Tensor:
        """:meth:`batched_loss` and its backward pass (``higher.compiled.backward``): the detached loss."""
        loss = self.batched_loss(support_x, support_y, query_x, query_y)
        compiled_api.backward(loss)
        return loss.detach()

    def _loss_then_backward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> Tensor:
        loss = self._compiled_loss(support_x, support_y, query_x, query_y)
        loss.backward()
        return loss.detach()

    def compile(self, backend: str | Callable[..., Any] = "inductor", backward_inside: bool = True) -> None:
        """Compile the task-batched meta-iteration (``torch.compile(..., fullgraph=True)``) once for all meta-steps.

        With ``backward_inside`` (the default), :meth:`batched_iteration` is compiled: the inner
        loop, the query loss and the meta-gradient in one graph (``higher.compiled.backward``).
        Without it, only :meth:`batched_loss` is compiled and ``.backward()`` runs torch's backward
        pass of its graph (measured slower, module docstring; kept for the comparison). The
        function is compiled at its first call (the first meta-step) and reused as long as the
        shapes stay the same (they do: same meta-batch size, shots and steps every iteration).
        Adam's step and ``float(loss)`` run outside. ``backend`` is torch.compile's (tests use
        ``"aot_eager"``: the same graph without C++ compilation).
        """
        if not self.compiles:
            raise DemoError(f"{self.label} is not compiled (no faster one-graph meta-step); leave out --compile")
        if backward_inside:
            self.compiled = torch.compile(self.batched_iteration, fullgraph=True, backend=backend)
        else:
            self._compiled_loss = torch.compile(self.batched_loss, fullgraph=True, backend=backend)
            self.compiled = self._loss_then_backward

    def compiled_step(self, batch: TaskBatch) -> float:
        """A task-batched meta-step through the compiled meta-iteration: the meta-gradient into ``.grad``, the loss."""
        if self.compiled is None:
            raise RuntimeError("compiled_step before compile()")
        return float(self.compiled(*_stacked(batch)))


def batched_query_losses(
    model: nn.Module,
    inner_opt: torch.optim.Optimizer,
    batch: tuple[Tensor, Tensor, Tensor, Tensor],
    steps: int,
    first_order: bool = False,
    override: dict[str, Any] | None = None,
) -> Tensor:
    """The query loss of each task (shape ``[T]``) after ``steps`` inner steps, all tasks at once.

    ``batch`` is ``(support_x, support_y, query_x, query_y)`` with a leading task dimension. This
    is the part of a meta-iteration that ``torch.compile`` compiles (see :meth:`Learner.compile`).
    """
    support_x, support_y, query_x, query_y = batch
    with innerloop_ctx(
        model,
        inner_opt,
        copy_initial_weights=False,
        override=override,
        first_order=first_order,
        tasks=support_x.shape[0],
    ) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(task_mse(fmodel(support_x), support_y))
        return task_mse(fmodel(query_x), query_y)


def batched_meta_step(
    model: nn.Module,
    inner_opt: torch.optim.Optimizer,
    batch: tuple[Tensor, Tensor, Tensor, Tensor],
    steps: int,
    first_order: bool = False,
    override: dict[str, Any] | None = None,
) -> float:
    """MAML's meta-gradient of a stacked meta-batch, all tasks at once (task-batched mode).

    ``batch`` is ``(support_x, support_y, query_x, query_y)`` with a leading task dimension. As
    :func:`higher.algorithms.maml_step`, the mean query loss over tasks is backpropagated (into
    ``model.parameters()`` and the tensors of ``override`` that require grad) and returned.
    With a ``DistributedDataParallel`` model, this rank runs its share of the tasks and the
    gradient (all-reduced in the backward) and the returned loss are those of the whole batch.
    """
    num_tasks = batch[0].shape[0]
    if distributed.is_ddp(model):
        batch = distributed.share(*batch)  # type: ignore[assignment]
    losses = batched_query_losses(model, inner_opt, batch, steps, first_order, override)
    if distributed.is_ddp(model):
        (losses.sum() * distributed.task_weight(num_tasks)).backward()
        return distributed.mean_over_ranks(losses.detach().sum(), num_tasks)
    loss = losses.mean()
    loss.backward()
    return float(loss.detach())


def _stacked(batch: TaskBatch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return batch.support_x, batch.support_y, batch.query_x, batch.query_y


class MAML(Learner):
    """MAML, second order (Finn et al. 2017): :func:`higher.algorithms.maml_step` per task."""

    label = "MAML"
    first_order = False
    compiles = True
    net: nn.Module | None = None

    def distribute(self) -> None:
        self.net = nn.parallel.DistributedDataParallel(self.model)

    def meta_step(self, batch: TaskBatch, per_task: bool) -> float:
        steps = self.steps
        model = self.model if self.net is None else self.net
        if per_task:  # higher.algorithms.maml_step, or its split across ranks
            return distributed.maml_step(model, self.inner_opt, batch.tasks(), F.mse_loss, steps, self.first_order)
        if self.compiled is not None and self.net is None:
            return self.compiled_step(batch)
        return batched_meta_step(model, self.inner_opt, _stacked(batch), steps, self.first_order)

    def batched_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> Tensor:
        batch = (support_x, support_y, query_x, query_y)
        return batched_query_losses(self.model, self.inner_opt, batch, self.steps, self.first_order).mean()


class FirstOrderMAML(MAML):
    """First-order MAML: the inner gradients carry no graph."""

    label = "first-order MAML"
    first_order = True


class MetaSGDLearner(Learner):
    """Meta-SGD (Li et al. 2017): the initialisation and one learned inner learning rate per weight.

    The rates start at ``inner_lr``. Meta-training takes one inner step with them, as in the
    paper's regression experiments, and so does fine-tuning: the first step uses the learned rates,
    as meta-trained; the steps after it are plain SGD (``inner_lr``), the fine-tuning of the other
    rows. What Meta-SGD learns is a one-step update, not a descent method (seed 0's rates range
    from -8.3 to 4.2, a fifth of them negative): applied again and again, it diverged on 207 of the
    600 test tasks within 10 steps (``nan`` mean). Meta-training it for more steps, so that the
    rates would be learned for the table's 10, failed: with 10 inner steps the meta-loss became NaN
    at iteration 78 (at iteration 2,501 with the rates' Adam learning rate lowered to 1e-4), with 5
    within 30,000 iterations; Adam moves every rate by about 1e-3 per iteration, and a rate too
    large for one task's curvature blows its 10-step inner loop up (measured with seed 0).
    """

    label = "Meta-SGD"
    compiles = True

    def __init__(self, model: nn.Module, config: SinusoidConfig) -> None:
        super().__init__(model, config)
        self.meta_sgd = MetaSGD(model, lr=config.inner_lr)

    @classmethod
    def describe(cls, config: SinusoidConfig) -> str:
        steps = config.inner_steps if config.inner_steps is not None else cls.default_inner_steps
        return (
            f"{steps} inner SGD step{'' if steps == 1 else 's'} with learned per-weight rates (from {config.inner_lr})"
        )

    def meta_parameters(self) -> Iterable[nn.Parameter]:
        return self.meta_sgd.parameters()

    def _override(self) -> dict[str, Any]:
        from ..optim import PerParameter

        return {"lr": PerParameter(list(self.meta_sgd.lrs))}

    def meta_step(self, batch: TaskBatch, per_task: bool) -> float:
        if per_task:
            return self.meta_sgd.meta_step(batch.tasks(), F.mse_loss, self.steps)
        if self.compiled is not None:
            return self.compiled_step(batch)
        opt = self.meta_sgd.inner_opt
        return batched_meta_step(self.model, opt, _stacked(batch), self.steps, override=self._override())

    def batched_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> Tensor:
        batch = (support_x, support_y, query_x, query_y)
        opt = self.meta_sgd.inner_opt
        return batched_query_losses(self.model, opt, batch, self.steps, override=self._override()).mean()

    def fine_tuning(self) -> FineTuning:
        learned, steps, plain = self._override(), self.steps, {"lr": [self.config.inner_lr]}

        def step_override(step: int) -> dict[str, Any] | None:
            # An override holds from its step on, so the plain rate is given again, not left out.
            return learned if step < steps else plain

        rates = "step 1" if steps == 1 else f"steps 1-{steps}"
        return FineTuning(
            self.model,
            self.meta_sgd.inner_opt,
            f"{rates} with the learned per-weight rates (as meta-trained), then SGD (lr {self.config.inner_lr}); "
            "whole network",
            step_override=step_override,
        )


class ANIL(Learner):
    """ANIL (Raghu et al. 2020): the inner loop adapts the last layer only; both parts are meta-learned.

    Meta-trained with 10 inner steps (:attr:`default_inner_steps`), the table's number, and
    fine-tuned as it adapts there: SGD on the last layer only. With one inner step (the paper's
    MAML protocol, as before) the learned features made the head's 10-step fine-tuning diverge on
    some test tasks (MSE 0.708 after one step, 3.356 ± 6.221 after 10); with 10 inner steps it is
    stable, and each inner step costs only the 40-to-1 head's forward and backward pass (the
    compiled meta-iteration: 1.25 ms in the default seed-0 run, MAML's 1.74 with one step; 0.031 after
    10 fine-tuning steps, docs/reference-run.md).
    """

    label = "ANIL"
    compiles = True
    default_inner_steps = 10

    def __init__(self, model: nn.Module, config: SinusoidConfig) -> None:
        super().__init__(model, config)
        if not isinstance(model, nn.Sequential):
            raise TypeError("ANIL here splits an nn.Sequential into body (all but the last layer) and head")
        self.body, self.head = model[:-1], model[-1]
        self.head_opt = torch.optim.SGD(self.head.parameters(), lr=config.inner_lr)
        # Fine-tuning the whole network with an optimizer over the head's parameters only: the
        # body stays fixed, as in the inner loop.
        self.tuning_opt = torch.optim.SGD(self.head.parameters(), lr=config.inner_lr)

    @classmethod
    def describe(cls, config: SinusoidConfig) -> str:
        return f"{super().describe(config)} on the last layer only"

    def meta_step(self, batch: TaskBatch, per_task: bool) -> float:
        if per_task:
            return anil_step(self.body, self.head, self.head_opt, batch.tasks(), F.mse_loss, self.steps)
        if self.compiled is not None:
            return self.compiled_step(batch)
        support_x, support_y, query_x, query_y = _stacked(batch)
        features = (self.body(support_x), support_y, self.body(query_x), query_y)
        return batched_meta_step(self.head, self.head_opt, features, self.steps)

    def batched_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> Tensor:
        features = (self.body(support_x), support_y, self.body(query_x), query_y)
        return batched_query_losses(self.head, self.head_opt, features, self.steps).mean()

    def fine_tuning(self) -> FineTuning:
        return FineTuning(self.model, self.tuning_opt, f"SGD (lr {self.config.inner_lr}), last layer only")


class IMAML(Learner):
    """iMAML (Rajeswaran et al. 2019): implicit meta-gradients at the proximal inner problem's solution.

    Each task adapts by :attr:`default_inner_steps` steps of Rprop (lr ``inner_lr``, torch's other
    defaults) on ``support MSE + reg/2 |theta - phi|^2``, all tasks at once, and the meta-gradient
    is :func:`higher.algorithms.imaml_step`'s task-batched conjugate-gradient solve
    (:attr:`cg_iterations` iterations, :attr:`cg_damping`). Fine-tuning at test time is the same
    inner loop (Rprop on the proximal objective). Why these settings, measured on seed 0:

    * The implicit meta-gradient needs the proximal objective's Hessian ``H + reg I`` positive
      definite at the adapted weights. At a minimum of the proximal objective it is (checked: at
      L-BFGS minima its smallest eigenvalue was positive for reg 0.5 to 50); conjugate gradient met
      negative curvature only where the inner loop had *not* converged: where SGD diverged on a
      task. SGD diverges once the support loss's curvature exceeds ``2/lr``, and iMAML sharpens the
      network without limit (its meta-gradient assumes the inner problem solved and never sees the
      inner loop): with SGD, every reg, learning rate and damping tried failed within 280-1,100
      iterations (reg 50 and lr 0.01, the previous default: at iteration 279; its failing task's
      Hessian had eigenvalues from -52 to 160). Rprop's steps do not grow with the curvature (they
      adapt to the gradient's sign), so its inner loop never blows up.
    * ``cg_damping = 50``: the solve uses ``H + (reg + 50) I`` (as the official implementation's
      ``lam_damping``, default 10, which divides ``H`` by ``lam + lam_damping``; it also adds
      ``regu_coef I``, which this does not), which stays positive definite where 10 inner steps
      leave a task short of its minimum (ReLU kinks stop convergence there; without damping CG failed at the first
      meta-batch). The meta-gradient is then ``(I + H/(reg + 50))^-1`` times the query loss's
      gradient: a curvature-damped implicit gradient, between first-order MAML (damping infinite)
      and exact iMAML (damping 0).
    * ``reg = 2`` and 5 CG iterations, as in the official code's Omniglot example (``--lam 2.0
      --cg_steps 5``): the proximal term keeps the adapted weights near the initialisation without
      dominating the support loss.

    :attr:`default_iterations` 6,000: about 60 ms of CPU time per meta-iteration (25 tasks, 10 inner
    steps, 5 CG iterations, each batched over the tasks; one thread), so the whole run takes about
    6.5 minutes of CPU time (seed 0: 0.385 after 10 fine-tuning steps against the pretrained
    baseline's 1.840; docs/reference-run.md has the table). The implicit gradient is approximate
    here, and :meth:`report` says by how much: 10 Rprop steps leave the adapted weights short of the
    proximal minimum (inner gradient norm median 3.7 over the run's solves), and 5 CG iterations
    solve to a relative residual of about 0.006 (median; at most 0.12).
    """

    label = "iMAML"
    default_inner_steps = 10
    default_iterations = 6000
    reg = 2.0
    cg_damping = 50.0
    cg_iterations = 5

    def __init__(self, model: nn.Module, config: SinusoidConfig) -> None:
        super().__init__(model, config)
        self.inner_opt = torch.optim.Rprop(model.parameters(), lr=config.inner_lr)
        self.residuals: list[float] = []
        self.inner_gradient_norms: list[float] = []

    @classmethod
    def describe(cls, config: SinusoidConfig) -> str:
        steps = config.inner_steps if config.inner_steps is not None else cls.default_inner_steps
        return (
            f"{steps} inner Rprop steps (lr {config.inner_lr}) on support MSE + {cls.reg:g}/2 |theta - phi|^2, "
            f"conjugate gradient {cls.cg_iterations} iterations, damping {cls.cg_damping:g}"
        )

    def meta_step(self, batch: TaskBatch, per_task: bool) -> float:
        tasks: Any = batch.tasks() if per_task else _stacked(batch)
        try:
            result = imaml_step(
                self.model,
                self.inner_opt,
                tasks,
                F.mse_loss,
                inner_steps=self.steps,
                reg=self.reg,
                cg_iterations=self.cg_iterations,
                batched=not per_task,
                cg_damping=self.cg_damping,
            )
        except ValueError as error:
            if "positive definite" not in str(error):
                raise
            raise DemoError(
                f"iMAML: {error} (the demo's settings: higher.demos.sinusoid.IMAML.reg = {self.reg}, "
                f".cg_damping = {self.cg_damping})"
            ) from error
        self.residuals.extend(result.residuals)
        self.inner_gradient_norms.extend(result.inner_gradient_norms)
        return result.loss

    def report(self) -> dict[str, Any] | None:
        if not self.residuals:
            return None

        def quantiles(values: list[float]) -> dict[str, float]:
            ordered = sorted(values)
            return {
                "median": ordered[len(ordered) // 2],
                "p99": ordered[int(0.99 * (len(ordered) - 1))],
                "max": ordered[-1],
            }

        return {
            "cg_relative_residual": quantiles(self.residuals),
            "inner_gradient_norm": quantiles(self.inner_gradient_norms),
            "solves": len(self.residuals),
        }

    def fine_tuning(self) -> FineTuning:
        return FineTuning(
            self.model,
            self.inner_opt,
            f"Rprop (lr {self.config.inner_lr}) on support MSE + {self.reg:g}/2 |theta - phi|^2 (its inner loop); "
            "whole network",
            proximal=self.reg,
        )


#: ``--algorithm`` name -> its :class:`Learner`. Register new algorithms here.
ALGORITHMS: dict[str, type[Learner]] = {
    "maml": MAML,
    "fomaml": FirstOrderMAML,
    "metasgd": MetaSGDLearner,
    "anil": ANIL,
    "imaml": IMAML,
}


# ------------------------------------------------------------------------------------ training
def compile_choice(config: SinusoidConfig, device: torch.device) -> tuple[bool, str]:
    """Whether meta-training compiles its meta-iteration, and why (printed, and in ``--json``).

    ``config.compile`` ``True``/``False`` decides (``True`` where nothing compiles is a
    :class:`DemoError`); ``None`` compiles the task-batched meta-step of the algorithms that
    compile (MAML, first-order MAML, Meta-SGD, ANIL) on CPU from :data:`COMPILE_FROM` iterations
    on, where compilation pays for itself (module docstring). Per-task, iMAML and ``torchrun``
    runs stay eager.
    """
    learner = ALGORITHMS[config.algorithm]
    eager_only = None
    if distributed.rank_and_world_size()[1] > 1:
        eager_only = "distributed (torchrun) runs are not compiled"
    elif config.per_task:
        eager_only = "the per-task path (--per-task) is not compiled"
    elif not learner.compiles:
        eager_only = f"{learner.label} is not compiled"
    if eager_only is not None:
        if config.compile:
            raise DemoError(f"--compile: {eager_only}; leave out --compile")
        return False, eager_only
    if config.compile is not None:
        if config.compile and not _tracing.compile_supported():
            raise DemoError(f"--compile: {_cannot_compile()}; leave out --compile")
        return config.compile, "--compile" if config.compile else "--no-compile"
    if not COMPILE_BY_DEFAULT:
        return False, "not compiled by default (see higher.demos.sinusoid); --compile compiles"
    if device.type != "cpu":
        return False, f"not compiled by default on {device.type} (measured on CPU only); --compile compiles"
    if config.iterations < COMPILE_FROM:
        return False, f"{config.iterations} < {COMPILE_FROM} iterations: compiling would not pay; --compile compiles"
    if not _tracing.compile_supported():
        return False, _cannot_compile()
    return True, f"{config.iterations} >= {COMPILE_FROM} iterations: compiling pays; --no-compile runs eagerly"


def _cannot_compile() -> str:
    return (
        f"torch {torch.__version__} cannot compile an inner loop (that needs torch >= {_tracing.COMPILE_NEEDS_TORCH})"
    )


def train_meta(
    config: SinusoidConfig, device: torch.device, progress: bool, quiet: bool = False
) -> tuple[Learner, float]:
    """Meta-train a fresh network with ``config.algorithm``; returns the :class:`Learner` and the loop's seconds.

    The meta-iteration is compiled when :func:`compile_choice` says so; the learner's
    ``compile_seconds`` is then the first meta-step's time (compilation and one iteration).
    """
    compiled, _ = compile_choice(config, device)
    torch.manual_seed(config.seed)
    learner = ALGORITHMS[config.algorithm](sinusoid_model().to(device), config)
    if distributed.rank_and_world_size()[1] > 1:  # torchrun: every rank samples the same batches, runs its share
        learner.distribute()
    if compiled:
        learner.compile(COMPILE_BACKEND)
    sampler = SinusoidTasks(shots=config.shots, seed=config.seed)
    meta_opt = torch.optim.Adam(learner.meta_parameters(), lr=config.meta_lr)
    bar = Progress(config.iterations, progress, learner.label, quiet=quiet)
    for iteration in range(1, config.iterations + 1):
        batch = sampler.sample(config.meta_batch).to(device)
        start = time.perf_counter()
        meta_opt.zero_grad()
        if compiled and iteration == 1:
            loss = _first_compiled_step(learner, batch, config, quiet)
            compiled = learner.compiled is not None
        else:
            loss = learner.meta_step(batch, config.per_task)
        meta_opt.step()
        if compiled and iteration == 1:
            learner.compile_seconds = time.perf_counter() - start
        bar.update(iteration, loss)
    return learner, bar.close()


def _first_compiled_step(learner: Learner, batch: TaskBatch, config: SinusoidConfig, quiet: bool) -> float:
    """The first compiled meta-step, where ``torch.compile`` compiles.

    If compiling fails (inductor needs a C++ compiler on CPU, say) and compiling was only the
    default, the run says why and goes on eagerly (``learner.compile_error``); with ``--compile``
    the failure is a :class:`DemoError`.
    """
    try:
        return learner.meta_step(batch, config.per_task)
    except Exception as error:
        reason = " ".join(f"{type(error).__name__}: {error}".split())[:300]
        if config.compile:
            raise DemoError(f"--compile: torch.compile failed ({reason}); --no-compile runs eagerly") from error
        learner.compiled, learner.compile_error = None, reason
        for parameter in learner.meta_parameters():
            parameter.grad = None
        if not quiet:
            print(f"compilation failed ({reason}); meta-training eagerly instead (--no-compile skips it)", flush=True)
        return learner.meta_step(batch, config.per_task)


def train_pretrained(config: SinusoidConfig, device: torch.device) -> nn.Module:
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


# ------------------------------------------------------------------------------------ evaluation
def evaluate(
    model: nn.Module,
    inner_opt: torch.optim.Optimizer,
    config: SinusoidConfig,
    device: torch.device,
    override: dict[str, Any] | None = None,
    plot_tasks: int = 3,
    *,
    step_override: Callable[[int], dict[str, Any] | None] | None = None,
    proximal: float = 0.0,
) -> tuple[list[list[float]], dict[str, Any]]:
    """Fine-tune on each test task's K points with ``inner_opt``; the query MSE after each step.

    Returns the per-task MSE after 0..eval_steps steps, and the predictions on a grid for the
    first ``plot_tasks`` tasks after 0, 1 and eval_steps steps. All test tasks are fine-tuned
    at once (task-batched) unless ``config.per_task``. Each step minimises the support MSE, plus
    ``proximal/2 |theta - theta_0|^2`` if ``proximal`` (iMAML's inner objective), with
    ``step_override(step)`` as that step's ``override`` (step counted from 0) if given
    (:class:`FineTuning` holds all of these for a learner).
    """

    def objective(support: Tensor, params: Iterable[Tensor], initial: list[Tensor]) -> Tensor:
        """The support loss (per task: ``[T]`` task-batched), plus the proximal term if any."""
        if not proximal:
            return support
        squares = [((p - p0) ** 2).reshape(*support.shape, -1).sum(-1) for p, p0 in zip(params, initial)]
        return support + proximal / 2 * sum(squares)

    def step_options(step: int) -> dict[str, Any]:
        chosen = None if step_override is None else step_override(step)
        return {} if chosen is None else {"override": chosen}

    sampler = SinusoidTasks(shots=config.shots, query=config.test_query, seed=TEST_SEED)
    batch = sampler.sample(config.test_tasks).to(device)
    grid = torch.linspace(-5, 5, 200, device=device).reshape(-1, 1)
    shown_steps = sorted({0, 1, config.eval_steps})
    plot_tasks = min(plot_tasks, config.test_tasks)
    shown: list[dict[int, Tensor]] = [{} for _ in range(plot_tasks)]
    if config.per_task:
        curves = []
        for index, (support_x, support_y, query_x, query_y) in enumerate(batch.tasks()):
            with innerloop_ctx(model, inner_opt, override=override, track_higher_grads=False) as (fmodel, diffopt):
                initial = [p.detach() for p in fmodel.parameters()]
                mse = []
                for step in range(config.eval_steps + 1):
                    with torch.no_grad():
                        mse.append(float(F.mse_loss(fmodel(query_x), query_y)))
                        if index < plot_tasks and step in shown_steps:
                            shown[index][step] = fmodel(grid).squeeze(-1).cpu()
                    if step < config.eval_steps:
                        loss = objective(F.mse_loss(fmodel(support_x), support_y), fmodel.parameters(), initial)
                        diffopt.step(loss, **step_options(step))
            curves.append(mse)
    else:
        tasks = config.test_tasks
        grids = grid.expand(tasks, -1, -1)
        by_step = []
        with innerloop_ctx(model, inner_opt, override=override, track_higher_grads=False, tasks=tasks) as (
            fmodel,
            diffopt,
        ):
            initial = [p.detach() for p in fmodel.parameters()]
            for step in range(config.eval_steps + 1):
                with torch.no_grad():
                    by_step.append(task_mse(fmodel(batch.query_x), batch.query_y))
                    if step in shown_steps:
                        predictions = fmodel(grids)[:plot_tasks].squeeze(-1).cpu()
                        for index in range(plot_tasks):
                            shown[index][step] = predictions[index]
                if step < config.eval_steps:
                    support = task_mse(fmodel(batch.support_x), batch.support_y)
                    loss = objective(support, fmodel.parameters(), initial)
                    diffopt.step(loss, **step_options(step))
        curves = torch.stack(by_step, dim=1).tolist()
    predictions_out: dict[str, Any] = {"grid": grid.cpu(), "tasks": []}
    for index in range(plot_tasks):
        amplitude, phase = batch.amplitude[index], batch.phase[index]
        predictions_out["tasks"].append(
            {
                "support_x": batch.support_x[index].squeeze(-1).cpu(),
                "support_y": batch.support_y[index].squeeze(-1).cpu(),
                "true": SinusoidTasks.curve(grid.unsqueeze(0), amplitude.reshape(1), phase.reshape(1))[0]
                .squeeze(-1)
                .cpu(),
                "predictions": shown[index],
            }
        )
    return curves, predictions_out


def step_summary(curves: list[list[float]], step: int) -> Summary:
    """The MSE after ``step`` steps over the test tasks: mean and 95% interval of the tasks whose
    fine-tuning did not diverge (:data:`DIVERGED_ABOVE`), and how many did."""
    return summarize([c[step] for c in curves], DIVERGED_ABOVE)


def table_rows(
    results: dict[str, list[list[float]]], config: SinusoidConfig
) -> tuple[list[str], dict[str, list[Summary]]]:
    """The table's columns (0, 1 and eval_steps steps) and its cells (:func:`step_summary`)."""
    steps = sorted({0, 1, config.eval_steps})
    rows = {name: [step_summary(curves, s) for s in steps] for name, curves in results.items()}
    return [steps_label(s) for s in steps], rows


def table(results: dict[str, list[list[float]]], config: SinusoidConfig, tuning: dict[str, str] | None = None) -> str:
    """The printed table: MSE after 0, 1 and eval_steps steps, mean ± 95% interval.

    ``tuning`` (method -> its fine-tuning in words) is printed under it. A test task whose
    fine-tuning diverged (query MSE not finite or above :data:`DIVERGED_ABOVE`) is not averaged in:
    the cell says how many did, and a note under the table says so.
    """
    columns, rows = table_rows(results, config)
    title = f"MSE on {config.test_tasks} test tasks after fine-tuning on K={config.shots} points; mean ± 95% interval"
    lines = [format_table(title, columns, rows, digits=3)]
    if tuning:
        lines += ["fine-tuning:"] + [f"  {name}: {text}" for name, text in tuning.items()]
    if any(cell.diverged for row in rows.values() for cell in row):
        lines.append(
            f"(k diverged): the fine-tuning diverged on k of the {config.test_tasks} test tasks (query MSE not finite "
            f"or above {DIVERGED_ABOVE:g}); mean and interval are over the others"
        )
    return "\n".join(lines)


def plot(
    path: Path, results: dict[str, list[list[float]]], shown: dict[str, dict[str, Any]], config: SinusoidConfig
) -> None:
    """Test tasks before and after fine-tuning (as the paper's Figure 2), and the MSE against steps."""
    plt = pyplot()
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
            for step, prediction in sorted(task["predictions"].items()):
                ax.plot(
                    grid, prediction, color=colors.get(step, "tab:blue"), ls="--", label=f"after {steps_label(step)}"
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
        stats = [step_summary(curves, s)[:2] for s in steps]
        means = [m for m, _ in stats]
        line = ax.plot(steps, means, marker="o", label=name)[0]
        ax.fill_between(
            steps, [m - h for m, h in stats], [m + h for m, h in stats], color=line.get_color(), alpha=0.25, lw=0
        )
    ax.set_xlabel("inner SGD steps at test time")
    ax.set_ylabel(f"mean MSE on {config.test_tasks} test tasks (band: 95% interval)")
    ax.set_title(f"K={config.shots}: MSE against steps")
    ax.set_yscale("log")
    ax.legend()
    save_figure(fig, path)
    plt.close(fig)


def _report_line(report: dict[str, Any]) -> str:
    """iMAML's :meth:`IMAML.report` in one printed line."""
    residual, norm = report["cg_relative_residual"], report["inner_gradient_norm"]
    return (
        f"conjugate gradient over {report['solves']} solves: relative residual median {residual['median']:.2g}, "
        f"99th percentile {residual['p99']:.2g}, max {residual['max']:.2g}; inner gradient norm at the adapted "
        f"weights median {norm['median']:.2g}, max {norm['max']:.2g} (0 at the proximal problem's minimum)"
    )


def run(config: SinusoidConfig, device: torch.device, out: Path, progress: bool = True) -> dict[str, Any]:
    """The whole demo: meta-train, train the baseline, evaluate both, print the table, write the PNG.

    Returns the record printed by ``--json``: the options, the table's numbers (with the number
    of diverged test tasks per cell), the mean MSE after every step (over the tasks that did not
    diverge) and the number that did, each method's fine-tuning in words, the timings, ``compile``:
    whether the meta-iteration was compiled, why, and the first (compiling) meta-step's seconds
    (``per_iteration_ms`` then counts the others), and ``meta_training``: what the learner reports
    about its meta-training (iMAML: the conjugate-gradient residuals), or ``None``.
    """
    start = time.perf_counter()
    compiled, why = compile_choice(config, device)  # a bad --compile fails here, before anything runs
    pyplot()  # without matplotlib, say so now rather than after the whole run
    learner_type = ALGORITHMS[config.algorithm]
    label = learner_type.label
    path = "per-task loop" if config.per_task else f"task-batched, {config.meta_batch} tasks at once"
    ranks = distributed.rank_and_world_size()[1]
    if ranks > 1:
        path = f"{'per-task loop' if config.per_task else 'task-batched'}, split across {ranks} ranks"
    print(
        f"{label} on sinusoid regression (Finn et al. 2017): 40-40 ReLU MLP, K={config.shots}, "
        f"{learner_type.describe(config)}, meta-batch {config.meta_batch} ({path}), "
        f"Adam (lr {config.meta_lr}), {config.iterations} iterations, seed {config.seed}, {device}",
        flush=True,
    )
    print(f"{'compiled' if compiled else 'eager'} meta-iteration: {why}", flush=True)
    rank, world = distributed.rank_and_world_size()
    learner, loop_seconds = train_meta(config, device, progress=progress and rank == 0)
    if rank != 0:  # the other ranks of a torchrun job only share the meta-training
        return {}
    trained = time.perf_counter()
    if learner.compile_error is not None:
        compiled, why = False, f"compilation failed ({learner.compile_error}); ran eagerly"
    compile_seconds = learner.compile_seconds
    # With compilation: the time per iteration after the first (compiling) one.
    timed = config.iterations - (compile_seconds is not None)
    loop_seconds -= compile_seconds or 0.0
    per_iteration = loop_seconds / timed if timed else float("nan")
    compiling = "" if compile_seconds is None else f" after {compile_seconds:.0f}s of compilation"
    if timed:
        rate = f"{1e3 * per_iteration:.2f} ms per iteration{compiling}"
    elif compile_seconds is not None:  # --compile --iterations 1: the one iteration compiled
        rate = f"one iteration, {compile_seconds:.0f}s with its compilation"
    else:
        rate = "no meta-training iterations"
    print(
        f"meta-training took {trained - start:.0f}s ({rate}); training the pretrained baseline...",
        flush=True,
    )
    pretrained = train_pretrained(config, device)
    baseline_done = time.perf_counter()
    report = learner.report()
    if report is not None:
        print(_report_line(report), flush=True)
    results, shown = {}, {}
    tuning = learner.fine_tuning()
    results[label], shown[label] = evaluate(
        tuning.model,
        tuning.inner_opt,
        config,
        device,
        tuning.override,
        step_override=tuning.step_override,
        proximal=tuning.proximal,
    )
    baseline_opt = torch.optim.SGD(pretrained.parameters(), lr=config.inner_lr)
    results["pretrained"], shown["pretrained"] = evaluate(pretrained, baseline_opt, config, device)
    evaluated = time.perf_counter()
    described = {label: tuning.description, "pretrained": f"SGD (lr {config.inner_lr}), whole network"}
    print(table(results, config, described))
    plot(out, results, shown, config)
    total = time.perf_counter() - start
    print(f"wrote {out}  (total {total:.0f}s)", flush=True)
    columns, rows = table_rows(results, config)
    return {
        "experiment": "sinusoid",
        "options": {**asdict(config), "device": device, "out": out},
        "table": table_json(columns, rows),
        "mse_by_step": {
            name: [step_summary(curves, s).mean for s in range(config.eval_steps + 1)]
            for name, curves in results.items()
        },
        "diverged_by_step": {
            name: [step_summary(curves, s).diverged for s in range(config.eval_steps + 1)]
            for name, curves in results.items()
        },
        "fine_tuning": described,
        "meta_training": report,
        "compile": {"used": compiled, "reason": why, "compile_s": compile_seconds},
        "timings": {
            "meta_training_s": trained - start,
            "per_iteration_ms": 1e3 * per_iteration,
            "compile_s": compile_seconds,
            "baseline_s": baseline_done - trained,
            "evaluation_s": evaluated - baseline_done,
            "total_s": total,
        },
    }
