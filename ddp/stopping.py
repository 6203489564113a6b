"""Stopping on a signal: SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C), agreed by every rank.

The handler only records the signal. Every rank learns of a signal on any rank at the same
step through a non-blocking all-reduce that one step starts and a later one reads. A vote is
a collective of its own (on gloo about 0.5 ms, a quarter of a small model's step), so the
ranks vote every ``interval`` steps: the fewest steps that last ``VOTE_SECONDS``, measured
and agreed at each vote, at most ``MAX_INTERVAL``. The ranks stop together, on the same step,
within two intervals of the signal (about 0.2 s, or two steps where a step takes longer),
whatever ``--log-every`` is; they save a checkpoint and exit 0. Other decisions that must not
wait for a logged step ride on the same vote (``riders``: a timed checkpoint is due, the cost of
the snapshots), each agreed as its largest value over the ranks. Outside the steps (an
evaluation, the final export and verify) the ranks agree between batches and between phases
(``check``); the last step's checkpoint is durable before either begins. A second SIGINT
exits at once. Under torchrun a Ctrl-C reaches the launcher, which forwards one SIGINT to
every worker and kills them 30 s later. A worker whose launcher was killed outright (SIGKILL,
the out-of-memory killer) finds itself orphaned at the next vote and stops as on SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from ddp import group

VOTE_SECONDS = 0.1
"""The time between two votes the interval aims at: a scheduler's grace period (30 s and more) dwarfs it."""
MAX_INTERVAL = 1000
"""The most steps between two votes, however short a step."""


class StopSignals:
    """This rank's record of a stop signal, and the ranks' agreement on one."""

    def __init__(self, world: group.World) -> None:
        self.world = world
        self.received = 0  # the signal number this rank received; set by the handler only
        self.requested = False  # set when any rank was signalled, at the same step on every rank
        self.name = ""  # the signal the ranks agreed to stop on
        self.vote: tuple[torch.Tensor, Any] | None = None  # the all-reduce the last vote started
        self.next_vote = 0  # the step of the next vote: the same on every rank
        self.interval = 1  # the steps from the last vote to the next
        self.last_vote = (0, time.perf_counter())  # (step, time) of this rank's last vote
        self.agreed: list[int] | None = None  # the riders of the last vote read, until ``agree`` returns them
        # under torchrun, this worker's agent: a worker it no longer parents was orphaned (the agent was killed)
        self.agent = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None

    def agree(self, step: int, riders: Callable[[], list[int]] = list) -> list[int] | None:
        """Called by every rank at the end of every step: ``requested`` is then set where the ranks stop now.

        At a vote step, a rank reads the previous vote (the signal, the agreed interval to the next
        vote, and the riders) and starts the next, which carries its signal, the interval its steps
        suggest and ``riders()``. Returns the riders read, each the largest over the ranks and the
        same on every rank; None where no vote was read (in a world of one: this rank's, every step).
        """
        if self.world.world_size == 1:
            self._orphaned()
            self._stop_on(self.received)
            return riders()
        if step < self.next_vote:
            return None
        self._orphaned()
        proposed = self.interval  # where ``check`` read the last vote: the interval goes on
        if self.vote is not None:
            proposed = -self._read()[1]  # the MAX of the negated proposals: the smallest, so no rank waits longer
        agreed, self.agreed = self.agreed, None  # read here, or by ``check`` (an evaluation) since the last vote
        self.interval = min(proposed, 2 * self.interval)  # growing from 1 step: short runs vote often
        self.next_vote = step + self.interval
        mine = [self.received, -self._proposal(step), *riders()]
        flag = torch.tensor(mine, dtype=torch.int64, device=group.control_device())
        self.vote = (flag, dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True))
        return agreed

    def _read(self) -> list[int]:
        """The vote in flight, done: (the highest signal number of any rank, the negated smallest proposal, the
        largest value of each rider)."""
        flag, work = self.vote
        work.wait()
        self.vote = None
        read = [int(v) for v in flag.tolist()]
        self._stop_on(read[0])
        self.agreed = read[2:]
        return read

    def _proposal(self, step: int) -> int:
        """The steps that last about ``VOTE_SECONDS`` at this rank's pace since its last vote."""
        last_step, last_time = self.last_vote
        now = time.perf_counter()
        self.last_vote = (step, now)
        per_step = (now - last_time) / max(step - last_step, 1)
        return max(1, min(MAX_INTERVAL, int(VOTE_SECONDS / max(per_step, 1e-9))))

    def check(self) -> bool:
        """Called by every rank at the same point outside the step loop (between evaluation batches, between the
        export's phases): whether any rank was signalled. One blocking all-reduce of one number."""
        self.finish()
        self._orphaned()
        if self.world.world_size == 1:
            self._stop_on(self.received)
            return self.requested
        flag = torch.tensor([self.received], dtype=torch.int32, device=group.control_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self._stop_on(int(flag.item()))
        return self.requested

    def _orphaned(self) -> None:
        """A worker whose torchrun agent is gone (SIGKILLed, or killed for memory) stops as on SIGTERM, with a
        checkpoint, instead of training on unsupervised while a relaunch races it for ``--out``."""
        if self.agent is not None and not self.received and os.getppid() != self.agent:
            print(f"{self.world.prefix()} warning: torchrun's agent (pid {self.agent}) is gone: stopping as on "
                  "SIGTERM", file=sys.stderr, flush=True)  # fmt: skip
            self.received = signal.SIGTERM

    def _stop_on(self, signum: int) -> None:
        if signum and not self.requested:
            self.requested, self.name = True, signal.Signals(signum).name

    def finish(self) -> None:
        """Read the vote still in flight, so that no collective is left open after training, and a signal it
        carries stops every rank now."""
        if self.vote is not None:
            self._read()

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
