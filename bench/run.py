"""`make bench`: how close each part of robust-train runs to its physical limit, as ratios measured in one
run on one machine. Writes bench/results.json and bench/results.md (see bench/README.md).

    .venv/bin/python bench/run.py [--threads N] [--quick] [--device auto|cpu|cuda] [--skip compile,e2e]

Every step time goes through the runner's own objects (the composed config, `build_model`,
`build_method`, `build_optimizer`, `build_update`: `update(model, method, x, y, ctx)` is exactly the
training loop's step) with warm-up, and is the median over interleaved rounds, so a load spike on a
shared machine hits every method alike instead of one. Torch's intra-op threads are set explicitly
(default 1 on CPU); with one CPU thread steps are timed on the process's CPU clock, whole processes
(start-up, end to end) on their CPU time, with wall time reported beside it.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from runner.allocator import keep_freed_memory  # noqa: E402 - the repository is on the path now

# ---- targets ------------------------------------------------------------------------------------------
# name: (what it is, target, "<=" or ">=")
TARGETS = {
    "at_k1_step_ratio": ("PGD-AT step (k=1) / (2 x ERM step)", 1.10, "<="),
    "at_k10_step_ratio": ("PGD-AT step (k=10) / (11 x ERM step)", 1.10, "<="),
    "trades_k10_step_ratio": ("TRADES step (k=10) / (12 x ERM step)", 1.10, "<="),
    "hr_over_at": ("HR step / AT step, same PGD-10 attack", 1.05, "<="),
    "sam_over_erm": ("SAM step / ERM step", 2.1, "<="),
    "ibp_over_erm": ("IBP step / ERM step (after the eps ramp)", 3.0, "<="),
    "loader_speedup": ("in-memory loader / best torchvision DataLoader (img/s)", 10.0, ">="),
    "startup_ratio": ("`robust-train --help` / `python -c 'import torch'` (CPU time)", 1.5, "<="),
    "e2e_ratio": ("digits AT run, robust-train / hand-written loop (CPU time)", 1.1, "<="),
}

# Step-time cases: robust-train overrides on top of the workload. k = attack steps.
METHOD_CASES = {
    "erm": [],
    "at_k1": ["+method=at", "method.attack.steps=1"],
    "at_k10": ["+method=at", "method.attack.steps=10"],
    "trades_k10": ["+method=trades", "method.attack.steps=10"],
    "hr_k10": ["+method=hr", "method.attack.steps=10", "method.alpha=0.05", "method.r=0.1"],
    "sam": ["+method=sam"],
    # AWP around AT (no target: the cost of one more forward-backward on the reused adversarial batch).
    "at_k10_awp": ["+method=at", "method.attack.steps=10", "method.awp=true"],
    # IBP's schedule is pinned here so the cases do not move with its defaults; steps run at step 5000 of
    # 100-step epochs: "ibp" after the eps ramp (the steady state), "ibp_ramp" half-way up it (the
    # warm-up regulariser on, where the method's config has one).
    "ibp": ["+method=ibp", "method.warmup_epochs=0", "method.ramp_epochs=1"],
    "ibp_ramp": ["+method=ibp", "method.warmup_epochs=0", "method.ramp_epochs=100"],
    # The published recipes' loss (Shi et al., kappa=shi): robust CE alone after the ramp, no clean pass.
    # What the bounds pass alone costs; its floor is 2 (a centre and a radius pass).
    "ibp_shi": ["+method=ibp", "method.warmup_epochs=0", "method.ramp_epochs=1", "method.kappa=shi"],
}
METHOD_MODULE = {
    "at_k1": "at",
    "at_k10": "at",
    "at_k10_awp": "at",
    "trades_k10": "trades",
    "hr_k10": "hr",
    "sam": "sam",
    "ibp": "ibp",
    "ibp_ramp": "ibp",
    "ibp_shi": "ibp",
    "erm": "erm",
}


def workloads(device: torch.device) -> dict:
    """Synthetic data of the named shape (step time does not depend on pixel values)."""
    if device.type == "cuda":
        return {
            "cifar10_prn18": {
                "shape": (3, 32, 32),
                "model": "preact_resnet18",
                "batch": 128,
                "eps": 8 / 255,
                "ibp_model": "cnn7",
            }
        }
    return {
        # Compute-bound on a CPU core: what the ratios are about.
        "cifar_cnn_small": {"shape": (3, 32, 32), "model": "cnn_small", "batch": 128, "eps": 8 / 255},
        # The default digits run: tiny steps, so per-call overhead shows.
        "digits_cnn_small": {"shape": (1, 8, 8), "model": "cnn_small", "batch": 64, "eps": 0.1},
    }


# ---- helpers -----------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def method_available(module: str) -> bool:
    import importlib.util

    return (
        importlib.util.find_spec(f"runner.methods.{module}") is not None
        and (REPO / "runner" / "configs" / "method" / f"{module}.yaml").exists()
    )


def build_step(
    workload: dict,
    overrides: list[str],
    device: torch.device,
    *,
    precision: str = "fp32",
    channels_last: bool = False,
    compile_model: bool = False,
):
    """One training step of the runner: the closure calls `update(model, method, x, y, ctx)`."""
    from runner.config import compose
    from runner.data import dataset_info
    from runner.methods import build_method
    from runner.methods.base import StepContext
    from runner.models import build_model
    from runner.optim import build_optimizer
    from runner.update import build_update

    channels, size, _ = workload["shape"]
    model_name = (
        workload.get("ibp_model", workload["model"]) if "+method=ibp" in overrides else workload["model"]
    )
    base = [
        "dataset=synthetic",
        f"dataset.channels={channels}",
        f"dataset.image_size={size}",
        f"model={model_name}",
        f"train.batch_size={workload['batch']}",
        f"threat.eps={workload['eps']}",
        f"train.precision={precision}",
        f"train.channels_last={channels_last}",
    ]
    # A method's YAML may also switch the model options or the optimizer (IBP: BatchNorm and Adam); the
    # step ratios compare methods on one network and one optimizer, so both are pinned to the ERM step's.
    cfg = compose([*base, *overrides, *_pinned_as_erm(compose(base))] if overrides else base)
    torch.manual_seed(0)
    model = build_model(cfg.model, dataset_info(cfg.dataset)).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    method = build_method(cfg)
    method.setup(model)
    optimizer = build_optimizer(cfg.optimizer, model)
    update = build_update(cfg, model, optimizer)
    step_model = torch.compile(model) if compile_model else model
    x = torch.rand(workload["batch"], channels, size, size, device=device)
    y = torch.randint(0, 10, (workload["batch"],), device=device)
    # Step 5000 of 100-step epochs (see METHOD_CASES for IBP's pinned schedule); 5001 is no multiple of
    # train.log_every, so the IBP tightness diagnostic (computed on logged steps only) stays out.
    step = 5000
    ctx = StepContext(step // 100, step, 100, 10_000, "linf", float(workload["eps"]))
    model.train()

    def one_step():
        update(step_model, method, x, y, ctx)

    return one_step


def _override_value(value) -> str:
    return json.dumps(value) if isinstance(value, (list, tuple, str, bool)) or value is None else repr(value)


def _pinned_as_erm(erm_cfg) -> list[str]:
    """Overrides that give a method's config the ERM config's model options and optimizer."""
    from omegaconf import OmegaConf

    pins = [f"optimizer={erm_cfg.optimizer.name}"]
    for group in ("model", "optimizer"):
        for key, value in OmegaConf.to_container(erm_cfg[group], resolve=True).items():
            if key != "name":
                pins.append(f"{group}.{key}={_override_value(value).replace(' ', '')}")
    return pins


# The clock of in-process step timings: with one torch thread on a CPU all the work is this process's,
# and its CPU time does not count the time other processes hold the core (wall time does). On a GPU, or
# with several threads, wall time. Set once in main().
STEP_CLOCK = {"name": "wall", "fn": time.perf_counter}


def use_cpu_clock(enabled: bool) -> None:
    STEP_CLOCK.update(
        {"name": "process_cpu", "fn": time.process_time}
        if enabled
        else {"name": "wall", "fn": time.perf_counter}
    )


def interleaved_medians(steps: dict, device, rounds: int, per_round: int, warmup: int = 2) -> dict:
    """Median seconds per step of each closure, timing them in turn round after round."""
    clock = STEP_CLOCK["fn"]
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    sync(device)
    samples = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            sync(device)
            start = clock()
            for _ in range(per_round):
                fn()
            sync(device)
            samples[name].append((clock() - start) / per_round)
    return {name: statistics.median(values) for name, values in samples.items()}


def ratio_entry(key: str, value: float | None, note: str = "") -> dict:
    what, target, sense = TARGETS[key]
    entry = {"what": what, "value": None if value is None else round(value, 4), "target": f"{sense} {target}"}
    if value is None:
        entry["status"] = "missing"
    else:
        entry["status"] = "pass" if (value <= target if sense == "<=" else value >= target) else "FAIL"
    if note:
        entry["note"] = note
    return entry


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- sections ------------------------------------------------------------------------------------------


def bench_methods(device, rounds, per_round) -> dict:
    out = {}
    for wname, workload in workloads(device).items():
        steps, missing = {}, []
        for case, overrides in METHOD_CASES.items():
            if not method_available(METHOD_MODULE[case]):
                missing.append(case)
                continue
            try:
                steps[case] = build_step(
                    workload,
                    overrides,
                    device,
                    precision="bf16" if device.type == "cuda" else "fp32",
                    channels_last=device.type == "cuda",
                )
            except Exception as err:  # noqa: BLE001 - a method under construction is reported, not fatal
                missing.append(f"{case} ({type(err).__name__}: {err})")
        log(f"method steps on {wname}: {sorted(steps)}; missing {missing or 'none'}")
        times = interleaved_medians(steps, device, rounds, per_round)
        out[wname] = {
            "workload": {k: v for k, v in workload.items()},
            "step_s": {k: round(v, 6) for k, v in times.items()},
            "images_per_s": {k: round(workload["batch"] / v, 1) for k, v in times.items()},
            "missing": missing,
        }
        log("  " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in times.items()))
    return out


def method_ratios(methods: dict) -> dict:
    """The step ratios of the first (compute-bound) workload."""
    first = next(iter(methods.values()))
    t = first["step_s"]

    def get(name):
        return t.get(name)

    def div(a, b, scale=1.0):
        return None if a is None or b is None else a / (scale * b)

    erm = get("erm")
    awp = div(get("at_k10_awp"), get("at_k10"))
    return {
        "at_k1_step_ratio": ratio_entry("at_k1_step_ratio", div(get("at_k1"), erm, 2)),
        "at_k10_step_ratio": ratio_entry(
            "at_k10_step_ratio",
            div(get("at_k10"), erm, 11),
            f"with AWP (method.awp): {round(awp, 3)} x AT's step" if awp else "",
        ),
        "trades_k10_step_ratio": ratio_entry("trades_k10_step_ratio", div(get("trades_k10"), erm, 12)),
        "hr_over_at": ratio_entry("hr_over_at", div(get("hr_k10"), get("at_k10")), "HR alpha 0.05, r 0.1"),
        "sam_over_erm": ratio_entry("sam_over_erm", div(get("sam"), erm)),
        "ibp_over_erm": ratio_entry(
            "ibp_over_erm",
            div(get("ibp"), erm),
            "during the ramp (regulariser on): "
            f"{div(get('ibp_ramp'), erm) and round(div(get('ibp_ramp'), erm), 3)}; "
            "with kappa=shi (the published recipes' robust-only loss, no clean pass): "
            f"{div(get('ibp_shi'), erm) and round(div(get('ibp_shi'), erm), 3)}",
        ),
    }


def bench_kernels(device, rounds, per_round, with_compile: bool) -> dict:
    """fp32 vs bf16 autocast vs channels-last (vs torch.compile): ERM and PGD-10 AT steps."""
    workload = next(iter(workloads(device).values()))
    variants = {
        "fp32": {},
        "bf16": {"precision": "bf16"},
        "channels_last": {"channels_last": True},
        "bf16+channels_last": {"precision": "bf16", "channels_last": True},
    }
    steps = {}
    for method, overrides in (("erm", []), ("at_k10", METHOD_CASES["at_k10"])):
        for variant, options in variants.items():
            steps[f"{method}/{variant}"] = build_step(workload, overrides, device, **options)
    times = interleaved_medians(steps, device, rounds, per_round)
    out = {"workload": workload["model"], "step_s": {k: round(v, 6) for k, v in times.items()}}
    for method in ("erm", "at_k10"):
        base = times[f"{method}/fp32"]
        out[f"{method}_speedup_vs_fp32"] = {v: round(base / times[f"{method}/{v}"], 3) for v in variants}
    if with_compile:
        compiled = {}
        for method, overrides in (("erm", []), ("at_k10", METHOD_CASES["at_k10"])):
            fn = build_step(workload, overrides, device, compile_model=True)
            start = time.perf_counter()
            fn()
            sync(device)
            compiled[f"{method}/compile_first_step_s"] = round(time.perf_counter() - start, 2)
            eager = build_step(workload, overrides, device)
            pair = interleaved_medians(
                {"compiled": fn, "eager": eager}, device, max(3, rounds // 2), per_round
            )
            compiled[f"{method}/compiled_step_s"] = round(pair["compiled"], 6)
            compiled[f"{method}/eager_step_s"] = round(pair["eager"], 6)
            compiled[f"{method}/speedup"] = round(pair["eager"] / pair["compiled"], 3)
        out["compile"] = compiled
    log(f"kernels: {json.dumps({k: v for k, v in out.items() if k != 'step_s'})}")
    return out


class _TorchvisionDataset(torch.utils.data.Dataset):
    """What torchvision's CIFAR10 does per image: PIL image -> transforms -> tensor."""

    def __init__(self, x_uint8, y, tensor_transforms: bool):
        from torchvision import transforms

        self.x, self.y = x_uint8, y
        self.hwc = x_uint8.permute(0, 2, 3, 1).numpy()
        self.tensor_transforms = tensor_transforms
        if tensor_transforms:
            from torchvision.transforms import v2

            self.transform = v2.Compose(
                [
                    v2.RandomCrop(32, padding=4),
                    v2.RandomHorizontalFlip(),
                    v2.ToDtype(torch.float32, scale=True),
                ]
            )
        else:
            self.transform = transforms.Compose(
                [
                    transforms.RandomCrop(32, padding=4),
                    transforms.RandomHorizontalFlip(),
                    transforms.ToTensor(),
                ]
            )

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        from PIL import Image

        image = self.x[i] if self.tensor_transforms else Image.fromarray(self.hwc[i])
        return self.transform(image), int(self.y[i])


def bench_loader(device, repeats: int, n_images: int) -> dict:
    """Images per second of one epoch (crop with 4-pixel padding + horizontal flip, batch 128, CIFAR
    shape, uint8 source): the in-memory loader vs torchvision's per-image pipeline in a DataLoader."""
    from runner.data import InMemoryLoader

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n_images, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n_images,), generator=g)

    loader = InMemoryLoader(x, y, 128, device, augment="crop_flip", padding=4)  # built once, as in a run

    def in_memory():
        loader.set_epoch(loader.epoch + 1)
        for _batch in loader:
            pass
        sync(device)

    def dataloader(workers: int, tensor_transforms: bool):
        dataset = _TorchvisionDataset(x, y, tensor_transforms)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=128,
            shuffle=True,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=device.type == "cuda",
        )

        def epoch():
            for xb, _ in loader:
                xb = xb.to(device, non_blocking=True)
            sync(device)

        epoch()  # workers started, first batches fetched
        return epoch

    workers = min(4, os.cpu_count() or 1)
    candidates = {"in_memory": in_memory}
    for w in sorted({0, workers}):
        candidates[f"dataloader_pil_{w}w"] = dataloader(w, False)
        candidates[f"dataloader_v2tensor_{w}w"] = dataloader(w, True)
    in_memory()
    samples = {k: [] for k in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            samples[name].append(n_images / (time.perf_counter() - start))
    rates = {k: statistics.median(v) for k, v in samples.items()}
    best = max((k for k in rates if k != "in_memory"), key=rates.get)
    log("loader img/s: " + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()))
    return {
        "images_per_s": {k: round(v) for k, v in rates.items()},
        "best_dataloader": best,
        "n_images": n_images,
        "speedup": rates["in_memory"] / rates[best],
    }


def _timed_run(command: list[str], env: dict, cwd: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system) of one command run to completion."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def _compare(commands: dict, repeats: int, env: dict, workdir: Path) -> dict:
    """Median wall and CPU seconds of each command, run in turn `repeats` times."""
    wall = {k: [] for k in commands}
    cpu = {k: [] for k in commands}
    for i in range(repeats):
        for name, command in commands.items():
            w, c = _timed_run(command(i) if callable(command) else command, env, workdir)
            wall[name].append(w)
            cpu[name].append(c)
    return {
        "wall_s": {k: round(statistics.median(v), 3) for k, v in wall.items()},
        "cpu_s": {k: round(statistics.median(v), 3) for k, v in cpu.items()},
        "samples_wall_s": {k: [round(x, 2) for x in v] for k, v in wall.items()},
        "samples_cpu_s": {k: [round(x, 2) for x in v] for k, v in cpu.items()},
    }


def bench_startup(repeats: int, env: dict, workdir: Path) -> dict:
    python = sys.executable
    robust_train = str(Path(python).parent / "robust-train")
    commands = {
        "import_torch": [python, "-c", "import torch"],
        "robust_train_help": [robust_train, "--help"],
        "robust_train_cfg_job": [robust_train, "--cfg", "job"],
    }
    _timed_run(commands["import_torch"], env, workdir)  # warm the file cache
    out = _compare(commands, repeats, env, workdir)
    cpu, wall = out["cpu_s"], out["wall_s"]
    out["ratio_cpu"] = cpu["robust_train_help"] / cpu["import_torch"]
    out["ratio_wall"] = wall["robust_train_help"] / wall["import_torch"]
    out["cfg_job_ratio_cpu"] = cpu["robust_train_cfg_job"] / cpu["import_torch"]
    log(f"start-up CPU s {cpu}, wall s {wall}")
    return out


def bench_end_to_end(repeats: int, epochs: int, env: dict, workdir: Path) -> dict:
    robust_train = str(Path(sys.executable).parent / "robust-train")
    hand = str(REPO / "bench" / "handwritten_at.py")
    commands = {
        "robust_train": lambda i: [
            robust_train,
            "+method=at",
            f"train.epochs={epochs}",
            "train.progress=plain",
            "resume=never",
            f"hydra.run.dir={workdir / f'rt{i}'}",
        ],
        "handwritten": lambda i: [
            sys.executable,
            hand,
            "--epochs",
            str(epochs),
            "--out",
            str(workdir / f"hand{i}"),
        ],
    }
    out = _compare(commands, repeats, env, workdir)
    cpu, wall = out["cpu_s"], out["wall_s"]
    out.update(
        epochs=epochs,
        ratio_cpu=cpu["robust_train"] / cpu["handwritten"],
        ratio_wall=wall["robust_train"] / wall["handwritten"],
    )
    runner_metrics = json.loads((workdir / "rt0" / "results.json").read_text())["metrics"]
    hand_metrics = json.loads((workdir / "hand0" / "results.json").read_text())
    out["test_metrics"] = {
        name: {m: round(v, 4) for m, v in d.items() if m.endswith("acc")}
        for name, d in (("robust_train", runner_metrics), ("handwritten", hand_metrics))
    }
    log(f"end-to-end digits AT ({epochs} epochs): CPU s {cpu}, wall s {wall}")
    return out


def bench_gpu_epoch(device, n_images: int) -> dict:
    """One CIFAR-10-sized epoch (synthetic, 50,000 images) of the cifar10_at preset's training: PGD-10,
    PreActResNet-18, batch 128, bf16 + channels-last, in-memory loader with crop + flip."""
    from runner.config import compose
    from runner.data import InMemoryLoader, dataset_info
    from runner.methods import build_method
    from runner.methods.base import StepContext
    from runner.models import build_model
    from runner.optim import build_optimizer
    from runner.update import build_update

    cfg = compose(
        [
            "experiment=cifar10_at",
            "dataset=synthetic",
            "dataset.channels=3",
            "dataset.image_size=32",
            "threat.eps=0.03137254901960784",
        ]
    )
    model = build_model(cfg.model, dataset_info(cfg.dataset)).to(device).to(memory_format=torch.channels_last)
    method, optimizer = build_method(cfg), build_optimizer(cfg.optimizer, model)
    method.setup(model)
    update = build_update(cfg, model, optimizer)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n_images, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n_images,), generator=g)
    loader = InMemoryLoader(x, y, cfg.train.batch_size, device, augment="crop_flip", padding=4)
    model.train()

    def epoch(limit=None):
        for i, (xb, yb) in enumerate(loader):
            if limit is not None and i >= limit:
                break
            update(model, method, xb, yb, StepContext(0, i, len(loader), len(loader), "linf", cfg.threat.eps))
        sync(device)

    epoch(limit=5)  # warm-up (cudnn autotuning)
    start = time.perf_counter()
    epoch()
    seconds = time.perf_counter() - start
    log(f"PGD-10 AT epoch ({n_images} images): {seconds:.1f} s")
    return {
        "images": n_images,
        "epoch_s": round(seconds, 2),
        "images_per_s": round(n_images / seconds, 1),
        "reference": "Rice et al. 2020: ~186 s/epoch (PreActResNet-18, PGD-10, one 2019 GPU)",
    }


# ---- report --------------------------------------------------------------------------------------------


def machine(device, threads) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "torch_threads": threads,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "malloc_keeps_freed_memory": keep_freed_memory(),
    }
    try:
        model_name = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
        info["cpu"] = model_name
    except (OSError, StopIteration):
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def write_markdown(results: dict, path: Path) -> None:
    m = results["machine"]
    lines = [
        "# robust-train benchmark",
        "",
        f"{m.get('gpu') or m.get('cpu', '?')}, {m['cpu_count']} cores, torch {m['torch']}, "
        f"{m['torch_threads']} torch thread(s); load average {results['load_average']['start']} at the "
        f"start, {results['load_average']['end']} at the end; {results['total_s']:.0f} s in all.",
        "",
        "| ratio | measured | target | |",
        "|---|---|---|---|",
    ]
    for entry in results["ratios"].values():
        value = "missing" if entry["value"] is None else f"{entry['value']:.3f}"
        note = f" ({entry['note']})" if entry.get("note") else ""
        lines.append(f"| {entry['what']}{note} | {value} | {entry['target']} | {entry['status']} |")
    for wname, section in results.get("methods", {}).items():
        lines += [
            "",
            f"## Step times: {wname} ({section['workload']['model']}, batch {section['workload']['batch']}, "
            f"{'x'.join(map(str, section['workload']['shape']))})",
            "",
            "| method | ms / step | images / s |",
            "|---|---|---|",
        ]
        for case, seconds in section["step_s"].items():
            lines.append(f"| {case} | {seconds * 1000:.2f} | {section['images_per_s'][case]:.0f} |")
        if section["missing"]:
            lines.append(f"\nNot measured: {', '.join(section['missing'])}")
    if "kernels" in results:
        k = results["kernels"]
        lines += [
            "",
            f"## Precision and kernels ({k['workload']}; speed-up over fp32, > 1 is faster)",
            "",
            "| step | " + " | ".join(k["erm_speedup_vs_fp32"]) + " |",
            "|---" * (1 + len(k["erm_speedup_vs_fp32"])) + "|",
        ]
        for method in ("erm", "at_k10"):
            row = k[f"{method}_speedup_vs_fp32"]
            lines.append(f"| {method} | " + " | ".join(f"{v:.2f}" for v in row.values()) + " |")
        if "compile" in k:
            c = k["compile"]
            lines.append(
                f"\ntorch.compile: ERM speed-up {c['erm/speedup']:.2f} (first step "
                f"{c['erm/compile_first_step_s']} s), AT-10 speed-up {c['at_k10/speedup']:.2f}."
            )
    if "loader" in results:
        lines += ["", "## Input pipeline (images / s, crop + flip, batch 128)", ""]
        lines += [f"- {k}: {v}" for k, v in results["loader"]["images_per_s"].items()]
    for key, title in (("startup", "Start-up"), ("end_to_end", "End to end: digits AT")):
        if key not in results:
            continue
        e = results[key]
        epochs = f", {e['epochs']} epochs" if "epochs" in e else ""
        lines += [
            "",
            f"## {title}{epochs} (median seconds; CPU = user + system of the process)",
            "",
            "| command | CPU s | wall s | CPU samples | wall samples |",
            "|---|---|---|---|---|",
        ]
        for name in e["cpu_s"]:
            lines.append(
                f"| {name} | {e['cpu_s'][name]} | {e['wall_s'][name]} | {e['samples_cpu_s'][name]} | "
                f"{e['samples_wall_s'][name]} |"
            )
        lines.append(f"\nratio on wall time: {e['ratio_wall']:.3f}")
        if "test_metrics" in e:
            lines.append(f"\ntest metrics (the same work): {json.dumps(e['test_metrics'])}")
    if "gpu_epoch" in results:
        g = results["gpu_epoch"]
        lines += [
            "",
            f"## CIFAR-10 PreActResNet-18 PGD-10 AT epoch: {g['epoch_s']} s ({g['images_per_s']} img/s); "
            f"{g['reference']}",
        ]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 on CPU)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--quick", action="store_true", help="fewer rounds and a short end-to-end run (smoke)"
    )
    parser.add_argument(
        "--skip",
        default="",
        help="comma list of sections: methods,kernels,compile,loader,startup,e2e,gpu_epoch",
    )
    parser.add_argument("--e2e-epochs", type=int, default=None, help="epochs of the end-to-end digits run")
    parser.add_argument("--out", type=Path, default=REPO / "bench")
    args = parser.parse_args(argv)

    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if args.device == "auto"
        else args.device
    )
    threads = args.threads or (torch.get_num_threads() if device.type == "cuda" else 1)
    torch.set_num_threads(threads)
    keep_freed_memory()  # the step timings stand in for a training process: the runner's allocator setting
    use_cpu_clock(device.type == "cpu" and threads == 1)
    skip = set(filter(None, args.skip.split(",")))
    quick = args.quick
    rounds, per_round = (3, 1) if quick else (9, 2)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}

    started = time.perf_counter()
    results = {
        "machine": machine(device, threads),
        "load_average": {"start": load_average()},
        "settings": {
            "quick": quick,
            "rounds": rounds,
            "steps_per_round": per_round,
            "step_clock": STEP_CLOCK["name"],
        },
    }
    log(f"device {device}, {threads} torch thread(s), load average {results['load_average']['start']}")
    ratios = {}
    with tempfile.TemporaryDirectory(prefix="robust-train-bench-") as tmp:
        workdir = Path(tmp)
        if "methods" not in skip:
            results["methods"] = bench_methods(device, rounds, per_round)
            ratios.update(method_ratios(results["methods"]))
        if "kernels" not in skip:
            results["kernels"] = bench_kernels(
                device, max(3, rounds // 2), per_round, with_compile="compile" not in skip and not quick
            )
        if "loader" not in skip:
            results["loader"] = bench_loader(device, 2 if quick else 3, 2560 if quick else 10_000)
            ratios["loader_speedup"] = ratio_entry(
                "loader_speedup", results["loader"]["speedup"], f"vs {results['loader']['best_dataloader']}"
            )
        if "startup" not in skip:
            startup = results["startup"] = bench_startup(2 if quick else 5, env, workdir)
            ratios["startup_ratio"] = ratio_entry(
                "startup_ratio",
                startup["ratio_cpu"],
                f"wall {startup['ratio_wall']:.3f}; `robust-train --cfg job` / import torch: "
                f"{startup['cfg_job_ratio_cpu']:.3f}",
            )
        if "e2e" not in skip:
            epochs = args.e2e_epochs or (2 if quick else 30)
            e2e = results["end_to_end"] = bench_end_to_end(1 if quick else 2, epochs, env, workdir)
            ratios["e2e_ratio"] = ratio_entry(
                "e2e_ratio", e2e["ratio_cpu"], f"{epochs} epochs; wall {e2e['ratio_wall']:.3f}"
            )
        if device.type == "cuda" and "gpu_epoch" not in skip:
            results["gpu_epoch"] = bench_gpu_epoch(device, 50_000)
    results["ratios"] = {k: ratios[k] for k in TARGETS if k in ratios}
    results["load_average"]["end"] = load_average()
    results["total_s"] = round(time.perf_counter() - started, 1)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, args.out / "results.md")
    for entry in results["ratios"].values():
        value = "missing" if entry["value"] is None else f"{entry['value']:.3f}"
        log(f"{entry['status']:>7}  {value:>8}  {entry['target']:>7}  {entry['what']}")
    log(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'} in {results['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
