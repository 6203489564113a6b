"""A user's stream: a finite IterableDataset of records, with or without a state, splitting itself or not.

Every variant yields the same samples; those the trainer splits over the ranks (all but ``split``) give
each rank the same ones, so their runs must be bitwise equal. ``split`` deals them out by stride, so
each step's global batch is the same and its runs equal each other only. Each sample is
augmented with noise from torch's global generator, which the trainer seeds per epoch and
(for a stream with a state) saves with it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import IterableDataset

import ddp

FEATURES, CLASSES = 8, 3


def record(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Record i of the corpus: fixed features and a label from a fixed teacher."""
    x = torch.randn(FEATURES, generator=torch.Generator().manual_seed(i))
    return x, (x[:CLASSES] * torch.arange(1.0, CLASSES + 1)).argmax()


class Records(IterableDataset):
    """Records 0..n-1 in order, each with fresh noise; every ``stride``-th from ``offset`` once split."""

    def __init__(self, n: int, offset: int = 0, stride: int = 1) -> None:
        self.n, self.offset, self.stride = n, offset, stride

    def __iter__(self):
        for i in range(self.offset, self.n, self.stride):
            x, y = record(i)
            yield x + 0.1 * torch.randn(FEATURES), y


class Resumable(Records):
    """Records with the torchdata protocol: ``state_dict`` says how many it has yielded this pass."""

    def __init__(self, n: int, offset: int = 0, stride: int = 1) -> None:
        super().__init__(n, offset, stride)
        self.done, self.resume_at = 0, 0

    def __iter__(self):
        self.done, self.resume_at = self.resume_at, 0  # a loaded state is used by the next pass only
        for i in range(self.offset + self.done * self.stride, self.n, self.stride):
            x, y = record(i)
            self.done += 1
            yield x + 0.1 * torch.randn(FEATURES), y

    def state_dict(self) -> dict:
        return {"done": self.done}

    def load_state_dict(self, state: dict) -> None:
        self.resume_at = state["done"]


class SplitsItself(Resumable):
    """Reads only its rank's records (``split_by_rank``), as a sharded corpus reader does."""

    def split_by_rank(self, rank: int, world_size: int) -> SplitsItself:
        return SplitsItself(self.n, rank, world_size)


class Sized(Records):
    def __len__(self) -> int:
        return self.n


KINDS = {"replay": Records, "state": Resumable, "split": SplitsItself, "sized": Sized}


def model() -> nn.Module:
    """A small MLP with dropout (training's own RNG)."""
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, CLASSES))


def make(n: int = 1000, kind: str = "replay") -> ddp.Task:
    """The stream of ``n`` records, read as ``kind`` says."""
    return ddp.Task(
        model=model,
        train_data=KINDS[kind](n),
        val_data=torch.utils.data.TensorDataset(*map(torch.stack, zip(*map(record, range(n, n + 64)), strict=True))),
        name="stream",
    )


class ByNode(IterableDataset):
    """A Hugging Face stream behind ``split_by_rank``, which returns its rank's ``split_dataset_by_node``."""

    def __init__(self, data: IterableDataset) -> None:
        self.data = data

    def __iter__(self):
        return iter(self.data)

    def split_by_rank(self, rank: int, world_size: int) -> IterableDataset:
        import datasets.distributed

        return datasets.distributed.split_dataset_by_node(self.data, rank=rank, world_size=world_size)


def hf(n: int = 1000, shuffle: bool = True, split_by_node: bool = False, by_rank: bool = False) -> ddp.Task:
    """The records as a Hugging Face ``datasets`` stream of dicts, as its users build one: 4 shards, shuffled through
    a buffer of 64 samples; with ``split_by_node``, rank 0's half of 2 nodes; with ``by_rank``, behind ``ByNode``."""
    import datasets
    import datasets.distributed

    x, y = map(torch.stack, zip(*map(record, range(n)), strict=True))
    data = datasets.Dataset.from_dict({"x": x.numpy(), "y": y.numpy()}).to_iterable_dataset(num_shards=4)
    if shuffle:
        data = data.shuffle(seed=0, buffer_size=64)
    if split_by_node:
        data = datasets.distributed.split_dataset_by_node(data, rank=0, world_size=2)
    data = data.with_format("torch")
    return ddp.Task(
        model=model,
        train_data=ByNode(data) if by_rank else data,
        loss=lambda net, batch: nn.functional.cross_entropy(net(batch["x"]), batch["y"]),
        probe=torch.randn(4, FEATURES, generator=torch.Generator().manual_seed(0)),
        name="hf-stream",
    )
