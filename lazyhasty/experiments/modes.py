"""Mode by mode: how each regime learns the eigenmodes of the initial tangent kernel (paper section 4).

The paper's quadratic model learns mode lambda at a rate set by the kernel's eigenvalue in the linearized
regime (eq. 13: ``t_lin ~ 1 / (mu_lambda theta0_lambda)``) and by the label's component in the non-linear one
(eq. 14: ``t ~ 1 / (sqrt(mu_lambda) y_lambda)``), one mode after another. Here a 4-layer ReLU MLP is
trained on yin-yang with MSE by full-batch gradient descent at alpha = 1 and alpha = 100 from one init;
every log records the training residual ``f_t - y`` projected on the top-r eigenvectors of ``f_0``'s trace
kernel on the training set (``TrainConfig(modes=r)``), and each mode's time-to-epsilon is the first
logged step where ``|residual| <= eps |residual at 0|``.
"""
from __future__ import annotations

import importlib.util
import json
import time

import numpy as np

from ..data import yinyang
from ..train import TrainConfig, compare_regimes
from .common import Claim, Context, mlp4, register, write_config, write_summary

ALPHAS = (1.0, 100.0)


def _spearman(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return float("nan")
    ra, rb = np.argsort(np.argsort(a[ok])), np.argsort(np.argsort(b[ok]))
    return float(np.corrcoef(ra, rb)[0, 1])


def times_to_eps(run, r: int, eps: float) -> np.ndarray:
    """First logged step where each mode's |residual| falls below eps times its initial value (nan: never)."""
    steps = run.column("step")
    out = np.full(r, np.nan)
    for i in range(r):
        m = np.abs(run.column(f"mode/{i}"))
        below = np.flatnonzero(m <= eps * m[0])
        if below.size and m[0] > 0:
            out[i] = steps[below[0]]
    return out


def _figure(path, per_seed: list[dict], r: int, eps: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for a, style in zip(ALPHAS, ("o-", "s--")):
        ts = np.array([p["time_to_eps"][f"{a:g}"] for p in per_seed], dtype=np.float64)
        mean = np.nanmean(ts, 0) if np.isfinite(ts).any() else np.full(r, np.nan)
        ax.plot(np.arange(r), mean, style, label=f"alpha={a:g} ({'non-linear' if a == 1 else 'linear'})")
        for row in ts:
            ax.plot(np.arange(r), row, ".", alpha=0.3, color=ax.lines[-1].get_color())
    ax.set_xlabel("mode (eigenvalue rank of the initial NTK)")
    ax.set_ylabel(f"steps to {eps:g} of the initial residual")
    ax.set_yscale("log")
    ax.set_title(f"mean over {len(per_seed)} seed(s) (lines) and each seed (points)", fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _aggregate(ctx: Context, seed_dirs, per_seed) -> dict:
    _figure(ctx.path("modes.png"), per_seed, len(per_seed[0]["eigenvalues"]), per_seed[0]["eps"])
    return {"figures": ["modes.png"]}


@register("modes", dict(n_train=int, width=int, lr=float, steps=int, steps_lazy=int, modes=int, eps=float,
                        log_every=int), seeds=10, quick_seeds=2, aggregate=_aggregate)
def run(ctx: Context) -> dict:
    started = time.time()
    n_train = int(ctx.opt("n_train", 100, quick=60))
    width = int(ctx.opt("width", 100, quick=64))
    lr = float(ctx.opt("lr", 0.5))
    steps = {1.0: int(ctx.opt("steps", 4000, quick=1500)), 100.0: int(ctx.opt("steps_lazy", 4000, quick=1500))}
    r = int(ctx.opt("modes", 10, quick=8))
    eps = float(ctx.opt("eps", 0.1))
    log_every = int(ctx.opt("log_every", 10))
    if r < 3:
        raise ValueError("modes must be >= 3 (the claims are rank correlations across modes)")
    write_config(ctx, "modes", {"n_train": n_train, "width": width, "lr": lr, "modes": r, "eps": eps,
                                "steps": {str(k): v for k, v in steps.items()}, "loss": "mse (targets +-1)",
                                "optimizer": "full-batch gradient descent", "log_every": log_every})
    seed = ctx.seed
    ds = yinyang(n_train, seed=seed)
    ds = type(ds)(ds.x, ds.y.float() * 2 - 1, ds.meta, name=ds.name)  # MSE on +-1 targets
    cfg = TrainConfig(steps=steps[1.0], lr=lr, loss="mse", log_every=log_every, probe_every=0, modes=r, seed=seed)
    runs = compare_regimes(mlp4(width, seed=seed).to(ctx.device), ds, cfg, ctx.out / "runs", alphas=ALPHAS,
                           steps=steps, probe_set=ds, device=ctx.device, progress=ctx.progress, resume=ctx.resume)
    lam = np.array(json.loads((runs[0].path / "modes.json").read_text())["eigenvalues"])
    y0 = np.abs([runs[0].rows[0][f"mode/{i}"] for i in range(r)])  # |V^T (f_0 - y)|: the label's weight
    t = {a: times_to_eps(rr, r, eps) for a, rr in zip(ALPHAS, runs)}
    rv = {a: _spearman(1 / t[a], lam) for a in ALPHAS}
    rl = {a: _spearman(1 / t[a], np.sqrt(lam) * y0) for a in ALPHAS}
    claims = [
        Claim("linear regime (alpha=100): modes learned at rates ordered by the kernel's eigenvalue "
              "(rank correlation of 1/time-to-eps with the eigenvalue)", rv[100.0], "> 0.5"),
        Claim("the non-linear regime follows the kernel's eigenvalues less than the linear one (rank correlation "
              "with the eigenvalue, alpha=1 minus alpha=100)", rv[1.0] - rv[100.0], "< 0"),
        Claim("the non-linear regime's order follows the label's weight sqrt(lambda)|y_lambda| more than the "
              "linear one's (rank correlation, alpha=1 minus alpha=100)", rl[1.0] - rl[100.0], "> 0"),
    ]
    one = {"eigenvalues": lam.tolist(), "initial_residual": y0.tolist(), "eps": eps,
           "time_to_eps": {f"{a:g}": t[a].tolist() for a in ALPHAS},
           "rank_corr_rate_vs_eigenvalue": {f"{a:g}": rv[a] for a in ALPHAS},
           "rank_corr_rate_vs_label_weight": {f"{a:g}": rl[a] for a in ALPHAS}}
    figures = []
    if importlib.util.find_spec("matplotlib") is not None:
        _figure(ctx.path("modes.png"), [one], r, eps)
        figures.append("modes.png")
    return write_summary(ctx, "modes", claims, started, {"figures": figures, **one})
