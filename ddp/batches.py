"""A rank's training batches, step by step: map-style datasets and streams behind one interface.

``build`` gives a ``MapBatches`` (a seeded, resumable sampler over a map-style dataset:
``ddp.data``) or a ``StreamBatches`` (an ``IterableDataset`` split over ranks and workers:
``ddp.stream``). Either one knows the run's length, gives each step's micro-batches,
moves the progress on after a step (to the next epoch at an epoch's end), hands the
Checkpointer its state, and checks a resume on another world size. The Trainer never asks
which of the two it holds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, default_collate

from ddp import group, stream
from ddp.config import Config
from ddp.data import ORDER, ResumableSampler, die_with_rank, make_loader, release_workers, steps_per_epoch
from ddp.errors import ConfigError
from ddp.stream import SPLIT, RankStream, StreamBatch, StreamEnd, StreamPosition, has_state, splits_itself
from ddp.task import Batch, Task

if TYPE_CHECKING:
    from ddp.trainer import Progress

StartEpoch = Callable[[int, int], None]
"""Told at each epoch's first batch: (the epoch, the steps the run takes in it), e.g. for a progress bar."""


def build(task: Task, cfg: Config, world: group.World, start_epoch: StartEpoch, say: Callable[[str], None]):
    """The batches of ``task.train_data`` for this rank: ``StreamBatches`` for a stream, else ``MapBatches``."""
    kind = StreamBatches if stream.is_stream(task.train_data) else MapBatches
    return kind(task, cfg, world, start_epoch, say)


def worker_timeout(cfg: Config) -> float:
    """Seconds a DataLoader worker may take to deliver a batch before the run fails, naming the wait: a worker
    that never answers (stuck, or gone without a trace) would otherwise keep its rank, and the job, waiting for
    good. The longer of the two collective timeouts: a first batch may have a slow dataset to open. 0 (DataLoader's
    "none") without workers, which it requires."""
    return max(cfg.dist.timeout, cfg.dist.startup_timeout) if cfg.data.workers else 0.0


class _Batches:
    """What both kinds share: the settings, the loader, and the pass over it of the current epoch."""

    def __init__(self, task: Task, cfg: Config, world: group.World, start_epoch: StartEpoch, say) -> None:
        self.task, self.cfg, self.world, self.say = task, cfg, world, say
        self.start_epoch = start_epoch
        self.dataset = task.train_data
        self.accum = cfg.optim.grad_accum
        self.global_batch = cfg.data.batch_size * world.world_size * self.accum
        self.steps_per_epoch: int | None = None  # unknown for a stream without a length
        self.batches: Iterator | None = None  # this epoch's pass over the loader
        self.batches_epoch = -1  # the epoch that pass belongs to

    def _length(self, samples: int) -> int:
        """The run's length in steps over ``samples`` an epoch: ``--steps``, or ``--epochs`` of them."""
        self.steps_per_epoch = steps_per_epoch(samples, self.global_batch)
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"--batch-size: the global batch ({self.global_batch} = {self.cfg.data.batch_size} x "
                f"{self.world.world_size} ranks x {self.accum} accumulation) exceeds the {samples} training samples"
            )
        return self.cfg.run.steps or self.cfg.run.epochs * self.steps_per_epoch

    def statefuls(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(state the same on every rank, state of each rank's own) for the Checkpointer."""
        return {}, {}

    def check_resume(self, folder: Path, saved_world_size: int | None) -> None:
        """Refuse a checkpoint whose data position this world size cannot continue from."""

    def close(self) -> None:
        """Let the loader's worker processes exit now: left to interpreter exit, each took 5 s."""
        self.batches = None
        release_workers(self.loader)


class MapBatches(_Batches):
    """A map-style dataset: each rank's share of a seeded permutation, resumable at any sample."""

    def __init__(self, task: Task, cfg: Config, world: group.World, start_epoch: StartEpoch, say) -> None:
        super().__init__(task, cfg, world, start_epoch, say)
        self.sampler = ResumableSampler(self.dataset, world.world_size, world.rank, cfg.run.seed)
        pin = world.device.type == "cuda"
        self.loader = make_loader(task, self.sampler, cfg.data.batch_size, cfg.data.workers, pin, cfg.run.seed,
                                  worker_timeout(cfg))  # fmt: skip
        self.total_steps = self._length(len(self.dataset))

    def next(self, p: Progress) -> list[Batch]:
        """This rank's next ``--grad-accum`` micro-batches; each epoch starts a new pass over the loader."""
        if self.batches is None or self.batches_epoch != p.epoch:
            if steps_per_epoch(len(self.dataset), self.global_batch, p.epoch_samples) == 0:
                # a position saved by a world with a smaller global batch (an elastic job that grew): its epoch has
                # fewer samples left than this world's step takes, which drop_last leaves out, as advance does
                p.epoch, p.epoch_samples, p.order = p.epoch + 1, 0, ORDER
            self.sampler.set_position(p.epoch, p.epoch_samples, p.order)
            left = steps_per_epoch(len(self.dataset), self.global_batch, p.epoch_samples)
            self.start_epoch(p.epoch, min(left, self.total_steps - p.step))
            self.batches, self.batches_epoch = iter(self.loader), p.epoch
        return [next(self.batches) for _ in range(self.accum)]

    def advance(self, p: Progress) -> None:
        """After a step: its samples are consumed; at the epoch's end the next epoch starts, before any save."""
        p.epoch_samples += self.global_batch
        if steps_per_epoch(len(self.dataset), self.global_batch, p.epoch_samples) == 0:
            p.epoch, p.epoch_samples, p.order = p.epoch + 1, 0, ORDER


class StreamBatches(_Batches):
    """An ``IterableDataset``: rank r of N takes every N-th sample, in batches; epochs end where a rank runs dry."""

    def __init__(self, task: Task, cfg: Config, world: group.World, start_epoch: StartEpoch, say) -> None:
        super().__init__(task, cfg, world, start_epoch, say)
        _refuse_split_by_node(self.dataset, task.name)
        collate = task.collate or default_collate
        self.stream = RankStream(self.dataset, world.rank, world.world_size, cfg.data.batch_size, collate, cfg.run.seed)
        # its own generator: each pass over a loader draws a seed, which must not come from training's RNG
        generator = torch.Generator().manual_seed(cfg.run.seed)
        workers = _stream_workers(self.dataset, cfg.data.workers, world, task.name, say)
        self.loader = DataLoader(
            self.stream, batch_size=None, num_workers=workers, collate_fn=stream.as_is, generator=generator,
            timeout=worker_timeout(cfg) if workers else 0.0, worker_init_fn=die_with_rank if workers else None,
        )  # fmt: skip
        self.position = StreamPosition()  # the stream's state as of the last step
        self.total_steps = self._total_steps()

    def _total_steps(self) -> int:
        """``--steps``, or ``--epochs`` of the stream's length (a stream must say its length to take it)."""
        if hasattr(type(self.dataset), "__len__"):
            return self._length(len(self.dataset))
        if self.cfg.run.steps is None:
            raise ConfigError(
                f"--steps: task {self.task.name!r} trains on a stream ({type(self.dataset).__name__}, an "
                "IterableDataset without __len__), which may never end; give the run's length in optimizer "
                "steps with --steps N (a finite stream starts a new epoch each time it runs dry)"
            )
        return self.cfg.run.steps

    def statefuls(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """A stream that splits itself has a state per rank; else every rank's is the same."""
        return ({}, {"stream": self.position}) if splits_itself(self.dataset) else ({"stream": self.position}, {})

    def check_resume(self, folder: Path, saved_world_size: int | None) -> None:
        """A stream that splits itself saved each rank's state: on another world size there is none to use."""
        now = self.world.world_size
        if saved_world_size == now or not (splits_itself(self.dataset) and has_state(self.dataset)):
            return
        if self.cfg.data.stream_replay:
            self.position.resume = None
            return
        raise ConfigError(
            f"{folder} was written by {saved_world_size} rank(s) and this run has {now}: task {self.task.name!r}'s "
            f"stream splits itself over the ranks ({SPLIT}) and saved each rank's position in its own share, which "
            f"{now} ranks do not have. Resume on {saved_world_size} rank(s); or, if the stream yields the same "
            "samples each time it is read from its start, add --stream-replay to resume by reading past the samples "
            "already trained on"
        )

    def next(self, p: Progress) -> list[Batch]:
        """The stream's next micro-batches on every rank, or, where any rank's ran dry, the next epoch's.

        Every rank says at every step whether it has a whole step's batches (one small
        all-reduce): all then train, or all end the epoch there, dropping the incomplete step.
        """
        for fresh in (False, True):
            if self.batches is None or self.batches_epoch != p.epoch:
                self._start_epoch(p)
            micro, end = self._read()
            n = self.world.world_size
            mine = [0.0] * n + [len(micro) * self.cfg.data.batch_size + (end.leftover if end else 0)]
            mine[self.world.rank] = float(end is not None)
            *dry, dropped = group.all_sum(mine)
            if not any(dry):
                self.position.state = micro[-1].state
                return [m.batch for m in micro]
            self._ran_dry(p, [r for r, d in enumerate(dry) if d], int(dropped), fresh)
        raise AssertionError("unreachable: _ran_dry raises on a fresh epoch")

    def _read(self) -> tuple[list[StreamBatch], StreamEnd | None]:
        """Up to a step's batches of this rank, and the end of its stream if it came first."""
        micro: list[StreamBatch] = []
        while len(micro) < self.accum:
            item = next(self.batches, StreamEnd(0))  # a loader that stopped: ran dry too
            if isinstance(item, StreamEnd):
                return micro, item
            micro.append(item)
        return micro, None

    def _ran_dry(self, p: Progress, ranks: list[int], dropped: int, fresh: bool) -> None:
        if fresh:
            raise ConfigError(
                f"task {self.task.name!r}: epoch {p.epoch} of the stream gave rank(s) {ranks} less than one "
                f"step's batches ({self.accum} x {self.cfg.data.batch_size} samples); the stream "
                "is too short for this world size and batch size"
            )
        self.say(
            f"epoch {p.epoch} of the stream ended after step {p.step}: rank(s) {ranks} ran dry; the "
            f"{dropped} sample(s) read for the incomplete step were dropped"
        )
        p.epoch, p.epoch_samples = p.epoch + 1, 0
        self.position.state = self.position.resume = None

    def _start_epoch(self, p: Progress) -> None:
        saved = self.position.resume
        if p.epoch_samples:
            lost = stream.lost_on_resume(self.dataset)
            why = "it has no state_dict to continue from" if lost is None else f"its state_dict would lose {lost}"
            how = (
                "from its saved state_dict"
                if saved is not None
                else f"by replay: reading past the {p.epoch_samples:,} samples already trained on ({why})"
            )
            self.say(f"resuming epoch {p.epoch} of the stream at sample {p.epoch_samples:,} {how}")
        self.stream.set_position(p.epoch, p.epoch_samples, saved)
        self.position.state, self.position.resume = saved, None
        self.start_epoch(p.epoch, self.total_steps - p.step)
        self.batches, self.batches_epoch = iter(self.loader), p.epoch

    def advance(self, p: Progress) -> None:
        """After a step: its samples are consumed (a stream's epoch ends when it runs dry, in ``next``)."""
        p.epoch_samples += self.global_batch


def _stream_workers(dataset: Any, workers: int, world: group.World, name: str, say) -> int:
    """The DataLoader workers a stream is read with: ``--workers``, or none for a Hugging Face stream, which in a
    worker reads only that worker's shards where each of ours must read the whole stream (``ddp.stream``)."""
    read = dataset  # what a worker iterates
    if workers and splits_itself(read):
        read = getattr(read, SPLIT)(world.rank, world.world_size)
    if not (workers and stream.from_datasets(read)):
        return workers
    say(f"note: --workers {workers} not used: the stream of task {name!r} is a Hugging Face IterableDataset, which "
        "in each DataLoader worker reads only that worker's shards; it is read in the training process, as with "
        "--workers 0 (the same batches)")  # fmt: skip
    return 0


def _refuse_split_by_node(dataset: Any, name: str) -> None:
    """A stream the user split over the ranks already would be split again, each rank training on a share of its
    share: refused, saying how to give it."""
    split = stream.split_by_node(dataset)
    if split is not None and split[1] > 1:
        raise ConfigError(
            f"task {name!r}: its stream is already split over {split[1]} nodes (datasets.distributed."
            f"split_dataset_by_node, rank {split[0]}), and the trainer splits a stream over the ranks itself: give "
            "the whole dataset; or, to have each rank read only its share, a class whose split_by_rank(rank, "
            "world_size) returns split_dataset_by_node(dataset, rank, world_size)"
        )
