"""One rank's training loop: the components it is handed, called once each per step.

Every concern is a component with its own state, and the Trainer calls it:

- ``Parallel`` (``ddp.parallel``): the model, replicated (DDP) or sharded (FSDP);
- ``batches.build`` (``ddp.batches``): the data, map-style or a stream;
- ``StepMetrics`` (``ddp.metrics``): the loss, the figures, the display and the trackers;
- ``Checkpointer`` (``ddp.checkpoint``): what is saved, when, and what a restart resumes;
- ``Evaluator`` (``ddp.evaluate``), ``Watchdog`` (``ddp.watchdog``), ``NonFiniteGuard`` (``ddp.optim``)
  and ``StopSignals`` (``ddp.stopping``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ddp import batches, faults, group, optim, rng, run_folder
from ddp.checkpoint import PROGRESS, Checkpointer
from ddp.config import Config
from ddp.data import ORDER
from ddp.evaluate import Evaluator
from ddp.metrics import StepMetrics
from ddp.parallel import Parallel
from ddp.stopping import StopSignals
from ddp.task import Batch, Task, to_device
from ddp.tasks import resolve
from ddp.watchdog import Watchdog


@dataclasses.dataclass
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

    @property
    def step_epoch(self) -> int:
        """The epoch of the last step: the one before the current, where that step ended it."""
        return self.epoch - 1 if self.step and not self.epoch_samples else self.epoch

    def state_dict(self) -> dict[str, int]:
        """The counters, by name (``dataclasses.asdict`` deep-copies each: a fifth of a snapshot's state)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the counters from ``state`` (which may hold other entries too; one it lacks stays at its default)."""
        for f in dataclasses.fields(self):
            default = 1 if f.name == "order" else f.default  # a checkpoint of before version 2: its order
            setattr(self, f.name, type(f.default)(state.get(f.name, default)))


class Trainer:
    """One rank's training: builds its components, takes steps, and calls each component where it is due.

    The learning rate is a function of the step (``ddp.optim.lr_at``), so no scheduler state is saved.
    """

    def __init__(self, cfg: Config, world: group.World, task: Task | None = None, trackers: list | None = None) -> None:
        self.cfg, self.world, self.device = cfg, world, world.device
        self.task = (task if task is not None else resolve(cfg)).load_data()
        self.out = cfg.run.out_dir
        self.out.mkdir(parents=True, exist_ok=True)
        self.parallel = Parallel(self.task, cfg, world)
        rng.seed_all(rng.rank_seed(cfg.run.seed, world.rank))  # dropout etc. differ per rank, reproducibly
        self.progress = Progress()
        global_batch = cfg.data.batch_size * world.world_size * cfg.optim.grad_accum
        self.metrics = StepMetrics(cfg, world, global_batch, self.task.tokens_per_sample, trackers)
        self.data = batches.build(self.task, cfg, world, self.metrics.display.start_epoch, self._say)
        self.optimizer = optim.build(self.parallel.model, cfg.optim)
        self.grad_norm = optim.GradNorm(self.optimizer)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.optim.precision == "fp16")
        shared, own = self.data.statefuls()
        self.checkpointer = Checkpointer(
            self.out / "checkpoints", cfg.checkpoint, self.parallel.model, self.optimizer,
            {"scaler": self.scaler, PROGRESS: self.progress, **shared}, own_stateful=own,
            sharded=self.parallel.sharded, device=self.device, config=cfg, say=self._say, guarded=True,
        )  # fmt: skip
        self.guard = optim.NonFiniteGuard(cfg.optim, self.scaler, self._say)
        self.evaluator = Evaluator(self.task, cfg, world, self.parallel.dtype, self.metrics)
        self.watchdog = Watchdog(world, cfg.dist)
        self.stop = StopSignals(world)  # SIGTERM, SIGINT: the ranks agree at a step, save and exit
        self.agreement: Callable[[], None] | None = None  # a logged step's, still travelling: ``flush`` reads it

    @property
    def model(self) -> torch.nn.Module:
        """The model to save and load: unwrapped, or under FSDP the sharded module itself."""
        return self.parallel.model

    @property
    def wrapped(self) -> torch.nn.Module:
        """The model as it steps: DDP around it (and torch.compile if asked), or FSDP's module."""
        return self.parallel.wrapped

    def _say(self, text: str) -> None:
        group.log(self.world, text)

    # ---- the run ----

    def resume(self) -> None:
        """Called by every rank: claim the run folder, and restore the checkpoint ``--resume`` selects, if any."""
        claim = run_folder.claim_on_rank0(self.cfg, self.world, self._say, self.checkpointer.resumable)
        self.checkpointer.run_id = claim
        folder = self.checkpointer.resume(self.cfg.checkpoint.resume)
        p = self.progress
        self.evaluator.restore(self.metrics.resume(self.checkpointer.run_id, p.step, p.step_epoch, p.elapsed), p.step)
        self.checkpointer.best_step = self.evaluator.best.step
        if folder is not None:
            self.data.check_resume(folder, self.checkpointer.saved_world_size)
        self._say_resumed(folder)

    def _say_resumed(self, folder: Path | str | None) -> None:
        note, step = self.parallel.init_note, self.progress.step
        if folder is None:
            if note is not None:
                self._say(note)
            return
        if note is not None:
            self._say(f"--init-from {self.cfg.checkpoint.init_from} not used: this run's checkpoint takes precedence")
        if step >= self.data.total_steps:
            self._say(f"resumed from {folder}: step {step} already completes the run")
        elif self.evaluator.best.stopped:
            self._say(f"resumed from {folder}: the run stopped early at step {step} (--early-stop)")
        else:
            self._say(f"resumed from {folder}: continuing at step {step + 1}")

    def train(self) -> None:
        """Run until the last step (or a stop signal), checkpointing on the way; the last step's checkpoint is
        durable before the final evaluation (and the export) begins."""
        self.resume()
        try:
            with self.watchdog.watching(self.progress, lambda: self.checkpointer.last_saved):
                self._steps()
            self.flush()
            self.stop.finish()
            self.parallel.sync_buffers()
            self.checkpointer.save_if_due(self.progress.step, last_step=True)
            self.checkpointer.finish()
            if self.stop.requested:
                self._say(f"stopping on {self.stop.name} after step {self.progress.step}: checkpoint saved, "
                          "relaunch to resume")  # fmt: skip
            elif self.evaluator.due(self.progress.step, last=True):
                self.evaluate()  # always once at the end: a run that never ends an epoch still reports
        finally:
            self.metrics.close()
            self.data.close()

    def _steps(self) -> None:
        """The training loop: steps and the evaluations due between them, until the last step or a stop."""
        p = self.progress
        while p.step < self.data.total_steps and not self.stop.requested and not self.evaluator.best.stopped:
            epoch = p.epoch
            micro = self.next_batches()
            if p.epoch != epoch and self.evaluator.due(p.step, epoch_ended=True):  # a stream's epoch ended
                self.evaluate()
            epoch = p.epoch
            self.step(micro)
            self.watchdog.stepped(p.step)
            if not self.stop.requested and self.evaluator.due(p.step, epoch_ended=p.epoch != epoch):
                self.evaluate()

    def evaluate(self) -> dict[str, float]:
        """The task's metrics on the held-out split, at the current step (``ddp.evaluate``); a stop signal ends it
        early, unrecorded. The checkpoint of a best evaluation is kept (``--keep-best``)."""
        self.flush()  # the last step's record comes first
        means = self.evaluator.run(self.parallel.eval_model, self.progress.step, self.stop)
        if self.evaluator.best.improved and self.cfg.eval.keep_best:
            self.checkpointer.keep_best(self.progress.step)
        return means

    # ---- a step ----

    def next_batches(self) -> list[Batch]:
        """This rank's next ``--grad-accum`` micro-batches (``ddp.batches``)."""
        with self.metrics.timing_data():
            return self.data.next(self.progress)

    def step(self, micro: list[Batch]) -> torch.Tensor:
        """One optimizer step over ``micro``, as ``train`` takes it, and what follows it.

        Gradients sync on the last micro-batch only. Then the progress advances (to the next
        epoch at its end, before any save, so that a resume starts that epoch), the ranks agree
        on stopping, and the step is logged and checkpointed where due. Returns this rank's loss.
        Over several ranks a logged step's record is written during the next step (``flush``).
        """
        loss, grad_norm, skipped = self._optimize(micro)
        p = self.progress
        self.metrics.stepped(loss, grad_norm, skipped, p.epoch)
        p.step += 1
        p.elapsed = self.metrics.elapsed()  # as a checkpoint of this step records it
        self.data.advance(p)
        faults.at_step(self.world.rank, p.step)
        agreed = self.stop.agree(p.step, self.checkpointer.riders)
        if agreed is not None:
            self.checkpointer.voted(agreed)
        self._after_step()
        self.metrics.ready()
        return loss

    def _optimize(self, micro: list[Batch]) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Forward, backward and the update over the micro-batches: (the loss, the gradient norm, skipped)."""
        o, par = self.cfg.optim, self.parallel
        optim.set_lr(self.optimizer, optim.lr_at(self.progress.step, self.data.total_steps, o))
        self.optimizer.zero_grad(set_to_none=True)
        k, total = len(micro), None
        for i, batch in enumerate(micro):
            batch = to_device(batch, self.device, par.dtype)
            with par.gradient_sync(i == k - 1), self.metrics.counting_flops(i, k):
                with par.autocast():
                    loss = self.task.compute_loss(par.wrapped, batch)
                    loss = faults.poison_loss(self.world.rank, self.progress.step + 1, loss)
                    if k > 1:
                        loss = loss / k
                if i == 0:
                    faults.in_step(self.world.rank, self.progress.step + 1)
                    self.flush()  # before this step's gradients sync: see ``_agree``
                self.scaler.scale(loss).backward()
            total = loss.detach() if total is None else total + loss.detach()
        self.scaler.unscale_(self.optimizer)  # fp16: the true gradients, to measure and clip (else a no-op)
        grad_norm = self.grad_norm(o.max_grad_norm)
        skipped = self.guard.skip(grad_norm, total, self.progress, self.checkpointer.committed)
        self.checkpointer.before_update()  # the last step's snapshot must be whole before the state changes
        if not skipped:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        return total, grad_norm, skipped

    def _after_step(self) -> None:
        """Log, and checkpoint or snapshot when due (a stop's checkpoint comes after the loop, in ``train``).

        The ranks agree through one small collective at each logged step, and at every step
        while an async save is in flight; in between, a step adds only the stop vote, about every 0.1 s,
        which also carries whether a timed checkpoint is due and what the snapshots cost.
        """
        step, last = self.progress.step, self.data.total_steps
        logged = self.metrics.due(step, last)
        if logged or self.checkpointer.in_flight:
            self._agree(step, logged)
        self.metrics.advance(step)
        if step < last and not self.stop.requested:  # the last step's save, and a stop's, come after the loop
            self.checkpointer.save_if_due(step)

    def _agree(self, step: int, logged: bool) -> None:
        """The collective every rank calls at the same step: each component fills its part of the row.

        A logged step's alone is not waited for here: the next step reads it (``flush``) after its
        forward, before its backward. Its record is so written before any rank's gradients of the
        next step sync, and so before any rank commits this step's snapshot, which waits for them.
        It is waited for where a checkpoint of this step is due, an async save's status rides
        on it, snapshot replicas send this step's snapshot before the next step, or the world is one.
        """
        lr = self.optimizer.param_groups[0]["lr"]
        ours, record = self.metrics.taken(step, lr, self.progress.elapsed) if logged else ([], None)
        theirs = self.checkpointer.row() if self.checkpointer.in_flight else []
        rows = group.start_all_gather_floats(ours + theirs)

        def settle() -> None:
            got = rows()
            if record is not None:
                record([row[: len(ours)] for row in got])
                self.guard.check_mean_loss(self.metrics.loss_total, ours[0], step, self.checkpointer.committed)
            if theirs:
                self.checkpointer.settle([row[len(ours) :] for row in got])

        self.agreement = settle
        alone = self.world.world_size == 1  # nothing to wait for
        if alone or theirs or self.checkpointer.due(step) or self.checkpointer.replicas is not None:
            self.flush()

    def flush(self) -> None:
        """Read the agreement of the last logged step, if it is still travelling, and write its record (every
        rank calls it at the same point). ``train`` and ``step`` call it where due; a caller that drives
        ``step`` itself calls it to see the last step's record now."""
        settle, self.agreement = self.agreement, None
        if settle is not None:
            settle()
