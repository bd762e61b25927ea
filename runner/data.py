"""Datasets as in-memory tensors, and a loader that shuffles and augments on the training device.

Every split is N×C×H×W. Images are kept as uint8 when the source is 8-bit (4x less memory, on the GPU
too) and become float in [0, 1] per batch. The test split and the validation split cut from training
are fixed by a constant seed, never by the training seed, so every run is scored on the same points.
"""

import contextlib
import dataclasses
import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from runner import compiled

SPLIT_SEED = 0  # fixes test/validation membership for every run, whatever its training seed


class DatasetUnavailable(RuntimeError):
    """The files are not there and could not be downloaded; the message says where to put them."""


@dataclass(frozen=True)
class DatasetInfo:
    channels: int
    image_size: int
    num_classes: int
    mean: tuple
    std: tuple


INFO = {
    "digits": DatasetInfo(1, 8, 10, (0.3050,), (0.3804,)),
    "mnist": DatasetInfo(1, 28, 10, (0.1307,), (0.3081,)),
    "fashion_mnist": DatasetInfo(1, 28, 10, (0.2860,), (0.3530,)),
    "cifar10": DatasetInfo(3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": DatasetInfo(3, 32, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": DatasetInfo(3, 32, 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}


def dataset_info(cfg) -> DatasetInfo:
    """cfg: the `dataset` config node. `dataset.mean` / `dataset.std`, when set, replace the dataset's
    own normalisation constants (a config saved before those keys existed has neither)."""
    if cfg.name == "synthetic":
        c = cfg.channels
        info = DatasetInfo(c, cfg.image_size, cfg.num_classes, (0.5,) * c, (0.25,) * c)
    else:
        info = INFO[cfg.name]
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is not None:
        info = dataclasses.replace(info, mean=tuple(float(v) for v in mean))
    if std is not None:
        info = dataclasses.replace(info, std=tuple(float(v) for v in std))
    return info


@dataclass
class Splits:
    train: tuple  # (x, y)
    val: tuple
    test: tuple
    info: DatasetInfo
    flipped: torch.Tensor | None = None  # training points whose label was corrupted


def to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


def _stratified_cut(y: np.ndarray, n_cut: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, cut), the cut holding n_cut points in class proportions."""
    if n_cut <= 0:
        return np.arange(len(y)), np.arange(0)
    from sklearn.model_selection import train_test_split

    kept, cut = train_test_split(np.arange(len(y)), test_size=n_cut, stratify=y, random_state=seed)
    return np.sort(kept), np.sort(cut)


def _digits(cfg):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None]  # pixel values 0..16 -> [0, 1]
    y = bunch.target.astype(np.int64)
    train, test = _stratified_cut(y, cfg.test_size, SPLIT_SEED)
    return (torch.from_numpy(x[train]), torch.from_numpy(y[train])), (
        torch.from_numpy(x[test]),
        torch.from_numpy(y[test]),
    )


def _synthetic(cfg):
    """Class-dependent smooth templates plus noise: learnable, no files, fixed by SPLIT_SEED."""
    g = torch.Generator().manual_seed(SPLIT_SEED)
    c, s, k = cfg.channels, cfg.image_size, cfg.num_classes
    templates = torch.rand(k, c, max(2, s // 4), max(2, s // 4), generator=g)
    templates = torch.nn.functional.interpolate(templates, size=(s, s), mode="bilinear", align_corners=False)
    y = torch.arange(cfg.n_samples) % k
    x = (templates[y] + 0.15 * torch.randn(cfg.n_samples, c, s, s, generator=g)).clamp(0, 1)
    train, test = _stratified_cut(y.numpy(), cfg.test_size, SPLIT_SEED)
    return (x[train], y[train]), (x[test], y[test])


def _torchvision_split(name: str, root: Path, train: bool, download: bool):
    from torchvision import datasets

    if name == "svhn":
        ds = datasets.SVHN(str(root), split="train" if train else "test", download=download)
        return torch.from_numpy(ds.data), torch.from_numpy(ds.labels.astype(np.int64))
    cls = {
        "mnist": datasets.MNIST,
        "fashion_mnist": datasets.FashionMNIST,
        "cifar10": datasets.CIFAR10,
        "cifar100": datasets.CIFAR100,
    }[name]
    ds = cls(str(root), train=train, download=download)
    data, targets = ds.data, ds.targets
    if isinstance(data, np.ndarray):  # CIFAR: N×H×W×C uint8
        x = torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()
    else:  # MNIST family: N×H×W uint8 tensor
        x = data.unsqueeze(1)
    return x, torch.as_tensor(np.asarray(targets), dtype=torch.int64)


@contextlib.contextmanager
def _cache_lock(root: Path, exclusive: bool):
    """Readers share, a downloader excludes (flock on <data_dir>/.robust-train.lock): jobs preparing one
    dataset cache at once download it once and never read it half-written. No lock where none can be
    taken (a read-only data_dir: nobody can be writing it)."""
    try:
        import fcntl

        if exclusive:
            root.mkdir(parents=True, exist_ok=True)
        handle = open(root / ".robust-train.lock", "a")  # noqa: SIM115 - closed below
    except (ImportError, OSError):
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield


def _torchvision(cfg):
    root = Path(cfg.data_dir).expanduser()
    splits = []
    for train in (True, False):
        try:
            with _cache_lock(root, exclusive=False):
                splits.append(_torchvision_split(cfg.name, root, train, download=False))
        except (RuntimeError, FileNotFoundError, OSError):
            if not cfg.download:
                raise DatasetUnavailable(_missing_message(cfg, root, "dataset.download=false")) from None
            try:
                with _cache_lock(root, exclusive=True):
                    try:  # another job may have fetched it while this one waited for the lock
                        splits.append(_torchvision_split(cfg.name, root, train, download=False))
                    except (RuntimeError, FileNotFoundError, OSError):
                        splits.append(_torchvision_split(cfg.name, root, train, download=True))
            except Exception as err:  # network errors come in many types; all mean the same here
                reason = f"download failed: {type(err).__name__}: {err}"
                raise DatasetUnavailable(_missing_message(cfg, root, reason)) from None
    return splits[0], splits[1]


def _missing_message(cfg, root: Path, reason: str) -> str:
    from runner.errors import dataset_missing_message  # runner.errors imports this module

    return dataset_missing_message(cfg.name, root, reason)


LOADERS = {"digits": _digits, "synthetic": _synthetic}


def stream_seed(seed: int, stream: str) -> int:
    """A run's seed for one of its random streams ("label_noise", "train_subset"), drawn from a hash so that
    no stream replays another's numbers: the loader orders epoch e from seed·1_000_003 + e, and a label-noise
    generator seeded with the bare seed put every flipped label at the front of seed 0's first epoch."""
    digest = hashlib.sha256(f"{stream}:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: a valid torch seed


def load_splits(cfg, seed: int = 0) -> Splits:
    """cfg: the `dataset` node. `seed` drives the training subset (dataset.train_fraction) and label noise
    only: validation and test membership never depend on it."""
    if cfg.name not in LOADERS and cfg.name not in INFO:
        known = sorted(set(LOADERS) | set(INFO))
        raise ValueError(f"dataset.name={cfg.name!r} is not a known dataset; choose one of {known}")
    (x, y), test = LOADERS.get(cfg.name, _torchvision)(cfg)
    if cfg.val_size >= len(y):
        raise ValueError(f"dataset.val_size={cfg.val_size} leaves no training data ({len(y)} training points)")
    kept, cut = _stratified_cut(y.numpy(), cfg.val_size, SPLIT_SEED)
    kept, cut = torch.from_numpy(kept), torch.from_numpy(cut)
    train, val = (x[kept], y[kept]), (x[cut], y[cut])
    if cfg.train_fraction < 1:
        size = max(1, round(cfg.train_fraction * len(train[1])))
        generator = torch.Generator().manual_seed(stream_seed(seed, "train_subset"))
        chosen = torch.randperm(len(train[1]), generator=generator)[:size].sort().values
        train = (train[0][chosen], train[1][chosen])
    flipped = None
    if cfg.label_noise > 0:
        from runner.label_noise import corrupt_labels

        info = dataset_info(cfg)
        noisy, flipped = corrupt_labels(train[1], cfg.label_noise, cfg.label_noise_kind, info.num_classes,
                                        stream_seed(seed, "label_noise"), cfg.name)
        train = (train[0], noisy)
    return Splits(train, val, test, dataset_info(cfg), flipped)


def load_dataset(name: str, split: str = "test", **overrides):
    """(x, y) of one split with the dataset's default config: x float in [0, 1], N×C×H×W."""
    from runner.config import compose

    cfg = compose([f"dataset={name}"] + [f"dataset.{k}={v}" for k, v in overrides.items()])
    splits = load_splits(cfg.dataset)
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    x, y = getattr(splits, split)
    return to_float(x), y


class InMemoryLoader:
    """Batches of a tensor dataset that lives on the device: shuffling and augmentation are seeded,
    batched tensor operations, so an epoch's order depends only on (seed, epoch) — which is what makes
    resuming an interrupted run exact.

    Multi-process training (rank, world_size): every process draws the same order and the same
    augmentation for the whole global batch of `batch_size`, and keeps its own contiguous share, so
    the processes together see exactly the batches a single process would. A last global batch
    smaller than world_size would leave a process empty; it is dropped.
    """

    def __init__(self, x, y, batch_size, device, *, shuffle=True, augment="none", padding=4, padding_mode="zeros",
                 seed=0, rank=0, world_size=1):
        if world_size > batch_size:
            raise ValueError(f"train.batch_size={batch_size} is the global batch: it must be at least the "
                             f"number of processes sharing it ({world_size})")
        self.y = y.to(device)
        self.batch_size, self.device = batch_size, device
        self.shuffle, self.augment, self.padding, self.seed = shuffle, augment, padding, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        if augment == "none":
            self.x = x.to(device)
        else:  # pad the stored images once (8-bit when they are), crop windows are then views
            self.crops = CropWindows(x.to(device), padding, padding_mode)

    def __len__(self):
        full, rest = divmod(len(self.y), self.batch_size)
        return full + (rest >= self.world_size)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def _generator(self):
        g = torch.Generator(device=self.device)
        g.manual_seed(self.seed * 1_000_003 + self.epoch)
        return g

    def __iter__(self):
        g = self._generator()
        n = len(self.y)
        order = torch.randperm(n, generator=g, device=self.device) if self.shuffle else None
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            count = min(self.batch_size, n - start)
            lo = start + self.rank * count // self.world_size
            hi = start + (self.rank + 1) * count // self.world_size
            idx = order[lo:hi] if order is not None else torch.arange(lo, hi, device=self.device)
            if self.augment == "none":
                yield to_float(self.x[idx]), self.y[idx]
                continue
            # Draws for the whole global batch, in a fixed order, so every share is the same as one process's.
            top, left, flip = draw_augmentation(count, self.augment, self.padding, g, self.device)
            share = slice(lo - start, hi - start)
            yield self.crops(idx, top[share], left[share], None if flip is None else flip[share]), self.y[idx]


def draw_augmentation(n: int, kind: str, padding: int, g: torch.Generator, device):
    """Per-image crop offsets in [0, 2·padding] and horizontal flips (None unless crop_flip)."""
    if kind not in ("crop", "crop_flip"):
        raise ValueError(f"dataset.augment must be none, crop or crop_flip, got {kind!r}")
    top = torch.randint(0, 2 * padding + 1, (n,), generator=g, device=device)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=g, device=device)
    flip = torch.rand(n, generator=g, device=device) < 0.5 if kind == "crop_flip" else None
    return top, left, flip


PADDING_MODES = ("zeros", "edge", "reflect")


def pad_images(x: torch.Tensor, padding: int, mode: str = "zeros") -> torch.Tensor:
    """x [N, C, H, W] padded on every side: with zeros, the border pixel repeated (edge, numpy's and
    torchvision's name) or mirrored without repeating it (reflect). Index gathers work on uint8, which
    torch's replicate/reflect padding does not; reflect needs padding < H, W (the config checks it)."""
    if mode == "zeros":
        return torch.nn.functional.pad(x, (padding,) * 4)
    if mode not in PADDING_MODES:
        raise ValueError(f"dataset.crop_padding_mode must be one of {PADDING_MODES}, got {mode!r}")

    def source(n: int) -> torch.Tensor:
        index = torch.arange(-padding, n + padding, device=x.device)
        if mode == "edge":
            return index.clamp(0, n - 1)
        index = index.abs()
        return torch.where(index > n - 1, 2 * (n - 1) - index, index)

    return x.index_select(-2, source(x.shape[-2])).index_select(-1, source(x.shape[-1]))


class CropWindows:
    """Random crops (and flips) of padded images: one row gather and one element gather per batch.

    The padded images are stored once (in the stored dtype: uint8 moves 4x fewer bytes than float). A
    batch picks its padded images with `index_select`, then takes every crop pixel with one `gather`
    over each image's flattened H×W, the flip folded into the column index; the conversion to float
    comes last, on the crop. On CPU this is ~40x faster than indexing each pixel of a per-batch padded
    copy, and it needs no second (flipped) copy of the data. On a CPU with 8-bit data one numba loop does
    all of it, ~3x faster again, with the same bits.
    """

    def __init__(self, x: torch.Tensor, padding: int, mode: str = "zeros"):
        self.height, self.width = x.shape[-2:]
        self.padded = pad_images(x, padding, mode)
        self.padded_width = self.width + 2 * padding
        device = x.device
        self.row_offsets = torch.arange(self.height, device=device) * self.padded_width
        self.columns = torch.arange(self.width, device=device)

    def __call__(self, idx, top, left, flip=None) -> torch.Tensor:
        n, channels = len(idx), self.padded.shape[1]
        loop = _crop_loop() if self.padded.device.type == "cpu" and self.padded.dtype == torch.uint8 else None
        if loop is not None:
            crops = torch.empty(n, channels, self.height, self.width)
            flip = torch.zeros(n, dtype=torch.bool) if flip is None else flip
            arrays = (self.padded, idx, top, left, flip, _uint8_to_float(), crops)
            if not loop(*(t.contiguous().numpy() for t in arrays)):
                raise IndexError("crop windows outside the padded images")  # as gather would
            return crops
        images = self.padded.index_select(0, idx).flatten(2)  # N, C, (H + 2p)(W + 2p)
        columns = self.columns.expand(n, -1)
        if flip is not None:
            columns = torch.where(flip[:, None], self.width - 1 - self.columns, self.columns)
        corner = top * self.padded_width + left
        pixel = corner[:, None, None] + self.row_offsets[:, None] + columns[:, None, :]  # N, H, W
        crops = torch.gather(images, 2, pixel.reshape(n, 1, -1).expand(n, channels, -1))
        return to_float(crops.view(n, channels, self.height, self.width))


@functools.cache
def _uint8_to_float() -> torch.Tensor:
    """to_float of every uint8 value: the crop loop looks its floats up, so they are to_float's bits."""
    return to_float(torch.arange(256, dtype=torch.uint8))


@functools.cache
def _crop_loop():
    """CropWindows' gather and float conversion as one numba loop over the crops' rows (None without numba)."""
    if compiled.numba_module() is None:
        return None

    @compiled.jit
    def crop(padded, idx, top, left, flip, as_float, out):
        batch, channels, height, width = out.shape
        for b in range(batch):
            image, row0, col0 = idx[b], top[b], left[b]
            # numba does not check bounds: a window outside the padded images stops the loop instead.
            outside_rows, outside_cols = row0 + height > padded.shape[2], col0 + width > padded.shape[3]
            if image < 0 or image >= padded.shape[0] or row0 < 0 or col0 < 0 or outside_rows or outside_cols:
                return False
            for c in range(channels):
                for i in range(height):
                    source, target = padded[image, c, row0 + i], out[b, c, i]
                    if flip[b]:
                        for j in range(width):
                            target[j] = as_float[source[col0 + width - 1 - j]]
                    else:
                        for j in range(width):
                            target[j] = as_float[source[col0 + j]]
        return True

    return crop


def augment_batch(x: torch.Tensor, kind: str, padding: int, g: torch.Generator, padding_mode="zeros") -> torch.Tensor:
    """Random crop of the padded images (and horizontal flip for crop_flip), one draw per image."""
    top, left, flip = draw_augmentation(len(x), kind, padding, g, x.device)
    return CropWindows(x, padding, padding_mode)(torch.arange(len(x), device=x.device), top, left, flip)
