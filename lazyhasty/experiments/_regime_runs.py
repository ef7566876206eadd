"""Training several alphas from one init on an image dataset, and reading the runs at equal progress."""
from __future__ import annotations

import warnings

import numpy as np

from ..analysis import ProgressTable, at_equal_progress, plot_groups, plot_runs
from ..train import TrainConfig, compare_regimes
from .common import Context, small_cnn


def train_regimes(ctx: Context, train, probes: dict, probe_set, *, alphas, classes: int, loss: str = "cross_entropy",
                  default_epochs=30, quick_epochs=8, lazy_factor: float = 5.0, default_lr=0.05):
    epochs = int(ctx.opt("epochs", default_epochs, quick=quick_epochs))
    batch = int(ctx.opt("batch_size", 64))
    lr = float(ctx.opt("lr", default_lr))
    width = int(ctx.opt("width", 16, quick=8))
    spe = -(-len(train) // batch)
    steps = epochs * spe
    lazy_steps = int(steps * float(ctx.opt("lazy_factor", lazy_factor)))
    model = small_cnn(train.x.shape[1], classes, train.x.shape[-1], width=width, seed=ctx.seed)
    # geometric logging in the (EMA of the minibatch) loss, as the authors did: dense where the loss moves
    cfg = TrainConfig(steps=steps, lr=lr, loss=loss, batch_size=batch, momentum=0.9, log_every=None,
                      log_geometric=float(ctx.opt("log_q", 0.97)), probe_every=int(ctx.opt("probe_every", 2)),
                      seed=ctx.seed)
    per_alpha_steps = {a: (lazy_steps if a >= 10 else steps) for a in alphas}
    fork = ctx.opt("fork_step", None)  # the other regimes start from the alpha = 1 run at that step
    runs = compare_regimes(model.to(ctx.device), train, cfg, ctx.out / "runs", alphas=alphas, steps=per_alpha_steps,
                           probes=probes, probe_set=probe_set, device=ctx.device, progress=ctx.progress, resume=ctx.resume,
                           fork_from=None if fork is None else (1.0, int(fork)))
    config = {"epochs": epochs, "lazy_steps": lazy_steps, "steps": steps, "batch_size": batch, "lr": lr,
              "width": width, "alphas": list(alphas), "optimizer": "SGD momentum 0.9", "loss": loss,
              "model": "3 ReLU convs + linear, no BatchNorm", "fork_step": fork}
    return runs, config


def equal_progress(runs, progress: str, grid: int = 100):
    """:func:`at_equal_progress`, except that runs whose progress ranges do not overlap (a seed in which one
    regime never got below where another started) give a table of NaN, with a warning: that seed has no value
    for the claims read at equal progress, and the claims over seeds count it as missing."""
    try:
        return at_equal_progress(runs, progress=progress, grid=grid)
    except ValueError as exc:
        if "do not overlap" not in str(exc):
            raise
        warnings.warn(f"{exc}: no comparison at equal {progress} for this seed (its claims read there are NaN)",
                      stacklevel=2)
        start = min(float(r.rows[0][progress]) for r in runs)
        g = np.array([start, start])
        cols = {r.name: {k: np.full(2, np.nan) for k in {k for row in r.rows for k in row}} for r in runs}
        for c in cols.values():
            c[progress] = g.copy()
        return ProgressTable(progress, g, cols)


def mean_over_grid(values: np.ndarray) -> float:
    v = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")


def linearity_at_end(run) -> dict:
    rows = [r for r in run.rows if "sign_similarity" in r or "ntk_alignment" in r]
    return {k: rows[-1].get(k, float("nan")) for k in ("sign_similarity", "repr_alignment", "ntk_alignment")} if rows else {}


LINEARITY = ["sign_similarity", "repr_alignment", "ntk_alignment"]


def curve(file: str, progress: str, columns: list[str], ylabel: str = "loss") -> dict:
    """A figure to draw over seeds (mean and 95% band at equal ``progress``): listed in a seed's summary
    under ``"curves"``, drawn by the seed runner from every seed's runs."""
    return {"file": file, "progress": progress, "columns": list(columns), "ylabel": ylabel}


def figures(ctx: Context, runs, progress: str, groups: list[str], name: str, ylabel: str = "loss"):
    table = equal_progress(runs, progress)
    plot_groups(table, groups, ctx.path(f"{name}.png"), ylabel=ylabel)
    plot_runs(runs, progress, LINEARITY, ctx.path("linearity.png"),
              ylabel="linearity metric")
    return table
