"""The fmodel's machinery, in layers (``docs/architecture.md`` draws them).

Bottom to top, each module importing only those before it:

* :mod:`.tree`: the analysis of a user's module tree, made once per model and reused while the
  tree is unchanged (which module holds which parameter and buffer, hooks, aliases, what a new
  history entry must copy);
* :mod:`.core`: :class:`~.core._Core`, what all views of one fmodel share: the replicas of the
  module tree, the fast-weight history and the views;
* :mod:`.weights`: :class:`~.weights._FastWeights`, a view's fast weights: the history read and
  written through it (``parameters(time=...)``, ``fast_params``, ``update_params``...);
* :mod:`.running`: :class:`~.running._Running`, calling the user's module on the replicas with
  the fast weights (``forward``, hooks registered on the views);
* :mod:`.compat`: higher 0.2.1's attributes of a patched module (``fmodel.root``,
  ``fmodel._param_mapping``...), which :mod:`.protocol` falls back to;
* :mod:`.protocol`: :class:`~.protocol._ModuleProtocol`, the rest of ``nn.Module``'s behaviour
  (attributes, submodules, containers, ``train``...).

:class:`higher.patch.FunctionalModule` stacks the three classes and adds pickling and 0.2.1's
``_fast_params``; :mod:`higher.patch` keeps the public functions (``monkeypatch``...) and
0.2.1's names.
"""
