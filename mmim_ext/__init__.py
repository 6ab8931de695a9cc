"""mmim_ext: fast information-theoretic regularization and analysis for PyTorch.

Layers (imports point downward only):
experiments -> regularizers -> estimators -> ops -> compiled kernels (``mmim_ext._C``).
"""

from mmim_ext._extension import extension_loaded
from mmim_ext.ops import cpu_cache_info, empty_cpu_cache, fused_available, num_pairs, pair_stats, pair_stats_linear
from mmim_ext.reference import all_pairs, pair_stats_reference
from mmim_ext.kde_ops import kde_lse
from mmim_ext.infoplane import InfoPlaneRecorder, binned_mi, kde_mi
from mmim_ext.estimators import (
    PairwiseMINE,
    TotalCorrelationMINE,
    UnitLabelMINE,
    VectorMINE,
    make_perms,
)
from mmim_ext.estimate import estimate_mi, estimate_pairwise_mi, estimate_total_correlation
from mmim_ext.regularizers import GaussianLinear, MMIMRegularizer, make_regularizer
from mmim_ext.training import accuracy, train_c3, train_classifier, train_mmim

__version__ = "0.1.0"

__all__ = [
    "InfoPlaneRecorder",
    "binned_mi",
    "kde_lse",
    "kde_mi",
    "GaussianLinear",
    "MMIMRegularizer",
    "PairwiseMINE",
    "TotalCorrelationMINE",
    "UnitLabelMINE",
    "VectorMINE",
    "accuracy",
    "cpu_cache_info",
    "empty_cpu_cache",
    "estimate_mi",
    "estimate_pairwise_mi",
    "estimate_total_correlation",
    "make_perms",
    "make_regularizer",
    "train_c3",
    "train_classifier",
    "train_mmim",
    "__version__",
    "all_pairs",
    "extension_loaded",
    "fused_available",
    "num_pairs",
    "pair_stats",
    "pair_stats_linear",
    "pair_stats_reference",
]
