"""Differentiable optimizers: the ``torch.optim`` front end over the update rules.

A :class:`DifferentiableOptimizer` is built from an existing ``torch.optim`` optimizer. It copies
the optimizer's parameter groups (hyperparameters) and state, and then, at each
:meth:`~DifferentiableOptimizer.step`, takes the gradient of a loss with respect to the current
fast weights and returns *new* tensors computed out of place by the optimizer's update rule
(:mod:`higher.rules`), so that the whole unrolled optimization can be differentiated.

The interface (names, signatures, the ``state[group][index]`` layout, ``override`` and
``grad_callback``) is that of higher 0.2.1; the math is that of ``torch.optim`` in torch 2.13.
"""

from __future__ import annotations

import math
import numbers
import operator
import weakref
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Union, cast

import torch
import torch.optim.optimizer as _torch_optimizer
from torch import Tensor

from . import _tracing
from . import rules as _rules
from .rules import PAIR_HYPERPARAMETERS, UpdateRule
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

_GroupedGradsType = list[list[Union[Tensor, None]]]
_StateType = list[defaultdict]
_GradCallbackType = Callable[[Sequence[Union[Tensor, None]]], Sequence[Union[Tensor, None]]]
_OverrideType = dict[str, Any]


class PerParameter(list):
    """A hyperparameter value for each parameter of a group (e.g. Meta-SGD's learned rates).

    ``override={'lr': PerParameter([lr_w, lr_b])}`` gives every parameter of the group its own
    value: a number or a tensor shaped like the parameter (or broadcastable to its shape), one per
    parameter, in the group's order. Tensors that require grad receive exact hypergradients.
    With several groups, give one ``PerParameter`` per group: ``[PerParameter(...), PerParameter(...)]``.
    """


class PerStep:
    """A hyperparameter that changes with the step: ``values[t]`` or ``values(t)`` at step ``t``.

    ``t`` counts the differentiable optimizer's steps from 0. Values may be numbers, tensors
    (which receive hypergradients: a learned schedule) or :class:`PerParameter` lists.
    """

    def __init__(self, values: Sequence[Any] | Callable[[int], Any]) -> None:
        if not callable(values) and not isinstance(values, (list, tuple)):
            raise TypeError(
                f"PerStep needs a sequence of values or a callable of the step, got {type(values).__name__}"
            )
        self.values = values

    def at(self, step: int) -> Any:
        """The value at step ``step`` (0-based)."""
        if callable(self.values):
            return self.values(step)
        if step >= len(self.values):
            raise IndexError(
                f"PerStep holds {len(self.values)} values but step {step} was taken; give one value per "
                f"step (or a callable of the step)."
            )
        return self.values[step]

    def __repr__(self) -> str:
        return f"PerStep({self.values!r})"


class _Layout:
    """What building a differentiable optimizer derives from the torch optimizer's parameter
    groups alone (which reference parameter each group's tensors are, and that its option names
    are supported), kept per torch optimizer: MAML opens one inner loop per task with the same
    optimizer, and redoing this every time weighs on the one-step case.

    It is reused only while the torch optimizer's groups hold the very same tensors, with the
    same option names, as when it was made, and for the same reference parameters and class;
    anything else makes a new one. Hyperparameter values and state are never cached: they are
    read anew for every differentiable optimizer (schedulers change ``lr`` between tasks).
    """

    __slots__ = (
        "__weakref__",
        "cls",
        "reference",
        "group_params",
        "group_keys",
        "default_keys",
        "group_to_param_list",
        "updated_indices",
        "flags_added_later",
        "options_checked",
    )

    def __init__(self, cls: type, other: torch.optim.Optimizer, reference: list[Tensor]) -> None:
        position = {id(p): i for i, p in enumerate(reference)}
        self.group_to_param_list: list[list[int]] = []
        for group in other.param_groups:
            indices = []
            for p in group["params"]:
                if id(p) not in position:
                    raise ValueError(
                        f"Could not find parameter {_describe(p)} of the optimizer among the reference "
                        f"parameters: the optimizer tracks a tensor that is not in the model. Build "
                        f"the optimizer over the model's parameters (all or some of them)."
                    )
                indices.append(position[id(p)])
            self.group_to_param_list.append(indices)
        self.cls = cls
        # Held (not just their ids) so that an id cannot be reused by another tensor meanwhile.
        self.reference = tuple(reference)
        self.group_params = [tuple(group["params"]) for group in other.param_groups]
        self.group_keys = [list(group) for group in other.param_groups]
        self.default_keys = list(other.defaults)
        self.updated_indices = [i for indices in self.group_to_param_list for i in indices]
        rule = getattr(cls, "rule", None)
        self.flags_added_later = rule.flags_added_later if rule is not None else ()
        self.options_checked = False  # set once a differentiable optimizer passed _check_options with it

    def matches(self, cls: type, other: torch.optim.Optimizer, reference: list[Tensor]) -> bool:
        groups = other.param_groups
        if not (
            cls is self.cls
            and len(reference) == len(self.reference)
            and all(map(operator.is_, reference, self.reference))
            and len(groups) == len(self.group_params)
            and list(other.defaults) == self.default_keys
        ):
            return False
        for group, params, keys in zip(groups, self.group_params, self.group_keys):
            held = group["params"]
            if len(held) != len(params) or not all(map(operator.is_, held, params)) or list(group) != keys:
                return False
        return True

    @staticmethod
    def of(kind: type, other: torch.optim.Optimizer, reference: list[Tensor]) -> _Layout:
        """The layout of ``other``'s groups over ``reference`` for a differentiable optimizer of
        class ``kind`` (the cached one if still valid; nothing is cached while torch.compile
        traces: dynamo cannot follow the weak-keyed cache)."""
        if _tracing.tracing():
            return _Layout(kind, other, reference)
        try:
            layout = _LAYOUTS.get(other)
        except TypeError:  # an optimizer that cannot be weakly referenced or hashed: no cache
            return _Layout(kind, other, reference)
        if layout is None or not layout.matches(kind, other, reference):
            layout = _LAYOUTS[other] = _Layout(kind, other, reference)
        return layout


_LAYOUTS: weakref.WeakKeyDictionary[torch.optim.Optimizer, _Layout] = weakref.WeakKeyDictionary()


class DifferentiableOptimizer(torch.optim.Optimizer):
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
        self.defaults = dict(other.defaults)
        self.param_groups: list[dict[str, Any]] = []
        self.state: _StateType = []  # type: ignore[assignment]
        self._group_to_param_list: list[list[int]] = layout.group_to_param_list
        self._group_shapes: list[list[torch.Size]] = []
        for group, indices in zip(other.param_groups, layout.group_to_param_list):
            params = group["params"]
            self._group_shapes.append([p.shape for p in params])
            hyper = dict(group)  # the hyperparameters are read anew every time (schedulers change them)
            for key, value in hyper.items():
                if key != "params" and not isinstance(value, (float, int, bool, str, type(None))):
                    hyper[key] = _own_copy(value)
            hyper["params"] = [None] * len(indices)
            self.param_groups.append(hyper)
            state: defaultdict = defaultdict(dict)
            if other.state:  # a warm start (a fresh optimizer has no state to copy)
                for index, p in enumerate(params):
                    copied = self._copy_torch_state(other.state.get(p), device)
                    if copied:
                        state[index] = copied
            self.state.append(state)
        if layout.options_checked:  # the same option names as an optimizer already checked
            for group in self.param_groups:
                for key, value in layout.flags_added_later:
                    group.setdefault(key, value)
        else:
            self._check_options(other)
            layout.options_checked = True
        # torch.optim.Optimizer's step hooks (register_step_pre_hook / register_step_post_hook).
        self._optimizer_step_pre_hooks: dict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_step_post_hooks: dict[int, Callable[..., Any]] = OrderedDict()
        self._fmodel = fmodel
        self._track_higher_grads = track_higher_grads
        self._first_order = first_order
        self._grad_callback = grad_callback
        self._steps_taken = 0
        self._num_reference_params = len(reference_params)
        self._reference_shapes = [p.shape for p in reference_params]
        # The dtype and device of each parameter when the state was last made for it (see _follow_params).
        self._param_kinds = [(p.dtype, p.device) for p in reference_params]
        self._updated_indices = layout.updated_indices
        self._shaped_hyperparameters = False
        # Set by higher.forward_mode, whose updates run under no_grad on purpose (forward-mode
        # tangents need no reverse graph); a user's step under no_grad is refused.
        self._steps_without_graph = False
        self._learned_versions: list[tuple[int, str, Tensor, int]] = []
        if override is not None:
            self._apply_override(override)
        else:
            self._check_values(self.param_groups)
            self._record_learned_versions()

    # ---------------------------------------------------------------- construction helpers
    def _copy_torch_state(self, torch_state: dict | None, device: Any) -> dict:
        """A detached copy of one parameter's ``torch.optim`` state (warm start).

        Every entry is kept in torch's form (a tensor ``step`` stays a tensor), so that the
        state continues exactly where torch left it and can be handed back to a torch
        optimizer. State that torch creates before the first step (Adagrad's accumulator,
        filled from the group's ``initial_accumulator_value`` or by the user) is kept too.
        """
        if not torch_state:
            return {}
        copied: dict[str, Any] = {}
        for key, value in torch_state.items():
            if isinstance(value, Tensor):
                value = value.detach().clone()
                copied[key] = value if device is None else value.to(device)
            else:
                copied[key] = value
        return copied

    def _reset_unstepped_state(self, names: Iterable[str]) -> None:
        """Forget the state of parameters that never stepped if ``names`` shape that state.

        An ``override`` of a hyperparameter that the rule's initial state is made from (Adagrad's
        ``initial_accumulator_value``) replaces the initial state torch built from the old value,
        so that the override (and its hypergradient) takes effect.
        """
        rule = self.rule
        if rule is None or not set(names) & set(rule.init_hyperparameters):
            return
        for group_state in self.state:
            for index in [k for k, st in group_state.items() if _never_stepped(st)]:
                del group_state[index]

    def _check_options(self, other: torch.optim.Optimizer) -> None:
        """Refuse options of the torch optimizer that this rule cannot honour."""
        rule = self.rule
        if rule is None:
            return
        for group in self.param_groups:
            for key, value in group.items():
                if key == "params" or key in rule.options or key not in other.defaults:
                    continue
                raise ValueError(
                    f"{type(self).__name__} does not support the option {key}={value!r} of "
                    f"torch.optim.{rule.name}; remove it from the optimizer or use another optimizer."
                )
            for key, value in rule.flags_added_later:
                group.setdefault(key, value)
            for key in rule.options - set(group):
                if key in rule.hyperparameters or key in rule.flags:
                    raise ValueError(
                        f"parameter group of torch.optim.{rule.name} has no '{key}': build the "
                        f"optimizer with torch 2.x, which sets every option."
                    )

    def _check_values(self, groups: Iterable[dict[str, Any]]) -> None:
        names = self.rule.hyperparameters if self.rule is not None else ()
        for group, shapes in zip(groups, self._group_shapes):
            for name in names:
                value = group.get(name)
                kind = type(value)
                if name in PAIR_HYPERPARAMETERS:
                    pair = cast(tuple, value)
                    if kind is tuple and len(pair) == 2 and all(type(v) in (float, int) and v == v for v in pair):
                        continue  # the usual case, a plain pair (betas, etas, step_sizes)
                elif (kind is float or kind is int) and value == value:
                    continue  # the usual case, a plain number
                if isinstance(value, PerStep) and not callable(value.values):
                    candidates = list(value.values)
                elif isinstance(value, PerStep):
                    continue  # a callable's values are checked when it is called
                else:
                    candidates = [value]
                for candidate in candidates:
                    if isinstance(candidate, PerParameter):
                        _check_per_parameter(name, candidate, shapes)
                    else:
                        self._check_shape(name, candidate, shapes)
                    for single in candidate if isinstance(candidate, PerParameter) else [candidate]:
                        self._check_value(name, single)

    def _check_shape(self, name: str, value: Any, shapes: list[torch.Size]) -> None:
        """A tensor hyperparameter with dimensions must keep every parameter of its group's shape.

        A ``(3, 1)`` learning rate would otherwise silently turn a ``(3,)`` bias into ``(3, 3)``.
        """
        if name in PAIR_HYPERPARAMETERS:
            leaves = list(value) if isinstance(value, (tuple, list)) else []
        else:
            leaves = [value]
        for leaf in leaves:
            if not (isinstance(leaf, Tensor) and leaf.dim() > 0):
                continue
            for index, shape in enumerate(shapes):
                try:
                    broadcast = torch.broadcast_shapes(leaf.shape, shape)
                except RuntimeError:
                    broadcast = None
                if broadcast != shape:
                    raise ValueError(
                        f"hyperparameter '{name}' is a tensor of shape {tuple(leaf.shape)}, which does not "
                        f"broadcast to the shape {tuple(shape)} of parameter {index} of its group without "
                        f"changing it; give a number, a 0-dim tensor, a tensor that broadcasts to every "
                        f"parameter of the group, or one value per parameter with PerParameter."
                    )

    def _check_value(self, name: str, value: Any) -> None:
        if name in PAIR_HYPERPARAMETERS and not _is_pair(value):
            raise ValueError(
                f"hyperparameter '{name}' of {type(self).__name__} must be a pair such as "
                f"(0.9, 0.999), got {value!r}; in override, give one pair for all "
                f"groups or a list with one pair per group."
            )
        for leaf in _flat(value):
            if _is_nan(leaf):
                raise ValueError(f"hyperparameter '{name}' of {type(self).__name__} is NaN; give a finite value.")

    def _apply_override(self, override: _OverrideType) -> None:
        """Replace hyperparameters, persistently (later steps keep the new values).

        All values are checked before any is applied, so a refused override changes nothing.
        """
        if not isinstance(override, dict):
            raise TypeError(
                f"override must be a dict of hyperparameter name to value(s), got {type(override).__name__}"
            )
        rule = self.rule
        updated = [dict(group) for group in self.param_groups]
        for name, value in override.items():
            if rule is not None and name not in rule.hyperparameters and name not in rule.flags:
                raise ValueError(
                    f"unknown hyperparameter '{name}' in override for {type(self).__name__}; "
                    f"it has: {', '.join(rule.hyperparameters + rule.flags)}."
                )
            values = _per_group(name, value, len(self.param_groups))
            for group, group_value in zip(updated, values):
                pair = name in PAIR_HYPERPARAMETERS and _is_sequence(group_value)
                if pair and not isinstance(group_value, (tuple, PerParameter)):
                    group_value = tuple(group_value[i] for i in range(len(group_value)))  # e.g. a ParameterList
                group[name] = group_value
        self._check_values(updated)
        for group, new_values in zip(self.param_groups, updated):
            group.update(new_values)
        self._reset_unstepped_state(override)
        self._record_learned_versions()
        # A hyperparameter tensor with dimensions may broadcast a parameter to another shape.
        self._shaped_hyperparameters = any(
            isinstance(v, Tensor) and v.dim() > 0 for group in self.param_groups for v in _flat(list(group.values()))
        )

    def _record_learned_versions(self) -> None:
        """Remember the version counter of every hyperparameter tensor computed from others (``exp(log_lr)``).

        torch.optim.lr_scheduler writes a tensor ``lr`` in place (``fill_``: torch treats it as a
        container for a number). On a tensor computed from a leaf that requires grad, that silently
        cuts its hypergradient (an in-place write on a non-leaf tensor replaces its history), so
        :meth:`_check_learned_versions` refuses the step instead. Leaves are not recorded: torch
        itself refuses a scheduler's write into a leaf that requires grad, and an outer optimizer
        updating a learned leaf in place between truncated windows is ordinary use.
        """
        if _tracing.tracing():  # dynamo cannot read a version counter; a compiled step is not checked
            self._learned_versions = []
            return
        self._learned_versions = [
            (g, key, value, value._version)
            for g, group in enumerate(self.param_groups)
            for key, value in group.items()
            if key != "params" and isinstance(value, Tensor) and value.grad_fn is not None
        ]

    def _check_learned_versions(self) -> None:
        for g, key, tensor, version in self._learned_versions:
            if self.param_groups[g].get(key) is tensor and tensor._version != version:
                raise RuntimeError(
                    f"the hyperparameter tensor '{key}' of parameter group {g}, which receives hypergradients, was "
                    f"changed in place since it was given to the differentiable optimizer (a "
                    f"torch.optim.lr_scheduler attached to it does this: torch's schedulers overwrite a tensor "
                    f"'{key}' with fill_, which cuts the hypergradient through the schedule). For a schedule of a "
                    f"learned hyperparameter use higher.PerStep (e.g. override={{'{key}': higher.PerStep(lambda t: "
                    f"{key} * 0.5 ** t)}}); a scheduler works on a number or on a tensor that does not require grad."
                )

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

    def _detach_state(self) -> None:
        """Cut the optimizer state's graph too when not tracking higher-order gradients.

        A hyperparameter given as a tensor that requires grad (``override``) puts a graph into
        the state (e.g. Adam's moments through ``betas``) that would chain every step's graph to
        the previous one: memory growing with the number of steps, in the mode meant to be cheap.
        """
        for state in self.state:
            for param_state in state.values():
                for key, value in param_state.items():
                    if isinstance(value, Tensor) and value.requires_grad:
                        param_state[key] = value.detach()

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

    def _apply_update(self, params: list[Tensor], grads: list[Tensor | None], **kwargs: Any) -> list[Tensor]:
        """Run ``_update`` on the parameters grouped as the optimizer's groups; the new tensors."""
        grouped_grads = []
        for group, indices in zip(self.param_groups, self._group_to_param_list):
            group["params"] = [params[i] for i in indices]
            grouped_grads.append([grads[i] for i in indices])
            if self._shaped_hyperparameters:  # checked for every group before anything changes
                for name, value in group.items():
                    if name != "params":
                        _check_dtype(name, value, group["params"])
        self._follow_params(params)
        self._update(grouped_grads, **kwargs)
        new_params = list(params)
        for group, indices in zip(self.param_groups, self._group_to_param_list):
            for i, p in zip(indices, group["params"]):
                new_params[i] = p
        return new_params

    def _follow_params(self, params: list[Tensor]) -> None:
        """Convert the state of the parameters whose dtype or device changed since the last step.

        After ``fmodel.double()``, ``.float()`` or ``.to(device)`` (or new fast weights of another
        dtype), the state of each changed parameter follows it as ``torch.optim``'s
        ``load_state_dict`` makes a state follow its parameters: floating-point tensors are cast
        to the parameter's dtype (if it is a floating-point one) and moved to its device, the
        ``step`` count is left as it is, other tensors only move. ``Tensor.to`` is
        differentiable: meta-gradients still reach the state from before the change.
        """
        kinds = [(p.dtype, p.device) for p in params]
        previous = self._param_kinds
        if kinds == previous:  # the usual case: nothing changed
            return
        for group_state, indices in zip(self.state, self._group_to_param_list):
            for index, param_state in group_state.items():
                i = indices[index]
                if kinds[i] != previous[i]:
                    group_state[index] = {key: _follow(params[i], key, value) for key, value in param_state.items()}
        self._param_kinds = kinds

    def _update(self, grouped_grads: _GroupedGradsType, **kwargs: Any) -> None:
        """Apply the update rule to every parameter with a gradient, group by group.

        Subclasses written for higher 0.2.1 override this method: read ``self.param_groups``
        and ``self.state[group_index][param_index]``, and write the new tensors into
        ``group['params'][param_index]``.
        """
        rule = self.rule
        if rule is None:
            raise NotImplementedError(f"{type(self).__name__} must implement _update(grouped_grads, **kwargs)")
        for group, grads, state, shapes in zip(self.param_groups, grouped_grads, self.state, self._group_shapes):
            params = group["params"]
            live = [k for k, g in enumerate(grads) if g is not None]
            if not live:
                continue  # as torch.optim: a group without gradients (frozen, unused) is skipped
            live_params = params if len(live) == len(params) else [params[k] for k in live]
            live_grads = cast(list[Tensor], grads if len(live) == len(grads) else [grads[k] for k in live])
            if any(g.is_sparse for g in live_grads):
                raise NotImplementedError(
                    f"{type(self).__name__} got a sparse gradient; differentiable optimizers need "
                    f"dense gradients (e.g. nn.Embedding(sparse=False))."
                )
            hyper, per_parameter = self._resolve(group, shapes)
            hyper_of = self._hyperparameters_for(hyper)
            current: Mapping[int, dict[str, Any]] = state
            # As torch.optim: complex tensors are updated as (real, imag) pairs, except by SGD,
            # whose update is the same either way (torch runs it on the complex tensors).
            complex_params = rule.name != "SGD" and any(p.is_complex() for p in live_params)
            if complex_params:
                live_params = [_real_view(p) for p in live_params]
                live_grads = [_real_view(g) for g in live_grads]
                current = {k: {key: _real_view(v) for key, v in state[k].items()} for k in live}
                per_parameter = {
                    name: PerParameter(v.unsqueeze(-1) if isinstance(v, Tensor) and v.dim() else v for v in values)
                    for name, values in per_parameter.items()
                }
            if hyper_of is None and not per_parameter:
                states = [current[k] or rule.init(p, hyper) for k, p in zip(live, live_params)]
                result = None
                if rule.update_many is not None:  # one call for the group, where the rule has it
                    result = rule.update_many(live_params, live_grads, states, hyper)
                if result is None:
                    updated = [rule.update(p, g, st, hyper) for p, g, st in zip(live_params, live_grads, states)]
                    result = ([p for p, _ in updated], [st for _, st in updated])
            else:
                new_params, new_states = [], []
                for k, p, g in zip(live, live_params, live_grads):
                    seen = hyper if hyper_of is None else hyper_of(p)
                    if per_parameter:
                        seen = {**seen, **{name: values[k] for name, values in per_parameter.items()}}
                    new_param, new_state = rule.update(p, g, current[k] or rule.init(p, seen), seen)
                    new_params.append(new_param)
                    new_states.append(new_state)
                result = (new_params, new_states)
            if complex_params:
                result = _complex_again([params[k] for k in live], *result)
            for k, p, st in zip(live, *result):
                params[k] = p
                state[k] = st

    def _hyperparameters_for(self, group: dict[str, Any]) -> Callable[[Tensor], Mapping[str, Any]] | None:
        """How each parameter of ``group`` sees its hyperparameters; ``None``: the group itself.

        The task-batched mode (:mod:`higher.batched`) gives per-task hyperparameters (shape
        ``[tasks]``) the shape that broadcasts against each parameter.
        """
        return None

    def _resolve(
        self, group: dict[str, Any], shapes: list[torch.Size]
    ) -> tuple[dict[str, Any], dict[str, PerParameter]]:
        """The group's hyperparameters at this step, and, apart, those that differ per parameter."""
        dynamic = [name for name, value in group.items() if isinstance(value, (PerStep, PerParameter))]
        if not dynamic:
            return group, {}
        hyper = dict(group)
        per_parameter: dict[str, PerParameter] = {}
        for name in dynamic:
            value = group[name]
            if isinstance(value, PerStep):
                value = value.at(self._steps_taken)
                if isinstance(value, PerParameter):
                    _check_per_parameter(name, value, shapes)
                else:
                    self._check_shape(name, value, shapes)
                for single in value if isinstance(value, PerParameter) else [value]:
                    self._check_value(name, single)
                _check_dtype(name, value, group["params"])
                hyper[name] = value
            if isinstance(value, PerParameter):
                per_parameter[name] = value
                del hyper[name]
        return hyper, per_parameter

    # ---------------------------------------------------------------- truncation and torch.optim API
    def detach_(self) -> DifferentiableOptimizer:
        """Cut the graph through the optimizer state (momentum buffers, moment estimates...).

        Use it with ``fmodel.detach_()`` between windows of a truncated unroll: the next window
        starts from the same values with no graph to the earlier ones, so memory stays flat.
        Hyperparameter tensors given through ``override`` are left as they are (still learned).
        """
        for group_state in self.state:
            for param_state in group_state.values():
                for key, value in param_state.items():
                    if isinstance(value, Tensor):
                        param_state[key] = value.detach()
        return self

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


def _follow(param: Tensor, key: str, value: Any) -> Any:
    """One state entry of ``param`` converted for it as ``torch.optim``'s ``load_state_dict`` does."""
    if key == "step" or not isinstance(value, Tensor):
        return value
    if param.is_floating_point() and value.is_floating_point():
        return value.to(dtype=param.dtype, device=param.device)
    return value.to(device=param.device)


def _real_view(value: Any) -> Any:
    """A complex tensor as a real one with a trailing (real, imag) dimension; anything else as is."""
    return torch.view_as_real(value) if isinstance(value, Tensor) and value.is_complex() else value


def _complex_again(
    old_params: list[Tensor], new_params: list[Tensor], new_states: list[dict[str, Any]]
) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """The results of an update on real views back in the complex form of ``old_params``: the new
    parameters and their per-element state (torch.optim keeps a complex parameter's state complex)."""
    params, states = [], []
    for old, new, state in zip(old_params, new_params, new_states):
        if not old.is_complex():
            params.append(new)
            states.append(state)
            continue
        shape = torch.view_as_real(old).shape
        params.append(torch.view_as_complex(new.contiguous()))
        states.append(
            {
                key: torch.view_as_complex(v.contiguous())
                if isinstance(v, Tensor) and not v.is_complex() and v.shape == shape
                else v
                for key, v in state.items()
            }
        )
    return params, states


def _own_copy(value: Any) -> Any:
    """A hyperparameter value of the torch optimizer as the differentiable optimizer keeps it:
    tensors that do not require grad are copied (a scheduler attached to the differentiable
    optimizer updates a tensor ``lr`` in place, which must not reach the torch optimizer), also
    inside tuples and lists (``betas``); tensors that require grad are kept, so that their
    hypergradients reach them; anything else is kept as it is."""
    if isinstance(value, Tensor):
        return value if value.requires_grad else value.detach().clone()
    if type(value) in (tuple, list):
        return type(value)(_own_copy(v) for v in value)
    return value


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


def _describe(t: Tensor) -> str:
    return f"of shape {tuple(t.shape)} and dtype {t.dtype}"


def _flat(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flat(v)]
    return [value]


def _is_sequence(value: Any) -> bool:
    """Whether ``value`` is a sequence of values as 0.2.1 accepted them: anything with a length
    and indexing (list, tuple, ``nn.ParameterList``...), but not a tensor, string or mapping."""
    if isinstance(value, (str, bytes, Tensor, Mapping, PerStep)):
        return False
    return hasattr(value, "__len__") and hasattr(value, "__getitem__")


def _is_pair(value: Any) -> bool:
    sequence = _is_sequence(value) or (isinstance(value, Tensor) and value.dim() == 1)
    return sequence and len(value) == 2


def _is_nan(value: Any) -> bool:
    if isinstance(value, Tensor):
        if not value.is_floating_point() or _tracing.tracing():
            return False  # a tensor's values are not known while torch.compile traces
        return bool(torch.isnan(value.detach()).any())
    return isinstance(value, float) and math.isnan(value)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, numbers.Number) or (isinstance(value, Tensor) and value.dim() == 0)


def _never_stepped(state: Mapping[str, Any]) -> bool:
    step = state.get("step")
    return step is not None and not (isinstance(step, Tensor) and step.requires_grad) and float(step) == 0


def _per_group(name: str, value: Any, num_groups: int) -> list[Any]:
    """One override value per parameter group, following higher 0.2.1's conventions.

    A sequence (list, tuple, ``nn.ParameterList`` or other object with a length and indexing,
    or a tensor with at least one dimension) of length 1 applies to every group and one of
    length ``num_groups`` gives one value per group. A number or 0-dim tensor applies to every
    group, and so does a bare tuple pair for ``betas``/``etas``/``step_sizes``.
    """
    if _is_scalar(value) or isinstance(value, (PerParameter, PerStep)):
        return [value] * num_groups
    if name in PAIR_HYPERPARAMETERS and isinstance(value, tuple) and len(value) == 2 and all(map(_is_scalar, value)):
        return [value] * num_groups
    if isinstance(value, Tensor) or _is_sequence(value):
        if len(value) == 1:
            return [value[0]] * num_groups
        if len(value) == num_groups:
            return [value[i] for i in range(num_groups)]
        raise ValueError(
            f"override['{name}'] has {len(value)} values but the optimizer has {num_groups} parameter "
            f"group(s): give one value for all groups ([v]) or one per group."
        )
    raise TypeError(f"override['{name}'] must be a number, a tensor or a list of them, got {type(value).__name__}")


def _check_dtype(name: str, value: Any, params: Sequence[Tensor]) -> None:
    """Refuse a hyperparameter tensor with dimensions that would change the dtype of a fast weight.

    A number or a 0-dim tensor of any dtype leaves the fast weights' dtype as it is (type
    promotion); a tensor with dimensions of a wider dtype (float64 for float32 fast weights, e.g.
    after ``fmodel.float()``) would make the new fast weight float64, and the model's next forward
    fail on mixed dtypes.
    """
    per_parameter = isinstance(value, PerParameter)
    for k, p in enumerate(params):
        for leaf in _flat(value[k] if per_parameter else value):
            if not isinstance(leaf, Tensor) or leaf.dim() == 0:
                continue
            promoted = torch.promote_types(leaf.dtype, p.dtype)
            if promoted != p.dtype:
                raise ValueError(
                    f"hyperparameter '{name}' is a {leaf.dtype} tensor of shape {tuple(leaf.shape)}, but the fast "
                    f"weights it updates are {p.dtype}: the update would turn them into {promoted} (type "
                    f"promotion). Give it the fast weights' dtype (override={{'{name}': {name}.to({p.dtype})}}: "
                    f"the hypergradient still reaches {name}), or make it a 0-dim tensor."
                )


def _check_per_parameter(name: str, values: PerParameter, shapes: list[torch.Size]) -> None:
    if len(values) != len(shapes):
        raise ValueError(
            f"PerParameter for '{name}' has {len(values)} values but the parameter group has {len(shapes)} "
            f"parameters; give one value per parameter of the group, in order."
        )
    for i, (value, shape) in enumerate(zip(values, shapes)):
        if isinstance(value, Tensor):
            try:
                broadcast = torch.broadcast_shapes(value.shape, shape)
            except RuntimeError:
                broadcast = None
            if broadcast != shape:
                raise ValueError(
                    f"PerParameter value {i} for '{name}' has shape {tuple(value.shape)}, which does not "
                    f"broadcast to its parameter's shape {tuple(shape)}."
                )


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
