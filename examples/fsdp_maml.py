"""MAML through a model sharded with FSDP2 (``fully_shard``), with a learned inner learning rate.

The same loop as for an unsharded model: ``higher.innerloop_ctx`` on the sharded model, each rank
adapting its share of the meta-batch (``tasks=T``). The fast weights stay sharded, each layer's
full weights are gathered for its forward, and the meta-gradient arrives in the sharded ``.grad``
(and, after ``average_grads``, in the learned learning rate's), so that 1 and 2 processes print the
same numbers (to rounding: float64 here).

Run:
    python examples/fsdp_maml.py                         # one process (a 1-rank process group)
    torchrun --nproc-per-node 2 examples/fsdp_maml.py    # two processes, 8 tasks each
    python examples/fsdp_maml.py --iterations 3          # shorter (the test suite's run)
"""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard

import higher
from higher import distributed as hd
from higher.data import SinusoidTasks

TASKS = 16  # the meta-batch; divisible by the number of ranks (every rank adapts as many tasks)


def main() -> None:
    parser = argparse.ArgumentParser(description="MAML with a learned inner lr through a fully_shard model")
    parser.add_argument("--iterations", type=int, default=30, help="meta-iterations (a line after every third of them)")
    iterations = parser.parse_args().iterations
    every = max(1, iterations // 3)
    if not dist.is_initialized():  # torchrun sets these; one process makes a group of its own
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group("gloo")
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)  # the same model on every rank
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    log_lr = torch.tensor(-2.0, requires_grad=True)  # the inner learning rate, learned too
    meta_opt = torch.optim.Adam([*model.parameters(), log_lr], lr=1e-2)
    inner_opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sampler = SinusoidTasks(shots=10, seed=0)  # the same tasks on every rank
    mine = hd.split_tasks(TASKS)

    for iteration in range(iterations):
        batch = sampler.sample(TASKS)
        sx, sy, qx, qy = (
            t[mine.start : mine.stop] for t in (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        )
        meta_opt.zero_grad()
        lr = log_lr.exp()
        with higher.innerloop_ctx(
            model, inner_opt, copy_initial_weights=False, tasks=len(mine), override={"lr": [lr]}
        ) as (fmodel, diffopt):
            for _ in range(2):
                diffopt.step(F.mse_loss(fmodel(sx), sy, reduction="none").flatten(1).mean(1))
            query = F.mse_loss(fmodel(qx), qy, reduction="none").flatten(1).mean(1)
            (query.sum() * hd.task_weight(TASKS)).backward()
        hd.average_grads([log_lr])  # each rank holds its part of the learning rate's hypergradient
        meta_opt.step()
        loss = hd.mean_over_ranks(query.sum().item(), TASKS)
        if (iteration + 1) % every == 0 and dist.get_rank() == 0:
            print(f"iteration {iteration + 1}: query loss {loss:.6f}, inner lr {lr.item():.6f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
