"""Complex parameters: every optimizer updates them as torch.optim does ((real, imag) pairs, with
complex state), and hypergradients flow through a complex unroll."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import higher

# ---------------------------------------------------------------------------------------------
# Complex parameters: torch.optim updates them as (real, imag) pairs (all but SGD).


class ComplexModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, dtype=torch.complex128))
        self.b = nn.Parameter(torch.randn(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.w * x).abs().pow(2).sum() + (self.w.real * self.w.imag).sum() + self.b.pow(2).sum() * x.abs().sum()


COMPLEX_OPTIMIZERS = [
    (torch.optim.SGD, {"momentum": 0.9}),
    (torch.optim.Adam, {"amsgrad": True}),
    (torch.optim.AdamW, {}),
    (torch.optim.Adagrad, {}),
    (torch.optim.Adadelta, {}),
    (torch.optim.Adamax, {}),
    (torch.optim.ASGD, {}),
    (torch.optim.NAdam, {}),
    (torch.optim.RAdam, {}),
    (torch.optim.RMSprop, {"centered": True, "momentum": 0.5}),
    (torch.optim.Rprop, {}),
]


@pytest.mark.parametrize("cls, options", COMPLEX_OPTIMIZERS, ids=lambda v: getattr(v, "__name__", ""))
def test_complex_parameters_follow_torch_optim(cls, options) -> None:
    model = ComplexModel()
    reference = ComplexModel()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(3, dtype=torch.complex128)
    opt = cls(model.parameters(), lr=0.01, **options)
    ref_opt = cls(reference.parameters(), lr=0.01, **options)
    for m, o in ((model, opt), (reference, ref_opt)):  # a warm start: torch's complex state is continued
        o.zero_grad()
        m(x).backward()
        o.step()
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(fmodel(x))
            ref_opt.zero_grad()
            reference(x).backward()
            ref_opt.step()
        for fast, slow in zip(fmodel.parameters(), reference.parameters()):
            assert fast.dtype == slow.dtype
            torch.testing.assert_close(fast, slow, atol=1e-13, rtol=1e-13)
        for index, p in enumerate(reference.parameters()):
            for key, value in ref_opt.state[p].items():
                if isinstance(value, torch.Tensor):
                    mine = diffopt.state[0][index][key]
                    assert mine.dtype == value.dtype, key
                    torch.testing.assert_close(mine.detach(), value, atol=1e-13, rtol=1e-13)


def test_complex_parameter_hypergradient_and_per_parameter_rates() -> None:
    """Hypergradients through a complex unroll (gradcheck), and a per-parameter learning rate
    shaped like the complex parameter."""
    model = ComplexModel()
    x = torch.randn(3, dtype=torch.complex128)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)

    def unrolled(lr: torch.Tensor, lr_w: torch.Tensor) -> torch.Tensor:
        override = {"lr": higher.PerParameter([lr_w, lr])}
        with higher.innerloop_ctx(model, opt, override=override) as (fmodel, diffopt):
            for _ in range(2):
                diffopt.step(fmodel(x))
            return fmodel(x)

    lr = torch.tensor(0.05, requires_grad=True)
    lr_w = torch.full((3,), 0.03, requires_grad=True)
    torch.autograd.gradcheck(unrolled, (lr, lr_w))
