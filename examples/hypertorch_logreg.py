"""hypertorch's logistic-regression hyperparameter example, with four ways to get the hypergradient.

Setup (github.com/prolearner/hypertorch, examples/logistic_regression.py): ``np.random.seed(1)``,
n=1000 samples, d=20 features, w and x standard normal, y = 1[x.w + 0.1 noise > 0], first half for
training, second half for validation. The inner problem is L2-regularised logistic regression
with one coefficient per feature (initialised to ones), solved by T=100 steps of gradient descent
(lr 0.1) from zero weights; the outer loss is the validation binary cross-entropy. The script
prints the inner loss curve, then the hypergradient with respect to the 20 coefficients by

* unrolled reverse mode (``higher.innerloop_ctx`` + ``backward``),
* checkpointed reverse mode (``higher.checkpointed_unroll``),
* forward mode (``higher.forward_hypergradient``, one pass per coefficient),
* implicit differentiation (``higher.implicit_hypergradient``, conjugate gradient),

side by side, and how far each is from the unrolled one.

    PYTHONPATH=src python examples/hypertorch_logreg.py [--steps 100]
"""

from __future__ import annotations

import argparse

import torch

from higher.hypergradients import METHODS, logreg_comparison


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = logreg_comparison(args.steps)
    losses = results["inner_losses"]
    print(
        f"inner loss (train BCE + L2): step 0 {losses[0]:.5f}, step 10 {losses[10]:.5f}, "
        f"step 50 {losses[min(50, len(losses) - 1)]:.5f}, step {len(losses) - 1} {losses[-1]:.5f}"
    )
    methods = results["methods"]
    print(f"validation loss after {args.steps} steps: {methods['unrolled']['outer_loss']:.6f}")
    print()
    print("hypergradient d(validation loss)/d(L2 coefficient j):")
    print(" j " + "".join(f"{m:>16s}" for m in METHODS))
    for j in range(len(methods["unrolled"]["hypergradient"])):
        print(f"{j:2d} " + "".join(f"{methods[m]['hypergradient'][j]:16.10f}" for m in METHODS))
    print()
    for m in METHODS:
        info = methods[m]
        notes = {
            "unrolled": "reference",
            "checkpointed": f"every {info.get('every')} steps, {info.get('recomputations')} segments recomputed",
            "forward": f"{info.get('passes')} forward passes",
            "implicit": f"CG {info.get('iterations')} iterations, residual {info.get('residual', 0):.1e}, "
            f"inner gradient norm {info.get('inner_gradient_norm', 0):.1e}",
        }[m]
        print(
            f"{m:13s} max |difference to unrolled| {info['max_abs_difference']:.1e}   {info['seconds']:6.2f} s   {notes}"
        )


if __name__ == "__main__":
    main()
