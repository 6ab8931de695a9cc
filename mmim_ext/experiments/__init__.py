"""Experiments and the command line (``python -m mmim_ext.experiments`` / ``mmim-ext``).

* :mod:`mmim_ext.experiments.table1`: the MMIM paper's Table 1 experiment (λ search, table,
  merge), built from :mod:`~mmim_ext.experiments.protocol` (methods, budgets, one run),
  :mod:`~mmim_ext.experiments.runner` (per-run files, shards), :mod:`~mmim_ext.experiments.measure`
  (held-out information), :mod:`~mmim_ext.experiments.statistics` (paired tests) and
  :mod:`~mmim_ext.experiments.reporting` (JSON, Markdown, plots).
* :mod:`mmim_ext.experiments.data`: digits, MNIST-1D and Fashion-MNIST loaders.
* :mod:`mmim_ext.experiments.models`: ``(body, head)`` MLP and CNN models.

Submodules are imported on demand so that ``import mmim_ext`` stays light.
"""

__all__ = ["data", "measure", "models", "protocol", "reporting", "runner", "statistics", "table1"]
