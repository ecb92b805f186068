"""The differentiable optimizer's machinery, in layers (``docs/architecture.md`` draws them).

Bottom to top, each module importing only those before it (and :mod:`higher.rules`, the update
rules' math):

* :mod:`.layout`: :class:`~.layout._Layout`, what a torch optimizer's parameter groups say about
  the reference parameters (which of them each group holds), cached per torch optimizer;
* :mod:`.hyperparameters`: :class:`~.hyperparameters._Hyperparameters`, the groups'
  hyperparameters: copied from the torch optimizer, checked, overridden, and resolved at each
  step (:class:`~higher.optim.PerStep`, :class:`~higher.optim.PerParameter`);
* :mod:`.updates`: :class:`~.updates._Updates`, the per-parameter state (copied from the torch
  optimizer, following the fast weights' dtype and device, detached) and the update rule
  applied to it, group by group (``_update``, the method 0.2.1's subclasses override).

:class:`higher.optim.DifferentiableOptimizer` stacks the two classes and adds the front end:
construction, ``step`` (hooks, gradients, handing the new fast weights to the fmodel) and the
rest of ``torch.optim.Optimizer``'s interface; :mod:`higher.optim` keeps the public classes and
functions and 0.2.1's names.
"""
