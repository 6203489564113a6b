"""An MLP on your own arrays: a .npz file with X (samples first, float) and y (integer labels)."""

from __future__ import annotations

import math

from ddp.config import Config
from ddp.data import load_npz, split
from ddp.errors import ConfigError
from ddp.model import MLP
from ddp.task import Task


def task(
    data: str,
    hidden: tuple[int, ...] = (256,),
    out_features: int = 10,
    batchnorm: bool = False,
    dropout: float = 0.0,
    val_fraction: float = 0.1,
) -> Task:
    """The input size comes from X; labels must lie in [0, out_features)."""
    full = load_npz(data, out_features)
    in_features = math.prod(full.tensors[0].shape[1:])
    train, val = split(full, val_fraction)
    hidden = tuple(hidden)
    return Task(
        model=lambda: MLP(in_features, hidden, out_features, batchnorm, dropout),
        train_data=train,
        val_data=val,
        name="npz",
    )


def from_config(cfg: Config) -> Task:
    """The task as ``--data FILE.npz`` and the model options set it."""
    m, d = cfg.model, cfg.data
    if not d.data:
        raise ConfigError("--task npz needs --data FILE.npz (arrays X and y)")
    return task(d.data, m.hidden, m.out_features, m.batchnorm, m.dropout, d.val_fraction)
