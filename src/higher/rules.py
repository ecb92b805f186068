"""The update rules: one pure function per ``torch.optim`` optimizer.

Each rule maps ``(parameter, gradient, state, hyperparameters)`` to ``(new parameter, new state)``
and never modifies its inputs, so autograd can differentiate the new parameter with respect to
the old one, to the gradient (second order) and to every hyperparameter given as a tensor. The
math follows ``torch.optim``'s single-tensor kernels (torch 2.13) operation by operation; the
only differences are out-of-place operations and the derivative of ``sqrt`` at 0 (see
:func:`sqrt0`).

Every front end (the ``Differentiable<Name>`` classes, the functional ``step`` and the
task-batched mode) calls these same functions. The rules are elementwise, so they work unchanged
on stacked tensors with a leading task dimension, with hyperparameters that broadcast against
the parameter (one value per task, or one per parameter entry).

Hyperparameter values may be Python numbers or tensors. A tensor hyperparameter always takes the
general code path (``weight_decay`` given as a tensor 0 still builds the decay term), so its
hypergradient is exact even at 0.

Adding an optimizer means writing one ``init`` and one ``update`` function and one
:class:`UpdateRule` entry in :data:`RULES`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

Hyper = Mapping[str, Any]
State = dict[str, Any]

__all__ = ["RULES", "UpdateRule", "rule_for", "sqrt0", "sqrt0_many"]


class _Sqrt0(torch.autograd.Function):
    """``sqrt`` whose derivative at 0 is taken to be 0 instead of infinity."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        root = x.sqrt()
        ctx.save_for_backward(root)
        return root

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (root,) = ctx.saved_tensors
        positive = root > 0
        # Divide by a safe denominator so that higher-order derivatives stay finite too.
        safe_root = torch.where(positive, root, torch.ones_like(root))
        return torch.where(positive, grad / (2 * safe_root), torch.zeros_like(grad))


class _Sqrt0Forward(_Sqrt0):
    """:class:`_Sqrt0` with a forward-mode rule (``higher.forward_hypergradient``): tangent 0 where ``x == 0``.

    A class of its own: dynamo cannot trace an ``autograd.Function`` that defines ``jvp``, and
    :class:`_Sqrt0` must stay traceable (compiled meta-iterations with adaptive optimizers).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        root = x.sqrt()
        ctx.save_for_backward(root)
        ctx.save_for_forward(root)
        return root

    @staticmethod
    def jvp(ctx: Any, tangent: Tensor) -> Tensor:
        (root,) = ctx.saved_tensors
        positive = root > 0
        safe_root = torch.where(positive, root, torch.ones_like(root))
        return torch.where(positive, tangent / (2 * safe_root), torch.zeros_like(tangent))


def sqrt0(x: Tensor) -> Tensor:
    """Square root with the convention ``d sqrt(x)/dx = 0`` at ``x == 0``.

    Adaptive optimizers take ``sqrt`` of a running average of squared gradients. Where a
    gradient entry has been exactly zero at every step so far (a dead ReLU unit, a parameter
    that does not reach the loss), that average ``v`` is exactly 0 and ``sqrt'(0)`` is infinite;
    autograd multiplies it by zeros (``dv/dg = 2 (1 - beta2) g = 0``, and the numerator ``m`` or
    ``g`` of the update is 0 too) and gets NaN meta-gradients. The update itself is smooth
    there: e.g. Adam's ``m / (sqrt(v) + eps)`` with ``m = (1 - beta1) g``, ``v = (1 - beta2) g^2``
    is ``(1 - beta1) g / (sqrt(1 - beta2) |g| + eps)``, whose derivative at ``g = 0`` is
    ``(1 - beta1) / eps``, all of it through ``m``. Taking ``sqrt'(0) = 0`` drops only the 0 * inf
    products, so the meta-gradient is that exact derivative (finite, and equal to finite
    differences), while every entry with ``v > 0`` is untouched. Values are identical to
    ``torch.sqrt``; first and second derivatives equal those of ``sqrt`` wherever ``x > 0``.
    """
    if _has_tangent(x):  # forward mode: its updates run without a reverse graph, but need the convention too
        return _Sqrt0Forward.apply(x)
    if not torch.is_grad_enabled() or not x.requires_grad:
        return x.sqrt()
    return _Sqrt0.apply(x)


class _Sqrt0Many(torch.autograd.Function):
    """:func:`sqrt0` of several tensors at once (one autograd node, multi-tensor kernels)."""

    @staticmethod
    def forward(ctx: Any, *xs: Tensor) -> tuple[Tensor, ...]:
        roots = torch._foreach_sqrt(xs)
        ctx.save_for_backward(*roots)
        return tuple(roots)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor, ...]:
        roots = ctx.saved_tensors
        # grad / (2 root) where root > 0, and 0 where root == 0: sign(root) is 1 or 0, and a
        # positive root is never below the smallest normal number (it is the square root of at
        # least the smallest subnormal), so the clamp only replaces exact zeros.
        dtype = roots[0].dtype
        tiny: float | list[float] = torch.finfo(dtype).tiny
        if any(r.dtype != dtype for r in roots):
            tiny = [torch.finfo(r.dtype).tiny for r in roots]
        if torch.is_grad_enabled():
            # Building a graph (a higher-order derivative): out of place, differentiable through
            # the saved roots, like sqrt0's backward.
            denominators = torch._foreach_mul(torch._foreach_clamp_min(roots, tiny), 2)
            return tuple(torch._foreach_div(torch._foreach_mul(grads, torch._foreach_sign(roots)), denominators))
        # First order (a meta-gradient's backward pass): the same numbers, in place on new tensors.
        denominators = torch._foreach_clamp_min(roots, tiny)
        torch._foreach_mul_(denominators, 2)
        out = torch._foreach_sign(roots)
        torch._foreach_mul_(out, grads)
        torch._foreach_div_(out, denominators)
        return tuple(out)


def sqrt0_many(xs: list[Tensor]) -> list[Tensor]:
    """``[sqrt0(x) for x in xs]``, as one operation (values identical to ``torch.sqrt``)."""
    if any(_has_tangent(x) for x in xs):
        return [sqrt0(x) for x in xs]
    if not torch.is_grad_enabled() or not any(x.requires_grad for x in xs):
        return list(torch._foreach_sqrt(xs))
    return list(_Sqrt0Many.apply(*xs))


def _active(value: Any) -> bool:
    """Whether an optional term (weight decay, momentum) must be built.

    A tensor hyperparameter is always active so that its gradient exists even at value 0.
    """
    return isinstance(value, Tensor) or value != 0


def _clamp(x: Tensor, low: Any, high: Any) -> Tensor:
    """``clamp`` accepting Python numbers and tensors (differentiable in both bounds)."""
    if not isinstance(low, Tensor) and not isinstance(high, Tensor):
        return x.clamp(low, high)
    return torch.minimum(
        torch.maximum(x, torch.as_tensor(low, dtype=x.dtype, device=x.device)),
        torch.as_tensor(high, dtype=x.dtype, device=x.device),
    )


def _zeros(param: Tensor) -> Tensor:
    return torch.zeros_like(param, memory_format=torch.preserve_format)


# Scalar state (step counts, NAdam's mu_product, ASGD's eta and mu) is kept as torch.optim keeps
# it: 0-dim tensors of torch's "scalar dtype" (float64 if the default dtype is float64, else
# float32), so that the state can be handed to a torch optimizer and, where torch rounds such a
# value to float32, the numbers are torch's. Like torch's non-capturable kernels, the rules read
# the value as a Python number for the math (unless it is part of a graph: a tensor
# hyperparameter that requires grad flowed into it).
def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _scalar(value: float) -> Tensor | float:
    """``value`` as torch.optim stores scalar state: a 0-dim CPU tensor of the scalar dtype.

    While ``torch.compile`` traces, a Python number instead: the math reads the value as a number,
    which a tensor made in the graph cannot give without splitting it (``Tensor.item``); dynamo
    folds the number into the graph (the compiled step counts are those of the unrolled loop).
    """
    if torch.compiler.is_compiling():
        return float(value)
    return torch.scalar_tensor(value, dtype=_scalar_dtype())  # twice as fast as torch.tensor


def _value(x: Any) -> Any:
    """A 0-dim state tensor outside any graph as a Python number (torch's ``_get_value``).

    A tensor that carries a hypergradient stays a tensor: one that requires grad (reverse mode),
    or one with a forward-mode tangent (``higher.forward_hypergradient``: ASGD's ``eta`` and
    ``mu``, NAdam's ``mu_product`` depend on the hyperparameters).
    """
    if isinstance(x, Tensor) and x.dim() == 0 and not x.requires_grad and not _has_tangent(x):
        return x.item()
    return x


def _has_tangent(x: Tensor) -> bool:
    """Whether ``x`` is a forward-mode dual tensor with a tangent (cheap outside ``dual_level``)."""
    return forward_ad._current_level >= 0 and forward_ad.unpack_dual(x).tangent is not None


def _next_step(step: Any) -> tuple[Any, Any]:
    """The incremented step count, as stored (a tensor stays a tensor), and its value."""
    if isinstance(step, Tensor):
        if torch.compiler.is_compiling():
            raise NotImplementedError(
                "the optimizer state holds a step count tensor copied from the torch optimizer (a warm start "
                "from an optimizer that has stepped, or Adagrad's state made at construction): torch.compile "
                "cannot read it without splitting the inner loop, which breaks second-order meta-gradients. "
                "Compile with a fresh torch optimizer of another type, or run this inner loop eagerly."
            )
        value = step.item() + 1  # exact: torch's step counts are whole numbers in a float tensor
        return torch.scalar_tensor(value, dtype=step.dtype, device=step.device), value
    return step + 1, step + 1


def _add_scaled_many(xs: list[Tensor], ys: list[Tensor], a: float) -> list[Tensor]:
    """``[x + a * y]`` for number ``a``, keeping nothing extra for the backward pass.

    torch 2.13's ``_foreach_add(xs, ys, alpha=a)`` saves both lists for its derivative (which
    needs neither): in an unroll that keeps every step's gradients alive, 60 MiB more over a
    200-step unroll of a 74k-parameter MLP. One-tensor ``add`` saves nothing, so it is used
    whenever autograd records the operation.
    """
    if torch.is_grad_enabled() and (any(x.requires_grad for x in xs) or any(y.requires_grad for y in ys)):
        return [torch.add(x, y, alpha=a) for x, y in zip(xs, ys)]
    return list(torch._foreach_add(xs, ys, alpha=a))


# The four fused forms that torch.optim's kernels use. With a Python-number coefficient they call
# the same fused kernel as torch.optim (bitwise-equal results). A coefficient given as a tensor that
# requires grad takes the fused kernel for the value and gets its gradient from an exactly-zero
# term ``(a - a.detach()) * y``, so values stay bitwise-equal and derivatives exact at every order.
def _add_scaled(x: Tensor, y: Tensor, a: Any) -> Tensor:
    """``x + a * y`` (torch: ``x.add(y, alpha=a)``)."""
    if not isinstance(a, Tensor):
        return x.add(y, alpha=a)
    if not a.requires_grad:
        return torch.addcmul(x, y, a)
    fixed = a.detach()
    return torch.addcmul(x, y, fixed) + (a - fixed) * y


def _add_product(x: Tensor, y: Tensor, z: Tensor, a: Any) -> Tensor:
    """``x + a * y * z`` (torch: ``x.addcmul(y, z, value=a)``)."""
    if not isinstance(a, Tensor):
        return torch.addcmul(x, y, z, value=a)
    return x + a * (y * z)


def _add_ratio(x: Tensor, y: Tensor, z: Tensor, a: Any) -> Tensor:
    """``x + a * y / z`` (torch: ``x.addcdiv(y, z, value=a)``)."""
    if not isinstance(a, Tensor):
        return torch.addcdiv(x, y, z, value=a)
    return x + a * (y / z)


def _lerp(x: Tensor, y: Tensor, w: Any) -> Tensor:
    """``x + w * (y - x)`` (torch: ``x.lerp(y, w)``)."""
    if not isinstance(w, Tensor):
        return torch.lerp(x, y, w)
    return x + w * (y - x)


def _weight_decay(param: Tensor, grad: Tensor, lr: Any, weight_decay: Any, decoupled: bool) -> tuple[Tensor, Tensor]:
    """Weight decay as L2 on the gradient (``g + wd p``) or decoupled (``p (1 - lr wd)``, AdamW)."""
    if not _active(weight_decay):
        return param, grad
    if decoupled:
        return param * (1 - lr * weight_decay), grad
    return param, _add_scaled(grad, param, weight_decay)


def _moments(state: State, grad: Tensor, beta1: Any, beta2: Any) -> tuple[Tensor, Tensor]:
    """Adam's moment estimates: ``m <- b1 m + (1-b1) g`` and ``v <- b2 v + (1-b2) g^2``."""
    exp_avg = _lerp(state["exp_avg"], grad, 1 - beta1)
    exp_avg_sq = _add_product(state["exp_avg_sq"] * beta2, grad, grad, 1 - beta2)
    return exp_avg, exp_avg_sq


# --------------------------------------------------------------------------------------------
# SGD:  g <- g + wd p;  b <- mu b + (1 - dampening) g  (b_1 = g);  g <- g + mu b (nesterov) or b;
#       p <- p - lr g
# --------------------------------------------------------------------------------------------
def sgd_init(param: Tensor, hp: Hyper) -> State:
    return {}


def sgd_update(param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
    lr, momentum, dampening, weight_decay = hp["lr"], hp["momentum"], hp["dampening"], hp["weight_decay"]
    if hp["maximize"]:
        grad = -grad
    if _active(weight_decay):
        grad = _add_scaled(grad, param, weight_decay)
    new_state: State = {}
    if _active(momentum):
        buf = state.get("momentum_buffer")
        buf = grad if buf is None else _add_scaled(buf * momentum, grad, 1 - dampening)
        new_state["momentum_buffer"] = buf
        grad = _add_scaled(grad, buf, momentum) if hp["nesterov"] else buf
    return _add_scaled(param, grad, -lr), new_state


def _numbers(hp: Hyper, names: tuple[str, ...]) -> bool:
    """Whether these hyperparameters are all plain numbers (the multi-tensor paths' condition)."""
    return not any(isinstance(hp[name], Tensor) for name in names)


def sgd_update_many(
    params: list[Tensor], grads: list[Tensor], states: list[State], hp: Hyper
) -> tuple[list[Tensor], list[State]] | None:
    """:func:`sgd_update` of several parameters with multi-tensor (``torch._foreach_*``) kernels.

    Operation for operation the same math, so the same values; ``None`` (use the one-tensor
    rule) when a hyperparameter is a tensor or only some parameters have a momentum buffer.
    """
    if not _numbers(hp, ("lr", "momentum", "dampening", "weight_decay")):
        return None
    lr, momentum, dampening, weight_decay = hp["lr"], hp["momentum"], hp["dampening"], hp["weight_decay"]
    if hp["maximize"]:
        grads = list(torch._foreach_neg(grads))
    if weight_decay != 0:
        grads = _add_scaled_many(grads, params, weight_decay)
    new_states: list[State] = [{} for _ in params]
    if momentum != 0:
        buffers = [state.get("momentum_buffer") for state in states]
        if all(buf is None for buf in buffers):
            buffers = list(grads)
        elif any(buf is None for buf in buffers):
            return None
        else:
            buffers = _add_scaled_many([buf * momentum for buf in buffers], grads, 1 - dampening)
        new_states = [{"momentum_buffer": buf} for buf in buffers]
        grads = _add_scaled_many(grads, buffers, momentum) if hp["nesterov"] else buffers
    return _add_scaled_many(params, grads, -lr), new_states


# --------------------------------------------------------------------------------------------
# Adam / AdamW (Kingma & Ba 2015; Loshchilov & Hutter 2019):
#   m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2;  (amsgrad: v_max <- max(v_max, v))
#   p <- p - lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)
#   weight decay: g <- g + wd p  (L2)  or  p <- p (1 - lr wd)  (decoupled, AdamW)
# --------------------------------------------------------------------------------------------
def adam_init(param: Tensor, hp: Hyper) -> State:
    state: State = {"step": _scalar(0.0), "exp_avg": _zeros(param), "exp_avg_sq": _zeros(param)}
    if hp["amsgrad"]:
        state["max_exp_avg_sq"] = _zeros(param)
    return state


def adam_update(param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
    lr, (beta1, beta2), eps, weight_decay = hp["lr"], hp["betas"], hp["eps"], hp["weight_decay"]
    if hp["maximize"]:
        grad = -grad
    step_t, step = _next_step(state["step"])
    param, grad = _weight_decay(param, grad, lr, weight_decay, hp["decoupled_weight_decay"])
    exp_avg, exp_avg_sq = _moments(state, grad, beta1, beta2)
    new_state: State = {"step": step_t, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    second_moment = exp_avg_sq
    if hp["amsgrad"]:
        second_moment = torch.maximum(state["max_exp_avg_sq"], exp_avg_sq)
        new_state["max_exp_avg_sq"] = second_moment
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    denom = sqrt0(second_moment) / bias_correction2_sqrt + eps
    return _add_ratio(param, exp_avg, denom, -(lr / bias_correction1)), new_state


def adam_update_many(
    params: list[Tensor], grads: list[Tensor], states: list[State], hp: Hyper
) -> tuple[list[Tensor], list[State]] | None:
    """:func:`adam_update` of several parameters, with multi-tensor (``torch._foreach_*``) kernels.

    Operation for operation the same math, so the same values; ``None`` (use the one-tensor
    rule) when a hyperparameter is a tensor. Only the operations whose multi-tensor derivative
    saves no more than the one-tensor one are multi-tensor: torch 2.13's ``_foreach_mul``,
    ``_foreach_div``, ``_foreach_add`` and ``_foreach_addcmul`` save inputs their derivative does
    not need (a copy of a parameter-sized state per parameter and step, kept for the whole
    unroll), and the derivative of ``_foreach_addcdiv`` fails for more than a few tensors.
    """
    if not _numbers(hp, ("lr", "eps", "weight_decay")) or any(isinstance(b, Tensor) for b in hp["betas"]):
        return None
    lr, (beta1, beta2), eps, weight_decay = hp["lr"], hp["betas"], hp["eps"], hp["weight_decay"]
    if hp["maximize"]:
        grads = list(torch._foreach_neg(grads))
    step_ts, steps = zip(*(_next_step(state["step"]) for state in states))
    if weight_decay != 0:
        if hp["decoupled_weight_decay"]:
            params = [p * (1 - lr * weight_decay) for p in params]  # _foreach_mul would save params
        else:
            grads = _add_scaled_many(grads, params, weight_decay)
    exp_avgs = torch._foreach_lerp([state["exp_avg"] for state in states], grads, 1 - beta1)
    # One-tensor addcmul: the multi-tensor one also saves the (otherwise unneeded) decayed average.
    exp_avg_sqs = [torch.addcmul(s["exp_avg_sq"] * beta2, g, g, value=1 - beta2) for s, g in zip(states, grads)]
    new_states: list[State] = [
        {"step": step_t, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
        for step_t, exp_avg, exp_avg_sq in zip(step_ts, exp_avgs, exp_avg_sqs)
    ]
    second_moments = exp_avg_sqs
    if hp["amsgrad"]:
        second_moments = list(torch._foreach_maximum([state["max_exp_avg_sq"] for state in states], exp_avg_sqs))
        for state, second_moment in zip(new_states, second_moments):
            state["max_exp_avg_sq"] = second_moment
    bias_corrections2_sqrt = [(1 - beta2**step) ** 0.5 for step in steps]
    denominators = [root / b + eps for root, b in zip(sqrt0_many(second_moments), bias_corrections2_sqrt)]
    step_sizes = [-(lr / (1 - beta1**step)) for step in steps]
    new_params = [torch.addcdiv(p, m, d, value=v) for p, m, d, v in zip(params, exp_avgs, denominators, step_sizes)]
    return new_params, new_states


# --------------------------------------------------------------------------------------------
# Adagrad (Duchi et al. 2011):  s <- s + g^2;  p <- p - lr/(1 + (t-1) lr_decay) * g / (sqrt(s) + eps)
# --------------------------------------------------------------------------------------------
def adagrad_init(param: Tensor, hp: Hyper) -> State:
    return {"step": _scalar(0.0), "sum": _zeros(param) + hp["initial_accumulator_value"]}


def adagrad_update(param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
    lr, lr_decay, eps, weight_decay = hp["lr"], hp["lr_decay"], hp["eps"], hp["weight_decay"]
    if hp["maximize"]:
        grad = -grad
    step_t, step = _next_step(state["step"])
    if _active(weight_decay):
        grad = _add_scaled(grad, param, weight_decay)
    clr = lr / (1 + (step - 1) * lr_decay)
    accumulated = _add_product(state["sum"], grad, grad, 1)
    std = sqrt0(accumulated) + eps
    return _add_ratio(param, grad, std, -clr), {"step": step_t, "sum": accumulated}


# --------------------------------------------------------------------------------------------
# Adadelta (Zeiler 2012):  v <- rho v + (1-rho) g^2;  d = sqrt(u + eps)/sqrt(v + eps) g;
#                          u <- rho u + (1-rho) d^2;  p <- p - lr d
# --------------------------------------------------------------------------------------------
def adadelta_init(param: Tensor, hp: Hyper) -> State:
    return {"step": _scalar(0.0), "square_avg": _zeros(param), "acc_delta": _zeros(param)}


def adadelta_update(param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
    lr, rho, eps, weight_decay = hp["lr"], hp["rho"], hp["eps"], hp["weight_decay"]
    if hp["maximize"]:
        grad = -grad
    if _active(weight_decay):
        grad = _add_scaled(grad, param, weight_decay)
    square_avg = _add_product(state["square_avg"] * rho, grad, grad, 1 - rho)
    std = (square_avg + eps).sqrt()
    delta = (state["acc_delta"] + eps).sqrt() / std * grad
    acc_delta = _add_product(state["acc_delta"] * rho, delta, delta, 1 - rho)
    new_state = {"step": _next_step(state["step"])[0], "square_avg": square_avg, "acc_delta": acc_delta}
    return _add_scaled(param, delta, -lr), new_state


# --------------------------------------------------------------------------------------------
# Adamax (Kingma & Ba 2015, sec. 7.1):  m <- b1 m + (1-b1) g;  u <- max(b2 u, |g| + eps);
#                                       p <- p - lr/(1-b1^t) * m / u
# --------------------------------------------------------------------------------------------
def adamax_init(param: Tensor, hp: Hyper) -> State:
    return {"step": _scalar(0.0), "exp_avg": _zeros(param), "exp_inf": _zeros(param)}


def adamax_update(param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
    lr, (beta1, beta2), eps, weight_decay = hp["lr"], hp["betas"], hp["eps"], hp["weight_decay"]
    if hp["maximize"]:
        grad = -grad
    step_t, step = _next_step(state["step"])
    if _active(weight_decay):
        grad = _add_scaled(grad, param, weight_decay)
    exp_avg = _lerp(state["exp_avg"], grad, 1 - beta1)
    exp_inf = torch.maximum(state["exp_inf"] * beta2, grad.abs() + eps)
    clr = lr / (1 - beta1**step)
    new_state = {"step": step_t, "exp_avg": exp_avg, "exp_inf": exp_inf}
    return _add_ratio(param, exp_avg, exp_inf, -clr), new_state


# --------------------------------------------------------------------------------------------
# ASGD (Polyak & Juditsky 1992):  p <- p (1 - lambd eta) - eta g;  ax <- ax + mu (p - ax);
#   eta <- lr / (1 + lambd lr t)^alpha;  mu <- 1 / max(1, t - t0)
# --------------------------------------------------------------------------------------------
def asgd_init(param: Tensor, hp: Hyper) -> State:
    lr = hp["lr"]
    eta = lr if isinstance(lr, Tensor) else _scalar(lr)
    return {"step": _scalar(0.0), "eta": eta, "mu": _scalar(1.0), "ax": _zeros(param)}


def asgd_update(param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
    lr, lambd, alpha, t0, weight_decay = hp["lr"], hp["lambd"], hp["alpha"], hp["t0"], hp["weight_decay"]
    if hp["maximize"]:
        grad = -grad
    step_t, step = _next_step(state["step"])
    if _active(weight_decay):
        grad = _add_scaled(grad, param, weight_decay)
    eta, mu = _value(state["eta"]), _value(state["mu"])
    param = param * (1 - lambd * eta)
    param = _add_scaled(param, grad, -eta)
    ax = state["ax"]
    ax = ax + (param - ax) * mu if isinstance(mu, Tensor) or mu != 1 else param
    new_eta = lr / ((1 + lambd * lr * step) ** alpha)
    if isinstance(t0, Tensor):
        new_mu: Any = 1 / torch.clamp(step - t0, min=1)
    else:
        new_mu = 1 / max(1, step - t0)
    # torch stores eta and mu in the scalar dtype (float32 under a float32 default): so do we,
    # unless they carry a hypergradient.
    new_eta = new_eta if isinstance(new_eta, Tensor) else _scalar(new_eta)
    new_mu = new_mu if isinstance(new_mu, Tensor) else _scalar(new_mu)
    return param, {"step": step_t, "eta": new_eta, "mu": new_mu, "ax": ax}


# --------------------------------------------------------------------------------------------
# RMSprop (Hinton 2012; Graves 2013 for centered):  v <- a v + (1-a) g^2;
#   centered: m <- a m + (1-a) g, avg = sqrt(v - m^2) + eps;  else avg = sqrt(v) + eps
#   momentum: b <- mu b + g/avg, p <- p - lr b;  else p <- p - lr g/avg
# --------------------------------------------------------------------------------------------
def rmsprop_init(param: Tensor, hp: Hyper) -> State:
    state: State = {"step": _scalar(0.0), "square_avg": _zeros(param)}
    if _active(hp["momentum"]):
        state["momentum_buffer"] = _zeros(param)
    if hp["centered"]:
        state["grad_avg"] = _zeros(param)
    return state


def rmsprop_update(param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
    lr, alpha, eps, weight_decay, momentum = hp["lr"], hp["alpha"], hp["eps"], hp["weight_decay"], hp["momentum"]
    if hp["maximize"]:
        grad = -grad
    if _active(weight_decay):
        grad = _add_scaled(grad, param, weight_decay)
    square_avg = _add_product(state["square_avg"] * alpha, grad, grad, 1 - alpha)
    new_state: State = {"step": _next_step(state["step"])[0], "square_avg": square_avg}
    if hp["centered"]:
        grad_avg = _lerp(state["grad_avg"], grad, 1 - alpha)
        new_state["grad_avg"] = grad_avg
        avg = sqrt0(_add_product(square_avg, grad_avg, grad_avg, -1)) + eps
    else:
        avg = sqrt0(square_avg) + eps
    if _active(momentum):
        buf = state.get("momentum_buffer")
        buf = grad / avg if buf is None else _add_ratio(buf * momentum, grad, avg, 1)
        new_state["momentum_buffer"] = buf
        return _add_scaled(param, buf, -lr), new_state
    return _add_ratio(param, grad, avg, -lr), new_state


# --------------------------------------------------------------------------------------------
# Rprop (Riedmiller & Braun 1993):  s = sign(g g_prev);  step <- clamp(step * (eta+ | eta- | 1));
#   g <- 0 where the sign flipped;  p <- p - sign(g) step;  g_prev <- g
# --------------------------------------------------------------------------------------------
def rprop_init(param: Tensor, hp: Hyper) -> State:
    return {"step": _scalar(0.0), "prev": _zeros(param), "step_size": _zeros(param) + hp["lr"]}


def rprop_update(param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
    etaminus, etaplus = hp["etas"]
    step_size_min, step_size_max = hp["step_sizes"]
    if hp["maximize"]:
        grad = -grad
    sign = (grad * state["prev"]).sign()
    ones = torch.ones_like(sign)
    factor = torch.where(sign > 0, etaplus, torch.where(sign < 0, etaminus, ones))
    step_size = _clamp(state["step_size"] * factor, step_size_min, step_size_max)
    grad = torch.where(factor == etaminus, torch.zeros_like(grad), grad)
    new_state = {"step": _next_step(state["step"])[0], "prev": grad, "step_size": step_size}
    return _add_product(param, grad.sign(), step_size, -1), new_state


# --------------------------------------------------------------------------------------------
# NAdam (Dozat 2016):  mu_t = b1 (1 - 0.5 * 0.96^(t psi));  m, v as in Adam;
#   p <- p - lr (1-mu_t)/(1-prod mu) g/d - lr mu_{t+1}/(1 - prod mu * mu_{t+1}) m/d,
#   d = sqrt(v/(1-b2^t)) + eps
# --------------------------------------------------------------------------------------------
def nadam_init(param: Tensor, hp: Hyper) -> State:
    return {"step": _scalar(0.0), "mu_product": _scalar(1.0), "exp_avg": _zeros(param), "exp_avg_sq": _zeros(param)}


def nadam_update(param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
    lr, (beta1, beta2), eps, weight_decay = hp["lr"], hp["betas"], hp["eps"], hp["weight_decay"]
    momentum_decay = hp["momentum_decay"]
    if hp["maximize"]:
        grad = -grad
    step_t, step = _next_step(state["step"])
    bias_correction2 = 1 - beta2**step
    param, grad = _weight_decay(param, grad, lr, weight_decay, hp["decoupled_weight_decay"])
    mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))
    mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * momentum_decay)))
    # The product is kept as torch keeps it (a tensor of the scalar dtype, float32 under a
    # float32 default) and read back as a number, unless it carries a hypergradient.
    mu_product = state["mu_product"] * mu
    if not isinstance(mu_product, Tensor):
        mu_product = _scalar(mu_product)
    mu_product_value = _value(mu_product)
    mu_product_next = mu_product_value * mu_next
    exp_avg, exp_avg_sq = _moments(state, grad, beta1, beta2)
    denom = sqrt0(exp_avg_sq / bias_correction2) + eps
    param = _add_ratio(param, grad, denom, -lr * (1.0 - mu) / (1.0 - mu_product_value))
    param = _add_ratio(param, exp_avg, denom, (-lr * mu_next) / (1.0 - mu_product_next))
    new_state = {"step": step_t, "mu_product": mu_product, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    return param, new_state


# --------------------------------------------------------------------------------------------
# RAdam (Liu et al. 2020):  m, v as in Adam;  rho_inf = 2/(1-b2) - 1;
#   rho_t = rho_inf - 2 t b2^t / (1 - b2^t);  if rho_t > 5: p <- p - lr m_hat r_t sqrt(1-b2^t)/(sqrt(v)+eps)
#   with r_t = sqrt((rho_t-4)(rho_t-2) rho_inf / ((rho_inf-4)(rho_inf-2) rho_t)); else p <- p - lr m_hat
# --------------------------------------------------------------------------------------------
def radam_init(param: Tensor, hp: Hyper) -> State:
    return {"step": _scalar(0.0), "exp_avg": _zeros(param), "exp_avg_sq": _zeros(param)}


def radam_update(param: Tensor, grad: Tensor, state: State, hp: Hyper) -> tuple[Tensor, State]:
    lr, (beta1, beta2), eps, weight_decay = hp["lr"], hp["betas"], hp["eps"], hp["weight_decay"]
    if hp["maximize"]:
        grad = -grad
    step_t, step = _next_step(state["step"])
    param, grad = _weight_decay(param, grad, lr, weight_decay, hp["decoupled_weight_decay"])
    exp_avg, exp_avg_sq = _moments(state, grad, beta1, beta2)
    new_state = {"step": step_t, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    corrected_exp_avg = exp_avg / bias_correction1
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * (beta2**step) / bias_correction2

    def adaptive_lr() -> Tensor:
        return (bias_correction2**0.5) / (sqrt0(exp_avg_sq) + eps)

    def rectification(rho: Any) -> Any:
        return ((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho)) ** 0.5

    if isinstance(rho_t, Tensor) and rho_t.numel() > 1:
        # One beta2 per task (batched mode): choose per entry, keeping both branches finite.
        rectified = rho_t > 5.0
        safe_rho = torch.where(rectified, rho_t, torch.full_like(rho_t, 6.0))
        scale = torch.where(rectified, rectification(safe_rho) * adaptive_lr(), torch.ones_like(param))
        return _add_scaled(param, corrected_exp_avg * lr * scale, -1.0), new_state
    if rho_t > 5.0:
        update = corrected_exp_avg * lr * adaptive_lr() * rectification(rho_t)
    else:
        update = corrected_exp_avg * lr
    return _add_scaled(param, update, -1.0), new_state


_IMPLEMENTATION_FLAGS = ("foreach", "fused", "capturable", "differentiable")


@dataclass(frozen=True)
class UpdateRule:
    """A differentiable optimizer: its math and the ``torch.optim`` options it understands.

    Attributes:
        name: the ``torch.optim`` class name.
        torch_optimizer: the ``torch.optim`` class whose math this is.
        hyperparameters: numeric options; each may be given as a tensor (``override``) and then
            receives an exact hypergradient. Pairs such as ``betas`` are tuples of two.
        flags: boolean options that change the math (``amsgrad``, ``maximize``, ...).
        init: ``init(param, hyperparameters) -> state``, the state before the first step.
        update: ``update(param, grad, state, hyperparameters) -> (new_param, new_state)``.
        update_many: optional, the same as ``update`` for lists of parameters, gradients and
            states with multi-tensor kernels (fewer operations and autograd nodes), giving the
            same values; it returns ``None`` where it does not apply (``update`` is used then).
        flags_added_later: ``(flag, value)`` for flags that older torch 2.x versions do not
            put into the parameter groups, with the value that gives their behaviour (the value
            torch's own ``__setstate__`` fills in for such groups).
        init_hyperparameters: the hyperparameters ``init`` reads (Adagrad's
            ``initial_accumulator_value``): overriding one replaces the state of parameters that
            have not stepped yet, which torch may have built from the old value.
    """

    name: str
    torch_optimizer: type[torch.optim.Optimizer]
    hyperparameters: tuple[str, ...]
    flags: tuple[str, ...]
    init: Callable[[Tensor, Hyper], State]
    update: Callable[[Tensor, Tensor, State, Hyper], tuple[Tensor, State]]
    update_many: (
        Callable[[list[Tensor], list[Tensor], list[State], Hyper], tuple[list[Tensor], list[State]] | None] | None
    ) = None
    flags_added_later: tuple[tuple[str, bool], ...] = ()
    init_hyperparameters: tuple[str, ...] = ()

    #: Every group key this rule reads or accepts without effect (implementation flags); made
    #: with the rule (not on first use, which may happen while torch.compile traces).
    options: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", frozenset(self.hyperparameters + self.flags + _IMPLEMENTATION_FLAGS))


_ADAM_OPTIONS: dict[str, Any] = dict(
    hyperparameters=("lr", "betas", "eps", "weight_decay"),
    flags=("amsgrad", "maximize", "decoupled_weight_decay"),
    init=adam_init,
    update=adam_update,
    update_many=adam_update_many,
)

RULES: dict[str, UpdateRule] = {
    rule.name: rule
    for rule in (
        UpdateRule(
            "SGD",
            torch.optim.SGD,
            ("lr", "momentum", "dampening", "weight_decay"),
            ("nesterov", "maximize"),
            sgd_init,
            sgd_update,
            sgd_update_many,
        ),
        UpdateRule("Adam", torch.optim.Adam, **_ADAM_OPTIONS, flags_added_later=(("decoupled_weight_decay", False),)),
        UpdateRule("AdamW", torch.optim.AdamW, **_ADAM_OPTIONS, flags_added_later=(("decoupled_weight_decay", True),)),
        UpdateRule(
            "Adagrad",
            torch.optim.Adagrad,
            ("lr", "lr_decay", "eps", "weight_decay", "initial_accumulator_value"),
            ("maximize",),
            adagrad_init,
            adagrad_update,
            init_hyperparameters=("initial_accumulator_value",),
        ),
        UpdateRule(
            "Adadelta",
            torch.optim.Adadelta,
            ("lr", "rho", "eps", "weight_decay"),
            ("maximize",),
            adadelta_init,
            adadelta_update,
        ),
        UpdateRule(
            "Adamax",
            torch.optim.Adamax,
            ("lr", "betas", "eps", "weight_decay"),
            ("maximize",),
            adamax_init,
            adamax_update,
        ),
        UpdateRule(
            "ASGD",
            torch.optim.ASGD,
            ("lr", "lambd", "alpha", "t0", "weight_decay"),
            ("maximize",),
            asgd_init,
            asgd_update,
            init_hyperparameters=("lr",),
        ),
        UpdateRule(
            "RMSprop",
            torch.optim.RMSprop,
            ("lr", "alpha", "eps", "weight_decay", "momentum"),
            ("centered", "maximize"),
            rmsprop_init,
            rmsprop_update,
        ),
        UpdateRule(
            "Rprop",
            torch.optim.Rprop,
            ("lr", "etas", "step_sizes"),
            ("maximize",),
            rprop_init,
            rprop_update,
            init_hyperparameters=("lr",),
        ),
        UpdateRule(
            "NAdam",
            torch.optim.NAdam,
            ("lr", "betas", "eps", "weight_decay", "momentum_decay"),
            ("maximize", "decoupled_weight_decay"),
            nadam_init,
            nadam_update,
            flags_added_later=(("decoupled_weight_decay", False),),
        ),
        UpdateRule(
            "RAdam",
            torch.optim.RAdam,
            ("lr", "betas", "eps", "weight_decay"),
            ("maximize", "decoupled_weight_decay"),
            radam_init,
            radam_update,
            flags_added_later=(("decoupled_weight_decay", False),),
        ),
    )
}

#: Hyperparameters that are pairs of numbers.
PAIR_HYPERPARAMETERS = frozenset({"betas", "etas", "step_sizes"})


def rule_for(optimizer_type: type) -> UpdateRule | None:
    """The rule for exactly this ``torch.optim`` class (subclasses are not matched)."""
    for rule in RULES.values():
        if rule.torch_optimizer is optimizer_type:
            return rule
    return None
