"""Recording information planes during training: hooks, schedule, JSON/CSV and plots."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from mmim_ext.infoplane.binned import binned_mi
from mmim_ext.infoplane.kde import kde_mi

__all__ = ["InfoPlaneRecorder", "log_schedule", "plot_infoplane", "PLANE_KEYS"]

#: estimator name -> (x key, y key) of a record, for :func:`plot_infoplane`.
PLANE_KEYS = {
    "binned": ("i_xt_bin", "i_ty_bin"),
    "kde_upper": ("i_xt_upper", "i_ty_upper"),
    "kde_lower": ("i_xt_lower", "i_ty_lower"),
}


def log_schedule(n_epochs: int, n_points: int = 30) -> list[int]:
    """Epochs ``0..n_epochs`` spaced logarithmically (as in Shwartz-Ziv & Tishby), 0 and the last included."""
    if n_epochs < 0 or n_points < 1:
        raise ValueError(f"log_schedule: need n_epochs >= 0 and n_points >= 1, got {n_epochs}, {n_points}")
    if n_epochs == 0:
        return [0]
    pts = {0, n_epochs}
    for k in range(n_points):
        pts.add(int(round(math.exp(math.log(n_epochs) * k / max(n_points - 1, 1)))))
    return sorted(p for p in pts if 0 <= p <= n_epochs)


def _resolve_layers(model: nn.Module, layers) -> dict[str, nn.Module]:
    if isinstance(layers, Mapping):
        out = dict(layers)
    else:
        names = {id(m): n for n, m in model.named_modules()}
        out = {}
        for item in layers:
            if isinstance(item, str):
                out[item] = model.get_submodule(item)
            elif isinstance(item, nn.Module):
                if id(item) not in names:
                    raise ValueError("InfoPlaneRecorder: a module in 'layers' is not part of 'model'")
                out[names[id(item)] or "model"] = item
            else:
                raise TypeError(f"InfoPlaneRecorder: 'layers' items must be names or modules, got {type(item).__name__}")
    if not out:
        raise ValueError("InfoPlaneRecorder: argument 'layers' is empty")
    for name, mod in out.items():
        if not isinstance(mod, nn.Module):
            raise TypeError(f"InfoPlaneRecorder: layer {name!r} is not an nn.Module")
    return out


class InfoPlaneRecorder:
    """Information-plane coordinates of chosen layers on a fixed set, on a schedule of epochs.

    At each scheduled epoch the model is run (``eval()`` mode, no gradients) on ``x``; forward
    hooks, present only during that evaluation, collect each layer's output. Per layer it records
    the binned ``I(X;T)``, ``I(T;Y)`` and pattern count (:func:`binned_mi`) and, with ``kde=True``,
    the four KDE estimates (:func:`kde_mi`), all in bits.

    Args:
        model: the network; called as ``model(x_batch)``.
        layers: ``{name: module}``, or a sequence of submodule names or modules of ``model``.
        x: ``[N, ...]`` fixed evaluation inputs (for ``I(X;T) = H(T)`` they should be distinct).
        y: ``[N]`` integer labels.
        schedule: ``"every"`` (every epoch), ``"log"`` (:func:`log_schedule` of ``n_epochs``,
            ``n_points``) or an iterable of epochs.
        n_bins: bins per unit for the binned estimator.
        bin_range: ``(lo, hi)`` for every layer, ``None`` for each layer's own ``[min, max]`` at
            that epoch (the adaptive binning used for unbounded units such as ReLU), or a dict
            ``{layer: (lo, hi) | None}``. With ``bin_width``, ``hi`` may be ``None`` (open above).
        bin_width: fixed bin width instead of ``n_bins`` equal bins (:func:`bin_indices`).
        binnings: further binning schemes measured at the same time, ``{scheme: {"n_bins": ...,
            "bin_width": ..., "bin_range": ...}}`` (same meanings, missing keys take the defaults
            above); each record then holds ``record["binnings"][scheme] = {"i_xt", "i_ty",
            "n_patterns", "lo", "hi"}`` (bits).
        noise_var: ``sigma^2`` of the KDE estimator, or a sequence of them: the first gives the
            flat ``i_xt_upper`` ... keys (both bounds), and with a sequence every value is also
            stored as ``record["kde"]["<sigma^2>"]`` (bits; the later values with the upper bound
            only, which halves their cost).
        kde: compute the KDE estimates too.
        transforms: optional ``{layer: fn}`` applied to the hooked output (e.g. softmax on logits).
        batch_size: evaluation batch size (``None``: all of ``x`` at once).
        backend: ``kde_lse`` backend.
    """

    def __init__(
        self,
        model: nn.Module,
        layers,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        schedule: str | Iterable[int] = "log",
        n_epochs: int | None = None,
        n_points: int = 30,
        n_bins: int = 30,
        bin_range=(-1.0, 1.0),
        bin_width: float | None = None,
        binnings: Mapping[str, Mapping] | None = None,
        noise_var: float | Sequence[float] = 0.1,
        kde: bool = True,
        transforms: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
        batch_size: int | None = None,
        backend: str = "auto",
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"InfoPlaneRecorder: argument 'model' must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.layers = _resolve_layers(model, layers)
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError("InfoPlaneRecorder: arguments 'x' and 'y' must be tensors")
        if x.shape[0] != y.reshape(-1).shape[0]:
            raise ValueError(f"InfoPlaneRecorder: 'x' has {x.shape[0]} rows but 'y' has {y.reshape(-1).shape[0]} labels")
        self.x, self.y = x, y.reshape(-1)
        if schedule == "every":
            self._epochs = None
        elif schedule == "log":
            if n_epochs is None:
                raise ValueError("InfoPlaneRecorder: schedule='log' needs 'n_epochs'")
            self._epochs = set(log_schedule(n_epochs, n_points))
        elif isinstance(schedule, str):
            raise ValueError(f"InfoPlaneRecorder: argument 'schedule' must be 'every', 'log' or a list of epochs, got {schedule!r}")
        else:
            self._epochs = {int(e) for e in schedule}
        self.n_bins = n_bins
        self.bin_range = bin_range
        self.bin_width = bin_width
        self.binnings = {}
        for scheme, spec in (binnings or {}).items():
            unknown = set(spec) - {"n_bins", "bin_width", "bin_range"}
            if unknown:
                raise ValueError(f"InfoPlaneRecorder: binning scheme {scheme!r} has unknown keys {sorted(unknown)}")
            self.binnings[str(scheme)] = {"n_bins": spec.get("n_bins", n_bins), "bin_width": spec.get("bin_width"),
                                          "bin_range": spec.get("bin_range", (-1.0, 1.0))}
        if isinstance(noise_var, (int, float)) and not isinstance(noise_var, bool):
            self.noise_vars = None
            self.noise_var = float(noise_var)
        else:
            self.noise_vars = [float(v) for v in noise_var]
            if not self.noise_vars:
                raise ValueError("InfoPlaneRecorder: argument 'noise_var' is an empty sequence")
            self.noise_var = self.noise_vars[0]
        self.kde = kde
        self.transforms = dict(transforms or {})
        unknown = set(self.transforms) - set(self.layers)
        if unknown:
            raise ValueError(f"InfoPlaneRecorder: 'transforms' names unknown layers {sorted(unknown)}")
        self.batch_size = batch_size
        self.backend = backend
        self.records: list[dict] = []

    # ---- schedule ------------------------------------------------------------------------

    def scheduled(self, epoch: int) -> bool:
        """Whether ``epoch`` is on the schedule."""
        return self._epochs is None or int(epoch) in self._epochs

    def maybe_record(self, epoch: int) -> bool:
        """Record if ``epoch`` is scheduled; returns whether it did."""
        if not self.scheduled(epoch):
            return False
        self.record(epoch)
        return True

    # ---- measurement ---------------------------------------------------------------------

    def activations(self) -> dict[str, torch.Tensor]:
        """Each layer's output on the fixed set, ``{name: [N, units]}`` (detached)."""
        store: dict[str, list[torch.Tensor]] = {name: [] for name in self.layers}
        handles = []
        for name, mod in self.layers.items():
            def hook(_m, _inp, out, name=name):
                if isinstance(out, (tuple, list)):
                    out = out[0]
                store[name].append(out.detach())
            handles.append(mod.register_forward_hook(hook))
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                bs = self.batch_size or self.x.shape[0]
                for start in range(0, self.x.shape[0], bs):
                    self.model(self.x[start:start + bs])
        finally:
            for h in handles:
                h.remove()
            self.model.train(was_training)
        acts = {}
        for name, parts in store.items():
            if not parts:
                raise RuntimeError(f"InfoPlaneRecorder: layer {name!r} was not called during the model's forward pass")
            t = torch.cat(parts)
            if name in self.transforms:
                t = self.transforms[name](t)
            acts[name] = t.reshape(t.shape[0], -1)
        return acts

    @staticmethod
    def _range(bin_range, name: str, t: torch.Tensor) -> tuple[float, float | None]:
        rng = bin_range.get(name, (-1.0, 1.0)) if isinstance(bin_range, Mapping) else bin_range
        if rng is None:
            lo, hi = float(t.min()), float(t.max())
            if not hi > lo:  # a constant layer: one bin holds everything
                hi = lo + 1.0
            return lo, hi
        return float(rng[0]), None if rng[1] is None else float(rng[1])

    def record(self, epoch: int) -> list[dict]:
        """Measure every layer now and append one record per layer; returns the new records."""
        acts = self.activations()
        new = []
        for order, (name, t) in enumerate(acts.items()):
            lo, hi = self._range(self.bin_range, name, t)
            res = binned_mi(t, self.y, self.n_bins, lo, hi, bin_width=self.bin_width, return_num_patterns=True)
            rec = {
                "epoch": int(epoch),
                "layer": name,
                "layer_index": order,
                "units": int(t.shape[1]),
                "lo": lo,
                "hi": hi,
                "i_xt_bin": res.i_xt,
                "i_ty_bin": res.i_ty,
                "n_patterns": res.n_patterns,
            }
            if self.binnings:
                rec["binnings"] = {}
                for scheme, spec in self.binnings.items():
                    slo, shi = self._range(spec["bin_range"], name, t)
                    r = binned_mi(t, self.y, spec["n_bins"], slo, shi, bin_width=spec["bin_width"],
                                  return_num_patterns=True)
                    rec["binnings"][scheme] = {"i_xt": r.i_xt, "i_ty": r.i_ty, "n_patterns": r.n_patterns,
                                               "lo": slo, "hi": shi}
            if self.kde:
                if self.noise_vars is None:
                    rec.update(kde_mi(t, self.y, self.noise_var, backend=self.backend))
                else:
                    rec["kde"] = {f"{v:g}": kde_mi(t, self.y, v, backend=self.backend,
                                                   bounds=("upper", "lower") if i == 0 else ("upper",))
                                  for i, v in enumerate(self.noise_vars)}
                    rec.update(rec["kde"][f"{self.noise_var:g}"])
            new.append(rec)
        self.records.extend(new)
        return new

    # ---- output --------------------------------------------------------------------------

    def config(self) -> dict:
        return {
            "layers": list(self.layers),
            "n_samples": int(self.x.shape[0]),
            "n_bins": None if self.bin_width is not None else self.n_bins,
            "bin_width": self.bin_width,
            "bin_range": _range_json(self.bin_range),
            "binnings": {k: {"n_bins": None if v["bin_width"] is not None else v["n_bins"],
                             "bin_width": v["bin_width"], "bin_range": _range_json(v["bin_range"])}
                         for k, v in self.binnings.items()},
            "noise_var": self.noise_var,
            "noise_vars": self.noise_vars,
            "kde": self.kde,
            "schedule": None if self._epochs is None else sorted(self._epochs),
            "units": "bits",
        }

    def to_json(self, path: str) -> None:
        """Write ``{"config": ..., "records": [...]}``."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"config": self.config(), "records": self.records}, f, indent=1)

    def to_csv(self, path: str) -> None:
        """One row per (epoch, layer)."""
        if not self.records:
            raise RuntimeError("InfoPlaneRecorder.to_csv: nothing recorded yet")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        keys = [k for k, v in self.records[0].items() if not isinstance(v, dict)]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            w.writerows(self.records)

    def plot(self, path: str | None = None, estimator: str = "binned", title: str | None = None):
        """Information-plane figure (a matplotlib ``Figure``); saved as PNG when ``path`` is given."""
        fig = _new_figure((6.0, 4.8))
        ax = fig.add_subplot(1, 1, 1)
        plot_infoplane(self.records, ax, estimator=estimator, title=title)
        fig.tight_layout()
        if path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            fig.savefig(path, dpi=120)
        return fig


def _range_json(rng):
    if isinstance(rng, Mapping):
        return {k: (list(v) if v is not None else None) for k, v in rng.items()}
    return None if rng is None else list(rng)


def _new_figure(size):
    # A Figure with its own Agg canvas: no pyplot global state, no GUI backend needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def plot_infoplane(records: Sequence[dict], ax, *, estimator: str = "binned", title: str | None = None,
                   colorbar: bool = True, cmap: str = "viridis"):
    """Draw ``I(X;T)`` vs ``I(T;Y)`` on ``ax``: one trajectory per layer, points coloured by epoch.

    ``records`` are :class:`InfoPlaneRecorder` records; ``estimator`` is a key of
    :data:`PLANE_KEYS`. Epoch colours are on a log scale (epoch 0 drawn as epoch 1).
    """
    from matplotlib.colors import LogNorm, Normalize

    if estimator not in PLANE_KEYS:
        raise ValueError(f"plot_infoplane: argument 'estimator' must be one of {sorted(PLANE_KEYS)}, got {estimator!r}")
    kx, ky = PLANE_KEYS[estimator]
    recs = [r for r in records if kx in r and ky in r]
    if not recs:
        raise ValueError(f"plot_infoplane: no records hold {kx!r} and {ky!r}")
    epochs = [max(r["epoch"], 1) for r in recs]
    e_max = max(epochs)
    norm = LogNorm(vmin=1, vmax=e_max) if e_max > 1 else Normalize(vmin=0, vmax=1)
    layers = []
    for r in recs:
        if r["layer"] not in layers:
            layers.append(r["layer"])
    sc = None
    for name in layers:
        pts = sorted((r for r in recs if r["layer"] == name), key=lambda r: r["epoch"])
        xs = [r[kx] for r in pts]
        ys = [r[ky] for r in pts]
        ax.plot(xs, ys, color="0.6", lw=0.8, zorder=1)
        sc = ax.scatter(xs, ys, c=[max(r["epoch"], 1) for r in pts], cmap=cmap, norm=norm, s=22,
                        edgecolors="none", zorder=2)
        ax.annotate(name, (xs[-1], ys[-1]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("I(X;T) [bits]")
    ax.set_ylabel("I(T;Y) [bits]")
    ax.set_title(title or f"information plane ({estimator})")
    ax.grid(alpha=0.3)
    if colorbar and sc is not None:
        ax.figure.colorbar(sc, ax=ax, label="epoch")
    return ax
