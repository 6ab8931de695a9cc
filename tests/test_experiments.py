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
from mmim_ext.experiments.protocol import BODY_OF, METHODS, TUNED_METHODS, ProtocolConfig
from mmim_ext.experiments.table1 import Table1Config, check_equal_budgets, reg_weight_for

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

def test_config_validation():
    with pytest.raises(ValueError, match="methods"):
        Table1Config("digits", methods=("baseline", "dropout")).validate()
    with pytest.raises(ValueError, match="baseline"):
        Table1Config("digits", methods=("c4",)).validate()
    with pytest.raises(ValueError, match="disjoint"):
        Table1Config("digits", seeds=(0, 1), tune_seeds=(1, 2)).validate()
    with pytest.raises(ValueError, match="grid"):
        Table1Config("digits", grid=(1e-3,)).validate()
    with pytest.raises(ValueError, match="c3_epochs"):
        Table1Config("digits", protocol=ProtocolConfig("digits", "mlp", c3_epochs=0)).validate()
    Table1Config("digits", tune=False, methods=("baseline", "c4")).validate()


def test_method_structure():
    # mmim is c1 plus the C3 stage, baseline+c3 the baseline plus it: they share bodies.
    assert BODY_OF["mmim"] == "c1" and BODY_OF["baseline+c3"] == "baseline"
    assert set(TUNED_METHODS) == set(METHODS) - {"baseline", "baseline+c3"}


def test_reg_weight_lookup():
    assert reg_weight_for("digits", "mlp", "baseline") == 0.0
    assert reg_weight_for("digits", "mlp", "baseline+c3") == 0.0
    assert reg_weight_for("digits", "cnn", "c4", {"cnn": {"c4": 0.37}}) == 0.37
    for m in TUNED_METHODS:
        lam = reg_weight_for("no-such-dataset", "mlp", m)
        assert lam > 0 and math.isfinite(lam)


# ----------------------------------------------------------------------------- command line

TINY = ["--dataset", "digits", "--train-subset", "128", "--batch-size", "32", "--width", "16", "--max-epochs", "3",
        "--patience", "1", "--c3-epochs", "1", "--threads", "1"]
ROW_KEYS = ("arch", "method", "acc_mean", "acc_std", "accs", "seeds", "epochs_used", "reg_weight",
            "lambda_at_grid_edge")
DIFF_KEYS = ("diff_vs_baseline_mean", "ci95", "p_t", "p_wilcoxon", "p_t_holm", "wins", "ties", "losses")
MI_KEYS = ("pairwise_mi_sum", "pairwise_mi_mean", "cond_pairwise_mi_sum", "cond_pairwise_mi_mean",
           "sum_unit_label_mi", "label_mi")


def _records(out):
    recs = []
    for root, _, files in os.walk(os.path.join(out, "runs")):
        for f in files:
            if f.endswith(".json"):
                with open(os.path.join(root, f)) as fh:
                    recs.append(json.load(fh))
    return recs


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Every method, 2 seeds, no λ search, small measurements (``--quick``'s measurement budget)."""
    from mmim_ext.experiments.__main__ import main

    out = str(tmp_path_factory.mktemp("t1") / "all")
    rc = main(["table1", *TINY, "--quick", "--seeds", "2", "--archs", "mlp", "--out", out])
    assert rc == 0
    return out


def test_cli_all_methods_schema(tiny_run):
    res = json.load(open(os.path.join(tiny_run, "results.json")))
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == list(METHODS)
    for m, r in rows.items():
        for k in ROW_KEYS:
            assert k in r, (m, k)
        assert r["seeds"] == [0, 1] and len(r["accs"]) == 2 and all(0 <= a <= 100 for a in r["accs"])
        assert r["acc_mean"] == pytest.approx(float(np.mean(r["accs"])))
        assert len(r["epochs_used"]) == 2 and all(1 <= e <= 3 for e in r["epochs_used"])
        if m != "baseline":
            for k in DIFF_KEYS:
                assert k in r, (m, k)
            lo, hi = r["ci95"]
            assert lo <= r["diff_vs_baseline_mean"] <= hi
            assert r["wins"] + r["ties"] + r["losses"] == 2
            base = rows["baseline"]["accs"]
            assert r["diff_vs_baseline_mean"] == pytest.approx(float(np.mean(np.subtract(r["accs"], base))))
        for k in MI_KEYS:
            assert math.isfinite(r["mi"][k]["mean"]) and len(r["mi"][k]["values"]) == 2, (m, k)
        assert (r["c3_epochs"] == 1) == (m in ("mmim", "baseline+c3"))
    # Shared bodies: same held-out features, so the same measurements.
    assert rows["mmim"]["mi"]["label_mi"]["values"] == rows["c1"]["mi"]["label_mi"]["values"]
    assert rows["baseline+c3"]["mi"]["label_mi"]["values"] == rows["baseline"]["mi"]["label_mi"]["values"]
    md = open(os.path.join(tiny_run, "results.md")).read()
    assert "| Baseline |" in md and "MMIM" in md and "89.15" in md
    for name in ("paired_diffs.png", "acc_vs_redundancy.png"):
        assert os.path.getsize(os.path.join(tiny_run, name)) > 0


def test_every_method_trains_its_body_for_the_same_epochs(tiny_run):
    recs = [r for r in _records(tiny_run) if r["phase"] == "table"]
    assert len(recs) == 2 * len(METHODS)
    for seed in (0, 1):
        body_epochs = {r["method"]: sum(1 for h in r["history"] if h["stage"] == 1) for r in recs if r["seed"] == seed}
        assert set(body_epochs) == set(METHODS)
        assert len(set(body_epochs.values())) == 1, body_epochs
        base = next(r for r in recs if r["seed"] == seed and r["method"] == "baseline")
        assert set(body_epochs.values()) == {base["epochs_used"]}
        # The C3 stage comes after the body budget, never inside it.
        for r in recs:
            if r["seed"] == seed and r["method"] in ("mmim", "baseline+c3"):
                stages = [h["stage"] for h in r["history"]]
                assert stages == sorted(stages) and stages.count(2) == 1
    check_equal_budgets(recs)
    bad = json.loads(json.dumps(recs))
    victim = next(r for r in bad if r["method"] == "c4")
    victim["history"] = victim["history"][:-1] if len(victim["history"]) > 1 else victim["history"] * 2
    victim["epochs_used"] = len(victim["history"])
    with pytest.raises(ValueError, match="unequal body budgets"):
        check_equal_budgets(bad)


def test_cli_resume_and_shards_match_single_process(tiny_run, tmp_path, capsys):
    from mmim_ext.experiments.__main__ import main

    args = ["table1", *TINY, "--quick", "--seeds", "2", "--archs", "mlp", "--methods", "baseline,c1,mmim,c4",
            "--no-plots"]
    out = str(tmp_path / "sharded")
    # Alone, shard 0 runs its share and then shard 1's (nobody else claims them): it finishes the
    # experiment and writes the results; shard 1 then finds nothing to do.
    assert main([*args, "--shard", "0/2", "--out", out]) == 0
    assert os.path.exists(os.path.join(out, "results.json"))
    capsys.readouterr()
    assert main([*args, "--shard", "1/2", "--out", out]) == 0
    assert not any(line.startswith(("table mlp", "tune mlp")) for line in capsys.readouterr().out.splitlines())
    res = json.load(open(os.path.join(out, "results.json")))
    single = {r["method"]: r["accs"] for r in json.load(open(os.path.join(tiny_run, "results.json")))["rows"]}
    for r in res["rows"]:
        assert r["accs"] == single[r["method"]], r["method"]  # same seeds, same runs
    # Resuming trains nothing: the per-run files are left as they are.
    mtimes = {p: os.path.getmtime(p) for p in _all_json(out)}
    capsys.readouterr()
    assert main([*args, "--out", out]) == 0
    assert {p: os.path.getmtime(p) for p in _all_json(out)} == mtimes
    printed = capsys.readouterr().out.splitlines()
    assert not any(line.startswith(("table mlp", "tune mlp")) for line in printed)  # no job ran
    # Merging the directory reproduces the table.
    merged = str(tmp_path / "merged")
    assert main(["table1", "--merge", out, "--no-plots", "--out", merged]) == 0
    assert json.load(open(os.path.join(merged, "results.json")))["rows"] == res["rows"]


def test_cli_concurrent_shards_run_every_job_once(tiny_run, tmp_path):
    """Two processes on one --out: each job runs in exactly one of them (claims), and the table
    equals the single-process one."""
    import subprocess
    import sys

    out = str(tmp_path / "concurrent")
    args = [sys.executable, "-m", "mmim_ext.experiments", "table1", *TINY, "--quick", "--seeds", "2", "--archs", "mlp",
            "--methods", "baseline,c4,c6", "--no-plots", "--out", out]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([*args, "--shard", f"{i}/2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env) for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    ran = [line.split(":")[0] for log in logs for line in log.splitlines() if line.startswith("table mlp")]
    assert len(ran) == len(set(ran)) == 2 * 3, ran  # baseline(+c3 record), c4, c6 per seed, once each
    res = json.load(open(os.path.join(out, "results.json")))
    single = {r["method"]: r["accs"] for r in json.load(open(os.path.join(tiny_run, "results.json")))["rows"]}
    assert {r["method"]: r["accs"] for r in res["rows"]} == {m: single[m] for m in ("baseline", "c4", "c6")}
    assert not [p for p in _all_files(out) if p.endswith(".lock")]


def test_locks_are_exclusive_and_stale_ones_are_taken_over(tmp_path):
    import subprocess
    import sys

    from mmim_ext.experiments.locks import claim, release

    path = str(tmp_path / "sub" / "run_x_seed0.json")
    assert claim(path) and not claim(path)  # this live process holds it
    release(path)
    release(path)  # releasing twice is harmless
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with open(path + ".lock", "w") as fh:
        fh.write(str(dead.pid))
    assert claim(path) and open(path + ".lock").read() == str(os.getpid())
    release(path)
    assert not os.path.exists(path + ".lock")


def test_stale_baseline_claim_does_not_hang(tmp_path):
    """A baseline lock left by a killed process is taken over: the job runs instead of waiting
    forever for a record nobody is computing (it used to)."""
    import subprocess
    import sys
    import threading

    from mmim_ext.experiments.data import load_dataset
    from mmim_ext.experiments.protocol import ProtocolConfig
    from mmim_ext.experiments.runner import Job, RunStore, run_jobs

    store = RunStore(str(tmp_path))
    cfg = ProtocolConfig("digits", "mlp", max_epochs=2, patience=1, batch_size=64, width=8, c3_epochs=1)
    splits = load_dataset("digits").subset_train(128)
    jobs = [Job("table", "mlp", "baseline", 0, 0.0, ("baseline",)), Job("table", "mlp", "c4", 0, 1e-3, ("c4",))]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = store.path("table", "mlp", "baseline", 0.0, 0) + ".lock"
    os.makedirs(os.path.dirname(lock))
    with open(lock, "w") as fh:
        fh.write(str(dead.pid))
    result = {}
    t = threading.Thread(target=lambda: result.update(n=run_jobs(store, splits, {"mlp": cfg}, jobs, log=lambda _: None)),
                         daemon=True)
    t.start()
    t.join(timeout=300)
    assert result.get("n") == 2, "run_jobs did not finish: the stale baseline claim was not taken over"
    assert store.load("table", "mlp", "c4", 1e-3, 0) is not None and not os.path.exists(lock)


def _all_files(out):
    return sorted(os.path.join(r, f) for r, _, fs in os.walk(out) for f in fs)


def _all_json(out):
    return sorted(os.path.join(r, f) for r, _, fs in os.walk(os.path.join(out, "runs")) for f in fs if f.endswith(".json"))


def test_cli_tune_picks_on_validation(tmp_path):
    from mmim_ext.experiments.__main__ import main

    out = str(tmp_path / "tune")
    rc = main(["table1", *TINY, "--seeds", "2", "--archs", "mlp", "--methods", "baseline,c4,mmim", "--tune-grid",
               "0.001,0.1", "--tune-seeds", "1", "--no-measure", "--no-plots", "--out", out])
    assert rc == 0
    res = json.load(open(os.path.join(out, "results.json")))
    tuning = res["tuning"]
    assert tuning["seeds"] == [1000] and tuning["grid"] == [0.001, 0.1]
    recs = [r for r in _records(out) if r["phase"] == "tune"]
    assert {r["seed"] for r in recs} == {1000} and not {r["seed"] for r in recs} & {0, 1}
    for c in tuning["curves"]:
        vals = {p["reg_weight"]: p["val_acc_mean"] for p in c["points"]}
        assert c["chosen"] == max(sorted(vals), key=lambda k: vals[k]) or vals[c["chosen"]] == max(vals.values())
        assert c["lambda_at_grid_edge"] is True  # a two-point grid: every choice is at an edge
        row = next(r for r in res["rows"] if r["method"] == c["method"])
        assert row["reg_weight"] == c["chosen"] and row["lambda_at_grid_edge"] is True


def test_cli_errors(tmp_path, capsys):
    from mmim_ext.experiments.__main__ import main

    assert main(["table1", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "t10k-images-idx3-ubyte" in err and "train-labels-idx1-ubyte" in err
    with pytest.raises(SystemExit):
        main(["table1", "--archs", "mlp,transformer"])
    assert "--archs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["table1", "--shard", "2/2"])
    with pytest.raises(SystemExit):
        main(["nosuchcommand"])
    assert main(["table1", "--merge", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "not a table1 --out directory" in capsys.readouterr().err


def test_module_entry_point_subprocess():
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "mmim_ext.experiments", "table1", "--help"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--quick" in r.stdout and "--shard" in r.stdout and "--merge" in r.stdout
