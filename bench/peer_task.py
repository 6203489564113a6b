"""The peers benchmark's task, written as a user writes one: plain PyTorch models and an in-memory TensorDataset.

    torchrun --standalone --nproc-per-node 2 -m ddp.train --task bench/peer_task.py:mlp --steps 100

Every contestant of ``bench/peers.py`` trains these models on this data; this project reads them through
``--task FILE.py:NAME``, as it reads a user's (no built-in fast path: a CNN here runs in the layout
``--memory-format auto`` chooses for a user's model).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

import ddp

ROWS = 65_536
CLASSES = 10
SHAPES = {"mlp": (20,), "wide": (20,), "cnn": (1, 16, 16)}
TOKENS = {"vocab": 256, "block": 64, "layers": 2, "heads": 4, "embd": 64, "batch": 32, "lr": 1e-3}
"""The tokens case: charlm's GPT on a file of random byte tokens (``--task tokens``), AdamW."""


def build(case: str) -> nn.Module:
    """The case's model: the textbook MLP, a wide MLP, or a small CNN of two 3x3 convolutions."""
    if case == "mlp":
        return nn.Sequential(nn.Linear(20, 256), nn.ReLU(), nn.Linear(256, CLASSES))
    if case == "wide":
        return nn.Sequential(
            nn.Linear(20, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, CLASSES)
        )  # fmt: skip
    if case == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64 * 16, CLASSES),
        )  # fmt: skip
    raise ValueError(f"unknown case {case!r}; use {', '.join(SHAPES)}")


def data(case: str) -> TensorDataset:
    """``ROWS`` random samples of the case's shape with random labels, the same on every rank and every run."""
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(ROWS, *SHAPES[case], generator=g), torch.randint(0, CLASSES, (ROWS,), generator=g))


def _task(case: str) -> ddp.Task:
    return ddp.Task(model=lambda: build(case), train_data=lambda: data(case), name=f"peer-{case}")


def mlp() -> ddp.Task:
    return _task("mlp")


def wide() -> ddp.Task:
    return _task("wide")


def cnn() -> ddp.Task:
    return _task("cnn")


def gpt() -> nn.Module:
    """The tokens case's model: the GPT ``--task tokens`` builds, with no dropout."""
    from ddp.tasks.charlm import CharLM

    t = TOKENS
    return CharLM(torch.arange(t["vocab"]), t["block"], t["layers"], t["heads"], t["embd"], 0.0)


def write_tokens(path, count: int = 2_000_000) -> None:
    """A nanoGPT-format token file: ``count`` random byte tokens, little-endian uint16."""
    np.random.default_rng(0).integers(0, TOKENS["vocab"], count).astype("<u2").tofile(path)
