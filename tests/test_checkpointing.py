"""checkpointed_unroll gives the full unroll's meta-gradients and hypergradients (float64, 1e-10).

The equalities of the numbers (every optimizer, BatchNorm and dropout, task-batched mode) and the
memory test take the ``device`` fixture (CUDA too where present: its random generator is restored
for the recomputation, and the peak is measured with ``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import higher
from live_objects import growth
from small_problems import LONG_STEPS, seeded_data, seeded_model, small_problem

STEPS = 7

OPTIMIZERS = {
    "sgd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    "adam": (torch.optim.Adam, {"lr": 0.01, "amsgrad": True}),
    "adamw": (torch.optim.AdamW, {"lr": 0.01}),
    "adagrad": (torch.optim.Adagrad, {"lr": 0.1}),
    "adadelta": (torch.optim.Adadelta, {"lr": 1.0}),
    "adamax": (torch.optim.Adamax, {"lr": 0.01}),
    "asgd": (torch.optim.ASGD, {"lr": 0.05, "t0": 2}),
    "rmsprop": (torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.5, "centered": True}),
    "rprop": (torch.optim.Rprop, {"lr": 0.01}),
    "nadam": (torch.optim.NAdam, {"lr": 0.01}),
    "radam": (torch.optim.RAdam, {"lr": 0.01}),
}


def _model(device="cpu") -> nn.Module:
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).to(device)


def _data(steps: int = STEPS, device="cpu"):
    shapes = [(steps, 5, 3), (steps, 5, 2), (6, 3), (6, 2)]
    return tuple(torch.randn(shape, device=device) for shape in shapes)


def _meta_gradients(model, opt, override, step_loss, outer, steps, checkpointed, every=None, tensors=(), **ctx):
    """Meta-gradients (model parameters) and hypergradients (``tensors``) of a full or checkpointed unroll."""
    model.zero_grad(set_to_none=True)
    for t in tensors:
        t.grad = None
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, override=override, **ctx) as (fmodel, diffopt):
        if checkpointed:
            result = higher.checkpointed_unroll(fmodel, diffopt, step_loss, steps, every=every)
        else:
            result = None
            for t in range(steps):
                diffopt.step(step_loss(fmodel, t))
        outer(fmodel).backward()
    grads = [p.grad.clone() for p in model.parameters()] + [t.grad.clone() for t in tensors]
    return grads, result


def _assert_close(a, b, tol=1e-10):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.isfinite(x).all()
        assert (x - y).abs().max().item() <= tol * max(1.0, y.abs().max().item())


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_matches_full_unroll(name, device):
    cls, kwargs = OPTIMIZERS[name]
    model = _model(device)
    xs, ys, xq, yq = _data(device=device)
    opt = cls(model.parameters(), **kwargs)
    lr = torch.tensor(kwargs["lr"], device=device, requires_grad=True)
    step_loss = lambda fmodel, t: F.mse_loss(fmodel(xs[t]), ys[t])  # noqa: E731
    outer = lambda fmodel: F.mse_loss(fmodel(xq), yq)  # noqa: E731
    full, _ = _meta_gradients(model, opt, {"lr": [lr]}, step_loss, outer, STEPS, False, tensors=[lr])
    ckpt, result = _meta_gradients(model, opt, {"lr": [lr]}, step_loss, outer, STEPS, True, every=2, tensors=[lr])
    _assert_close(ckpt, full)
    assert result.checkpoints == 3 and result.recomputations == 3  # segments 0-1, 2-3, 4-5; 6 kept
    assert lr.grad.abs().item() > 0


def test_schedules_per_parameter_values_and_hyperparameters_in_the_loss():
    model = _model()
    xs, ys, xq, yq = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    schedule = [torch.tensor(0.1 / (1 + t), requires_grad=True) for t in range(STEPS)]
    per_parameter = [torch.full_like(p, 0.9).requires_grad_() for p in model.parameters()]
    decay = torch.tensor(0.01, requires_grad=True)  # read by the step function only: found automatically
    override = {"lr": [higher.PerStep(schedule)], "momentum": [higher.PerParameter(per_parameter)]}

    def step_loss(fmodel, t):
        return F.mse_loss(fmodel(xs[t]), ys[t]) + decay * sum(p.pow(2).sum() for p in fmodel.parameters())

    outer = lambda fmodel: F.mse_loss(fmodel(xq), yq)  # noqa: E731
    tensors = [*schedule, *per_parameter, decay]
    full, _ = _meta_gradients(model, opt, override, step_loss, outer, STEPS, False, tensors=tensors)
    ckpt, _ = _meta_gradients(model, opt, override, step_loss, outer, STEPS, True, every=3, tensors=tensors)
    _assert_close(ckpt, full)
    assert all(t.grad.abs().sum() > 0 for t in tensors)


def test_batchnorm_dropout_and_eval_mode_afterwards(device):
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 2)).to(device)
    xs, ys, xq, yq = _data(9, device)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    step_loss = lambda fmodel, t: F.mse_loss(fmodel(xs[t]), ys[t])  # noqa: E731

    def outer(fmodel):
        fmodel.eval()  # uses the running statistics of the inner loop
        return F.mse_loss(fmodel(xq), yq)

    def run(checkpointed):
        torch.manual_seed(3)  # the same dropout masks
        return _meta_gradients(model, opt, None, step_loss, outer, 9, checkpointed, every=2)[0]

    buffers = [b.clone() for b in model.buffers()]
    _assert_close(run(True), run(False))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))  # the model's own are untouched


@pytest.mark.parametrize("share_buffers", [False, True])
def test_batchnorm_and_a_second_backward_pass(share_buffers):
    """A second backward pass (after retain_graph=True) through an unroll with BatchNorm failed ("modified by
    an inplace operation"): the recomputation copied the saved running statistics back in place. The
    buffers are replaced now, never written in place; the model's own (share_buffers) end as in the plain loop."""
    xs, ys, xq, yq = _data(9)
    step_loss = lambda fmodel, t: F.mse_loss(fmodel(xs[t]), ys[t])  # noqa: E731
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2))
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False, share_buffers=share_buffers) as (
            fmodel,
            diffopt,
        ):
            if checkpointed:
                higher.checkpointed_unroll(fmodel, diffopt, step_loss, 9, every=2)
            else:
                for t in range(9):
                    diffopt.step(step_loss(fmodel, t))
            fmodel.eval()
            meta_loss = F.mse_loss(fmodel(xq), yq)
            meta_loss.backward(retain_graph=True)
            meta_loss.backward()
        results.append(([p.grad.clone() for p in model.parameters()], [b.clone() for b in fmodel.buffers()]))
    _assert_close(results[1][0], results[0][0])
    _assert_close(results[1][1][:2], results[0][1][:2])  # running mean and variance
    assert torch.equal(results[1][1][2], results[0][1][2])  # num_batches_tracked


def test_task_batched_mode(device):
    tasks = 3
    model = _model(device)
    xs, ys = torch.randn(STEPS, tasks, 5, 3, device=device), torch.randn(STEPS, tasks, 5, 2, device=device)
    xq, yq = torch.randn(tasks, 6, 3, device=device), torch.randn(tasks, 6, 2, device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    lr = torch.full((tasks,), 0.1, device=device, requires_grad=True)
    step_loss = lambda fmodel, t: ((fmodel(xs[t]) - ys[t]) ** 2).mean(dim=(1, 2))  # noqa: E731
    outer = lambda fmodel: ((fmodel(xq) - yq) ** 2).mean()  # noqa: E731
    full, _ = _meta_gradients(model, opt, {"lr": [lr]}, step_loss, outer, STEPS, False, tensors=[lr], tasks=tasks)
    ckpt, _ = _meta_gradients(
        model, opt, {"lr": [lr]}, step_loss, outer, STEPS, True, every=2, tensors=[lr], tasks=tasks
    )
    _assert_close(ckpt, full)


def test_copied_initial_weights_batches_and_float32():
    torch.set_default_dtype(torch.float32)
    model = _model()
    xs, ys, xq, yq = _data(10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lr = torch.tensor(0.1, requires_grad=True)
    results = []
    for checkpointed in (False, True):
        with higher.innerloop_ctx(model, opt, override={"lr": [lr]}) as (fmodel, diffopt):
            initial = list(fmodel.parameters())
            if checkpointed:
                batches = list(zip(xs, ys))
                run = higher.checkpointed_unroll(
                    fmodel, diffopt, lambda fm, b: F.mse_loss(fm(b[0]), b[1]), batches=batches
                )
                assert run.initial_params == initial and run.steps == 10 and run.every == 4
            else:
                for t in range(10):
                    diffopt.step(F.mse_loss(fmodel(xs[t]), ys[t]))
            results.append(torch.autograd.grad(F.mse_loss(fmodel(xq), yq), [lr, *initial]))
    for a, b in zip(*results):
        assert a.dtype == torch.float32
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_non_leaf_tensor_read_by_the_step_function_must_be_declared():
    model = _model()
    xs, ys, xq, yq = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    log_scale = torch.tensor(0.0, requires_grad=True)
    scale = log_scale.exp()  # computed before the unroll: the unroll cannot recompute it
    step_loss = lambda fmodel, t: scale * F.mse_loss(fmodel(xs[t]), ys[t])  # noqa: E731
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        with pytest.raises(ValueError, match="inputs="):
            higher.checkpointed_unroll(fmodel, diffopt, step_loss, STEPS, every=2)
    grads = []
    for checkpointed in (False, True):
        with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
            if checkpointed:
                higher.checkpointed_unroll(fmodel, diffopt, step_loss, STEPS, every=2, inputs=[scale])
            else:
                for t in range(STEPS):
                    diffopt.step(step_loss(fmodel, t))
            grads.append(torch.autograd.grad(F.mse_loss(fmodel(xq), yq), log_scale, retain_graph=True)[0])
    _assert_close([grads[1]], [grads[0]])
    assert grads[0].abs() > 0


def test_keeps_one_segment_of_graph_and_the_latest_history_entry(device):
    """What the unroll keeps: the initial and final weights, one node per checkpoint and the last
    segment's graph. On CUDA the peak device memory shows it too (see _peak_cuda_memory_mib)."""
    model = _model(device)
    xs, ys, xq, yq = _data(16, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        run = higher.checkpointed_unroll(fmodel, diffopt, lambda fm, t: F.mse_loss(fm(xs[t]), ys[t]), 16)
        assert run.every == 4 and run.checkpoints == 3
        # The history holds the initial and the final fast weights only (the steps in between: None).
        history = fmodel._fast_params
        assert len(history) == 17
        assert all(a is b for a, b in zip(history[0], run.initial_params))
        assert all(a is b for a, b in zip(history[-1], run.final_params))
        assert all(entry is None for entry in history[1:-1])
        # Walking back from the final weights: the last segment's graph, then one node per checkpoint.
        names, stack, seen = [], [p.grad_fn for p in fmodel.parameters()], set()
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            names.append(type(node).__name__)
            stack.extend(n for n, _ in node.next_functions)
        assert names.count("_SegmentFunctionBackward") == 3
        F.mse_loss(fmodel(xq), yq).backward()
    assert run.recomputations == 3
    assert len(run.losses) == 16
    assert all(p.grad is not None for p in model.parameters())
    if device.type == "cuda":
        full, checkpointed, weights = (_peak_cuda_memory_mib(device, mode) for mode in ("full", "checkpointed", None))
        # Full: 32 steps of Adam's graph (measured on the CPU, float64: 140 MiB, 185 times the weights);
        # checkpointed every 4 steps: 8 checkpoints of weights and moments and one 4-step segment (40 MiB).
        assert full > 32 * weights, (full, weights)
        assert checkpointed < 0.5 * full, (checkpointed, full)


def _peak_cuda_memory_mib(device, mode, steps=32, every=4):
    """The peak CUDA memory (MiB above what was allocated before) of a full or checkpointed 32-step Adam unroll
    of a 64-256-256-64 MLP and its meta-gradient; for ``mode=None`` the size of the weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 64))
    model = model.to(device)
    if mode is None:
        return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    xs, ys = torch.randn(steps, 32, 64, device=device), torch.randn(steps, 32, 64, device=device)
    step_loss = lambda fmodel, t: F.mse_loss(fmodel(xs[t]), ys[t])  # noqa: E731

    def meta_iteration(steps):
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            if mode == "checkpointed":
                higher.checkpointed_unroll(fmodel, diffopt, step_loss, steps, every=every)
            else:
                for t in range(steps):
                    diffopt.step(step_loss(fmodel, t))
            F.mse_loss(fmodel(xs[0]), ys[0]).backward()
        model.zero_grad(set_to_none=True)

    meta_iteration(2)  # warm-up: cuBLAS's workspace and other one-time allocations stay out of the peak
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    meta_iteration(steps)
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def test_bad_arguments():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = lambda fm, t: fm(torch.randn(2, 3)).sum()  # noqa: E731
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        with pytest.raises(ValueError, match="every must be a positive integer"):
            higher.checkpointed_unroll(fmodel, diffopt, step, 4, every=0)
        with pytest.raises(ValueError, match="steps must be a non-negative integer"):
            higher.checkpointed_unroll(fmodel, diffopt, step, -1)
        with pytest.raises(ValueError, match="give steps"):
            higher.checkpointed_unroll(fmodel, diffopt, step)
        with pytest.raises(ValueError, match="only 1 batches"):
            higher.checkpointed_unroll(fmodel, diffopt, step, 3, batches=[0])
        with pytest.raises(TypeError, match="fmodel"):
            higher.checkpointed_unroll(model, diffopt, step, 3)
        with pytest.raises(TypeError, match="differentiable optimizer"):
            higher.checkpointed_unroll(fmodel, opt, step, 3)


def test_a_gradient_callback_reading_a_hyperparameter():
    """The optimizer's grad_callback runs in both passes; a tensor it reads gets its hypergradient."""
    model = _model()
    xs, ys, xq, yq = _data()
    scale = torch.tensor(0.7, requires_grad=True)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    grads = []
    for checkpointed in (False, True):
        with higher.innerloop_ctx(model, opt) as (fmodel, _):
            callback = lambda gs: tuple(g * scale for g in gs)  # noqa: E731
            diffopt = higher.get_diff_optim(opt, model.parameters(), fmodel=fmodel, grad_callback=callback)
            step_loss = lambda fm, t: F.mse_loss(fm(xs[t]), ys[t])  # noqa: E731
            if checkpointed:
                higher.checkpointed_unroll(fmodel, diffopt, step_loss, STEPS, every=2)
            else:
                for t in range(STEPS):
                    diffopt.step(step_loss(fmodel, t))
            grads.append(torch.autograd.grad(F.mse_loss(fmodel(xq), yq), scale)[0])
    _assert_close([grads[1]], [grads[0]])
    assert grads[0].abs() > 0


# ------------------------------------------------------------------ memory: nothing outlives a meta-iteration
@pytest.mark.parametrize("mode", ["backward", "grad", "retain_graph", "tasks", "returned", "never"])
def test_meta_iterations_leave_nothing_behind(mode):
    """Issue 18, item 2: every inner loop leaked (4 FunctionalModules per meta-iteration in the issue's
    repro): a segment node referred to the fmodel, which holds the final fast weights, whose graph holds
    the node: a cycle through the autograd graph's C++ side, which Python's garbage collector cannot see.
    The steps now run on a private copy that holds nothing from after the unroll between steps."""
    tasks = 3 if mode == "tasks" else None
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    lead = () if tasks is None else (tasks,)
    xs, ys = torch.randn(8, *lead, 5, 3), torch.randn(8, *lead, 5, 2)
    xq, yq = torch.randn(*lead, 6, 3), torch.randn(*lead, 6, 2)
    lr = torch.tensor(0.01, requires_grad=True)

    def step_loss(fm, t):
        return ((fm(xs[t]) - ys[t]) ** 2).flatten(-2).mean(-1) if tasks else F.mse_loss(fm(xs[t]), ys[t])

    def meta_loss():
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False, override={"lr": [lr]}, tasks=tasks) as (
            fmodel,
            diffopt,
        ):
            higher.checkpointed_unroll(fmodel, diffopt, step_loss, 8, every=2)
            return ((fmodel(xq) - yq) ** 2).mean()  # the fmodel is dropped before the backward pass

    def meta_iteration():
        if mode == "returned":
            meta_loss().backward()
            return
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False, override={"lr": [lr]}, tasks=tasks) as (
            fmodel,
            diffopt,
        ):
            higher.checkpointed_unroll(fmodel, diffopt, step_loss, 8, every=2)
            loss = ((fmodel(xq) - yq) ** 2).mean()
            if mode == "grad":
                torch.autograd.grad(loss, [*model.parameters(), lr])
            elif mode == "retain_graph":
                loss.backward(retain_graph=True)
                loss.backward()
            elif mode != "never":
                loss.backward()

    for _ in range(2):  # warm-up: caches, lazily made objects
        meta_iteration()
    assert growth(meta_iteration, 5) == (0, 0)
    if mode != "never":
        assert lr.grad is not None or mode == "grad"


def test_a_step_function_that_closes_over_the_fmodel_gets_a_clear_error():
    """The steps run on a private copy of the fmodel (the one they are called with): a step function that
    uses the fmodel given to checkpointed_unroll instead would read the weights from before the unroll."""
    model = _model()
    xs, ys, xq, yq = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        before = list(fmodel.parameters())
        with pytest.raises(RuntimeError, match="instead of the fmodel it is called with"):
            higher.checkpointed_unroll(fmodel, diffopt, lambda fm, t: F.mse_loss(fmodel(xs[t]), ys[t]), STEPS, every=2)
        # Left as before the call, and usable.
        assert all(a is b for a, b in zip(fmodel.parameters(), before)) and diffopt._steps_taken == 0
        higher.checkpointed_unroll(fmodel, diffopt, lambda fm, t: F.mse_loss(fm(xs[t]), ys[t]), STEPS, every=2)
        F.mse_loss(fmodel(xq), yq).backward()
    assert all(p.grad is not None for p in model.parameters())


# ------------------------------------------------------------------ the initial fast weights (time=0)
def _proximal(xs, ys, reg=2.0, tasks=None):
    """iMAML's inner loss: the task loss plus a proximal term towards the initial fast weights."""

    def step_loss(fm, t):
        error = (fm(xs[t]) - ys[t]) ** 2
        loss = error.flatten(-2).mean(-1) if tasks else error.mean()
        dims = (lambda d: tuple(range(1, d.dim()))) if tasks else (lambda d: tuple(range(d.dim())))
        distance = sum(((p - p0) ** 2).sum(dim=dims(p)) for p, p0 in zip(fm.parameters(), fm.parameters(time=0)))
        return loss + reg / 2 * distance

    return step_loss


@pytest.mark.parametrize("tasks", [None, 3])
@pytest.mark.parametrize("copy_initial_weights", [False, True])
def test_a_proximal_term_towards_the_initial_weights(tasks, copy_initial_weights):
    """Issue 18, item 3: fmodel.parameters(time=0) inside the step function returned the latest weights (the
    history kept only the latest entry), so a proximal term towards the initial weights silently vanished
    (meta-loss 0.5202 against 0.5053 for the plain loop). It is now the initial weights, with exact
    meta-gradients through them, forward and in the recomputation."""
    model = _model()
    lead = () if tasks is None else (tasks,)
    xs, ys = torch.randn(STEPS, *lead, 5, 3), torch.randn(STEPS, *lead, 5, 2)
    xq, yq = torch.randn(*lead, 6, 3), torch.randn(*lead, 6, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.5)
    lr = torch.tensor(0.3, requires_grad=True)
    step_loss = _proximal(xs, ys, tasks=tasks)
    results = []
    for checkpointed in (False, True):
        model.zero_grad(set_to_none=True)
        lr.grad = None
        with higher.innerloop_ctx(
            model, opt, copy_initial_weights=copy_initial_weights, override={"lr": [lr]}, tasks=tasks
        ) as (fmodel, diffopt):
            initial = list(fmodel.parameters())
            if checkpointed:
                higher.checkpointed_unroll(fmodel, diffopt, step_loss, STEPS, every=2)
            else:
                for t in range(STEPS):
                    diffopt.step(step_loss(fmodel, t))
            meta_loss = ((fmodel(xq) - yq) ** 2).mean()
            wrt = [lr, *initial] if copy_initial_weights else [lr, *model.parameters()]
            grads = torch.autograd.grad(meta_loss, wrt)
        results.append((meta_loss.detach(), grads))
    (plain_loss, plain), (loss, grads) = results
    assert abs(loss.item() - plain_loss.item()) <= 1e-10
    _assert_close(list(grads), list(plain))


def test_time_indices_during_and_after_the_unroll():
    """time=0 (and every entry from before the unroll) and the latest are kept; the steps in between raise
    TimeIndexError naming why; later steps count on from the plain loop's indices."""
    model = _model()
    xs, ys, _, _ = _data(12)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []

    def step_loss(fm, t):
        step = t + 2  # two plain steps before the unroll
        assert all(a is b for a, b in zip(fm.parameters(time=0), initial))
        assert all(a is b for a, b in zip(fm.parameters(time=1), first))
        assert all(a is b for a, b in zip(fm.parameters(time=step), fm.parameters()))
        assert all(a is b for a, b in zip(fm.parameters(time=-1), fm.parameters()))
        for time in range(3, step):
            with pytest.raises(higher.patch.TimeIndexError, match="checkpointed unroll"):
                fm.parameters(time=time)
        seen.append(t)
        return F.mse_loss(fm(xs[step]), ys[step])

    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        initial = list(fmodel.parameters())
        diffopt.step(F.mse_loss(fmodel(xs[0]), ys[0]))
        first = list(fmodel.parameters())
        diffopt.step(F.mse_loss(fmodel(xs[1]), ys[1]))
        start = list(fmodel.parameters())
        run = higher.checkpointed_unroll(fmodel, diffopt, step_loss, 8, every=3)
        assert all(a is b for a, b in zip(fmodel.parameters(time=0), initial))
        assert all(a is b for a, b in zip(fmodel.parameters(time=2), start))
        assert all(a is b for a, b in zip(fmodel.parameters(time=10), run.final_params))
        with pytest.raises(higher.patch.TimeIndexError, match=r"Kept here: time=0\.\.2, 10"):
            fmodel.parameters(time=5)
        diffopt.step(F.mse_loss(fmodel(xs[10]), ys[10]))
        assert all(a is b for a, b in zip(fmodel.parameters(time=11), fmodel.parameters()))
        F.mse_loss(fmodel(xs[11]), ys[11]).backward()
    assert seen == [*range(8), 3, 4, 5, 0, 1, 2]  # forward, then the recomputed segments (backward order)
    assert all(p.grad is not None for p in model.parameters())


def test_hooks_and_attributes_of_the_fmodel_apply_to_its_steps():
    """The private copy the steps run on has the fmodel's hooks, attributes assigned through it and modes."""
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 2))
    xs, ys, xq, yq = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    results = []
    for checkpointed in (False, True):
        model.zero_grad(set_to_none=True)
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            fmodel[1].register_forward_hook(lambda module, args, out: out * 0.5)
            fmodel[2].p = 0.0  # an attribute assigned through the fmodel
            step_loss = lambda fm, t: F.mse_loss(fm(xs[t]), ys[t])  # noqa: E731
            if checkpointed:
                higher.checkpointed_unroll(fmodel, diffopt, step_loss, STEPS, every=2)
            else:
                for t in range(STEPS):
                    diffopt.step(step_loss(fmodel, t))
            F.mse_loss(fmodel(xq), yq).backward()
        results.append([p.grad.clone() for p in model.parameters()])
    _assert_close(results[1], results[0])


# ------------------------------------------------------------------ tensors from outside the segment
@pytest.mark.parametrize("scaled", [True, False])
def test_two_hyperparameters_unpacked_from_one_tensor(scaled):
    """Found by the differential harness: ``lr, wd = h`` gives two tensors of one graph node (unbind). The segment
    told its external tensors by node, so with override={"lr": [lr], "weight_decay": [wd]} it took them for one,
    and the learning rate's hypergradient through the checkpointed segments was lost (in a repro, h.grad[0]
    -0.20 against -0.40); with lr * 1.0 they were two, but the recomputation's autograd.grad ran (and freed) the outer graph
    between them: the backward pass failed ("backward through the graph a second time"). The hyperparameters
    now enter the steps as stand-ins, and the gradient is taken there, on the recomputed graph alone."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.1)
    h = torch.tensor([0.1, 0.1], requires_grad=True)
    xs, ys, xq, yq = torch.randn(2, 6, 3), torch.randn(2, 6, 2), torch.randn(2, 6, 3), torch.randn(2, 6, 2)
    results = []
    for checkpointed in (False, True):
        model.zero_grad(set_to_none=True)
        h.grad = None
        total = 0.0
        for task in range(2):
            lr, wd = h
            override = {"lr": [lr * 1.0 if scaled else lr], "weight_decay": [wd]}
            with higher.innerloop_ctx(model, opt, copy_initial_weights=False, override=override) as (fmodel, diffopt):
                step_loss = lambda fm, t, task=task: F.mse_loss(fm(xs[task]), ys[task])  # noqa: E731
                if checkpointed:
                    inputs = [v[0] for v in override.values() if v[0].grad_fn is not None]
                    higher.checkpointed_unroll(fmodel, diffopt, step_loss, 2, every=1, inputs=inputs)
                else:
                    for t in range(2):
                        diffopt.step(step_loss(fmodel, t))
                total = total + F.mse_loss(fmodel(xq[task]), yq[task])
        (total / 2).backward()
        results.append([p.grad.clone() for p in model.parameters()] + [h.grad.clone()])
    _assert_close(results[1], results[0])
    assert (results[0][-1].abs() > 0).all()


def test_hooks_and_retained_gradients_of_hyperparameter_tensors_see_the_whole_gradient():
    """The recomputation took the gradient at the hyperparameter tensors themselves, which ran their hooks once per
    segment with that segment's part of the gradient (a hook saw three gradients instead of one; a clipping hook
    would change the result) and added those parts to a retained .grad (in a repro, 0.35 against 0.21)."""
    model = _model()
    xs, ys, xq, yq = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    log_lr = torch.tensor(-2.0, requires_grad=True)
    results = []
    for checkpointed in (False, True):
        seen = []
        log_lr.grad = None
        handle = log_lr.register_hook(lambda g, seen=seen: seen.append(g.clone()) or g.clamp(-1.0, 1.0))
        lr = log_lr.exp()
        lr.retain_grad()
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False, override={"lr": [lr]}) as (fmodel, diffopt):
            step_loss = lambda fm, t: F.mse_loss(fm(xs[t]), ys[t])  # noqa: E731
            if checkpointed:
                higher.checkpointed_unroll(fmodel, diffopt, step_loss, STEPS, every=2, inputs=lr)
            else:
                for t in range(STEPS):
                    diffopt.step(step_loss(fmodel, t))
            F.mse_loss(fmodel(xq), yq).backward()
        handle.remove()
        results.append((seen, lr.grad.clone(), log_lr.grad.clone()))
    (seen, lr_grad, log_lr_grad), (plain_seen, plain_lr_grad, plain_log_lr_grad) = results[1], results[0]
    assert len(seen) == len(plain_seen) == 1
    _assert_close([seen[0], lr_grad, log_lr_grad], [plain_seen[0], plain_lr_grad, plain_log_lr_grad])


def test_a_step_function_reading_a_tensor_and_ones_computed_from_it():
    """Tensors the step function reads itself are differentiated where they are. Where one is computed from
    another (here ``decay = 0.5 * h`` and ``h``), autograd ran the graph between them in the recomputation,
    freeing it (the backward pass failed) and counting the gradient through it twice; two made by one node
    (``a, b = w``) were taken for one (a silently lost gradient)."""
    model = _model()
    xs, ys, xq, yq = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    h = torch.tensor(0.02, requires_grad=True)
    w = torch.tensor([0.3, 0.7], requires_grad=True)
    results = []
    for checkpointed in (False, True):
        model.zero_grad(set_to_none=True)
        h.grad = w.grad = None
        decay = 0.5 * h
        a, b = w

        def step_loss(fm, t, a=a, b=b, decay=decay):
            penalty = sum(p.pow(2).sum() for p in fm.parameters())
            out = fm(xs[t])
            return a * F.mse_loss(out, ys[t]) + b * F.l1_loss(out, ys[t]) + decay * penalty + h * out.abs().mean()

        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            if checkpointed:
                higher.checkpointed_unroll(fmodel, diffopt, step_loss, STEPS, every=2, inputs=[decay, a, b])
            else:
                for t in range(STEPS):
                    diffopt.step(step_loss(fmodel, t))
            F.mse_loss(fmodel(xq), yq).backward()
        results.append([p.grad.clone() for p in model.parameters()] + [h.grad.clone(), w.grad.clone()])
    _assert_close(results[1], results[0])
    assert results[0][-2].abs() > 0 and (results[0][-1].abs() > 0).all()


# ------------------------------------------------------------------ the optimizer: schedulers, hooks, attributes
def _schedule_run(model, opt, lr, xs, ys, xq, yq, checkpointed):
    """Two unrolls of 3 steps, an ExponentialLR scheduler stepped between them and once more before the backward
    pass; the meta-gradients and the learning rates the unrolls started from."""
    model.zero_grad(set_to_none=True)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        scheduler = torch.optim.lr_scheduler.ExponentialLR(diffopt, gamma=0.5)
        given = diffopt.param_groups[0]["lr"]
        lrs = []
        for unroll in range(2):
            lrs.append(float(diffopt.param_groups[0]["lr"]))
            step_loss = lambda fm, t, unroll=unroll: F.mse_loss(fm(xs[3 * unroll + t]), ys[3 * unroll + t])  # noqa: E731
            if checkpointed:
                higher.checkpointed_unroll(fmodel, diffopt, step_loss, 3, every=1)
            else:
                for t in range(3):
                    diffopt.step(step_loss(fmodel, t))
            scheduler.step()
        F.mse_loss(fmodel(xq), yq).backward()
        assert float(diffopt.param_groups[0]["lr"]) == pytest.approx(lr * 0.25)
        assert diffopt.param_groups[0]["lr"] is given or not isinstance(given, torch.Tensor)  # its own, not a copy
    return [p.grad.clone() for p in model.parameters()], lrs


@pytest.mark.parametrize("tensor_lr", [False, True])
def test_a_scheduler_stepped_between_unrolls(tensor_lr):
    """torch's schedulers replace the optimizer's step with a wrapper bound to it (an instance attribute); the
    private copy took it over, so its steps ran the given optimizer's step and the unroll stopped with the error
    meant for a closure over the fmodel. A tensor learning rate (no gradient), which schedulers fill in place,
    was read by the recomputation after the scheduler's next step (in a repro, gradients 5% off). No warning either (the
    scheduler checks that the optimizer stepped)."""
    model = _model()
    xs, ys, xq, yq = _data()
    lr = 0.1
    opt = torch.optim.SGD(model.parameters(), lr=torch.tensor(lr) if tensor_lr else lr, momentum=0.9)
    plain, plain_lrs = _schedule_run(model, opt, lr, xs, ys, xq, yq, False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grads, lrs = _schedule_run(model, opt, lr, xs, ys, xq, yq, True)
    assert lrs == plain_lrs == pytest.approx([lr, lr / 2])
    _assert_close(grads, plain)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
@pytest.mark.parametrize("how", ["scheduler", "assignment"])
def test_changing_the_given_optimizers_hyperparameters_inside_the_step_function_is_refused(how):
    """The steps run on a private copy of the optimizer: a scheduler stepped inside the step function (or the
    step function writing diffopt.param_groups) changed the given optimizer's learning rate, which the steps never
    read (it silently stayed constant). It raises an error naming the cause and higher.PerStep now, and leaves
    the fmodel and the optimizer at the start of the segment."""
    model = _model()
    xs, ys, xq, yq = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        scheduler = torch.optim.lr_scheduler.StepLR(diffopt, step_size=1, gamma=0.5)

        def step_loss(fm, t):
            if t == 3:
                if how == "scheduler":
                    scheduler.step()
                else:
                    diffopt.param_groups[0]["lr"] = 0.05
            return F.mse_loss(fm(xs[t]), ys[t])

        with pytest.raises(RuntimeError, match=r"'lr' of parameter group 0 changed while the unroll ran.*PerStep"):
            higher.checkpointed_unroll(fmodel, diffopt, step_loss, STEPS, every=2)
        assert diffopt._steps_taken == 2 and diffopt.param_groups[0]["lr"] == 0.1
        F.mse_loss(fmodel(xq), yq).backward()  # connected to the model
    assert all(p.grad is not None for p in model.parameters())


def test_step_hooks_that_set_hyperparameters():
    """A step hook receives the private optimizer: a hyperparameter tensor it sets (here a decaying lr computed
    from the previous one) is carried from segment to segment as part of the state (it was read by the next
    segment as a tensor from before the unroll: "pass it as inputs=[...]"); hooks registered on, or removed from,
    the given optimizer after the unroll leave its recomputation as it ran (it shared their dictionaries: removing
    a hook changed the recomputed steps)."""
    model = _model()
    xs, ys, xq, yq = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lr = torch.tensor(0.1, requires_grad=True)

    def decay(o, args, kwargs):
        o.param_groups[0]["lr"] = o.param_groups[0]["lr"] * 0.9

    def halve_from_step_two(o, args, kwargs):
        if o._steps_taken == 2:
            kwargs["override"] = {"momentum": 0.5}
        return args, kwargs

    results = []
    for checkpointed in (False, True):
        model.zero_grad(set_to_none=True)
        lr.grad = None
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False, override={"lr": [lr]}) as (fmodel, diffopt):
            diffopt.register_step_post_hook(decay)
            handle = diffopt.register_step_pre_hook(halve_from_step_two)
            step_loss = lambda fm, t: F.mse_loss(fm(xs[t]), ys[t])  # noqa: E731
            if checkpointed:
                higher.checkpointed_unroll(fmodel, diffopt, step_loss, STEPS, every=2)
            else:
                for t in range(STEPS):
                    diffopt.step(step_loss(fmodel, t))
            handle.remove()
            diffopt.register_step_pre_hook(lambda o, args, kwargs: o.param_groups[0].update(lr=0.0))
            assert diffopt.param_groups[0]["momentum"] == 0.5
            assert diffopt.param_groups[0]["lr"].item() == pytest.approx(0.1 * 0.9**STEPS)
            F.mse_loss(fmodel(xq), yq).backward()
        results.append([p.grad.clone() for p in model.parameters()] + [lr.grad.clone()])
    _assert_close(results[1], results[0])


def test_methods_replaced_on_the_optimizer_instance():
    """A method replaced on the instance by one bound to the optimizer runs bound to the private copy; anything
    else is refused with an error (it would run on the given optimizer)."""
    model = _model()
    xs, ys, xq, yq = _data()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)

    def damped(self, grouped_grads, **kwargs):
        return type(self)._update(self, [[None if g is None else 0.5 * g for g in group] for group in grouped_grads])

    results = []
    for checkpointed in (False, True):
        model.zero_grad(set_to_none=True)
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            diffopt._update = types.MethodType(damped, diffopt)
            step_loss = lambda fm, t: F.mse_loss(fm(xs[t]), ys[t])  # noqa: E731
            if checkpointed:
                higher.checkpointed_unroll(fmodel, diffopt, step_loss, STEPS, every=2)
            else:
                for t in range(STEPS):
                    diffopt.step(step_loss(fmodel, t))
            F.mse_loss(fmodel(xq), yq).backward()
        results.append([p.grad.clone() for p in model.parameters()])
    _assert_close(results[1], results[0])
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        diffopt.step = lambda loss: None
        with pytest.raises(TypeError, match="method step was replaced on the instance"):
            higher.checkpointed_unroll(fmodel, diffopt, lambda fm, t: F.mse_loss(fm(xs[t]), ys[t]), 3)


def test_an_override_given_by_a_step_hook_stays_checked():
    """A hyperparameter tensor that a step hook gave by override during the unroll is, afterwards, checked by the
    given optimizer as after the plain loop (a change in place refused; the optimizer knew only the tensors from
    before the unroll, and missed it)."""
    model = _model()
    xs, ys, _, _ = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    log_lr = torch.tensor(-2.0, requires_grad=True)

    def from_step_two(o, args, kwargs):
        if o._steps_taken == 2:
            kwargs["override"] = {"lr": log_lr.exp()}
        return args, kwargs

    for checkpointed in (False, True):
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            diffopt.register_step_pre_hook(from_step_two)
            step_loss = lambda fm, t: F.mse_loss(fm(xs[t]), ys[t])  # noqa: E731
            if checkpointed:
                higher.checkpointed_unroll(fmodel, diffopt, step_loss, STEPS - 1, every=2)
            else:
                for t in range(STEPS - 1):
                    diffopt.step(step_loss(fmodel, t))
            with torch.no_grad():
                diffopt.param_groups[0]["lr"].fill_(0.5)
            with pytest.raises(RuntimeError, match="changed in place"):
                diffopt.step(step_loss(fmodel, STEPS - 1))


def test_an_override_given_by_a_step_hook_leaves_nothing_behind():
    """The private optimizer recorded the tensor of such an override (the output of a segment node, which keeps
    the private optimizer): a cycle through the autograd graph, one inner loop leaked per meta-iteration whose
    meta-loss was never backpropagated."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs, ys = torch.randn(8, 5, 3), torch.randn(8, 5, 2)
    log_lr = torch.tensor(-2.0, requires_grad=True)

    def from_step_two(o, args, kwargs):
        if o._steps_taken == 2:
            kwargs["override"] = {"lr": log_lr.exp()}
        return args, kwargs

    def meta_iteration():
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            diffopt.register_step_pre_hook(from_step_two)
            higher.checkpointed_unroll(fmodel, diffopt, lambda fm, t: F.mse_loss(fm(xs[t]), ys[t]), 8, every=2)
            F.mse_loss(fmodel(xs[0]), ys[0])  # never backpropagated

    for _ in range(2):
        meta_iteration()
    assert growth(meta_iteration, 3) == (0, 0)


# ------------------------------------------------------------------ misuse and interruption
# ------------------------------------------------------------------ checkpointed_unroll
def test_second_derivatives_through_a_checkpointed_unroll_are_refused_not_wrong():
    """create_graph=True through the segment nodes used to give a silently wrong second derivative
    (-2.65 against the plain unroll's 14.4): the recomputation differentiates without a graph."""
    xs, ys, xq, yq = seeded_data()
    model = seeded_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lr = torch.tensor(0.1, requires_grad=True)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, override={"lr": [lr]}) as (fmodel, diffopt):
        higher.checkpointed_unroll(fmodel, diffopt, lambda fm, t: F.mse_loss(fm(xs[t]), ys[t]), LONG_STEPS, every=3)
        outer = F.mse_loss(fmodel(xq), yq)
        with pytest.raises(RuntimeError, match="create_graph"):
            torch.autograd.grad(outer, lr, create_graph=True)
        # First derivatives still work afterwards (the refused backward left nothing behind).
        (g,) = torch.autograd.grad(outer, lr)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, override={"lr": [lr]}) as (fmodel, diffopt):
        for t in range(LONG_STEPS):
            diffopt.step(F.mse_loss(fmodel(xs[t]), ys[t]))
        (reference,) = torch.autograd.grad(F.mse_loss(fmodel(xq), yq), lr)
    assert abs(g.item() - reference.item()) <= 1e-12 * max(1.0, abs(reference.item()))


def test_an_interrupted_checkpointed_unroll_leaves_the_loop_connected_to_the_model():
    """A KeyboardInterrupt inside a checkpointed segment used to leave detached copies as the fast
    weights: continuing the loop then gave no meta-gradient at all (grads None). Now the fmodel and
    optimizer are back at the start of the interrupted segment, connected to the model."""
    xs, ys, xq, yq = seeded_data()
    model = seeded_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step_loss = lambda fm, t: F.mse_loss(fm(xs[t]), ys[t])  # noqa: E731

    def interrupted(fm, t):
        if t == 4:
            raise KeyboardInterrupt
        return step_loss(fm, t)

    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        with pytest.raises(KeyboardInterrupt):
            higher.checkpointed_unroll(fmodel, diffopt, interrupted, LONG_STEPS, every=3)
        assert fmodel.track_higher_grads and not diffopt._first_order
        done = diffopt._steps_taken
        assert done == 3  # the completed segment (steps 0-2); the interrupted one (3-5) is undone
        for t in range(done, LONG_STEPS):
            diffopt.step(step_loss(fmodel, t))
        resumed = torch.autograd.grad(F.mse_loss(fmodel(xq), yq), list(model.parameters()), allow_unused=True)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for t in range(LONG_STEPS):
            diffopt.step(step_loss(fmodel, t))
        reference = torch.autograd.grad(F.mse_loss(fmodel(xq), yq), list(model.parameters()))
    for a, b in zip(resumed, reference):
        assert a is not None
        assert (a - b).abs().max().item() <= 1e-12


def test_checkpointed_unroll_under_no_grad_gets_a_clear_error():
    model, opt, inner, _ = small_problem()
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        with torch.no_grad(), pytest.raises(RuntimeError, match="no_grad"):
            higher.checkpointed_unroll(fmodel, diffopt, lambda fm, t: inner(fm, [0.0]), 9)


def test_checkpointed_unroll_inputs_one_tensor_or_a_sequence_of_tensors():
    """inputs=tensor used to be iterated over (a 1-d tensor became its elements, and the error then
    asked for the very tensor given); a non-tensor raised AttributeError 'grad_fn'."""
    xs, ys, xq, yq = seeded_data()
    model = seeded_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    log_scale = torch.zeros(2, requires_grad=True)
    scale = log_scale.exp()  # non-leaf, computed before the unroll
    step_loss = lambda fm, t: (scale * (fm(xs[t]) - ys[t]).pow(2)).mean()  # noqa: E731
    grads = []
    for inputs in (None, [scale], scale):
        with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
            if inputs is None:
                for t in range(LONG_STEPS):
                    diffopt.step(step_loss(fmodel, t))
            else:
                higher.checkpointed_unroll(fmodel, diffopt, step_loss, LONG_STEPS, every=3, inputs=inputs)
            grads.append(torch.autograd.grad(F.mse_loss(fmodel(xq), yq), log_scale, retain_graph=True)[0])
    assert grads[0].abs().max() > 0
    for g in grads[1:]:
        assert (g - grads[0]).abs().max().item() <= 1e-12
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        with pytest.raises(TypeError, match=r"inputs\[0\] must be a tensor"):
            higher.checkpointed_unroll(fmodel, diffopt, step_loss, LONG_STEPS, inputs=[0.5])
