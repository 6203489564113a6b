"""Saving and loading tensors and models: the textbook's first lesson, made safe.

Every write is atomic (temp file in the same folder, fsync, ``os.replace``), so a crash
never leaves a half-written file under the final name nor destroys the previous one.
Every read uses ``torch.load(weights_only=True)`` with a ``map_location``, so no file can
run code and a file written on a GPU loads on a CPU-only host.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import stat
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy  # a lazy layer takes its shape from the file

from ddp import faults, group
from ddp.errors import (
    ArchitectureMismatchError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    UnsafeCheckpointError,
    first_line,
)

PREFIXES = ("module.", "_orig_mod.")
"""Added to every key by the wrappers, DistributedDataParallel and torch.compile."""


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (POSIX: fsync the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write a file through ``write(f)`` and fsync it; OSErrors become CheckpointWriteError."""
    path = Path(path)
    try:
        faults.before_save_write(group.rank(), path)
        with open(path, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        code = errno.errorcode.get(e.errno or 0, "error")
        hint = " (disk full: free space or pick another --out)" if e.errno == errno.ENOSPC else ""
        raise CheckpointWriteError(f"could not write {path}: {code} {e.strerror}{hint}") from e


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write a file through ``write(f)``, all or nothing.

    The bytes go to a temp file beside ``path``, are flushed and fsynced, then renamed
    over ``path``. On any failure the temp file is removed and ``path`` is untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    existed = path.exists()
    try:
        write_durable(tmp, write)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except CheckpointWriteError as e:
        tmp.unlink(missing_ok=True)
        kept = f"the previous {path.name} is intact" if existed else f"no {path.name} was written"
        raise CheckpointWriteError(f"{e}; {kept}") from e.__cause__
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def is_file_name(name: object) -> bool:
    """Whether a name read from a file (a shard, a probe, a data file) is a plain file name: beside the file that
    names it, never a path out of its folder."""
    return isinstance(name, str) and "/" not in name and name not in ("", ".", "..")


def check_regular(path: Path, error: type[Exception], limit: int | None = None, named_by: Path | None = None) -> int:
    """``path``'s size if it is a regular file (of at most ``limit`` bytes), else ``error`` naming it (and the file
    that ``named_by`` it, where another file pointed to it).

    Files people download are outside input: a pipe or a device in their place would block a
    read for ever, or never end it; a metadata file of gigabytes would be read whole.
    """
    st = path.stat()
    where = str(path) if named_by is None else f"{path} (named by {named_by})"
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{where} is not a regular file (a pipe, device or socket): refused without reading it")
    if limit is not None and st.st_size > limit:
        raise error(f"{where} holds {st.st_size} bytes, more than such a file can ({limit}): refused without reading")
    return st.st_size


def detect_format(path: str | os.PathLike) -> str:
    """What a file holds: 'torch', 'torch-legacy' or 'safetensors'; else a clear error."""
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"{path} does not exist; check the path (or --out)")
    if path.is_dir():
        raise CheckpointFormatError(
            f"{path} is a folder; expected a weights file (a checkpoint folder holds manifest.json)"
        )
    size = check_regular(path, CheckpointFormatError)
    with open(path, "rb") as f:
        head = f.read(9)
    if size == 0:
        raise CheckpointFormatError(f"{path} is empty (0 bytes); expected a torch or safetensors file")
    if head.startswith(b"PK\x03\x04"):
        _check_torch_zip(path)
        return "torch"
    # safetensors before the legacy pickle: its 8-byte header length can begin with 0x80 too
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= size - 8:
        return "safetensors"
    if head[:1] == b"\x80":
        return "torch-legacy"
    found = "text" if _looks_like_text(head) else f"unknown bytes {head[:4]!r}"
    raise CheckpointFormatError(
        f"{path} is not a checkpoint: expected a torch (zip) or safetensors file, found {found}"
    )


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c.isspace() for c in text)


def _check_torch_zip(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, ValueError, OverflowError) as e:  # a damaged name decodes badly, a size overflows
        raise CheckpointCorruptError(f"{path} is a damaged torch file (truncated or altered zip): {e}") from e
    if not any(n.endswith("data.pkl") for n in names):
        raise CheckpointFormatError(
            f"{path} is a zip archive but not a torch checkpoint (no data.pkl among {names[:3]}); "
            "expected a file written by torch.save or ddp.save"
        )


def save(obj: Any, path: str | os.PathLike, format: str = "torch") -> None:
    """Save a tensor, a list of tensors or a dict of tensors (or a state_dict), atomically.

    ``format="safetensors"`` takes a dict of str to tensor and stores no pickle at all.
    """
    if format == "safetensors":
        save_safetensors(obj, path)
    elif format == "torch":
        atomic_write(path, lambda f: torch.save(obj, f))
    else:
        raise CheckpointFormatError(f"unknown format {format!r}; use torch or safetensors")


ALIASES = "ddp.aliases"  # safetensors metadata: {name: name it shares storage with}, as JSON


def save_safetensors(
    tensors: dict[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: dict | None = None,
) -> None:
    """Save a flat dict of tensors as safetensors, atomically.

    safetensors refuses tensors that share memory; a tied weight (one tensor under two
    names, such as a language model's embedding and output layer) is stored once and the
    other name recorded in the metadata, so ``load_safetensors`` gives both names back as
    one tensor.
    """
    from safetensors.torch import save as st_save

    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise CheckpointFormatError(
            "safetensors stores a dict of str -> tensor only; use format='torch' for other objects"
        )
    unique, aliases = split_aliases(tensors)
    meta = dict(metadata or {})
    if aliases:
        meta[ALIASES] = json.dumps(aliases)
    data = st_save({k: v.detach().contiguous().cpu() for k, v in unique.items()}, metadata=meta or None)
    atomic_write(path, lambda f: f.write(data))


def storage_key(t: torch.Tensor) -> tuple:
    """Equal for two tensors that are the same view of the same memory (a tied weight's two names)."""
    if t.is_meta:  # no memory to share: a shape read from metadata is only itself
        return (id(t),)
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def split_aliases(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors stored once, {alias: the name it repeats}) for tensors that are views of the same data."""
    first: dict[tuple, str] = {}
    unique, aliases = {}, {}
    for name, t in tensors.items():
        key = storage_key(t)
        if t.numel() and key in first:
            aliases[name] = first[key]
        else:
            first.setdefault(key, name)
            unique[name] = t
    return unique, aliases


def load(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    *,
    expect: str | None = None,
    mmap: bool = False,
) -> Any:
    """Load what ``save`` wrote, with the weights-only loader, onto ``map_location``.

    Args:
        expect: 'torch' or 'safetensors' to refuse the other format with a clear error.
        mmap: map a torch file's storages instead of reading them (faster for big files).
    """
    path = Path(path)
    found = detect_format(path)
    if expect is not None and not found.startswith(expect):
        raise CheckpointFormatError(f"{path} is a {found} file, but a {expect} file is expected here")
    if found == "safetensors":
        return load_safetensors(path, map_location)[0]
    try:
        use_mmap = mmap and found == "torch"  # a legacy (non-zip) file cannot be mapped
        return torch.load(path, map_location=map_location, weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{path} holds objects the weights-only loader refuses ({_unpickler_reason(e)}). It may run code "
            "when unpickled, so it was not loaded; re-save it as a plain state_dict from code you trust"
        ) from None
    except DAMAGED as e:
        raise CheckpointCorruptError(f"{path} could not be read, it is truncated or damaged: {first_line(e)}") from e


# What torch's readers raise on damaged bytes: the weights-only unpickler indexes its stack and memo
# with what the bytes say, so a flipped byte can raise any of these (the fuzz tests found them).
DAMAGED = (
    RuntimeError, EOFError, zipfile.BadZipFile, ValueError, IndexError, KeyError, TypeError, AttributeError,
    OverflowError, struct.error,
)  # fmt: skip


def _unpickler_reason(e: BaseException) -> str:
    for line in str(e).splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].split(". Please use")[0].strip()
    return first_line(e)


def load_safetensors(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[dict, dict]:
    """Load a safetensors file: (tensors, metadata). No pickle is involved."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    data = Path(path).read_bytes()
    try:
        tensors = st_load(data)
        header_len = struct.unpack("<Q", data[:8])[0]
        metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__", {}) or {}
        aliases = json.loads(metadata.get(ALIASES, "{}"))
    except (SafetensorError, ValueError) as e:
        raise CheckpointCorruptError(f"{path} is a damaged safetensors file: {e}") from e
    tensors = {k: v.to(map_location) for k, v in tensors.items()}
    missing = sorted(set(aliases.values()) - set(tensors))
    if missing:
        raise CheckpointCorruptError(f"{path}: the metadata's {ALIASES} name tensors the file lacks: {missing}")
    tensors.update({alias: tensors[name] for alias, name in aliases.items()})  # one tensor, both names
    return tensors, metadata


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under DDP (``module``) and torch.compile (``_orig_mod``) wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def strip_prefixes(
    state_dict: dict[str, Any], prefixes: tuple[str, ...] = PREFIXES
) -> tuple[dict[str, Any], list[str]]:
    """Remove wrapper prefixes shared by every key; returns the dict and the prefixes removed."""
    stripped: list[str] = []
    changed = True
    while changed and state_dict:
        changed = False
        for prefix in prefixes:
            if all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
                stripped.append(prefix)
                changed = True
    return state_dict, stripped


def save_model(
    model: nn.Module, path: str | os.PathLike, format: str = "torch", state: dict[str, Any] | None = None
) -> Path:
    """Called by every rank: rank 0 saves the unwrapped state_dict atomically, all wait.

    ``state``: rank 0's whole state_dict to save instead of the model's own (gathered from
    the shards of an FSDP model). If the write fails, every rank raises (naming the path
    and the error); none hangs.
    """
    path = Path(path)
    error = None
    if group.rank() == 0:
        try:
            save(unwrap(model).state_dict() if state is None else state, path, format=format)
        except CheckpointError as e:
            error = e
    group.raise_if_any_failed(error, f"saving {path}")
    return path


def load_model(model: nn.Module, path: str | os.PathLike, *, verbose: bool = True) -> nn.Module:
    """Load a weights file strictly into ``model``, on the model's own device.

    Keys saved from a DDP or compiled model (``module.``, ``_orig_mod.``) are accepted,
    with one line saying which prefix was stripped.
    """
    target = unwrap(model)
    device = next(iter(target.state_dict().values()), torch.empty(0)).device
    state = load(path, map_location=device)
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"{path} holds a {type(state).__name__}, not a state_dict (a dict of tensors)")
    state, stripped = strip_prefixes(state)
    if stripped and verbose and group.rank() == 0:
        print(
            f"load_model: stripped prefix {' and '.join(repr(p) for p in stripped)} from the keys of {path}",
            flush=True,
        )
    check_architecture(target, state, path)
    target.load_state_dict(state, strict=True)
    return model


def check_architecture(model: nn.Module, state: dict[str, Any], path: str | os.PathLike) -> None:
    """Raise ArchitectureMismatchError listing missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and isinstance(state[k], torch.Tensor) and not is_lazy(v) and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{name} ({len(items)}): {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}"
            for name, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", shapes),
            )
            if items
        ]
        raise ArchitectureMismatchError(
            f"{path} does not fit {type(model).__name__}: " + "; ".join(parts) + ". Build the model with the settings "
            "it was trained with (see `ddp inspect`)"
        )


DCP_METADATA = ".metadata"
"""The file that makes a folder a torch.distributed.checkpoint (DCP) checkpoint."""


def is_dcp(path: Path) -> bool:
    """Whether ``path`` is a DCP checkpoint folder (told without importing DCP, which costs 0.8 s)."""
    return path.is_dir() and (path / DCP_METADATA).is_file()
