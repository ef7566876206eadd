"""Paper Fig. 3: a spurious feature; alpha in {0.5, 1, 100}; examples with vs without the spurious feature.

Default: digits (or Fashion-MNIST) turned into a binary task (class >= 5) with a patch whose position
encodes a spurious label agreeing with the true one on 90% of the training set; the test set has the
patch independent of the label. CelebA (blond; gender) and Waterbirds (bird; background) from local paths.
"""
from __future__ import annotations

import time

import torch

from ..analysis import difference, plot_groups
from ..data import Dataset, balanced_groups, celeba, waterbirds, with_spurious_feature
from ._regime_runs import equal_progress, curve, mean_over_grid, train_regimes
from .common import (REGIME_OPTIONS, Claim, Context, load_image_dataset, register, write_config,
                     write_summary)

ALPHAS = (0.5, 1.0, 100.0)


def _synthetic(ctx: Context, name: str, root):
    out = []
    for split, agreement in (("train", float(ctx.opt("agreement", 0.9))), ("test", 0.5)):
        ds = load_image_dataset(name, root, split)
        ds = Dataset(ds.x, (ds.y >= 5).long(), num_classes=2, name=f"{ds.name}-binary")
        out.append(with_spurious_feature(ds, "patch", agreement=agreement, seed=ctx.seed + (split == "test")))
    tr, te = out
    return tr, te, tr.agrees, te.agrees


@register("spurious", dict(REGIME_OPTIONS, agreement=float, dataset=str, root=str, n_train=int, n_test=int,
                            per_group=int))
def run(ctx: Context) -> dict:
    started = time.time()
    name = ctx.opt("dataset", "digits")
    root = ctx.opt("root", None)
    if name in ("digits", "fashion-mnist"):
        train, test, with_tr, with_te = _synthetic(ctx, name, root)
    elif name == "celeba":
        train = celeba(root, "train", max_examples=int(ctx.opt("n_train", 20000)), seed=ctx.seed)
        test = celeba(root, "test", max_examples=int(ctx.opt("n_test", 4000)), seed=ctx.seed)
        # with spurious correlation: blond women and non-blond men (the majority pairing)
        with_tr, with_te = (train.y == 1) != train.male, (test.y == 1) != test.male
    elif name == "waterbirds":
        train, test = waterbirds(root, "train"), waterbirds(root, "test")
        with_tr, with_te = train.spurious, test.spurious
    else:
        raise ValueError(f"unknown dataset {name!r}: digits, fashion-mnist, celeba or waterbirds")
    n_train = ctx.opt("n_train", None, quick=min(len(train), 1000))
    if n_train and name in ("digits", "fashion-mnist"):
        train, with_tr = train[: int(n_train)], with_tr[: int(n_train)]
    per = int(ctx.opt("per_group", 180))
    tr_groups = train.with_meta(groups=2 * train.y + with_tr.long())
    te_groups = test.with_meta(groups=2 * test.y + with_te.long())
    per_tr = min(per, int(torch.bincount(tr_groups.groups, minlength=4).min()))
    per_te = min(per, int(torch.bincount(te_groups.groups, minlength=4).min()))
    bal_tr = balanced_groups(tr_groups, per_tr, seed=ctx.seed)
    bal_te = balanced_groups(te_groups, per_te, seed=ctx.seed)
    probes = {"train/with": bal_tr[bal_tr.groups % 2 == 1], "train/without": bal_tr[bal_tr.groups % 2 == 0],
              "test/with": bal_te[bal_te.groups % 2 == 1], "test/without": bal_te[bal_te.groups % 2 == 0],
              "test": test}
    runs, config = train_regimes(ctx, train, probes, train[:500], alphas=ALPHAS, classes=2, default_lr=0.02,
                                 default_epochs=30, quick_epochs=8)
    write_config(ctx, "spurious", {"dataset": name, "n_train": len(train), "balanced_per_group": [per_tr, per_te],
                                   **config})
    table = equal_progress(runs, "train/with/loss")
    plot_groups(table, ["train/without/acc", "test/without/acc", "test/with/acc"], ctx.path("accuracy_vs_progress.png"),
                ylabel="accuracy")
    _acc_figure(ctx, runs)
    claims = []
    for nl in ("alpha=1", "alpha=0.5"):
        d = difference(table, nl, "alpha=100", ["train/without/loss", "test/without/loss"])
        claims.append(Claim(f"at equal with-spurious training loss, without-spurious training loss {nl} minus alpha=100",
                            mean_over_grid(d["train/without/loss"]), "> 0",
                            "the non-linear regime relies more on the spurious feature early on"))
        claims.append(Claim(f"at equal with-spurious training loss, without-spurious test loss {nl} minus alpha=100",
                            mean_over_grid(d["test/without/loss"]), "> 0"))
    return write_summary(ctx, "spurious", claims, started, {
        "figures": ["accuracy_vs_progress.png", "accuracy_train_test.png"],
        "curves": [curve("accuracy_vs_progress.png", "train/with/loss",
                         ["train/without/acc", "test/without/acc", "test/with/acc"], "accuracy"),
                   curve("loss_vs_progress.png", "train/with/loss", ["train/without/loss", "test/without/loss"])]})


def _acc_figure(ctx: Context, runs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    pairs = [("train_acc", "test/acc", "accuracy train", "accuracy test"),
             ("train/with/acc", "train/without/acc", "train acc. with spurious", "train acc. without spurious"),
             ("test/with/acc", "test/without/acc", "test acc. with spurious", "test acc. without spurious")]
    for ax, (xa, ya, xl, yl) in zip(axes, pairs):
        for r, style in zip(runs, ("-", "-", "--")):
            ax.plot(r.column(xa), r.column(ya), style, marker=".", ms=3, label=r.name)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(ctx.path("accuracy_train_test.png"), dpi=120)
    plt.close(fig)
