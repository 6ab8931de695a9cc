"""The op layer: fused-kernel wrappers with autograd and fake kernels, their pure-PyTorch
references (the fallback and the test oracle), and the per-unit label-critic scores.

Imports only :mod:`mmim_ext._extension` and :mod:`mmim_ext._checks`; every layer above builds on
these functions.
"""

from mmim_ext.ops.kde import DEFAULT_KDE_SCRATCH_BYTES, kde_fused_available, kde_lse, kde_lse_reference
from mmim_ext.ops.label_scores import label_critic_scores
from mmim_ext.ops.critic_stats import (
    FUSED_SCRATCH_BYTES,
    cpu_cache_info,
    empty_cpu_cache,
    fused_available,
    num_pairs,
    one_pass_applies,
    pair_stats,
    pair_stats_linear,
    pair_stats_mine_loss,
)
from mmim_ext.ops.reference import DEFAULT_MAX_SCRATCH_BYTES, all_pairs, pair_stats_reference

__all__ = [
    "DEFAULT_KDE_SCRATCH_BYTES",
    "DEFAULT_MAX_SCRATCH_BYTES",
    "FUSED_SCRATCH_BYTES",
    "all_pairs",
    "cpu_cache_info",
    "empty_cpu_cache",
    "fused_available",
    "kde_fused_available",
    "kde_lse",
    "kde_lse_reference",
    "label_critic_scores",
    "num_pairs",
    "one_pass_applies",
    "pair_stats",
    "pair_stats_linear",
    "pair_stats_mine_loss",
    "pair_stats_reference",
]
