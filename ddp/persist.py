"""Durable checkpoints written from a snapshot in host memory, off the training thread.

``--async-save thread|process``: when a checkpoint is due, the Checkpointer takes the step's
snapshot (``ddp.snapshot``: a copy that overlaps the next forward and backward) and this module
writes the checkpoint's files from it, so training stalls for the snapshot alone. ``thread``
writes on a thread of the training process; ``process`` in a separate process that reads the
snapshot's slot from shared memory by its path, so the writing never holds the training
process's GIL. The slot is pinned until the checkpoint commits: later snapshots go to the others.

The writer process serves one job at a time over a pipe, one JSON line each way, and ends when
the pipe closes (its trainer ended, or was killed: then it finishes the file under way, which
lands only in a ``.tmp-`` folder that the next start removes).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddp import snapshot
from ddp.checkpoint_files import TRAIN, rank_files, write_file
from ddp.errors import CheckpointError


def slot_state(data: Path, record: dict) -> Any:
    """The state a snapshot slot holds, its tensors read in place from ``data`` (mapped, not copied).

    Each tensor gets its own mapping: views of one mapping would share one storage, and
    ``torch.save`` writes a tensor's whole storage.
    """
    tensors = []
    for place in record["places"]:
        offset, dtype, shape = place[:3]
        dt = getattr(torch, dtype)
        count = int(np.prod(shape, dtype=np.int64))
        if count == 0:
            tensors.append(torch.empty(shape, dtype=dt))
            continue
        raw = np.memmap(data, dtype=np.uint8, mode="c", offset=offset, shape=(count * dt.itemsize,))
        tensors.append(snapshot.shaped(torch.frombuffer(raw, dtype=dt), place))
    return snapshot.unflatten(record["meta"], tensors)


def write_from_slot(job: dict) -> dict[str, dict]:
    """Write this rank's files of a checkpoint from a snapshot slot; {file name: its manifest entry}."""
    replicated, own, _ = slot_state(Path(job["data"]), job["record"])
    replicated[TRAIN] = {**replicated[TRAIN], "config": job["config"]}  # a snapshot leaves the run's config out
    tmp = Path(job["tmp"])
    tmp.mkdir(parents=True, exist_ok=True)
    files = rank_files(replicated, own, job["rank"], job["world_size"])
    return {name: write_file(tmp / name, obj) for name, obj in files.items()}


def outcome(write: Callable[[], dict[str, dict]]) -> dict:
    """``{"files": write()'s manifest entries, "error": None}``, or the error it raised (a save's result)."""
    try:
        return {"files": write(), "error": None}
    except (OSError, CheckpointError) as e:
        return {"files": {}, "error": e}


class Writer:
    """Writes one checkpoint at a time off the training thread: on a thread, or through a writer process."""

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.result: dict = {}
        self.process: subprocess.Popen | None = None

    def start(self, write: Callable[[], dict[str, dict]], ready: threading.Event | None = None) -> None:
        """Run ``write`` on a thread once ``ready`` is set (the snapshot's copy is complete); ``result`` then
        holds ``{"files": its manifest entries, "error": None or the error}``."""
        self.result = {}
        self.thread = threading.Thread(target=self._run, args=(write, ready), name="ddp-persist", daemon=True)
        self.thread.start()

    def from_slot(self, job: dict, mode: str) -> Callable[[], dict[str, dict]]:
        """The write of ``job`` (``write_from_slot``'s) in this process (``thread``) or the writer process."""
        return (lambda: write_from_slot(job)) if mode == "thread" else (lambda: self._in_process(job))

    @property
    def busy(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def join(self) -> dict:
        """Wait for the write under way; its result."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        return self.result

    def _run(self, write: Callable[[], dict[str, dict]], ready: threading.Event | None) -> None:
        if ready is not None:
            ready.wait()
        self.result = outcome(write)

    def _in_process(self, job: dict) -> dict[str, dict]:
        if self.process is None or self.process.poll() is not None:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ddp.persist"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
        try:
            record = base64.b64encode(snapshot.meta_bytes(job["record"])).decode()
            self.process.stdin.write(json.dumps({**job, "record": record}) + "\n")
            self.process.stdin.flush()
            reply = self.process.stdout.readline()
        except OSError as e:
            raise CheckpointError(f"the checkpoint writer process (--async-save process) failed: {e}") from None
        if not reply:
            code = self.process.wait()
            raise CheckpointError(f"the checkpoint writer process (--async-save process) ended with exit {code}")
        answer = json.loads(reply)
        if answer.get("error"):
            raise CheckpointError(answer["error"])
        return answer["files"]

    def close(self) -> None:
        """Wait for the write under way; end the writer process."""
        self.join()
        if self.process is not None:
            self.process.stdin.close()
            self.process.wait()
            self.process = None


def serve() -> None:
    """The writer process: one job per line on stdin, one answer per line on stdout, until stdin closes.

    Signals meant for the trainer (Ctrl-C reaches the whole process group) are ignored: the trainer
    answers them by waiting for this write, then stopping.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)
    trainer = os.getppid()
    for line in sys.stdin:
        if os.getppid() != trainer:  # the trainer died with this job queued: nobody will commit it
            break
        try:
            job = json.loads(line)
            job["record"] = snapshot.meta_record(base64.b64decode(job["record"]))
            answer = {"files": write_from_slot(job), "error": None}
        except (OSError, CheckpointError, ValueError, KeyError) as e:
            answer = {"files": {}, "error": str(e)}
        try:
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()
        except BrokenPipeError:  # the trainer died while this file was written: it lands in a .tmp- folder only
            break
    os._exit(0)


if __name__ == "__main__":
    serve()
