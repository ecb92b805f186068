"""What `copy_initial_weights` and `track_higher_grads` do, shown on a one-weight model.

The model is y = w * x and the inner loop fits w to data generated with w* = 3.5 by five steps of
SGD with momentum. The meta-loss is (w_5 - 3.5)^2, a function of the initial weight w_0 and of the
inner learning rate and momentum. We compute its gradient three ways and check the meta-gradient
against a finite difference.

Run: python examples/copy_initial_weights.py
"""

import torch
from torch import nn

import higher

torch.manual_seed(0)
x = torch.rand(100, 1, dtype=torch.float64)
y = 3.5 * x
model = nn.Linear(1, 1, bias=False).double()
STEPS = 5


def unroll(copy_initial_weights: bool, track_higher_grads: bool = True, verbose: bool = False):
    """Five differentiable SGD steps; returns the meta-loss and the learnable hyperparameters."""
    lr = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    momentum = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.5)
    with higher.innerloop_ctx(
        model, opt, copy_initial_weights=copy_initial_weights, track_higher_grads=track_higher_grads,
        override={"lr": lr, "momentum": momentum},
    ) as (fmodel, diffopt):
        for _ in range(STEPS):
            diffopt.step(((fmodel(x) - y) ** 2).mean())
        if verbose:
            for t in range(STEPS + 1):
                (w,) = fmodel.parameters(time=t)
                print(f"  w at time={t}: {w.item():+.4f}  (grad_fn: {type(w.grad_fn).__name__ if w.grad_fn else None})")
        (w_final,) = fmodel.parameters()
        meta_loss = (w_final - 3.5) ** 2
        return meta_loss, fmodel, lr, momentum


print("1) copy_initial_weights=True (the default): the fast weights start as a detached copy.")
meta_loss, fmodel, lr, momentum = unroll(copy_initial_weights=True, verbose=True)
(w0,) = fmodel.parameters(time=0)
d_w0, d_lr, d_momentum = torch.autograd.grad(meta_loss.sum(), [w0, lr, momentum])
print(f"  meta-loss {meta_loss.item():.6g}; d/d lr = {d_lr.item():+.4f}, d/d momentum = {d_momentum.item():+.4f}")
print(f"  gradient w.r.t. fmodel.parameters(time=0): {d_w0.item():+.6f}; model.weight.grad: {model.weight.grad}")

print("\n2) copy_initial_weights=False: the fast weights start as a clone, connected to model.weight.")
meta_loss, *_ = unroll(copy_initial_weights=False)
meta_loss.sum().backward()
meta_grad = model.weight.grad.item()
print(f"  meta_loss.backward() filled model.weight.grad = {meta_grad:+.6f} (the same number as above)")

print("\n3) Check against a central finite difference of the meta-loss in w_0:")
h = 1e-6
with torch.no_grad():
    model.weight += h
plus = unroll(copy_initial_weights=False)[0].item()
with torch.no_grad():
    model.weight -= 2 * h
minus = unroll(copy_initial_weights=False)[0].item()
with torch.no_grad():
    model.weight += h
print(f"  finite difference {(plus - minus) / (2 * h):+.6f}  vs  higher {meta_grad:+.6f}")

print("\n4) track_higher_grads=False: a cheap loop without a graph through the updates.")
model.weight.grad = None
meta_loss, fmodel, lr, momentum = unroll(copy_initial_weights=False, track_higher_grads=False)
meta_loss.sum().backward()
print(f"  same meta-loss {meta_loss.item():.6g}, but each fast weight is a fresh leaf: after backward,")
print(f"  model.weight.grad = {model.weight.grad}, lr.grad = {lr.grad}; only time=0 and time=-1 are kept.")
