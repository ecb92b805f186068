"""The differential-testing harness: generated problems, one reference, every mode.

A :class:`Problem` is a meta-iteration as users write it: a model from a zoo (MLP, conv with
BatchNorm, dropout, an RNN, a parametrization, shared, frozen and unused parameters), an inner
optimizer with a combination of its options, hyperparameters given as numbers or as tensors in
the forms users write (leaf tensors, tensors computed from leaves, unpacked from one tensor,
one per task, ``PerStep``, ``PerParameter``), an optional learning-rate scheduler, one to
several inner steps, first or second order, and several tasks whose query losses are averaged.

:func:`run` computes its meta-loss and gradients (of the model's parameters and of the
hyperparameter leaves) in one *mode*. The reference is the plain eager per-task unroll
(``mode="per_task"``), itself checked against finite differences (test_reference.py); every
other mode must give its numbers (:func:`assert_same`), or raise a clear error
(:class:`Unsupported` lists what a mode is allowed to refuse, and with which message).

Everything here is float64 unless a problem asks for float32.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.optim import lr_scheduler

import higher

# ----------------------------------------------------------------------------------------- budget
FUZZ = float(os.environ.get("HIGHER_FUZZ") or 0)  # make fuzz: a multiple of the fuzz example counts


def sample(strategy: Any, count: int) -> list[Any]:
    """``count`` values drawn from ``strategy`` (the same ones on every run unless fuzzing; never shrunk), for
    tests that run a batch of problems at once (one launch of several ranks)."""
    drawn: list[Any] = []

    @settings(
        max_examples=count,
        derandomize=not FUZZ,
        database=None,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(value: Any) -> None:
        drawn.append(value)

    collect()
    return drawn


def examples(ci: int, fuzz: int | None = None) -> settings:
    """Hypothesis settings: ``ci`` derandomized examples in ``make test``; ``fuzz`` fresh ones under ``make fuzz``."""
    if FUZZ:
        return settings(
            max_examples=max(1, round(FUZZ * (fuzz if fuzz is not None else 20 * ci))),
            deadline=None,
            derandomize=False,
            suppress_health_check=list(HealthCheck),
            print_blob=True,
        )
    return settings(
        max_examples=ci, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
    )


# ----------------------------------------------------------------------------------------- models
class SymmetricWeight(nn.Module):
    """A parametrization: the weight is the symmetric part of the stored matrix."""

    def forward(self, weight: Tensor) -> Tensor:
        return weight.triu() + weight.triu(1).transpose(-1, -2)


class Shared(nn.Module):
    """One linear layer applied twice (a parameter in two places of the graph), then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.layer(torch.tanh(self.layer(x)))))


class Unused(nn.Module):
    """An MLP with a parameter that the forward never reads and a frozen first layer."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 6)
        self.head = nn.Linear(6, 2)
        self.spare = nn.Parameter(torch.randn(4))
        self.body.bias.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.body(x)))


class Recurrent(nn.Module):
    """An Elman RNN over a short sequence, then a linear head on the last output."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))


def _batchnorm_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2))


def _conv() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 2))


def _dropout() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 6), nn.Dropout(0.3), nn.Tanh(), nn.Linear(6, 2))


def _parametrized() -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))
    parametrize.register_parametrization(model[0], "weight", SymmetricWeight())
    return model


#: name -> (constructor, input shape of one example, whether the forward draws random numbers)
ZOO: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], bool]] = {
    "mlp": (_mlp, (3,), False),
    "batchnorm": (_batchnorm_mlp, (3,), False),
    "conv": (_conv, (1, 5, 5), False),
    "dropout": (_dropout, (3,), True),
    "rnn": (Recurrent, (4, 3), False),
    "parametrized": (_parametrized, (3,), False),
    "shared": (Shared, (3,), False),
    "unused": (Unused, (3,), False),
}

# ------------------------------------------------------------------------------------- optimizers
LR = st.sampled_from([0.03, 0.01])
BETAS = st.sampled_from([(0.9, 0.999), (0.8, 0.99)])
EPS = st.sampled_from([1e-8, 1e-3])
DECAY = st.sampled_from([0.0, 0.1])
FLAG = st.booleans()


@st.composite
def _sgd(draw: Any) -> dict[str, Any]:
    momentum = draw(st.sampled_from([0.0, 0.9]))
    dampening = draw(st.sampled_from([0.0, 0.3]))
    return dict(
        lr=draw(st.sampled_from([0.1, 0.3])),
        momentum=momentum,
        dampening=dampening,
        nesterov=momentum > 0 and dampening == 0 and draw(FLAG),
        weight_decay=draw(DECAY),
        maximize=draw(FLAG),
    )


OPTIONS: dict[str, Any] = {
    "SGD": _sgd(),
    "Adam": st.fixed_dictionaries(
        dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=DECAY, amsgrad=FLAG, maximize=FLAG, decoupled_weight_decay=FLAG)
    ),
    "AdamW": st.fixed_dictionaries(dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=DECAY, amsgrad=FLAG, maximize=FLAG)),
    "Adagrad": st.fixed_dictionaries(
        dict(
            lr=st.sampled_from([0.1, 0.03]),
            lr_decay=st.sampled_from([0.0, 0.01]),
            weight_decay=DECAY,
            initial_accumulator_value=st.sampled_from([0.0, 0.1]),
            eps=st.sampled_from([1e-10, 1e-6]),
            maximize=FLAG,
        )
    ),
    "Adadelta": st.fixed_dictionaries(
        dict(
            lr=st.sampled_from([1.0, 0.5]), rho=st.sampled_from([0.9, 0.8]), eps=EPS, weight_decay=DECAY, maximize=FLAG
        )
    ),
    "Adamax": st.fixed_dictionaries(dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=DECAY, maximize=FLAG)),
    "ASGD": st.fixed_dictionaries(
        dict(
            lr=LR,
            lambd=st.sampled_from([1e-4, 0.01]),
            alpha=st.sampled_from([0.75, 0.5]),
            t0=st.sampled_from([1e6, 1.0]),
            weight_decay=DECAY,
            maximize=FLAG,
        )
    ),
    "RMSprop": st.fixed_dictionaries(
        dict(
            lr=LR,
            alpha=st.sampled_from([0.99, 0.9]),
            eps=EPS,
            weight_decay=DECAY,
            momentum=st.sampled_from([0.0, 0.5]),
            centered=FLAG,
            maximize=FLAG,
        )
    ),
    "Rprop": st.fixed_dictionaries(
        dict(
            lr=LR,
            etas=st.sampled_from([(0.5, 1.2), (0.3, 1.5)]),
            step_sizes=st.sampled_from([(1e-6, 50.0), (1e-4, 0.05)]),
            maximize=FLAG,
        )
    ),
    "NAdam": st.fixed_dictionaries(
        dict(
            lr=LR,
            betas=BETAS,
            eps=EPS,
            weight_decay=DECAY,
            momentum_decay=st.sampled_from([4e-3, 0.01]),
            decoupled_weight_decay=FLAG,
            maximize=FLAG,
        )
    ),
    "RAdam": st.fixed_dictionaries(
        dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=DECAY, decoupled_weight_decay=FLAG, maximize=FLAG)
    ),
}

#: How the learning rate (and, for "unpacked", the weight decay too) is given.
#:   number: a Python number in the torch optimizer (no hypergradient);
#:   leaf: a tensor that requires grad, through override (one per parameter group);
#:   transformed: exp(log_lr), computed from a leaf before the inner loops;
#:   unpacked: one leaf [lr, weight_decay] unpacked into the two hyperparameters;
#:   per_task: one leaf of shape [tasks], task t using entry t;
#:   per_step: higher.PerStep over the entries of one leaf of shape [steps];
#:   per_parameter: higher.PerParameter, one leaf per parameter, shaped like it (Meta-SGD).
HYPER_FORMS = ("number", "leaf", "transformed", "unpacked", "per_task", "per_step", "per_parameter")
SCHEDULERS = (None, "step", "exponential", "lambda")


@dataclass(frozen=True)
class Problem:
    model: str
    optimizer: str
    options: tuple[tuple[str, Any], ...]
    hyper: str
    scheduler: str | None
    groups: int  # parameter groups (1, or 2: the last layer in a group of its own at half the lr)
    steps: int
    tasks: int
    first_order: bool
    loss: str  # "mse" or "cross_entropy"
    seed: int
    dtype: torch.dtype = torch.float64

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.options)

    @property
    def random(self) -> bool:
        return ZOO[self.model][2]

    @property
    def has_tensor_hyper(self) -> bool:
        return self.hyper != "number"

    def describe(self) -> str:
        return (
            f"Problem(model={self.model!r}, optimizer={self.optimizer!r}, options={self.kwargs}, hyper={self.hyper!r}, "
            f"scheduler={self.scheduler!r}, groups={self.groups}, steps={self.steps}, tasks={self.tasks}, "
            f"first_order={self.first_order}, loss={self.loss!r}, seed={self.seed}, dtype={self.dtype})"
        )


@st.composite
def problems(
    draw: Any,
    models: tuple[str, ...] = tuple(ZOO),
    optimizers: tuple[str, ...] = tuple(OPTIONS),
    hypers: tuple[str, ...] = HYPER_FORMS,
    schedulers: tuple[str | None, ...] = SCHEDULERS,
    max_steps: int = 3,
    max_tasks: int = 3,
    first_order: tuple[bool, ...] = (False, True),
    dtypes: tuple[torch.dtype, ...] = (torch.float64,),
) -> Problem:
    """A generated problem (see the module docstring); the arguments narrow what may be drawn."""
    model = draw(st.sampled_from(models), label="model")
    optimizer = draw(st.sampled_from(optimizers), label="optimizer")
    options = draw(OPTIONS[optimizer], label="options")
    hyper = draw(st.sampled_from(hypers), label="hyper")
    if hyper == "unpacked":  # [lr, weight_decay] in one tensor (Rprop has no weight decay: lr alone)
        if "weight_decay" not in options:
            hyper = "leaf"
        elif options["weight_decay"] == 0.0:
            options["weight_decay"] = 0.1
    scheduler = draw(st.sampled_from(schedulers), label="scheduler")
    if hyper in ("per_step", "per_parameter"):
        scheduler = None  # a scheduler multiplies a number or tensor lr; not a PerStep or PerParameter one
    return Problem(
        model=model,
        optimizer=optimizer,
        options=tuple(sorted(options.items())),
        hyper=hyper,
        scheduler=scheduler,
        groups=draw(st.sampled_from([1, 2]), label="groups"),
        steps=draw(st.integers(1, max_steps), label="steps"),
        tasks=draw(st.integers(2, max_tasks), label="tasks"),
        first_order=draw(st.sampled_from(first_order), label="first_order"),
        loss=draw(st.sampled_from(["mse", "cross_entropy"]), label="loss"),
        seed=draw(st.integers(0, 2**16), label="seed"),
        dtype=draw(st.sampled_from(dtypes), label="dtype"),
    )


# --------------------------------------------------------------------------------------- building
@dataclass
class Built:
    """A problem's objects, made afresh for every mode from the problem's seed (so modes never share state)."""

    problem: Problem
    model: nn.Module
    opt: torch.optim.Optimizer
    leaves: list[Tensor]  # the hyperparameter tensors that receive hypergradients
    support: tuple[Tensor, Tensor]  # [tasks, n, ...], [tasks, n] or [tasks, n, 2]
    query: tuple[Tensor, Tensor]
    make_override: Callable[[list[Tensor], Any], dict[str, Any] | None] = field(repr=False)
    # make_override(leaves, tasks): the override for one task (an index) or for a task-batched inner loop of the
    # tasks listed


def _group_params(model: nn.Module, groups: int) -> list[Any]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    if groups == 1:
        return trainable
    head = [p for p in list(model.children())[-1].parameters() if p.requires_grad] if list(model.children()) else []
    head_ids = {id(p) for p in head}
    body = [p for p in trainable if id(p) not in head_ids]
    if not body or not head:
        return trainable
    return [{"params": body}, {"params": head}]


def build(problem: Problem) -> Built:
    """Make the model, torch optimizer, hyperparameter leaves and data of ``problem`` (float64 or its dtype)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(problem.dtype)
    try:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(problem.seed)
        make, shape, _ = ZOO[problem.model]
        model = make()
        opt_type = getattr(torch.optim, problem.optimizer)
        options = problem.kwargs
        params = _group_params(model, problem.groups)
        if isinstance(params[0], dict):
            params[1]["lr"] = options["lr"] * 0.5
        opt = opt_type(params, **options)
        n = 6
        tasks = problem.tasks
        xs = torch.randn(tasks, n, *shape)
        xq = torch.randn(tasks, n, *shape)
        if problem.loss == "mse":
            ys, yq = torch.randn(tasks, n, 2), torch.randn(tasks, n, 2)
        else:
            ys, yq = torch.randint(0, 2, (tasks, n)), torch.randint(0, 2, (tasks, n))
        leaves, make_override = _hyperparameters(problem, opt)
        torch.random.set_rng_state(generator_state)
    finally:
        torch.set_default_dtype(previous)
    return Built(problem, model, opt, leaves, (xs, ys), (xq, yq), make_override)


def _hyperparameters(
    problem: Problem, opt: torch.optim.Optimizer
) -> tuple[list[Tensor], Callable[[list[Tensor], Any], dict[str, Any] | None]]:
    groups = opt.param_groups
    lrs = [g["lr"] for g in groups]
    form = problem.hyper
    dtype = problem.dtype

    def leaf(value: Any) -> Tensor:
        return torch.tensor(value, dtype=dtype, requires_grad=True)

    if form == "number":
        return [], lambda leaves, task: None
    if form == "leaf":
        return [leaf(lr) for lr in lrs], lambda leaves, task: {"lr": list(leaves)}
    if form == "transformed":
        return [leaf(math.log(lr)) for lr in lrs], lambda leaves, task: {"lr": [h.exp() for h in leaves]}
    if form == "unpacked":
        decay = groups[0]["weight_decay"]

        def unpacked(leaves: list[Tensor], task: Any) -> dict[str, Any]:
            lr, weight_decay = leaves[0]  # one tensor, unpacked into two hyperparameters
            return {"lr": [lr * (g["lr"] / lrs[0]) for g in groups], "weight_decay": [weight_decay] * len(groups)}

        return [leaf([lrs[0], decay])], unpacked
    if form == "per_task":
        scales = [1.0 + 0.25 * t for t in range(problem.tasks)]

        def per_task(leaves: list[Tensor], task: Any) -> dict[str, Any]:
            (rates,) = leaves
            return {"lr": [rates[task] * (g["lr"] / lrs[0]) for g in groups]}

        return [leaf([lrs[0] * s for s in scales])], per_task
    if form == "per_step":
        decays = [lrs[0] * 0.8**t for t in range(problem.steps)]

        def per_step(leaves: list[Tensor], task: Any) -> dict[str, Any]:
            (schedule,) = leaves
            return {"lr": [higher.PerStep([r * (g["lr"] / lrs[0]) for r in schedule.unbind()]) for g in groups]}

        return [leaf(decays)], per_step
    if form == "per_parameter":
        shaped = [torch.full_like(p, g["lr"]).requires_grad_() for g in groups for p in g["params"]]

        def per_parameter(leaves: list[Tensor], task: Any) -> dict[str, Any]:
            out, i = [], 0
            for g in groups:
                out.append(higher.PerParameter(leaves[i : i + len(g["params"])]))
                i += len(g["params"])
            return {"lr": out}

        return shaped, per_parameter
    raise ValueError(form)


def _scheduler(problem: Problem, diffopt: Any) -> Any:
    if problem.scheduler is None:
        return None
    if problem.scheduler == "step":
        return lr_scheduler.StepLR(diffopt, step_size=1, gamma=0.5)
    if problem.scheduler == "exponential":
        return lr_scheduler.ExponentialLR(diffopt, gamma=0.8)
    return lr_scheduler.LambdaLR(diffopt, lambda step: 1.0 / (1 + step))


def task_loss(problem: Problem, out: Tensor, target: Tensor) -> Tensor:
    """The loss of one task (``out`` [n, 2]) or of each task (``out`` [tasks, n, 2] -> [tasks])."""
    batched = out.dim() == 3
    if problem.loss == "mse":
        squared = (out - target) ** 2
        return squared.flatten(1).mean(1) if batched else squared.mean()
    if batched:
        return torch.func.vmap(F.cross_entropy)(out, target)
    return F.cross_entropy(out, target)


# ------------------------------------------------------------------------------------------ modes
@dataclass
class Outcome:
    """A mode's result: the meta-loss and the gradients (None where nothing arrived), by name."""

    loss: float
    grads: dict[str, Tensor | None]
    after: float = math.nan  # the global generator's next number after the mode ran (how much it drew)


def _collect(built: Built, loss: Tensor | float) -> Outcome:
    grads: dict[str, Tensor | None] = {}
    for name, p in built.model.named_parameters():
        grads[f"model.{name}"] = None if p.grad is None else p.grad.detach().clone()
    for i, h in enumerate(built.leaves):
        grads[f"hyper.{i}"] = None if h.grad is None else h.grad.detach().clone()
    return Outcome(float(loss), grads)


def inner_loop(built: Built, tasks: int | list[int], net: nn.Module | None = None, every: int | None = None) -> Tensor:
    """The query loss after the inner loop of task ``tasks`` (an index: per task), or of the tasks listed (one
    task-batched inner loop: their query losses, shape [len(tasks)]), as users write it: innerloop_ctx on the model
    (or on ``net``, its DistributedDataParallel wrapper), ``diffopt.step`` in a loop (or ``checkpointed_unroll``
    with a segment every ``every`` steps), a scheduler stepped after each step."""
    p = built.problem
    xs, ys = (x[tasks] for x in built.support)
    xq, yq = (x[tasks] for x in built.query)
    override = built.make_override(built.leaves, tasks)
    batched = None if isinstance(tasks, int) else len(tasks)
    with higher.innerloop_ctx(
        built.model if net is None else net,
        built.opt,
        copy_initial_weights=False,
        override=override,
        first_order=p.first_order,
        tasks=batched,
    ) as (fmodel, diffopt):
        schedule = _scheduler(p, diffopt)
        if every is None:
            for _ in range(p.steps):
                diffopt.step(task_loss(p, fmodel(xs), ys))
                if schedule is not None:
                    schedule.step()
        else:

            def step_loss(fm: Any, step: int) -> Tensor:
                if schedule is not None and step > 0:
                    schedule.step()  # not supported: checkpointed_unroll must refuse it (harness.unsupported)
                return task_loss(p, fm(xs), ys)

            inputs = [v for v in _tensors(override) if v.grad_fn is not None]
            higher.checkpointed_unroll(fmodel, diffopt, step_loss, p.steps, every=every, inputs=inputs)
        return task_loss(p, fmodel(xq), yq)


def _per_task_iteration(built: Built, checkpoint_every: int | None = None) -> Tensor:
    """The meta-loss of the plain per-task loop (the reference; or with checkpointed inner loops)."""
    tasks = built.problem.tasks
    return sum(inner_loop(built, t, every=checkpoint_every) for t in range(tasks)) / tasks  # type: ignore[return-value]


def _batched_iteration(built: Built, checkpoint_every: int | None = None) -> Tensor:
    """The meta-loss with all tasks' inner loops run as one (``tasks=T``)."""
    return inner_loop(built, list(range(built.problem.tasks)), every=checkpoint_every).mean()


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, higher.PerStep) and not callable(value.values):
        yield from _tensors(value.values)


def _backward(built: Built, meta_loss: Callable[[], Tensor]) -> Outcome:
    """Zero the gradients, compute the meta-loss and backpropagate it (unless the mode did, inside a compiled
    function: then it returns the loss detached)."""
    built.model.zero_grad(set_to_none=True)
    for h in built.leaves:
        h.grad = None
    loss = meta_loss()
    if loss.requires_grad:
        loss.backward()
    return _collect(built, loss.detach())


def _compiled(iteration: Callable[[Built], Tensor]) -> Callable[[Built], Callable[[], Tensor]]:
    """The meta-iteration through ``torch.compile`` with its default backend (inductor), backward outside;
    ``fullgraph=True`` as higher.compiled recommends (a graph break inside an inner loop cannot be differentiated
    twice: torch fails in the backward pass; with fullgraph=True torch names the break instead)."""

    def make(built: Built) -> Callable[[], Tensor]:
        torch._dynamo.reset()
        return torch.compile(lambda: iteration(built), fullgraph=True)

    return make


def _compiled_whole(iteration: Callable[[Built], Tensor]) -> Callable[[Built], Callable[[], Tensor]]:
    """The whole meta-iteration compiled, its backward pass inside the graph (``higher.compiled.backward``)."""

    def make(built: Built) -> Callable[[], Tensor]:
        def whole() -> Tensor:
            loss = iteration(built)
            higher.compiled.backward(loss)
            return loss.detach()

        torch._dynamo.reset()
        return torch.compile(whole, fullgraph=True)

    return make


def _checkpointed(iteration: Callable[..., Tensor], every: int) -> Callable[[Built], Callable[[], Tensor]]:
    return lambda built: lambda: iteration(built, checkpoint_every=every)


#: mode -> make(built) -> meta_loss(): a function computing the meta-loss (graph included) of built's objects
META_LOSS: dict[str, Callable[[Built], Callable[[], Tensor]]] = {
    "per_task": lambda built: lambda: _per_task_iteration(built),
    "batched": lambda built: lambda: _batched_iteration(built),
    "compiled_per_task": _compiled(_per_task_iteration),
    "compiled_batched": _compiled(_batched_iteration),
    "compiled_whole_batched": _compiled_whole(_batched_iteration),
    "checkpointed_1": _checkpointed(_per_task_iteration, 1),
    "checkpointed_2": _checkpointed(_per_task_iteration, 2),
    "checkpointed_batched_2": _checkpointed(_batched_iteration, 2),
}


def _forward_mode(built: Built) -> Outcome:
    """Hypergradients by ``higher.forward_hypergradient``, one call per task (averaged as the meta-loss is)."""
    p = built.problem
    xs, ys = built.support
    xq, yq = built.query
    total = [torch.zeros_like(h) for h in built.leaves]
    loss = 0.0
    for t in range(p.tasks):
        result = higher.forward_hypergradient(
            built.model,
            built.opt,
            built.leaves,
            lambda fm, step, hyper, t=t: task_loss(p, fm(xs[t]), ys[t]),
            lambda fm, hyper, t=t: task_loss(p, fm(xq[t]), yq[t]),
            p.steps,
            override=lambda hyper, t=t: built.make_override(list(hyper), t),
        )
        total = [a + b / p.tasks for a, b in zip(total, result.hypergradients)]
        loss += float(result.outer_loss) / p.tasks
    grads: dict[str, Tensor | None] = {f"hyper.{i}": g for i, g in enumerate(total)}
    return Outcome(loss, grads)


MODES = (*META_LOSS, "forward")


@contextlib.contextmanager
def _dtype_and_seed(problem: Problem, seed: int) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(problem.dtype)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_default_dtype(previous)


def run(problem: Problem, mode: str, seed: int = 1234) -> Outcome:
    """Run ``problem`` in ``mode`` on fresh objects, with the global random generator seeded with ``seed``."""
    built = build(problem)
    with _dtype_and_seed(problem, seed):
        if mode == "forward":
            outcome = _forward_mode(built)
        else:
            outcome = _backward(built, META_LOSS[mode](built))
        outcome.after = float(torch.rand(()))
    return outcome


def _point(built: Built) -> list[Tensor]:
    return [p for p in built.model.parameters() if p.requires_grad] + list(built.leaves)


def assert_finite_differences(problem: Problem, mode: str, seed: int = 1234, tol: float = 1e-6) -> None:
    """The mode's meta-gradient along a random direction equals the central finite difference of its meta-loss.

    The same objects and the same random-generator seed for every evaluation, so a random forward (dropout)
    draws the same numbers each time: a mode whose meta-gradient is not the derivative of the meta-loss it
    computed (random numbers drawn differently for the backward pass, say) fails. Adaptive optimizers are
    strongly curved where a gradient entry is near 0 (Adam's first step is about ``lr * g / (|g| + eps)``)
    where a gradient entry is within a few ``eps`` of 0 (a bias before BatchNorm), so the difference is taken with
    steps from 1e-6 down to 1e-9 (and 1e-5) until one agrees.
    """
    built = build(problem)
    point = _point(built)
    generator = torch.Generator().manual_seed(problem.seed + 1)
    direction = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in point]
    with _dtype_and_seed(problem, seed):
        meta_loss = META_LOSS[mode](built)
    with _dtype_and_seed(problem, seed):
        _backward(built, meta_loss)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in point]
    analytic = float(sum((g * d).sum() for g, d in zip(grads, direction)))
    originals = [p.detach().clone() for p in point]
    tried = []
    for eps in (1e-6, 1e-7, 1e-8, 1e-9, 1e-5):
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                for p, p0, d in zip(point, originals, direction):
                    p.copy_(p0 + sign * eps * d)
            with _dtype_and_seed(problem, seed):
                values.append(float(meta_loss().detach()))
        with torch.no_grad():
            for p, p0 in zip(point, originals):
                p.copy_(p0)
        numeric = (values[0] - values[1]) / (2 * eps)
        if abs(analytic - numeric) <= tol * max(1.0, abs(numeric)):
            return
        tried.append((eps, numeric))
    raise AssertionError(
        f"{mode}: meta-gradient along a random direction {analytic!r}, finite differences (step, value) {tried}: "
        f"{problem.describe()}"
    )


# ----------------------------------------------------------------------------------- what may fail
@dataclass(frozen=True)
class Unsupported:
    """A combination a mode refuses by design, and the words its error must contain."""

    why: str
    message: str  # a regular expression the error message must match


def unsupported(problem: Problem, mode: str) -> list[Unsupported]:
    """Why ``mode`` cannot run ``problem`` and how it must say so (any one of these errors); empty if it must run."""
    reasons = []
    if problem.scheduler is not None and problem.has_tensor_hyper:
        reasons.append(
            Unsupported(
                "a torch scheduler overwrites a learned tensor lr in place",
                # torch's scheduler fails itself on a leaf (in-place write) or a tensor with dimensions (fill_);
                # on any other tensor the differentiable optimizer refuses the next step
                r"leaf Variable that requires grad is being used in an in-place operation|"
                r"fill_ only supports 0-dimension value tensor|changed in place .*higher.PerStep",
            )
        )
    if problem.scheduler is not None and mode.startswith("checkpointed") and problem.steps > 1:
        reasons.append(
            Unsupported(
                "a scheduler stepped inside checkpointed_unroll's step function (the steps are recomputed)",
                r"changed .*while the unroll ran .*higher\.PerStep",
            )
        )
    if mode.startswith("compiled") and problem.scheduler is not None:
        reasons.append(
            Unsupported(
                "dynamo does not trace torch.optim.lr_scheduler (use higher.PerStep in compiled functions)",
                r"`(StepLR|ExponentialLR|LambdaLR)\.__init__` should not be traced",
            )
        )
    if mode.startswith("compiled") and problem.optimizer == "Adagrad":
        reasons.append(
            Unsupported(
                "torch's Adagrad makes its state (a step-count tensor) at construction, which a graph cannot read",
                r"step count tensor copied from the torch optimizer",
            )
        )
    if mode.startswith("compiled") and problem.model == "rnn":
        reasons.append(Unsupported("dynamo does not trace nn.RNN", r"Attempted to wrap RNN, GRU, or LSTM"))
    if "batched" in mode and problem.model == "rnn":
        reasons.append(
            Unsupported(
                "vmap has no batching rule for the fused RNN kernel",
                r"no batching rule for .*innerloop_ctx without tasks=",
            )
        )
    return reasons


def applies(problem: Problem, mode: str) -> bool:
    """Whether ``mode`` computes the quantity the reference computes for ``problem`` at all."""
    if mode == "forward":  # forward mode: exact hypergradients of tensor hyperparameters, second order
        return problem.has_tensor_hyper and not problem.first_order and problem.scheduler is None
    return True


def exact_rng(mode: str) -> bool:
    """Whether ``mode`` draws the same random numbers as the per-task reference (else: self-consistency checks)."""
    return mode in ("per_task", "checkpointed_1", "checkpointed_2", "forward")


def tolerance(problem: Problem) -> float:
    return 1e-9 if problem.dtype == torch.float64 else 2e-3


def assert_same(actual: Outcome, expected: Outcome, problem: Problem, mode: str, keys: list[str] | None = None) -> None:
    """``actual`` equals ``expected`` to the problem's tolerance (relative to the largest entry of each gradient)."""
    tol = tolerance(problem)
    where = f"{mode} on {problem.describe()}"
    if keys is None:
        assert abs(actual.loss - expected.loss) <= tol * max(1.0, abs(expected.loss)), (
            f"meta-loss {actual.loss!r} != reference {expected.loss!r}: {where}"
        )
        keys = list(expected.grads)
    for key in keys:
        want, got = expected.grads[key], actual.grads.get(key)
        if want is None:  # nothing reached it in the reference: nothing (or zeros) may reach it in the mode
            assert got is None or not bool((got != 0).any()), f"{key}: got {got}, the reference has none: {where}"
            continue
        assert got is not None, f"{key}: no gradient, the reference has {want}: {where}"
        assert torch.isfinite(got).all(), f"{key}: not finite {got}: {where}"
        scale = max(float(want.abs().max()), 1e-4)
        error = float((got - want).abs().max())
        assert error <= tol * scale, f"{key}: off by {error:.3g} (relative {error / scale:.3g}): {where}"


@contextlib.contextmanager
def expect_clear_error(reasons: list[Unsupported]) -> Iterator[None]:
    """The block must raise an error whose message matches one of the reasons' (a clear error naming the cause)."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - checked below
        message = f"{type(error).__name__}: {error}"
        assert any(re.search(r.message, message) for r in reasons), (
            f"unclear error for {' or '.join(r.why for r in reasons)}: {message}"
        )
        return
    raise AssertionError(f"expected a clear error ({' or '.join(r.why for r in reasons)}), but the mode ran")


__all__ = [
    "MODES",
    "Outcome",
    "Problem",
    "applies",
    "assert_same",
    "build",
    "examples",
    "exact_rng",
    "expect_clear_error",
    "problems",
    "replace",
    "run",
    "unsupported",
]


# ----------------------------------------------------------------------------------- across ranks
def distributed_outcomes(rank: int, cases: list[tuple[Problem, str]], seed: int = 1234) -> list[Outcome]:
    """On one of several gloo ranks: each (problem, mode), the model wrapped in DistributedDataParallel, this rank
    adapting its share of the tasks (higher.distributed.split_tasks) per task (``no_sync`` for all but its last
    task, as DDP users write it) or task-batched (``mode="batched"``), each task's query loss weighted by
    higher.distributed.task_weight. DDP averages the model's meta-gradient over ranks; the hyperparameters' are
    each rank's own (their sum over ranks, divided by the world size, is the whole meta-batch's)."""
    from torch.nn.parallel import DistributedDataParallel

    from higher import distributed as hd

    world = torch.distributed.get_world_size()
    outcomes = []
    for problem, mode in cases:
        built = build(problem)
        with _dtype_and_seed(problem, seed + rank):
            net = DistributedDataParallel(built.model, find_unused_parameters=problem.model == "unused")
            tasks = list(hd.split_tasks(problem.tasks, rank, world))
            weight = hd.task_weight(problem.tasks, world)
            built.model.zero_grad(set_to_none=True)
            total = 0.0
            if mode == "batched":
                loss = inner_loop(built, tasks, net=net).sum() * weight
                loss.backward()
                total = float(loss)
            else:
                for k, t in enumerate(tasks):
                    with contextlib.nullcontext() if k == len(tasks) - 1 else net.no_sync():
                        loss = inner_loop(built, t, net=net) * weight
                        loss.backward()
                    total += float(loss)
            outcomes.append(_collect(built, total))
    return outcomes
