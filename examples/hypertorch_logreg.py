"""hypertorch's logistic-regression hyperparameter example, with four ways to get the hypergradient.

Setup (github.com/prolearner/hypertorch, examples/logistic_regression.ipynb), as the notebook draws
it: ``np.random.seed(1)``; ``w_oracle = randn(20)``; ``x = randn(1000, 20)``;
``y = 1[x @ w_oracle + 0.1 randn(1000) > 0]``; then scikit-learn's
``train_test_split(x, y, test_size=0.5)`` (no random_state: the next permutation of the same
generator; reproduced here with NumPy alone). The inner problem is L2-regularised logistic
regression with one coefficient per feature (lambda = ones, penalty ``0.5 sum_j lambda_j w_j^2``),
solved by T=100 steps of gradient descent (lr 0.1) from zero weights; the outer loss is the
validation binary cross-entropy at w_T. The script prints the inner loss at t = 0, 10, 50, 99
(t = steps taken, as in the notebook) and the validation loss in float64: within one float32 ulp
(6e-8) of the float32 numbers the notebook prints (0.6285591125 at t=10, 0.6240900755 at t=50,
validation 0.5743989944). Then the hypergradient with respect to the 20 coefficients by

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
    losses = results["inner_losses"]  # losses[t]: the inner loss at w_t, after t steps (the notebook's t)
    shown = sorted({t for t in (0, 10, 50, len(losses) - 1) if t < len(losses)})
    print("inner loss (train BCE + L2) at w_t: " + ", ".join(f"t={t} {losses[t]:.10f}" for t in shown))
    methods = results["methods"]
    print(f"validation loss at w_{args.steps}: {methods['unrolled']['outer_loss']:.10f}")
    if args.steps == 100:
        print("hypertorch's notebook (float32): t=10 0.6285591125, t=50 0.6240900755, validation 0.5743989944")
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
