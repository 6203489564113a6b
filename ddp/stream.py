"""Streams: an ``IterableDataset`` as a task's training data, split over ranks and workers, resumed exactly.

The split. A stream's samples are numbered in the order it yields them, from 0 at the
start of each epoch. From the position ``c`` an epoch starts at (0, or where a resumed
epoch continues), rank r of N takes the samples p >= c with (p - c) % N == r and groups
them B at a time: its batch k holds its samples of the block [c + kNB, c + (k+1)NB), so
global micro-batch k is that block whatever N is, as the map-style sampler's is.
DataLoader workers take a rank's batches in turn (worker w makes batches w, w+W, ...),
so the batches, and the run, are the same with any ``--workers``.

Every process reads the whole stream and keeps its share: each sample is read N x W
times. A dataset that can read its rank's share alone more cheaply says so with a method
``split_by_rank(rank, world_size)`` that returns the dataset of its samples
p = rank, rank + N, rank + 2N, ...; the workers of a rank then read that share.

Randomness. At each epoch's start every process seeds Python's, numpy's and torch's CPU
generators from (seed, epoch), alike on every rank and worker, so a dataset drawing from
them (a shuffle buffer) yields the same stream everywhere (from (seed, epoch, rank) for
a dataset that splits itself: its ranks read different samples, and draw differently); with ``--workers 0`` the
stream's generators are kept apart from training's (dropout). ``set_epoch(epoch)`` is
called where the dataset has it (Hugging Face's datasets reshuffle so).

Resume at sample c of epoch e:

- a dataset with ``state_dict()`` / ``load_state_dict()`` (torchdata's protocol, which
  Hugging Face's ``IterableDataset`` follows): its state and the generators', as of the
  end of the last block trained on, are saved in each checkpoint; iteration continues
  from there;
- any other: replayed. The epoch is read again from its start and the first c samples
  skipped (the log says how many). Exact for a dataset that yields the same samples each
  time it is read from its start; it costs reading them.

The end. A finite stream ends the epoch when the first rank runs dry: every rank learns
it at the same step (one small all-reduce a step), the incomplete step is dropped and
counted in the log, and the next epoch starts.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from ddp import rng

SPLIT = "split_by_rank"
"""The method a dataset that splits itself over ranks has: ``split_by_rank(rank, world_size) -> dataset``."""


def is_stream(data: Any) -> bool:
    """Whether ``data`` is an ``IterableDataset`` (read in order) rather than a map-style dataset."""
    return isinstance(data, IterableDataset)


def has_state(data: Any) -> bool:
    """Whether a stream can save and restore its position exactly (``state_dict``, ``load_state_dict``): not one
    whose state is known to lose samples (``lost_on_resume``), which is replayed instead."""
    stateful = callable(getattr(data, "state_dict", None)) and callable(getattr(data, "load_state_dict", None))
    return stateful and lost_on_resume(data) is None


def lost_on_resume(data: Any) -> str | None:
    """What a stream's own ``state_dict`` is known to lose on a resume; None where nothing is known.

    Hugging Face's ``IterableDataset.shuffle`` keeps no shuffle buffer in its state (datasets warns as it loads
    one and refills the buffer): the samples in the buffer at a checkpoint would never be trained on. Replay, read
    with the epoch's same seed, is exact.
    """
    if not from_datasets(data):
        return None
    pending = [getattr(data, "_ex_iterable", None)]  # its pipeline: each step wraps the one before
    while pending:
        step = pending.pop()
        if type(step).__name__ == "BufferShuffledExamplesIterable":
            return "the shuffle buffer of datasets' IterableDataset.shuffle"
        if step is not None:
            pending += [getattr(step, "ex_iterable", None), *(getattr(step, "ex_iterables", None) or [])]
    return None


def split_by_node(data: Any) -> tuple[int, int] | None:
    """(rank, world size) of a Hugging Face ``IterableDataset`` already split over the nodes
    (``datasets.distributed.split_dataset_by_node``); None for any other stream."""
    config = getattr(data, "_distributed", None) if from_datasets(data) else None
    return None if config is None else (config.rank, config.world_size)


def from_datasets(data: Any) -> bool:
    """Whether ``data`` is a Hugging Face ``datasets.IterableDataset``. In a DataLoader worker it reads only that
    worker's shards, not the whole stream each of this project's workers reads (``StreamBatches`` reads it in the
    training process)."""
    return type(data).__module__.split(".")[0] == "datasets"


def splits_itself(data: Any) -> bool:
    """Whether a stream reads its rank's share itself (``split_by_rank``)."""
    return callable(getattr(data, SPLIT, None))


@dataclasses.dataclass
class StreamBatch:
    """A batch, and the stream's state after the block it belongs to (None for a stream without state)."""

    batch: Any
    state: dict | None


@dataclasses.dataclass
class StreamEnd:
    """This rank's stream ran dry; ``leftover`` samples were read after its last whole batch."""

    leftover: int


class RankStream(IterableDataset):
    """One rank's batches of a stream, for ``DataLoader(batch_size=None)``: iterated in each worker (or in the
    training process), which makes its own batches."""

    def __init__(
        self, dataset: IterableDataset, rank: int, world_size: int, batch_size: int, collate: Callable, seed: int
    ) -> None:
        self.dataset, self.rank, self.world_size = dataset, rank, world_size
        self.batch_size, self.collate, self.seed = batch_size, collate, seed
        self.epoch, self.start, self.state = 0, 0, None

    def set_position(self, epoch: int, start: int, state: dict | None = None) -> None:
        """The epoch to read, the samples of it already trained on, and the saved state to continue from."""
        self.epoch, self.start, self.state = epoch, start, state

    def __iter__(self) -> Iterator[StreamBatch | StreamEnd]:
        info = get_worker_info()
        if info is None:
            return _kept_apart(self._batches(0, 1))
        return self._batches(info.id, info.num_workers)

    def _batches(self, worker: int, workers: int) -> Iterator[StreamBatch | StreamEnd]:
        ds, n, r, b, c = self.dataset, self.world_size, self.rank, self.batch_size, self.start
        split = splits_itself(ds)
        if split:
            ds = getattr(ds, SPLIT)(r, n)
        if callable(getattr(ds, "set_epoch", None)):
            ds.set_epoch(self.epoch)
        rng.seed_cpu(rng.sample_seed(self.seed, self.epoch, -3 - (r if split else 0)))  # a rank's own share: its own
        read = 0  # samples the dataset has yielded this epoch (of this rank's share, when it splits itself)
        if self.state is not None:
            ds.load_state_dict(self.state["dataset"])
            rng.restore(self.state["rng"])
            read = self.state["read"]
        stateful = has_state(ds)
        samples = iter(ds)
        taken, k, batch = 0, 0, []  # this rank's samples from c, its batch index, this worker's batch
        for sample in samples:
            p = read * n + r if split else read
            read += 1
            if p < c or (not split and (p - c) % n != r):
                continue
            mine = k % workers == worker
            if mine:
                batch.append(sample)
            taken += 1
            if taken % b:
                continue
            if not split:  # read on to the block's end: every rank's state is then the same
                end = c + (k + 1) * n * b
                while read < end and next(samples, _END) is not _END:
                    read += 1
            if mine:
                state = _snapshot(ds, read) if stateful else None
                yield StreamBatch(self.collate(batch), state)
                batch = []
            k += 1
        if k % workers == worker:
            yield StreamEnd(taken - k * b)


_END = object()


def _snapshot(ds: Any, read: int) -> dict:
    return {"read": read, "dataset": copy.deepcopy(ds.state_dict()), "rng": rng.cpu_state()}


def _kept_apart(batches: Iterator) -> Iterator:
    """``batches`` advanced with generators of its own, the training process's put back after each batch."""
    own = None
    while True:
        with rng.preserved():
            if own is not None:
                rng.restore(own)
            item = next(batches, _END)
            own = rng.cpu_state()
        if item is _END:
            return
        yield item


def as_is(item: Any) -> Any:
    """The DataLoader's collate for ``RankStream``: its items are batches already."""
    return item


class StreamPosition:
    """The stream's saved state (a Stateful for the Checkpointer): the state after the last block trained on."""

    def __init__(self) -> None:
        self.state: dict | None = None  # as of the last step taken
        self.resume: dict | None = None  # restored from a checkpoint, for the next epoch's start

    def state_dict(self) -> dict[str, Any]:
        """The stream's state (None for a stream without one)."""
        return {"state": self.state}

    def load_state_dict(self, saved: dict[str, Any] | None) -> None:
        """The state to continue from (None: replay)."""
        self.state = self.resume = None if saved is None else saved.get("state")
