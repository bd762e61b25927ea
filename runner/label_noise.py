"""Training-label corruption (poisoning experiments for HR and SAM): never applied to validation or test.

Exactly round(fraction·n) labels are flipped, chosen uniformly at random with a seeded generator, so the
corruption depends on (labels, fraction, kind, seed) only.

- symmetric: the new label is uniform over the K − 1 other classes.
- asymmetric: the class-dependent rule y → (y + 1) mod K for every class (a fixed permutation without
  fixed points, so each chosen label really changes and every class is corrupted at the same rate;
  "pair flipping", Han et al. 2018).
- patrini: the confusions of Patrini et al. (2017), the "asymmetric" noise of most label-noise papers:
  round(fraction·n_c) labels of each mapped class c, drawn within the class, go to its look-alike; the
  other classes stay clean (so fewer than fraction·n labels change overall). Defined for digits
  (MNIST's map) and CIFAR-10.
"""

import torch

KINDS = ("symmetric", "asymmetric", "patrini")
# Patrini et al. 2017, Sec. 5: MNIST 2→7, 3→8, 5↔6, 7→1; CIFAR-10 truck→automobile, bird→airplane,
# deer→horse, cat↔dog.
DIGIT_CONFUSIONS = {2: 7, 3: 8, 5: 6, 6: 5, 7: 1}
PATRINI_MAPS = {
    "mnist": DIGIT_CONFUSIONS,
    "digits": DIGIT_CONFUSIONS,
    "cifar10": {9: 1, 2: 0, 4: 7, 3: 5, 5: 3},
}


def corrupt_labels(
    y: torch.Tensor, fraction: float, kind: str, num_classes: int, seed: int, dataset: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (noisy labels, boolean mask of the flipped positions); `y` is left unchanged. `dataset`
    names the class map of kind patrini."""
    if not (0.0 <= fraction <= 1.0):
        raise ValueError(f"dataset.label_noise must be a fraction in [0, 1], got {fraction}")
    if kind not in KINDS:
        raise ValueError(f"dataset.label_noise_kind must be one of {KINDS}, got {kind!r}")
    if num_classes < 2:
        raise ValueError(f"label noise needs at least 2 classes, got num_classes={num_classes}")
    if y.dim() != 1:
        raise ValueError(f"labels must be a 1-D tensor, got shape {tuple(y.shape)}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    generator = torch.Generator().manual_seed(seed)
    labels = y.detach().cpu().long()
    if kind == "patrini":
        if dataset not in PATRINI_MAPS:
            raise ValueError(f"dataset.label_noise_kind=patrini has a class map for {sorted(PATRINI_MAPS)} only, "
                             f"not dataset {dataset!r}")
        return _class_map_noise(labels, fraction, PATRINI_MAPS[dataset], generator, y)
    n_flip = round(fraction * len(labels))
    flipped = torch.zeros(len(labels), dtype=torch.bool)
    flipped[torch.randperm(len(labels), generator=generator)[:n_flip]] = True
    if kind == "symmetric":
        shift = torch.randint(1, num_classes, (len(labels),), generator=generator)  # never 0: another class
    else:
        shift = torch.ones(len(labels), dtype=torch.long)
    noisy = torch.where(flipped, (labels + shift) % num_classes, labels)
    return noisy.to(device=y.device, dtype=y.dtype), flipped.to(y.device)


def _class_map_noise(labels, fraction, mapping: dict, generator, y):
    noisy, flipped = labels.clone(), torch.zeros(len(labels), dtype=torch.bool)
    for source, target in sorted(mapping.items()):
        members = (labels == source).nonzero().flatten()
        chosen = members[torch.randperm(len(members), generator=generator)[: round(fraction * len(members))]]
        noisy[chosen], flipped[chosen] = target, True
    return noisy.to(device=y.device, dtype=y.dtype), flipped.to(y.device)
