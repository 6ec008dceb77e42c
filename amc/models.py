"""Built-in networks for the command line, the examples and the benchmarks: small, randomly initialised, no download.

``build_model(name, in_channels, num_classes)`` makes one by name (see ``MODELS``). Every network takes
``(N, in_channels, H, W)`` images; the classifiers return ``(N, num_classes)`` logits, the UNet per-pixel logits.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1, groups: int = 1,
                 kernel_size: int = 3, relu: bool = True) -> nn.Sequential:
    """A same-padded conv without bias, batch norm and (optionally) ReLU."""
    layers = [nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
              nn.BatchNorm2d(out_channels)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """The CIFAR ResNet block: two 3x3 convs and a residual add (a 1x1 projection where the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv_bn_relu(in_channels, out_channels, stride)
        self.conv2 = conv_bn_relu(out_channels, out_channels, relu=False)
        self.shortcut = (nn.Identity() if stride == 1 and in_channels == out_channels
                         else conv_bn_relu(in_channels, out_channels, stride, kernel_size=1, relu=False))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNet20(nn.Module):
    """He et al.'s CIFAR ResNet-20 (three stages of three basic blocks, widths 16-32-64); ``width`` scales them."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 16, blocks: int = 3):
        super().__init__()
        widths = (width, 2 * width, 4 * width)
        self.stem = conv_bn_relu(in_channels, widths[0])
        layers, channels = [], widths[0]
        for stage, out in enumerate(widths):
            for index in range(blocks):
                layers.append(BasicBlock(channels, out, 2 if stage > 0 and index == 0 else 1))
                channels = out
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


class SmallVGG(nn.Module):
    """A VGG-style plain chain: 3x3 conv-BN-ReLU stages with max pooling, then two Linear layers."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10,
                 widths: tuple[int, ...] = (32, 32, "M", 64, 64, "M", 128, 128, "M"), hidden: int = 128):
        super().__init__()
        layers, channels = [], in_channels
        for width in widths:
            if width == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers.append(conv_bn_relu(channels, width))
                channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class InvertedResidual(nn.Module):
    """MobileNet-V2's block: 1x1 expansion, 3x3 depthwise, 1x1 linear projection, residual add when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.body = nn.Sequential(conv_bn_relu(in_channels, hidden, kernel_size=1),
                                  conv_bn_relu(hidden, hidden, stride, groups=hidden),
                                  conv_bn_relu(hidden, out_channels, kernel_size=1, relu=False))
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.residual else out


class MobileNetV2Small(nn.Module):
    """A MobileNet-V2-style network for small images: inverted residual stages (t, c, n, s) and a 1x1 head."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10,
                 stages: tuple[tuple[int, int, int, int], ...] = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2),
                                                                    (6, 64, 2, 1)), head: int = 256):
        super().__init__()
        layers, channels = [conv_bn_relu(in_channels, 32)], 32
        for expansion, out, repeats, stride in stages:
            for index in range(repeats):
                layers.append(InvertedResidual(channels, out, stride if index == 0 else 1, expansion))
                channels = out
        layers.append(conv_bn_relu(channels, head, kernel_size=1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class ResidualConcatCNN(nn.Module):
    """A small CNN with both kinds of coupling: residual adds and a two-branch concatenation (an Inception-style
    block), so every compressor is exercised on shared and concatenated channels."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.stem = conv_bn_relu(in_channels, width)
        self.block1 = BasicBlock(width, width)
        self.branch_a = conv_bn_relu(width, width, kernel_size=1)
        self.branch_b = nn.Sequential(conv_bn_relu(width, width // 2, kernel_size=1), conv_bn_relu(width // 2, width))
        self.down = BasicBlock(2 * width, 2 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(self.stem(x))
        x = torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)
        return self.fc(torch.flatten(self.pool(self.down(x)), 1))


def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two (3x3 same-padded conv without bias, batch norm, ReLU) blocks."""
    return nn.Sequential(conv_bn_relu(in_channels, out_channels), conv_bn_relu(out_channels, out_channels))


class UNet(nn.Module):
    """The UNet of Ronneberger et al. (same padding, batch norm): ``double_conv`` levels of ``widths`` on the way
    down, 2x2 stride-2 transposed convs on the way up, each concatenated with its skip; ``(N, classes, H, W)`` out.
    H and W must be divisible by ``2 ** (len(widths) - 1)``."""

    def __init__(self, in_channels: int = 3, classes: int = 2, widths: tuple[int, ...] = (64, 128, 256, 512, 1024)):
        super().__init__()
        self.downs = nn.ModuleList([double_conv(in_channels, widths[0])])
        self.downs.extend(double_conv(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.pool = nn.MaxPool2d(2)
        reversed_widths = widths[::-1]
        self.ups = nn.ModuleList(nn.ConvTranspose2d(a, b, 2, stride=2)
                                 for a, b in zip(reversed_widths[:-1], reversed_widths[1:]))
        self.merges = nn.ModuleList(double_conv(2 * b, b) for b in reversed_widths[1:])
        self.head = nn.Conv2d(widths[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for index, down in enumerate(self.downs):
            x = down(x if index == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, merge in zip(self.ups, self.merges):
            x = merge(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": lambda in_channels, num_classes: ResNet20(in_channels, num_classes),
    "vgg-small": lambda in_channels, num_classes: SmallVGG(in_channels, num_classes),
    "mobilenet-v2-small": lambda in_channels, num_classes: MobileNetV2Small(in_channels, num_classes),
    "residual-concat": lambda in_channels, num_classes: ResidualConcatCNN(in_channels, num_classes),
    "unet-small": lambda in_channels, num_classes: UNet(in_channels, num_classes, widths=(16, 32, 64)),
}


def build_model(name: str, in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """A randomly initialised built-in network by name (one of ``MODELS``)."""
    if name not in MODELS:
        raise ValueError(f"unknown built-in model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](in_channels, num_classes)
