"""Training diagnostics of the Zhao & Sun reading of deep learning (docs/design.md).

* :class:`GradientSNR` — per layer, ``||mean of minibatch gradients|| / ||their std||`` over an
  epoch (the drift / diffusion phases of Shwartz-Ziv & Tishby), and :func:`weight_norms`.
* :class:`ResidualBlock` and :class:`ResidualRatioMonitor` — ``||F(x)|| / ||x||`` per sample for
  residual blocks ``y = x + F(x)`` (invertible while the branch is a contraction), summarized as
  quantiles per epoch.
* :func:`margins` / :func:`margin_quantiles` — last-layer margins ``z_y - max_{k != y} z_k`` raw
  and normalized by ``||w_y - w_k||`` (the distance to the decision boundary in feature space).
* :func:`svm_alignment` — the last layer against a linear SVM fitted to the same features: the
  cosine between ``w_y - w_k`` and the SVM's normal for every class pair, and both minimum
  normalized margins (the "last layer is a max-margin classifier" reading).
* :func:`separability_probe` — accuracy of a linear SVM or k-nearest-neighbours classifier on
  features projected on their first ``k`` principal components; held out when a test split is
  given (PCA and classifier fitted on the training split only).
* :func:`lipschitz_bound` and :func:`jacobian_norm_max` — a global upper bound and a local
  estimate of the Lipschitz constant of a residual branch ``F``: ``Lip(F) < 1`` certifies that
  ``x -> x + F(x)`` is invertible (a per-sample ``||F(x)|| / ||x|| < 1`` does not).
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
    "PROBE_CLASSIFIERS",
    "ResidualRatioMonitor",
    "jacobian_norm_max",
    "lipschitz_bound",
    "margin_quantiles",
    "margins",
    "residual_ratios",
    "separability_probe",
    "summarize",
    "svm_alignment",
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


# ---- the last layer as a max-margin classifier ------------------------------------------------


def _numpy2d(name: str, owner: str, a):
    import numpy as np

    X = a.detach().cpu().to(torch.float64).numpy() if isinstance(a, torch.Tensor) else np.asarray(a, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"{owner}: argument '{name}' must be [N, D], got shape {list(X.shape)}")
    return X


def _numpy_labels(name: str, owner: str, y, n: int):
    import numpy as np

    Y = y.detach().cpu().numpy().reshape(-1) if isinstance(y, torch.Tensor) else np.asarray(y).reshape(-1)
    if Y.shape[0] != n:
        raise ValueError(f"{owner}: argument '{name}' must hold N={n} labels, got {Y.shape[0]}")
    return Y


def svm_alignment(features, y, weight, bias=None, *, C: float = 1e4, max_iter: int = 200_000) -> dict:
    """Compare a linear last layer with a (nearly) hard-margin linear SVM on the same features.

    For every pair of classes ``(a, b)`` present in ``y`` (``a < b``), a binary linear SVM
    (scikit-learn ``SVC(kernel="linear", C=C)``; a large ``C`` approximates the hard margin) is
    fitted to the samples of those two classes, ``+1`` for ``a``. The network's separator for the
    pair is ``(w_a - w_b) . h + (b_a - b_b) = 0``.

    Args:
        features: ``[N, D]`` penultimate features ``h`` (tensor or array), any float dtype.
        y: ``[N]`` integer labels in ``0..K-1``.
        weight: ``[K, D]`` last-layer weight ``W``.
        bias: ``[K]`` last-layer bias, or None (zero).
        C: SVM penalty; ``1e4`` is hard-margin for features of order 1.
        max_iter: libsvm iteration cap.

    Returns:
        ``{"pairs": [...], "cosine_min", "net_margin_min", "svm_margin_min"}``; each pair holds
        ``classes``, ``n``, ``cosine`` (between ``w_a - w_b`` and the SVM normal, 1 when the
        network's direction is the max-margin one), ``net_margin`` and ``svm_margin`` (minimum
        over the pair's samples of the signed distance to the separator, in feature units;
        negative when a sample is on the wrong side), ``svm_train_accuracy`` and ``converged``
        (False when libsvm stopped at ``max_iter``: typical of non-separable features with a
        large ``C``, where the "hard margin" is not defined anyway).
    """
    import numpy as np
    from sklearn.svm import SVC

    owner = "svm_alignment"
    X = _numpy2d("features", owner, features)
    Y = _numpy_labels("y", owner, y, X.shape[0])
    W = _numpy2d("weight", owner, weight)
    if W.shape[1] != X.shape[1]:
        raise ValueError(f"{owner}: argument 'weight' must be [K, D] with D={X.shape[1]}, got {list(W.shape)}")
    b = np.zeros(W.shape[0]) if bias is None else (
        bias.detach().cpu().to(torch.float64).numpy().reshape(-1) if isinstance(bias, torch.Tensor)
        else np.asarray(bias, dtype=np.float64).reshape(-1))
    if b.shape[0] != W.shape[0]:
        raise ValueError(f"{owner}: argument 'bias' must be [K] with K={W.shape[0]}, got {list(b.shape)}")
    if not (C > 0):
        raise ValueError(f"{owner}: argument 'C' must be > 0, got {C}")
    classes = np.unique(Y)
    if len(classes) < 2:
        raise ValueError(f"{owner}: argument 'y' needs at least two classes")
    if classes.min() < 0 or classes.max() >= W.shape[0]:
        raise ValueError(f"{owner}: labels in 'y' must lie in [0, {W.shape[0] - 1}]")
    pairs = []
    for i, a in enumerate(classes):
        for cb in classes[i + 1:]:
            sel = (Y == a) | (Y == cb)
            Xp, s = X[sel], np.where(Y[sel] == a, 1.0, -1.0)
            d, off = W[a] - W[cb], b[a] - b[cb]
            dn = float(np.linalg.norm(d))
            svm = SVC(kernel="linear", C=C, max_iter=max_iter).fit(Xp, s)
            u, u0 = svm.coef_.reshape(-1), float(svm.intercept_[0])
            un = float(np.linalg.norm(u))
            pairs.append({
                "classes": [int(a), int(cb)],
                "n": int(sel.sum()),
                "cosine": float(d @ u / (dn * un)) if dn > 0 and un > 0 else float("nan"),
                "net_margin": float(np.min(s * (Xp @ d + off)) / dn) if dn > 0 else float("nan"),
                "svm_margin": float(np.min(s * (Xp @ u + u0)) / un) if un > 0 else float("nan"),
                "svm_train_accuracy": float(svm.score(Xp, s)),
                "converged": bool(np.all(np.asarray(svm.n_iter_) < max_iter)),
            })
    return {"pairs": pairs,
            "cosine_min": min(p["cosine"] for p in pairs),
            "net_margin_min": min(p["net_margin"] for p in pairs),
            "svm_margin_min": min(p["svm_margin"] for p in pairs),
            "converged": all(p["converged"] for p in pairs)}


# ---- separability probe -----------------------------------------------------------------------

PROBE_CLASSIFIERS = ("linear_svm", "knn")


def separability_probe(features, y, n_components: Iterable[int] | None = None, *, test_features=None,
                       test_y=None, classifier: str = "linear_svm", n_neighbors: int = 5, C: float = 1.0,
                       max_iter: int = 10000, standardize: bool = True, seed: int = 0) -> list[dict]:
    """Accuracy of a classifier on features projected on their first ``k`` principal components.

    The centring, per-column scaling (``standardize``) and PCA are fitted on ``features``
    ``[N, D]`` only and applied unchanged to ``test_features`` ``[M, D]``; the classifier
    (``"linear_svm"``: one-vs-rest ``LinearSVC``, squared hinge, penalty ``C``, primal solver; ``"knn"``:
    ``n_neighbors``-nearest neighbours, Euclidean) is fitted on the training projection. The
    held-out accuracy says how much of the class structure ``k`` directions carry; the training
    accuracy of a linear classifier on a layer the network's head already separates says nothing
    beyond that.

    Returns one dict per ``k`` (default ``1..min(D, N)``): ``{"n_components", "train_accuracy",
    "test_accuracy" (None without a test split), "explained_variance"}`` (cumulative fraction of
    the training variance).
    """
    import numpy as np
    from sklearn.decomposition import PCA
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.svm import LinearSVC

    owner = "separability_probe"
    X = _numpy2d("features", owner, features)
    Y = _numpy_labels("y", owner, y, X.shape[0])
    if classifier not in PROBE_CLASSIFIERS:
        raise ValueError(f"{owner}: argument 'classifier' must be one of {PROBE_CLASSIFIERS}, got {classifier!r}")
    if len(np.unique(Y)) < 2:
        raise ValueError(f"{owner}: argument 'y' needs at least two classes")
    if (test_features is None) != (test_y is None):
        raise ValueError(f"{owner}: arguments 'test_features' and 'test_y' go together")
    Xt = Yt = None
    if test_features is not None:
        Xt = _numpy2d("test_features", owner, test_features)
        if Xt.shape[1] != X.shape[1]:
            raise ValueError(f"{owner}: argument 'test_features' must have D={X.shape[1]} columns, got {Xt.shape[1]}")
        Yt = _numpy_labels("test_y", owner, test_y, Xt.shape[0])
    kmax = min(X.shape)
    ks = list(range(1, kmax + 1)) if n_components is None else [int(k) for k in n_components]
    for k in ks:
        if not 1 <= k <= kmax:
            raise ValueError(f"{owner}: n_components must lie in [1, {kmax}], got {k}")
    mu = X.mean(axis=0)
    sd = X.std(axis=0) if standardize else np.ones(X.shape[1])
    sd = np.where(sd > 0, sd, 1.0)
    pca = PCA(n_components=max(ks), random_state=seed).fit((X - mu) / sd)
    Z = pca.transform((X - mu) / sd)
    Zt = pca.transform((Xt - mu) / sd) if Xt is not None else None
    cum = np.cumsum(pca.explained_variance_ratio_)
    out = []
    for k in ks:
        if classifier == "knn":
            clf = KNeighborsClassifier(n_neighbors=n_neighbors)
        else:
            # The primal solver: samples outnumber the components here, and the dual's coordinate
            # descent crawls on the non-separable projections of the first few components.
            clf = LinearSVC(C=C, dual=False, max_iter=max_iter, random_state=seed)
        clf.fit(Z[:, :k], Y)
        out.append({"n_components": k, "train_accuracy": float(clf.score(Z[:, :k], Y)),
                    "test_accuracy": None if Zt is None else float(clf.score(Zt[:, :k], Yt)),
                    "explained_variance": float(cum[k - 1])})
    return out


# ---- Lipschitz constants of residual branches -------------------------------------------------

# Activations with Lipschitz constant at most 1 (elementwise, slope in [-1, 1] everywhere).
_ONE_LIPSCHITZ = (nn.ReLU, nn.Tanh, nn.Hardtanh, nn.ReLU6, nn.Softsign, nn.Identity, nn.Flatten, nn.Unflatten)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _leaves(module: nn.Module, prefix: str):
    if isinstance(module, nn.Sequential):
        for name, child in module.named_children():
            yield from _leaves(child, f"{prefix}.{name}" if prefix else name)
    else:
        yield prefix or type(module).__name__, module


def _power_iteration(op, shape, n_iter: int, tol: float, gen: torch.Generator, dtype) -> float:
    """Largest singular value of the linear map ``op`` on inputs ``[1, *shape]`` (from below)."""
    v = torch.randn((1, *shape), generator=gen, dtype=torch.float64).to(dtype)
    v = v / v.norm()
    sigma = 0.0
    for _ in range(n_iter):
        v = v.detach().requires_grad_(True)
        with torch.enable_grad():
            u = op(v)
            new = float(u.detach().norm())
            if new == 0.0:
                return 0.0
            (g,) = torch.autograd.grad(u, v, u.detach() / new)  # A^T u / ||u||
        v = (g / g.norm()).detach()
        if abs(new - sigma) <= tol * new:
            return new
        sigma = new
    return sigma


def lipschitz_bound(branch: nn.Module, input_shape: Sequence[int] | None = None, *, n_iter: int = 500,
                    tol: float = 1e-9, seed: int = 0) -> float:
    """Upper bound on the Lipschitz constant (Euclidean norms) of a feed-forward branch ``F``.

    ``branch`` is a module, or an ``nn.Sequential`` (nested allowed) of ``nn.Linear``,
    ``nn.Conv1d/2d/3d`` (any stride, padding mode, dilation, groups) and 1-Lipschitz elementwise
    maps (``ReLU``, ``Tanh``, ``Hardtanh``, ``ReLU6``, ``Softsign``, ``LeakyReLU`` and ``ELU``
    with slope parameter in ``[-1, 1]``, ``Identity``, ``Flatten``, ``Unflatten``; ``Sigmoid``
    counts ``1/4``; ``Dropout`` only in eval mode). The bound is the product of the layers'
    spectral norms: exact (``torch.linalg.matrix_norm(W, 2)``) for ``Linear``; for a convolution,
    whose norm depends on the input size and padding, power iteration on the bias-free map at the
    layer's input shape (converges to the norm from below; ``n_iter``, relative ``tol``).

    Args:
        branch: the module ``F``.
        input_shape: per-sample input shape (without the batch axis); needed when a convolution
            is present, optional otherwise.

    Returns:
        the bound as a Python float. ``x -> x + F(x)`` is invertible when it is ``< 1``.

    Raises:
        TypeError naming the first module that is none of the above.
    """
    if not isinstance(branch, nn.Module):
        raise TypeError(f"lipschitz_bound: argument 'branch' must be an nn.Module, got {type(branch).__name__}")
    leaves = list(_leaves(branch, ""))
    param = next(branch.parameters(), None)
    dtype = torch.float64 if param is None or param.dtype == torch.float64 else param.dtype
    device = param.device if param is not None else torch.device("cpu")
    shape = None if input_shape is None else tuple(int(s) for s in input_shape)
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0
    for name, mod in leaves:
        if isinstance(mod, nn.Linear):
            bound *= float(torch.linalg.matrix_norm(mod.weight.detach().to(torch.float64), ord=2))
        elif isinstance(mod, _CONVS):
            if shape is None:
                raise ValueError(f"lipschitz_bound: module {name!r} ({type(mod).__name__}) needs 'input_shape' "
                                 "(a convolution's spectral norm depends on the input size)")
            zero = torch.zeros((1, *shape), dtype=mod.weight.dtype, device=device)
            with torch.no_grad():
                offset = mod(zero)

            def op(v, mod=mod, offset=offset):  # the bias-free (linear) part of the layer
                return mod(v.to(mod.weight.dtype)) - offset
            bound *= _power_iteration(op, shape, n_iter, tol, gen, mod.weight.dtype)
        elif isinstance(mod, (nn.LeakyReLU,)) and abs(mod.negative_slope) <= 1:
            pass
        elif isinstance(mod, nn.ELU) and 0 <= mod.alpha <= 1:
            pass
        elif isinstance(mod, nn.Sigmoid):
            bound *= 0.25
        elif isinstance(mod, nn.Dropout) and (not mod.training or mod.p == 0):
            pass
        elif isinstance(mod, _ONE_LIPSCHITZ):
            pass
        else:
            raise TypeError(f"lipschitz_bound: cannot bound module {name!r} ({type(mod).__name__}); supported: "
                            "Linear, Conv1d/2d/3d and 1-Lipschitz activations (ReLU, Tanh, LeakyReLU and ELU with "
                            "slope <= 1, Hardtanh, ReLU6, Softsign, Sigmoid, Identity, Flatten, eval-mode Dropout)")
        if shape is not None:  # the next layer's input shape (a convolution's norm depends on it)
            w = getattr(mod, "weight", None)
            with torch.no_grad():
                probe = torch.zeros((1, *shape), dtype=w.dtype if isinstance(w, torch.Tensor) else dtype, device=device)
                shape = tuple(mod(probe).shape[1:])
    return bound


def jacobian_norm_max(branch: nn.Module, x: torch.Tensor, *, chunk: int = 256, return_all: bool = False):
    """Largest spectral norm of the Jacobian of ``branch`` over the samples of ``x``.

    A local estimate of ``Lip(F)`` on the data (a lower bound on the global constant, which
    :func:`lipschitz_bound` bounds from above). ``x`` is ``[N, ...]``; each sample's Jacobian
    ``[prod(out shape), prod(in shape)]`` is formed with ``torch.func.jacrev`` in chunks of
    ``chunk`` samples. Returns a float, or with ``return_all`` the ``[N]`` float64 tensor of
    per-sample norms.
    """
    from torch.func import jacrev, vmap

    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] < 1:
        raise ValueError(f"jacobian_norm_max: argument 'x' must be a tensor [N, ...] with N >= 1, "
                         f"got {list(getattr(x, 'shape', []))}")

    def f(v):
        return branch(v.unsqueeze(0)).reshape(-1)

    norms = []
    for start in range(0, x.shape[0], chunk):
        xb = x[start:start + chunk].detach()
        J = vmap(jacrev(f))(xb).reshape(xb.shape[0], -1, xb[0].numel())
        norms.append(torch.linalg.matrix_norm(J.detach().to(torch.float64), ord=2))
    allv = torch.cat(norms)
    return allv if return_all else float(allv.max())
