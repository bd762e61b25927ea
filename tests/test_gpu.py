"""CUDA checks: run with `make test PYTEST_ARGS="-m gpu"` on a machine with a GPU (skipped otherwise).

The GPU recipes' settings (bf16 autocast, channels-last, the in-memory loader on the device, fp32
evaluation) on a small run, and the benchmark's GPU sections on tiny sizes.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

REPO = Path(__file__).resolve().parents[1]


def test_recipe_settings_train_on_the_gpu_and_evaluate_in_fp32(tmp_path):
    from runner import load_model
    from runner.config import compose
    from runner.train import run

    cfg = compose(["+method=at", "method.attack.steps=3", "train.epochs=2", "train.precision=bf16",
                   "train.channels_last=true", "model=cnn7", "dataset.augment=crop_flip",
                   "dataset.crop_padding=1", "device=cuda"])
    results = run(cfg, tmp_path)
    assert results["env"]["device"].startswith("cuda")
    assert "gpu" in results["env"]
    assert 0.0 <= results["metrics"]["pgd/acc"] <= results["metrics"]["clean/acc"] <= 1.0
    assert results["metrics"]["clean/acc"] > 0.3  # it learned something in two epochs
    model = load_model(tmp_path)
    assert next(model.parameters()).device.type == "cpu"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["train"]["steps"] == 2 * saved["train"]["steps_per_epoch"]


def test_in_memory_loader_on_the_gpu_shards_like_one_process():
    from runner.data import InMemoryLoader

    device = torch.device("cuda")
    x = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(300)

    def batches(rank=0, world=1):
        loader = InMemoryLoader(x, y, 64, device, augment="crop_flip", padding=4, rank=rank, world_size=world)
        loader.set_epoch(1)
        return list(loader)

    single, shares = batches(), [batches(r, 2) for r in range(2)]
    for i, (xb, yb) in enumerate(single):
        assert xb.device.type == "cuda" and xb.dtype == torch.float32
        assert torch.equal(torch.cat([s[i][0] for s in shares]), xb)
        assert torch.equal(torch.cat([s[i][1] for s in shares]), yb)


@pytest.mark.parametrize("method", ["erm", "at_k10", "trades_k10", "sam"])
def test_bf16_channels_last_steps_are_finite_with_fp32_weights(method, monkeypatch):
    """build_step's closure returns nothing: the model and each update's logs are caught where the
    benchmark builds them (it imports runner.models.build_model and runner.update.build_update at call
    time), then checked: finite losses, no skipped step, parameters fp32, finite and moved by the steps."""
    sys.path.insert(0, str(REPO / "bench"))
    import run as bench

    import runner.models
    import runner.update

    built, logs = [], []
    build_model, build_update = runner.models.build_model, runner.update.build_update

    def catch_model(*args, **kwargs):
        built.append(build_model(*args, **kwargs))
        return built[-1]

    def catch_logs(*args, **kwargs):
        update = build_update(*args, **kwargs)

        def logged_update(*update_args, **update_kwargs):
            logs.append(update(*update_args, **update_kwargs))
            return logs[-1]

        return logged_update

    monkeypatch.setattr(runner.models, "build_model", catch_model)
    monkeypatch.setattr(runner.update, "build_update", catch_logs)
    workload = {"shape": (3, 32, 32), "model": "preact_resnet18", "batch": 32, "eps": 8 / 255}
    step = bench.build_step(workload, bench.METHOD_CASES[method], torch.device("cuda"), precision="bf16",
                            channels_last=True)
    (model,) = built
    initial = [p.detach().clone() for p in model.parameters()]
    step()
    step()
    torch.cuda.synchronize()
    assert len(logs) == 2
    for entry in logs:
        assert "nonfinite" not in entry, entry
        assert torch.isfinite(torch.as_tensor(entry["loss"])).all(), entry
    params = list(model.parameters())
    assert all(p.dtype == torch.float32 and p.is_cuda for p in params)
    assert all(torch.isfinite(p).all() for p in params)
    assert any(not torch.equal(p, q) for p, q in zip(params, initial)), "two optimizer steps changed nothing"
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in params)


def test_benchmark_gpu_sections_run_on_tiny_sizes():
    sys.path.insert(0, str(REPO / "bench"))
    import run as bench

    device = torch.device("cuda")
    epoch = bench.bench_gpu_epoch(device, 512)
    assert epoch["epoch_s"] > 0 and epoch["images_per_s"] > 0
    loader = bench.bench_loader(device, 1, 1024)
    assert loader["speedup"] > 0
