"""torch.compile of an inner loop on a torch too old for it: the error names the release needed.

Runs on every torch: on one that can compile inner loops, dynamo is made to see an older one
(``compile_supported`` answers False), which is what it meets on torch < 2.11, where
`make test-torch TORCH=2.9.1` runs this test unpatched too.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import higher
from higher import _tracing


@pytest.fixture
def older_torch(monkeypatch):
    monkeypatch.setattr(_tracing, "compile_supported", lambda: False)
    torch.compiler.reset()
    yield
    torch.compiler.reset()


@pytest.mark.parametrize("where", ["innerloop_ctx", "compiled.backward"])
def test_compiling_an_inner_loop_names_the_torch_release_it_needs(older_torch, where):
    model = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(5, 1), torch.randn(5, 1)

    def inner_loop():
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            diffopt.step(F.mse_loss(fmodel(x), y))
            return F.mse_loss(fmodel(x), y)

    def backward_only():
        higher.compiled.backward(F.mse_loss(model(x), y))

    run = inner_loop if where == "innerloop_ctx" else backward_only
    with pytest.raises(Exception, match=r"needs torch >= 2\.11 .* Run the inner loop without torch.compile"):
        torch.compile(run, fullgraph=True, backend="eager")()
    run()  # eagerly it runs
