"""The tangent kernel as an instrument: captured reference, cross kernels, predictions, spectra (issue 14)."""
import copy

import numpy as np

import pytest
import torch
from torch import nn

from lazyhasty import reference as R
from lazyhasty.metrics import LinearityProbe, NTKReference, ntk_alignment, ntk_gram


def _pair(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    m0 = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).to(dtype)
    m = copy.deepcopy(m0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m0, m, torch.randn(13, 2, 6, 6, dtype=dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("kernel", ["trace", "full"])
@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("block_size", [None, 5])
def test_ntk_reference_equals_ntk_alignment(dtype, tol, kernel, centered, block_size):
    m0, m, x = _pair(dtype)
    ref = NTKReference.capture(m0, x, kernel=kernel, centered=centered, block_size=block_size)
    assert ref.stored and ref.nbytes > 0
    want = ntk_alignment(m, x, m0, kernel=kernel, centered=centered, block_size=block_size)
    assert abs(ref.alignment(m) - want) <= tol
    assert ref.alignment(m0) == pytest.approx(1.0, abs=tol)
    lean = NTKReference.capture(m0, x, kernel=kernel, centered=centered, block_size=block_size, max_bytes=0)
    assert not lean.stored and abs(lean.alignment(m) - want) <= tol


def test_ntk_reference_of_a_frozen_init_and_the_probe():
    m0, m, x = _pair()
    frozen = copy.deepcopy(m0).requires_grad_(False)  # as AlphaScaled's f0
    names = {n for n, _ in m.named_parameters()}
    ref = NTKReference.capture(frozen, x, kernel="trace", trainable=names)
    assert ref.alignment(m) == pytest.approx(ntk_alignment(m, x, frozen, kernel="trace"), abs=1e-12)
    probe = LinearityProbe.capture(frozen, x, ntk="trace", trainable=names)
    got = probe.measure(m)
    assert got["ntk_alignment"] == pytest.approx(ntk_alignment(m, x, frozen, kernel="trace"), abs=1e-12)
    with pytest.raises(ValueError, match="trace' or 'full"):
        NTKReference.capture(m0, x, kernel="diagonal")
    m.requires_grad_(False)
    m[0].weight.requires_grad_(True)
    with pytest.raises(ValueError, match="trainable parameters differ"):
        NTKReference.capture(m0, x).alignment(m)


@pytest.mark.parametrize("implementation", ["auto", "jacobian", "naive"])
@pytest.mark.parametrize("kernel", ["full", "trace"])
@pytest.mark.parametrize("block_size", [None, 4])
def test_cross_kernel_against_explicit_jacobians(implementation, kernel, block_size):
    m0, _, x = _pair()
    x2 = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    K = ntk_gram(m0, x, loader2=x2, kernel=kernel, implementation=implementation, block_size=block_size)
    want = R.ntk_cross(m0, [x], [x2], kernel=kernel)
    assert K.shape == want.shape
    assert float((K - want).abs().max()) <= 1e-12 * float(want.abs().max())
    # the same examples on both sides: the Gram
    assert torch.allclose(ntk_gram(m0, x, loader2=x, kernel=kernel, block_size=block_size),
                          ntk_gram(m0, x, kernel=kernel), atol=1e-12)
    with pytest.raises(ValueError, match="no diagonal"):
        ntk_gram(m0, x, loader2=x2, kernel="diagonal", implementation=implementation)
    with pytest.raises(ValueError, match="differ in shape"):
        ntk_gram(m0, x, loader2=torch.randn(3, 2, 7, 7, dtype=torch.float64))


# --- kernel predictions of lazy training ------------------------------------------------------------
def _digits_setup(n=60, m=25):
    from lazyhasty.data import digits

    pytest.importorskip("sklearn")
    ds = digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).double()
    x, y = ds.x[:n].double(), ds.y[:n]
    xt, yt = ds.x[n:n + m].double(), ds.y[n:n + m]
    return model, x, y, xt, yt


def _train_linearized(model, x, y, loss, lr, steps, alpha=None):
    from lazyhasty.regimes import AlphaScaled, Linearized, scaled_lr
    from lazyhasty.train import per_example_loss

    net = Linearized(copy.deepcopy(model)) if alpha is None else AlphaScaled(copy.deepcopy(model), alpha)
    opt = torch.optim.SGD(net.parameters(), lr=lr if alpha is None else scaled_lr(lr, alpha))
    for _ in range(steps):
        opt.zero_grad()
        per_example_loss(loss, net(x), y).mean().backward()
        opt.step()
    return net


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_predict_matches_a_trained_linearized_model(loss):
    from lazyhasty.kernels import predict
    from lazyhasty.train import per_example_loss

    model, x, y, xt, yt = _digits_setup()
    K = ntk_gram(model, x, kernel="full")
    Kx = ntk_gram(model, xt, loader2=x, kernel="full")
    with torch.no_grad():
        f0, g0 = model(x), model(xt)
    n = x.shape[0]
    lam_max = float(torch.linalg.eigvalsh(K.reshape(n * 10, n * 10))[-1])
    lr, steps = 0.5 * n / lam_max, 40  # a quarter of gradient descent's stability limit 2 n / lambda_max
    out = predict(K, Kx, y, f0, g0, loss=loss, lr=lr, times=[0, steps // 2, steps], y_test=yt)
    net = _train_linearized(model, x, y, loss, lr, steps)
    with torch.no_grad():
        f, g = net(x), net(xt)
    # exact: a linear model under gradient descent is the kernel recursion
    assert torch.allclose(out["f_train"][-1], f, atol=1e-9)
    assert torch.allclose(out["f_test"][-1], g, atol=1e-9)
    assert torch.allclose(out["loss_train"][-1], per_example_loss(loss, f, y), atol=1e-9)
    assert torch.allclose(out["loss_test"][-1], per_example_loss(loss, g, yt), atol=1e-9)
    assert torch.allclose(out["f_train"][0], f0)
    # alpha-scaled runs of the network itself approach it as alpha grows (the lazy regime)
    errs = []
    for alpha in (1.0, 100.0, 1000.0):
        net = _train_linearized(model, x, y, loss, lr, steps, alpha=alpha)
        with torch.no_grad():
            errs.append(float((net(x) - f).abs().max() / (f - f0).abs().max()))  # relative to the motion
    assert errs[0] > errs[1] > errs[2] and errs[1] < 0.1 and errs[2] < 1e-2


def test_predict_flow_closed_form_and_rk4_agree_with_small_steps():
    from lazyhasty.kernels import predict

    model, x, y, xt, _ = _digits_setup(n=30, m=10)
    K, Kx = ntk_gram(model, x, kernel="full"), ntk_gram(model, xt, loader2=x, kernel="full")
    with torch.no_grad():
        f0, g0 = model(x), model(xt)
    # small steps (eta lambda_max / n ~ 0.01): gradient descent follows the flow to O(eta lambda / n)
    flow = predict(K, Kx, y, f0, g0, loss="mse", lr=0.002, times=[0.0, 250.0, 1500.0], dynamics="flow")
    gd = predict(K, Kx, y, f0, g0, loss="mse", lr=0.002, times=[0, 250, 1500])
    assert float((flow["f_train"][-1] - f0).abs().max()) > 0.3  # it moved
    assert torch.allclose(flow["f_train"], gd["f_train"], atol=1e-3)
    assert torch.allclose(flow["f_test"], gd["f_test"], atol=1e-3)
    ce_flow = predict(K, Kx, y, f0, g0, loss="cross_entropy", lr=0.002, times=[1500.0], dynamics="flow")
    ce_gd = predict(K, Kx, y, f0, g0, loss="cross_entropy", lr=0.002, times=[1500])
    assert torch.allclose(ce_flow["f_train"], ce_gd["f_train"], atol=1e-3)
    assert torch.allclose(ce_flow["f_test"], ce_gd["f_test"], atol=1e-3)
    # the per-output form ([n, n] for every output) on a model with one output equals the full one
    m1 = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    z = torch.randn(12, 3, dtype=torch.float64)
    Kf, Kt = ntk_gram(m1, z, kernel="full"), ntk_gram(m1, z, kernel="trace")
    yy = torch.randn(12, 1, dtype=torch.float64)
    with torch.no_grad():
        h0 = m1(z)
    a = predict(Kf, None, yy, h0, loss="mse", lr=0.1, times=[7.5], dynamics="flow")
    b = predict(Kt, None, yy, h0, loss="mse", lr=0.1, times=[7.5], dynamics="flow")
    assert torch.allclose(a["f_train"], b["f_train"], atol=1e-12)


def test_predict_bad_inputs():
    from lazyhasty.kernels import predict

    K = torch.eye(4, dtype=torch.float64)
    f0 = torch.zeros(4, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="positive semi-definite"):
        predict(-K, None, torch.ones(4, 1), f0, lr=0.1, times=[1])
    with pytest.raises(ValueError, match=r"must be \[4, 4\]"):
        predict(torch.eye(5), None, torch.ones(4, 1), f0, lr=0.1, times=[1])
    with pytest.raises(ValueError, match="integer step counts"):
        predict(K, None, torch.ones(4, 1), f0, lr=0.1, times=[1.5])
    with pytest.raises(ValueError, match="class indices"):
        predict(K, None, torch.ones(4, 1), f0, loss="cross_entropy", lr=0.1, times=[1])


# --- spectrum and modes ------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", ["trace", "full"])
def test_ntk_eigh_materialized_and_streamed_agree_with_eigh(kernel):
    from lazyhasty.kernels import mode_residuals, ntk_eigh

    m0, _, x = _pair()
    K = ntk_gram(m0, x, kernel=kernel)
    N = K.shape[0] * (K.shape[1] if kernel == "full" else 1)
    lam, V = torch.linalg.eigh(K.reshape(N, N))
    want = lam.flip(0)[:4]
    got, vecs = ntk_eigh(m0, x, 4, kernel=kernel)
    assert torch.allclose(got, want, rtol=1e-10)
    streamed, svecs = ntk_eigh(m0, x, 4, kernel=kernel, max_bytes=0, block_size=4, tol=1e-14, max_iter=2000)
    assert torch.allclose(streamed, want, rtol=1e-6)
    # eigenvectors up to sign
    assert torch.allclose((svecs.T @ vecs).abs().diagonal(), torch.ones(4, dtype=torch.float64), atol=1e-4)
    with pytest.raises(ValueError, match="r must be an integer"):
        ntk_eigh(m0, x, N + 1, kernel=kernel)
    if kernel == "trace":
        f = torch.randn(x.shape[0], dtype=torch.float64)
        y = torch.randn(x.shape[0], dtype=torch.float64)
        assert torch.allclose(mode_residuals(vecs, f, y), vecs.T @ (f - y))


# --- other views of the same kernel ------------------------------------------------------------------
def test_target_alignment_against_the_definition_and_per_group():
    from lazyhasty.metrics import target_alignment

    m0, _, x = _pair()
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    K = ntk_gram(m0, x, kernel="trace")
    Y = torch.nn.functional.one_hot(y, 3).double()
    for centered in (False, True):
        want = R.kernel_alignment(K, Y @ Y.T, centered=centered)
        assert target_alignment(K, y, centered=centered) == pytest.approx(want, abs=1e-12)
    Kf = ntk_gram(m0, x, kernel="full")
    assert target_alignment(Kf, y) == pytest.approx(
        R.kernel_alignment(Kf, torch.einsum("ia,jb->iajb", Y, Y)), abs=1e-12)
    mask = torch.arange(13) < 6
    per = target_alignment(K, y, groups=mask)
    assert per[True] == pytest.approx(R.kernel_alignment(K[:6, :6], (Y @ Y.T)[:6, :6]), abs=1e-12)
    assert set(per) == {True, False}
    with pytest.raises(ValueError, match="groups must be"):
        target_alignment(K, y, groups=torch.ones(5, dtype=torch.bool))


def test_representation_alignment_feature_gram():
    from lazyhasty.metrics import representation_alignment

    m0, m, x = _pair()
    got = representation_alignment(m, x, m0, gram="features")
    phi = R._features(m, "3", "input", x, torch.device("cpu"))
    phi0 = R._features(m0, "3", "input", x, torch.device("cpu"))
    A, B = phi.T @ phi, phi0.T @ phi0
    assert got == pytest.approx(float((A * B).sum() / (A.norm() * B.norm())), abs=1e-12)
    assert got != pytest.approx(representation_alignment(m, x, m0), abs=1e-6)  # not the example Gram
    with pytest.raises(ValueError, match="gram must be"):
        representation_alignment(m, x, m0, gram="both")


def test_alpha_scaled_forked_at_a_checkpoint():
    from lazyhasty.regimes import AlphaScaled

    m0, m, x = _pair()
    lazy = AlphaScaled(copy.deepcopy(m0), 100.0, at=m.state_dict())
    with torch.no_grad():
        assert torch.allclose(lazy(x), m(x))  # f_alpha = f_{theta_t} at the fork
        assert all(torch.equal(a, b) for a, b in zip(lazy.f0.parameters(), m.parameters()))
    again = AlphaScaled(copy.deepcopy(m0), 10.0, at=lazy.state_dict())  # an AlphaScaled state_dict
    assert all(torch.equal(a, b) for a, b in zip(again.model.parameters(), m.parameters()))
    with pytest.raises(ValueError, match="does not match"):
        AlphaScaled(copy.deepcopy(m0), 10.0, at={"nope": torch.zeros(1)})


def test_kernel_change_and_parameter_distance_in_the_trainer(tmp_path):
    from lazyhasty.data import yinyang
    from lazyhasty.train import TrainConfig, Trainer

    m0, m, x = _pair()
    ref = NTKReference.capture(m0, x, kernel="trace")
    got = ref.measure(m)
    K, K0 = ntk_gram(m, x, kernel="trace"), ntk_gram(m0, x, kernel="trace")
    assert got["ntk_rel_change"] == pytest.approx(float((K - K0).norm() / K0.norm()), rel=1e-9)
    assert ref.measure(m0)["ntk_rel_change"] == pytest.approx(0.0, abs=1e-7)
    torch.manual_seed(0)
    ds = yinyang(64, seed=0)
    net = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 1))
    run = Trainer(net, ds, TrainConfig(steps=20, lr=0.5, loss="logistic", log_every=10), tmp_path / "r",
                  probe_set=ds[:20]).fit()
    first, last = run.rows[0], run.rows[-1]
    assert first["param_distance"] == 0.0 and first["ntk_rel_change"] == pytest.approx(0.0, abs=1e-6)
    assert last["param_distance"] > 0 and last["ntk_rel_change"] > 0


@pytest.mark.parametrize("kernel", ["trace", "full"])
@pytest.mark.parametrize("implementation", ["auto", "jacobian"])
def test_by_layer_kernels_sum_to_the_kernel_and_match_each_group(kernel, implementation):
    m0, m, x = _pair()
    parts = ntk_gram(m0, x, kernel=kernel, by_layer=True, block_size=5, implementation=implementation)
    assert set(parts) == {"0", "3"}  # the modules owning parameters
    assert torch.allclose(sum(parts.values()), ntk_gram(m0, x, kernel=kernel), atol=1e-12)
    # one group = the kernel over that group's parameters only
    only = copy.deepcopy(m0)
    only[3].requires_grad_(False)
    assert torch.allclose(parts["0"], ntk_gram(only, x, kernel=kernel), atol=1e-12)
    per = ntk_alignment(m, x, m0, kernel=kernel, by_layer=True, block_size=5, implementation=implementation)
    ref = ntk_gram(m, x, kernel=kernel, by_layer=True)
    for name in ("0", "3"):
        assert per[name] == pytest.approx(R.kernel_alignment(ref[name], parts[name]), abs=1e-12)
    with pytest.raises(ValueError, match="by_layer"):
        ntk_gram(m0, x, kernel="diagonal", by_layer=True)


def test_trainer_logs_mode_residuals(tmp_path):
    import json

    from lazyhasty.data import yinyang
    from lazyhasty.experiments.modes import times_to_eps
    from lazyhasty.train import TrainConfig, Trainer

    torch.manual_seed(0)
    ds = yinyang(40, seed=0)
    ds = type(ds)(ds.x, ds.y.float() * 2 - 1, name="yy")
    net = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 1))
    init = copy.deepcopy(net)
    run = Trainer(net, ds, TrainConfig(steps=200, lr=0.5, loss="mse", log_every=20, probe_every=0, modes=5),
                  tmp_path / "r", probe_set=ds).fit()
    lam = json.loads((tmp_path / "r" / "modes.json").read_text())["eigenvalues"]
    K0 = ntk_gram(init, ds.x, kernel="trace").double()
    want_lam, V = torch.linalg.eigh(K0)
    assert torch.allclose(torch.tensor(lam, dtype=torch.float64), want_lam.flip(0)[:5], rtol=1e-5)
    with torch.no_grad():
        r0 = V.flip(1)[:, :5].T @ (init(ds.x).double()[:, 0] - ds.y.double())
    got0 = torch.tensor([run.rows[0][f"mode/{i}"] for i in range(5)], dtype=torch.float64)
    assert torch.allclose(got0.abs(), r0.abs(), rtol=1e-4, atol=1e-6)  # eigenvectors up to sign
    # the top mode is learned: its residual shrinks
    assert abs(run.rows[-1]["mode/0"]) < 0.8 * abs(run.rows[0]["mode/0"])
    t = times_to_eps(run, 5, 0.8)
    assert np.isfinite(t[0]) and t[0] > 0
    with pytest.raises(ValueError, match="modes"):
        TrainConfig(steps=1, lr=0.1, modes=-1).validate()


@pytest.mark.parametrize("kernel", ["trace", "full"])
def test_kernel_matvec_equals_the_explicit_product(kernel):
    from lazyhasty.kernels import kernel_matvec

    m0, _, x = _pair()
    K = ntk_gram(m0, x, kernel=kernel)
    N = K.shape[0] * (K.shape[1] if kernel == "full" else 1)
    Q = torch.randn(N, 3, dtype=torch.float64)
    for bs in (None, 4):
        got = kernel_matvec(m0, x, Q, kernel=kernel, block_size=bs, max_cache_bytes=0 if bs else 1 << 30)
        assert torch.allclose(got, K.reshape(N, N) @ Q, atol=1e-10)
    with pytest.raises(ValueError, match="rows"):
        kernel_matvec(m0, x, Q[:-1], kernel=kernel)


def test_trainer_tracks_the_linearized_twin(tmp_path):
    from lazyhasty.data import yinyang
    from lazyhasty.train import TrainConfig, Trainer

    torch.manual_seed(0)
    ds = yinyang(48, seed=0)
    ds = type(ds)(ds.x, ds.y.float() * 2 - 1, name="yy")

    def fit(alpha, d):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 1))
        cfg = TrainConfig(steps=60, lr=0.1, alpha=alpha, loss="mse", log_every=20, probe_every=0,
                          track_linearized=True)
        return Trainer(net, ds, cfg, tmp_path / d, probe_set=ds).fit()

    lazy, rich = fit(1000.0, "lazy"), fit(1.0, "rich")
    assert lazy.rows[0]["lin_distance"] == 0.0 and rich.rows[0]["lin_distance"] == 0.0
    # alpha -> infinity is the linearized model: the lazy run stays on it, the rich one leaves it
    assert lazy.rows[-1]["lin_distance"] < 0.05 * rich.rows[-1]["lin_distance"]
    assert rich.rows[-1]["lin_distance"] > 1e-3
    ck = torch.load(tmp_path / "lazy" / "checkpoint.pt", weights_only=True)
    assert "linearized" in ck and "lin_optimizer" in ck


def test_compare_regimes_forks_a_regime_from_a_saved_step(tmp_path):
    from lazyhasty.data import yinyang
    from lazyhasty.train import TrainConfig, compare_regimes

    torch.manual_seed(0)
    ds = yinyang(48, seed=0)
    net = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 1))
    cfg = TrainConfig(steps=20, lr=0.5, loss="logistic", log_every=5, probe_every=0)
    rich, lazy = compare_regimes(net, ds, cfg, tmp_path, alphas=(1.0, 100.0), fork_from=(1.0, 10))
    assert (tmp_path / "alpha=1" / "snapshots" / "step-10.pt").exists()
    assert lazy.name == "alpha=100" and lazy.path.name == "alpha=100-fork10"
    at10 = next(r for r in rich.rows if r["step"] == 10)
    # it starts there (f_0 + 100 (f - f_0) with f = f_0 vs f_0 + (f - f_0): float32 rounding apart)
    assert lazy.rows[0]["train_loss"] == pytest.approx(at10["train_loss"], rel=1e-6)
    assert lazy.rows[0]["train_loss"] < rich.rows[0]["train_loss"]
    with pytest.raises(ValueError, match="not one of alphas"):
        compare_regimes(net, ds, cfg, tmp_path / "b", alphas=(1.0, 100.0), fork_from=(5.0, 10))
    with pytest.raises(ValueError, match="snapshot_steps"):
        TrainConfig(steps=3, lr=0.1, snapshot_steps=(-1,)).validate()
