"""FSDP2 (``fully_shard``) models in inner loops (higher._fsdp), on 2 gloo ranks.

The ranks are those of tests/test_distributed.py's launcher (a pair started once, running this module's
functions by name; ``_run`` for tests whose ranks fail on purpose). The reference is one process
running the whole meta-batch with higher on the unsharded model.
"""

from __future__ import annotations

import time
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

from test_distributed import WORLD, _Ranks, _run  # noqa: E402

TOTAL_TASKS = 4  # 2 per rank: FSDP's collectives need the same number of inner loops on every rank
OUTER_STEPS = 2
INNER_STEPS = 2
CHECKPOINTED_STEPS = 5  # segments of 2, 2 and 1 steps


@pytest.fixture(scope="module")
def ranks():
    pair = _Ranks()
    yield pair
    pair.close()


def _model(dtype: torch.dtype) -> nn.Module:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        torch.manual_seed(0)
        # dim 0 of 5, 7 and 1 rows: uneven shards on 2 ranks (3 + 2, 4 + 3, 1 + 0)
        return nn.Sequential(nn.Linear(1, 5), nn.Tanh(), nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1)).to(dtype)
    finally:
        torch.set_default_dtype(previous)


def _sharded(dtype: torch.dtype, layers: tuple[int, ...] = (0, 2, 4), **kwargs: Any) -> nn.Module:
    """The model with ``fully_shard`` on the Linear layers at ``layers`` and at the root (which manages the rest)."""
    from torch.distributed.fsdp import fully_shard

    model = _model(dtype)
    for index in layers:
        fully_shard(model[index], **kwargs)
    fully_shard(model, **kwargs)
    return model


def _data(dtype: torch.dtype) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(OUTER_STEPS):
        amp = torch.empty(TOTAL_TASKS, 1, 1).uniform_(0.5, 3.0, generator=g)
        phase = torch.empty(TOTAL_TASKS, 1, 1).uniform_(0.0, 3.0, generator=g)
        x = torch.empty(TOTAL_TASKS, 10, 1).uniform_(-3.0, 3.0, generator=g)
        y = amp * torch.sin(x + phase)
        batches.append(tuple(t.to(dtype) for t in (x[:, :5], y[:, :5], x[:, 5:], y[:, 5:])))
    return batches


def _task_losses(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, y, reduction="none").flatten(1).mean(1)


def _full(t: Any) -> torch.Tensor | None:
    if t is None:
        return None
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _meta_train(
    model: nn.Module,
    tasks: range,
    world: int,
    mode: str,
    dtype: torch.dtype,
    inner: str = "sgd",
    first_order: bool = False,
    lr_tensor: bool = True,
    checkpointed: bool = False,
) -> dict[str, Any]:
    """OUTER_STEPS outer Adam steps of MAML over ``tasks``; the meta-gradients (full tensors) and final parameters."""
    data = _data(dtype)
    weight = hd.task_weight(TOTAL_TASKS, world)
    meta_opt = torch.optim.Adam(model.parameters(), lr=0.01)
    lr = torch.tensor(0.1, dtype=dtype, requires_grad=True)
    override = {"lr": [lr]} if lr_tensor else None
    grads, lr_grads = [], []
    idx = list(tasks)
    fsdp = hasattr(model, "set_requires_gradient_sync")
    for sx, sy, qx, qy in data:
        meta_opt.zero_grad()
        lr.grad = None
        inner_opt = (
            torch.optim.SGD(model.parameters(), lr=0.1)
            if inner == "sgd"
            else torch.optim.Adam(model.parameters(), lr=0.03)
        )
        if mode == "batched":
            with higher.innerloop_ctx(
                model, inner_opt, copy_initial_weights=False, tasks=len(idx), first_order=first_order, override=override
            ) as (fmodel, diffopt):
                _unroll(fmodel, diffopt, lambda fm, sx=sx, sy=sy: _task_losses(fm(sx[idx]), sy[idx]), checkpointed)
                (_task_losses(fmodel(qx[idx]), qy[idx]).sum() * weight).backward()
        else:
            for k, t in enumerate(idx):
                if fsdp:
                    model.set_requires_gradient_sync(k == len(idx) - 1)
                with higher.innerloop_ctx(
                    model, inner_opt, copy_initial_weights=False, first_order=first_order, override=override
                ) as (fmodel, diffopt):
                    _unroll(fmodel, diffopt, lambda fm, t=t, sx=sx, sy=sy: F.mse_loss(fm(sx[t]), sy[t]), checkpointed)
                    (F.mse_loss(fmodel(qx[t]), qy[t]) * weight).backward()
        if lr_tensor:
            hd.average_grads([lr])
        grads.append([_full(p.grad) for p in model.parameters()])
        lr_grads.append(None if lr.grad is None else lr.grad.clone())
        meta_opt.step()
    return {"grads": grads, "lr_grads": lr_grads, "params": [_full(p) for p in model.parameters()]}


def _unroll(fmodel: Any, diffopt: Any, loss: Any, checkpointed: bool) -> None:
    """INNER_STEPS steps on the support set, or CHECKPOINTED_STEPS with higher.checkpointed_unroll."""
    if checkpointed:
        higher.checkpointed_unroll(fmodel, diffopt, lambda fm, _: loss(fm), steps=CHECKPOINTED_STEPS, every=2)
    else:
        for _ in range(INNER_STEPS):
            diffopt.step(loss(fmodel))


def _single(mode: str, dtype: torch.dtype, **kwargs: Any) -> dict[str, Any]:
    return _meta_train(_model(dtype), range(TOTAL_TASKS), 1, mode, dtype, **kwargs)


def _worker(rank: int, mode: str, dtype: torch.dtype, kwargs: dict, layers: tuple[int, ...] = (0, 2, 4)) -> Any:
    model = _sharded(dtype, layers)
    return _meta_train(model, hd.split_tasks(TOTAL_TASKS), WORLD, mode, dtype, **kwargs)


def _check(results: list[dict], reference: dict, dtype: torch.dtype, later_rtol: float | None = None) -> None:
    """Every rank's meta-gradients, lr hypergradients and final parameters against the single process's;
    ``later_rtol``: the tolerance for the meta-gradients after the first outer step (default: ``dtype``'s)."""
    for result in results:
        for step in range(OUTER_STEPS):
            rtol = later_rtol if step and later_rtol else None
            _assert_close(result["grads"][step], reference["grads"][step], dtype, rtol)
            _assert_close([result["lr_grads"][step]], [reference["lr_grads"][step]], dtype, rtol)
        _assert_close(result["params"], reference["params"], dtype)
    for a, b in zip(results[0]["params"], results[1]["params"]):  # the same full parameters on every rank
        assert torch.equal(a, b)


def _assert_close(actual: list, expected: list, dtype: torch.dtype, rtol: float | None = None) -> None:
    for a, e in zip(actual, expected):
        if e is None:
            assert a is None
            continue
        assert a is not None
        scale = e.abs().max().item()
        rtol = rtol or (1e-10 if dtype == torch.float64 else 1e-6)
        torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * scale)


# ---------------------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("mode", ["per_task", "batched"])
@pytest.mark.parametrize("inner", ["sgd", "adam"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
def test_meta_gradient_equals_single_process(mode, inner, first_order, ranks):
    """float64: the sharded meta-gradient (and the lr hypergradient) is the whole meta-batch's, to 1e-10."""
    kwargs = {"inner": inner, "first_order": first_order}
    results = ranks.results("test_fsdp:_worker", mode, torch.float64, kwargs)
    _check(results, _single(mode, torch.float64, **kwargs), torch.float64)


@pytest.mark.parametrize("mode", ["per_task", "batched"])
@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_float32_meta_gradient_equals_single_process(mode, inner, ranks):
    """float32: the first meta-gradient and the final parameters to 1e-6. After an outer Adam step, inner Adam
    amplifies rounding: the single process's own per-task and task-batched runs differ by 5e-6 in the second
    meta-gradient (measured), so that one is held to 1e-5."""
    kwargs = {"inner": inner}
    results = ranks.results("test_fsdp:_worker", mode, torch.float32, kwargs)
    _check(results, _single(mode, torch.float32, **kwargs), torch.float32, later_rtol=1e-5 if inner == "adam" else None)


@pytest.mark.parametrize("mode", ["per_task", "batched"])
def test_root_unit_gathers_the_layers_it_manages(mode, ranks):
    """fully_shard on the first and last Linear and the root only: the root unit gathers the middle Linear."""
    kwargs = {"inner": "adam"}
    results = ranks.results("test_fsdp:_worker", mode, torch.float64, kwargs, (0, 4))
    _check(results, _single(mode, torch.float64, **kwargs), torch.float64)


@pytest.mark.parametrize("mode", ["per_task", "batched"])
def test_checkpointed_unroll_equals_single_process(mode, ranks):
    """higher.checkpointed_unroll recomputes its segments (and their gathers) in the backward pass of every rank."""
    kwargs = {"inner": "adam", "checkpointed": True}
    results = ranks.results("test_fsdp:_worker", mode, torch.float64, kwargs)
    _check(results, _single(mode, torch.float64, **kwargs), torch.float64)


def _structure_worker(rank: int) -> Any:
    """What each rank holds: the shapes of the fast weights, the collectives per forward, the model untouched."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Shard

    model = _sharded(torch.float64)
    before = {
        "class": type(model).__name__,
        "ids": [id(p) for p in model.parameters()],
        "hooks": [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()],
    }
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.ones(2, 3, 1)
    out: dict[str, Any] = {}
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        out["per_task_shapes"] = [tuple(p.shape) for p in fmodel.parameters()]
        stats = hd.gather_stats()
        y = fmodel(x[0])
        after = hd.gather_stats()
        out["forward_all_to_alls"] = after["all_to_all"] - stats["all_to_all"]
        out["forward_bytes"] = after["bytes"] - stats["bytes"]
        out["output_shape"] = tuple(y.shape)
        diffopt.step(y.pow(2).mean())
        out["stepped_shapes"] = [tuple(p.shape) for p in fmodel.parameters()]
        fmodel(x[0]).pow(2).mean().backward()
    out["grads"] = [
        (isinstance(p.grad, DTensor), tuple(p.grad.placements) == (Shard(0),), tuple(p.grad.to_local().shape))
        for p in model.parameters()
    ]
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, tasks=3) as (fmodel, diffopt):
        out["batched_shapes"] = [tuple(p.shape) for p in fmodel.parameters()]
        out["batched_output_shape"] = tuple(fmodel(torch.ones(3, 4, 1)).shape)
    # copy_initial_weights=True: the initial fast weights are detached copies, nothing reaches the model
    model.zero_grad()
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        diffopt.step(fmodel(x[0]).pow(2).mean())
        fmodel(x[0]).pow(2).mean().backward()
        out["copied_initial_leaves"] = all(p.is_leaf and p.grad is not None for p in fmodel.parameters(time=0))
    out["copied_no_model_grad"] = all(p.grad is None for p in model.parameters())
    # track_higher_grads=False: every step's fast weights are fresh leaves, and the loop still matches
    with higher.innerloop_ctx(model, opt, track_higher_grads=False) as (fmodel, diffopt):
        for _ in range(2):
            diffopt.step(fmodel(x[0]).pow(2).mean())
        out["untracked_leaves"] = all(p.is_leaf for p in fmodel.parameters())
        out["untracked_output"] = fmodel(x[0]).detach()
    out["model_unchanged"] = before == {
        "class": type(model).__name__,
        "ids": [id(p) for p in model.parameters()],
        "hooks": [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()],
    } and all(isinstance(m, FSDPModule) for m in (model, model[0], model[2], model[4]))
    return out


def test_fast_weights_stay_sharded(ranks):
    """Each rank holds rows_s of every rank's task(s) for each parameter; each unit is gathered with one
    all_to_all per forward; the meta-gradient lands in the sharded DTensor .grad; the model is untouched."""
    results = ranks.results("test_fsdp:_structure_worker")
    # weights and biases of Linear(1, 5), Linear(5, 7), Linear(7, 1): rows 3 + 2, 4 + 3, 1 + 0
    rows = [(3, 2), (3, 2), (4, 3), (4, 3), (1, 0), (1, 0)]
    rest = [(1,), (), (5,), (), (7,), ()]
    for rank, result in enumerate(results):
        expected = [(WORLD, r[rank], *t) for r, t in zip(rows, rest)]
        assert result["per_task_shapes"] == expected
        assert result["stepped_shapes"] == expected
        assert result["batched_shapes"] == [(3, *shape) for shape in expected]
        assert result["output_shape"] == (3, 1) and result["batched_output_shape"] == (3, 4, 1)
        assert result["forward_all_to_alls"] == 3  # one per unit that holds parameters (the root holds none)
        # each rank sends its padded shards of the whole model once: (3*1 + 3 + 4*5 + 4 + 1*7 + 1) * WORLD doubles
        assert result["forward_bytes"] == (3 + 3 + 20 + 4 + 7 + 1) * WORLD * 8
        assert result["grads"] == [(True, True, (r[rank], *t)) for r, t in zip(rows, rest)]
        assert result["model_unchanged"]
        assert result["copied_initial_leaves"] and result["copied_no_model_grad"]
        assert result["untracked_leaves"]
    # the untracked loop against one process's
    model = _model(torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.ones(3, 1)
    with higher.innerloop_ctx(model, opt, track_higher_grads=False) as (fmodel, diffopt):
        for _ in range(2):
            diffopt.step(fmodel(x).pow(2).mean())
        expected = fmodel(x).detach()
    for result in results:
        torch.testing.assert_close(result["untracked_output"], expected, rtol=1e-12, atol=1e-12)


def _options_worker(rank: int) -> Any:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    errors: dict[str, str] = {}

    def refused(name: str, error: type, model: nn.Module, opt: Any = None, **kwargs: Any) -> None:
        opt = opt or torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.raises(error) as info:
            with higher.innerloop_ctx(model, opt, copy_initial_weights=False, **kwargs):
                pass
        errors[name] = str(info.value)

    refused("param_dtype", NotImplementedError, _sharded(torch.float64, mp_policy=MixedPrecisionPolicy(torch.float32)))
    refused(
        "reduce_dtype",
        NotImplementedError,
        _sharded(torch.float64, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32)),
    )
    try:
        offloaded = _sharded(torch.float64, offload_policy=CPUOffloadPolicy())
    except Exception as error:  # noqa: BLE001 - fully_shard itself may refuse it on a CPU mesh
        errors["offload"] = f"fully_shard refused: {error}"
    else:
        refused("offload", NotImplementedError, offloaded)
    model = _sharded(torch.float64)
    refused("device", ValueError, model, device="cpu")
    refused("share_buffers", NotImplementedError, model, share_buffers=True)
    refused("initial_params", NotImplementedError, model, initial_params=[p.detach() for p in model.parameters()])
    stepped = torch.optim.Adam(model.parameters(), lr=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    stepped.step()
    refused("optimizer_state", NotImplementedError, model, stepped)
    refused("tasks_mismatch", ValueError, model, tasks=2 + rank)
    from torch.distributed.fsdp import fully_shard

    tied = _model(torch.float64)
    tied.append(nn.Linear(1, 1))
    tied[5].weight = tied[4].weight
    fully_shard(tied)
    refused("tied", NotImplementedError, tied)
    # the same mixed-precision policy that matches the parameters' dtype changes nothing: accepted
    same = _sharded(torch.float64, mp_policy=MixedPrecisionPolicy(torch.float64, torch.float64))
    with higher.innerloop_ctx(same, torch.optim.SGD(same.parameters(), lr=0.1), copy_initial_weights=False) as (
        fmodel,
        diffopt,
    ):
        diffopt.step(fmodel(torch.ones(3, 1)).pow(2).mean())
    return errors


def test_unsupported_options_raise(ranks):
    """Options that would change the arithmetic, or that the mode cannot honour, raise clear errors on every rank."""
    for errors in ranks.results("test_fsdp:_options_worker"):
        assert "MixedPrecisionPolicy(param_dtype=torch.float32)" in errors["param_dtype"]
        assert "MixedPrecisionPolicy(reduce_dtype=torch.float32)" in errors["reduce_dtype"]
        assert "CPUOffloadPolicy" in errors["offload"] or errors["offload"].startswith("fully_shard refused")
        assert "device=" in errors["device"]
        assert "share_buffers" in errors["share_buffers"]
        assert "initial_params" in errors["initial_params"]
        assert "fresh optimizer" in errors["optimizer_state"]
        assert "tasks=2, tasks=3" in errors["tasks_mismatch"]
        assert "'5.weight' is the same tensor as '4.weight' (tied weights)" in errors["tied"]


def _failing_worker(rank: int) -> Any:
    model = _sharded(torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, tasks=2) as (fmodel, diffopt):
        x = torch.ones(2, 4, 1)
        diffopt.step(_task_losses(fmodel(x), x))
        if rank == 1:
            raise FloatingPointError("rank 1: the inner loss of task 3 is nan")
        fmodel(x).pow(2).sum().backward()  # rank 0 waits in the gather for rank 1
    return "finished"


def test_an_error_on_one_rank_ends_every_rank():
    records = _run("test_fsdp:_failing_worker")
    assert not records[1]["ok"] and records[1]["type"] == "FloatingPointError"
    assert not records[0]["ok"], records[0]
    assert "rank 1 raised FloatingPointError" in records[0]["message"] and "task 3 is nan" in records[0]["message"]


def _reshard_worker(rank: int, tasks: int | None) -> Any:
    """One second-order inner step and a meta-loss, with and without FSDP's reshard_after_forward."""
    from higher import _fsdp

    out = {}
    for reshard in (True, False):
        earlier_refs = [ref for ref, _ in _fsdp._GATHERED]  # what earlier functions in this rank left (kept, so
        earlier = {id(ref) for ref in earlier_refs}  # that no new reference gets one of their ids)
        model = _sharded(torch.float64, reshard_after_forward=reshard)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.linspace(-1, 1, 6).reshape(6, 1) + rank
        if tasks:
            x = torch.stack([x * (t + 1) for t in range(tasks)])
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False, tasks=tasks) as (fmodel, diffopt):
            diffopt.step(_task_losses(fmodel(x), x.sin()) if tasks else F.mse_loss(fmodel(x), x.sin()))
            meta_loss = F.mse_loss(fmodel(x), x.cos())
            # the gathered weights of this loop alive after the forwards and the step, before backward (after a
            # moment: gloo's worker thread lets go of the last all_to_all's buffers shortly after the call returns)
            time.sleep(0.3)
            kept = sum(size for ref, size in list(_fsdp._GATHERED) if id(ref) not in earlier and not ref.expired())
            before = hd.gather_stats()["all_to_all"]
            meta_loss.backward()
            backward_all_to_alls = hd.gather_stats()["all_to_all"] - before
        out[reshard] = {
            "kept": kept,
            "backward_all_to_alls": backward_all_to_alls,
            "grads": [p.grad.to_local().clone() for p in model.parameters()],
        }
    return out


@pytest.mark.parametrize("tasks", [None, 3], ids=["per_task", "batched"])
def test_reshard_after_forward_frees_the_gathered_weights(tasks, ranks):
    """reshard_after_forward=True: no gathered weight outlives its unit's forward (autograd's saved views are
    gathered again in backward, differentiably, and so are those the inner gradient's graph saves); False: they
    are kept. The meta-gradients are bitwise equal."""
    for result in ranks.results("test_fsdp:_reshard_worker", tasks):
        assert result[True]["kept"] == 0
        # kept for backward, in each of the 2 forwards (the step's and the meta-loss's), for each of the T tasks:
        # the second Linear's weight (its 2 padded shards of 4 x 5, copied out of the unit's buffer) and the last
        # unit's buffer (2 shards of 1 x 7 + 1, plus the lockstep tag of each rank's block, per task), of
        # which the weight is a view; not the first Linear's (its input needs no gradient), in doubles
        t = tasks or 1
        assert result[False]["kept"] == 2 * (t * 2 * 4 * 5 + 2 * t * (8 + 1)) * 8
        # backward of the meta-loss: one all_to_all per unit and forward, plus, resharded, one per saved weight
        # (Linear saves its weight once), both forwards' and, second order, the step's backward's
        assert result[False]["backward_all_to_alls"] < result[True]["backward_all_to_alls"]
        for a, b in zip(result[True]["grads"], result[False]["grads"]):
            assert torch.equal(a, b)


def _divide_factor_worker(rank: int) -> Any:
    grads = {}
    for factor in (None, 1.0):
        model = _sharded(torch.float64)
        if factor is not None:
            for layer in model:
                if isinstance(layer, nn.Linear):
                    layer.set_gradient_divide_factor(factor)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.linspace(-1, 1, 4).reshape(4, 1) * (rank + 1)
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            diffopt.step(F.mse_loss(fmodel(x), x))
            F.mse_loss(fmodel(x), x.sin()).backward()
        grads[factor] = [p.grad.to_local().clone() for p in model.parameters()]
    return grads


def test_gradient_divide_factor_is_honoured(ranks):
    """FSDP averages the gradient over ranks (divides the sum by N); set_gradient_divide_factor(1.0): the sum."""
    for grads in ranks.results("test_fsdp:_divide_factor_worker"):
        for averaged, summed in zip(grads[None], grads[1.0]):
            torch.testing.assert_close(summed, averaged * WORLD, rtol=1e-14, atol=0)


def test_example_prints_the_same_on_one_and_two_ranks():
    """examples/fsdp_maml.py (learned inner lr, tasks=T): one process and `torchrun --nproc-per-node 2` agree."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    example = str(Path(__file__).resolve().parents[1] / "examples" / "fsdp_maml.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(key, None)
    runs = []
    for launcher in ([], ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]):
        done = subprocess.run(
            [sys.executable, *launcher, example, "--iterations", "3"],
            capture_output=True,
            text=True,
            timeout=240,
            env=env,
        )
        assert done.returncode == 0, done.stderr
        runs.append([line for line in done.stdout.splitlines() if line.startswith("iteration")])
    assert len(runs[0]) == 3 and runs[0] == runs[1]


def _maml_step_run(model: nn.Module, net: nn.Module) -> dict[str, Any]:
    from higher.data import SinusoidTasks

    meta_opt = torch.optim.Adam(model.parameters(), lr=0.01)
    inner_opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sampler = SinusoidTasks(shots=5, seed=3)
    losses, grads = [], []
    for _ in range(OUTER_STEPS):
        tasks = sampler.sample(TOTAL_TASKS).tasks()
        meta_opt.zero_grad()
        losses.append(hd.maml_step(net, inner_opt, tasks, F.mse_loss, inner_steps=2))
        grads.append([_full(p.grad) for p in model.parameters()])
        meta_opt.step()
    return {"losses": losses, "grads": grads, "params": [_full(p) for p in model.parameters()]}


def _maml_step_worker(rank: int) -> Any:
    model = _sharded(torch.float64)
    result = _maml_step_run(model, model)
    with pytest.raises(ValueError, match="multiple of 2 tasks") as info:
        hd.maml_step(model, torch.optim.SGD(model.parameters(), lr=0.1), [result] * 3, F.mse_loss)
    result["uneven"] = str(info.value)
    return result


def test_distributed_maml_step_equals_maml_step(ranks):
    """higher.distributed.maml_step on an FSDP model: each rank adapts its share; the one-process values."""
    model = _model(torch.float64)
    reference = _maml_step_run(model, model)  # a plain model: higher.algorithms.maml_step
    for result in ranks.results("test_fsdp:_maml_step_worker"):
        assert result["losses"] == pytest.approx(reference["losses"], rel=1e-12)
        for step in range(OUTER_STEPS):
            _assert_close(result["grads"][step], reference["grads"][step], torch.float64)
        _assert_close(result["params"], reference["params"], torch.float64)


def _ddp_worker(rank: int, mode: str) -> Any:
    net = nn.parallel.DistributedDataParallel(_model(torch.float64))
    return _meta_train(net, hd.split_tasks(TOTAL_TASKS), WORLD, mode, torch.float64, inner="adam")


@pytest.mark.parametrize("mode", ["per_task", "batched"])
def test_average_grads_gives_ddp_the_single_process_hypergradient(mode, ranks):
    """hd.average_grads([lr]) after backward: under DDP too, the lr hypergradient of the whole meta-batch."""
    results = ranks.results("test_fsdp:_ddp_worker", mode)
    _check(results, _single(mode, torch.float64, inner="adam"), torch.float64)


def _out_of_step_worker(rank: int) -> Any:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    for index in (0, 2, 4):  # units whose gathers have the same size: the backend cannot tell them apart
        fully_shard(model[index])
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.linspace(-1, 1, 12).reshape(3, 4)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(2 + rank):  # rank 1 takes one inner step more
            diffopt.step(F.mse_loss(fmodel(x), x.sin()))
        F.mse_loss(fmodel(x), x.cos()).backward()
    return "finished"


def test_ranks_out_of_lockstep_raise():
    """A rank that runs an extra inner step: both ranks raise a clear error, as soon as a gather meets another
    call of the same size (calls of different sizes are the backend's to refuse: gloo aborts the process)."""
    records = _run("test_fsdp:_out_of_step_worker")
    for record in records:
        assert not record["ok"], record
        assert "out of lockstep" in record["message"], record["message"]
