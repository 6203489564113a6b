"""Data: sharding any map-style dataset across ranks, resumably; synthetic data and .npz files.

Sharding policy (drop_last): each epoch is a seeded permutation of the training set;
rank r takes every N-th sample of it, and incomplete global batches at the end of the
epoch are skipped. Global batch j is then the samples ``perm[j*N*b : (j+1)*N*b]``
whatever N is, so N ranks with batch b see exactly what one process with batch N*b
sees, each sample at most once per epoch; the skipped tail (< N*b samples) differs
from epoch to epoch because the permutation does.
"""

from __future__ import annotations

import ctypes
import math
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    Sampler,
    TensorDataset,
    default_collate,
)

from ddp import rng
from ddp.errors import ConfigError
from ddp.task import Task


def synthetic(samples: int, shape: tuple[int, ...], classes: int, seed: int) -> TensorDataset:
    """A learnable classification problem: labels from a fixed random linear teacher."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, *shape, generator=g)
    teacher = torch.randn(math.prod(shape), classes, generator=g)
    noise = 0.5 * torch.randn(samples, classes, generator=g)
    y = (x.flatten(1) @ teacher + noise).argmax(dim=1)
    return TensorDataset(x, y)


def load_npz(path: str | Path, classes: int) -> TensorDataset:
    """The user's data: arrays X (float, samples first) and y (int labels in [0, classes)) in a .npz file."""
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
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= classes:
        raise ConfigError(f"--data: {path}: y must hold integer labels in [0, {classes}) (--out-features)")
    return TensorDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64))


def split(full: TensorDataset, val_fraction: float) -> tuple[TensorDataset, TensorDataset]:
    """(train, validation): the last ``val_fraction`` of the samples is held out."""
    cut = len(full) - int(len(full) * val_fraction)
    return TensorDataset(*(t[:cut] for t in full.tensors)), TensorDataset(*(t[cut:] for t in full.tensors))


EVAL_EPOCH = -1  # the "epoch" of validation samples: their draws are the same every evaluation


class SeededSamples(Dataset):
    """The user's dataset, read by ``(epoch, index)``: each sample draws from RNGs seeded for it.

    A dataset that draws random numbers in ``__getitem__`` (augmentation, masking, crops)
    from Python's, numpy's or torch's global CPU generators then gives sample i of epoch e
    the same draws whether the job was restarted, on how many ranks it runs, and in which
    worker process (or none) it is loaded. The caller's own generator states (dropout in
    the training process) are put back untouched, once per batch: saving numpy's state
    costs 70 us, seeding the three generators 7 us.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list:
        """A batch of samples (the DataLoader's fetcher calls this once per batch)."""
        with rng.preserved():
            samples = []
            for epoch, index in keys:
                rng.seed_cpu(rng.sample_seed(self.seed, epoch, index))
                samples.append(self.dataset[index])
            return samples


class EpochTagged(Sampler):
    """Yields ``(epoch, index)`` for each index of a ResumableSampler, for SeededSamples."""

    def __init__(self, sampler: ResumableSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.sampler.epoch
        return ((epoch, i) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class Permutation:
    """A seeded pseudo-random permutation of ``range(n)``, computed index by index: no list of every index.

    A 4-round Feistel network (Luby-Rackoff: a pseudo-random permutation) on the smallest
    even number of bits that covers ``n``, with cycle-walking: a position that lands at or
    past ``n`` is permuted again until it lands inside (under 4 rounds of walking on
    average, the domain being under 4n). Memory and time per index do not depend on ``n``
    (up to 2^64), and position ``p`` is found without computing the ones before it, so a
    resume at sample k of an epoch of 10^10 costs what one at sample 0 does.
    """

    ROUNDS = 4

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half = np.uint64((bits + 1) // 2)
        self.mask = np.uint64((1 << int(self.half)) - 1)
        self.keys = [np.uint64(rng.sample_seed(seed, -2, r)) for r in range(self.ROUNDS)]

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """The samples at these positions of the permuted order."""
        out = np.asarray(positions, dtype=np.uint64).copy()
        todo = np.ones(len(out), dtype=bool)
        while todo.any():
            out[todo] = self._feistel(out[todo])
            todo = out >= np.uint64(self.n)
        return out

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right ^ key) & self.mask)
        return (left << self.half) | right


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, element-wise on uint64 (wrapping): a well-spread hash of each value."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


ORDERS = {1: "torch.randperm of the whole epoch (before version 2: a list of every index)", 2: "Permutation"}
ORDER = 2
"""The order new epochs are drawn in. A checkpoint saved mid-epoch by an earlier version resumes its
epoch in that version's order, so no sample of it is repeated or skipped; the next epochs use this one."""


class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffle, drop_last) that can start part-way into an epoch, at any dataset size.

    Each epoch is a seeded ``Permutation`` of the dataset's positions; rank r takes
    positions start + r, start + r + N, ... ``set_position(epoch, start)`` skips the first
    ``start`` samples of the epoch's global order: a count of samples, not of batches, so a
    job resumed on another world size continues the same stream. Indices are computed a
    chunk at a time, as the loader asks for them: memory and time per step are the same
    for 10^3 samples and for 10^10.
    """

    CHUNK = 4096

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.start = 0
        self.order = ORDER

    def set_position(self, epoch: int, start: int, order: int = ORDER) -> None:
        """Epoch to draw (as ``set_epoch``), samples of it already consumed, and the order it is drawn in."""
        self.set_epoch(epoch)
        self.start, self.order = start, order

    def _remaining(self) -> int:
        return (len(self.dataset) - self.start) // self.num_replicas

    def __iter__(self) -> Iterator[int]:
        for chunk in self._chunks():
            yield from chunk.tolist()

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """The same indices, ``batch_size`` at a time as int64 arrays, the last partial batch dropped. An array
        indexes a TensorDataset's tensors at 3x the speed of a list (10 against 28 us for a batch of 64 and two
        tensors), with no Python int made per index, and goes to a loader's workers as plain bytes, where a
        tensor would take a shared-memory segment each."""
        rest = np.empty(0, dtype=np.int64)
        for chunk in self._chunks():
            rest = np.concatenate([rest, chunk.astype(np.int64)])
            whole = len(rest) - len(rest) % batch_size
            yield from (rest[lo : lo + batch_size] for lo in range(0, whole, batch_size))
            rest = rest[whole:]

    def _chunks(self) -> Iterator[np.ndarray]:
        """This rank's indices from the position ``set_position`` gave, in chunks of up to ``CHUNK``."""
        n, count = len(self.dataset), self._remaining()
        first = self.start + self.rank
        if self.shuffle and self.order == 1:  # an earlier version's epoch, resumed
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).numpy()
            yield order[first : first + count * self.num_replicas : self.num_replicas]
            return
        permute = Permutation(n, self.seed + 1_000_003 * self.epoch) if self.shuffle else None
        for lo in range(0, count, self.CHUNK):
            positions = first + self.num_replicas * np.arange(lo, min(count, lo + self.CHUNK), dtype=np.uint64)
            yield permute(positions) if permute is not None else positions

    def __len__(self) -> int:
        return self._remaining()


class IndexBatches(Sampler):
    """A ResumableSampler's indices in batches, as int64 arrays (``ResumableSampler.batches``): what a
    DataLoader hands a TensorDataset whole; ``BatchSampler(sampler, batch_size, drop_last=True)`` as lists."""

    def __init__(self, sampler: ResumableSampler, batch_size: int) -> None:
        self.sampler, self.batch_size = sampler, batch_size

    def __iter__(self) -> Iterator[np.ndarray]:
        return self.sampler.batches(self.batch_size)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size


class TensorBatches:
    """A TensorDataset's batches in the training process, without a DataLoader around them: with no workers to
    feed and nothing to pin, its iterator, conversion and profiler range were 20 us a batch (against 19 for the
    indexing itself), 1 % of the textbook MLP's step. ``sampler`` as a DataLoader names it."""

    def __init__(self, dataset: TensorDataset, sampler: IndexBatches) -> None:
        self.dataset, self.sampler = dataset, sampler

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        return map(self.dataset.__getitem__, self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def steps_per_epoch(train_samples: int, global_batch: int, start: int = 0) -> int:
    """Optimizer steps in an epoch (from sample ``start``) under the drop_last policy."""
    return (train_samples - start) // global_batch


def make_loader(
    task: Task,
    sampler: ResumableSampler,
    batch_size: int,
    workers: int,
    pin_memory: bool,
    seed: int,
    timeout: float = 0.0,
) -> DataLoader | TensorBatches:
    """This rank's training batches, in the order ``sampler`` gives; a batch that ``workers`` do not deliver within
    ``timeout`` seconds (0: no limit, which no workers require) is an error, not a wait forever.

    A TensorDataset without a custom collate is indexed with a whole batch at once (no per-sample calls, no
    collate; with no workers and nothing to pin, no DataLoader); any other dataset is read through SeededSamples,
    sample by sample, unless the task says it draws no random numbers, and collated.
    """
    batched = isinstance(task.train_data, TensorDataset) and task.collate is None
    options = {
        "num_workers": workers,
        "pin_memory": pin_memory,
        "persistent_workers": workers > 0,
        "timeout": timeout,
        "worker_init_fn": start_worker if workers else None,
        "generator": torch.Generator().manual_seed(seed),
    }
    if batched:  # the sampler yields whole batches of indices: arrays, or lists for a subclass, whose own
        # __getitem__ may take each index as a Python int (a dict's key)
        exact = type(task.train_data) is TensorDataset
        batches = IndexBatches(sampler, batch_size) if exact else BatchSampler(sampler, batch_size, drop_last=True)
        if exact and not workers and not pin_memory:
            return TensorBatches(task.train_data, batches)
        return DataLoader(task.train_data, sampler=batches, batch_size=None, **options)
    if not task.draws_random:  # the DataLoader reads each batch in one __getitems__ call where there is one
        data, indices = task.train_data, sampler
    else:
        data, indices = SeededSamples(task.train_data, seed), EpochTagged(sampler)
    batches = BatchSampler(indices, batch_size, drop_last=True)
    return DataLoader(data, batch_sampler=batches, collate_fn=task.collate or default_collate, **options)


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_rank(worker_id: int = 0) -> None:
    """A DataLoader worker's first act: be SIGKILLed when its rank dies (Linux; elsewhere torch's watchdog).

    A worker holds the sockets it inherited from its rank. Alive after a SIGKILL of that rank, it kept the
    other ranks from seeing the connection reset until torch's watchdog ended it, up to 5 s later: every
    restart of a run with --workers waited that long.
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def start_worker(worker_id: int) -> None:
    """A DataLoader worker's ``worker_init_fn``: dies with its rank; Python and numpy seeded (``rng.seed_worker``)."""
    die_with_rank()
    rng.seed_worker(worker_id)


def release_workers(loader: DataLoader) -> None:
    """Let a loader's worker processes exit now, persistent ones too, rather than at interpreter exit, where
    each waited out a 5 s status check (a run with --workers 2 took 10 s to end)."""
    if getattr(loader, "_iterator", None) is not None:  # the DataLoader's own hold on persistent workers
        loader._iterator = None


def eval_indices(samples: int, limit: int, seed: int) -> range | list[int]:
    """The held-out samples an evaluation reads: all, or ``limit`` of them, the same ones every time."""
    if not limit or limit >= samples:
        return range(samples)
    return sorted(Permutation(samples, seed)(np.arange(limit, dtype=np.uint64)).tolist())


def eval_batches(task: Task, rank: int, world_size: int, batch_size: int, seed: int, limit: int = 0) -> Iterator:
    """This rank's share of the validation set (every N-th of its evaluated samples), in batches, without workers."""
    data = task.val_data
    if data is None:
        return
    mine = eval_indices(len(data), limit, seed)[rank::world_size]  # a range where every sample is evaluated
    seeded = task.draws_random and not (isinstance(data, TensorDataset) and task.collate is None)
    if seeded:
        data = SeededSamples(data, seed)
    for i in range(0, len(mine), batch_size):
        batch = mine[i : i + batch_size]  # keyed per batch: a list of keys for a held-out set of 10^9 would not fit
        yield task.batch_of(data, [(EVAL_EPOCH, j) for j in batch] if seeded else batch)


def eval_batch_count(samples: int, rank: int, world_size: int, batch_size: int, limit: int = 0) -> int:
    """How many batches ``eval_batches`` gives ``rank``."""
    evaluated = min(samples, limit) if limit else samples
    return math.ceil(len(range(rank, evaluated, world_size)) / batch_size)
