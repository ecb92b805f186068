"""No leaks (issue 5.7): long MAML loops keep memory flat; dropped fmodels and optimizers are freed."""

import gc
import subprocess
import sys
import textwrap
import weakref

import torch
from torch import nn

import higher

_MAML_WITH_HOOKS = textwrap.dedent(
    """
    import sys
    import torch
    from torch import nn
    import higher

    torch.set_num_threads(1)
    torch.manual_seed(0)

    def rss_kib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4

    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    seen = {"forward": 0, "pre": 0, "backward": 0}
    for layer in model:
        layer.register_forward_hook(lambda m, i, o: seen.__setitem__("forward", seen["forward"] + 1))
        layer.register_forward_pre_hook(lambda m, i: seen.__setitem__("pre", seen["pre"] + 1))
    model[4].register_full_backward_hook(lambda m, gi, go: seen.__setitem__("backward", seen["backward"] + 1))
    meta_opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    iterations, warmup = int(sys.argv[1]), int(sys.argv[2])
    for it in range(iterations):
        if it == warmup:
            after_warmup = rss_kib()
        x = torch.rand(10, 1) * 10 - 5
        y = torch.sin(x)
        meta_opt.zero_grad()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            diffopt.step(nn.functional.mse_loss(fmodel(x), y))
            nn.functional.mse_loss(fmodel(x), y).backward()
        meta_opt.step()
    assert seen["forward"] > 0 and seen["backward"] > 0 and seen["pre"] > 0, seen
    print(after_warmup, rss_kib())
    """
)


def test_two_thousand_meta_iterations_with_hooks_keep_memory_flat():
    result = subprocess.run(
        [sys.executable, "-c", _MAML_WITH_HOOKS, "2000", "200"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    after_warmup, final = map(int, result.stdout.split())
    assert final <= after_warmup * 1.05, f"RSS grew from {after_warmup} KiB to {final} KiB"


def test_dropped_fmodel_and_optimizer_are_freed_without_the_cycle_collector():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    gc.disable()
    try:
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(3):
                diffopt.step(fmodel(torch.randn(4, 2)).pow(2).mean())
            fmodel(torch.randn(4, 2)).sum().backward()
        refs = [weakref.ref(obj) for obj in (fmodel, diffopt, fmodel[0], fmodel.parameters(time=1).__next__())]
        del fmodel, diffopt
        assert [r() for r in refs] == [None] * len(refs)
    finally:
        gc.enable()


def test_the_growth_count_sees_a_leak_and_not_replaced_objects_or_freed_ones():
    """tests/live_objects.py's growth(), which the leak checks of checkpointing and of every mode use."""
    from live_objects import growth

    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kept, older = [], [torch.zeros(2) for _ in range(50)]

    def iteration(leak: bool):
        with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
            diffopt.step(fmodel(torch.ones(1, 3)).sum())
            if leak:
                kept.append(fmodel)
        model.weight.grad = torch.ones(1, 3)  # replaced by every call: left alive, but not more each time
        if older:
            older.pop()  # objects made before the calls, freed during them

    iteration(False)
    assert growth(lambda: iteration(False), 4) == (0, 0)
    fmodels, tensors = growth(lambda: iteration(True), 4)
    assert fmodels == 3 and tensors > 0
