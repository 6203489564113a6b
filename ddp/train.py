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
Each rank trains on its own shard; rank 0 writes ``<out>/mlp.params`` (the unwrapped
state_dict, atomically) and full-state checkpoints under ``<out>/checkpoints``; every
rank reloads the weights into a fresh model and all must give identical outputs.
A relaunch with the same ``--out`` resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import TensorDataset

from ddp import dist, faults, fsdp
from ddp.checkpoint import (
    FORMAT_VERSION,
    SHARDED,
    Checkpointer,
    is_sharded,
    read_manifest,
    rng_state,
    set_rng_state,
)
from ddp.config import SECTIONS, Config, config_changes, parse
from ddp.data import ResumableSampler, eval_batch_count, eval_batches, make_loader, seed_all, seeded, steps_per_epoch
from ddp.errors import ConfigError, DDPError, Reported, say
from ddp.io import check_architecture, load_model, save_model, strip_prefixes, unwrap
from ddp.metrics import MetricsWriter, ProgressDisplay
from ddp.model import materialize
from ddp.task import Task, to_device
from ddp.tasks import resolve
from ddp.verify import DEFAULT_ATOL, VerifyReport, outputs, summary, verify_identical_outputs

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    step: int = 0
    """Optimizer steps taken."""
    epoch: int = 0
    """Current epoch."""
    epoch_samples: int = 0
    """Samples of the current epoch already consumed, counted over all ranks."""


def local_model(task: Task, cfg: Config, device: torch.device, dtype: torch.dtype = torch.float32) -> nn.Module:
    """This rank's model before DDP: built from a seeded RNG (the same weights on every rank),
    lazy layers materialised, SyncBatchNorm if asked, in the memory format ``--memory-format``
    resolves to."""
    with seeded(cfg.run.seed):
        model = task.model()
        if not isinstance(model, nn.Module):
            raise ConfigError(f"task {task.name!r}: model() returned a {type(model).__name__}, not an nn.Module")
        materialize(model, probe_input(task, cfg))  # lazy layers draw their weights here: seeded too
    if cfg.run.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(device, dtype=dtype, memory_format=memory_format(cfg, task))


def probe_input(task: Task, cfg: Config):
    """The verify input: the task's probe, derived under a fixed seed so that every rank draws the same."""
    with seeded(cfg.run.seed + 1234):
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
    """Holds the model, data, optimizer and checkpointer of one rank."""

    def __init__(self, cfg: Config, world: dist.World, task: Task | None = None) -> None:
        self.cfg, self.world, self.device = cfg, world, world.device
        self.task = task if task is not None else resolve(cfg)
        self.out = cfg.run.out_dir
        self.out.mkdir(parents=True, exist_ok=True)
        self.dtype = torch.float64 if cfg.optim.precision == "fp64" else torch.float32
        # Under FSDP the whole model is built in host memory, with the seeded weights DDP would have; each
        # block's shards then move to the device as it is sharded, so no device ever holds the whole model.
        built_on = torch.device("cpu") if self.sharded else self.device
        self.model = local_model(self.task, cfg, built_on, self.dtype)
        seed_all(cfg.run.seed + 1_000_003 * world.rank)  # dropout etc. differ per rank, reproducibly
        self.train_set = self.task.train_data
        self.sampler = ResumableSampler(self.train_set, world.world_size, world.rank, cfg.run.seed)
        self.loader = make_loader(
            self.task,
            self.sampler,
            cfg.data.batch_size,
            cfg.data.workers,
            self.device.type == "cuda",
            cfg.run.seed,
        )
        self.global_batch = cfg.data.batch_size * world.world_size * cfg.optim.grad_accum
        self.steps_per_epoch = steps_per_epoch(len(self.train_set), self.global_batch)
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"--batch-size: the global batch ({self.global_batch} = {cfg.data.batch_size} x {world.world_size} "
                f"ranks x {cfg.optim.grad_accum} accumulation) exceeds the {len(self.train_set)} training samples"
            )
        self.total_steps = cfg.run.steps or cfg.run.epochs * self.steps_per_epoch
        self.wrapped = self._wrap(self.model)
        self.optimizer = self._optimizer()
        self.scheduler = self._scheduler()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.optim.precision == "fp16")
        self.progress = Progress()
        self.signalled = False  # set by the SIGTERM handler only
        self.stop_requested = False  # set when any rank was signalled: all ranks agree
        self.last_loss = float("nan")  # mean over ranks, as of the last agreement
        self.checkpointer = Checkpointer(self.out / "checkpoints", cfg.checkpoint, self._say)
        self.metrics = MetricsWriter(self.out, world.is_main)
        self.last_save_time = time.monotonic()

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

    def _optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        if o.optimizer == "adamw":
            return torch.optim.AdamW(self.model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        return torch.optim.SGD(self.model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)

    def _scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        if self.cfg.optim.schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=self.total_steps)
        return torch.optim.lr_scheduler.ConstantLR(self.optimizer, factor=1.0, total_iters=0)

    def _say(self, text: str) -> None:
        dist.log(self.world, text)

    # ---- checkpoints ----

    def state(self) -> tuple[dict, dict, dict | None]:
        """(replicated files, this rank's own state, its shards under FSDP) of a full checkpoint."""
        train = {
            "format_version": FORMAT_VERSION,
            "step": self.progress.step,
            "epoch": self.progress.epoch,
            "epoch_samples": self.progress.epoch_samples,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "config": self.cfg.to_dict(),
            "world_size": self.world.world_size,
            "torch_version": str(torch.__version__),
        }
        own = {"rank": self.world.rank, "world_size": self.world.world_size, "rng": rng_state()}
        if self.sharded:
            shards = fsdp.sharded_state(self.model, self.optimizer)
            self._rank0_buffers(shards["model"])
            return {"train.pt": train}, own, shards
        train["optimizer"] = self.optimizer.state_dict()
        model_state = unwrap(self.wrapped).state_dict()
        self._rank0_buffers(model_state)
        return {"model.pt": model_state, "train.pt": train}, own, None

    def _rank0_buffers(self, model_state: dict) -> None:
        """Put copies of rank 0's buffers into ``model_state`` on every rank, so any rank may write them.

        Buffers (BatchNorm statistics) are each rank's own: DDP broadcasts rank 0's before
        the next forward, FSDP never. A checkpoint holds rank 0's, as ``mlp.params`` does;
        the model itself is left as it is.
        """
        if self.world.world_size == 1:
            return
        for name, _ in unwrap(self.wrapped).named_buffers():
            if name in model_state:  # persistent buffers only
                model_state[name] = model_state[name].clone()
                dist.broadcast(model_state[name], src=0)

    def save_checkpoint(self) -> None:
        """Called by every rank: save the full state of the current step."""
        self.checkpointer.save(self.progress.step, *self.state())
        self.last_save_time = time.monotonic()

    def resume(self) -> None:
        """Called by every rank: load the checkpoint ``--resume`` selects, if any."""
        self.checkpointer.prepare()
        folder = self.checkpointer.find(self.cfg.checkpoint.resume)
        if folder is None:
            return
        if self.sharded and is_sharded(read_manifest(folder)):
            state, own, _ = Checkpointer.load_train(folder, self.device)
            self._load_shards(folder / SHARDED)
        else:
            state, own, _ = Checkpointer.load(folder, self.device if not self.sharded else "cpu")
            self._load_whole(state, folder)
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.progress = Progress(state["step"], state["epoch"], state["epoch_samples"])
        self.checkpointer.last_saved = state["step"]
        self._restore_rng(own, state["world_size"])
        changes = config_changes(state["config"], self.cfg)
        if changes:
            self._say(
                f"warning: settings changed since the checkpoint, the run will not match an "
                f"uninterrupted one: {', '.join(changes)}"
            )
        if self.progress.step >= self.total_steps:
            self._say(f"resumed from {folder}: step {self.progress.step} already completes the run")
        else:
            self._say(f"resumed from {folder}: continuing at step {self.progress.step + 1}")

    def _load_shards(self, folder: Path) -> None:
        """This rank's shards of a sharded checkpoint, written by any number of ranks (DCP reshards)."""
        from ddp import dcp  # torch.distributed.checkpoint: imported when used (see ddp/fsdp.py)

        shapes = {k: torch.empty(v, device="meta") for k, v in dcp.tensor_shapes(folder, "model.").items()}
        check_architecture(self.model, shapes, folder)
        state = fsdp.sharded_state(self.model, self.optimizer)
        dcp.load_into(state, folder)
        fsdp.load_state(self.model, self.optimizer, state)

    def _load_whole(self, state: dict, folder: Path) -> None:
        """A whole model and optimizer state (a DDP checkpoint, or a sharded one under DDP)."""
        model_state, _ = strip_prefixes(state["model"])
        model = unwrap(self.wrapped)
        source = folder / "model.pt" if (folder / "model.pt").exists() else folder  # or each rank's share
        check_architecture(model, model_state, source)
        if self.sharded:  # each rank keeps its shard of the whole tensors
            optimizer = fsdp.optimizer_by_name(model, state["optimizer"])
            fsdp.load_state(model, self.optimizer, {"model": model_state, "optim": optimizer}, full=True)
        else:
            model.load_state_dict(model_state)
            self.optimizer.load_state_dict(state["optimizer"])

    def _restore_rng(self, own: dict | None, saved_world: int) -> None:
        if own is not None:
            set_rng_state(own["rng"])
        else:
            seed_all(self.cfg.run.seed + 1_000_003 * self.world.rank + 7919 * self.progress.step)
        if saved_world != self.world.world_size:
            reseeded = list(range(saved_world, self.world.world_size))
            self._say(
                f"warning: checkpoint written by {saved_world} rank(s), resuming on {self.world.world_size}: "
                f"data continues at sample {self.progress.epoch_samples} of epoch {self.progress.epoch}; "
                + (
                    f"ranks {reseeded} had no RNG state and were reseeded from (seed, rank, step)"
                    if reseeded
                    else f"the RNG state of ranks {list(range(self.world.world_size, saved_world))} was not used"
                )
                + "; results will not be bitwise equal to a run on the original world size"
            )

    # ---- training ----

    def train(self) -> None:
        """Run until ``total_steps`` (or a SIGTERM), checkpointing on the way and at the end."""
        self.resume()
        shown = self.world.is_main or self.cfg.run.log_all_ranks
        self.display = ProgressDisplay(self.cfg.run.log_every, self.world.prefix(), shown)
        self.tick = (time.monotonic(), self.progress.step)
        try:
            while self.progress.step < self.total_steps and not self.stop_requested:
                self._run_epoch()
            self.sync_buffers()
            if self.checkpointer.last_saved != self.progress.step:
                self.save_checkpoint()
            self.checkpointer.wait()
        finally:
            self.display.close()

    def sync_buffers(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics), as DDP does before each forward.

        After the last step each rank holds statistics of its own last batch; the saved
        model, and so every reloaded copy, carries rank 0's.
        """
        for buffer in unwrap(self.wrapped).buffers():
            dist.broadcast(buffer, src=0)

    def _run_epoch(self) -> None:
        p = self.progress
        self.sampler.set_position(p.epoch, p.epoch_samples)
        left = steps_per_epoch(len(self.train_set), self.global_batch, p.epoch_samples)
        steps = min(left, self.total_steps - p.step)
        self.display.start_epoch(p.epoch, steps)
        batches = iter(self.loader)
        for _ in range(steps):
            micro = [next(batches) for _ in range(self.cfg.optim.grad_accum)]
            loss = self._run_step(micro)
            p.step += 1
            p.epoch_samples += self.global_batch
            epoch_done = steps_per_epoch(len(self.train_set), self.global_batch, p.epoch_samples) == 0
            if epoch_done:  # advance before saving, so a resume starts the next epoch
                p.epoch, p.epoch_samples = p.epoch + 1, 0
            faults.at_step(self.world.rank, p.step)
            self._after_step(loss)
            if epoch_done:
                self.evaluate()
            if self.stop_requested:
                return

    def _run_step(self, micro: list) -> torch.Tensor:
        """One optimizer step over ``grad_accum`` micro-batches; gradients sync on the last."""
        self.optimizer.zero_grad(set_to_none=True)
        k = len(micro)
        dtype = AUTOCAST.get(self.cfg.optim.precision)
        total = None
        for i, batch in enumerate(micro):
            batch = to_device(batch, self.device, self.dtype)
            sync = self._gradient_sync(i == k - 1)
            cast = torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
            with sync:
                with cast:
                    loss = self.task.compute_loss(self.wrapped, batch)
                    if k > 1:
                        loss = loss / k
                self.scaler.scale(loss).backward()
            total = loss.detach() if total is None else total + loss.detach()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return total

    def _gradient_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Reduce gradients on the last micro-batch only: DDP's no_sync, FSDP's requires_gradient_sync."""
        if self.sharded:
            self.model.set_requires_gradient_sync(last)  # unsharded gradients accumulate until then
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else self.wrapped.no_sync()

    def _after_step(self, loss: torch.Tensor) -> None:
        """Log, agree on stopping, and checkpoint when due.

        Ranks agree through one small all-reduce (mean loss, SIGTERM, save timer,
        async-save status) at each logging step, and at every step while an async save
        is in flight; in between a step costs no extra communication.
        """
        step = self.progress.step
        log_step = step % self.cfg.run.log_every == 0 or step == self.total_steps
        due = False
        if log_step or self.checkpointer.pending_step is not None:
            due = self._agree(loss)
        self._log_step(log_step)
        every = self.cfg.checkpoint.checkpoint_every
        periodic = every > 0 and step % every == 0
        if (periodic or due or self.stop_requested) and step < self.total_steps:
            self.save_checkpoint()
            if self.stop_requested:
                self.checkpointer.wait()
                self._say(f"stopping on SIGTERM after step {step}: checkpoint saved, relaunch to resume")

    def _agree(self, loss: torch.Tensor) -> bool:
        """The all-reduce every rank calls at the same step; True when a timed save is due."""
        writing, failed = self.checkpointer.status()
        every_s = self.cfg.checkpoint.checkpoint_every_seconds
        time_due = self.world.is_main and every_s > 0 and time.monotonic() - self.last_save_time >= every_s
        total, stop, due, writing, failed = dist.all_sum([loss.item(), self.signalled, time_due, writing, failed])
        if failed:
            self.checkpointer.wait()  # raises on every rank, naming the rank and the error
        elif self.checkpointer.pending_step is not None and not writing:
            self.checkpointer.commit()
        self.stop_requested = stop > 0
        self.last_loss = total / self.world.world_size
        return due > 0

    def _log_step(self, log_step: bool) -> None:
        now = time.monotonic()
        t0, s0 = self.tick
        rate = (self.progress.step - s0) * self.global_batch / max(now - t0, 1e-9)
        lr = self.scheduler.get_last_lr()[0]
        step, epoch = self.progress.step, self.progress.epoch
        self.display.update(step, epoch, self.last_loss, rate, lr)
        if log_step:
            self.metrics.write(
                "train", step=step, epoch=epoch, loss=self.last_loss, lr=lr, samples_per_s=round(rate, 1)
            )
            self.tick = (now, step)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The task's metrics on the held-out split, each rank taking every N-th sample."""
        if self.task.val_data is None:
            return {}
        model = self.wrapped if self.sharded else self.wrapped.module  # compiled, if it was
        model.eval()
        sums: dict[str, float] = {}
        size = max(self.cfg.data.batch_size, 1024 if isinstance(self.task.val_data, TensorDataset) else 0)
        world, seed = self.world, self.cfg.run.seed
        done = 0
        for batch in eval_batches(self.task, world.rank, world.world_size, size, seed):
            for key, value in self.task.compute_metrics(model, to_device(batch, self.device, self.dtype)).items():
                sums[key] = sums.get(key, 0.0) + float(value)
            done += 1
        if self.sharded:  # FSDP's forward is a collective: run as many as rank 0, which has the most batches
            spare = next(eval_batches(self.task, 0, world.world_size, size, seed), None)
            for _ in range(eval_batch_count(len(self.task.val_data), 0, world.world_size, size) - done):
                self.task.compute_metrics(model, to_device(spare, self.device, self.dtype))  # results unused
        model.train()
        total: dict[str, float] = {}
        for part in dist.all_gather_objects(sums):  # every rank sums the same dicts, in rank order
            for key, value in part.items():
                total[key] = total.get(key, 0.0) + value
        if not total.get("count"):
            return {}  # an empty held-out split: nothing to report
        means = self.task.finish_metrics(total)
        shown = " ".join(f"{k} {v:.4f}" for k, v in means.items())
        self.display.message(f"eval epoch {self.progress.epoch - 1}: {shown}")
        self.metrics.write("eval", step=self.progress.step, epoch=self.progress.epoch - 1, **means)
        return means


def export_and_verify(trainer: Trainer) -> VerifyReport:
    """Rank 0 saves mlp.params; every rank reloads it into a fresh model; all must agree."""
    cfg, world, task = trainer.cfg, trainer.world, trainer.task
    path = trainer.out / "mlp.params"
    probe = probe_input(task, cfg)
    reference = outputs(unwrap(trainer.wrapped), probe, cfg.optim.precision)  # under FSDP, all ranks' forward
    whole = fsdp.full_model_state(trainer.model) if trainer.sharded else None
    save_model(trainer.wrapped, path, format=cfg.checkpoint.format, state=whole)
    fresh = load_model(local_model(task, cfg, trainer.device, trainer.dtype), path)
    faults.perturb_reloaded(world.rank, fresh)
    atol = cfg.dist.atol if cfg.dist.atol is not None else DEFAULT_ATOL[cfg.optim.precision]
    report = verify_identical_outputs(fresh, probe, reference=reference, atol=atol, precision=cfg.optim.precision)
    dist.log(world, summary(report, str(path), cfg.optim.precision), all_ranks=True)
    return report


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
    backend = dist.resolve_backend(cfg.dist.backend)
    dist.check_devices(dist.world_from_env(backend, cfg.dist.device))
    if cfg.run.sync_bn and backend != "nccl":
        raise ConfigError("--sync-bn needs CUDA GPUs and NCCL (PyTorch's SyncBatchNorm does not run on CPU)")
    if cfg.dist.static_graph and cfg.optim.grad_accum > 1:
        raise ConfigError("--static-graph cannot be combined with --grad-accum > 1 (DDP fails an internal assert)")
    if cfg.dist.strategy == "fsdp":
        check_fsdp_settings(cfg)
    check_output_dir(cfg.run.out_dir)


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


def run(cfg: Config, world: dist.World, task: Task | None = None) -> VerifyReport | None:
    """Train, export and verify on this rank; the verify report (None when stopped by SIGTERM)."""
    dist.log(world, f"{world.backend} on {world.device}, {world.world_size} rank(s)", all_ranks=cfg.run.log_all_ranks)
    dist.log(world, f"config: {json.dumps(cfg.to_dict())}")
    trainer = Trainer(cfg, world, task)
    # The handler only sets a flag: ranks agree on it after the step, then save and exit.
    previous = signal.signal(signal.SIGTERM, lambda *_: setattr(trainer, "signalled", True))
    try:
        trainer.train()
        return None if trainer.stop_requested else export_and_verify(trainer)
    finally:
        # Drop the handler's reference, so the trainer (and DDP's hold on the process
        # group) is freed before interpreter shutdown, where freeing gloo threads aborts.
        signal.signal(signal.SIGTERM, previous)


def fit(task: Task, **settings) -> VerifyReport | None:
    """Train ``task`` with DDP, save its weights, reload them on every rank and verify.

    The same trainer as ``ddp train``: run it under ``torchrun`` (every rank calls ``fit``)
    or alone (a world of one). ``settings`` are the options of ``ddp train --help`` by
    field name, e.g. ``fit(task, steps=200, batch_size=32, out="runs/mine")``. Returns the
    verify report (None if a SIGTERM stopped the run after a checkpoint).
    """
    cfg = config_from_settings(settings, task)
    check_settings(cfg)
    configure_determinism(cfg)
    with seeded(cfg.run.seed):
        task.probe_input()  # a task whose probe cannot be derived fails now, before any process group
    with dist.process_group(cfg.dist) as world:
        return run(cfg, world, task)


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


def is_comm_failure(e: BaseException) -> bool:
    """True for errors of a collective whose peer died or hung (gloo raises plain RuntimeErrors)."""
    clues = ("Connection closed by peer", "Connection reset", "Timed out", "timed out", "NCCL", "gloo")
    return isinstance(e, torch.distributed.DistError) or any(c in str(e) for c in clues)


def explain(world: dist.World, e: BaseException) -> int | None:
    """Print a known failure as one line on stderr and give its exit code; None for a bug."""
    if isinstance(e, DDPError):
        return say(world.prefix(), e)
    if not (isinstance(e, RuntimeError) and is_comm_failure(e)):
        return None
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(
        f"{world.prefix()} error: a collective failed, another rank probably died or hung "
        f"(see the launcher's report of the failing rank): {first}",
        file=sys.stderr,
        flush=True,
    )
    return 1


@record
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``torchrun -m ddp.train`` and ``ddp train``."""
    cfg = parse(argv)
    world = dist.world_from_env()
    try:
        check_settings(cfg)
        configure_determinism(cfg)
        task = resolve(cfg)  # a bad --task is a usage error before any process group starts
    except ConfigError as e:
        return say("ddp train:", e)
    try:
        with dist.process_group(cfg.dist) as world:
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
    except Exception as e:  # joining or leaving the group
        code = explain(world, e)
        if code is None:
            raise
        return code


if __name__ == "__main__":
    dist.exit_process(main())
