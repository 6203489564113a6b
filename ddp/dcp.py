"""``torch.distributed.checkpoint`` (DCP) folders, read and written without running any code.

DCP is what torchtitan and FSDP jobs write: a folder with a ``.metadata`` file and one
``__R_N.distcp`` data file per writing rank. PyTorch's own reader unpickles ``.metadata``
without any restriction, and non-tensor entries with the unrestricted torch loader;
either runs whatever code a crafted file names. Here the metadata goes through an
unpickler that admits only DCP's own metadata classes (and dtypes, sizes, paths), and
non-tensor entries through the weights-only loader; tensors are read by PyTorch's own
``FileSystemReader`` as always. Everything else is PyTorch's API.
"""

from __future__ import annotations

import base64
import contextlib
import io
import itertools
import os
import pickle
import pickletools
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._traverse import get_element, set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from ddp.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointNotFoundError,
    UnsafeCheckpointError,
    first_line,
)
from ddp.io import DCP_METADATA, check_regular, fsync_dir, is_dcp, is_file_name

METADATA = DCP_METADATA

# Every class DCP pickles into .metadata (torch 2.4-2.13), and nothing that can run code.
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "StorageMeta",
        "MetadataIndex",
        "TensorProperties",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "BytesStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata; any other class is refused by name."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _Refused(f"{module}.{name} is not part of DCP metadata")


class _Refused(pickle.UnpicklingError):
    """A class that DCP metadata never holds."""


MAX_METADATA_BYTES = 2**30
"""DCP's metadata lists every tensor's chunks: tens of MB for the largest models; a GiB bounds a foreign one."""


def read_metadata(folder: Path) -> Metadata:
    """A DCP folder's metadata, unpickled with DCP's own classes only.

    Every length the pickle claims is checked against the file's bytes first (``pickletools``
    reads them without allocating): the unpickler would allocate what a damaged length says.
    """
    path = folder / METADATA
    check_regular(path, CheckpointCorruptError, limit=MAX_METADATA_BYTES)
    data = path.read_bytes()
    try:
        for _ in pickletools.genops(data):
            pass
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except _Refused as e:
        raise UnsafeCheckpointError(
            f"{path} names {e}, so it was not loaded: a DCP metadata file holds only DCP's own "
            "classes; one naming others may run code when unpickled. Re-save the checkpoint from code you trust"
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError) as e:
        raise CheckpointCorruptError(f"{path} is damaged or truncated ({e}); it cannot be read") from e
    if not isinstance(metadata, Metadata):
        raise CheckpointCorruptError(f"{path} holds a {type(metadata).__name__}, not DCP Metadata")
    try:
        wrong = _malformed(metadata)
    except (AttributeError, TypeError) as e:  # an object unpickled without the fields its class has
        wrong = str(e)
    if wrong:
        raise CheckpointCorruptError(f"{path} is damaged or was not written by DCP: {wrong}; do not load it")
    return metadata


def _malformed(metadata: Metadata) -> str | None:
    """What in ``metadata`` is not as DCP writes it, or None: each data file a plain name in the folder (never a
    path out of it), each offset and length a count, each entry a tensor's shape and dtype or a bytes entry."""
    for info in (metadata.storage_data or {}).values():
        name = info.relative_path
        if not is_file_name(name):
            return f"a data file named {name!r}, not a file inside the folder"
        if not all(isinstance(n, int) and n >= 0 for n in (info.offset, info.length)):
            return f"the data of {name} at offset {info.offset!r}, length {info.length!r}"
    if not isinstance(metadata.state_dict_metadata, dict) or not isinstance(metadata.planner_data or {}, dict):
        return "its table of entries is not a table"
    for key, entry in metadata.state_dict_metadata.items():
        if isinstance(entry, TensorStorageMetadata):
            ok = isinstance(entry.size, torch.Size) and isinstance(entry.properties.dtype, torch.dtype)
        else:
            ok = isinstance(entry, BytesStorageMetadata)
        if not ok or not isinstance((metadata.planner_data or {}).get(key, ()), (tuple, list)):
            return f"the entry {key!r}"
    return None


class _SafeReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _CountingReader(_SafeReader):
    """Counts the bytes this rank reads (the saved chunks its plan asks for, each read whole) of those stored
    for every entry asked for."""

    bytes_read = bytes_stored = 0

    def read_data(self, plan: Any, planner: Any) -> Any:
        chunks = {item.storage_index for item in plan.items}
        self.bytes_read += sum(self.storage_data[c].length for c in chunks)
        wanted = planner.state_dict  # flattened: the saved keys
        self.bytes_stored += sum(v.length for k, v in self.storage_data.items() if k.fqn in wanted)
        return super().read_data(plan, planner)


class _WeightsOnlyBytes:
    """Non-tensor entries through the weights-only loader (DCP's own planners unpickle anything)."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(
                f"entry {read_item.dest_index.fqn!r} of the DCP checkpoint holds objects the weights-only loader "
                f"refuses ({first_line(e)[:200]}); it was not loaded"
            ) from None
        if self.flatten_state_dict:  # put it back where it was nested, as DefaultLoadPlanner does
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class _SafePlanner(_WeightsOnlyBytes, _EmptyStateDictLoadPlanner):
    """Rebuilds the saved state from the metadata alone (only the entries under ``keys``, if given)."""

    def _should_include_key(self, key: str, metadata: Metadata) -> bool:
        # PyTorch's own fails on a folder saved unflattened (no planner_data) when given keys
        if self.keys is None:
            return True
        path = (metadata.planner_data or {}).get(key, (key,))
        return any(name in self.keys for name in itertools.accumulate(map(str, path), lambda a, b: f"{a}.{b}"))


class _SafeLoadPlanner(_WeightsOnlyBytes, DefaultLoadPlanner):
    """Loads into the caller's state dict (its DTensors take their own shards)."""


def load(folder: str | os.PathLike, keys: set[str] | None = None) -> tuple[dict[str, Any], Metadata]:
    """What a DCP folder holds, as one (nested) dict of full CPU tensors and values.

    Sharded tensors come back whole, so a checkpoint written by N ranks loads in one
    process. Reads on this process only; no process group is needed or used.

    Args:
        keys: read only these entries, each a saved key or the dotted path of a nested one
            (``{"model"}`` leaves a torchtitan checkpoint's optimizer state unread); all if None.
    """
    folder = Path(folder)
    metadata = check_files(folder)
    state: dict[str, Any] = {}
    with _read_errors(folder), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process": it is
        # the loader format_utils.dcp_to_torch_save uses: dcp.load keeps only keys the caller passes
        _load_state_dict(state, storage_reader=_SafeReader(folder), planner=_SafePlanner(keys=keys), no_dist=True)
    return state, metadata


def outline(folder: str | os.PathLike) -> tuple[dict[str, Any], Metadata]:
    """A DCP folder's nested structure without reading a tensor's bytes.

    Each tensor is a meta-device tensor of its whole shape and dtype; the non-tensor
    entries (steps, names: small) are read, through the weights-only loader as always.
    """
    folder = Path(folder)
    metadata = check_files(folder)
    entries = metadata.state_dict_metadata
    small = {k for k, v in entries.items() if isinstance(v, BytesStorageMetadata)}
    values = load(folder, keys=small)[0] if small else {}
    state: dict[str, Any] = {}
    for k, v in entries.items():  # in the saved order, as load gives them
        path = (metadata.planner_data or {}).get(k, (k,))
        if isinstance(v, TensorStorageMetadata):
            set_element(state, path, torch.empty(v.size, dtype=v.properties.dtype, device="meta"))
        else:
            set_element(state, path, get_element(values, path))
    return state, metadata


def load_into(state: dict[str, Any], folder: str | os.PathLike) -> tuple[int, int]:
    """Called by every rank: fill ``state`` in place from a DCP folder, each DTensor with its own shard;
    (the bytes this rank read, the bytes stored for every entry of ``state``).

    The folder may have been written by any number of ranks: DCP reshards on load. A rank
    reads only the saved chunks that overlap its shards (each chunk whole), so a folder
    written by N ranks costs each of N ranks about 1/N of it.
    """
    folder = Path(folder)
    reader = _CountingReader(folder)
    with _read_errors(folder):
        dcp.load(state, storage_reader=reader, planner=_SafeLoadPlanner())
    return reader.bytes_read, reader.bytes_stored


def save_sharded(
    state: dict[str, Any], folder: str | os.PathLike, process_group: Any = None, writer: FileSystemWriter | None = None
) -> None:
    """Called by every rank: each writes its own shards of ``state`` into ``folder``, rank 0 the metadata; planned
    on ``process_group`` (the default group if None), written by ``writer`` (DCP's own if None).

    A rank's write error (a full disk) reaches every rank as a CheckpointError naming it.
    """
    try:
        dcp.save(state, storage_writer=writer or FileSystemWriter(folder), process_group=process_group)
    except CheckpointException as e:
        raise CheckpointError(f"writing the shards into {folder} failed: {_reasons(e)}") from None


class SlotWriter(FileSystemWriter):
    """DCP's file writer, but for this rank's data file, which another process writes (``--async-save process``,
    ``ddp.persist``'s writer) from the snapshot slot that the state's tensors are mapped from: off this process's
    GIL, in the layout DCP's own writer gives it.

    ``places``: each of the slot's tensors (by its data pointer here) -> its place in the slot's file ``data``;
    ``send(job)`` hands the writer process a job and returns its result. Where DCP's planner hands over a tensor
    that is not one of them, this rank's file is written here instead, by DCP's own code.
    """

    def __init__(
        self, folder: str | os.PathLike, data: Path, places: dict[int, list], send: Callable[[dict], Any]
    ) -> None:
        super().__init__(folder, thread_count=1)
        self.data, self.places, self.send = data, places, send
        self.entries: dict[str, dict] = {}  # file name -> its manifest entry, as the writer process hashed it

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        parts = [self._part(planner.resolve_data(item)) for item in plan.items]
        if any(part is None for part in parts):
            return super().write_data(plan, planner)
        name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"  # DCP's name for a rank's one data file
        job = {"kind": "distcp", "path": str(Path(self.path) / name), "data": str(self.data), "parts": parts}
        spans, self.entries[name] = self.send(job)
        future: Future[list[WriteResult]] = Future()
        future.set_result(
            [
                WriteResult(index=item.index, size_in_bytes=length, storage_data=_StorageInfo(name, offset, length))
                for item, (offset, length) in zip(plan.items, spans, strict=True)
            ]
        )
        return future

    def _part(self, data: torch.Tensor | io.BytesIO) -> dict | None:
        """How the writer process finds ``data``: its bytes, an empty tensor's dtype and shape, or its place in
        the slot; None where it is not one of the slot's tensors whole."""
        if isinstance(data, io.BytesIO):
            return {"bytes": base64.b64encode(data.getvalue()).decode()}
        if data.numel() == 0:
            return {"empty": [str(data.dtype).removeprefix("torch."), list(data.shape)]}
        place = self.places.get(data.data_ptr())
        strides = None if place is None or len(place) < 4 else place[3]
        whole = place is not None and list(data.shape) == list(place[2])
        if not whole or (list(data.stride()) != list(strides) if strides is not None else not data.is_contiguous()):
            return None
        return {"place": place}


def save_sharded_async(state: dict[str, Any], folder: str | os.PathLike, process_group: Any) -> Any:
    """Called by every rank: ``save_sharded`` in the background. This rank's shards are copied into CPU memory
    now (what training waits for), then written on DCP's thread, its collectives on ``process_group`` (a gloo
    group of their own: the training's collectives go on beside them); a future of the write."""
    return dcp.async_save(state, storage_writer=FileSystemWriter(folder), process_group=process_group)


def finish_sharded(future: Any, folder: str | os.PathLike) -> None:
    """Wait for a ``save_sharded_async``; a rank's write error reaches every rank as a CheckpointError naming it."""
    try:
        future.result()
    except CheckpointException as e:
        raise CheckpointError(f"writing the shards into {folder} failed: {_reasons(e)}") from None


def tensor_shapes(folder: str | os.PathLike, prefix: str = "") -> dict[str, torch.Size]:
    """The whole shape of each tensor whose key starts with ``prefix`` (removed), as the metadata records it."""
    entries = check_files(Path(folder)).state_dict_metadata.items()
    tensors = [(k, v) for k, v in entries if isinstance(v, TensorStorageMetadata)]
    return {k[len(prefix) :]: v.size for k, v in tensors if k.startswith(prefix)}


def check_files(folder: Path) -> Metadata:
    """The metadata, after checking that every data file it names is there and long enough."""
    if not is_dcp(folder):
        raise CheckpointNotFoundError(f"{folder} is not a DCP checkpoint folder (no {METADATA} in it)")
    metadata = read_metadata(folder)
    missing = sorted(
        {info.relative_path for info in (metadata.storage_data or {}).values()} - {p.name for p in folder.iterdir()}
    )
    if missing:
        raise CheckpointCorruptError(
            f"{folder}: {METADATA} names data files that are missing: {', '.join(missing)}; "
            "copy the whole folder (every rank wrote one)"
        )
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        if (size := (folder / name).stat().st_size) < end:
            raise CheckpointCorruptError(f"{folder / name} has {size} bytes, {METADATA} says {end} (truncated?)")
    return metadata


@contextlib.contextmanager
def _read_errors(folder: Path) -> Iterator[None]:
    """DCP's CheckpointException (a BaseException holding each rank's error) as one clear error."""
    try:
        yield
    except CheckpointException as e:
        for error in _failures(e):
            if isinstance(error, UnsafeCheckpointError):
                raise UnsafeCheckpointError(f"{folder}: {error}") from None
        raise CheckpointCorruptError(f"{folder}: a DCP data file is damaged or truncated ({_reasons(e)})") from None


def _failures(e: CheckpointException) -> list[BaseException]:
    return [failure[0] if isinstance(failure, tuple) else failure for failure in e.failures.values()]


def _reasons(e: CheckpointException) -> str:
    """Each failing rank's error; the rank named only where there are several to tell apart."""
    errors = dict(zip(e.failures, _failures(e), strict=True))
    named = len(errors) > 1 or set(errors) != {0}
    return "; ".join(f"{f'rank {r}: ' if named else ''}{type(x).__name__}: {x}".rstrip(": ") for r, x in errors.items())


def save(state: dict[str, Any], folder: str | os.PathLike) -> None:
    """Write ``state`` as a DCP folder from this one process, all or nothing.

    The folder is written under a temporary name and renamed into place, so an
    interrupted export leaves no folder that looks complete.
    """
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the single-process warning, as above
            dcp.save(dict(state), storage_writer=FileSystemWriter(tmp), no_dist=True)
        os.replace(tmp, folder)
        fsync_dir(folder.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def describe(metadata: Metadata) -> dict[str, Any]:
    """What ``ddp inspect`` shows of DCP metadata: version, files, non-tensor entries."""
    files = sorted({info.relative_path for info in (metadata.storage_data or {}).values()})
    values = sorted(k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata))
    return {"dcp_version": getattr(metadata, "version", None), "data_files": files, "non_tensor_entries": values}
