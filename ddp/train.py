"""Train a model with DistributedDataParallel (or sharded, FSDP), then save, reload and verify it.

Launch commands:

    make train-ddp                                   # every GPU, or 2 CPU processes (gloo)
    torchrun --standalone --nproc-per-node=2 -m ddp.train --epochs 3 --out runs/demo
    python -m ddp.train --steps 50                   # no torchrun: a world of one
    torchrun --standalone --nproc-per-node=2 -m ddp.train --task mytask.py:make --task-arg hidden=64
    torchrun --standalone --nproc-per-node=2 -m ddp.train --task charlm --task-arg text=README.md
    torchrun --standalone --nproc-per-node=2 -m ddp.train --strategy fsdp   # sharded: see README, FSDP
    # two nodes; run on each, HOST being node 0's address:
    torchrun --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d \\
        --rdzv-endpoint=HOST:29500 --rdzv-id=job42 --max-restarts=3 -m ddp.train

``--task`` picks what to train (ddp/tasks/: a built-in, or your own Task).
Each rank trains on its own shard; rank 0 writes ``<out>/mlp.params`` (``<task>.params``: the unwrapped
state_dict, atomically) and full-state checkpoints under ``<out>/checkpoints``; every
rank reloads the weights into a fresh model and all must give identical outputs.
A relaunch with the same ``--out`` resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset, default_collate
from torch.utils.flop_counter import FlopCounterMode

from ddp import faults, fsdp, group, model_card, optim, rng, run_folder, stream, trackers
from ddp.checkpoint import PROGRESS, Checkpointer
from ddp.config import SECTIONS, Config, parse
from ddp.data import (
    ORDER,
    ResumableSampler,
    eval_batch_count,
    eval_batches,
    make_loader,
    release_workers,
    steps_per_epoch,
)
from ddp.device import autocast_dtype, peak_tflops, weights_dtype
from ddp.errors import ConfigError, DDPError, DistributedError, Reported, first_line, say
from ddp.group import FLIGHT_RECORDER
from ddp.io import load_model, save_model, unwrap
from ddp.metrics import MetricsWriter, ProgressDisplay, step_figures, step_timing
from ddp.model import checkpoint_activations, materialize
from ddp.stopping import StopSignals
from ddp.stream import SPLIT, RankStream, StreamBatch, StreamEnd, StreamPosition, has_state, is_stream, splits_itself
from ddp.task import Batch, Task, to_device
from ddp.tasks import resolve
from ddp.verify import DEFAULT_ATOL, VerifyReport, outputs, summary, verify_identical_outputs


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint. The sampler's position is (epoch, epoch_samples)."""

    step: int = 0
    """Optimizer steps taken."""
    epoch: int = 0
    """Current epoch."""
    epoch_samples: int = 0
    """Samples of the current epoch already consumed, counted over all ranks."""
    skipped: int = 0
    """Steps skipped for a non-finite gradient norm (``--skip-nonfinite``)."""
    elapsed: float = 0.0
    """Seconds of training up to the checkpoint, over every attempt: ``time`` in metrics.jsonl goes on from it."""
    order: int = ORDER
    """The order the current epoch's samples are drawn in (``ddp.data.ORDERS``)."""

    def state_dict(self) -> dict[str, int]:
        """The counters, by name."""
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the counters from ``state`` (which may hold other entries too; one it lacks stays at its default)."""
        for f in dataclasses.fields(self):
            default = 1 if f.name == "order" else f.default  # a checkpoint of before version 2: its order
            setattr(self, f.name, type(f.default)(state.get(f.name, default)))


def local_model(task: Task, cfg: Config, device: torch.device, dtype: torch.dtype = torch.float32) -> nn.Module:
    """This rank's model before DDP: built from a seeded RNG (the same weights on every rank),
    lazy layers materialised, SyncBatchNorm if asked, in the memory format ``--memory-format``
    resolves to."""
    with rng.seeded(cfg.run.seed):
        model = task.model()
        if not isinstance(model, nn.Module):
            raise ConfigError(f"task {task.name!r}: model() returned a {type(model).__name__}, not an nn.Module")
        materialize(model, lambda: probe_input(task, cfg))  # lazy layers draw their weights here: seeded too
    if cfg.run.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(device, dtype=dtype, memory_format=memory_format(cfg, task))


def probe_input(task: Task, cfg: Config):
    """The verify input: the task's probe, derived under a fixed seed so that every rank draws the same."""
    with rng.seeded(cfg.run.seed + 1234):
        return task.probe_input()


def memory_format(cfg: Config, task: Task) -> torch.memory_format:
    """channels_last under ``auto`` for tasks that ask for it (the cnn).

    A conv whose weight is channels_last runs channels_last (oneDNN on CPU, cuDNN on
    GPU), inputs included, and carries the layout on to the next layer: the cnn's DDP
    step is 1.1-1.25x faster on CPU (bench/bench.py, variant "c contiguous"). It changes
    float rounding, not the weights' values, so it is an exactness setting.
    """
    fmt = cfg.run.memory_format
    if fmt == "auto":
        fmt = "channels_last" if task.channels_last else "contiguous"
    return torch.channels_last if fmt == "channels_last" else torch.contiguous_format


class Trainer:
    """One rank's training: builds the model, data and optimizer, takes steps, evaluates, decides when to save.

    What a checkpoint holds, and how, is the Checkpointer's (``self.checkpointer``): the
    Trainer hands it the model, the optimizer, the grad scaler and the progress. The learning
    rate is a function of the step (``ddp.optim.lr_at``), so no scheduler state is saved.
    """

    def __init__(self, cfg: Config, world: group.World, task: Task | None = None, trackers: list | None = None) -> None:
        self.cfg, self.world, self.device = cfg, world, world.device
        self.extra_trackers = list(trackers or [])  # the caller's own (ddp.trackers), beside --tensorboard, --wandb
        self.task = (task if task is not None else resolve(cfg)).load_data()
        self.out = cfg.run.out_dir
        self.out.mkdir(parents=True, exist_ok=True)
        self.dtype = weights_dtype(cfg.optim.precision)
        # Under FSDP the whole model is built in host memory, with the seeded weights DDP would have; each
        # block's shards then move to the device as it is sharded, so no device ever holds the whole model.
        built_on = torch.device("cpu") if self.sharded else self.device
        self.model = local_model(self.task, cfg, built_on, self.dtype)
        self.init_note = self._init_weights(wrapped=False)  # before wrapping: under FSDP each rank keeps its shards
        if cfg.run.ac == "full":
            checkpoint_activations(self.model, self.task.blocks)
        rng.seed_all(rng.rank_seed(cfg.run.seed, world.rank))  # dropout etc. differ per rank, reproducibly
        self.train_set = self.task.train_data
        self.streaming = is_stream(self.train_set)
        self.global_batch = cfg.data.batch_size * world.world_size * cfg.optim.grad_accum
        self.loader = self._loader()
        self.total_steps = self._total_steps()
        self.wrapped = self._wrap(self.model)
        self.init_note = self.init_note or self._init_weights(wrapped=True)
        self.optimizer = optim.build(self.model, cfg.optim)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.optim.precision == "fp16")
        self.progress = Progress()
        self.stream_position = StreamPosition()  # a stream's state as of the last step (streams only)
        statefuls = {"scaler": self.scaler, PROGRESS: self.progress}
        own: dict[str, Any] = {}
        if self.streaming:  # a stream that splits itself has a state per rank; else every rank's is the same
            (own if splits_itself(self.train_set) else statefuls)["stream"] = self.stream_position
        self.checkpointer = Checkpointer(
            self.out / "checkpoints",
            cfg.checkpoint,
            self.model,
            self.optimizer,
            statefuls,
            own_stateful=own,
            sharded=self.sharded,
            device=self.device,
            config=cfg,
            say=self._say,
        )
        self.metrics = MetricsWriter(self.out, world.is_main)
        self.display = ProgressDisplay(cfg.run.log_every, world.prefix(), world.is_main or cfg.run.log_all_ranks)
        self.stop = StopSignals(world)  # SIGTERM, SIGINT: the ranks agree at a step, save and exit
        self.last_loss = float("nan")  # mean over ranks and the steps since the last log, as of the last agreement
        self.loss_sum: torch.Tensor | None = None  # this rank's losses since the last logged step, on its device
        self.loss_steps = 0
        self.step_epoch = 0  # the epoch the last step belonged to (the progress may have moved on)
        self.grad_norm = torch.zeros(())  # the last step's gradient norm, before clipping
        self.rank_timing: list[list[float]] = []  # every rank's step_timing, as of the last agreement
        self.step_flops: float | None = None  # FLOPs of one optimizer step on this rank, counted at the first
        self.peak = peak_tflops(self.device, cfg.optim.precision, cfg.run.peak_tflops)
        self.last_grad_norm = float("nan")  # as of the last agreement
        self.skipped = False  # whether the last step was skipped (--skip-nonfinite)
        self.last_save_time = time.monotonic()
        self.tick = (time.monotonic(), self.progress.step)  # (time, step) the samples/s figure counts from
        self.batches: Iterator[Batch] | None = None  # this epoch's pass over the loader
        self.timing = {"step": 0.0, "data": 0.0, "steps": 0}  # this rank's seconds since the last logged step
        self.step_end = time.perf_counter()  # when the last step's bookkeeping ended: the next step starts there
        self.batches_epoch = -1  # the epoch that pass belongs to

    # ---- construction ----

    @property
    def sharded(self) -> bool:
        """Whether the model is sharded (``--strategy fsdp``) rather than replicated (DDP)."""
        return self.cfg.dist.strategy == "fsdp"

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.sharded:  # in place: the model's parameters become this rank's shards (DTensors)
            fsdp.shard(model, self.world.world_size, self.device, self.task.blocks, self.cfg.optim.precision)
            if self.cfg.run.compile:
                model.compile()  # compiled in place: the module stays the FSDP module it is
            return model
        if self.cfg.run.compile:
            model = torch.compile(model)
        ids = [self.device] if self.device.type == "cuda" else None  # device_ids must be None on CPU
        d = self.cfg.dist
        return DDP(
            model,
            device_ids=ids,
            gradient_as_bucket_view=d.gradient_as_bucket_view,
            bucket_cap_mb=d.bucket_cap_mb,
            static_graph=d.static_graph,
        )

    def _loader(self) -> DataLoader:
        """This rank's training batches: a stream's share (``ddp.stream``), or the sampler's of a map-style set."""
        cfg, world = self.cfg, self.world
        if self.streaming:
            self.sampler = None
            collate = self.task.collate or default_collate
            self.stream = RankStream(
                self.train_set, world.rank, world.world_size, cfg.data.batch_size, collate, cfg.run.seed
            )
            # its own generator: each pass over a loader draws a seed, which must not come from training's RNG
            generator = torch.Generator().manual_seed(cfg.run.seed)
            return DataLoader(
                self.stream, batch_size=None, num_workers=cfg.data.workers, collate_fn=stream.as_is, generator=generator
            )
        self.sampler = ResumableSampler(self.train_set, world.world_size, world.rank, cfg.run.seed)
        pin = self.device.type == "cuda"
        return make_loader(self.task, self.sampler, cfg.data.batch_size, cfg.data.workers, pin, cfg.run.seed)

    def _total_steps(self) -> int:
        """``--steps``, or ``--epochs`` of the training set's length (a stream must say its length to take it)."""
        cfg = self.cfg
        self.steps_per_epoch: int | None = None  # unknown for a stream without a length
        if self.streaming and not hasattr(type(self.train_set), "__len__"):
            if cfg.run.steps is None:
                raise ConfigError(
                    f"--steps: task {self.task.name!r} trains on a stream ({type(self.train_set).__name__}, an "
                    "IterableDataset without __len__), which may never end; give the run's length in optimizer "
                    "steps with --steps N (a finite stream starts a new epoch each time it runs dry)"
                )
            return cfg.run.steps
        per_epoch = steps_per_epoch(len(self.train_set), self.global_batch)
        if per_epoch == 0:
            raise ConfigError(
                f"--batch-size: the global batch ({self.global_batch} = {cfg.data.batch_size} x "
                f"{self.world.world_size} ranks x {cfg.optim.grad_accum} accumulation) exceeds the "
                f"{len(self.train_set)} training samples"
            )
        self.steps_per_epoch = per_epoch
        return cfg.run.steps or cfg.run.epochs * per_epoch

    def _init_weights(self, wrapped: bool) -> str | None:
        """``--init-from``: the weights of a file, loaded into the whole model before it is wrapped; or, under
        FSDP from a DCP folder, into the sharded model after, each rank reading only its shards."""
        path = self.cfg.checkpoint.init_from
        if path is None:
            return None
        from ddp import weights  # it reads DCP folders too: torch.distributed.checkpoint, 0.6 s to import

        if self.sharded and weights.sharded_source(path) is not None:
            return weights.init_sharded(self.model, path, self.cfg.checkpoint.init_skip) if wrapped else None
        return None if wrapped else weights.init_model(self.model, path, self.cfg.checkpoint.init_skip)

    def _say(self, text: str) -> None:
        group.log(self.world, text)

    # ---- checkpoints ----

    def save_checkpoint(self) -> None:
        """Called by every rank: save the full state of the current step."""
        self.progress.elapsed = self.metrics.elapsed()
        self.checkpointer.save(self.progress.step)
        self.last_save_time = time.monotonic()

    def resume(self) -> None:
        """Called by every rank: claim the run folder, and restore the checkpoint ``--resume`` selects, if any."""
        self.checkpointer.run_id = self._claim_folder()
        folder = self.checkpointer.resume(self.cfg.checkpoint.resume)
        self.metrics.resume(self.checkpointer.run_id, self.progress.step, self.progress.elapsed)
        self._open_trackers()
        if folder is not None and self.streaming:
            self._check_stream_resume(folder)
        if folder is None:
            if self.init_note is not None:
                self._say(self.init_note)
            return
        if self.init_note is not None:
            self._say(f"--init-from {self.cfg.checkpoint.init_from} not used: this run's checkpoint takes precedence")
        if self.progress.step >= self.total_steps:
            self._say(f"resumed from {folder}: step {self.progress.step} already completes the run")
        else:
            self._say(f"resumed from {folder}: continuing at step {self.progress.step + 1}")

    def _open_trackers(self) -> None:
        """Rank 0 sends the logged figures to --tensorboard, --wandb and the caller's trackers too."""
        if not self.world.is_main:
            return
        run, step = self.cfg.run, self.progress.step
        if run.tensorboard:
            self.metrics.add(trackers.TensorBoard(self.out, step))
        if run.wandb:
            self.metrics.add(trackers.WandB(self.out, run.name, self.checkpointer.run_id, self.cfg.to_dict()))
        for tracker in self.extra_trackers:
            self.metrics.add(tracker)

    def _check_stream_resume(self, folder: Path) -> None:
        """A stream that splits itself saved each rank's state: on another world size there is none to use."""
        saved, now = self.checkpointer.saved_world_size, self.world.world_size
        if saved == now or not (splits_itself(self.train_set) and has_state(self.train_set)):
            return
        if self.cfg.data.stream_replay:
            self.stream_position.resume = None
            return
        raise ConfigError(
            f"{folder} was written by {saved} rank(s) and this run has {now}: task {self.task.name!r}'s stream splits "
            f"itself over the ranks ({SPLIT}) and saved each rank's position in its own share, which {now} ranks do "
            f"not have. Resume on {saved} rank(s); or, if the stream yields the same samples each time it is read "
            "from its start, add --stream-replay to resume by reading past the samples already trained on"
        )

    def _claim_folder(self) -> str:
        """Rank 0 records this run in ``--out`` (moving another aside under ``--overwrite``); its id, on every rank."""
        run_id, error = None, None
        if self.world.is_main:
            try:
                run_id = run_folder.claim(self.cfg, self.cfg.run.overwrite, self._say)
            except (OSError, DDPError) as e:
                error = e
        group.raise_if_any_failed(error, f"claiming {self.out}")
        return group.all_gather_objects(run_id)[0]

    # ---- training ----

    def train(self) -> None:
        """Run until ``total_steps`` (or a SIGTERM), checkpointing on the way and at the end."""
        self.resume()
        self.tick = (time.monotonic(), self.progress.step)
        self.step_end = time.perf_counter()
        try:
            self._steps()
            group.set_timeout(max(self.cfg.dist.startup_timeout, self.cfg.dist.timeout))  # the export may be slow
            self.stop.finish()
            self.sync_buffers()
            if self.checkpointer.last_saved != self.progress.step:
                self.save_checkpoint()
            self.checkpointer.wait()
        finally:
            self.display.close()
            self.metrics.close()
            self.batches = None  # the loader's workers leave now: left to interpreter exit, each took 5 s
            release_workers(self.loader)

    def _steps(self) -> None:
        """The training loop: steps, evaluations; a rank that stops answering is named by every other."""
        evaluated, first = -1, self.progress.step + 1
        try:
            while self.progress.step < self.total_steps and not self.stop.requested:
                epoch = self.progress.epoch
                micro = self.next_batches()
                if self.progress.epoch != epoch and evaluated != self.progress.step:  # a stream's epoch ended
                    self.evaluate()
                    evaluated = self.progress.step
                epoch = self.progress.epoch
                self.step(micro)
                if self.progress.step == first:  # every rank started up: from now on a long wait is a stalled rank
                    group.barrier()
                    group.set_timeout(self.cfg.dist.timeout)
                every = self.cfg.run.eval_every
                if self.progress.epoch != epoch or (every and self.progress.step % every == 0):
                    self.evaluate()
                    evaluated = self.progress.step
            if evaluated != self.progress.step and not self.stop.requested:
                self.evaluate()  # always once at the end: a run that never ends an epoch still reports
        except RuntimeError as e:
            if not group.is_timeout(e):  # a rank that died closes its connections: torchrun names it
                raise
            raise self._stalled(e) from e

    def _stalled(self, e: RuntimeError) -> Exception:
        """The error of a failed collective, naming the ranks that did not arrive (``group.roll_call``)."""
        step, n, timeout = self.progress.step, self.world.world_size, self.cfg.dist.timeout
        answered = group.roll_call(self.world, step, wait=min(10.0, max(2.0, timeout / 2)))
        if answered is not None and len(answered) == n:
            return e  # every rank is here: not a stalled one
        last = self.checkpointer.last_saved
        then = f"a relaunch (or --max-restarts) resumes from step {last}" if last else "no checkpoint was saved yet"
        if answered is None:
            return DistributedError(
                f"after step {step} a collective failed ({first_line(e)}) and the store did not answer a roll "
                f"call either: the rank hosting it (rank 0, or torchrun's agent) is probably gone; {then}"
            )
        missing = [r for r in range(n) if r not in answered]
        dump = group.dump_flight_recorder(self.world)
        record = f"; this rank's flight recorder: {dump} (docs/troubleshooting.md: torchfrtrace)" if dump else ""
        return DistributedError(
            f"after step {step}: rank(s) {missing} did not arrive at a collective within --timeout {timeout:g} s: "
            f"stalled (stopped, deadlocked, or on a host gone with its connections open); rank(s) "
            f"{sorted(answered)} answered and stop here; {then}{record}"
        )

    def next_batches(self) -> list[Batch]:
        """This rank's next ``--grad-accum`` micro-batches; each epoch starts a new pass over the loader."""
        if self.streaming:
            return self._next_stream_batches()
        if self.batches is None or self.batches_epoch != self.progress.epoch:
            p = self.progress
            self.sampler.set_position(p.epoch, p.epoch_samples, p.order)
            left = steps_per_epoch(len(self.train_set), self.global_batch, p.epoch_samples)
            self.display.start_epoch(p.epoch, min(left, self.total_steps - p.step))
            self.batches, self.batches_epoch = iter(self.loader), p.epoch
        start = time.perf_counter()
        micro = [next(self.batches) for _ in range(self.cfg.optim.grad_accum)]
        self.timing["data"] += time.perf_counter() - start
        return micro

    def _next_stream_batches(self) -> list[Batch]:
        """A stream's next micro-batches on every rank, or, where any rank's ran dry, the next epoch's.

        Every rank says at every step whether it has a whole step's batches (one small
        all-reduce): all then train, or all end the epoch there, dropping the incomplete step.
        """
        start, p = time.perf_counter(), self.progress
        for fresh in itertools.count():
            if self.batches is None or self.batches_epoch != p.epoch:
                self._start_stream_epoch()
            micro: list[StreamBatch] = []
            end: StreamEnd | None = None
            while end is None and len(micro) < self.cfg.optim.grad_accum:
                item = next(self.batches, StreamEnd(0))  # a loader that stopped: ran dry too
                if isinstance(item, StreamEnd):
                    end = item
                else:
                    micro.append(item)
            n = self.world.world_size
            mine = [0.0] * n + [len(micro) * self.cfg.data.batch_size + (end.leftover if end else 0)]
            mine[self.world.rank] = float(end is not None)
            *dry, dropped = group.all_sum(mine)
            if not any(dry):
                self.stream_position.state = micro[-1].state
                self.timing["data"] += time.perf_counter() - start
                return [m.batch for m in micro]
            ranks = [r for r, d in enumerate(dry) if d]
            if fresh:
                raise ConfigError(
                    f"task {self.task.name!r}: epoch {p.epoch} of the stream gave rank(s) {ranks} less than one "
                    f"step's batches ({self.cfg.optim.grad_accum} x {self.cfg.data.batch_size} samples); the stream "
                    "is too short for this world size and batch size"
                )
            self._say(
                f"epoch {p.epoch} of the stream ended after step {p.step}: rank(s) {ranks} ran dry; the "
                f"{int(dropped)} sample(s) read for the incomplete step were dropped"
            )
            p.epoch, p.epoch_samples = p.epoch + 1, 0
            self.stream_position.state = self.stream_position.resume = None
        raise AssertionError("unreachable")

    def _start_stream_epoch(self) -> None:
        p, saved = self.progress, self.stream_position.resume
        if p.epoch_samples:
            how = (
                "from its saved state_dict"
                if saved is not None
                else f"by replay: reading past the {p.epoch_samples:,} samples already trained on "
                "(it has no state_dict to continue from)"
            )
            self._say(f"resuming epoch {p.epoch} of the stream at sample {p.epoch_samples:,} {how}")
        self.stream.set_position(p.epoch, p.epoch_samples, saved)
        self.stream_position.state, self.stream_position.resume = saved, None
        self.display.start_epoch(p.epoch, self.total_steps - p.step)
        self.batches, self.batches_epoch = iter(self.loader), p.epoch

    def step(self, micro: list[Batch]) -> torch.Tensor:
        """One optimizer step over ``micro``, as ``train`` takes it, and what follows it.

        Gradients sync on the last micro-batch only. Then the progress advances (to the
        next epoch at its end, before any save, so that a resume starts that epoch), and
        ``_after_step`` logs, lets the ranks agree on stopping, and checkpoints when due.
        Returns this rank's loss.
        """
        loss = self._optimize(micro)
        if not self.skipped:  # summed where it is: no host sync a step
            self.loss_sum = loss.detach().double() + (0 if self.loss_sum is None else self.loss_sum)
            self.loss_steps += 1
        p = self.progress
        self.step_epoch = p.epoch
        p.step += 1
        p.epoch_samples += self.global_batch
        if not self.streaming and steps_per_epoch(len(self.train_set), self.global_batch, p.epoch_samples) == 0:
            p.epoch, p.epoch_samples, p.order = p.epoch + 1, 0, ORDER
        self.timing["step"] += time.perf_counter() - self.step_end  # its data and compute, not the logging
        self.timing["steps"] += 1
        faults.at_step(self.world.rank, p.step)
        self.stop.agree()
        self._after_step()
        self.step_end = time.perf_counter()
        return loss

    def sync_buffers(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics), as DDP does before each forward.

        After the last step each rank holds statistics of its own last batch; the saved
        model, and so every reloaded copy, carries rank 0's.
        """
        for buffer in unwrap(self.wrapped).buffers():
            group.broadcast(buffer, src=0)

    def _optimize(self, micro: list[Batch]) -> torch.Tensor:
        """Forward, backward and the optimizer's update over ``grad_accum`` micro-batches."""
        o = self.cfg.optim
        optim.set_lr(self.optimizer, optim.lr_at(self.progress.step, self.total_steps, o))
        self.optimizer.zero_grad(set_to_none=True)
        k = len(micro)
        dtype = autocast_dtype(self.cfg.optim.precision)
        total = None
        for i, batch in enumerate(micro):
            batch = to_device(batch, self.device, self.dtype)
            sync = self._gradient_sync(i == k - 1)
            cast = torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
            counting = self.step_flops is None and i == 0
            counter = FlopCounterMode(display=False) if counting else contextlib.nullcontext()
            with sync, counter:
                with cast:
                    loss = self.task.compute_loss(self.wrapped, batch)
                    loss = faults.poison_loss(self.world.rank, self.progress.step + 1, loss)
                    if k > 1:
                        loss = loss / k
                self.scaler.scale(loss).backward()
            if counting:  # once: a step is the same work every time (the first micro-batch's, k times)
                self.step_flops = float(counter.get_total_flops() * k)
            total = loss.detach() if total is None else total + loss.detach()
        self.scaler.unscale_(self.optimizer)  # fp16: the true gradients, to measure and clip (else a no-op)
        self.grad_norm = optim.clip_gradients(self.model, o.max_grad_norm)
        self.skipped = not self.scaler.is_enabled() and not self._finite_or_skipped(total)  # fp16: the scaler's
        if not self.skipped:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        return total

    def _finite_or_skipped(self, loss: torch.Tensor) -> bool:
        """Whether this step's gradient norm is finite (one host sync a step: no update ever uses NaN).

        The norm is the same on every rank (reduced gradients), so all ranks decide alike, with
        no collective; a non-finite one is skipped while ``--skip-nonfinite`` allows, else it
        stops the run on every rank before the update, naming the ranks whose loss went bad.
        """
        norm = self.grad_norm.item()
        if math.isfinite(norm):
            return True
        step, p = self.progress.step + 1, self.progress
        if p.skipped < self.cfg.optim.skip_nonfinite:
            p.skipped += 1
            left = self.cfg.optim.skip_nonfinite - p.skipped
            self._say(f"warning: step {step} skipped: the gradient norm is {norm} ({left} more may be skipped)")
            return False
        raise optim.nonfinite_error(f"the gradient norm is {norm}", loss, step, self.checkpointer.last_saved)

    def _gradient_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Reduce gradients on the last micro-batch only: DDP's no_sync, FSDP's requires_gradient_sync."""
        if self.sharded:
            self.model.set_requires_gradient_sync(last)  # unsharded gradients accumulate until then
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else self.wrapped.no_sync()

    def _after_step(self) -> None:
        """Log, and checkpoint when due (or when the ranks agreed to stop).

        Ranks agree through one small all-reduce (mean loss, save timer, async-save
        status) at each logging step, and at every step while an async save is in
        flight; in between a step adds only the non-blocking stop agreement.
        """
        step = self.progress.step
        log_step = step % self.cfg.run.log_every == 0 or step == self.total_steps
        due = False
        if log_step or self.checkpointer.pending_step is not None:
            due = self._agree()
        self._log_step(log_step)
        every = self.cfg.checkpoint.checkpoint_every
        periodic = every > 0 and step % every == 0
        if (periodic or due or self.stop.requested) and step < self.total_steps:
            self.save_checkpoint()
            if self.stop.requested:
                self.checkpointer.wait()
                self._say(f"stopping on {self.stop.name} after step {step}: checkpoint saved, relaunch to resume")

    def _agree(self) -> bool:
        """The all-reduce every rank calls at the same step; True when a timed save is due."""
        writing, failed = self.checkpointer.status()
        every_s = self.cfg.checkpoint.checkpoint_every_seconds
        time_due = self.world.is_main and every_s > 0 and time.monotonic() - self.last_save_time >= every_s
        mine = 0.0 if self.loss_sum is None else self.loss_sum.item()
        # one collective carries the agreement and each rank's step times for the figures of a logged step
        rows = group.all_gather_floats([mine, time_due, writing, failed, *step_timing(self.timing, self.device)])
        total, due, writing, failed = (math.fsum(row[i] for row in rows) for i in range(4))
        self.rank_timing = [row[4:] for row in rows]
        if not math.isfinite(total) and not self.scaler.is_enabled():
            raise optim.nonfinite_error(
                "the mean loss is not finite", torch.tensor(mine), self.progress.step, self.checkpointer.last_saved
            )
        self.last_grad_norm = self.grad_norm.item()
        if failed:
            self.checkpointer.wait()  # raises on every rank, naming the rank and the error
        elif self.checkpointer.pending_step is not None and not writing:
            self.checkpointer.commit()
        self.last_loss = total / (self.world.world_size * self.loss_steps) if self.loss_steps else math.nan
        return due > 0

    def _log_step(self, log_step: bool) -> None:
        now = time.monotonic()
        t0, s0 = self.tick
        rate = (self.progress.step - s0) * self.global_batch / max(now - t0, 1e-9)
        lr = self.optimizer.param_groups[0]["lr"]  # the rate of the step just taken
        step, epoch = self.progress.step, self.step_epoch
        figures = step_figures(self.rank_timing, self.step_flops, self.peak) if log_step else {}
        self.display.update(step, epoch, self.last_loss, rate, lr, self.last_grad_norm, figures)
        if log_step:
            tokens = self.task.tokens_per_sample
            self.metrics.write(
                "train",
                step=step,
                epoch=epoch,
                loss=self.last_loss,
                lr=lr,
                grad_norm=self.last_grad_norm,
                samples_per_s=round(rate, 1),
                **({"tokens_per_s": round(rate * tokens, 1)} if tokens else {}),
                **figures,
            )
            self.timing = {"step": 0.0, "data": 0.0, "steps": 0}
            self.tick = (now, step)
            self.loss_sum, self.loss_steps = None, 0  # the next record averages the steps after this one

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The task's metrics on the held-out split, each rank taking every N-th sample."""
        if self.task.val_data is None:
            return {}
        model = self.wrapped if self.sharded else self.wrapped.module  # compiled, if it was
        model.eval()
        sums: dict[str, float] = {}
        size = max(self.cfg.data.batch_size, 1024 if isinstance(self.task.val_data, TensorDataset) else 0)
        world, seed, limit = self.world, self.cfg.run.seed, self.cfg.run.eval_samples
        done = 0
        for batch in eval_batches(self.task, world.rank, world.world_size, size, seed, limit):
            for key, value in self.task.compute_metrics(model, to_device(batch, self.device, self.dtype)).items():
                sums[key] = sums.get(key, 0.0) + float(value)
            done += 1
        if self.sharded:  # FSDP's forward is a collective: run as many as rank 0, which has the most batches
            spare = next(eval_batches(self.task, 0, world.world_size, size, seed, limit), None)
            for _ in range(eval_batch_count(len(self.task.val_data), 0, world.world_size, size, limit) - done):
                self.task.compute_metrics(model, to_device(spare, self.device, self.dtype))  # results unused
        model.train()
        total: dict[str, float] = {}
        for part in group.all_gather_objects(sums):  # every rank sums the same dicts, in rank order
            for key, value in part.items():
                total[key] = total.get(key, 0.0) + value
        if not total.get("count"):
            return {}  # an empty held-out split: nothing to report
        samples = int(total["count"]) if "count" in total else None
        means = self.task.finish_metrics(total)
        shown = " ".join(f"{k} {v:.4f}" for k, v in means.items())
        self.display.message(f"eval at step {self.progress.step} (epoch {self.step_epoch}): {shown}")
        self.metrics.write("eval", step=self.progress.step, epoch=self.step_epoch, **means, count=samples)
        return means


def export_and_verify(trainer: Trainer) -> VerifyReport:
    """Rank 0 saves the task's weights file (``mlp.params``); every rank reloads it into a fresh model; all must
    agree."""
    cfg, world, task = trainer.cfg, trainer.world, trainer.task
    path = trainer.out / task.weights_file
    probe = probe_input(task, cfg)
    reference = outputs(unwrap(trainer.wrapped), probe, cfg.optim.precision)  # under FSDP, all ranks' forward
    whole = fsdp.full_model_state(trainer.model) if trainer.sharded else None
    save_model(trainer.wrapped, path, format=cfg.checkpoint.format, state=whole)
    write_model_card(path, cfg, task, probe)
    fresh = load_model(local_model(task, cfg, trainer.device, trainer.dtype), path)
    faults.perturb_reloaded(world.rank, fresh)
    atol = cfg.dist.atol if cfg.dist.atol is not None else DEFAULT_ATOL[cfg.optim.precision]
    report = verify_identical_outputs(fresh, probe, reference=reference, atol=atol, precision=cfg.optim.precision)
    group.log(world, summary(report, str(path), cfg.optim.precision), all_ranks=True)
    return report


def write_model_card(path: Path, cfg: Config, task: Task, probe: Any) -> None:
    """Called by every rank: rank 0 writes, beside the exported weights, what rebuilds and runs the model
    without the training data: ``<weights>.json`` (the config, the task's model_args among its arguments)
    and ``<weights>.probe.pt`` (the verify input)."""
    error = None
    if group.rank() == 0:
        try:
            settings = cfg.to_dict()
            settings["task"]["args"] = {**settings["task"]["args"], **task.model_args}
            model_card.write(path, settings, to_device(probe, torch.device("cpu")))
        except DDPError as e:
            error = e
    group.raise_if_any_failed(error, f"writing the model card of {path}")


def check_output_dir(out: Path) -> None:
    """Create ``--out`` and prove it is writable now, not an hour into training."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--out: cannot write to {out}: {e.strerror}; choose a writable folder") from None


def check_settings(cfg: Config) -> None:
    """Usage errors that can be found before any process group starts."""
    backend = group.resolve_backend(cfg.dist.backend)
    group.check_devices(group.world_from_env(backend, cfg.dist.device))
    if cfg.run.sync_bn and backend != "nccl":
        raise ConfigError("--sync-bn needs CUDA GPUs and NCCL (PyTorch's SyncBatchNorm does not run on CPU)")
    if cfg.dist.static_graph and cfg.optim.grad_accum > 1:
        raise ConfigError("--static-graph cannot be combined with --grad-accum > 1 (DDP fails an internal assert)")
    if cfg.dist.strategy == "fsdp":
        check_fsdp_settings(cfg)
    trackers.check_available(cfg.run.tensorboard, cfg.run.wandb)
    check_output_dir(cfg.run.out_dir)
    run_folder.check(cfg, cfg.run.overwrite)


def check_fsdp_settings(cfg: Config) -> None:
    """Options that only DDP has, refused under FSDP rather than silently ignored."""
    d, refused = cfg.dist, []
    if d.static_graph or d.bucket_cap_mb is not None or not d.gradient_as_bucket_view:
        refused.append("--static-graph, --bucket-cap-mb and --no-gradient-as-bucket-view tune DDP's buckets")
    if cfg.checkpoint.async_save:
        refused.append("--async-save: sharded checkpoints are written in step (each rank writes only its 1/N)")
    if cfg.run.sync_bn:
        refused.append("--sync-bn: SyncBatchNorm is for DDP")
    if refused:
        raise ConfigError("--strategy fsdp does not take " + "; ".join(refused))


def configure_determinism(cfg: Config) -> None:
    """Bitwise-repeatable kernels when asked for (some ops get slower)."""
    if cfg.run.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # must precede CUDA's first use
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def run(cfg: Config, world: group.World, task: Task | None = None, trackers: list | None = None) -> VerifyReport | None:
    """Train, export and verify on this rank; the verify report (None when a signal stopped it)."""
    group.log(world, f"{world.backend} on {world.device}, {world.world_size} rank(s)", all_ranks=cfg.run.log_all_ranks)
    group.log(world, f"config: {json.dumps(cfg.to_dict())}")
    trainer = Trainer(cfg, world, task, trackers)
    with trainer.stop.installed():
        trainer.train()
    return None if trainer.stop.requested else export_and_verify(trainer)


def fit(task: Task, trackers: list | None = None, **settings) -> VerifyReport | None:
    """Train ``task`` with DDP, save its weights, reload them on every rank and verify.

    The same trainer as ``ddp train``: run it under ``torchrun`` (every rank calls ``fit``)
    or alone (a world of one). ``settings`` are the options of ``ddp train --help`` by
    field name, e.g. ``fit(task, steps=200, batch_size=32, out="runs/mine")``; ``trackers``
    receive the logged figures on rank 0 (``ddp.trackers``). Returns the verify report
    (None if a SIGTERM stopped the run after a checkpoint).
    """
    cfg = config_from_settings(settings, task)
    check_settings(cfg)
    configure_determinism(cfg)
    with rng.seeded(cfg.run.seed):
        task.probe_input()  # a task whose probe cannot be derived fails now, before any process group
    with group.process_group(cfg.dist, cfg.run.out_dir / FLIGHT_RECORDER) as world:
        return run(cfg, world, task, trackers)


def config_from_settings(settings: dict, task: Task) -> Config:
    """A Config from flat ``field=value`` settings, each found in its section by name."""
    owner = {f.name: section for section, kind in SECTIONS.items() for f in dataclasses.fields(kind)}
    values: dict[str, dict] = {section: {} for section in SECTIONS}
    for key, value in settings.items():
        if key not in owner or owner[key] == "task":
            raise ConfigError(f"fit(): unknown setting {key!r}; the settings are the fields of `ddp train --help`")
        values[owner[key]][key] = value
    values["task"] = {"spec": f"python:{task.name}"}  # recorded in checkpoints; the Task itself is passed
    return Config.from_dict(values)


def explain(world: group.World, e: BaseException) -> int | None:
    """Print a known failure as one line on stderr and give its exit code; None for a bug."""
    if isinstance(e, DDPError):
        return say(world.prefix(), e)
    if not group.is_comm_failure(e):
        return None
    print(
        f"{world.prefix()} error: a collective failed, another rank probably died or hung "
        f"(see the launcher's report of the failing rank): {first_line(e)}",
        file=sys.stderr,
        flush=True,
    )
    return 1


@record
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``torchrun -m ddp.train`` and ``ddp train``."""
    cfg = parse(argv)
    world = group.world_from_env()
    try:
        check_settings(cfg)
        configure_determinism(cfg)
        task = resolve(cfg)  # a bad --task is a usage error before any process group starts
    except ConfigError as e:
        return say("ddp train:", e)
    try:
        with group.process_group(cfg.dist, cfg.run.out_dir / FLIGHT_RECORDER) as world:
            try:
                run(cfg, world, task)
            except Exception as e:
                code = explain(world, e)  # now, before leaving the group: see Reported
                if code is None:
                    raise
                raise Reported(code) from e
        return 0
    except Reported as r:
        return r.code
    except KeyboardInterrupt:  # a Ctrl-C outside training (starting, verifying): one line, no traceback
        print(f"{world.prefix()} interrupted (SIGINT)", file=sys.stderr, flush=True)
        return 130
    except Exception as e:  # joining or leaving the group
        code = explain(world, e)
        if code is None:
            raise
        return code


if __name__ == "__main__":
    group.exit_process(main())
