"""Capture, prune and fine-tune a small CNN on scikit-learn's bundled digits (no download, CPU, about a minute).

Trains the CNN, captures it, removes half of every prunable channel group (L2 importance, multiples of 4), shows that
the pruned network is exactly the masked one, fine-tunes it for a few epochs and saves it as ``.vnmodel`` and ONNX.

    python examples/prune_digits.py --out /tmp/digits
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn as nn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import amc


class DigitsNet(nn.Module):
    """Conv-BN-ReLU twice with a residual add, global pooling, a linear classifier."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width))
        self.head = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width),
                                  nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(torch.relu(x + self.body(x)))


def digits() -> tuple[torch.Tensor, ...]:
    """Train/test tensors of the 1,797 8x8 digits, scaled to [0, 1]."""
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16
    labels = torch.tensor(data.target)
    train_x, test_x, train_y, test_y = train_test_split(images, labels, test_size=0.25, random_state=0)
    return train_x, train_y, test_x, test_y


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, label: str) -> None:
    """Plain SGD with momentum over shuffled mini-batches."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    model.train()
    for _ in tqdm(range(epochs), desc=label):
        for batch in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy."""
    return (model(x).argmax(1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="digits_out", help="directory for the saved networks")
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of channels to remove")
    args = parser.parse_args()
    torch.manual_seed(0)
    train_x, train_y, test_x, test_y = digits()

    model = DigitsNet()
    fit(model, train_x, train_y, epochs=15, label="train")
    rnet = amc.capture(model, test_x[:1])
    plan = amc.plan_by_ratio(rnet, args.ratio, importance="l2", round_to=4)
    pruned, masked = rnet.prune_channels(plan), rnet.mask_channels(plan)
    gap = (pruned(test_x) - masked(test_x)).abs().max().item()
    print(f"original  accuracy {accuracy(model, test_x, test_y):.3f}, "
          f"params {sum(p.numel() for p in rnet.parameters()):,d}")
    print(f"pruned    accuracy {accuracy(pruned, test_x, test_y):.3f}, "
          f"params {sum(p.numel() for p in pruned.parameters()):,d}; pruned vs masked max |diff| {gap:.1e}")
    fit(pruned, train_x, train_y, epochs=15, label="fine-tune")
    print(f"fine-tuned accuracy {accuracy(pruned, test_x, test_y):.3f}")

    os.makedirs(args.out, exist_ok=True)
    saved = pruned.save_to_vnmodel(pkl=os.path.join(args.out, "digits_pruned.vnmodel"), model_base_size_hw=(8, 8))
    onnx_path = pruned.export_onnx(os.path.join(args.out, "digits_pruned.onnx"), test_x[:1])
    reloaded = amc.load(saved)
    print(f"saved {saved} (reloaded accuracy {accuracy(reloaded, test_x, test_y):.3f}) and {onnx_path}")


if __name__ == "__main__":
    main()
