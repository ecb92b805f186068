"""The demos of ``python -m higher demo``: one module per experiment, on the public API.

* :mod:`higher.demos.sinusoid` -- MAML (and first-order MAML, Meta-SGD, ANIL) on sinusoid
  regression with the protocol of Finn et al. (2017); the default demo.
* :mod:`higher.demos.digits` -- few-shot classification of scikit-learn's digits, MAML against a
  pretrained baseline, both with fine-tuning chosen on meta-validation tasks.
* :mod:`higher.demos.hyper` -- learning SGD's learning rate and momentum by hypergradient descent.
* :mod:`higher.demos.common` -- the progress display, statistics, tables, plots and JSON output.

Each experiment module defines ``DEFAULTS`` (iterations, shots and PNG name), a config dataclass,
its model, training, evaluation and plot, and ``run(config, device, out, progress)``, which prints
the results and returns them as a JSON-ready record. :mod:`higher.cli` parses the options and
dispatches. The experiment modules import matplotlib, tqdm and scikit-learn only when they need
them (``pip install 'higher[demo]'``).
"""

EXPERIMENTS = ("sinusoid", "digits", "hyper")

__all__ = ["EXPERIMENTS"]
