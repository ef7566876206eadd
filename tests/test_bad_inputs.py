"""Every bad input is a clear error naming the problem, never a silent wrong number (issue 11, parts 3-4)."""
import copy
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lazyhasty import data as D
from lazyhasty.__main__ import main
from lazyhasty.data.real import read_idx
from lazyhasty.metrics import SignPatterns, ntk_alignment, ntk_gram
from lazyhasty.train import TrainConfig

from test_data import _write_idx


# --- CLI -------------------------------------------------------------------------------------------
def test_cli_unknown_option_is_an_error_with_a_suggestion(tmp_path, capsys):
    code = main(["run", "label-noise", "--quick", "--set", "epoch=1", "--set", "n_trian=50",
                 "--out", str(tmp_path / "x"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown option 'epoch'" in err and "did you mean 'epochs'" in err and "n_train" in err
    assert not (tmp_path / "x").exists()  # nothing ran, nothing was created


def test_cli_option_of_the_wrong_type_names_key_and_type(tmp_path, capsys):
    assert main(["run", "quadratic", "--set", "sigma=abc", "--out", str(tmp_path / "q"), "--no-progress"]) == 2
    assert "option 'sigma' expects a number, got 'abc'" in capsys.readouterr().err
    assert main(["run", "label-noise", "--set", "epochs=2.5", "--out", str(tmp_path / "l")]) == 2
    assert "option 'epochs' expects an integer" in capsys.readouterr().err
    cfg = tmp_path / "c.json"
    cfg.write_text('{"sigmaa": 0.1}')
    assert main(["run", "quadratic", "--config", str(cfg), "--out", str(tmp_path / "q2")]) == 2
    assert "did you mean 'sigma'" in capsys.readouterr().err


def test_cli_unwritable_output_directory_is_a_message_not_a_traceback(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("scipy")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert main(["run", "quadratic", "--out", str(blocker / "sub"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and "Traceback" not in err


# --- the NTK: the same guards before every implementation ------------------------------------------
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))


IMPLS = ["naive", "jacobian", "layerwise"]


@pytest.mark.parametrize("implementation", IMPLS)
def test_train_mode_dropout_measured_in_eval_mode_by_every_implementation(implementation):
    # issue 27: probes run inside training; the model's dropout is off while measuring, on after
    m = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 1)).train()
    x = torch.randn(6, 3)
    ref = copy.deepcopy(m)
    got = ntk_alignment(m, x, ref, implementation=implementation)
    want = ntk_alignment(copy.deepcopy(m).eval(), x, copy.deepcopy(ref).eval(), implementation=implementation)
    assert got == want
    assert m.training and m[1].training and ref.training
    assert not torch.equal(m(x), m(x))  # dropout active again for the next training step


@pytest.mark.parametrize("implementation", IMPLS)
def test_nan_inputs_refused_by_every_implementation(implementation):
    x = torch.randn(6, 3)
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ntk_gram(_mlp(), x, implementation=implementation)


@pytest.mark.parametrize("implementation", IMPLS)
def test_batchnorm_in_train_mode_refused_without_touching_the_model(implementation):
    m = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 1)).train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="BatchNorm"):
        ntk_gram(m, torch.randn(6, 3), implementation=implementation)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


class MixesLargeBatches(nn.Module):
    """Mixes examples only in batches of more than 4 (the old check compared 2 examples with 1)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        y = self.lin(x)
        return y + y.mean(0) if x.shape[0] > 4 else y


@pytest.mark.parametrize("implementation", IMPLS)
def test_batch_mixing_found_beyond_the_first_examples(implementation):
    with pytest.raises(ValueError, match="depends on the other examples"):
        ntk_gram(MixesLargeBatches(), torch.randn(20, 3), implementation=implementation)


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _mlp()

    def forward(self, x):
        y = self.net(x)
        return y, {"logits": y, "aux": y.sum()}


def test_model_returning_a_tuple_needs_output_and_gets_it():
    m = TupleOut()
    x = torch.randn(5, 3)
    with pytest.raises(TypeError, match="output="):
        ntk_gram(m, x)
    want = ntk_gram(m.net, x)
    assert torch.allclose(ntk_gram(m, x, output=0), want, atol=1e-6)
    assert torch.allclose(ntk_gram(m, x, output=lambda o: o[1]["logits"]), want, atol=1e-6)
    assert torch.allclose(ntk_gram(m, x, output=0, implementation="naive"), want, atol=1e-6)
    assert ntk_alignment(m, x, copy.deepcopy(m), output=0, kernel="trace") == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="cannot pick"):
        ntk_gram(m, x, output=5)


def test_bad_ntk_arguments():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="block_size"):
        ntk_gram(_mlp(), x, block_size=True)
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        ntk_gram(_mlp(), x, dtype="float64")
    with pytest.raises(TypeError, match="state_dict has no forward pass"):
        SignPatterns.capture(_mlp().state_dict(), x)


@pytest.mark.parametrize("kw,match", [
    (dict(steps=2.5), "steps must be an integer"),
    (dict(steps=3, eval_batch_size=0), "eval_batch_size"),
    (dict(steps=3, probe_every=-1), "probe_every"),
    (dict(steps=3, batch_size=True), "batch_size"),
    (dict(steps=3, lr=float("nan")), "lr must be a finite number"),
    (dict(steps=3, ntk_kernel="fulll"), "ntk_kernel"),
])
def test_train_config_validation(kw, match):
    cfg = TrainConfig(**{"lr": 0.1, **kw})
    with pytest.raises(ValueError, match=match):
        cfg.validate()


# --- data ------------------------------------------------------------------------------------------
def _cifar(tmp_path: Path, data, labels):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (base / name).write_bytes(pickle.dumps({b"data": data, b"labels": labels}))


def test_cifar_pixels_out_of_range_and_labels_out_of_range(tmp_path):
    data = np.zeros((2, 3072), dtype=np.int64)
    data[0, 0] = 1_000_000  # would wrap to 64 / 255 = 0.25 in a uint8 cast
    _cifar(tmp_path / "a", data, [1, 2])
    with pytest.raises(ValueError, match="pixel values must be integers in 0..255"):
        D.cifar10(tmp_path / "a", "train")
    _cifar(tmp_path / "b", np.zeros((2, 3072), dtype=np.uint8), [1, 50])
    with pytest.raises(ValueError, match=r"labels must lie in 0..9, found \[50\]"):
        D.cifar10(tmp_path / "b", "train")


def test_fashion_mnist_labels_out_of_range(tmp_path):
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 28, 28), dtype=np.uint8), 0x08, False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([1, 200, 3], dtype=np.uint8), 0x08, False)
    with pytest.raises(ValueError, match=r"found \[200\]"):
        D.fashion_mnist(tmp_path, "test")


def test_idx_header_whose_sizes_overflow(tmp_path):
    p = tmp_path / "t10k-images-idx3-ubyte"
    p.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3I", 2**31, 2**31, 2**31) + b"\0" * 16)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        read_idx(p)


def test_cscores_float_labels_and_zero_bins(tmp_path):
    p = tmp_path / "c.npz"
    np.savez(p, labels=np.array([0.0, 1.5, 2.0]), scores=np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="labels must be integers"):
        D.load_cscores(p)
    with pytest.raises(ValueError, match="bins must be a positive integer"):
        D.difficulty_groups(torch.rand(20), bins=0)


def test_dataset_labels_beyond_num_classes():
    with pytest.raises(ValueError, match="class labels must lie in 0..9"):
        D.Dataset(torch.zeros(3, 2), torch.tensor([0, 10, 2]), num_classes=10)


def test_ntk_backend_without_ntk_kernels_is_an_error():
    x = torch.randn(4, 3)
    for b in ("cpp", "cuda", "cudnn"):
        with pytest.raises(ValueError, match="NTK engine has 'torch' and 'triton' paths"):
            ntk_gram(_mlp(), x, backend=b)
    assert torch.allclose(ntk_gram(_mlp(), x, backend="torch"), ntk_gram(_mlp(), x, backend="auto"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_batch_mixing_found_in_every_precision(dtype):
    """The mixing check's tolerance grows with the rounding of the dtype (16-bit: 3e-2 of the output scale)
    but stays far below what a batch statistic changes."""
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="depends on the other examples"):
        ntk_gram(MixesLargeBatches().to(dtype), torch.randn(20, 3, dtype=dtype))
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)  # no mixing: accepted
    assert ntk_gram(m, torch.randn(20, 3, dtype=dtype), kernel="trace").shape == (20, 20)


# --- ntk_eigh: an unconverged result is said, never silent ----------------------------------------------
def _eigh_setup():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double()
    x = torch.randn(13, 2, 6, 6, dtype=torch.float64)
    K = ntk_gram(m, x, kernel="trace").double()
    return m, x, K


def test_ntk_eigh_reports_residuals_and_stops_on_them():
    import warnings

    from lazyhasty.kernels import ntk_eigh

    m, x, K = _eigh_setup()
    lam, V = torch.linalg.eigh(K)
    want, Vw = lam.flip(0)[:4], V.flip(1)[:, :4]
    for kw in ({}, {"max_bytes": 0, "block_size": 4}):  # materialized, streamed at the defaults
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # converged: no warning
            res = ntk_eigh(m, x, 4, **kw)
        got, vecs = res
        true_residuals = (K @ vecs - vecs * got).norm(dim=0) / want[0]
        assert res.converged and float(res.residuals.max()) <= 1e-10
        assert torch.allclose(res.residuals, true_residuals, rtol=1e-3, atol=1e-14)
        assert torch.allclose(got, want, rtol=1e-12)
        assert float((vecs.T @ Vw).abs().diagonal().min()) > 1 - 1e-12


def test_ntk_eigh_unconverged_warns_or_raises_with_the_residuals():
    from lazyhasty.kernels import NotConverged, ntk_eigh

    m, x, K = _eigh_setup()
    with pytest.warns(RuntimeWarning, match=r"did not reach tol=1e-10 in max_iter=3 .*residuals"):
        res = ntk_eigh(m, x, 4, max_bytes=0, block_size=4, max_iter=3)
    got, vecs = res
    assert not res.converged and res.iterations == 3
    true_residuals = (K @ vecs - vecs * got).norm(dim=0) / float(got[0])
    assert torch.allclose(res.residuals, true_residuals, rtol=1e-6)
    assert float(res.residuals.max()) > 1e-4  # three iterations are far from the stated tolerance
    with pytest.raises(NotConverged, match="max_iter=3") as info:
        ntk_eigh(m, x, 4, max_bytes=0, block_size=4, max_iter=3, on_unconverged="raise")
    assert torch.equal(info.value.result.residuals, res.residuals)
    with pytest.raises(ValueError, match="on_unconverged"):
        ntk_eigh(m, x, 4, on_unconverged="ignore")


def test_predict_refuses_test_inputs_without_the_test_kernel():
    from lazyhasty.kernels import predict

    K = torch.eye(4, dtype=torch.float64) * 2
    f0 = torch.zeros(4, 1, dtype=torch.float64)
    y = torch.ones(4, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="f0_test given without K_test_train"):
        predict(K, None, y, f0, torch.zeros(3, 1), lr=0.1, times=[1])
    with pytest.raises(ValueError, match="y_test given without K_test_train"):
        predict(K, None, y, f0, lr=0.1, times=[1], y_test=torch.ones(3, 1))
    out = predict(K, None, y, f0, lr=0.1, times=[1])
    assert "f_test" not in out
