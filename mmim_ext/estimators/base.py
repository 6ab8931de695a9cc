"""The entry points every estimator module shares.

Callers say what they want, never which kernel runs:

``critic_loss(...) -> (estimates, loss)``
    A critic update: ``loss`` (0-d) trains the critic (MINE's moving-average rule in training
    mode); minimize it with any optimizer. The module picks the fastest path that computes it
    (for :class:`~mmim_ext.estimators.pairwise.PairwiseMINE` the fused one-pass kernel where it
    applies). ``estimates`` may come back without gradient.
``penalty(..., coef=1.0) -> (estimates, value)``
    The critics held fixed: ``value`` (0-d) is ``coef`` times the estimate (summed over pairs or
    units), differentiable w.r.t. the features only; no critic state (moving average) changes.
    ``estimates`` come back without gradient.
``evaluate(...) -> torch.Tensor``
    The bound on held-out data, no training, no gradient: 0-d for the scalar estimators, ``[P]``
    or ``[m]`` for the per-pair and per-unit ones.
``forward(...)``
    ``critic_loss`` when autograd is recording and a critic parameter requires grad, otherwise
    ``penalty``. ``forward(..., compute_loss=False)`` is a deprecated alias of the frozen estimate
    (it returns ``(estimates with gradient w.r.t. the features, None)`` as before).

Every entry point checks its inputs (shapes, dtypes, finite values, label range) before it draws
a negative sample or touches a critic statistic, so a bad batch (a NaN from a diverging model)
raises a ``ValueError`` naming the argument and leaves the module's state as it was.

Random state: an estimator that draws negatives owns a ``torch.Generator`` (``seed=`` at
construction; ``None`` seeds it from PyTorch's global generator, so ``torch.manual_seed`` before
construction still makes a run reproducible). Its state is part of ``state_dict()`` (through
``get_extra_state``), so that stopping after k training calls, saving, building a fresh module,
loading and continuing gives bitwise the same estimates, critics and moving averages as not
stopping.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

__all__ = ["MIEstimator", "check_coef", "check_finite"]


class MIEstimator(nn.Module):
    """Base of the estimator modules: the dispatch of ``forward`` (see the module docstring).

    Subclasses implement ``critic_loss``, ``penalty``, ``evaluate`` and ``_frozen`` (the
    estimates through detached critics, differentiable w.r.t. the features).
    """

    generator: torch.Generator | None = None

    def _init_random(self, owner: str, seed) -> None:
        """The module's own random source for negatives (see the module docstring)."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        elif isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"{owner}: argument 'seed' must be None or an int >= 0, got {seed!r}")
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)

    def get_extra_state(self):
        return {} if self.generator is None else {"generator": self.generator.get_state()}

    def set_extra_state(self, state) -> None:
        if self.generator is not None and "generator" in state:
            self.generator.set_state(state["generator"])

    def critics_trainable(self) -> bool:
        """Whether a call now should train the critics: autograd is recording and at least one
        critic parameter requires grad."""
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())

    def forward(self, *args, compute_loss: bool | None = None, **kwargs):
        if compute_loss is not None:
            name = type(self).__name__
            warnings.warn(f"{name}.forward(compute_loss=...) is deprecated and will be removed in the next "
                          f"release: call {name}.critic_loss(...) to train the critics or "
                          f"{name}.penalty(...) for a penalty through frozen critics",
                          DeprecationWarning, stacklevel=2)
            if not compute_loss:
                return self._frozen(*args, **kwargs), None
            return self.critic_loss(*args, **kwargs)
        if self.critics_trainable():
            return self.critic_loss(*args, **kwargs)
        return self.penalty(*args, **kwargs)

    def critic_loss(self, *args, **kwargs):  # pragma: no cover - every subclass overrides it
        raise NotImplementedError

    def penalty(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError

    def evaluate(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError

    def _frozen(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError


def check_finite(owner: str, name: str, t: torch.Tensor) -> None:
    """A ``ValueError`` naming the argument when ``t`` holds a NaN or an infinity."""
    if not bool(torch.isfinite(t.detach()).all()):
        raise ValueError(f"{owner}: argument '{name}' contains NaN or infinite values")


def check_coef(owner: str, coef) -> float:
    """``coef`` of a penalty as a finite float."""
    try:
        value = float(coef)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(coef, bool) or not math.isfinite(value):
        raise ValueError(f"{owner}: argument 'coef' must be a finite number, got {coef!r}")
    return value

