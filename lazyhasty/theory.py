"""The paper's quadratic model (section 4), solved exactly in both regimes.

Model: ``f_theta(x) = theta^T x`` with ``theta = 1/2 sum_lambda w_lambda^2 v_lambda`` and loss
``l = 1/2 |X theta - y|^2``, trained by gradient flow ``dw/dt = -grad_w l`` from ``w0`` (given per mode
``v_lambda``). With the SVD ``X = U M V^T`` (signs chosen so that ``y_lambda = u_lambda^T y >= 0``),
``mu_lambda`` the squared singular values, ``y~_lambda = sqrt(mu_lambda) y_lambda``, ``theta0 = w0^2 / 2``:

* non-linear (eq. 12): ``theta_l(t) = theta0 theta* / (theta0 - exp(-2 y~ t) (theta0 - theta*))`` when
  ``theta*_l != 0``; ``theta0 / (1 + 2 mu theta0 t)`` when ``theta*_l = 0``;
* linearized (the first-order Taylor model around ``w0``, whose kernel is ``Sigma(0)``):
  ``theta_l(t) = theta* + exp(-2 mu theta0 t) (theta0 - theta*)``.

The rate of the linearized solution is ``mu (w0)^2 = 2 mu theta0``, the eigenvalue of ``Sigma(0)`` in the
paper's eq. 11; eq. 13 as printed writes ``mu theta0`` (its time unit is half of eq. 12's). lazyhasty
keeps the gradient-flow time of eqs. 10-12 for both regimes, so both can be checked against
[QuadraticModel.simulate][lazyhasty.theory.QuadraticModel.simulate]. ``theta*`` is ``y_l / sqrt(mu_l)`` on
the row space and ``theta0`` on the null space of X (the paper's footnote 4).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REGIMES = ("nonlinear", "linear")


def _as_times(t) -> tuple[np.ndarray, bool]:
    arr = np.asarray(t, dtype=np.float64)
    if np.any(arr < 0) or not np.all(np.isfinite(arr)):
        raise ValueError("times must be finite and >= 0")
    return np.atleast_1d(arr), arr.ndim == 0


class QuadraticModel:
    """Closed-form training dynamics of the quadratic model in both regimes.

    `f_theta(x) = theta^T x` with `theta = 1/2 sum_lambda w_lambda^2 v_lambda`, trained by gradient flow on
    `l = 1/2 |X theta - y|^2` from `w0`; `regime` is `"nonlinear"` (eq. 12) or `"linear"` (eq. 13, in the
    gradient-flow time of eq. 12). Times `t` are a scalar or `[T]`, finite and `>= 0`.

    Args:
        X: `[n, d]` inputs.
        y: `[n]` labels.
        w0: `[d]` initial weights per mode `v_lambda` (a scalar is broadcast; the paper uses
            `w0 = sqrt(sigma) 1`).

    Raises:
        ValueError: `X` is not `[n, d]`, `y` not `[n]`, or an input is not finite.

    Example:
        >>> X, y = np.diag(np.sqrt([3.0, 2.0, 1.0])), np.ones(3)
        >>> qm = QuadraticModel(X, y, w0=np.sqrt(1e-3))
        >>> qm.theta_nonlinear([0.0, 10.0]).shape      # [2, d], input coordinates
        (2, 3)
        >>> qm.errors([5.0], "linear").shape           # [1, n] per-example squared errors
        (1, 3)
        >>> bool(np.allclose(qm.simulate([1.0]), qm.theta_nonlinear([1.0]), rtol=1e-6))   # closed form = ODE
        True
    """

    def __init__(self, X, y, *, w0):
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if X.ndim != 2:
            raise ValueError(f"X must be [n, d], got shape {X.shape}")
        n, d = X.shape
        if y.shape != (n,):
            raise ValueError(f"y must be [n] = [{n}], got shape {y.shape}")
        if not (np.all(np.isfinite(X)) and np.all(np.isfinite(y))):
            raise ValueError("X and y must be finite")
        w0 = np.broadcast_to(np.asarray(w0, dtype=np.float64), (d,)).copy()
        if not np.all(np.isfinite(w0)):
            raise ValueError("w0 must be finite")
        self.X, self.y, self.n, self.d = X, y, n, d
        U, s, Vt = np.linalg.svd(X, full_matrices=True)
        V = Vt.T
        tol = max(n, d) * np.finfo(np.float64).eps * (s[0] if s.size else 0.0)
        r = int(np.sum(s > tol))
        mu = np.zeros(d)
        mu[:r] = s[:r] ** 2
        y_modes = U.T @ y
        # sign convention: y_lambda >= 0, flipping u_lambda and v_lambda together (u alone past d)
        for lam in range(n):
            if y_modes[lam] < 0:
                U[:, lam] *= -1
                y_modes[lam] *= -1
                if lam < d:
                    V[:, lam] *= -1
        self.U, self.V, self.mu, self.rank = U, V, mu, r
        self.y_modes = y_modes  # [n]
        self.y_tilde = np.zeros(d)
        self.y_tilde[:r] = np.sqrt(mu[:r]) * y_modes[:r]
        self.w0 = w0
        self.theta0_modes = w0**2 / 2
        ts = self.theta0_modes.copy()
        ts[:r] = y_modes[:r] / np.sqrt(mu[:r])
        self.theta_star_modes = ts

    # --- closed forms (mode coordinates) ------------------------------------------------------------
    def _modes(self, t, regime: str) -> np.ndarray:
        if regime not in REGIMES:
            raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
        t = t[:, None]
        th0, ths, mu, yt = self.theta0_modes, self.theta_star_modes, self.mu, self.y_tilde
        if regime == "linear":
            return ths + np.exp(-2.0 * mu * th0 * t) * (th0 - ths)
        out = np.empty((t.shape[0], self.d))
        nz = ths != 0
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            e = np.exp(-2.0 * yt[nz] * t)
            out[:, nz] = th0[nz] * ths[nz] / (th0[nz] - e * (th0[nz] - ths[nz]))
            out[:, ~nz] = th0[~nz] / (1.0 + 2.0 * mu[~nz] * th0[~nz] * t)
        return out

    def theta_modes(self, t, regime: str = "nonlinear") -> np.ndarray:
        """theta in the basis v_lambda: ``[T, d]`` (``[d]`` for a scalar t)."""
        tt, scalar = _as_times(t)
        out = self._modes(tt, regime)
        return out[0] if scalar else out

    @property
    def theta_star(self) -> np.ndarray:
        """The common limit ``theta*`` (input coordinates, ``[d]``)."""
        return self.V @ self.theta_star_modes

    def theta_nonlinear(self, t) -> np.ndarray:
        """Prop. 1 (eq. 12), input coordinates: ``[T, d]`` (``[d]`` for a scalar t)."""
        return self.theta_modes(t, "nonlinear") @ self.V.T

    def theta_linear(self, t) -> np.ndarray:
        """The linearized regime (eq. 13, gradient-flow time), input coordinates."""
        return self.theta_modes(t, "linear") @ self.V.T

    def predictions(self, t, regime: str = "nonlinear") -> np.ndarray:
        """``X theta(t)``: ``[T, n]``."""
        return self.theta_modes(t, regime) @ (self.X @ self.V).T

    def errors(self, t, regime: str = "nonlinear") -> np.ndarray:
        """Per-example squared errors ``(x_i^T theta(t) - y_i)^2``: ``[T, n]``."""
        return (self.predictions(t, regime) - self.y) ** 2

    def loss(self, t, regime: str = "nonlinear") -> np.ndarray:
        """``1/2 |X theta(t) - y|^2``: ``[T]``."""
        return 0.5 * self.errors(t, regime).sum(-1)

    # --- convergence times --------------------------------------------------------------------------
    def learnable_modes(self) -> np.ndarray:
        """Indices of modes that move and have ``theta* != 0`` (rows of X's row space with y_l != 0)."""
        return np.flatnonzero((self.mu > 0) & (self.theta_star_modes != 0) & (self.theta0_modes > 0))

    def convergence_times(self, eps: float) -> dict[str, np.ndarray]:
        """Leading-order eps-convergence times of each mode (eq. 14), ``nan`` where undefined.

        For ``eps << theta*`` and ``theta0 << theta*`` (gradient-flow time, see the module docstring):
        non-linear ``t_l = log(theta*^2 / (eps theta0)) / (2 y~)``, linear ``t_l = log(theta* / eps) / (2 mu theta0)``.
        The paper's eq. 14 drops the factor 1/2 and one ``log theta*`` (O(1)); ratios between modes are
        the same: ``y~_l' / y~_l`` non-linear, ``mu_l' theta0_l' / (mu_l theta0_l)`` linear.
        """
        if not eps > 0:
            raise ValueError("eps must be > 0")
        nl = np.full(self.d, np.nan)
        lin = np.full(self.d, np.nan)
        m = self.learnable_modes()
        ts, t0 = np.abs(self.theta_star_modes[m]), self.theta0_modes[m]
        nl[m] = np.log(ts**2 / (eps * t0)) / (2 * self.y_tilde[m])
        lin[m] = np.log(ts / eps) / (2 * self.mu[m] * t0)
        return {"nonlinear": nl, "linear": lin}

    def exact_convergence_times(self, eps: float, regime: str = "nonlinear") -> np.ndarray:
        """First time ``|theta_l(t) - theta*_l| <= eps`` for each mode, by root finding (``nan`` if never;
        ``0`` if already within eps at t = 0)."""
        from scipy.optimize import brentq

        if not eps > 0:
            raise ValueError("eps must be > 0")
        out = np.full(self.d, np.nan)
        for lam in range(self.d):
            gap0 = abs(self.theta0_modes[lam] - self.theta_star_modes[lam])
            if gap0 <= eps:
                out[lam] = 0.0
                continue
            if self.mu[lam] == 0 or self.theta0_modes[lam] == 0:
                continue

            def f(t, lam=lam):
                return abs(self._modes(np.array([t]), regime)[0, lam] - self.theta_star_modes[lam]) - eps

            hi = 1.0
            while f(hi) > 0:
                hi *= 2.0
                if hi > 1e300:
                    break
            if f(hi) <= 0:
                out[lam] = brentq(f, 0.0, hi, xtol=1e-14 * hi, rtol=1e-14, maxiter=500)
        return out

    def example_times(self, threshold: float, regime: str = "nonlinear", t_max: float | None = None,
                      num: int = 4000) -> np.ndarray:
        """Per-example first time the squared error falls below ``threshold`` (``nan`` if not before t_max)."""
        t_max = t_max or 50.0 * float(np.nanmax(self.convergence_times(1e-3)[regime]))
        grid = np.linspace(0.0, t_max, num)
        err = self.errors(grid, regime)
        below = err <= threshold
        first = np.where(below.any(0), below.argmax(0), -1)
        return np.where(first >= 0, grid[np.maximum(first, 0)], np.nan)

    # --- numerical check ---------------------------------------------------------------------------
    def simulate(self, t, regime: str = "nonlinear", *, rtol: float = 1e-11, atol: float = 1e-13) -> np.ndarray:
        """theta(t) (input coordinates, `[T, d]`) from gradient flow on w, integrated numerically.

        `dw/dt = -w0 * V^T X^T (X theta(w) - y)`, by Radau (implicit, stiff-safe) with tight tolerances: the
        check of the closed forms.

        Args:
            t: times, a scalar or `[T]`.
            regime: `"nonlinear"` or `"linear"`.
            rtol: the integrator's relative tolerance.
            atol: the integrator's absolute tolerance.

        Returns:
            `[T, d]` (`[d]` for a scalar t).
        """
        from scipy.integrate import solve_ivp

        if regime not in REGIMES:
            raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
        tt, scalar = _as_times(t)
        X, y, V, w0 = self.X, self.y, self.V, self.w0
        theta0 = V @ self.theta0_modes
        G = V.T @ X.T  # [d, n]

        if regime == "nonlinear":
            def theta(w):
                return V @ (w * w / 2)

            def rhs(_, w):
                return -w * (G @ (X @ theta(w) - y))

            def jac(_, w):
                r = X @ theta(w) - y
                return -(np.diag(G @ r) + (w[:, None] * (G @ X @ V)) * w[None, :])
        else:
            def theta(w):
                return theta0 + V @ (w0 * (w - w0))

            H = w0[:, None] * (G @ X @ V) * w0[None, :]

            def rhs(_, w):
                return -w0 * (G @ (X @ theta(w) - y))

            def jac(_, w):
                return -H
        order = np.argsort(tt)
        sol = solve_ivp(rhs, (0.0, float(tt.max()) if tt.size else 0.0), w0.copy(), method="Radau",
                        t_eval=tt[order], rtol=rtol, atol=atol, jac=jac)
        if not sol.success:
            raise RuntimeError(f"gradient-flow integration failed: {sol.message}")
        W = np.empty((tt.size, self.d))
        W[order] = sol.y.T
        out = np.stack([theta(w) for w in W])
        return out[0] if scalar else out


# --- the paper's examples (section 4.4) -----------------------------------------------------------
@dataclass
class Example:
    """One of the paper's examples: the model and its groups of examples.

    Attributes:
        model: the [QuadraticModel][lazyhasty.theory.QuadraticModel].
        groups: `{name: example indices}`.
        description: what the example shows.
    """

    model: QuadraticModel
    groups: dict[str, np.ndarray]  # name -> example indices
    description: str


def example1(mu=(3.0, 2.5, 2.0, 1.5, 1.0), sigma: float = 1e-2) -> Example:
    """Example 1: one mode per example, `x_i = sqrt(mu_i) e_i`, `y_i = mu_{n-i+1} / sqrt(mu_i)`.

    The linearized model learns example i at rate ~ mu_i (low index first); the non-linear one by
    `y~_i = mu_{n-i+1}` (high index first): linearization reverses the learning order.

    Args:
        mu: the positive, non-increasing eigenvalues, one per example.
        sigma: the initial scale, `w0 = sqrt(sigma)`.

    Returns:
        An [Example][lazyhasty.theory.Example] with groups `"example 1"` .. `"example n"`.

    Raises:
        ValueError: `mu` is not positive and non-increasing.

    Example:
        >>> ex = example1()
        >>> ex.model.n, sorted(ex.groups)[:2]
        (5, ['example 1', 'example 2'])
    """
    mu = np.asarray(mu, dtype=np.float64)
    if np.any(mu <= 0) or np.any(np.diff(mu) > 0):
        raise ValueError("mu must be positive and non-increasing")
    n = mu.size
    X = np.diag(np.sqrt(mu))
    y = mu[::-1] / np.sqrt(mu)
    return Example(QuadraticModel(X, y, w0=np.sqrt(sigma)), {f"example {i + 1}": np.array([i]) for i in range(n)},
                   "one mode per example; order reversed between regimes")


def _labels(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
    return rng.permutation(y)


def _labels_with_flips(n: int, q: int, seed: int):
    """Balanced labels in {-1, +1} and kappa = -1 on q random examples (the minority / noisy ones)."""
    if not 1 <= q < -(-n // 2):
        raise ValueError(f"q must satisfy 1 <= q < ceil(n/2), got q={q}, n={n}")
    y = _labels(n, seed)
    kappa = np.ones(n)
    flipped = np.random.default_rng(seed + 1).choice(n, size=q, replace=False)
    kappa[flipped] = -1.0
    return y, kappa, np.sort(flipped), np.setdiff1d(np.arange(n), flipped)


def example2(n: int = 20, q: int = 3, eta: float = 0.6, sigma: float = 1e-2, seed: int = 0) -> Example:
    """Example 2, label noise: `x_i = kappa_i y_i e_1 + eta e_{i+1}` in R^{n+1}; q examples have kappa = -1.

    The dominant mode fits the labels of the input's class `kappa_i y_i`: learning it first learns the
    clean examples and pushes the noisy ones the wrong way.

    Args:
        n: examples, with balanced labels in {-1, +1}.
        q: noisy examples, `1 <= q < ceil(n / 2)`.
        eta: the scale of each example's own direction.
        sigma: the initial scale, `w0 = sqrt(sigma)`.
        seed: the labels and which examples are noisy.

    Returns:
        An [Example][lazyhasty.theory.Example] with groups `"clean"` and `"noisy"`.

    Raises:
        ValueError: `q` out of range.

    Example:
        >>> ex = example2()
        >>> ex.model.X.shape, len(ex.groups["noisy"])
        ((20, 21), 3)
    """
    y, kappa, noisy, clean = _labels_with_flips(n, q, seed)
    X = np.zeros((n, n + 1))
    X[:, 0] = kappa * y
    X[np.arange(n), np.arange(n) + 1] = eta
    return Example(QuadraticModel(X, y, w0=np.sqrt(sigma)), {"clean": clean, "noisy": noisy}, "label noise")


def example3(n: int = 20, q: int = 3, lam: float = 0.5, eta: float = 0.6, sigma: float = 1e-2,
             seed: int = 0) -> Example:
    """Example 3, spurious feature: `x_i = kappa_i y_i e_1 + lam y_i e_2 + eta e_{i+2}` in R^{n+2}.

    e_2 is the core feature (separates everything), e_1 the spurious one: it agrees with the label on the
    majority (kappa = 1) and disagrees on q minority examples.

    Args:
        n: examples, with balanced labels in {-1, +1}.
        q: minority examples, `1 <= q < ceil(n / 2)`.
        lam: the core feature's scale, in `(0, 1)` (weaker than the spurious one).
        eta: the scale of each example's own direction.
        sigma: the initial scale, `w0 = sqrt(sigma)`.
        seed: the labels and which examples are the minority.

    Returns:
        An [Example][lazyhasty.theory.Example] with groups `"spurious"` (the majority) and `"no spur."`.

    Raises:
        ValueError: `lam` or `q` out of range.
    """
    if not 0 < lam < 1:
        raise ValueError("lam must be in (0, 1)")
    y, kappa, minority, majority = _labels_with_flips(n, q, seed)
    X = np.zeros((n, n + 2))
    X[:, 0] = kappa * y
    X[:, 1] = lam * y
    X[np.arange(n), np.arange(n) + 2] = eta
    return Example(QuadraticModel(X, y, w0=np.sqrt(sigma)),
                   {"spurious": majority, "no spur.": minority}, "spurious correlation")


def half_time(model: QuadraticModel, regime: str) -> float:
    """Time at which the training loss reaches half its initial value (the figures' time unit).

    Args:
        model: the [QuadraticModel][lazyhasty.theory.QuadraticModel].
        regime: `"nonlinear"` or `"linear"`.

    Returns:
        The gradient-flow time `t` with `loss(t) = loss(0) / 2`.
    """
    from scipy.optimize import brentq

    l0 = float(model.loss(0.0, regime))
    target = 0.5 * l0

    def f(t):
        return float(model.loss(t, regime)) - target

    hi = 1.0
    while f(hi) > 0:
        hi *= 2.0
    return brentq(f, 0.0, hi, xtol=1e-12 * hi)


def group_mse(ex: Example, t, regime: str) -> dict[str, np.ndarray]:
    err = ex.model.errors(t, regime)
    return {name: err[:, idx].mean(1) for name, idx in ex.groups.items()}


def at_equal_group_mse(ex: Example, lead: str, other: str, level: float) -> dict[str, float]:
    """MSE of group `other` in both regimes at the time group `lead` reaches `level` x its initial MSE.

    Args:
        ex: the [Example][lazyhasty.theory.Example].
        lead: the group whose progress sets the time.
        other: the group measured.
        level: the fraction of `lead`'s initial MSE, in `(0, 1)`.

    Returns:
        `{"nonlinear": mse, "linear": mse}`.

    Example:
        >>> r = at_equal_group_mse(example2(), "clean", "noisy", 0.1)
        >>> r["nonlinear"] > r["linear"]   # the non-linear regime fits the clean examples at the noisy ones' cost
        True
    """
    from scipy.optimize import brentq

    out = {}
    for regime in REGIMES:
        m0 = group_mse(ex, [0.0], regime)[lead][0]

        def f(t):
            return group_mse(ex, [t], regime)[lead][0] - level * m0

        hi = half_time(ex.model, regime)
        while f(hi) > 0:
            hi *= 2
        out[regime] = float(group_mse(ex, [brentq(f, 0.0, hi)], regime)[other][0])
    return out


def figure4(path, *, examples=None, span: float = 6.0, num: int = 400) -> dict:
    """Draw the paper's Figure 4 (three panels) to `path` (PNG) and return the plotted numbers.

    Each regime's time is divided by its own half-loss time, so both appear at equal progress (the paper's
    axis is "time (arbitrary scale)"). Solid: non-linear; dashed: linear.

    Args:
        path: the PNG written.
        examples: the three [Example][lazyhasty.theory.Example]s (default: `example1()`, `example2()`,
            `example3()`).
        span: the time axis, in half-loss times.
        num: points per curve.

    Returns:
        `{panel title: {regime: {group: curve as a list}}}`, the numbers plotted.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    examples = examples or (example1(), example2(), example3())
    titles = ["Example 1: per-example squared error", "Example 2: clean / noisy MSE",
              "Example 3: spurious / no-spurious MSE"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    data = {}
    s = np.linspace(0.0, span, num)
    for ax, ex, title in zip(axes, examples, titles):
        data[title] = {}
        colors = plt.cm.viridis(np.linspace(0, 0.9, len(ex.groups)))
        for regime, style in (("nonlinear", "-"), ("linear", "--")):
            th = half_time(ex.model, regime)
            curves = group_mse(ex, s * th, regime)
            data[title][regime] = {k: v.tolist() for k, v in curves.items()}
            for (name, curve), c in zip(curves.items(), colors):
                ax.plot(s, curve, style, color=c, label=f"{name} ({'non-linear' if regime == 'nonlinear' else 'linear'})")
        ax.set_title(title)
        ax.set_xlabel("time / time to half the initial loss")
        ax.set_ylabel("squared error" if ex is examples[0] else "MSE")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return data
