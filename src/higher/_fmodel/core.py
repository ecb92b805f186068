"""What all views of one fmodel share (:class:`_Core`): the replicas of the module tree, the
fast-weight history and the views.

A replica is a shallow copy of one of the user's modules, of its own class, with slots of its own
(see :mod:`higher.patch`); the core makes them (once per fmodel, copy-on-write per history entry),
keeps the history of fast weights (one list of tensors per update), and makes the views (the
fmodel and its submodules, of the class :func:`_view_class` names) when first asked for.
"""

from __future__ import annotations

import operator
import sys
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .tree import _ALL_HOOK_DICTS, _NO_HOOKS, _OWN_CONTAINERS, _TAG, _Slot, _substitute, _tree_of

# A fresh nn.Module's attributes, for a replica whose module's are left out.
_FRESH_MODULE = nn.Module().__dict__


def _leave_out(d: dict[str, Any], left_out: frozenset[str]) -> None:
    """Take the attributes named in ``left_out`` out of a replica's ``__dict__`` ``d`` (those of
    ``nn.Module``'s own become a fresh module's: no hooks, ``training=True``)."""
    for key in left_out:
        if key not in d or key == _TAG:
            continue
        fresh = _FRESH_MODULE.get(key, d)
        if fresh is d:
            del d[key]
        elif key in _ALL_HOOK_DICTS:
            d[key] = _NO_HOOKS
        else:
            d[key] = type(fresh)() if type(fresh) in _OWN_CONTAINERS else fresh


def _flatten_parameters() -> None:
    """``flatten_parameters`` of the fmodel's RNN replicas: nothing to do (see ``_Core._replicate``)."""


class _ReplicaTag(tuple):
    """Marks a replica module: which core made it, and the index of the module it replicates.

    Lets results of the user's code (a method returning ``self.layer``) be mapped back to views,
    and lets an fmodel made *inside* another fmodel's forward (nested meta-learning) find the
    user's parameters that the outer fast weights stand for. Copies and pickles of a replica
    carry a tag without its core.

    ``_ReplicaTag((weak reference to the core or None, index))``: a tuple, made without a Python
    ``__init__`` (every patch tags every replica).
    """

    __slots__ = ()

    @property
    def core(self) -> _Core | None:
        ref = self[0]
        return None if ref is None else ref()

    @property
    def index(self) -> int:
        return self[1]

    def __deepcopy__(self, memo: Any) -> _ReplicaTag:
        return _ReplicaTag((None, self[1]))

    def __reduce__(self) -> tuple[Any, ...]:
        return (_ReplicaTag, ((None, self[1]),))


def _tag_of(module: Any) -> _ReplicaTag | None:
    tag = getattr(module, "__dict__", {}).get(_TAG)
    return tag if isinstance(tag, _ReplicaTag) else None


def _new_like(module: nn.Module) -> nn.Module:
    """An object of ``module``'s class with a shallow copy of its ``__dict__`` (no ``__init__`` run)."""
    cls = type(module)
    copy = cls.__new__(cls)
    copy.__dict__.update(module.__dict__)
    return copy


class _Core:
    """What all views of one fmodel share: the module tree, its replicas, and the fast-weight history."""

    randomness: str  # a task-batched core's torch.func.vmap randomness (set by higher.batched)

    def __init__(self, module: nn.Module, view_base: type[nn.Module], left_out: frozenset[str]) -> None:
        """The core of a patch of ``module``, whose views are of (subclasses of) ``view_base`` and whose
        replicas leave out the attributes named in ``left_out`` (see ``higher.patch._internal_attrs``)."""
        self.module = module
        tree, self.modules = _tree_of(module)
        self.tree = tree
        # The tree's analysis (shared by every patch of the model: never modified).
        self.paths = tree.paths
        self.module_index = tree.module_index
        self.param_index, self.buffer_index = tree.param_index, tree.buffer_index
        self.param_names, self.buffer_names = tree.param_names, tree.buffer_names
        self.param_slots, self.buffer_slots = tree.param_slots, tree.buffer_slots
        self.own_params, self.own_buffers = tree.own_params, tree.own_buffers
        self.plan = tree.plan
        self.params = tree.params  # the tensors in the module's slots, as module.parameters() lists them
        self.param_shapes = tree.param_shapes
        # What each parameter stands for, for matching an optimizer's tensors: the tensor itself,
        # or, when ``module`` is a replica inside another fmodel's call, the user's parameter.
        self.origins = self._origins() if tree.tagged else tree.params
        self._buffers: list[Tensor] = list(tree.buffers)  # the module's own; monkeypatch copies them
        # One entry per update; ``None`` marks an entry that was not kept (higher.checkpointed_unroll
        # keeps the entries from before the unroll and the latest, not the steps in between).
        self.history: list[list[Tensor] | None] = []
        self.track_higher_grads = True
        # Whether lists of the history were handed out (``fmodel.fast_params``, ``_fast_params``)
        # or taken from the program (``fmodel._fast_params = ...``), as in higher 0.2.1: their
        # contents may change without the core knowing, so every call compares the latest entry
        # with the tensors the replicas hold (``filled``), and checks it before using it.
        self.watched = False
        self.filled: tuple[Tensor, ...] = ()
        # The module attributes left out of the replicas (names added to ``_internal_attrs``), and
        # the aliased attributes to redirect (see ``_Tree.aliases``), less those.
        self.left_out = left_out
        self.aliases = tree.aliases if not self.left_out else [a for a in tree.aliases if a[1] not in self.left_out]
        # The replicas: the base tree (made now) and the latest copies, one per module index.
        self.replicas = self._replicate()
        self.version = 0  # bumped whenever the buffers or the history entries change in place
        self.batched = False  # task-batched cores (higher.batched) make replicas per call instead
        self.tasks = 0  # and their number of tasks, the leading dimension of every fast weight and buffer
        self._realized: tuple[list[Tensor] | None, int] = (None, -1)
        self._references: list[int] = []
        # The views: made when first needed (the root at once), since most programs only ever
        # call the root. The core refers to them weakly (they refer to it): no reference cycle,
        # so an fmodel, its history and the graph it holds are freed as soon as it is dropped.
        # (A dict of weak references rather than a WeakValueDictionary, which costs more to make
        # and fill than the rest of the core: a dead entry is simply made again.)
        # (The views are higher.patch.FunctionalModule objects, typed as the nn.Module they are here.)
        self.views: dict[int, weakref.ref[nn.Module]] = {}
        self.root: Callable[[], nn.Module | None] = lambda: None
        self.view_base = view_base
        # Set once a hook is registered on a view: from then on calls lend the views' hooks to the replicas.
        self.view_hooks = False
        # Attributes assigned through the views ((module index, name) -> value), kept for copies.
        self.overrides: dict[tuple[int, str], Any] = {}

    # ------------------------------------------------------------------ replicas
    def _origins(self) -> list[Tensor]:
        origins = list(self.params)
        seen: set[int] = set()
        for _, (mi, key, j) in self.param_slots:
            if j in seen:
                continue
            seen.add(j)
            tag = _tag_of(self.modules[mi])
            outer = None if tag is None else tag.core
            if outer is not None:
                k = outer.own_params[tag.index].get(key)  # type: ignore[union-attr]
                if k is not None:
                    origins[j] = outer.origins[k]
        return origins

    def _replicate(self) -> list[nn.Module]:
        """The base replica of every module: its own slot dicts and copies of its plain containers."""
        replicas = []
        tree = self.tree
        me = weakref.ref(self)
        set_dict = object.__setattr__
        left_out = self.left_out
        for i, (m, containers, hook_dicts, hooks_of, no_hooks) in enumerate(
            zip(self.modules, tree.containers, tree.hook_dicts, tree.hooks_of, tree.no_hooks)
        ):
            cls = type(m)
            r = cls.__new__(cls)
            source = m.__dict__
            d = source.copy()  # one C-level copy (much cheaper than filling the replica's own dict)
            d.update(no_hooks)
            if hooks_of is not None and any(hooks_of(source)):  # hooks registered on the module: copy those
                for key in hook_dicts:
                    if source[key]:
                        d[key] = source[key].copy()
            for key in containers:
                d[key] = source[key].copy()
            if left_out:
                _leave_out(d, left_out)
            d[_TAG] = _ReplicaTag((me, i))
            set_dict(r, "__dict__", d)  # not nn.Module.__setattr__, which would treat it as an attribute
            replicas.append(r)
        for r, children in zip(replicas, tree.children):
            if children:
                slots = r.__dict__["_modules"]
                for key, c in children:
                    slots[key] = replicas[c]
        for i in tree.rnns:
            # As in higher 0.2.1, flatten_parameters() does nothing on the fmodel's RNNs (a forward
            # calling self.rnn.flatten_parameters() is common): on CUDA, torch's re-points the
            # storage of the weights in place, which the fast weights must not undergo.
            replicas[i].__dict__.setdefault("flatten_parameters", _flatten_parameters)
        return replicas

    def copy_replicas(self, params: Sequence[Tensor], buffers: Sequence[Tensor]) -> list[nn.Module]:
        """New copies of the latest replicas with ``params`` and ``buffers`` in their slots.

        Only the modules holding tensors and their ancestors are copied; the others are shared.
        """
        new = list(self.replicas)
        for i, own_params, own_buffers, children in self.plan:
            r = _new_like(new[i])
            d = r.__dict__
            if own_params:
                d["_parameters"] = dict(d["_parameters"])
            if own_buffers:
                d["_buffers"] = dict(d["_buffers"])
            if children:
                slots = d["_modules"] = dict(d["_modules"])
                for key, c in children:
                    slots[key] = new[c]
            new[i] = r
        self._fill(new, params, buffers)
        return new

    def realize(self) -> list[nn.Module]:
        """The replicas holding the latest fast weights and the buffers (copied once per entry)."""
        params = self.latest
        if params is None:
            raise ValueError(
                "params keyword must be provided: this functional module has no fast weights yet "
                "(made by make_functional); call fmodel(x, params=[...])."
            )
        realized, version = self._realized
        if realized is not params or version != self.version:
            if self.watched:  # (then ``realized`` is None: every call comes here)
                if (
                    version == self.version
                    and len(params) == len(self.filled)
                    and all(map(operator.is_, params, self.filled))
                ):
                    return self.replicas  # the replicas hold these tensors already
                _check_tensors(
                    "fmodel._fast_params[-1] (the fast weights this call uses)",
                    params,
                    self.param_shapes,
                    self.param_names,
                )
            if version < 0 or self._unreferenced():
                # Nothing outside the fmodel refers to the replicas holding tensors (the first
                # entry's have not even run yet): put the new tensors into their slots in place.
                self._fill(self.replicas, params, self._buffers)
            else:
                # Something kept a replica (torch.utils.checkpoint keeps the module it recomputes,
                # a generator its ``self``...): leave those as they are, with the weights they used.
                self.replicas = self.copy_replicas(params, self._buffers)
            if self.watched:
                self.filled = tuple(params)
                self._realized = (None, self.version)
            else:
                self._realized = (params, self.version)
            self._references = self._reference_counts()
        return self.replicas

    def watch(self) -> None:
        """From now on, check at every call whether the latest fast weights changed in place
        (a list of the history was handed out or taken in: see ``watched``)."""
        if not self.watched:
            self.watched = True
            self._realized = (None, self._realized[1])

    def _reference_counts(self) -> list[int]:
        replicas = self.replicas
        return [sys.getrefcount(replicas[step[0]]) for step in self.plan]

    def _unreferenced(self) -> bool:
        """Whether the replicas that hold tensors have no references beyond the fmodel's own
        (those counted when they were made): then no computation can run them again later."""
        return all(now <= then for now, then in zip(self._reference_counts(), self._references))

    def _fill(self, replicas: Sequence[nn.Module], params: Sequence[Tensor], buffers: Sequence[Tensor]) -> None:
        """Put ``params`` and ``buffers`` into the slots of ``replicas``, in place."""
        for i, own_params, own_buffers, _ in self.plan:
            d = replicas[i].__dict__
            if own_params:
                slots = d["_parameters"]
                for key, j in own_params:
                    slots[key] = params[j]
            if own_buffers:
                slots = d["_buffers"]
                for key, j in own_buffers:
                    slots[key] = buffers[j]
        if self.aliases:
            self._fill_aliases(replicas, params, buffers)

    def _fill_aliases(self, replicas: Sequence[nn.Module], params: Sequence[Tensor], buffers: Sequence[Tensor]) -> None:
        """Point the replicas' other references to the model's objects (see ``_Tree.aliases``)
        at ``replicas``, ``params`` and ``buffers``, made anew from the user's module's attributes."""
        tree = self.tree
        module_index, param_index, buffer_index = tree.module_index, tree.param_index, tree.buffer_index

        def lookup(obj: Any) -> Any:
            if isinstance(obj, nn.Module):
                i = module_index.get(id(obj))
                return None if i is None or self.modules[i] is not obj else replicas[i]
            if isinstance(obj, Tensor):
                j = param_index.get(id(obj))
                if j is not None and self.params[j] is obj:
                    return params[j]
                j = buffer_index.get(id(obj))
                if j is not None and self.tree.buffers[j] is obj:
                    return buffers[j]
            return None

        for i, key in self.aliases:
            if (i, key) in self.overrides:
                continue  # assigned through the fmodel: its own value
            source = self.modules[i].__dict__
            if key in source:
                replicas[i].__dict__[key] = _substitute(source[key], lookup)

    def read_back_buffers(self, replicas: Sequence[nn.Module], buffers: list[Tensor]) -> None:
        """Adopt the buffers a module replaced (``self.running_mean = ...``) instead of updating in place."""
        for _, (mi, key, i) in self.buffer_slots:
            tensor = replicas[mi].__dict__["_buffers"].get(key)
            if tensor is not buffers[i] and tensor is not None:
                buffers[i] = tensor

    def index_of(self, module: Any) -> int | None:
        """The module index of one of the model's modules or of one of this core's replicas."""
        tag = _tag_of(module)
        if tag is not None and tag.core is self:
            return tag.index
        return self.module_index.get(id(module))

    def replica_for(self, module: nn.Module, replicas: Sequence[nn.Module]) -> nn.Module:
        """The module to run for ``module``: its replica, or for a container made from the model's
        modules (a slice), a copy of the container holding the replicas."""
        index = self.index_of(module)
        if index is not None:
            return replicas[index]
        copy = _new_like(module)
        copy.__dict__["_modules"] = {
            key: None if child is None else self.replica_for(child, replicas)
            for key, child in module.__dict__["_modules"].items()
        }
        return copy

    # ------------------------------------------------------------------ state
    @property
    def buffers(self) -> list[Tensor]:
        """The fmodel's buffers (copies of the module's, unless shared), in ``named_buffers`` order."""
        return self._buffers

    @buffers.setter
    def buffers(self, value: list[Tensor]) -> None:
        self._buffers = value
        self.version += 1

    def set_buffer(self, i: int, value: Tensor) -> None:
        self._buffers[i] = value
        self.version += 1

    def view(self, module: nn.Module) -> nn.Module | None:
        """The view of ``module`` (made now if needed), or ``None`` if it is not in the patched model."""
        index = self.index_of(module)
        if index is None:
            return None
        view = self.live_view(index)
        if view is None:
            root = self.root()
            if self.paths[index] and root is not None:
                return root.get_submodule(self.paths[index])  # made by its parent, which keeps it
            view = self.make_view(index)
        return view

    def make_view(self, index: int) -> nn.Module:
        module, path = self.modules[index], self.paths[index]
        view = _view_class(type(module), not path, self.view_base)(self, module, path)
        ref = self.views[index] = weakref.ref(view)
        if not path:
            self.root = ref
        return view

    def live_view(self, index: int) -> nn.Module | None:
        """The view of the module at ``index``, if one was made and is still alive."""
        ref = self.views.get(index)
        return None if ref is None else ref()

    @property
    def latest(self) -> list[Tensor] | None:
        return self.history[-1] if self.history else None

    def push(self, params: list[Tensor]) -> None:
        """Record new fast weights: a new history entry when tracking, else the only entry."""
        if self.track_higher_grads:
            self.history.append(params)
        else:
            self.history = [params]


def _named_slots(core: _Core, module: nn.Module, kind: str) -> list[tuple[str, _Slot]]:
    """``(name, slot)`` for every parameter (``kind="_parameters"``) or buffer in ``module``'s
    subtree, where ``module`` is a container made from the model's modules (a slice).

    Shared tensors appear once per place they are held.
    """
    slots = []
    for path, sub in module.named_modules(remove_duplicate=False):
        index = core.index_of(sub)
        if index is None:
            continue
        own = core.own_params[index] if kind == "_parameters" else core.own_buffers[index]
        prefix = f"{path}." if path else ""
        slots.extend((prefix + key, (index, key, i)) for key, i in own.items())
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


def _well_formed(entry: Sequence[Any], shapes: Sequence[torch.Size]) -> bool:
    """Whether a history entry holds one tensor of the right shape per parameter."""
    return len(entry) == len(shapes) and all(isinstance(t, Tensor) and t.shape == s for t, s in zip(entry, shapes))


def _malformed(core: _Core, entry: Sequence[Any]) -> ValueError:
    """The error for a history entry (set by the program through ``fmodel._fast_params`` or
    ``fmodel.fast_params``) that does not hold one tensor per parameter."""
    return ValueError(
        f"a fast-weight history entry (fmodel._fast_params) has {len(entry)} tensors but the module has "
        f"{len(core.param_shapes)} parameters; give it one tensor per parameter, in fmodel.parameters() order "
        f"(e.g. fmodel(x, params=[...]) or fmodel.fast_params = [...])."
    )


_VIEW_CLASSES: dict[tuple[type, bool, type], type[nn.Module]] = {}


def _view_class(cls: type, root: bool, base: type[nn.Module]) -> type[nn.Module]:
    """``Functional<Cls>`` (root) or ``InnerFunctional<Cls>``: named subclasses of ``base``."""
    key = (cls, root, base)
    if key not in _VIEW_CLASSES:
        name = ("Functional" if root else "InnerFunctional") + cls.__name__
        _VIEW_CLASSES[key] = type(name, (base,), {"__module__": base.__module__, "__qualname__": name})
    return _VIEW_CLASSES[key]
