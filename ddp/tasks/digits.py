"""Real data, nothing downloaded: scikit-learn's bundled 8x8 handwritten digits (1,797 images).

Needs the optional extra: ``pip install -e '.[digits]'`` (``make install`` installs it).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ddp.data import split
from ddp.errors import ConfigError
from ddp.task import Task


class DigitsNet(nn.Module):
    """Two 3x3 convolutions, a max-pool and two linear layers for 1x8x8 images."""

    def __init__(self, width: int = 32, dropout: float = 0.25) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 16, 128), nn.ReLU(), nn.Dropout(dropout), nn.Linear(128, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def load(seed: int = 0) -> TensorDataset:
    """All 1,797 digits as 1x8x8 images, pixels scaled to [0, 1], in a fixed shuffled order."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ConfigError("task digits needs scikit-learn: pip install -e '.[digits]' (make install does)") from None
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # N x 1 x 8 x 8
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))  # the file is grouped by writer
    return TensorDataset(x[order], y[order])


def task(width: int = 32, dropout: float = 0.25, val_fraction: float = 0.2, seed: int = 0) -> Task:
    """A small convnet; the last ``val_fraction`` of the shuffled images held out (read when training needs them)."""

    @functools.cache
    def splits() -> tuple[TensorDataset, TensorDataset]:
        train, val = split(load(seed), val_fraction)
        # standardise each pixel with the training split's statistics (constant border pixels stay 0)
        mean, std = train.tensors[0].mean(0), train.tensors[0].std(0).clamp_min(1e-3)
        return tuple(TensorDataset((d.tensors[0] - mean) / std, d.tensors[1]) for d in (train, val))

    return Task(
        model=lambda: DigitsNet(width, dropout),
        train_data=lambda: splits()[0],
        val_data=lambda: splits()[1],
        channels_last=True,
        name="digits",
    )
