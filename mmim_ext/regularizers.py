"""Information regularizers: MMIM (C1 = C4 + C5 + C6), its ablations, RDM, and C3.

Notation (docs/design.md), for the features ``h = (h_1..h_m)`` of the layer before the output
layer and the label ``Y``:

* ``C4 = I(h)``              redundancy among the units (to minimize),
* ``C5 = -I(h | Y)``         minus the redundancy that remains inside each class,
* ``C6 = -sum_i I(Y; h_i)``  minus the label information of every unit,
* ``C1 = C4 + C5 + C6``      the MMIM objective; RDM (the earlier method) is ``C4 + C5``.

Contract of every feature regularizer (used by :mod:`mmim_ext.training` and the experiments)::

    penalty = reg(features, labels)        # features [B, m] (requires grad), labels [B] int64
    loss = task_loss + lam * penalty

In training mode the call first runs ``critic_steps`` adversarial updates of the regularizer's
own critics on ``features.detach()`` with its own optimizer (maximizing the MI bounds, through
every term's ``critic_loss``), then returns the penalty (a scalar, nats; every term's
``penalty``) computed with the updated critics held fixed, so the gradient flows only into the
features. In eval mode no critic is updated. ``reg.terms`` holds
the latest float value of every active term, e.g. ``{"c4": 0.8, "c5": -0.3, "c6": -1.2}``
(unweighted, signed as above).

Choices worth knowing:

* ``mode="pairwise"`` (default) approximates ``I(h)`` by the SUM of the pairwise
  ``I(h_i; h_j)`` over all ``i < j`` (and ``I(h|Y)`` by the sum of the conditional pairwise
  terms). This is the redundancy measure of RDM, it is what the fused op makes cheap for wide
  layers, and each term is a well-conditioned 2-D estimation problem. It is not the total
  correlation: it counts pairwise dependence only, and with many redundant units the sum can
  exceed ``I(h)``. ``mode="total"`` estimates the total correlation with one joint critic over
  the whole vector instead (harder to estimate in high dimensions).
* ``max_pairs``: for very wide layers only a random subset of ``max_pairs`` pairs is evaluated
  (and its critics trained) per call; the pairwise sums are rescaled by ``P / max_pairs`` so the
  penalty stays an unbiased estimate of the full sum.
* The penalty is the Donsker-Varadhan bound (or NWJ / clipped DV per ``estimator``) of the
  current critics on the batch, computed from standardized features (batch mean and variance,
  inside the graph) by a log-sum-exp: it is finite for any finite features, however large,
  and scaling the features does not change it.

C3 (docs/design.md) is not a feature regularizer: :class:`mmim_ext.layers.GaussianLinear` is the Gaussian output
layer whose ``kl()`` divided by the training-set size is the C3 bound; see
:func:`mmim_ext.training.train_c3`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mmim_ext._checks import check_choice, check_features, check_labels, check_positive_int
from mmim_ext.estimators import (BOUNDS, NEGATIVES, LabelMINE, PairwiseMINE, TotalCorrelationMINE, UnitLabelMINE,
                                 critic_adam)
from mmim_ext.estimators.sharding import broadcast_generator_, gather_batch

__all__ = ["LabelMIRegularizer", "MMIMRegularizer", "REGULARIZERS", "make_regularizer"]

_MODES = ("pairwise", "total")

#: Term weights ``(c4, c5, c6)`` of the named regularizers.
REGULARIZERS = {
    "mmim": (1.0, 1.0, 1.0),
    "c4": (1.0, 0.0, 0.0),
    "c5": (0.0, 1.0, 0.0),
    "c6": (0.0, 0.0, 1.0),
    "rdm": (1.0, 1.0, 0.0),
}


class MMIMRegularizer(nn.Module):
    """Penalty ``c4*C4 + c5*C5 + c6*C6`` in nats with adversarially trained MINE critics.

    Args:
        num_units: ``m``, width of the feature layer.
        num_classes: number of classes of the labels.
        c4, c5, c6: weights of ``I(h)``, ``-I(h|Y)``, ``-sum_i I(Y;h_i)``; a zero weight turns
            the term (and its critics) off.
        mode: ``"pairwise"`` (sum of pairwise MIs, see the module docstring) or ``"total"``
            (total correlation with a joint critic).
        hidden: hidden units per pairwise / per-unit critic.
        tc_hidden, tc_layers: width and depth of the joint critic in ``"total"`` mode.
        critic_lr: Adam learning rate of the critics.
        critic_steps: critic updates per call in training mode.
        estimator: ``"mine"``, ``"nwj"`` or ``"smile"``.
        negatives, num_negatives: negative samples of the pairwise critics
            (see :func:`mmim_ext.make_perms`); ``num_negatives`` is also the number
            of product-of-marginals draws in ``"total"`` mode.
        max_pairs: evaluate a random subset of this many pairs per call (``None``: all).
        ema, smile_clip: see :class:`mmim_ext.PairwiseMINE`.
        seed: seed of the regularizer's own generator (pair subsets) and of its critics'
            generators (negatives: ``seed + 1`` for C4, ``seed + 2`` for C5); ``None`` draws them
            from PyTorch's global generator.
        backend: forwarded to :func:`mmim_ext.pair_stats`.
        process_group: a ``torch.distributed`` group over which the critics are sharded (pairs
            of C4 and C5, units of C6; ``mode="pairwise"`` only). Each rank passes its own part of
            the data-parallel batch; the features are gathered once per call (with gradient),
            each rank trains only its block of critics with its own optimizer, and the penalty
            is the sum over ranks, the same value on every rank. Keep the regularizer outside
            ``DistributedDataParallel`` (its critics differ by rank). See
            :mod:`mmim_ext.estimators.sharding` and docs/distributed.md.
        grad_average: with ``process_group``, whether the model's gradients are averaged over the
            group (``DistributedDataParallel`` divides the summed gradients by the world size
            ``W``). ``True``: the penalty's gradient into each rank's features is ``W`` times the
            single-process gradient on the global batch, so that after DDP's averaging the model
            moves as the single-process model on the global batch does. ``False``: the features
            receive exactly the single-process gradient (for summed gradients, or no DDP).

    C5's critics see the label (``num_classes``: class-specific pairwise critics, or a joint
    critic on ``[h, onehot(y)]`` in ``"total"`` mode); see :class:`mmim_ext.PairwiseMINE` for
    their memory cost (``C``-fold that of C4's critics).

    ``state_dict()`` holds everything a run needs to continue bitwise as if it had not stopped:
    the critics, their moving averages, the critic optimizer's state and the random state of
    the pair subsets and negatives (``get_extra_state``).
    """

    def __init__(self, num_units: int, num_classes: int, *, c4: float = 1.0, c5: float = 1.0, c6: float = 1.0,
                 mode: str = "pairwise", hidden: int = 16, tc_hidden: int = 64, tc_layers: int = 2,
                 critic_lr: float = 1e-3, critic_steps: int = 1, estimator: str = "mine",
                 negatives: str = "shuffle", num_negatives: int = 1, max_pairs: int | None = None,
                 ema: float = 0.01, smile_clip: float = 5.0, seed: int | None = None, backend: str = "auto",
                 process_group=None, grad_average: bool = True):
        super().__init__()
        owner = "MMIMRegularizer"
        check_positive_int(owner, "num_units", num_units, 2)
        check_positive_int(owner, "num_classes", num_classes, 2)
        check_positive_int(owner, "critic_steps", critic_steps, 0)
        check_choice(owner, "mode", mode, _MODES)
        check_choice(owner, "estimator", estimator, BOUNDS)
        check_choice(owner, "negatives", negatives, NEGATIVES)
        for name, val in (("c4", c4), ("c5", c5), ("c6", c6)):
            if not isinstance(val, (int, float)) or isinstance(val, bool) or not math.isfinite(val):
                raise ValueError(f"{owner}: argument '{name}' must be a finite number, got {val!r}")
        if c4 == 0 and c5 == 0 and c6 == 0:
            raise ValueError(f"{owner}: at least one of the weights c4, c5, c6 must be non-zero")
        if not float(critic_lr) > 0:
            raise ValueError(f"{owner}: argument 'critic_lr' must be > 0, got {critic_lr!r}")
        if max_pairs is not None:
            check_positive_int(owner, "max_pairs", max_pairs)
        if process_group is not None and mode != "pairwise":
            raise ValueError(f"{owner}: argument 'process_group' needs mode='pairwise' (the joint critic of "
                             f"mode={mode!r} has no pairs to shard)")
        self.process_group = process_group
        self.grad_average = bool(grad_average)
        self._gathered = False
        # The critics gather nothing: forward gathers the batch once for every term.
        shard_kw = {} if process_group is None else {"process_group": process_group, "gather_batch": False}
        self.num_units, self.num_classes = num_units, num_classes
        self.weights = {"c4": float(c4), "c5": float(c5), "c6": float(c6)}
        self.mode = mode
        self.critic_steps = critic_steps
        self.max_pairs = max_pairs if mode == "pairwise" else None
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"{owner}: argument 'seed' must be None or an int >= 0, got {seed!r}")

        def redundancy(conditional, offset):
            sub_seed = None if seed is None else seed + offset
            classes = num_classes if conditional else None
            if mode == "pairwise":
                return PairwiseMINE(num_units, hidden=hidden, estimator=estimator, negatives=negatives,
                                    num_negatives=num_negatives, ema=ema, smile_clip=smile_clip,
                                    num_classes=classes, seed=sub_seed, backend=backend, **shard_kw)
            return TotalCorrelationMINE(num_units, hidden=tc_hidden, layers=tc_layers, estimator=estimator,
                                        num_negatives=num_negatives, ema=ema, smile_clip=smile_clip,
                                        num_classes=classes, seed=sub_seed)

        # I(h) and I(h|Y) have different optimal critics (log p(a,b)/p(a)p(b) vs the ratio
        # within each class, which depends on the class), so they get separate critics and C5's
        # see the label.
        self.c4_critic = redundancy(False, 1) if c4 != 0 else None
        self.c5_critic = redundancy(True, 2) if c5 != 0 else None
        self.c6_critic = (UnitLabelMINE(num_units, num_classes, hidden=hidden, estimator=estimator, ema=ema,
                                        smile_clip=smile_clip, **shard_kw) if c6 != 0 else None)
        self.critic_optimizer = critic_adam(self.parameters(), critic_lr)
        self.generator = torch.Generator()
        self.generator.manual_seed(int(torch.randint(0, 2**62, (), dtype=torch.int64)) if seed is None else seed)
        if process_group is not None:
            broadcast_generator_(process_group, self.generator)  # the same pair subsets on every rank
        self.terms: dict[str, float] = {}

    def get_extra_state(self):
        return {"generator": self.generator.get_state(), "critic_optimizer": self.critic_optimizer.state_dict()}

    def set_extra_state(self, state) -> None:
        self.generator.set_state(state["generator"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])

    def _pair_index(self, device):
        if self.max_pairs is None:
            return None, 1.0
        P = self.num_units * (self.num_units - 1) // 2
        if self.max_pairs >= P:
            return None, 1.0
        idx = torch.randperm(P, generator=self.generator)[: self.max_pairs].to(device)
        return idx, P / self.max_pairs

    def _terms(self):
        """``(name, critic, sign, takes_labels, takes_pair_index)`` of every active term."""
        out = []
        for name, sign, takes_labels in (("c4", 1.0, False), ("c5", -1.0, True), ("c6", -1.0, True)):
            critic = getattr(self, f"{name}_critic")
            if critic is not None:
                out.append((name, critic, sign, takes_labels, isinstance(critic, PairwiseMINE)))
        return out

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Critic updates (training mode), then the penalty (scalar tensor, nats)."""
        owner = "MMIMRegularizer"
        if self.process_group is not None and not self._gathered:
            # One gather for every term (the checks compare every rank's shapes first).
            features, labels = gather_batch(owner, self.process_group, features, labels, width=self.num_units,
                                            name="features")
            self._gathered = True
            try:
                penalty = self.forward(features, labels)
            finally:
                self._gathered = False
            if self.grad_average:
                # DDP divides the summed gradients by W: scale the penalty's gradient (not its value) by W.
                world = torch.distributed.get_world_size(self.process_group)
                penalty = penalty.detach() + world * (penalty - penalty.detach())
            return penalty
        check_features(owner, "features", features, self.num_units)
        if not bool(torch.isfinite(features.detach()).all()):
            raise ValueError(f"{owner}: argument 'features' contains NaN or infinite values")
        check_labels(owner, labels, features.shape[0], self.num_classes)
        index, scale = self._pair_index(features.device)
        terms = self._terms()

        def args(takes_labels, takes_pairs):
            kw = {"pair_index": index} if takes_pairs else {}
            return (labels if takes_labels else None), kw

        if self.training and self.critic_steps > 0:
            detached = features.detach()
            with torch.enable_grad():
                for _ in range(self.critic_steps):
                    loss = 0.0
                    for _, critic, _, takes_labels, takes_pairs in terms:
                        lab, kw = args(takes_labels, takes_pairs)
                        loss = loss + critic.critic_loss(detached, lab, **kw)[1]
                    self.critic_optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.critic_optimizer.step()
        penalty = features.new_zeros(())
        values = {}
        for name, critic, sign, takes_labels, takes_pairs in terms:
            lab, kw = args(takes_labels, takes_pairs)
            # A pair subset's sum is rescaled by P / max_pairs (scale is 1 for the other terms).
            coef = sign * (scale if takes_pairs else 1.0)
            _, val = critic.penalty(features, lab, **kw, coef=coef)
            values[name] = float(val.detach())
            penalty = penalty + self.weights[name] * val.to(penalty.dtype)
        self.terms = values
        return penalty

    def extra_repr(self) -> str:
        w = ", ".join(f"{k}={v}" for k, v in self.weights.items())
        return f"num_units={self.num_units}, num_classes={self.num_classes}, {w}, mode={self.mode!r}, max_pairs={self.max_pairs}"


class LabelMIRegularizer(nn.Module):
    """Penalty ``-I(Y; h)`` in nats, with ``I(Y; h)`` of the whole feature vector estimated by a
    :class:`mmim_ext.estimators.LabelMINE` critic trained adversarially (same contract as
    :class:`MMIMRegularizer`: critic updates in training mode, then the penalty through the
    frozen critic; ``terms == {"iyh": I(Y;h) estimate}``).

    With the total-correlation definitions, ``C1 = C4 + C5 + C6 = -I(Y; h)`` exactly
    (docs/table1.md), so this is the MMIM objective with one estimator instead of three.

    Args:
        num_units, num_classes: ``m`` and the number of classes.
        hidden, layers, estimator: the critic (:class:`~mmim_ext.estimators.LabelMINE`).
        critic_lr, critic_steps: the critic's Adam learning rate and updates per call.
    """

    def __init__(self, num_units: int, num_classes: int, *, hidden: int = 64, layers: int = 2,
                 estimator: str = "mine", critic_lr: float = 1e-3, critic_steps: int = 1):
        super().__init__()
        owner = "LabelMIRegularizer"
        check_positive_int(owner, "num_units", num_units, 1)
        check_positive_int(owner, "critic_steps", critic_steps, 0)
        if not float(critic_lr) > 0:
            raise ValueError(f"{owner}: argument 'critic_lr' must be > 0, got {critic_lr!r}")
        self.num_units, self.num_classes = num_units, num_classes
        self.critic_steps = critic_steps
        self.critic = LabelMINE(num_units, num_classes, hidden=hidden, layers=layers, estimator=estimator)
        self.critic_optimizer = critic_adam(self.critic.parameters(), critic_lr)
        self.terms: dict[str, float] = {}

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Critic updates (training mode), then ``-I(Y; h)`` (scalar tensor, nats)."""
        owner = "LabelMIRegularizer"
        check_features(owner, "features", features, self.num_units)
        check_labels(owner, labels, features.shape[0], self.num_classes)
        if self.training:
            detached = features.detach()
            with torch.enable_grad():
                for _ in range(self.critic_steps):
                    _, loss = self.critic.critic_loss(detached, labels)
                    self.critic_optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.critic_optimizer.step()
        est, value = self.critic.penalty(features, labels, coef=-1.0)
        self.terms = {"iyh": float(est)}
        return value


def make_regularizer(name: str, num_units: int, num_classes: int, **kw) -> nn.Module:
    """A named regularizer: ``"mmim"`` (C4+C5+C6), ``"c4"``, ``"c5"``, ``"c6"``, ``"rdm"`` (C4+C5),
    or ``"iyh"`` (``-I(Y; h)``, :class:`LabelMIRegularizer`; ``kw`` go to that class).

    ``kw`` go to :class:`MMIMRegularizer`; the weight of an active term may be overridden
    (e.g. ``make_regularizer("rdm", m, k, c5=0.5)``), a term the name leaves out may not be
    switched on.
    """
    if isinstance(name, str) and name.lower() == "iyh":
        return LabelMIRegularizer(num_units, num_classes, **kw)
    if not isinstance(name, str) or name.lower() not in REGULARIZERS:
        raise ValueError(f"make_regularizer: argument 'name' must be one of {tuple(REGULARIZERS) + ('iyh',)}, got {name!r}")
    name = name.lower()
    weights = dict(zip(("c4", "c5", "c6"), REGULARIZERS[name]))
    for k in ("c4", "c5", "c6"):
        if k in kw:
            if weights[k] == 0 and kw[k] != 0:
                raise ValueError(f"make_regularizer: regularizer {name!r} has no {k.upper()} term; "
                                 f"got {k}={kw[k]!r} (use name='mmim' to combine terms freely)")
            weights[k] = kw.pop(k)
    return MMIMRegularizer(num_units, num_classes, **weights, **kw)
