"""Tests of the Table 1 experiment: loaders, models, the command line and its JSON schema."""

from __future__ import annotations

import gzip
import json
import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from mmim_ext.experiments import data as D
from mmim_ext.experiments.models import build_model
from mmim_ext.experiments.table1 import (METHODS, Table1Config, format_table, reg_weight_for)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- IDX files

def _write_idx(path: str, arr: np.ndarray, gz: bool) -> None:
    code = {np.dtype(np.uint8): 0x08}[arr.dtype]
    raw = bytes([0, 0, code, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes()
    if gz:
        with gzip.open(path + ".gz", "wb") as f:
            f.write(raw)
    else:
        with open(path, "wb") as f:
            f.write(raw)


def _tiny_fashion(tmp_path, n_train=48, n_test=12, gz=(True, False, True, False)):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        "y_train": (np.arange(n_train) % 10).astype(np.uint8),
        "x_test": rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        "y_test": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for (key, stem), z in zip(D.FASHION_MNIST_FILES.items(), gz):
        _write_idx(os.path.join(tmp_path, stem), arrays[key], z)
    return arrays


def test_read_idx_roundtrip_raw_and_gz(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(str(tmp_path / "a"), a, gz=False)
    _write_idx(str(tmp_path / "b"), a, gz=True)
    np.testing.assert_array_equal(D.read_idx(str(tmp_path / "a")), a)
    np.testing.assert_array_equal(D.read_idx(str(tmp_path / "b.gz")), a)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match="magic"):
        D.read_idx(str(tmp_path / "bad"))
    # header says 10 bytes, body has 3
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"abc")
    with pytest.raises(ValueError, match="needs 10"):
        D.read_idx(str(tmp_path / "short"))


def test_fashion_mnist_loader_mixed_gzip(tmp_path):
    arrays = _tiny_fashion(tmp_path)
    s = D.load_dataset("fashion-mnist", str(tmp_path), val_fraction=0.25)
    assert s.input_shape == (1, 28, 28)
    assert s.sizes() == {"train": 36, "val": 12, "test": 12}
    assert s.x_train.dtype == torch.float32 and s.y_train.dtype == torch.int64
    # Test labels in file order; train+val labels are a permutation of the file's labels.
    np.testing.assert_array_equal(s.y_test.numpy(), arrays["y_test"])
    both = np.sort(np.concatenate([s.y_train.numpy(), s.y_val.numpy()]))
    np.testing.assert_array_equal(both, np.sort(arrays["y_train"]))
    # Standardized with training statistics: train has mean ~0 and std ~1.
    assert abs(float(s.x_train.mean())) < 1e-4 and abs(float(s.x_train.std()) - 1) < 1e-3
    # The test images are the file's images under the same affine map (pixel order kept).
    x0 = arrays["x_test"][0].astype(np.float64) / 255.0
    corr = np.corrcoef(x0.ravel(), s.x_test[0, 0].numpy().ravel())[0, 1]
    assert corr > 0.9999


def test_fashion_mnist_missing_files_named(tmp_path):
    _tiny_fashion(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte")
    os.remove(tmp_path / "train-images-idx3-ubyte.gz")
    with pytest.raises(FileNotFoundError) as ei:
        D.load_fashion_mnist(str(tmp_path))
    msg = str(ei.value)
    assert "t10k-labels-idx1-ubyte" in msg and "train-images-idx3-ubyte" in msg
    assert "train-labels-idx1-ubyte" not in msg and "zalandoresearch" in msg
    with pytest.raises(ValueError, match="--data-dir"):
        D.load_fashion_mnist(None)


def test_fashion_mnist_mismatched_counts(tmp_path):
    _tiny_fashion(tmp_path)
    _write_idx(str(tmp_path / "t10k-labels-idx1-ubyte"), np.zeros(5, np.uint8), gz=False)
    with pytest.raises(ValueError, match="do not match"):
        D.load_fashion_mnist(str(tmp_path))


def test_digits_loader():
    s = D.load_dataset("digits")
    assert s.input_shape == (1, 8, 8) and s.num_classes == 10
    n = s.sizes()
    assert n["train"] + n["val"] + n["test"] == 1797
    assert n["test"] == 359
    assert set(s.y_test.tolist()) == set(range(10))
    assert abs(float(s.x_train.mean())) < 1e-4
    # Same split every time (fixed seeds, independent of the global RNG).
    np.random.seed(123)
    s2 = D.load_dataset("digits")
    assert torch.equal(s.x_test, s2.x_test) and torch.equal(s.y_val, s2.y_val)


def test_mnist1d_offline_and_rng_untouched(monkeypatch):
    import requests

    def no_network(*a, **k):
        raise AssertionError("the mnist1d loader must not download")

    monkeypatch.setattr(requests, "get", no_network)
    np.random.seed(7)
    expected_next = np.random.RandomState(7).rand()
    s = D.load_mnist1d(num_samples=500)
    assert np.random.rand() == expected_next  # the global numpy RNG was restored
    assert s.input_shape == (1, 40)
    assert s.sizes() == {"train": 320, "val": 80, "test": 100}
    assert torch.isfinite(s.x_train).all()


def test_unknown_dataset():
    with pytest.raises(ValueError, match="dataset"):
        D.load_dataset("cifar")


# ----------------------------------------------------------------------------- models

@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 40), (1, 28, 28)])
def test_models_shapes(arch, shape):
    body, head = build_model(arch, shape, 10)
    x = torch.randn(3, *shape)
    f = body(x)
    assert f.shape == (3, 128) and (f >= 0).all()  # ReLU features
    assert isinstance(head, torch.nn.Linear) and head(f).shape == (3, 10)
    body2, head2 = build_model(arch, shape, 7, width=200)
    assert body2(x).shape == (3, 200) and head2.out_features == 7


def test_models_bad_args():
    with pytest.raises(ValueError, match="arch"):
        build_model("resnet", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="input shape"):
        build_model("cnn", (8,), 10)
    with pytest.raises(ValueError, match="width"):
        build_model("mlp", (1, 8, 8), 10, width=1)


# ----------------------------------------------------------------------------- protocol pieces

def test_stage_epochs_add_up():
    for e in range(2, 30):
        s1, s2 = Table1Config("digits", epochs=e).stage_epochs()
        assert s1 >= 1 and s2 >= 1 and s1 + s2 == e


def test_config_validation():
    with pytest.raises(ValueError, match="methods"):
        Table1Config("digits", methods=("baseline", "dropout")).validate()
    with pytest.raises(ValueError, match="epochs"):
        Table1Config("digits", epochs=1).validate()
    Table1Config("digits", epochs=1, methods=("baseline", "c4")).validate()


def test_reg_weight_lookup():
    assert reg_weight_for("digits", "mlp", "baseline") == 0.0
    assert reg_weight_for("digits", "cnn", "c4", {"cnn": {"c4": 0.37}}) == 0.37
    for m in METHODS[1:]:
        lam = reg_weight_for("no-such-dataset", "mlp", m)
        assert lam > 0 and math.isfinite(lam)


def test_format_table_layout():
    rows = []
    for arch in ("mlp", "cnn"):
        for i, m in enumerate(METHODS):
            accs = [90.0 + i, 92.0 + i]
            row = {"arch": arch, "method": m, "acc_mean": float(np.mean(accs)), "acc_std": float(np.std(accs, ddof=1)),
                   "accs": accs, "seeds": [0, 1], "epochs": 3, "wall_s": 1.0, "reg_weight": 0.0 if i == 0 else 0.1}
            if i:
                row.update(diff_vs_baseline_mean=float(i), diff_vs_baseline_std=0.0, wins_vs_baseline=2)
            rows.append(row)
    md = format_table({"dataset": "toy", "config": {"epochs": 3}, "rows": rows})
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert len(lines) == 2 + len(METHODS)
    ncols = lines[0].count("|")
    assert all(ln.count("|") - ln.count("\\|") == ncols for ln in lines)  # escaped pipes stay in cells
    assert "91.00 ± 1.41" in md and "+1.00 ± 0.00 (2/2 wins)" in md and "2 seeds" in md


# ----------------------------------------------------------------------------- command line

ROW_KEYS = {"arch": str, "method": str, "acc_mean": float, "acc_std": float, "accs": list, "seeds": list,
            "epochs": int, "wall_s": float}


def _check_results(out_dir, archs, methods, seeds, epochs):
    with open(os.path.join(out_dir, "results.json")) as f:
        res = json.load(f)
    assert res["dataset"] == "digits"
    rows = res["rows"]
    assert [(r["arch"], r["method"]) for r in rows] == [(a, m) for a in archs for m in methods]
    for r in rows:
        for k, typ in ROW_KEYS.items():
            assert isinstance(r[k], typ), (k, r[k])
        assert r["seeds"] == list(range(seeds)) and len(r["accs"]) == seeds and r["epochs"] == epochs
        assert all(0.0 <= a <= 100.0 for a in r["accs"])
        assert r["acc_mean"] == pytest.approx(float(np.mean(r["accs"])))
        assert r["acc_std"] == pytest.approx(float(np.std(r["accs"], ddof=1)) if seeds > 1 else 0.0)
        assert r["wall_s"] > 0
    for name in ("results.md", "accuracy.png", "mi_terms.png", "runs.json"):
        assert os.path.getsize(os.path.join(out_dir, name)) > 0, name
    return res


TINY = ["--dataset", "digits", "--epochs", "2", "--train-subset", "96", "--batch-size", "32", "--width", "16",
        "--no-progress", "--threads", "1"]


def test_cli_all_methods_tiny(tmp_path, capsys):
    from mmim_ext.experiments.__main__ import main

    out = str(tmp_path / "t1")
    rc = main(["table1", *TINY, "--seeds", "2", "--out", out])
    assert rc == 0
    res = _check_results(out, ("mlp", "cnn"), METHODS, 2, 2)
    printed = capsys.readouterr().out
    assert "| Baseline |" in printed and "MMIM" in printed
    md = open(os.path.join(out, "results.md")).read()
    assert all(r["method"] for r in res["rows"]) and md.count("\n|") >= 2 + len(METHODS)
    # Paired statistics against the baseline are present for every regularized row.
    for r in res["rows"]:
        assert ("diff_vs_baseline_mean" in r) == (r["method"] != "baseline")


def test_cli_same_seed_is_reproducible(tmp_path):
    from mmim_ext.experiments.__main__ import main

    accs = []
    for k in range(2):
        out = str(tmp_path / f"r{k}")
        assert main(["table1", *TINY, "--seeds", "1", "--archs", "mlp", "--methods", "baseline,c4", "--no-plots",
                     "--out", out]) == 0
        with open(os.path.join(out, "results.json")) as f:
            accs.append([r["accs"] for r in json.load(f)["rows"]])
    assert accs[0] == accs[1]


def test_cli_tune_uses_validation(tmp_path):
    from mmim_ext.experiments.__main__ import main

    out = str(tmp_path / "tune")
    rc = main(["table1", *TINY, "--seeds", "1", "--archs", "mlp", "--methods", "baseline,c4", "--tune",
               "--tune-grid", "0.01,1", "--tune-seeds", "1", "--no-plots", "--out", out])
    assert rc == 0
    tuned = json.load(open(os.path.join(out, "tune.json")))
    assert tuned["chosen"]["mlp"]["c4"] in (0.01, 1.0)
    scores = {s["reg_weight"]: s["val_acc_mean"] for s in tuned["scores"] if s["method"] == "c4"}
    assert tuned["chosen"]["mlp"]["c4"] == max(scores, key=lambda k: (scores[k], -k))
    res = json.load(open(os.path.join(out, "results.json")))
    c4 = [r for r in res["rows"] if r["method"] == "c4"][0]
    assert c4["reg_weight"] == tuned["chosen"]["mlp"]["c4"]


def test_cli_errors(tmp_path, capsys):
    from mmim_ext.experiments.__main__ import main

    assert main(["table1", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "t10k-images-idx3-ubyte" in err and "train-labels-idx1-ubyte" in err
    with pytest.raises(SystemExit):
        main(["table1", "--archs", "mlp,transformer"])
    assert "--archs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["nosuchcommand"])


def _fake_run_dir(path, arch, accs_by_method):
    runs = [{"arch": arch, "method": m, "seed": s, "reg_weight": 0.0 if m == "baseline" else 1e-3, "wall_s": 1.0,
             "history": [{"ce": 1.0}], "acc_val": a, "acc_test": a}
            for m, accs in accs_by_method.items() for s, a in enumerate(accs)]
    os.makedirs(path)
    with open(os.path.join(path, "runs.json"), "w") as f:
        json.dump(runs, f)
    with open(os.path.join(path, "results.json"), "w") as f:
        json.dump({"dataset": "digits", "config": {"epochs": 3}, "rows": [], "total_wall_s": 5.0}, f)


def test_cli_merge(tmp_path, capsys):
    from mmim_ext.experiments.__main__ import main

    _fake_run_dir(tmp_path / "a", "mlp", {"baseline": [80.0, 82.0], "c4": [81.0, 84.0]})
    _fake_run_dir(tmp_path / "b", "cnn", {"baseline": [90.0, 91.0], "c4": [89.0, 90.0]})
    out = str(tmp_path / "m")
    assert main(["table1", "--merge", str(tmp_path / "a"), str(tmp_path / "b"), "--no-plots", "--out", out]) == 0
    res = json.load(open(os.path.join(out, "results.json")))
    rows = {(r["arch"], r["method"]): r for r in res["rows"]}
    assert set(rows) == {("mlp", "baseline"), ("mlp", "c4"), ("cnn", "baseline"), ("cnn", "c4")}
    assert rows[("mlp", "c4")]["acc_mean"] == pytest.approx(82.5)
    assert rows[("mlp", "c4")]["diff_vs_baseline_mean"] == pytest.approx(1.5)  # paired: (+1, +2)
    assert rows[("cnn", "c4")]["wins_vs_baseline"] == 0
    # The same directory twice duplicates runs: refused.
    assert main(["table1", "--merge", str(tmp_path / "a"), str(tmp_path / "a"), "--no-plots", "--out", out]) == 2
    assert "twice" in capsys.readouterr().err


def test_module_entry_point_subprocess():
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "mmim_ext.experiments", "table1", "--help"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--quick" in r.stdout and "--tune" in r.stdout
