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
def test_batchnorm_in_train_mode_measured_on_running_stats_without_touching_the_model(implementation):
    # issue 27: a train-mode model is measured in eval mode (running statistics); nothing of it changes
    m = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 1)).train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(6, 3)
    K = ntk_gram(m, x, implementation=implementation)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items()) and m[1].training
    assert torch.equal(K, ntk_gram(copy.deepcopy(m).eval(), x, implementation=implementation))
    # without running statistics there is no eval-mode network to measure: refused, the model untouched
    bn = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.Linear(8, 1))
    with pytest.raises(ValueError, match="BatchNorm"):
        ntk_gram(bn, x, implementation=implementation)


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
    # the same result (to rounding: the engine may measure two exact ways of the output gradients on the first
    # calls of a model, Featurizer._replicas, whose float64 roundings differ in the last bits)
    assert torch.allclose(info.value.result.residuals, res.residuals, rtol=1e-9, atol=0)
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


# --- the adversarial sweep of the NTK entry points (issue 28: no raw torch message, no silent number) -------
class _Emb(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.e, self.l = nn.Embedding(10, 4), nn.Linear(4, 2)

    def forward(self, t):
        return self.l(self.e(t).mean(1))


class _Wrap(nn.Module):
    """An MLP whose output is reshaped by ``how``: what a model returning the wrong thing looks like."""

    def __init__(self, how):
        super().__init__()
        self.net, self.how = _mlp(), how

    def forward(self, x):
        y = self.net(x)
        return {"sum": lambda: y.sum(), "sum0": lambda: y.sum(0), "half": lambda: y[: max(1, len(y) // 2)],
                "twice": lambda: torch.cat([y, y]), "flat": lambda: y.reshape(-1), "long": lambda: y.long(),
                "detached": lambda: y.detach()}[self.how]()


class _Positions(nn.Module):
    """Token ids in range of the token embedding, positions embedded by a table too short for the sequence."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.tok, self.pos, self.l = nn.Embedding(10, 4), nn.Embedding(3, 4), nn.Linear(4, 2)

    def forward(self, t):
        return self.l((self.tok(t) + self.pos(torch.arange(t.shape[1]))).mean(1))


def _tokens(shift=0):
    return torch.randint(0, 10, (10, 5), generator=torch.Generator().manual_seed(3)) + shift


def _entry_points():
    from lazyhasty.kernels import kernel_matvec, ntk_eigh
    from lazyhasty.ntk import KernelOperator, NTKReference, explain

    def op(m, x):
        return KernelOperator(m, x)(torch.ones(10, 1))

    return {
        "ntk_gram": lambda m, x: ntk_gram(m, x),
        "ntk_gram-trace-naive": lambda m, x: ntk_gram(m, x, kernel="trace", implementation="naive"),
        "ntk_alignment": lambda m, x: ntk_alignment(m, x, copy.deepcopy(m) if isinstance(m, nn.Module) else None),
        "explain": lambda m, x: explain(m, x),
        "KernelOperator": op,
        "ntk_eigh": lambda m, x: ntk_eigh(m, x, 2),
        "kernel_matvec": lambda m, x: kernel_matvec(m, x, torch.ones(10, 1)),
        "NTKReference": lambda m, x: NTKReference.capture(m, x).alignment(m),
    }


_SWEEP = {  # name: (model, inputs, what the message must say)
    "token id out of range": (_Emb, lambda: _tokens(20), r"token id \d+ is out of range of .*nn\.Embedding 'e' "
                                                          r"\(num_embeddings=10\)"),
    "negative token id": (_Emb, lambda: _tokens(-11), r"token id -\d+ is out of range of .*'e'"),
    "position table too short": (_Positions, _tokens, r"token id 4 is out of range of .*nn\.Embedding 'pos' "
                                                      r"\(num_embeddings=3\)"),
    "float token ids": (_Emb, lambda: _tokens().float(), r"nn\.Embedding 'e' got torch\.float32 inputs: token ids "
                                                         "are integers"),
    "batch-summed scalar output": (lambda: _Wrap("sum"), lambda: torch.randn(10, 3),
                                   r"returns a scalar \(shape \[\]\).*one output row per example"),
    "batch-summed [k] output": (lambda: _Wrap("sum0"), lambda: torch.randn(10, 3),
                                r"returns 2 rows \(output \[2\]\) for a batch of 3 examples"),
    "fewer output rows": (lambda: _Wrap("half"), lambda: torch.randn(10, 3), r"returns 1 rows .* batch of 3"),
    "more output rows": (lambda: _Wrap("twice"), lambda: torch.randn(10, 3), r"returns 6 rows .* batch of 3"),
    "output without a batch dim": (lambda: _Wrap("flat"), lambda: torch.randn(10, 3),
                                   r"returns 6 rows \(output \[6\]\)"),
    "integer output": (lambda: _Wrap("long"), lambda: torch.randn(10, 3), r"output is torch\.int64.*floating-point"),
    "output without gradient": (lambda: _Wrap("detached"), lambda: torch.randn(10, 3),
                                r"output does not depend on its trainable parameters"),
    "integer inputs to a float model": (_mlp, lambda: torch.randint(0, 3, (10, 3)),
                                        r"inputs are torch\.int64 but \w+ computes in torch\.float32"),
    "inputs of the wrong shape": (_mlp, lambda: torch.randn(10, 5), r"cannot run on the inputs \(examples of shape "
                                                                    r"\[5\], torch\.float32"),
    "batches of different shapes": (_mlp, lambda: [torch.randn(4, 3), torch.randn(4, 5)],
                                    r"batch 1 of the loader has examples of shape \(5,\)"),
    "batches of different dtypes": (_mlp, lambda: [torch.randn(4, 3), torch.randint(0, 3, (4, 3))],
                                    r"batch 1 of the loader .*torch\.int64"),
    "NaN inputs": (_mlp, lambda: torch.tensor([[0.0, float("nan"), 1.0]]).repeat(10, 1), r"NaN/inf"),
    "inf inputs": (_mlp, lambda: torch.tensor([[0.0, float("inf"), 1.0]]).repeat(10, 1), r"NaN/inf"),
    "empty loader": (_mlp, lambda: [], r"empty|no example"),
    "empty tensor": (_mlp, lambda: torch.zeros(0, 3), r"empty|no example"),
    "0-d inputs": (_mlp, lambda: torch.tensor(1.0), r"batch dimension"),
    "no parameters": (lambda: nn.Sequential(nn.ReLU()), lambda: torch.randn(10, 3), r"no trainable parameter"),
    "frozen parameters": (lambda: _mlp().requires_grad_(False), lambda: torch.randn(10, 3), r"no trainable parameter"),
    "not a module": (lambda: "net", lambda: torch.randn(10, 3), r"must be an nn\.Module, got str|carries no init"),
}


@pytest.mark.parametrize("entry", list(_entry_points()))
@pytest.mark.parametrize("case", list(_SWEEP))
def test_ntk_entry_points_name_every_bad_input(entry, case):
    make_model, make_x, message = _SWEEP[case]
    with pytest.raises((ValueError, TypeError), match=message) as info:
        _entry_points()[entry](make_model(), make_x())
    assert "mat1 and mat2" not in str(info.value).split("(")[0]  # torch's words only as the quoted cause


@pytest.mark.parametrize("entry", ["ntk_eigh", "NTKReference", "kernel_matvec"])
def test_float64_inputs_or_reference_of_a_float32_model_work_as_in_ntk_gram(entry):
    # ntk_gram / ntk_alignment feed floating inputs in the model's dtype; the other entry points raised torch's
    # "mat1 and mat2 must have the same dtype" (ntk_eigh, NTKReference), now the same rule everywhere
    from lazyhasty.kernels import kernel_matvec, ntk_eigh
    from lazyhasty.ntk import NTKReference

    net, x = _mlp(), torch.randn(10, 3)
    if entry == "ntk_eigh":
        got, want = ntk_eigh(net, x.double(), 2).values, ntk_eigh(net, x, 2).values
        assert torch.allclose(got, want, rtol=1e-5)
    elif entry == "kernel_matvec":
        Q = torch.randn(10, 2)
        assert torch.allclose(kernel_matvec(net, x.double(), Q), kernel_matvec(net, x, Q), rtol=1e-5)
    else:
        ref64 = copy.deepcopy(net).double()
        assert NTKReference.capture(ref64, x).alignment(net) == pytest.approx(
            ntk_alignment(net, x, ref64, kernel="trace"), abs=1e-6)
        assert NTKReference.capture(net, x.double()).alignment(net) == pytest.approx(1.0, abs=1e-6)


def test_a_reference_of_another_architecture_is_named():
    from lazyhasty.ntk import NTKReference

    wide = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 2))
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="not the same architecture"):
        ntk_alignment(_mlp(), x, wide)
    other = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="trainable parameters differ"):
        NTKReference.capture(other, x).alignment(_mlp())


@pytest.mark.parametrize("kw,message", [
    (dict(kernel="bogus"), "kernel must be"), (dict(block_size=0), "block_size must be"),
    (dict(block_size=2.5), "block_size must be"), (dict(dtype=torch.int64), "dtype must be a floating"),
    (dict(implementation="fast"), "implementation must be"),
])
@pytest.mark.parametrize("entry", ["ntk_gram", "ntk_alignment", "explain", "KernelOperator", "ntk_eigh",
                                   "NTKReference"])
def test_ntk_arguments_out_of_range_are_named(entry, kw, message):
    from lazyhasty.kernels import ntk_eigh
    from lazyhasty.ntk import KernelOperator, NTKReference, explain

    net, x = _mlp(), torch.randn(10, 3)
    if entry in ("KernelOperator", "ntk_eigh", "NTKReference") and "kernel" in kw:
        message = "kernel must be"
    call = {"ntk_gram": lambda: ntk_gram(net, x, **kw), "ntk_alignment": lambda: ntk_alignment(net, x, net, **kw),
            "explain": lambda: explain(net, x, **kw), "KernelOperator": lambda: KernelOperator(net, x, **kw),
            "ntk_eigh": lambda: ntk_eigh(net, x, 2, **kw), "NTKReference": lambda: NTKReference.capture(net, x, **kw)}
    with pytest.raises((ValueError, TypeError), match=message):
        call[entry]()


@pytest.mark.parametrize("entry", list(_entry_points()))
def test_meta_device_models_are_named(entry):
    meta = _mlp().to("meta")
    name = "reference" if entry == "NTKReference" else "model"
    with pytest.raises(ValueError, match=f"{name} has tensors on the meta device"):
        _entry_points()[entry](meta, torch.randn(10, 3))


def test_a_meta_device_reference_is_named():
    with pytest.raises(ValueError, match="reference has tensors on the meta device"):
        ntk_alignment(_mlp(), torch.randn(10, 3), _mlp().to("meta"))


def test_the_trial_forward_runs_once_per_structure_and_input_signature_and_ids_are_checked_every_call():
    """The input checks' trial forwards (3 and 2 examples) run on a model's first call and again only when its
    structure, modes, trainable parameters or the inputs' example shape change; token ids that an embedding
    reads as they are stay range-checked on every call (a later batch with an id out of range is refused)."""
    from lazyhasty._validate import SAMPLE, check_model_inputs

    class Tokens(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 2)

        def forward(self, ids):
            return self.head(self.emb(ids).mean(1))

    m = Tokens()
    seen = []
    m.register_forward_hook(lambda mod, a, o: seen.append(a[0].shape[0]))
    ids = torch.randint(0, 10, (6, 5))
    check_model_inputs(ids, model=m)
    assert seen == [SAMPLE, SAMPLE - 1]
    check_model_inputs(torch.randint(0, 10, (8, 5)), model=m)
    assert seen == [SAMPLE, SAMPLE - 1]  # the same signature: no forward
    bad = ids.clone()
    bad[-1, 0] = 10  # beyond the trial's examples
    with pytest.raises(ValueError, match="token id 10 is out of range of model's nn.Embedding 'emb'"):
        check_model_inputs(bad, model=m)
    check_model_inputs(torch.randint(0, 10, (6, 7)), model=m)  # another example shape
    assert len(seen) == 4
    m.head.weight.requires_grad_(False)  # another set of trainable parameters
    check_model_inputs(ids, model=m)
    assert len(seen) == 6
    m.head.requires_grad_(False)
    m.emb.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        check_model_inputs(ids, model=m)
