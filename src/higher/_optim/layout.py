"""Which reference parameter each of a torch optimizer's groups holds (:class:`_Layout`), cached
per torch optimizer: the part of building a differentiable optimizer that depends on the groups'
structure alone, not on their values.
"""

from __future__ import annotations

import operator
import weakref

import torch
from torch import Tensor

from .. import _tracing


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


def _describe(t: Tensor) -> str:
    return f"of shape {tuple(t.shape)} and dtype {t.dtype}"
