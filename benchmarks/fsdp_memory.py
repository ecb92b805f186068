"""Benchmark: per-rank peak memory of MAML through FSDP2 (``fully_shard``) against DDP, on 2 gloo ranks (CPU).

    python benchmarks/fsdp_memory.py                        # width 2048, 3 inner steps, 2 tasks per rank
    python benchmarks/fsdp_memory.py --width 1024 --steps 5 --json out.json

For each variant, 2 fresh processes (1 for ``one process``; one thread each) form a gloo process
group, build the same MLP (``1 -> width -> width -> width -> 1``, float32), and run 2 MAML meta-iterations (per task, 2
tasks per rank, second-order inner SGD, outer Adam) with ``higher.innerloop_ctx``:

* ``one process``: the reference, one process (a 1-rank group) adapting the whole meta-batch (4
  tasks) on the plain model: what a rank would hold without splitting the meta-batch at all;
* ``DDP``: ``DistributedDataParallel(model)``: every rank holds the whole model, the whole Adam
  state and its task's full fast weights;
* ``FSDP, reshard``: ``fully_shard`` on every Linear and the root (``reshard_after_forward=True``,
  FSDP's default): parameters and Adam state sharded; fast weights sharded (each rank holds its rows
  of every rank's task); each unit's gathered weights freed after its forward and gathered again in
  backward;
* ``FSDP, keep``: the same with ``reshard_after_forward=False``: the gathered weights that autograd
  saves are kept until backward.

Memory, two ways. The peak of the bytes of the live tensors (a second run of the same meta-iterations,
under a ``TorchDispatchMode`` that weakly tracks the storage of every op's output, forward and backward:
the tensors' own memory, what a GPU allocator's peak would show, without the CPU allocator's retention).
And the peak resident set size of each rank (Linux ``VmHWM``, reset through ``clear_refs``
after a warm-up run on a tiny model) minus its resident size then, the largest of the 2 ranks:
what the model, the optimizer state and the meta-iterations added at their peak (CPU memory that
the allocator keeps after a free counts as used, as it does for the machine). Also: the bytes of
the model's parameters on a rank, the gathered weights alive just before the meta-loss's backward
(``higher.distributed.gathered_bytes``), the ``all_to_all`` bytes a rank sends per meta-iteration,
the fastest meta-iteration's seconds, and the largest difference between the last meta-gradient and the
DDP one (per tensor, relative to its largest element).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.multiprocessing.reductions import StorageWeakRef  # noqa: E402
from torch.utils import _pytree as pytree  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import higher  # noqa: E402
from higher import distributed as hd  # noqa: E402

WORLD = 2
VARIANTS = ("one process", "DDP", "FSDP, reshard", "FSDP, keep")
#: The unsharded run of the whole meta-batch in one process: what the per-rank numbers are against.
ONE = "one process"
TASKS_PER_RANK = 2
META_ITERATIONS = 2


class _LiveBytes(TorchDispatchMode):
    """The peak of the bytes of live tensor storages made while it is active (every op's outputs, forward and
    backward, weakly referenced; checked every ``every`` ops): memory as the tensors use it, independent of the
    allocator (the CPU allocator keeps freed memory, which the resident size counts)."""

    def __init__(self, every: int = 20) -> None:
        super().__init__()
        self.live: dict[int, tuple[Any, int]] = {}
        self.peak = 0
        self.every = every
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if type(t) in (torch.Tensor, nn.Parameter) and t.layout == torch.strided and t.device.type == "cpu":
                try:
                    storage = t.untyped_storage()
                    key = storage.data_ptr()
                except RuntimeError:  # a tensor without storage of its own (a view made by a subclass)
                    continue
                if key not in self.live or self.live[key][0].expired():
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
        self.count += 1
        if self.count % self.every == 0:
            self.measure()
        return out

    def measure(self) -> None:
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(size for _, size in self.live.values()))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def _model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(1, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
        nn.Linear(width, 1),
    )  # fmt: skip


def _rank(rank: int, port: int, variant: str, width: int, steps: int, dtype: torch.dtype, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    world = 1 if variant == ONE else WORLD
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        _train(variant, 8, steps, dtype)  # a warm-up on a tiny model: code paths loaded, gloo's buffers made
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (the peak) to the current resident size
        baseline = _status_kib("VmRSS")
        record = _train(variant, width, steps, dtype)
        record["peak_mib"] = (_status_kib("VmHWM") - baseline) / 1024
        tracker = _LiveBytes()
        with tracker:  # again, counting the tensors' bytes (slower)
            _train(variant, width, steps, dtype)
        tracker.measure()
        record["tensor_peak_mib"] = tracker.peak / 2**20
        torch.save(record, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def _train(variant: str, width: int, steps: int, dtype: torch.dtype) -> dict[str, Any]:
    """META_ITERATIONS meta-iterations of MAML on this rank's tasks; the numbers of the docstring."""
    from torch.distributed.fsdp import fully_shard

    g = torch.Generator().manual_seed(1)
    total = TASKS_PER_RANK * WORLD
    x = torch.empty(META_ITERATIONS, total, 20, 1).uniform_(-3, 3, generator=g)
    y = torch.sin(x + torch.rand(META_ITERATIONS, total, 1, 1, generator=g) * 3)
    x, y = x.to(dtype), y.to(dtype)
    mine = hd.split_tasks(total)  # every task in the one process
    model = _model(width).to(dtype)
    if variant == ONE:
        net: nn.Module = model
    elif variant == "DDP":
        net = nn.parallel.DistributedDataParallel(model)
    else:
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, reshard_after_forward=variant == "FSDP, reshard")
        fully_shard(model, reshard_after_forward=variant == "FSDP, reshard")
        net = model
    param_bytes = sum(_local(p).numel() * p.element_size() for p in model.parameters())
    meta_opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    weight = hd.task_weight(total)
    seconds, gathered, sent, grads = [], 0, 0, []
    for it in range(META_ITERATIONS):
        start, stats = time.perf_counter(), hd.gather_stats()
        meta_opt.zero_grad()
        inner_opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for k, t in enumerate(mine):
            last = k == len(mine) - 1
            if variant == ONE:
                sync: Any = contextlib.nullcontext()
            elif variant == "DDP":
                sync = net.no_sync() if not last else contextlib.nullcontext()  # type: ignore[operator]
            else:
                model.set_requires_gradient_sync(last)  # type: ignore[operator]
                sync = contextlib.nullcontext()
            with sync, higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
                sx, sy = x[it, t, :10], y[it, t, :10]
                for _ in range(steps):
                    diffopt.step(F.mse_loss(fmodel(sx), sy))
                meta_loss = F.mse_loss(fmodel(x[it, t, 10:]), y[it, t, 10:]) * weight
                # DTensor's sharding propagation makes a FakeTensorMode whose traceback forms a reference cycle
                # that can hold a small gathered buffer until Python's next collection (seen: the last layer's,
                # 288 bytes at width 16, in the outer step's or the meta-gradient's DTensor ops): what autograd
                # keeps is what is left after a collection.
                gc.collect()
                gathered = max(gathered, hd.gathered_bytes())
                meta_loss.backward()
                del fmodel, diffopt, meta_loss
        grads = [_full(p.grad) for p in model.parameters()]
        meta_opt.step()
        seconds.append(time.perf_counter() - start)
        sent = hd.gather_stats()["bytes"] - stats["bytes"]
    return {
        "param_mib": param_bytes / 2**20,
        "gathered_mib": gathered / 2**20,
        "all_to_all_mib": sent / 2**20,
        "seconds": min(seconds),
        "grads": grads,
    }


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # type: ignore[operator]


def _full(t: Any) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(width: int, steps: int, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Each variant's worst rank's numbers (fresh processes per variant)."""
    results: dict[str, Any] = {}
    for variant in VARIANTS:
        world = 1 if variant == ONE else WORLD
        with tempfile.TemporaryDirectory() as out_dir:
            mp.start_processes(
                _rank, args=(_free_port(), variant, width, steps, dtype, out_dir), nprocs=world, start_method="spawn"
            )
            records = [torch.load(os.path.join(out_dir, f"{r}.pt")) for r in range(world)]
        results[variant] = {
            key: max(r[key] for r in records)
            for key in ("peak_mib", "tensor_peak_mib", "param_mib", "gathered_mib", "all_to_all_mib", "seconds")
        }
        results[variant]["grads"] = records[0]["grads"]
    reference = results["DDP"].pop("grads")
    for variant in (v for v in VARIANTS if v != "DDP"):
        grads = results[variant].pop("grads")
        results[variant]["meta_gradient_difference"] = max(
            ((a - b).abs().max() / b.abs().max()).item() for a, b in zip(grads, reference)
        )
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3, help="inner steps (second order)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)
    results = run(args.width, args.steps, getattr(torch, args.dtype))
    print(
        f"MLP 1-{args.width}-{args.width}-{args.width}-1 {args.dtype}, {args.steps} inner SGD steps (second order), "
        f"{TASKS_PER_RANK} tasks per rank, {WORLD} gloo ranks (one process: all {TASKS_PER_RANK * WORLD} tasks, "
        f"unsharded); worst rank:"
    )
    print(
        "| variant | peak tensor MiB | peak resident MiB added | parameters MiB | gathered MiB kept at backward "
        "| all_to_all MiB sent | s/meta-it | meta-gradient vs DDP |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for variant, r in results.items():
        difference = r.get("meta_gradient_difference")
        same = "(reference)" if difference is None else f"{difference:.1e}"
        print(
            f"| {variant} | {r['tensor_peak_mib']:.0f} | {r['peak_mib']:.0f} | {r['param_mib']:.1f} | {r['gathered_mib']:.1f} | "
            f"{r['all_to_all_mib']:.0f} | {r['seconds']:.2f} | {same} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"width": args.width, "steps": args.steps, "results": results}, indent=2))


if __name__ == "__main__":
    main()
