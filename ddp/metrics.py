"""What a user watches while a run trains: a progress bar or log lines, metrics.jsonl, the step figures, trackers."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ddp import trackers
from ddp.device import peak_memory_mb, peak_tflops
from ddp.errors import DDPError

METRICS = "metrics.jsonl"


class MetricsWriter:
    """Appends one JSON object per line to ``<out>/metrics.jsonl`` (rank 0 only): the log of one run.

    After a restart the log reads as if the run had never stopped: records past the step
    it resumes from (written after that checkpoint) are dropped, and ``time`` goes on from
    the training time the checkpoint recorded.
    """

    def __init__(self, out: Path, enabled: bool) -> None:
        self.path = out / METRICS
        self.enabled = enabled
        self.start = time.monotonic()
        self.offset = 0.0  # training seconds before this attempt
        self.run: str | None = None
        self.trackers: list = []  # ddp.trackers: each gets every record too

    def elapsed(self) -> float:
        """Seconds of training, this attempt's and those before it."""
        return self.offset + time.monotonic() - self.start

    def resume(self, run: str, step: int, elapsed: float) -> Iterator[dict]:
        """Continue the log of ``run`` from ``step``: later records go, the clock goes on from ``elapsed``.
        The eval records of this run up to ``step``, in order, read as they are iterated.

        The log of a run of days holds millions of records, so it is never read whole: records are in step
        order, and those past ``step`` are found from the end and cut off, with a line a power cut tore; the
        eval records are picked out of the lines as they stream by.
        """
        self.run, self.offset, self.start = run, elapsed, time.monotonic()
        if not self.enabled or not self.path.exists():
            return iter(())
        cut_after(self.path, step)
        return (r for r in records(self.path, b'"eval"') if r.get("kind") == "eval" and r.get("run") == run)

    def write(self, kind: str, at: float | None = None, **values: Any) -> None:
        """Record one event ('train' or 'eval') with its values and the training time: now, or ``at``."""
        if not self.enabled:
            return
        record = {"kind": kind, "run": self.run, **values, "time": round(self.elapsed() if at is None else at, 4)}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for tracker in self.trackers:
            tracker.log(kind, values["step"], {k: v for k, v in record.items() if k not in ("kind", "run")})

    def add(self, tracker: Any) -> None:
        """Send every record to ``tracker`` too (``ddp.trackers.Tracker``), on rank 0."""
        if self.enabled:
            self.trackers.append(tracker)

    def close(self) -> None:
        """Close every tracker."""
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def step_timing(timing: dict, device: torch.device) -> list[float]:
    """This rank's figures for ``step_figures``: its mean step, seconds of data and of steps, peak memory.

    ``timing``: this rank's seconds of steps and of data loading since the last record, and the steps counted.
    """
    return [timing["step"] / max(timing["steps"], 1), timing["data"], timing["step"], peak_memory_mb(device)]


def step_figures(ranks: list[list[float]], step_flops: float | None = None, peak: float | None = None) -> dict:
    """A logged step's figures from every rank's ``step_timing`` (gathered by the trainer's agreement): the mean
    step time, the slowest and whose, the share of it spent waiting for data, rank 0's peak memory, and the
    TFLOP/s each rank achieved (with ``mfu``, its share of the device's ``peak``).

    ``step_flops``: the FLOPs of one step on one rank (``FlopCounterMode``: recomputation included).
    """
    means = [r[0] for r in ranks]
    slowest = max(range(len(ranks)), key=lambda r: means[r])
    figures = {
        "step_time": round(sum(means) / len(means), 6),
        "step_time_max": round(means[slowest], 6),
        "slowest_rank": slowest,
        "data_time": round(sum(r[1] for r in ranks) / max(sum(r[2] for r in ranks), 1e-12), 4),
        "mem_peak_mb": round(ranks[0][3], 1),
    }
    if step_flops and figures["step_time"] > 0:
        tflops = step_flops / figures["step_time"] / 1e12
        figures["tflops"] = float(f"{tflops:.4g}")
        if peak:
            figures["mfu"] = float(f"{tflops / peak:.4g}")
    return figures


class ProgressDisplay:
    """A tqdm bar per epoch on a terminal; plain lines every ``log_every`` steps in CI and Slurm logs."""

    def __init__(self, log_every: int, prefix: str, enabled: bool) -> None:
        self.log_every, self.prefix, self.enabled = log_every, prefix, enabled
        self.terminal = enabled and sys.stderr.isatty()
        self.bar = None

    def start_epoch(self, epoch: int, steps: int) -> None:
        """A fresh bar for the ``steps`` optimizer steps this epoch will run."""
        if not self.terminal:
            return
        from tqdm import tqdm

        self.close()
        size = shutil.get_terminal_size((100, 20))  # a pty of unknown size reports 0 x 0
        desc = f"{self.prefix} epoch {epoch}"
        self.bar = tqdm(total=steps, desc=desc, unit="step", ncols=size.columns, nrows=size.lines)

    def advance(self, loss: float, samples_per_s: float, grad_norm: float = math.nan) -> None:
        """After every optimizer step: the bar moves on, showing the figures last agreed."""
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{loss:.4f}", grad_norm=f"{grad_norm:.3g}", samples_s=f"{samples_per_s:,.0f}", refresh=False
            )
            self.bar.update(1)

    def line(
        self,
        step: int,
        epoch: int,
        loss: float,
        samples_per_s: float,
        lr: float,
        grad_norm: float = math.nan,
        figures: dict | None = None,
    ) -> None:
        """A logged step's figures, once the ranks agreed on them: the bar's, or a line ending in ``figures``
        (``step_figures``)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", grad_norm=f"{grad_norm:.3g}", samples_s=f"{samples_per_s:,.0f}")
        else:
            print(
                f"{self.prefix} step {step} epoch {epoch} loss {loss:.4f} lr {lr:.4g} grad_norm {grad_norm:.4g} "
                f"{samples_per_s:,.0f} samples/s{_figures_text(figures or {})}",
                flush=True,
            )

    def message(self, text: str) -> None:
        """A line that does not break the bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(f"{self.prefix} {text}")
        else:
            print(f"{self.prefix} {text}", flush=True)

    def close(self) -> None:
        """Finish the bar."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _figures_text(f: dict) -> str:
    """``step_figures`` as the end of a log line: step time (and the slowest rank's), memory, MFU."""
    if "step_time" not in f:
        return ""
    text = f" | {1000 * f['step_time']:.1f} ms/step"
    if f["step_time_max"] > 1.1 * f["step_time"]:  # a straggler: name it
        text += f" (rank {f['slowest_rank']}: {1000 * f['step_time_max']:.1f})"
    text += f", {f['mem_peak_mb']:,.0f} MiB"
    return text + (f", mfu {100 * f['mfu']:.1f}%" if "mfu" in f else "")


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        raise DDPError(f"{path} does not exist; is {run_dir} the --out folder of a training run?")
    return list(records(path))


def records(path: Path, having: bytes = b"") -> Iterator[dict]:
    """The records of a metrics.jsonl, one line at a time; only lines ``having`` those bytes are decoded. A line
    that is not a record (torn by a power cut) is skipped."""
    with open(path, "rb") as f:
        for line in f:
            if having in line:
                record = _record(line)
                if record is not None:
                    yield record


def cut_after(path: Path, step: int) -> None:
    """Cut a metrics.jsonl after its last record of ``step`` or before, reading from the end: this takes the time
    of the lines cut, not of the log. The kept part ends with a newline, even where a power cut took it."""
    with open(path, "r+b") as f:
        size, keep = f.seek(0, os.SEEK_END), 0
        for start, line in _lines_from_end(f):
            record = _record(line)
            if record is not None and record.get("step", 0) <= step:
                keep = start + len(line) + 1
                break
        if keep == size:
            return
        if keep > size:  # the record kept is the last line, whose newline a power cut took
            f.seek(size)
            f.write(b"\n")
        else:
            f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())


def _lines_from_end(f: IO[bytes], block: int = 1 << 16) -> Iterator[tuple[int, bytes]]:
    """(its offset, the line without its newline) of each line of ``f``, the last first, read a block at a time."""
    end, head = f.seek(0, os.SEEK_END), b""  # head: the start of a line that began in an earlier block
    while True:
        start = max(0, end - block)
        f.seek(start)
        lines = (f.read(end - start) + head).split(b"\n")
        offsets = list(itertools.accumulate((len(line) + 1 for line in lines[:-1]), initial=start))
        for i in range(len(lines) - 1, 0 if start else -1, -1):
            yield offsets[i], lines[i]
        if not start:
            return
        head, end = lines[0], start


def _record(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


class StepMetrics:
    """The figures of training steps: the loss sums, the timings and FLOPs, the display, the log and the trackers.

    It takes part in the one collective of a logged step: ``taken`` gives this rank's part of
    the row (the loss sum since the last record, then ``step_timing``) and the function that
    writes the record from every rank's. Between logged steps it only adds on the device, with
    no host sync.
    """

    def __init__(self, cfg: Any, world: Any, global_batch: int, tokens_per_sample: int | None, trackers=None) -> None:
        """``cfg``: the run's ``Config``; ``trackers``: the caller's own (``ddp.trackers``), beside the flags'."""
        self.cfg, self.world, self.device = cfg, world, world.device
        self.global_batch, self.tokens_per_sample = global_batch, tokens_per_sample
        self.extra_trackers = list(trackers or [])
        self.writer = MetricsWriter(cfg.run.out_dir, world.is_main)
        self.display = ProgressDisplay(cfg.log.log_every, world.prefix(), world.is_main or cfg.log.log_all_ranks)
        self.peak = peak_tflops(self.device, cfg.optim.precision, cfg.log.peak_tflops)
        self.step_flops: float | None = None  # FLOPs of one optimizer step on this rank, counted at the first
        self.loss_sum: torch.Tensor | None = None  # this rank's losses since the last record, on its device
        self.loss_steps = 0
        self.loss_total = math.nan  # the sum over ranks of their loss sums, as of the last agreement
        self.last_loss = math.nan  # the mean over ranks and steps since the last record, as of the last agreement
        self.grad_norm = torch.zeros(())  # the last step's gradient norm, before clipping
        self.last_grad_norm = math.nan  # as of the last agreement
        self.step_epoch = 0  # the epoch the last step belonged to (the progress may have moved on)
        self.rank_timing: list[list[float]] = []  # every rank's step_timing, as of the last agreement
        self.timing = {"step": 0.0, "data": 0.0, "steps": 0}  # this rank's seconds since the last record
        self.tick = (time.monotonic(), 0)  # (time, step) the samples/s figure counts from
        self.step_end = time.perf_counter()  # when the last step's bookkeeping ended: the next step starts there

    def resume(self, run_id: str, step: int, epoch: int, elapsed: float) -> Iterator[dict]:
        """Continue ``run_id``'s log from ``step`` of ``epoch`` (``MetricsWriter.resume``) and open the trackers
        there. The log's eval records of this run up to ``step``, read as they are iterated (on rank 0; none
        elsewhere)."""
        evals = self.writer.resume(run_id, step, elapsed)
        if self.world.is_main:
            for tracker in trackers.open_all(self.cfg, self.cfg.run.out_dir, run_id, step, self.extra_trackers):
                self.writer.add(tracker)
        self.tick, self.step_end, self.step_epoch = (time.monotonic(), step), time.perf_counter(), epoch
        return evals

    def elapsed(self) -> float:
        """Seconds of training, over every attempt."""
        return self.writer.elapsed()

    @contextlib.contextmanager
    def timing_data(self) -> Iterator[None]:
        """Around the wait for a step's batches: its share of the step time (``data_time``)."""
        start = time.perf_counter()
        yield
        self.timing["data"] += time.perf_counter() - start

    def counting_flops(self, micro: int, accum: int) -> contextlib.AbstractContextManager:
        """Around the first micro-batch's forward and backward of the first step: the FLOPs of a step.

        Once: a step is the same work every time, the first micro-batch's ``accum`` times.
        """
        if self.step_flops is not None or micro != 0:
            return contextlib.nullcontext()
        return _FlopCount(self, accum)

    def stepped(self, loss: torch.Tensor, grad_norm: torch.Tensor, skipped: bool, epoch: int) -> None:
        """A step of ``epoch`` was taken (or ``skipped``): sum its loss where it is, time it."""
        if not skipped:  # summed on the device: no host sync a step
            self.loss_sum = loss.detach().double() + (0 if self.loss_sum is None else self.loss_sum)
            self.loss_steps += 1
        self.grad_norm, self.step_epoch = grad_norm, epoch
        self.timing["step"] += time.perf_counter() - self.step_end  # its data and compute, not the logging
        self.timing["steps"] += 1

    def due(self, step: int, last_step: int) -> bool:
        """Whether ``step`` is a logged step: every ``--log-every``, and the last."""
        return step % self.cfg.log.log_every == 0 or step == last_step

    def settle(self, rows: list[list[float]], grad_norm: torch.Tensor, steps: int) -> None:
        """Every rank's ``row``, in rank order, of a record of ``steps`` steps whose last gradient norm was
        ``grad_norm``: the mean loss and the step figures of that record."""
        self.loss_total = math.fsum(row[0] for row in rows)
        self.rank_timing = [row[1:] for row in rows]
        self.last_grad_norm = grad_norm.item()
        n = self.world.world_size * steps
        self.last_loss = self.loss_total / n if n else math.nan

    def advance(self, step: int) -> None:
        """After every step: the bar moves on (the figures of a logged step come with its ``record``)."""
        self.display.advance(self.last_loss, self._rate(step, time.monotonic()), self.last_grad_norm)

    def _rate(self, step: int, now: float) -> float:
        t0, s0 = self.tick
        return (step - s0) * self.global_batch / max(now - t0, 1e-9)

    def taken(self, step: int, lr: float, elapsed: float) -> tuple[list[float], Callable[[list[list[float]]], None]]:
        """A logged ``step`` ended now, at training time ``elapsed``: this rank's row for the ranks'
        agreement (its loss sum since the last record, then its ``step_timing``), and the function that,
        given every rank's row in rank order, writes the record and its line. This rank's counters start
        again for the next record now.

        The rows may be read later, while the next step computes, but before anything saves or
        evaluates a later step: the record still holds ``step``'s figures, timed as ``step`` ended.
        """
        row = [0.0 if self.loss_sum is None else self.loss_sum.item(), *step_timing(self.timing, self.device)]
        now, step_epoch, grad_norm, steps = time.monotonic(), self.step_epoch, self.grad_norm, self.loss_steps
        rate, self.tick = self._rate(step, now), (now, step)
        self.timing = {"step": 0.0, "data": 0.0, "steps": 0}
        self.loss_sum, self.loss_steps = None, 0  # the next record averages the steps after this one

        def record(rows: list[list[float]]) -> None:
            self.settle(rows, grad_norm, steps)
            figures = step_figures(self.rank_timing, self.step_flops, self.peak)
            self.display.line(step, step_epoch, self.last_loss, rate, lr, self.last_grad_norm, figures)
            tokens = {"tokens_per_s": round(rate * self.tokens_per_sample, 1)} if self.tokens_per_sample else {}
            self.writer.write("train", at=elapsed, step=step, epoch=step_epoch, loss=self.last_loss, lr=lr,
                              grad_norm=self.last_grad_norm, samples_per_s=round(rate, 1), **tokens,
                              **figures)  # fmt: skip

        return row, record

    def ready(self) -> None:
        """The step's bookkeeping (logging, saving) is over: the next step's time starts now."""
        self.step_end = time.perf_counter()

    def evaluated(
        self, step: int, means: dict[str, float], count: int | None, scored: int, held_out: int, seconds: float
    ) -> None:
        """An evaluation at ``step`` of ``scored`` of the ``held_out`` samples, which took ``seconds``: its line and
        its ``eval`` record (``eval_time``)."""
        shown = " ".join(f"{k} {v:.4f}" for k, v in means.items())
        part = (
            f" ({scored:,} of {held_out:,} held-out samples; --eval-samples 0 scores all)" if scored < held_out else ""
        )
        took = f" in {seconds:.1f} s" if seconds >= 1 else ""
        self.display.message(f"eval at step {step} (epoch {self.step_epoch}): {shown}{part}{took}")
        self.writer.write("eval", step=step, epoch=self.step_epoch, **means, count=count, samples=scored, of=held_out,
                          eval_time=round(seconds, 4))  # fmt: skip

    def say(self, text: str) -> None:
        """A line on rank 0, above the progress bar."""
        self.display.message(text)

    def close(self) -> None:
        """Finish the display and close every tracker."""
        self.display.close()
        self.writer.close()


class _FlopCount(FlopCounterMode):
    """``FlopCounterMode`` that hands the step's count to ``StepMetrics`` on exit."""

    def __init__(self, metrics: StepMetrics, accum: int) -> None:
        super().__init__(display=False)
        self.metrics, self.accum = metrics, accum

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self.metrics.step_flops = float(self.get_total_flops() * self.accum)
