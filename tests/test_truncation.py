"""Truncated unrolls across windows (issue 5.6): memory stays flat however many windows run."""

import subprocess
import sys
import textwrap

import torch
from torch import nn

import higher

_WORKLOAD = textwrap.dedent(
    """
    import resource, sys
    import torch
    from torch import nn
    import higher

    torch.set_num_threads(1)
    torch.manual_seed(0)
    windows = int(sys.argv[1])
    model = nn.Sequential(nn.Linear(128, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 128))
    x, y = torch.randn(32, 128), torch.randn(32, 128)  # small batch: the fast weights dominate memory
    lr = torch.tensor(0.05, requires_grad=True)
    meta_opt = torch.optim.SGD([lr], lr=1e-4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with higher.innerloop_ctx(model, opt, override={"lr": lr}) as (fmodel, diffopt):
        for _ in range(windows):
            for _ in range(5):
                diffopt.step(nn.functional.mse_loss(fmodel(x), y))
            meta_opt.zero_grad()
            nn.functional.mse_loss(fmodel(x), y).backward()
            meta_opt.step()
            fmodel.detach_()
            diffopt.detach_()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """
)


def _peak_kib(windows: int) -> int:
    result = subprocess.run(
        [sys.executable, "-c", _WORKLOAD, str(windows)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1])


def test_peak_memory_after_50_windows_equals_that_after_2():
    two, fifty = _peak_kib(2), _peak_kib(50)
    # Without trimming, 50 windows would keep 250 sets of fast weights (~3 MB each) and their momentum.
    assert fifty <= two * 1.05, f"peak RSS grew from {two} KiB (2 windows) to {fifty} KiB (50 windows)"


def test_detach_keeps_values_and_restarts_the_history():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    x, y = torch.randn(6, 3), torch.randn(6, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(nn.functional.mse_loss(fmodel(x), y))
        before = [p.detach().clone() for p in fmodel.parameters()]
        fmodel.detach_()
        diffopt.detach_()
        assert len(fmodel._fast_params) == 1
        assert all(p.is_leaf and p.requires_grad for p in fmodel.parameters(time=0))
        for a, b in zip(fmodel.parameters(), before):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert all(not t.requires_grad for s in diffopt.state[0].values() for t in s.values() if torch.is_tensor(t))
        diffopt.step(nn.functional.mse_loss(fmodel(x), y))
        nn.functional.mse_loss(fmodel(x), y).backward()
    assert all(p.grad is None for p in model.parameters()), "the graph to the model was cut"
    assert diffopt.state[0][0]["step"] == 4, "optimizer state continues across the cut"
