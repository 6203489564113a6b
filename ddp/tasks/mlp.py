"""The textbook's MLP (20 -> 256 -> ReLU -> 10) on a synthetic, learnable classification problem."""

from __future__ import annotations

from ddp.config import Config
from ddp.data import split, synthetic
from ddp.model import MLP
from ddp.task import Task


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
    train, val = split(synthetic(samples, (in_features,), out_features, seed), val_fraction)
    hidden = tuple(hidden)
    return Task(
        model=lambda: MLP(in_features, hidden, out_features, batchnorm, dropout),
        train_data=train,
        val_data=val,
        name="mlp",
    )


def from_config(cfg: Config) -> Task:
    """The task as ``--hidden``, ``--samples`` and the other model and data options set it."""
    m, d = cfg.model, cfg.data
    return task(
        m.in_features, m.hidden, m.out_features, m.batchnorm, m.dropout, d.samples, d.val_fraction, cfg.run.seed
    )
