"""The baseline of the end-to-end ratio: the default digits AT run written as a plain PyTorch loop.

It does the work `robust-train +method=at train.epochs=E` does, and nothing else: the same data and
splits (scikit-learn digits, 360 test / 150 validation, stratified), the same model (the default
cnn_digits: conv32 3x3, conv64 3x3 stride 2, FC128, with the normalisation as first layer), SGD 0.1 /
momentum 0.9 / weight decay 5e-4 with a per-step cosine schedule, batch 64, PGD-10 training attacks at
1.2·eps (step 2.5·radius/10, uniform start, eval-mode model), per-epoch validation at eps (clean +
PGD-10, best checkpoint by robust then clean accuracy), a checkpoint per
epoch, then clean and PGD-50 accuracy of the best checkpoint on the test split. No config system,
no logging, no checks: the floor a runner is measured against.

    python bench/handwritten_at.py --epochs 10 --out /tmp/hand
"""

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

EPS = 0.1
TRAIN_EPS = 1.2 * EPS  # digits' dataset.train_eps_factor


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def digits_cnn() -> nn.Sequential:
    return nn.Sequential(
        Normalize([0.3050], [0.3804]),
        nn.Conv2d(1, 32, 3, 1, 1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, 2, 1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def splits():
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    train, test = train_test_split(np.arange(len(y)), test_size=360, stratify=y, random_state=0)
    train = np.sort(train)
    kept, val = train_test_split(np.arange(len(train)), test_size=150, stratify=y[train], random_state=0)
    train_idx, val_idx = train[np.sort(kept)], train[np.sort(val)]
    as_tensors = [
        (torch.from_numpy(x[i]), torch.from_numpy(y[i])) for i in (train_idx, val_idx, np.sort(test))
    ]
    return as_tensors


def pgd(model, x, y, steps, eps=EPS):
    alpha = 2.5 * eps / steps
    delta = ((torch.rand_like(x) * 2 - 1) * eps).clamp(-x, 1 - x)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y, reduction="none").sum()
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def robust_accuracy(model, x, y, steps):
    model.eval()
    x_adv = pgd(model, x, y, steps) if steps else x
    with torch.no_grad():
        return (model(x_adv).argmax(1) == y).float().mean().item()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    torch.manual_seed(0)
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = splits()
    model = digits_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    steps_per_epoch = math.ceil(len(y_train) / 64)
    total = steps_per_epoch * args.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total))
    )
    best = (-1.0, -1.0)
    for epoch in range(args.epochs):
        order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(order), 64):
            idx = order[i : i + 64]
            x, y = x_train[idx], y_train[idx]
            model.eval()
            x_adv = pgd(model, x, y, 10, TRAIN_EPS)
            model.train()
            loss = F.cross_entropy(model(x_adv), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        score = (robust_accuracy(model, x_val, y_val, 10), robust_accuracy(model, x_val, y_val, 0))
        if score > best:
            best = score
            torch.save(model.state_dict(), args.out / "best.pt")
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch + 1,
            },
            args.out / "last.pt",
        )
    model.load_state_dict(torch.load(args.out / "best.pt", weights_only=True))
    results = {
        "clean/acc": robust_accuracy(model, x_test, y_test, 0),
        "pgd/acc": robust_accuracy(model, x_test, y_test, 50),
        "wall_time_s": time.perf_counter() - start,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
