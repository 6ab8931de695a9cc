"""Information plane: binned and KDE estimators against direct computations, the recorder, plots."""

import json
import math
import os
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from mmim_ext.infoplane import InfoPlaneRecorder, bin_indices, binned_mi, kde_mi, log_schedule, pattern_ids


def _direct_binned(t: np.ndarray, y: np.ndarray, n_bins: int, lo: float, hi: float):
    """Shwartz-Ziv & Tishby by hand: tuples of bin indices, Counter, plug-in entropies (bits)."""
    v = np.clip(t.astype(np.float64), lo, hi)
    bins = np.minimum(np.floor((v - lo) / (hi - lo) * n_bins), n_bins - 1).astype(np.int64)
    pats = [tuple(r) for r in bins]

    def H(items):
        c = Counter(items)
        n = sum(c.values())
        return -sum(k / n * math.log2(k / n) for k in c.values())

    h_t = H(pats)
    h_t_given_y = 0.0
    for cls in set(y.tolist()):
        sel = [p for p, lab in zip(pats, y.tolist()) if lab == cls]
        h_t_given_y += len(sel) / len(pats) * H(sel)
    return h_t, h_t - h_t_given_y, len(set(pats))


@pytest.mark.parametrize("seed", range(6))
def test_binned_mi_matches_direct(seed):
    rng = np.random.default_rng(seed)
    N, d = rng.integers(20, 400), rng.integers(1, 5)
    n_bins = int(rng.integers(2, 8))
    lo, hi = -1.0, 1.0
    t = rng.uniform(-1.3, 1.3, size=(N, d))
    # Values on the range ends and on interior bin edges must land where the formula says.
    t[0, 0], t[1 % N, 0] = lo, hi
    t[2 % N, 0] = lo + (hi - lo) / n_bins
    y = rng.integers(0, 3, size=N)
    dtype = torch.float64 if seed % 2 else torch.float32
    tt = torch.tensor(t, dtype=dtype)
    res = binned_mi(tt, torch.tensor(y), n_bins, lo, hi, return_num_patterns=True)
    h_t, i_ty, n_pat = _direct_binned(tt.double().numpy(), y, n_bins, lo, hi)
    assert abs(res.i_xt - h_t) < 1e-6
    assert abs(res.i_ty - i_ty) < 1e-6
    assert res.n_patterns == n_pat
    assert binned_mi(tt, torch.tensor(y), n_bins, lo, hi) == (res.i_xt, res.i_ty)


def test_binned_mi_known_cases():
    N = 64
    t = torch.linspace(-0.99, 0.99, N).unsqueeze(1)
    y = (t[:, 0] > 0).long()
    # 64 bins over [-1, 1] and 64 evenly spread values: every sample its own pattern.
    i_xt, i_ty = binned_mi(t, y, n_bins=64)
    assert i_xt == pytest.approx(6.0, abs=1e-12)
    assert i_ty == pytest.approx(1.0, abs=1e-12)  # the pattern determines the label
    # Two bins split exactly at the label threshold: T = Y.
    assert binned_mi(t, y, n_bins=2) == pytest.approx((1.0, 1.0), abs=1e-12)
    # One bin: no information at all.
    assert binned_mi(t, y, n_bins=1) == pytest.approx((0.0, 0.0), abs=1e-12)
    # One-hot labels give the same answer as class indices.
    assert binned_mi(t, nn.functional.one_hot(y), n_bins=8) == binned_mi(t, y, n_bins=8)


def _direct_fixed(t: np.ndarray, y: np.ndarray, w: float, lo: float, hi):
    """Fixed-width bins by hand: clip, floor((v - lo) / w), cap at the last bin, count tuples."""
    v = np.clip(t.astype(np.float64), lo, np.inf if hi is None else hi)
    bins = np.floor((v - lo) / w)
    if hi is not None:
        bins = np.minimum(bins, math.ceil((hi - lo) / w) - 1)
    pats = [tuple(r) for r in bins.astype(np.int64)]

    def H(items):
        c = Counter(items)
        n = sum(c.values())
        return -sum(k / n * math.log2(k / n) for k in c.values())

    h_t = H(pats)
    h_t_given_y = sum((y == c).mean() * H([p for p, lab in zip(pats, y) if lab == c]) for c in set(y.tolist()))
    return h_t, h_t - h_t_given_y, len(set(pats))


@pytest.mark.parametrize("seed", range(6))
def test_fixed_width_binning_matches_direct_counting(seed):
    rng = np.random.default_rng(100 + seed)
    N, d = int(rng.integers(20, 300)), int(rng.integers(1, 4))
    w = float(rng.choice([0.07, 0.25, 0.5]))
    t = rng.uniform(-0.5, 3.0, size=(N, d))
    t[0, 0], t[1, 0] = 3 * w, 0.0  # values on bin edges
    y = rng.integers(0, 2, size=N)
    for lo, hi in ((0.0, None), (-1.0, 1.0), (0.0, 2.0)):
        res = binned_mi(torch.tensor(t), torch.tensor(y), lo=lo, hi=hi, bin_width=w, return_num_patterns=True)
        want = _direct_fixed(t, y, w, lo, hi)
        assert res.i_xt == pytest.approx(want[0], abs=1e-9) and res.i_ty == pytest.approx(want[1], abs=1e-9)
        assert res.n_patterns == want[2]
    b = bin_indices(torch.tensor(t), lo=0.0, hi=None, bin_width=w)
    assert int(b[0, 0]) == 3 and int(b[1, 0]) == 0 and int(b.min()) == 0


def test_fixed_width_bins_do_not_move_with_the_range():
    # One sample's activation grows tenfold: with fixed-width bins the other samples keep their
    # bins; with bins over the data's own [min, max] every bin widens and patterns merge.
    t = torch.linspace(0.0, 1.0, 100, dtype=torch.float64).unsqueeze(1)
    y = (t[:, 0] > 0.5).long()
    grown = t.clone()
    grown[-1, 0] = 10.0
    fixed = [bin_indices(v, lo=0.0, hi=None, bin_width=0.07) for v in (t, grown)]
    adaptive = [bin_indices(v, 30, float(v.min()), float(v.max())) for v in (t, grown)]
    assert torch.equal(fixed[0][:-1], fixed[1][:-1])
    assert len(torch.unique(adaptive[1][:-1])) < len(torch.unique(adaptive[0][:-1])) / 5
    i_fixed = [binned_mi(v, y, lo=0.0, hi=None, bin_width=0.07)[0] for v in (t, grown)]
    i_adaptive = [binned_mi(v, y, 30, float(v.min()), float(v.max()))[0] for v in (t, grown)]
    assert abs(i_fixed[1] - i_fixed[0]) < 0.05 and i_adaptive[1] < i_adaptive[0] - 2.0
    # Tanh-range fixed bins: 0.07 over [-1, 1] gives ceil(2 / 0.07) = 29 bins.
    b = bin_indices(torch.linspace(-1, 1, 1000).unsqueeze(1), lo=-1.0, hi=1.0, bin_width=0.07)
    assert int(b.max()) == 28 and len(torch.unique(b)) == 29


def test_bin_indices_and_patterns():
    t = torch.tensor([[-5.0, 0.0], [1.0, 0.49], [0.5, -1.0], [-5.0, 0.0]])
    b = bin_indices(t, n_bins=4)
    assert b.tolist() == [[0, 2], [3, 2], [3, 0], [0, 2]]
    ids, n = pattern_ids(b)
    assert n == 3 and ids[0] == ids[3] and len({int(ids[0]), int(ids[1]), int(ids[2])}) == 3


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: binned_mi(torch.randn(5, 2), torch.zeros(4, dtype=torch.long)), ValueError, "one label per row"),
        (lambda: binned_mi(torch.randn(5, 2), torch.zeros(5, dtype=torch.long), n_bins=0), ValueError, "n_bins"),
        (lambda: binned_mi(torch.randn(5, 2), torch.zeros(5, dtype=torch.long), lo=1.0, hi=1.0), ValueError, "lo < hi"),
        (lambda: binned_mi(torch.tensor([[float("nan")]]), torch.zeros(1, dtype=torch.long)), ValueError, "NaN"),
        (lambda: binned_mi(np.zeros((3, 2)), torch.zeros(3, dtype=torch.long)), TypeError, "'t' must be a torch.Tensor"),
        (lambda: binned_mi(torch.randn(3, 2), torch.tensor([0.5, 1.0, 0.0])), ValueError, "integer class labels"),
        (lambda: binned_mi(torch.randn(5, 2), torch.zeros(5, dtype=torch.long), bin_width=0.0), ValueError, "bin_width"),
        (lambda: binned_mi(torch.randn(5, 2), torch.zeros(5, dtype=torch.long), hi=None), ValueError, "only with 'bin_width'"),
    ],
)
def test_binned_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def _direct_kde(t: np.ndarray, y: np.ndarray, var: float):
    """The pairwise-distance bounds written out with explicit loops (nats -> bits)."""
    def term(pts, s):
        n = len(pts)
        acc = 0.0
        for i in range(n):
            acc += -math.log(sum(math.exp(-s * float(((pts[i] - pts[j]) ** 2).sum())) for j in range(n)) / n)
        return acc / n

    out = {}
    for name, s in (("upper", 1 / (2 * var)), ("lower", 1 / (8 * var))):
        h = term(t, s)
        hc = sum((y == c).mean() * term(t[y == c], s) for c in np.unique(y))
        out[f"i_xt_{name}"] = h / math.log(2)
        out[f"i_ty_{name}"] = (h - hc) / math.log(2)
    return out


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("seed", range(3))
def test_kde_mi_matches_direct(seed, backend):
    rng = np.random.default_rng(seed)
    N, d = 40, int(rng.integers(1, 4))
    t = np.tanh(rng.normal(size=(N, d)) * 2)
    y = rng.integers(0, 2 + seed, size=N)
    var = float(rng.choice([0.01, 0.1, 1.0]))
    got = kde_mi(torch.tensor(t), torch.tensor(y), var, backend=backend)
    want = _direct_kde(t, y, var)
    assert set(got) == set(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-9), k
    # The Bhattacharyya estimate never exceeds the KL one, and I(X;T) <= log2 N.
    assert got["i_xt_lower"] <= got["i_xt_upper"] + 1e-12 <= math.log2(N) + 1e-9


def test_kde_mi_limits():
    t = torch.linspace(-1, 1, 32, dtype=torch.float64).unsqueeze(1)
    y = (t[:, 0] > 0).long()
    tiny = kde_mi(t, y, 1e-8)  # kernels narrower than the spacing: every point its own component
    assert tiny["i_xt_upper"] == pytest.approx(5.0, abs=1e-6)
    assert tiny["i_ty_upper"] == pytest.approx(1.0, abs=1e-6)
    huge = kde_mi(t, y, 1e8)  # one blob: no information
    assert huge["i_xt_upper"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="noise_var"):
        kde_mi(t, y, 0.0)
    assert set(kde_mi(t, y, 0.1, bounds=("lower",))) == {"i_xt_lower", "i_ty_lower"}
    assert kde_mi(t, y, 0.1, bounds=("lower",))["i_xt_lower"] == kde_mi(t, y, 0.1)["i_xt_lower"]
    with pytest.raises(ValueError, match="bounds"):
        kde_mi(t, y, 0.1, bounds="upper")


def test_log_schedule():
    s = log_schedule(1000, 20)
    assert s[0] == 0 and s[-1] == 1000 and s == sorted(set(s))
    assert 10 <= len(s) <= 21
    assert sum(e <= 10 for e in s) >= 4  # dense at the start
    assert log_schedule(0) == [0]


def _tiny_setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(96, 4, generator=g)
    y = (x[:, 0] + 0.3 * x[:, 1] > 0).long()
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 2))
    return model, x, y


def test_recorder_tiny_model_writes_json_csv_png(tmp_path):
    import matplotlib.image as mpimg

    torch.manual_seed(0)
    model, x, y = _tiny_setup()
    rec = InfoPlaneRecorder(model, ["1", "3", "4"], x, y, schedule=[0, 2, 5, 9], n_bins=10, noise_var=0.05,
                            transforms={"4": lambda z: torch.softmax(z, 1)}, bin_range={"1": (-1, 1), "3": (-1, 1),
                                                                                       "4": (0, 1)})
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    done = []
    for epoch in range(10):
        if rec.maybe_record(epoch):
            done.append(epoch)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert done == [0, 2, 5, 9]
    assert len(rec.records) == 4 * 3
    # The recorded numbers are the estimators applied to the hooked activations.
    acts = rec.activations()
    last = {r["layer"]: r for r in rec.records if r["epoch"] == 9}
    # (parameters changed after the epoch-9 record, so recompute on a fresh record instead)
    fresh = {r["layer"]: r for r in rec.record(10)}
    with torch.no_grad():
        h1 = torch.tanh(model[0](x))
    assert fresh["1"]["i_xt_bin"] == pytest.approx(binned_mi(h1, y, 10)[0], abs=1e-12)
    assert fresh["4"]["i_ty_bin"] == pytest.approx(binned_mi(acts["4"], y, 10, 0.0, 1.0)[1], abs=1e-12)
    assert fresh["3"]["i_xt_upper"] == pytest.approx(kde_mi(acts["3"], y, 0.05)["i_xt_upper"], abs=1e-6)
    assert set(last) == {"1", "3", "4"} and model.training  # mode restored after evaluation

    jpath, cpath, ppath = tmp_path / "ip.json", tmp_path / "ip.csv", tmp_path / "ip.png"
    rec.to_json(str(jpath))
    rec.to_csv(str(cpath))
    rec.plot(str(ppath), estimator="kde_upper")
    data = json.loads(jpath.read_text())
    assert data["config"]["layers"] == ["1", "3", "4"] and data["config"]["units"] == "bits"
    assert len(data["records"]) == 15
    for r in data["records"]:
        for k in ("i_xt_bin", "i_ty_bin", "n_patterns", "i_xt_upper", "i_xt_lower", "i_ty_upper", "i_ty_lower"):
            assert math.isfinite(r[k])
        assert 0 <= r["i_ty_bin"] <= r["i_xt_bin"] <= math.log2(96) + 1e-9
    assert len(cpath.read_text().strip().splitlines()) == 16
    img = mpimg.imread(str(ppath))
    assert img.shape[0] > 300 and img.shape[1] > 300
    rgb = img[..., :3].reshape(-1, 3)
    colours = np.unique((rgb * 255).round().astype(np.int64), axis=0)
    # Non-trivial: axes, text and epoch-coloured markers give many colours and non-white pixels.
    assert len(colours) > 50
    assert (rgb.min(axis=1) < 0.5).mean() > 0.01


def test_recorder_errors():
    model, x, y = _tiny_setup()
    with pytest.raises(ValueError, match="n_epochs"):
        InfoPlaneRecorder(model, ["1"], x, y, schedule="log")
    with pytest.raises(ValueError, match="rows"):
        InfoPlaneRecorder(model, ["1"], x, y[:5], schedule="every")
    with pytest.raises(ValueError, match="not part of"):
        InfoPlaneRecorder(model, [nn.Tanh()], x, y, schedule="every")
    rec = InfoPlaneRecorder(nn.Sequential(nn.Linear(4, 2)), {"unused": nn.Tanh()}, x, y, schedule="every")
    with pytest.raises(RuntimeError, match="was not called"):
        rec.record(0)


def test_recorder_adaptive_range():
    model, x, y = _tiny_setup()
    rec = InfoPlaneRecorder(model, ["2"], x, y, schedule="every", bin_range=None, kde=False)
    (r,) = rec.record(0)
    with torch.no_grad():
        t = model[2](torch.tanh(model[0](x)))
    assert r["lo"] == pytest.approx(float(t.min())) and r["hi"] == pytest.approx(float(t.max()))
    assert r["i_xt_bin"] == pytest.approx(binned_mi(t, y, 30, r["lo"], r["hi"])[0], abs=1e-12)
    assert "i_xt_upper" not in r


def test_recorder_extra_binnings_and_noise_vars():
    model, x, y = _tiny_setup()
    rec = InfoPlaneRecorder(model, ["1", "2"], x, y, schedule="every", bin_range=(-1, 1), noise_var=[0.1, 0.01],
                            binnings={"fixed": {"bin_width": 0.07, "bin_range": {"1": (-1.0, 1.0), "2": (0.0, None)}},
                                      "adaptive": {"n_bins": 30, "bin_range": None}})
    new = {r["layer"]: r for r in rec.record(0)}
    acts = rec.activations()
    for name in ("1", "2"):
        t, r = acts[name], new[name]
        lo = -1.0 if name == "1" else 0.0
        hi = 1.0 if name == "1" else None
        assert r["binnings"]["fixed"]["i_xt"] == pytest.approx(binned_mi(t, y, lo=lo, hi=hi, bin_width=0.07)[0], abs=1e-12)
        assert r["binnings"]["adaptive"]["i_ty"] == pytest.approx(
            binned_mi(t, y, 30, float(t.min()), float(t.max()))[1], abs=1e-12)
        for var in (0.1, 0.01):
            assert r["kde"][f"{var:g}"]["i_xt_upper"] == pytest.approx(kde_mi(t, y, var)["i_xt_upper"], abs=1e-6)
        assert r["i_xt_upper"] == r["kde"]["0.1"]["i_xt_upper"]  # the first variance gives the flat keys
        assert "i_xt_lower" in r["kde"]["0.1"] and set(r["kde"]["0.01"]) == {"i_xt_upper", "i_ty_upper"}
    cfg = rec.config()
    assert cfg["noise_vars"] == [0.1, 0.01] and cfg["binnings"]["fixed"]["bin_width"] == 0.07
    assert cfg["binnings"]["fixed"]["bin_range"]["2"] == [0.0, None]
    with pytest.raises(ValueError, match="unknown keys"):
        InfoPlaneRecorder(model, ["1"], x, y, schedule="every", binnings={"b": {"width": 1}})


def test_twelve_bit_task_and_network():
    from mmim_ext.experiments.infoplane import WIDTHS, _icosahedron, build_net, make_task

    x, y, info = make_task()
    assert x.shape == (4096, 12) and len(torch.unique(x, dim=0)) == 4096
    assert 0.45 < info["positive_fraction"] < 0.55 and info["positive_fraction"] == float(y.double().mean())
    # Spherical symmetry: a rotation mapping the icosahedron onto itself permutes the bits and
    # must leave every label unchanged. Rotation by 120 degrees about the axis (1, 1, 1):
    # (a, b, c) -> (c, a, b), which maps the vertex set to itself.
    u = _icosahedron()
    perm = [int(((u - u[i][[2, 0, 1]]).norm(dim=1)).argmin()) for i in range(12)]
    assert sorted(perm) == list(range(12)) and perm != list(range(12))
    xp = torch.empty_like(x)
    xp[:, perm] = x  # bit i moves to the vertex its point is rotated onto
    index = {tuple(r): n for n, r in enumerate(x.long().tolist())}
    yp = y[[index[tuple(r)] for r in xp.long().tolist()]]
    assert torch.equal(yp, y)
    model, hidden, linears = build_net("tanh", seed=0)
    assert [lin.out_features for lin in linears.values()] == list(WIDTHS[1:])
    assert list(hidden) == ["h1", "h2", "h3", "h4", "h5"] and model(x).shape == (4096, 2)


def test_infoplane_command_smoke(tmp_path):
    from mmim_ext.experiments.__main__ import main

    out = tmp_path / "ip"
    # Two seeds of one activation, two epochs: the per-run files, the merge over seeds, resuming.
    argv = ["infoplane", "--epochs", "2", "--points", "2", "--seeds", "2", "--activations", "tanh", "--out", str(out),
            "--no-progress", "--noise-vars", "0.1", "--no-probes", "--binning", "fixed", "--eval-subset", "512"]
    assert main(argv) == 0
    runs = sorted(p.name for p in out.glob("run_*.json"))
    assert runs == ["run_tanh_sgd_seed0.json", "run_tanh_sgd_seed1.json"]
    run = json.loads((out / runs[0]).read_text())
    assert [a["epoch"] for a in run["accuracy"]] == [0, 1, 2]
    assert {r["layer"] for r in run["infoplane"]} == {"h1", "h2", "h3", "h4", "h5", "out"}
    assert set(run["infoplane"][0]["binnings"]) == {"adaptive", "fixed"} and set(run["infoplane"][0]["kde"]) == {"0.1"}
    assert run["config"]["eval_subset"] == 512 and run["infoplane_config"]["n_samples"] == 512
    assert run["svm"] == []  # two epochs: no fit of the training set, so no hard margin to compare with
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["binning"] == "fixed" and "width 0.07" in data["config"]["binning_scheme"]
    assert data["config"]["seeds"] == [0, 1] and data["units"] == "bits"
    comp = data["compression"]["tanh"]
    assert set(comp) == {"h1", "h2", "h3", "h4", "h5", "out"}
    # The merged numbers are the mean and sd over the two seeds of peak - final I(X;T).
    from mmim_ext.experiments.infoplane_merge import compression, mean_sd

    runs_json = [json.loads((out / r).read_text()) for r in runs]
    per_seed = [compression(r, "binned_fixed")["h5"] for r in runs_json]
    assert comp["h5"]["binned"] == pytest.approx(mean_sd(per_seed) | {"n": 2}) and comp["h5"]["binned"]["n"] == 2
    per_seed = [compression(r, "kde_0.1")["h3"] for r in runs_json]
    assert comp["h3"]["kde"]["mean"] == pytest.approx(sum(per_seed) / 2)
    assert all(c[k]["mean"] >= 0 for c in comp.values() for k in ("binned", "kde"))
    pngs = ["planes_sgd.png", "ixt_epochs_sgd.png", "kde_noise_sgd.png", "compression.png", "bin_convergence.png",
            "grad_snr.png", "svm_margin.png"]
    assert all((out / p).stat().st_size > 20_000 for p in pngs)
    assert "| tanh_sgd | 2 | h5 |" in (out / "results.md").read_text()
    # Resume: nothing left to run, the files stay as they were; --merge rebuilds the summary.
    stamps = {r: (out / r).stat().st_mtime_ns for r in runs}
    assert main(argv) == 0
    assert {r: (out / r).stat().st_mtime_ns for r in runs} == stamps
    (out / "results.json").unlink()
    assert main(["infoplane", "--merge", "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["compression"]["tanh"]["h5"]["kde"]["n"] == 2
    # A folder of runs with another config is refused, and so are bad arguments.
    assert main(argv[:2] + ["3"] + argv[3:]) == 2
    assert main(["infoplane", "--merge", "--out", str(tmp_path / "empty")]) == 2
    with pytest.raises(SystemExit):
        main(["infoplane", "--activations", "sigmoid", "--out", str(out)])
    with pytest.raises(SystemExit):
        main(["infoplane", "--optimizer", "rmsprop", "--out", str(out)])


def test_compression_and_mean_sd():
    from mmim_ext.experiments.infoplane_merge import compression, mean_sd

    recs = [{"epoch": e, "layer": "h1", "binnings": {"fixed": {"i_xt": v, "i_ty": 0.0}}}
            for e, v in ((0, 3.0), (5, 7.5), (10, 6.0), (20, 4.5))]
    assert compression({"infoplane": recs}, "binned_fixed") == {"h1": 3.0}
    assert mean_sd([1.0, 2.0, 4.0]) == pytest.approx({"mean": 7 / 3, "sd": float(np.std([1, 2, 4], ddof=1)), "n": 3})
    assert mean_sd([2.0]) == {"mean": 2.0, "sd": None, "n": 1}


def _setting(act, opt, seeds, h5_fixed, random=False):
    vals = {"binned_fixed": h5_fixed, "binned_adaptive": [v + 1.0 for v in h5_fixed], "kde_0.1": [0.5 * v for v in h5_fixed]}
    return {"setting": {"activation": act, "optimizer": opt, "random_labels": random, "label_noise": 0.0},
            "seeds": seeds, "compression": {"h5": {e: {"values": v} for e, v in vals.items()}}}


def test_comparisons_pair_by_seed():
    from mmim_ext.experiments.infoplane_report import comparisons, contrasts, format_markdown

    settings = {"tanh_sgd": _setting("tanh", "sgd", [0, 1, 2, 3], [4.0, 5.0, 6.0, 7.0]),
                "tanh_sgd_random": _setting("tanh", "sgd", [1, 2, 3], [0.5, 1.0, 0.0], random=True),
                "relu_sgd": _setting("relu", "sgd", [0, 1, 2, 3], [0.0, 0.0, 1.0, 0.0]),
                "tanh_adam": _setting("tanh", "adam", [0, 2], [8.0, 9.0])}
    assert {(c["name"], c["a"], c["b"]) for c in contrasts(settings)} == {
        ("labels", "tanh_sgd", "tanh_sgd_random"), ("activation", "tanh_sgd", "relu_sgd"),
        ("optimizer", "tanh_adam", "tanh_sgd")}
    rows = {(r["name"], r["estimator"]): r for r in comparisons(settings)}
    # true minus random labels over the shared seeds 1, 2, 3: (5 - 0.5, 6 - 1, 7 - 0)
    lab = rows[("labels", "binned_fixed")]
    assert lab["seeds"] == [1, 2, 3] and lab["mean"] == pytest.approx((4.5 + 5.0 + 7.0) / 3)
    d = np.array([4.5, 5.0, 7.0])
    half = 4.302652729911275 * d.std(ddof=1) / math.sqrt(3)  # t_{0.975, 2}
    assert lab["ci95"] == pytest.approx([d.mean() - half, d.mean() + half])
    assert rows[("labels", "kde_0.1")]["mean"] == pytest.approx(0.5 * d.mean())
    assert rows[("optimizer", "binned_fixed")]["seeds"] == [0, 2]
    assert rows[("optimizer", "binned_fixed")]["mean"] == pytest.approx(((8 - 4) + (9 - 6)) / 2)
    act = rows[("activation", "binned_fixed")]
    assert (act["wins"], act["n"], act["mean_a"], act["mean_b"]) == (4, 4, 5.5, 0.25)
    # adaptive minus fixed bins within each true-label setting: +1 by construction, never for random labels
    binning = [r for r in comparisons(settings) if r["name"] == "binning"]
    assert {r["a"] for r in binning} == {"tanh_sgd", "relu_sgd", "tanh_adam"}
    assert all(r["mean"] == pytest.approx(1.0) for r in binning)
    md = format_markdown({"config": {"seeds": [0, 1, 2, 3], "kde_noise_var": 0.1}, "settings": {},
                          "comparisons": comparisons(settings)})
    assert "| labels | tanh_sgd | tanh_sgd_random | h5 | +5.50 [" in md and "| KDE σ²=0.1 |" in md
    row = next(line for line in md.splitlines() if line.startswith("| labels |"))
    assert row.count("[") == 3  # fixed bins, KDE, adaptive bins: each with its interval


def test_final_svm_only_at_the_last_recording_and_unfit_runs():
    from mmim_ext.experiments.infoplane_merge import final, unfit_runs
    from mmim_ext.experiments.infoplane_report import comparisons

    fin = {"train_accuracy": 0.5, "cosine": 0.9, "net_margin": 1.0, "svm_margin": 1.1, "converged": True}
    # fitted at epoch 400, collapsed by the last recording (8000): the SVM numbers describe another net
    run = {"final": fin, "svm": [{"epoch": 400}], "accuracy": [{"epoch": 400}, {"epoch": 8000}],
           "seed": 6, "setting": {"random_labels": False, "label_noise": 0.0}}
    assert final(run)["cosine"] is None and final(run)["train_accuracy"] == 0.5
    assert final({**run, "accuracy": [{"epoch": 400}]})["cosine"] == 0.9
    # a soft-margin fit (the SVM misclassifies training points): no hard margin to compare with
    soft = {**run, "svm": [{"epoch": 400, "svm_train_accuracy": 0.998}], "accuracy": [{"epoch": 400}]}
    assert final(soft)["svm_margin"] is None
    rand = {**run, "seed": 1, "setting": {"random_labels": True, "label_noise": 0.0}}
    assert unfit_runs({"relu_sgd": [run], "relu_sgd_random": [rand]}) == [
        {"key": "relu_sgd", "seed": 6, "train_accuracy": 0.5}]
    settings = {"tanh_sgd": _setting("tanh", "sgd", [0, 1, 2], [4.0, 5.0, 6.0]),
                "relu_sgd": _setting("relu", "sgd", [0, 1, 2], [0.0, 0.0, 9.0])}
    rows = [r for r in comparisons(settings, exclude={("relu_sgd", 2)}) if r["estimator"] == "binned_fixed"]
    assert rows[0]["seeds"] == [0, 1] and rows[0]["mean"] == pytest.approx(4.5)


def test_spearman():
    from mmim_ext.experiments.statistics import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40])["rho"] == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1])["rho"] == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2]) == {"rho": None, "p": None, "n": 2}
    assert spearman([1, 1, 1], [1, 2, 3])["rho"] is None
    with pytest.raises(ValueError, match="'x' and 'y'"):
        spearman([1, 2, 3], [1, 2])


def test_probes_on_a_short_run():
    from mmim_ext.experiments.infoplane import make_task
    from mmim_ext.experiments.infoplane_probes import residual_run, separability_run

    x, y, _ = make_task()
    perm = torch.randperm(4096, generator=torch.Generator().manual_seed(0))
    tr, te = perm[:3000].sort().values, perm[3000:].sort().values
    res = residual_run(x, y, tr, te, seed=0, epochs=2, points=2)
    assert [h["epoch"] for h in res["history"]] == [0, 0, 1, 1, 2, 2]
    for h in res["history"]:
        # The global bound is above the local one, which is above every per-sample ratio's
        # guarantee only in one direction: ||F(x) - F(0)|| <= Lip ||x||.
        assert h["jacobian_max"] <= h["lipschitz_bound"] + 1e-6 and h["certified"] == (h["lipschitz_bound"] < 1)
        assert h["ratio"]["n"] == 4096


def test_gd_epoch_is_one_full_batch_step():
    from mmim_ext.experiments.infoplane import make_task
    from mmim_ext.experiments.infoplane_train import RunConfig, Setting, build_net, train_one

    x, y, _ = make_task()
    perm = torch.randperm(4096, generator=torch.Generator().manual_seed(3))
    tr, te = perm[:3482].sort().values, perm[3482:].sort().values
    cfg = RunConfig(epochs=1, points=2, lr={"sgd": 0.05, "gd": 1.0, "adam": 1e-3}, batch_size=256,
                    noise_vars=(0.1,), bin_width=0.07, train_fraction=0.85, eval_subset=64)
    run = train_one(Setting("tanh", "gd"), cfg, x, y, tr, te, seed=3)
    # The run sums its 14 minibatch gradients into one step; here the step from one full batch.
    model, _, linears = build_net("tanh", 3)
    nn.functional.cross_entropy(model(x[tr]), y[tr]).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 1.0 * p.grad
    from mmim_ext.diagnostics import weight_norms

    want = weight_norms(model, linears)
    got = run["weight_norms"][-1]
    assert got["epoch"] == 1 and all(got[k] == pytest.approx(v, rel=1e-5) for k, v in want.items())
    # ... and the SNR rows of that epoch come from the 14 minibatches at fixed weights.
    assert {r["layer"] for r in run["grad_snr"]} == set(linears) and run["infoplane_config"]["n_samples"] == 64
