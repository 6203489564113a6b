"""A copy of each rank's snapshot in the host memory of a rank on another node (``--snapshot-replicas 1``).

Under FSDP every rank holds only its own shards, so a node replaced with its memory would send the
whole job back to disk. With replicas, rank r's snapshots are also kept by its partner: the rank
at the same place on the next node (rank r + ranks per node, modulo the world), as Gemini places
them. A restarted rank whose own snapshots are gone is sent them back by its partner, whole (its
RNG and data position too), so the run still continues bitwise; under DDP this also spares the
reseeded RNG that a copy from any other rank would give.

The transfers run on a thread, over a gloo group of their own, while training goes on. Every
rank hands the thread one job per snapshot step, an empty one where it took none (a full
``/dev/shm``), so that the sends and receives along the ring always pair up. A job is three
exchanges: a header (step, sizes) to the partner; the partner's answer (whether it has room);
then the bytes. A snapshot's exchange is complete before the next optimizer step, as its copy
is: a node lost at any later moment finds it on the partner, and the job recomputes at most one
step. Waiting for it, where the next forward and backward did not cover it, counts in the
snapshot's cost (which ``--snapshot-every auto`` keeps under 2 %).
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from ddp import faults, group, snapshot

HEADER, ANSWER, DATA, META = range(1, 5)  # message tags, one per kind: sends and receives pair by them


def partners(nodes: list[str]) -> list[int] | str:
    """Each rank's partner, given each rank's node: the rank at the same place among the next node's ranks; or
    why there can be none (one node, or nodes of different sizes)."""
    by_node: dict[str, list[int]] = {}
    for rank, node in enumerate(nodes):
        by_node.setdefault(node, []).append(rank)
    lists = list(by_node.values())  # in order of each node's first rank
    if len(lists) < 2:
        return "every rank is on one node, which a partner on it would be lost with"
    if len({len(ranks) for ranks in lists}) > 1:
        return f"the nodes run different numbers of ranks ({', '.join(str(len(r)) for r in lists)})"
    partner = [0] * len(nodes)
    for i, ranks in enumerate(lists):
        for place, rank in enumerate(ranks):
            partner[rank] = lists[(i + 1) % len(lists)][place]
    return partner


def _parts(data: torch.Tensor, meta: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
    """What a snapshot's transfer sends, each with its tag: its data (none for a state without tensors), its meta
    record."""
    return [(t, tag) for t, tag in ((data, DATA), (meta, META)) if t.numel()]


class Replicas:
    """This rank's side of the ring: it sends its snapshots to ``partner`` and keeps those of ``source``."""

    def __init__(self, snaps: snapshot.Snapshots, partner: list[int], pg: Any, say=print) -> None:
        me = group.rank()
        self.snaps, self.partner_of, self.pg, self.say = snaps, partner, pg, say
        self.partner, self.source = partner[me], partner.index(me)
        self.store = snapshot.Snapshots(snaps.root.parent, None, self.source, snaps.out, say)  # the source's copies
        self.store.off = (f"replicas of rank {self.source}'s snapshots are off: {{}}; if its node is lost, the job "
                          "resumes from disk")  # fmt: skip
        self.jobs: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None
        self.exchanged: threading.Event | None = None  # set when the last job's exchange is over
        self.broken: BaseException | None = None  # a failed transfer: the ring is not used again

    @classmethod
    def plan(cls, snaps: snapshot.Snapshots, timeout_s: float | None, say=print) -> Replicas | None:
        """Called by every rank: the ring of partners, one per rank on another node (torchrun's ``GROUP_RANK``
        names the node); None, said once, where there can be none."""
        nodes = group.all_gather_objects(os.environ.get("GROUP_RANK", socket.gethostname()))
        partner = partners(nodes)
        if isinstance(partner, str):
            say(f"note: --snapshot-replicas 1 is off: {partner}")
            return None
        say(f"snapshot replicas: each rank's snapshots are also kept by a rank on the next node ({len(set(nodes))} "
            f"nodes; rank 0's by rank {partner[0]}): as much host memory again per rank")  # fmt: skip
        return cls(snaps, partner, group.side_group(timeout_s), say)

    def open(self, run_id: str) -> None:
        """Use run ``run_id``'s folder for the source's copies (after ``Snapshots.open``)."""
        self.store.open(run_id, clean=False, name=f"rank-{self.source}-replica")

    # -- while training --

    def send(self, step: int) -> None:
        """Called by every rank after each snapshot step's ``take``: send the snapshot of ``step`` to the partner
        (nothing where this rank took none) and keep the source's, on the thread."""
        job = None
        pending = self.snaps.pending
        if pending is not None and pending[1] == step:
            slot, _, record = pending
            read = self.snaps.readers[slot] = threading.Event()
            job = (self.snaps.data(slot, record["size"]), record, self.snaps.done, read)  # the slot's bytes, mapped
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="ddp-replicas", daemon=True)
            self.thread.start()
        self.exchanged = threading.Event()
        self.jobs.put((step, job, self.exchanged))

    def wait(self) -> None:
        """Called by every rank before the optimizer changes the state: the last snapshot's exchange is over,
        its copy kept by the partner, so that a node lost from here on costs at most a step. The wait counts
        in the snapshots' cost."""
        if self.exchanged is None:
            return
        start = time.perf_counter()
        self.exchanged.wait()
        self.exchanged = None
        self.snaps.charge(time.perf_counter() - start)

    def _run(self) -> None:
        while (item := self.jobs.get()) is not None:
            step, job, exchanged = item
            try:
                if self.broken is None:
                    self._exchange(step, job)
            except Exception as e:  # a partner gone: training's own collectives fail too, and say so
                self.broken = e
                self.say(f"warning: snapshot replicas stopped at step {step}: {e}")
            finally:
                if job is not None:
                    job[3].set()
                exchanged.set()

    def _exchange(self, step: int, job: tuple | None) -> None:
        size, blob = -1, b""
        if job is not None:
            data, record, copied, _ = job
            copied.wait()
            if step not in self.snaps.failed:
                size, blob = record["size"], snapshot.meta_bytes(record)
        faults.before_exchange(group.rank())
        theirs = self._pair(torch.tensor([step, size, len(blob)]), to=self.partner, frm=self.source, tag=HEADER)
        their_step, their_size, their_len = theirs.tolist()
        into = self.store.receive_slot(their_size) if their_size >= 0 else None
        accepted = self._pair(torch.tensor([int(into is not None)]), to=self.source, frm=self.partner, tag=ANSWER)
        works = []
        if size >= 0 and accepted.item():
            works += self._sends(data, blob, self.partner)
        meta = torch.empty(their_len, dtype=torch.uint8)
        if into is not None:
            works += [dist.irecv(t, self.source, group=self.pg, tag=tag) for t, tag in _parts(into[1], meta)]
        for work in works:
            work.wait()
        if into is not None:
            self.store.commit_slot(into[0], their_step, meta.numpy().tobytes())

    def _pair(self, mine: torch.Tensor, to: int, frm: int, tag: int) -> torch.Tensor:
        """Send ``mine`` to rank ``to`` while receiving the same shape from rank ``frm``."""
        theirs = torch.empty_like(mine)
        works = [dist.isend(mine, to, group=self.pg, tag=tag), dist.irecv(theirs, frm, group=self.pg, tag=tag)]
        for work in works:
            work.wait()
        return theirs

    def _sends(self, data: torch.Tensor, blob: bytes, to: int) -> list:
        meta = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        return [dist.isend(t, to, group=self.pg, tag=tag) for t, tag in _parts(data, meta)]

    # -- on a restart --

    def held(self) -> list[int]:
        """The steps of the source's snapshots kept here, newest first."""
        return self.store.held(group.world_size()) if self.store.dir is not None else []

    def restore(self, step: int, lost: list[int]) -> bool:
        """Called by every rank before the restore: each rank in ``lost`` is sent its own snapshot of ``step`` by
        its partner, and keeps it as its own (``Snapshots.load`` then reads it). False on every rank, with a
        warning naming the ranks and what failed, if any rank could not: the restore then reads the disk."""
        error = None
        try:
            works = []
            if self.source in lost:
                try:
                    blob, data = self.store.raw(step)
                except OSError as e:  # the header says so: the source must not wait for bytes that never come
                    error, blob, data = e, b"", torch.empty(0, dtype=torch.uint8)
                header = torch.tensor([-1 if error else data.numel(), len(blob)])
                works += [dist.isend(header, self.source, group=self.pg, tag=HEADER)]
                works += self._sends(data, blob, self.source)
            if group.rank() in lost:
                header = torch.empty(2, dtype=torch.int64)
                dist.recv(header, self.partner, group=self.pg, tag=HEADER)
                size, length = header.tolist()
                if size < 0:
                    raise OSError(f"its partner, rank {self.partner}, could not read the copy it keeps")
                into = self.snaps.receive_slot(size)
                meta = torch.empty(length, dtype=torch.uint8)
                data = torch.empty(size, dtype=torch.uint8) if into is None else into[1]
                for t, tag in _parts(data, meta):  # received either way: the partner's sends must not wait
                    dist.recv(t, self.partner, group=self.pg, tag=tag)
                if into is None:
                    raise OSError(f"no room in {self.snaps.dir} for its snapshot ({size:,} bytes), sent by its partner")
                if not self.snaps.commit_slot(into[0], step, meta.numpy().tobytes()):
                    raise OSError(f"cannot write {self.snaps.dir}")
            for work in works:
                work.wait()
        except Exception as e:  # not raised: every rank must come to the agreement below, not wait for a timeout
            error = e
        failures = [(r, m) for r, m in enumerate(group.all_gather_objects(None if error is None else str(error))) if m]
        if failures:
            detail = "; ".join(f"rank {r}: {m}" for r, m in failures)
            self.say(f"warning: rank(s) {lost} could not be sent their snapshots of step {step} by their partners "
                     f"({detail}); resuming from disk instead (its newest checkpoint, if any)")  # fmt: skip
        return not failures

    def close(self, remove: bool) -> None:
        """Finish the transfers queued (every rank has the same), end the thread; with ``remove``, delete the
        source's copies (the run ended)."""
        if self.thread is not None:
            self.jobs.put(None)
            self.thread.join()
            self.thread = None
        self.store.close(remove)
