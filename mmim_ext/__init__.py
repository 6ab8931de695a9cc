"""mmim_ext: fast information-theoretic regularization and analysis for PyTorch.

Layers (imports point downward only; ``tests/test_layout.py`` checks it):

    experiments -> training, infoplane, diagnostics -> regularizers, layers -> estimators
    -> ops -> compiled kernels (``mmim_ext._C``)

with the package-private :mod:`mmim_ext._checks` (argument checks) and
:mod:`mmim_ext._extension` (loading the kernels) below them all.
"""

from mmim_ext._extension import extension_loaded
from mmim_ext.estimators import (
    LabelMINE,
    PairwiseMINE,
    TotalCorrelationMINE,
    UnitLabelMINE,
    VectorMINE,
    estimate_label_mi,
    estimate_mi,
    estimate_pairwise_mi,
    estimate_total_correlation,
    estimate_unit_label_mi,
    make_perms,
)
from mmim_ext.estimators.sharding import load_sharded_state_dict, sharded_state_dict
from mmim_ext.infoplane import InfoPlaneRecorder, binned_mi, kde_mi
from mmim_ext.layers import GaussianLinear, ResidualBlock
from mmim_ext.ops import (
    all_pairs,
    cpu_cache_info,
    empty_cpu_cache,
    fused_available,
    kde_lse,
    num_pairs,
    pair_stats,
    pair_stats_linear,
    pair_stats_reference,
)
from mmim_ext.regularizers import LabelMIRegularizer, MMIMRegularizer, make_regularizer
from mmim_ext.training import accuracy, evaluate_classifier, train_c3, train_classifier, train_mmim

__version__ = "0.1.0"

__all__ = sorted([
    "GaussianLinear",
    "InfoPlaneRecorder",
    "LabelMINE",
    "LabelMIRegularizer",
    "MMIMRegularizer",
    "PairwiseMINE",
    "ResidualBlock",
    "TotalCorrelationMINE",
    "UnitLabelMINE",
    "VectorMINE",
    "__version__",
    "accuracy",
    "all_pairs",
    "binned_mi",
    "cpu_cache_info",
    "empty_cpu_cache",
    "estimate_label_mi",
    "estimate_mi",
    "estimate_pairwise_mi",
    "estimate_total_correlation",
    "estimate_unit_label_mi",
    "evaluate_classifier",
    "extension_loaded",
    "fused_available",
    "kde_lse",
    "kde_mi",
    "load_sharded_state_dict",
    "make_perms",
    "make_regularizer",
    "num_pairs",
    "pair_stats",
    "pair_stats_linear",
    "pair_stats_reference",
    "sharded_state_dict",
    "train_c3",
    "train_classifier",
    "train_mmim",
])
