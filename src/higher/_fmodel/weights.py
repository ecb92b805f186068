"""A view's fast weights (:class:`_FastWeights`): which part of the fmodel a view shows, and the
fast-weight history and buffers read and written through it.

The bottom layer of :class:`higher.patch.FunctionalModule`. The history itself lives in the core
(:mod:`.core`), shared by all views of an fmodel; a view selects its own part of each entry (the
root: all of it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .core import _check_tensors, _Core, _malformed, _named_slots, _well_formed
from .tree import _OWN_CONTAINERS

if TYPE_CHECKING:
    from typing_extensions import Self

# A fresh nn.Module's own state (what nn.Module.__init__ sets), less the training mode; and the
# keys of its containers (hook dicts, slot dicts...), of which every view needs its own.
_MODULE_STATE = {key: value for key, value in nn.Module().__dict__.items() if key != "training"}
_MODULE_CONTAINERS = [(key, type(value)) for key, value in _MODULE_STATE.items() if type(value) in _OWN_CONTAINERS]


class TimeIndexError(IndexError, ValueError):
    """``parameters(time=T)`` asked for a step that the fast-weight history does not hold."""


TimeIndexError.__module__ = "higher.patch"  # its public home (and its name in pickles)


def _check_track_higher_grads(value: Any) -> None:
    """The one check of ``track_higher_grads`` (the setter's, ``monkeypatch``'s, ``innerloop_ctx``'s)."""
    if not isinstance(value, bool):
        raise ValueError(f"track_higher_grads must be a bool, got {value!r}")


def _ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 7]`` as ``"0..2, 7"``."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in runs)


class _FastWeights(nn.Module):
    """A view of one module of an fmodel, and the fast weights and buffers it shows.

    Made by the core (:meth:`.core._Core.make_view`) for the patched model (the root view, the
    *fmodel*) and for each of its submodules, as an object of a subclass of
    :class:`higher.patch.FunctionalModule` (named after the user's class). A view's state lives in
    its ``__dict__``: the attributes below, set when it is made (the root's) or on first use (a
    submodule view's selection, :meth:`_hg_select`).
    """

    _hg_core: _Core  # what all views of the fmodel share
    _hg_index: int | None  # the module's index in the core (None: a container made from the model's modules)
    _hg_module: nn.Module  # the user's module this view shows
    _hg_path: str | None  # its path in the patched model ("": the root)
    _hg_is_root: bool
    # The selection: names and history indices of the fast weights and buffers in the view's subtree.
    _hg_all_param_names: list[tuple[str, int]]  # one per slot (a tied parameter once per place it is held)
    _hg_param_idx: list[int]  # one per parameter, in parameters() order
    _hg_param_names: list[str]
    _hg_buffer_names: list[tuple[str, int]]
    _hg_subtree: list[int]  # the module indices in the view's subtree
    _hg_own_params: dict[str, int]  # the module's own parameters, key -> history index
    _hg_own_buffers: dict[str, int]

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
            return history[-1]  # type: ignore[return-value]  # (the latest entry is always kept)
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
        _check_track_higher_grads(value)
        self._hg_core.track_higher_grads = value

    def detach_(self) -> Self:
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

    # ------------------------------------------------------------------ loading and converting

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

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Self:  # type: ignore[override]
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
