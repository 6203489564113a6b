"""Data: a deterministic synthetic dataset (or the user's .npz), sharded across ranks.

Sharding policy (drop_last): each epoch is a seeded permutation of the training set;
rank r takes every N-th sample of it, and incomplete global batches at the end of the
epoch are skipped. Global batch j is then the samples ``perm[j*N*b : (j+1)*N*b]``
whatever N is, so N ranks with batch b see exactly what one process with batch N*b
sees, each sample at most once per epoch; the skipped tail (< N*b samples) differs
from epoch to epoch because the permutation does.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, TensorDataset

from ddp.config import DataConfig
from ddp.errors import ConfigError


def synthetic(samples: int, shape: tuple[int, ...], classes: int, seed: int) -> TensorDataset:
    """A learnable classification problem: labels from a fixed random linear teacher."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, *shape, generator=g)
    teacher = torch.randn(math.prod(shape), classes, generator=g)
    noise = 0.5 * torch.randn(samples, classes, generator=g)
    y = (x.flatten(1) @ teacher + noise).argmax(dim=1)
    return TensorDataset(x, y)


def load_npz(path: str | Path, shape: tuple[int, ...], classes: int) -> TensorDataset:
    """The user's data: arrays X (float, samples first) and y (int labels) in a .npz file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"--data: {path} does not exist")
    with np.load(path, allow_pickle=False) as f:
        missing = {"X", "y"} - set(f.files)
        if missing:
            raise ConfigError(f"--data: {path} lacks array(s) {sorted(missing)}; it has {f.files}")
        x, y = f["X"], f["y"]
    if len(x) != len(y):
        raise ConfigError(f"--data: {path}: X has {len(x)} samples but y has {len(y)}")
    if tuple(x.shape[1:]) != shape:
        raise ConfigError(f"--data: {path}: samples have shape {tuple(x.shape[1:])}, the model expects {shape}")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= classes:
        raise ConfigError(f"--data: {path}: y must hold integer labels in [0, {classes})")
    return TensorDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64))


def datasets(cfg: DataConfig, shape: tuple[int, ...], classes: int, seed: int) -> tuple[TensorDataset, TensorDataset]:
    """(train, validation): the last ``val_fraction`` of the samples is held out."""
    if cfg.data:
        full = load_npz(cfg.data, shape, classes)
    else:
        full = synthetic(cfg.samples, shape, classes, seed)
    n_val = int(len(full) * cfg.val_fraction)
    x, y = full.tensors
    cut = len(full) - n_val
    return TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:])


class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffle, drop_last) that can start part-way into an epoch.

    ``set_position(epoch, start)`` skips the first ``start`` samples of the epoch's
    global order: a count of samples, not of batches, so a job resumed on another
    world size continues the same stream. With start 0 it yields exactly what
    DistributedSampler(drop_last=True) yields.
    """

    def __init__(
        self,
        dataset: TensorDataset,
        num_replicas: int,
        rank: int,
        seed: int,
        shuffle: bool = True,
    ):
        super().__init__(
            dataset,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=True,
        )
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        """Epoch to draw (as ``set_epoch``) and samples of it already consumed."""
        self.set_epoch(epoch)
        self.start = start

    def _remaining(self) -> int:
        return (len(self.dataset) - self.start) // self.num_replicas

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        order = order[self.start : self.start + self._remaining() * self.num_replicas]
        return iter(order[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        return self._remaining()


def steps_per_epoch(train_samples: int, global_batch: int, start: int = 0) -> int:
    """Optimizer steps in an epoch (from sample ``start``) under the drop_last policy."""
    return (train_samples - start) // global_batch


def make_loader(
    dataset: TensorDataset,
    sampler: ResumableSampler,
    batch_size: int,
    workers: int,
    pin_memory: bool,
    seed: int,
) -> DataLoader:
    """Batches of ``batch_size`` fetched with one indexing call each (no per-sample collate)."""
    batches = BatchSampler(sampler, batch_size, drop_last=True)
    return DataLoader(
        dataset,
        sampler=batches,
        batch_size=None,  # the sampler yields whole batches of indices
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        worker_init_fn=_seed_worker if workers else None,
        generator=torch.Generator().manual_seed(seed),
    )


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32  # derived by torch from the loader's generator
    np.random.seed(seed)
    import random

    random.seed(seed)
