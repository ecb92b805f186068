"""DistributedDataParallel models in inner loops (higher.distributed), on 2 gloo ranks.

The module starts 2 processes (forkserver) once, each with a gloo process group whose timeout is short,
so a failing rank can never hang the suite; each test sends them the name of a function of this module
(the ``ranks`` fixture), and every rank sends back its result (or its error). A rank that fails or hangs
ends the pair, and the next test starts a fresh one. The tests that make a rank fail on purpose start
their own 2 processes (``_run``), each writing its result (or its error) to a file.
The reference is one process running the whole meta-batch without DDP.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import io
import multiprocessing
import os
import socket
import tempfile
import time
import traceback
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import higher
from higher import distributed as hd

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available in this torch build",
)

WORLD = 2
PG_TIMEOUT_S = 15  # collectives give up after this; a hung test would fail well within 30 s
JOIN_TIMEOUT_S = 60


# ------------------------------------------------------------------------------------------- launching
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(fn_name: str, rank: int, args: tuple) -> dict:
    """``fn_name(rank, *args)`` in a rank, as its record: the result, or the error."""
    try:
        return {"ok": True, "result": _function(fn_name)(rank, *args)}
    except BaseException as error:  # noqa: BLE001 - reported to the test
        return {"ok": False, "type": type(error).__name__, "message": str(error), "tb": traceback.format_exc()}


def _init_rank(rank: int, port: int, backend: str = "gloo") -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)  # as tests/conftest.py does for the test process
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if backend == "nccl":
        torch.cuda.set_device(rank)  # one GPU per rank
    torch.distributed.init_process_group(
        backend, rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=PG_TIMEOUT_S)
    )


def _entry(rank: int, port: int, out_dir: str, fn_name: str, args: tuple, backend: str = "gloo") -> None:
    path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        _init_rank(rank, port, backend)
        try:
            record = _call(fn_name, rank, args)
        finally:
            torch.distributed.destroy_process_group()
    except BaseException as error:  # noqa: BLE001 - reported to the test
        record = {"ok": False, "type": type(error).__name__, "message": str(error), "tb": traceback.format_exc()}
    torch.save(record, path)
    if not record["ok"]:
        raise SystemExit(1)


def _pool_entry(rank: int, port: int, conn: Any) -> None:
    """A rank of the module's pair: runs the functions it is sent, on one process group, until told to stop."""
    _init_rank(rank, port)
    seed = torch.initial_seed()
    try:
        while True:
            message = conn.recv()
            if message is None:
                break
            fn_name, args = message
            torch.set_default_dtype(torch.float64)  # each function starts as in a fresh rank
            torch.manual_seed(seed)
            record = _call(fn_name, rank, args)
            buffer = io.BytesIO()
            torch.save(record, buffer)
            conn.send_bytes(buffer.getvalue())
    finally:
        torch.distributed.destroy_process_group()


def _context(fn_name: str = "") -> Any:
    ctx = multiprocessing.get_context("forkserver")
    # The server imports torch once; each rank is then a fork of it (a clean, single-threaded process).
    module = fn_name.rpartition(":")[0]
    ctx.set_forkserver_preload(["torch", "higher", "test_distributed", *([module] if module else [])])
    return ctx


class _Ranks:
    """2 ranks started once, with their process group, that run this module's functions by name."""

    def __init__(self) -> None:
        self.procs: list[Any] = []
        self.conns: list[Any] = []

    def _start(self) -> None:
        ctx = _context()
        port = _free_port()
        for r in range(WORLD):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_pool_entry, args=(r, port, child), daemon=True)
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)

    def close(self, wait_s: float = 10.0) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc in self.procs:
            proc.join(wait_s)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []

    def run(self, fn_name: str, *args: Any) -> list[dict]:
        """Each rank's record of ``fn_name(rank, *args)`` (as :func:`_run`, on the module's ranks)."""
        if not self.procs:
            self._start()
        for conn in self.conns:
            conn.send((fn_name, args))
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        records: list[Any] = []
        try:
            for r, conn in enumerate(self.conns):
                if not conn.poll(max(0.0, deadline - time.monotonic())):
                    raise AssertionError(f"rank {r} did not finish within {JOIN_TIMEOUT_S} s")
                try:
                    records.append(torch.load(io.BytesIO(conn.recv_bytes()), weights_only=False))
                except EOFError:
                    raise AssertionError(
                        f"rank {r} died without a result (exit code {self.procs[r].exitcode})"
                    ) from None
        finally:
            if len(records) < WORLD or not all(record["ok"] for record in records):
                self.close(wait_s=0)  # a failed collective leaves the group unusable: the next test starts anew
        return records

    def results(self, fn_name: str, *args: Any) -> list[Any]:
        return _checked(self.run(fn_name, *args))


@pytest.fixture(scope="module")
def ranks():
    pair = _Ranks()
    yield pair
    pair.close()


def _function(fn_name: str) -> Any:
    """A function of this module by name, or of another (importable) test module as ``"module:function"``."""
    module, _, name = fn_name.rpartition(":")
    return getattr(importlib.import_module(module), name) if module else globals()[name]


def _run(fn_name: str, *args: Any, backend: str = "gloo") -> list[dict]:
    """Run ``fn_name(rank, *args)`` on 2 ranks; returns each rank's record (result or error)."""
    ctx = _context(fn_name)
    with tempfile.TemporaryDirectory() as out_dir:
        port = _free_port()
        procs = [ctx.Process(target=_entry, args=(r, port, out_dir, fn_name, args, backend)) for r in range(WORLD)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        assert not hung, f"ranks {hung} did not finish within {JOIN_TIMEOUT_S} s"
        records = []
        for r in range(WORLD):
            path = os.path.join(out_dir, f"rank{r}.pt")
            assert os.path.exists(path), f"rank {r} died without a result (exit code {procs[r].exitcode})"
            records.append(torch.load(path, weights_only=False))
    return records


def _results(fn_name: str, *args: Any) -> list[Any]:
    """The results of ``fn_name(rank, *args)`` on 2 ranks of their own (see :func:`_run`)."""
    return _checked(_run(fn_name, *args))


def _checked(records: list[dict]) -> list[Any]:
    for r, record in enumerate(records):
        assert record["ok"], f"rank {r} failed:\n{record['tb']}"
    return [record["result"] for record in records]


# ------------------------------------------------------------------------------------ the workload
TOTAL_TASKS = 5  # uneven on 2 ranks: 3 + 2
OUTER_STEPS = 3
INNER_STEPS = 2


def _model(kind: str, dtype: torch.dtype) -> nn.Module:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # the same initial values in every process (and dtype)
    try:
        torch.manual_seed(0)
        return _make_model(kind).to(dtype)
    finally:
        torch.set_default_dtype(previous)


def _make_model(kind: str) -> nn.Module:
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
    elif kind == "bn":
        # no bias before BatchNorm: its gradient would be exactly zero, i.e. rounding noise that Adam amplifies
        model = nn.Sequential(nn.Linear(1, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))
    elif kind == "unused":
        model = _WithSpare()
    else:
        raise ValueError(kind)
    return model


class _WithSpare(nn.Module):
    """A model with a parameter its forward never uses (``spare``)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
        self.spare = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _data(dtype: torch.dtype) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(OUTER_STEPS):
        amp = torch.empty(TOTAL_TASKS, 1, 1, dtype=torch.float32).uniform_(0.5, 3.0, generator=g)
        phase = torch.empty(TOTAL_TASKS, 1, 1, dtype=torch.float32).uniform_(0.0, 3.0, generator=g)
        x = torch.empty(TOTAL_TASKS, 16, 1, dtype=torch.float32).uniform_(-3.0, 3.0, generator=g)
        y = amp * torch.sin(x + phase)
        batches.append(tuple(t.to(dtype) for t in (x[:, :8], y[:, :8], x[:, 8:], y[:, 8:])))
    return batches


def _task_losses(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, y, reduction="none").flatten(1).mean(1)


def _meta_train(
    net: nn.Module,
    model: nn.Module,
    tasks: range,
    world: int,
    mode: str,
    dtype: torch.dtype,
    first_order: bool,
    device: str = "cpu",
) -> dict[str, Any]:
    """3 outer Adam steps of MAML over ``tasks``; returns the meta-gradients and the final parameters (on the CPU)."""
    data = [tuple(t.to(device) for t in batch) for batch in _data(dtype)]
    weight = hd.task_weight(TOTAL_TASKS, world)
    meta_opt = torch.optim.Adam(model.parameters(), lr=0.01)
    inner_opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ddp = hd.is_ddp(net)
    grads = []
    idx = list(tasks)
    for sx, sy, qx, qy in data:
        meta_opt.zero_grad()
        if mode == "batched":
            with higher.innerloop_ctx(
                net, inner_opt, copy_initial_weights=False, tasks=len(idx), first_order=first_order
            ) as (fmodel, diffopt):
                for _ in range(INNER_STEPS):
                    diffopt.step(_task_losses(fmodel(sx[idx]), sy[idx]))
                (_task_losses(fmodel(qx[idx]), qy[idx]).sum() * weight).backward()
        else:
            for k, t in enumerate(idx):
                last = k == len(idx) - 1
                sync = contextlib.nullcontext() if (last or not ddp) else net.no_sync()
                with (
                    sync,
                    higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False, first_order=first_order) as (
                        fmodel,
                        diffopt,
                    ),
                ):
                    for _ in range(INNER_STEPS):
                        diffopt.step(F.mse_loss(fmodel(sx[t]), sy[t]))
                    (F.mse_loss(fmodel(qx[t]), qy[t]) * weight).backward()
        grads.append([None if p.grad is None else p.grad.to("cpu", copy=True) for p in model.parameters()])
        meta_opt.step()
    return {
        "grads": grads,
        "params": [p.detach().to("cpu", copy=True) for p in model.parameters()],
        "buffers": [b.to("cpu", copy=True) for b in model.buffers()],
        "stats": hd.sync_stats(net) if ddp else None,
    }


def _single(kind: str, mode: str, dtype: torch.dtype, first_order: bool) -> dict[str, Any]:
    model = _model(kind, dtype)
    return _meta_train(model, model, range(TOTAL_TASKS), 1, mode, dtype, first_order)


def _distributed_worker(
    rank: int, kind: str, mode: str, dtype: torch.dtype, first_order: bool, ddp_kwargs: dict, device: str = "cpu"
) -> Any:
    """This rank's share of the MAML of :func:`_meta_train` under DDP; ``device="cuda"``: on GPU ``rank``."""
    if device == "cuda":
        device, ddp_kwargs = f"cuda:{rank}", {**ddp_kwargs, "device_ids": [rank]}
    model = _model(kind, dtype).to(device)
    net = nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
    tasks = hd.split_tasks(TOTAL_TASKS)
    return _meta_train(net, model, tasks, WORLD, mode, dtype, first_order, device)


def _assert_close(actual: list, expected: list, dtype: torch.dtype) -> None:
    for a, e in zip(actual, expected):
        if e is None:
            assert a is None
            continue
        if dtype == torch.float64:
            torch.testing.assert_close(a, e, rtol=0, atol=1e-10)
        else:
            torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6 * e.abs().max().item())


def _check_against_single(results: list[dict], reference: dict, dtype: torch.dtype) -> None:
    for result in results:
        for step in range(OUTER_STEPS):
            _assert_close(result["grads"][step], reference["grads"][step], dtype)
        _assert_close(result["params"], reference["params"], dtype)
    # every rank holds bitwise the same meta-gradient and parameters
    for a, b in zip(results[0]["params"], results[1]["params"]):
        assert torch.equal(a, b)


def _model_bytes(kind: str, dtype: torch.dtype) -> int:
    return sum(p.numel() * p.element_size() for p in _model(kind, dtype).parameters())


# ---------------------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batched_meta_gradient_equals_single_process(dtype, ranks):
    results = ranks.results("_distributed_worker", "mlp", "batched", dtype, False, {})
    _check_against_single(results, _single("mlp", "batched", dtype, False), dtype)
    # one all-reduce of one model's gradients per meta-iteration (a single bucket: < 1 MiB)
    for result in results:
        assert result["stats"]["backwards"] == OUTER_STEPS
        assert result["stats"]["all_reduces"] == OUTER_STEPS
        assert result["stats"]["bytes"] == OUTER_STEPS * _model_bytes("mlp", dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_per_task_no_sync_equals_single_process(dtype, ranks):
    results = ranks.results("_distributed_worker", "mlp", "per_task", dtype, False, {})
    _check_against_single(results, _single("mlp", "per_task", dtype, False), dtype)
    # no_sync(): 3 (rank 0) or 2 (rank 1) backward passes per meta-iteration, one all-reduce
    for result in results:
        assert result["stats"]["all_reduces"] == OUTER_STEPS
        assert result["stats"]["bytes"] == OUTER_STEPS * _model_bytes("mlp", dtype)


def _first_order_worker(rank: int) -> Any:
    return {mode: _distributed_worker(rank, "mlp", mode, torch.float64, True, {}) for mode in ("batched", "per_task")}


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2 or not torch.distributed.is_nccl_available(),
    reason="DDP over NCCL needs 2 GPUs",
)
@pytest.mark.parametrize("mode", ["batched", "per_task"])
def test_nccl_on_two_gpus_equals_single_process(mode):
    """The gloo tests' meta-gradients on 2 GPUs, one per rank, all-reduced by NCCL (float64; the
    reference is the whole meta-batch in one CPU process)."""
    results = _checked(_run("_distributed_worker", "mlp", mode, torch.float64, False, {}, "cuda", backend="nccl"))
    _check_against_single(results, _single("mlp", mode, torch.float64, False), torch.float64)


def test_first_order_both_paths(ranks):
    results = ranks.results("_first_order_worker")
    for mode in ("batched", "per_task"):
        _check_against_single([r[mode] for r in results], _single("mlp", mode, torch.float64, True), torch.float64)


def test_batchnorm_buffers_and_small_buckets(ranks):
    """A BatchNorm model: buffers untouched by the fmodel (and broadcast once per sync), several buckets."""
    reference = _single("bn", "per_task", torch.float64, False)
    model_bytes = _model_bytes("bn", torch.float64)
    results = ranks.results("_distributed_worker", "bn", "per_task", torch.float64, False, {"bucket_cap_mb": 1e-4})
    _check_against_single(results, reference, torch.float64)
    fresh = _model("bn", torch.float64)
    for result in results:
        for b, b0 in zip(result["buffers"], fresh.buffers()):
            assert torch.equal(b, b0)  # the fmodels use copies; the model's running statistics never move
        stats = result["stats"]
        assert stats["all_reduces"] > OUTER_STEPS  # 100-byte buckets: several per meta-iteration
        assert stats["bytes"] == OUTER_STEPS * model_bytes  # but still one model's gradients
        assert stats["broadcasts"] == OUTER_STEPS


def _shared_buffers_step(model: nn.Module, net: nn.Module, rank: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 1, generator=torch.Generator().manual_seed(rank))
    with higher.innerloop_ctx(net, opt, copy_initial_weights=False, share_buffers=True) as (fmodel, diffopt):
        diffopt.step(fmodel(x).pow(2).mean())
        fmodel(x).pow(2).mean().backward()


def _shared_buffers_worker(rank: int) -> Any:
    model = _model("bn", torch.float64)
    _shared_buffers_step(model, nn.parallel.DistributedDataParallel(model), rank)
    return [b.clone() for b in model.buffers()]


def test_shared_buffers_take_rank_0s_after_the_all_reduce(ranks):
    """share_buffers=True: each rank's inner loop updates its model's BatchNorm statistics; then rank 0's win."""
    results = ranks.results("_shared_buffers_worker")
    alone = _model("bn", torch.float64)
    _shared_buffers_step(alone, alone, 0)  # rank 0's inner loop in one process
    moved = [not torch.equal(b, b0) for b, b0 in zip(alone.buffers(), _model("bn", torch.float64).buffers())]
    assert all(moved)
    for result in results:
        for b, expected in zip(result, alone.buffers()):
            torch.testing.assert_close(b, expected, rtol=0, atol=1e-14)


def _no_sync_decided_at_forward(rank: int) -> Any:
    """As in DDP, a backward syncs when its forward ran outside no_sync (and not otherwise)."""
    model = _model("mlp", torch.float64)
    net = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.full((4, 1), float(rank + 1))
    counts = []
    with net.no_sync(), higher.innerloop_ctx(net, opt, copy_initial_weights=False) as (fmodel, diffopt):
        diffopt.step(fmodel(x).pow(2).mean())
        loss = fmodel(x).pow(2).mean()
    loss.backward()  # forward inside no_sync: local only
    counts.append(hd.sync_stats(net)["all_reduces"])
    local = [p.grad.clone() for p in model.parameters()]
    with higher.innerloop_ctx(net, opt, copy_initial_weights=False) as (fmodel, diffopt):
        loss = fmodel(x).pow(2).mean()
    with net.no_sync():
        loss.backward()  # forward outside: synchronised, with what no_sync accumulated
    counts.append(hd.sync_stats(net)["all_reduces"])
    # the model is left without hooks between meta-iterations
    hooks = [p._post_accumulate_grad_hooks for p in model.parameters()]
    hooks += [m._forward_pre_hooks for m in model.modules()]  # the arming hook is the fmodel's own
    return {"counts": counts, "local": local, "synced": [p.grad.clone() for p in model.parameters()], "hooks": hooks}


def test_no_sync_follows_the_forward(ranks):
    results = ranks.results("_no_sync_decided_at_forward")
    for result in results:
        assert result["counts"] == [0, 1]
        assert all(not h for h in result["hooks"])
    # ranks had different inputs: local gradients differ, synchronised ones are the same average
    assert not torch.equal(results[0]["local"][0], results[1]["local"][0])
    for a, b in zip(results[0]["synced"], results[1]["synced"]):
        assert torch.equal(a, b)
    # the average of the two ranks' accumulated gradients (each rank: no_sync backward + the synced one)
    model = _model("mlp", torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for rank in range(WORLD):
        x = torch.full((4, 1), float(rank + 1))
        for _ in range(2):
            with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
                if _ == 0:
                    diffopt.step(fmodel(x).pow(2).mean())
                fmodel(x).pow(2).mean().backward()
    for a, p in zip(results[0]["synced"], model.parameters()):
        torch.testing.assert_close(a, p.grad / WORLD, rtol=0, atol=1e-12)


def _unused_worker(rank: int, find_unused: bool) -> Any:
    model = _model("unused", torch.float64)
    net = nn.parallel.DistributedDataParallel(model, find_unused_parameters=find_unused)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.full((4, 1), float(rank + 1))
    with higher.innerloop_ctx(net, opt, copy_initial_weights=False) as (fmodel, diffopt):
        fmodel(x).pow(2).mean().backward()
    return {"grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()]}


def test_unused_parameters_follow_ddp(ranks):
    records = _run("_unused_worker", False)  # both ranks fail on purpose: 2 processes of their own
    for record in records:
        assert not record["ok"]
        assert "find_unused_parameters=True" in record["message"] and "spare.weight" in record["message"]
    results = ranks.results("_unused_worker", True)
    for result in results:
        body, spare = result["grads"][:4], result["grads"][4:]
        assert all(g is not None for g in body) and all(g is None for g in spare)
    for a, b in zip(results[0]["grads"][:4], results[1]["grads"][:4]):
        assert torch.equal(a, b)


def _failing_worker(rank: int) -> Any:
    model = _model("mlp", torch.float64)
    net = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(net, opt, copy_initial_weights=False, tasks=2) as (fmodel, diffopt):
        x = torch.ones(2, 4, 1)
        diffopt.step(fmodel(x).pow(2).flatten(1).mean(1))
        if rank == 1:
            raise FloatingPointError("rank 1: the inner loss of task 3 is nan")
        fmodel(x).pow(2).sum().backward()  # rank 0 waits in the all-reduce for rank 1
    return "finished"


def test_an_error_on_one_rank_ends_every_rank():
    start = time.monotonic()
    records = _run("_failing_worker")
    elapsed = time.monotonic() - start
    assert not records[1]["ok"] and records[1]["type"] == "FloatingPointError"
    assert "task 3 is nan" in records[1]["message"]
    # rank 0 does not hang: its all-reduce fails once rank 1 is gone, and it reports rank 1's error
    assert not records[0]["ok"], records[0]
    assert "rank 1 raised FloatingPointError" in records[0]["message"] and "task 3 is nan" in records[0]["message"]
    assert elapsed < JOIN_TIMEOUT_S


def _options_worker(rank: int) -> Any:
    model = _model("mlp", torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    errors = {}
    net = nn.parallel.DistributedDataParallel(model)
    net.register_comm_hook(None, lambda state, bucket: torch.futures.Future())
    with pytest.raises(NotImplementedError, match="communication hook") as info:
        higher.innerloop_ctx(net, opt, copy_initial_weights=False).__enter__()
    errors["comm_hook"] = str(info.value)
    # what still works on the same model: an ordinary DDP model
    net2 = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True, static_graph=True)
    with higher.innerloop_ctx(net2, opt, copy_initial_weights=False) as (fmodel, diffopt):
        assert isinstance(fmodel, nn.Sequential)  # the fmodel of ddp.module
        fmodel(torch.ones(2, 1)).sum().backward()
    errors["synced"] = hd.sync_stats(net2)["backwards"]
    # copy_initial_weights=True (the default): nothing reaches the model, nothing is armed or reduced
    with higher.innerloop_ctx(net2, opt) as (fmodel, diffopt):
        fmodel(torch.ones(2, 1)).sum().backward()
    errors["after_copy"] = hd.sync_stats(net2)["backwards"]
    errors["hooks_after_copy"] = sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters())
    # copy_initial_weights passed positionally (model, opt, device, copy_initial_weights)
    with higher.innerloop_ctx(net2, opt, None, False) as (fmodel, diffopt):
        fmodel(torch.ones(2, 1)).sum().backward()
    errors["positional"] = hd.sync_stats(net2)["backwards"]
    net3 = nn.parallel.DistributedDataParallel(model)
    net3._register_builtin_comm_hook(torch.distributed.BuiltinCommHookType.FP16_COMPRESS)
    with pytest.raises(NotImplementedError, match="FP16_COMPRESS"):
        higher.innerloop_ctx(net3, opt, copy_initial_weights=False).__enter__()
    embedding = nn.Embedding(5, 3, sparse=True)
    net4 = nn.parallel.DistributedDataParallel(embedding)
    with pytest.raises(NotImplementedError, match="sparse"):
        higher.innerloop_ctx(net4, torch.optim.SGD(embedding.parameters(), lr=0.1)).__enter__()
    return errors


def test_unsupported_options_raise(ranks):
    for result in ranks.results("_options_worker"):
        assert "register_comm_hook" in result["comm_hook"]
        assert result["synced"] == 1
        assert result["after_copy"] == 1 and result["hooks_after_copy"] == 0
        assert result["positional"] == 2


def test_split_tasks_and_weights():
    for total in (1, 5, 25, 26):
        for world in (1, 2, 3, 8):
            if total < world:
                continue
            blocks = [hd.split_tasks(total, r, world) for r in range(world)]
            assert [t for b in blocks for t in b] == list(range(total))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
            weights = hd.task_weight(total, world)
            # the DDP average of the ranks' weighted sums is the mean over all tasks
            assert sum(weights * len(b) for b in blocks) / world == pytest.approx(1.0)
    assert hd.split_tasks(7) == range(7)  # no process group: one rank
    with pytest.raises(ValueError, match="rank"):
        hd.split_tasks(4, 2, 2)
    with pytest.raises(ValueError, match="num_tasks"):
        hd.task_weight(0, 2)


def test_ddp_without_process_group_is_a_clear_error():
    class FakeDDP(nn.parallel.DistributedDataParallel):
        def __init__(self, module):
            nn.Module.__init__(self)
            self.module = module

    model = _model("mlp", torch.float64)
    with pytest.raises(RuntimeError, match="init_process_group"):
        higher.innerloop_ctx(FakeDDP(model), torch.optim.SGD(model.parameters(), lr=0.1)).__enter__()


def _maml_step_worker(rank: int) -> Any:
    from higher.data import SinusoidTasks

    model = _model("mlp", torch.float64)
    net = nn.parallel.DistributedDataParallel(model)
    meta_opt = torch.optim.Adam(model.parameters(), lr=0.01)
    inner_opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sampler = SinusoidTasks(shots=5, seed=3)
    losses = []
    for _ in range(OUTER_STEPS):
        tasks = sampler.sample(5).tasks()
        meta_opt.zero_grad()
        losses.append(hd.maml_step(net, inner_opt, tasks, F.mse_loss, inner_steps=2))
        meta_opt.step()
    return {"losses": losses, "params": [p.detach().clone() for p in model.parameters()], "stats": hd.sync_stats(net)}


def test_distributed_maml_step_equals_maml_step(ranks):
    from higher.algorithms import maml_step
    from higher.data import SinusoidTasks

    model = _model("mlp", torch.float64)
    meta_opt = torch.optim.Adam(model.parameters(), lr=0.01)
    inner_opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sampler = SinusoidTasks(shots=5, seed=3)
    losses = []
    for _ in range(OUTER_STEPS):
        tasks = sampler.sample(5).tasks()
        meta_opt.zero_grad()
        losses.append(maml_step(model, inner_opt, tasks, F.mse_loss, inner_steps=2))
        meta_opt.step()
    for result in ranks.results("_maml_step_worker"):
        assert result["losses"] == pytest.approx(losses, rel=1e-12)
        _assert_close(result["params"], [p.detach() for p in model.parameters()], torch.float64)
        assert result["stats"]["all_reduces"] == OUTER_STEPS  # one per meta-iteration, 3 or 2 tasks per rank


def _demo_table(output: str) -> list[str]:
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("MSE on"))
    return lines[start : start + 4]


def test_torchrun_demo_prints_the_single_process_table(tmp_path, capsys):
    """`torchrun --nproc-per-node 2 -m higher demo`: the same table, one header, one PNG (rank 0)."""
    import subprocess
    import sys

    from higher import cli

    options = ["demo", "--iterations", "20", "--test-tasks", "20", "--no-progress"]
    torch.set_default_dtype(torch.float32)  # as in a fresh process (the fixture restores float64)
    assert cli.main([*options, "--out", str(tmp_path / "one.png")]) == 0
    one = capsys.readouterr().out
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "higher"]
        + [*options, "--out", str(tmp_path / "two.png")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert two.returncode == 0, two.stderr
    assert "split across 2 ranks" in two.stdout
    assert two.stdout.count("MAML on sinusoid regression") == 1  # only rank 0 prints
    assert _demo_table(two.stdout) == _demo_table(one)
    assert (tmp_path / "two.png").exists()
