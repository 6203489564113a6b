"""A small convnet on synthetic 1x16x16 images: enough arithmetic per step to hide communication."""

from __future__ import annotations

from torch import nn

from ddp.config import Config
from ddp.data import split, synthetic
from ddp.model import ConvNet
from ddp.task import Task

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
    train, val = split(synthetic(samples, SHAPE, out_features, seed), val_fraction)
    return Task(
        model=lambda: ConvNet(out_features, width=width, batchnorm=batchnorm),
        train_data=train,
        val_data=val,
        channels_last=True,
        blocks=lambda model: [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))],  # FSDP units
        name="cnn",
    )


def from_config(cfg: Config) -> Task:
    """The task as ``--width``, ``--samples`` and the other model and data options set it."""
    m, d = cfg.model, cfg.data
    return task(m.width, m.out_features, m.batchnorm, d.samples, d.val_fraction, cfg.run.seed)
