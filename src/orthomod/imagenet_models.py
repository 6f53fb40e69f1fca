"""ImageNet ResNet-34/50/101 and their plain twins (docs/METHOD-NOTES.md, Models, Decision).

The standard layouts (He et al. 2016): a 7x7 stride-2 conv (64) with BN and ReLU, a 3x3
stride-2 max pool, four stages of widths 64, 128, 256, 512 with 3, 4, 6, 3 blocks (34 and 50)
or 3, 4, 23, 3 blocks (101), global average pooling and a linear classifier. ResNet-34 uses
basic blocks (two 3x3 convs), ResNet-50/101 bottlenecks (1x1 reduce, 3x3, 1x1 expand by 4);
stride 2 enters stages 2-4 at the block's first 3x3 conv (at the 3x3 of a bottleneck); a
shortcut that changes shape is a 1x1 projection (conv + BN).

The plain twin has the same layers with the shortcuts removed (projections included): every
conv is a Conv-BN-ReLU triple, so plain-34 has 33 convs and a linear layer, plain-50 has 49,
plain-101 has 100. The 1x1 expansions have ``f_out > f_in`` (256 filters of 64 inputs): the
orthonormal init and regularizer treat them group-wise.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ImageNetNet", "IMAGENET_DEPTHS"]

# depth -> (bottleneck?, blocks per stage)
IMAGENET_DEPTHS = {34: (False, (3, 4, 6, 3)), 50: (True, (3, 4, 6, 3)), 101: (True, (3, 4, 23, 3))}
_WIDTHS = (64, 128, 256, 512)


def _conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(out_channels)]


class _Block(nn.Module):
    """A basic block or a bottleneck; with ``residual=False`` its shortcut is gone."""

    def __init__(self, in_channels: int, width: int, stride: int, bottleneck: bool, residual: bool):
        super().__init__()
        out_channels = width * 4 if bottleneck else width
        if bottleneck:
            shapes = [(in_channels, width, 1, 1), (width, width, 3, stride), (width, out_channels, 1, 1)]
        else:
            shapes = [(in_channels, width, 3, stride), (width, out_channels, 3, 1)]
        layers: list[nn.Module] = []
        for i, (cin, cout, kernel, s) in enumerate(shapes):
            layers += _conv_bn(cin, cout, kernel, s)
            if i < len(shapes) - 1 or not residual:
                layers.append(nn.ReLU(inplace=True))
        self.body = nn.Sequential(*layers)
        self.residual = residual
        self.shortcut = None
        if residual and (stride != 1 or in_channels != out_channels):
            self.shortcut = nn.Sequential(*_conv_bn(in_channels, out_channels, 1, stride))
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.residual:
            return self.body(x)
        identity = x if self.shortcut is None else self.shortcut(x)
        return torch.relu(self.body(x) + identity)


class ImageNetNet(nn.Sequential):
    """ResNet-``depth`` (``residual=True``) or its plain twin, for 224x224 inputs."""

    def __init__(self, depth: int, residual: bool, num_classes: int = 1000):
        if depth not in IMAGENET_DEPTHS:
            raise ValueError(f"depth {depth} is not available for the ImageNet nets; choose 34, 50 or 101")
        bottleneck, blocks = IMAGENET_DEPTHS[depth]
        layers: list[nn.Module] = [*_conv_bn(3, 64, 7, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
        in_channels = 64
        for stage, (width, count) in enumerate(zip(_WIDTHS, blocks)):
            for i in range(count):
                block = _Block(in_channels, width, 2 if stage > 0 and i == 0 else 1, bottleneck, residual)
                layers.append(block)
                in_channels = block.out_channels
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, num_classes)]
        super().__init__(*layers)
        self.depth = depth
