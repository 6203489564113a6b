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
    in_features: int | None = None,
) -> Task:
    """The input size comes from X (read now), or from ``in_features`` (the data then read only to train);
    labels must lie in [0, out_features)."""

    def arrays():
        if not data:
            raise ConfigError("--task npz needs --data FILE.npz (arrays X and y)")
        check_setting(str(data).endswith(".npz"), "data", f"{data} is not a .npz file")
        return load_npz(data, out_features)

    return mlp.on(arrays, val_fraction, hidden, out_features, batchnorm, dropout, name="npz", in_features=in_features)
