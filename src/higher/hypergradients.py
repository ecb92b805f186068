"""One call for a hypergradient by any of the four methods, and the hypertorch logistic-regression setup.

:func:`hypergradient` computes ``d outer_loss / d hyperparameters`` after ``steps`` inner steps
by the method asked for, on the same problem description:

* ``"unrolled"``: reverse mode through the whole differentiable unroll (exact; memory grows with T);
* ``"checkpointed"``: the same through :func:`higher.checkpointed_unroll` (exact; memory O(sqrt T));
* ``"forward"``: :func:`higher.forward_hypergradient` (exact; memory flat in T; one pass per scalar
  hyperparameter);
* ``"implicit"``: a plain (non-differentiable) inner loop, then
  :func:`higher.implicit_hypergradient` at its end point (exact only at a minimiser; memory and time
  independent of how the minimiser was found).

The problem is given as ``inner_loss(fmodel, hyper)`` (the full-batch inner objective, which the
implicit method needs to be the same at every step), ``outer_loss(fmodel, hyper)`` and
``override(hyper)`` for hyperparameters of the inner optimizer.

:func:`logreg_comparison` runs all four on the logistic-regression hyperparameter-optimisation
example of hypertorch (Grazzi, Franceschi, Pontil & Salzo 2020, "On the Iteration Complexity of
Hypergradient Computation", ICML; github.com/prolearner/hypertorch,
examples/logistic_regression.ipynb): per-feature L2 coefficients of a logistic regression learned
on a validation loss, on the notebook's data (:func:`logreg_problem`), where it gives the
notebook's printed losses to float32 precision (docs/hypertorch-logreg.md).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpointing import checkpointed_unroll
from .forward_mode import forward_hypergradient
from .implicit import implicit_hypergradient
from .innerloop import innerloop_ctx
from .optim import PerStep
from .patch import FunctionalModule, monkeypatch

__all__ = ["METHODS", "HypergradientResult", "hypergradient", "logreg_comparison", "logreg_hpo", "logreg_problem"]

METHODS = ("unrolled", "checkpointed", "forward", "implicit")

Loss = Callable[[FunctionalModule, list[Tensor]], Tensor]


@dataclass
class HypergradientResult:
    """What :func:`hypergradient` computed, and at what cost."""

    method: str
    hypergradients: list[Tensor]
    outer_loss: float
    inner_losses: list[float]
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def _peak_rss_mib() -> float:
    """This process's peak resident memory so far (MiB); per method only when each runs in its own process."""
    try:
        import resource  # POSIX only
    except ImportError:  # pragma: no cover - Windows
        return math.nan
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / 1024 if sys.platform == "darwin" else peak / 1024


@torch.enable_grad()  # it takes its own gradients, also when called inside torch.no_grad()
def hypergradient(
    method: str,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    hyperparameters: Sequence[Tensor],
    inner_loss: Loss,
    outer_loss: Loss,
    steps: int,
    *,
    override: Callable[[list[Tensor]], dict[str, Any]] | None = None,
    every: int | None = None,
    solver: str = "cg",
    iterations: int = 100,
    tol: float = 1e-12,
) -> HypergradientResult:
    """``d outer_loss / d hyperparameters`` after ``steps`` steps of ``opt`` on ``inner_loss``, by ``method``.

    ``method`` is one of :data:`METHODS`; ``every`` is the checkpoint interval (``"checkpointed"``),
    ``solver``, ``iterations`` and ``tol`` configure the linear solve (``"implicit"``). The model,
    optimizer and hyperparameter tensors are not modified. ``"implicit"`` refuses an ``override``
    that reads the hyperparameters (the implicit function theorem sees ``inner_loss`` only, not
    the optimizer's hyperparameters). Gradients are enabled inside (the
    result is the same when it is called under ``torch.no_grad()``).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    start = time.perf_counter()
    extra: dict[str, Any] = {}
    inner_losses: list[float] = []
    if method == "forward":
        result = forward_hypergradient(
            model,
            opt,
            hyperparameters,
            lambda fmodel, t, hyper: _logged(inner_loss(fmodel, hyper), inner_losses, steps),
            outer_loss,
            steps,
            override=override,
        )
        extra["passes"] = result.passes
        grads, value = result.hypergradients, float(result.outer_loss)
    elif method == "implicit":
        if override is not None:
            _check_implicit_override(override, hyperparameters)
        hyper = [h.detach() for h in hyperparameters]
        with innerloop_ctx(model, opt, override=override(hyper) if override else None, track_higher_grads=False) as (
            fmodel,
            diffopt,
        ):
            for _ in range(steps):
                loss = inner_loss(fmodel, hyper)
                inner_losses.append(float(loss.detach()))
                diffopt.step(loss)
            final = list(fmodel.parameters())
        view = monkeypatch(model, track_higher_grads=False)

        def at(objective: Loss) -> Callable[[list[Tensor], list[Tensor]], Tensor]:
            def evaluate(params: list[Tensor], hyper: list[Tensor]) -> Tensor:
                view.update_params(params)
                return objective(view, hyper)

            return evaluate

        implicit = implicit_hypergradient(
            at(inner_loss), at(outer_loss), final, hyper, solver=solver, iterations=iterations, tol=tol
        )
        extra.update(
            residual=implicit.residual,
            iterations=implicit.iterations,
            inner_gradient_norm=implicit.inner_gradient_norm,
        )
        grads, value = implicit.hypergradients, float(implicit.outer_loss)
    else:
        hyper = [h.detach().requires_grad_() for h in hyperparameters]
        with innerloop_ctx(model, opt, override=override(hyper) if override else None) as (fmodel, diffopt):
            if method == "checkpointed":
                unroll = checkpointed_unroll(fmodel, diffopt, lambda fm, t: inner_loss(fm, hyper), steps, every=every)
                inner_losses = unroll.losses
                extra["every"] = unroll.every
            else:
                for _ in range(steps):
                    loss = inner_loss(fmodel, hyper)
                    inner_losses.append(float(loss.detach()))
                    diffopt.step(loss)
            out = outer_loss(fmodel, hyper)
            out.backward()
            if method == "checkpointed":
                extra["recomputations"] = unroll.recomputations
        grads = [torch.zeros_like(h) if h.grad is None else h.grad for h in hyper]
        value = float(out.detach())
    seconds = time.perf_counter() - start
    extra["peak_rss_mib"] = _peak_rss_mib()
    return HypergradientResult(method, [g.detach() for g in grads], value, inner_losses, seconds, extra)


def _check_implicit_override(
    override: Callable[[list[Tensor]], dict[str, Any]], hyperparameters: Sequence[Tensor]
) -> None:
    """Refuse hyperparameters that reach the optimizer: the implicit function theorem cannot see them."""
    probe = [h.detach().requires_grad_() for h in hyperparameters]
    with torch.enable_grad():
        values = override(probe)
    if any(t.requires_grad for value in values.values() for t in _tensors_of(value)):
        raise ValueError(
            "method 'implicit' differentiates the minimiser of inner_loss, so hyperparameters that reach the "
            "inner optimizer through override (lr, momentum, weight_decay, schedules, ...) are invisible to it: "
            "it would report a zero (lr, momentum) or a wrong (weight_decay) hypergradient. Put them into "
            "inner_loss (weight decay as an L2 term), or use 'unrolled', 'checkpointed' or 'forward'."
        )


def _tensors_of(value: Any) -> list[Tensor]:
    """The tensors in an override value (numbers, tensors, tuples, PerParameter, PerStep lists or callables)."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, PerStep):
        value = value.at(0) if callable(value.values) else value.values
        return _tensors_of(value)
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors_of(v)]
    return []


def _logged(loss: Tensor, losses: list[float], steps: int) -> Tensor:
    if len(losses) < steps:  # the first pass only (forward mode runs one pass per direction)
        losses.append(float(torch.autograd.forward_ad.unpack_dual(loss).primal.detach()))
    return loss


# ------------------------------------------------------------------------------ the hypertorch example
def logreg_problem(
    n: int = 1000, d: int = 20, seed: int = 1, dtype: torch.dtype = torch.float64
) -> tuple[nn.Module, Tensor, Tensor, Tensor, Tensor]:
    """The data and model of hypertorch's logistic-regression example (``examples/logistic_regression.ipynb``).

    The data are drawn as the notebook draws them: ``np.random.seed(seed)``; ``w_oracle =
    randn(d)``; ``x = randn(n, d)``; ``y = 1[x @ w_oracle + 0.1 randn(n) > 0]``; then scikit-learn's
    ``train_test_split(x, y, test_size=0.5)`` without ``random_state``, which shuffles with the
    next draw of the same generator: ``perm = permutation(n)``, validation ``perm[:ceil(n / 2)]``
    and training ``perm[ceil(n / 2):]``, in that order. The split is reproduced with NumPy alone
    (scikit-learn is not needed; the tests check it against ``train_test_split``), from a
    ``RandomState(seed)`` of its own, which draws the same numbers and leaves NumPy's global
    generator untouched. The model is ``nn.Linear(d, 1, bias=False)`` with zero weights (inner
    loss ``log 2`` at the start). Returns ``(model, x_train, y_train, x_val, y_val)`` in ``dtype``
    (the notebook computes in float32; float64 gives its printed numbers to float32 precision).
    """
    try:
        import numpy as np  # the published data are drawn with numpy's generator
    except ImportError as error:  # pragma: no cover - numpy comes with most torch installs
        raise ImportError("logreg_problem draws hypertorch's data with numpy: pip install numpy") from error
    rng = np.random.RandomState(seed)  # the same stream as np.random.seed(seed) and np.random.*
    w_oracle = rng.randn(d)
    x = rng.randn(n, d)
    y = ((x @ w_oracle + 0.1 * rng.randn(n)) > 0.0).astype(np.float64)
    train, val = _train_test_split_indices(n, 0.5, rng)
    model = nn.Linear(d, 1, bias=False).to(dtype)
    with torch.no_grad():
        model.weight.zero_()

    def tensor(a: Any) -> Tensor:
        return torch.tensor(a, dtype=dtype)

    return model, tensor(x[train]), tensor(y[train]), tensor(x[val]), tensor(y[val])


def _train_test_split_indices(n: int, test_size: float, rng: Any) -> tuple[Any, Any]:
    """``(train, test)`` indices of scikit-learn's ``train_test_split(..., test_size=test_size)`` drawing from ``rng``.

    ``ShuffleSplit``: ``n_test = ceil(test_size * n)``, ``n_train = n - n_test``; one
    ``rng.permutation(n)``, whose first ``n_test`` entries are the test samples and the next
    ``n_train`` the training samples.
    """
    n_test = math.ceil(test_size * n)
    permutation = rng.permutation(n)
    return permutation[n_test:], permutation[:n_test]


def _logreg_losses(x_train: Tensor, y_train: Tensor, x_val: Tensor, y_val: Tensor) -> tuple[Loss, Loss]:
    def inner(fmodel: FunctionalModule, hyper: list[Tensor]) -> Tensor:
        (w,) = fmodel.parameters()
        bce = F.binary_cross_entropy_with_logits(fmodel(x_train).squeeze(-1), y_train)
        return bce + 0.5 * (hyper[0] * w.squeeze(0).pow(2)).sum()

    def outer(fmodel: FunctionalModule, hyper: list[Tensor]) -> Tensor:
        return F.binary_cross_entropy_with_logits(fmodel(x_val).squeeze(-1), y_val)

    return inner, outer


def logreg_comparison(
    steps: int = 100, methods: Sequence[str] = METHODS, *, lr: float = 0.1, every: int | None = None
) -> dict[str, Any]:
    """Hypergradients of hypertorch's logistic-regression problem by each method, and how far they agree.

    The problem is :func:`logreg_problem` (float64) with ``lambda = 1``, ``steps`` steps of
    gradient descent with learning rate ``lr`` from zero weights. Returns a dict:
    ``inner_losses`` of the first method's run (entry ``t`` is the inner loss at ``w_t``, after
    ``t`` steps: the notebook's ``t``; ``t = 0..T-1``), and per method ``hypergradient`` (list of
    20 floats), ``outer_loss`` (the validation BCE at ``w_T``), ``seconds`` and its extras
    (residual for implicit, passes for forward, ...), and ``max_abs_difference`` of each
    method's hypergradient to the first method's (``"unrolled"`` by default).
    """
    model, x_train, y_train, x_val, y_val = logreg_problem()
    inner, outer = _logreg_losses(x_train, y_train, x_val, y_val)
    hyper = [torch.ones(x_train.shape[1], dtype=x_train.dtype)]
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    results: dict[str, Any] = {"steps": steps, "methods": {}}
    reference = None
    for method in methods:
        r = hypergradient(method, model, opt, hyper, inner, outer, steps, every=every)
        if reference is None:
            reference = r.hypergradients[0]
            results["inner_losses"] = r.inner_losses
            results["reference"] = method
        results["methods"][method] = {
            "hypergradient": r.hypergradients[0].tolist(),
            "outer_loss": r.outer_loss,
            "seconds": r.seconds,
            "max_abs_difference": float((r.hypergradients[0] - reference).abs().max()),
            **{k: v for k, v in r.extra.items() if k != "peak_rss_mib"},
        }
    return results


def logreg_hpo(
    method: str = "unrolled",
    steps: int = 100,
    outer_steps: int = 10,
    outer_lr: float = 0.1,
    *,
    lr: float = 0.1,
    every: int | None = None,
) -> dict[str, Any]:
    """Learn hypertorch's per-feature L2 coefficients with ``method``'s hypergradients (outer Adam).

    The coefficients are kept positive by learning their logarithm (``lambda = exp(log_lambda)``,
    starting at ``lambda = 1``). Returns a JSON-ready dict: the first hypergradient (with respect
    to ``lambda``); ``history``, per outer step the validation loss at the ``lambda`` it started
    from and the seconds its hypergradient took; ``validation_loss``, the validation loss at
    ``final_lambda``, after the last outer step (``steps`` plain inner steps, no hypergradient);
    and the peak RSS of the process (meaningful per method when each method runs in its own
    process).
    """
    model, x_train, y_train, x_val, y_val = logreg_problem()
    inner, outer = _logreg_losses(x_train, y_train, x_val, y_val)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    log_lambda = torch.zeros(x_train.shape[1], dtype=x_train.dtype, requires_grad=True)
    meta_opt = torch.optim.Adam([log_lambda], lr=outer_lr)
    history: list[dict[str, float]] = []
    first: list[float] = []
    for _ in range(outer_steps):
        lam = log_lambda.detach().exp()
        r = hypergradient(method, model, opt, [lam], inner, outer, steps, every=every)
        if not first:
            first = r.hypergradients[0].tolist()
        meta_opt.zero_grad()
        log_lambda.grad = r.hypergradients[0] * lam  # chain rule through lambda = exp(log_lambda)
        meta_opt.step()
        history.append({"validation_loss": r.outer_loss, "seconds": r.seconds})
    final_lambda = log_lambda.detach().exp()
    return {
        "method": method,
        "steps": steps,
        "first_hypergradient": first,
        "history": history,
        "final_lambda": final_lambda.tolist(),
        "peak_rss_mib": _peak_rss_mib(),
        "validation_loss": _validation_loss(model, opt, [final_lambda], inner, outer, steps),
    }


@torch.enable_grad()  # the inner steps take gradients, also when called inside torch.no_grad()
def _validation_loss(
    model: nn.Module, opt: torch.optim.Optimizer, hyper: list[Tensor], inner_loss: Loss, outer_loss: Loss, steps: int
) -> float:
    """``outer_loss`` after ``steps`` plain (non-differentiable) steps of ``opt`` on ``inner_loss``."""
    with innerloop_ctx(model, opt, track_higher_grads=False) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(inner_loss(fmodel, hyper))
        with torch.no_grad():
            return float(outer_loss(fmodel, hyper))
