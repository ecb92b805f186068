"""torch.compile of meta-iterations written with the public API (higher.compiled).

Every compiled result is compared with the same function run eagerly (the eager fmodel and
optimizer, themselves tested against torch.optim and hand-written unrolls elsewhere). Most tests
use the ``aot_eager`` backend: dynamo and AOTAutograd trace exactly as for the default backend
(one graph, the joint forward/backward), without the minutes of C++ compilation; two tests run
the default backend (inductor) end to end, and the differential harness (tests/differential)
compiles generated problems with it. Tests of what dynamo alone decides (how many graphs, when it
recompiles, what the traced code writes, which tensors the traced fmodel runs with) use the
``eager`` backend (:data:`DYNAMO_ONLY`): the same capture, its graph run as it is, in half the time
AOTAutograd's joint trace of a second-order meta-iteration takes; the joint trace of the same inner
loops is tested by the ``aot_eager`` tests.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import higher
from torch_versions import needs_compile

pytestmark = needs_compile

TOLERANCE = dict(rtol=1e-5, atol=1e-6)

#: The backend of the tests of what dynamo alone decides (see the module docstring).
DYNAMO_ONLY = "eager"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Compiled code and counters of one test are not seen by the next; float32 as users compile."""
    torch.compiler.reset()
    counters.clear()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(previous)
    torch.compiler.reset()


def sine_mlp() -> nn.Module:
    """The smallest model that covers the traced code paths: two fast-weight layers around an
    activation (the trace grows with every layer and every step; :func:`deep_mlp` covers depth)."""
    return nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Linear(16, 1))


def deep_mlp() -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(1, 8), nn.Tanh()]
    for _ in range(3):
        layers += [nn.Linear(8, 8), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(8, 1))


def sine_tasks(tasks: int, shots: int = 5, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    amplitude = torch.rand(tasks, 1, 1, generator=g) * 4.9 + 0.1
    phase = torch.rand(tasks, 1, 1, generator=g) * 3.14
    x = torch.rand(tasks, 2 * shots, 1, generator=g) * 10 - 5
    y = amplitude * torch.sin(x + phase)
    return x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:]


task_losses = torch.func.vmap(F.mse_loss)


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=0.01)
    return getattr(torch.optim, name)(model.parameters(), lr=0.01)


def batched_meta_iteration(model, opt, data, steps=2, closure=True, lr=None, **ctx):
    sx, sy, qx, qy = data
    tasks = sx.shape[0]
    override = None if lr is None else {"lr": [lr]}
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, tasks=tasks, override=override, **ctx) as (
        fmodel,
        diffopt,
    ):
        for _ in range(steps):
            if closure:
                diffopt.step(closure=lambda: task_losses(fmodel(sx), sy))
            else:
                diffopt.step(task_losses(fmodel(sx), sy))
        return task_losses(fmodel(qx), qy).mean()


def per_task_meta_iteration(model, opt, data, steps=2, closure=True, lr=None, **ctx):
    sx, sy, qx, qy = data
    tasks = sx.shape[0]
    override = None if lr is None else {"lr": [lr]}
    total = 0.0
    for t in range(tasks):
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False, override=override, **ctx) as (
            fmodel,
            diffopt,
        ):
            for _ in range(steps):
                if closure:
                    diffopt.step(closure=lambda t=t: F.mse_loss(fmodel(sx[t]), sy[t]))
                else:
                    diffopt.step(F.mse_loss(fmodel(sx[t]), sy[t]))
            total = total + F.mse_loss(fmodel(qx[t]), qy[t]) / tasks
    return total


def gradients(function, model, *inputs) -> list[torch.Tensor]:
    """The meta-loss's gradients with respect to the model's parameters and the extra inputs."""
    loss = function()
    targets = [*model.parameters(), *inputs]
    return list(torch.autograd.grad(loss, targets, allow_unused=True))


def assert_close_lists(actual, expected) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a is not None and e is not None
        torch.testing.assert_close(a, e, **TOLERANCE)


def unique_graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "per_task"])
def test_compiled_meta_gradients_and_hypergradients_equal_eager(optimizer, first_order, batched):
    model = sine_mlp()
    opt = make_optimizer(optimizer, model)
    data = sine_tasks(4 if batched else 2)
    lr = torch.tensor(0.03, requires_grad=True)
    iteration = batched_meta_iteration if batched else per_task_meta_iteration

    def run():
        return iteration(model, opt, data, lr=lr, first_order=first_order)

    expected = gradients(run, model, lr)
    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    actual = gradients(compiled, model, lr)
    assert_close_lists(actual, expected)
    assert actual[-1].abs() > 0  # the learning rate's hypergradient is there (and equal to eager's)
    assert unique_graphs() == 1


@pytest.mark.parametrize("make_model", [sine_mlp, deep_mlp], ids=["sine", "deep"])
def test_no_recompilation_over_meta_iterations(make_model):
    """New data, updated weights (a meta-optimizer step) and a new lr value: the same graph."""
    model = make_model()
    opt = make_optimizer("adam", model)
    meta_opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def run(data, lr):
        return batched_meta_iteration(model, opt, data, steps=2, lr=lr)

    compiled = torch.compile(run, fullgraph=True, backend=DYNAMO_ONLY)
    for iteration in range(4):
        data = sine_tasks(5, seed=iteration)
        lr = torch.tensor(0.01 * (iteration + 1), requires_grad=True)
        expected = gradients(lambda data=data, lr=lr: run(data, lr), model, lr)
        meta_opt.zero_grad()
        loss = compiled(data, lr)
        loss.backward()
        actual = [p.grad for p in model.parameters()] + [lr.grad]
        assert_close_lists(actual, expected)
        meta_opt.step()
    assert unique_graphs() == 1
    assert counters["stats"]["calls_captured"] > 0


def test_compiled_with_inductor_matches_eager(device):
    """The default backend, end to end (C++ kernels on the CPU, triton on CUDA), on the batched sine workload with Adam."""
    model = sine_mlp().to(device)
    opt = make_optimizer("adam", model)
    data = tuple(t.to(device) for t in sine_tasks(4))

    def run():
        return batched_meta_iteration(model, opt, data, steps=2)

    expected = gradients(run, model)
    compiled = torch.compile(run, fullgraph=True)
    assert_close_lists(gradients(compiled, model), expected)
    assert_close_lists(gradients(compiled, model), expected)
    assert unique_graphs() == 1


@pytest.mark.parametrize("name", ["sgd_weight_decay", "radam"])
def test_per_task_inner_steps_under_inductor_match_eager(name, device):
    """torch 2.13's inductor fuses ``add(x, mm(a, b), alpha=c)`` into ``addmm(x, a, b)``, dropping ``c``
    (pytorch/pytorch#167313): a compiled per-task SGD step took ``p - g`` instead of ``p - lr g`` (meta-loss
    209.3 against 6.77 in the report), L2 weight decay added ``p`` instead of ``wd p``, and RAdam's first
    step (``lerp`` from zeros, which inductor decomposes into such an add) lost ``1 - beta1`` (found by the
    differential harness). higher.compiled guards the fusion while it traces an inner loop."""
    model = sine_mlp().to(device)
    if name == "radam":
        opt = torch.optim.RAdam(model.parameters(), lr=0.03)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.1)
    data = tuple(t.to(device) for t in sine_tasks(2))

    def run():
        return per_task_meta_iteration(model, opt, data, steps=1, closure=False)

    expected = gradients(run, model)
    assert_close_lists(gradients(torch.compile(run, fullgraph=True), model), expected)


def test_the_addmm_fusion_guard_keeps_alpha():
    """The guard itself, on the two graphs that showed the bug: an add with alpha and a lerp from zeros."""
    higher.compiled._guard_addmm_fusion()
    p, a, b = torch.randn(8, 8), torch.randn(8, 4), torch.randn(4, 8)
    cases = [
        lambda p, a, b: p.add(a @ b, alpha=-0.1),
        lambda p, a, b: (a @ b).add(p, alpha=0.3),
        lambda p, a, b: p - torch.lerp(torch.zeros_like(p), a @ b, 0.1) * 0.3,
        lambda p, a, b: p + a @ b,  # alpha 1: still fused, still right
    ]
    for case in cases:
        torch.compiler.reset()
        torch.testing.assert_close(torch.compile(case)(p, a, b), case(p, a, b))


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "per_task"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_step_with_loss_is_one_graph_too(batched, optimizer):
    """The plain ``diffopt.step(loss)`` of 0.2.1 programs: one graph with dynamo's default settings."""
    model = sine_mlp()
    opt = make_optimizer(optimizer, model)
    data = sine_tasks(2)
    lr = torch.tensor(0.02, requires_grad=True)
    iteration = batched_meta_iteration if batched else per_task_meta_iteration

    def run():
        return iteration(model, opt, data, closure=False, lr=lr)

    expected = gradients(run, model, lr)
    compiled = torch.compile(run, fullgraph=True, backend=DYNAMO_ONLY)
    assert_close_lists(gradients(compiled, model, lr), expected)
    assert_close_lists(gradients(compiled, model, lr), expected)
    assert unique_graphs() == 1
    assert not torch._dynamo.config.trace_autograd_ops  # the user's configuration is left alone


class Recording(nn.Linear):
    """A layer that records every attribute write made to it."""

    writes: list[str] = []

    def __setattr__(self, name, value):
        Recording.writes.append(name)
        super().__setattr__(name, value)


def test_compiled_inner_loop_never_writes_the_model():
    model = nn.Sequential(Recording(1, 8), nn.Tanh(), Recording(8, 1))
    params = [p for p in model.parameters()]
    values = [p.detach().clone() for p in params]
    opt = make_optimizer("sgd", model)
    data = sine_tasks(2)
    compiled = torch.compile(lambda: batched_meta_iteration(model, opt, data), fullgraph=True, backend=DYNAMO_ONLY)
    Recording.writes.clear()
    for _ in range(2):
        compiled().backward()
    assert Recording.writes == []
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    assert dict(model[0].__dict__["_parameters"]) == {"weight": params[0], "bias": params[1]}


def test_batchnorm_buffers_and_fast_weight_history():
    """Running statistics are the fmodel's copies, updated as eagerly; parameters(time=...) works."""
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    opt = make_optimizer("sgd", model)
    x, y = torch.randn(4, 6, 3), torch.randn(4, 6, 1)
    running_mean = model[1].running_mean.clone()

    def run():
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False, tasks=4) as (fmodel, diffopt):
            for _ in range(2):
                diffopt.step(closure=lambda: task_losses(fmodel(x), y))
            stats = dict(fmodel.named_buffers())["1.running_mean"]
            first = list(fmodel.parameters(time=0))[0]
            return task_losses(fmodel(x), y).mean(), stats, first

    loss_e, stats_e, first_e = run()
    expected = torch.autograd.grad(loss_e, list(model.parameters()))
    loss_c, stats_c, first_c = torch.compile(run, fullgraph=True, backend="aot_eager")()
    assert_close_lists(torch.autograd.grad(loss_c, list(model.parameters())), expected)
    torch.testing.assert_close(stats_c, stats_e)
    torch.testing.assert_close(first_c, first_e)
    assert not torch.equal(stats_c[0], running_mean)  # the statistics moved, in the fmodel's copy
    assert torch.equal(model[1].running_mean, running_mean)  # not in the model


def test_eager_only_fmodel_features_raise_a_clear_error_under_compile():
    model = sine_mlp()
    opt = make_optimizer("sgd", model)

    def run(x):
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            return fmodel.state_dict()

    with pytest.raises(Exception, match="not available while torch.compile traces the inner loop"):
        torch.compile(run, fullgraph=True, backend="aot_eager")(torch.randn(2, 1))


@pytest.mark.parametrize("form", ["keyword", "positional"])
def test_closure_eagerly_is_step_on_its_loss(form):
    """step(closure=f) and torch.optim's step(f) are step(f()) when nothing is being compiled."""
    torch.manual_seed(1)
    model = sine_mlp()
    opt = make_optimizer("adam", model)
    sx, sy, _, _ = sine_tasks(1)
    results = []
    for use_closure in (False, True):
        with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
            for _ in range(3):
                if not use_closure:
                    diffopt.step(F.mse_loss(fmodel(sx[0]), sy[0]))
                elif form == "keyword":
                    diffopt.step(closure=lambda: F.mse_loss(fmodel(sx[0]), sy[0]))
                else:
                    diffopt.step(lambda: F.mse_loss(fmodel(sx[0]), sy[0]))
            results.append(list(fmodel.parameters()))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_step_needs_exactly_one_of_loss_and_closure():
    model = sine_mlp()
    with higher.innerloop_ctx(model, make_optimizer("sgd", model)) as (fmodel, diffopt):
        loss = fmodel(torch.randn(3, 1)).sum()
        with pytest.raises(TypeError, match="either the loss"):
            diffopt.step()
        with pytest.raises(TypeError, match="not both"):
            diffopt.step(loss, closure=lambda: loss)


ALL_OPTIMIZERS = ["SGD", "Adam", "AdamW", "Adadelta", "Adamax", "ASGD", "RMSprop", "Rprop", "NAdam", "RAdam"]


@pytest.mark.parametrize("name", ALL_OPTIMIZERS)
def test_every_optimizer_compiles_to_one_graph_with_eager_meta_gradients(name):
    model = sine_mlp()
    opt = make_optimizer(name, model)
    data = sine_tasks(3)

    def run():  # 2 inner steps: the second reads the state the first wrote
        return batched_meta_iteration(model, opt, data, steps=2)

    expected = gradients(run, model)
    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    assert_close_lists(gradients(compiled, model), expected)
    assert unique_graphs() == 1


def test_tensor_step_counts_of_a_warm_start_are_refused_under_compile():
    """Adagrad makes its state (a tensor step count) at construction; reading it would split the graph."""
    model = sine_mlp()
    opt = torch.optim.Adagrad(model.parameters(), lr=0.1)
    data = sine_tasks(2)
    with pytest.raises(Exception, match="step count tensor copied from the torch optimizer"):
        torch.compile(lambda: batched_meta_iteration(model, opt, data), fullgraph=True, backend="aot_eager")()


@pytest.mark.parametrize("copy_initial_weights", [True, False])
@pytest.mark.parametrize("track_higher_grads", [True, False])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "per_task"])
def test_initial_weights_and_tracking_options_as_eagerly(copy_initial_weights, track_higher_grads, batched):
    """Copied initial weights (hyperparameter optimization: the hypergradient of lr, no meta-gradient
    to the model) and track_higher_grads=False (fresh weights every step) compile and give eager's
    values and gradients, also when the fast weights are returned from the compiled function."""
    model = sine_mlp()
    opt = make_optimizer("adam", model)
    sx, sy, _, _ = sine_tasks(3)
    lr = torch.tensor(0.02, requires_grad=True)

    def run():
        kwargs = dict(tasks=3) if batched else {}
        x, y = (sx, sy) if batched else (sx[0], sy[0])
        loss_fn = task_losses if batched else F.mse_loss
        with higher.innerloop_ctx(
            model,
            opt,
            copy_initial_weights=copy_initial_weights,
            track_higher_grads=track_higher_grads,
            override={"lr": [lr]},
            **kwargs,
        ) as (fmodel, diffopt):
            for _ in range(2):
                diffopt.step(loss_fn(fmodel(x), y))
            return loss_fn(fmodel(x), y).mean(), list(fmodel.parameters(time=0)), list(fmodel.parameters())

    def outcome(function):
        loss, initial, latest = function()
        grads = torch.autograd.grad(loss, [*model.parameters(), lr], allow_unused=True)
        return loss.detach(), [t.detach() for t in initial + latest], grads

    loss_e, weights_e, grads_e = outcome(run)
    loss_c, weights_c, grads_c = outcome(torch.compile(run, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(loss_c, loss_e, **TOLERANCE)
    assert_close_lists(weights_c, weights_e)
    for c, e in zip(grads_c, grads_e):
        assert (c is None) == (e is None)
        if e is not None:
            torch.testing.assert_close(c, e, **TOLERANCE)
    # The meta-gradient reaches the model only from its own weights through a tracked unroll.
    assert (grads_e[0] is None) == (copy_initial_weights or not track_higher_grads)
    assert (grads_e[-1] is None) == (not track_higher_grads)  # the hypergradient needs the tracked graph


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "per_task"])
def test_parameter_groups_frozen_and_unused_parameters_as_eagerly(batched):
    """Two groups with their own options, a frozen layer and a trainable parameter the loss never
    uses (skipped by the step, as torch.optim skips it)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(1, 8)
            self.head = nn.Linear(8, 1)
            self.unused = nn.Parameter(torch.ones(3))
            self.body.bias.requires_grad_(False)

        def forward(self, x):
            return self.head(torch.tanh(self.body(x)))

    model = Net()
    opt = torch.optim.Adam(
        [
            {"params": [model.body.weight, model.body.bias], "lr": 0.05, "weight_decay": 0.1},
            {"params": [*model.head.parameters(), model.unused], "lr": 0.01},
        ]
    )
    iteration = batched_meta_iteration if batched else per_task_meta_iteration
    data = sine_tasks(2)

    def run():
        return iteration(model, opt, data, steps=2)

    trainable = [p for p in model.parameters() if p.requires_grad]

    def grads(function):
        return torch.autograd.grad(function(), trainable, allow_unused=True)

    expected = grads(run)
    actual = grads(torch.compile(run, fullgraph=True, backend="aot_eager"))
    assert expected[[p is model.unused for p in trainable].index(True)] is None
    for a, e in zip(actual, expected):
        assert (a is None) == (e is None)
        if e is not None:
            torch.testing.assert_close(a, e, **TOLERANCE)


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "per_task"])
def test_tied_weights_shared_submodules_and_buffers_as_eagerly(batched):
    """A parameter registered under two names (weight tying), a submodule reached by two attributes
    and BatchNorm's running statistics: the traced fmodel puts each fast weight into every place the
    model holds it, as the eager fmodel does, and leaves the model's own tensors in place."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.encode = nn.Linear(4, 4, bias=False)
            self.decode = nn.Linear(4, 4, bias=False)
            self.decode.weight = self.encode.weight  # tied: one Parameter, two names
            self.mix = nn.Linear(4, 4)
            self.again = self.mix  # one submodule, two attributes
            self.norm = nn.BatchNorm1d(4)
            self.head = nn.Linear(4, 1)

        def forward(self, x):
            h = torch.tanh(self.norm(self.encode(x.expand(*x.shape[:-1], 4))))
            return self.head(self.decode(torch.tanh(self.again(self.mix(h)))))

    model = Net()
    originals = {name: t for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    iteration = batched_meta_iteration if batched else per_task_meta_iteration
    data = sine_tasks(2)

    def run():
        return iteration(model, opt, data, steps=2)

    expected = gradients(run, model)
    assert_close_lists(gradients(torch.compile(run, fullgraph=True, backend=DYNAMO_ONLY), model), expected)
    assert unique_graphs() == 1
    now = {name: t for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]}
    assert now.keys() == originals.keys() and all(now[k] is originals[k] for k in now)


def test_backward_inside_the_compiled_function():
    """higher.compiled.backward(loss) in the compiled function: eager's meta-gradients in .grad,
    accumulated as loss.backward() accumulates them, with the hypergradient of an override tensor."""
    model = sine_mlp()
    opt = make_optimizer("adam", model)
    data = sine_tasks(4)
    lr = torch.tensor(0.03, requires_grad=True)

    def meta_iteration():
        loss = batched_meta_iteration(model, opt, data, lr=lr)
        higher.compiled.backward(loss)
        return loss.detach()

    targets = [*model.parameters(), lr]
    expected = torch.autograd.grad(batched_meta_iteration(model, opt, data, lr=lr), targets)
    meta_iteration()  # eagerly it is loss.backward()
    assert_close_lists([t.grad for t in targets], expected)
    for t in targets:
        t.grad = None
    compiled = torch.compile(meta_iteration, fullgraph=True, backend="aot_eager")
    compiled()
    assert_close_lists([t.grad for t in targets], expected)
    compiled()
    assert_close_lists([t.grad for t in targets], [2 * e for e in expected])
    assert not torch._dynamo.config.trace_autograd_ops


def test_importing_higher_does_not_import_dynamo():
    """Compile support costs nothing at import (torch._dynamo takes as long to import as torch)."""
    import subprocess
    import sys

    code = "import sys, higher; assert 'torch._dynamo' not in sys.modules, 'higher imported torch._dynamo'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_initial_params_and_refused_batched_options_as_eagerly():
    """initial_params by name (a hypernetwork's output: its hypergradient flows back) compiles as
    eagerly; in task-batched mode it is refused with the eager error."""
    model = sine_mlp()
    opt = make_optimizer("sgd", model)
    sx, sy, _, _ = sine_tasks(1)
    scale = torch.tensor(1.5, requires_grad=True)

    def run():
        start = {"0.weight": model[0].weight * scale}
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False, initial_params=start) as (fmodel, diffopt):
            for _ in range(2):
                diffopt.step(F.mse_loss(fmodel(sx[0]), sy[0]))
            return F.mse_loss(fmodel(sx[0]), sy[0])

    expected = gradients(run, model, scale)
    assert_close_lists(gradients(torch.compile(run, fullgraph=True, backend="aot_eager"), model, scale), expected)

    def batched_with_initial_params():
        with higher.innerloop_ctx(model, opt, tasks=2, initial_params=list(model.parameters())) as (fmodel, _):
            return fmodel(sx.expand(2, -1, -1)).sum()

    with pytest.raises(NotImplementedError, match="not available in task-batched mode"):
        batched_with_initial_params()
    with pytest.raises(Exception, match="not available in task-batched mode"):
        torch.compile(batched_with_initial_params, fullgraph=True, backend="aot_eager")()


def test_step_under_no_grad_is_refused_under_compile_with_the_eager_message():
    model = sine_mlp()
    opt = make_optimizer("sgd", model)
    sx, sy, _, _ = sine_tasks(2)

    def run():
        with higher.innerloop_ctx(model, opt, tasks=2) as (fmodel, diffopt):
            with torch.no_grad():
                diffopt.step(task_losses(fmodel(sx), sy))
            return fmodel(sx).sum()

    with pytest.raises(Exception, match=r"was called under torch.no_grad\(\)"):
        torch.compile(run, fullgraph=True, backend="aot_eager")()


@pytest.mark.parametrize("use", ["index", "len", "iterate"])
def test_submodule_views_by_index_raise_the_clear_error_under_compile(use):
    """fmodel[0], len(fmodel), iter(fmodel) work eagerly on a Sequential; compiled they name the fix, not a TypeError."""
    model = sine_mlp()
    opt = make_optimizer("sgd", model)
    uses = {"index": lambda f: f[0], "len": lambda f: len(f), "iterate": lambda f: list(f)}

    def run(x):
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            uses[use](fmodel)
            return fmodel(x).sum()

    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        uses[use](fmodel)  # eagerly these are the Sequential's own
    expected = "not available while torch.compile traces the inner loop"
    if use == "iterate" and torch.__version__ < "2.13":  # dynamo 2.11 refuses list() of an object, its own words
        expected = "does not know how to trace builtin operator `list` with argument types .'TracedFunctionalModule'"
    with pytest.raises(Exception, match=expected):
        torch.compile(run, fullgraph=True, backend="aot_eager")(torch.randn(2, 1))
