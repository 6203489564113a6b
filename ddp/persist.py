"""Durable checkpoints written from a snapshot in host memory, off the training thread.

``--async-save thread|process``: when a checkpoint is due, the Checkpointer takes the step's
snapshot (``ddp.snapshot``: a copy that overlaps the next forward and backward) and this module
writes the checkpoint's files from it, so training stalls for the snapshot alone. ``thread``
writes on a thread of the training process; ``process`` in a separate process that reads the
snapshot's slot from shared memory by its path, so the writing never holds the training
process's GIL. The slot is pinned until the checkpoint commits: later snapshots go to the others.
Under FSDP the slot holds each rank's shards: DCP plans the sharded folder with every rank on a
thread, and each rank's data file is written by the same thread or process, from the slot.

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
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddp import fsdp, snapshot
from ddp.checkpoint_files import (
    HASHER,
    PRUNER,
    SHARDED,
    TRAIN,
    Worker,
    rank_files,
    shard_entries,
    write_file,
    write_parts,
)
from ddp.errors import CheckpointError


def slot_tensors(data: Path, record: dict) -> list[torch.Tensor]:
    """The tensors a snapshot slot holds, in its record's order, read in place from ``data`` (mapped, not copied).

    Each tensor gets its own mapping: views of one mapping would share one storage, and
    ``torch.save`` writes a tensor's whole storage.
    """
    return [slot_tensor(data, place) for place in record["places"]]


def slot_tensor(data: Path, place: list) -> torch.Tensor:
    """The tensor at ``place`` (offset, dtype, shape, strides) in a slot's file ``data``, mapped."""
    offset, dtype, shape = place[:3]
    dt = getattr(torch, dtype)
    count = int(np.prod(shape, dtype=np.int64))
    if count == 0:
        return torch.empty(shape, dtype=dt)
    raw = np.memmap(data, dtype=np.uint8, mode="c", offset=offset, shape=(count * dt.itemsize,))
    return snapshot.shaped(torch.frombuffer(raw, dtype=dt), place)


def slot_state(data: Path, record: dict) -> Any:
    """The state a snapshot slot holds, its tensors read in place from ``data``."""
    return snapshot.unflatten(record["meta"], slot_tensors(data, record))


def write_from_slot(job: dict) -> dict[str, dict]:
    """Write this rank's files of a checkpoint from a snapshot slot; {file name: its manifest entry}."""
    replicated, own, _ = slot_state(Path(job["data"]), job["record"])
    return _write_files(job, replicated, own)


def _write_files(job: dict, replicated: dict, own: dict) -> dict[str, dict]:
    replicated[TRAIN] = {**replicated[TRAIN], "config": job["config"]}  # a snapshot leaves the run's config out
    tmp = Path(job["tmp"])
    tmp.mkdir(parents=True, exist_ok=True)
    files = rank_files(replicated, own, job["rank"], job["world_size"])
    return {name: write_file(tmp / name, obj) for name, obj in files.items()}


def write_shards_from_slot(
    job: dict, layout: dict, process_group: Any, send: Callable[[dict], Any] | None
) -> dict[str, dict]:
    """Called by every rank (FSDP): write this rank's files of a checkpoint from a snapshot slot; {file name: its
    manifest entry}.

    The slot's shards, rewrapped as ``layout``'s DTensors (not copied), go through DCP, which plans them with every
    rank on ``process_group`` and writes ``sharded/``. ``send``: the writer process writes this rank's data file and
    other files (``--async-save process``); without it, this thread does.
    """
    from ddp import dcp  # torch.distributed.checkpoint: imported when used (see ddp/fsdp.py)

    data = Path(job["data"])
    tensors = slot_tensors(data, job["record"])
    replicated, own, local = snapshot.unflatten(job["record"]["meta"], tensors)
    folder = Path(job["tmp"]) / SHARDED
    if send is None:
        writer = dcp.FileSystemWriter(folder)
    else:
        places = {t.data_ptr(): place for t, place in zip(tensors, job["record"]["places"], strict=True) if t.numel()}
        writer = dcp.SlotWriter(folder, data, places, send)
    dcp.save_sharded(fsdp.rewrap(layout, local), folder, process_group, writer)
    written = shard_entries(folder, None if send is None else writer.entries)  # hashed as the process wrote them
    written.update(_write_files(job, replicated, own) if send is None else send({**job, "kind": "files"}))
    return written


def write_distcp(job: dict) -> tuple[list[list[int]], dict]:
    """The writer process's part of ``dcp.SlotWriter``: one rank's DCP data file, from the slot's file ``data``;
    ([offset, length] of each part, the file's manifest entry)."""
    data = Path(job["data"])

    def part(p: dict) -> Any:
        if "bytes" in p:
            return base64.b64decode(p["bytes"])
        if "empty" in p:
            return torch.empty(p["empty"][1], dtype=getattr(torch, p["empty"][0]))
        return slot_tensor(data, p["place"])

    return write_parts(Path(job["path"]), (part(p) for p in job["parts"]))


JOBS = {"files": write_from_slot, "distcp": write_distcp}
"""What the writer process does, by a job's ``kind``."""


def outcome(write: Callable[[], dict[str, dict]]) -> dict:
    """``{"files": write()'s manifest entries, "error": None}``, or the error it raised (a save's result)."""
    try:
        return {"files": write(), "error": None}
    except (OSError, CheckpointError) as e:
        return {"files": {}, "error": e}


WRITER = Worker("ddp-persist")
"""The thread that writes checkpoints off the training thread: one per process, for its whole life."""


class Writer:
    """Writes one checkpoint at a time off the training thread: on a thread, or through a writer process."""

    def __init__(self) -> None:
        for worker in (WRITER, HASHER, PRUNER):  # now, with the Checkpointer: before any DataLoader forks (Worker)
            worker.start()
        self.future: Future | None = None  # the write under way
        self.result: dict = {}
        self.process: subprocess.Popen | None = None

    def start(self, write: Callable[[], dict[str, dict]], ready: threading.Event | None = None) -> None:
        """Run ``write`` on the thread once ``ready`` is set (the snapshot's copy is complete); ``result`` then
        holds ``{"files": its manifest entries, "error": None or the error}``."""
        self.result = {}
        self.future = WRITER.submit(self._run, write, ready)

    def from_slot(self, job: dict, mode: str) -> Callable[[], dict[str, dict]]:
        """The write of ``job`` (``write_from_slot``'s) in this process (``thread``) or the writer process."""
        return (lambda: write_from_slot(job)) if mode == "thread" else (lambda: self.request({**job, "kind": "files"}))

    def shards_from_slot(self, job: dict, mode: str, layout: dict, process_group: Any) -> Callable[[], dict[str, dict]]:
        """The write of ``job`` under FSDP (``write_shards_from_slot``'s), its files written in this process
        (``thread``) or the writer process."""
        send = None if mode == "thread" else self.request
        return lambda: write_shards_from_slot(job, layout, process_group, send)

    @property
    def busy(self) -> bool:
        return self.future is not None and not self.future.done()

    def join(self) -> dict:
        """Wait for the write under way; its result."""
        if self.future is not None:
            future, self.future = self.future, None
            future.result()  # raises what ``outcome`` does not turn into a result
        return self.result

    def _run(self, write: Callable[[], dict[str, dict]], ready: threading.Event | None) -> None:
        if ready is not None:
            ready.wait()
        self.result = outcome(write)

    def request(self, job: dict) -> Any:
        """What the writer process answers to ``job`` (a ``JOBS`` kind), started at the first."""
        if self.process is None or self.process.poll() is not None:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ddp.persist"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
        try:
            if "record" in job:
                job = {**job, "record": base64.b64encode(snapshot.meta_bytes(job["record"])).decode()}
            self.process.stdin.write(json.dumps(job) + "\n")
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
        return answer["result"]

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
            if "record" in job:
                job["record"] = snapshot.meta_record(base64.b64decode(job["record"]))
            answer = {"result": JOBS[job["kind"]](job), "error": None}
        except (OSError, CheckpointError, ValueError, KeyError) as e:
            answer = {"result": None, "error": str(e)}
        try:
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()
        except BrokenPipeError:  # the trainer died while this file was written: it lands in a .tmp- folder only
            break
    os._exit(0)


if __name__ == "__main__":
    serve()
