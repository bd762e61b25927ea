import pytest
import torch

from runner.label_noise import corrupt_labels


def labels(n=1000, k=10, seed=0):
    return torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["symmetric", "asymmetric"])
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3, 0.333, 1.0])
def test_exact_count_and_only_flipped_labels_change(kind, fraction):
    y = labels(n=997)
    noisy, flipped = corrupt_labels(y, fraction, kind, 10, seed=3)
    assert flipped.sum().item() == round(fraction * 997)
    assert torch.equal(noisy != y, flipped)  # every chosen label really changes, no other does
    assert noisy.dtype == y.dtype and noisy.shape == y.shape
    assert int(noisy.min()) >= 0 and int(noisy.max()) < 10


def test_input_is_not_modified_and_seed_decides():
    y = labels()
    y_copy = y.clone()
    a, mask_a = corrupt_labels(y, 0.3, "symmetric", 10, seed=1)
    b, mask_b = corrupt_labels(y, 0.3, "symmetric", 10, seed=1)
    c, mask_c = corrupt_labels(y, 0.3, "symmetric", 10, seed=2)
    assert torch.equal(y, y_copy)
    assert torch.equal(a, b) and torch.equal(mask_a, mask_b)
    assert not torch.equal(mask_a, mask_c)


def test_asymmetric_is_the_next_class():
    y = labels(n=500, k=7)
    noisy, flipped = corrupt_labels(y, 0.5, "asymmetric", 7, seed=0)
    assert torch.equal(noisy[flipped], (y[flipped] + 1) % 7)


def test_symmetric_new_labels_are_uniform_over_the_other_classes():
    k, n = 4, 40_000
    y = torch.zeros(n, dtype=torch.long)  # every true label is 0: new labels should be 1, 2, 3 equally
    noisy, flipped = corrupt_labels(y, 1.0, "symmetric", k, seed=0)
    counts = torch.bincount(noisy[flipped], minlength=k).float()
    assert counts[0] == 0
    expected = n / (k - 1)
    assert torch.all((counts[1:] - expected).abs() < 5 * expected**0.5)  # 5 sigma


def test_keeps_the_device_and_dtype():
    y = labels(n=50).to(torch.int32)
    noisy, flipped = corrupt_labels(y, 0.2, "symmetric", 10, seed=0)
    assert noisy.dtype == torch.int32 and flipped.dtype == torch.bool and noisy.device == y.device


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"fraction": 1.5}, "dataset.label_noise"),
        ({"fraction": -0.1}, "dataset.label_noise"),
        ({"kind": "pairflip"}, "dataset.label_noise_kind"),
        ({"num_classes": 1}, "num_classes"),
        ({"num_classes": 5}, "labels must lie"),
    ],
)
def test_bad_input_names_the_key(kwargs, key):
    args = {"y": labels(n=20), "fraction": 0.2, "kind": "symmetric", "num_classes": 10, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=key):
        corrupt_labels(**args)


# ---- the loaded splits: what a run trains and is validated / evaluated on ----------------------------

def splits(noise=0.0, kind="symmetric", seed=0):
    from runner.config import compose
    from runner.data import load_splits

    cfg = compose([f"dataset.label_noise={noise}", f"dataset.label_noise_kind={kind}"])
    return load_splits(cfg.dataset, seed)


@pytest.mark.parametrize("kind", ["symmetric", "asymmetric"])
def test_loaded_training_labels_are_flipped_and_validation_and_test_labels_never(kind):
    clean, noisy = splits(), splits(0.3, kind)
    y, y_noisy = clean.train[1], noisy.train[1]
    changed = y_noisy != y
    assert changed.sum().item() == round(0.3 * len(y))  # 386 of the 1,287 training labels
    assert torch.equal(changed, noisy.flipped) and clean.flipped is None
    assert torch.equal(noisy.train[0], clean.train[0])  # the same images, only labels change
    shift = ((y_noisy - y) % 10)[changed]
    if kind == "asymmetric":  # y -> y + 1 mod K
        assert torch.all(shift == 1)
    else:  # uniform over the 9 other classes: never the same label (shift 0), and not one fixed shift
        assert torch.all(shift > 0) and len(shift.unique()) == 9
    for name in ("val", "test"):
        for a, b in zip(getattr(noisy, name), getattr(clean, name)):
            assert torch.equal(a, b), name


def test_loaded_label_noise_is_decided_by_the_seed():
    a, b, c = splits(0.3, seed=0), splits(0.3, seed=0), splits(0.3, seed=1)
    assert torch.equal(a.train[1], b.train[1]) and torch.equal(a.flipped, b.flipped)
    assert not torch.equal(a.flipped, c.flipped)
    assert a.flipped.sum() == c.flipped.sum()
    for name in ("val", "test"):
        assert torch.equal(getattr(a, name)[1], getattr(c, name)[1])


# ---- Patrini et al.'s class-dependent confusions ----------------------------------------------------


@pytest.mark.parametrize("dataset, mapping", [
    ("digits", {2: 7, 3: 8, 5: 6, 6: 5, 7: 1}),
    ("cifar10", {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}),  # truck, bird, deer -> automobile, airplane, horse; cat <-> dog
])
def test_patrini_flips_the_fraction_of_each_mapped_class_to_its_look_alike(dataset, mapping):
    y = torch.arange(10).repeat_interleave(40)[torch.randperm(400, generator=torch.Generator().manual_seed(0))]
    noisy, flipped = corrupt_labels(y, 0.3, "patrini", 10, seed=4, dataset=dataset)
    assert torch.equal(flipped, noisy != y)
    for c in range(10):
        members = y == c
        if c in mapping:
            assert int(flipped[members].sum()) == 12  # round(0.3 * 40), drawn within the class
            assert set(noisy[members & flipped].tolist()) == {mapping[c]}
        else:
            assert not flipped[members].any()
    again, _ = corrupt_labels(y, 0.3, "patrini", 10, seed=4, dataset=dataset)
    other, _ = corrupt_labels(y, 0.3, "patrini", 10, seed=5, dataset=dataset)
    assert torch.equal(again, noisy) and not torch.equal(other, noisy)


def test_patrini_needs_a_dataset_with_a_class_map():
    with pytest.raises(ValueError, match="patrini.*synthetic"):
        corrupt_labels(torch.arange(10), 0.2, "patrini", 10, seed=0, dataset="synthetic")


def test_patrini_is_checked_against_the_dataset_before_the_run(compose_cfg, tmp_path):
    from runner.data import load_splits
    from runner.errors import ConfigError
    from runner.train import run

    cfg = compose_cfg("dataset.label_noise=0.4", "dataset.label_noise_kind=patrini")
    splits = load_splits(cfg.dataset, seed=0)  # digits: the MNIST map
    changed = splits.flipped.nonzero().flatten()
    assert len(changed) > 0 and set(splits.train[1][changed].tolist()) <= {7, 8, 6, 5, 1}
    with pytest.raises(ConfigError, match="dataset.label_noise_kind"):
        run(compose_cfg("dataset=synthetic", "dataset.label_noise=0.4", "dataset.label_noise_kind=patrini"),
            tmp_path)


@pytest.mark.parametrize("seed", [0, 1])
def test_flipped_labels_are_spread_over_the_first_epoch(seed):
    """The noise and the loader's epoch order draw from different streams: at seed 0 they once drew the same
    permutation, and epoch 0 began with every flipped label (its first two batches were all noise)."""
    from runner.config import compose
    from runner.data import InMemoryLoader, load_splits

    cfg = compose(["dataset.label_noise=0.2"])
    splits = load_splits(cfg.dataset, seed)
    n = len(splits.train[1])
    index = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)  # the loader serves indices as images
    loader = InMemoryLoader(index, splits.train[1], 128, torch.device("cpu"), seed=seed)
    loader.set_epoch(0)
    first = torch.cat([xb.flatten().long() for xb, _ in list(loader)[:2]])
    share = splits.flipped[first].float().mean().item()
    assert abs(share - 0.2) < 0.1, share
