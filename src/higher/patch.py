"""Functional modules: a user's ``nn.Module`` run with fast weights, and the history of those weights.

``monkeypatch(model)`` returns an *fmodel*: a view of ``model`` that owns a list of fast weights
(one tensor per parameter of ``model``, in ``model.parameters()`` order) and a history of them,
one entry per update. Calling the fmodel runs ``model``'s own ``forward`` with the fast weights
(and the fmodel's copies of the buffers) swapped into the module's parameter slots for the
duration of the call, exactly as ``torch.func.functional_call`` does. The user's classes are
never copied or subclassed and the module's own tensors are restored after every call, so every
module that ``functional_call`` can run works: RNNs, parametrizations, hooks, shared weights,
third-party models.

The fmodel mirrors the module tree: ``fmodel.layer`` is the view of ``model.layer`` (callable on
its own, with the same fast weights), and ``isinstance(fmodel, type(model))`` holds.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections import OrderedDict
from collections.abc import Callable, ItemsView, Iterable, Iterator, Mapping, Sequence, ValuesView
from types import GeneratorType
from typing import Any

import torch
from torch import Tensor, nn

from .utils import _copy_tensor

__all__ = ["FunctionalModule", "TimeIndexError", "make_functional", "monkeypatch", "buffer_sync"]

# A slot is where a module keeps one tensor: (the submodule's _parameters or _buffers dict, key, index).
_Slot = tuple[dict, str, int]

# The hook dicts of nn.Module that Module.__call__ reads (torch 2.x).
_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
)


_MISSING = object()

# Types of module attributes that never hold tensors (checked first, cheaply, at patch time).
_PLAIN_TYPES = frozenset({dict, OrderedDict, set, str, bool, int, float, type(None)})


class TimeIndexError(IndexError, ValueError):
    """``parameters(time=T)`` asked for a step that the fast-weight history does not hold."""


class _Core:
    """What all views of one fmodel share: the module, where its tensors live, and the history."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        # One pass over the module tree (as named_parameters(remove_duplicate=False) walks it) finds
        # every slot; a tensor's index is its position in module.parameters() (first occurrence).
        params: list[Tensor] = []
        buffers: list[Tensor] = []
        self.param_index: dict[int, int] = {}
        self.buffer_index: dict[int, int] = {}
        self.param_names: list[str] = []
        self.buffer_names: list[str] = []
        self.param_slots: list[tuple[str, _Slot]] = []
        self.buffer_slots: list[tuple[str, _Slot]] = []
        kinds = (
            ("_parameters", params, self.param_index, self.param_names, self.param_slots),
            ("_buffers", buffers, self.buffer_index, self.buffer_names, self.buffer_slots),
        )
        for path, sub in module.named_modules(remove_duplicate=False):
            prefix = f"{path}." if path else ""
            for kind, tensors, index, names, slots in kinds:
                owner = getattr(sub, kind)
                for key, tensor in owner.items():
                    if tensor is None:
                        continue
                    i = index.get(id(tensor))
                    if i is None:
                        i = index[id(tensor)] = len(tensors)
                        tensors.append(tensor)
                        names.append(prefix + key)
                    slots.append((prefix + key, (owner, key, i)))
        self.params = params  # the module's own tensors, as module.parameters() lists them
        self.param_shapes = [p.shape for p in params]
        # The fmodel's buffers; make_functional starts with the module's own, monkeypatch copies them.
        self.buffers: list[Tensor] = buffers
        self.history: list[list[Tensor]] = []
        self.track_higher_grads = True
        # The module tree (each module once), and the views: made when first needed (the root at
        # once), since most programs only ever call the root. Each view's training mode is kept
        # here, so that a view made late still has the mode the model had when it was patched.
        named = list(module.named_modules())
        self.modules = [m for _, m in named]
        self.paths = [path for path, _ in named]
        self.module_index = {id(m): i for i, m in enumerate(self.modules)}
        self.modes = [m.training for m in self.modules]
        # The core refers to the views weakly (they refer to it): no reference cycle, so an
        # fmodel, its history and the graph it holds are freed as soon as the program drops it.
        # A parent view holds its children (in _modules), and the root is the user's.
        self.views: weakref.WeakValueDictionary[int, FunctionalModule] = weakref.WeakValueDictionary()
        self.root: Callable[[], FunctionalModule | None] = lambda: None
        self.view_base: type[FunctionalModule] = FunctionalModule
        # Set once a hook is registered on a view: from then on calls lend the views' hooks to the modules.
        self.view_hooks = False
        # The fmodel's values of tensor attributes that are neither parameters nor buffers, keyed by
        # (id(module), name), and where they live: see attribute_slots.
        self.attributes: dict[tuple[int, str], Any] = {}
        self._attribute_slots: dict[int, list[tuple[dict[str, Any], str, tuple[int, str]]]] = {}

    def view(self, module: nn.Module) -> FunctionalModule | None:
        """The view of ``module`` (made now if needed), or ``None`` if it is not in the patched model."""
        view = self.views.get(id(module))
        if view is None:
            index = self.module_index.get(id(module))
            if index is None:
                return None
            root = self.root()
            if self.paths[index] and root is not None:
                return root.get_submodule(self.paths[index])  # made by its parent, which keeps it
            view = self.make_view(module)
        return view

    def make_view(self, module: nn.Module) -> FunctionalModule:
        path = self.paths[self.module_index[id(module)]]
        view = _view_class(type(module), not path, self.view_base)(self, module, path)
        self.views[id(module)] = view
        if not path:
            self.root = weakref.ref(view)
        return view

    def attribute_slots(self, module: nn.Module) -> list[tuple[dict[str, Any], str, tuple[int, str]]]:
        """Plain attributes of ``module`` holding tensors (``module.__dict__[name]``), found once.

        A forward may store tensors computed from the weights in plain attributes: the legacy
        ``torch.nn.utils.weight_norm`` hook sets ``module.weight``, RNNs keep ``_flat_weights``. The
        fmodel keeps its own values of these (starting from the module's) and swaps them in for a
        call like the parameters, so the user's module never keeps tensors made from fast weights
        (which would also keep the unrolled graph alive after the fmodel is gone).
        """
        key = id(module)
        slots = self._attribute_slots.get(key)
        if slots is None:
            d = module.__dict__
            slots = [
                (d, name, (key, name))
                for name, value in d.items()
                if type(value) not in _PLAIN_TYPES and _holds_tensors(value)
            ]
            for _, name, slot_key in slots:
                self.attributes[slot_key] = d[name]
            self._attribute_slots[key] = slots
        return slots

    @property
    def latest(self) -> list[Tensor] | None:
        return self.history[-1] if self.history else None

    def push(self, params: list[Tensor]) -> None:
        """Record new fast weights: a new history entry when tracking, else the only entry."""
        if self.track_higher_grads:
            self.history.append(params)
        else:
            self.history = [params]


def _holds_tensors(value: Any) -> bool:
    """A tensor, or a non-empty list/tuple of tensors (``None`` allowed among them)."""
    if isinstance(value, Tensor):
        return True
    if type(value) in (list, tuple) and value:
        return all(v is None or isinstance(v, Tensor) for v in value) and any(isinstance(v, Tensor) for v in value)
    return False


def _named_slots(module: nn.Module, kind: str, index: dict[int, int]) -> list[tuple[str, _Slot]]:
    """``(name, slot)`` for every parameter (``kind="_parameters"``) or buffer of ``module``'s subtree.

    Shared tensors appear once per place they are held. ``index`` maps a tensor's id to its
    position in the fmodel's list; a tensor that is not the patched model's raises ``KeyError``.
    """
    named = module.named_parameters if kind == "_parameters" else module.named_buffers
    slots = []
    for name, tensor in named(remove_duplicate=False):
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        slots.append((name, (getattr(owner, kind), attr, index[id(tensor)])))
    return slots


def _check_tensors(what: str, given: Sequence[Any], shapes: Sequence[torch.Size], names: Sequence[str]) -> None:
    if len(given) != len(shapes):
        raise ValueError(
            f"{what} has {len(given)} tensors but the module has {len(shapes)} parameters; pass one "
            f"tensor per parameter, in fmodel.parameters() order ({', '.join(names)})."
        )
    for name, tensor, shape in zip(names, given, shapes):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{what}: the value for '{name}' is a {type(tensor).__name__}, not a tensor.")
        if tensor.shape != shape:
            raise ValueError(
                f"{what}: the tensor for '{name}' has shape {tuple(tensor.shape)}, the parameter has "
                f"shape {tuple(shape)}."
            )


class FunctionalModule(nn.Module):
    """A functional view of a user module (the *fmodel*), or of one of its submodules.

    Created by :func:`monkeypatch` or :func:`make_functional`; see the module docstring.
    """

    # ------------------------------------------------------------------ construction
    def __init__(self, core: _Core, module: nn.Module, path: str | None) -> None:
        """The view of ``module`` (at ``path`` in the patched model; ``None`` for a container made
        from the model's modules, such as a slice of a ``Sequential``, whose mode is its own)."""
        d = self.__dict__
        d["_hg_core"] = core
        index = d["_hg_index"] = core.module_index.get(id(module))
        mode = module.training if index is None else core.modes[index]
        d["_hg_module"] = module
        super().__init__()  # sets `training` (kept in the core) and `_modules`, see the properties below
        object.__setattr__(self, "training", mode)
        d["_hg_path"] = path
        d["_hg_is_root"] = path == ""
        if path == "":  # the root sees every slot: nothing to select (submodule views select on first use)
            d["_hg_param_slots"] = [slot for _, slot in core.param_slots]
            d["_hg_all_param_names"] = [(name, slot[2]) for name, slot in core.param_slots]
            d["_hg_param_idx"] = list(range(len(core.param_names)))
            d["_hg_param_names"] = core.param_names
            d["_hg_buffer_slots"] = [slot for _, slot in core.buffer_slots]
            d["_hg_buffer_names"] = [(name, i) for i, name in enumerate(core.buffer_names)]
            d["_hg_modes"] = list(zip(core.modules, range(len(core.modules))))
            self._hg_own_tensors()

    def _hg_select(self) -> None:
        """Find the slots, names and modes of a submodule view's subtree (once, on first use)."""
        d = self.__dict__
        core, path, module = d["_hg_core"], d["_hg_path"], d["_hg_module"]
        if path is None:  # a container made from the model's modules: walk it
            in_subtree = _named_slots(module, "_parameters", core.param_index)
            buffers = _named_slots(module, "_buffers", core.buffer_index)
        else:
            prefix = f"{path}."
            in_subtree = [(name[len(prefix) :], slot) for name, slot in core.param_slots if name.startswith(prefix)]
            buffers = [(name[len(prefix) :], slot) for name, slot in core.buffer_slots if name.startswith(prefix)]
        d["_hg_param_slots"] = [slot for _, slot in in_subtree]
        d["_hg_all_param_names"] = [(name, slot[2]) for name, slot in in_subtree]
        seen: dict[int, str] = {}
        for name, slot in in_subtree:
            seen.setdefault(slot[2], name)
        d["_hg_param_idx"] = list(seen)
        d["_hg_param_names"] = list(seen.values())
        d["_hg_buffer_slots"] = [slot for _, slot in buffers]
        first_buffer_names: dict[int, str] = {}
        for name, slot in buffers:
            first_buffer_names.setdefault(slot[2], name)
        d["_hg_buffer_names"] = [(name, i) for i, name in first_buffer_names.items()]
        d["_hg_modes"] = [(m, core.module_index[id(m)]) for m in module.modules() if id(m) in core.module_index]
        self._hg_own_tensors()  # last: its key marks the selection as done

    @property  # type: ignore[override]
    def training(self) -> bool:  # type: ignore[override]
        """This view's training mode (``fmodel.train()``/``eval()`` change the fmodel's modes only)."""
        d = self.__dict__
        index = d["_hg_index"]
        return d["_hg_module"].training if index is None else d["_hg_core"].modes[index]

    @training.setter
    def training(self, mode: bool) -> None:
        d = self.__dict__
        index = d["_hg_index"]
        if index is None:  # a container made by slicing: the fmodel's own object
            d["_hg_module"].training = mode
        else:
            d["_hg_core"].modes[index] = mode

    @property  # type: ignore[override]
    def _modules(self) -> dict[str, Any]:  # type: ignore[override]
        """The views of the module's children, made on first use."""
        d = self.__dict__
        children = d["_modules"]
        if not d.get("_hg_children_made"):
            d["_hg_children_made"] = True
            core = d["_hg_core"]
            for name, child in d["_hg_module"]._modules.items():
                if child is not None and name not in children:
                    children[name] = core.views.get(id(child)) or core.make_view(child)
        return children

    @_modules.setter
    def _modules(self, value: dict[str, Any]) -> None:
        self.__dict__["_modules"] = value  # nn.Module.__setattr__ reads it from __dict__

    def _hg_own_tensors(self) -> None:
        d = self.__dict__
        core, module = d["_hg_core"], d["_hg_module"]
        d["_hg_own_buffers"] = {attr: core.buffer_index[id(b)] for attr, b in module._buffers.items() if b is not None}
        d["_hg_own_params"] = {attr: core.param_index[id(p)] for attr, p in module._parameters.items() if p is not None}

    def _hg_attribute_slots_of(self) -> list[tuple[dict[str, Any], str, tuple[int, str]]]:
        """The tensor attributes of this view's subtree (see ``_Core.attribute_slots``), found on first use."""
        d = self.__dict__
        slots = d.get("_hg_attribute_slots")
        if slots is None:
            core = d["_hg_core"]
            slots = d["_hg_attribute_slots"] = [
                slot for m in d["_hg_module"].modules() for slot in core.attribute_slots(m)
            ]
        return slots

    @property
    def _hg_own_attributes(self) -> dict[str, tuple[int, str]]:
        core, module = self._hg_core, self._hg_module
        return {name: slot_key for _, name, slot_key in core.attribute_slots(module)}

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        """The user's class, so that ``isinstance(fmodel, type(model))`` holds."""
        module = self.__dict__.get("_hg_module")
        return type(self) if module is None else type(module)

    def _get_name(self) -> str:
        return type(self).__name__

    def extra_repr(self) -> str:
        return self._hg_module.extra_repr()

    # ------------------------------------------------------------------ running the module
    def _hg_run(self, fn: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        """Call ``fn`` with the latest fast weights and the buffers swapped into the module's slots."""
        core = self._hg_core
        params = core.latest
        if params is None:
            raise ValueError(
                "params keyword must be provided: this functional module has no fast weights yet "
                "(made by make_functional); call fmodel(x, params=[...])."
            )
        return self._hg_swapped(params, core.buffers, fn, args, kwargs)

    def _hg_swapped(
        self, params: Sequence[Tensor], buffers: list[Tensor], fn: Callable[..., Any], args: Sequence[Any], kwargs: Any
    ) -> Any:
        """Call ``fn`` with ``params`` and ``buffers`` (indexed as the core's) in the module's slots.

        Also swapped in: the fmodel's training modes, its values of the modules' tensor
        attributes, and the hooks registered on its views. A buffer that the module replaced
        (instead of updating it in place) is written back into ``buffers``, and so are the
        attributes. The module's own tensors, attributes, hooks and modes are restored afterwards.
        """
        d = self.__dict__
        if "_hg_own_params" not in d:
            self._hg_select()
        core = d["_hg_core"]
        param_slots, buffer_slots = d["_hg_param_slots"], d["_hg_buffer_slots"]
        saved_params = [owner[key] for owner, key, _ in param_slots]
        saved_buffers = [owner[key] for owner, key, _ in buffer_slots]
        modes = core.modes
        changed_modes = [(m, m.training) for m, i in d["_hg_modes"] if m.training != modes[i]]
        for m, training in changed_modes:
            m.training = not training
        for owner, key, i in param_slots:
            owner[key] = params[i]
        for owner, key, i in buffer_slots:
            owner[key] = buffers[i]
        lent_hooks = self._hg_lend_hooks() if core.view_hooks else ()
        attribute_slots = self._hg_attribute_slots_of()
        if attribute_slots:
            attributes = core.attributes
            saved_attributes = [owner.get(name, _MISSING) for owner, name, _ in attribute_slots]
            for owner, name, key in attribute_slots:
                value = attributes[key]
                if value is _MISSING:
                    owner.pop(name, None)
                else:
                    owner[name] = value
        try:
            return fn(*args, **kwargs)
        finally:
            for module_dict, saved in lent_hooks:
                module_dict.update(saved)
            if attribute_slots:
                for (owner, name, key), value in zip(attribute_slots, saved_attributes):
                    attributes[key] = owner.get(name, _MISSING)
                    if value is _MISSING:
                        owner.pop(name, None)
                    else:
                        owner[name] = value
            for owner, key, i in buffer_slots:
                buffers[i] = owner[key]  # a module may have replaced a buffer instead of updating it
            for (owner, key, _), tensor in zip(param_slots, saved_params):
                owner[key] = tensor
            for (owner, key, _), tensor in zip(buffer_slots, saved_buffers):
                owner[key] = tensor
            for m, training in changed_modes:
                m.training = training

    #: How ``forward`` and the user's own methods run the module; the task-batched views
    #: (:mod:`higher.batched`) run it vmapped over tasks instead.
    _hg_compute = _hg_run

    def _hg_lend_hooks(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """Add the hooks registered on the views below this one to their modules, for one call.

        ``fmodel.layer.register_forward_hook(hook)`` must fire when ``fmodel(x)`` runs the layer,
        but the call runs the user's modules, not the views. So the hooks of every view in the
        subtree (its own are run by its ``__call__``) are added after the module's own hooks for
        the duration of the call; the module's hook dicts are put back afterwards.
        Returns ``(module.__dict__, saved entries)`` pairs to restore.
        """
        lent = []
        views = self._hg_core.views
        for module, _ in self._hg_modes:
            view = views.get(id(module))
            if view is None or view is self:
                continue
            theirs = view.__dict__
            names = [name for name in _HOOK_DICTS if theirs.get(name)]
            if not names:
                continue
            ours = module.__dict__
            saved = {name: ours[name] for name in names}
            saved["_is_full_backward_hook"] = ours.get("_is_full_backward_hook")
            for name in names:
                ours[name] = OrderedDict([*ours[name].items(), *theirs[name].items()])
            if theirs.get("_backward_hooks"):
                ours["_is_full_backward_hook"] = theirs["_is_full_backward_hook"]
            lent.append((ours, saved))
        return lent

    def _hg_hooks_registered(self, handle: Any) -> Any:
        self._hg_core.view_hooks = True
        return handle

    def register_forward_pre_hook(self, *args: Any, **kwargs: Any) -> Any:
        return self._hg_hooks_registered(super().register_forward_pre_hook(*args, **kwargs))

    def register_forward_hook(self, *args: Any, **kwargs: Any) -> Any:
        return self._hg_hooks_registered(super().register_forward_hook(*args, **kwargs))

    def register_full_backward_pre_hook(self, *args: Any, **kwargs: Any) -> Any:
        return self._hg_hooks_registered(super().register_full_backward_pre_hook(*args, **kwargs))

    def register_full_backward_hook(self, *args: Any, **kwargs: Any) -> Any:
        return self._hg_hooks_registered(super().register_full_backward_hook(*args, **kwargs))

    def register_backward_hook(self, *args: Any, **kwargs: Any) -> Any:
        return self._hg_hooks_registered(super().register_backward_hook(*args, **kwargs))

    def forward(self, *args: Any, params: Sequence[Tensor] | None = None, **kwargs: Any) -> Any:
        """Run the module with the latest fast weights, or with ``params``, which become the latest."""
        if params is not None:
            self.update_params(params)
        return self._hg_compute(self._hg_module, args, kwargs)

    # ------------------------------------------------------------------ fast weights and history
    def _hg_slice(self, entry: list[Tensor]) -> list[Tensor]:
        return [entry[i] for i in self._hg_param_idx]

    def _hg_entry(self, time: int | None) -> list[Tensor]:
        core = self._hg_core
        history = core.history
        if not history:
            raise ValueError("this functional module has no fast weights yet; pass params=[...] to it first.")
        if time is None:
            return history[-1]
        if not core.track_higher_grads and time not in (0, -1):
            raise TimeIndexError(
                f"time={time} is not available: with track_higher_grads=False only the latest fast "
                f"weights are kept (time=0 or time=-1)."
            )
        if not -len(history) <= time < len(history):
            raise TimeIndexError(
                f"time={time} is out of range: the history holds fast weights for time=0..{len(history) - 1} "
                f"(one entry per update; negative indices count from the latest)."
            )
        return history[time]

    def parameters(self, recurse: bool = True, time: int | None = None) -> Iterator[Tensor]:  # type: ignore[override]
        """The fast weights at history index ``time`` (``None``: latest; ``0``: initial)."""
        entry = self._hg_entry(time)
        if recurse:
            return iter(self._hg_slice(entry))
        return iter([entry[i] for i in self._hg_own_params.values()])

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, Tensor]]:  # type: ignore[override]
        """Names and current fast weights, under the module's own parameter names."""
        entry = self._hg_entry(None)
        dot = f"{prefix}." if prefix else ""
        if not recurse:
            named = list(self._hg_own_params.items())
        elif remove_duplicate:
            named = list(zip(self._hg_param_names, self._hg_param_idx))
        else:
            named = self._hg_all_param_names
        return iter([(dot + name, entry[i]) for name, i in named])

    def buffers(self, recurse: bool = True) -> Iterator[Tensor]:  # type: ignore[override]
        return (b for _, b in self.named_buffers(recurse=recurse))

    def named_buffers(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, Tensor]]:  # type: ignore[override]
        """Names and the fmodel's buffers (copies of the module's, unless shared)."""
        buffers = self._hg_core.buffers
        dot = f"{prefix}." if prefix else ""
        named = self._hg_buffer_names if recurse else list(self._hg_own_buffers.items())
        return iter([(dot + name, buffers[i]) for name, i in named])

    @property
    def fast_params(self) -> list[Tensor] | None:
        """The latest fast weights (``None`` before any); setting records a new history entry."""
        latest = self._hg_core.latest
        return None if latest is None else self._hg_slice(latest)

    @fast_params.setter
    def fast_params(self, value: Iterable[Tensor]) -> None:
        self.update_params(value)

    def update_params(self, params: Iterable[Tensor]) -> None:
        """Adopt ``params`` (one tensor per parameter, in ``parameters()`` order) as the latest fast weights."""
        params = list(params)
        core = self._hg_core
        indices = self._hg_param_idx
        _check_tensors("params", params, [core.param_shapes[i] for i in indices], self._hg_param_names)
        if len(indices) == len(core.param_shapes) and self._hg_module is core.module:
            core.push(params)
            return
        entry = list(core.latest) if core.latest is not None else None
        if entry is None:
            raise ValueError("set the whole model's fast weights (on the root fmodel) before a submodule's.")
        for i, tensor in zip(indices, params):
            entry[i] = tensor
        core.push(entry)

    @property
    def init_fast_params(self) -> list[Tensor]:
        """The fast weights at time 0 (only kept when tracking higher-order gradients)."""
        if not self._hg_core.track_higher_grads:
            raise ValueError(
                "init_fast_params is not kept when track_higher_grads=False; use fast_params, or "
                "patch with track_higher_grads=True."
            )
        return self._hg_slice(self._hg_entry(0))

    @property
    def track_higher_grads(self) -> bool:
        """Whether updates keep the graph (and the whole history); settable at any time."""
        return self._hg_core.track_higher_grads

    @track_higher_grads.setter
    def track_higher_grads(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"track_higher_grads must be a bool, got {value!r}")
        self._hg_core.track_higher_grads = value

    @property
    def _fast_params(self) -> list[list[Tensor]]:
        """The whole history (one list of fast weights per update), as in higher 0.2.1."""
        return self._hg_core.history

    def detach_(self) -> FunctionalModule:
        """Cut the graph: keep only the latest fast weights, detached (same values, same ``requires_grad``).

        For truncated unrolls: after ``fmodel.detach_()`` and ``diffopt.detach_()`` the loop
        continues from the same point, but meta-gradients of later losses stop here and the
        memory held by earlier steps (fast weights, their graph, the activations it keeps) is
        freed, so memory stays flat however many windows run. ``time=0`` becomes this point.
        Acts on the whole model whichever view it is called on.
        """
        core = self._hg_core
        if core.latest is not None:
            core.history = [[p.detach().requires_grad_(p.requires_grad) for p in core.latest]]
        core.buffers = [b.detach() for b in core.buffers]
        return self

    def sync_buffers_to(self, module: nn.Module | None = None) -> None:
        """Copy the fmodel's buffers (BatchNorm running statistics...) into ``module``'s, in place.

        ``module`` defaults to the module this fmodel was made from (the part this view covers).
        The fmodel keeps its own copies: buffers updated in the inner loop (e.g. BatchNorm in
        train mode) reach the model only through this call, or with ``share_buffers=True``.
        """
        target = self._hg_module if module is None else module
        theirs = list(target.named_buffers())
        mine = [(name, self._hg_core.buffers[i]) for name, i in self._hg_buffer_names]
        if [name for name, _ in theirs] != [name for name, _ in mine]:
            raise KeyError(
                f"sync_buffers_to: the module's buffers {[n for n, _ in theirs]} do not match the "
                f"fmodel's {[n for n, _ in mine]}; give the module the fmodel was made from."
            )
        with torch.no_grad():
            for (_, destination), (_, source) in zip(theirs, mine):
                if destination is not source:
                    destination.copy_(source)

    # ------------------------------------------------------------------ nn.Module behaviour
    def __getattr__(self, name: str) -> Any:
        d = self.__dict__
        if "_modules" in d:
            modules = d["_modules"] if d.get("_hg_children_made") else self._modules
            if name in modules:
                return modules[name]
        own_params = d.get("_hg_own_params")
        if own_params is None:
            if "_hg_core" not in d:  # still in __init__
                raise AttributeError(name)
            self._hg_select()
            if name in d:
                return d[name]
            own_params = d["_hg_own_params"]
        if name in own_params:
            latest = self._hg_core.latest
            if latest is None:
                raise AttributeError(f"'{name}' has no fast weight yet; pass params=[...] to the fmodel first.")
            return latest[own_params[name]]
        if name in d["_hg_own_buffers"]:
            return self._hg_core.buffers[d["_hg_own_buffers"][name]]
        own_attributes = self._hg_own_attributes
        if name in own_attributes:
            value = self._hg_core.attributes[own_attributes[name]]
            if value is _MISSING:
                raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
            return value
        module = d["_hg_module"]
        static = inspect.getattr_static(module, name, None)
        if inspect.isfunction(static):
            # A method of the user's class: run it with the fast weights in place.
            method = getattr(module, name)
            return functools.wraps(method)(lambda *args, **kwargs: self._hg_call(method, args, kwargs))
        if isinstance(static, property):
            return self._hg_call(getattr, (module, name), {})
        return self._hg_views_in(getattr(module, name))

    def _hg_call(self, fn: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        """Run ``fn`` (a method of the user's module) with the fast weights; its result in view terms."""
        result = self._hg_compute(fn, args, kwargs)
        if isinstance(result, GeneratorType):
            return self._hg_lazy(result)
        return self._hg_views_in(result)

    def _hg_lazy(self, generator: Iterator[Any]) -> Iterator[Any]:
        """A generator from the user's code, resumed with the fast weights in place at every item."""
        while True:
            try:
                item = self._hg_run(next, (generator,), {})
            except StopIteration:
                return
            yield self._hg_views_in(item)

    def __setattr__(self, name: str, value: Any) -> None:
        """Assignments change the fmodel, never the user's module.

        A tensor assigned to a parameter records a new fast weight (one history entry); to a
        buffer, replaces the fmodel's buffer; any other attribute of the user's module (a tensor
        or not, e.g. ``fmodel.dropout.p = 0.0``) gets an fmodel-owned value that the module sees
        while the fmodel runs it.
        """
        d = self.__dict__
        if "_hg_core" not in d or name in d or isinstance(getattr(type(self), name, None), property):
            super().__setattr__(name, value)  # under construction, or the view's own (training, ...)
            return
        own_params = d.get("_hg_own_params")
        if own_params is None:
            self._hg_select()
            own_params = d["_hg_own_params"]
        if isinstance(value, Tensor):
            if name in own_params:
                core = self._hg_core
                if core.latest is None:
                    raise ValueError("this functional module has no fast weights yet; pass params=[...] first.")
                index = own_params[name]
                _check_tensors(f"fmodel.{name}", [value], [core.param_shapes[index]], [name])
                entry = list(core.latest)
                entry[index] = value
                core.push(entry)
                return
            if name in d["_hg_own_buffers"]:
                self._hg_core.buffers[d["_hg_own_buffers"][name]] = value
                return
        own_attributes = self._hg_own_attributes
        if name in own_attributes:
            self._hg_core.attributes[own_attributes[name]] = value
            return
        module = d["_hg_module"]
        if isinstance(value, nn.Module) or name in module._modules:
            raise AttributeError(
                f"cannot assign a module to '{name}' of a functional module: the fmodel runs the patched "
                f"model's own submodules. Change the model and patch it again."
            )
        if isinstance(inspect.getattr_static(module, name, None), property):
            raise AttributeError(
                f"'{name}' is computed (a property, e.g. a parametrization) and cannot be assigned on a "
                f"functional module; assign the tensors it is computed from."
            )
        if name in module.__dict__:
            self._hg_override_attribute(name, value)
            return
        super().__setattr__(name, value)

    def _hg_override_attribute(self, name: str, value: Any) -> None:
        """Give attribute ``name`` of the user's module an fmodel-owned value, swapped in for calls."""
        core, module = self._hg_core, self._hg_module
        key = (id(module), name)
        slot = (module.__dict__, name, key)
        core.attributes[key] = value
        core.attribute_slots(module).append(slot)
        for view in core.views.values():
            slots = view.__dict__.get("_hg_attribute_slots")
            if slots is not None and any(m is module for m in view.__dict__["_hg_module"].modules()):
                slots.append(slot)

    def __getitem__(self, index: Any) -> Any:
        return self._hg_call(self._hg_module.__getitem__, (index,), {})

    def __len__(self) -> int:
        return len(self._hg_module)

    def __bool__(self) -> bool:
        return True

    def __iter__(self) -> Iterator[Any]:
        return self._hg_lazy(iter(self._hg_module))

    def __contains__(self, item: Any) -> bool:
        if isinstance(item, FunctionalModule):
            item = item.__dict__["_hg_module"]
        return item in self._hg_module

    def _hg_views_in(self, value: Any) -> Any:
        """``value`` (a result of the user's code) with the model's modules replaced by their views.

        So that a submodule reached through a method, a property, indexing or iteration
        (``fmodel.blocks[1:]``, ``fmodel.values()``, ``fmodel.encoder_of(x)``) runs with the
        fast weights. Lists, tuples, dicts and dict views are looked into; a container without
        modules is returned as it is (the same object).
        """
        if isinstance(value, nn.Module):
            return self._hg_view_of(value)
        if type(value) in (list, tuple):
            items = [self._hg_views_in(v) for v in value]
            return value if all(a is b for a, b in zip(items, value)) else type(value)(items)
        if type(value) in (dict, OrderedDict):
            items = {k: self._hg_views_in(v) for k, v in value.items()}
            return value if all(items[k] is v for k, v in value.items()) else type(value)(items)
        if isinstance(value, (ValuesView, ItemsView)):
            items = [self._hg_views_in(v) for v in value]
            return value if all(a is b for a, b in zip(items, value)) else items
        return value

    def _hg_view_of(self, module: nn.Module) -> nn.Module:
        """The view of one of the model's modules, or of a container made from them (a slice).

        A module that holds none of the model's modules or tensors (e.g. a new one) is returned
        as it is; one that mixes the model's and other tensors cannot be run with fast weights.
        """
        if isinstance(module, FunctionalModule):
            return module
        core = self._hg_core
        view = core.view(module)
        if view is not None:
            return view
        subtree = list(module.modules())
        made = [m for m in subtree if id(m) not in core.module_index]
        tensors = [t for m in made for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]
        known = [id(t) in core.param_index or id(t) in core.buffer_index for t in tensors]
        if not any(known) and len(made) == len(subtree):
            return module
        if not all(known):
            raise NotImplementedError(
                f"{type(module).__name__} holds both tensors of the patched model and other tensors, so it "
                f"cannot be run with the fast weights; call the patched model's own submodules instead."
            )
        views = {id(m): _view_class(type(m), False, core.view_base)(core, m, None) for m in made}
        for m in made:
            view = views[id(m)]
            view.training = self.training
            for child_name, child in m._modules.items():
                if child is not None:
                    view._modules[child_name] = views.get(id(child)) or core.view(child)
        return views[id(module)]

    def train(self, mode: bool = True) -> FunctionalModule:
        """Set the fmodel's training mode (the user's module keeps its own), running the user's ``train``.

        A model may override ``train`` (e.g. to keep its BatchNorm layers in eval mode), so the
        module's own ``train(mode)`` runs, on the module with the fmodel's modes and fast weights
        swapped in, and the modes it leaves are the fmodel's; the module's are then put back.
        """
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        d = self.__dict__
        if "_hg_own_params" not in d:
            self._hg_select()
        modes = self._hg_core.modes
        pairs = d["_hg_modes"]
        saved = [m.training for m, _ in pairs]
        try:
            for m, i in pairs:
                m.training = modes[i]
            self._hg_run(self._hg_module.train, (mode,), {})
            for m, i in pairs:
                modes[i] = m.training
        finally:
            for (m, _), training in zip(pairs, saved):
                m.training = training
        return self

    def get_parameter(self, target: str) -> Tensor:
        """The fast weight named ``target`` (e.g. ``"layer.weight"``), as ``named_parameters`` names it."""
        module_path, _, name = target.rpartition(".")
        view = self.get_submodule(module_path)
        if name not in view._hg_own_params:
            raise AttributeError(f"{type(view).__name__} has no parameter '{name}'")
        return getattr(view, name)

    def get_buffer(self, target: str) -> Tensor:
        """The fmodel's buffer named ``target`` (e.g. ``"bn.running_mean"``)."""
        module_path, _, name = target.rpartition(".")
        view = self.get_submodule(module_path)
        if name not in view._hg_own_buffers:
            raise AttributeError(f"{type(view).__name__} has no buffer '{name}'")
        return getattr(view, name)

    def _hg_cannot_add(self, what: str, name: str) -> None:
        raise AttributeError(
            f"cannot add {what} '{name}' to a functional module: the fmodel runs the patched model's own "
            f"modules, which would never see it. Add it to the model and patch the model again."
        )

    def register_parameter(self, name: str, param: Any) -> None:
        self._hg_cannot_add("parameter", name)

    def register_buffer(self, name: str, tensor: Any, persistent: bool = True) -> None:
        self._hg_cannot_add("buffer", name)

    def add_module(self, name: str, module: Any) -> None:
        self._hg_cannot_add("module", name)

    def register_module(self, name: str, module: Any) -> None:
        self._hg_cannot_add("module", name)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``.grad`` of the fast weights that are leaves (the others never hold one)."""
        for p in self.parameters():
            if p.is_leaf:
                p.grad = None if set_to_none else (None if p.grad is None else torch.zeros_like(p.grad))

    def state_dict(
        self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False
    ) -> dict[str, Any]:  # type: ignore[override]
        """The module's state dict with the current fast weights and the fmodel's buffers."""
        if args:
            raise TypeError("pass state_dict options by keyword (destination=, prefix=, keep_vars=)")
        kwargs = {"destination": destination, "prefix": prefix, "keep_vars": keep_vars}
        return self._hg_run(self._hg_module.state_dict, (), kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        """Adopt parameters (as new fast weights, one history entry) and buffers from ``state_dict``.

        Tensors that require grad are adopted as they are (gradients flow to where they came
        from). Others, such as those of ``model.state_dict()``, which share storage with the
        model, are copied: parameters get the ``requires_grad`` of the fast weight they replace
        (so that the inner loop keeps updating them), buffers are copied so that the fmodel's
        BatchNorm updates never reach the model.
        """
        core = self._hg_core
        named_params = dict(self._hg_all_param_names)
        named_buffers = dict(self._hg_buffer_names)
        missing = [n for n in named_params if n not in state_dict] + [n for n in named_buffers if n not in state_dict]
        unexpected = [n for n in state_dict if n not in named_params and n not in named_buffers]
        if strict and (missing or unexpected):
            raise RuntimeError(f"Error(s) in loading state_dict: missing keys {missing}, unexpected keys {unexpected}")
        if core.latest is None:
            raise ValueError("this functional module has no fast weights yet; pass params=[...] first.")
        entry = list(core.latest)
        for name, i in named_params.items():
            if name in state_dict:
                value = state_dict[name]
                if isinstance(value, Tensor) and not value.requires_grad:
                    value = value.detach().clone().requires_grad_(entry[i].requires_grad)
                entry[i] = value
        _check_tensors("state_dict", entry, core.param_shapes, core.param_names)
        core.push(entry)
        for name, i in named_buffers.items():
            if name in state_dict:
                value = state_dict[name]
                core.buffers[i] = value.detach().clone() if isinstance(value, Tensor) else value
        return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> FunctionalModule:  # type: ignore[override]
        """``.to()``, ``.double()``, ``.cuda()``...: convert the fast weights and the buffers.

        Every history entry is converted in place (``time`` indices keep counting updates, and a
        conversion that changes nothing, such as ``.to(same device)``, changes nothing). As with
        ``nn.Module.to``, a leaf stays a leaf (same ``requires_grad``); a fast weight with a
        history is converted differentiably, so meta-gradients still reach where it came from.
        """
        core = self._hg_core
        converted: dict[int, Tensor] = {}

        def convert(t: Tensor) -> Tensor:
            if id(t) not in converted:
                new = fn(t)
                if t.is_leaf and new is not t:
                    new = new.detach().requires_grad_(t.requires_grad)
                converted[id(t)] = new
            return converted[id(t)]

        for entry in core.history:
            for i in self._hg_param_idx:
                entry[i] = convert(entry[i])
        for _, i in self._hg_buffer_names:
            core.buffers[i] = fn(core.buffers[i])
        return self

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        """Pickling and ``copy.deepcopy``: the module, detached fast weights, buffers, attributes, modes.

        The copy starts a graph of its own (its fast weights are leaves); hooks registered on
        the views are not copied.
        """
        core = self._hg_core
        detached: dict[int, Tensor] = {}

        def detach(t: Any) -> Any:
            if isinstance(t, (list, tuple)):
                return type(t)(detach(v) for v in t)
            if not isinstance(t, Tensor):
                return t
            if id(t) not in detached:
                detached[id(t)] = t.detach().clone().requires_grad_(t.requires_grad)
            return detached[id(t)]

        if self._hg_path is None:
            raise TypeError(
                "this view of a container made from the patched model's modules (e.g. a slice) cannot be "
                "pickled or copied; pickle the fmodel itself."
            )
        history = [[detach(t) for t in entry] for entry in core.history]
        buffers = [b.detach().clone() for b in core.buffers]
        modes = dict(zip(core.paths, core.modes))
        paths = {id(m): name for name, m in core.module.named_modules()}
        attributes = {
            (paths[module_id], name): detach(value)
            for (module_id, name), value in core.attributes.items()
            if module_id in paths and value is not _MISSING
        }
        snapshot = {
            "module": core.module,
            "history": history,
            "buffers": buffers,
            "attributes": attributes,
            "track_higher_grads": core.track_higher_grads,
            "modes": modes,
        }
        return (_restore, (snapshot, self._hg_path))


def _restore(
    snapshot: dict[str, Any], path: str, view_base: type[FunctionalModule] = FunctionalModule
) -> FunctionalModule:
    fmodel = make_functional(snapshot["module"], _view_base=view_base)
    core = fmodel._hg_core
    core.history = snapshot["history"]
    core.buffers = snapshot["buffers"]
    core.track_higher_grads = snapshot["track_higher_grads"]
    for name, mode in snapshot["modes"].items():
        if name in core.paths:
            core.modes[core.paths.index(name)] = mode
    for (module_path, name), value in snapshot.get("attributes", {}).items():
        setattr(fmodel.get_submodule(module_path), name, value)
    return fmodel.get_submodule(path) if path else fmodel


_VIEW_CLASSES: dict[tuple[type, bool, type], type[FunctionalModule]] = {}


def _view_class(cls: type, root: bool, base: type[FunctionalModule]) -> type[FunctionalModule]:
    """``Functional<Cls>`` (root) or ``InnerFunctional<Cls>``: named subclasses of ``base``."""
    key = (cls, root, base)
    if key not in _VIEW_CLASSES:
        name = ("Functional" if root else "InnerFunctional") + cls.__name__
        _VIEW_CLASSES[key] = type(name, (base,), {"__module__": base.__module__, "__qualname__": name})
    return _VIEW_CLASSES[key]


def make_functional(
    module: nn.Module,
    encapsulator: Callable[[FunctionalModule, nn.Module], None] | None = None,
    *,
    _view_base: type[FunctionalModule] = FunctionalModule,
) -> FunctionalModule:
    """A functional view of ``module`` without fast weights: every call must pass ``params=``.

    ``encapsulator(fmodule, module)``, if given, runs at the end (``monkeypatch`` uses this
    hook to set the initial fast weights and buffers).
    """
    if isinstance(module, FunctionalModule):
        raise ValueError("this module is already a functional (patched) module; patch the original nn.Module instead.")
    if not isinstance(module, nn.Module):
        raise TypeError(f"make_functional needs an nn.Module, got {type(module).__name__}")
    core = _Core(module)
    core.view_base = _view_base
    fmodule = core.view(module)
    assert fmodule is not None
    if encapsulator is not None:
        encapsulator(fmodule, module)
    return fmodule


def buffer_sync(module: nn.Module, fmodule: FunctionalModule, device: torch.device | str | None = None) -> None:
    """Copy (clone and detach, optionally to ``device``) every buffer of ``module`` into ``fmodule``."""
    core = fmodule._hg_core
    theirs = list(module.named_buffers())
    if [name for name, _ in theirs] != core.buffer_names:
        raise KeyError(
            f"buffer_sync: the module's buffers {[n for n, _ in theirs]} do not match the functional "
            f"module's {core.buffer_names}; both must come from the same architecture."
        )
    core.buffers = [_copy_tensor(b, True, device) for _, b in theirs]


def _given_initial_params(
    fmodule: FunctionalModule, defaults: list[Tensor], given: Sequence[Tensor] | Mapping[str, Tensor]
) -> list[Tensor]:
    names = fmodule._hg_core.param_names
    if isinstance(given, Mapping):
        unknown = [name for name in given if name not in names]
        if unknown:
            raise ValueError(
                f"initial_params names {unknown} are not parameters of the model; its parameters are: {', '.join(names)}."
            )
        return [given.get(name, default) for name, default in zip(names, defaults)]
    return list(given)


def monkeypatch(
    module: nn.Module,
    device: torch.device | str | None = None,
    copy_initial_weights: bool = True,
    track_higher_grads: bool = True,
    *,
    share_buffers: bool = False,
    initial_params: Sequence[Tensor] | Mapping[str, Tensor] | None = None,
) -> FunctionalModule:
    """The fmodel of ``module``: a functional view with initial fast weights and its own buffers.

    Args:
        module: the model to patch (left unchanged).
        device: where to put the initial fast weights and buffers (default: where they are).
        copy_initial_weights: if ``True``, the initial fast weights are detached copies of the
            parameters, so no gradient reaches ``module.parameters()`` (take gradients with
            respect to ``fmodel.parameters(time=0)``). If ``False``, they are ``clone()`` s that
            stay connected to the parameters, so ``meta_loss.backward()`` fills
            ``module.parameters()``'s ``.grad`` (MAML).
        track_higher_grads: if ``False``, no graph is kept through updates and only the latest
            fast weights are stored.
        share_buffers: if ``True``, the fmodel uses ``module``'s own buffers instead of copies,
            so BatchNorm running statistics updated in the inner loop are the model's.
        initial_params: initial fast weights given by the caller instead of copies of the
            parameters, e.g. the output of a hypernetwork: a list with one tensor per parameter
            (``module.parameters()`` order) or a dict from parameter names (as in
            ``module.named_parameters()``) to tensors for some of them. They are used as they
            are, so meta-gradients flow back into whatever produced them.
    """
    if share_buffers and device is not None:
        if any(b.device != torch.device(device) for b in module.buffers()):
            raise ValueError(
                "share_buffers=True cannot move the buffers to another device; omit device= or share_buffers."
            )

    def encapsulator(fmodule: FunctionalModule, original: nn.Module) -> None:
        core = fmodule._hg_core
        if copy_initial_weights:
            params = [_copy_tensor(p, True, device) for p in core.params]
        else:
            params = [p.clone() if device is None else p.clone().to(device) for p in core.params]
        if initial_params is None:
            core.push(params)  # copies of the module's own tensors: no need to check them
        else:
            fmodule.update_params(_given_initial_params(fmodule, params, initial_params))
        if not share_buffers:
            core.buffers = [_copy_tensor(b, True, device) for b in core.buffers]  # buffer_sync, same module

    fmodule = make_functional(module, encapsulator=encapsulator)
    fmodule.track_higher_grads = track_higher_grads
    return fmodule
