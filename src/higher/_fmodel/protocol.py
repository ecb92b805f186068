"""The rest of ``nn.Module``'s behaviour for the views (:class:`_ModuleProtocol`).

Attribute reads and writes (the user's module's attributes, read from and written to the view's
replica, never to the user's module; fast weights; 0.2.1's attributes of :mod:`.compat`),
submodules and containers (``fmodel.layer``, ``fmodel[1:]``, iteration: views again), methods
and properties of the user's class (run with the fast weights), ``train``/``eval``, and the
``nn.Module`` methods an fmodel refuses (adding parameters, buffers or modules).
"""

from __future__ import annotations

import functools
import inspect
from collections import OrderedDict
from collections.abc import Callable, ItemsView, Iterator, Mapping, Sequence, ValuesView
from types import GeneratorType
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from .compat import _COMPAT_GETTERS, _COMPAT_SETTERS
from .core import _check_tensors, _malformed, _view_class
from .running import _Running

if TYPE_CHECKING:
    from typing_extensions import Self


class _ModuleProtocol(_Running):
    """The third layer of :class:`higher.patch.FunctionalModule`: what else an ``nn.Module`` does."""

    @property  # type: ignore[override]
    def _modules(self) -> dict[str, Any]:  # type: ignore[override]
        """The views of the module's children (as they were when the model was patched), made on first use."""
        d = self.__dict__
        children = d["_modules"]
        if not d.get("_hg_children_made"):
            d["_hg_children_made"] = True
            core, index = d["_hg_core"], d["_hg_index"]
            if index is None:  # a container made from the model's modules
                named = [(name, core.index_of(child)) for name, child in d["_hg_module"]._modules.items()]
            else:
                named = core.tree.children[index]
            for name, child_index in named:
                if child_index is not None and name not in children:
                    children[name] = core.live_view(child_index) or core.make_view(child_index)
        return children

    @_modules.setter
    def _modules(self, value: dict[str, Any]) -> None:
        self.__dict__["_modules"] = value  # nn.Module.__setattr__ reads it from __dict__

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        """The user's class, so that ``isinstance(fmodel, type(model))`` holds."""
        module = self.__dict__.get("_hg_module")
        return type(self) if module is None else type(module)

    def _get_name(self) -> str:
        return type(self).__name__

    def extra_repr(self) -> str:
        return self._hg_module.extra_repr()

    # ------------------------------------------------------------------ attributes

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
            if len(latest) != len(self._hg_core.param_shapes):
                raise _malformed(self._hg_core, latest)
            return latest[own_params[name]]
        if name in d["_hg_own_buffers"]:
            return self._hg_core.buffers[d["_hg_own_buffers"][name]]
        replica = self._hg_replica()
        static = inspect.getattr_static(replica, name, None)
        if inspect.isfunction(static):
            # A method of the user's class: run it on the replica with the fast weights.
            method = getattr(self._hg_module, name)
            return functools.wraps(method)(
                lambda *args, **kwargs: self._hg_call(lambda r: getattr(r, name), args, kwargs)
            )
        if isinstance(static, property):
            return self._hg_call(lambda r: functools.partial(getattr, r, name), (), {})
        try:
            value = getattr(replica, name)
        except AttributeError:
            compat = _COMPAT_GETTERS.get(name)  # higher 0.2.1's attributes of patched modules
            if compat is None:
                raise
            return compat(self)
        return self._hg_views_in(value)

    def _hg_call(
        self, target: Callable[[nn.Module], Callable[..., Any]], args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> Any:
        """Run a method of the user's module with the fast weights; its result in view terms."""
        result = self._hg_compute(target, args, kwargs)
        if isinstance(result, GeneratorType):
            return self._hg_lazy(result)
        return self._hg_views_in(result)

    def _hg_lazy(self, items: Iterator[Any]) -> Iterator[Any]:
        """Items of a generator or iterator, with the model's modules replaced by their views."""
        for item in items:
            yield self._hg_views_in(item)

    def __setattr__(self, name: str, value: Any) -> None:
        """Assignments change the fmodel, never the user's module.

        A tensor assigned to a parameter records a new fast weight (one history entry; inside
        ``higher.patch._modify_internally(view)``, as in higher 0.2.1, none: it replaces that
        fast weight in the latest entry); to a buffer, replaces the fmodel's buffer; any other
        attribute of the user's module (a tensor or not, e.g. ``fmodel.dropout.p = 0.0``) is set
        on the fmodel's replica of the module, which its forward reads. higher 0.2.1's attributes
        of patched modules (``_track_higher_grads``...) keep their meaning where the user's
        module has no attribute of that name.
        """
        d = self.__dict__
        if "_hg_core" not in d or name in d or isinstance(getattr(type(self), name, None), property):
            super().__setattr__(name, value)  # under construction, or the view's own (training, ...)
            return
        own_params = d.get("_hg_own_params")
        if own_params is None:
            self._hg_select()
            own_params = d["_hg_own_params"]
        core = self._hg_core
        if isinstance(value, Tensor):
            if name in own_params:
                if core.latest is None:
                    raise ValueError("this functional module has no fast weights yet; pass params=[...] first.")
                index = own_params[name]
                _check_tensors(f"fmodel.{name}", [value], [core.param_shapes[index]], [name])
                entry = list(core.latest)
                if len(entry) != len(core.param_shapes):
                    raise _malformed(core, entry)
                entry[index] = value
                if d.get("_being_modified_internally"):
                    core.history[-1] = entry  # 0.2.1's internal write: no new history entry
                else:
                    core.push(entry)
                return
            if name in d["_hg_own_buffers"]:
                core.set_buffer(d["_hg_own_buffers"][name], value)
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
        replica = self._hg_replica()
        if name in replica.__dict__ or (name in core.left_out and name in module.__dict__):
            replica.__dict__[name] = value
            if d["_hg_index"] is not None:
                core.overrides[(d["_hg_index"], name)] = value
            return
        compat = _COMPAT_SETTERS.get(name)
        if compat is not None:
            compat(self, value)
            return
        super().__setattr__(name, value)

    # ------------------------------------------------------------------ submodules and containers

    def __getitem__(self, index: Any) -> Any:
        replica: Any = self._hg_replica()
        return self._hg_views_in(replica[index])

    def __len__(self) -> int:
        replica: Any = self._hg_replica()
        return len(replica)

    def __bool__(self) -> bool:
        return True

    def __iter__(self) -> Iterator[Any]:
        replica: Any = self._hg_replica()
        return self._hg_lazy(iter(replica))

    def __contains__(self, item: Any) -> bool:
        core = self._hg_core
        if isinstance(item, _ModuleProtocol):
            item = item.__dict__["_hg_module"]
        index = core.index_of(item)
        replica: Any = self._hg_replica()
        if index is None:
            return item in replica
        return any(core.index_of(child) == index for child in replica)

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
        """The view of one of the model's modules (or replicas), or of a container made from them.

        A module that holds none of the model's modules (e.g. a new one) is returned as it is;
        one that mixes the model's modules and tensors of its own cannot be run with fast weights.
        """
        if isinstance(module, _ModuleProtocol):
            return module
        core = self._hg_core
        view = core.view(module)
        if view is not None:
            return view
        subtree = list(module.modules())
        made = [m for m in subtree if core.index_of(m) is None]
        if len(made) == len(subtree):
            return module
        tensors = [t for m in made for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]
        if tensors:
            raise NotImplementedError(
                f"{type(module).__name__} holds both modules of the patched model and tensors of its own, so "
                f"it cannot be run with the fast weights; call the patched model's own submodules instead."
            )
        views = {id(m): _view_class(type(m), False, core.view_base)(core, m, None) for m in made}
        for m in made:
            view = views[id(m)]
            view.training = self.training
            for child_name, child in m._modules.items():
                if child is not None:
                    view._modules[child_name] = views.get(id(child)) or core.view(child)
        return views[id(module)]

    # ------------------------------------------------------------------ nn.Module's methods

    def train(self, mode: bool = True) -> Self:
        """Set the fmodel's training mode (the user's module keeps its own), running the user's ``train``.

        A model may override ``train`` (e.g. to keep its BatchNorm layers in eval mode), so the
        module's own ``train(mode)`` runs, on the fmodel's replica, whose modes are the fmodel's.
        """
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        d = self.__dict__
        if "_hg_own_params" not in d:
            self._hg_select()
        if d["_hg_index"] is not None:
            self._hg_replica().train(mode)
        else:  # a container made by slicing: its own mode, and its children's
            d["_hg_module"].training = mode
            for child in self.children():
                child.train(mode)
        return self

    def get_parameter(self, target: str) -> Tensor:
        """The fast weight named ``target`` (e.g. ``"layer.weight"``), as ``named_parameters`` names it."""
        module_path, _, name = target.rpartition(".")
        view = cast(_ModuleProtocol, self.get_submodule(module_path))
        if name not in view._hg_own_params:
            raise AttributeError(f"{type(view).__name__} has no parameter '{name}'")
        return getattr(view, name)

    def get_buffer(self, target: str) -> Tensor:
        """The fmodel's buffer named ``target`` (e.g. ``"bn.running_mean"``)."""
        module_path, _, name = target.rpartition(".")
        view = cast(_ModuleProtocol, self.get_submodule(module_path))
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
