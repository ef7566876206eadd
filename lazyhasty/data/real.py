"""Real datasets read from local files (nothing is downloaded).

* [digits][lazyhasty.data.digits]: scikit-learn's bundled 8x8 digits (1797 images), `x` `[n, 1, 8, 8]` in [0, 1].
* [fashion_mnist][lazyhasty.data.fashion_mnist]: IDX files (gzipped or not); default root: Debian's
  `dataset-fashion-mnist`.
* [cifar10][lazyhasty.data.cifar10]: torchvision's `cifar-10-batches-py` layout (read with a restricted
  unpickler).
* [celeba][lazyhasty.data.celeba]: attributes + partition files and aligned images; task: blond, group: gender.
* [waterbirds][lazyhasty.data.waterbirds]: `metadata.csv` + images; task: water bird, group: bird type x
  background.
"""
from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import torch

from ._dataset import Dataset

FASHION_MNIST_ROOTS = ("/usr/share/datasets/fashion-mnist", "/usr/share/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")


def digits() -> Dataset:
    """scikit-learn's 8x8 digits: 1797 images `[n, 1, 8, 8]` scaled to [0, 1], labels 0-9.

    Returns:
        The [Dataset][lazyhasty.data.Dataset].

    Raises:
        ImportError: scikit-learn is not installed (`pip install 'lazyhasty[data]'`).

    Example:
        >>> ds = digits()
        >>> ds.x.shape, ds.num_classes
        (torch.Size([1797, 1, 8, 8]), 10)
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError("digits() needs scikit-learn: pip install 'lazyhasty[data]'") from exc
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return Dataset(x, torch.tensor(d.target, dtype=torch.long), num_classes=10, name="digits")


# --- IDX (MNIST family) ---------------------------------------------------------------------------
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def check_labels(labels: np.ndarray, num_classes: int, where) -> np.ndarray:
    """Integer class labels in ``0..num_classes-1`` as int64, or an error naming ``where``."""
    labels = np.asarray(labels)
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            bad = labels[~np.isfinite(labels) | (labels != np.round(labels))][:3].tolist()
            raise ValueError(f"{where}: labels must be integers, got non-integer values (e.g. {bad})")
    elif labels.dtype.kind not in "iu":
        raise ValueError(f"{where}: labels must be integers, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise ValueError(f"{where}: labels must lie in 0..{num_classes - 1}, found {bad[:3].tolist()}")
    return labels.astype(np.int64)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (`.gz` or raw) into a numpy array.

    Args:
        path: the IDX file.

    Returns:
        The array, of the shape and dtype its header gives.

    Raises:
        ValueError: the file is not IDX, or its header and payload disagree (truncated or corrupt).
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: cannot read IDX file ({exc})") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = math.prod(shape) * dtype.itemsize  # Python ints: a corrupt header cannot overflow
    if len(data) - header != expected:
        raise ValueError(f"{path}: IDX payload has {len(data) - header} bytes, its header {tuple(shape)} says "
                         f"{expected} (corrupt or truncated)")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (root / name).exists():
            return root / name
    return None


def fashion_mnist(root: str | os.PathLike | None = None, split: str = "train") -> Dataset:
    """Fashion-MNIST from IDX files: `x` `[n, 1, 28, 28]` in [0, 1], labels 0-9.

    Args:
        root: folder with `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`; default: Debian's
            `dataset-fashion-mnist` package location (`apt-get install dataset-fashion-mnist`).
        split: `"train"` or `"test"`.

    Returns:
        The [Dataset][lazyhasty.data.Dataset].

    Raises:
        ValueError: an unknown `split`.
        FileNotFoundError: no IDX files under `root`.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    roots = [Path(root)] if root is not None else [Path(r) for r in FASHION_MNIST_ROOTS]
    prefix = "train" if split == "train" else "t10k"
    for r in roots:
        img, lab = _find(r, f"{prefix}-images-idx3-ubyte"), _find(r, f"{prefix}-labels-idx1-ubyte")
        if img and lab:
            images, labels = read_idx(img), read_idx(lab)
            if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
                raise ValueError(f"{r}: images {images.shape} and labels {labels.shape} do not match")
            if images.dtype != np.uint8:
                raise ValueError(f"{img}: Fashion-MNIST images must be unsigned bytes (0-255), got {images.dtype}")
            x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
            y = check_labels(labels, 10, lab)
            return Dataset(x, torch.from_numpy(y), num_classes=10, name=f"fashion-mnist-{split}")
    where = root if root is not None else " or ".join(FASHION_MNIST_ROOTS)
    raise FileNotFoundError(
        f"Fashion-MNIST IDX files not found in {where}: expected {prefix}-images-idx3-ubyte[.gz] and "
        f"{prefix}-labels-idx1-ubyte[.gz]. Install Debian's package (apt-get install dataset-fashion-mnist) "
        "or pass root= to a folder holding the files from the Fashion-MNIST release."
    )


# --- CIFAR-10 (torchvision layout) ----------------------------------------------------------------
class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles of dicts of bytes/lists/numpy arrays; refuse anything else."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")


def cifar10(root: str | os.PathLike, split: str = "train") -> Dataset:
    """CIFAR-10 from torchvision's layout: `root/cifar-10-batches-py/{data_batch_1..5,test_batch}`.

    The batch files are read with an unpickler that accepts numpy arrays only.

    Args:
        root: the folder holding `cifar-10-batches-py`.
        split: `"train"` (50000 images, torchvision's order: the official C-scores' order) or `"test"`.

    Returns:
        The [Dataset][lazyhasty.data.Dataset]: `x` `[n, 3, 32, 32]` in [0, 1], labels 0-9.

    Raises:
        ValueError: an unknown `split`, or a malformed batch file.
        FileNotFoundError: no batch files under `root`.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    base = Path(root)
    if (base / "cifar-10-batches-py").is_dir():
        base = base / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [n for n in names if not (base / n).exists()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 not found under {root}: expected root/cifar-10-batches-py/{{data_batch_1..5, test_batch}} "
            f"(torchvision's layout, from cifar-10-python.tar.gz); missing {missing}"
        )
    xs, ys = [], []
    for n in names:
        with open(base / n, "rb") as f:
            try:
                d = _NumpyOnlyUnpickler(f, encoding="latin1").load()
            except Exception as exc:  # noqa: BLE001
                raise ValueError(f"{base / n}: not a CIFAR-10 batch file ({exc})") from exc
        data = d.get("data", d.get(b"data"))
        labels = d.get("labels", d.get(b"labels"))
        if data is None or labels is None:
            raise ValueError(f"{base / n}: no 'data'/'labels' entries")
        data = np.asarray(data)
        if data.dtype != np.uint8:  # a cast would wrap out-of-range values silently (1e6 -> 0.25)
            if data.dtype.kind not in "iuf" or data.size and (data.min() < 0 or data.max() > 255 or (
                    data.dtype.kind == "f" and not np.all(data == np.round(data)))):
                raise ValueError(f"{base / n}: pixel values must be integers in 0..255 (got dtype {data.dtype}, "
                                 f"range {data.min() if data.size else '-'}..{data.max() if data.size else '-'})")
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{base / n}: 'data' must be [n, 3072], got {data.shape}")
        labels = check_labels(labels, 10, base / n)
        if labels.shape != (data.shape[0],):
            raise ValueError(f"{base / n}: {data.shape[0]} images but labels of shape {labels.shape}")
        xs.append(data.astype(np.uint8).reshape(-1, 3, 32, 32))
        ys.append(labels)
    x = torch.from_numpy(np.concatenate(xs).astype(np.float32) / 255.0)
    return Dataset(x, torch.from_numpy(np.concatenate(ys)), num_classes=10, name=f"cifar10-{split}")


# --- images from files (CelebA, Waterbirds) ---------------------------------------------------------
def _load_images(paths: list[Path], size: int) -> torch.Tensor:
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError("reading image files needs Pillow (pip install pillow)") from exc
    out = torch.empty(len(paths), 3, size, size)
    for i, p in enumerate(paths):
        if not p.exists():
            raise FileNotFoundError(f"image file {p} is missing")
        with Image.open(p) as im:
            im = im.convert("RGB").resize((size, size), Image.BILINEAR)
            out[i] = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return out


def _pick(n: int, max_examples: int | None, seed: int) -> np.ndarray:
    idx = np.arange(n)
    if max_examples is not None and max_examples < n:
        idx = np.sort(np.random.default_rng(seed).choice(n, size=max_examples, replace=False))
    return idx


def celeba(root: str | os.PathLike, split: str = "train", *, image_size: int = 64,
           max_examples: int | None = None, seed: int = 0) -> Dataset:
    """CelebA, task "blond" (`Blond_Hair`), group: gender (`Male`); the paper's spurious setup.

    Args:
        root: `root/list_attr_celeba.txt`, `root/list_eval_partition.txt`, `root/img_align_celeba/*.jpg`
            (`root/celeba/...` also accepted).
        split: `"train"`, `"valid"` or `"test"`.
        image_size: images are resized to `[3, image_size, image_size]`.
        max_examples: keep at most this many random examples of the split.
        seed: which examples `max_examples` keeps.

    Returns:
        The [Dataset][lazyhasty.data.Dataset], with metadata `male` (bool) and `groups` = 2 blond + male.

    Raises:
        ValueError: an unknown `split`, or a malformed attribute / partition file.
        FileNotFoundError: the files are missing.
        ImportError: Pillow is not installed.
    """
    splits = {"train": 0, "valid": 1, "test": 2}
    if split not in splits:
        raise ValueError(f"split must be one of {list(splits)}, got {split!r}")
    base = Path(root)
    if (base / "celeba").is_dir():
        base = base / "celeba"
    attr, part, imgs = base / "list_attr_celeba.txt", base / "list_eval_partition.txt", base / "img_align_celeba"
    if not (attr.exists() and part.exists() and imgs.is_dir()):
        raise FileNotFoundError(
            f"CelebA not found under {root}: expected list_attr_celeba.txt, list_eval_partition.txt and "
            "img_align_celeba/ (the official aligned-and-cropped release)"
        )
    lines = attr.read_text().split("\n")
    try:
        header = lines[1].split()
        rows = [ln.split() for ln in lines[2:] if ln.strip()]
        names = [r[0] for r in rows]
        values = np.array([[int(v) for v in r[1:]] for r in rows])
        blond, male = values[:, header.index("Blond_Hair")] > 0, values[:, header.index("Male")] > 0
        partition = dict(ln.split() for ln in part.read_text().split("\n") if ln.strip())
    except (IndexError, ValueError) as exc:
        raise ValueError(f"{attr}: malformed CelebA attribute/partition file ({exc})") from exc
    keep = np.array([int(partition.get(nm, -1)) == splits[split] for nm in names])
    sel = np.flatnonzero(keep)
    sel = sel[_pick(sel.size, max_examples, seed)]
    x = _load_images([imgs / names[i] for i in sel], image_size)
    y = torch.from_numpy(blond[sel].astype(np.int64))
    m = torch.from_numpy(male[sel])
    return Dataset(x, y, {"male": m, "groups": 2 * y + m.long()}, num_classes=2, name=f"celeba-{split}")


def waterbirds(root: str | os.PathLike, split: str = "train", *, image_size: int = 64,
               max_examples: int | None = None, seed: int = 0) -> Dataset:
    """Waterbirds (Sagawa et al. 2020): `root/metadata.csv` (img_filename, y, split, place) + images.

    Args:
        root: the folder holding `metadata.csv` and the images.
        split: `"train"`, `"valid"` or `"test"`.
        image_size: images are resized to `[3, image_size, image_size]`.
        max_examples: keep at most this many random examples of the split.
        seed: which examples `max_examples` keeps.

    Returns:
        The [Dataset][lazyhasty.data.Dataset]: label 1 = water bird; metadata `place` (1 = water
        background), `groups` = 2 y + place and `spurious` = (y == place), the with-spurious-correlation
        examples.

    Raises:
        ValueError: an unknown `split`, or `metadata.csv` without the needed columns.
        FileNotFoundError: the files are missing.
        ImportError: Pillow is not installed.
    """
    import csv

    splits = {"train": 0, "valid": 1, "test": 2}
    if split not in splits:
        raise ValueError(f"split must be one of {list(splits)}, got {split!r}")
    base = Path(root)
    meta = base / "metadata.csv"
    if not meta.exists():
        raise FileNotFoundError(
            f"Waterbirds not found under {root}: expected metadata.csv with columns img_filename, y, split, place "
            "and the image folders it names (the waterbird_complete95_forest2water2 release)"
        )
    with open(meta, newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"img_filename", "y", "split", "place"}
    if not rows or not need <= set(rows[0]):
        raise ValueError(f"{meta}: needs columns {sorted(need)}")
    rows = [r for r in rows if int(r["split"]) == splits[split]]
    rows = [rows[i] for i in _pick(len(rows), max_examples, seed)]
    x = _load_images([base / r["img_filename"] for r in rows], image_size)
    y = torch.tensor([int(r["y"]) for r in rows], dtype=torch.long)
    place = torch.tensor([int(r["place"]) for r in rows], dtype=torch.long)
    return Dataset(x, y, {"place": place, "groups": 2 * y + place, "spurious": y == place}, num_classes=2,
                   name=f"waterbirds-{split}")
