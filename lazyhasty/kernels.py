"""The tangent kernel as an instrument: predictions of lazy training, spectra and modes.

Training `L = (1/n) sum_i l(f(x_i), y_i)` (the Trainer's loss: a mean of per-example losses) with
gradient descent at learning rate `eta`, the linearized model (the alpha -> infinity regime) moves in
function space by `f_{s+1} = f_s - (eta / n) K (dl/df)(f_s)` on the training points and
`f_test <- f_test - (eta / n) K_test,train (dl/df)(f_s)` elsewhere, `K` the NTK at init. For MSE
(`l = |f - y|^2 / 2`) it is solved in the eigenbasis `K = V diag(lambda) V^T`:

    gradient flow (time t in steps):  f_t - y = V exp(-eta lambda t / n) V^T (f_0 - y)
    gradient descent (s steps):       f_s - y = V (1 - eta lambda / n)^s V^T (f_0 - y)
    test points:                      f_t(x) = f_0(x) - K(x, X) V diag((1 - phi_t(lambda)) / lambda) V^T (f_0 - y)

(`phi_t` the training factor above; `(1 - phi) / lambda` -> `eta t / n` as lambda -> 0). Cross-entropy
has no closed form: gradient descent is iterated exactly, gradient flow integrated by RK4.

Example:
    >>> K = ntk_gram(model, x_train, kernel="full")                    # [n, k, n, k]
    >>> Kx = ntk_gram(model, x_test, loader2=x_train, kernel="full")   # [m, k, n, k]
    >>> out = predict(K, Kx, y_train, model(x_train), model(x_test), loss="mse", lr=0.1, times=[0, 10, 100])
    >>> out["loss_train"]   # [3, n] per-example losses of the linearized model after 0, 10, 100 steps
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ._outputs import tensor_output
from ._probing import probing

F64 = torch.float64
LOSSES = ("mse", "cross_entropy")


def _flat_kernel(K: torch.Tensor, n: int, k: int, name: str, m: int | None = None) -> tuple[torch.Tensor, bool]:
    """``[rows, cols]`` float64 and whether it is per output (``[n, n]``, the same for every output)."""
    rows = n if m is None else m
    if not isinstance(K, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(K).__name__}")
    if K.dim() == 2 and K.shape == (rows, n):
        return K.to(F64), True
    if K.dim() == 4 and K.shape == (rows, k, n, k):
        return K.to(F64).reshape(rows * k, n * k), False
    raise ValueError(f"{name} must be [{rows}, {n}] (one kernel for every output) or [{rows}, {k}, {n}, {k}], got "
                     f"{tuple(K.shape)}")


def _targets(y: torch.Tensor, n: int, k: int, loss: str) -> torch.Tensor:
    y = torch.as_tensor(y)
    if y.shape[0] != n:
        raise ValueError(f"y has {y.shape[0]} rows, the training kernel {n}")
    if y.dim() == 1 and not y.is_floating_point():  # class indices
        if int(y.min()) < 0 or int(y.max()) >= k:
            raise ValueError(f"class labels must lie in 0..{k - 1}")
        return F.one_hot(y.long(), k).to(F64)
    if loss == "cross_entropy":
        raise ValueError("cross_entropy needs class indices y [n] (long)")
    return y.to(F64).reshape(n, k)


def _losses(f: torch.Tensor, Y: torch.Tensor, loss: str) -> torch.Tensor:
    if loss == "mse":
        return ((f - Y) ** 2).sum(-1) / 2
    return -(Y * torch.log_softmax(f, -1)).sum(-1)


def _factors(lam: torch.Tensor, t: float, lr: float, n: int, dynamics: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``phi`` (the residual's factor) and ``psi = (1 - phi) / lambda`` (the test points'), per eigenvalue."""
    c = lr * lam / n  # per-step rate
    if dynamics == "flow":
        a = c * t
        phi = torch.exp(-a)
        # (1 - e^{-a}) / lambda = (eta t / n) (1 - e^{-a}) / a, continuous at a = 0
        ratio = torch.where(a.abs() > 1e-12, -torch.expm1(-a) / torch.where(a == 0, 1.0, a), 1.0 - a / 2)
        return phi, (lr * t / n) * ratio
    phi = torch.pow(1.0 - c, t)
    small = c.abs() <= 1e-12
    psi = torch.where(small, lr * t / n, (1.0 - phi) / torch.where(small, 1.0, lam))
    return phi, psi


def predict(K_train: torch.Tensor, K_test_train: torch.Tensor | None, y: torch.Tensor, f0_train: torch.Tensor,
            f0_test: torch.Tensor | None = None, *, loss: str = "mse", lr: float, times: Sequence[float],
            dynamics: str = "gd", y_test: torch.Tensor | None = None, rk4_step: float | None = None) -> dict:
    """Outputs and per-example losses of the linearized model trained from `f0` with kernel `K_train`.

    Args:
        K_train: `[n, k, n, k]` (the full NTK) or `[n, n]` (one kernel for every output, e.g. the trace
            kernel over k when outputs are exchangeable).
        K_test_train: `[m, k, n, k]` / `[m, n]`, or None.
        y: `[n, k]` targets (MSE) or `[n]` class indices (one-hot for MSE).
        f0_train: `[n, k]`, the model's outputs at init on the training points.
        f0_test: `[m, k]`, the model's outputs at init on the test points.
        loss: `"mse"` or `"cross_entropy"`.
        lr: the step size of `L = mean_i l_i`.
        times: steps (`dynamics="gd"`: integers, discrete gradient descent) or continuous time in steps
            (`"flow"`: gradient flow).
        dynamics: `"gd"` or `"flow"`.
        y_test: labels of the test points, for their losses.
        rk4_step: the RK4 step of cross-entropy gradient flow.

    Returns:
        `{"times": [T], "f_train": [T, n, k], "loss_train": [T, n], "f_test": [T, m, k], "loss_test": [T, m]}`
        (float64; test entries only when given).

    Raises:
        ValueError: an unknown `loss` or `dynamics`, or shapes that do not match.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if dynamics not in ("gd", "flow"):
        raise ValueError(f"dynamics must be 'gd' (gradient descent) or 'flow' (gradient flow), got {dynamics!r}")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    times = [float(t) for t in times]
    if not times or any(t < 0 or not math.isfinite(t) for t in times):
        raise ValueError("times must be a non-empty list of non-negative numbers")
    if dynamics == "gd" and any(t != int(t) for t in times):
        raise ValueError("gradient descent takes integer step counts in times (use dynamics='flow' otherwise)")
    f0 = torch.as_tensor(f0_train).detach().to(F64)
    n = f0.shape[0]
    f0 = f0.reshape(n, -1)
    k = f0.shape[1]
    Kf, per_output = _flat_kernel(K_train, n, k, "K_train")
    Y = _targets(y, n, k, loss).to(Kf.device)
    f0 = f0.to(Kf.device)
    test = K_test_train is not None
    if not test and (f0_test is not None or y_test is not None):
        given = " and ".join(n for n, v in (("f0_test", f0_test), ("y_test", y_test)) if v is not None)
        raise ValueError(f"{given} given without K_test_train: the test predictions need the [m, n] (or "
                         "[m, k, n, k]) kernel between test and training points; pass K_test_train, or drop "
                         f"{given}")
    if test:
        if f0_test is None:
            raise ValueError("f0_test is needed with K_test_train")
        g0 = torch.as_tensor(f0_test).detach().to(F64).to(Kf.device)
        m = g0.shape[0]
        g0 = g0.reshape(m, k)
        Kx, px = _flat_kernel(K_test_train, n, k, "K_test_train", m)
        if px != per_output:
            raise ValueError("K_train and K_test_train must both be full ([.., k, .., k]) or both per output")
        Yt = None if y_test is None else _targets(y_test, m, k, loss).to(Kf.device)
    if not bool(torch.isfinite(Kf).all()):
        raise ValueError("K_train has NaN/inf entries")
    asym = float((Kf - Kf.T).abs().max())
    if asym > 1e-6 * float(Kf.abs().max()):
        raise ValueError(f"K_train is not symmetric (max |K - K^T| = {asym:.3g})")
    lam, V = torch.linalg.eigh((Kf + Kf.T) / 2)
    if float(lam.min()) < -1e-6 * max(float(lam.max()), 1e-300):
        raise ValueError(f"K_train is not positive semi-definite (smallest eigenvalue {float(lam.min()):.3g}): "
                         "not a tangent kernel")
    lam = lam.clamp(min=0.0)

    def residual_basis(R):  # [n, k] -> coefficients in the eigenbasis
        return V.T @ (R if per_output else R.reshape(-1))

    def from_basis(C):
        out = V @ C
        return out if per_output else out.reshape(n, k)

    out = {"times": torch.tensor(times, dtype=F64)}
    fs, gs = [], []
    if loss == "mse":
        c0 = residual_basis(f0 - Y)
        for t in times:
            phi, psi = _factors(lam, t, float(lr), n, dynamics)
            scale = (lambda v: v[:, None]) if per_output else (lambda v: v)
            fs.append(Y + from_basis(scale(phi) * c0))
            if test:
                step = from_basis(scale(psi) * c0)
                gs.append(g0 - (Kx @ step if per_output else (Kx @ step.reshape(-1)).reshape(m, k)))
    else:
        fs, gs = _cross_entropy(Kf, Kx if test else None, per_output, f0, g0 if test else None, Y, float(lr), n, k,
                                times, dynamics, rk4_step, lam)
    out["f_train"] = torch.stack(fs)
    out["loss_train"] = _losses(out["f_train"], Y, loss)
    if test:
        out["f_test"] = torch.stack(gs)
        if Yt is not None:
            out["loss_test"] = _losses(out["f_test"], Yt, loss)
    return out


def _cross_entropy(Kf, Kx, per_output, f0, g0, Y, lr, n, k, times, dynamics, rk4_step, lam):
    """Cross-entropy: exact gradient-descent iterations, or RK4 on the gradient flow."""
    def apply(Km, G):  # K (dl/df) for [n, k] gradients
        return Km @ G if per_output else (Km @ G.reshape(-1)).reshape(-1, k)

    def grad(f):
        return torch.softmax(f, -1) - Y

    order = sorted(range(len(times)), key=lambda i: times[i])
    fs, gs = [None] * len(times), [None] * len(times)
    f, g, t = f0.clone(), None if g0 is None else g0.clone(), 0.0
    if dynamics == "gd":
        for i in order:
            while t < times[i]:
                G = grad(f)
                f = f - (lr / n) * apply(Kf, G)
                if g is not None:
                    g = g - (lr / n) * apply(Kx, G)
                t += 1
            fs[i], gs[i] = f.clone(), None if g is None else g.clone()
        return fs, gs
    # gradient flow: the softmax Hessian is at most 1/2, so the stiffest rate is eta lambda_max / (2 n)
    h_max = rk4_step or min(1.0, 1.0 / max(lr * float(lam.max()) / (2 * n), 1e-12))

    def rhs(f):
        G = grad(f)
        return -(lr / n) * apply(Kf, G), None if g is None else -(lr / n) * apply(Kx, G)

    for i in order:
        while t < times[i] - 1e-12:
            h = min(h_max, times[i] - t)
            k1, l1 = rhs(f)
            k2, l2 = rhs(f + h / 2 * k1)
            k3, l3 = rhs(f + h / 2 * k2)
            k4, l4 = rhs(f + h * k3)
            f = f + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
            if g is not None:
                g = g + h / 6 * (l1 + 2 * l2 + 2 * l3 + l4)
            t += h
        fs[i], gs[i] = f.clone(), None if g is None else g.clone()
    return fs, gs


def mode_residuals(eigvecs: torch.Tensor, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Residuals `f - y` projected on kernel eigenvectors: `V^T (f - y)`.

    Args:
        eigvecs: `[n, r]`, columns the eigenvectors of an `[n, n]` kernel (e.g. from
            [ntk_eigh][lazyhasty.kernels.ntk_eigh]).
        f: `[n]` or `[n, k]` outputs.
        y: `[n]` or `[n, k]` targets (class indices are one-hot encoded for `[n, k]` outputs).

    Returns:
        `[r]` (or `[r, k]` per output) float64 coefficients.

    Raises:
        ValueError: `eigvecs` is not `[n, r]`.

    Example:
        >>> V = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0]   # an orthonormal basis [n, n]
        >>> f, y = torch.randn(6), torch.zeros(6)
        >>> torch.allclose(mode_residuals(V, f, y).norm(), f.double().norm())   # V orthonormal: |V^T r| = |r|
        True
    """
    f = torch.as_tensor(f).detach().to(F64)
    n = f.shape[0]
    if eigvecs.dim() != 2 or eigvecs.shape[0] != n:
        raise ValueError(f"eigvecs must be [n, r] with n = {n}, got {tuple(eigvecs.shape)}")
    y = torch.as_tensor(y)
    if f.dim() == 2 and y.dim() == 1 and not y.is_floating_point():
        y = F.one_hot(y.long(), f.shape[1])
    y = y.to(F64).reshape(f.shape)
    return eigvecs.to(F64).T @ (f - y.to(f.device))


class NotConverged(ArithmeticError):
    """[ntk_eigh][lazyhasty.kernels.ntk_eigh] did not reach its tolerance (`on_unconverged="raise"`).

    Attributes:
        result: the [Eigenpairs][lazyhasty.kernels.Eigenpairs] it has.
    """

    def __init__(self, message: str, result: "Eigenpairs"):
        super().__init__(message)
        self.result = result


class Eigenpairs(tuple):
    """`(values, vectors)` of [ntk_eigh][lazyhasty.kernels.ntk_eigh], a pair with how far it is from exact.

    Attributes:
        values: `[r]` descending.
        vectors: `[N, r]`, orthonormal columns.
        residuals: `[r]`, `||K v_i - lambda_i v_i|| / lambda_1` (float64): a vector's angle to the true
            eigenspace is at most about `residual * lambda_1 / gap` and its value's error about
            `residual^2 lambda_1^2 / gap`, with `gap` the distance to the nearest other eigenvalue.
        converged: every residual is within `tol`.
        iterations: subspace iterations run (0: from the materialized kernel).
    """

    def __new__(cls, values, vectors, residuals, converged: bool, iterations: int):
        self = super().__new__(cls, (values, vectors))
        self.values, self.vectors, self.residuals = values, vectors, residuals
        self.converged, self.iterations = bool(converged), int(iterations)
        return self

    def __getnewargs__(self):
        return (self.values, self.vectors, self.residuals, self.converged, self.iterations)


def _residuals(KV: torch.Tensor, V: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    scale = float(lam.abs().max()) or 1.0
    return (KV - V * lam).norm(dim=0) / scale


@probing("model")  # named inputs and output= (lazyhasty._outputs)
def ntk_eigh(model, loader, r: int, *, kernel: str = "trace", max_bytes: int = 1 << 30, block_size: int | None = None,
             dtype: torch.dtype | None = None, tol: float = 1e-10, max_iter: int = 200, seed: int = 0,
             on_unconverged: str = "warn", **ntk_options) -> Eigenpairs:
    """Top-`r` eigenpairs `(values [r] descending, vectors [N, r])` of the NTK on the probe set.

    `kernel="trace"`: the `[n, n]` trace kernel (`N = n`); `"full"`: the `[nk, nk]` kernel
    (`N = n k`). From the materialized kernel (`torch.linalg.eigh`) while it fits `max_bytes`; otherwise
    by block subspace iteration with Rayleigh-Ritz on streamed kernel-vector products `K V` formed tile by
    tile ([kernel_matvec][lazyhasty.kernels.kernel_matvec]), never holding the `N x N` matrix. The iteration
    stops when every Ritz
    pair's residual `||K v_i - lambda_i v_i||` is within `tol * lambda_1` (the products of the last
    iteration give the residuals at no extra cost).

    Args:
        model: the network (its NTK at its current parameters).
        loader: the probe inputs: a tensor `[n, ...]` or a loader of batches.
        r: how many eigenpairs, `1 <= r <= N`.
        kernel: `"trace"` or `"full"`.
        max_bytes: materialize the float64 kernel when `8 N^2` fits.
        block_size: as [ntk_gram][lazyhasty.ntk.ntk_gram].
        dtype: as [ntk_gram][lazyhasty.ntk.ntk_gram].
        **ntk_options: as [ntk_gram][lazyhasty.ntk.ntk_gram].
        tol: relative residual `||K v - lambda v|| / lambda_1` every pair must reach (subspace iteration).
        max_iter: at most this many subspace iterations.
        seed: of the random start block.
        on_unconverged: `"warn"` (a `RuntimeWarning` with the residuals) or `"raise"`
            ([NotConverged][lazyhasty.kernels.NotConverged]) when `max_iter` ran out before `tol`.

    Returns:
        [Eigenpairs][lazyhasty.kernels.Eigenpairs]: unpacks as `(values, vectors)`; `.residuals` `[r]`, `.converged`,
        `.iterations` say how close they are.

    Raises:
        ValueError: a bad `kernel`, `r`, `tol`, `max_iter` or `on_unconverged`.
        NotConverged: with `on_unconverged="raise"`, when the tolerance was not reached.

    Example:
        >>> lam, V = ntk_eigh(net, x, 8, max_bytes=0)  # streamed
        >>> res = ntk_eigh(net, x, 8, max_bytes=0, on_unconverged="raise")
        >>> res.converged, float(res.residuals.max()) <= 1e-10
        (True, True)
    """
    from ._loaders import all_inputs, model_device, model_inputs
    from ._modes import measuring
    from ._validate import check_model_inputs
    from .ntk import ntk_gram

    if kernel not in ("trace", "full"):
        raise ValueError(f"kernel must be 'trace' or 'full', got {kernel!r}")
    if on_unconverged not in ("warn", "raise"):
        raise ValueError(f"on_unconverged must be 'warn' or 'raise', got {on_unconverged!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
        raise ValueError(f"tol must be a number > 0, got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    check_model_inputs(None, model=model)
    x = model_inputs(all_inputs(loader, model_device(model)), model)
    check_model_inputs(x, model=model)
    n = x.shape[0]
    with torch.no_grad(), measuring(model):
        k = int(tensor_output(model(x[:1])).reshape(1, -1).shape[1])
    N = n if kernel == "trace" else n * k
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= N:
        raise ValueError(f"r must be an integer in 1..{N} (the kernel's size), got {r!r}")
    if 8 * N * N <= max_bytes:
        K = ntk_gram(model, x, kernel=kernel, block_size=block_size, dtype=dtype, **ntk_options).to(F64)
        K = K.reshape(N, N)
        lam, V = torch.linalg.eigh(K)
        lam, V = lam.flip(0)[:r], V.flip(1)[:, :r]
        return Eigenpairs(lam, V, _residuals(K @ V, V, lam), True, 0)
    from .ntk import KernelOperator

    op = KernelOperator(model, x, kernel=kernel, block_size=block_size, dtype=dtype, **ntk_options)
    result = _subspace_iteration(op, N, r, tol, max_iter, seed, x.device)
    if not result.converged:
        msg = (f"ntk_eigh: the subspace iteration did not reach tol={tol:g} in max_iter={max_iter} iterations: "
               f"relative residuals ||K v - lambda v|| / lambda_1 up to {float(result.residuals.max()):.3g} "
               f"(per pair: {', '.join(f'{float(v):.2g}' for v in result.residuals)}). Raise max_iter, loosen "
               "tol, or materialize the kernel (max_bytes >= 8 N^2).")
        if on_unconverged == "raise":
            raise NotConverged(msg, result)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    return result


def _subspace_iteration(matvec, N, r, tol, max_iter, seed, device) -> Eigenpairs:
    g = torch.Generator().manual_seed(seed)
    p = min(N, r + max(5, r // 2))  # oversampling: the convergence rate is lambda_{p+1} / lambda_r
    Q, _ = torch.linalg.qr(torch.randn(N, p, generator=g, dtype=F64).to(device))
    for it in range(1, max_iter + 1):
        Z = matvec(Q)  # K Q
        H = Q.T @ Z
        lam, W = torch.linalg.eigh((H + H.T) / 2)
        lam, W = lam.flip(0), W.flip(1)
        V, KV = Q @ W[:, :r], Z @ W[:, :r]  # Ritz vectors and K times them, exactly
        res = _residuals(KV, V, lam[:r])
        if float(res.max()) <= tol:
            return Eigenpairs(lam[:r], V, res, True, it)
        Q, _ = torch.linalg.qr(Z @ W)
    return Eigenpairs(lam[:r], V, res, False, max_iter)


@probing("model")  # named inputs and output= (lazyhasty._outputs)
def kernel_matvec(model, loader, Q: torch.Tensor, *, kernel: str = "trace", **ntk_options) -> torch.Tensor:
    """`K Q` for `Q` `[N, p]` (`N = n` trace, `n k` full), over kernel tiles `I <= J`, never the `N x N` kernel.

    [KernelOperator][lazyhasty.ntk.KernelOperator] keeps the block features for repeated products; this
    forms them once per call.

    Args:
        model: the network (its NTK at its current parameters).
        loader: the probe inputs: a tensor `[n, ...]` or a loader of batches.
        Q: `[N, p]` block of vectors.
        kernel: `"trace"` or `"full"`.
        **ntk_options: as [ntk_gram][lazyhasty.ntk.ntk_gram] (`block_size`, `dtype`, ...).

    Returns:
        `[N, p]`, the product `K Q`.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        >>> x = torch.randn(10, 3)
        >>> kernel_matvec(net, x, torch.eye(10)).shape   # K I = K
        torch.Size([10, 10])
    """
    from ._loaders import all_inputs, model_device
    from ._validate import check_model_inputs
    from .ntk import KernelOperator

    check_model_inputs(None, model=model)

    return KernelOperator(model, all_inputs(loader, model_device(model)), kernel=kernel, **ntk_options)(Q)
