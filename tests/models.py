"""Small hand-written networks that exercise the op kinds capture must reproduce, and helpers that compare a
captured network with its original model; reusable by any test.

Each network documents which ops it covers. They are deliberately tiny (a forward takes milliseconds) and use
random initialisation only.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from graph.capture import iter_tensors
from graph.leaves import LEAF_BY_NAME


def assert_outputs_close(expected: Any, actual: Any, rtol: float = 1e-5) -> None:
    """Assert two (nested) outputs have the same structure and shapes, and every tensor differs by at most
    ``rtol * max(1, max |expected|)``."""
    assert type(actual) is type(expected)
    expected_tensors, actual_tensors = list(iter_tensors(expected)), list(iter_tensors(actual))
    assert [path for path, _ in actual_tensors] == [path for path, _ in expected_tensors]
    for (path, want), (_, got) in zip(expected_tensors, actual_tensors):
        assert got.shape == want.shape, path
        bound = rtol * max(1.0, want.detach().abs().max().item())
        assert (got.detach() - want.detach()).abs().max().item() <= bound, path


def parameter_pairs(model: nn.Module, net: nn.Module) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """(parameter of ``model``, its copy in the captured ``net``), matched through node names, which are the
    module paths of leaf modules and the attribute paths of parameters read directly (a module called again gets
    a suffixed name but is the same module, so only its first node is used)."""
    pairs, seen = [], set()
    for node in net.layer_nodes:
        module = net.module_of(node) if node.key else None
        if module is None or id(module) in seen:
            continue
        seen.add(id(module))
        if node.op == "param" and isinstance(module.value, nn.Parameter):
            pairs.append((model.get_parameter(node.name), module.value))
        elif node.op in LEAF_BY_NAME:
            original = model.get_submodule(node.name)
            pairs += [(original.get_parameter(name), p) for name, p in module.named_parameters()]
    return pairs


class ConvBlock(nn.Module):
    """Conv2d -> BatchNorm2d -> ReLU, then ``x + shortcut`` (a functional ``__add__`` named ``<scope>.add``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x))) + x


class AmcOpsNet(nn.Module):
    """Every op of the AMC op list: the activation/conv/norm/pool/upsample/linear modules, their functional forms,
    ``torch.add``, ``torch.cat``, ``view``/``reshape``/``permute``/``squeeze`` and ``+`` / ``+=``.

    Input ``(N, 3, H, W)`` with H and W multiples of 8; output ``(N, 10)`` (adaptive pooling makes it work at any
    such resolution).
    """

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.relu6 = nn.ReLU6()
        self.tanh = nn.Tanh()
        self.sigmoid = nn.Sigmoid()
        self.block = ConvBlock(8)
        self.maxpool = nn.MaxPool2d(2)
        self.avgpool = nn.AvgPool2d(2)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.expand = nn.Conv2d(8, 32, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.stem(x)))
        x = self.block(x)
        x = self.relu6(x) + self.tanh(x) * self.sigmoid(x)
        a = F.max_pool2d(self.maxpool(x), 2)
        b = F.avg_pool2d(self.avgpool(x), 2)
        x = torch.add(a, b)
        x = F.relu(x) + F.relu6(x) + F.tanh(x) + F.sigmoid(x)
        x = self.upsample(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = F.upsample(x, scale_factor=0.5, mode="nearest")
        x = F.pixel_shuffle(self.expand(x), 2)
        x = torch.cat([x, x * 0.5], dim=1)
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, 16)
        x = x.permute(0, 2, 1).reshape(x.shape[0], 16, x.shape[1], 1)
        x = self.pool(x)
        x += 1.0
        x = x.squeeze(-1).view(x.size(0), -1)
        return self.fc(x)


class PaddedSkipUNet(nn.Module):
    """A two-level UNet that pads each upsampled map to its skip's size, so odd resolutions work.

    Covers ``nn.ConvTranspose2d``, ``nn.GroupNorm``, ``F.pad`` with amounts computed from shapes, ``torch.cat``.
    Input ``(N, 3, H, W)`` with any H, W >= 4; output ``(N, 2, H, W)``.
    """

    def __init__(self):
        super().__init__()
        self.down1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU())
        self.down2 = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU())
        self.bottom = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.up2 = nn.ConvTranspose2d(16, 16, 2, stride=2)
        self.merge2 = nn.Conv2d(32, 8, 3, padding=1)
        self.up1 = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.merge1 = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    @staticmethod
    def pad_to(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Zero-pad ``x`` on the right/bottom (and evenly around) so its spatial size equals ``skip``'s."""
        dy, dx = skip.shape[2] - x.shape[2], skip.shape[3] - x.shape[3]
        return F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.down1(x)
        s2 = self.down2(s1)
        y = self.bottom(s2)
        y = F.relu(self.merge2(torch.cat([self.pad_to(self.up2(y), s2), s2], dim=1)))
        y = F.relu(self.merge1(torch.cat([self.pad_to(self.up1(y), s1), s1], dim=1)))
        return self.head(y)


class HandAttention(nn.Module):
    """Multi-head self-attention written with ``matmul``/``softmax``, and a functional ``layer_norm`` whose weight
    and bias are this module's own parameters."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.weight = nn.Parameter(torch.rand(dim) + 0.5)
        self.bias = nn.Parameter(torch.randn(dim) * 0.1)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        y = F.layer_norm(x, (dim,), self.weight, self.bias)
        q, k, v = self.qkv(y).reshape(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        scores = torch.matmul(q, k.transpose(-2, -1)) * (dim // self.heads) ** -0.5
        weights = self.dropout(scores.softmax(dim=-1))
        y = (weights @ v).transpose(1, 2).reshape(n, length, dim)
        return x + self.proj(y)


class TinyViT(nn.Module):
    """A two-block ViT: patch-embedding conv, class token and position embedding used directly as parameters
    (``expand`` to the batch, ``cat``, ``+``), hand-written attention, ``nn.LayerNorm``, GELU MLP, dropout.

    Input ``(N, 3, 16, 16)`` (the position embedding fixes the resolution); output ``(N, 10)``.
    """

    def __init__(self, dim: int = 16, heads: int = 2, image: int = 16, patch: int = 4, dropout: float = 0.1):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.class_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(HandAttention(dim, heads, dropout) for _ in range(2)))
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        x = self.blocks(x)
        x = x + self.mlp(self.norm(x))
        return self.head(x[:, 0])


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: global mean, two 1x1 convs, and the input gated by ``x * sigmoid(...)``."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean(dim=(2, 3), keepdim=True)
        scale = torch.sigmoid(self.expand(F.relu(self.reduce(scale))))
        return x * scale


class SENet(nn.Module):
    """A conv stem, one :class:`SqueezeExcite` block, a sum-pool head. Input ``(N, 3, H, W)``; output ``(N, 5)``."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.se = SqueezeExcite(16, 4)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.se(F.relu(self.stem(x)))
        return self.fc(x.sum(dim=(2, 3)) / (x.shape[2] * x.shape[3]))


class SplitMergeNet(nn.Module):
    """Tensor plumbing: ``chunk``, ``split``, ``unbind``, slicing, ``+=``, ``add_``, ``x[...] = v``, ``mean``,
    ``sum``, ``flatten``, ``expand``, ``einsum``, ``bmm``, ``roll``, ``masked_fill`` and tensors created from shapes
    (``new_zeros``, ``arange``, ``torch.zeros(x.shape[0], ...)``).

    Input ``(N, 8, H, W)`` with H >= 2; output ``(N, 4, 8)``.
    """

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)
        self.mix = nn.Parameter(torch.randn(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        a, b = x.chunk(2, dim=1)
        c, d = torch.split(x, [3, 5], dim=1)
        y = torch.cat([a[:, :, 1:], b[:, :, :-1]], dim=1)
        y += c.sum(dim=1, keepdim=True)[:, :, 1:]
        y.add_(d.mean(dim=1, keepdim=True)[..., :-1, :])
        y[:, 0] = y[:, 0] * 2
        rows = y.flatten(2)
        rows = torch.roll(rows, shifts=1, dims=-1)
        mask = torch.arange(rows.shape[-1], device=rows.device) % 3 == 0
        rows = rows.masked_fill(mask, 0.0)
        counts = rows.new_zeros(rows.shape[0], rows.shape[1], 1) + rows.shape[-1]
        pooled = rows.sum(dim=-1, keepdim=True) / counts
        mixed = torch.einsum("nci,cd->ndi", pooled, self.mix)
        gram = torch.bmm(mixed, mixed.transpose(1, 2))
        channels = torch.stack(torch.unbind(gram, dim=1), dim=-1)
        bias = torch.zeros(x.shape[0], 4, 4) + self.mix[:4].expand(x.shape[0], 4, 4)
        return torch.cat([channels + bias, mixed.expand(-1, -1, 4)], dim=-1)


class TokenTransformer(nn.Module):
    """A token model: ``nn.Embedding`` plus position embedding of ``arange(L)``, ``nn.MultiheadAttention``,
    ``nn.LayerNorm``, mean-pooled classifier. Input integer ids ``(N, L)`` with L <= 32; output ``(N, 3)``."""

    def __init__(self, vocab: int = 50, dim: int = 16, heads: int = 4, max_length: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(max_length, dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.embed(ids) + self.position(positions)
        attended, _ = self.attention(x, x, x, need_weights=False)
        x = self.norm(x + attended)
        return self.head(x.mean(dim=1))
