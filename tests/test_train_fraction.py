"""dataset.train_fraction: a seeded random subset of the training split, drawn after the validation cut
and before label noise; validation and test never change."""

import pytest
import torch

from runner.config import compose
from runner.data import load_splits
from runner.errors import ConfigError
from runner.train import run


def _splits(seed=0, *overrides):
    return load_splits(compose(list(overrides)).dataset, seed)


def _rows(x):
    return {tuple(row.flatten().tolist()) for row in x}


def test_the_subset_is_a_seeded_part_of_the_training_split_and_nothing_else_changes():
    full = _splits(0)
    part = _splits(0, "dataset.train_fraction=0.1")
    assert len(part.train[1]) == round(0.1 * len(full.train[1]))
    # Every chosen image (with its label) is one of the full training split's; order follows the split.
    index = {tuple(row.flatten().tolist()): i for i, row in enumerate(full.train[0])}
    chosen = [index[tuple(row.flatten().tolist())] for row in part.train[0]]
    assert chosen == sorted(chosen) and len(set(chosen)) == len(chosen)
    assert torch.equal(part.train[1], full.train[1][chosen])
    for split in ("val", "test"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(part, split), getattr(full, split)))
    again, other = _splits(0, "dataset.train_fraction=0.1"), _splits(1, "dataset.train_fraction=0.1")
    assert torch.equal(again.train[0], part.train[0])
    assert _rows(other.train[0]) != _rows(part.train[0])  # the run seed draws the subset


def test_label_noise_flips_a_fraction_of_the_subset():
    part = _splits(3, "dataset.train_fraction=0.2", "dataset.label_noise=0.25")
    clean = _splits(3, "dataset.train_fraction=0.2")
    assert torch.equal(part.train[0], clean.train[0])  # the same subset with and without noise
    assert int(part.flipped.sum()) == round(0.25 * len(clean.train[1]))
    assert torch.equal(part.flipped, part.train[1] != clean.train[1])


@pytest.mark.parametrize("value", [0, -0.5, 1.5])
def test_train_fraction_must_be_in_zero_one(compose_cfg, tmp_path, value):
    with pytest.raises(ConfigError, match="dataset.train_fraction"):
        run(compose_cfg(f"dataset.train_fraction={value}"), tmp_path)
