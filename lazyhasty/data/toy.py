"""Toy 2-D tasks: the paper's yin-yang (section 3.1) and the 3-class Yin-Yang of Kriener et al. (2021)."""
from __future__ import annotations

import torch

from ._dataset import Dataset

C1, C2, R = (0.5, -0.5), (-0.5, 0.5), 0.3


def yinyang_labels(x: torch.Tensor) -> torch.Tensor:
    """The yin-yang labels of points `x`.

    `y = s (-1)^[|x - c1| < r] (-1)^[|x - c2| < r]` with `s = +1` iff `x_2 <= 0`, `c1 = (0.5, -0.5)`,
    `c2 = (-0.5, 0.5)`, `r = 0.3`: two half-planes, each with a small disk of the other label.

    Args:
        x: `[n, 2]` points.

    Returns:
        `[n]` labels in {-1, +1}, of `x`'s dtype.

    Example:
        >>> yinyang_labels(torch.tensor([[0.5, -0.5], [0.9, -0.9]]))
        tensor([-1.,  1.])
    """
    s = torch.where(x[:, 1] <= 0, 1.0, -1.0)
    in1 = (x - torch.tensor(C1, dtype=x.dtype)).norm(dim=1) < R
    in2 = (x - torch.tensor(C2, dtype=x.dtype)).norm(dim=1) < R
    return s * torch.where(in1, -1.0, 1.0) * torch.where(in2, -1.0, 1.0)


def yinyang(n: int, *, seed: int, label_noise: float = 0.0) -> Dataset:
    """The paper's toy task (section 3.1): `x ~ U([-1, 1]^2)`, labels in {-1, +1} (float).

    Args:
        n: number of examples (>= 1).
        seed: seed of the points and of which labels are flipped.
        label_noise: fraction of examples (exactly `round(label_noise * n)`) whose label is flipped.

    Returns:
        A `Dataset` with `x` `[n, 2]`, `y` `[n]` and metadata `noisy` `[n]` (the flipped ones), `y_clean`
        `[n]` and `in_disk` `[n]` (inside either small disk: the hard region).

    Raises:
        ValueError: `n < 1` or `label_noise` outside [0, 1].

    Example:
        >>> ds = yinyang(100, seed=0, label_noise=0.1)
        >>> ds.x.shape, int(ds.noisy.sum())
        (torch.Size([100, 2]), 10)
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError("label_noise must be in [0, 1]")
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g) * 2 - 1
    y = yinyang_labels(x)
    noisy = torch.zeros(n, dtype=torch.bool)
    k = round(label_noise * n)
    if k:
        noisy[torch.randperm(n, generator=g)[:k]] = True
    in_disk = ((x - torch.tensor(C1)).norm(dim=1) < R) | ((x - torch.tensor(C2)).norm(dim=1) < R)
    return Dataset(x, torch.where(noisy, -y, y), {"noisy": noisy, "y_clean": y, "in_disk": in_disk},
                   num_classes=2, name="yinyang")


def yinyang_grid(resolution: int = 100) -> Dataset:
    """`resolution²` points paving [-1, 1]² with their clean labels (the test grid of Fig. 1).

    Args:
        resolution: points per axis (>= 2).

    Returns:
        A `Dataset` with `x` `[resolution², 2]` in row-major order (`x_2` varies slowest) and `y` from
        [`yinyang_labels`][lazyhasty.data.yinyang_labels].

    Raises:
        ValueError: `resolution < 2`.

    Example:
        >>> yinyang_grid(3).x[:4]
        tensor([[-1., -1.],
                [ 0., -1.],
                [ 1., -1.],
                [-1.,  0.]])
    """
    if resolution < 2:
        raise ValueError("resolution must be >= 2")
    t = torch.linspace(-1, 1, resolution)
    x2, x1 = torch.meshgrid(t, t, indexing="ij")
    x = torch.stack([x1.reshape(-1), x2.reshape(-1)], 1)
    return Dataset(x, yinyang_labels(x), num_classes=2, name="yinyang-grid")


def _kriener_class(x: torch.Tensor, y: torch.Tensor, r_small: float, r_big: float) -> torch.Tensor:
    d_right = torch.sqrt((x - 1.5 * r_big) ** 2 + (y - r_big) ** 2)
    d_left = torch.sqrt((x - 0.5 * r_big) ** 2 + (y - r_big) ** 2)
    yin = (d_right <= r_small) | ((d_left > r_small) & (d_left <= 0.5 * r_big)) | ((y > r_big) & (d_right > 0.5 * r_big))
    circles = (d_right < r_small) | (d_left < r_small)
    return torch.where(circles, 2, yin.long())


def yinyang_kriener(n: int, *, seed: int, r_small: float = 0.1, r_big: float = 0.5) -> Dataset:
    """The 3-class Yin-Yang dataset (Kriener, Goeltz & Petrovici 2021): classes yin (1), yang (0), dots (2).

    Points are uniform in the disk of radius `r_big` centred at `(r_big, r_big)`; each example first draws
    its class uniformly (class-balanced), then a point of that class by rejection.

    Args:
        n: number of examples (>= 1).
        seed: seed of the classes and points.
        r_small: radius of the dots.
        r_big: radius of the whole disk.

    Returns:
        A `Dataset` with features `(x, y, 1 - x, 1 - y)` `[n, 4]` and class indices `[n]` (int64).

    Raises:
        ValueError: `n < 1`.

    Example:
        >>> ds = yinyang_kriener(30, seed=0)
        >>> ds.x.shape, sorted(set(ds.y.tolist()))
        (torch.Size([30, 4]), [0, 1, 2])
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    g = torch.Generator().manual_seed(seed)
    goal = torch.randint(0, 3, (n,), generator=g)
    pts = torch.empty(n, 2)
    todo = torch.arange(n)
    while todo.numel():
        cand = torch.rand(todo.numel() * 4, 2, generator=g) * 2 * r_big
        inside = ((cand - r_big) ** 2).sum(1).sqrt() <= r_big
        cand = cand[inside]
        cls = _kriener_class(cand[:, 0], cand[:, 1], r_small, r_big)
        for c in range(3):
            need = todo[goal[todo] == c]
            have = cand[cls == c][: need.numel()]
            pts[need[: have.shape[0]]] = have
            done = need[: have.shape[0]]
            todo = todo[~torch.isin(todo, done)]
    x, y = pts[:, 0], pts[:, 1]
    feats = torch.stack([x, y, 1 - x, 1 - y], 1)
    return Dataset(feats, goal, num_classes=3, name="yinyang-kriener")
