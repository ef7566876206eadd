"""Difficulty groups: label noise, C-scores (official and estimated), spurious features."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ._dataset import Dataset


def _classes(ds: Dataset) -> int:
    if ds.y.is_floating_point():
        raise ValueError("this needs integer class labels (y of dtype long)")
    if ds.num_classes is None or ds.num_classes < 2:
        raise ValueError("this needs at least 2 classes")
    return ds.num_classes


# --- label noise ------------------------------------------------------------------------------------
def with_label_noise(ds: Dataset, rate: float, *, seed: int) -> Dataset:
    """Give exactly `round(rate n)` random examples a label drawn uniformly from the *other* classes.

    Args:
        ds: a [Dataset][lazyhasty.data.Dataset] with integer class labels.
        rate: the fraction of examples relabelled, in `[0, 1]` (the paper used 0.15).
        seed: which examples, and their new labels.

    Returns:
        A copy with the new labels and metadata `noisy` (bool `[n]`) and `y_clean` (the original labels).

    Raises:
        ValueError: `rate` is outside `[0, 1]`, or the labels are not integer classes.

    Example:
        >>> ds = with_label_noise(digits(), 0.15, seed=0)
        >>> int(ds.noisy.sum()), bool((ds.y[ds.noisy] != ds.y_clean[ds.noisy]).all())
        (270, True)
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    C = _classes(ds)
    n = len(ds)
    g = torch.Generator().manual_seed(seed)
    noisy = torch.zeros(n, dtype=torch.bool)
    idx = torch.randperm(n, generator=g)[: round(rate * n)]
    noisy[idx] = True
    shift = torch.randint(1, C, (idx.numel(),), generator=g)  # 1..C-1: never the same class
    y = ds.y.clone()
    y[idx] = (ds.y[idx] + shift) % C
    return ds.replace(y=y, noisy=noisy, y_clean=ds.y.clone())


# --- C-scores -----------------------------------------------------------------------------------------
@dataclass
class CScores:
    """C-scores of a dataset's examples, with the labels they were computed for.

    Attributes:
        scores: `[n]` float, higher is easier.
        labels: `[n]` long, the labels in the order the scores follow.
    """

    scores: torch.Tensor  # [n] float
    labels: torch.Tensor  # [n] long

    def check(self, ds: Dataset) -> None:
        """Raise unless ``ds`` is the dataset the scores were computed on (same labels, same order)."""
        if len(ds) != self.scores.numel():
            raise ValueError(f"C-scores are for {self.scores.numel()} examples, the dataset has {len(ds)}")
        bad = (ds.y.cpu() != self.labels).nonzero().flatten()
        if bad.numel():
            raise ValueError(
                f"C-score labels disagree with the dataset at {bad.numel()} examples (first: {bad[:5].tolist()}): "
                "the scores follow torchvision's training order"
            )

    def attach(self, ds: Dataset) -> Dataset:
        self.check(ds)
        return ds.with_meta(cscore=self.scores)


def load_cscores(path: str | os.PathLike) -> CScores:
    """Official C-score file (npz with `labels` and `scores`), loaded with `allow_pickle=False`.

    Args:
        path: the `.npz` file.

    Returns:
        The [CScores][lazyhasty.data.CScores]; `attach(ds)` adds them to a dataset as `ds.cscore` after
        checking its labels.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"C-score file {path} not found (e.g. cifar10-cscores-orig-order.npz)")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "labels" not in z or "scores" not in z:
                raise ValueError(f"{path}: needs arrays 'labels' and 'scores', has {list(z.keys())}")
            labels, scores = np.asarray(z["labels"]), np.asarray(z["scores"])
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001  (zip errors, bad headers, pickled objects)
        raise ValueError(f"{path}: not a readable C-score npz file ({exc})") from exc
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError(f"{path}: labels {labels.shape} and scores {scores.shape} must be equal 1-D arrays")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{path}: non-finite scores")
    if labels.dtype.kind == "f" and not (np.all(np.isfinite(labels)) and np.all(labels == np.round(labels))):
        raise ValueError(f"{path}: labels must be integers, got non-integer values")
    if labels.dtype.kind not in "iuf":
        raise ValueError(f"{path}: labels must be integers, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{path}: negative labels")
    return CScores(torch.from_numpy(scores.astype(np.float32)), torch.from_numpy(labels.astype(np.int64)))


def estimate_cscores(ds: Dataset, model_factory, *, ratios=(0.2, 0.4, 0.6, 0.8), runs: int = 3,
                     epochs: int = 30, lr: float = 0.1, batch_size: int = 128, weight_decay: float = 5e-4,
                     seed: int = 0, device: str | torch.device = "cpu", progress: bool = False) -> CScores:
    """Holdout consistency C-scores (Jiang et al. 2021; the paper's eq. 7).

    For each subset ratio and run, the examples are shuffled and cut into held-out folds of size
    `(1 - ratio) n` covering everyone; for each fold `model_factory()` is trained (SGD with momentum,
    cross-entropy) on the rest and scores each held-out example by the softmax probability of its label.
    An example's score is its mean over the models that held it out, averaged over ratios. Cost:
    `runs * sum(ceil(1 / (1 - ratio)))` trainings.

    Args:
        ds: a [Dataset][lazyhasty.data.Dataset] with integer class labels.
        model_factory: `() -> nn.Module`, a fresh classifier per training.
        ratios: the training-subset ratios, each in `(0, 1)`.
        runs: shuffles per ratio.
        epochs: training epochs per model.
        lr: SGD learning rate (momentum 0.9).
        batch_size: examples per minibatch.
        weight_decay: SGD weight decay.
        seed: the shuffles, initializations and minibatches.
        device: where the models train.
        progress: show a progress bar.

    Returns:
        The [CScores][lazyhasty.data.CScores] `[n]` of `ds`, in its order.
    """
    from .._progress import Progress

    C = _classes(ds)
    if not ratios or any(not 0 < r < 1 for r in ratios):
        raise ValueError("ratios must be in (0, 1)")
    if runs < 1:
        raise ValueError("runs must be >= 1")
    n = len(ds)
    g = torch.Generator().manual_seed(seed)
    x, y = ds.x.to(device), ds.y.to(device)
    plans = []  # (ratio, held-out index sets): every example is held out at least once per run
    for ratio in ratios:
        k = min(n - 1, max(1, int(round(ratio * n))))
        h = n - k
        for _ in range(runs):
            perm = torch.randperm(n, generator=g)
            folds = [torch.cat([perm, perm])[s:s + h] for s in range(0, n, h)]
            plans.append((ratio, folds))
    total_models = sum(len(f) for _, f in plans)
    sums = {r: torch.zeros(n, dtype=torch.float64) for r in ratios}
    counts = {r: torch.zeros(n, dtype=torch.float64) for r in ratios}
    with Progress(total_models, "c-scores", progress) as bar:
        for m_id, (ratio, folds) in enumerate(plans):
            for f_id, ho in enumerate(folds):
                mask = torch.ones(n, dtype=torch.bool)
                mask[ho] = False
                tr = mask.nonzero().flatten()
                k = tr.numel()
                torch.manual_seed(seed * 100003 + m_id * 101 + f_id)
                model = model_factory().to(device)
                opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
                model.train()
                for _ in range(epochs):
                    order = tr[torch.randperm(k, generator=g)]
                    for s in range(0, k, batch_size):
                        b = order[s:s + batch_size].to(device)
                        loss = nn.functional.cross_entropy(model(x[b]), y[b])
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                model.eval()
                with torch.no_grad():
                    for s in range(0, ho.numel(), 1024):
                        b = ho[s:s + 1024]
                        logits = model(x[b.to(device)])
                        if logits.shape[-1] != C:
                            raise ValueError(f"model_factory() outputs {logits.shape[-1]} logits for {C} classes")
                        p = logits.softmax(-1).gather(1, y[b.to(device)][:, None])[:, 0]
                        sums[ratio].index_add_(0, b, p.double().cpu())
                        counts[ratio].index_add_(0, b, torch.ones(b.numel(), dtype=torch.float64))
                bar.update()
    per_ratio = [sums[r] / counts[r] for r in ratios]
    scores = torch.nanmean(torch.stack(per_ratio), 0)
    return CScores(scores.float(), ds.y.cpu().clone())


def difficulty_groups(scores: torch.Tensor, bins: int = 10) -> torch.Tensor:
    """Quantile bins of `scores`; bin 0 holds the lowest scores (the hardest examples).

    Args:
        scores: `[n]` scores (e.g. C-scores), at least `bins` of them, no NaN.
        bins: the number of bins, a positive integer.

    Returns:
        `[n]` long, each example's bin in `0..bins-1`.

    Raises:
        ValueError: a bad `bins`, too few scores, or a NaN.

    Example:
        >>> difficulty_groups(torch.tensor([0.9, 0.1, 0.5, 0.3]), bins=2)
        tensor([1, 0, 1, 0])
    """
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    scores = torch.as_tensor(scores, dtype=torch.float64)
    if scores.dim() != 1 or scores.numel() < bins:
        raise ValueError(f"need a 1-D score vector with at least {bins} entries")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    order = torch.argsort(scores, stable=True)
    groups = torch.empty_like(order)
    groups[order] = torch.arange(scores.numel()) * bins // scores.numel()
    return groups


def balanced_subsample(groups: torch.Tensor, per_group: int, *, seed: int) -> torch.Tensor:
    """Indices with exactly `per_group` random examples of every group (sorted within each group).

    Args:
        groups: `[n]` group labels.
        per_group: examples drawn from each group.
        seed: which examples.

    Returns:
        `[G * per_group]` long indices, group by group.

    Raises:
        ValueError: a group has fewer than `per_group` examples.

    Example:
        >>> balanced_subsample(torch.tensor([0, 0, 1, 1, 1]), 1, seed=0)
        tensor([0, 2])
    """
    groups = torch.as_tensor(groups)
    g = torch.Generator().manual_seed(seed)
    out = []
    for v in torch.unique(groups).tolist():
        idx = (groups == v).nonzero().flatten()
        if idx.numel() < per_group:
            raise ValueError(f"group {v} has {idx.numel()} examples, fewer than per_group={per_group}")
        out.append(idx[torch.randperm(idx.numel(), generator=g)[:per_group]].sort().values)
    return torch.cat(out)


# --- spurious features --------------------------------------------------------------------------------
def _palette(C: int) -> torch.Tensor:
    import colorsys

    return torch.tensor([colorsys.hsv_to_rgb(c / C, 0.9, 1.0) for c in range(C)], dtype=torch.float32)


def with_spurious_feature(ds: Dataset, kind: str = "patch", agreement: float = 0.95, *, seed: int) -> Dataset:
    """Add an easy feature `s` that equals the label on a fraction `agreement` of examples.

    The others (exactly `round((1 - agreement) n)`) get `s` drawn uniformly from the other classes.

    Args:
        ds: a [Dataset][lazyhasty.data.Dataset] of images `[n, c, h, w]` with integer class labels.
        kind: `"patch"`: a bright 2x2 (or 1/4-side) square whose horizontal position encodes `s`;
            `"color"`: images become RGB, tinted with class `s`'s colour.
        agreement: the fraction of examples whose `s` equals the label.
        seed: which examples disagree, and their `s`.

    Returns:
        A copy with the feature added and metadata `spurious` (s), `agrees` (s == y) and
        `groups` = `y * C + s`.

    Raises:
        ValueError: an unknown `kind`, `agreement` outside `[0, 1]`, images that are not `[n, c, h, w]`
            (1 or 3 channels for `"color"`), or non-integer labels.
    """
    if kind not in ("patch", "color"):
        raise ValueError(f"kind must be 'patch' or 'color', got {kind!r}")
    if not 0.0 <= agreement <= 1.0:
        raise ValueError("agreement must be in [0, 1]")
    if ds.x.dim() != 4:
        raise ValueError(f"spurious features are drawn on images [n, c, h, w], got x {tuple(ds.x.shape)}")
    C = _classes(ds)
    n = len(ds)
    g = torch.Generator().manual_seed(seed)
    s = ds.y.clone()
    minority = torch.randperm(n, generator=g)[: round((1 - agreement) * n)]
    s[minority] = (ds.y[minority] + torch.randint(1, C, (minority.numel(),), generator=g)) % C
    x = ds.x.clone()
    _, c, h, w = x.shape
    if kind == "patch":
        p = max(1, min(h, w) // 4)
        cols = torch.linspace(0, w - p, C).round().long()
        for cls in range(C):
            sel = s == cls
            x[sel, :, :p, cols[cls]:cols[cls] + p] = max(1.0, float(x.max())) if x.numel() else 1.0
    else:
        if c == 1:
            x = x.expand(n, 3, h, w).clone()
        elif c != 3:
            raise ValueError("kind='color' needs 1- or 3-channel images")
        tint = _palette(C)[s]  # [n, 3]
        x = x * (0.5 + 0.5 * tint[:, :, None, None])
    return ds.replace(x=x, spurious=s, agrees=s == ds.y, groups=ds.y * C + s)


def balanced_groups(ds: Dataset, per_group: int, *, seed: int, groups: str = "groups") -> Dataset:
    """The examples of `ds` with exactly `per_group` of each value of `ds.meta[groups]`.

    Args:
        ds: a [Dataset][lazyhasty.data.Dataset] with a group metadata column.
        per_group: examples kept from each group.
        seed: which examples.
        groups: the metadata column holding the groups.

    Returns:
        The balanced [Dataset][lazyhasty.data.Dataset].

    Raises:
        ValueError: `ds` has no such metadata.
    """
    if groups not in ds.meta:
        raise ValueError(f"dataset has no {groups!r} metadata (add it with with_spurious_feature or a loader)")
    return ds[balanced_subsample(ds.meta[groups], per_group, seed=seed)]
