"""Information planes: binned and KDE estimates of ``I(X;T)`` and ``I(T;Y)`` (bits), a recorder
with forward hooks and a schedule of epochs, and the information-plane plot (docs/design.md)."""

from mmim_ext.infoplane.binned import BinnedMI, bin_indices, binned_mi, pattern_ids
from mmim_ext.infoplane.kde import kde_entropy_term, kde_mi
from mmim_ext.infoplane.recorder import PLANE_KEYS, InfoPlaneRecorder, log_schedule, plot_infoplane

__all__ = [
    "BinnedMI",
    "PLANE_KEYS",
    "InfoPlaneRecorder",
    "bin_indices",
    "binned_mi",
    "kde_entropy_term",
    "kde_mi",
    "log_schedule",
    "pattern_ids",
    "plot_infoplane",
]
