"""The fully-sharded mode of ``innerloop_ctx``: FSDP2 (``fully_shard``) models in inner loops.

``innerloop_ctx(model, opt, copy_initial_weights=False)`` with a model wrapped by
``torch.distributed.fsdp.fully_shard`` (per layer and at the root) runs with the same user code as
an unsharded model, per task and with ``tasks=T``. What a user sees, the options honoured and those
refused: ``docs/scaling.md``; the public face of this module is :mod:`higher.distributed`.

How, in short. With ``N`` ranks, rank ``s`` holds for every parameter the rows of shard ``s`` of the
fast weights of *every* rank's task(s): a local stack ``[N, rows_s, ...]`` (``[tasks, N, rows_s,
...]`` task-batched), index ``r`` being rank ``r``'s task. Those stacks are the fmodel's fast weights.
The fmodel runs a plain copy of the module tree (the user's classes, without FSDP's hooks and
dynamic classes; the user's model is never modified); a forward pre-hook on each FSDP unit gathers
that unit's full weights for this rank's task(s) with one differentiable ``all_to_all`` for the
whole unit (rank ``s`` sends row block ``r`` of its stacks to rank ``r``) and puts them in the slots
for the unit's forward; a forward hook puts the stacks back. The inner gradient of each rank's
loss flows back through the ``all_to_all`` (its backward is again one), so that ``diffopt.step``,
called by every rank at once, gives rank ``s`` the gradient of every task's loss with respect to
its rows, and the ordinary update rules (:mod:`higher.rules`, elementwise) update the local stacks:
the same arithmetic as one process, task by task. The initial stacks are ``param.to_local()``
repeated ``N`` times; the meta-gradient therefore accumulates, summed over the ranks' tasks, into
the sharded ``param.grad`` (a DTensor), divided by ``N`` (or FSDP's gradient divide factor) as FSDP's
reduce-scatter averages.

Resharding (FSDP's ``reshard_after_forward``, per unit): during a resharding unit's forward,
saved-tensor hooks pack every tensor that autograd saves from the gathered weights' storage as a
recipe (:class:`_Recipe`: the unit and its stacks), so that the gathered weights die with the
forward; backward gathers them again, differentiably (so second-order unrolls stay exact), and the
differentiable optimizer's inner gradient (``create_graph``) packs what its own graph saves of those
the same way. Under ``tasks=T`` the forward runs under ``vmap``: the physical (batched) weights are
registered, and gathered again under a ``vmap`` of their own.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any, cast

import torch
from torch import Tensor, nn

from . import _ddp

__all__ = ["gather_stats", "gathered_bytes", "is_fsdp"]


def is_fsdp(model: Any) -> bool:
    """Whether ``model`` is an FSDP2 module (``torch.distributed.fsdp.fully_shard`` was applied to it)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch build without torch.distributed
        return False
    return isinstance(model, FSDPModule)


# ---------------------------------------------------------------------------------------- checks
def _param_groups(model: nn.Module) -> list[Any]:
    groups = []
    for m in model.modules():
        if is_fsdp(m):
            groups.extend(cast(Any, m)._get_fsdp_state()._fsdp_param_groups)
    return groups


def _plain_class(module: nn.Module) -> type:
    """The user's class of a module that ``fully_shard`` gave a dynamic ``FSDP<Class>`` class."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(module)
    if not issubclass(cls, FSDPModule):
        return cls
    bases = [b for b in cls.__bases__ if b is not FSDPModule]
    if len(bases) != 1 or FSDPModule not in cls.__bases__:
        raise NotImplementedError(
            f"{cls.__name__} is not the class fully_shard makes (FSDP<Class> with FSDPModule and the module's own "
            f"class as bases); higher cannot find the module's own class to run."
        )
    return bases[0]


def _check_fsdp(model: nn.Module, opt: torch.optim.Optimizer, options: Any) -> Any:
    """The settings of an FSDP2 model and of ``innerloop_ctx``'s options that the mode cannot honour raise
    a clear error here; returns the process group."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "an FSDP (fully_shard) model was passed to innerloop_ctx but torch.distributed's process group is not "
            "initialised; call torch.distributed.init_process_group first."
        )
    problems: list[str] = []
    meshes: list[Any] = []
    for name, p in model.named_parameters():
        if not isinstance(p, DTensor):
            problems.append(f"parameter {name!r} is not sharded by fully_shard (ignored_params?)")
            continue
        mesh = p.device_mesh
        meshes.append(mesh)
        if mesh.ndim != 1:
            problems.append(
                f"parameter {name!r} is on a {mesh.ndim}-D device mesh (HSDP); only a 1-D mesh is supported"
            )
        if tuple(p.placements) != (Shard(0),):
            problems.append(
                f"parameter {name!r} has placements {tuple(p.placements)}; only Shard(0) (fully_shard's default, "
                f"without shard_placement_fn) is supported"
            )
    seen: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            problems.append(f"parameter {name!r} is the same tensor as {seen[id(p)]!r} (tied weights)")
        seen.setdefault(id(p), name)
    if any(m != meshes[0] for m in meshes):
        problems.append("the parameters are on different device meshes; use one mesh for the whole model")
    from torch.distributed.fsdp import CPUOffloadPolicy

    for group in _param_groups(model):
        mp = group.mp_policy
        dtypes = {fsdp_param.sharded_param.dtype for fsdp_param in group.fsdp_params}
        what = {
            "param_dtype": "run the forwards",
            "reduce_dtype": "reduce the gradients",
            "output_dtype": "return the outputs",
        }
        for field, effect in what.items():
            value = getattr(mp, field, None)
            if value is not None and {value} != dtypes:
                problems.append(
                    f"MixedPrecisionPolicy({field}={value}) would {effect} in another precision than the parameters' "
                    f"({', '.join(sorted(str(d) for d in dtypes))}); higher does not reproduce it: cast the model "
                    f"instead, or leave the policy's dtypes None"
                )
        if isinstance(group.offload_policy, CPUOffloadPolicy):
            problems.append(
                "CPUOffloadPolicy (the fast weights live on the parameters' device; offloading them is not implemented)"
            )
        if group._all_reduce_hook is not None:
            problems.append("an all-reduce hook (set_all_reduce_hook)")
        if type(group._all_gather_comm).__name__ != "DefaultAllGather":
            problems.append("a custom all-gather (set_custom_all_gather)")
        if type(group._reduce_scatter_comm).__name__ != "DefaultReduceScatter":
            problems.append("a custom reduce-scatter (set_custom_reduce_scatter)")
    if problems:
        raise NotImplementedError(
            "higher cannot honour these FSDP (fully_shard) settings in an inner loop: "
            + "; ".join(dict.fromkeys(problems))
            + "."
        )
    if options.device is not None:
        raise ValueError(
            "innerloop_ctx(device=...) cannot move the fast weights of an FSDP model: they stay sharded on the "
            "parameters' device. Leave device=None (move the model before fully_shard instead)."
        )
    if options.share_buffers:
        raise NotImplementedError(
            "share_buffers=True is not supported for an FSDP model (its buffers are replicated on every rank, "
            "the fmodel uses copies); leave it False."
        )
    if options.initial_params is not None:
        raise NotImplementedError(
            "initial_params= is not supported for an FSDP model: the initial fast weights are the model's sharded "
            "parameters. Use a plain model (or DDP) for hypernetwork-made initial weights."
        )
    params = {id(p) for p in model.parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            if id(p) in params and opt.state.get(p):
                raise NotImplementedError(
                    "the inner optimizer already has state (it was stepped) for a sharded parameter; higher does "
                    "not copy sharded optimizer state into an FSDP inner loop. Use a fresh optimizer for the inner "
                    "loop (as MAML does)."
                )
    if not params:
        raise ValueError("the FSDP model has no parameters: there is nothing to adapt in an inner loop.")
    return process_group(model)


def process_group(model: nn.Module) -> Any:
    """The process group an FSDP model is sharded over (its parameters' device mesh's)."""
    return cast(Any, next(iter(model.parameters()))).device_mesh.get_group()


# ------------------------------------------------------------------------------- the collectives
class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` along dim 0 (``[N, ...]``: block ``r`` goes to rank ``r``), differentiable at any
    order (a block permutation: its backward is itself), batched along any other dim under ``vmap``.

    ``x``'s last column holds ``tag``, which names the call (a unit's gather: ``unit + 1``; its backward: the
    opposite): every rank checks that it received its own from every rank, so that ranks out of lockstep
    (one ran an extra step, or a backward while another ran a forward) raise an error instead of mixing
    their blocks any further. The output keeps the column (the caller ignores it; its gradient is ignored)."""

    @staticmethod
    def forward(x: Tensor, group: Any, tag: int) -> Tensor:  # type: ignore[override]
        import torch.distributed as dist

        sent = x.contiguous()
        received = torch.empty_like(sent)
        try:
            dist.all_to_all_single(received, sent, group=group)
        except Exception as error:
            peer = _ddp._peer_error(group)
            if peer is None:
                raise
            raise RuntimeError(f"the fast-weight all_to_all failed because {peer}") from error
        _STATS["all_to_all"] += 1
        _STATS["bytes"] += (x.numel() - x[..., 0].numel()) * x.element_size()  # without the tags
        tags = received[..., -1].reshape(received.shape[0], -1)[:, 0].tolist()
        if any(t != tag for t in tags) or bool((received[..., -1] != tag).any()):
            raise RuntimeError(
                f"the ranks of an FSDP inner loop are out of lockstep: this rank ran {_described(tag)} while "
                + ", ".join(f"rank {r} ran {_described(int(t))}" for r, t in enumerate(tags) if t != tag)
                + ". Every rank must run the same inner steps and fmodel calls (and backward passes) in the same "
                "order: the fast weights are gathered by collectives."
            )
        return received

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.group, ctx.tag = inputs[1], inputs[2]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        return _AllToAll.apply(_tagged(grad[..., :-1], -ctx.tag), ctx.group, -ctx.tag), None, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], x: Tensor, group: Any, tag: int) -> tuple[Tensor, int]:
        dim = in_dims[0]
        if dim is None:
            return _AllToAll.apply(x, group, tag), None  # type: ignore[return-value]
        moved = x.movedim(dim, 1)  # keep the rank dimension first (and the tags last)
        return _AllToAll.apply(moved, group, tag), 1


def _tagged(x: Tensor, tag: int) -> Tensor:
    """``x`` (``[N, ..., K]``) with a last column holding ``tag`` (see :class:`_AllToAll`)."""
    return torch.cat([x, x.new_full((*x.shape[:-1], 1), float(tag))], -1)


def _described(tag: int) -> str:
    return f"the gather of FSDP unit #{tag - 1}" if tag > 0 else f"the backward of the gather of FSDP unit #{-tag - 1}"


_STATS = {"all_to_all": 0, "bytes": 0}


def gather_stats() -> dict[str, int]:
    """Counters of the fast-weight collectives in this process (``all_to_all`` calls and bytes sent),
    forward and backward together, since the process started."""
    return dict(_STATS)


class _GradScale(torch.autograd.Function):
    """The identity, whose backward multiplies by ``scale`` (FSDP's averaging of the gradient over ranks)."""

    @staticmethod
    def forward(x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.scale = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None


class _Recipe:
    """How to gather a unit's full weights again: from its local stacks, or, for a task-batched forward (under
    ``vmap``), from the stacks' batched (physical) tensors and their batch dimensions, under a ``vmap`` of its own,
    which lays the weights out as the forward did."""

    __slots__ = ("unit", "stacks", "bdims", "__weakref__")

    def __init__(self, unit: _Unit, stacks: list[Tensor], bdims: tuple[int, ...] | None) -> None:
        self.unit, self.stacks, self.bdims = unit, stacks, bdims

    def weights(self) -> list[Tensor]:
        unit = self.unit
        if self.bdims is None:
            return unit.split(unit.exchange(self.stacks), self.stacks)

        def gather(*stacks: Tensor) -> list[Tensor]:
            return unit.split(unit.exchange(list(stacks)), list(stacks))

        return torch.func.vmap(gather, in_dims=self.bdims)(*self.stacks)


class _Regather:
    """A saved tensor that was a view of a unit's gathered weights: gathered again when backward needs it."""

    __slots__ = ("recipe", "index", "size", "stride", "offset", "nbytes")

    def __init__(self, recipe: _Recipe, index: int, saved: Tensor) -> None:
        self.recipe, self.index = recipe, index
        self.size, self.stride, self.offset = saved.size(), saved.stride(), saved.storage_offset()
        self.nbytes = saved.untyped_storage().nbytes()


# The storages of the gathered weights of resharding units that are alive: data pointer -> (weak reference to
# the storage, weak reference to the recipe, index of the weight in the unit). A tensor that autograd saves and
# that lives in one of them is packed as a :class:`_Regather` instead of being kept: in the unit's forward, and,
# in an inner loop's backward (create_graph), for the weights gathered again, which the graph of the inner
# gradient would otherwise keep. The weak reference to the storage tells a live storage from a new one at the
# same address; the recipe (and the fast weights it holds) lives as long as the forward that made it or the
# packed tensors that use it, never because of this table.
_RESHARDED: dict[int, tuple[Any, Any, int]] = {}


def _register(weights: list[Tensor], recipe: _Recipe) -> None:
    from torch.multiprocessing.reductions import StorageWeakRef

    for key in [key for key, entry in _RESHARDED.items() if entry[0].expired() or entry[1]() is None]:
        del _RESHARDED[key]
    reference = weakref.ref(recipe)
    for index, weight in enumerate(weights):
        if weight.numel() and not _batched(weight):
            storage = weight.untyped_storage()
            _RESHARDED.setdefault(storage.data_ptr(), (StorageWeakRef(storage), reference, index))


def _pack(tensor: Tensor) -> Any:
    if _RESHARDED and not _batched(tensor) and tensor.layout == torch.strided:
        entry = _RESHARDED.get(tensor.untyped_storage().data_ptr())
        if entry is not None and not entry[0].expired():
            recipe = entry[1]()
            if recipe is not None:
                return _Regather(recipe, entry[2], tensor)
    return tensor


def _unpack(packed: Any) -> Tensor:
    if isinstance(packed, _Regather):
        weights = packed.recipe.weights()
        base = weights[packed.index]
        if base.untyped_storage().nbytes() != packed.nbytes:  # the layout is not the forward's: never guess
            raise RuntimeError(
                "higher: a resharded FSDP weight was gathered again with another memory layout than in the forward "
                "pass; please report this (and use reshard_after_forward=False meanwhile)."
            )
        _track(weights)
        if torch.is_grad_enabled():  # a backward with create_graph: what its graph saves of them is resharded too
            _register(weights, packed.recipe)
        return base.as_strided(packed.size, packed.stride, packed.offset)
    return packed


def resharding() -> Any:
    """The saved-tensor hooks that reshard gathered weights (entered around an FSDP inner loop)."""
    return torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)


class _Unit:
    """One FSDP unit's hooks: gather its parameters' full weights for its forward, put the stacks back after.

    ``entries``: the parameters it manages, as (path below the unit, key, full dim 0). With ``reshard``
    (FSDP's ``reshard_after_forward``), the tensors that autograd saves from the gathered weights during the
    unit's forward are not kept: they are gathered again, differentiably, when backward unpacks them."""

    def __init__(self, index: int, entries: list[tuple[str, str, int]], group: Any, world: int, reshard: bool) -> None:
        self.index = index  # among the model's units, in modules() order (the same on every rank)
        self.entries = entries
        self.group = group
        self.world = world
        self.reshard = reshard
        self.saved: list[tuple[list[tuple[dict[str, Any], str, Tensor]], Any]] = []

    def exchange(self, stacks: list[Tensor]) -> Tensor:
        """One ``all_to_all`` for the whole unit (the padded shards side by side, as FSDP gathers a unit at once):
        ``[N, ...]`` whose block ``s`` holds shard ``s`` of every parameter of this rank's task(s)."""
        world = self.world
        pieces = []
        for stack, (_, _, rows) in zip(stacks, self.entries):
            chunk = -(-rows // world)  # fully_shard's (torch.chunk's) shard size
            pad = chunk - stack.shape[1]
            if pad:
                stack = torch.cat([stack, stack.new_zeros((world, pad, *stack.shape[2:]))], 1)
            pieces.append(stack.reshape(world, -1))
        tag = self.index + 1
        pieces.append(pieces[0].new_full((world, 1), float(tag)))  # see _AllToAll
        return _AllToAll.apply(torch.cat(pieces, 1), self.group, tag)

    def split(self, received: Tensor, stacks: list[Tensor]) -> list[Tensor]:
        """The full weights (views of ``received``, or copies where its blocks are not contiguous), in the order
        of ``entries``."""
        world = self.world
        full, offset = [], 0
        for stack, (_, _, rows) in zip(stacks, self.entries):
            chunk, rest = -(-rows // world), stack.shape[2:]
            size = chunk * rest.numel()
            block = received[:, offset : offset + size]
            offset += size
            full.append(block.reshape(world * chunk, *rest)[:rows])
        return full

    def pre_forward(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        slots = [
            (module.get_submodule(path) if path else module).__dict__["_parameters"] for path, _, _ in self.entries
        ]
        stacks = [slot[key] for slot, (_, key, _) in zip(slots, self.entries)]
        full = self.split(self.exchange(stacks), stacks)
        hooks = None
        if self.reshard and torch.is_grad_enabled():
            recipe = _register_forward(full, self, stacks)
            if recipe is not None:
                hooks = (resharding(), recipe)  # the recipe lives as long as the forward (the table's is weak)
                hooks[0].__enter__()
        _track(full)
        for slot, (_, key, _), weight in zip(slots, self.entries, full):
            slot[key] = weight
        self.saved.append(
            ([(slot, key, stack) for slot, (_, key, _), stack in zip(slots, self.entries, stacks)], hooks)
        )

    def post_forward(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if self.saved:
            swapped, hooks = self.saved.pop()
            for slot, key, stack in swapped:
                slot[key] = stack
            if hooks is not None:
                hooks[0].__exit__(None, None, None)


def _register_forward(full: list[Tensor], unit: _Unit, stacks: list[Tensor]) -> _Recipe | None:
    """Register the gathered weights of a resharding unit's forward (task-batched: their physical tensors, when
    the forward runs under one level of ``vmap``); the recipe (to keep for the forward), or ``None``."""
    if not _batched(stacks[0]):
        recipe = _Recipe(unit, stacks, None)
        _register(full, recipe)
        return recipe
    from torch._C import _functorch  # type: ignore[attr-defined]

    if not all(_batched(t) for t in (*stacks, *full)):
        return None
    physical = [_functorch.get_unwrapped(t) for t in stacks]
    weights = [_functorch.get_unwrapped(t) for t in full]
    if any(_batched(t) for t in (*physical, *weights)):  # nested vmap: not handled, the weights are kept
        return None
    bdims = tuple(int(_functorch.maybe_get_bdim(t)) for t in stacks)
    recipe = _Recipe(unit, physical, bdims)
    _register(weights, recipe)
    return recipe


def _batched(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``vmap`` level's view of a batch (the task-batched fmodel's forward)."""
    from torch._C import _functorch  # type: ignore[attr-defined]

    return bool(_functorch.is_batchedtensor(tensor))


#: The storages of the gathered weights, weakly (for :func:`gathered_bytes`).
_GATHERED: list[tuple[Any, int]] = []


def _track(full: list[Tensor]) -> None:
    from torch.multiprocessing.reductions import StorageWeakRef

    _GATHERED[:] = [(ref, size) for ref, size in _GATHERED if not ref.expired()]
    seen = set()
    for weight in full:
        if _batched(weight):
            from torch._C import _functorch  # type: ignore[attr-defined]

            weight = _functorch.get_unwrapped(weight)  # the batch of them
            if _batched(weight):
                continue
        storage = weight.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            _GATHERED.append((StorageWeakRef(storage), storage.nbytes()))


def gathered_bytes() -> int:
    """Bytes of gathered (full) weights still alive in this process: those that autograd keeps for backward
    (units with ``reshard_after_forward=False``, and task-batched forwards); a resharded unit's are freed as its
    forward ends (backward gathers them again)."""
    return sum(size for ref, size in _GATHERED if not ref.expired())


_FSDP_ATTRIBUTES = ("_is_fsdp_managed_module", "_fsdp_use_orig_params")


def _is_fsdp_hook(fn: Any) -> bool:
    owner = getattr(fn, "__self__", None)
    module = type(owner).__module__ if owner is not None else getattr(fn, "__module__", "") or ""
    return module.startswith("torch.distributed.fsdp") or module.startswith("torch.distributed._composable")


def _skeleton(model: nn.Module, stacks: dict[str, Tensor], group: Any, world: int) -> nn.Module:
    """A plain copy of ``model``'s tree (the user's classes, FSDP's hooks and state left out) whose parameter
    slots hold ``stacks`` (by name), with the gathering hooks on every FSDP unit."""
    from ._fmodel.tree import _HOOK_DICTS

    copies: dict[int, nn.Module] = {}
    for m in model.modules():
        cls: Any = _plain_class(m)
        c = cls.__new__(cls)
        d = {
            k: v
            for k, v in m.__dict__.items()
            if not k.startswith("__composable_api_state_key") and k not in _FSDP_ATTRIBUTES
        }
        for key in _HOOK_DICTS:
            if key in d:
                d[key] = type(d[key])((i, fn) for i, fn in d[key].items() if not _is_fsdp_hook(fn))
        d["_parameters"] = dict(d["_parameters"])
        d["_modules"] = dict(d["_modules"])
        object.__setattr__(c, "__dict__", d)
        copies[id(m)] = c
    for m in model.modules():
        d = copies[id(m)].__dict__
        d["_modules"] = {k: None if v is None else copies[id(v)] for k, v in d["_modules"].items()}
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        for key in list(copies[id(m)].__dict__["_parameters"]):
            if copies[id(m)].__dict__["_parameters"][key] is not None:
                copies[id(m)].__dict__["_parameters"][key] = stacks[prefix + key]
    # The units: each FSDP module gathers the parameters it manages (those of its subtree not under another unit).
    units: list[_Unit] = []
    for m in model.modules():
        if not is_fsdp(m):
            continue
        entries = []
        for sub_name, sub in m.named_modules():
            if sub is not m and _under_unit(m, sub_name):
                continue
            for key, p in sub.named_parameters(recurse=False):
                entries.append((sub_name, key, int(p.shape[0])))
        if entries:
            unit = _Unit(len(units), entries, group, world, _reshards(m, m is model))
            units.append(unit)
            c = copies[id(m)]
            nn.Module.register_forward_pre_hook(c, unit.pre_forward, with_kwargs=True)
            nn.Module.register_forward_hook(c, unit.post_forward, with_kwargs=True, always_call=True)
    return copies[id(model)]


def _reshards(unit: nn.Module, root: bool) -> bool:
    """FSDP's ``reshard_after_forward`` of ``unit`` (the root's default, decided by FSDP at its first forward, is
    ``False``)."""
    state = cast(Any, unit)._get_fsdp_state()
    if root and getattr(state, "_auto_reshard_after_forward", False):
        return False
    return any(g.post_forward_mesh_info is not None for g in state._fsdp_param_groups)


_RESHARDING_CLASSES: dict[type, type] = {}


def _resharding_class(cls: type) -> type:
    """``cls`` whose inner gradients (``create_graph``) reshard the weights that backward gathers again, so that
    the graph of the inner gradient does not keep them either."""
    made = _RESHARDING_CLASSES.get(cls)
    if made is None:

        def _gradients(self: Any, loss: Tensor, params: list[Tensor]) -> list[Tensor | None]:
            with resharding():
                return super(made, self)._gradients(loss, params)  # type: ignore[misc]

        made = type(cls.__name__, (cls,), {"_gradients": _gradients, "__module__": cls.__module__})
        made.__qualname__ = cls.__qualname__
        _RESHARDING_CLASSES[cls] = made
    return made


def _reshards_any(model: nn.Module) -> bool:
    return any(_reshards(m, m is model) for m in model.modules() if is_fsdp(m))


def _under_unit(unit: nn.Module, path: str) -> bool:
    """Whether the module at ``path`` below ``unit`` is, or is inside, another FSDP unit."""
    module = unit
    for part in path.split("."):
        module = module.get_submodule(part)
        if is_fsdp(module):
            return True
    return False


# ------------------------------------------------------------------------------------- the mode
def _divide_factor(model: nn.Module, world: int) -> float:
    factors = {g.gradient_divide_factor for g in _param_groups(model)} - {None}
    if len(factors) > 1:
        raise NotImplementedError(
            f"the FSDP units of this model have different gradient divide factors ({sorted(factors)}); use one."
        )
    return float(factors.pop()) if factors else float(world)


def _check_lockstep(group: Any, tasks: int | None, device: torch.device) -> None:
    """Check that every rank opens the same kind of inner loop (a mismatch would deadlock the collectives)."""
    import torch.distributed as dist

    mine = torch.tensor([-1 if tasks is None else tasks], dtype=torch.int64, device=device)  # NCCL: on the GPU
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    values = [int(t) for t in everyone]
    if len(set(values)) != 1:
        shown = ["per task" if v < 0 else f"tasks={v}" for v in values]
        raise ValueError(
            f"the ranks opened different inner loops of the FSDP model ({', '.join(shown)}, by rank): every rank must "
            f"pass the same tasks= (the fast weights are gathered by collectives, in lockstep)."
        )


def _fully_sharded(model: nn.Module, opt: torch.optim.Optimizer, options: Any) -> Iterator[tuple[Any, Any]]:
    """An FSDP2 model: fast weights stay sharded, each unit's full weights are gathered for its forward."""
    import torch.distributed as dist

    from . import batched
    from .optim import get_diff_optim
    from .patch import _patched

    group = _check_fsdp(model, opt, options)
    try:
        world = dist.get_world_size(group)
        _check_lockstep(group, options.tasks, next(model.parameters()).device)
        scale = 1.0 / _divide_factor(model, world)
        names = [n for n, _ in model.named_parameters()]
        params = list(model.parameters())
        stacks = {}
        for name, p in zip(names, params):
            local = cast(Any, p).to_local()
            if p.requires_grad and not options.copy_initial_weights:
                local = _GradScale.apply(local, scale)
            stacks[name] = local.unsqueeze(0).expand(world, *local.shape)
        skeleton = _skeleton(model, stacks, group, world)
        track = options.track_higher_grads
        if options.tasks is None:
            fmodel: Any = _patched(skeleton, None, options.copy_initial_weights, track, False, None)
            diffopt = get_diff_optim(
                opt,
                params,
                fmodel=fmodel,
                override=options.override,
                track_higher_grads=track,
                first_order=options.first_order,
            )
        else:
            fmodel = batched._patched(skeleton, options.tasks, None, options.copy_initial_weights, track, "different")
            diffopt = batched._optimizer(
                opt, params, fmodel, options.tasks, None, options.override, track, first_order=options.first_order
            )
        diffopt._reference_shapes = [t.shape for t in fmodel._hg_core.latest]
        if _reshards_any(model):
            diffopt.__class__ = _resharding_class(type(diffopt))
        yield fmodel, diffopt
    except Exception as error:
        _ddp._report_error(group, error)  # the other ranks fail with it instead of hanging
        raise
