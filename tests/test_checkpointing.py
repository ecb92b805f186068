"""checkpointed_unroll gives the full unroll's meta-gradients and hypergradients (float64, 1e-10)."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import higher

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


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))


def _data(steps: int = STEPS):
    return torch.randn(steps, 5, 3), torch.randn(steps, 5, 2), torch.randn(6, 3), torch.randn(6, 2)


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
def test_every_optimizer_matches_full_unroll(name):
    cls, kwargs = OPTIMIZERS[name]
    model = _model()
    xs, ys, xq, yq = _data()
    opt = cls(model.parameters(), **kwargs)
    lr = torch.tensor(kwargs["lr"], requires_grad=True)
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


def test_batchnorm_dropout_and_eval_mode_afterwards():
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 2))
    xs, ys, xq, yq = _data(9)
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


def test_task_batched_mode():
    tasks = 3
    model = _model()
    xs, ys = torch.randn(STEPS, tasks, 5, 3), torch.randn(STEPS, tasks, 5, 2)
    xq, yq = torch.randn(tasks, 6, 3), torch.randn(tasks, 6, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    lr = torch.full((tasks,), 0.1, requires_grad=True)
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


def test_keeps_one_segment_of_graph_and_the_latest_history_entry():
    model = _model()
    xs, ys, xq, yq = _data(16)
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
def _live() -> tuple[int, int]:
    """Live FunctionalModule objects and tensors, after a garbage collection (by type: no __class__ lookups)."""
    gc.collect()
    objects = gc.get_objects()
    fmodels = sum(issubclass(type(o), higher.patch.FunctionalModule) for o in objects)
    return fmodels, sum(issubclass(type(o), torch.Tensor) for o in objects)


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
    before = _live()
    for _ in range(5):
        meta_iteration()
    assert _live() == before
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
