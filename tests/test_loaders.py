"""The torchvision datasets through their real loading code, on tiny files written in each on-disk format.

CIFAR and SVHN verify published MD5 sums of the real archives; fabricated files cannot match them, so
only that integrity check is bypassed here: the parsing code is torchvision's own.
"""

import pickle
import struct

import numpy as np
import pytest
import torch

from runner.data import DatasetUnavailable, InMemoryLoader, load_splits

N_TRAIN, N_TEST = 40, 12


def write_idx(root, folder, prefix_train, prefix_test, rng):
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    for prefix, n in ((prefix_train, N_TRAIN), (prefix_test, N_TEST)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        header = struct.pack(">iiii", 2051, n, 28, 28)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">ii", 2049, n) + labels.tobytes())


def write_cifar(root, name, rng):
    if name == "cifar10":
        folder, files, key = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "labels"
        test_file, meta = "test_batch", ("batches.meta", {"label_names": [str(i) for i in range(10)]})
    else:
        folder, files, key = root / "cifar-100-python", ["train"], "fine_labels"
        test_file, meta = "test", ("meta", {"fine_label_names": [str(i) for i in range(100)]})
    folder.mkdir(parents=True)
    per_file = N_TRAIN // len(files)
    for fname, n in [(f, per_file) for f in files] + [(test_file, N_TEST)]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: list(np.arange(n) % 10)}
        (folder / fname).write_bytes(pickle.dumps(batch))
    (folder / meta[0]).write_bytes(pickle.dumps(meta[1]))


def write_svhn(root, rng):
    from scipy.io import savemat

    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).reshape(-1, 1)  # SVHN stores digit 0 as label 10
        savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})


@pytest.mark.parametrize(
    "name, shape",
    [("mnist", (1, 28, 28)), ("fashion_mnist", (1, 28, 28)), ("cifar10", (3, 32, 32)),
     ("cifar100", (3, 32, 32)), ("svhn", (3, 32, 32))],
)
def test_torchvision_loaders_on_fabricated_files(compose_cfg, tmp_path, monkeypatch, name, shape):
    from torchvision import datasets

    rng = np.random.default_rng(0)
    if name in ("mnist", "fashion_mnist"):
        write_idx(tmp_path, "MNIST" if name == "mnist" else "FashionMNIST", "train", "t10k", rng)
    elif name == "svhn":
        write_svhn(tmp_path, rng)
        monkeypatch.setattr(datasets.SVHN, "_check_integrity", lambda self: True)
    else:
        write_cifar(tmp_path, name, rng)
        monkeypatch.setattr(datasets.CIFAR10, "_check_integrity", lambda self: True)
        monkeypatch.setattr(datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    cfg = compose_cfg(f"dataset={name}", f"dataset.data_dir={tmp_path}", "dataset.download=false",
                      "dataset.val_size=10")
    splits = load_splits(cfg.dataset)
    x, y = splits.train
    assert x.dtype == torch.uint8 and tuple(x.shape[1:]) == shape and len(y) == N_TRAIN - 10
    assert len(splits.val[1]) == 10 and len(splits.test[1]) == N_TEST
    assert y.dtype == torch.int64 and 0 <= y.min() and y.max() <= 9
    loader = InMemoryLoader(x, y, 8, torch.device("cpu"), augment=cfg.dataset.augment)
    xb, yb = next(iter(loader))
    assert xb.dtype == torch.float32 and 0 <= xb.min() and xb.max() <= 1 and xb.shape[1:] == shape


def test_missing_dataset_offline_says_where_to_put_it(compose_cfg, tmp_path):
    cfg = compose_cfg("dataset=cifar10", f"dataset.data_dir={tmp_path}", "dataset.download=false")
    with pytest.raises(DatasetUnavailable, match="data_dir"):
        load_splits(cfg.dataset)


def test_loader_order_depends_only_on_seed_and_epoch():
    x, y = torch.rand(50, 1, 8, 8), torch.arange(50)
    a = InMemoryLoader(x, y, 10, torch.device("cpu"), augment="crop_flip", seed=3)
    b = InMemoryLoader(x, y, 10, torch.device("cpu"), augment="crop_flip", seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    b.set_epoch(3)
    assert not torch.equal(next(iter(a))[1], next(iter(b))[1])


def test_crop_keeps_content_and_flip_mirrors():
    from runner.data import augment_batch

    x = torch.rand(16, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    cropped = augment_batch(x, "crop", 0, g)  # zero padding: the crop is the image itself
    assert torch.equal(cropped, x)
    out = augment_batch(x, "crop_flip", 0, g)
    assert all(torch.equal(o, i) or torch.equal(o, i.flip(2)) for o, i in zip(out, x))


@pytest.mark.parametrize("mode", ["zeros", "edge", "reflect"])
def test_crop_loop_on_8_bit_images_is_bitwise_the_gather_path(mode, monkeypatch):
    """On a CPU, 8-bit crops take one numba loop; it gives the gather path's bits (flipped or not, every
    padding mode), both are the crop read pixel by pixel, and a window outside the images is refused."""
    from runner import data

    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (7, 3, 6, 5), dtype=torch.uint8, generator=g)
    windows = data.CropWindows(x, 2, mode)
    idx = torch.tensor([6, 0, 3, 3, 1])
    top, left = torch.tensor([0, 4, 2, 1, 4]), torch.tensor([4, 0, 1, 3, 2])
    flip = torch.tensor([True, False, True, False, False])
    assert data._crop_loop() is not None, "numba is a dependency: the loop must be available"
    looped = [windows(idx, top, left, flip), windows(idx, top, left)]
    monkeypatch.setattr(data, "_crop_loop", lambda: None)
    gathered = [windows(idx, top, left, flip), windows(idx, top, left)]
    for ours, reference in zip(looped, gathered, strict=True):
        assert ours.dtype == torch.float32 and torch.equal(ours, reference)
    for crop, i, row, col, flipped in zip(looped[0], idx, top, left, flip):
        window = data.to_float(windows.padded[i, :, row : row + 6, col : col + 5])
        assert torch.equal(crop, window.flip(-1) if flipped else window)
    monkeypatch.undo()
    with pytest.raises(IndexError):
        windows(idx, top + 1, left)  # the last window's rows run past the padded image
    with pytest.raises(IndexError):
        windows(torch.tensor([7]), top[:1], left[:1])
