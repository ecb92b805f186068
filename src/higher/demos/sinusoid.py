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
MAML, Meta-SGD, ANIL, iMAML). A new one is a subclass with ``meta_step`` (and ``adaptation`` if its fine-tuning differs)
registered there under its option name; the command line offers whatever the registry holds. To
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

from .. import compiled as compiled_api
from .. import distributed, innerloop_ctx
from ..algorithms import MetaSGD, anil_step, imaml_step
from ..data import SinusoidTasks, TaskBatch
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

__all__ = [
    "DEFAULTS",
    "ALGORITHMS",
    "SinusoidConfig",
    "Learner",
    "IMAML",
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


@dataclass
class SinusoidConfig:
    """The experiment's settings; the defaults are the paper's (but ``iterations``, always given)."""

    iterations: int
    shots: int = 10
    meta_batch: int = 25
    inner_lr: float = 0.01
    inner_steps: int = 1
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

    @property
    def first_order(self) -> bool:
        return self.algorithm == "fomaml"


def task_mse(prediction: Tensor, target: Tensor) -> Tensor:
    """The MSE of each task of a task-batched prediction ``[T, n, 1]``: shape ``[T]``."""
    return (prediction - target).pow(2).flatten(1).mean(1)


# ------------------------------------------------------------------------------------ algorithms
class Learner:
    """A meta-learning algorithm on the sinusoid network: its meta-parameters, step and fine-tuning.

    ``model`` is the network whose initialisation is meta-learned. Subclasses define
    :meth:`meta_step`, which accumulates the meta-gradient of one meta-batch into ``.grad`` of
    :meth:`meta_parameters` and returns the mean query loss. :meth:`adaptation` says how a test
    task is fine-tuned (used by :func:`evaluate` for the meta-learned model). Learners whose
    task-batched meta-step compiles (``compiles = True``) define :meth:`batched_loss`, and their
    ``meta_step`` goes through :meth:`compiled_step` once :meth:`compile` was called.
    """

    label = "?"

    def __init__(self, model: nn.Module, config: SinusoidConfig) -> None:
        self.model, self.config = model, config
        self.inner_opt = torch.optim.SGD(model.parameters(), lr=config.inner_lr)

    def meta_parameters(self) -> Iterable[nn.Parameter]:
        """What the outer optimizer (Adam) trains."""
        return self.model.parameters()

    def meta_step(self, batch: TaskBatch, per_task: bool) -> float:
        raise NotImplementedError

    def distribute(self) -> None:
        """Split each meta-batch across the ranks of the ``torchrun`` job (``higher.distributed``)."""
        raise DemoError(f"{self.label} does not run distributed (torchrun) yet; --algorithm maml and fomaml do")

    def adaptation(self) -> tuple[nn.Module, torch.optim.Optimizer, dict[str, Any] | None]:
        """``(model, inner optimizer, override)`` for fine-tuning on a test task."""
        return self.model, self.inner_opt, None

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
        steps = self.config.inner_steps
        model = self.model if self.net is None else self.net
        if per_task:  # higher.algorithms.maml_step, or its split across ranks
            return distributed.maml_step(model, self.inner_opt, batch.tasks(), F.mse_loss, steps, self.first_order)
        if self.compiled is not None and self.net is None:
            return self.compiled_step(batch)
        return batched_meta_step(model, self.inner_opt, _stacked(batch), steps, self.first_order)

    def batched_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> Tensor:
        batch = (support_x, support_y, query_x, query_y)
        steps = self.config.inner_steps
        return batched_query_losses(self.model, self.inner_opt, batch, steps, self.first_order).mean()


class FirstOrderMAML(MAML):
    """First-order MAML: the inner gradients carry no graph."""

    label = "first-order MAML"
    first_order = True


class MetaSGDLearner(Learner):
    """Meta-SGD (Li et al. 2017): the initialisation and one learned inner learning rate per weight.

    The rates start at ``inner_lr`` and are used, as learned, when fine-tuning on test tasks.
    """

    label = "Meta-SGD"
    compiles = True

    def __init__(self, model: nn.Module, config: SinusoidConfig) -> None:
        super().__init__(model, config)
        self.meta_sgd = MetaSGD(model, lr=config.inner_lr)

    def meta_parameters(self) -> Iterable[nn.Parameter]:
        return self.meta_sgd.parameters()

    def _override(self) -> dict[str, Any]:
        from ..optim import PerParameter

        return {"lr": PerParameter(list(self.meta_sgd.lrs))}

    def meta_step(self, batch: TaskBatch, per_task: bool) -> float:
        steps = self.config.inner_steps
        if per_task:
            return self.meta_sgd.meta_step(batch.tasks(), F.mse_loss, steps)
        if self.compiled is not None:
            return self.compiled_step(batch)
        return batched_meta_step(self.model, self.meta_sgd.inner_opt, _stacked(batch), steps, override=self._override())

    def batched_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> Tensor:
        batch = (support_x, support_y, query_x, query_y)
        steps, opt = self.config.inner_steps, self.meta_sgd.inner_opt
        return batched_query_losses(self.model, opt, batch, steps, override=self._override()).mean()

    def adaptation(self) -> tuple[nn.Module, torch.optim.Optimizer, dict[str, Any] | None]:
        return self.model, self.meta_sgd.inner_opt, self._override()


class ANIL(Learner):
    """ANIL (Raghu et al. 2020): the inner loop adapts the last layer only; both parts are meta-learned."""

    label = "ANIL"
    compiles = True

    def __init__(self, model: nn.Module, config: SinusoidConfig) -> None:
        super().__init__(model, config)
        if not isinstance(model, nn.Sequential):
            raise TypeError("ANIL here splits an nn.Sequential into body (all but the last layer) and head")
        self.body, self.head = model[:-1], model[-1]
        self.head_opt = torch.optim.SGD(self.head.parameters(), lr=config.inner_lr)
        # Fine-tuning the whole network with an optimizer over the head's parameters only: the
        # body stays fixed, as in the inner loop.
        self.tuning_opt = torch.optim.SGD(self.head.parameters(), lr=config.inner_lr)

    def meta_step(self, batch: TaskBatch, per_task: bool) -> float:
        steps = self.config.inner_steps
        if per_task:
            return anil_step(self.body, self.head, self.head_opt, batch.tasks(), F.mse_loss, steps)
        if self.compiled is not None:
            return self.compiled_step(batch)
        support_x, support_y, query_x, query_y = _stacked(batch)
        features = (self.body(support_x), support_y, self.body(query_x), query_y)
        return batched_meta_step(self.head, self.head_opt, features, steps)

    def batched_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> Tensor:
        features = (self.body(support_x), support_y, self.body(query_x), query_y)
        return batched_query_losses(self.head, self.head_opt, features, self.config.inner_steps).mean()

    def adaptation(self) -> tuple[nn.Module, torch.optim.Optimizer, dict[str, Any] | None]:
        return self.model, self.tuning_opt, None


class IMAML(Learner):
    """iMAML (Rajeswaran et al. 2019): implicit meta-gradients at the proximal inner problem's solution.

    Each task adapts by :attr:`steps` SGD steps (lr ``inner_lr``) on ``support MSE + reg/2 |theta -
    phi|^2``, and the meta-gradient is :func:`higher.algorithms.imaml_step`'s conjugate-gradient
    solve (:attr:`cg_iterations` iterations). ``reg = 50``: conjugate gradient needs the proximal
    objective's Hessian ``H + reg I`` positive definite, and on this network the support MSE's
    Hessian has large negative eigenvalues where the residuals are large (amplitudes up to 5):
    measured with seed 0, reg 1 and 5 failed at the first meta-batch (24 and 12 of 25 tasks),
    reg 20 at the second, reg 50 ran 150 iterations without a failure. With reg 50 and lr 0.01
    each inner step halves the distance to the proximal solution, so 10 steps reach it to about
    1e-3. The price is a small adaptation (theta moves about grad/50). The inner loop runs task
    by task (no task-batched path), so ``--per-task`` changes nothing; fine-tuning at test time is
    plain SGD as for MAML.
    """

    label = "iMAML"
    reg = 50.0
    steps = 10
    cg_iterations = 10

    def meta_step(self, batch: TaskBatch, per_task: bool) -> float:
        try:
            return imaml_step(
                self.model,
                self.inner_opt,
                batch.tasks(),
                F.mse_loss,
                inner_steps=max(self.steps, self.config.inner_steps),
                reg=self.reg,
                cg_iterations=self.cg_iterations,
            )
        except ValueError as error:
            if "positive definite" not in str(error):
                raise
            raise DemoError(f"iMAML: {error} (set higher.demos.sinusoid.IMAML.reg, now {self.reg}, higher)") from error


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
        return config.compile, "--compile" if config.compile else "--no-compile"
    if not COMPILE_BY_DEFAULT:
        return False, "not compiled by default (see higher.demos.sinusoid); --compile compiles"
    if device.type != "cpu":
        return False, f"not compiled by default on {device.type} (measured on CPU only); --compile compiles"
    if config.iterations < COMPILE_FROM:
        return False, f"{config.iterations} < {COMPILE_FROM} iterations: compiling would not pay; --compile compiles"
    return True, f"{config.iterations} >= {COMPILE_FROM} iterations: compiling pays; --no-compile runs eagerly"


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
) -> tuple[list[list[float]], dict[str, Any]]:
    """Fine-tune on each test task's K points with ``inner_opt``; the query MSE after each step.

    Returns the per-task MSE after 0..eval_steps steps, and the predictions on a grid for the
    first ``plot_tasks`` tasks after 0, 1 and eval_steps steps. All test tasks are fine-tuned
    at once (task-batched) unless ``config.per_task``.
    """
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
                mse = []
                for step in range(config.eval_steps + 1):
                    with torch.no_grad():
                        mse.append(float(F.mse_loss(fmodel(query_x), query_y)))
                        if index < plot_tasks and step in shown_steps:
                            shown[index][step] = fmodel(grid).squeeze(-1).cpu()
                    if step < config.eval_steps:
                        diffopt.step(F.mse_loss(fmodel(support_x), support_y))
            curves.append(mse)
    else:
        tasks = config.test_tasks
        grids = grid.expand(tasks, -1, -1)
        by_step = []
        with innerloop_ctx(model, inner_opt, override=override, track_higher_grads=False, tasks=tasks) as (
            fmodel,
            diffopt,
        ):
            for step in range(config.eval_steps + 1):
                with torch.no_grad():
                    by_step.append(task_mse(fmodel(batch.query_x), batch.query_y))
                    if step in shown_steps:
                        predictions = fmodel(grids)[:plot_tasks].squeeze(-1).cpu()
                        for index in range(plot_tasks):
                            shown[index][step] = predictions[index]
                if step < config.eval_steps:
                    diffopt.step(task_mse(fmodel(batch.support_x), batch.support_y))
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


def table_rows(
    results: dict[str, list[list[float]]], config: SinusoidConfig
) -> tuple[list[str], dict[str, list[tuple[float, float]]]]:
    """The table's columns (0, 1 and eval_steps steps) and its ``(mean, half-width)`` cells."""
    steps = sorted({0, 1, config.eval_steps})
    rows = {name: [mean_interval([c[s] for c in curves]) for s in steps] for name, curves in results.items()}
    return [steps_label(s) for s in steps], rows


def table(results: dict[str, list[list[float]]], config: SinusoidConfig) -> str:
    """The printed table: MSE after 0, 1 and eval_steps steps, mean ± 95% interval."""
    columns, rows = table_rows(results, config)
    title = (
        f"MSE on {config.test_tasks} test tasks after fine-tuning on K={config.shots} points with SGD "
        f"(lr {config.inner_lr}); mean ± 95% interval"
    )
    return format_table(title, columns, rows, digits=3)


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
        stats = [mean_interval([c[s] for c in curves]) for s in steps]
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


def run(config: SinusoidConfig, device: torch.device, out: Path, progress: bool = True) -> dict[str, Any]:
    """The whole demo: meta-train, train the baseline, evaluate both, print the table, write the PNG.

    Returns the record printed by ``--json``: the options, the table's numbers, the mean MSE
    after every step, the timings, and ``compile``: whether the meta-iteration was compiled, why,
    and the first (compiling) meta-step's seconds (``per_iteration_ms`` then counts the others).
    """
    start = time.perf_counter()
    compiled, why = compile_choice(config, device)  # a bad --compile fails here, before anything runs
    pyplot()  # without matplotlib, say so now rather than after the whole run
    label = ALGORITHMS[config.algorithm].label
    path = "per-task loop" if config.per_task else f"task-batched, {config.meta_batch} tasks at once"
    ranks = distributed.rank_and_world_size()[1]
    if ranks > 1:
        path = f"{'per-task loop' if config.per_task else 'task-batched'}, split across {ranks} ranks"
    print(
        f"{label} on sinusoid regression (Finn et al. 2017): 40-40 ReLU MLP, K={config.shots}, "
        f"{config.inner_steps} inner SGD step (lr {config.inner_lr}), meta-batch {config.meta_batch} ({path}), "
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
    results, shown = {}, {}
    model, inner_opt, override = learner.adaptation()
    results[label], shown[label] = evaluate(model, inner_opt, config, device, override)
    baseline_opt = torch.optim.SGD(pretrained.parameters(), lr=config.inner_lr)
    results["pretrained"], shown["pretrained"] = evaluate(pretrained, baseline_opt, config, device)
    evaluated = time.perf_counter()
    print(table(results, config))
    plot(out, results, shown, config)
    total = time.perf_counter() - start
    print(f"wrote {out}  (total {total:.0f}s)", flush=True)
    columns, rows = table_rows(results, config)
    return {
        "experiment": "sinusoid",
        "options": {**asdict(config), "device": device, "out": out},
        "table": table_json(columns, rows),
        "mse_by_step": {
            name: [mean_interval([c[s] for c in curves])[0] for s in range(config.eval_steps + 1)]
            for name, curves in results.items()
        },
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
