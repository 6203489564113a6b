"""An MLP on your own arrays: a .npz file with X (samples first, float) and y (integer labels)."""

from __future__ import annotations

from ddp.data import load_npz
from ddp.errors import ConfigError
from ddp.task import Task, check_setting
from ddp.tasks import mlp


def task(
    data: str | None = None,
    hidden: tuple[int, ...] = (256,),
    out_features: int = 10,
    batchnorm: bool = False,
    dropout: float = 0.0,
    val_fraction: float = 0.1,
) -> Task:
    """The input size comes from X; labels must lie in [0, out_features)."""
    if not data:
        raise ConfigError("--task npz needs --data FILE.npz (arrays X and y)")
    check_setting(str(data).endswith(".npz"), "data", f"{data} is not a .npz file")
    return mlp.on(load_npz(data, out_features), val_fraction, hidden, out_features, batchnorm, dropout, name="npz")
