"""What the benchmarks share: launching, stepping a Trainer as ``ddp.train`` does, and paired statistics.

Ratios are taken side by side: within one repeat, alternating the order, so that a
host's slow spells hit both sides alike; the median and quartiles over repeats are
reported, and ``best`` (the fastest of one over the fastest of the other) beside them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ddp.group import spawn
from ddp.metrics import ProgressDisplay
from ddp.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def launch(fn: Callable[..., Any], nproc: int, *args: Any) -> Any:
    """Run ``fn(*args)`` on ``nproc`` gloo ranks, as the tests do (``ddp.group.spawn``); rank 0's result.

    The workers fork from a server that imported the benchmark (and torch) once: no figure here times a start,
    and a launch then costs 0.2 s of CPU instead of 3 (``make test`` runs ``bench.py --quick``)."""
    return spawn(fn, nproc, *args, start_method="forkserver")[0]


# ---- stepping ------------------------------------------------------------------------


def timed(step: Callable[[], None], steps: int, warmup: int) -> float:
    """Seconds for ``steps`` calls of ``step``, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - start


def next_batch(holder: list):
    """The next batch of ``holder = [iterator, loader]``, starting a new pass when one ends."""
    try:
        return next(holder[0])
    except StopIteration:
        holder[0] = iter(holder[1])
        return next(holder[0])


def quiet(trainer: Trainer) -> Trainer:
    """A trainer whose progress display prints nothing (its logging steps still agree and log metrics)."""
    trainer.metrics.display = ProgressDisplay(trainer.cfg.log.log_every, trainer.world.prefix(), enabled=False)
    ckpt = trainer.checkpointer
    ckpt.say = lambda _: None
    if ckpt.snapshots is not None:
        ckpt.snapshots.say = ckpt.say
    return trainer


def trainer_step(trainer: Trainer) -> Callable[[], None]:
    """One optimizer step exactly as ``ddp.train`` takes it (``Trainer.step``), on batches of
    ``trainer.data.loader``, which a benchmark may replace; passes over it follow one another."""
    holder = [iter(trainer.data.loader), trainer.data.loader]

    def step() -> None:
        trainer.step([next_batch(holder) for _ in range(trainer.cfg.optim.grad_accum)])

    return step


# ---- statistics ----------------------------------------------------------------------


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def quartiles(xs: list[float]) -> dict:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"median": median(xs), "q1": q[0], "q3": q[2]}


def paired(raw: dict, num, den) -> dict:
    """The ratio num/den per repeat (taken side by side): median and quartiles."""
    return quartiles([n / d for n, d in zip(raw[num], raw[den], strict=True)])


def paired_ratio(t: dict, num, den) -> dict:
    """``paired``, and ``best``: the fastest of one over the fastest of the other. Where a disk
    has slow spells unrelated to what is measured, the least disturbed figure of each."""
    return {**paired(t, num, den), "best": min(t[num]) / min(t[den])}


def ratio_text(v: dict) -> str:
    return f"{v['median']:.2f} ({v['q1']:.2f}–{v['q3']:.2f})"


def best_text(v: dict) -> str:
    return f"{ratio_text(v)}, best {v['best']:.2f}"


def short(v) -> str:
    return f"{v['median']:.3g} [{v['q1']:.3g}-{v['q3']:.3g}]" if isinstance(v, dict) else f"{v:,.3g}"
