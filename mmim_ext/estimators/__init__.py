"""Neural mutual-information estimators (MINE / NWJ / SMILE), one module per family.

Every estimator is an ``nn.Module`` that owns its critic(s) as parameters and offers the same
entry points (module :mod:`~mmim_ext.estimators.base`): ``critic_loss(...) -> (estimates, loss)``
to train the critics (minimize ``loss`` with any optimizer), ``penalty(..., coef=1.0) ->
(estimates, value)`` through frozen critics, differentiable w.r.t. the features only,
``evaluate(...) -> tensor`` on held-out data, and ``forward`` (``critic_loss`` while the critics
train, ``penalty`` otherwise). Callers say what they want; the module picks the kernel.
The bound on a batch is a lower bound on the mutual information only in expectation and only
for a well-trained critic; the one-call functions (:func:`estimate_mi`,
:func:`estimate_pairwise_mi`, :func:`estimate_total_correlation`, module
:mod:`mmim_ext.estimators.fitting`; :func:`estimate_label_mi`, :func:`estimate_unit_label_mi`,
module :mod:`mmim_ext.estimators.label`) handle training, the stopping point on a validation
split and the report on a test split for data sets.

Modules
    :mod:`~mmim_ext.estimators.pairwise`           :class:`PairwiseMINE`, ``I(h_i; h_j)`` (or
                                                   ``I(h_i; h_j | Y)``) for many pairs of scalar
                                                   units, through the fused op.
    :mod:`~mmim_ext.estimators.total_correlation`  :class:`TotalCorrelationMINE`,
                                                   ``I(h_1; ...; h_m)`` with one joint critic.
    :mod:`~mmim_ext.estimators.vector`             :class:`VectorMINE`, ``I(X; Y)`` of two vectors.
    :mod:`~mmim_ext.estimators.unit_label`         :class:`UnitLabelMINE`, ``I(Y; h_i)`` per unit.
    :mod:`~mmim_ext.estimators.label`              :class:`LabelMINE`, ``I(Y; h)`` of a whole
                                                   layer, and one-call ``I(Y; h)`` / ``I(Y; h_i)``.
    :mod:`~mmim_ext.estimators.base`               :class:`MIEstimator`, the shared entry points.
    :mod:`~mmim_ext.estimators.bounds`             the bounds (``BOUNDS``), MINE's moving average,
                                                   the critics' optimizer.
    :mod:`~mmim_ext.estimators.negatives`          :func:`make_perms`, product-of-marginals samples.
    :mod:`~mmim_ext.estimators.fitting`            the one-call estimators for data sets.
"""

from mmim_ext.estimators.base import MIEstimator
from mmim_ext.estimators.bounds import BOUNDS, critic_adam
from mmim_ext.estimators.fitting import estimate_mi, estimate_pairwise_mi, estimate_total_correlation
from mmim_ext.estimators.label import LabelMINE, estimate_label_mi, estimate_unit_label_mi
from mmim_ext.estimators.negatives import NEGATIVES, make_perms
from mmim_ext.estimators.pairwise import PairwiseMINE
from mmim_ext.estimators.total_correlation import TotalCorrelationMINE
from mmim_ext.estimators.unit_label import UnitLabelMINE
from mmim_ext.estimators.vector import VectorMINE

__all__ = [
    "BOUNDS",
    "LabelMINE",
    "MIEstimator",
    "NEGATIVES",
    "PairwiseMINE",
    "TotalCorrelationMINE",
    "UnitLabelMINE",
    "VectorMINE",
    "critic_adam",
    "estimate_label_mi",
    "estimate_mi",
    "estimate_pairwise_mi",
    "estimate_total_correlation",
    "estimate_unit_label_mi",
    "make_perms",
]
