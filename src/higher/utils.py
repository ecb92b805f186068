"""Small utilities of higher 0.2.1's interface (public and the private helpers user code imports)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["get_func_params", "flatten"]


def _copy_tensor(t: Tensor, safe_copy: bool, device: torch.device | str | None = None) -> Tensor:
    """A detached copy of ``t`` (a clone if ``safe_copy``), a leaf with the same ``requires_grad``."""
    copied = t if device is None else t.to(device)
    if safe_copy and copied is t:
        copied = t.clone()
    return copied.detach().requires_grad_(t.requires_grad)


def _recursive_map(target: Any, map_fn: Callable[[Any], Any]) -> Any:
    """``map_fn`` applied to every leaf of nested lists, tuples, sets and dict values.

    Containers are rebuilt with their own type (dict keys kept); anything else is a leaf.
    """
    if isinstance(target, dict):
        return type(target)({key: _recursive_map(value, map_fn) for key, value in target.items()})
    if isinstance(target, (list, tuple, set)):
        return type(target)(_recursive_map(item, map_fn) for item in target)
    return map_fn(target)


def _recursive_copy_and_cast(target: Any, device: torch.device | str | None) -> Any:
    """Nested containers with every tensor replaced by a detached copy (see :func:`_copy_tensor`)
    on ``device``; other leaves are kept as they are."""
    return _recursive_map(target, lambda x: _copy_tensor(x, True, device) if isinstance(x, Tensor) else x)


def get_func_params(
    module: torch.nn.Module, device: torch.device | str | None = None, safe_copy: bool = True
) -> list[Tensor]:
    """Detached copies of ``module.parameters()`` (leaves, ``requires_grad`` as the originals)."""
    return [_copy_tensor(p, safe_copy, device) for p in module.parameters()]


def _is_container(x: Any) -> bool:
    """Whether ``x`` is a list, tuple, set or dict (the containers the helpers here recurse into)."""
    return isinstance(x, (list, tuple, set, dict))


def flatten(x: Any) -> list[Any]:
    """Flatten nested lists, tuples, sets and dict values into one list."""
    if isinstance(x, dict):
        return flatten(list(x.values()))
    if isinstance(x, (list, tuple, set)):
        return [leaf for item in x for leaf in flatten(item)]
    return [x]


def _find_param_in_list(param: Tensor, candidates: Iterable[Tensor]) -> int | None:
    """Index of ``param`` in ``candidates`` by identity, or None."""
    for i, candidate in enumerate(candidates):
        if candidate is param:
            return i
    return None


def _get_param_mapping(module: torch.nn.Module, seen: list[Tensor], mapping: list[int]) -> list[int]:
    """For every parameter slot of ``module``'s tree, the index of its tensor among the distinct ones.

    Walks the tree depth first (a module's own parameters, then its children, as
    ``module.parameters()`` does but visiting shared modules and tied slots again), appending
    each new tensor to ``seen`` and each slot's index into ``seen`` to ``mapping``; returns
    ``mapping``. Tied weights give repeated indices.
    """
    for param in module._parameters.values():
        if param is None:
            continue
        found = _find_param_in_list(param, seen)
        if found is None:
            mapping.append(len(seen))
            seen.append(param)
        else:
            mapping.append(found)
    for child in module._modules.values():
        if child is not None:
            _get_param_mapping(child, seen, mapping)
    return mapping


def _check_task_dimension(tensors: Iterable[Any], tasks: int) -> None:
    """Every tensor among ``tensors`` has a leading task dimension of size ``tasks`` (task-batched mode)."""
    for tensor in tensors:
        if isinstance(tensor, Tensor) and (tensor.dim() == 0 or tensor.shape[0] != tasks):
            raise ValueError(
                f"in task-batched mode every tensor argument needs a leading task dimension of size "
                f"{tasks}; got a tensor of shape {tuple(tensor.shape)}. Stack the tasks' inputs "
                f"(torch.stack), or expand an input shared by all tasks (x.expand({tasks}, *x.shape))."
            )


RandomState = tuple[Tensor, list[Tensor]]


def random_devices(tensors: Iterable[Tensor]) -> list[int]:
    """The CUDA devices among ``tensors``' (whose random generators a random forward may draw from)."""
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


def get_random_state(devices: list[int]) -> RandomState:
    """The global CPU generator's state and that of each CUDA device in ``devices``."""
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def set_random_state(state: RandomState, devices: list[int]) -> None:
    """Restore what :func:`get_random_state` returned."""
    torch.set_rng_state(state[0])
    for device, cuda_state in zip(devices, state[1]):
        torch.cuda.set_rng_state(cuda_state, device)
