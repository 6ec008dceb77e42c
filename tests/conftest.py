"""Fixtures shared by the test files."""
from __future__ import annotations

import pytest

from trainers.datasets import load_dataset


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's bundled digits as train / val / test loaders (batch 64), fresh for each test module."""
    return load_dataset("digits", batch_size=64)
