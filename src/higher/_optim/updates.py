"""A differentiable optimizer's state and its updates (:class:`_Updates`): the per-parameter
state (momentum buffers, moment estimates...) copied from the torch optimizer, following the fast
weights' dtype and device, detached for truncation; and the update rule applied to it, group by
group, out of place.

The middle layer of :class:`higher.optim.DifferentiableOptimizer`, over its hyperparameters
(:mod:`.hyperparameters`). ``state[group_index][param_index]`` holds torch.optim's entries under
torch.optim's names, as in higher 0.2.1, so it can be handed back to a torch optimizer.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Union, cast

import torch
from torch import Tensor

from .hyperparameters import PerParameter, _check_dtype, _Hyperparameters

if TYPE_CHECKING:
    from typing_extensions import Self

#: higher 0.2.1's types: the gradients grouped as the optimizer's groups, and the optimizer state.
_GroupedGradsType = list[list[Union[Tensor, None]]]
_StateType = list[defaultdict]


class _Updates(_Hyperparameters):
    """The state and the update rule applied to it (the middle layer of ``DifferentiableOptimizer``).

    Owns ``state`` (one ``defaultdict`` per group: parameter index -> that parameter's state) and
    the dtype and device each parameter's state was made for. :meth:`_update` is the method that
    optimizers written for higher 0.2.1 override.
    """

    _group_to_param_list: list[list[int]]  # per group: the index of each of its parameters among the fast weights
    _param_kinds: list[tuple[torch.dtype, torch.device]]  # see _follow_params

    def _copy_state(self, other: torch.optim.Optimizer, reference_params: Iterable[Tensor], device: Any) -> None:
        """Take a detached copy of ``other``'s state (a warm start; a fresh optimizer has none),
        moved to ``device`` if given."""
        self.state = []
        for group in other.param_groups:
            state: defaultdict = defaultdict(dict)
            if other.state:
                for index, p in enumerate(group["params"]):
                    copied = _copy_torch_state(other.state.get(p), device)
                    if copied:
                        state[index] = copied
            self.state.append(state)
        # The dtype and device of each parameter when the state was last made for it (see _follow_params).
        self._param_kinds = [(p.dtype, p.device) for p in reference_params]

    def _apply_update(self, params: list[Tensor], grads: list[Tensor | None], **kwargs: Any) -> list[Tensor]:
        """Run ``_update`` on the parameters grouped as the optimizer's groups; the new tensors."""
        grouped_grads = []
        for group, indices in zip(self.param_groups, self._group_to_param_list):
            group["params"] = [params[i] for i in indices]
            grouped_grads.append([grads[i] for i in indices])
            if self._shaped_hyperparameters:  # checked for every group before anything changes
                for name, value in group.items():
                    if name != "params":
                        _check_dtype(name, value, group["params"])
        self._follow_params(params)
        self._update(grouped_grads, **kwargs)
        new_params = list(params)
        for group, indices in zip(self.param_groups, self._group_to_param_list):
            for i, p in zip(indices, group["params"]):
                new_params[i] = p
        return new_params

    def _follow_params(self, params: list[Tensor]) -> None:
        """Convert the state of the parameters whose dtype or device changed since the last step.

        After ``fmodel.double()``, ``.float()`` or ``.to(device)`` (or new fast weights of another
        dtype), the state of each changed parameter follows it as ``torch.optim``'s
        ``load_state_dict`` makes a state follow its parameters: floating-point tensors are cast
        to the parameter's dtype (if it is a floating-point one) and moved to its device, the
        ``step`` count is left as it is, other tensors only move. ``Tensor.to`` is
        differentiable: meta-gradients still reach the state from before the change.
        """
        kinds = [(p.dtype, p.device) for p in params]
        previous = self._param_kinds
        if kinds == previous:  # the usual case: nothing changed
            return
        for group_state, indices in zip(self.state, self._group_to_param_list):
            for index, param_state in group_state.items():
                i = indices[index]
                if kinds[i] != previous[i]:
                    group_state[index] = {key: _follow(params[i], key, value) for key, value in param_state.items()}
        self._param_kinds = kinds

    def _update(self, grouped_grads: _GroupedGradsType, **kwargs: Any) -> None:
        """Apply the update rule to every parameter with a gradient, group by group.

        Subclasses written for higher 0.2.1 override this method: read ``self.param_groups``
        and ``self.state[group_index][param_index]``, and write the new tensors into
        ``group['params'][param_index]``.
        """
        rule = self.rule
        if rule is None:
            raise NotImplementedError(f"{type(self).__name__} must implement _update(grouped_grads, **kwargs)")
        for group, grads, state, shapes in zip(self.param_groups, grouped_grads, self.state, self._group_shapes):
            params = group["params"]
            live = [k for k, g in enumerate(grads) if g is not None]
            if not live:
                continue  # as torch.optim: a group without gradients (frozen, unused) is skipped
            live_params = params if len(live) == len(params) else [params[k] for k in live]
            live_grads = cast(list[Tensor], grads if len(live) == len(grads) else [grads[k] for k in live])
            if any(g.is_sparse for g in live_grads):
                raise NotImplementedError(
                    f"{type(self).__name__} got a sparse gradient; differentiable optimizers need "
                    f"dense gradients (e.g. nn.Embedding(sparse=False))."
                )
            hyper, per_parameter = self._resolve(group, shapes)
            hyper_of = self._hyperparameters_for(hyper)
            current: Mapping[int, dict[str, Any]] = state
            # As torch.optim: complex tensors are updated as (real, imag) pairs, except by SGD,
            # whose update is the same either way (torch runs it on the complex tensors).
            complex_params = rule.name != "SGD" and any(p.is_complex() for p in live_params)
            if complex_params:
                live_params = [_real_view(p) for p in live_params]
                live_grads = [_real_view(g) for g in live_grads]
                current = {k: {key: _real_view(v) for key, v in state[k].items()} for k in live}
                per_parameter = {
                    name: PerParameter(v.unsqueeze(-1) if isinstance(v, Tensor) and v.dim() else v for v in values)
                    for name, values in per_parameter.items()
                }
            if hyper_of is None and not per_parameter:
                states = [current[k] or rule.init(p, hyper) for k, p in zip(live, live_params)]
                result = None
                if rule.update_many is not None:  # one call for the group, where the rule has it
                    result = rule.update_many(live_params, live_grads, states, hyper)
                if result is None:
                    updated = [rule.update(p, g, st, hyper) for p, g, st in zip(live_params, live_grads, states)]
                    result = ([p for p, _ in updated], [st for _, st in updated])
            else:
                new_params, new_states = [], []
                for k, p, g in zip(live, live_params, live_grads):
                    seen = hyper if hyper_of is None else hyper_of(p)
                    if per_parameter:
                        seen = {**seen, **{name: values[k] for name, values in per_parameter.items()}}
                    new_param, new_state = rule.update(p, g, current[k] or rule.init(p, seen), seen)
                    new_params.append(new_param)
                    new_states.append(new_state)
                result = (new_params, new_states)
            if complex_params:
                result = _complex_again([params[k] for k in live], *result)
            for k, p, st in zip(live, *result):
                params[k] = p
                state[k] = st

    def _detach_state(self) -> None:
        """Cut the optimizer state's graph too when not tracking higher-order gradients.

        A hyperparameter given as a tensor that requires grad (``override``) puts a graph into
        the state (e.g. Adam's moments through ``betas``) that would chain every step's graph to
        the previous one: memory growing with the number of steps, in the mode meant to be cheap.
        """
        for state in self.state:
            for param_state in state.values():
                for key, value in param_state.items():
                    if isinstance(value, Tensor) and value.requires_grad:
                        param_state[key] = value.detach()

    # ---------------------------------------------------------------- truncation and torch.optim API
    def detach_(self) -> Self:
        """Cut the graph through the optimizer state (momentum buffers, moment estimates...).

        Use it with ``fmodel.detach_()`` between windows of a truncated unroll: the next window
        starts from the same values with no graph to the earlier ones, so memory stays flat.
        Hyperparameter tensors given through ``override`` are left as they are (still learned).
        """
        for group_state in self.state:
            for param_state in group_state.values():
                for key, value in param_state.items():
                    if isinstance(value, Tensor):
                        param_state[key] = value.detach()
        return self


# ---------------------------------------------------------------- construction helpers
def _copy_torch_state(torch_state: dict | None, device: Any) -> dict:
    """A detached copy of one parameter's ``torch.optim`` state (warm start).

    Every entry is kept in torch's form (a tensor ``step`` stays a tensor), so that the
    state continues exactly where torch left it and can be handed back to a torch
    optimizer. State that torch creates before the first step (Adagrad's accumulator,
    filled from the group's ``initial_accumulator_value`` or by the user) is kept too.
    """
    if not torch_state:
        return {}
    copied: dict[str, Any] = {}
    for key, value in torch_state.items():
        if isinstance(value, Tensor):
            value = value.detach().clone()
            copied[key] = value if device is None else value.to(device)
        else:
            copied[key] = value
    return copied


def _follow(param: Tensor, key: str, value: Any) -> Any:
    """One state entry of ``param`` converted for it as ``torch.optim``'s ``load_state_dict`` does."""
    if key == "step" or not isinstance(value, Tensor):
        return value
    if param.is_floating_point() and value.is_floating_point():
        return value.to(dtype=param.dtype, device=param.device)
    return value.to(device=param.device)


def _real_view(value: Any) -> Any:
    """A complex tensor as a real one with a trailing (real, imag) dimension; anything else as is."""
    return torch.view_as_real(value) if isinstance(value, Tensor) and value.is_complex() else value


def _complex_again(
    old_params: list[Tensor], new_params: list[Tensor], new_states: list[dict[str, Any]]
) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """The results of an update on real views back in the complex form of ``old_params``: the new
    parameters and their per-element state (torch.optim keeps a complex parameter's state complex)."""
    params, states = [], []
    for old, new, state in zip(old_params, new_params, new_states):
        if not old.is_complex():
            params.append(new)
            states.append(state)
            continue
        shape = torch.view_as_real(old).shape
        params.append(torch.view_as_complex(new.contiguous()))
        states.append(
            {
                key: torch.view_as_complex(v.contiguous())
                if isinstance(v, Tensor) and not v.is_complex() and v.shape == shape
                else v
                for key, v in state.items()
            }
        )
    return params, states
