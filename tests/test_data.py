"""lazyhasty.data: formulas, rates, determinism, the official C-score file, bad paths and corrupt files."""
import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lazyhasty import data as D

CSCORES = next((p / "shared" / "data" / "cifar10-cscores-orig-order.npz" for p in Path(__file__).resolve().parents
                if (p / "shared" / "data" / "cifar10-cscores-orig-order.npz").exists()),
               Path("../shared/data/cifar10-cscores-orig-order.npz"))


def test_yinyang_formula_and_noise():
    pts = torch.tensor([[0.5, -0.5], [0.5, 0.5], [-0.5, 0.5], [-0.5, -0.5], [0.5, -0.25], [0.9, 0.0]])
    assert D.yinyang_labels(pts).tolist() == [-1.0, -1.0, 1.0, 1.0, -1.0, 1.0]
    ds = D.yinyang(1000, seed=3, label_noise=0.15)
    assert ds.x.shape == (1000, 2) and ds.x.abs().max() <= 1
    assert torch.equal(D.yinyang_labels(ds.x), ds.y_clean)
    assert int(ds.noisy.sum()) == 150
    assert torch.equal(ds.y[ds.noisy], -ds.y_clean[ds.noisy]) and torch.equal(ds.y[~ds.noisy], ds.y_clean[~ds.noisy])
    again = D.yinyang(1000, seed=3, label_noise=0.15)
    assert torch.equal(again.x, ds.x) and torch.equal(again.noisy, ds.noisy)
    assert not torch.equal(D.yinyang(1000, seed=4).x, ds.x)
    with pytest.raises(ValueError, match="label_noise"):
        D.yinyang(10, seed=0, label_noise=1.5)


def test_yinyang_grid():
    g = D.yinyang_grid(5)
    assert g.x.shape == (25, 2)
    assert g.x[0].tolist() == [-1.0, -1.0] and g.x[4].tolist() == [1.0, -1.0] and g.x[-1].tolist() == [1.0, 1.0]
    assert torch.equal(g.y, D.yinyang_labels(g.x))


def test_yinyang_kriener():
    ds = D.yinyang_kriener(3000, seed=0)
    assert ds.x.shape == (3000, 4) and ds.num_classes == 3
    assert torch.allclose(ds.x[:, 0] + ds.x[:, 2], torch.ones(3000))
    xy = ds.x[:, :2]
    assert ((xy - 0.5) ** 2).sum(1).sqrt().max() <= 0.5 + 1e-6
    from lazyhasty.data.toy import _kriener_class
    assert torch.equal(_kriener_class(xy[:, 0], xy[:, 1], 0.1, 0.5), ds.y)
    counts = torch.bincount(ds.y, minlength=3)
    assert counts.min() > 900  # class-balanced draws
    assert torch.equal(D.yinyang_kriener(50, seed=1).x, D.yinyang_kriener(50, seed=1).x)


def test_dataset_slicing_and_loader():
    ds = D.yinyang(100, seed=0, label_noise=0.1)
    sub = ds[10:20]
    assert len(sub) == 10 and torch.equal(sub.noisy, ds.noisy[10:20])
    assert len(ds[ds.noisy]) == 10
    x0, y0 = ds[0]
    assert x0.shape == (2,)
    batches = list(ds.loader(batch_size=33, shuffle=True, seed=1))
    assert [b[0].shape[0] for b in batches] == [33, 33, 33, 1]
    idx = torch.cat([b[2] for b in batches])
    assert sorted(idx.tolist()) == list(range(100))
    loader = ds.loader(batch_size=50, shuffle=True, seed=1)
    e0 = torch.cat([b[2] for b in loader])
    e1 = torch.cat([b[2] for b in loader])
    assert not torch.equal(e0, e1)  # a new permutation each epoch
    assert torch.equal(e0, torch.cat([b[2] for b in ds.loader(batch_size=50, shuffle=True, seed=1)]))
    with pytest.raises(ValueError, match="rows"):
        D.Dataset(torch.zeros(3, 2), torch.zeros(3), {"bad": torch.zeros(4)})
    with pytest.raises(AttributeError):
        ds.nothing


def test_digits():
    pytest.importorskip("sklearn")
    ds = D.digits()
    assert ds.x.shape == (1797, 1, 8, 8) and ds.x.min() >= 0 and ds.x.max() <= 1
    assert ds.num_classes == 10 and ds.y.dtype == torch.long


def _write_idx(path: Path, arr: np.ndarray, code: int, gz: bool):
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload = header + arr.astype(arr.dtype.newbyteorder(">") if arr.dtype.itemsize > 1 else arr.dtype).tobytes()
    (gzip.open if gz else open)(path, "wb").write(payload)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_idx(tmp_path, gz):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labs = rng.integers(0, 10, size=7, dtype=np.uint8)
    ext = ".gz" if gz else ""
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{ext}", imgs, 0x08, gz)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{ext}", labs, 0x08, gz)
    ds = D.fashion_mnist(tmp_path, split="test")
    assert ds.x.shape == (7, 1, 28, 28)
    assert torch.allclose(ds.x[:, 0] * 255, torch.from_numpy(imgs.astype(np.float32)))
    assert ds.y.tolist() == labs.tolist()


def test_fashion_mnist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        D.fashion_mnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3I", 5, 28, 28) + b"\0" * 10)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 5) + b"\0" * 5)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        D.fashion_mnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(ValueError, match="magic"):
        D.fashion_mnist(tmp_path)
    with pytest.raises(ValueError, match="split"):
        D.fashion_mnist(tmp_path, split="val")


def test_fashion_mnist_debian_package_if_installed():
    try:
        ds = D.fashion_mnist(split="test")
    except FileNotFoundError:
        pytest.skip("Debian's dataset-fashion-mnist is not installed here")
    assert ds.x.shape == (10000, 1, 28, 28) and ds.num_classes == 10


def test_cifar10_layout_and_restricted_unpickler(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"data": rng.integers(0, 256, size=(4, 3072), dtype=np.uint8), b"labels": [1, 2, 3, 4]}
        (base / name).write_bytes(pickle.dumps(d))
    ds = D.cifar10(tmp_path, "train")
    assert ds.x.shape == (20, 3, 32, 32) and ds.y.tolist()[:4] == [1, 2, 3, 4]

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, ("echo pwned",))
    (base / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(ValueError, match="refusing"):
        D.cifar10(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        D.cifar10(tmp_path / "nowhere")


def test_celeba_and_waterbirds_layouts(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    c = tmp_path / "celeba"
    (c / "img_align_celeba").mkdir(parents=True)
    names = ["000001.jpg", "000002.jpg", "000003.jpg"]
    for i, nm in enumerate(names):
        Image.new("RGB", (20, 24), (80 * i, 10, 10)).save(c / "img_align_celeba" / nm)
    (c / "list_attr_celeba.txt").write_text("3\nBlond_Hair Male Smiling\n" + "\n".join(
        f"{nm} {b} {m} 1" for nm, b, m in zip(names, (1, -1, 1), (-1, 1, 1))) + "\n")
    (c / "list_eval_partition.txt").write_text("\n".join(f"{nm} {p}" for nm, p in zip(names, (0, 0, 2))))
    ds = D.celeba(tmp_path, "train", image_size=16)
    assert ds.x.shape == (2, 3, 16, 16) and ds.y.tolist() == [1, 0] and ds.male.tolist() == [False, True]
    assert ds.groups.tolist() == [2, 1]
    with pytest.raises(FileNotFoundError, match="list_attr_celeba"):
        D.celeba(tmp_path / "x")
    w = tmp_path / "wb"
    (w / "001.Bird").mkdir(parents=True)
    rows = []
    for i in range(4):
        Image.new("RGB", (10, 10)).save(w / "001.Bird" / f"{i}.jpg")
        rows.append(f"{i},001.Bird/{i}.jpg,{i % 2},0,{(i // 2) % 2}")
    (w / "metadata.csv").write_text("img_id,img_filename,y,split,place\n" + "\n".join(rows) + "\n")
    ds = D.waterbirds(w, image_size=8)
    assert ds.x.shape == (4, 3, 8, 8) and ds.groups.tolist() == [0, 2, 1, 3]
    assert ds.spurious.tolist() == [True, False, False, True]
    with pytest.raises(FileNotFoundError, match="metadata.csv"):
        D.waterbirds(tmp_path)


def test_label_noise_rate_and_uniform_other_classes():
    ds = D.Dataset(torch.zeros(20000, 1), torch.arange(20000) % 4, num_classes=4)
    noisy = D.with_label_noise(ds, 0.15, seed=0)
    assert int(noisy.noisy.sum()) == 3000
    assert torch.equal(noisy.y_clean, ds.y)
    assert bool((noisy.y[noisy.noisy] != ds.y[noisy.noisy]).all())
    assert torch.equal(noisy.y[~noisy.noisy], ds.y[~noisy.noisy])
    shifts = torch.bincount(((noisy.y - ds.y) % 4)[noisy.noisy], minlength=4)
    assert shifts[0] == 0 and shifts[1:].min() > 900  # uniform over the 3 other classes
    assert torch.equal(D.with_label_noise(ds, 0.15, seed=0).y, noisy.y)
    with pytest.raises(ValueError, match="rate"):
        D.with_label_noise(ds, -0.1, seed=0)


@pytest.mark.skipif(not CSCORES.exists(), reason="official C-score file not in ../shared/data")
def test_official_cscores():
    cs = D.load_cscores(CSCORES)
    assert cs.scores.shape == (50000,) and cs.labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert 0 <= float(cs.scores.min()) and float(cs.scores.max()) <= 1
    fake = D.Dataset(torch.zeros(50000, 1), cs.labels.clone(), num_classes=10)
    assert torch.equal(cs.attach(fake).cscore, cs.scores)
    fake.y[3] = (fake.y[3] + 1) % 10
    with pytest.raises(ValueError, match="disagree"):
        cs.check(fake)


def test_cscore_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        D.load_cscores(tmp_path / "none.npz")
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(ValueError, match="not a readable"):
        D.load_cscores(tmp_path / "corrupt.npz")
    np.savez(tmp_path / "obj.npz", labels=np.array([1, 2], dtype=object), scores=np.array([0.1, 0.2]))
    with pytest.raises(ValueError):
        D.load_cscores(tmp_path / "obj.npz")
    np.savez(tmp_path / "keys.npz", y=np.array([1]))
    with pytest.raises(ValueError, match="labels"):
        D.load_cscores(tmp_path / "keys.npz")


def test_estimated_cscores_rank_noisy_examples_low():
    pytest.importorskip("sklearn")
    from torch import nn

    ds = D.with_label_noise(D.digits()[:600], 0.15, seed=0)
    cs = D.estimate_cscores(ds, lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), ratios=(0.5, 0.8), runs=3,
                            epochs=15, seed=0)
    assert cs.scores.shape == (600,) and float(cs.scores.min()) >= 0 and float(cs.scores.max()) <= 1
    assert float(cs.scores[ds.noisy].mean()) < 0.5 * float(cs.scores[~ds.noisy].mean())


def test_difficulty_groups_and_balanced_subsample():
    scores = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    g = D.difficulty_groups(scores, bins=10)
    assert torch.bincount(g).tolist() == [100] * 10
    means = [float(scores[g == b].mean()) for b in range(10)]
    assert means == sorted(means)
    idx = D.balanced_subsample(g, 30, seed=0)
    assert torch.bincount(g[idx]).tolist() == [30] * 10
    with pytest.raises(ValueError, match="fewer than"):
        D.balanced_subsample(g, 101, seed=0)


@pytest.mark.parametrize("kind", ["patch", "color"])
def test_spurious_feature(kind):
    ds = D.Dataset(torch.zeros(400, 1, 8, 8), torch.arange(400) % 2, num_classes=2)
    sp = D.with_spurious_feature(ds, kind, agreement=0.95, seed=0)
    assert int((~sp.agrees).sum()) == 20
    assert torch.equal(sp.groups, sp.y * 2 + sp.spurious)
    if kind == "patch":
        assert sp.x.shape == ds.x.shape
        left = sp.x[:, 0, :2, :2].amax((1, 2)) > 0  # s = 0: patch on the left
        assert torch.equal(left, sp.spurious == 0)
    else:
        assert sp.x.shape == (400, 3, 8, 8)
    bal = D.balanced_groups(sp, 5, seed=0)
    assert torch.bincount(bal.groups, minlength=4).tolist() == [5, 5, 5, 5]
    with pytest.raises(ValueError, match="kind"):
        D.with_spurious_feature(ds, "texture", seed=0)
    with pytest.raises(ValueError, match="images"):
        D.with_spurious_feature(D.Dataset(torch.zeros(4, 2), torch.arange(4) % 2), seed=0)
