"""One run of the information-plane study: one seed and one setting (activation, optimizer,
labels), everything recorded into a JSON-ready dict. Used by :mod:`mmim_ext.experiments.infoplane`."""

from __future__ import annotations

import math
import time
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
from torch import nn

from mmim_ext.diagnostics import GradientSNR, margin_quantiles, svm_alignment, weight_norms
from mmim_ext.infoplane import InfoPlaneRecorder, binned_mi

__all__ = ["ACTIVATIONS", "OPTIMIZERS", "DEFAULT_LR", "WIDTHS", "Setting", "RunConfig", "build_net",
           "binning_schemes", "train_one", "CONVERGENCE_WIDTHS", "FIT_ACCURACY", "SVM_FINAL_KEYS",
           "svm_is_current"]

WIDTHS = (12, 10, 7, 5, 4, 3, 2)
#: "relu-tanh": ReLU hidden layers with a tanh last hidden layer (one compressive layer).
ACTIVATIONS = ("tanh", "relu", "relu-tanh")
OPTIMIZERS = ("sgd", "gd", "adam")
#: Learning rates that fit the 12-bit task within the run's epochs: SGD with a fixed rate
#: reaches 100 % training accuracy by epoch ~600 at 0.05; full-batch GD takes one step per epoch
#: and needs a larger rate.
DEFAULT_LR = {"sgd": 0.05, "gd": 1.0, "adam": 1e-3}
#: Training accuracy from which a recording counts as a fit of the training set: the last layer is
#: compared with a hard-margin SVM only then (before, the features have no hard margin).
FIT_ACCURACY = 0.99
#: The fields of a run's ``final`` that come from that SVM comparison.
SVM_FINAL_KEYS = ("cosine", "net_margin", "svm_margin", "converged")
#: Bin widths of the convergence curve of binned I(X;T) on the final network.
CONVERGENCE_WIDTHS = tuple(10.0 ** (-k / 2) for k in range(0, 13))


def svm_is_current(svm: list[dict], accuracy: list[dict]) -> bool:
    """Whether the last SVM comparison (``svm[-1]``) describes the final network: it was made at
    the last recording (not at an earlier fit the net has since lost) on linearly separable
    features (the SVM classifies every training point; a soft-margin fit has no hard margin to
    compare with). A run's ``final`` SVM fields are ``None`` otherwise."""
    return (bool(svm) and bool(accuracy) and svm[-1]["epoch"] == accuracy[-1]["epoch"]
            and svm[-1].get("svm_train_accuracy", 1.0) >= 1.0)


@dataclass(frozen=True)
class Setting:
    """What varies between runs besides the seed."""

    activation: str
    optimizer: str
    random_labels: bool = False
    label_noise: float = 0.0

    @property
    def key(self) -> str:
        k = f"{self.activation}_{self.optimizer}"
        if self.random_labels:
            k += "_random"
        if self.label_noise > 0:
            k += f"_noise{self.label_noise:g}"
        return k


@dataclass(frozen=True)
class RunConfig:
    """What every run of one output folder shares (runs with another config do not merge)."""

    epochs: int
    points: int
    lr: dict
    batch_size: int
    noise_vars: tuple
    bin_width: float
    train_fraction: float
    eval_subset: int | None = None
    svm_C: float = 1e4

    def to_json(self) -> dict:
        d = asdict(self)
        d["noise_vars"] = list(self.noise_vars)
        return d


def _layer_act(activation: str, i: int, n_hidden: int) -> nn.Module:
    if activation == "tanh" or (activation == "relu-tanh" and i == n_hidden):
        return nn.Tanh()
    return nn.ReLU()


def build_net(activation: str, seed: int, widths=WIDTHS) -> tuple[nn.Sequential, dict, dict]:
    """MLP ``widths`` (default 12-10-7-5-4-3-2); returns ``(model, hidden activation modules, linear layers)``.

    Weights ~ N(0, 1/fan_in), biases 0 (the initialization of Shwartz-Ziv & Tishby and Saxe et al.).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    g = torch.Generator().manual_seed(seed)
    mods: OrderedDict[str, nn.Module] = OrderedDict()
    n_lin = len(widths) - 1
    for i in range(n_lin):
        lin = nn.Linear(widths[i], widths[i + 1])
        with torch.no_grad():
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / math.sqrt(widths[i]))
            lin.bias.zero_()
        mods[f"fc{i + 1}"] = lin
        if i < n_lin - 1:
            mods[f"h{i + 1}"] = _layer_act(activation, i + 1, n_lin - 1)
    model = nn.Sequential(mods)
    hidden = {f"h{i + 1}": getattr(model, f"h{i + 1}") for i in range(n_lin - 1)}
    linears = {f"fc{i + 1}": getattr(model, f"fc{i + 1}") for i in range(n_lin)}
    return model, hidden, linears


def binning_schemes(hidden: dict, bin_width: float) -> dict:
    """The two binning schemes recorded in every run, ``{scheme: {"n_bins"/"bin_width", "bin_range"}}``.

    * ``adaptive``: 30 equal bins; tanh layers over ``[-1, 1]``, ReLU layers over their own
      ``[min, max]`` at each recording (the bins widen as the activations grow), softmax output
      over ``[0, 1]``.
    * ``fixed``: bins of width ``bin_width`` on a range fixed for the whole run: tanh ``[-1, 1]``,
      ReLU ``[0, inf)`` (no upper clip, Saxe et al.'s ``floor(v / w)``), softmax ``[0, 1]``.
    """
    adaptive = {n: ((-1.0, 1.0) if isinstance(m, nn.Tanh) else None) for n, m in hidden.items()}
    fixed = {n: ((-1.0, 1.0) if isinstance(m, nn.Tanh) else (0.0, None)) for n, m in hidden.items()}
    adaptive["out"] = fixed["out"] = (0.0, 1.0)
    return {"adaptive": {"n_bins": 30, "bin_range": adaptive},
            "fixed": {"bin_width": float(bin_width), "bin_range": fixed}}


def _log_windows(n_epochs: int, n_windows: int = 60) -> list[tuple[int, int]]:
    """Half-open epoch windows ``[a, b)`` covering ``1..n_epochs``, log-spaced (one epoch each at first)."""
    edges = sorted({1, n_epochs + 1} | {int(round(math.exp(math.log(n_epochs + 1) * k / n_windows)))
                                         for k in range(n_windows + 1)})
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _window_snr(history: list[dict], n_epochs: int) -> list[dict]:
    """Per layer and log-window, the mean over epochs of ``snr``, ``mean_norm``, ``std_norm``.

    8000 epochs x layers of per-epoch rows would make each run's JSON megabytes; the plots smooth
    over log windows anyway.
    """
    by_layer: dict[str, dict[int, dict]] = {}
    for r in history:
        by_layer.setdefault(r["layer"], {})[r["epoch"]] = r
    out = []
    for a, b in _log_windows(n_epochs):
        for layer, rows in by_layer.items():
            sel = [rows[e] for e in range(a, b) if e in rows]
            if not sel:
                continue
            out.append({"epoch": math.sqrt(a * (b - 1)), "layer": layer,
                        **{k: sum(r[k] for r in sel) / len(sel) for k in ("snr", "mean_norm", "std_norm")}})
    return out


def _labels(setting: Setting, y: torch.Tensor, train_idx: torch.Tensor, seed: int) -> torch.Tensor:
    """The labels the run trains on (all 4096 inputs; test entries stay clean under label noise)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    if setting.random_labels:
        return y[torch.randperm(y.shape[0], generator=g)]  # same class balance, no relation to x
    y = y.clone()
    if setting.label_noise > 0:
        n_flip = int(round(setting.label_noise * train_idx.shape[0]))
        flip = train_idx[torch.randperm(train_idx.shape[0], generator=g)[:n_flip]]
        y[flip] = 1 - y[flip]
    return y


def train_one(setting: Setting, cfg: RunConfig, x: torch.Tensor, y: torch.Tensor, train_idx: torch.Tensor,
              test_idx: torch.Tensor, seed: int, *, progress: bool = False, log: bool = False) -> dict:
    """Train one network and record everything; returns a JSON-ready dict (all information in bits).

    ``y`` are the task's labels; the run trains on :func:`_labels` (random or noisy for the
    controls). ``I(T;Y)`` is measured against the labels the net is trained on for the
    random-label control, and against the clean task labels otherwise, on all inputs or on a
    fixed random subset of ``cfg.eval_subset`` of them (the KDE sums cost ``N^2``). The last
    layer is compared with a hard-margin SVM once the network fits at least 99 % of its training
    labels (before that the features have no hard margin and libsvm only runs into its cap).
    With ``log``, a line is printed at each recording (for runs that write to a file).
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model, hidden, linears = build_net(setting.activation, seed)
    head = linears[f"fc{len(WIDTHS) - 1}"]
    layers = dict(hidden)
    layers["out"] = head
    y_fit = _labels(setting, y, train_idx, seed)
    y_info = y_fit if setting.random_labels else y
    schemes = binning_schemes(hidden, cfg.bin_width)
    if cfg.eval_subset is not None and cfg.eval_subset < x.shape[0]:
        keep = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(20_000 + seed))[:cfg.eval_subset]
        x_rec, y_rec = x[keep.sort().values], y_info[keep.sort().values]
    else:
        x_rec, y_rec = x, y_info
    rec = InfoPlaneRecorder(model, layers, x_rec, y_rec, schedule="log", n_epochs=cfg.epochs, n_points=cfg.points,
                            n_bins=30, bin_range=schemes["adaptive"]["bin_range"], binnings=schemes,
                            noise_var=sorted(cfg.noise_vars, reverse=True), kde=True,
                            transforms={"out": lambda z: torch.softmax(z, dim=1)})
    snr = GradientSNR(model, linears)
    lr = cfg.lr[setting.optimizer]
    opt = (torch.optim.Adam(model.parameters(), lr=lr) if setting.optimizer == "adam"
           else torch.optim.SGD(model.parameters(), lr=lr))
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    xtr, ytr = x[train_idx], y_fit[train_idx]
    n_tr = xtr.shape[0]
    gen = torch.Generator().manual_seed(seed + 1)
    hist = {"accuracy": [], "margins": [], "weight_norms": [], "svm": []}
    penult = hidden[f"h{len(WIDTHS) - 2}"]

    def features(idx):
        store = {}
        h = penult.register_forward_hook(lambda m, i, o: store.setdefault("t", o.detach()))
        with torch.no_grad():
            logits = model(x[idx])
        h.remove()
        return store["t"], logits

    def measure(epoch: int):
        rec.record(epoch)
        model.eval()
        with torch.no_grad():
            pred = model(x).argmax(1)
        model.train()
        hist["accuracy"].append({"epoch": epoch,
                                 "train": float((pred[train_idx] == y_fit[train_idx]).double().mean()),
                                 "test": float((pred[test_idx] == y_fit[test_idx]).double().mean())})
        feats, logits = features(train_idx)
        hist["margins"].append({"epoch": epoch, **margin_quantiles(logits, ytr, head.weight)})
        hist["weight_norms"].append({"epoch": epoch, **weight_norms(model, linears)})
        if hist["accuracy"][-1]["train"] < FIT_ACCURACY:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # libsvm's iteration cap on non-separable (early) features
            s = svm_alignment(feats, ytr, head.weight, head.bias, C=cfg.svm_C, max_iter=5000)
        hist["svm"].append({"epoch": epoch, "cosine": s["cosine_min"], "net_margin": s["net_margin_min"],
                            "svm_margin": s["svm_margin_min"], "converged": s["converged"],
                            "svm_train_accuracy": s["pairs"][0]["svm_train_accuracy"]})

    measure(0)
    t0 = time.perf_counter()
    bar = tqdm(range(1, cfg.epochs + 1), desc=f"{setting.key} seed {seed}", disable=not progress, leave=False)
    for epoch in bar:
        order = torch.randperm(n_tr, generator=gen)
        if setting.optimizer == "gd":
            # Full-batch GD: the minibatch gradients at fixed weights sum to the full gradient (the
            # loss is a sum), and their spread is the noise SGD would have added at this point.
            opt.zero_grad(set_to_none=False)
            total = [torch.zeros_like(p) for p in model.parameters()]
        for start in range(0, n_tr, cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            opt.zero_grad(set_to_none=False)
            loss = loss_fn(model(xtr[idx]), ytr[idx]) / idx.shape[0]
            loss.backward()
            snr.step()
            if setting.optimizer == "gd":
                for t, p in zip(total, model.parameters()):
                    t.add_(p.grad, alpha=idx.shape[0] / n_tr)
            else:
                opt.step()
        if setting.optimizer == "gd":
            for t, p in zip(total, model.parameters()):
                p.grad.copy_(t)
            opt.step()
        snr.end_epoch(epoch)
        if rec.scheduled(epoch):
            measure(epoch)
            bar.set_postfix(train=f"{hist['accuracy'][-1]['train']:.3f}")
            if log:
                print(f"    {setting.key} seed {seed}: epoch {epoch}/{cfg.epochs}, train accuracy "
                      f"{hist['accuracy'][-1]['train']:.4f}, {time.perf_counter() - t0:.0f} s", flush=True)
    wall = time.perf_counter() - t0

    # Binned I(X;T) of the final network as the bins shrink: fixed widths on each layer's range.
    acts = rec.activations()
    convergence = []
    for name, t in acts.items():
        lo = -1.0 if isinstance(layers[name], nn.Tanh) else 0.0
        row = {"layer": name, "bin_width": list(CONVERGENCE_WIDTHS), "i_xt": []}
        for w in CONVERGENCE_WIDTHS:
            row["i_xt"].append(binned_mi(t, y_rec, lo=min(lo, float(t.min())), hi=None, bin_width=w)[0])
        convergence.append(row)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    final_norm = margin_quantiles(logits[train_idx], ytr, head.weight)["normalized"]
    return {
        "setting": asdict(setting),
        "key": setting.key,
        "seed": seed,
        "infoplane": rec.records,
        "infoplane_config": rec.config(),
        "grad_snr": _window_snr(snr.history, cfg.epochs),
        "bin_convergence": convergence,
        "final": {"train_accuracy": hist["accuracy"][-1]["train"], "test_accuracy": hist["accuracy"][-1]["test"],
                  "test_accuracy_clean": float((logits[test_idx].argmax(1) == y[test_idx]).double().mean()),
                  "margin_median": final_norm["q50"], "margin_min": final_norm["min"],
                  "margin_q05": final_norm["q05"],
                  **{k: (hist["svm"][-1][k] if svm_is_current(hist["svm"], hist["accuracy"]) else None)
                     for k in SVM_FINAL_KEYS}},
        "wall_s": wall,
        **hist,
    }
