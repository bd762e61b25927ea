"""Training-label corruption (poisoning experiments for HR and SAM): never applied to validation or test.

Exactly round(fraction·n) labels are flipped, chosen uniformly at random with a seeded generator, so the
corruption depends on (labels, fraction, kind, seed) only.

- symmetric: the new label is uniform over the K − 1 other classes.
- asymmetric: the class-dependent rule y → (y + 1) mod K for every class (a fixed permutation without
  fixed points, so each chosen label really changes and every class is corrupted at the same rate).
"""

import torch

KINDS = ("symmetric", "asymmetric")


def corrupt_labels(
    y: torch.Tensor, fraction: float, kind: str, num_classes: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (noisy labels, boolean mask of the flipped positions); `y` is left unchanged."""
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
    n_flip = round(fraction * len(labels))
    flipped = torch.zeros(len(labels), dtype=torch.bool)
    flipped[torch.randperm(len(labels), generator=generator)[:n_flip]] = True
    if kind == "symmetric":
        shift = torch.randint(1, num_classes, (len(labels),), generator=generator)  # never 0: another class
    else:
        shift = torch.ones(len(labels), dtype=torch.long)
    noisy = torch.where(flipped, (labels + shift) % num_classes, labels)
    return noisy.to(device=y.device, dtype=y.dtype), flipped.to(y.device)
