"""imaml_step: the task-batched path (batched=True) against the per-task one, damping against its
closed form, and the conjugate-gradient report (IMAMLResult)."""

import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import higher
from higher.algorithms import IMAMLResult, imaml_step


def tanh_net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def sine_tasks(num: int, shots: int = 6, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(num):
        w = torch.randn(2, 1, generator=generator, dtype=torch.float64)
        sx = torch.randn(shots, 2, generator=generator, dtype=torch.float64)
        qx = torch.randn(shots, 2, generator=generator, dtype=torch.float64)
        tasks.append((sx, torch.sin(sx @ w), qx, torch.sin(qx @ w)))
    return tasks


def grad_of(p: torch.Tensor) -> torch.Tensor:
    assert p.grad is not None
    return p.grad.clone()


def stack(tasks):
    return tuple(torch.stack(parts) for parts in zip(*tasks))


def meta_gradient(optimizer, tasks, batched, **options):
    torch.manual_seed(3)
    model = tanh_net()
    inner_opt = optimizer(model.parameters())
    result = imaml_step(model, inner_opt, stack(tasks) if batched else tasks, F.mse_loss, batched=batched, **options)
    return result, [grad_of(p) for p in model.parameters()]


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1),
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "rprop": lambda params: torch.optim.Rprop(params, lr=0.01),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("damping", [0.0, 3.0])
def test_batched_imaml_step_equals_the_per_task_path_in_float64(name, damping):
    """Same meta-gradient, losses, residuals, CG iterations and inner gradient norms, task by task."""
    tasks = sine_tasks(5)
    options = {"inner_steps": 4, "reg": 2.0, "cg_iterations": 6, "cg_damping": damping}
    per_task, grads_a = meta_gradient(OPTIMIZERS[name], tasks, batched=False, **options)
    batched, grads_b = meta_gradient(OPTIMIZERS[name], tasks, batched=True, **options)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    assert any(float(g.abs().max()) > 1e-3 for g in grads_a)
    assert float(batched) == pytest.approx(float(per_task), rel=1e-12)
    assert batched.losses == pytest.approx(per_task.losses, rel=1e-12)
    assert batched.cg_iterations == per_task.cg_iterations
    assert batched.residuals == pytest.approx(per_task.residuals, rel=1e-6, abs=1e-14)
    assert batched.inner_gradient_norms == pytest.approx(per_task.inner_gradient_norms, rel=1e-9)


def test_batched_conjugate_gradient_stops_each_task_at_its_own_tolerance():
    """Tasks converge after different numbers of CG iterations; a converged task is frozen while the
    others go on, so its result is what the per-task solve (which stops there) gives."""
    tasks = sine_tasks(4, seed=1)
    options = {"inner_steps": 3, "reg": 5.0, "cg_iterations": 40, "tol": 1e-6}
    per_task, grads_a = meta_gradient(OPTIMIZERS["sgd"], tasks, batched=False, **options)
    batched, grads_b = meta_gradient(OPTIMIZERS["sgd"], tasks, batched=True, **options)
    assert len(set(per_task.cg_iterations)) > 1  # the tasks stop at different iterations
    assert max(per_task.cg_iterations) < 40 and per_task.converged and batched.converged
    assert batched.cg_iterations == per_task.cg_iterations
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_damping_gives_the_damped_closed_form():
    """Linear least squares: theta* = (X'X + reg I)^-1 (X'y + reg phi) (the inner loop is undamped), and
    the damped meta-gradient is (reg + c) (X'X + (reg + c) I)^-1 g, c = cg_damping, on both paths."""
    torch.manual_seed(0)
    reg, damping = 2.0, 5.0
    loss_fn = lambda pred, y: 0.5 * (pred.squeeze(-1) - y).pow(2).sum()  # noqa: E731
    tasks = [
        tuple(torch.randn(*shape, dtype=torch.float64) for shape in ((6, 4), (6,), (5, 4), (5,))) for _ in range(3)
    ]
    model = nn.Linear(4, 1, bias=False).double()
    phi = model.weight.detach().clone().squeeze(0)
    expected = torch.zeros(4, dtype=torch.float64)
    for x, y, xq, yq in tasks:
        theta = torch.linalg.solve(x.T @ x + reg * torch.eye(4, dtype=torch.float64), x.T @ y + reg * phi)
        damped = x.T @ x + (reg + damping) * torch.eye(4, dtype=torch.float64)
        expected += (reg + damping) * torch.linalg.solve(damped, xq.T @ (xq @ theta - yq)) / len(tasks)
    for batched in (False, True):
        model.weight.grad = None
        inner_opt = torch.optim.SGD(model.parameters(), lr=0.02)
        given = stack(tasks) if batched else tasks
        options = {"inner_steps": 1500, "reg": reg, "cg_iterations": 20, "cg_damping": damping}
        result = imaml_step(model, inner_opt, given, loss_fn, batched=batched, **options)
        torch.testing.assert_close(grad_of(model.weight).squeeze(0), expected, rtol=1e-8, atol=1e-10)
        assert result.converged and max(result.inner_gradient_norms) < 1e-8


def test_the_result_reports_an_unconverged_solve_and_is_still_the_mean_loss():
    tasks = sine_tasks(3, seed=2)
    for batched in (False, True):
        short, _ = meta_gradient(OPTIMIZERS["sgd"], tasks, batched, inner_steps=2, reg=5.0, cg_iterations=1)
        assert isinstance(short, float) and isinstance(short, IMAMLResult)
        assert float(short) == pytest.approx(sum(short.losses) / 3, rel=1e-12) and short.loss == float(short)
        assert short.cg_iterations == [1, 1, 1] and not short.converged
        assert short.max_residual == max(short.residuals) > short.tol
        assert all(r > 1e-3 for r in short.residuals)  # one CG iteration on 33 unknowns is far from a solve
        long, _ = meta_gradient(OPTIMIZERS["sgd"], tasks, batched, inner_steps=2, reg=5.0, cg_iterations=60, tol=1e-8)
        assert long.converged and long.max_residual <= 1e-8 and all(n < 60 for n in long.cg_iterations)
        assert "max_residual" in repr(short)
    copy = pickle.loads(pickle.dumps(short))
    assert copy == short and copy.residuals == short.residuals and copy.tol == short.tol


def test_the_residual_is_the_residual_of_the_system_solved():
    """residuals[i] = |(H + (reg + c) I) v - g| / |g| recomputed from the meta-gradient, c = cg_damping
    (reg v... is what the meta-gradient accumulates, so v = grad / (reg + c) with one task)."""
    reg, damping = 1.5, 0.5
    (task,) = sine_tasks(1, seed=4)
    for batched in (False, True):
        torch.manual_seed(3)
        model = tanh_net()
        inner_opt = torch.optim.SGD(model.parameters(), lr=0.1)
        given = stack([task]) if batched else [task]
        result = imaml_step(
            model,
            inner_opt,
            given,
            F.mse_loss,
            inner_steps=3,
            reg=reg,
            cg_iterations=2,
            batched=batched,
            cg_damping=damping,
        )
        v = [grad_of(p) / (reg + damping) for p in model.parameters()]
        # the adapted weights: rerun the inner loop
        with higher.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1), track_higher_grads=False) as (
            f,
            d,
        ):
            phi = [p.detach() for p in model.parameters()]
            for _ in range(3):
                prox = sum(((p - q) ** 2).sum() for p, q in zip(f.parameters(), phi))
                d.step(F.mse_loss(f(task[0]), task[1]) + reg / 2 * prox)
            adapted = [p.detach().requires_grad_() for p in f.parameters()]
        names = [n for n, _ in model.named_parameters()]

        def loss(params, x, y, model=model, names=names):
            return F.mse_loss(functional_call(model, dict(zip(names, params)), (x,)), y)

        g = torch.autograd.grad(loss(adapted, task[2], task[3]), adapted)
        grad = torch.autograd.grad(loss(adapted, task[0], task[1]), adapted, create_graph=True)
        hv = torch.autograd.grad(grad, adapted, grad_outputs=v)
        error = math.sqrt(sum(float(((h + (reg + damping) * x - b) ** 2).sum()) for h, x, b in zip(hv, v, g)))
        norm = math.sqrt(sum(float((b**2).sum()) for b in g))
        assert result.residuals[0] == pytest.approx(error / norm, rel=1e-6)
        assert result.residuals[0] > 1e-6  # two iterations: not converged, and reported


def test_batched_mode_checks_its_task():
    model = tanh_net()
    inner_opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tasks = sine_tasks(2)
    with pytest.raises(ValueError, match="same leading task dimension"):
        sx, sy, qx, qy = stack(tasks)
        imaml_step(model, inner_opt, (sx, sy, qx[:1], qy[:1]), F.mse_loss, batched=True)
    with pytest.raises(ValueError, match="cg_damping must be a non-negative number"):
        imaml_step(model, inner_opt, tasks, F.mse_loss, cg_damping=-1.0)


class ScaledNet(nn.Module):
    """A 0-dim parameter (a learned output scale) next to the layers."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tanh_net()
        self.scale = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.net(x)


@pytest.mark.parametrize("frozen", [False, True])
def test_batched_imaml_step_with_a_scalar_parameter_and_a_frozen_one(frozen):
    tasks = sine_tasks(3, seed=5)
    grads = []
    for batched in (False, True):
        torch.manual_seed(0)
        model = ScaledNet()
        if frozen:
            model.net[0].weight.requires_grad_(False)
        trainable = [p for p in model.parameters() if p.requires_grad]
        inner_opt = torch.optim.SGD(trainable, lr=0.1)
        given = stack(tasks) if batched else tasks
        imaml_step(model, inner_opt, given, F.mse_loss, inner_steps=3, reg=2.0, cg_iterations=5, batched=batched)
        grads.append([grad_of(p) for p in trainable])
        assert (model.net[0].weight.grad is None) is frozen
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
