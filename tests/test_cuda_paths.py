"""The CUDA-path audit: what breaks or drifts only with a GPU setting (channels-last models, TF32, several
GPUs, CUDA generators, NCCL), checked on the CPU where the defect can show there, and behind
`@pytest.mark.gpu` where only a GPU can show it."""

import os
import socket
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from torch import nn

import runner.train
from runner import bounds, distributed
from runner.config import compose
from runner.corruptions.rng import ImageStreams, combine, derive_key
from runner.layers import Normalize
from runner.models import build_model
from runner.precision import EVAL_PRECISION, exact_fp32

DIGITS = SimpleNamespace(channels=1, image_size=8, num_classes=10, mean=[0.5], std=[0.25])


def small_cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = build_model(OmegaConf.create({"name": "cnn_small", "width": 1, "depth": 0, "batch_norm": True,
                                          "hidden": []}), DIGITS)
    for module in model.modules():  # running statistics away from (0, 1): the BatchNorm folding is exercised
        if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


# ---- 1. channels-last models through the bounds and the evaluation -------------------------------------

def test_bounds_of_a_channels_last_model_equal_the_contiguous_models():
    model = small_cnn()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(5, 1, 8, 8, generator=g), torch.randint(0, 10, (5,), generator=g)
    expected = {m: bounds.margin_lower_bounds(model, x, y, 0.01, method=m) for m in bounds.METHODS}
    model = model.to(memory_format=torch.channels_last)
    for method in bounds.METHODS:
        for inputs in (x, x.to(memory_format=torch.channels_last)):
            got = bounds.margin_lower_bounds(model, inputs, y, 0.01, method=method)
            torch.testing.assert_close(got, expected[method], rtol=1e-5, atol=1e-5)


def test_training_channels_last_then_certified_evaluation_runs_on_the_default_layout(tmp_path, monkeypatch):
    """The trained model reaches evaluate() channels-last; the evaluators get it in the default layout
    (attack packages flatten gradients with .view)."""
    from runner.evaluators.certified import Certified

    layouts, certify = [], Certified.__call__

    def recording_call(self, model, *args):
        layouts.append(all(p.is_contiguous() for p in model.parameters()))
        return certify(self, model, *args)

    monkeypatch.setattr(Certified, "__call__", recording_call)
    cfg = compose(["train.epochs=1", "train.progress=plain", "train.channels_last=true", "eval=certified",
                   "eval.n_examples=16", "device=cpu"])
    results = runner.train.run(cfg, tmp_path)
    assert layouts == [True]
    for method in bounds.METHODS:
        assert 0.0 <= results["metrics"][f"certified/{method}/acc"] <= results["metrics"]["clean/acc"]
    assert all(check["passed"] for check in results["checks"])


# ---- 5. exact fp32 for certification and evaluation ----------------------------------------------------

def tf32_settings() -> tuple:
    b = torch.backends
    return (b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision(),
            b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision, b.cuda.matmul.fp32_precision,
            b.mkldnn.matmul.fp32_precision, b.cudnn.benchmark)


@pytest.fixture
def restore_tf32():
    """Puts torch's process-wide precision settings back as they were, whatever the test did."""
    b = torch.backends
    saved = (b.cudnn.allow_tf32, torch.get_float32_matmul_precision(), b.cudnn.benchmark)
    strings = [(s, s.fp32_precision) for s in (b.cudnn.conv, b.cudnn.rnn, b.cuda.matmul, b.mkldnn.matmul)]
    yield
    b.cudnn.allow_tf32 = saved[0]
    torch.set_float32_matmul_precision(saved[1])
    b.cudnn.benchmark = saved[2]
    for switch, value in strings:
        switch.fp32_precision = value


@pytest.mark.parametrize("caller", ["defaults", "tf32_on_through_the_legacy_switches"])
def test_exact_fp32_turns_tf32_and_autotuning_off_and_restores_them_without_warnings(caller, restore_tf32):
    if caller != "defaults":  # what a script may do before it calls the library: TF32 matmuls, autotuning
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.benchmark = True
    before = tf32_settings()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deprecation or mixing warning fails the test
        with exact_fp32():
            # Both of torch's views agree (a disagreement raises in the legacy getters and in cuBLAS).
            assert tf32_settings() == (False, False, "highest", "ieee", "ieee", "ieee", "ieee", False)
        assert tf32_settings() == before
        with pytest.raises(KeyError), exact_fp32():
            raise KeyError("restored on the way out of an error too")
        assert tf32_settings() == before
    assert before[3] == "tf32"  # torch's default: cuDNN convolutions in TF32, which is why this exists
    assert not torch.cuda.is_initialized()


def test_evaluation_and_ibp_validation_run_in_exact_fp32_and_results_say_so(tmp_path, monkeypatch):
    import runner.evaluate
    import runner.methods.ibp

    seen = []
    ibp_bounds = runner.methods.ibp.bounds.ibp_margin_bounds

    def recording_bounds(*args, **kwargs):
        seen.append(("ibp validate", torch.backends.cudnn.conv.fp32_precision))
        return ibp_bounds(*args, **kwargs)

    class Recording:
        name = "recording"

        def supports(self, model):
            return True, ""

        def __call__(self, model, x, y, ctx):
            seen.append(("evaluate", torch.backends.cudnn.conv.fp32_precision))
            return SimpleNamespace(metrics={}, settings={}, checks=[], per_example={})

    monkeypatch.setattr(runner.methods.ibp.bounds, "ibp_margin_bounds", recording_bounds)
    monkeypatch.setattr(runner.evaluate, "build_evaluators", lambda cfg: [Recording()])
    cfg = compose(["+method=ibp", "train.epochs=1", "train.progress=plain", "device=cpu",
                   "dataset.val_size=32", "eval.n_examples=8"])
    outside = torch.backends.cudnn.conv.fp32_precision
    results = runner.train.run(cfg, tmp_path)
    assert ("ibp validate", "ieee") in seen and ("evaluate", "ieee") in seen
    assert {precision for _, precision in seen} == {"ieee"}
    assert torch.backends.cudnn.conv.fp32_precision == outside
    assert results["env"]["eval_precision"] == EVAL_PRECISION


# ---- 3. CUDA RNG state: this process's device only -----------------------------------------------------

@pytest.fixture
def cuda_rng_on_device_1(monkeypatch):
    """torch.cuda as a process on cuda:1 of a multi-GPU machine sees it: states are tagged by device."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([10 + device]))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": calls.append((state, device)))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("saves every GPU's state"))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("restores every GPU's"))
    return calls


def test_rng_state_keeps_the_current_devices_cuda_generator_only(cuda_rng_on_device_1):
    state = runner.train.rng_state()
    assert torch.equal(state["cuda"], torch.tensor([11]))
    runner.train.restore_rng(state)
    assert cuda_rng_on_device_1 == [(state["cuda"], 1)]


def test_older_checkpoints_with_one_state_per_gpu_restore_the_current_devices(cuda_rng_on_device_1):
    cpu = torch.get_rng_state()
    states = [torch.tensor([20]), torch.tensor([21]), torch.tensor([22])]
    runner.train.restore_rng({"torch": cpu, "cuda": states})
    assert cuda_rng_on_device_1 == [(states[1], 1)]
    # Saved where only one GPU was visible: nothing for cuda:1 (no IndexError); the CPU state is restored.
    runner.train.restore_rng({"torch": cpu, "cuda": states[:1]})
    assert len(cuda_rng_on_device_1) == 1
    assert torch.equal(torch.get_rng_state(), cpu)


# ---- 7. regenerated shot noise: the same numbers on every device ----------------------------------------

def test_poisson_draws_are_the_per_image_cpu_generators_draws():
    """What the sampler has always drawn on a CPU: torch.poisson of each image's rates with a CPU generator
    seeded by the image's key (a GPU run now gets these very numbers, moved to its device)."""
    key, first, n, draw = derive_key(3, 7, 2), 5, 4, 11
    rate = torch.linspace(0, 40, n * 15).view(n, 3, 5)
    got = ImageStreams(key, first, n, "cpu").poisson(draw, rate)
    seeds = combine(ImageStreams(key, first, n, "cpu").image_keys, draw).tolist()
    expected = torch.stack([torch.poisson(rate[i].double(), generator=torch.Generator().manual_seed(seed))
                            for i, seed in enumerate(seeds)])
    assert got.dtype == torch.float64 and torch.equal(got, expected)
    assert got.sum() > 0 and not torch.equal(got[0], got[1])  # really random, per image


# ---- 8. averaging BatchNorm statistics only ---------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _three_rank_worker(rank, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="3")
    procs, _ = distributed.setup(torch.device("cpu"))
    try:
        # 0.4465 (CIFAR-10's blue mean): (v + v + v) / 3 != v in float32, the 1-ulp drift of averaging it.
        model = nn.Sequential(Normalize([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
                              nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
        normalize = {name: b.clone() for name, b in model[0].named_buffers()}
        bn = model[2]
        bn.running_mean.fill_(float(rank))
        bn.running_var.fill_(float(rank + 1))
        bn.num_batches_tracked.fill_(10 + rank)
        distributed.average_buffers(model, procs)
        assert all(torch.equal(b, normalize[name]) for name, b in model[0].named_buffers())
        torch.testing.assert_close(bn.running_mean, torch.full((2,), 1.0))
        torch.testing.assert_close(bn.running_var, torch.full((2,), 2.0))
        assert bn.num_batches_tracked.item() == 10 + rank
        Path(out_dir, f"rank{rank}.ok").write_text("ok")
    finally:
        distributed.teardown(procs)


def test_average_buffers_averages_batchnorm_statistics_and_leaves_constants_bitwise(tmp_path):
    mp.start_processes(_three_rank_worker, args=(_free_port(), str(tmp_path)), nprocs=3, start_method="fork")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.ok", "rank1.ok", "rank2.ok"]


# ---- 2 and 10. process groups ------------------------------------------------------------------------------

def test_the_group_waiting_for_the_evaluation_is_gloo_whatever_the_default_backend(monkeypatch):
    created = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "new_group", lambda **kwargs: created.append(kwargs) or "group")
    monkeypatch.setattr(distributed, "_final_group", None)  # and back to None after the test
    distributed.after_training(distributed.Processes(rank=1, world_size=2, local_rank=1))
    assert created and created[0]["backend"] == "gloo" and created[0]["timeout"].days >= 7


def test_an_explicit_gpu_index_under_several_processes_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match=r"device=cuda:0 .*device=cuda"):
        distributed.setup(torch.device("cuda:0"))


# ---- 9. PGD validation in batches ------------------------------------------------------------------------

def test_pgd_validation_in_batches_equals_the_whole_split_at_once(monkeypatch):
    import runner.attacks
    from runner.config import AttackConfig
    from runner.methods import at
    from runner.methods.base import StepContext

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 5)).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(70, 1, 6, 6, generator=g)
    y = model(x).argmax(1).detach()
    y[::4] = (y[::4] + 1) % 5  # some points wrong already
    ctx = StepContext(epoch=0, step=0, steps_per_epoch=1, total_steps=1, norm="linf", eps=0.02)
    method_config = OmegaConf.structured(at.Config(attack=AttackConfig()))
    attacked, attack = [], runner.attacks.pgd

    def recording_pgd(model, x, *args, **kwargs):
        attacked.append(attack(model, x, *args, **kwargs))
        return attacked[-1]

    monkeypatch.setattr(runner.attacks, "pgd", recording_pgd)

    def validate(eval_section):
        torch.manual_seed(5)
        return at.build(OmegaConf.create({"method": method_config, **eval_section})).validate(model, x, y, ctx)

    whole = validate({})
    batched = validate({"eval": {"batch_size": 16}})
    assert [len(x_adv) for x_adv in attacked] == [70, 16, 16, 16, 16, 6]
    # The same random starts (L-inf draws on a CPU are sequential), hence the same adversarial points.
    assert torch.equal(torch.cat(attacked[1:]), attacked[0])
    assert batched == whole
    assert 0 < whole["val/pgd_acc"] < whole["val/clean_acc"]


# ---- 4. the CPU suite hides the GPUs ------------------------------------------------------------------

def test_mark_expressions_that_select_gpu_tests():
    from conftest import selects_gpu_tests

    for expression in ("gpu", "gpu or slow", "slow and gpu", "gpu and not slow", "(gpu)"):
        assert selects_gpu_tests(expression), expression
    for expression in ("", "not gpu", "slow", "not slow", "not (gpu or slow)", "slow or not gpu"):
        assert not selects_gpu_tests(expression), expression


def test_this_cpu_run_sees_no_gpu(pytestconfig):
    from conftest import selects_gpu_tests

    if selects_gpu_tests(pytestconfig.option.markexpr):
        pytest.skip("this session selected gpu tests: CUDA stays visible")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert not torch.cuda.is_available()


# ---- on a GPU -----------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_rng_state_round_trip_on_the_current_device():
    torch.cuda.init()
    state = runner.train.rng_state()
    assert isinstance(state["cuda"], torch.Tensor)
    first = torch.rand(5, device="cuda")
    runner.train.restore_rng(state)
    assert torch.equal(torch.rand(5, device="cuda"), first)
    runner.train.restore_rng({**state, "cuda": [state["cuda"]] * torch.cuda.device_count()})  # older format
    assert torch.equal(torch.rand(5, device="cuda"), first)


@pytest.mark.gpu
def test_poisson_draws_on_the_gpu_equal_the_cpus():
    key, rate = derive_key(1, 2), torch.rand(6, 3, 8, 8, dtype=torch.float64) * 30
    cpu = ImageStreams(key, 0, 6, "cpu").poisson(4, rate)
    gpu = ImageStreams(key, 0, 6, "cuda").poisson(4, rate.cuda())
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)


@pytest.mark.gpu
def test_exact_fp32_convolutions_match_float64_on_the_gpu():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 64, 16, 16, generator=g), torch.randn(64, 64, 3, 3, generator=g)
    reference = torch.nn.functional.conv2d(x.double(), w.double(), padding=1)
    with exact_fp32():
        got = torch.nn.functional.conv2d(x.cuda(), w.cuda(), padding=1).cpu().double()
        product = (x.flatten(1).cuda() @ x.flatten(1).T.cuda()).cpu().double()
    scale = reference.abs().max()
    assert (got - reference).abs().max() / scale < 1e-5  # TF32's 10-bit mantissa errs by ~1e-3 here
    exact_product = x.flatten(1).double() @ x.flatten(1).T.double()
    assert (product - exact_product).abs().max() / exact_product.abs().max() < 1e-5


@pytest.mark.gpu
def test_channels_last_bounds_on_the_gpu_equal_the_contiguous_models():
    model = small_cnn().cuda()
    x, y = torch.rand(5, 1, 8, 8, device="cuda"), torch.randint(0, 10, (5,), device="cuda")
    with exact_fp32():
        expected = {m: bounds.margin_lower_bounds(model, x, y, 0.01, method=m) for m in bounds.METHODS}
        model = model.to(memory_format=torch.channels_last)
        for method in bounds.METHODS:
            got = bounds.margin_lower_bounds(model, x, y, 0.01, method=method)
            torch.testing.assert_close(got, expected[method], rtol=1e-5, atol=1e-5)
