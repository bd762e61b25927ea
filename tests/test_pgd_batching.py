"""PGD evaluation seeds every batch by itself: restarts never make an example's result worse, however
the points are batched (the sanity suite's exact restart check relies on it), and batch 0 keeps the seed.

The attack here is made weak on purpose (one short step from the random start), so that whether it
succeeds depends on the start: a start drawn from the wrong stream shows up as a changed result."""

import torch
from torch import nn

from runner.attacks import pgd
from runner.evaluators.pgd import pgd_correct

ATTACK = {"eps": 0.3, "norm": "linf", "steps": 1, "alpha": 0.01}


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3)).eval()


def _data(n=120):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def _correct(model, x, y, restarts, batch_size, seed=5, **kwargs):
    return pgd_correct(model, x, y, restarts=restarts, loss="ce", seed=seed, batch_size=batch_size,
                       **ATTACK, **kwargs)


def test_restarts_never_lose_an_example_in_small_batches():
    model, (x, y) = _model(), _data()
    single = _correct(model, x, y, 1, batch_size=len(y))
    assert 0 < single.float().mean() < (model(x).argmax(1) == y).float().mean()  # the starts decide some points
    for batch_size in (7, 16, len(y)):
        single, restarted = _correct(model, x, y, 1, batch_size), _correct(model, x, y, 3, batch_size)
        assert not (restarted & ~single).any(), batch_size  # robust with restarts => robust with one start


def test_each_batch_is_the_attack_with_its_own_seed():
    model, (x, y) = _model(), _data(20)
    _, got = _correct(model, x, y, 1, batch_size=8, return_adversarial=True)
    for start in range(0, 20, 8):
        xb, yb = x[start : start + 8], y[start : start + 8]
        generator = torch.Generator().manual_seed(5 + 7919 * start)
        expected = pgd(model, xb, yb, restarts=1, generator=generator, **ATTACK)
        assert torch.equal(got[start : start + 8], expected)
