"""Paper Fig. 1: yin-yang, 4-layer ReLU MLP, full-batch GD, alpha = 1 vs 100 from the same init."""
from __future__ import annotations

import time

import numpy as np
import torch

from ..data import yinyang, yinyang_grid
from ..train import TrainConfig, Trainer, per_example_loss
from .common import Claim, Context, mlp4, register, write_config, write_summary

THRESHOLDS = (0.5, 0.4, 0.3)
ALPHAS = (1.0, 100.0)


def _regions(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Hard: inside the small disks. Easy: the large areas away from the disks and the x2 = 0 boundary."""
    c1, c2 = torch.tensor([0.5, -0.5]), torch.tensor([-0.5, 0.5])
    d = torch.minimum((x - c1).norm(dim=1), (x - c2).norm(dim=1))
    hard = d < 0.3
    easy = (d > 0.5) & (x[:, 1].abs() > 0.3)
    return hard.numpy(), easy.numpy()


def _at_threshold(losses: np.ndarray, grids: np.ndarray, thr: float):
    """Grid losses interpolated at the first crossing of training loss ``thr`` (None if never)."""
    below = np.flatnonzero(losses <= thr)
    if below.size == 0:
        return None
    j = below[0]
    if j == 0:
        return grids[0]
    l0, l1 = losses[j - 1], losses[j]
    w = (l0 - thr) / (l0 - l1) if l0 != l1 else 1.0
    return (1 - w) * grids[j - 1] + w * grids[j]


def _aggregate(ctx: Context, seed_dirs, per_seed) -> dict:
    """Over seeds: the mean delta maps and every seed's training curves (the paper's Fig. 1 c-e averages runs)."""
    from ..train import Run

    resolution = int(per_seed[0]["resolution"])
    maps = {}
    for t in THRESHOLDS:
        stack = np.stack([np.load(d / "delta_maps.npz")[f"thr_{t}"] for d in seed_dirs])
        ok = np.isfinite(stack).all(1)  # seeds where both regimes reached the threshold
        maps[t] = stack[ok].mean(0) if ok.any() else np.full(stack.shape[1], np.nan)
    x = np.load(seed_dirs[0] / "delta_maps.npz")["x"]
    np.savez(ctx.path("delta_maps.npz"), **{f"thr_{t}": maps[t] for t in THRESHOLDS}, x=x)
    curves = {a: [] for a in ALPHAS}
    for d in seed_dirs:
        for a in ALPHAS:
            r = Run(d / "runs" / f"alpha={a:g}")
            curves[a].append((r.column("step"), r.column("train_loss")))
    _figure(ctx, curves, maps, resolution)
    final = {f"alpha={a:g}": {k: float(np.nanmean([p["final"][f"alpha={a:g}"][k] for p in per_seed]))
                              for k in per_seed[0]["final"][f"alpha={a:g}"]} for a in ALPHAS}
    return {"figures": ["training_loss.png", "delta_maps.png"], "final": final}


@register("yinyang", dict(n_train=int, width=int, lr=float, steps=int, steps_lazy=int, resolution=int),
          seeds=20, quick_seeds=3, resumable=False, aggregate=_aggregate)
def run(ctx: Context) -> dict:
    """One seed: the same init trained at alpha = 1 and 100 (the per-log grid losses come from ``on_log``, so an
    interrupted seed starts again rather than resuming)."""
    started = time.time()
    n_train = int(ctx.opt("n_train", 100))
    width = int(ctx.opt("width", 100, quick=64))
    lr = float(ctx.opt("lr", 1.0))
    steps = {1.0: int(ctx.opt("steps", 1500, quick=600)), 100.0: int(ctx.opt("steps_lazy", 6000, quick=3000))}
    resolution = int(ctx.opt("resolution", 60, quick=40))
    config = {"n_train": n_train, "width": width, "lr": lr, "steps": {str(k): v for k, v in steps.items()},
              "resolution": resolution, "loss": "logistic", "optimizer": "full-batch gradient descent",
              "log": "geometric in training loss, q = 0.96", "thresholds": THRESHOLDS}
    write_config(ctx, "yinyang", config)
    grid = yinyang_grid(resolution)
    gx, gy = grid.x.to(ctx.device), grid.y.to(ctx.device)
    hard, easy = _regions(grid.x)
    seed = ctx.seed
    train = yinyang(n_train, seed=seed)
    probe = yinyang(300, seed=seed + 500)
    model = mlp4(width, seed=seed)
    at, curves, steps_to, final = {}, {}, {}, {}
    for alpha in ALPHAS:
        grids, tl = [], []

        def on_log(row, net, grids=grids, tl=tl):
            with torch.no_grad():
                net.eval()
                grids.append(per_example_loss("logistic", net(gx), gy).cpu().numpy())
                net.train()
            tl.append(row["train_loss"])

        m = mlp4(width, seed=seed)
        m.load_state_dict(model.state_dict())
        cfg = TrainConfig(steps=steps[alpha], lr=lr, alpha=alpha, loss="logistic", log_every=None,
                          log_geometric=0.96, probe_every=4, seed=seed)
        tr = Trainer(m.to(ctx.device), train, cfg, ctx.out / "runs" / f"alpha={alpha:g}", probe_set=probe,
                     device=ctx.device, on_log=on_log, progress=ctx.progress)
        res = tr.fit()
        tl_arr, g_arr = np.array(tl), np.stack(grids)
        at[alpha] = {t: _at_threshold(tl_arr, g_arr, t) for t in THRESHOLDS}
        curves[alpha] = [(res.column("step"), res.column("train_loss"))]
        cross = np.flatnonzero(res.column("train_loss") <= 0.3)
        steps_to[alpha] = res.column("step")[cross[0]] if cross.size else np.nan
        probes = [r for r in res.rows if "sign_similarity" in r]
        final[alpha] = {key: (probes[-1].get(key, np.nan) if probes else np.nan)
                        for key in ("sign_similarity", "repr_alignment", "ntk_alignment")}
        final[alpha]["train_loss"] = res.rows[-1]["train_loss"]
    nan_map = np.full(resolution * resolution, np.nan)
    maps = {t: (at[1.0][t] - at[100.0][t]) if at[1.0][t] is not None and at[100.0][t] is not None else nan_map
            for t in THRESHOLDS}
    np.savez(ctx.path("delta_maps.npz"), **{f"thr_{t}": maps[t] for t in THRESHOLDS}, x=grid.x.numpy())
    _figure(ctx, curves, maps, resolution)
    claims = [Claim("steps to reach training loss 0.3: linear / non-linear (non-linear speed-up)",
                    steps_to[100.0] / steps_to[1.0], "> 1")]
    for t in THRESHOLDS:
        m = maps[t]
        claims.append(Claim(
            f"at training loss {t}: test-loss difference non-linear minus linear, disks (hard) minus large areas (easy)",
            float(np.mean(m[hard]) - np.mean(m[easy])), "> 0"))
    claims.append(Claim("sign similarity at the end, alpha = 100 (expected near 1)",
                        float(final[100.0]["sign_similarity"]), "> 0.9"))
    claims.append(Claim("sign similarity at the end, alpha = 1 minus alpha = 100 (expected clearly lower)",
                        float(final[1.0]["sign_similarity"] - final[100.0]["sign_similarity"]), "< 0"))
    claims.append(Claim("NTK alignment with init at the end, alpha = 1 minus alpha = 100",
                        float(final[1.0]["ntk_alignment"] - final[100.0]["ntk_alignment"]), "< 0"))
    return write_summary(ctx, "yinyang", claims, started, {
        "final": {f"alpha={a:g}": {k: float(v) for k, v in final[a].items()} for a in ALPHAS},
        "resolution": resolution, "figures": ["training_loss.png", "delta_maps.png"]})


def _figure(ctx: Context, curves, maps, resolution):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for alpha, style, label in ((1.0, "-", "non-linear (alpha=1)"), (100.0, "--", "linearized (alpha=100)")):
        for i, (st, lo) in enumerate(curves[alpha]):
            ax.plot(np.maximum(st, 1), lo, style, color="C0" if alpha == 1.0 else "C1", alpha=0.5,
                    label=label if i == 0 else None)
    for t in THRESHOLDS:
        ax.axhline(t, color="gray", lw=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("GD iterations")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(ctx.path("training_loss.png"), dpi=120)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(THRESHOLDS), figsize=(4.2 * len(THRESHOLDS), 4), constrained_layout=True)
    vmax = max(float(np.nanmax(np.abs(m))) if np.isfinite(m).any() else 1.0 for m in maps.values())
    for ax, t in zip(axes, THRESHOLDS):
        im = ax.imshow(maps[t].reshape(resolution, resolution), origin="lower", extent=(-1, 1, -1, 1),
                       cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        ax.set_title(f"loss(non-linear) - loss(linear)\nat training loss {t}")
        for c in ((0.5, -0.5), (-0.5, 0.5)):
            ax.add_patch(plt.Circle(c, 0.3, fill=False, color="k", lw=0.8))
        ax.axhline(0, color="k", lw=0.5)
    fig.colorbar(im, ax=axes, shrink=0.8)
    fig.savefig(ctx.path("delta_maps.png"), dpi=120)
    plt.close(fig)
