"""Fault injection for the test suite: kill, crash or fill the disk at a chosen point.

Tests set ``DDP_FAULT`` in a worker's environment, e.g. ``kill:rank=1:step=7`` or
``enospc:rank=1:save=2`` (the second file rank 1 writes fails with ENOSPC),
``kill-in-snapshot:rank=1:step=7`` (rank 1 dies half-way through copying its snapshot of step 7),
``kill-in-step:rank=1:step=7`` (rank 1 dies in step 7, after its forward, before its backward),
``sigint:rank=1:at=eval`` (rank 1 is sent SIGINT as an evaluation starts; ``at=export``: in the export),
``lose-memory:rank=1:step=9:dir=D`` (rank 1 deletes folder D, its snapshots, and dies: a replaced node),
``nan:rank=1:step=12`` (rank 1's loss in step 12 is NaN),
``stop:rank=1:step=5`` (rank 1 SIGSTOPs itself: a stalled rank),
``sleep:rank=1:step=1:seconds=5`` (a slow step; without ``step``, every step is that slow), or
``log-writes:file=/tmp/w.log`` (every rank appends the names of the files it writes).
A fault fires in one attempt of an elastic job: the first (``TORCHELASTIC_RESTART_COUNT``
0) unless it says ``attempt=N``; with ``world=N``, only while the job has N ranks (a membership
change restarts an elastic job without counting an attempt). Several faults, one per attempt, are separated by ``;``:
``kill:rank=1:step=7;kill:attempt=1:rank=0:step=12`` kills twice, then runs clean.
Any fault may add ``linger=S``: its rank then takes S seconds more to leave the process
group, as a rank on a loaded host does; ``linger:rank=1:seconds=S`` does only that. Any fault
may add ``replica_delay=S``: each of its rank's exchanges of snapshot replicas then starts S
seconds late, as over a slow network.
Unset, every hook here is a no-op.
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import signal
import time

_saves_seen = 0


@functools.cache
def _spec() -> dict[str, str] | None:
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    for part in filter(None, os.environ.get("DDP_FAULT", "").split(";")):
        kind, *pairs = part.split(":")
        spec = dict(p.split("=", 1) for p in pairs)
        if spec.pop("attempt", "0") == attempt:
            spec["kind"] = kind
            return spec
    return None


def _mine(spec: dict[str, str], rank: int) -> bool:
    world = os.environ.get("WORLD_SIZE", "1")
    return spec.get("rank", str(rank)) == str(rank) and spec.get("world", world) == world


def at_step(rank: int, step: int) -> None:
    """Called after each optimizer step: kill or raise if a fault is set for this step."""
    spec = _spec()
    if spec is None or not _mine(spec, rank):
        return
    if spec["kind"] == "sleep" and "step" not in spec:  # a slow rank: every step
        time.sleep(float(spec.get("seconds", "5")))
    if spec.get("step") != str(step):
        return
    if spec["kind"] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if spec["kind"] == "raise":
        raise RuntimeError(f"injected fault on rank {rank} at step {step}")
    if spec["kind"] == "sleep":  # a slow step (a first step that compiles, loads, ...)
        time.sleep(float(spec.get("seconds", "5")))
    if spec["kind"] == "stop":  # a stalled rank: alive, holding its sockets open, answering nothing
        os.kill(os.getpid(), signal.SIGSTOP)
    if spec["kind"] in ("sigterm", "sigint"):
        os.kill(os.getpid(), signal.SIGTERM if spec["kind"] == "sigterm" else signal.SIGINT)
    if spec["kind"] == "lose-memory":  # a node replaced: its host memory (the snapshot folder) gone with it
        shutil.rmtree(spec["dir"], ignore_errors=True)
        os.kill(os.getpid(), signal.SIGKILL)


def at_phase(rank: int, phase: str) -> None:
    """Called as an evaluation starts (``eval``) and after the export's weights are written (``export``):
    ``sigterm:rank=1:at=eval`` signals rank 1 there."""
    spec = _spec()
    if spec is None or not _mine(spec, rank) or spec.get("at") != phase:
        return
    if spec["kind"] in ("sigterm", "sigint"):
        os.kill(os.getpid(), signal.SIGTERM if spec["kind"] == "sigterm" else signal.SIGINT)


def in_snapshot(rank: int, step: int) -> None:
    """Called half-way through copying a snapshot: ``kill-in-snapshot`` SIGKILLs the rank there."""
    spec = _spec()
    if spec is not None and spec["kind"] == "kill-in-snapshot" and _mine(spec, rank) and spec.get("step") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def in_step(rank: int, step: int) -> None:
    """Called in optimizer step ``step`` after the first forward, before its backward: ``kill-in-step`` SIGKILLs
    the rank there, before it writes the record of the step before (``Trainer.flush``)."""
    spec = _spec()
    if spec is not None and spec["kind"] == "kill-in-step" and _mine(spec, rank) and spec.get("step") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def before_join(rank: int) -> None:
    """Called before a rank joins the process group: ``stall-join`` keeps it away (a hung start)."""
    spec = _spec()
    if spec is not None and spec["kind"] == "stall-join" and _mine(spec, rank):
        time.sleep(float(spec.get("seconds", "600")))


def before_save_write(rank: int, path: os.PathLike | str) -> None:
    """Called before each file write: log it, or simulate a full disk or a crash mid-save."""
    global _saves_seen
    spec = _spec()
    if spec is None or not _mine(spec, rank):
        return
    if spec["kind"] == "log-writes":
        with open(spec["file"], "a") as f:
            f.write(f"{rank}\t{os.path.basename(path)}\n")
        return
    _saves_seen += 1
    if _saves_seen < int(spec.get("save", "1")):
        return
    if spec["kind"] == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    if spec["kind"] == "kill-in-save":
        os.kill(os.getpid(), signal.SIGKILL)


def before_exchange(rank: int) -> None:
    """Called before each exchange of snapshot replicas (``ddp.replicas``): ``replica_delay=S`` delays it."""
    spec = _spec()
    if spec is not None and _mine(spec, rank) and "replica_delay" in spec:
        time.sleep(float(spec["replica_delay"]))


def before_leave(rank: int) -> None:
    """Called before a rank leaves the process group: ``linger`` slows its leaving."""
    spec = _spec()
    if spec is None or not _mine(spec, rank):
        return
    seconds = spec.get("seconds") if spec["kind"] == "linger" else spec.get("linger")
    if seconds is not None:
        time.sleep(float(seconds))


def perturb_reloaded(rank: int, model) -> None:
    """Nudge one rank's reloaded weights, so that tests can prove verify catches it."""
    spec = _spec()
    if spec is None or spec["kind"] != "perturb" or not _mine(spec, rank):
        return
    import torch

    with torch.no_grad():
        next(model.parameters()).add_(float(spec.get("by", "1e-3")))


def poison_loss(rank: int, step: int, loss):
    """``nan:rank=R:step=S``: rank R's loss in optimizer step S becomes NaN, as a diverging run's does."""
    spec = _spec()
    if spec is None or spec["kind"] != "nan" or not _mine(spec, rank) or spec.get("step") != str(step):
        return loss
    return loss * float("nan")
