"""Calling the user's module with the fast weights (:class:`_Running`).

A call runs the user's own code (``forward``, a method, a property) on the replica of the view's
module that holds the latest fast weights (:meth:`.core._Core.realize`), with the hooks registered
on the views lent to the replicas for the call. The task-batched views (:mod:`higher.batched`)
override :meth:`_Running._hg_compute` to run the same on every task at once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from .tree import _HOOK_DICTS
from .weights import _FastWeights


def _itself(replica: nn.Module) -> Callable[..., Any]:
    return replica


class _Running(_FastWeights):
    """The second layer of :class:`higher.patch.FunctionalModule`: running the module with the fast weights."""

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

    def state_dict(
        self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False
    ) -> dict[str, Any]:  # type: ignore[override]
        """The module's state dict with the current fast weights and the fmodel's buffers."""
        if args:
            raise TypeError("pass state_dict options by keyword (destination=, prefix=, keep_vars=)")
        kwargs = {"destination": destination, "prefix": prefix, "keep_vars": keep_vars}
        return self._hg_compute(lambda replica: replica.state_dict, (), kwargs)
