"""Paper Fig. 2 top: per-C-score-decile training loss against mean training loss, alpha = 1 vs 100."""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from ..analysis import difference, plot_groups
from ..data import difficulty_groups, estimate_cscores, load_cscores
from ._regime_runs import (LINEARITY, curve, equal_progress, figures, linearity_at_end, mean_over_grid,
                           train_regimes)
from .common import (REGIME_OPTIONS, Claim, Context, _check_cscore_source, load_image_dataset, register,
                     write_config, write_summary)


@register("cscores", dict(REGIME_OPTIONS, dataset=str, root=str, cscores=str, n_train=int, cscore_ratios=list,
                           cscore_runs=int, cscore_epochs=int))
def run(ctx: Context) -> dict:
    started = time.time()
    name = ctx.opt("dataset", "digits")
    root = ctx.opt("root", None)
    _check_cscore_source(ctx.options)
    train = load_image_dataset(name, root, "train")
    source = "official"
    if name == "cifar10":
        cs = load_cscores(ctx.opt("cscores", None) or _default_cscores())
        train = cs.attach(train)
    else:
        n_train = ctx.opt("n_train", None, quick=min(len(train), 1000))
        if n_train:
            train = train[: int(n_train)]
        c, s = train.x.shape[1], train.x.shape[-1]

        def factory():
            return nn.Sequential(nn.Flatten(), nn.Linear(c * s * s, 64), nn.ReLU(), nn.Linear(64, train.num_classes))

        cs = estimate_cscores(train, factory, ratios=ctx.opt("cscore_ratios", (0.25, 0.5, 0.75), quick=(0.5,)),
                              runs=int(ctx.opt("cscore_runs", 2, quick=1)), epochs=int(ctx.opt("cscore_epochs", 20, quick=8)),
                              seed=ctx.seed, device=ctx.device, progress=ctx.progress)
        train = train.with_meta(cscore=cs.scores)
        source = "estimated (holdout consistency)"
    torch.save({"scores": train.cscore}, ctx.path("cscores.pt"))
    groups = difficulty_groups(train.cscore, bins=10)
    probes = {f"decile{d}": train[groups == d] for d in range(10)}
    runs, config = train_regimes(ctx, train, probes, train[:500], alphas=(1.0, 100.0), classes=train.num_classes)
    write_config(ctx, "cscores", {"dataset": name, "n_train": len(train), "cscores": source, **config})
    cols = [f"decile{d}/loss" for d in range(10)]
    table = equal_progress(runs, "train_loss")
    plot_groups(table, [cols[0], cols[3], cols[7], cols[9]], ctx.path("decile_loss.png"), ylabel="per-decile training loss")
    figures(ctx, runs, "train_loss", ["train_loss"], "train_loss")
    d = difference(table, "alpha=1", "alpha=100", cols)
    _diff_figure(ctx, table, d)
    top, bottom = mean_over_grid(d[cols[9]]), mean_over_grid(d[cols[0]])
    nl = table["alpha=1"]
    end = {r.name: linearity_at_end(r) for r in runs}
    claims = [
        Claim("at equal mean training loss, (non-linear minus linear) loss of the top C-score decile minus that of the "
              "bottom decile", top - bottom, "< 0", f"top decile {top:+.4f}, bottom decile {bottom:+.4f}"),
        Claim("non-linear regime: bottom-decile minus top-decile loss (high C-scores learned faster)",
              mean_over_grid(nl[cols[0]] - nl[cols[9]]), "> 0"),
        Claim("sign similarity at the end, alpha = 1 minus alpha = 100",
              end["alpha=1"].get("sign_similarity", float("nan")) - end["alpha=100"].get("sign_similarity", float("nan")),
              "< 0"),
    ]
    return write_summary(ctx, "cscores", claims, started, {
        "cscores": source, "end_linearity": end,
        "difference_by_decile": {c: mean_over_grid(v) for c, v in d.items()},
        "figures": ["decile_loss.png", "decile_difference.png", "linearity.png", "train_loss.png"],
        "curves": [curve("decile_loss.png", "train_loss", [cols[0], cols[3], cols[7], cols[9]], "per-decile training loss"),
                   curve("linearity.png", "train_loss", LINEARITY, "linearity metric")]})


def _default_cscores():
    from pathlib import Path

    for p in (Path("../shared/data/cifar10-cscores-orig-order.npz"), Path("cifar10-cscores-orig-order.npz")):
        if p.exists():
            return p
    raise FileNotFoundError("official CIFAR-10 C-scores not found: pass cscores=PATH (cifar10-cscores-orig-order.npz)")


def _diff_figure(ctx, table, d):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    colors = plt.cm.viridis(np.linspace(0, 0.9, 10))
    for k, c in enumerate(colors):
        ax.plot(table.grid, d[f"decile{k}/loss"], color=c, label=f"decile {k}")
    ax.axhline(0, color="k", lw=0.5)
    ax.invert_xaxis()
    ax.set_xlabel("mean training loss")
    ax.set_ylabel("loss(non-linear) - loss(linear)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(ctx.path("decile_difference.png"), dpi=120)
    plt.close(fig)
