"""Each rank's training state in host shared memory, every step: the tier a crashed process does not lose.

A snapshot is what a checkpoint holds (``Checkpointer.state``: the model, the optimizer, the
scaler, the progress and data position, this rank's RNG), copied into files under
``/dev/shm`` (``--snapshot-dir``), which outlive the process. A restarted worker reads it
back in a fraction of a second instead of rereading ``checkpoints/`` from disk, and loses at
most the step it was in.

Layout, per rank: ``<dir>/ddp-snapshots/<run id>/rank-<r>/`` holds two slots (``data-0``,
``data-1``: every tensor, 64-byte aligned, back to back; ``meta-0``, ``meta-1``: a header naming
the slot's step and the checksum of what follows, then the rest of the state, with each tensor's
place, as JSON). Slots alternate. Both files are mapped once and written in place: before a slot
is overwritten, its header's first 8 bytes (``MAGIC``) are zeroed; after its copy is complete, the
record is written, then the header, then ``MAGIC`` last, which names the slot's new step. Memory
written to a shared mapping outlives the process at once, with no system call. So a kill at any
moment leaves the other slot whole and named, and a slot is restored only with a header that
matches its checksum. While a durable checkpoint is
written from a slot (``ddp.persist``), that slot is pinned and the copies alternate between the
other and a third (``data-2``).

The copy of the parameters and the optimizer's state runs on a thread, overlapping the next
forward and backward, which do not change them; ``wait`` is called before the next
optimizer step. Buffers (BatchNorm statistics, which the forward changes), the RNG states
and the counters are copied at once.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import mmap
import operator
import os
import queue
import shutil
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash

from ddp import faults, group

ROOT = "ddp-snapshots"
META = "meta-{}"  # a slot's meta file: its header (HEADER, at 0), then its record (at RECORD)
MAGIC = b"DDPSNAP2"  # a named slot's meta file begins with it; zeros while the slot is written
HEADER = struct.Struct("<8sQqI4x16s")  # MAGIC, the record's length, step, world size, xxh3-128 (of the rest)
RECORD = 64  # where the record starts in a meta file
RUN = "run.json"
ALIGN = 64  # every tensor starts at a multiple of this: any dtype can be viewed there
# in the meta record's JSON: a tensor ({TENSOR: its index}), a tuple, a dict whose keys are not all strings
TENSOR, TUPLE, PAIRS = "__ddp_tensor__", "__ddp_tuple__", "__ddp_pairs__"
_MARKERS = (TENSOR, TUPLE, PAIRS)  # a user's dict of one of these keys is stored as pairs: never read as a marker
_PLAIN = frozenset((int, float, str, bool, type(None)))
_STR = frozenset((str,))
_IS_CPU = operator.attrgetter("is_cpu")
OTHER = "other"  # in _flatten's ``seen``: a value of another type met (its tensors' keys are tuples)
BUDGET = 0.02  # --snapshot-every auto: the share of a step a snapshot may cost
SMALL = 4 << 20  # a state this small is copied at once: less than handing it to the thread costs


def default_dir() -> Path | None:
    """Host shared memory (``/dev/shm``) where this system has it; None elsewhere."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else None


def _available_memory() -> int:
    """The host's available memory (``MemAvailable``): what a snapshot in tmpfs may take without making the
    machine swap; unbounded where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def spare_core() -> bool:
    """Whether this host has a core beyond those its training ranks compute on (``LOCAL_WORLD_SIZE`` ranks of
    ``torch.get_num_threads()`` threads each), for a background copy to run on."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return cores > int(os.environ.get("LOCAL_WORLD_SIZE", "1")) * torch.get_num_threads()


def _flatten(obj: Any, tensors: list[torch.Tensor], seen: dict) -> Any:
    """``obj`` as plain JSON, each tensor replaced by ``{TENSOR: its index in tensors}`` (appended there), each
    tuple by ``{TUPLE: [...]}``, each dict with other keys than strings by ``{PAIRS: [[key, value], ...]}``;
    anything else is left as it is, and ``seen[OTHER]`` set (``meta_bytes`` then uses torch's format, which keeps
    its type where JSON would not: a float's subclass would come back a float). One pass: the snapshot's cost every step
    is mostly this walk. A tensor met twice (a tied weight, under two names) is stored once, and restored as one.
    ``seen``'s keys, in order, are the tensors' (where, dtype, shape, strides): ``Snapshots._layout`` keys on them."""
    kind = type(obj)
    if kind in _PLAIN:
        return obj
    if isinstance(obj, torch.Tensor):
        if obj.numel():
            key = (obj.data_ptr(), obj.dtype, obj.shape, obj.stride())
            index = seen.get(key)
        else:  # no memory to share: a key of its own, so that ``seen`` names every tensor's layout
            key, index = (None, obj.dtype, obj.shape, len(tensors)), None
        if index is None:
            tensors.append(obj.detach() if obj.requires_grad else obj)  # a state_dict's are detached: 1 us each
            index = seen[key] = len(tensors) - 1
        return {TENSOR: index}
    if isinstance(obj, dict):  # below, a plain value is taken as it is, without a call: half the walk's cost
        if set(map(type, obj)) <= _STR and not (len(obj) == 1 and next(iter(obj)) in _MARKERS):  # map: a C loop
            return {k: v if type(v) in _PLAIN else _flatten(v, tensors, seen) for k, v in obj.items()}
        return {PAIRS: [[_flatten(k, tensors, seen), _flatten(v, tensors, seen)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {TUPLE: [v if type(v) in _PLAIN else _flatten(v, tensors, seen) for v in obj]}
    if isinstance(obj, list):
        return [v if type(v) in _PLAIN else _flatten(v, tensors, seen) for v in obj]
    seen[OTHER] = True
    return obj


def unflatten(obj: Any, tensors: list[torch.Tensor]) -> Any:
    """What ``_flatten`` was given, with ``tensors`` in their places."""
    if type(obj) is dict:
        if len(obj) == 1:
            ((key, value),) = obj.items()
            if key == TENSOR:
                return tensors[value]
            if key == TUPLE:
                return tuple(unflatten(v, tensors) for v in value)
            if key == PAIRS:
                return {unflatten(k, tensors): unflatten(v, tensors) for k, v in value}
        return {k: unflatten(v, tensors) for k, v in obj.items()}
    if type(obj) is list:
        return [unflatten(v, tensors) for v in obj]
    return obj


def meta_bytes(record: dict, places: str | None = None) -> bytes:
    """A snapshot's meta record (its structure from ``_flatten``): JSON where it is plain data (fast; nothing in
    it can run), else (``record["plain"]`` False) torch's format for the weights-only loader (a state may hold a
    dtype or a device). ``places``: ``record["places"]`` as JSON already, which is then not encoded again."""
    if record.get("plain", True):
        if places is None:
            return b"J" + json.dumps(record).encode()
        rest = json.dumps({k: v for k, v in record.items() if k != "places"})
        return b"J" + f'{rest[:-1]}, "places": {places}}}'.encode()
    blob = io.BytesIO()
    torch.save(record, blob)
    return b"T" + blob.getvalue()


def meta_record(blob: bytes) -> dict:
    if blob[:1] == b"J":
        return json.loads(blob[1:])
    stream = io.BytesIO(blob[1:])
    return torch.load(stream, weights_only=True)


def _places(tensors: list[torch.Tensor]) -> tuple[list[list], int]:
    """(offset, dtype, shape, strides) of each tensor in a slot's data file, and the file's size.

    Strides are kept where a tensor is dense in another order than row-major (a channels_last
    convolution weight), so that the copy is a straight one and the slot, and a checkpoint written
    from it, keep the layout; None for a contiguous tensor.
    """
    places, size = [], 0
    for t in tensors:
        strides = None if t.is_contiguous() or not _dense(t) else list(t.stride())
        places.append([size, str(t.dtype).removeprefix("torch."), list(t.shape), strides])
        size += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    return places, size


def _mapped(path: Path, size: int) -> np.memmap:
    """The first ``size`` bytes of ``path`` (created or grown), mapped for writing. Its blocks are reserved first,
    so that a full tmpfs is ENOSPC here, not SIGBUS at a later write into the mapping."""
    with open(path, "a+b") as f:
        if hasattr(os, "posix_fallocate"):  # Linux
            os.posix_fallocate(f.fileno(), 0, size)
        elif os.fstat(f.fileno()).st_size < size:
            f.truncate(size)
    return np.memmap(path, dtype=np.uint8, mode="r+", shape=(size,))


def _digest(step: int, world_size: int, blob: bytes) -> bytes:
    """The checksum in a meta file's header: of the step and world size it names, and of its record."""
    hasher = xxhash.xxh3_128(struct.pack("<qI", step, world_size))
    hasher.update(blob)
    return hasher.digest()


class Damaged(ValueError):
    """A slot's meta file names a snapshot but does not match its checksum."""


def read_meta(path: Path) -> tuple[dict, bytes]:
    """(the header: step, checksum, world size; the record) of a slot's meta file. ValueError where it names no
    snapshot (the slot was being written), ``Damaged`` where it does not match its checksum."""
    raw = path.read_bytes()
    if len(raw) < RECORD or raw[: len(MAGIC)] != MAGIC:
        raise ValueError(f"{path} names no snapshot")
    _, length, step, world, digest = HEADER.unpack_from(raw)
    blob = raw[RECORD : RECORD + length]
    if len(blob) != length or _digest(step, world, blob) != digest:
        raise Damaged(f"{path} does not match its checksum")
    return {"step": step, "meta": digest.hex(), "world_size": world}, blob


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill its memory without gaps or overlaps, in some order of its dimensions."""
    order = sorted(range(t.dim()), key=lambda d: t.stride(d))
    expected = 1
    for d in order:
        if t.size(d) != 1 and t.stride(d) != expected:
            return False
        expected *= t.size(d)
    return True


def _copy_all(destinations: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """Copy each source into its destination: in one call where every tensor is on the CPU."""
    if all(map(_IS_CPU, sources)):
        if sources:
            torch._foreach_copy_(destinations, sources)
        return
    for destination, source in zip(destinations, sources, strict=True):  # from a GPU: device to host
        destination.copy_(source)


def _view(data: torch.Tensor, place: tuple) -> torch.Tensor:
    offset, dtype, shape = place[:3]
    dt = getattr(torch, dtype)
    return shaped(data[offset : offset + math.prod(shape) * dt.itemsize].view(dt), place)


def shaped(flat: torch.Tensor, place: tuple) -> torch.Tensor:
    """A tensor's elements, in the slot's order, as the tensor: its shape, and its strides where it kept them."""
    shape, strides = place[2], place[3] if len(place) > 3 else None  # 3 fields: a snapshot from before strides
    return flat.view(shape) if strides is None else flat.as_strided(shape, strides)


class Snapshots:
    """This rank's snapshots: taken every ``every`` steps into alternating slots, read back on a restart."""

    def __init__(self, root: Path, every: int | None, rank: int, out: Path, say=print) -> None:
        """``every``: steps between snapshots; None: ``auto`` (every step, fewer if a copy costs more than 2 %
        of a step)."""
        self.root, self.rank, self.out, self.say = Path(root) / ROOT, rank, Path(out).resolve(), say
        self.every, self.auto = every or 1, every is None
        self.dir: Path | None = None  # this rank's folder, once the run's id is known (open)
        self.slots: dict[str, dict] = {}  # slot -> the header of its meta file: {"step", "meta", "world_size"}
        self.maps: dict[int, tuple[np.memmap, torch.Tensor]] = {}  # slot -> its data file, mapped
        self.metas: dict[int, np.ndarray] = {}  # slot -> its meta file, mapped (a plain view: memmap slices cost)
        self.views: dict[int, tuple[list, list[torch.Tensor]]] = {}  # slot -> (its layout, a view per tensor)
        self.layout: tuple[tuple, list, int, str] | None = None  # the last state's (key, places, size, places' JSON)
        self.jobs: queue.Queue = queue.Queue()  # copies for the snapshot thread, one at a time
        self.thread: threading.Thread | None = None  # started at the first snapshot, for the whole run
        self.done = threading.Event()  # set when the copy under way is complete
        self.pending: tuple[int, int, dict] | None = None  # (slot, step, meta) of the copy under way
        self.pinned: int | None = None  # the slot a checkpoint is being written from (ddp.persist)
        self.error: BaseException | None = None
        # since the last tune: seconds training was blocked, snapshots committed, seconds spent copying (on either
        # thread: the copy's share of a step, which the bench reports), CPU seconds the snapshot thread copied,
        # and seconds of the blocked ones training waited for it
        self.cost = {"blocked": 0.0, "taken": 0, "copy": 0.0, "thread": 0.0, "waited": 0.0}
        self.cost["since"] = time.perf_counter()
        self.spare_core = spare_core()  # else the snapshot thread's copies take CPU time from training
        self.disabled = False
        self.announced = False  # whether the memory the snapshots take was said
        self.saved_config: dict | None = None  # the settings the run's snapshots were taken under
        self.readers: dict[int, threading.Event] = {}  # slot -> set once another thread has read it (ddp.replicas)
        self.failed: set[int] = set()  # steps whose copy failed: never sent to a partner
        self.off = "snapshots in host memory are off: {}; disk checkpoints only"  # the log's warning, once

    # -- where --

    def open(self, run_id: str, clean: bool, config: dict | None = None, name: str | None = None) -> None:
        """Use the folder of run ``run_id``; with ``clean`` (one rank per host), remove the folders of runs that
        can no longer resume: another run now holds their ``--out``, or their ``--out`` is gone.

        ``config``: this launch's settings, recorded once for the run's snapshots (``saved_config`` is what the
        launch before it recorded). ``name``: the folder's name in the run's, ``rank-<r>`` unless given: a
        partner's copies (``ddp.replicas``), which leave the run's record to the rank's own snapshots.
        """
        run_dir = self.root / run_id
        self.dir = run_dir / (name or f"rank-{self.rank}")
        if clean:
            self._clean_stale(run_id)
        try:
            self.saved_config = json.loads((run_dir / RUN).read_text()).get("config")
        except (OSError, ValueError, AttributeError):
            self.saved_config = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if name is None:
                record = {"run_id": run_id, "out": str(self.out), "config": config}
                tmp = run_dir / f".{RUN}.{self.rank}.tmp"
                tmp.write_text(json.dumps(record))
                os.replace(tmp, run_dir / RUN)
        except OSError as e:
            self._disable(f"cannot write {self.dir} ({e.strerror})")
            return
        self.slots, self.metas = {}, {}
        for slot in range(3):
            try:
                self.slots[str(slot)] = read_meta(self.dir / META.format(slot))[0]
            except Damaged:
                self._say_damaged(slot)
            except (OSError, ValueError):  # no slot there, or one being written when the process died
                pass

    def _say_damaged(self, slot: int | str) -> None:
        self.say(f"warning: the snapshot in {self.dir} slot {slot} is damaged; it is not used")

    def charge(self, seconds: float) -> None:
        """Count ``seconds`` that training waited on the snapshots' behalf (a replica's exchange) in their cost."""
        self.cost["blocked"] += seconds

    def exists(self, run_id: str) -> bool:
        """Whether any rank on this host holds a snapshot of run ``run_id``."""
        for path in (self.root / run_id).glob(f"rank-*/{META.format('*')}"):
            with contextlib.suppress(OSError), open(path, "rb") as f:
                if f.read(len(MAGIC)) == MAGIC:
                    return True
        return False

    def _clean_stale(self, run_id: str) -> None:
        for run_file in self.root.glob(f"*/{RUN}"):
            try:
                record = json.loads(run_file.read_text())
            except (OSError, ValueError):
                continue
            theirs = record.get("run_id")
            if theirs == run_id:
                continue
            out = Path(record.get("out", ""))
            if not out.exists() or out == self.out:
                shutil.rmtree(run_file.parent, ignore_errors=True)
                self.say(f"removed the snapshots of run {theirs} ({out}): that run can no longer resume")

    def _disable(self, why: str) -> None:
        if not self.disabled:
            self.say("warning: " + self.off.format(why))
        self.disabled = True

    # -- taking --

    def due(self, step: int, force: bool = False) -> bool:
        """Whether ``step`` is snapshotted (with ``force``, if snapshots are taken at all). The same on every
        rank, which all build the state (a collective) even where ``take`` then finds snapshots off."""
        return self.dir is not None and (force or step % self.every == 0)

    def take(self, step: int, state: Any, live: Callable[[], set[int]], built_s: float = 0.0) -> None:
        """Start the snapshot of ``state`` (``Checkpointer.state``) as that of ``step``.

        ``live()``: the ``data_ptr`` of tensors the next forward may change (buffers): copied now; the
        others on a thread until ``wait``. Asked only of a state over ``SMALL``, which is copied at once.
        ``built_s``: the seconds the caller took to build ``state``, a part of the snapshot's cost.
        """
        start = time.perf_counter() - built_s
        self.wait()
        if self.disabled:
            return
        tensors: list[torch.Tensor] = []
        seen: dict = {}
        meta = _flatten(state, tensors, seen)
        places, size = self._layout(tuple(key[1:] for key in seen), tensors)  # not where: fresh tensors (RNGs)
        slot = self._claim(size)
        if slot is None:
            return
        try:
            views = self._views(slot, places, size)
        except OSError as e:
            self._disable(f"{self.dir}: {e.strerror or e}")
            return
        now, later = (views, tensors), ([], [])  # (destinations, sources)
        if size > SMALL:
            now, buffers = ([], []), live()
            for t, view in zip(tensors, views, strict=True):
                into = now if t.data_ptr() in buffers else later
                into[0].append(view)
                into[1].append(t)
        if now[0]:
            self._copy(now, step)
        record = {"step": step, "size": size, "places": places, "meta": meta, "plain": OTHER not in seen}
        self.pending = (slot, step, record)
        self.done = threading.Event()  # its own: a checkpoint written from this copy waits on it (ddp.persist)
        if later[0]:
            if self.thread is None:
                self.thread = threading.Thread(target=self._copier, name="ddp-snapshot", daemon=True)
                self.thread.start()
            self.jobs.put((later, step, self.done))
        else:
            self.done.set()
        self.cost["blocked"] += time.perf_counter() - start

    def _layout(self, key: tuple, tensors: list[torch.Tensor]) -> tuple[list, int]:
        """(each tensor's place, the slot's size) for these tensors, whose dtypes, shapes and strides ``key``
        names (from ``_flatten``'s ``seen``): worked out, and encoded, again only when they change."""
        if self.layout is None or self.layout[0] != key:
            places, size = _places(tensors)
            self.layout = (key, places, size, json.dumps(places))
        return self.layout[1], self.layout[2]

    def _free_slot(self) -> int:
        """The slot the next copy goes to: neither the newest committed one nor one a checkpoint is being
        written from. Two alternate; a third is used only while a checkpoint is written from one of them."""
        newest = max(self.slots, key=lambda k: self.slots[k]["step"]) if self.slots else None
        busy = {newest, None if self.pinned is None else str(self.pinned)}
        return next(slot for slot in range(3) if str(slot) not in busy)

    def pin(self, step: int) -> tuple[Path, dict, threading.Event] | None:
        """(the data file, the layout record, the event set when its copy is complete) of the snapshot of
        ``step``, which is kept from being overwritten until ``unpin``; None where no snapshot of it is held."""
        if self.pending is not None and self.pending[1] == step:
            slot, _, record = self.pending
            ready = self.done
        else:
            slot = next((int(k) for k, s in self.slots.items() if s["step"] == step and self._whole(k)), None)
            if slot is None:
                return None
            record, ready = meta_record(self._blob(str(slot))), threading.Event()
            ready.set()
        self.pinned = slot
        return self.dir / f"data-{slot}", record, ready

    def unpin(self) -> None:
        """The checkpoint written from the pinned slot is committed (or failed): the slot may be reused."""
        self.pinned = None

    def data(self, slot: int, size: int) -> torch.Tensor:
        """The first ``size`` bytes of a slot's data file, mapped: what a partner is sent (``ddp.replicas``)."""
        return self._map(slot, size)[:size]

    def receive_slot(self, size: int) -> tuple[int, torch.Tensor] | None:
        """(a free slot, its data file's first ``size`` bytes, mapped) for a snapshot received whole, which
        ``commit_slot`` then names; None where there is no room for it."""
        if self.disabled or self.dir is None:
            return None
        slot = self._claim(size)
        if slot is None:
            return None
        try:
            return slot, self.data(slot, size)
        except OSError as e:
            self._disable(f"{self.dir}: {e.strerror or e}")
            return None

    def _claim(self, size: int) -> int | None:
        """The slot the next snapshot of ``size`` bytes goes to, its name cleared (a kill while it is written
        leaves the other slot whole and named); None where there is no room (snapshots are then off)."""
        slot = self._free_slot()
        reader = self.readers.pop(slot, None)
        if reader is not None:  # a partner is still being sent this slot's older snapshot
            reader.wait()
        if not self._room(slot, size):
            return None
        self.slots.pop(str(slot), None)
        try:  # first: a slot being overwritten is never named
            self._meta_map(slot, 0)[: len(MAGIC)] = 0
        except OSError as e:
            self._disable(f"{self.dir}: {e.strerror or e}")
            return None
        return slot

    def commit_slot(self, slot: int, step: int, blob: bytes) -> bool:
        """Name ``slot``, whose data is complete, as the snapshot of ``step`` (``blob``: its meta record): the
        record, then the header, then its ``MAGIC``, written into the mapped meta file; False where it could not
        be written (snapshots are then off)."""
        world = group.world_size()
        digest = _digest(step, world, blob)
        try:
            mm = self._meta_map(slot, len(blob))
        except OSError as e:
            self._disable(f"{self.dir}: {e.strerror or e}")
            return False
        mm[RECORD : RECORD + len(blob)] = np.frombuffer(blob, dtype=np.uint8)
        head = np.frombuffer(HEADER.pack(MAGIC, len(blob), step, world, digest), dtype=np.uint8)
        mm[len(MAGIC) : HEADER.size] = head[len(MAGIC) :]
        mm[: len(MAGIC)] = head[: len(MAGIC)]  # last: names the slot
        self.slots[str(slot)] = {"step": step, "meta": digest.hex(), "world_size": world}
        return True

    def _meta_map(self, slot: int, record: int) -> np.ndarray:
        """The slot's meta file, mapped, with room for a record of ``record`` bytes (grown in powers of two)."""
        mm = self.metas.get(slot)
        if mm is None or mm.shape[0] < RECORD + record:
            size = max(4096, 1 << (RECORD + record - 1).bit_length())
            mm = self.metas[slot] = _mapped(self.dir / META.format(slot), size).view(np.ndarray)
        return mm

    def _room(self, slot: int, size: int) -> bool:
        """Whether a slot of ``size`` bytes fits in the folder's free space and in the host's available memory,
        with room to spare for every rank on the host (the slot's old file counts as free)."""
        mapped = self.maps.get(slot)
        if mapped is not None and mapped[1].numel() >= size:  # mapped at this size already: nothing to stat
            return True
        path = self.dir / f"data-{slot}"
        held = path.stat().st_size if path.exists() else 0
        if held >= size:  # its blocks are reserved already (posix_fallocate): a copy into it takes no more memory
            return True
        free = min(shutil.disk_usage(self.dir).free, _available_memory()) + held
        if size * int(os.environ.get("LOCAL_WORLD_SIZE", "1")) + (64 << 20) <= free:
            return True
        self._disable(f"a snapshot needs {size / 2**20:,.1f} MiB in {self.dir} for each rank on this host, "
                      f"{free / 2**20:,.1f} MiB are free")  # fmt: skip
        return False

    def _views(self, slot: int, places: list, size: int) -> list[torch.Tensor]:
        """Each tensor's place in the slot's data file, as a tensor: made again only when the layout changes."""
        cached = self.views.get(slot)
        if cached is None or cached[0] != places:
            data = self._map(slot, size)
            cached = self.views[slot] = (places, [_view(data, place) for place in places])
        return cached[1]

    def _map(self, slot: int, size: int) -> torch.Tensor:
        mapped = self.maps.get(slot)
        if mapped is None or mapped[1].numel() < size:
            mm = _mapped(self.dir / f"data-{slot}", max(size, 1))
            mapped = self.maps[slot] = (mm, torch.from_numpy(mm))
        return mapped[1]

    def _copier(self) -> None:
        """The snapshot thread: each copy it is given, in turn. One ``_foreach_copy_`` call per half: the GIL is
        released for the whole copy, not taken back between tensors (a wait of up to 5 ms each)."""
        while True:
            pairs, step, done = self.jobs.get()
            start = time.thread_time()
            try:
                self._copy(pairs, step)
                self.cost["thread"] += time.thread_time() - start
            except BaseException as e:  # reported by wait, on the training thread
                self.error = e
                self.failed.add(step)
            done.set()

    def _copy(self, pairs: tuple[list, list], step: int) -> None:
        start = time.perf_counter()
        destinations, sources = pairs
        half = (len(sources) + 1) // 2
        _copy_all(destinations[:half], sources[:half])
        faults.in_snapshot(self.rank, step)  # a kill half-way through the copy, for the tests
        _copy_all(destinations[half:], sources[half:])
        self.cost["copy"] += time.perf_counter() - start

    def wait(self) -> None:
        """Finish the copy under way and commit it: write its meta file, which names it."""
        if self.pending is None:
            return
        start = time.perf_counter()
        self.done.wait()
        self.cost["waited"] += time.perf_counter() - start
        slot, step, record = self.pending
        self.pending = None
        if self.error is not None:
            error, self.error = self.error, None
            self._disable(f"the copy of step {step} failed ({error})")
            return
        places = self.layout[3] if self.layout is not None and record["places"] is self.layout[1] else None
        if not self.commit_slot(slot, step, meta_bytes(record, places)):
            return
        self.cost["blocked"] += time.perf_counter() - start
        self.cost["taken"] += 1
        if not self.announced:
            self.announced = True
            how = "every step, fewer if they cost over 2 %" if self.auto else f"every {self.every} step(s)"
            self.say(f"snapshots in host memory: {2 * record['size'] / 2**20:,.1f} MiB per rank (two slots; a "
                     f"third while a checkpoint is written from one) in {self.dir.parent}, {how}")  # fmt: skip

    def share(self) -> float:
        """The share of training time the snapshots took since the last ``tune``; -1 before 8 of them: the time
        they blocked training; where no core is spare, the copies on the snapshot thread run in training's
        place: their CPU time counts, whether training waited for it or worked beside it."""
        c = self.cost
        if not self.auto or c["taken"] < 8:
            return -1.0
        took = c["blocked"] if self.spare_core else c["blocked"] - c["waited"] + max(c["waited"], c["thread"])
        return took / max(time.perf_counter() - c["since"], 1e-9)

    def tune(self, share: float) -> None:
        """``auto``, called by every rank with the same ``share`` (the most any rank's cost): take snapshots less
        often while they cost more than 2 % of training time.

        The interval grows at once by the power of two that brings the measured share under the budget (a
        snapshot costing 30 % of a step: one every 16 steps), not by doubling once per measurement.
        """
        if share < 0:
            return
        if share > BUDGET:
            self.every *= 2 ** math.ceil(math.log2(share / BUDGET))
            self.say(f"snapshots cost {100 * share:.1f}% of training time: one every {self.every} steps from now")
        self.cost.update(blocked=0.0, taken=0, copy=0.0, thread=0.0, waited=0.0, since=time.perf_counter())

    # -- reading back --

    def held(self, world_size: int) -> list[int]:
        """The steps of this rank's committed, whole snapshots of a world of ``world_size``, newest first: a slot
        whose meta record does not match its checksum, or whose data file is short, is not offered."""
        steps = [s["step"] for k, s in self.slots.items() if s.get("world_size") == world_size and self._whole(k)]
        return sorted(steps, reverse=True)

    def _whole(self, slot: str) -> bool:
        try:
            whole = (self.dir / f"data-{slot}").stat().st_size >= meta_record(self._blob(slot))["size"]
        except (OSError, ValueError, KeyError, TypeError, RuntimeError):
            whole = False
        if not whole:
            self._say_damaged(slot)
        return whole

    def _blob(self, slot: str) -> bytes:
        """The meta record of ``slot``, as written: OSError where its file no longer matches the header read."""
        path = self.dir / META.format(slot)
        try:
            named, blob = read_meta(path)
        except ValueError:
            named = None  # torn since it was read: an OSError like any other mismatch, which every caller handles
        if named != self.slots[slot]:
            raise OSError(f"{path} does not match its checksum")
        return blob

    def load(self, step: int, copy: bool = True) -> Any:
        """The state of this rank's snapshot of ``step``, as ``take`` was given it (tensors on the CPU): copies, or
        without ``copy`` views of a private mapping of the slot, valid until the slot is written again."""
        _, record, data = self._read(step)
        tensors = [_view(data, place) for place in record["places"]]
        return unflatten(record["meta"], [t.clone() for t in tensors] if copy else tensors)

    def raw(self, step: int) -> tuple[bytes, torch.Tensor]:
        """(the meta record, the data) of the snapshot of ``step``, as stored: the data a private mapping of the
        slot's file, as long as the snapshot."""
        blob, _, data = self._read(step)
        return blob, data

    def _read(self, step: int) -> tuple[bytes, dict, torch.Tensor]:
        """(the meta record as stored, and read; the data, mapped privately): a restart's first reads. A plain
        ``mmap``, not ``np.memmap``, which resolves the file's path at every call (a sixth of a small restore)."""
        slot = next((k for k, s in self.slots.items() if s["step"] == step), None)
        if slot is None:
            raise OSError(f"{self.dir} holds no snapshot of step {step}")
        blob = self._blob(slot)
        record = meta_record(blob)
        path = self.dir / f"data-{slot}"
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size < record["size"]:  # an empty file would not even map (a ValueError)
                raise OSError(f"{path} is shorter than its snapshot")
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # copy-on-write: the slot itself stays as it is
        return blob, record, torch.frombuffer(data, dtype=torch.uint8)[: record["size"]]

    def nbytes(self) -> int:
        """Host memory the slots take."""
        return sum(m[1].numel() for m in self.maps.values())

    def close(self, remove: bool) -> None:
        """Finish the copy under way; with ``remove``, delete this rank's snapshots (the run ended)."""
        self.wait()
        self.maps.clear()
        self.metas.clear()
        self.views.clear()
        self.layout = None
        if remove and self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            with contextlib.suppress(OSError):  # the last rank of the run on this host takes the run's folder too
                if not any(p.name.startswith("rank-") for p in self.dir.parent.iterdir()):
                    shutil.rmtree(self.dir.parent, ignore_errors=True)
