"""Meta-learning across processes: ``DistributedDataParallel`` and FSDP2 (``fully_shard``) models in inner loops.

FSDP2: a model wrapped by ``torch.distributed.fsdp.fully_shard`` (per layer and at the root) works
in ``innerloop_ctx`` with the same code; the fast weights stay sharded, each FSDP unit's full
weights are gathered for its forward (one differentiable ``all_to_all`` per unit) and freed after
it, and the meta-gradient arrives in the sharded ``.grad``, averaged over ranks as FSDP does. The
design, what is honoured and what is refused: ``docs/scaling.md`` and :mod:`higher._fsdp`;
:func:`gather_stats` and :func:`gathered_bytes` count the collectives and the gathered weights alive.

The rest of this docstring is about DDP.

``higher.innerloop_ctx(DistributedDataParallel(model), opt, copy_initial_weights=False)`` works
per task and with ``tasks=T``. Each rank (process) runs the inner loops of its own share of the
meta-batch with the normal API; after ``meta_loss.backward()`` every rank holds the same
meta-gradient in ``model``'s ``.grad``: the average over ranks, as DDP computes it, which equals
what one process computes over the whole meta-batch when each rank's meta-loss is weighted as
:func:`task_weight` says.

How: the fmodel is made of ``ddp.module`` (the wrapped model), so DDP's own ``forward`` never
runs. DDP's forward would do its per-call bookkeeping at every inner step (and broadcast the
buffers at every call, one collective per inner step, which deadlocks as soon as ranks run
different numbers of steps), and its reducer cannot see the fast weights. Instead this module
does what DDP's reducer does, with DDP's semantics, once per backward:

* an fmodel call with gradients enabled, outside ``ddp.no_sync()``, *arms* the synchronisation
  (DDP decides at forward time too, so ``no_sync()`` is honoured the same way: forwards and
  backwards inside it accumulate locally, the first armed backward after it all-reduces the
  accumulated ``.grad``);
* while armed, a post-accumulate-grad hook on each parameter DDP manages marks it ready;
  parameters are grouped into buckets (DDP's sizes: 1 MiB first, then ``bucket_cap_mb``, in
  reverse order of ``parameters()``, which is roughly the order in which backward finishes
  them); a complete bucket is flattened, divided by the world size and all-reduced
  asynchronously, in bucket order on every rank, overlapping the rest of the backward pass;
* at the end of that backward (an autograd engine callback) the remaining buckets are sent, all
  are waited for, the averages are copied into ``.grad``, the buffers are broadcast from rank 0
  (``forward_sync_buffers``/``broadcast_buffers``, DDP's rule: every rank continues with rank 0's
  buffers) and the hooks are removed, so the model carries nothing between meta-iterations.

The number of collectives per synchronised backward is the number of buckets (one for a model
under 1 MiB), whatever the number of tasks and inner steps.

Options of DDP that change the arithmetic and that this module does not reproduce raise a
clear error when the model enters ``innerloop_ctx`` (communication hooks, mixed precision,
delayed all-reduce, the ``Join`` context, the compiled "python reducer", sparse gradients). Options honoured:
``bucket_cap_mb``, ``find_unused_parameters`` and ``static_graph`` (unused parameters contribute
zero; a parameter unused on every rank keeps its ``.grad``), ``forward_sync_buffers``
(``broadcast_buffers``), parameters and buffers DDP ignores, ``no_sync()``, the process group.
``gradient_as_bucket_view`` is accepted: the values are the same, but ``.grad`` is an ordinary
tensor here, not a view of a bucket.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ._ddp import is_ddp, sync_stats
from ._fsdp import gather_stats, gathered_bytes, is_fsdp, process_group

__all__ = [
    "average_grads",
    "gather_stats",
    "gathered_bytes",
    "is_ddp",
    "is_fsdp",
    "launched",
    "maml_step",
    "mean_over_ranks",
    "share",
    "split_tasks",
    "task_weight",
    "sync_stats",
    "rank_and_world_size",
]


def rank_and_world_size(group: Any = None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group`` (default group), or ``(0, 1)`` without torch.distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def split_tasks(num_tasks: int, rank: int | None = None, world_size: int | None = None) -> range:
    """The indices of the tasks (out of ``num_tasks``) that ``rank`` runs: a contiguous block.

    The blocks of all ranks, in rank order, are ``range(num_tasks)``; the first
    ``num_tasks % world_size`` ranks get one task more. ``rank`` and ``world_size`` default to
    the default process group's (or ``0`` and ``1`` without one), so the same program runs with
    and without ``torchrun``.
    """
    if rank is None or world_size is None:
        own_rank, own_world = rank_and_world_size()
        rank = own_rank if rank is None else rank
        world_size = own_world if world_size is None else world_size
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 0:
        raise ValueError(f"num_tasks must be a non-negative int, got {num_tasks!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    base, extra = divmod(num_tasks, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def task_weight(num_tasks: int, world_size: int | None = None) -> float:
    """The weight of one task's meta-loss on a rank so that DDP's average is the meta-batch mean.

    DDP averages the ranks' gradients, so a rank whose meta-loss is
    ``task_weight(num_tasks) * sum(own task losses)`` contributes ``world_size / num_tasks`` of
    each of its tasks, and the average over ranks is ``sum(all task losses) / num_tasks``: the
    mean over the whole meta-batch, as one process computes it, even when the tasks do not
    divide evenly among the ranks.
    """
    if world_size is None:
        world_size = rank_and_world_size()[1]
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}")
    return world_size / num_tasks


def maml_step(
    model: nn.Module,
    inner_opt: torch.optim.Optimizer,
    tasks: Any,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inner_steps: int = 1,
    first_order: bool = False,
) -> float:
    """:func:`higher.algorithms.maml_step` over a meta-batch that every rank holds, split across ranks.

    ``tasks`` is the *whole* meta-batch, the same on every rank (sample it with the same seed
    everywhere). This rank adapts its share (:func:`split_tasks`), one task at a time, inside
    ``model.no_sync()`` for all but its last task, so that the gradients are all-reduced once;
    each query loss is weighted by :func:`task_weight`. After the call every rank's ``.grad``
    holds the meta-gradient of the mean query loss over the whole meta-batch, as one process
    computes it with ``higher.algorithms.maml_step`` (up to the order of the sums). Returns that
    mean query loss (one more all-reduce, of a single number). ``model`` is a
    ``DistributedDataParallel`` model, or an FSDP2 (``fully_shard``) one, whose sharded ``.grad``
    receives its shard of that meta-gradient (the number of tasks must then be a multiple of the
    number of ranks); a plain model (one process) gives ``maml_step`` itself.
    """
    from . import algorithms

    tasks = list(tasks)
    fsdp = is_fsdp(model)
    if not (is_ddp(model) or fsdp):
        return algorithms.maml_step(model, inner_opt, tasks, loss_fn, inner_steps, first_order)
    import torch.distributed as dist

    net: Any = model
    group = process_group(model) if fsdp else net.process_group
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if len(tasks) < world:
        raise ValueError(
            f"a meta-batch of {len(tasks)} tasks cannot be split across {world} ranks: every rank needs at "
            f"least one task (its backward takes part in the all-reduce)."
        )
    if fsdp and len(tasks) % world:
        raise ValueError(
            f"a meta-batch of {len(tasks)} tasks cannot be split evenly across {world} ranks, which an FSDP model "
            f"needs (every rank runs the same inner loops: the sharded fast weights are gathered in lockstep); "
            f"use a multiple of {world} tasks."
        )
    mine = split_tasks(len(tasks), rank, world)
    weight = task_weight(len(tasks), world)
    total = 0.0
    for k in mine:
        support_x, support_y, query_x, query_y = algorithms._unpack(tasks[k])
        if fsdp:  # FSDP's gradient accumulation control (the same values either way, see docs/scaling.md)
            net.set_requires_gradient_sync(k == mine[-1])
            sync: Any = contextlib.nullcontext()
        else:
            sync = contextlib.nullcontext() if k == mine[-1] else net.no_sync()
        with sync:
            fmodel = algorithms.adapt(
                model, inner_opt, support_x, support_y, loss_fn, inner_steps, first_order=first_order
            )
            query_loss = loss_fn(fmodel(query_x), query_y)
            (query_loss * weight).backward()
        total += float(query_loss.detach())
    return mean_over_ranks(total, len(tasks), group)


def share(*tensors: Tensor, num_tasks: int | None = None) -> tuple[Tensor, ...]:
    """This rank's tasks of tensors stacked along a leading task dimension (:func:`split_tasks`)."""
    total = tensors[0].shape[0] if num_tasks is None else num_tasks
    mine = split_tasks(total)
    return tuple(t[mine.start : mine.stop] for t in tensors)


def average_grads(tensors: Any, group: Any = None) -> None:
    """Replace the ``.grad`` of each of ``tensors`` by its average over the ranks (one all-reduce of them all).

    For tensors that every rank holds but that neither DDP nor FSDP manages, e.g. the hyperparameter
    tensors given in ``override`` (``override={"lr": [lr]}``): after ``meta_loss.backward()`` each rank's
    ``lr.grad`` holds only its part of the hypergradient (under DDP, its own tasks'; under FSDP, the part
    that flows through the shard of the fast weights it updates), and the average over ranks, as DDP and
    FSDP average the parameters' gradients, is what one process computes over the whole meta-batch when the
    meta-losses are weighted by :func:`task_weight`. A tensor without ``.grad`` counts as zero on that rank.
    A no-op without a process group.
    """
    tensors = [tensors] if isinstance(tensors, Tensor) else list(tensors)
    world = rank_and_world_size(group)[1]
    if world <= 1 or not tensors:
        return
    flat = torch.cat([(torch.zeros_like(t) if t.grad is None else t.grad).reshape(-1) for t in tensors])
    flat = _summed_over_ranks(flat, group).div_(world)
    offset = 0
    for t in tensors:
        t.grad = flat[offset : offset + t.numel()].view_as(t).clone()
        offset += t.numel()


def mean_over_ranks(local_sum: float | Tensor, num_tasks: int, group: Any = None) -> float:
    """The mean over the whole meta-batch of a per-task quantity whose sum over this rank's tasks is given.

    One all-reduce of one number (none without a process group), e.g. for the running meta-loss
    that a progress bar shows.
    """
    value = float(local_sum)
    if rank_and_world_size(group)[1] > 1:
        value = float(_summed_over_ranks(torch.tensor([value], dtype=torch.float64), group))
    return value / num_tasks


def _summed_over_ranks(tensor: Tensor, group: Any = None) -> Tensor:
    """``tensor`` all-reduced (summed) over the ranks, on its own device (NCCL reduces a CPU tensor on the GPU)."""
    import torch.distributed as dist

    device = tensor.device
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, group=group)
    return tensor.to(device)


@contextlib.contextmanager
def launched(device: torch.device | str | None = None, timeout_s: float = 600.0) -> Iterator[torch.device]:
    """Join the job ``torchrun`` started, for the length of the block; a no-op in a plain process.

    With ``WORLD_SIZE`` > 1 in the environment (``torchrun --nproc-per-node N``): initialises the
    default process group (NCCL for a CUDA ``device``, else gloo; ``timeout_s`` on every
    collective, so a failing rank cannot hang the others), moves a CUDA ``device`` to this rank's
    GPU (``LOCAL_RANK``), silences stdout on every rank but 0 (errors still show), and destroys
    the group at the end. Yields the device this rank should use.
    """
    import datetime
    import os

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        yield torch.device("cpu" if device is None else device)
        return
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        if dist.get_rank() == 0:
            yield device
        else:
            with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
                yield device
    finally:
        dist.destroy_process_group()
