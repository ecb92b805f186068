"""higher 0.2.1's attributes of a patched module, which the views show where the user's module has
no attribute of that name (``fmodel.root``, ``fmodel._param_mapping``, ``fmodel._track_higher_grads``...).

0.2.1's patched modules had attributes of their own. :meth:`.protocol._ModuleProtocol.__getattr__`
and ``__setattr__`` fall back to :data:`_COMPAT_GETTERS` and :data:`_COMPAT_SETTERS` after the
user's module's own attributes (``self.root = ...`` in a tree model wins). 0.2.1's functions of
:mod:`higher.patch` (``_make_functional``, ``_update_patched_params``...) stay there.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

from torch import Tensor

from .weights import _FastWeights


def _slots_of(fmodule: _FastWeights) -> list[int]:
    """The index of the fast weight in every parameter slot of ``fmodule``'s subtree, in 0.2.1's
    order of a params box: depth first, a module's own parameters before its children's, a
    shared submodule's and a tied parameter's slots once per place they are held."""
    d = fmodule.__dict__
    if "_hg_own_params" not in d:
        fmodule._hg_select()
    return [i for _, i in d["_hg_all_param_names"]]


def _view_is_root(view: _FastWeights) -> bool:
    return bool(view.__dict__["_hg_is_root"])


def _view_root(view: _FastWeights) -> _FastWeights:
    core = view._hg_core
    root = core.view(core.module)
    assert root is not None
    return cast(_FastWeights, root)


def _view_root_ref(view: _FastWeights) -> weakref.ref[_FastWeights] | None:
    return None if _view_is_root(view) else weakref.ref(_view_root(view))


def _view_param_mapping(view: _FastWeights) -> list[int]:
    """0.2.1's ``_param_mapping``: for the root, the fast weight of every parameter slot (a tied
    parameter's index repeats); ``[]`` for a submodule, as in 0.2.1."""
    return _slots_of(view) if _view_is_root(view) else []


def _expand_params(self: _FastWeights, params: Sequence[Tensor]) -> list[Tensor]:
    """0.2.1's ``_expand_params``: one tensor per parameter slot (tied parameters repeated)."""
    return [params[i] for i in _view_param_mapping(self)]


def _refill_params_box(self: _FastWeights, params: Iterable[Tensor] | None = None) -> None:
    """0.2.1's ``_refill_params_box``: ``params``, if given, become the latest fast weights (a new
    history entry); without them, there must be fast weights. Ours has no params box to fill."""
    if params is not None:
        self.fast_params = params
    elif self._hg_core.latest is None:
        raise ValueError(
            "params keyword must be provided if patched module not tracking its own fast parameters "
            "(this functional module has no fast weights yet)."
        )


def _refuse_param_mapping(view: _FastWeights, value: Any) -> None:
    raise AttributeError(
        "_param_mapping cannot be assigned: the fmodel derives which fast weight each parameter slot "
        "holds from the model (one copy of a shared submodule, one fast weight per tied parameter). "
        "To tie or untie parameters, change the model and patch it again."
    )


def _set_track_higher_grads(view: _FastWeights, value: Any) -> None:
    view._hg_core.track_higher_grads = value  # 0.2.1's attribute behind the property: not checked


_COMPAT_GETTERS: dict[str, Callable[[_FastWeights], Any]] = {
    "is_root": _view_is_root,
    "root": _view_root,
    "_root_ref": _view_root_ref,
    # True when the module is called by itself rather than from its root's forward: whatever a
    # program holds is a view, which runs by itself (the forward runs replicas, not views).
    "direct_submodule_call": lambda view: True,
    "boxed_forward": lambda view: view.forward,
    "_refill_params_box": lambda view: types.MethodType(_refill_params_box, view),
    "_expand_params": lambda view: types.MethodType(_expand_params, view),
    "_param_mapping": _view_param_mapping,
    "_being_modified_internally": lambda view: False,  # (set by _modify_internally)
    "_track_higher_grads": lambda view: view._hg_core.track_higher_grads,
    "_wrapped_name": lambda view: type(view.__dict__["_hg_module"]).__name__,
    "_param_names": lambda view: list(view.__dict__["_hg_own_params"]),
    "_original_params": lambda view: view.__dict__["_hg_module"].parameters(),
}
_COMPAT_SETTERS: dict[str, Callable[[_FastWeights, Any], None]] = {
    "_param_mapping": _refuse_param_mapping,
    "_track_higher_grads": _set_track_higher_grads,
}
