"""The model zoo. Every model is an nn.Sequential whose first layer is `Normalize`, so inputs are in
[0, 1] pixel units everywhere, and whose layers the bounds module can walk.
"""

import torch
from torch import nn

from runner.layers import Normalize, Residual, conv2d


def _conv_stack(in_ch: int, specs, batch_norm: bool) -> list[nn.Module]:
    """specs: (out_channels, kernel, stride, padding) per conv, each followed by [BN] + ReLU."""
    layers = []
    for out_ch, kernel, stride, padding in specs:
        layers.append(conv2d(in_ch, out_ch, kernel, stride, padding))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_ch))
        layers.append(nn.ReLU())
        in_ch = out_ch
    return layers


def _head(features: nn.Sequential, in_shape, hidden: list[int], num_classes: int, batch_norm: bool):
    """Flatten, then FC layers; the flattened size is measured with a dry run on the real input shape."""
    with torch.no_grad():
        flat = features.eval()(torch.zeros(1, *in_shape)).numel()  # eval: leave BN statistics untouched
    features.train()
    layers = [nn.Flatten()]
    for width in hidden:
        layers.append(nn.Linear(flat, width))
        if batch_norm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(nn.ReLU())
        flat = width
    layers.append(nn.Linear(flat, num_classes))
    return layers


def mlp(cfg, info):
    d = info.channels * info.image_size**2
    return [nn.Flatten()], d, list(cfg.hidden)


def cnn_small(cfg, info):
    """Gowal et al. (2018) "small": conv16 4x4/2, conv32 4x4/1, FC100."""
    w = cfg.width
    return _conv_stack(info.channels, [(16 * w, 4, 2, 1), (32 * w, 4, 1, 1)], cfg.batch_norm), None, [100 * w]


def cnn_digits(cfg, info):
    """The default model: conv32 3x3/1, conv64 3x3/2, FC128. On 8x8 digits, Gowal's small CNN halves the
    image in its first layer (4x4 stride 2) and leaves 2x2 maps: PGD-AT at eps 0.1 tops out near 84%
    AutoAttack with it, near 90% with this net at about 1.5x the step time."""
    w = cfg.width
    return _conv_stack(info.channels, [(32 * w, 3, 1, 1), (64 * w, 3, 2, 1)], cfg.batch_norm), None, [128 * w]


def cnn_large(cfg, info):
    """Gowal et al. (2018) "large": conv64, conv64, conv128/2, conv128, conv128 (3x3), FC512."""
    w = cfg.width
    specs = [(64 * w, 3, 1, 1), (64 * w, 3, 1, 1), (128 * w, 3, 2, 1), (128 * w, 3, 1, 1), (128 * w, 3, 1, 1)]
    return _conv_stack(info.channels, specs, cfg.batch_norm), None, [512 * w]


def cnn7(cfg, info):
    """Shi et al. (2021) / CTBench cnn_7layer_bn: five 3x3 convs (BN + ReLU each), FC512 + BN, FC."""
    w = cfg.width
    specs = [(64 * w, 3, 1, 1), (64 * w, 3, 1, 1), (128 * w, 3, 2, 1), (128 * w, 3, 1, 1), (128 * w, 3, 1, 1)]
    return _conv_stack(info.channels, specs, cfg.batch_norm), None, [512 * w]


def _preact_block(in_ch: int, out_ch: int, stride: int) -> list[nn.Module]:
    """Pre-activation block (He et al. 2016). With a projection shortcut, BN-ReLU comes first and feeds
    both branches; with an identity shortcut the raw input is added back."""

    def conv(i, o, s):
        return nn.Conv2d(i, o, 3, s, 1, bias=False)

    if stride == 1 and in_ch == out_ch:
        main = nn.Sequential(
            nn.BatchNorm2d(in_ch), nn.ReLU(), conv(in_ch, out_ch, 1), nn.BatchNorm2d(out_ch), nn.ReLU(),
            conv(out_ch, out_ch, 1),
        )
        return [Residual(main)]
    main = nn.Sequential(conv(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch), nn.ReLU(), conv(out_ch, out_ch, 1))
    shortcut = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)
    return [nn.BatchNorm2d(in_ch), nn.ReLU(), Residual(main, shortcut)]


def _residual_net(in_ch, stem_ch, stages, blocks_per_stage, num_classes):
    layers = [conv2d(in_ch, stem_ch, 3, 1, 1, bias=False)]
    ch = stem_ch
    for i, (out_ch, n_blocks) in enumerate(zip(stages, blocks_per_stage)):
        for b in range(n_blocks):
            layers += _preact_block(ch, out_ch, 2 if (b == 0 and i > 0) else 1)
            ch = out_ch
    layers += [nn.BatchNorm2d(ch), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ch, num_classes)]
    return layers


def preact_resnet18(cfg, info):
    w = cfg.width
    return _residual_net(info.channels, 64 * w, [64 * w, 128 * w, 256 * w, 512 * w], [2, 2, 2, 2], info.num_classes)


def wide_resnet(cfg, info):
    """WRN-depth-k (Zagoruyko & Komodakis 2016): (depth - 4) / 6 pre-activation blocks per stage."""
    depth, k = cfg.depth or 28, cfg.width
    if (depth - 4) % 6:
        raise ValueError(f"model.depth={depth}: a wide ResNet needs depth = 6n + 4 (e.g. 28, 34)")
    n = (depth - 4) // 6
    layers = _residual_net(info.channels, 16, [16 * k, 32 * k, 64 * k], [n, n, n], info.num_classes)
    # Both WRN references (TRADES' wideresnet.py, Foret et al.'s SAM code) draw conv weights He-normal
    # over fan-out and zero the classifier's bias; PreActResNet-18 (Rice et al.) keeps torch's defaults.
    for module in nn.Sequential(*layers).modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)
    return layers


ARCHITECTURES = {
    "mlp": mlp,
    "cnn_small": cnn_small,
    "cnn_digits": cnn_digits,
    "cnn_large": cnn_large,
    "cnn7": cnn7,
    "preact_resnet18": preact_resnet18,
    "wrn_28_10": wide_resnet,
    "wrn_34_10": wide_resnet,
    "wide_resnet": wide_resnet,
}


def build_model(cfg, info) -> nn.Sequential:
    """cfg: the `model` node; info: the dataset's DatasetInfo (channels, size, classes, mean/std)."""
    if cfg.name not in ARCHITECTURES:
        raise ValueError(f"model.name={cfg.name!r} is not a known model; choose one of {sorted(ARCHITECTURES)}")
    built = ARCHITECTURES[cfg.name](cfg, info)
    normalize = Normalize(info.mean, info.std)
    if isinstance(built, list):  # a complete network
        return nn.Sequential(normalize, *built)
    features, _, hidden = built
    features = nn.Sequential(*features)
    in_shape = (info.channels, info.image_size, info.image_size)
    head = _head(features, in_shape, hidden, info.num_classes, cfg.batch_norm and cfg.name == "cnn7")
    if cfg.name == "mlp":
        head = head[1:]  # mlp's features already flatten
    return nn.Sequential(normalize, *features, *head)
