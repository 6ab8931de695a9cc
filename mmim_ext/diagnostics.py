"""Training diagnostics of the Zhao & Sun reading of deep learning (docs/design.md).

* :class:`GradientSNR` — per layer, ``||mean of minibatch gradients|| / ||their std||`` over an
  epoch (the drift / diffusion phases of Shwartz-Ziv & Tishby), and :func:`weight_norms`.
* :class:`ResidualBlock` and :class:`ResidualRatioMonitor` — ``||F(x)|| / ||x||`` per sample for
  residual blocks ``y = x + F(x)`` (invertible while the branch is a contraction), summarized as
  quantiles per epoch.
* :func:`margins` / :func:`margin_quantiles` — last-layer margins ``z_y - max_{k != y} z_k`` raw
  and normalized by ``||w_y - w_k||`` (the distance to the decision boundary in feature space).
* :func:`separability_probe` — linear-SVM training accuracy on the penultimate features projected
  on their first ``k`` principal components.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from mmim_ext.layers import ResidualBlock

__all__ = [
    "DEFAULT_QUANTILES",
    "GradientSNR",
    "ResidualBlock",
    "ResidualRatioMonitor",
    "margin_quantiles",
    "margins",
    "residual_ratios",
    "separability_probe",
    "summarize",
    "weight_norms",
]

DEFAULT_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def summarize(values: torch.Tensor, quantiles: Sequence[float] = DEFAULT_QUANTILES) -> dict:
    """Quantiles ``q05``, ``q25``, ... plus ``min``, ``max``, ``mean`` and ``n`` of a 1-D tensor."""
    v = values.detach().reshape(-1).to(torch.float64)
    if v.numel() == 0:
        raise ValueError("summarize: no values")
    qs = torch.quantile(v, torch.tensor(list(quantiles), dtype=torch.float64, device=v.device))
    out = {f"q{round(q * 100):02d}": float(x) for q, x in zip(quantiles, qs)}
    out.update(min=float(v.min()), max=float(v.max()), mean=float(v.mean()), n=int(v.numel()))
    return out


# ---- gradients and weights --------------------------------------------------------------------


def _default_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every submodule that owns parameters directly (Linear, Conv, norm layers), by name."""
    out = {}
    for name, mod in model.named_modules():
        if any(True for _ in mod.parameters(recurse=False)):
            out[name or "model"] = mod
    if not out:
        raise ValueError("no module of the model holds parameters")
    return out


class GradientSNR:
    """Per-layer gradient signal-to-noise ratio over the minibatches of an epoch.

    Call :meth:`step` after every ``loss.backward()`` (it reads ``.grad``), then
    :meth:`end_epoch` once per epoch. For the concatenated gradient ``g_b`` of a layer's
    parameters over batches ``b = 1..B``: ``mean_norm = ||mean_b g_b||``,
    ``std_norm = ||std_b g_b||`` (elementwise standard deviation with Bessel's correction, then
    the Euclidean norm) and ``snr = mean_norm / std_norm``. Sums are kept in float64 with
    Welford's update, so memory is two copies of the parameters.

    Args:
        model: the network.
        layers: ``{name: module}`` whose (recursive) parameters form one group each; default:
            every submodule that owns parameters directly.
    """

    def __init__(self, model: nn.Module, layers: Mapping[str, nn.Module] | None = None):
        self.layers = dict(layers) if layers is not None else _default_layers(model)
        self._params = {name: [p for p in mod.parameters() if p.requires_grad] for name, mod in self.layers.items()}
        self.history: list[dict] = []
        self._reset()

    def _reset(self):
        self._n = 0
        self._mean: dict[str, torch.Tensor] = {}
        self._m2: dict[str, torch.Tensor] = {}

    def _flat_grad(self, name: str) -> torch.Tensor:
        parts = []
        for p in self._params[name]:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            parts.append(g.detach().reshape(-1).to(torch.float64))
        if not parts:
            return torch.zeros(0, dtype=torch.float64)
        return torch.cat(parts)

    def step(self) -> None:
        """Accumulate the current ``.grad`` of every layer as one minibatch gradient."""
        self._n += 1
        for name in self.layers:
            g = self._flat_grad(name)
            if self._n == 1:
                self._mean[name] = g.clone()
                self._m2[name] = torch.zeros_like(g)
            else:
                delta = g - self._mean[name]
                self._mean[name] += delta / self._n
                self._m2[name] += delta * (g - self._mean[name])

    def end_epoch(self, epoch: int | None = None) -> dict[str, dict]:
        """Summaries since the last call, ``{layer: {"snr", "mean_norm", "std_norm", "n_batches"}}``.

        Also appended to :attr:`history` (one row per layer with ``epoch``). Needs at least two
        :meth:`step` calls (the spread of one gradient is undefined).
        """
        if self._n < 2:
            raise RuntimeError(f"GradientSNR.end_epoch: needs at least 2 minibatch gradients, got {self._n}")
        out = {}
        for name in self.layers:
            mean_norm = float(self._mean[name].norm())
            std_norm = float((self._m2[name] / (self._n - 1)).sqrt().norm())
            snr = mean_norm / std_norm if std_norm > 0 else float("inf")
            out[name] = {"snr": snr, "mean_norm": mean_norm, "std_norm": std_norm, "n_batches": self._n}
            self.history.append({"epoch": epoch, "layer": name, **out[name]})
        self._reset()
        return out


def weight_norms(model: nn.Module, layers: Mapping[str, nn.Module] | None = None) -> dict[str, float]:
    """Frobenius norm of the ``weight`` of each layer (default: every submodule owning a ``weight``)."""
    if layers is None:
        layers = {n or "model": m for n, m in model.named_modules()
                  if isinstance(getattr(m, "weight", None), torch.Tensor)}
    out = {}
    for name, mod in layers.items():
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor):
            raise ValueError(f"weight_norms: layer {name!r} has no 'weight' tensor")
        out[name] = float(w.detach().to(torch.float64).norm())
    return out


# ---- residual blocks --------------------------------------------------------------------------


def _sample_norms(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(t.shape[0], -1).to(torch.float64).norm(dim=1)


def residual_ratios(block: ResidualBlock, x: torch.Tensor) -> torch.Tensor:
    """Per-sample ``||branch(x)|| / ||shortcut(x)||`` of one block, ``[N]`` float64 (no grad)."""
    with torch.no_grad():
        f = block.branch(x)
        s = x if block.shortcut is None else block.shortcut(x)
    return _sample_norms(f) / _sample_norms(s)


class ResidualRatioMonitor:
    """Forward hooks recording ``||F(x)|| / ||x||`` per sample for residual branches.

    Args:
        model: the network.
        branches: ``None`` (every :class:`ResidualBlock` in ``model``), or ``{name: module}`` /
            a sequence of submodule names, each a *branch* module whose first input is the block
            input ``x`` and whose output is ``F(x)`` (for residual blocks not built from
            :class:`ResidualBlock`).

    Samples with ``||x|| = 0`` (ratio undefined) are skipped. Set :attr:`enabled` to False to
    pause recording (e.g. outside the evaluation passes).
    """

    def __init__(self, model: nn.Module, branches=None):
        self.enabled = True
        self._ratios: dict[str, list[torch.Tensor]] = {}
        self._pending: dict[str, torch.Tensor] = {}
        self._handles = []
        self.history: list[dict] = []
        if branches is None:
            blocks = {n or "model": m for n, m in model.named_modules() if isinstance(m, ResidualBlock)}
            if not blocks:
                raise ValueError("ResidualRatioMonitor: the model has no ResidualBlock; pass 'branches'")
            for name, blk in blocks.items():
                self._watch_block(name, blk)
        else:
            if not isinstance(branches, Mapping):
                branches = {n: model.get_submodule(n) for n in branches}
            for name, mod in branches.items():
                self._watch_branch(name, mod)

    def _add(self, name: str, num: torch.Tensor, den: torch.Tensor) -> None:
        keep = den > 0
        self._ratios.setdefault(name, []).append((num[keep] / den[keep]).cpu())

    def _watch_branch(self, name: str, mod: nn.Module) -> None:
        def hook(_m, inp, out):
            if self.enabled:
                self._add(name, _sample_norms(out), _sample_norms(inp[0]))
        self._handles.append(mod.register_forward_hook(hook))

    def _watch_block(self, name: str, blk: ResidualBlock) -> None:
        if blk.shortcut is None:
            self._watch_branch(name, blk.branch)
            return

        def branch_hook(_m, _inp, out):
            if self.enabled:
                self._pending[name] = _sample_norms(out)

        def shortcut_hook(_m, _inp, out):
            f = self._pending.pop(name, None)
            if self.enabled and f is not None:
                self._add(name, f, _sample_norms(out))
        self._handles.append(blk.branch.register_forward_hook(branch_hook))
        self._handles.append(blk.shortcut.register_forward_hook(shortcut_hook))

    def ratios(self) -> dict[str, torch.Tensor]:
        """Per-sample ratios recorded since the last :meth:`end_epoch`, ``{name: [n] float64}``."""
        return {k: torch.cat(v) for k, v in self._ratios.items() if v}

    def end_epoch(self, epoch: int | None = None, quantiles: Sequence[float] = DEFAULT_QUANTILES) -> dict[str, dict]:
        """Summaries (:func:`summarize` plus ``frac_below_1``) per branch; resets and appends to :attr:`history`."""
        out = {}
        for name, r in self.ratios().items():
            if r.numel() == 0:
                continue
            out[name] = {**summarize(r, quantiles), "frac_below_1": float((r < 1).to(torch.float64).mean())}
            self.history.append({"epoch": epoch, "block": name, **out[name]})
        self._ratios.clear()
        self._pending.clear()
        return out

    def remove(self) -> None:
        """Remove all hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


# ---- margins ----------------------------------------------------------------------------------


def margins(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None):
    """Last-layer margins, ``(raw [N], normalized [N] or None)`` in float64.

    * ``raw[n] = z[n, y_n] - max_{k != y_n} z[n, k]`` (positive iff sample ``n`` is classified
      correctly with no tie).
    * ``normalized[n] = min_{k != y_n} (z[n, y_n] - z[n, k]) / ||w_{y_n} - w_k||``: for a linear
      last layer ``z = W h + b`` (``weight`` = ``W`` ``[C, D]``) this is the signed Euclidean
      distance of ``h_n`` to the nearest pairwise decision boundary (the margin an SVM
      maximizes). Class pairs with ``w_y = w_k`` give ``±inf`` or NaN.

    Args:
        logits: ``[N, C]`` with ``C >= 2``.
        y: ``[N]`` int64 labels in ``0..C-1``.
        weight: ``[C, D]`` last-layer weight, or None (then ``normalized`` is None).
    """
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"margins: argument 'logits' must be [N, C] with C >= 2, got {list(logits.shape)}")
    y = y.reshape(-1).to(torch.int64)
    N, C = logits.shape
    if y.shape[0] != N:
        raise ValueError(f"margins: argument 'y' must hold N={N} labels, got {y.shape[0]}")
    if N and (int(y.min()) < 0 or int(y.max()) >= C):
        raise ValueError(f"margins: labels in 'y' must lie in [0, {C - 1}]")
    z = logits.detach().to(torch.float64)
    zy = z.gather(1, y[:, None])  # [N, 1]
    diff = zy - z  # [N, C]; diff[n, y_n] = 0
    own = torch.zeros_like(diff, dtype=torch.bool).scatter_(1, y[:, None], True)
    raw = diff.masked_fill(own, float("inf")).min(dim=1).values
    if weight is None:
        return raw, None
    if weight.dim() != 2 or weight.shape[0] != C:
        raise ValueError(f"margins: argument 'weight' must be [C, D] with C={C}, got {list(weight.shape)}")
    w = weight.detach().to(torch.float64).to(z.device)
    pair_norm = torch.cdist(w, w)  # [C, C], ||w_j - w_k||
    norm_nk = pair_norm[y]  # [N, C]
    normalized = (diff / norm_nk).masked_fill(own, float("inf")).min(dim=1).values
    return raw, normalized


def margin_quantiles(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None,
                     quantiles: Sequence[float] = DEFAULT_QUANTILES) -> dict:
    """``{"raw": summary, "normalized": summary or None}`` of :func:`margins`, each summary from
    :func:`summarize` plus ``frac_positive``."""
    raw, nrm = margins(logits, y, weight)
    out = {"raw": {**summarize(raw, quantiles), "frac_positive": float((raw > 0).to(torch.float64).mean())}}
    out["normalized"] = None if nrm is None else {**summarize(nrm, quantiles),
                                                  "frac_positive": float((nrm > 0).to(torch.float64).mean())}
    return out


# ---- separability probe -----------------------------------------------------------------------


def separability_probe(features, y, n_components: Iterable[int] | None = None, *, C: float = 1.0,
                       max_iter: int = 10000, standardize: bool = True, seed: int = 0) -> list[dict]:
    """Linear separability of features vs the number of principal components kept.

    The features ``[N, D]`` are centred (and, with ``standardize``, scaled to unit variance per
    column), projected on their first ``k`` principal components, and a one-vs-rest linear SVM
    (scikit-learn ``LinearSVC``, squared hinge, penalty ``C``) is fit on them; its *training*
    accuracy measures how linearly separable the set is with ``k`` directions.

    Returns one dict per ``k`` (default ``1..min(D, N)``):
    ``{"n_components", "accuracy", "explained_variance"}`` (cumulative fraction of variance).
    """
    import numpy as np
    from sklearn.decomposition import PCA
    from sklearn.svm import LinearSVC

    X = features.detach().cpu().to(torch.float64).numpy() if isinstance(features, torch.Tensor) else np.asarray(features, dtype=np.float64)
    Y = y.detach().cpu().numpy().reshape(-1) if isinstance(y, torch.Tensor) else np.asarray(y).reshape(-1)
    if X.ndim != 2:
        raise ValueError(f"separability_probe: argument 'features' must be [N, D], got shape {list(X.shape)}")
    if Y.shape[0] != X.shape[0]:
        raise ValueError(f"separability_probe: argument 'y' must hold N={X.shape[0]} labels, got {Y.shape[0]}")
    if len(np.unique(Y)) < 2:
        raise ValueError("separability_probe: argument 'y' needs at least two classes")
    kmax = min(X.shape)
    ks = list(range(1, kmax + 1)) if n_components is None else [int(k) for k in n_components]
    for k in ks:
        if not 1 <= k <= kmax:
            raise ValueError(f"separability_probe: n_components must lie in [1, {kmax}], got {k}")
    X = X - X.mean(axis=0)
    if standardize:
        sd = X.std(axis=0)
        X = X / np.where(sd > 0, sd, 1.0)
    pca = PCA(n_components=max(ks), random_state=seed).fit(X)
    Z = pca.transform(X)
    cum = np.cumsum(pca.explained_variance_ratio_)
    out = []
    for k in ks:
        svm = LinearSVC(C=C, max_iter=max_iter, random_state=seed)
        svm.fit(Z[:, :k], Y)
        out.append({"n_components": k, "accuracy": float(svm.score(Z[:, :k], Y)),
                    "explained_variance": float(cum[k - 1])})
    return out
