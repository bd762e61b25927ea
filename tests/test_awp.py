"""AWP (method.awp): checked against a hand-written step of the reference's rule on tiny models, plus its
BatchNorm, warm-up, non-finite, validation, recording and multi-process behaviour."""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import runner.methods.at as at_module
from runner import distributed
from runner.awp import AWPUpdate, awp_gamma
from runner.errors import ConfigError
from runner.methods import build_method
from runner.methods.base import Method, StepContext
from runner.optim import build_optimizer
from runner.train import run
from runner.update import Update, build_update

LR, WD, GAMMA = 0.1, 0.01, 0.05
CTX = StepContext(0, 0, 1, 1, "linf", 0.1)


def _mlp(seed=0, batch_norm=False):
    torch.manual_seed(seed)
    middle = [nn.BatchNorm1d(16)] if batch_norm else []
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), *middle, nn.ReLU(), nn.Linear(16, 10))


def _batch(n=32):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _cfg(compose_cfg, *overrides):
    """A one-step SGD config with AWP on (ERM unless a +method= is given)."""
    method = [o for o in overrides if o.startswith("+method=")] or ["+method=erm"]
    rest = [o for o in overrides if not o.startswith("+method=")]
    return compose_cfg(*method, "method.awp=true", f"method.awp_gamma={GAMMA}", "optimizer=sgd",
                       f"optimizer.lr={LR}", "optimizer.momentum=0", f"optimizer.weight_decay={WD}", *rest)


def _awp_by_hand(model, x_adv, y, gamma=GAMMA):
    """The reference's rule: g at w; v_l = gamma |w_l| g_l / |g_l| on weights of dim > 1; g' at w + v;
    SGD steps at w + v (weight decay included), then v is subtracted."""
    params = list(model.parameters())
    g = torch.autograd.grad(F.cross_entropy(model(x_adv), y), params)
    with torch.no_grad():
        v = [gamma * p.norm() * t / t.norm() if p.dim() > 1 else torch.zeros_like(p) for p, t in zip(params, g)]
        for p, e in zip(params, v):
            p.add_(e)
    g_perturbed = torch.autograd.grad(F.cross_entropy(model(x_adv), y), params)
    with torch.no_grad():
        return [p - LR * (t + WD * p) - e for p, t, e in zip(params, g_perturbed, v)]


def test_at_step_matches_the_reference_rule_with_one_attack(compose_cfg, monkeypatch):
    cfg = _cfg(compose_cfg, "+method=at", "method.attack.steps=3")
    attacks, real = [], at_module.pgd
    monkeypatch.setattr(at_module, "pgd", lambda *a, **k: attacks.append(real(*a, **k)) or attacks[-1])
    model, reference = _mlp(), _mlp()
    x, y = _batch()
    update = build_update(cfg, model, build_optimizer(cfg.optimizer, model))
    assert isinstance(update, AWPUpdate)
    logs = update(model, build_method(cfg), x, y, CTX)
    assert len(attacks) == 1  # solved once, at w, and reused at w + v
    expected = _awp_by_hand(reference, attacks[0], y)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)
    assert float(logs["awp/loss_perturbed"]) > float(logs["loss"])  # the perturbation ascends the loss


def test_biases_are_not_perturbed_and_each_layer_moves_by_gamma_of_its_norm(compose_cfg):
    cfg = _cfg(compose_cfg)
    model = _mlp()
    seen = []

    class Recording(type(build_method(cfg))):
        def loss(self, model, x, y, ctx):
            seen.append([p.detach().clone() for p in model.parameters()])
            return super().loss(model, x, y, ctx)

    update = build_update(cfg, model, build_optimizer(cfg.optimizer, model))
    update(model, Recording(cfg), *_batch(), CTX)
    at_w, at_w_plus_v = seen
    for before, after in zip(at_w, at_w_plus_v):
        moved = float((after - before).norm())
        if before.dim() > 1:
            assert moved == pytest.approx(GAMMA * float(before.norm()), rel=1e-5)
        else:
            assert moved == 0


def test_batchnorm_statistics_come_from_the_perturbed_pass_only(compose_cfg):
    cfg = _cfg(compose_cfg)
    model, reference = _mlp(batch_norm=True), _mlp(batch_norm=True)
    x, y = _batch()
    update = build_update(cfg, model, build_optimizer(cfg.optimizer, model))
    update(model, build_method(cfg), x, y, CTX)
    # By hand: the gradient at w without touching the running statistics, one forward at w + v that does.
    params = list(reference.parameters())
    bn = reference[2]
    saved = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
    g = torch.autograd.grad(F.cross_entropy(reference(x), y), params)
    bn.running_mean.copy_(saved[0]), bn.running_var.copy_(saved[1]), bn.num_batches_tracked.copy_(saved[2])
    with torch.no_grad():
        for p, t in zip(params, g):
            if p.dim() > 1:
                p.add_(GAMMA * p.norm() * t / t.norm())
        reference(x)
    torch.testing.assert_close(model[2].running_mean, bn.running_mean)
    torch.testing.assert_close(model[2].running_var, bn.running_var)
    assert int(model[2].num_batches_tracked) == 1


def test_a_train_mode_attack_still_updates_batchnorm_statistics(compose_cfg):
    """The reference attacks the model itself (its BN updates count); only the loss pass at w is a proxy's."""
    counts = {}
    for rule in ("plain", "awp"):
        cfg = _cfg(compose_cfg, "+method=at", "method.attack.steps=3", "method.attack.bn_mode=train")
        model = _mlp(batch_norm=True)
        update = (Update(cfg, model, build_optimizer(cfg.optimizer, model)) if rule == "plain"
                  else build_update(cfg, model, build_optimizer(cfg.optimizer, model)))
        update(model, build_method(cfg), *_batch(), CTX)
        counts[rule] = int(model[2].num_batches_tracked)
    assert counts["awp"] == counts["plain"] > 1  # the attack's forwards, then one loss pass (at w + v)


def test_warmup_epochs_take_plain_steps(compose_cfg):
    cfg = _cfg(compose_cfg, "method.awp_warmup=2")
    awp_model, plain_model = _mlp(), _mlp()
    x, y = _batch()
    awp = build_update(cfg, awp_model, build_optimizer(cfg.optimizer, awp_model))
    plain = Update(cfg, plain_model, build_optimizer(cfg.optimizer, plain_model))
    method = build_method(cfg)
    for epoch in range(2):
        ctx = StepContext(epoch, epoch, 1, 3, "linf", 0.1)
        assert "awp/loss_perturbed" not in awp(awp_model, method, x, y, ctx)
        plain(plain_model, method, x, y, ctx)
    for a, b in zip(awp_model.parameters(), plain_model.parameters()):
        assert torch.equal(a, b)
    assert "awp/loss_perturbed" in awp(awp_model, method, x, y, StepContext(2, 2, 1, 3, "linf", 0.1))


def test_a_non_finite_perturbed_loss_restores_the_weights_bit_for_bit(compose_cfg):
    cfg = _cfg(compose_cfg)
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    class NanSecond(type(build_method(cfg))):
        def loss(self, model, x, y, ctx):
            loss, logs = super().loss(model, x, y, ctx)
            calls.append(1)
            return (loss * float("nan") if len(calls) == 2 else loss), logs

    update = build_update(cfg, model, build_optimizer(cfg.optimizer, model))
    logs = update(model, NanSecond(cfg), *_batch(), CTX)
    assert logs["nonfinite"] == 1.0
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


@pytest.mark.parametrize("method, gamma", [("at", 0.01), ("trades", 0.005), ("hr", 0.01), ("erm", 0.01)])
def test_gamma_defaults_to_the_references_value_for_the_loss(compose_cfg, method, gamma):
    cfg = compose_cfg(f"+method={method}", "method.awp=true")
    assert awp_gamma(cfg) == gamma
    assert awp_gamma(compose_cfg(f"+method={method}", "method.awp=true", "method.awp_gamma=0.02")) == 0.02


@pytest.mark.parametrize("overrides, key", [
    (["+method=sam", "method.awp=true"], "method.awp"),
    (["+method=at", "method.awp_gamma=0.02"], "method.awp_gamma"),  # AWP is off: no effect
    (["+method=at", "method.awp_warmup=3"], "method.awp_warmup"),
    (["+method=at", "method.awp=true", "method.awp_gamma=0"], "method.awp_gamma"),
    (["+method=at", "method.awp=true", "method.awp_warmup=-1"], "method.awp_warmup"),
])
def test_bad_awp_settings_fail_before_training(compose_cfg, tmp_path, overrides, key):
    with pytest.raises(ConfigError, match=key):
        run(compose_cfg(*overrides), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cpu_run_records_the_resolved_rule_in_results_and_report(compose_cfg, tmp_path):
    fast = ["train.epochs=1", "train.progress=plain", "method.attack.steps=2", "eval.n_examples=40",
            "eval.evaluators=[{name:clean}]"]
    results = run(compose_cfg("+method=trades", "method.awp=true", *fast), tmp_path / "run")
    assert results["run"]["update"] == {"rule": "awp", "gamma": 0.005, "warmup_epochs": 0}
    assert json.loads((tmp_path / "run" / "results.json").read_text())["run"]["update"]["rule"] == "awp"
    assert "AWP gamma=0.005" in (tmp_path / "run" / "report.md").read_text()
    plain = run(compose_cfg("+method=sam", *fast[:2], *fast[3:]), tmp_path / "sam")
    # digits' rho, not null; the whole batch per perturbation
    assert plain["run"]["update"] == {"rule": "sam", "rho": 0.15, "attack": "rerun", "m": "batch"}
    assert "SAM rho=0.15" in (tmp_path / "sam" / "report.md").read_text()


# ---- two processes: the perturbation is the global batch's, and the ranks stay identical -------------------


class _MeanCE(Method):
    awp_gamma = GAMMA

    def __init__(self):
        super().__init__(None)

    def loss(self, model, x, y, ctx):
        return F.cross_entropy(model(x), y), {}


def _awp_two_rank_worker(rank, port, out_dir, cfg):
    torch.set_num_threads(1)
    model, reference = _mlp(), _mlp()
    x, y = _batch(8)
    expected = _awp_by_hand(reference, x, y)  # the single-process step on the whole batch
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    procs, device = distributed.setup(torch.device("cpu"))
    try:
        ddp = distributed.wrap_model(model, procs, device)
        update = build_update(cfg, ddp, build_optimizer(cfg.optimizer, model))
        share = slice(0, 3) if rank == 0 else slice(3, 8)
        update(ddp, distributed.shard_method(_MeanCE(), procs), x[share], y[share], CTX)
        for p, e in zip(model.parameters(), expected):
            torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(2)]
        torch.distributed.all_gather(gathered, flat)
        assert torch.equal(gathered[0], gathered[1])  # bit for bit: the same v was added and subtracted
        Path(out_dir, f"rank{rank}.ok").write_text("ok")
    finally:
        distributed.teardown(procs)


def test_two_ranks_take_the_single_process_step(compose_cfg, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _cfg(compose_cfg)
    mp.start_processes(_awp_two_rank_worker, args=(port, str(tmp_path), cfg), nprocs=2, start_method="fork")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.ok", "rank1.ok"]


def test_a_warmup_as_long_as_the_run_is_a_recorded_warning(compose_cfg, tmp_path):
    results = run(compose_cfg("+method=erm", "method.awp=true", "method.awp_warmup=2", "train.epochs=2",
                              "train.progress=plain", "eval=none"), tmp_path)
    (warning,) = results["train"]["warnings"]
    assert "method.awp_warmup=2" in warning and "AWP never turns on" in warning


def test_a_resumed_awp_run_ends_with_the_uninterrupted_weights(compose_cfg, tmp_path):
    """AWP keeps no state of its own: last.pt after epoch 1 continues to the same epoch-2 weights."""
    common = ["model=mlp", "model.hidden=[32]", "+method=at", "method.attack.steps=1", "method.awp=true",
              "train.batch_size=256", "scheduler=constant", "eval=none", "deterministic=true", "train.progress=plain"]
    run(compose_cfg(*common, "train.epochs=2"), tmp_path / "reference")
    run(compose_cfg(*common, "train.epochs=1"), tmp_path / "run")
    run(compose_cfg(*common, "train.epochs=2"), tmp_path / "run")  # resumes after epoch 1
    resumed = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=False)
    reference = torch.load(tmp_path / "reference/checkpoints/last.pt", weights_only=False)
    assert resumed["step"] == reference["step"]
    for name, value in reference["model"].items():
        assert torch.equal(resumed["model"][name], value), name
