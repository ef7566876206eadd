"""Trainer: logs, probes, crash-safe resume (a subprocess SIGKILLed mid-run), bad inputs; equal progress."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lazyhasty import data as D
from lazyhasty.analysis import at_equal_progress, difference
from lazyhasty.train import NonFiniteLoss, Run, TrainConfig, Trainer, compare_regimes


def small_setup(seed=0):
    torch.manual_seed(seed)
    ds = D.yinyang(120, seed=seed, label_noise=0.1)
    net = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    return net, ds


def test_trainer_logs_losses_groups_and_probes(tmp_path):
    net, ds = small_setup()
    cfg = TrainConfig(steps=60, lr=0.5, alpha=1.0, loss="logistic", log_every=20, batch_size=32)
    clean_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ds.x[~ds.noisy], ds.y[~ds.noisy]),
                                               batch_size=17)  # any loader of (x, y) batches works too
    run = Trainer(net, ds, cfg, tmp_path / "run", probes={"noisy": ds[ds.noisy], "clean": clean_loader},
                  probe_set=ds[:50]).fit()
    assert [r["step"] for r in run.rows] == [0, 20, 40, 60]
    r0 = run.rows[0]
    assert r0["sign_similarity"] == 1.0 and r0["repr_alignment"] == pytest.approx(1.0)
    assert r0["ntk_alignment"] == pytest.approx(1.0, abs=1e-6)
    assert run.rows[-1]["train_loss"] < r0["train_loss"]
    assert run.rows[-1]["sign_similarity"] < 1.0
    assert {"noisy/loss", "noisy/acc", "clean/loss", "clean/acc"} <= set(r0)
    from lazyhasty.train import per_example_loss
    with torch.no_grad():
        clean = ds[~ds.noisy]
        assert r0["clean/loss"] == pytest.approx(float(per_example_loss("logistic", small_setup()[0](clean.x), clean.y).mean()),
                                                 rel=1e-5)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["alpha"] == 1.0
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 60 and ck["n_rows"] == 4


def test_geometric_logging(tmp_path):
    net, ds = small_setup()
    cfg = TrainConfig(steps=200, lr=1.0, loss="logistic", log_every=None, log_geometric=0.96, probe_every=0)
    run = Trainer(net, ds, cfg, tmp_path / "geo").fit()
    losses = run.column("train_loss")
    L0 = losses[0]
    # each logged loss (after the first) is below the next geometric level: no level is logged twice
    levels = np.floor(np.log(losses[1:-1] / L0) / np.log(0.96))
    assert len(run.rows) >= 4 and np.all(np.diff(levels) >= 1)


def _script(run_dir: Path, steps: int) -> str:
    return textwrap.dedent(f"""
        import sys, torch
        from torch import nn
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_train import small_setup
        from lazyhasty.train import TrainConfig, Trainer
        net, ds = small_setup()
        cfg = TrainConfig(steps={steps}, lr=0.5, loss="logistic", log_every=5, batch_size=16, momentum=0.9,
                          probe_every=2)
        Trainer(net, ds, cfg, {str(run_dir)!r}, probes={{"noisy": ds[ds.noisy]}}, probe_set=ds[:40]).fit(resume=True)
    """)


def test_kill_and_resume_gives_the_same_run(tmp_path):
    steps = 400
    ref_dir, kill_dir = tmp_path / "ref", tmp_path / "killed"
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", _script(ref_dir, steps)], check=True, env=env, timeout=300)
    kills = 0
    for delay in (1.5, 2.0, 2.5):
        p = subprocess.Popen([sys.executable, "-c", _script(kill_dir, steps)], env=env)
        time.sleep(delay)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
    subprocess.run([sys.executable, "-c", _script(kill_dir, steps)], check=True, env=env, timeout=300)
    ref, got = Run(ref_dir), Run(kill_dir)
    assert kills >= 1
    assert got.rows == ref.rows  # none lost, none doubled, same numbers
    a = torch.load(ref_dir / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(kill_dir / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_different_config(tmp_path):
    net, ds = small_setup()
    cfg = TrainConfig(steps=10, lr=0.5, loss="logistic", log_every=5, probe_every=0)
    Trainer(net, ds, cfg, tmp_path / "r").fit()
    with pytest.raises(FileExistsError, match="resume=True"):
        Trainer(small_setup()[0], ds, cfg, tmp_path / "r").fit()
    cfg2 = TrainConfig(steps=10, lr=0.25, loss="logistic", log_every=5, probe_every=0)
    with pytest.raises(ValueError, match=r"train.lr: 0.5 -> 0.25"):
        Trainer(small_setup()[0], ds, cfg2, tmp_path / "r").fit(resume=True)
    with pytest.raises(ValueError, match="train_data"):
        Trainer(small_setup()[0], ds[:100], cfg, tmp_path / "r").fit(resume=True)


def test_non_finite_loss_stops_and_keeps_the_log(tmp_path):
    net, ds = small_setup()
    cfg = TrainConfig(steps=200, lr=1e6, loss="mse", log_every=1, probe_every=0)
    with pytest.raises(NonFiniteLoss, match="non-finite training loss"):
        Trainer(net, ds, cfg, tmp_path / "nan").fit()
    rows = Run(tmp_path / "nan").rows
    assert len(rows) >= 1 and rows[0]["step"] == 0


def test_bad_inputs(tmp_path):
    net, ds = small_setup()
    with pytest.raises(ValueError, match="alpha"):
        Trainer(net, ds, TrainConfig(steps=1, lr=0.1, alpha=0.0), tmp_path / "a")
    with pytest.raises(ValueError, match="empty"):
        Trainer(net, ds[:0], TrainConfig(steps=1, lr=0.1), tmp_path / "b")
    with pytest.raises(ValueError, match="loss"):
        Trainer(net, ds, TrainConfig(steps=1, lr=0.1, loss="hinge"), tmp_path / "c")
    with pytest.raises(ValueError, match="probe set 'x' is empty"):
        Trainer(net, ds, TrainConfig(steps=1, lr=0.1), tmp_path / "d", probes={"x": ds[:0]})
    with pytest.raises(ValueError, match="probe set"):
        Trainer(net, ds, TrainConfig(steps=1, lr=0.1), tmp_path / "e", probes={"x": 3})


def test_compare_regimes_share_init_and_order(tmp_path):
    net, ds = small_setup()
    cfg = TrainConfig(steps=40, lr=0.5, loss="logistic", log_every=10, batch_size=30, probe_every=0)
    runs = compare_regimes(net, ds, cfg, tmp_path, alphas=(1.0, 100.0), steps={100.0: 60})
    assert [r.name for r in runs] == ["alpha=1", "alpha=100"]
    assert runs[0].rows[0]["train_loss"] == runs[1].rows[0]["train_loss"]  # same init, f_alpha(theta0) = f0
    assert runs[1].rows[-1]["step"] == 60


def test_equal_progress_interpolation_hand_computed():
    a = [{"train_loss": 1.0, "g": 10.0}, {"train_loss": 0.5, "g": 20.0}, {"train_loss": 0.6, "g": 99.0},
         {"train_loss": 0.25, "g": 40.0}]
    b = [{"train_loss": 0.9, "g": 0.0}, {"train_loss": 0.1, "g": 8.0}]
    t = at_equal_progress([a, b], grid=np.array([0.75, 0.5, 0.3]), names=["a", "b"])
    # a: monotone progress 1.0, 0.5, 0.5 (0.6 -> running min 0.5; that row is not the first at 0.5), 0.25
    assert np.allclose(t["a"]["g"], [15.0, 20.0, 20.0 + (0.5 - 0.3) / (0.5 - 0.25) * 20.0])
    assert np.allclose(t["b"]["g"], [(0.9 - 0.75) / 0.8 * 8.0, (0.9 - 0.5) / 0.8 * 8.0, (0.9 - 0.3) / 0.8 * 8.0])
    d = difference(t, "a", "b", ["g"])
    assert np.allclose(d["g"], t["a"]["g"] - t["b"]["g"])
    auto = at_equal_progress([a, b], grid=5, names=["a", "b"])
    assert auto.grid[0] == 0.9 and auto.grid[-1] == 0.25  # the range both runs reached
    with pytest.raises(ValueError, match="no runs"):
        at_equal_progress([])
    with pytest.raises(ValueError, match="no 'train_loss'"):
        at_equal_progress([[{"loss": 1.0}]])


def test_a_run_dir_holding_other_files_is_refused(tmp_path):
    net, ds = small_setup()
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "notes.txt").write_text("mine")
    cfg = TrainConfig(steps=3, lr=0.5, loss="logistic", log_every=1, probe_every=0)
    for resume in (False, True):
        with pytest.raises(FileExistsError, match="not a lazyhasty run"):
            Trainer(net, ds, cfg, tmp_path / "r").fit(resume=resume)
        assert [p.name for p in (tmp_path / "r").iterdir()] == ["notes.txt"]


def test_a_full_disk_while_checkpointing_is_a_clear_error_and_nothing_half_written(tmp_path):
    """The file size limit (RLIMIT_FSIZE) stands in for a full disk: torch.save fails part-way."""
    pytest.importorskip("resource")
    script = textwrap.dedent(f"""
        import json, resource, signal, sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_train import small_setup
        from lazyhasty.train import TrainConfig, Trainer
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, as on a full disk, not a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (6000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        net, ds = small_setup()
        cfg = TrainConfig(steps=5, lr=0.5, loss="logistic", log_every=1, probe_every=0)
        try:
            Trainer(net, ds, cfg, {str(tmp_path / "r")!r}).fit()
        except Exception as exc:
            print(json.dumps({{"type": type(exc).__name__, "oserror": isinstance(exc, OSError),
                              "message": str(exc), "filename": getattr(exc, "filename", None)}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TRITON_INTERPRET="0", PYTHONWARNINGS="ignore"))
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["oserror"], got
    assert got["filename"].endswith("checkpoint.pt.tmp") and "disk" in got["message"], got
    assert not (tmp_path / "r" / "checkpoint.pt.tmp").exists() and not (tmp_path / "r" / "checkpoint.pt").exists()
    assert len(Run(tmp_path / "r").rows) == 1  # the row written before the failed checkpoint is kept
