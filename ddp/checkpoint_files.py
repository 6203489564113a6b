"""A checkpoint folder on disk: its files, their manifest, writing them durably and reading them back.

Layout: ``<out>/checkpoints/step-00000120/`` holding

- ``model.pt``: the unwrapped model state_dict, on 1 rank; on N ranks ``model-0000R.pt``,
  each rank's share of it (``spread``),
- ``train.pt``: optimizer settings, grad scaler, progress and config (rank 0),
- ``optim-0000R.pt``: the optimizer's per-parameter state, shared out with the model's
  tensors by size so that each rank writes about as many bytes (on 1 rank, in ``train.pt``),
- ``rank-00000.pt`` ...: each rank's RNG states (written by that rank),
- under ``--strategy fsdp``, ``sharded/`` instead of ``model.pt`` and the optimizer files:
  each rank's shards of the model and optimizer state, a ``torch.distributed.checkpoint``
  folder (``__R_0.distcp`` per rank, ``.metadata`` from rank 0), resharded on load,
- ``manifest.json``: size and checksum (xxh3-128) of every file, step, world size, format version.

A checkpoint is written into ``.tmp-step-00000120``, fsynced, and committed by one
atomic rename after the manifest is in place. A folder without a valid manifest is
never loaded, so a crash mid-save leaves the previous checkpoint the newest complete
one. ``ddp.checkpoint.Checkpointer`` decides what goes in and when; this module only knows files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import queue
import re
import shutil
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import torch
import xxhash

from ddp import group
from ddp.errors import CheckpointCorruptError, CheckpointError, CheckpointNotFoundError
from ddp.io import check_regular, fsync_dir, load, storage_key, write_durable

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL = "model.pt"
"""The whole model's state_dict (a DDP checkpoint written by one rank)."""
TRAIN = "train.pt"
"""Progress, grad scaler, config and the optimizer's settings: everything but tensors of the model."""
STEP_DIR = re.compile(r"^step-(\d{8})$")
PRUNED = ".pruned-"  # a checkpoint beyond --keep-last, renamed before it is deleted in the background


def step_dir(root: Path, step: int) -> Path:
    """Folder of the checkpoint taken after optimizer step ``step``."""
    return root / f"step-{step:08d}"


def rank_file(rank: int) -> str:
    """Name of one rank's own file inside a checkpoint."""
    return f"rank-{rank:05d}.pt"


def optim_file(rank: int) -> str:
    """Name of the file holding the optimizer state that ``rank`` wrote."""
    return f"optim-{rank:05d}.pt"


OPTIM_FILE = re.compile(r"^optim-\d{5}\.pt$")


def model_file(rank: int) -> str:
    """Name of the file holding the share of the model's tensors that ``rank`` wrote."""
    return f"model-{rank:05d}.pt"


MODEL_FILE = re.compile(r"^model-\d{5}\.pt$")


def spread(replicated: dict[str, Any], world_size: int) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """(files rank 0 writes, {rank: {file name: its share}}) of a DDP checkpoint.

    The model's tensors and the optimizer's per-parameter state are identical on every
    rank (the trainer hands every rank rank 0's buffers first), so they go to the ranks by
    size, largest first to the rank with the fewest bytes so far; rank 0 starts with
    ``train.pt``, which keeps the order of the model's keys. Rank R writes its share of the
    model to ``model-0000R.pt`` and of the optimizer state to ``optim-0000R.pt``. A tied
    weight (one tensor, two names) goes whole to one rank and is stored once. Every rank
    computes the same split from the same state; on 1 rank ``model.pt`` stays whole.
    """
    model, train = replicated.get(MODEL), replicated.get(TRAIN)
    if world_size == 1 or not isinstance(model, dict) or not isinstance(train, dict):
        return replicated, {}
    optimizer = train.get("optimizer") or {}
    tied: dict[Any, list[str]] = {}
    for key, value in model.items():
        shared = isinstance(value, torch.Tensor) and value.numel() > 0
        tied.setdefault(storage_key(value) if shared else key, []).append(key)
    items = [(nbytes(model[keys[0]]), "model", {k: model[k] for k in keys}) for keys in tied.values()]
    items += [(nbytes(entry), "optim", {pid: entry}) for pid, entry in (optimizer.get("state") or {}).items()]
    train = {**train, "model_keys": list(model)}
    if optimizer:
        train["optimizer"] = {**optimizer, "state": {}}
    whole = {**{k: v for k, v in replicated.items() if k != MODEL}, TRAIN: train}
    load = [nbytes(whole)] + [0] * (world_size - 1)
    shares: dict[int, dict[str, Any]] = {}
    for size, kind, entries in sorted(items, key=lambda it: (-it[0], it[1], str(next(iter(it[2]))))):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        name = model_file(rank) if kind == "model" else optim_file(rank)
        shares.setdefault(rank, {}).setdefault(name, {}).update(entries)
        load[rank] += size
    return whole, shares


def rank_files(replicated: dict, own: dict, rank: int, world_size: int) -> dict[str, Any]:
    """The files ``rank`` writes of a DDP checkpoint: its own state, its share of the replicated state
    (``spread``), and on rank 0 the files no rank shares."""
    shared, shares = spread(replicated, world_size)
    files = {rank_file(rank): own}
    if rank == 0:
        files.update(shared)
    files.update(shares.get(rank, {}))
    return files


def nbytes(obj: Any) -> int:
    """Bytes of every tensor in ``obj`` (nested dicts, lists and tuples); a DTensor counts this rank's shard."""
    if isinstance(obj, torch.Tensor):
        to_local = getattr(obj, "to_local", None)  # a DTensor, without importing torch.distributed.tensor
        return to_local().nbytes if to_local is not None else obj.nbytes
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    return 0


SHARDED = "sharded"
"""The folder of a checkpoint's model and optimizer shards, under ``--strategy fsdp``."""


def is_sharded(manifest: dict) -> bool:
    """Whether a checkpoint holds its model and optimizer as shards (``--strategy fsdp``)."""
    return f"{SHARDED}/.metadata" in manifest["files"]  # DCP's metadata file


def write_shards(folder: Path, state: dict[str, Any]) -> dict:
    """Called by every rank: each writes its shards; returns the manifest entries of its own files.

    DCP names each rank's data file ``__R_N.distcp``; rank 0 also wrote ``.metadata``.
    """
    from ddp import dcp  # torch.distributed.checkpoint: 0.6 s to import, only FSDP runs need it

    dcp.save_sharded(state, folder)
    return shard_entries(folder)


def shard_entries(folder: Path, known: dict[str, dict] | None = None) -> dict:
    """The manifest entries of this rank's files of the shards written into ``folder`` (rank 0's: and the
    metadata), once every rank's are written; ``known``: entries by file name, from the process that wrote them."""
    rank, known = group.rank(), known or {}
    mine = sorted(
        p for p in folder.iterdir() if p.name.startswith(f"__{rank}_") or (rank == 0 and not p.name.startswith("__"))
    )
    if rank == 0:
        fsync_dir(folder)
    return {
        f"{SHARDED}/{p.name}": known.get(p.name) or {"size": p.stat().st_size, DIGEST: file_digest(p)} for p in mine
    }


def optimizer_by_index(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state_dict keyed by parameter name (as DCP stores it) in torch's own form, by index.

    Indices follow the order of the param groups' parameters, as ``Optimizer.state_dict`` numbers them.
    """
    order = [name for g in state["param_groups"] for name in g["params"]]
    index = {name: i for i, name in enumerate(order)}
    return {
        "state": {index[name]: entry for name, entry in state["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]],
    }


DIGEST = "xxh3_128"
"""The checksum new manifests record: 16 bytes, ~20 GB/s per core here (sha256: 1.8)."""
DIGESTS = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}  # sha256: manifests written before xxh3


class Worker:
    """One daemon thread, started once and kept, that runs the jobs it is given in turn; ``submit`` returns a job's
    future.

    Background work (hashing beside a write, pruning, an async save) runs on threads that live as long as the
    process, never on one started and ended per job: a thread ending while a DataLoader forks its workers can
    leave a worker stuck for good in CPython's thread bookkeeping after the fork (seen under load: a worker
    deadlocked in ``PyOS_AfterFork_Child``, its rank waiting for its batches, the job hung). A forked child
    starts its own thread at its first job.
    """

    def __init__(self, name: str) -> None:
        self.name, self.jobs, self.pid, self.lock = name, queue.SimpleQueue(), None, threading.Lock()

    def start(self) -> None:
        """Start the thread now, if this process has none (its start is then not during another's fork)."""
        if self.pid == os.getpid():
            return
        with self.lock:  # two threads of a new process must not start two, one with jobs nobody takes
            if self.pid != os.getpid():
                self.jobs, self.pid = queue.SimpleQueue(), os.getpid()  # a fork's child has no thread, nor its jobs
                threading.Thread(target=self._run, name=self.name, daemon=True).start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        self.start()
        future: Future = Future()
        self.jobs.put((future, fn, args))
        return future

    def _run(self) -> None:
        while True:
            future, fn, args = self.jobs.get()
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # the caller's: raised by future.result()
                future.set_exception(e)


HASHER = Worker("ddp-hash")
"""The thread that hashes a large write beside it (``HashingWriter``): one per process, for its whole life."""
PRUNER = Worker("ddp-prune")
"""The thread that deletes retired checkpoints (``remove_all``) beside training: one per process, likewise."""


class HashingWriter:
    """A write-only file wrapper that hashes and counts the bytes as they pass.

    A large write (a tensor's bytes) is hashed on a second thread while this one copies
    it into the file: both release the GIL, so the checksum costs no time of its own
    where a second core is free (12 ms per 256 MB here, 8% of a save, when done in turn).
    """

    OVERLAP = 1 << 22  # below 4 MB a thread costs more than it hides

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.hash, self.size = f, DIGESTS[DIGEST](), 0

    def write(self, data) -> int:
        self.size += len(data)
        if len(data) < self.OVERLAP:
            self.hash.update(data)
            return self.f.write(data)
        hashed = HASHER.submit(self.hash.update, data)
        try:
            return self.f.write(data)
        finally:
            hashed.result()  # before returning: torch may free or reuse ``data`` once write returns

    def flush(self) -> None:
        self.f.flush()


def write_file(path: Path, obj: Any) -> dict:
    """torch.save ``obj`` durably; returns its manifest entry (size and checksum).

    torch's zip writer computes a CRC32 of every record, which made a save cost twice
    the raw write here; the manifest's checksum covers every byte instead, once.
    """
    entry: dict = {}

    def write(f: IO[bytes]) -> None:
        w = HashingWriter(f)
        with _no_zip_crc():
            torch.save(obj, w)
        entry.update({"size": w.size, DIGEST: w.hash.hexdigest()})

    write_durable(path, write)
    return entry


def write_parts(path: Path, parts: Iterable[Any]) -> tuple[list[list[int]], dict]:
    """Write ``parts`` one after another into a file, durably, as DCP lays out a data file (a tensor by
    ``torch.save``, bytes as they are); ([offset, length] of each part, the file's manifest entry)."""
    spans: list[list[int]] = []
    entry: dict = {}

    def write(f: IO[bytes]) -> None:
        w = HashingWriter(f)
        for part in parts:
            start = w.size
            if isinstance(part, bytes):
                w.write(part)
            else:
                with _no_zip_crc():
                    torch.save(part, w)
            spans.append([start, w.size - start])
        entry.update({"size": w.size, DIGEST: w.hash.hexdigest()})

    write_durable(path, write)
    return spans, entry


def _no_zip_crc() -> contextlib.AbstractContextManager:
    try:
        from torch.utils.serialization import config
    except ImportError:  # torch < 2.6 has no such setting: the records keep their CRC32
        return contextlib.nullcontext()
    return config.patch({"save.compute_crc32": False})


def file_digest(path: Path, algorithm: str = DIGEST) -> str:
    """Hex checksum of a file, read through a memory map.

    Mapping reads each page from disk once: a load that follows maps the same pages from
    the page cache, so validating and loading read the data once, not twice.
    """
    h = DIGESTS[algorithm]()
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                h.update(m)
    return h.hexdigest()


# ---- reading and validating ----------------------------------------------------------


MAX_MANIFEST_BYTES = 64 * 2**20
"""A manifest lists a few files per rank: 64 MiB is room for 10^5 ranks, and bounds what a foreign one costs."""


def read_manifest(folder: Path) -> dict:
    """The manifest of a checkpoint folder; a clear error if it is missing or broken."""
    path = folder / MANIFEST
    if not folder.is_dir():
        raise CheckpointNotFoundError(f"checkpoint folder {folder} does not exist")
    if not path.exists():
        raise CheckpointCorruptError(f"{folder} has no {MANIFEST}: an unfinished save, never loaded")
    check_regular(path, CheckpointCorruptError, MAX_MANIFEST_BYTES, named_by=path)
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest["files"], dict) or not all(isinstance(e, dict) for e in manifest["files"].values()):
            raise TypeError("'files' must map each file's name to its size and checksum")
        manifest["step"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointCorruptError(f"{path} is not a valid manifest: {e}") from e
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointCorruptError(
            f"{path}: format version {manifest.get('format_version')!r}, this ddp reads version {FORMAT_VERSION}"
        )
    return manifest


def validate(folder: Path, hashes: bool = True) -> dict:
    """Check every file against the manifest (size, then checksum); returns the manifest.

    The files are hashed on one thread per core (xxhash releases the GIL): on resume every
    rank waits for this, and with N ranks' shares there are many files.
    """
    manifest = read_manifest(folder)
    algorithms = {}
    for name, entry in manifest["files"].items():
        path = entry_path(folder, name)
        if not path.exists():
            raise CheckpointCorruptError(f"{path} is listed in the manifest but missing")
        size = check_regular(path, CheckpointCorruptError, named_by=folder / MANIFEST)
        if size != entry.get("size"):
            raise CheckpointCorruptError(f"{path} has {size} bytes, the manifest says {entry.get('size')} (truncated?)")
        algorithms[name] = next((a for a in DIGESTS if a in entry), None)
        if algorithms[name] is None:
            raise CheckpointCorruptError(f"{folder / MANIFEST}: the entry of {name} has no checksum ({list(entry)})")
    if not hashes:
        return manifest
    with ThreadPoolExecutor(max_workers=max(1, min(len(algorithms), os.cpu_count() or 1))) as pool:
        digests = dict(
            zip(algorithms, pool.map(lambda n: file_digest(folder / n, algorithms[n]), algorithms), strict=True)
        )
    for name, algorithm in algorithms.items():  # the first damaged file in the manifest's order
        if digests[name] != manifest["files"][name][algorithm]:
            raise CheckpointCorruptError(
                f"{folder / name} fails its {algorithm} check: the file was altered or damaged"
            )
    return manifest


def entry_path(folder: Path, name: str) -> Path:
    """Where a manifest's entry ``name`` lies: a relative path inside ``folder``, or a CheckpointCorruptError.

    A checkpoint folder may come from anywhere: its manifest names no file outside it, by an
    absolute path, by ``..`` or through a symlink.
    """
    parts = name.split("/")
    if name.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise CheckpointCorruptError(
            f"{folder / MANIFEST}: the entry {name!r} is not a file inside the checkpoint folder; this folder "
            "was not written by ddp (or was altered): do not load it"
        )
    path = folder.joinpath(*parts)
    if path.exists() and not path.resolve().is_relative_to(folder.resolve()):
        raise CheckpointCorruptError(
            f"{folder / MANIFEST}: the entry {name!r} leads outside the checkpoint folder (a symlink to "
            f"{path.resolve()}); do not load it"
        )
    return path


def digest_of(manifest: dict) -> str:
    """The checksum algorithm a manifest's entries use."""
    entries = list(manifest["files"].values())
    return next((a for a in DIGESTS if entries and a in entries[0]), "none")


def complete_checkpoints(root: Path) -> list[Path]:
    """Committed checkpoint folders (those with a manifest), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / MANIFEST).exists()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def newest_valid(root: Path, say=print, run_id: str | None = None) -> Path | None:
    """The newest checkpoint of run ``run_id`` that passes validation; broken ones are skipped, one line each.

    A checkpoint that names another run is never taken; one written before runs had ids
    belongs to whichever run holds its folder.
    """
    for p in root.iterdir() if root.is_dir() else []:
        if STEP_DIR.match(p.name) and not (p / MANIFEST).exists():
            say(f"skipping {p}: no {MANIFEST} (an unfinished save)")
    for folder in reversed(complete_checkpoints(root)):
        try:
            manifest = validate(folder)
            owner = manifest.get("run_id")
            if run_id is not None and owner not in (None, run_id):
                say(f"skipping {folder}: a checkpoint of another run ({owner}), not of this folder's ({run_id})")
                continue
            return folder
        except CheckpointError as e:
            say(f"skipping {folder}: {e}; falling back to the previous checkpoint")
    return None


def clean_stale(root: Path) -> list[Path]:
    """Remove leftovers of interrupted saves (rank 0, at start); restore a swapped-out one."""
    removed = []
    if not root.is_dir():
        return removed
    for p in root.iterdir():
        if p.name.startswith(".old-step-"):
            final = root / p.name[len(".old-") :].split(".")[0]
            if not final.exists():
                os.replace(p, final)  # a crash hit between swapping out and in: keep the old one
                continue
        if p.name.startswith((".tmp-step-", ".old-step-", PRUNED)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def read_model(
    folder: Path, manifest: dict, order: list[str] | None, map_location: torch.device | str = "cpu"
) -> tuple[dict[str, Any], str]:
    """(the model's state_dict, where it was) of a checkpoint: ``model.pt``, every rank's share, or the shards.

    Mapped, not read: validate() has just paged the files in; load_state_dict copies the
    tensors out. ``order``: the model's keys in state_dict order (``train.pt`` keeps it).
    """
    if is_sharded(manifest):  # --strategy fsdp: gathered whole in this process
        from ddp import dcp

        shards = dcp.load(folder / SHARDED, keys={"model"})[0]["model"]  # the optimizer's shards stay on disk
        return {k: v.to(map_location) for k, v in shards.items()}, f"{SHARDED}/model"
    if MODEL in manifest["files"]:
        return load(folder / MODEL, map_location, expect="torch", mmap=True), MODEL
    merged: dict[str, Any] = {}
    for name in sorted(n for n in manifest["files"] if MODEL_FILE.match(n)):
        merged.update(load(folder / name, map_location, expect="torch", mmap=True))
    order = order if order is not None and set(order) == set(merged) else list(merged)
    return {k: merged[k] for k in order}, "model-*.pt"


# ---- staging for asynchronous saves ---------------------------------------------------


def stage(obj: Any, buffers: dict[str, torch.Tensor], key: str = "", seen: dict | None = None) -> Any:
    """A copy of ``obj`` whose tensors live in reusable CPU buffers.

    Buffers are kept from one save to the next: touching freshly allocated memory
    costs more than the copy itself on these machines. A tensor met twice (a tied
    weight, under two names) is copied once and staged as one tensor, as torch.save
    would have stored it.
    """
    seen = {} if seen is None else seen
    if isinstance(obj, torch.Tensor):
        shared = storage_key(obj) if obj.numel() else None
        if shared in seen:
            return seen[shared]
        buf = buffers.get(key)
        if buf is None or buf.shape != obj.shape or buf.dtype != obj.dtype or buf.stride() != obj.stride():
            # empty_like: the same layout (a channels_last weight stays one in the checkpoint)
            buf = torch.empty_like(obj, device="cpu", pin_memory=obj.is_cuda)
            buffers[key] = buf
        buf.copy_(obj.detach(), non_blocking=obj.is_cuda)
        if shared is not None:
            seen[shared] = buf
        return buf
    if isinstance(obj, dict):
        staged = type(obj)((k, stage(v, buffers, f"{key}/{k}", seen)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # a module state_dict's versions: load_state_dict reads them
            staged._metadata = obj._metadata
        return staged
    if isinstance(obj, (list, tuple)):
        return type(obj)(stage(v, buffers, f"{key}/{i}", seen) for i, v in enumerate(obj))
    return obj


def remove_all(folders: list[Path]) -> None:
    """Delete these folders and everything in them (the background pruner's work)."""
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def read_state(folder: Path, map_location: torch.device | str = "cpu") -> tuple[dict, dict | None]:
    """(``train.pt`` with the whole ``model`` and ``optimizer`` state, this rank's own file or None) of a
    checkpoint of any layout: the model and optimizer gathered whole in this process."""
    state, own, manifest = read_train(folder, map_location)
    if is_sharded(manifest):
        from ddp import dcp

        shards, _ = dcp.load(folder / SHARDED)
        state.update(model=shards["model"], optimizer=optimizer_by_index(shards["optim"]))
        return state, own
    state["model"], _ = read_model(folder, manifest, state.pop("model_keys", None), map_location)
    for name in sorted(n for n in manifest["files"] if OPTIM_FILE.match(n)):  # the ranks' shares (see spread)
        state["optimizer"]["state"].update(load(folder / name, map_location, expect="torch", mmap=True))
    return state, own


def read_train(folder: Path, map_location: torch.device | str = "cpu") -> tuple[dict, dict | None, dict]:
    """(``train.pt``, this rank's own file or None, manifest): all but the model and a sharded optimizer."""
    manifest = read_manifest(folder)
    state = load(folder / TRAIN, map_location, expect="torch", mmap=True)
    own_path = folder / rank_file(group.rank())
    own = load(own_path, "cpu", expect="torch") if own_path.exists() else None
    return state, own, manifest
