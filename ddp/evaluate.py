"""Evaluation on the held-out split: when it is due, and the task's metrics over every rank's share."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ddp import faults, group
from ddp.config import Config, EvalConfig
from ddp.data import eval_batch_count, eval_batches
from ddp.errors import ConfigError
from ddp.metrics import METRICS, StepMetrics
from ddp.stopping import StopSignals
from ddp.task import Task, to_device


class Evaluator:
    """Scores the task's ``val_data``: at each epoch's end, every ``--eval-every`` steps, and once at the end."""

    def __init__(self, task: Task, cfg: Config, world: group.World, dtype: torch.dtype, metrics: StepMetrics) -> None:
        self.task, self.cfg, self.world, self.dtype, self.metrics = task, cfg, world, dtype, metrics
        self.collective_forward = cfg.dist.strategy == "fsdp"  # FSDP's forward gathers shards: every rank runs it
        self.evaluated = -1  # the step of the last evaluation
        self.best = Best(cfg.eval)

    def restore(self, records: Iterable[dict], step: int) -> None:
        """Resume at ``step`` from rank 0's eval records of this run up to it (``StepMetrics.resume``), in one pass:
        the best so far, and whether ``step`` itself was evaluated (a relaunch of a finished run evaluates it once)."""
        error, evaluated = None, False
        try:
            for r in records:
                self.best.update(r["step"], r)
                evaluated = evaluated or r["step"] == step
        except ConfigError as e:  # on rank 0 alone, which holds the records: every rank must raise it
            error = str(e)
        mine = (error, evaluated, self.best.step, self.best.value, self.best.stale)
        error, evaluated, self.best.step, self.best.value, self.best.stale = group.broadcast_object(mine, src=0)
        if error is not None:
            raise ConfigError(f"{error} (in the records of {METRICS} this run resumes)")
        self.best.improved = False
        if evaluated:
            self.evaluated = step

    def due(self, step: int, epoch_ended: bool = False, last: bool = False) -> bool:
        """Whether ``step`` is evaluated: an epoch ended there, it is a multiple of ``--eval-every``, or the last;
        never twice."""
        every = self.cfg.eval.eval_every
        return step != self.evaluated and (epoch_ended or last or bool(every and step % every == 0))

    @torch.no_grad()
    def run(self, model: nn.Module, step: int, stop: StopSignals | None = None) -> dict[str, float]:
        """The task's metrics on the held-out split, each rank taking every N-th sample; logged and recorded.

        With ``stop``, the ranks agree between batches whether a stop signal came: if one did, the evaluation
        ends there, unrecorded ({}).
        """
        self.evaluated = step
        if self.task.val_data is None:
            return {}
        start = time.perf_counter()
        model.eval()
        sums = self._sums(model, stop, step)
        model.train()
        if sums is None:
            return {}
        total: dict[str, float] = {}
        for part in group.all_gather_objects(sums):  # every rank sums the same dicts, in rank order
            for key, value in part.items():
                total[key] = total.get(key, 0.0) + value
        if not total.get("count"):
            return {}  # an empty held-out split: nothing to report
        count = int(total["count"]) if "count" in total else None  # before finish_metrics, which may take it
        means = self.task.finish_metrics(total)
        held_out, limit = len(self.task.val_data), self.cfg.eval.eval_samples
        seconds = time.perf_counter() - start
        self.metrics.evaluated(step, means, count, min(held_out, limit or held_out), held_out, seconds)
        self.best.update(step, means)
        if self.best.improved and self.cfg.eval.keep_best:
            self.metrics.say(f"best {self.best.metric} so far: {self.best.value:.4f} at step {step}")
        if self.best.stopped:
            self.metrics.say(f"early stop: {self.best.metric} has not improved on step {self.best.step}'s "
                             f"{self.best.value:.4f} for {self.best.stale} evaluation(s) (--early-stop "
                             f"{self.best.patience})")  # fmt: skip
        return means

    def _sums(self, model: nn.Module, stop: StopSignals | None, step: int) -> dict[str, float] | None:
        """This rank's sums of the task's metrics over its share; None when the ranks agreed to stop. Rank 0
        shows its progress through an evaluation longer than a few seconds."""
        task, world, device = self.task, self.world, self.world.device
        size = max(self.cfg.data.batch_size, 1024 if isinstance(task.val_data, TensorDataset) else 0)
        seed, limit, n = self.cfg.run.seed, self.cfg.eval.eval_samples, len(task.val_data)
        every_rank = eval_batch_count(n, world.world_size - 1, world.world_size, size, limit)  # the last has fewest
        sums: dict[str, float] = {}
        done = 0
        faults.at_phase(world.rank, "eval")
        progress = _Progress(self.metrics, step, eval_batch_count(n, world.rank, world.world_size, size, limit))
        for batch in eval_batches(task, world.rank, world.world_size, size, seed, limit):
            if stop is not None and done < every_rank and stop.check():  # at a batch every rank reaches
                return None
            for key, value in task.compute_metrics(model, to_device(batch, device, self.dtype)).items():
                sums[key] = sums.get(key, 0.0) + float(value)
            done += 1
            progress.batch_done(done)
        if self.collective_forward:  # run as many forwards as rank 0, which has the most batches
            spare = next(eval_batches(task, 0, world.world_size, size, seed, limit), None)
            for _ in range(eval_batch_count(n, 0, world.world_size, size, limit) - done):
                task.compute_metrics(model, to_device(spare, device, self.dtype))  # results unused
        return sums


class Best:
    """The best evaluation so far of the monitored metric (``--keep-best``), and how many since did not improve
    on it by more than ``--early-stop-delta`` (``--early-stop``). Every rank sees the same means, so every rank's
    ``Best`` agrees without a collective."""

    def __init__(self, cfg: EvalConfig) -> None:
        self.metric, self.higher = cfg.monitored, cfg.higher_is_better
        self.delta, self.patience = cfg.early_stop_delta, cfg.early_stop
        self.step: int | None = None
        self.value: float | None = None
        self.stale = 0  # evaluations since the last improvement by more than delta
        self.improved = False  # the last evaluation is the best so far

    def update(self, step: int, means: dict[str, float]) -> None:
        """Take the evaluation of ``step``."""
        self.improved = False
        if not self.metric:
            return
        if self.metric not in means:
            said = "--keep-best" if self.metric != "loss" or not self.patience else "--early-stop (on loss)"
            raise ConfigError(f"{said}: the evaluation has no metric {self.metric!r}; it has {sorted(means)}")
        value, sign = float(means[self.metric]), 1.0 if self.higher else -1.0
        if self.value is None or sign * (value - self.value) > self.delta:
            self.stale = 0
        else:
            self.stale += 1
        if not math.isnan(value) and (self.value is None or sign * (value - self.value) > 0):
            self.step, self.value, self.improved = step, value, True

    @property
    def stopped(self) -> bool:
        """Whether ``--early-stop`` ends the run here."""
        return bool(self.patience) and self.stale >= self.patience


class _Progress:
    """Rank 0's line every ``EVERY`` seconds through a long evaluation (none for one that ends sooner)."""

    EVERY = 10.0

    def __init__(self, metrics: StepMetrics, step: int, batches: int) -> None:
        self.metrics, self.step, self.batches = metrics, step, batches
        self.start = time.perf_counter()
        self.next = self.start + self.EVERY

    def batch_done(self, done: int) -> None:
        now = time.perf_counter()
        if now >= self.next:
            self.next = now + self.EVERY
            self.metrics.say(f"eval at step {self.step}: {done:,} of {self.batches:,} batches of this rank's share "
                             f"({done / self.batches:.0%}) in {now - self.start:.0f} s")  # fmt: skip
