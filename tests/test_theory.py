"""The quadratic model's closed forms against simulated gradient flow, and the paper's three examples."""
import numpy as np
import pytest

pytest.importorskip("scipy", reason="the quadratic model's gradient-flow checks need scipy (pip install 'lazyhasty[theory]')")

from lazyhasty.theory import QuadraticModel, at_equal_group_mse, example1, example2, example3, figure4

TIMES = [0.0, 0.3, 1.0, 3.0, 10.0, 40.0]


def _problem(kind):
    rng = np.random.default_rng({"wide": 0, "tall": 1, "rank-deficient": 2}[kind])
    if kind == "wide":        # d > n
        X = rng.normal(size=(4, 7))
    elif kind == "tall":      # d < n
        X = rng.normal(size=(7, 4))
    else:                     # rank 2
        X = rng.normal(size=(6, 2)) @ rng.normal(size=(2, 5))
    y = rng.normal(size=X.shape[0])
    w0 = rng.uniform(0.2, 0.7, size=X.shape[1])
    return QuadraticModel(X, y, w0=w0)


@pytest.mark.parametrize("kind", ["wide", "tall", "rank-deficient"])
@pytest.mark.parametrize("regime", ["nonlinear", "linear"])
def test_closed_form_matches_gradient_flow(kind, regime):
    qm = _problem(kind)
    closed = qm.theta_nonlinear(TIMES) if regime == "nonlinear" else qm.theta_linear(TIMES)
    sim = qm.simulate(TIMES, regime)
    rel = np.linalg.norm(closed - sim, axis=1) / np.linalg.norm(sim, axis=1)
    assert rel.max() <= 1e-6
    # and both converge to theta*, which solves the normal equations on the row space
    late = qm.theta_nonlinear(1e4) if regime == "nonlinear" else qm.theta_linear(1e4)
    assert np.allclose(late, qm.theta_star, atol=1e-6)


def test_theta_star_and_sign_convention():
    qm = _problem("rank-deficient")
    assert np.all(qm.y_modes >= 0)
    X, y = qm.X, qm.y
    assert np.allclose(X.T @ X @ qm.theta_star, X.T @ y, atol=1e-9)
    # the null-space component stays at its initial value (footnote 4)
    null = qm.V[:, qm.rank:]
    theta0 = qm.V @ qm.theta0_modes
    assert np.allclose(null.T @ qm.theta_star, null.T @ theta0)
    r = qm.rank
    assert np.allclose(qm.X @ qm.V[:, :r], qm.U[:, :r] * np.sqrt(qm.mu[:r]))  # flips kept u, v paired


def test_theta_star_zero_mode_uses_the_second_case():
    # a mode in X's row space with y_lambda = 0 decays as theta0 / (1 + 2 mu theta0 t)
    X = np.diag([2.0, 1.0])
    y = np.array([1.0, 0.0])
    qm = QuadraticModel(X, y, w0=0.5)
    th = qm.theta_modes([0.0, 1.0, 5.0])
    lam = int(np.argmin(qm.y_modes))
    assert np.allclose(th[:, lam], 0.125 / (1 + 2 * qm.mu[lam] * 0.125 * np.array([0.0, 1.0, 5.0])))
    assert np.allclose(qm.simulate([0.0, 1.0, 5.0]), qm.theta_nonlinear([0.0, 1.0, 5.0]), atol=1e-8)


def test_example1_order_reverses():
    ex = example1()
    t_nl = ex.model.example_times(0.05, "nonlinear")
    t_lin = ex.model.example_times(0.05, "linear")
    assert np.all(np.isfinite(t_nl)) and np.all(np.isfinite(t_lin))
    assert np.all(np.diff(t_nl) < 0)   # non-linear: high index (large y~ = mu_{n-i+1}) first
    assert np.all(np.diff(t_lin) > 0)  # linear: low index (large mu_i) first


def test_example2_nonlinear_learns_clean_first():
    ex = example2()
    for level in (0.7, 0.5, 0.3):
        noisy = at_equal_group_mse(ex, "clean", "noisy", level)
        assert noisy["nonlinear"] > noisy["linear"]
    noisy = at_equal_group_mse(ex, "clean", "noisy", 0.3)
    assert noisy["nonlinear"] > 1.0  # noisy examples pushed the wrong way (initial MSE ~ 1)


def test_example3_nonlinear_prioritizes_the_spurious_feature():
    ex = example3()
    for level in (0.7, 0.5, 0.3):
        minority = at_equal_group_mse(ex, "spurious", "no spur.", level)
        assert minority["nonlinear"] > minority["linear"]


def test_sequentialization_as_sigma_goes_to_zero():
    # eq. 15: when mode lam reaches eps-convergence, faster modes (larger y~) are done and slower ones
    # have not moved, more and more sharply as the initialization scale sigma -> 0
    mu = np.array([3.0, 2.0, 1.0])
    ratios_fast, ratios_slow = [], []
    for sigma in (1e-2, 1e-5, 1e-9, 1e-14):
        qm = QuadraticModel(np.diag(np.sqrt(mu)), np.ones(3), w0=np.sqrt(sigma))
        order = np.argsort(-qm.y_tilde[:3])
        fast, mid, slow = order
        t = qm.exact_convergence_times(0.05)[mid]
        th = qm.theta_modes(t)
        ratios_fast.append(th[fast] / qm.theta_star_modes[fast])
        ratios_slow.append(th[slow] / qm.theta_star_modes[slow])
    assert ratios_fast[-1] > 0.999 and np.all(np.diff(ratios_fast) > 0)
    # the slower mode vanishes like sigma^(1 - y~'/y~) (here sigma^0.29)
    assert ratios_slow[-1] < 5e-3 and np.all(np.diff(ratios_slow) < 0)


def test_convergence_time_asymptotics_match_exact_times():
    qm = QuadraticModel(np.diag([2.0, 1.5, 1.0]), np.array([1.0, 2.0, 0.5]), w0=np.sqrt(1e-8))
    eps = 1e-6
    approx = qm.convergence_times(eps)
    for regime in ("nonlinear", "linear"):
        exact = qm.exact_convergence_times(eps, regime)
        assert np.allclose(approx[regime], exact, rtol=1e-3)
    # the paper's ratio statements
    m = qm.learnable_modes()
    nl = approx["nonlinear"][m]
    assert np.allclose(nl[0] / nl[1] * np.log(qm.theta_star_modes[m][1] ** 2 / (eps * 5e-9))
                       / np.log(qm.theta_star_modes[m][0] ** 2 / (eps * 5e-9)), qm.y_tilde[m][1] / qm.y_tilde[m][0])


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        QuadraticModel(np.ones(3), np.ones(3), w0=1.0)
    with pytest.raises(ValueError, match=r"y must be"):
        QuadraticModel(np.ones((3, 2)), np.ones(2), w0=1.0)
    with pytest.raises(ValueError, match="finite"):
        QuadraticModel(np.full((2, 2), np.nan), np.ones(2), w0=1.0)
    qm = _problem("wide")
    with pytest.raises(ValueError, match="regime"):
        qm.theta_modes(1.0, "lazy")
    with pytest.raises(ValueError, match="times"):
        qm.theta_nonlinear(-1.0)
    with pytest.raises(ValueError, match="eps"):
        qm.convergence_times(0.0)
    with pytest.raises(ValueError, match="q must"):
        example2(n=6, q=3)


def test_figure4_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    data = figure4(tmp_path / "fig4.png", num=50)
    assert (tmp_path / "fig4.png").stat().st_size > 10_000
    assert len(data) == 3
