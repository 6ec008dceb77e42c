"""Real image data that installs offline, as train / held-out / test ``DataLoader``s.

- ``digits``: scikit-learn's bundled 1,797 8x8 handwritten digits (fast tests, the default run);
- ``fashion-mnist``: 70,000 28x28 Zalando images from the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist/*.gz``, IDX format).

``load_dataset(name)`` returns :class:`DataSplits`; ``val`` is held out from the *training* data (for search rewards
and early stopping), ``test`` is the official test split (digits: a fixed held-out fifth).
"""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


@dataclass
class DataSplits:
    """Loaders of one dataset: ``train``, ``val`` (held out from the training data), ``test``; images are
    ``input_shape`` (C, H, W) float tensors, labels int64 in ``range(num_classes)``."""

    train: DataLoader
    val: DataLoader
    test: DataLoader
    num_classes: int
    input_shape: tuple[int, int, int]


def read_idx(path: str) -> np.ndarray:
    """An IDX file (optionally gzipped) as a numpy array; raises ``ValueError`` naming the file when it is not IDX."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != int(np.prod(shape)):
        raise ValueError(f"{path}: the header declares shape {shape} but the file holds {len(data) - header} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images.astype(np.float32) / 16.0 - 0.5) / 0.5
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(labels))
    test, train = order[: len(order) // 5], order[len(order) // 5:]
    return images[train, None], labels[train], images[test, None], labels[test]


def _fashion_mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    paths = [os.path.join(FASHION_MNIST_DIR, name) for name in names]
    missing = [path for path in paths if not os.path.exists(path)]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST not found ({missing[0]}): install the Debian package "
                                "dataset-fashion-mnist (apt-get install dataset-fashion-mnist)")
    train_x, train_y, test_x, test_y = (read_idx(path) for path in paths)

    def normalise(images: np.ndarray) -> np.ndarray:
        return ((images.astype(np.float32) / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD)[:, None]

    return normalise(train_x), train_y.astype(np.int64), normalise(test_x), test_y.astype(np.int64)


DATASETS: dict[str, Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]] = {
    "digits": _digits,
    "fashion-mnist": _fashion_mnist,
}


def load_foreground_segmentation(name: str = "fashion-mnist", batch_size: int = 64, noise: float = 0.6,
                                 pad_to: int = 32, seed: int = 0, train_limit: int | None = None,
                                 test_limit: int | None = None, val_fraction: float = 0.1) -> DataSplits:
    """A segmentation task built from a classification dataset: from an image corrupted with Gaussian noise of
    standard deviation ``noise`` (fixed per image by ``seed``), predict the object's foreground mask (pixels above
    a fifth of the image's maximum intensity); targets are ``(H, W)`` int64 masks with classes 0 and 1. Images and
    masks are zero-padded to ``pad_to`` x ``pad_to`` so pooling networks divide them evenly."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    train_x, _, test_x, _ = DATASETS[name]()
    order = np.random.default_rng(seed).permutation(len(train_x))
    cut = int(round(len(order) * val_fraction))
    generator = torch.Generator().manual_seed(seed)

    def split(images: np.ndarray, offset: int) -> TensorDataset:
        clean = torch.from_numpy(np.ascontiguousarray(images))
        low = clean.amin(dim=(1, 2, 3), keepdim=True)
        span = clean.amax(dim=(1, 2, 3), keepdim=True) - low
        masks = ((clean - low) > 0.2 * span).long()[:, 0]
        noisy = clean + noise * torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed + offset))
        pad = [(pad_to - clean.shape[-1]) // 2, (pad_to - clean.shape[-1] + 1) // 2,
               (pad_to - clean.shape[-2]) // 2, (pad_to - clean.shape[-2] + 1) // 2]
        return TensorDataset(torch.nn.functional.pad(noisy, pad, value=float(low.min())),
                             torch.nn.functional.pad(masks, pad))

    train = split(train_x[order[cut:][:train_limit]], 1)
    val = split(train_x[order[:cut]], 2)
    test = split(test_x[:test_limit], 3)
    return DataSplits(train=DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator),
                      val=DataLoader(val, batch_size=max(batch_size, 256)),
                      test=DataLoader(test, batch_size=max(batch_size, 256)),
                      num_classes=2, input_shape=(train_x.shape[1], pad_to, pad_to))


def load_dataset(name: str, batch_size: int = 64, val_fraction: float = 0.1, seed: int = 0,
                 train_limit: int | None = None, test_limit: int | None = None,
                 eval_batch_size: int | None = None, val_limit: int | None = None) -> DataSplits:
    """The named dataset (one of ``DATASETS``) as shuffled train, held-out val and test loaders.

    ``val_fraction`` of the training images (chosen with ``seed``) form ``val``; ``train_limit``, ``val_limit`` and
    ``test_limit`` keep only the first so many of the remaining training, the held-out and the test images (for
    quick runs).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    train_x, train_y, test_x, test_y = DATASETS[name]()
    order = np.random.default_rng(seed).permutation(len(train_y))
    cut = int(round(len(order) * val_fraction))
    val_index, train_index = order[:cut][:val_limit], order[cut:][:train_limit]
    eval_batch_size = eval_batch_size or max(batch_size, 256)
    generator = torch.Generator().manual_seed(seed)

    def loader(x: np.ndarray, y: np.ndarray, shuffle: bool) -> DataLoader:
        dataset = TensorDataset(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y))
        return DataLoader(dataset, batch_size=batch_size if shuffle else eval_batch_size, shuffle=shuffle,
                          generator=generator if shuffle else None)

    return DataSplits(train=loader(train_x[train_index], train_y[train_index], True),
                      val=loader(train_x[val_index], train_y[val_index], False),
                      test=loader(test_x[:test_limit], test_y[:test_limit], False),
                      num_classes=int(train_y.max()) + 1, input_shape=tuple(train_x.shape[1:]))
