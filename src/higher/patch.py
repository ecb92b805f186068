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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Optional, cast

import torch
from torch import Tensor, nn

from ._fmodel.compat import _slots_of
from ._fmodel.core import _check_tensors, _Core, _malformed
from ._fmodel.protocol import _ModuleProtocol
from ._fmodel.weights import TimeIndexError, _check_track_higher_grads
from .utils import _copy_tensor

__all__ = ["FunctionalModule", "TimeIndexError", "make_functional", "monkeypatch", "buffer_sync"]

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


class FunctionalModule(_ModuleProtocol):
    """A functional view of a user module (the *fmodel*), or of one of its submodules.

    Created by :func:`monkeypatch` or :func:`make_functional`; see the module docstring.
    """

    # Its layers (higher._fmodel, bottom to top): the fast weights and their history
    # (_FastWeights), running the module (_Running), the rest of nn.Module's behaviour
    # (_ModuleProtocol). This class adds pickling and copying, and higher 0.2.1's _fast_params.

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
    core = _Core(module, _view_base, _left_out())
    fmodule = cast(FunctionalModule, core.view(module))
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
