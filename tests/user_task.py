"""A user's own task, as someone outside this project would write it (the trainer has never seen it).

Dict batches, a custom collate, a custom loss, a forward that takes keyword arguments, a
buffer, and a dataset that draws random numbers from torch, numpy and Python in
``__getitem__`` (an augmentation). Loaded by the tests as ``--task tests/user_task.py:make``.
"""

import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

import ddp


class NoisyPoints(Dataset):
    """Points in 6-D labelled by a fixed rule; each read adds fresh noise and a random scale."""

    def __init__(self, n: int, seed: int, noise: float) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 6, generator=g)
        self.y = ((self.x[:, 0] + self.x[:, 1] * self.x[:, 2]) > 0).long()
        self.noise = noise

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        scale = np.random.uniform(0.9, 1.1)  # numpy's global RNG
        weight = 1.0 if random.random() < 0.8 else 0.5  # Python's
        features = self.x[i] * scale + self.noise * torch.randn(6)  # torch's
        return {"features": features, "label": self.y[i], "weight": torch.tensor(weight)}


def collate(samples: list[dict]) -> dict:
    """Stack each field, and keep the sample order for the loss to check."""
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    batch["size"] = len(samples)  # not a tensor: the trainer must pass it through untouched
    return batch


class Scorer(nn.Module):
    """Standardises its input with a fixed buffer, then a small MLP; called as model(features=...)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 6))
        self.net = nn.Sequential(nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, 2))

    def forward(self, *, features: torch.Tensor) -> torch.Tensor:
        return self.net(features * self.scale)


def loss(model: nn.Module, batch: dict) -> torch.Tensor:
    assert batch["size"] == len(batch["label"])
    per_sample = F.cross_entropy(model(features=batch["features"]), batch["label"], reduction="none")
    return (per_sample * batch["weight"]).mean()  # a mean over samples: the same over shards or at once


def metrics(model: nn.Module, batch: dict) -> dict:
    logits = model(features=batch["features"])
    return {
        "loss": F.cross_entropy(logits, batch["label"], reduction="sum").item(),
        "accuracy": (logits.argmax(1) == batch["label"]).sum().item(),
        "count": len(batch["label"]),
    }


def make(samples: int = 512, hidden: int = 16, noise: float = 0.1) -> ddp.Task:
    probe = {"features": torch.randn(8, 6, generator=torch.Generator().manual_seed(3))}
    return ddp.Task(
        model=lambda: Scorer(hidden),
        train_data=NoisyPoints(samples, seed=0, noise=noise),
        val_data=NoisyPoints(128, seed=1, noise=noise),
        collate=collate,
        loss=loss,
        metrics=metrics,
        probe=probe,
        name="user",
    )


class Computed(Dataset):
    """10^10 points, each computed from its index when read: a held-out split with no storage behind it."""

    steps = np.arange(1, 7) * 2654435761 % 2001

    def __len__(self) -> int:
        return 10**10

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        x = ((self.steps * (i % 2001) % 2001) / 1000 - 1).astype(np.float32)
        return x, int(x[0] + x[1] * x[2] > 0)


def huge_val() -> ddp.Task:
    """Points in 6-D, held out on 10^10 of them."""
    x = torch.randn(512, 6, generator=torch.Generator().manual_seed(0))
    train = torch.utils.data.TensorDataset(x, (x[:, 0] + x[:, 1] * x[:, 2] > 0).long())
    model = lambda: nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))  # noqa: E731
    return ddp.Task(model=model, train_data=train, val_data=Computed(), name="huge-val")


not_a_task = 42


def returns_a_model():
    return Scorer(4)


class Unsized:
    """Iterable, but neither a Dataset nor an IterableDataset."""

    def __iter__(self):
        yield from range(3)


def unsized():
    return ddp.Task(model=lambda: Scorer(4), train_data=Unsized())


class Endless(torch.utils.data.IterableDataset):
    def __iter__(self):
        while True:
            yield torch.zeros(4), torch.tensor(0)


def endless():
    """A stream without a length: it needs --steps."""
    return ddp.Task(model=lambda: nn.Linear(4, 2), train_data=Endless(), probe=torch.zeros(2, 4))


def no_probe():
    """Dict batches and no probe: the trainer cannot guess what to verify with."""
    return ddp.Task(model=lambda: Scorer(4), train_data=NoisyPoints(64, 0, 0.1), collate=collate, loss=loss)
