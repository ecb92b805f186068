"""Functional modules: a user's ``nn.Module`` run with fast weights, and the history of those weights.

``monkeypatch(model)`` returns an *fmodel*: a view of ``model`` that owns a list of fast weights
(one tensor per parameter of ``model``, in ``model.parameters()`` order) and a history of them,
one entry per update.

How a call runs. At patch time the fmodel makes a private, shallow *replica* of the module tree:
one new object of each module's own class, sharing the module's attributes (configuration,
submodule structure, hooks registered so far) but with parameter, buffer and submodule slots of
its own. The user's modules are only read, never written, not even for the duration of a call:
another thread using the model, an interrupt, or a later recomputation sees the model as it is.
Calling the fmodel runs the *user's own* ``forward`` (and hooks, methods, properties...) on the
replica, whose slots hold the fast weights and the fmodel's buffers. Every module that
``torch.func.functional_call`` can run works: RNNs, parametrizations, hooks, shared weights,
third-party models.

Replicas are copy-on-write per history entry: when the fast weights change, the modules that
hold parameters or buffers (and their ancestors) are copied again, with the new tensors in their
slots, while earlier copies are left as they were. A computation recorded with earlier weights
(``torch.utils.checkpoint`` recomputing a segment during the backward pass, a loss summed over
several steps) therefore recomputes with the weights it first used. Attributes a forward stores
on its modules (an RNN's ``_flat_weights``, a cached activation) stay with the fmodel's replica
and carry over from one entry to the next, as they would on a module.

The fmodel mirrors the module tree: ``fmodel.layer`` is the view of ``model.layer`` (callable on
its own, with the same fast weights), and ``isinstance(fmodel, type(model))`` holds.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import operator
import sys
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable, ItemsView, Iterable, Iterator, Mapping, Sequence, ValuesView
from types import GeneratorType
from typing import Any, Optional, cast

import torch
from torch import Tensor, nn

from .utils import _copy_tensor

__all__ = ["FunctionalModule", "TimeIndexError", "make_functional", "monkeypatch", "buffer_sync"]

# A slot is where a module keeps one tensor: (index of the module in the core, key, tensor index).
_Slot = tuple[int, str, int]

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

# Plain containers a module may hold as attributes: a replica gets its own (shallow) copies, so
# that a forward appending to a list or filling a dict never changes the user's module.
_OWN_CONTAINERS = (list, dict, set, OrderedDict)

# The hook dicts of nn.Module (torch 2.x), forward, backward and state-dict ones.
_ALL_HOOK_DICTS = frozenset(
    {
        *_HOOK_DICTS,
        "_state_dict_hooks",
        "_state_dict_pre_hooks",
        "_load_state_dict_pre_hooks",
        "_load_state_dict_post_hooks",
    }
)


# higher 0.2.1's ``_internal_attrs`` as it shipped: the attributes of a module that 0.2.1 did not
# copy onto its patched module.
_INTERNAL_ATTRS_0_2_1 = frozenset(
    {
        "_backend",
        "_parameters",
        "_buffers",
        "_backward_hooks",
        "_forward_hooks",
        "_forward_pre_hooks",
        "_state_dict_hooks",
        "_load_state_dict_pre_hooks",
        "_modules",
    }
)

#: higher 0.2.1's set of the module attributes its patched modules did not take from the module
#: (a mutable set, read at every patch, as in 0.2.1: programs edit it at import).
#:
#: A name *added* to it is left out of the fmodel's replicas of the modules patched afterwards,
#: as 0.2.1 left it out of its patched modules: a forward reading it finds the class attribute
#: (or nothing); an attribute of ``nn.Module``'s own (a hook dict, ``training``...) starts as a
#: fresh ``nn.Module``'s (no hooks of that kind run). The names 0.2.1 shipped in it are handled as
#: they always are here, in or out of the set: the fmodel always has parameter, buffer and
#: submodule slots of its own (removing ``_parameters``, ``_buffers`` or ``_modules`` made 0.2.1
#: share the model's and write fast weights into it; here the model is never written), and the
#: model's hooks always run (removing ``_forward_pre_hooks`` and the like made 0.2.1 run the
#: model's hooks of that kind, which is what happens anyway). ``_backend`` is no torch 2.x attribute.
_internal_attrs: set[str] = set(_INTERNAL_ATTRS_0_2_1)


def _left_out() -> frozenset[str]:
    """The attributes that the edits to ``_internal_attrs`` leave out of new replicas."""
    if _internal_attrs == _INTERNAL_ATTRS_0_2_1:  # the usual case: one comparison per patch
        return frozenset()
    return frozenset(_internal_attrs - _INTERNAL_ATTRS_0_2_1)


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


class _NoHooks(OrderedDict):
    """The empty hook dict of a replica whose module has no hooks of that kind (shared, unchangeable).

    Copying a dozen empty dicts per module would dominate the cost of opening an inner loop;
    sharing the module's own would let code that registers a hook on ``self`` during a call
    change the user's module. Registering on it raises instead.
    """

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            "cannot register a hook on a module while an fmodel runs it: the fmodel runs a private "
            "replica of the model. Register the hook on the model before patching it, or on the "
            "fmodel's submodule (fmodel.layer.register_forward_hook(...))."
        )

    __setitem__ = __delitem__ = update = setdefault = pop = popitem = clear = move_to_end = _refuse  # type: ignore[assignment]


_NO_HOOKS = _NoHooks()

# A fresh nn.Module's own state (what nn.Module.__init__ sets), less the training mode; and the
# keys of its containers (hook dicts, slot dicts...), of which every view needs its own.
_MODULE_STATE = {key: value for key, value in nn.Module().__dict__.items() if key != "training"}
_MODULE_CONTAINERS = [(key, type(value)) for key, value in _MODULE_STATE.items() if type(value) in _OWN_CONTAINERS]

# The key under which a replica records which fmodel core it belongs to (see _ReplicaTag).
_TAG = "_higher_replica"


class TimeIndexError(IndexError, ValueError):
    """``parameters(time=T)`` asked for a step that the fast-weight history does not hold."""


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


# The attributes every nn.Module has (nn.Module.__init__'s): a patch copies the containers among
# them by name, so only the types of the *other* attributes (the module's own) matter to it.
_STANDARD_ATTRIBUTES = frozenset(nn.Module().__dict__)


def _own_attributes(module: nn.Module) -> Callable[[dict[str, Any]], tuple[Any, ...]] | None:
    """A C-level getter of the module's own (non-standard) attributes from its ``__dict__``, as a
    tuple (the first key twice, so that a single key gives a tuple too); ``None`` if it has none."""
    keys = [key for key in module.__dict__ if key not in _STANDARD_ATTRIBUTES]
    return operator.itemgetter(*keys, *keys[:1]) if keys else None


def _fingerprint(module: nn.Module, own: Callable[[dict[str, Any]], tuple[Any, ...]] | None) -> list[Any] | None:
    """What a module's structure depends on: its attributes' names, the types of its own
    attributes (``own``, from :func:`_own_attributes`: which of them are containers), and the
    identity of its parameters, buffers and submodules. One C-level list, cheap to compare;
    ``None`` if an attribute ``own`` reads is gone."""
    d = module.__dict__
    p, b, c = d["_parameters"], d["_buffers"], d["_modules"]
    try:
        # One flat list; the lengths separate the parts (a type is never a name, so the attribute
        # names end where their types begin).
        return [
            *d,
            *(() if own is None else map(type, own(d))),
            len(p),
            *p,
            *map(id, p.values()),
            len(b),
            *b,
            *map(id, b.values()),
            len(c),
            *c,
            *map(id, c.values()),
        ]
    except KeyError:
        return None


# How deep _substitute looks into nested containers and closures for the model's objects.
_ALIAS_DEPTH = 6


def _substitute(value: Any, lookup: Callable[[Any], Any], depth: int = 0) -> Any:
    """``value`` with every object for which ``lookup`` returns something other than ``None``
    replaced by that, looking into plain lists, tuples (named ones too), sets and dicts, the
    ``self`` of bound methods, ``functools.partial`` objects and the closure cells of functions. Containers, methods and
    functions holding nothing to replace are returned as they are (the same object); the ones
    that do are new objects, so ``value`` itself is never modified.
    """
    found = lookup(value)
    if found is not None:
        return found
    if depth > _ALIAS_DEPTH or isinstance(value, (Tensor, nn.Module)):
        return value
    kind = type(value)
    if kind in (list, tuple, set, frozenset) or (issubclass(kind, tuple) and hasattr(value, "_fields")):
        items = [_substitute(v, lookup, depth + 1) for v in value]
        if all(a is b for a, b in zip(items, value)):
            return value
        return kind(*items) if kind not in (list, tuple, set, frozenset) else kind(items)
    if kind in (dict, OrderedDict):
        new = {k: _substitute(v, lookup, depth + 1) for k, v in value.items()}
        if all(new[k] is v for k, v in value.items()):
            return value
        return kind(new)
    if kind is functools.partial:
        func = _substitute(value.func, lookup, depth + 1)
        args = _substitute(value.args, lookup, depth + 1)
        keywords = _substitute(value.keywords, lookup, depth + 1)
        if func is value.func and args is value.args and keywords is value.keywords:
            return value
        return functools.partial(func, *args, **keywords)
    if kind is types.MethodType:
        owner = _substitute(value.__self__, lookup, depth + 1)
        return value if owner is value.__self__ else types.MethodType(value.__func__, owner)
    if kind is types.FunctionType and value.__closure__:
        cells = []
        for cell in value.__closure__:
            try:
                contents = cell.cell_contents
            except ValueError:  # an empty cell
                cells.append(cell)
                continue
            new = _substitute(contents, lookup, depth + 1)
            cells.append(cell if new is contents else types.CellType(new))
        if all(a is b for a, b in zip(cells, value.__closure__)):
            return value
        function = types.FunctionType(
            value.__code__, value.__globals__, value.__name__, value.__defaults__, tuple(cells)
        )
        function.__kwdefaults__ = value.__kwdefaults__
        function.__qualname__ = value.__qualname__
        function.__dict__.update(value.__dict__)
        return function
    return value


class _Tree:
    """The analysis of a module tree that every patch of it needs, made once per model.

    Patching the same model again (MAML opens one inner loop per task) reuses it as long as the
    tree has not changed: no module, parameter, buffer or attribute was added, removed or
    replaced since (checked by comparing fingerprints, a few microseconds).
    """

    def __init__(self, module: nn.Module) -> None:
        # The module tree (each module once, in named_modules() order) and where its tensors are.
        named = list(module.named_modules())
        scripted = [path or "the model itself" for path, m in named if isinstance(m, torch.jit.ScriptModule)]
        if scripted:
            raise TypeError(
                f"cannot patch TorchScript modules ({', '.join(scripted)}: made by torch.jit.script or "
                f"torch.jit.trace), whose parameters live in compiled code that fast weights cannot replace. "
                f"Patch the plain Python nn.Module instead (script or compile after meta-training if needed)."
            )
        modules = [m for _, m in named]
        self.module_refs = [weakref.ref(m) for m in modules]
        self.own_attributes = [_own_attributes(m) for m in modules]
        self.fingerprints = [_fingerprint(m, own) for m, own in zip(modules, self.own_attributes)]
        self.paths = [path for path, _ in named]
        self.module_index = {id(m): i for i, m in enumerate(modules)}
        # One pass over the tree as named_parameters(remove_duplicate=False) walks it finds every
        # slot; a tensor's index is its position in module.parameters() (first occurrence).
        params: list[Tensor] = []
        buffers: list[Tensor] = []
        self.param_index: dict[int, int] = {}
        self.buffer_index: dict[int, int] = {}
        self.param_names: list[str] = []
        self.buffer_names: list[str] = []
        self.param_slots: list[tuple[str, _Slot]] = []
        self.buffer_slots: list[tuple[str, _Slot]] = []
        # Per module: its own parameters and buffers, key -> tensor index.
        self.own_params: list[dict[str, int]] = [{} for _ in modules]
        self.own_buffers: list[dict[str, int]] = [{} for _ in modules]
        kinds = (
            ("_parameters", params, self.param_index, self.param_names, self.param_slots, self.own_params),
            ("_buffers", buffers, self.buffer_index, self.buffer_names, self.buffer_slots, self.own_buffers),
        )
        for path, sub in module.named_modules(remove_duplicate=False):
            prefix = f"{path}." if path else ""
            mi = self.module_index[id(sub)]
            for kind, tensors, index, names, slots, own in kinds:
                for key, tensor in sub.__dict__[kind].items():
                    if tensor is None:
                        continue
                    i = index.get(id(tensor))
                    if i is None:
                        i = index[id(tensor)] = len(tensors)
                        tensors.append(tensor)
                        names.append(prefix + key)
                    slots.append((prefix + key, (mi, key, i)))
                    own[mi][key] = i
        self.params = params
        self.param_shapes = [p.shape for p in params]
        self.buffers = buffers
        self.tagged = any(_TAG in m.__dict__ for m in modules)
        self.rnns = [i for i, m in enumerate(modules) if isinstance(m, nn.RNNBase)]
        # Per module: the attributes holding plain containers (a replica copies them), and the
        # children as (key, module index).
        self.containers = [
            [k for k, v in m.__dict__.items() if type(v) in _OWN_CONTAINERS and k not in _ALL_HOOK_DICTS]
            for m in modules
        ]
        self.hook_dicts = [[k for k in m.__dict__ if k in _ALL_HOOK_DICTS] for m in modules]
        # Per module: its hook dicts, fetched in one C call (a tuple, the first key twice so that
        # a single key gives a tuple too); every patch checks whether any is non-empty.
        self.hooks_of = [operator.itemgetter(*keys, *keys[:1]) if keys else None for keys in self.hook_dicts]
        # What a replica's hook dicts start as: all empty (shared), the module's non-empty ones copied.
        self.no_hooks = [dict.fromkeys(keys, _NO_HOOKS) for keys in self.hook_dicts]
        self.children = [
            [(key, self.module_index[id(c)]) for key, c in m.__dict__["_modules"].items() if c is not None]
            for m in modules
        ]
        # The module's own attributes that refer to the model's modules, parameters or buffers
        # other than through the module's slots: a plain list or dict of submodules, a bound
        # method stored in __init__ (``self.impl = self._forward_a``), a function closing over
        # ``self``, an RNN's ``_flat_weights``. A replica's copy of such an attribute refers to
        # the replicas and fast weights instead (see _Core._fill), so that the forward uses the
        # fast weights whichever way it reaches a module.
        known = {*self.module_index, *self.param_index, *self.buffer_index}
        marker = object()

        def mark(obj: Any) -> Any:
            return marker if id(obj) in known and isinstance(obj, (Tensor, nn.Module)) else None

        self.aliases = [
            (i, key)
            for i, m in enumerate(modules)
            for key, value in m.__dict__.items()
            if key not in _STANDARD_ATTRIBUTES and key != _TAG and _substitute(value, mark) is not value
        ]
        self.plan = self._copy_plan()
        # What the root view of every patch of this tree knows (shared, never modified).
        self.root_view_state = {
            "_hg_all_param_names": [(name, slot[2]) for name, slot in self.param_slots],
            "_hg_param_idx": list(range(len(self.param_names))),
            "_hg_param_names": self.param_names,
            "_hg_buffer_names": [(name, i) for i, name in enumerate(self.buffer_names)],
            "_hg_subtree": list(range(len(modules))),
        }

    def live_modules(self) -> list[nn.Module] | None:
        """The modules, if the tree is still as analysed (else ``None``)."""
        modules = []
        for ref, own, fingerprint in zip(self.module_refs, self.own_attributes, self.fingerprints):
            m = ref()
            if m is None or _fingerprint(m, own) != fingerprint:
                return None
            modules.append(m)
        # The same Parameter objects may hold tensors of another shape (``p.data = new``, e.g. a
        # classifier head resized for an episode with another number of classes).
        if [p.shape for p in self.params] != self.param_shapes:
            return None
        return modules

    def _copy_plan(self) -> list[tuple[int, list[tuple[str, int]], list[tuple[str, int]], list[tuple[str, int]]]]:
        """Which modules a new history entry copies, children first: those holding parameters or
        buffers, and their ancestors (whose submodule slots must point to the new copies)."""
        copied: dict[int, bool] = {}
        order: list[int] = []
        aliased = {i for i, _ in self.aliases}
        children = self.children

        def visit(i: int) -> bool:
            if i in copied:
                return copied[i]
            copied[i] = False  # guards against cycles
            below = [visit(c) for _, c in children[i]]
            copied[i] = bool(self.own_params[i] or self.own_buffers[i] or any(below) or i in aliased)
            if copied[i]:
                order.append(i)
            return copied[i]

        visit(0)
        visit = None  # type: ignore[assignment]  # no reference cycle through the closure's cell
        return [
            (
                i,
                list(self.own_params[i].items()),
                list(self.own_buffers[i].items()),
                [(key, c) for key, c in children[i] if copied[c]],
            )
            for i in order
        ]


_TREES: weakref.WeakKeyDictionary[nn.Module, _Tree] = weakref.WeakKeyDictionary()


def _tree_of(module: nn.Module) -> tuple[_Tree, list[nn.Module]]:
    """The (cached) analysis of ``module``'s tree, and its modules."""
    tree = _TREES.get(module)
    modules = None if tree is None else tree.live_modules()
    if tree is None or modules is None:
        tree = _Tree(module)
        _TREES[module] = tree
        modules = [ref() for ref in tree.module_refs]
    return tree, modules  # type: ignore[return-value]


class _Core:
    """What all views of one fmodel share: the module tree, its replicas, and the fast-weight history."""

    def __init__(self, module: nn.Module) -> None:
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
        self.left_out = _left_out()
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
        self.views: dict[int, weakref.ref[FunctionalModule]] = {}
        self.root: Callable[[], FunctionalModule | None] = lambda: None
        self.view_base: type[FunctionalModule] = FunctionalModule
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

    def view(self, module: nn.Module) -> FunctionalModule | None:
        """The view of ``module`` (made now if needed), or ``None`` if it is not in the patched model."""
        index = self.index_of(module)
        if index is None:
            return None
        view = self.live_view(index)
        if view is None:
            root = self.root()
            if self.paths[index] and root is not None:
                return cast(
                    FunctionalModule, root.get_submodule(self.paths[index])
                )  # made by its parent, which keeps it
            view = self.make_view(index)
        return view

    def make_view(self, index: int) -> FunctionalModule:
        module, path = self.modules[index], self.paths[index]
        view = _view_class(type(module), not path, self.view_base)(self, module, path)
        ref = self.views[index] = weakref.ref(view)
        if not path:
            self.root = ref
        return view

    def live_view(self, index: int) -> FunctionalModule | None:
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


def _ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 7]`` as ``"0..2, 7"``."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in runs)


def _itself(replica: nn.Module) -> Callable[..., Any]:
    return replica


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
        index = d["_hg_index"] = None if path is None else core.module_index[id(module)]
        d["_hg_module"] = module
        # nn.Module.__init__'s state, made directly (it is a dozen empty dicts; views are made per
        # inner loop). ``training`` is a property here: the mode lives on the replica.
        d.update(_MODULE_STATE)
        for key, empty in _MODULE_CONTAINERS:
            d[key] = empty()
        if index is None:
            object.__setattr__(self, "training", module.training)
        d["_hg_path"] = path
        d["_hg_is_root"] = path == ""
        if path == "":  # the root sees every slot: nothing to select (submodule views select on first use)
            d.update(core.tree.root_view_state)
            self._hg_own_tensors()

    def _hg_select(self) -> None:
        """Find the names, indices and modules of a submodule view's subtree (once, on first use)."""
        d = self.__dict__
        core, path, module = d["_hg_core"], d["_hg_path"], d["_hg_module"]
        if path is None:  # a container made from the model's modules: walk it
            in_subtree = _named_slots(core, module, "_parameters")
            buffers = _named_slots(core, module, "_buffers")
        else:
            prefix = f"{path}."
            in_subtree = [(name[len(prefix) :], slot) for name, slot in core.param_slots if name.startswith(prefix)]
            buffers = [(name[len(prefix) :], slot) for name, slot in core.buffer_slots if name.startswith(prefix)]
        d["_hg_all_param_names"] = [(name, slot[2]) for name, slot in in_subtree]
        seen: dict[int, str] = {}
        for name, slot in in_subtree:
            seen.setdefault(slot[2], name)
        d["_hg_param_idx"] = list(seen)
        d["_hg_param_names"] = list(seen.values())
        first_buffer_names: dict[int, str] = {}
        for name, slot in buffers:
            first_buffer_names.setdefault(slot[2], name)
        d["_hg_buffer_names"] = [(name, i) for i, name in first_buffer_names.items()]
        subtree = (core.index_of(m) for m in module.modules())
        d["_hg_subtree"] = [i for i in subtree if i is not None]
        self._hg_own_tensors()  # last: its key marks the selection as done

    def _hg_own_tensors(self) -> None:
        d = self.__dict__
        index = d["_hg_index"]
        core = d["_hg_core"]
        d["_hg_own_params"] = {} if index is None else core.own_params[index]
        d["_hg_own_buffers"] = {} if index is None else core.own_buffers[index]

    def _hg_replica(self) -> nn.Module:
        """The latest replica of this view's module (the object its attributes are read from)."""
        d = self.__dict__
        index = d["_hg_index"]
        return d["_hg_module"] if index is None else d["_hg_core"].replicas[index]

    @property  # type: ignore[override]
    def training(self) -> bool:  # type: ignore[override]
        """This view's training mode (``fmodel.train()``/``eval()`` change the fmodel's modes only)."""
        return self._hg_replica().training

    @training.setter
    def training(self, mode: bool) -> None:
        self._hg_replica().__dict__["training"] = mode

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

    # ------------------------------------------------------------------ running the module
    def _hg_compute(
        self, target: Callable[[nn.Module], Callable[..., Any]], args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> Any:
        """Call ``target(replica)(*args, **kwargs)`` on the replica holding the latest fast weights.

        ``target`` picks what to run on the replica of this view's module: the module itself
        (``forward``), one of its methods, a property. The task-batched views
        (:mod:`higher.batched`) run it vmapped over tasks instead.
        """
        core = self.__dict__["_hg_core"]
        return self._hg_call_on(core.realize(), core.buffers, target, args, kwargs)

    def _hg_call_on(
        self,
        replicas: Sequence[nn.Module],
        buffers: list[Tensor],
        target: Callable[[nn.Module], Callable[..., Any]],
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
    ) -> Any:
        """Run ``target`` on this view's module in ``replicas``; adopt replaced buffers into ``buffers``."""
        d = self.__dict__
        if "_hg_own_params" not in d:
            self._hg_select()
        core = d["_hg_core"]
        index = d["_hg_index"]
        replica = replicas[index] if index is not None else core.replica_for(d["_hg_module"], replicas)
        lent = self._hg_lend_hooks(replicas) if core.view_hooks else ()
        try:
            return target(replica)(*args, **kwargs)
        finally:
            for module_dict, saved in lent:
                module_dict.update(saved)
            if buffers:
                core.read_back_buffers(replicas, buffers)

    def _hg_lend_hooks(self, replicas: Sequence[nn.Module]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """Add the hooks registered on the views below this one to their replicas, for one call.

        ``fmodel.layer.register_forward_hook(hook)`` must fire when ``fmodel(x)`` runs the layer,
        but the call runs the replicas, not the views. So the hooks of every view in the subtree
        (its own are run by its ``__call__``) are added after the module's own hooks for the
        duration of the call; the replica's hook dicts are put back afterwards.
        Returns ``(replica.__dict__, saved entries)`` pairs to restore.
        """
        lent = []
        core = self._hg_core
        for index in self._hg_subtree:
            view = core.live_view(index)
            if view is None or view is self:
                continue
            theirs = view.__dict__
            names = [name for name in _HOOK_DICTS if theirs.get(name)]
            if not names:
                continue
            ours = replicas[index].__dict__
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
        return self._hg_compute(_itself, args, kwargs)

    # ------------------------------------------------------------------ fast weights and history
    def _hg_slice(self, entry: list[Tensor]) -> list[Tensor]:
        """This view's fast weights in a history entry (the root's: the whole entry, as it is)."""
        if self.__dict__["_hg_is_root"]:
            return list(entry)
        try:
            return [entry[i] for i in self._hg_param_idx]
        except IndexError:
            raise _malformed(self._hg_core, entry) from None

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
        entry = history[time]
        if entry is None:
            kept = _ranges([i for i, e in enumerate(history) if e is not None])
            raise TimeIndexError(
                f"time={time} is not available: a checkpointed unroll (higher.checkpointed_unroll) keeps only the "
                f"fast weights from before it (time=0, the initial ones) and the latest, not those of the steps in "
                f"between (they are recomputed during the backward pass instead of stored). Kept here: time={kept} "
                f"(time=-1: the latest). Use a plain unroll (diffopt.step in a loop) to read intermediate fast weights."
            )
        return entry

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
        if len(entry) != len(self._hg_core.param_shapes):
            raise _malformed(self._hg_core, entry)
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
        """The latest fast weights (``None`` before any); setting records a new history entry.

        The root fmodel's is the latest history entry itself, as in higher 0.2.1:
        ``fmodel.fast_params[i] = t`` replaces that fast weight in place (no new history entry),
        and the next call, ``parameters()`` and the next optimizer step use ``t``. A submodule's
        is a new list (changing it changes nothing).
        """
        core = self._hg_core
        latest = core.latest
        if latest is None:
            return None
        if self.__dict__["_hg_is_root"]:
            core.watch()
            return latest
        return self._hg_slice(latest)

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
        if len(entry) != len(core.param_shapes):
            raise _malformed(core, entry)
        for i, tensor in zip(indices, params):
            entry[i] = tensor
        core.push(entry)

    @property
    def init_fast_params(self) -> list[Tensor]:
        """The fast weights at time 0 (only kept when tracking higher-order gradients); the root
        fmodel's is the history entry itself, as ``fast_params``."""
        core = self._hg_core
        if not core.track_higher_grads:
            raise ValueError(
                "init_fast_params is not kept when track_higher_grads=False; use fast_params, or "
                "patch with track_higher_grads=True."
            )
        entry = self._hg_entry(0)
        if self.__dict__["_hg_is_root"]:
            core.watch()
            return entry
        return self._hg_slice(entry)

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
    def _fast_params(self) -> list[list[Tensor] | None]:
        """The whole history (one list of fast weights per update), as in higher 0.2.1 (``None``: an
        entry a checkpointed unroll did not keep): the list itself, which the program may change."""
        core = self._hg_core
        core.watch()
        return core.history

    @_fast_params.setter
    def _fast_params(self, value: Iterable[Iterable[Tensor] | None] | None) -> None:
        """Replace the whole history, as 0.2.1 code does: ``fmodel._fast_params = []`` clears it,
        ``fmodel._fast_params = [[]]`` (right after ``make_functional``, then
        ``track_higher_grads = False``) makes room for the one entry that ``params=`` replaces.

        Stored as given (the list itself, as 0.2.1 stored it), not checked here: a call checks the
        latest entry before using it, and the history's readers check the entries they read.
        """
        if value is None:  # 0.2.1's state before any fast weights
            history: list[Any] = []
        elif type(value) is list:
            history = value
        else:
            history = list(value)
        for i, entry in enumerate(history):
            if entry is not None and type(entry) is not list:
                history[i] = list(entry)
        core = self._hg_core
        core.history = history
        core.watch()

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
            core.history = [
                [p.detach().requires_grad_(p.requires_grad) if isinstance(p, Tensor) else p for p in core.latest]
            ]
        core.buffers = [b.detach() for b in core.buffers]
        if core.latest is not None and not core.batched and _well_formed(core.latest, core.param_shapes):
            core.realize()  # the replicas let go of the old fast weights (and their graph) now
        return self

    def sync_buffers_to(self, module: nn.Module | None = None, *, task: int | None = None) -> None:
        """Copy the fmodel's buffers (BatchNorm running statistics...) into ``module``'s, in place.

        ``module`` defaults to the module this fmodel was made from (the part this view covers).
        The fmodel keeps its own copies: buffers updated in the inner loop (e.g. BatchNorm in
        train mode) reach the model only through this call, or with ``share_buffers=True``.

        A task-batched fmodel (``tasks=T``) holds one set of buffers per task (shape ``[T, ...]``)
        and the module one: ``task=i`` copies task ``i``'s, and must be given (a mean over tasks,
        if wanted, is ``buffer.mean(0)`` of each of ``fmodel.named_buffers()``).
        """
        core = self._hg_core
        target = self._hg_module if module is None else module
        theirs = list(target.named_buffers())
        mine = [(name, core.buffers[i]) for name, i in self._hg_buffer_names]
        if [name for name, _ in theirs] != [name for name, _ in mine]:
            raise KeyError(
                f"sync_buffers_to: the module's buffers {[n for n, _ in theirs]} do not match the "
                f"fmodel's {[n for n, _ in mine]}; give the module the fmodel was made from."
            )
        if not core.batched:
            if task is not None:
                raise ValueError(
                    "sync_buffers_to: task= chooses among the tasks of a task-batched fmodel (tasks=T); this "
                    "fmodel holds one set of buffers: call sync_buffers_to(module)."
                )
        elif task is None:
            example = f" ('{mine[0][0]}' has shape {tuple(mine[0][1].shape)})" if mine else ""
            raise ValueError(
                f"sync_buffers_to: this fmodel is task-batched: it holds one set of buffers per task{example}, "
                f"the module one. Choose the task whose buffers to copy: sync_buffers_to(module, task=i), "
                f"0 <= i < {core.tasks}."
            )
        elif isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < core.tasks:
            raise ValueError(f"sync_buffers_to: task must be an int from 0 to {core.tasks - 1}, got {task!r}.")
        else:
            mine = [(name, buffer[task]) for name, buffer in mine]
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
        if isinstance(item, FunctionalModule):
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
        if isinstance(module, FunctionalModule):
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

    def train(self, mode: bool = True) -> FunctionalModule:
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
        view = cast(FunctionalModule, self.get_submodule(module_path))
        if name not in view._hg_own_params:
            raise AttributeError(f"{type(view).__name__} has no parameter '{name}'")
        return getattr(view, name)

    def get_buffer(self, target: str) -> Tensor:
        """The fmodel's buffer named ``target`` (e.g. ``"bn.running_mean"``)."""
        module_path, _, name = target.rpartition(".")
        view = cast(FunctionalModule, self.get_submodule(module_path))
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
        return self._hg_compute(lambda replica: replica.state_dict, (), kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        """Adopt parameters (as new fast weights, one history entry) and buffers from ``state_dict``.

        Tensors that require grad are adopted as they are (gradients flow to where they came
        from). Others, such as those of ``model.state_dict()``, which share storage with the
        model, are copied: parameters get the ``requires_grad`` of the fast weight they replace
        (so that the inner loop keeps updating them), buffers are copied so that the fmodel's
        BatchNorm updates never reach the model. Shapes must match, as for ``nn.Module``: those
        of a task-batched fmodel have the task dimension first (``higher.patch.buffer_sync`` gives
        every task the model's buffers).
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
        for name, i in named_buffers.items():  # checked before anything changes, as torch does
            value = state_dict.get(name)
            if isinstance(value, Tensor) and value.shape != core.buffers[i].shape:
                per_task = ""
                if core.batched:
                    per_task = f" (task-batched: one per task, e.g. value.expand({core.tasks}, *value.shape))"
                raise RuntimeError(
                    f"Error(s) in loading state_dict: the buffer '{name}' has shape {tuple(value.shape)}, the "
                    f"fmodel's has shape {tuple(core.buffers[i].shape)}{per_task}."
                )
        entry: list[Any] = list(core.latest)
        if len(entry) != len(core.param_shapes):  # set by the program (fmodel._fast_params = [[]]): all of them
            entry = [None] * len(core.param_shapes)
        for name, i in named_params.items():
            if name in state_dict:
                value = state_dict[name]
                if isinstance(value, Tensor) and not value.requires_grad:
                    old = entry[i] if isinstance(entry[i], Tensor) else core.params[i]
                    value = value.detach().clone().requires_grad_(old.requires_grad)
                entry[i] = value
        _check_tensors("state_dict", entry, core.param_shapes, core.param_names)
        core.push(entry)
        for name, i in named_buffers.items():
            if name in state_dict:
                value = state_dict[name]
                core.set_buffer(i, value.detach().clone() if isinstance(value, Tensor) else value)
        return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> FunctionalModule:  # type: ignore[override]
        """``.to()``, ``.double()``, ``.cuda()``...: convert the fast weights and the buffers.

        Every history entry is converted in place (``time`` indices keep counting updates, and a
        conversion that changes nothing, such as ``.to(same device)``, changes nothing). As with
        ``nn.Module.to``, a leaf stays a leaf (same ``requires_grad``); a fast weight with a
        history is converted differentiably, so meta-gradients still reach where it came from. A
        differentiable optimizer converts its state at its next step to follow the fast weights
        (as ``torch.optim``'s ``load_state_dict`` casts a state for its parameters).
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
            if entry is None:  # not kept (checkpointed_unroll)
                continue
            for i in self._hg_param_idx:
                if i < len(entry) and isinstance(entry[i], Tensor):  # (an entry the program set may hold less)
                    entry[i] = convert(entry[i])
        buffers = list(core.buffers)
        for _, i in self._hg_buffer_names:
            buffers[i] = fn(buffers[i])
        core.buffers = buffers  # and the history changed in place: the replicas are made again
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
        snapshot = {
            "module": core.module,
            "history": [None if entry is None else [detach(t) for t in entry] for entry in core.history],
            "buffers": [b.detach().clone() for b in core.buffers],
            "attributes": {(core.paths[i], name): detach(value) for (i, name), value in core.overrides.items()},
            "track_higher_grads": core.track_higher_grads,
            "modes": {path: replica.training for path, replica in zip(core.paths, core.replicas)},
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
            core.replicas[core.paths.index(name)].__dict__["training"] = mode
    for (module_path, name), value in snapshot.get("attributes", {}).items():
        setattr(fmodel.get_submodule(module_path), name, value)
    return cast(FunctionalModule, fmodel.get_submodule(path)) if path else fmodel


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
    """Copy (clone and detach, optionally to ``device``) every buffer of ``module`` into ``fmodule``.

    A task-batched ``fmodule`` gets them for every task (expanded to ``[tasks, ...]``).
    """
    core = fmodule._hg_core
    theirs = list(module.named_buffers())
    if [name for name, _ in theirs] != core.buffer_names:
        raise KeyError(
            f"buffer_sync: the module's buffers {[n for n, _ in theirs]} do not match the functional "
            f"module's {core.buffer_names}; both must come from the same architecture."
        )
    buffers = [_copy_tensor(b, True, device) for _, b in theirs]
    if core.batched:  # every task gets the module's buffers, as when the fmodel was made
        buffers = [b.expand(core.tasks, *b.shape).clone() for b in buffers]
    core.buffers = buffers


def _given_initial_params(
    names: Sequence[str], defaults: list[Tensor], given: Sequence[Tensor] | Mapping[str, Tensor]
) -> list[Tensor]:
    """``initial_params`` (all of them as a sequence, or some by name) in place of ``defaults``."""
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
    _check_shared_buffers(module, share_buffers, device)
    _check_track_higher_grads(track_higher_grads)
    return _patched(module, device, copy_initial_weights, track_higher_grads, share_buffers, initial_params)


def _check_shared_buffers(module: nn.Module, share_buffers: bool, device: torch.device | str | None) -> None:
    if share_buffers and device is not None:
        if any(b.device != torch.device(device) for b in module.buffers()):
            raise ValueError(
                "share_buffers=True cannot move the buffers to another device; omit device= or share_buffers."
            )


def _check_track_higher_grads(track_higher_grads: Any) -> None:
    if not isinstance(track_higher_grads, bool):
        raise ValueError(f"track_higher_grads must be a bool, got {track_higher_grads!r}")


def _patched(
    module: nn.Module,
    device: torch.device | str | None,
    copy_initial_weights: bool,
    track_higher_grads: bool,
    share_buffers: bool,
    initial_params: Sequence[Tensor] | Mapping[str, Tensor] | None,
) -> FunctionalModule:
    """:func:`monkeypatch` with its options already checked."""

    def encapsulator(fmodule: FunctionalModule, original: nn.Module) -> None:
        core = fmodule._hg_core
        if copy_initial_weights:
            params = [_copy_tensor(p, True, device) for p in core.params]
        else:
            params = [p.clone() if device is None else p.clone().to(device) for p in core.params]
        if initial_params is None:
            core.push(params)  # copies of the module's own tensors: no need to check them
        else:
            fmodule.update_params(_given_initial_params(core.param_names, params, initial_params))
        if not share_buffers:
            core.buffers = [_copy_tensor(b, True, device) for b in core.buffers]  # buffer_sync, same module

    fmodule = make_functional(module, encapsulator=encapsulator)
    fmodule._hg_core.track_higher_grads = track_higher_grads
    return fmodule


# ---------------------------------------------------------------------- higher 0.2.1 names
# Published code imports these from higher.patch; they keep their 0.2.1 meaning.

#: The class of every patched module in 0.2.1 (``isinstance(x, higher.patch._MonkeyPatchBase)``
#: tells an fmodel from a plain module).
_MonkeyPatchBase = FunctionalModule

#: 0.2.1's type of a module's buffer dict.
_BufferType = dict[str, Optional[Tensor]]

#: 0.2.1's type of ``make_functional``'s ``encapsulator``.
_EncapsulatorType = Optional[Callable[[FunctionalModule, nn.Module], None]]


class _ParameterPlaceholder:
    """Stands for a parameter that has no fast weight yet (0.2.1 printed these in patched modules)."""

    def __init__(self, name: str) -> None:
        self._param_name = name

    def __repr__(self) -> str:
        return f'Parameter placeholder ("{self._param_name}")'


_ParameterPlaceholder.__name__ = _ParameterPlaceholder.__qualname__ = "ParameterPlaceholder"  # as in 0.2.1


def _patched_parameters(self: FunctionalModule, recurse: bool = True, time: int | None = None) -> Iterator[Tensor]:
    """0.2.1's ``parameters`` of a patched module, as a function: the fast weights at ``time``."""
    return self.parameters(recurse=recurse, time=time)


@contextlib.contextmanager
def _modify_internally(fmodule: FunctionalModule) -> Iterator[None]:
    """0.2.1's guard around its own writes into a patched module: ``fmodule._being_modified_internally``
    is ``True`` inside. A tensor assigned to one of ``fmodule``'s parameters there replaces that fast
    weight in the latest history entry instead of recording a new entry (0.2.1 wrote it into the
    module's attribute only, without a history entry)."""
    fmodule._being_modified_internally = True
    try:
        yield
    finally:
        fmodule._being_modified_internally = False


def _slots_of(fmodule: FunctionalModule) -> list[int]:
    """The index of the fast weight in every parameter slot of ``fmodule``'s subtree, in 0.2.1's
    order of a params box: depth first, a module's own parameters before its children's, a
    shared submodule's and a tied parameter's slots once per place they are held."""
    d = fmodule.__dict__
    if "_hg_own_params" not in d:
        fmodule._hg_select()
    return [i for _, i in d["_hg_all_param_names"]]


def _make_functional(
    module: nn.Module,
    params_box: Sequence[Any] | None = None,
    params_offset: int = 0,
    root_patched: FunctionalModule | None = None,
) -> tuple[int, FunctionalModule, type]:
    """0.2.1's builder: ``(params_offset + number of parameter slots, fmodule, type(fmodule))``.

    The fmodule is :func:`make_functional`'s. If ``params_box[0]`` holds a list of tensors (0.2.1's
    *expanded* list, one per slot, see :func:`_update_patched_params`), the slots from
    ``params_offset`` on become its fast weights now; 0.2.1 read the box at each call instead,
    when its root's forward had filled it (pass ``params=`` to the calls for that).
    """
    if root_patched is not None:
        raise ValueError("_make_functional(root_patched=...) is internal to 0.2.1; patch the root module instead.")
    fmodule = make_functional(module)
    count = len(_slots_of(fmodule))
    if params_box is not None and params_box and params_box[0] is not None:
        _update_patched_params(fmodule, params_box, params_offset)
    return params_offset + count, fmodule, type(fmodule)


def _update_patched_params(fmodule: FunctionalModule, params_box: Sequence[Any], params_offset: int) -> int:
    """Put ``params_box[0][params_offset:]`` (0.2.1's expanded list: one tensor per parameter slot,
    see :func:`_slots_of`) into ``fmodule``'s slots; returns the offset after its subtree's slots.

    As in 0.2.1 (which called it right after setting the fast weights, with the same tensors) this
    records no history entry: tensors other than the latest fast weights replace them in the
    latest entry. A tied parameter must get the same tensor in each of its slots.
    """
    slots = _slots_of(fmodule)
    given = list(params_box[0])[params_offset : params_offset + len(slots)]
    core = fmodule._hg_core
    latest = core.latest
    changes: dict[int, Any] = {}
    for i, tensor in zip(slots, given):
        if changes.setdefault(i, tensor) is not tensor:
            raise ValueError(
                f"_update_patched_params: the parameter '{core.param_names[i]}' is tied (held in several slots) "
                f"and got different tensors in its slots; a tied parameter has one fast weight."
            )
    if latest is not None and len(latest) != len(core.param_shapes):
        raise _malformed(core, latest)
    if latest is not None and all(latest[i] is tensor for i, tensor in changes.items()):
        return params_offset + len(slots)
    entry: list[Any] = list(latest) if latest is not None else [None] * len(core.param_shapes)
    for i, tensor in changes.items():
        entry[i] = tensor
    _check_tensors("_update_patched_params", entry, core.param_shapes, core.param_names)
    if latest is None:
        core.push(entry)
    else:
        core.history[-1] = entry
    return params_offset + len(slots)


# ---------------------------------------------------------------------- 0.2.1's fmodel attributes
# 0.2.1's patched modules had attributes of their own (``fmodel.root``, ``fmodel._param_mapping``...).
# A view has them too, unless the user's module has an attribute of that name (``self.root = ...``
# in a tree model): a view shows the module's own attributes first (see FunctionalModule.__getattr__).


def _view_is_root(view: FunctionalModule) -> bool:
    return bool(view.__dict__["_hg_is_root"])


def _view_root(view: FunctionalModule) -> FunctionalModule:
    core = view._hg_core
    root = core.view(core.module)
    assert root is not None
    return root


def _view_root_ref(view: FunctionalModule) -> weakref.ref[FunctionalModule] | None:
    return None if _view_is_root(view) else weakref.ref(_view_root(view))


def _view_param_mapping(view: FunctionalModule) -> list[int]:
    """0.2.1's ``_param_mapping``: for the root, the fast weight of every parameter slot (a tied
    parameter's index repeats); ``[]`` for a submodule, as in 0.2.1."""
    return _slots_of(view) if _view_is_root(view) else []


def _expand_params(self: FunctionalModule, params: Sequence[Tensor]) -> list[Tensor]:
    """0.2.1's ``_expand_params``: one tensor per parameter slot (tied parameters repeated)."""
    return [params[i] for i in _view_param_mapping(self)]


def _refill_params_box(self: FunctionalModule, params: Iterable[Tensor] | None = None) -> None:
    """0.2.1's ``_refill_params_box``: ``params``, if given, become the latest fast weights (a new
    history entry); without them, there must be fast weights. Ours has no params box to fill."""
    if params is not None:
        self.fast_params = params
    elif self._hg_core.latest is None:
        raise ValueError(
            "params keyword must be provided if patched module not tracking its own fast parameters "
            "(this functional module has no fast weights yet)."
        )


def _refuse_param_mapping(view: FunctionalModule, value: Any) -> None:
    raise AttributeError(
        "_param_mapping cannot be assigned: the fmodel derives which fast weight each parameter slot "
        "holds from the model (one copy of a shared submodule, one fast weight per tied parameter). "
        "To tie or untie parameters, change the model and patch it again."
    )


def _set_track_higher_grads(view: FunctionalModule, value: Any) -> None:
    view._hg_core.track_higher_grads = value  # 0.2.1's attribute behind the property: not checked


_COMPAT_GETTERS: dict[str, Callable[[FunctionalModule], Any]] = {
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
_COMPAT_SETTERS: dict[str, Callable[[FunctionalModule, Any], None]] = {
    "_param_mapping": _refuse_param_mapping,
    "_track_higher_grads": _set_track_higher_grads,
}
