"""A differentiable optimizer's hyperparameters (:class:`_Hyperparameters`): its parameter groups'
values, copied from the torch optimizer, checked, replaced by ``override``, and resolved at each
step; and the two kinds of values beyond a number or a tensor, :class:`PerParameter` and
:class:`PerStep` (public as ``higher.PerParameter`` and ``higher.PerStep``).

The bottom layer of :class:`higher.optim.DifferentiableOptimizer`. A group holds its
hyperparameters under torch.optim's names, as ``torch.optim.lr_scheduler`` expects; ``params``
is filled with the fast weights at each step (:mod:`.updates`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from .. import _tracing
from ..rules import PAIR_HYPERPARAMETERS, UpdateRule

if TYPE_CHECKING:
    from collections import defaultdict

    from .layout import _Layout

#: higher 0.2.1's type of ``override``: hyperparameter name -> value(s) (one, or one per group).
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


PerParameter.__module__ = PerStep.__module__ = "higher.optim"  # their public home (and their name in pickles)


class _Hyperparameters(torch.optim.Optimizer):
    """The parameter groups and their hyperparameters (the bottom layer of ``DifferentiableOptimizer``).

    Owns ``param_groups`` (``defaults`` as torch's), the groups' parameter shapes, and what the
    checks of tensor hyperparameters need at each step. Reads the class's ``rule`` (its names and
    options; ``None`` for a 0.2.1-style subclass, whose hyperparameters are not checked) and the
    step count ``_steps_taken`` (for :class:`PerStep`). Touches ``state`` only to forget an
    initial state made from a hyperparameter that ``override`` replaces.
    """

    rule: UpdateRule | None
    state: list[defaultdict]  # type: ignore[assignment]  # one per group: param index -> state
    _steps_taken: int  # steps done (kept by the front end): a PerStep's index
    _group_shapes: list[list[torch.Size]]  # the shape of each parameter of each group
    _shaped_hyperparameters: bool  # whether a hyperparameter tensor has dimensions (may broadcast a parameter)
    _learned_versions: list[tuple[int, str, Tensor, int]]  # see _record_learned_versions

    def _copy_hyperparameters(self, other: torch.optim.Optimizer, layout: _Layout) -> None:
        """Take ``other``'s groups and hyperparameters, and refuse options the rule cannot honour
        (once per layout: the same option names were checked already).

        The values are read anew for every differentiable optimizer (a scheduler changes ``lr``
        between tasks); tensors that do not require grad are copied (see :func:`_own_copy`). A
        group's ``params`` is a placeholder until a step fills it with the fast weights.
        """
        self.defaults = dict(other.defaults)
        self.param_groups: list[dict[str, Any]] = []
        self._group_shapes = []
        for group, indices in zip(other.param_groups, layout.group_to_param_list):
            self._group_shapes.append([p.shape for p in group["params"]])
            hyper = dict(group)
            for key, value in hyper.items():
                if key != "params" and not isinstance(value, (float, int, bool, str, type(None))):
                    hyper[key] = _own_copy(value)
            hyper["params"] = [None] * len(indices)
            self.param_groups.append(hyper)
        if layout.options_checked:  # the same option names as an optimizer already checked
            for group in self.param_groups:
                for key, value in layout.flags_added_later:
                    group.setdefault(key, value)
        else:
            self._check_options(other)
            layout.options_checked = True
        self._shaped_hyperparameters = False
        self._learned_versions = []

    def _take_override(self, override: _OverrideType | None) -> None:
        """Apply the constructor's ``override``, or, without one, check the copied values."""
        if override is not None:
            self._apply_override(override)
        else:
            self._check_values(self.param_groups)
            self._record_learned_versions()

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

    def _hyperparameters_for(self, group: dict[str, Any]) -> Callable[[Tensor], Mapping[str, Any]] | None:
        """How each parameter of ``group`` sees its hyperparameters; ``None``: the group itself.

        The task-batched mode (:mod:`higher.batched`) gives per-task hyperparameters (shape
        ``[tasks]``) the shape that broadcasts against each parameter.
        """
        return None


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
