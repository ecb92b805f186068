"""Counting what repeated calls leave alive: the leak checks of several test modules share it."""

from __future__ import annotations

import gc
from typing import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensor

import higher


class _Counted(dict):
    """Whether objects of a type are counted, by type (no ``__class__`` lookups on arbitrary objects):
    tensors, except torch.compile's fake ones (no storage; they come and go with its caches), and
    FunctionalModules."""

    def __missing__(self, kind: type) -> bool:
        counted = issubclass(kind, torch.Tensor) and not issubclass(kind, FakeTensor)
        self[kind] = counted = counted or issubclass(kind, higher.patch.FunctionalModule)
        return counted


_COUNTED = _Counted()


def _alive() -> list[object]:
    gc.collect()
    return [o for o in gc.get_objects() if _COUNTED[type(o)]]


def growth(run: Callable[[], object], calls: int) -> tuple[int, int]:
    """How many more FunctionalModules and tensors ``calls`` calls of ``run`` leave alive than one call does.

    Zero for a function that leaks nothing, though one call may leave objects that the next one
    replaces (the last gradients, an optimizer's state); a leak of k objects per call gives
    k * (calls - 1). Counted by object identity, not by totals, so objects of earlier tests freed during
    the calls (torch's and our caches let go at times of their own choosing) neither hide a leak nor
    count as one: the objects alive before are held here meanwhile, so no new object can take one of
    their ids. Call ``run`` a few times first, so that lazily made caches are not counted.
    """
    before = _alive()
    seen = {id(o) for o in before}
    run()
    after_one = [o for o in _alive() if id(o) not in seen]  # what one call left alive (held)
    seen.update(id(o) for o in after_one)
    for _ in range(calls):
        run()
    # What the next calls left alive: without a leak, the replacements of what the first call left.
    after_all = [o for o in _alive() if id(o) not in seen]
    del before

    def count(objects: list[object]) -> tuple[int, int]:
        fmodels = sum(isinstance(o, higher.patch.FunctionalModule) for o in objects)
        return fmodels, len(objects) - fmodels

    (f1, t1), (f2, t2) = count(after_one), count(after_all)
    return f2 - f1, t2 - t1
