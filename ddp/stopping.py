"""Stopping on a signal: SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C), agreed by every rank.

The handler only records the signal. Every rank learns of a signal on any rank at the
same step, through a non-blocking all-reduce that each step starts and the next reads
(long finished by then, so no step waits for it): the ranks stop together within one
step of the signal, whatever ``--log-every`` is, save a checkpoint and exit 0. Outside
the steps (an evaluation, the final export and verify) the ranks agree between batches and
between phases (``check``); the last step's checkpoint is durable before either begins. A second
SIGINT exits at once. Under torchrun a Ctrl-C reaches the launcher, which forwards one
SIGINT to every worker and kills them 30 s later.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from ddp import group


class StopSignals:
    """This rank's record of a stop signal, and the ranks' agreement on one."""

    def __init__(self, world: group.World) -> None:
        self.world = world
        self.received = 0  # the signal number this rank received; set by the handler only
        self.requested = False  # set when any rank was signalled, at the same step on every rank
        self.name = ""  # the signal the ranks agreed to stop on
        self.vote: tuple[torch.Tensor, Any] | None = None  # the all-reduce the last step started

    def agree(self) -> bool:
        """Called by every rank at the end of every step: whether the ranks stop now."""
        if self.world.world_size == 1:
            self._stop_on(self.received)
            return self.requested
        if self.vote is not None:
            flag, work = self.vote
            work.wait()
            self._stop_on(int(flag.item()))
        flag = torch.tensor([self.received], dtype=torch.int32, device=group.control_device())
        self.vote = (flag, dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True))
        return self.requested

    def check(self) -> bool:
        """Called by every rank at the same point outside the step loop (between evaluation batches, between the
        export's phases): whether any rank was signalled. One blocking all-reduce of one number."""
        self.finish()
        if self.world.world_size == 1:
            self._stop_on(self.received)
            return self.requested
        flag = torch.tensor([self.received], dtype=torch.int32, device=group.control_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self._stop_on(int(flag.item()))
        return self.requested

    def _stop_on(self, signum: int) -> None:
        if signum and not self.requested:
            self.requested, self.name = True, signal.Signals(signum).name

    def finish(self) -> None:
        """Wait for the agreement still in flight, so that no collective is left open after training."""
        if self.vote is not None:
            self.vote[1].wait()
            self.vote = None

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.received:
            print(f"{self.world.prefix()} second SIGINT: exiting now, without a checkpoint", file=sys.stderr)
            os._exit(130)
        self.received = signum

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """The handlers of SIGTERM and SIGINT for a block (training); the previous ones after it."""
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            # Drop the handler's reference, so the trainer (and DDP's hold on the process
            # group) is freed before interpreter shutdown, where freeing gloo threads aborts.
            for s, handler in previous.items():
                signal.signal(s, handler)
