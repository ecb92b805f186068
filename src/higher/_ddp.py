"""The data-parallel mode of ``innerloop_ctx``: DDP's gradient averaging, for the gradients fmodels send.

``innerloop_ctx(DistributedDataParallel(model), ...)`` runs its inner loops on ``ddp.module`` and
arms a :class:`_GradSync` at every fmodel call that DDP would synchronise; the sync all-reduces
the meta-gradients once per backward, bucket by bucket, as DDP's reducer does. The design, the
options honoured and those refused are described in :mod:`higher.distributed`, which is the
public face of this module (with the helpers for splitting a meta-batch across ranks).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["is_ddp", "sync_stats"]


_FIRST_BUCKET_BYTES = 1024 * 1024  # DDP's first bucket (torch.distributed._DEFAULT_FIRST_BUCKET_BYTES)


def is_ddp(model: Any) -> bool:
    """Whether ``model`` is a ``torch.nn.parallel.DistributedDataParallel`` wrapper."""
    ddp_class = getattr(torch.nn.parallel, "DistributedDataParallel", None)
    return ddp_class is not None and isinstance(model, ddp_class)


# ---------------------------------------------------------------------------------------- checks
def _unsupported_options(ddp: Any, constructor: bool = True) -> list[str]:
    """DDP settings whose effect on the gradients this module does not reproduce.

    ``constructor=False`` skips the settings fixed when the DDP object was built (checked once,
    when its synchronisation is made); hooks and the ``Join`` context can come later.
    """
    problems = []
    if getattr(ddp, "_comm_hooks", None):
        problems.append(
            "a communication hook registered with register_comm_hook() (the gradients would be "
            "all-reduced without it); compress or transform the gradients after backward instead"
        )
    logger = getattr(ddp, "logger", None)
    if not getattr(ddp, "_comm_hooks", None) and logger is not None:
        try:
            hook_name = ddp._get_ddp_logging_data().get("comm_hook", "")
        except Exception:  # logging data is best effort in DDP itself
            hook_name = ""
        if hook_name:
            problems.append(f"the built-in communication hook {hook_name!r} (_register_builtin_comm_hook)")
    join_config = getattr(ddp, "_join_config", None)
    if join_config is not None and getattr(join_config, "enable", False):
        problems.append("the Join context manager for uneven inputs (ranks must run one synchronised backward each)")
    if not constructor:
        return problems
    if getattr(ddp, "mixed_precision", None) is not None:
        problems.append("mixed_precision= (DDP's reduced-precision parameter copies are not used by the fmodel)")
    if getattr(ddp, "_delay_all_reduce_params", None):
        problems.append("delay_all_reduce_named_params=/param_to_hook_all_reduce=")
    if getattr(ddp, "_use_python_reducer", False):
        problems.append("the compiled 'python_reducer' DDP mode (torch._dynamo optimize_ddp)")
    if getattr(ddp, "is_multi_device_module", False):
        problems.append("a module spread over several devices")
    module = getattr(ddp, "module", None)
    if isinstance(module, nn.Module) and any(
        isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse for m in module.modules()
    ):
        problems.append("sparse gradients (an Embedding with sparse=True)")
    return problems


def _check_ddp(ddp: Any, constructor: bool = True) -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "a DistributedDataParallel model was passed to innerloop_ctx but torch.distributed's "
            "process group is not initialised; call torch.distributed.init_process_group first."
        )
    problems = _unsupported_options(ddp, constructor)
    if problems:
        raise NotImplementedError(
            "higher cannot honour these DistributedDataParallel settings in an inner loop: "
            + "; ".join(problems)
            + ". Remove them, or pass ddp.module and all-reduce the meta-gradient yourself."
        )


# --------------------------------------------------------------------------------- the gradient sync
class _Bucket:
    __slots__ = ("params", "numel", "pending", "work", "flat", "launched")

    def __init__(self, params: list[Tensor]) -> None:
        self.params = params
        self.numel = sum(p.numel() for p in params)
        self.pending = len(params)
        self.work: Any = None
        self.flat: Tensor | None = None
        self.launched = False


class _GradSync:
    """DDP's gradient averaging for the gradients that fmodels send to ``ddp.module``'s parameters."""

    def __init__(self, ddp: Any) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.ddp_ref = weakref.ref(ddp)
        self.group = ddp.process_group
        self.world_size = dist.get_world_size(self.group)
        managed = getattr(ddp, "_module_parameters", None)
        if managed is None:
            ignored = getattr(ddp, "parameters_to_ignore", set())
            managed = [p for n, p in ddp.module.named_parameters() if n not in ignored]
        seen: set[int] = set()
        self.params: list[Tensor] = []
        for p in managed:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                self.params.append(p)
        ignored = getattr(ddp, "parameters_to_ignore", set())
        self.buffers = [b for n, b in ddp.module.named_buffers() if n not in ignored]
        self.allow_unused = bool(ddp.find_unused_parameters or getattr(ddp, "static_graph", False))
        cap = int(getattr(ddp, "bucket_bytes_cap", 25 * 1024 * 1024))
        self.bucket_of: dict[int, int] = {}
        self.buckets_params = self._assign_buckets(cap)
        self.handles: list[Any] = []
        self.armed = False
        self.state: list[_Bucket] | None = None
        self.next_bucket = 0
        self.ready: set[int] = set()
        # Counters, for tests and benchmarks (see sync_stats).
        self.stats = {"backwards": 0, "all_reduces": 0, "bytes": 0, "broadcasts": 0, "broadcast_bytes": 0}

    def _assign_buckets(self, cap: int) -> list[list[Tensor]]:
        """Reverse parameter order, split by dtype/device and by size: 1 MiB first, then ``cap``."""
        buckets: list[list[Tensor]] = []
        open_buckets: dict[tuple[torch.dtype, torch.device], tuple[list[Tensor], int]] = {}
        limit_first = min(_FIRST_BUCKET_BYTES, cap)
        first_done: set[tuple[torch.dtype, torch.device]] = set()
        for p in reversed(self.params):
            key = (p.dtype, p.device)
            members, size = open_buckets.get(key, ([], 0))
            members.append(p)
            size += p.numel() * p.element_size()
            limit = cap if key in first_done else limit_first
            if size >= limit:
                buckets.append(members)
                first_done.add(key)
                open_buckets.pop(key, None)
            else:
                open_buckets[key] = (members, size)
        buckets.extend(members for members, _ in open_buckets.values())
        for index, members in enumerate(buckets):
            for p in members:
                self.bucket_of[id(p)] = index
        return buckets

    # -- arming (an fmodel call) ---------------------------------------------------------------
    def arm(self) -> None:
        """Make the next backward that reaches the parameters all-reduce their gradients."""
        if self.armed:
            return
        self.handles = [p.register_post_accumulate_grad_hook(self._on_ready) for p in self.params]
        self.armed = True

    def _disarm(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.armed = False
        self.state = None
        self.ready = set()
        self.next_bucket = 0

    # -- during backward ------------------------------------------------------------------------
    def _on_ready(self, param: Tensor) -> None:
        if self.state is None:
            self.state = [_Bucket(members) for members in self.buckets_params]
            self.ready = set()
            self.next_bucket = 0
            torch.autograd.Variable._execution_engine.queue_callback(self._finalize)
        key = id(param)
        if key in self.ready:  # reentrant backward: the hook fired twice, DDP raises too
            raise RuntimeError(
                "a parameter's gradient was accumulated twice in one synchronised backward (reentrant "
                "backward or checkpointing); DistributedDataParallel does not support this either."
            )
        self.ready.add(key)
        bucket = self.state[self.bucket_of[key]]
        bucket.pending -= 1
        if bucket.pending == 0:
            self._launch_ready()

    def _launch_ready(self) -> None:
        """Send the complete buckets, in bucket order (the same collectives in the same order on every rank)."""
        state = self.state
        assert state is not None
        while self.next_bucket < len(state) and state[self.next_bucket].pending == 0:
            self._launch(state[self.next_bucket])
            self.next_bucket += 1

    def _launch(self, bucket: _Bucket) -> None:
        pieces = []
        for p in bucket.params:
            grad = p.grad
            pieces.append(torch.zeros(p.numel(), dtype=p.dtype, device=p.device) if grad is None else grad.reshape(-1))
        if self.allow_unused:  # one flag per parameter: did this rank give it a gradient?
            first = bucket.params[0]
            flags = [0.0 if p.grad is None else 1.0 for p in bucket.params]
            pieces.append(torch.tensor(flags, dtype=first.dtype, device=first.device))
        with torch.no_grad():
            flat = torch.cat(pieces) if len(pieces) > 1 else pieces[0].clone()
            flat.div_(self.world_size)
        bucket.flat = flat
        bucket.work = self._dist.all_reduce(flat, group=self.group, async_op=True)
        bucket.launched = True
        self.stats["all_reduces"] += 1
        self.stats["bytes"] += flat.numel() * flat.element_size()

    def _finalize(self) -> None:
        state = self.state
        assert state is not None
        missing = [p for p in self.params if id(p) not in self.ready]
        try:
            for bucket in state:  # what backward did not reach contributes zero (and is reported below)
                bucket.pending = 0
            self._launch_ready()
            for bucket in state:
                try:
                    bucket.work.wait()
                except Exception as error:
                    peer = _peer_error(self.group)
                    if peer is None:
                        raise
                    raise RuntimeError(f"meta-gradient all-reduce failed because {peer}") from error
            with torch.no_grad():
                for bucket in state:
                    self._unflatten(bucket)
                if self.buffers and self._sync_buffers():
                    self._broadcast_buffers()
            self.stats["backwards"] += 1
        finally:
            self._disarm()
        if missing and not self.allow_unused:
            names = _names_of(self.ddp_ref(), missing)
            raise RuntimeError(
                f"DistributedDataParallel: these parameters received no gradient in this backward: {names}. "
                f"As DDP does, this needs find_unused_parameters=True (then they count as zero on this rank) "
                f"or static_graph=True; or exclude them from the model."
            )

    def _unflatten(self, bucket: _Bucket) -> None:
        flat = bucket.flat
        assert flat is not None
        offset = 0
        n = len(bucket.params)
        flags = flat[flat.numel() - n :].tolist() if self.allow_unused else None
        for i, p in enumerate(bucket.params):
            count = p.numel()
            value = flat[offset : offset + count].view_as(p)
            offset += count
            if flags is not None and flags[i] == 0:
                continue  # unused on every rank: .grad untouched, as DDP leaves it
            if p.grad is None:
                p.grad = value.clone()
            else:
                p.grad.copy_(value)

    def _sync_buffers(self) -> bool:
        ddp = self.ddp_ref()
        return ddp is not None and bool(getattr(ddp, "forward_sync_buffers", getattr(ddp, "broadcast_buffers", True)))

    def _broadcast_buffers(self) -> None:
        buffers = [b.detach() for b in self.buffers]
        ddp = self.ddp_ref()
        size = getattr(ddp, "broadcast_bucket_size", 250 * 1024 * 1024)
        self._dist._broadcast_coalesced(self.group, buffers, size, 0)
        self.stats["broadcasts"] += 1
        self.stats["broadcast_bytes"] += sum(b.numel() * b.element_size() for b in buffers)


def _names_of(ddp: Any, params: list[Tensor]) -> list[str]:
    if ddp is None:
        return [f"#{i}" for i in range(len(params))]
    wanted = {id(p) for p in params}
    return [name for name, p in ddp.module.named_parameters() if id(p) in wanted]


_SYNCS: weakref.WeakKeyDictionary[Any, _GradSync] = weakref.WeakKeyDictionary()


def _sync_for(ddp: Any) -> _GradSync:
    sync = _SYNCS.get(ddp)
    if sync is None or sync.group is not ddp.process_group:
        _check_ddp(ddp)
        sync = _SYNCS[ddp] = _GradSync(ddp)
    else:
        _check_ddp(ddp, constructor=False)
    return sync


def sync_stats(ddp: nn.Module) -> dict[str, int]:
    """Counters of the gradient synchronisation of ``ddp`` in inner loops, since it was first used.

    ``backwards``: synchronised backward passes; ``all_reduces`` and ``bytes``: collectives and
    the bytes each rank sent into them; ``broadcasts``/``broadcast_bytes``: buffer broadcasts.
    """
    sync = _SYNCS.get(ddp)
    if sync is None:
        return {"backwards": 0, "all_reduces": 0, "bytes": 0, "broadcasts": 0, "broadcast_bytes": 0}
    return dict(sync.stats)


def _attach(fmodel: nn.Module, ddp: Any, sync: _GradSync) -> None:
    """Arm ``sync`` at every call of ``fmodel`` made with gradients on, outside ``ddp.no_sync()``."""
    ddp_ref = weakref.ref(ddp)

    def arm(module: nn.Module, args: Any) -> None:
        live = ddp_ref()
        if live is not None and torch.is_grad_enabled() and live.require_backward_grad_sync:
            sync.arm()

    # nn.Module's own registration: a hook of the fmodel itself, run by its __call__.
    nn.Module.register_forward_pre_hook(fmodel, arm)


# ------------------------------------------------------------------------------------- failures
# An exception in one rank's inner loop must end every rank, with that error, never a hang. The
# failing rank writes its error to the process group's store (hosted by rank 0) on its way out;
# a rank whose all-reduce then fails (the peer's connection closes, or the group's timeout
# expires) raises with the peer's error instead of an anonymous transport error.
_ERROR_KEY = "higher.distributed.error.{}"


def _store() -> Any:
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()
    except Exception:
        return None


def _report_error(group: Any, error: BaseException) -> None:
    store = _store()
    if store is None:
        return
    try:
        import torch.distributed as dist

        rank = dist.get_rank()
        store.set(_ERROR_KEY.format(rank), f"rank {rank} raised {type(error).__name__}: {error}")
    except Exception:  # the error being raised matters more than its report
        pass


def _peer_error(group: Any) -> str | None:
    store = _store()
    if store is None:
        return None
    try:
        import torch.distributed as dist

        for rank in range(dist.get_world_size()):
            key = _ERROR_KEY.format(rank)
            if store.check([key]):
                return store.get(key).decode()
    except Exception:
        return None
    return None
