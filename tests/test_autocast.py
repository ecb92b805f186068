"""Mixed precision: ``torch.autocast`` inside inner loops, and ``GradScaler`` (docs/mixed-precision.md).

Autocast around the fmodel's forward and the loss makes the inner loop's matrix products run in
bfloat16 or float16; the fast weights, the inner gradients, the optimizer state and its update
stay float32 (autocast casts no pointwise operation), so the meta-gradient is the float32 one up
to the rounding of the low-precision products. Measured on the CPU (torch 2.13, 10 seeds, an
8-32-32-1 tanh MLP, 4 tasks, 3 second-order inner steps, per task and task-batched), the relative
L2 error of the meta-gradient to the float32 run's is at most

* bfloat16: 0.73 % with SGD (momentum 0.9), 2.4 % with Adam (eps=1e-2);
* float16 (CPU autocast): 0.09 % with SGD, 0.43 % with Adam.

The tolerances below (:data:`TOLERANCE`) are those bounds with a margin of at least 2.5; CUDA
(bfloat16 and float16) is held to the same ones, which were not measured there (no GPU here). Each
error must also exceed a hundredth of its tolerance: autocast really ran (a bypassed autocast
gives 0), and a tolerance 100 times tighter would fail.

Adam keeps eps=1e-2 here: with its default eps=1e-8 the bfloat16 meta-gradient's relative error
was 15 on average (5 seeds; RMSprop 171, Adagrad 3.5), because the derivative of Adam's step in a
gradient entry g, ``lr * eps / (|g| + eps)**2``, is largest for the entries near 0, which low
precision computes as rounding noise (docs/mixed-precision.md).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

import higher

T, STEPS = 4, 3
task_mse = vmap(F.mse_loss)

#: The low-precision dtypes autocast is tested with on each device type.
DTYPES = {"cpu": [torch.bfloat16], "cuda": [torch.bfloat16, torch.float16]}
#: (dtype, optimizer) -> the largest relative L2 error of the meta-gradient to the float32 run's.
TOLERANCE = {
    (torch.bfloat16, "SGD"): 0.02,
    (torch.bfloat16, "Adam"): 0.06,
    (torch.float16, "SGD"): 0.005,
    (torch.float16, "Adam"): 0.02,
}


@pytest.fixture(autouse=True)
def _float32():
    """Autocast casts float32 operands only (float64 ones stay float64): these tests run in float32."""
    torch.set_default_dtype(torch.float32)  # the conftest fixture restores float64


def _problem(seed, device, optimizer):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)).to(device)
    shapes = [(T, 10, 8), (T, 10, 1), (T, 15, 8), (T, 15, 1)]
    data = [torch.randn(shape, generator=generator).to(device) for shape in shapes]
    if optimizer == "SGD":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=0.01, eps=1e-2)
    return model, opt, data


def _meta_gradient(device, optimizer, batched, dtype, seed=0, scope="forward"):
    """The meta-gradient (flat) of a second-order inner loop with autocast to ``dtype`` (``None``: float32).

    ``scope``: where the autocast blocks are: around the fmodel's forward and the loss (``"forward"``), around
    ``diffopt.step(loss(...))`` (``"step"``: the inner gradients are also taken under autocast) and the
    meta-loss, or around the whole inner loop and the meta-loss's backward (``"whole"``). Also checks that
    the fast weights and the optimizer state stay float32 and, per task, that the fmodel's output has
    autocast's dtype (task-batched, vmap runs ``Linear`` as a low-precision product plus a float32 bias:
    float32).
    """
    model, opt, (xs, ys, xq, yq) = _problem(seed, device, optimizer)
    cast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else contextlib.nullcontext
    around_forward = cast if scope == "forward" else contextlib.nullcontext
    around_step = cast if scope == "step" else contextlib.nullcontext
    around_meta_loss = cast if scope in ("forward", "step") else contextlib.nullcontext
    tasks = [slice(None)] if batched else range(T)
    loss_fn = task_mse if batched else F.mse_loss
    with cast() if scope == "whole" else contextlib.nullcontext():
        for t in tasks:
            with higher.innerloop_ctx(model, opt, copy_initial_weights=False, tasks=T if batched else None) as (
                fmodel,
                diffopt,
            ):
                for _ in range(STEPS):
                    with around_step():
                        with around_forward():
                            out = fmodel(xs[t])
                            loss = loss_fn(out, ys[t])
                        diffopt.step(loss)
                with around_meta_loss():
                    meta_loss = loss_fn(fmodel(xq[t]), yq[t]).mean() * (1 if batched else 1 / T)
                meta_loss.backward()
            assert batched or out.dtype == (dtype or torch.float32)  # autocast ran on the forward
            assert all(p.dtype == torch.float32 for p in fmodel.parameters())
            state = [v for s in diffopt.state[0].values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
            assert all(v.dtype == torch.float32 for v in state)
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("batched", [False, True], ids=["per_task", "batched"])
@pytest.mark.parametrize("optimizer", ["SGD", "Adam"])
def test_meta_gradient_under_autocast_is_within_the_stated_tolerance_of_float32(optimizer, batched, device):
    for seed in (0, 1):
        reference = _meta_gradient(device, optimizer, batched, None, seed)
        for dtype in DTYPES[device.type]:
            error = _relative_error(_meta_gradient(device, optimizer, batched, dtype, seed), reference)
            tolerance = TOLERANCE[dtype, optimizer]
            assert tolerance / 100 < error < tolerance, (dtype, seed, error)


def test_autocast_around_the_step_or_the_whole_loop_gives_the_same_meta_gradient(device):
    """Autocast around ``diffopt.step(loss(...))`` or around the whole loop (the update and the backward
    passes included) gives bitwise the meta-gradient of autocast around the forward passes only: backward
    passes run in the dtypes of their forward operations, the update's pointwise operations are not autocast,
    and the fast weights stay float32 (checked in _meta_gradient)."""
    dtype = DTYPES[device.type][-1]
    for optimizer in ("SGD", "Adam"):
        forward_only = _meta_gradient(device, optimizer, False, dtype)
        for scope in ("step", "whole"):
            assert torch.equal(_meta_gradient(device, optimizer, False, dtype, scope=scope), forward_only), scope


def _scaled_meta_step(device, dtype, scaler=None):
    """One meta-iteration (autocast inner loop, SGD) and an Adam meta-step, through ``scaler`` if given.
    Returns the meta-gradients (unscaled) and the model's parameters after the step."""
    model, opt, (xs, ys, xq, yq) = _problem(0, device, "SGD")
    meta_opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(STEPS):
            with torch.autocast(device.type, dtype=dtype):
                loss = F.mse_loss(fmodel(xs[0]), ys[0])
            diffopt.step(loss)  # never scaled: see test_a_scaled_inner_loss_must_be_unscaled_before_the_update
        with torch.autocast(device.type, dtype=dtype):
            meta_loss = F.mse_loss(fmodel(xq[0]), yq[0])
    if scaler is None:
        meta_loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        meta_opt.step()
    else:
        scaler.scale(meta_loss).backward()
        scaler.unscale_(meta_opt)
        grads = [p.grad.clone() for p in model.parameters()]
        scaler.step(meta_opt)
        scaler.update()
    return grads, [p.detach().clone() for p in model.parameters()], model


def test_grad_scaler_on_the_meta_loss(device):
    """``scaler.scale(meta_loss).backward(); scaler.step(meta_opt); scaler.update()`` works on the outer loop:
    the scaled backward pass runs through the whole unroll (second order included) and, unscaled, gives the
    meta-gradient of the plain backward pass (bitwise in bfloat16: scaling by a power of two is exact; in
    float16 the scaled pass underflows less, so within the float16 tolerance), and the meta-step is the
    plain one. If the scaled pass overflows float16, the scaler skips the step and lowers its scale."""
    dtype = DTYPES[device.type][-1]
    plain_grads, plain_params, _ = _scaled_meta_step(device, dtype)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**16)
    grads, params, model = _scaled_meta_step(device, dtype, scaler)
    if scaler.get_scale() < 2.0**16:  # float16 overflowed: the step was skipped
        assert dtype == torch.float16
        start = _problem(0, device, "SGD")[0]
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), start.parameters()))
        return
    for ours, plain in zip(grads, plain_grads):
        if dtype == torch.bfloat16:
            assert torch.equal(ours, plain)
        else:
            assert _relative_error(ours, plain) < TOLERANCE[dtype, "SGD"]
    moved = max((a - b).abs().max().item() for a, b in zip(params, _problem(0, device, "SGD")[0].parameters()))
    assert moved > 1e-4
    if dtype == torch.bfloat16:
        assert all(torch.equal(a, b) for a, b in zip(params, plain_params))


def test_a_scaled_inner_loss_must_be_unscaled_before_the_update():
    """``diffopt.step(scaler.scale(loss))`` multiplies the inner gradients by the scale, and with them SGD's
    step: the inner loop runs away. Scaling the inner loss by a fixed power of two and dividing the gradients
    by it in ``grad_callback`` gives bitwise the unscaled inner loop (what a float16 inner loop whose
    gradients underflow would do; a GradScaler's dynamic scale and inf checks see the outer loop only)."""
    model, opt, (xs, ys, _, _) = _problem(0, torch.device("cpu"), "SGD")
    scale = 2.0**8

    def fast_weights(scaled, unscale):
        with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
            for _ in range(STEPS):
                loss = F.mse_loss(fmodel(xs[0]), ys[0])
                if not scaled:
                    diffopt.step(loss)
                elif unscale:
                    diffopt.step(loss * scale, grad_callback=lambda grads: [g / scale for g in grads])
                else:
                    diffopt.step(loss * scale)
            return list(fmodel.parameters())

    plain = fast_weights(False, False)
    assert all(torch.equal(a, b) for a, b in zip(fast_weights(True, True), plain))
    runaway = fast_weights(True, False)
    assert max((a - b).abs().max().item() for a, b in zip(runaway, plain)) > 1.0
