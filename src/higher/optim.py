"""Differentiable optimizers: the ``torch.optim`` front end over the update rules.

A :class:`DifferentiableOptimizer` is built from an existing ``torch.optim`` optimizer. It copies
the optimizer's parameter groups (hyperparameters) and state, and then, at each
:meth:`~DifferentiableOptimizer.step`, takes the gradient of a loss with respect to the current
fast weights and returns *new* tensors computed out of place by the optimizer's update rule
(:mod:`higher.rules`), so that the whole unrolled optimization can be differentiated.

The interface (names, signatures, the ``state[group][index]`` layout, ``override`` and
``grad_callback``) is that of higher 0.2.1; the math is that of ``torch.optim`` in torch 2.13.
"""

# How it is built: DifferentiableOptimizer stacks the layers of higher._optim (the groups'
# hyperparameters, then the state and the update rule applied to it) and adds the front end
# below: construction, step() and torch.optim.Optimizer's interface. This module also keeps the
# public classes (one per rule of higher.rules), the registry, and 0.2.1's helpers and names.

from __future__ import annotations

import numbers
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Union, cast

import torch
import torch.optim.optimizer as _torch_optimizer
from torch import Tensor

from . import _tracing
from . import rules as _rules
from ._optim.hyperparameters import (  # noqa: F401 (PerParameter... re-exported, _OverrideType: 0.2.1's name)
    PerParameter,
    PerStep,
    _flat,
    _OverrideType,
    _per_group,
)
from ._optim.layout import _Layout  # noqa: F401 (re-exported)
from ._optim.updates import _GroupedGradsType, _StateType, _Updates  # noqa: F401 (0.2.1's names)
from .rules import UpdateRule
from .utils import _is_container

if TYPE_CHECKING:
    from .patch import FunctionalModule

__all__ = [
    "DifferentiableOptimizer",
    "PerParameter",
    "PerStep",
    "DifferentiableSGD",
    "DifferentiableAdam",
    "DifferentiableAdamW",
    "DifferentiableAdagrad",
    "DifferentiableAdadelta",
    "DifferentiableAdamax",
    "DifferentiableASGD",
    "DifferentiableRMSprop",
    "DifferentiableRprop",
    "DifferentiableNAdam",
    "DifferentiableRAdam",
    "get_diff_optim",
    "create_diff_optim",
    "register_optim",
    "get_trainable_opt_params",
    "apply_trainable_opt_params",
]

# torch.optim's global step hooks (torch.optim.optimizer.register_optimizer_step_pre_hook), which
# every torch optimizer runs; empty stand-ins where a torch lacks them.
_GLOBAL_PRE_HOOKS: dict[int, Callable[..., Any]] = getattr(_torch_optimizer, "_global_optimizer_pre_hooks", {})
_GLOBAL_POST_HOOKS: dict[int, Callable[..., Any]] = getattr(_torch_optimizer, "_global_optimizer_post_hooks", {})

_GradCallbackType = Callable[[Sequence[Union[Tensor, None]]], Sequence[Union[Tensor, None]]]


class DifferentiableOptimizer(_Updates):
    """Base class of the differentiable optimizers.

    Args:
        other: the ``torch.optim.Optimizer`` whose parameter groups, hyperparameters and state
            are copied (its own parameters are never modified).
        reference_params: the tensors that ``other`` may track, in the order of the fast weights
            (``model.parameters()`` for a patched model). Every tensor of ``other`` must be one
            of them, by identity.
        fmodel: the patched model whose fast weights ``step`` updates (optional).
        device: where to put the copied optimizer state (default: where it is).
        override: hyperparameters to replace, ``{name: [value]}`` (one value for all groups) or
            ``{name: [value_group0, value_group1, ...]}``; a single number or 0-dim tensor also
            applies to all groups. Tensors that require grad receive hypergradients.
        grad_callback: called with the tuple of gradients (one per reference parameter, ``None``
            where a parameter has no gradient) before the update; returns the gradients to use.
        track_higher_grads: if ``False``, gradients are taken without a graph and every new fast
            weight is a fresh leaf (cheap "test mode": no meta-gradient through the step).
        first_order: if ``True``, gradients are taken without a graph (cheap, as with
            ``track_higher_grads=False``) but each new fast weight stays connected to the previous
            one through the update itself, so a meta-loss backpropagates to the initial weights
            and hyperparameters with every gradient treated as a constant: first-order MAML.

    A ``DifferentiableOptimizer`` is a ``torch.optim.Optimizer`` as far as
    ``torch.optim.lr_scheduler`` is concerned: a scheduler attached to it sets ``lr`` in its
    ``param_groups`` exactly as for the torch optimizer.
    """

    #: The update rule, for the built-in optimizers; user subclasses override ``_update``.
    rule: UpdateRule | None = None

    def __init__(
        self,
        other: torch.optim.Optimizer,
        reference_params: Iterable[Tensor],
        fmodel: FunctionalModule | None = None,
        device: torch.device | str | None = None,
        override: _OverrideType | None = None,
        grad_callback: _GradCallbackType | None = None,
        track_higher_grads: bool = True,
        *,
        first_order: bool = False,
        **kwargs: Any,
    ) -> None:
        if kwargs:
            raise TypeError(f"{type(self).__name__} got unexpected keyword arguments: {', '.join(kwargs)}")
        if first_order and not track_higher_grads:
            raise ValueError(
                "first_order=True needs track_higher_grads=True (first-order mode keeps the update graph)."
            )
        reference_params = list(reference_params)
        layout = _Layout.of(type(self), other, reference_params)
        self._group_to_param_list = layout.group_to_param_list
        self._updated_indices = layout.updated_indices  # the indices of the fast weights it updates
        self._steps_taken = 0
        self._copy_hyperparameters(other, layout)
        self._copy_state(other, reference_params, device)
        # torch.optim.Optimizer's step hooks (register_step_pre_hook / register_step_post_hook).
        self._optimizer_step_pre_hooks: dict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_step_post_hooks: dict[int, Callable[..., Any]] = OrderedDict()
        self._fmodel = fmodel
        self._track_higher_grads = track_higher_grads
        self._first_order = first_order
        self._grad_callback = grad_callback
        self._num_reference_params = len(reference_params)
        self._reference_shapes = [p.shape for p in reference_params]
        # Set by higher.forward_mode, whose updates run under no_grad on purpose (forward-mode
        # tangents need no reverse graph); a user's step under no_grad is refused.
        self._steps_without_graph = False
        self._take_override(override)  # last: an override may replace state built from the old value

    # ---------------------------------------------------------------- the step
    def step(
        self,
        loss: Tensor | Callable[[], Tensor] | None = None,
        params: Iterable[Tensor] | None = None,
        override: _OverrideType | None = None,
        grad_callback: _GradCallbackType | None = None,
        *,
        closure: Callable[[], Tensor] | None = None,
        **kwargs: Any,
    ) -> list[Tensor]:
        """Take one differentiable optimizer step on ``loss`` and return the new parameters.

        Args:
            loss: a scalar tensor computed from the current fast weights (task-batched: the
                per-task losses).
            closure: instead of ``loss``, a function without arguments that computes it,
                torch.optim's convention (``step(closure)`` works too); the same as
                ``step(closure())``.
            params: the tensors to update (default: the attached fmodel's fast weights), in the
                order of ``reference_params``.
            override: hyperparameters to replace from this step on (see the class docstring).
            grad_callback: replaces the constructor's ``grad_callback`` for this step.

        Returns:
            The list of new parameters (parameters not tracked by the optimizer are passed
            through). If an fmodel is attached, it adopts them as its new fast weights.

        Hooks registered with ``register_step_pre_hook``/``register_step_post_hook`` (and torch's
        global optimizer hooks) run before and after the update, as for a torch optimizer, with
        ``args == (loss,)`` and the other arguments in ``kwargs``.
        """
        if callable(loss) and not isinstance(loss, Tensor):  # torch.optim's step(closure)
            loss, closure = None, loss
        if (loss is None) == (closure is None):
            raise TypeError(
                "step() needs either the loss (a tensor) or closure=... (a function computing it), not "
                + ("both." if closure is not None else "neither.")
            )
        if closure is not None:
            kwargs["closure"] = closure
        if not (
            _GLOBAL_PRE_HOOKS or _GLOBAL_POST_HOOKS or self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks
        ):
            return self._step(loss, params, override, grad_callback, **kwargs)
        pre_hooks = [*_GLOBAL_PRE_HOOKS.values(), *self._optimizer_step_pre_hooks.values()]
        post_hooks = [*_GLOBAL_POST_HOOKS.values(), *self._optimizer_step_post_hooks.values()]
        # As torch.optim.Optimizer.step: hook(optimizer, args, kwargs); a pre-hook may return
        # new (args, kwargs).
        args: tuple[Any, ...] = (loss,)
        keywords: dict[str, Any] = {"params": params, "override": override, "grad_callback": grad_callback, **kwargs}
        for hook in pre_hooks:
            result = hook(self, args, keywords)
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(
                        f"an optimizer step pre-hook must return None or a tuple (new_args, new_kwargs), got {result!r}."
                    )
                args, keywords = result
        new_params = self._step(*args, **keywords)
        for hook in post_hooks:
            hook(self, args, keywords)
        return new_params

    def _step(
        self,
        loss: Tensor | None,
        params: Iterable[Tensor] | None = None,
        override: _OverrideType | None = None,
        grad_callback: _GradCallbackType | None = None,
        closure: Callable[[], Tensor] | None = None,
        **kwargs: Any,
    ) -> list[Tensor]:
        """:meth:`step` without the hooks."""
        if not torch.is_grad_enabled() and not self._steps_without_graph:
            # (dynamo cannot trace is_inference_mode_enabled; a compiled function is not run in inference mode)
            inference = not _tracing.tracing() and torch.is_inference_mode_enabled()
            if not self._track_higher_grads and not inference:
                # It records no graph either way: the same step (its new fast weights are fresh leaves).
                with torch.enable_grad():
                    return self._step(loss, params, override, grad_callback, closure, **kwargs)
            mode = "torch.inference_mode()" if inference else "torch.no_grad()"
            raise RuntimeError(
                f"diffopt.step() was called under {mode}: the update would not be recorded, so the unroll "
                f"would silently stop being differentiable. Call step() outside {mode} (for a cheap loop "
                f"without meta-gradients, build the optimizer with track_higher_grads=False instead)."
            )
        if override is not None:
            self._apply_override(override)
        if self._learned_versions and not _tracing.tracing():
            self._check_learned_versions()
        given = params is not None
        params = self._params_to_update(params)
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = self._gradients(cast(Tensor, loss), params)
        callback = grad_callback if grad_callback is not None else self._grad_callback
        if callback is not None:
            grads = list(callback(tuple(grads)))
            if len(grads) != len(params):
                raise ValueError(
                    f"grad_callback returned {len(grads)} gradients for {len(params)} parameters; "
                    f"return one (or None) per parameter."
                )
        new_params = self._apply_update(params, grads, **kwargs)
        self._steps_taken += 1
        # The built-in rules are elementwise: they keep the fmodel's shapes, unless given other
        # tensors, or a gradient from a callback or a hyperparameter tensor with dimensions
        # broadcast them. A subclass's _update may do anything.
        checked = (
            type(self)._update is DifferentiableOptimizer._update
            and not given
            and callback is None
            and not self._shaped_hyperparameters
        )
        if not self._track_higher_grads:
            new_params = [_tracing.fresh_leaf(p, old.requires_grad) for p, old in zip(new_params, params)]
            self._detach_state()
        fmodel = self._fmodel
        if fmodel is not None:
            if checked and fmodel._hg_is_root:
                # A list of its own: the caller may change the one returned (as in 0.2.1, whose
                # fmodel copied it), which must not change the fmodel's history.
                fmodel._hg_core.push(new_params[:])
            else:
                fmodel.update_params(new_params)
        return new_params

    def _params_to_update(self, params: Iterable[Tensor] | None) -> list[Tensor]:
        if params is None:
            if self._fmodel is None:
                raise ValueError(
                    "step() has no parameters to update: pass params=[...] or build the optimizer "
                    "with fmodel=... (higher.innerloop_ctx does)."
                )
            fmodel = self._fmodel
            params = fmodel._hg_core.latest if fmodel._hg_is_root else fmodel.fast_params
            if params is None:
                raise ValueError("the fmodel has no fast weights yet: pass params=[...] to step().")
            given = False  # the fmodel's own, checked when they were set
        else:
            params = list(params)
            given = True
        params = cast(list[Tensor], params)
        if len(params) != self._num_reference_params:
            raise ValueError(
                f"step() got {len(params)} parameters but the optimizer was built for "
                f"{self._num_reference_params} reference parameters (same order)."
            )
        if given:
            for i, (p, shape) in enumerate(zip(params, self._reference_shapes)):
                if not isinstance(p, Tensor):
                    raise TypeError(f"step(): params[{i}] is a {type(p).__name__}, not a tensor.")
                if p.shape != shape:
                    raise ValueError(
                        f"step(): params[{i}] has shape {tuple(p.shape)} but the optimizer was built for a "
                        f"parameter of shape {tuple(shape)} at that position; pass the tensors in the order "
                        f"and shapes of the reference parameters."
                    )
        if self._updated_indices and not any(params[i].requires_grad for i in self._updated_indices):
            raise ValueError(
                "none of the tensors this optimizer updates requires grad, so there is no gradient to "
                "step with and nothing would change: pass tensors with requires_grad=True "
                "(e.g. p.detach().requires_grad_())."
            )
        return params

    def _objective(self, loss: Any) -> Tensor:
        """The scalar that ``step`` differentiates, from what it was given (checked)."""
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"step() needs a scalar loss, got {shape}; reduce it first (e.g. loss.mean()).")
        if loss.is_complex():
            raise ValueError(
                f"step() needs a real-valued loss, got a complex tensor ({loss.dtype}); minimize a real "
                f"quantity such as loss.abs() or loss.real."
            )
        return loss

    def _gradients(self, loss: Tensor, params: list[Tensor]) -> list[Tensor | None]:
        loss = self._objective(loss)
        targets = [i for i, p in enumerate(params) if p.requires_grad]
        grads: list[Tensor | None] = [None] * len(params)
        if not targets:
            return grads
        if not loss.requires_grad:
            raise ValueError(
                "the loss does not depend on any parameter that requires grad: compute it from "
                "the fmodel's output (or from the params passed to step())."
            )
        create_graph = self._track_higher_grads and not self._first_order
        if len(targets) == len(params):
            grads = list(_grad(loss, params, create_graph))
        else:
            computed = _grad(loss, [params[i] for i in targets], create_graph)
            for i, g in zip(targets, computed):
                grads[i] = g
        if all(grads[i] is None for i in self._updated_indices):
            raise ValueError(
                "the loss does not depend on any tensor this optimizer updates (every gradient is None), so "
                "the step would change nothing. Usual causes: the loss was computed with the original model, "
                "model(x), instead of the fmodel, fmodel(x); the module uses its parameters through a plain "
                "Python list or dict, which nn.Module does not register (use nn.ParameterList / "
                "nn.ParameterDict / nn.ModuleList), so the fmodel cannot substitute fast weights for them; or "
                "the params passed to step() are not the tensors the loss was computed from; or the loss was "
                "computed before the previous step() (each step makes new fast weights: compute the loss again "
                "from fmodel(x) after every step)."
            )
        return grads

    # ---------------------------------------------------------------- torch.optim.Optimizer's interface
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to clear: a differentiable optimizer never stores gradients in ``.grad``."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise NotImplementedError(
            "a differentiable optimizer's groups come from the torch optimizer it copies: add the group "
            "to that optimizer and build the differentiable one again."
        )

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError(
            "differentiable optimizer state holds graph-connected tensors; save the torch optimizer's "
            "state_dict instead (warm start copies it)."
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        raise NotImplementedError(
            "load the state into the torch optimizer, then build the differentiable optimizer from it."
        )

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            for key in sorted(k for k in group if k != "params"):
                lines.append(f"    {key}: {group[key]}")
        return "\n".join(lines) + "\n)"


# torch.autograd.grad's Python layer (normalizing its arguments, checking grad_outputs, making
# the ones tensor) costs about as much as a small model's whole forward pass, once per inner step.
# For a plain scalar loss tensor, _grad asks the autograd engine directly, exactly as
# torch.autograd.grad does after its checks (retain_graph=create_graph, allow_unused=True,
# nothing accumulated into .grad); anything else (tensor subclasses, torch function modes, a
# torch without this entry point) goes through torch.autograd.grad.
_ENGINE = getattr(torch.autograd.Variable, "_execution_engine", None)


def _grad(loss: Tensor, inputs: Sequence[Tensor], create_graph: bool) -> Sequence[Tensor | None]:
    """``torch.autograd.grad(loss, inputs, create_graph=create_graph, allow_unused=True)``."""
    if (
        _ENGINE is not None
        and type(loss) is Tensor
        and not torch.overrides.has_torch_function((loss,))
        and not torch.compiler.is_compiling()
    ):
        ones = torch.ones_like(loss, memory_format=torch.preserve_format)
        return _ENGINE.run_backward((loss,), (ones,), create_graph, create_graph, tuple(inputs), True, False)
    if _tracing.tracing():
        with _tracing.autograd_in_graph():
            return torch.autograd.grad(loss, inputs, create_graph=create_graph, allow_unused=True)
    return torch.autograd.grad(loss, inputs, create_graph=create_graph, allow_unused=True)


# ------------------------------------------------------------------------------- the classes
# Each class is its rule plus the shared front end; see higher.rules for the math.


class DifferentiableSGD(DifferentiableOptimizer):
    """Differentiable ``torch.optim.SGD``: same math and options (see ``higher.rules``)."""

    rule = _rules.RULES["SGD"]


class DifferentiableAdam(DifferentiableOptimizer):
    """Differentiable ``torch.optim.Adam``: same math and options (see ``higher.rules``)."""

    rule = _rules.RULES["Adam"]


class DifferentiableAdamW(DifferentiableOptimizer):
    """Differentiable ``torch.optim.AdamW``: same math and options (see ``higher.rules``)."""

    rule = _rules.RULES["AdamW"]


class DifferentiableAdagrad(DifferentiableOptimizer):
    """Differentiable ``torch.optim.Adagrad``: same math and options (see ``higher.rules``)."""

    rule = _rules.RULES["Adagrad"]


class DifferentiableAdadelta(DifferentiableOptimizer):
    """Differentiable ``torch.optim.Adadelta``: same math and options (see ``higher.rules``)."""

    rule = _rules.RULES["Adadelta"]


class DifferentiableAdamax(DifferentiableOptimizer):
    """Differentiable ``torch.optim.Adamax``: same math and options (see ``higher.rules``)."""

    rule = _rules.RULES["Adamax"]


class DifferentiableASGD(DifferentiableOptimizer):
    """Differentiable ``torch.optim.ASGD``: same math and options (see ``higher.rules``)."""

    rule = _rules.RULES["ASGD"]


class DifferentiableRMSprop(DifferentiableOptimizer):
    """Differentiable ``torch.optim.RMSprop``: same math and options (see ``higher.rules``)."""

    rule = _rules.RULES["RMSprop"]


class DifferentiableRprop(DifferentiableOptimizer):
    """Differentiable ``torch.optim.Rprop``: same math and options (see ``higher.rules``)."""

    rule = _rules.RULES["Rprop"]


class DifferentiableNAdam(DifferentiableOptimizer):
    """Differentiable ``torch.optim.NAdam``: same math and options (see ``higher.rules``)."""

    rule = _rules.RULES["NAdam"]


class DifferentiableRAdam(DifferentiableOptimizer):
    """Differentiable ``torch.optim.RAdam``: same math and options (see ``higher.rules``)."""

    rule = _rules.RULES["RAdam"]


_opt_mapping: dict[type, type[DifferentiableOptimizer]] = {
    cls.rule.torch_optimizer: cls  # type: ignore[union-attr]
    for cls in (
        DifferentiableSGD,
        DifferentiableAdam,
        DifferentiableAdamW,
        DifferentiableAdagrad,
        DifferentiableAdadelta,
        DifferentiableAdamax,
        DifferentiableASGD,
        DifferentiableRMSprop,
        DifferentiableRprop,
        DifferentiableNAdam,
        DifferentiableRAdam,
    )
}


def register_optim(optim_type: type[torch.optim.Optimizer], diff_optim_type: type[DifferentiableOptimizer]) -> None:
    """Make :func:`get_diff_optim` (and ``innerloop_ctx``) use ``diff_optim_type`` for ``optim_type``."""
    if not (isinstance(diff_optim_type, type) and issubclass(diff_optim_type, DifferentiableOptimizer)):
        raise TypeError(f"register_optim needs a DifferentiableOptimizer subclass, got {diff_optim_type!r}")
    _opt_mapping[optim_type] = diff_optim_type
    for prepare in _ON_REGISTER:
        prepare(diff_optim_type)


#: Called with each newly registered class (higher.batched makes its task-batched class then, not
#: while torch.compile traces an inner loop, where making a class is not possible).
_ON_REGISTER: list[Callable[[type[DifferentiableOptimizer]], Any]] = []


def get_diff_optim(
    opt: torch.optim.Optimizer,
    reference_params: Iterable[Tensor],
    fmodel: FunctionalModule | None = None,
    device: torch.device | str | None = None,
    override: _OverrideType | None = None,
    track_higher_grads: bool = True,
    **kwargs: Any,
) -> DifferentiableOptimizer:
    """The differentiable optimizer for ``opt``, looked up by its exact type."""
    cls = _diff_optim_type(opt)
    return cls(
        opt,
        reference_params,
        fmodel=fmodel,
        device=device,
        override=override,
        track_higher_grads=track_higher_grads,
        **kwargs,
    )


def _diff_optim_type(opt: torch.optim.Optimizer) -> type[DifferentiableOptimizer]:
    """The registered differentiable class for ``opt``'s exact type, or a clear error."""
    cls = _opt_mapping.get(type(opt))
    if cls is None:
        kind = type(opt).__name__
        for torch_type, diff_type in _opt_mapping.items():
            if isinstance(opt, torch_type):
                raise ValueError(
                    f"{kind} is a subclass of {torch_type.__name__}, but subclasses may change the math, "
                    f"so higher does not assume it. If it updates like {torch_type.__name__}, call "
                    f"higher.register_optim({kind}, higher.optim.{diff_type.__name__}); otherwise "
                    f"subclass higher.optim.DifferentiableOptimizer and register that."
                )
        supported = ", ".join(sorted(t.__name__ for t in _opt_mapping))
        raise ValueError(
            f"Optimizer type {kind} is not supported by higher (supported: {supported}). Write a "
            f"DifferentiableOptimizer subclass and call higher.register_optim({kind}, YourClass)."
        )
    return cls


def create_diff_optim(
    opt_type: type[torch.optim.Optimizer],
    opt_kwargs: dict[str, Any] | None = None,
    params: Iterable[Any] | None = None,
    fmodel: FunctionalModule | None = None,
    device: torch.device | str | None = None,
    override: _OverrideType | None = None,
    track_higher_grads: bool = True,
    **kwargs: Any,
) -> DifferentiableOptimizer:
    """A differentiable optimizer of type ``opt_type`` without an existing torch optimizer.

    ``params`` (tensors, or parameter-group dicts) give the shapes and grouping; by default the
    fmodel's parameters. The tensors themselves are never modified: pass them (or any tensors of
    the same shapes, in the same order) to ``step(loss, params=...)``.
    """
    if params is not None:
        params = list(params)
    elif fmodel is not None:
        params = list(fmodel.parameters())
    else:
        raise ValueError("create_diff_optim needs params=... or fmodel=... to know what it optimizes.")
    reference: list[Tensor] = []

    def placeholders(tensors: Iterable[Tensor]) -> list[Tensor]:
        made = [torch.zeros_like(t, device=device).requires_grad_() for t in tensors]
        reference.extend(made)
        return made

    if params and isinstance(params[0], dict):
        groups: list[Any] = [{**g, "params": placeholders(_as_list(g["params"]))} for g in params]
    else:
        groups = placeholders(params)
    opt = opt_type(groups, **(opt_kwargs or {}))
    return get_diff_optim(
        opt, reference, fmodel=fmodel, device=device, override=override, track_higher_grads=track_higher_grads, **kwargs
    )


def _as_list(params: Any) -> list[Tensor]:
    return [params] if isinstance(params, Tensor) else list(params)


def get_trainable_opt_params(opt: torch.optim.Optimizer, device: torch.device | str | None = None) -> _OverrideType:
    """An ``override`` dict with a leaf tensor requiring grad for every numeric hyperparameter.

    One entry per group for each of the optimizer's options (the keys of ``opt.defaults``) whose
    values are numbers or one-element floating-point tensors (pairs such as ``betas`` become
    tuples of tensors). Boolean options are not hyperparameters and are left out (higher 0.2.1
    swept them in, since ``bool`` is an ``int``), and so are keys that others add to the groups,
    such as an LR scheduler's ``initial_lr``, which are not options of the optimizer.
    """
    override: _OverrideType = {}
    for group in opt.param_groups:
        for key, value in group.items():
            if key == "params" or key not in opt.defaults or not _is_numeric(value):
                continue
            override.setdefault(key, []).append(_to_leaf(value, device))
    return override


def _is_numeric(value: Any) -> bool:
    values = _flat(value)
    return bool(values) and all(_is_number(v) for v in values)


def _is_number(value: Any) -> bool:
    if isinstance(value, Tensor):
        return value.is_floating_point() and value.numel() == 1
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _to_leaf(value: Any, device: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return type(value)(_to_leaf(v, device) for v in value)
    if isinstance(value, Tensor):
        return value.detach().reshape(()).to(device=device, copy=True).requires_grad_()
    return torch.tensor(float(value), device=device, requires_grad=True)


def apply_trainable_opt_params(opt: torch.optim.Optimizer, override: _OverrideType) -> None:
    """Write learned hyperparameters (an ``override`` dict) back into a torch optimizer."""
    for name, value in override.items():
        values = _per_group(name, value, len(opt.param_groups))
        for group, learned in zip(opt.param_groups, values):
            group[name] = _assign_like(group.get(name), learned)


def _assign_like(target: Any, learned: Any) -> Any:
    """``learned`` in the form of ``target``: tensors updated in place, numbers as Python numbers.

    An ``int`` target (torch's defaults such as ``weight_decay=0`` are ints) stays an ``int`` only
    if the learned value is a whole number; otherwise it becomes a ``float`` instead of being
    truncated.
    """
    if isinstance(target, (list, tuple)):
        return type(target)(_assign_like(t, v) for t, v in zip(target, learned))
    if isinstance(target, Tensor):
        with torch.no_grad():
            target.copy_(learned if isinstance(learned, Tensor) else torch.as_tensor(learned))
        return target
    value = learned.item() if isinstance(learned, Tensor) else learned
    if isinstance(target, bool):
        return bool(value)
    if isinstance(target, numbers.Integral) and float(value).is_integer():
        return int(value)
    return float(value) if isinstance(target, numbers.Real) else value


# -------------------------------------------- helpers kept for optimizers written for 0.2.1
def _add(tensor: Tensor, a1: Any, a2: Any = None) -> Tensor:
    """``tensor + a1 * a2`` (or ``tensor + a1``), out of place, in 0.2.1's argument order."""
    value, other = (1, a1) if a2 is None else (a1, a2)
    return tensor + value * other


def _addcdiv(tensor: Tensor, a1: Any, a2: Tensor, a3: Tensor | None = None) -> Tensor:
    """``tensor + a1 * a2 / a3`` (or ``tensor + a1 / a2``), out of place."""
    value, num, den = (1, a1, a2) if a3 is None else (a1, a2, a3)
    return tensor + value * (num / den)


def _addcmul(tensor: Tensor, a1: Any, a2: Tensor, a3: Tensor | None = None) -> Tensor:
    """``tensor + a1 * a2 * a3`` (or ``tensor + a1 * a2``), out of place."""
    value, t1, t2 = (1, a1, a2) if a3 is None else (a1, a2, a3)
    return tensor + value * (t1 * t2)


def _get_mask_closure(mask: Tensor) -> Callable[[Tensor], Tensor]:
    """A gradient hook that zeroes gradient entries where ``mask`` is true, at every order."""

    def closure(grad: Tensor) -> Tensor:
        grad = torch.where(mask, torch.zeros_like(grad), grad)
        if grad.requires_grad:
            grad.register_hook(closure)
        return grad

    return closure


def _maybe_mask(tensor: Tensor, mask: Tensor) -> None:
    """Register :func:`_get_mask_closure` on ``tensor`` if it takes part in autograd."""
    if tensor.requires_grad:
        tensor.register_hook(_get_mask_closure(mask))


def _recursive_apply(replacement: Any, target: Any) -> Any:
    """Write the values of ``replacement`` into the structure ``target`` (0.2.1's helper).

    ``target`` is a hyperparameter as a torch optimizer holds it and ``replacement`` the learned
    value of the same structure (lists, tuples, sets and dicts, matched in order). A tensor in
    ``target`` takes the replacement's data in place (and is returned); a number in ``target``
    becomes the replacement's value, of the target's type (``float``, ``int``...).
    """
    if isinstance(target, Tensor):
        value = replacement if isinstance(replacement, Tensor) else torch.as_tensor(replacement)
        target.data = value.detach().to(target.device).data
        return target
    if _is_container(target):
        if type(replacement) is not type(target) and not (
            isinstance(target, (list, tuple)) and isinstance(replacement, (list, tuple))
        ):
            raise ValueError(
                f"cannot apply a replacement of type {type(replacement).__name__} to a target of type "
                f"{type(target).__name__}: give the same structure."
            )
        if isinstance(target, dict):
            return type(target)(
                {key: _recursive_apply(r, t) for r, (key, t) in zip(cast(Any, replacement).values(), target.items())}
            )
        return type(target)(_recursive_apply(r, t) for r, t in zip(replacement, target))
    if _is_container(replacement):
        raise ValueError(
            f"cannot apply a replacement of type {type(replacement).__name__} to a non-container target "
            f"{target!r}: give the same structure."
        )
    value = replacement.item() if isinstance(replacement, Tensor) else replacement
    return cast(Any, type(target))(value) if isinstance(target, numbers.Number) else value
