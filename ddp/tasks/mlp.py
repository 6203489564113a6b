"""The textbook's MLP (20 -> 256 -> ReLU -> 10) on a synthetic, learnable classification problem."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

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
    data: TensorDataset | Callable[[], TensorDataset],
    val_fraction: float,
    hidden: tuple[int, ...],
    out_features: int,
    batchnorm: bool,
    dropout: float,
    name: str,
    in_features: int | None = None,
) -> Task:
    """The MLP on (X, y) tensors, the last ``val_fraction`` held out; its input size ``in_features``, or X's.

    ``data`` may be a function returning the tensors: with ``in_features`` given it is read
    only when training needs it, and the task records ``in_features`` among its model_args.
    """
    hidden = widths(hidden)
    check_setting(out_features > 1, "out_features", "needs at least 2 classes")
    check_setting(0.0 <= dropout < 1.0, "dropout", "must be in [0, 1)")
    check_setting(0.0 <= val_fraction < 1.0, "val_fraction", "must be in [0, 1)")
    splits = functools.cache(lambda: split(data() if callable(data) else data, val_fraction))
    if in_features is None:
        in_features = math.prod(splits()[0].tensors[0].shape[1:])
    return Task(
        model=lambda: MLP(in_features, hidden, out_features, batchnorm, dropout),
        train_data=lambda: splits()[0],
        val_data=lambda: splits()[1],
        blocks=lambda model: [m for m in model.modules() if isinstance(m, nn.Linear)],  # FSDP: a unit per layer
        name=name,
        model_args={"in_features": in_features},
    )
