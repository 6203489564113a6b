"""A small convnet on synthetic 1x16x16 images: enough arithmetic per step to hide communication."""

from __future__ import annotations

from torch import nn

from ddp.data import split, synthetic
from ddp.model import ConvNet
from ddp.task import Task, check_setting

SHAPE = (1, 16, 16)


def task(
    width: int = 32,
    out_features: int = 10,
    batchnorm: bool = False,
    samples: int = 4096,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> Task:
    """Two conv blocks and a linear head; trains channels_last under ``--memory-format auto``."""
    check_setting(width > 0, "width", "must be positive")
    check_setting(out_features > 1, "out_features", "needs at least 2 classes")
    check_setting(samples > 0, "samples", "must be positive")
    check_setting(0.0 <= val_fraction < 1.0, "val_fraction", "must be in [0, 1)")
    train, val = split(synthetic(samples, SHAPE, out_features, seed), val_fraction)
    return Task(
        model=lambda: ConvNet(out_features, width=width, batchnorm=batchnorm),
        train_data=train,
        val_data=val,
        channels_last=True,
        blocks=lambda model: [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))],  # FSDP units
        name="cnn",
    )
