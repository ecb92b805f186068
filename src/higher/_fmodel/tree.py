"""The analysis of a module tree that every patch of it needs (:class:`_Tree`), made once per model.

Which module holds which parameter and buffer (the *slots*), the hook dicts, the attributes that
refer to the model's own objects (*aliases*), and which modules a new history entry copies (the
*copy plan*). Patching the same model again reuses the analysis while the tree is unchanged.
Also the constants of ``nn.Module``'s own state that the replicas (:mod:`.core`) and the views
(:mod:`.weights`) are made with.
"""

from __future__ import annotations

import functools
import operator
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

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

# The key under which a replica records which fmodel core it belongs to (see _ReplicaTag).
_TAG = "_higher_replica"

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
