"""A standard 4-level UNet (Ronneberger et al., with same-padding and batch norm) for the benchmarks.

Widths 64-128-256-512 on the way down, 1024 at the bottom; every level is two (3x3 conv, batch norm, ReLU) blocks;
the way up doubles the resolution with a 2x2 stride-2 transposed convolution and concatenates the skip.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two (3x3 same-padded conv without bias, batch norm, ReLU) blocks."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """UNet for ``(N, in_channels, H, W)`` images with H and W divisible by 16; returns ``(N, classes, H, W)``."""

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
