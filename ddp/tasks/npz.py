"""An MLP on your own arrays: a .npz file with X (samples first, float) and y (integer labels)."""

from __future__ import annotations

from ddp.config import Config
from ddp.data import load_npz
from ddp.errors import ConfigError
from ddp.task import Task
from ddp.tasks import mlp


def task(
    data: str,
    hidden: tuple[int, ...] = (256,),
    out_features: int = 10,
    batchnorm: bool = False,
    dropout: float = 0.0,
    val_fraction: float = 0.1,
) -> Task:
    """The input size comes from X; labels must lie in [0, out_features)."""
    return mlp.on(load_npz(data, out_features), val_fraction, hidden, out_features, batchnorm, dropout, name="npz")


def from_config(cfg: Config) -> Task:
    """The task as ``--data FILE.npz`` and the model options set it."""
    m, d = cfg.model, cfg.data
    if not d.data:
        raise ConfigError("--task npz needs --data FILE.npz (arrays X and y)")
    return task(d.data, m.hidden, m.out_features, m.batchnorm, m.dropout, d.val_fraction)
