"""The textbook's MLP (20 -> 256 -> ReLU -> 10) on a synthetic, learnable classification problem."""

from __future__ import annotations

import math

from torch import nn
from torch.utils.data import TensorDataset

from ddp.data import split, synthetic
from ddp.model import MLP
from ddp.task import Task, check_setting, widths


def task(
    in_features: int = 20,
    hidden: tuple[int, ...] = (256,),
    out_features: int = 10,
    batchnorm: bool = False,
    dropout: float = 0.0,
    samples: int = 4096,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> Task:
    """Labels from a fixed random linear teacher; the last ``val_fraction`` held out."""
    check_setting(in_features > 0, "in_features", "must be positive")
    check_setting(samples > 0, "samples", "must be positive")
    data = synthetic(samples, (in_features,), out_features, seed)
    return on(data, val_fraction, hidden, out_features, batchnorm, dropout, name="mlp")


def on(
    data: TensorDataset,
    val_fraction: float,
    hidden: tuple[int, ...],
    out_features: int,
    batchnorm: bool,
    dropout: float,
    name: str,
) -> Task:
    """The MLP on (X, y) tensors, its input size taken from X; the last ``val_fraction`` held out."""
    in_features = math.prod(data.tensors[0].shape[1:])
    hidden = widths(hidden)
    check_setting(out_features > 1, "out_features", "needs at least 2 classes")
    check_setting(0.0 <= dropout < 1.0, "dropout", "must be in [0, 1)")
    check_setting(0.0 <= val_fraction < 1.0, "val_fraction", "must be in [0, 1)")
    train, val = split(data, val_fraction)
    return Task(
        model=lambda: MLP(in_features, hidden, out_features, batchnorm, dropout),
        train_data=train,
        val_data=val,
        blocks=lambda model: [m for m in model.modules() if isinstance(m, nn.Linear)],  # FSDP: a unit per layer
        name=name,
    )
