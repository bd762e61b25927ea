"""The dataset group's checks: its values, and the sizes the data must satisfy (stratified test and
validation splits that every class can fill; a model whose layers take the dataset's images), checked on
the labels and on a weightless model so a bad size fails before any data is loaded.
"""

import math

from runner.label_noise import KINDS as LABEL_NOISE_KINDS
from runner.label_noise import PATRINI_MAPS
from runner.validation_groups import at_least, fail, fraction, one_of

AUGMENTS = ("none", "crop", "crop_flip")


def check_dataset(d) -> None:
    from runner.data import INFO, LOADERS

    one_of("dataset.name", d.name, sorted(set(INFO) | set(LOADERS)))
    if not str(d.data_dir).strip():
        fail("dataset.data_dir", d.data_dir, "must be a directory path")
    at_least("dataset.val_size", d.val_size, 0)
    if not (isinstance(d.train_fraction, int | float) and 0 < d.train_fraction <= 1):
        fail("dataset.train_fraction", d.train_fraction, "must be in (0, 1]")
    at_least("dataset.test_size", d.test_size, 0)
    one_of("dataset.augment", d.augment, AUGMENTS)
    at_least("dataset.crop_padding", d.crop_padding, 0)
    from runner.data import PADDING_MODES

    one_of("dataset.crop_padding_mode", d.crop_padding_mode, PADDING_MODES)
    fraction("dataset.label_noise", d.label_noise)
    one_of("dataset.label_noise_kind", d.label_noise_kind, LABEL_NOISE_KINDS)
    if d.label_noise > 0 and d.label_noise_kind == "patrini" and d.name not in PATRINI_MAPS:
        fail("dataset.label_noise_kind", "patrini", f"Patrini et al.'s class map exists for {sorted(PATRINI_MAPS)}, "
             f"not dataset.name={d.name!r}: use symmetric or asymmetric")
    if d.name == "synthetic":
        at_least("dataset.n_samples", d.n_samples, 1)
        at_least("dataset.num_classes", d.num_classes, 2)
        at_least("dataset.channels", d.channels, 1)
        at_least("dataset.image_size", d.image_size, 1)
    from runner.data import dataset_info

    if d.name in INFO or d.name == "synthetic":
        check_normalisation(d, d.channels if d.name == "synthetic" else INFO[d.name].channels)
        size = dataset_info(d).image_size
        if d.augment != "none" and d.crop_padding >= size:
            fail("dataset.crop_padding", d.crop_padding, f"must be smaller than the image size ({size}) for "
                  f"dataset.augment={d.augment}")
    check_split_sizes(d)


def check_normalisation(d, channels: int) -> None:
    """dataset.mean / dataset.std: one finite value per channel, std > 0 (null keeps the dataset's own)."""
    for key in ("mean", "std"):
        values = d.get(key)
        if values is None:
            continue
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if isinstance(values, (int, float)) or not numbers:
            fail(f"dataset.{key}", values, f"must be a list of {channels} numbers, one per channel (or null)")
        if len(values) != channels:
            fail(f"dataset.{key}", list(values), f"needs one value per channel: {channels}, got {len(values)}")
        if not all(math.isfinite(v) for v in values) or (key == "std" and min(values) <= 0):
            fail(f"dataset.{key}", list(values), "must be finite" + (" and > 0" if key == "std" else ""))


# Training-set sizes of the torchvision datasets (what dataset.val_size is cut from).
TRAIN_SIZES = {"mnist": 60000, "fashion_mnist": 60000, "cifar10": 50000, "cifar100": 50000, "svhn": 73257}


def _split_sizes_fail(key: str, value, n: int, k: int, what: str) -> None:
    if value >= n:
        fail(key, value, f"{what} has only {n} images; it must be smaller")
    if value < k:
        fail(key, value, f"the split is stratified: it needs at least one image per class ({k} classes)")
    if n - value < k:
        fail(key, value, f"leaves {n - value} of the {n} images of {what}, fewer than the {k} classes")


def check_split_sizes(d) -> None:
    """dataset.test_size / val_size / n_samples that the data can satisfy, checked on the labels alone
    (the splits are stratified: every class needs members on both sides of each cut)."""
    import numpy as np

    from runner.data import INFO, dataset_info

    if d.name == "synthetic":
        k = d.num_classes
        if d.n_samples < 2 * k:
            fail("dataset.n_samples", d.n_samples, f"too few for {k} classes: the stratified test and validation "
                  f"splits need at least two images of each class (>= {2 * k}; a few hundred to learn anything)")
        labels = np.arange(d.n_samples) % k
    elif d.name == "digits":
        from sklearn.datasets import load_digits

        labels = load_digits().target
    elif d.name in TRAIN_SIZES:
        k = INFO[d.name].num_classes
        if d.test_size:
            fail("dataset.test_size", d.test_size, f"applies to digits and synthetic only: {d.name} has an official "
                  "test split (evaluate on fewer of its points with eval.n_examples)")
        if d.val_size:
            _split_sizes_fail("dataset.val_size", d.val_size, TRAIN_SIZES[d.name], k,
                              f"the training set of {d.name}")
        return
    else:
        return
    k = dataset_info(d).num_classes if d.name != "synthetic" else d.num_classes
    if d.test_size < k:  # 0 too: every evaluation runs on the test split
        fail("dataset.test_size", d.test_size, f"{d.name} has no official test split: it needs a stratified one "
              f"of at least one image per class (>= {k})")
    if d.test_size:
        _split_sizes_fail("dataset.test_size", d.test_size, len(labels), k, f"dataset {d.name}")
        from sklearn.model_selection import train_test_split

        try:
            labels, _ = train_test_split(labels, test_size=d.test_size, stratify=labels, random_state=0)
        except ValueError as err:
            fail("dataset.test_size", d.test_size, f"cannot cut a stratified test split from {d.name}: "
                  f"{' '.join(str(err).split())}")
    if d.val_size:
        if np.bincount(labels, minlength=k).min() < 2:
            fail("dataset.n_samples" if d.name == "synthetic" else "dataset.test_size",
                  d.n_samples if d.name == "synthetic" else d.test_size,
                  "leaves a class with fewer than two training images: the validation split cannot be cut")
        _split_sizes_fail("dataset.val_size", d.val_size, len(labels), k,
                          f"the training part of {d.name} (after dataset.test_size={d.test_size})")


def check_model_fits_data(cfg) -> None:
    """The model takes the dataset's images: built on the meta device (no memory, no weights), so an image
    too small for its convolutions fails here, in one line, and not after the data is loaded."""
    import torch

    from runner.data import INFO, dataset_info
    from runner.models import build_model

    if cfg.dataset.name not in INFO and cfg.dataset.name != "synthetic":
        return
    info = dataset_info(cfg.dataset)
    try:
        with torch.device("meta"):
            build_model(cfg.model, info)
    except (RuntimeError, ValueError) as err:
        detail = " ".join(str(err).split())[:200]
        fail("model.name", cfg.model.name, f"cannot take the {info.channels}x{info.image_size}x{info.image_size} "
              f"images of dataset.name={cfg.dataset.name!r} ({detail}); use a larger dataset.image_size or "
              f"another model (model=mlp takes any size)")
