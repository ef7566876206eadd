"""The dataset type every lazyhasty experiment uses: tensors plus per-example metadata."""
from __future__ import annotations

from collections.abc import Mapping

import torch


class Dataset:
    """`x` `[n, ...]`, `y` `[n]` and per-example metadata `meta[name]` `[n, ...]`.

    Sliceable (`ds[10:20]`, `ds[mask]`, `ds[index_tensor]` give a Dataset; `ds[i]` an `(x, y)` pair), and
    usable wherever lazyhasty takes a loader (its inputs are cut into batches). Metadata is reachable as
    attributes: `ds.noisy`, `ds.y_clean`, `ds.groups`, `ds.cscore`...

    Args:
        x: `[n, ...]` inputs.
        y: `[n]` labels (class indices, or real targets).
        meta: `{name: [n, ...] tensor}` per-example metadata.
        num_classes: the number of classes (default: `max(y) + 1` for integer labels, none for real ones).
        name: shown in `repr` and in run configs.

    Raises:
        TypeError: `x` or `y` is not a tensor.
        ValueError: `x`, `y` and the metadata do not have the same number of rows.

    Example:
        >>> ds = yinyang(1000, seed=0)
        >>> train, test = ds[:800], ds[800:]
        >>> loader = train.loader(batch_size=100, shuffle=True, seed=0)
        >>> x, y, index = next(iter(loader))   # [100, 2], [100], [100]
        >>> train.noisy.shape                  # a per-example metadata column
        torch.Size([800])
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, meta: Mapping[str, torch.Tensor] | None = None, *,
                 num_classes: int | None = None, name: str = "dataset"):
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError("x and y must be tensors")
        if x.dim() == 0 or y.dim() != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(f"x must be [n, ...] and y [n]; got x {tuple(x.shape)}, y {tuple(y.shape)}")
        meta = dict(meta or {})
        for k, v in meta.items():
            if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[0] != x.shape[0]:
                raise ValueError(f"metadata {k!r} must be a tensor with {x.shape[0]} rows")
        self.x, self.y, self.meta = x, y, meta
        self.name = name
        if num_classes is None and not y.is_floating_point() and y.numel():
            num_classes = int(y.max()) + 1
        elif num_classes is not None and not y.is_floating_point() and y.numel():
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= num_classes:
                raise ValueError(f"{name}: class labels must lie in 0..{num_classes - 1}, found {lo}..{hi}")
        self.num_classes = num_classes

    def __len__(self) -> int:
        return self.x.shape[0]

    def __repr__(self) -> str:
        meta = ", ".join(self.meta)
        return f"Dataset({self.name!r}, n={len(self)}, x={tuple(self.x.shape[1:])}, classes={self.num_classes}, meta=[{meta}])"

    def __getattr__(self, item):
        meta = self.__dict__.get("meta", {})
        if item in meta:
            return meta[item]
        raise AttributeError(f"Dataset has no attribute or metadata {item!r}")

    def __getitem__(self, idx):
        if isinstance(idx, int):
            return self.x[idx], self.y[idx]
        if isinstance(idx, (list, tuple)):
            idx = torch.as_tensor(idx, dtype=torch.long)
        if isinstance(idx, torch.Tensor) and idx.dtype == torch.bool and idx.shape != (len(self),):
            raise ValueError(f"a boolean mask must have shape ({len(self)},), got {tuple(idx.shape)}")
        return Dataset(self.x[idx], self.y[idx], {k: v[idx] for k, v in self.meta.items()},
                       num_classes=self.num_classes, name=self.name)

    def with_meta(self, **meta: torch.Tensor) -> "Dataset":
        """A copy with extra (or replaced) metadata."""
        return Dataset(self.x, self.y, {**self.meta, **meta}, num_classes=self.num_classes, name=self.name)

    def replace(self, *, x: torch.Tensor | None = None, y: torch.Tensor | None = None, **meta) -> "Dataset":
        return Dataset(self.x if x is None else x, self.y if y is None else y, {**self.meta, **meta},
                       num_classes=self.num_classes, name=self.name)

    def to(self, device) -> "Dataset":
        return Dataset(self.x.to(device), self.y.to(device), {k: v.to(device) for k, v in self.meta.items()},
                       num_classes=self.num_classes, name=self.name)

    def loader(self, batch_size: int = 256, *, shuffle: bool = False, seed: int | None = None,
               drop_last: bool = False) -> "TensorLoader":
        """An iterable of `(x, y, index)` batches (re-iterable; a new permutation each epoch when shuffled).

        Args:
            batch_size: examples per batch.
            shuffle: permute the examples each epoch.
            seed: the permutation seed (epoch e uses `seed + e`).
            drop_last: drop a last, smaller batch.

        Returns:
            A [TensorLoader][lazyhasty.data.TensorLoader].
        """
        return TensorLoader(self, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)

    def __iter__(self):
        # A Dataset passed where a loader is expected yields input batches of 1024 examples.
        from .._loaders import DEFAULT_BATCH_SIZE

        return iter(self.loader(DEFAULT_BATCH_SIZE))


class TensorLoader:
    """Batches `(x, y, index)` of a [Dataset][lazyhasty.data.Dataset]; deterministic given `seed`.

    Epoch e of a shuffled loader uses the permutation of `seed + e`.

    Args:
        ds: the [Dataset][lazyhasty.data.Dataset].
        batch_size: examples per batch, `>= 1`.
        shuffle: permute the examples each epoch.
        seed: the permutation seed.
        drop_last: drop a last, smaller batch.

    Raises:
        ValueError: `batch_size < 1`.

    Example:
        >>> loader = TensorLoader(yinyang(250, seed=0), 100, shuffle=True, seed=0)
        >>> [len(index) for _, _, index in loader]
        [100, 100, 50]
    """

    def __init__(self, ds: Dataset, batch_size: int, *, shuffle: bool = False, seed: int | None = None,
                 drop_last: bool = False):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.ds, self.batch_size, self.shuffle, self.drop_last = ds, batch_size, shuffle, drop_last
        self.seed = 0 if seed is None else seed
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self.ds)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        n = len(self.ds)
        if not self.shuffle:
            return torch.arange(n)
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(n, generator=g)

    def batches(self, epoch: int):
        idx = self.order(epoch)
        for start in range(0, len(idx), self.batch_size):
            b = idx[start:start + self.batch_size]
            if self.drop_last and b.numel() < self.batch_size:
                break
            bd = b.to(self.ds.x.device)
            yield self.ds.x[bd], self.ds.y[bd], b

    def __iter__(self):
        it = self.batches(self.epoch)
        self.epoch += 1
        return it
