"""Plain and residual networks (docs/METHOD-NOTES.md, Models), created by name from one registry.

Names: ``plain<d>`` and ``resnet<d>`` for the CIFAR nets (any ``d = 6n+2``), and
``imagenet-plain<d>`` and ``imagenet-resnet<d>`` (``d`` in 34, 50, 101) for the ImageNet
layouts of :mod:`orthomod.imagenet_models`.

Plain-``d`` (``d = 6n+2``): a 3x3 conv with 16 filters, then three stages of ``2n`` 3x3 convs
with 16, 32 and 64 filters on 32x32, 16x16 and 8x8 maps (stride 2 at the first conv of stages 2
and 3), global average pooling and a linear classifier. Every conv is a Conv-BN-ReLU triple
without bias and without shortcuts: ``d - 1`` convs and one linear layer.
ResNet-``d``: the same layers in pairs, each pair with a shortcut; where the width doubles the
shortcut is a 3x3 stride-2 projection (conv + BN), as the paper uses.

    >>> model = create("plain110")
    >>> sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    109
"""
from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from .init import MODEL_INIT_SCHEMES, init_model_, looks_linear_
from .layers import CReLU, SReLU

__all__ = ["create", "parse_model_name", "list_models", "plain_cifar", "resnet_cifar", "PAPER_DEPTHS",
           "ACTIVATIONS", "NORMS", "EVERY_MODEL", "plain_only_settings"]

PAPER_DEPTHS = (20, 32, 44, 56, 110)
# name -> the activation layer after a conv of that many output channels; "tat" names TAT's
# activation, which depends on the whole net: PlainNet builds it and passes the module itself
_ACTIVATION_LAYERS: dict[str, Callable[[int], nn.Module]] = {
    "relu": lambda channels: nn.ReLU(inplace=True), "srelu": SReLU, "crelu": lambda channels: CReLU(),
    "tanh": lambda channels: nn.Tanh()}
ACTIVATIONS = (*_ACTIVATION_LAYERS, "tat")
NORMS = ("bn", "none")
# what every model builds; the other activations and norms exist for the CIFAR plain nets only
EVERY_MODEL = {"activation": "relu", "norm": "bn"}
_WIDTHS = (16, 32, 64)


def _stage_layers(depth: int) -> int:
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(
            f"depth {depth} is not valid for the CIFAR networks: depth must be 6n+2 with n >= 1 "
            f"(8, 14, 20, 26, 32, ..., 44, ..., 56, ..., 110, ...)"
        )
    return (depth - 2) // 6


class ConvBNReLU(nn.Sequential):
    """One Conv-BN-ReLU triple (the conv has no bias: BN's shift replaces it).

    ``norm="none"`` puts an identity in BN's place and gives the conv a bias;
    ``activation="srelu"`` uses :class:`orthomod.layers.SReLU` (ISONet) instead of ReLU,
    ``"crelu"`` :class:`orthomod.layers.CReLU` (twice ``out_channels`` channels out), ``"tanh"``
    :class:`torch.nn.Tanh` (Xiao et al. 2018's vanilla CNNs); a module
    given as ``activation`` is used as it is (TAT's activation, shared by every layer).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, activation: str | nn.Module = "relu",
                 norm: str = "bn"):
        if not (isinstance(activation, nn.Module) or activation in _ACTIVATION_LAYERS) or norm not in NORMS:
            raise ValueError(f"activation must be one of {', '.join(_ACTIVATION_LAYERS)} or a module and norm one of "
                             f"{', '.join(NORMS)}; got {activation!r} and {norm!r}")
        act = activation if isinstance(activation, nn.Module) else _ACTIVATION_LAYERS[activation](out_channels)
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=norm == "none"),
            nn.BatchNorm2d(out_channels) if norm == "bn" else nn.Identity(),
            act,
        )


class _Head(nn.Module):
    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


def _cifar_body(per_stage: int, make_layer: Callable[[int, int, int], nn.Module], expand: int = 1,
                **stem) -> list[nn.Module]:
    """The stem conv and three stages of ``per_stage`` layers (stride 2 entering stages 2, 3);
    each layer's output has ``expand`` times its width in channels (2 after a CReLU)."""
    layers = [ConvBNReLU(3, _WIDTHS[0], **stem)]
    in_channels = expand * _WIDTHS[0]
    for stage, width in enumerate(_WIDTHS):
        for i in range(per_stage):
            layers.append(make_layer(in_channels, width, 2 if stage > 0 and i == 0 else 1))
            in_channels = expand * width
    return layers


class PlainNet(nn.Sequential):
    """``depth - 1`` Conv-BN-ReLU triples and a linear classifier, no shortcuts.

    With ``activation="crelu"`` the convs keep their widths (16, 32, 64 filters) and every layer
    after the stem, the classifier included, reads the twice as wide CReLU output.
    """

    def __init__(self, depth: int, num_classes: int = 10, activation: str = "relu", norm: str = "bn"):
        n = _stage_layers(depth)
        expand = 2 if activation == "crelu" else 1
        if activation == "tat":  # one transformed leaky ReLU for the chain of depth - 1 activations
            from .tat import TATActivation

            activation = TATActivation(depth - 1)
        layer = lambda i, o, s: ConvBNReLU(i, o, s, activation, norm)  # noqa: E731
        super().__init__(*_cifar_body(2 * n, layer, expand, activation=activation, norm=norm),
                         _Head(expand * _WIDTHS[-1], num_classes))
        self.depth = depth

    def crelu_fed(self) -> list[nn.Module]:
        """The weight layers that read a CReLU's output directly (every conv after the stem,
        and the classifier through the average pooling, which is linear): [] without CReLU."""
        if not isinstance(self[0][2], CReLU):
            return []
        blocks = list(self)
        return [block[0] for block in blocks[1:-1]] + [blocks[-1].fc]


class BasicBlock(nn.Module):
    """Two Conv-BN(-ReLU) layers with a shortcut; a 3x3 projection where the width changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = ConvBNReLU(in_channels, out_channels, stride)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn2(self.conv2(self.conv1(x))) + self.shortcut(x))


class ResNet(nn.Sequential):
    """The residual counterpart of :class:`PlainNet` with the same main-path layers."""

    def __init__(self, depth: int, num_classes: int = 10):
        n = _stage_layers(depth)
        super().__init__(*_cifar_body(n, BasicBlock), _Head(_WIDTHS[-1], num_classes))
        self.depth = depth


def plain_cifar(depth: int, num_classes: int = 10, **layer) -> PlainNet:
    return PlainNet(depth, num_classes, **layer)


def resnet_cifar(depth: int, num_classes: int = 10) -> ResNet:
    return ResNet(depth, num_classes)


def _imagenet(residual: bool) -> Callable[..., nn.Module]:
    from .imagenet_models import ImageNetNet

    return lambda depth, num_classes=1000: ImageNetNet(depth, residual, num_classes)


# Families are data: a name is family + depth, checked by the family's builder.
_FAMILIES: dict[str, Callable[..., nn.Module]] = {
    "plain": plain_cifar, "resnet": resnet_cifar,
    "imagenet-plain": _imagenet(residual=False), "imagenet-resnet": _imagenet(residual=True),
}
_CHECK_DEPTH = {"plain": _stage_layers, "resnet": _stage_layers}


def _check_imagenet_depth(depth: int) -> None:
    from .imagenet_models import IMAGENET_DEPTHS

    if depth not in IMAGENET_DEPTHS:
        raise ValueError(f"depth {depth} is not available for the ImageNet nets; choose 34, 50 or 101")


def list_models() -> list[str]:
    """The named models: the paper's CIFAR depths (any ``6n+2`` also works) and the ImageNet nets."""
    cifar = [f"{family}{depth}" for family in ("plain", "resnet") for depth in PAPER_DEPTHS]
    return cifar + [f"imagenet-{family}{depth}" for family in ("plain", "resnet") for depth in (34, 50, 101)]


def parse_model_name(name: str) -> tuple[str, int]:
    """``"plain44"`` -> ``("plain", 44)``; a ValueError names the problem for anything invalid."""
    match = re.fullmatch(r"((?:imagenet-)?[a-z]+)(\d+)", name.strip().lower()) if isinstance(name, str) else None
    if match is None or match.group(1) not in _FAMILIES:
        raise ValueError(
            f"unknown model {name!r}; use plain<depth> or resnet<depth> with depth 6n+2 (CIFAR), or "
            f"imagenet-plain<depth> or imagenet-resnet<depth> with depth 34, 50 or 101"
        )
    family, depth = match.group(1), int(match.group(2))
    _CHECK_DEPTH.get(family, _check_imagenet_depth)(depth)
    return family, depth


def plain_only_settings(name: str, activation: str, norm: str) -> str | None:
    """Why model ``name`` cannot have this activation and norm (those only the CIFAR plain nets
    build), or None if it can."""
    family, _ = parse_model_name(name)
    special = {k: v for k, v in {"activation": activation, "norm": norm}.items() if v != EVERY_MODEL[k]}
    if not special or family == "plain":
        return None
    return (f"only the CIFAR plain nets (plain<d>) build {' and '.join(f'{k} {v}' for k, v in special.items())}, "
            f"not {name}")


def create(name: str, num_classes: int | None = None, init: str | None = "msra", activation: str = "relu",
           norm: str = "bn") -> nn.Module:
    """Build a model by name (``plain44``, ``imagenet-resnet50``, ...) and initialize it.

    ``num_classes`` defaults to 10 for the CIFAR nets and 1000 for the ImageNet nets; ``init``
    is a scheme of :func:`orthomod.init.init_model_`, ``"looks-linear"`` (plain nets with
    ``activation="crelu"``: orthonormal init, then :func:`orthomod.init.looks_linear_` on
    every layer a CReLU feeds), or None for PyTorch's defaults. ``activation="srelu"``,
    ``"crelu"``, ``"tanh"`` and ``norm="none"`` exist for the CIFAR plain nets.
    """
    family, depth = parse_model_name(name)
    if num_classes is None:
        num_classes = 1000 if family.startswith("imagenet-") else 10
    if plain_only := plain_only_settings(name, activation, norm):
        raise ValueError(plain_only)
    layer = {"activation": activation, "norm": norm} if family == "plain" else {}
    if init in MODEL_INIT_SCHEMES and activation != "crelu":
        raise ValueError(f"init {init!r} mirrors the weights that a CReLU feeds; {name!r} with activation "
                         f"{activation!r} has none: use activation='crelu'")
    model = _FAMILIES[family](depth, num_classes=num_classes, **layer)
    if init in MODEL_INIT_SCHEMES:  # looks-linear
        init_model_(model, "orthonormal")  # the stem conv, and every bias and BN layer
        for module in model.crelu_fed():
            looks_linear_(module.weight)
    elif init is not None:
        init_model_(model, init)
    return model
