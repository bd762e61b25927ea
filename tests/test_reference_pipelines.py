"""The pieces of the reference recipes that are not methods: crop padding modes (Shi et al.'s edge,
Rice et al.'s reflection), replaced normalisation constants, fast AT's cycled momentum (torch's CyclicLR)
and the WRN references' initialisation; and the presets that use them."""

import numpy as np
import pytest
import torch

from runner.data import CropWindows, InMemoryLoader, dataset_info, pad_images
from runner.errors import ConfigError

NUMPY_MODES = {"zeros": "constant", "edge": "edge", "reflect": "reflect"}


@pytest.mark.parametrize("mode", sorted(NUMPY_MODES))
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_padding_equals_numpy_pad(mode, dtype):
    x = (torch.rand(3, 2, 5, 7) * 255).to(dtype)
    expected = np.pad(x.numpy(), ((0, 0), (0, 0), (3, 3), (3, 3)), mode=NUMPY_MODES[mode])
    assert np.array_equal(pad_images(x, 3, mode).numpy(), expected)


def test_loader_crops_are_windows_of_the_padded_images():
    x = torch.randint(0, 256, (6, 1, 5, 5), dtype=torch.uint8)
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (2, 2), (2, 2)), mode="edge")
    loader = InMemoryLoader(x, torch.arange(6), 6, torch.device("cpu"), shuffle=False, augment="crop", padding=2,
                            padding_mode="edge")
    crops, labels = next(iter(loader))
    for crop, i in zip(crops, labels):
        windows = [padded[i, :, top:top + 5, left:left + 5] / 255.0 for top in range(5) for left in range(5)]
        assert any(np.allclose(crop.numpy(), window) for window in windows)
    corner = CropWindows(x, 2, "edge")(torch.arange(6), torch.zeros(6, dtype=torch.long),
                                       torch.zeros(6, dtype=torch.long))
    assert torch.equal(corner[:, :, 0, 0], x[:, :, 0, 0].float() / 255)  # the corner repeats, not zero


def test_normalisation_constants_can_be_replaced(compose_cfg):
    from runner.models import build_model

    cfg = compose_cfg("dataset.mean=[0.0]", "dataset.std=[1.0]")
    info = dataset_info(cfg.dataset)
    assert (info.mean, info.std) == ((0.0,), (1.0,))
    model = build_model(cfg.model, info)
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(model[0](x), x)
    assert dataset_info(compose_cfg().dataset).std != (1.0,)


@pytest.mark.parametrize(
    "override, message",
    [("dataset.std=[0.2,0.3]", "one value per channel"), ("dataset.std=[0.0]", "> 0"),
     ("dataset.mean=[a]", "numbers"), ("dataset.crop_padding_mode=mirror", "crop_padding_mode")],
)
def test_bad_pipeline_values_name_the_key(compose_cfg, override, message):
    from runner.validation import check_run as validate

    with pytest.raises(ConfigError, match=message) as error:
        validate(compose_cfg(override))
    assert override.split("=")[0] in str(error.value)


def test_cycled_momentum_is_torchs_cyclic_lr_and_resumes(compose_cfg):
    from runner.optim import build_optimizer, build_scheduler

    cfg = compose_cfg("optimizer=sgd", "optimizer.lr=0.2", "scheduler=onecycle", "scheduler.cycle_momentum=[0.8,0.9]")

    def ours():
        optimizer = build_optimizer(cfg.optimizer, torch.nn.Linear(2, 2))
        return optimizer, build_scheduler(cfg.scheduler, optimizer, 10, 100)

    optimizer, scheduler = ours()
    reference_optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.2, momentum=0.9)
    reference = torch.optim.lr_scheduler.CyclicLR(reference_optimizer, 0.0, 0.2, step_size_up=50, step_size_down=50)
    trajectory = []
    for step in range(100):
        ours_now = optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["momentum"]
        theirs = reference_optimizer.param_groups[0]["lr"], reference_optimizer.param_groups[0]["momentum"]
        assert ours_now == pytest.approx(theirs, abs=1e-12)
        trajectory.append(ours_now)
        if step == 40:
            saved = optimizer.state_dict(), scheduler.state_dict()
        for opt, sched in ((optimizer, scheduler), (reference_optimizer, reference)):
            opt.step()
            sched.step()
    assert min(m for _, m in trajectory) == pytest.approx(0.8)
    resumed_optimizer, resumed = ours()
    resumed_optimizer.load_state_dict(saved[0])
    resumed.load_state_dict(saved[1])
    for step in range(41, 100):
        resumed_optimizer.step()
        resumed.step()
        assert (resumed_optimizer.param_groups[0]["lr"], resumed_optimizer.param_groups[0]["momentum"]) == (
            trajectory[step])


def test_cycled_momentum_needs_sgd(compose_cfg):
    from runner.validation import check_run as validate

    with pytest.raises(ConfigError, match="scheduler.cycle_momentum"):
        validate(compose_cfg("optimizer=adam", "scheduler.cycle_momentum=[0.8,0.9]"))
    with pytest.raises(ConfigError, match="low <= high"):
        validate(compose_cfg("optimizer=sgd", "scheduler.cycle_momentum=[0.9,0.8]"))


def test_wide_resnets_use_their_references_initialisation(compose_cfg):
    from runner.models import build_model

    def conv_and_head(*overrides):
        cfg = compose_cfg("dataset=synthetic", "dataset.channels=3", "dataset.image_size=8", *overrides)
        torch.manual_seed(0)
        model = build_model(cfg.model, dataset_info(cfg.dataset))
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[1] >= 16]
        return convs[0], [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]

    conv, head = conv_and_head("model=wrn_28_10", "model.depth=10", "model.width=4")
    fan_out = conv.weight.shape[0] * conv.weight[0, 0].numel()
    assert conv.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.05)  # He-normal over fan-out
    assert torch.count_nonzero(head.bias) == 0
    conv, head = conv_and_head("model=preact_resnet18", "model.width=1")  # Rice et al.: torch's defaults
    assert conv.weight.std().item() < 0.7 * (2 / (conv.weight.shape[0] * 9)) ** 0.5
    assert torch.count_nonzero(head.bias) > 0


def test_presets_carry_their_references_pipelines(compose_cfg):
    for preset in ("cifar10_ibp", "cifar10_ibp_2"):
        d = compose_cfg(f"experiment={preset}").dataset
        assert (d.crop_padding, d.crop_padding_mode, d.val_size) == (2, "edge", 0)
        assert list(d.std) == [0.2023, 0.1994, 0.201]
    for preset in ("mnist_ibp", "mnist_ibp_03"):
        cfg = compose_cfg(f"experiment={preset}")
        info = dataset_info(cfg.dataset)
        assert (info.mean, info.std) == ((0.0,), (1.0,))
        assert (cfg.dataset.val_size, cfg.eval.checkpoint, cfg.method.eps_factor) == (0, "last", 1.0)
    for preset in ("cifar10_at", "cifar10_at_awp", "cifar10_hr"):
        assert compose_cfg(f"experiment={preset}").dataset.crop_padding_mode == "reflect"
    assert list(compose_cfg("experiment=cifar10_fast_at").scheduler.cycle_momentum) == [0.8, 0.9]
    sam = compose_cfg("experiment=cifar10_sam")
    assert (sam.optimizer.nesterov, sam.train.grad_clip) == (True, 5.0)


def test_hr_preset_is_the_at_preset_but_for_the_method(compose_cfg):
    """The HR paper compares HR with AT in one setup: with alpha = r = 0 the presets' configs agree."""
    from omegaconf import OmegaConf

    at = OmegaConf.to_container(compose_cfg("experiment=cifar10_at"), resolve=True)
    hr = OmegaConf.to_container(compose_cfg("experiment=cifar10_hr", "method.r=0"), resolve=True)
    at_method, hr_method = at.pop("method"), hr.pop("method")
    assert at == hr
    assert {k for k in at_method.keys() | hr_method.keys() if at_method.get(k) != hr_method.get(k)} == {
        "name", "alpha", "r"}


def _bn_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 10)).train()


@pytest.mark.parametrize("method_name, overrides", [
    ("trades", []),  # yaodongyu/TRADES: CE(f(x)), KL(f(x) || f(x')) with f(x) forwarded again, then the step
    ("at", ["method.clean_bn_pass=true"]),  # Rice et al.: f(x') for the loss, the step, then f(x) to log
    ("at", []),  # Madry et al.
    ("hr", ["method.clean_bn_pass=true"]),  # Rice_HR.py (alpha = r = 0: AT's loss)
    ("at", ["method.clean_bn_pass=true", "method.sam=true"]),
])
def test_batch_norm_statistics_see_the_references_forward_passes(compose_cfg, method_name, overrides):
    """The evaluated model normalises with BN's running statistics: they must see the clean and adversarial
    batches the reference's loop forwards in train mode, in its order and with the weights of that moment."""
    import torch.nn.functional as F

    from runner.methods import build_method
    from runner.methods.base import StepContext
    from runner.update import build_update

    cfg = compose_cfg(f"+method={method_name}", "optimizer=sgd", "optimizer.lr=0.5", *overrides)
    method = build_method(cfg)
    x, y = torch.rand(8, 1, 8, 8), torch.arange(8)
    x_adv = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    method.adversarial = lambda *args, **kwargs: x_adv  # the attack's own passes are not the question
    model = _bn_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    build_update(cfg, model, optimizer)(model, method, x, y, StepContext(0, 0, 10, 100, "linf", 0.1))

    reference = _bn_model()
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    sam = cfg.method.sam
    if method_name == "trades":
        clean, adv, target = reference(x), reference(x_adv), reference(x)
        loss = F.cross_entropy(clean, y) + cfg.method.beta * F.kl_div(
            F.log_softmax(adv, 1), F.softmax(target, 1), reduction="batchmean")
    else:
        loss = F.cross_entropy(reference(x_adv), y)
    loss.backward()
    if not sam:  # (SAM's second pass leaves the statistics as they were; its step is not re-derived here)
        reference_optimizer.step()
        for ours, theirs in zip(model.parameters(), reference.parameters()):
            assert torch.allclose(ours, theirs, atol=1e-6)
    if method.cfg.method.get("clean_bn_pass") and not sam:
        with torch.no_grad():
            reference(x)
    expected_passes = {"trades": 3}.get(method_name, 2 if cfg.method.get("clean_bn_pass") else 1)
    for ours, theirs in zip(model.modules(), reference.modules()):
        if isinstance(ours, torch.nn.BatchNorm2d):
            assert ours.num_batches_tracked == expected_passes
            if not sam:
                assert torch.allclose(ours.running_mean, theirs.running_mean, atol=1e-7)
                assert torch.allclose(ours.running_var, theirs.running_var, atol=1e-7)
