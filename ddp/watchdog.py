"""A rank that stops answering is named, not waited on forever: timeouts, a roll call, the flight recorder.

Until the first step is done, collectives wait ``--startup-timeout`` (joining, compiling and
resuming are slow); then every rank meets once and the timeout becomes ``--timeout``; it goes
back to the long one for the final save, export and verify. When a collective times out, every
rank still running answers a roll call in torchrun's store, which outlives every rank, so that
each names the ranks that did not answer. The flight recorder keeps each rank's last
collectives, for ``torchfrtrace``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist

from ddp import group
from ddp.config import Config, DistConfig
from ddp.errors import DistributedError, first_line

FLIGHT_RECORDER = "flight-recorder"
"""The folder of ``--out`` the flight recorder dumps into."""
FR_PREFIX = "rank_"
"""The flight recorder's dump of rank r is ``<dumps>/rank_<r>``, as ``torchfrtrace <dumps> -p rank_`` reads them."""


def enable_flight_recorder(cfg: Config) -> None:
    """Before joining the group: record each rank's last 2000 collectives, and dump them into
    ``<out>/flight-recorder`` on a timeout; the user's own settings of these variables win.

    NCCL's watchdog dumps by itself on a timeout (PyTorch's default error handling, 3, lets
    it; 1 would not). Gloo has no watchdog: ``dump_flight_recorder`` writes its record when
    a collective fails.
    """
    folder, backend = cfg.run.out_dir / FLIGHT_RECORDER, group.resolve_backend(cfg.dist.backend)
    # torch 2.7 renamed the NCCL-only variables for every backend; an old name set on a newer torch only warns
    renamed = hasattr(torch._C._distributed_c10d, "_dump_fr_trace")
    buffer, dump = ("TORCH_FR_BUFFER_SIZE", "TORCH_FR_DUMP_TEMP_FILE") if renamed else (
        "TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE")  # fmt: skip
    os.environ.setdefault(buffer, "2000")
    os.environ.setdefault(dump, str(folder / FR_PREFIX))
    os.environ.setdefault("TORCH_FR_DUMP_TEMP_FILE", os.environ[dump])  # where dump_flight_recorder writes
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
        Path(os.environ[dump]).parent.mkdir(parents=True, exist_ok=True)  # the watchdog creates no folder


def dump_flight_recorder(world: group.World) -> Path | None:
    """This rank's record of its collectives, written where ``torchfrtrace`` reads it; the file, or None (no
    recorder, or the dump failed)."""
    prefix = os.environ.get("TORCH_FR_DUMP_TEMP_FILE")
    if not prefix or int(os.environ.get("TORCH_FR_BUFFER_SIZE", "0")) <= 0 or world.backend == "nccl":
        return None  # NCCL's watchdog dumps its own
    path = Path(f"{prefix}{world.rank}")
    try:
        from torch._C._distributed_c10d import _dump_fr_trace

        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_dump_fr_trace())
        return path
    except (ImportError, RuntimeError, OSError):
        return None


def roll_call(world: group.World, step: int, wait: float = 10.0) -> dict[int, int] | None:
    """Called by every rank still running after a collective failed: {rank: its step} of the ranks that answer
    within ``wait`` seconds, through the store; None where the store does not answer either.

    A stalled rank (stopped, deadlocked in user code, on a host that vanished with its
    sockets open) never answers; the others all do, since they all wait in the collective
    it did not join, and their timeouts end within moments of each other.
    """
    if world.roll_call is None or world.world_size == 1:
        return None
    store, scope = world.roll_call
    key = f"ddp/roll-call/{scope}/"
    try:
        store.set_timeout(datetime.timedelta(seconds=wait))
        store.set(f"{key}{world.rank}", str(step))
        deadline = time.monotonic() + wait
        while True:
            answered = [r for r in range(world.world_size) if store.check([f"{key}{r}"])]
            if len(answered) == world.world_size or time.monotonic() > deadline:
                return {r: int(store.get(f"{key}{r}")) for r in answered}
            time.sleep(0.2)
    except (RuntimeError, dist.DistError):
        return None


class _Where(Protocol):
    step: int


class Watchdog:
    """This rank's timeouts through a run, and the error that names a stalled rank."""

    def __init__(self, world: group.World, cfg: DistConfig) -> None:
        self.world, self.cfg = world, cfg
        self.first_step: int | None = None  # the step after which the short --timeout applies

    @contextlib.contextmanager
    def watching(self, progress: _Where, last_saved: Callable[[], int | None]) -> Iterator[None]:
        """The training loop: a collective that times out raises the error of ``stalled`` instead.

        ``last_saved()``: the newest checkpoint's step (or None), for the error's advice.
        """
        self.first_step = progress.step + 1
        try:
            yield
        except RuntimeError as e:
            if str(e).startswith("DataLoader timed out"):  # the rank's own workers, not a collective
                raise DistributedError(
                    f"rank {self.world.rank}: after step {progress.step} its DataLoader workers delivered no batch "
                    f"({first_line(e)}, the longer of --timeout and --startup-timeout): a worker is stuck (a read "
                    "that never returns, a deadlock); run with --workers 0 to see where, or raise the timeouts for "
                    "a dataset this slow"
                ) from e
            if not group.is_timeout(e):  # a rank that died closes its connections: torchrun names it
                raise
            raise self.stalled(e, progress.step, last_saved()) from e
        group.set_timeout(max(self.cfg.startup_timeout, self.cfg.timeout))  # the final save and export may be slow

    def stepped(self, step: int) -> None:
        """After each step: once every rank is past the first, a long wait is a stalled rank."""
        if step == self.first_step:
            group.barrier()
            group.set_timeout(self.cfg.timeout)

    def stalled(self, e: RuntimeError, step: int, last: int | None) -> Exception:
        """The error of a failed collective, naming the ranks that did not arrive (``roll_call``)."""
        n, timeout = self.world.world_size, self.cfg.timeout
        answered = roll_call(self.world, step, wait=min(10.0, max(2.0, timeout / 2)))
        if answered is not None and len(answered) == n:
            return e  # every rank is here: not a stalled one
        then = f"a relaunch (or --max-restarts) resumes from step {last}" if last else "no checkpoint was saved yet"
        if answered is None:
            return DistributedError(
                f"after step {step} a collective failed ({first_line(e)}) and the store did not answer a roll "
                f"call either: the rank hosting it (rank 0, or torchrun's agent) is probably gone; {then}"
            )
        missing = [r for r in range(n) if r not in answered]
        dump = dump_flight_recorder(self.world)
        record = f"; this rank's flight recorder: {dump} (docs/troubleshooting.md: torchfrtrace)" if dump else ""
        return DistributedError(
            f"after step {step}: rank(s) {missing} did not arrive at a collective within --timeout {timeout:g} s: "
            f"stalled (stopped, deadlocked, or on a host gone with its connections open); rank(s) "
            f"{sorted(answered)} answered and stop here; {then}{record}"
        )
