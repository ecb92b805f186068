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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .utils import _copy_tensor

__all__ = ["FunctionalModule", "TimeIndexError", "make_functional", "monkeypatch", "buffer_sync"]

# A slot is where a module keeps one tensor: (the submodule's _parameters or _buffers dict, key, index).
_Slot = tuple[dict, str, int]


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

    @property
    def latest(self) -> list[Tensor] | None:
        return self.history[-1] if self.history else None

    def push(self, params: list[Tensor]) -> None:
        """Record new fast weights: a new history entry when tracking, else the only entry."""
        if self.track_higher_grads:
            self.history.append(params)
        else:
            self.history = [params]


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
    def __init__(self, core: _Core, module: nn.Module, path: str) -> None:
        d = self.__dict__
        d["_hg_core"] = core
        index = d["_hg_index"] = core.module_index[id(module)]
        mode = core.modes[index]
        super().__init__()  # sets `training` (kept in the core) and `_modules`, see the properties below
        core.modes[index] = mode
        d["_hg_module"] = module
        d["_hg_path"] = path
        d["_hg_is_root"] = not path
        if not path:  # the root sees every slot: nothing to select (submodule views select on first use)
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
        core, path = d["_hg_core"], d["_hg_path"]
        prefix = f"{path}."
        in_subtree = [(name[len(prefix) :], slot) for name, slot in core.param_slots if name.startswith(prefix)]
        d["_hg_param_slots"] = [slot for _, slot in in_subtree]
        d["_hg_all_param_names"] = [(name, slot[2]) for name, slot in in_subtree]
        seen: dict[int, str] = {}
        for name, slot in in_subtree:
            seen.setdefault(slot[2], name)
        d["_hg_param_idx"] = list(seen)
        d["_hg_param_names"] = list(seen.values())
        buffers = [(name[len(prefix) :], slot) for name, slot in core.buffer_slots if name.startswith(prefix)]
        d["_hg_buffer_slots"] = [slot for _, slot in buffers]
        d["_hg_buffer_names"] = list({slot[2]: name for name, slot in reversed(buffers)}.items())[::-1]
        d["_hg_modes"] = [(m, core.module_index[id(m)]) for m in d["_hg_module"].modules()]
        self._hg_own_tensors()  # last: its key marks the selection as done

    @property  # type: ignore[override]
    def training(self) -> bool:  # type: ignore[override]
        """This view's training mode (``fmodel.train()``/``eval()`` change the fmodel's modes only)."""
        return self._hg_core.modes[self._hg_index]

    @training.setter
    def training(self, mode: bool) -> None:
        self._hg_core.modes[self._hg_index] = mode

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

        A buffer that the module replaced (instead of updating it in place) is written back
        into ``buffers``. The module's own tensors and training modes are restored afterwards.
        """
        param_slots, buffer_slots = self._hg_param_slots, self._hg_buffer_slots
        saved_params = [owner[key] for owner, key, _ in param_slots]
        saved_buffers = [owner[key] for owner, key, _ in buffer_slots]
        modes = self._hg_core.modes
        changed_modes = [(m, m.training) for m, i in self._hg_modes if m.training != modes[i]]
        for m, training in changed_modes:
            m.training = not training
        for owner, key, i in param_slots:
            owner[key] = params[i]
        for owner, key, i in buffer_slots:
            owner[key] = buffers[i]
        try:
            return fn(*args, **kwargs)
        finally:
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
        if len(indices) == len(core.param_shapes) and (not self._hg_path):
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
        module = d["_hg_module"]
        static = inspect.getattr_static(module, name, None)
        if inspect.isfunction(static):
            # A method of the user's class: run it with the fast weights in place.
            method = getattr(module, name)
            return functools.wraps(method)(lambda *args, **kwargs: self._hg_compute(method, args, kwargs))
        if isinstance(static, property):
            return self._hg_run(getattr, (module, name), {})
        return getattr(module, name)

    def __setattr__(self, name: str, value: Any) -> None:
        d = self.__dict__
        own_params = d.get("_hg_own_params")
        if own_params is None and "_hg_core" in d:
            self._hg_select()
            own_params = d["_hg_own_params"]
        if own_params is not None and isinstance(value, Tensor):
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
            if isinstance(inspect.getattr_static(d["_hg_module"], name, None), property):
                raise AttributeError(
                    f"'{name}' is computed (a property, e.g. a parametrization) and cannot be assigned on a "
                    f"functional module; assign the tensors it is computed from."
                )
        super().__setattr__(name, value)

    def __getitem__(self, index: Any) -> Any:
        item = self._hg_run(self._hg_module.__getitem__, (index,), {})
        return self._hg_view_of(item)

    def __len__(self) -> int:
        return len(self._hg_module)

    def __bool__(self) -> bool:
        return True

    def __iter__(self) -> Iterator[Any]:
        items = self._hg_run(lambda: list(iter(self._hg_module)), (), {})
        return iter([self._hg_view_of(item) for item in items])

    def __contains__(self, item: Any) -> bool:
        return item in self._hg_module

    def _hg_view_of(self, item: Any) -> Any:
        if isinstance(item, nn.Module) and not isinstance(item, FunctionalModule):
            view = self._hg_core.view(item)
            if view is None:
                raise NotImplementedError(
                    f"{type(item).__name__} is not a submodule of the patched model (slicing a "
                    f"container makes a new one); index single submodules instead."
                )
            return view
        return item

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
        """Adopt parameters (as new fast weights) and buffers from ``state_dict``."""
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
                entry[i] = state_dict[name]
        _check_tensors("state_dict", entry, core.param_shapes, core.param_names)
        core.push(entry)
        for name, i in named_buffers.items():
            if name in state_dict:
                core.buffers[i] = state_dict[name]
        return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> FunctionalModule:  # type: ignore[override]
        """``.to()``, ``.double()``, ``.cuda()``...: convert the latest fast weights (a new history entry) and the buffers."""
        core = self._hg_core
        if core.latest is not None:
            entry = list(core.latest)
            for i in self._hg_param_idx:
                entry[i] = fn(entry[i])
            core.push(entry)
        for _, i in self._hg_buffer_names:
            core.buffers[i] = fn(core.buffers[i])
        return self

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        """Pickling and ``copy.deepcopy``: the module, detached fast weights, buffers and modes."""
        core = self._hg_core
        detached: dict[int, Tensor] = {}

        def detach(t: Tensor) -> Tensor:
            if id(t) not in detached:
                detached[id(t)] = t.detach().clone().requires_grad_(t.requires_grad)
            return detached[id(t)]

        history = [[detach(t) for t in entry] for entry in core.history]
        buffers = [b.detach().clone() for b in core.buffers]
        modes = dict(zip(core.paths, core.modes))
        snapshot = {
            "module": core.module,
            "history": history,
            "buffers": buffers,
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
    for name, view in fmodel.named_modules():
        view.training = snapshot["modes"].get(name, view.training)
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


def monkeypatch(
    module: nn.Module,
    device: torch.device | str | None = None,
    copy_initial_weights: bool = True,
    track_higher_grads: bool = True,
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
    """

    def encapsulator(fmodule: FunctionalModule, original: nn.Module) -> None:
        core = fmodule._hg_core
        if copy_initial_weights:
            params = [_copy_tensor(p, True, device) for p in core.params]
        else:
            params = [p.clone() if device is None else p.clone().to(device) for p in core.params]
        core.push(params)  # copies of the module's own tensors: no need to check them
        core.buffers = [_copy_tensor(b, True, device) for b in core.buffers]  # buffer_sync, same module

    fmodule = make_functional(module, encapsulator=encapsulator)
    fmodule.track_higher_grads = track_higher_grads
    return fmodule
