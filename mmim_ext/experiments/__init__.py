"""Experiments and the command line (``python -m mmim_ext.experiments`` / ``mmim-ext``).

* :mod:`mmim_ext.experiments.table1`: the MMIM paper's Table 1 protocol.
* :mod:`mmim_ext.experiments.data`: digits, MNIST-1D and Fashion-MNIST loaders.
* :mod:`mmim_ext.experiments.models`: ``(body, head)`` MLP and CNN models.

Submodules are imported on demand so that ``import mmim_ext`` stays light.
"""

__all__ = ["data", "models", "table1"]
