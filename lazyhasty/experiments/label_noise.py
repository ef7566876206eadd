"""Paper Fig. 2 bottom: 15% label noise; alpha = 1 vs 100 from one init; losses against clean-example loss."""
from __future__ import annotations

import time

import numpy as np

from ..analysis import difference, plot_groups
from ..data import with_label_noise
from ._regime_runs import (LINEARITY, curve, equal_progress, figures, linearity_at_end, mean_over_grid,
                           train_regimes)
from .common import (REGIME_OPTIONS, Claim, Context, load_image_dataset, register, write_config,
                     write_summary)


@register("label-noise", dict(REGIME_OPTIONS, dataset=str, root=str, noise=float, n_train=int))
def run(ctx: Context) -> dict:
    started = time.time()
    name = ctx.opt("dataset", "digits")
    root = ctx.opt("root", None)
    rate = float(ctx.opt("noise", 0.15))
    train = load_image_dataset(name, root, "train")
    test = load_image_dataset(name, root, "test")
    n_train = ctx.opt("n_train", None, quick=min(len(train), 1000))
    if n_train:
        train = train[: int(n_train)]
        test = test[: max(200, int(n_train) // 4)]
    train = with_label_noise(train, rate, seed=ctx.seed)
    probes = {"clean": train[~train.noisy], "noisy": train[train.noisy], "test": test}
    runs, config = train_regimes(ctx, train, probes, train[:500], alphas=(1.0, 100.0), classes=train.num_classes)
    write_config(ctx, "label-noise", {"dataset": name, "n_train": len(train), "noise": rate, **config})
    table = equal_progress(runs, "clean/loss")
    plot_groups(table, ["noisy/loss", "test/loss"], ctx.path("loss_vs_clean_loss.png"), ylabel="loss")
    plot_groups(table, ["clean/acc", "noisy/acc", "test/acc"], ctx.path("accuracy_vs_clean_loss.png"), ylabel="accuracy")
    figures(ctx, runs, "clean/loss", ["train_loss"], "train_loss")
    d = difference(table, "alpha=1", "alpha=100", ["noisy/loss", "test/loss"])
    best = {r.name: float(np.nanmin(r.column("test/loss"))) for r in runs}
    end = {r.name: linearity_at_end(r) for r in runs}
    claims = [
        Claim("at equal clean-example loss, noisy-example loss non-linear minus linear (mean over the common range)",
              mean_over_grid(d["noisy/loss"]), "> 0", "the non-linear regime ignores noisy examples longer"),
        Claim("best test loss, non-linear minus linear (the sweet spot)", best["alpha=1"] - best["alpha=100"], "< 0"),
        Claim("sign similarity at the end, alpha = 100 (expected near 1)",
              end["alpha=100"].get("sign_similarity", float("nan")), "> 0.9"),
        Claim("sign similarity at the end, alpha = 1 minus alpha = 100",
              end["alpha=1"].get("sign_similarity", float("nan")) - end["alpha=100"].get("sign_similarity", float("nan")),
              "< 0"),
    ]
    return write_summary(ctx, "label-noise", claims, started, {
        "end_linearity": end, "best_test_loss": best,
        "figures": ["loss_vs_clean_loss.png", "accuracy_vs_clean_loss.png", "linearity.png", "train_loss.png"],
        "curves": [curve("loss_vs_clean_loss.png", "clean/loss", ["noisy/loss", "test/loss"]),
                   curve("accuracy_vs_clean_loss.png", "clean/loss", ["clean/acc", "noisy/acc", "test/acc"], "accuracy"),
                   curve("linearity.png", "clean/loss", LINEARITY, "linearity metric")]})
