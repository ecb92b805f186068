"""Small utilities of higher 0.2.1's public interface."""

from __future__ import annotations

from collections.abc import Iterable
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


def get_func_params(
    module: torch.nn.Module, device: torch.device | str | None = None, safe_copy: bool = True
) -> list[Tensor]:
    """Detached copies of ``module.parameters()`` (leaves, ``requires_grad`` as the originals)."""
    return [_copy_tensor(p, safe_copy, device) for p in module.parameters()]


def _is_container(x: Any) -> bool:
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
