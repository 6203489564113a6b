"""A model's weights, found in any file that holds tensors, and written in any format.

People bring weights from everywhere: the textbook's ``mlp.params``, the DDP tutorial's
``snapshot.pt`` (``{"MODEL_STATE": ..., "EPOCHS_RUN": ...}``), Lightning's ``.ckpt``
(``state_dict`` with a ``model.`` prefix), Hugging Face's ``model.safetensors`` and its
sharded sets (``model.safetensors.index.json``), torchtitan's and FSDP's
``torch.distributed.checkpoint`` folders, and this project's checkpoints. ``read`` finds
the tensors in each (``found_at`` says where, ``stripped`` which wrapper prefixes it
removed) without needing the architecture; ``write`` converts them among torch,
safetensors and DCP. Nothing read here can run code: torch files go through the
weights-only loader, DCP through ``ddp.dcp``, safetensors hold no code at all.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddp import model_card
from ddp.checkpoint_files import (
    MANIFEST,
    MODEL,
    MODEL_FILE,
    SHARDED,
    TRAIN,
    digest_of,
    is_sharded,
    read_model,
    validate,
)
from ddp.config import Config, TaskConfig
from ddp.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    ConfigError,
    first_line,
)
from ddp.fsdp import tied
from ddp.io import (
    PREFIXES,
    check_architecture,
    check_regular,
    detect_format,
    is_dcp,
    is_file_name,
    load,
    load_safetensors,
    save,
    save_safetensors,
    strip_prefixes,
)
from ddp.model import builtin_from_state_dict

# Where training scripts keep the weights inside a bigger dict, most common first.
WEIGHT_KEYS = (
    "state_dict",  # Lightning, many scripts
    "model_state_dict",  # PyTorch's saving-for-resume recipe
    "model",  # torchtitan, timm, fairseq
    "module",  # DeepSpeed
    "MODEL_STATE",  # pytorch/examples' DDP tutorial snapshot
    "model_state",
    "net",
    "network",
    "weights",
    "params",
)
# Subtrees with training state, not weights: never searched for a model's tensors.
TRAINING_STATE = ("optim", "scheduler", "scaler", "lr_", "rng")
# Other people's files also carry LightningModule's attribute for the user's model.
FOREIGN_PREFIXES = (*PREFIXES, "model.")
FORMATS = ("torch", "safetensors", "dcp")
"""What ``write`` writes (and ``ddp export --format`` takes)."""


@dataclasses.dataclass
class Weights:
    """A model's weights as found in a file or folder, with what is known of them."""

    path: Path
    """What was read: a file, a checkpoint or DCP folder, or a sharded set's index."""
    format: str
    """torch, torch-legacy, safetensors, safetensors-sharded, torch-sharded or dcp."""
    state: dict[str, torch.Tensor]
    """The tensors by name, wrapper prefixes stripped."""
    found_at: str = ""
    """The key path of the weights inside the file ('' = the whole file), keys joined by '/'."""
    stripped: list[str] = dataclasses.field(default_factory=list)
    """Prefixes removed from every name, outermost first."""
    other_entries: list[str] = dataclasses.field(default_factory=list)
    """The file's other top-level entries (epoch, optimizer, ...), which are not weights."""
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The format's own metadata: safetensors metadata, an index's, DCP's."""
    cfg: Config | None = None
    """The training config: a checkpoint's own, or recognised from a built-in model's shapes."""
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    """What else a checkpoint of this project says: step, epoch, world_size, integrity."""
    probe: Any = None
    """The input the weights were verified with, from their model card (None without one)."""

    def named(self, keep_prefixes: bool = False) -> dict[str, torch.Tensor]:
        """The tensors, under their names in the file when ``keep_prefixes``."""
        prefix = "".join(self.stripped) if keep_prefixes else ""
        return {prefix + k: v for k, v in self.state.items()}


def read(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    *,
    key: str | None = None,
    mmap: bool = False,
    shapes_only: bool = False,
) -> Weights:
    """The weights in ``path``: a file, a checkpoint folder, a DCP folder or a sharded set.

    Args:
        key: where the weights are inside a nested file (``ema`` or ``model/ema``) when
            the file holds more than one set; found automatically otherwise.
        mmap: map a torch file instead of reading it (listing tensors then reads nothing).
        shapes_only: only names, shapes and dtypes are wanted (``ddp inspect``): a DCP
            folder's tensors are then meta-device tensors, its data files never read.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"{path} does not exist; check the path")
    if path.name == MANIFEST or (path.is_dir() and _is_checkpoint(path)):
        return _read_checkpoint(path if path.is_dir() else path.parent, map_location)
    if is_dcp(path):
        return _read_dcp(path, map_location, key, shapes_only)
    if path.is_dir():
        path = _the_file_in(path)
    if path.name.endswith(".index.json"):
        return _read_sharded(path, map_location, key)
    fmt = detect_format(path)
    if fmt == "safetensors":
        state, metadata = load_safetensors(path, map_location)
        return _with_card(_found(path, fmt, state, key, map_location, metadata))
    return _with_card(_found(path, fmt, load(path, map_location, mmap=mmap), key, map_location, {}))


def _with_card(w: Weights) -> Weights:
    """``w`` with the config and probe of the model card beside it, where there is one (``ddp.model_card``)."""
    card = model_card.read(w.path)
    if card is not None:
        try:
            w.cfg = Config.from_dict(card[0])
        except (ConfigError, AttributeError, TypeError, ValueError, KeyError) as e:
            path = model_card.card_path(w.path)
            raise CheckpointCorruptError(
                f"{path} holds no config this ddp reads ({first_line(e)}); move it away"
            ) from e
        w.probe = card[1]
        w.metadata = {**w.metadata, "model_card": model_card.card_path(w.path).name}
    return w


def _is_checkpoint(folder: Path) -> bool:
    return (folder / MANIFEST).exists() or ((folder / MODEL).exists() and (folder / TRAIN).exists())


def _the_file_in(folder: Path) -> Path:
    """The one weights file a folder holds: a run's ``<task>.params`` (mlp.params), or (Hugging Face's layout)
    an index or a single safetensors file."""
    if (folder / "mlp.params").is_file():
        return folder / "mlp.params"
    for pattern in ("*.params", "*.safetensors.index.json", "*.index.json", "*.safetensors"):
        found = sorted(folder.glob(pattern))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(p.name for p in found[:4])
            raise CheckpointFormatError(f"{folder} holds several weights files ({names}); name the one to read")
    raise CheckpointFormatError(
        f"{folder} is a folder without a checkpoint: expected {MANIFEST} or a <task>.params (this project), .metadata "
        "(torch.distributed.checkpoint), a *.index.json (a sharded set) or one .safetensors file"
    )


def _read_checkpoint(folder: Path, map_location: str | torch.device) -> Weights:
    manifest = validate(folder)
    train_state = load(folder / TRAIN, "cpu", expect="torch")
    state, found_at = read_model(folder, manifest, train_state.get("model_keys"), map_location)
    stored = train_state.get("config")  # None from a Checkpointer that was given no config
    cfg = None if stored is None else Config.from_dict(stored)
    info = {
        "step": manifest["step"],
        "epoch": train_state["epoch"],
        "world_size": manifest["world_size"],
        "torch_version": manifest["torch_version"],
        "integrity": f"ok: {len(manifest['files'])} files match the manifest (size, {digest_of(manifest)})",
    }
    state, stripped = strip_prefixes(state)  # this project's own files: wrapper prefixes only
    metadata = {"manifest": manifest, "config": None if cfg is None else cfg.to_dict()}
    others = [name for name in manifest["files"] if name != MODEL and not MODEL_FILE.match(name)]
    return Weights(folder, "torch", state, found_at, stripped, others, metadata, cfg, info)


def _read_dcp(folder: Path, map_location: str | torch.device, key: str | None, shapes_only: bool) -> Weights:
    """A DCP folder: where the weights are, from its metadata; then only they are read.

    A torchtitan checkpoint holds two to three times the model's bytes of optimizer state,
    which neither listing nor loading the weights needs.
    """
    from ddp import dcp  # torch.distributed.checkpoint: 0.8 s to import, for DCP folders only

    outline, metadata = dcp.outline(folder)
    found_at, state, others = find_tensors(outline, key, folder)
    if shapes_only:
        said = "ok: metadata of DCP's own classes only, every data file as long as it says (tensors not read)"
        return _weights(folder, "dcp", found_at, state, others, None, dcp.describe(metadata), {"integrity": said})
    # their whole top-level entry, or (torchtitan's layout) the tensors at the top level beside the rest
    loaded, _ = dcp.load(folder, keys={found_at.split("/")[0]} if found_at else set(state))
    _, state, _ = find_tensors(loaded, found_at or None, folder)
    return _weights(folder, "dcp", found_at, state, others, map_location, dcp.describe(metadata))


def _read_sharded(index: Path, map_location: str | torch.device, key: str | None) -> Weights:
    """A sharded set: an index whose ``weight_map`` names the file of every tensor."""
    check_regular(index, CheckpointCorruptError, limit=64 * 2**20)
    try:
        doc = json.loads(index.read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointCorruptError(f"{index} is not valid JSON ({e}); expected a sharded-checkpoint index") from e
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointFormatError(f"{index} has no weight_map; expected the index of a sharded set of weights")
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        if not is_file_name(shard):
            raise CheckpointCorruptError(f"{index}: the shard of {name!r} is {shard!r}, not a file beside the index")
        shards.setdefault(shard, []).append(name)
    for shard, names in shards.items():
        if not (index.parent / shard).is_file():
            raise CheckpointNotFoundError(
                f"{index} names shard {shard} (holding {len(names)} tensors, e.g. {names[0]}), which does not "
                f"exist in {index.parent}; copy every shard beside the index"
            )
    state: dict[str, torch.Tensor] = {}
    fmt = "torch"
    for shard, names in shards.items():
        shard_weights = read(index.parent / shard, map_location)
        fmt = "safetensors" if shard_weights.format == "safetensors" else "torch"
        tensors = shard_weights.named(keep_prefixes=True)
        lacking = [n for n in names if n not in tensors]
        if lacking:
            raise CheckpointCorruptError(
                f"{index} says shard {shard} holds {lacking[:3]}, but it does not; the set is inconsistent"
            )
        state.update({n: tensors[n] for n in names})
    metadata = {k: v for k, v in doc.items() if k != "weight_map"}
    metadata["shards"] = list(shards)
    return _found(index, f"{fmt}-sharded", state, key, map_location, metadata)


def _found(
    path: Path, fmt: str, obj: Any, key: str | None, map_location: str | torch.device, metadata: dict
) -> Weights:
    found_at, state, others = find_tensors(obj, key, path)
    return _weights(path, fmt, found_at, state, others, map_location, metadata)


def _weights(
    path: Path,
    fmt: str,
    found_at: str,
    state: dict[str, torch.Tensor],
    others: list[str],
    map_location: str | torch.device | None,
    metadata: dict,
    info: dict | None = None,
) -> Weights:
    """Weights of found tensors: moved to ``map_location`` (kept where they are if None), prefixes stripped."""
    if map_location is not None:
        state = {k: v.to(map_location) for k, v in state.items()}
    state, stripped = strip_prefixes(state, FOREIGN_PREFIXES)
    cfg = Config.from_dict(json.loads(metadata["config"])) if "config" in metadata else recognise(state)
    return Weights(path, fmt, state, found_at, stripped, others, metadata, cfg, info or {})


def find_tensors(obj: Any, key: str | None, path: Path) -> tuple[str, dict[str, torch.Tensor], list[str]]:
    """(key path, tensors by name, other top-level entries) of the weights inside ``obj``."""
    if key:
        inner = obj
        for i, part in enumerate(key.split("/")):
            if not isinstance(inner, dict) or _lookup(inner, part) is _MISSING:
                where = "/".join(key.split("/")[:i]) or "the top level"
                keys = list(inner)[:12] if isinstance(inner, dict) else type(inner).__name__
                raise ConfigError(f"--key {key}: {path} has no {part!r} at {where} (it has {keys})")
            inner = _lookup(inner, part)
        state = _tensors_of(inner)
        if not state:
            raise CheckpointFormatError(f"{path}: the entry at --key {key} holds no tensors")
        top = key.split("/")[0]
        return key, state, [str(k) for k in obj if str(k) != top] if isinstance(obj, dict) else []
    found = _search(obj, "")
    if found is None:
        raise CheckpointFormatError(f"{path} holds no tensors ({_summary(obj)}); expected a model's weights")
    if isinstance(found, list):
        paths = ", ".join(f"{p} ({n} tensors)" for p, n in found[:6])
        raise CheckpointFormatError(
            f"{path} holds several sets of tensors: {paths}; choose one with --key (e.g. --key {found[0][0]})"
        )
    at, state = found
    top = at.split("/")[0]
    if not at and isinstance(obj, dict):
        others = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    else:
        others = [str(k) for k in obj if str(k) != top] if isinstance(obj, dict) else []
    return at, state, others


_MISSING = object()


def _lookup(d: dict, part: str) -> Any:
    for k, v in d.items():
        if str(k) == part:
            return v
    return _MISSING


def _tensors_of(obj: Any) -> dict[str, torch.Tensor]:
    """The tensors directly in ``obj``: itself, its items, or its dict's tensor entries."""
    if isinstance(obj, torch.Tensor):
        return {"tensor": obj}
    if isinstance(obj, (list, tuple)) and obj and all(isinstance(v, torch.Tensor) for v in obj):
        return {str(i): v for i, v in enumerate(obj)}
    if isinstance(obj, dict):
        return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return {}


def _search(obj: Any, at: str) -> tuple[str, dict] | list[tuple[str, int]] | None:
    """The weights in ``obj``: a dict of tensors, under a common key, or the one set inside.

    Returns (key path, tensors), or a list of (key path, count) when several sets are
    equally likely, or None when ``obj`` holds no tensors.
    """
    direct = _tensors_of(obj)
    if direct and (not isinstance(obj, dict) or len(direct) == len(obj)):
        return at, direct
    if not isinstance(obj, dict):
        return None
    for key in WEIGHT_KEYS:
        if key in obj:
            found = _search(obj[key], _join(at, key))
            if found is not None:
                return found
    if direct:  # tensors beside other entries (torchtitan: the model's tensors at the top level)
        return at, direct
    sets = [
        found
        for k, v in obj.items()
        if isinstance(v, (dict, list, tuple)) and not str(k).lower().startswith(TRAINING_STATE)
        for found in [_search(v, _join(at, str(k)))]
        if found is not None
    ]
    if len(sets) == 1:
        return sets[0]
    if not sets:
        return None
    return [s for found in sets for s in (found if isinstance(found, list) else [(found[0], len(found[1]))])]


def _join(at: str, key: str) -> str:
    return f"{at}/{key}" if at else key


def _summary(obj: Any) -> str:
    if isinstance(obj, dict):
        keys = ", ".join(map(str, list(obj)[:8]))
        return f"a dict with keys {keys}" if obj else "an empty dict"
    return f"a {type(obj).__name__}"


def recognise(state: dict[str, torch.Tensor]) -> Config | None:
    """The config of a built-in model whose every name and shape ``state`` matches; else None."""
    found = builtin_from_state_dict(state)
    return None if found is None else Config(task=TaskConfig(spec=found[0], args=found[1]))


def fit_names(model: nn.Module, w: Weights) -> dict[str, torch.Tensor]:
    """``w``'s tensors under the names ``model`` uses: stripped, or with some prefixes kept.

    A model whose own first attribute is ``model`` wants the ``model.`` back.
    """
    expected = set(model.state_dict())
    ties = set(tied(model))
    for i in range(len(w.stripped) + 1):
        prefix = "".join(w.stripped[i:])
        names = {prefix + k for k in w.state}
        if names <= expected and expected - names <= ties:
            return {prefix + k: v for k, v in w.state.items()}
    return w.state


def with_ties(model: nn.Module, state: dict[str, torch.Tensor], path: Any) -> tuple[dict, dict[str, str]]:
    """``state`` with each name it lacks that ``model`` ties to a name it has (Hugging Face's files store a tied
    weight once: ``transformer.wte.weight``, not ``lm_head.weight``) filled from that name, as HF's loader does;
    and {filled name: the name it came from}. A usage error where a file holds two names of one tied parameter
    with different values: loading both would keep one silently."""
    groups: dict[str, list[str]] = {}
    for alias, first in tied(model).items():
        groups.setdefault(first, [first]).append(alias)
    filled: dict[str, str] = {}
    for names in groups.values():
        present = [n for n in names if n in state]
        if not present:
            continue
        differ = [n for n in present[1:] if not torch.equal(state[n], state[present[0]])]
        if differ:
            raise ConfigError(
                f"{path}: {present[0]} and {differ[0]} differ in the file, but the model ties them (one parameter); "
                "untie them in the model, or drop one from the file"
            )
        filled.update({n: present[0] for n in names if n not in state})
    return {**state, **{n: state[src] for n, src in filled.items()}}, filled


def load_into(model: nn.Module, w: Weights) -> nn.Module:
    """Load ``w`` strictly into ``model`` (on the model's device); mismatches are named, tied weights stored once
    are filled (``with_ties``)."""
    state, _ = with_ties(model, fit_names(model, w), w.path)
    check_architecture(model, state, w.path)
    model.load_state_dict(state, strict=True)
    return model


def write(w: Weights, out: Path, fmt: str, keep_prefixes: bool = False) -> None:
    """Write ``w``'s tensors, bitwise, as a plain state_dict in ``fmt`` (torch, safetensors or dcp)."""
    state = w.named(keep_prefixes)
    if fmt == "safetensors":
        meta = {} if w.cfg is None else {"config": json.dumps(w.cfg.to_dict())}
        save_safetensors(state, out, metadata=meta)
    elif fmt == "torch":
        save(state, out, format="torch")
    elif fmt == "dcp":
        from ddp import dcp  # torch.distributed.checkpoint: 0.8 s to import, for DCP folders only

        if out.exists():
            raise ConfigError(f"--output: {out} exists; DCP writes a folder, remove it or choose another name")
        dcp.save(state, out)
    else:
        raise ConfigError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")


def init_model(model: nn.Module, path: str | os.PathLike, skip: str | None = None) -> str:
    """``--init-from``: load the weights found in ``path`` (any format ``read`` takes) into ``model``; a line
    for the log.

    Strict: every tensor of the model must be in the file with its shape, and the file may
    hold no other, except the tensors whose names match ``skip`` (a regular expression),
    which keep their fresh initialisation. A mismatch is a usage error that names the tensors.
    """
    try:
        w = read(path, "cpu")
    except CheckpointError as e:
        raise ConfigError(f"--init-from: {e}") from None
    state, filled = with_ties(model, fit_names(model, w), path)
    expected = model.state_dict()
    taken = _check_fit(expected, state, path, skip)
    model.load_state_dict({k: state[k] for k in taken}, strict=False)
    return _init_note(path, w, taken, [k for k in expected if k not in taken], filled, tied(model))


def sharded_source(path: str | os.PathLike) -> tuple[Path, str | None] | None:
    """(DCP folder, key of the weights in it) where ``path`` is one each rank can read only its shards of: a DCP
    folder, or a checkpoint of a ``--strategy fsdp`` run; None for every other format (read whole)."""
    path = Path(path)
    folder = path.parent if path.name == MANIFEST else path
    if folder.is_dir() and (folder / MANIFEST).is_file():
        try:  # sizes only: hashing would read every rank's shards on every rank
            return (folder / SHARDED, "model") if is_sharded(validate(folder, hashes=False)) else None
        except CheckpointError as e:
            raise ConfigError(f"--init-from: {e}") from None
    return (path, None) if is_dcp(path) else None


def init_sharded(model: nn.Module, path: str | os.PathLike, skip: str | None = None) -> str:
    """Called by every rank: ``--init-from`` into a sharded (FSDP) model from a DCP source (``sharded_source``).

    Each rank reads only the saved chunks that overlap its own shards, so no rank ever
    holds, or reads, the whole model; the check is ``init_model``'s, made from the metadata
    before a byte of a tensor is read.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    from ddp import dcp, group

    found = sharded_source(path)
    if found is None:
        raise ConfigError(f"--init-from {path}: not a DCP folder or an FSDP checkpoint; it loads before sharding")
    folder, key = found
    try:
        outline_, _ = dcp.outline(folder)
        found_at, tensors, others = find_tensors(outline_, key, folder)
    except CheckpointError as e:
        raise ConfigError(f"--init-from: {e}") from None
    stripped_state, stripped = strip_prefixes(tensors, FOREIGN_PREFIXES)
    w = Weights(folder, "dcp", stripped_state, found_at, stripped, others)
    names = fit_names(model, w)  # the model's name -> the (meta) tensor
    in_file = dict(zip(names, tensors, strict=True))  # the model's name -> the name in the file
    expected = get_model_state_dict(model)  # this rank's shards, DTensors of the whole shapes
    taken = _check_fit(expected, names, path, skip)
    request: dict[str, Any] = {in_file[k]: expected[k] for k in taken}
    for part in reversed(found_at.split("/") if found_at else []):
        request = {part: request}  # nested as saved: DCP flattens both sides the same way
    read_bytes, stored = dcp.load_into(request, folder)
    set_model_state_dict(model, {k: expected[k] for k in taken}, options=StateDictOptions(strict=False))
    each = ", ".join(_size(b) for b in group.all_gather_objects(read_bytes))
    note = _init_note(path, w, taken, [k for k in expected if k not in taken])
    return f"{note}; each rank read only its shards' chunks: {each} of {_size(stored)}"


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.1f} KB" if n >= 2**10 else f"{n} B"


def _check_fit(expected: dict[str, Any], state: dict[str, Any], path: Any, skip: str | None) -> list[str]:
    """The model's names to take from ``state``; a usage error naming the tensors when it does not fit."""
    skipped = re.compile(skip).search if skip else (lambda _: None)
    missing = [k for k in expected if k not in state and not skipped(k)]
    unexpected = [k for k in state if k not in expected and not skipped(k)]
    shapes = [
        f"{k} {tuple(state[k].shape)} in the file, {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if k in state and not skipped(k) and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = [f"{what}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
                 for what, items in (("missing from the file", missing), ("not in the model", unexpected),
                                     ("of another shape", shapes)) if items]  # fmt: skip
        raise ConfigError(
            f"--init-from {path} does not fit the model: {'; '.join(parts)}. Build the model the file was trained "
            "with, or leave tensors fresh with --init-skip REGEX (e.g. '^output\\.' for a new head)"
        )
    return [k for k in expected if k in state and not skipped(k)]


def _init_note(
    path: Any, w: Weights, taken: list[str], left: list[str], filled: dict | None = None, ties: dict | None = None
) -> str:
    """The log line of ``--init-from``: what was loaded, what was tied, what --init-skip left fresh, truthfully."""
    filled, ties = filled or {}, ties or {}
    where = f" (found at {w.found_at!r})" if w.found_at else ""
    loaded = [k for k in taken if k not in filled]
    parts = [f"initialised from {path}{where}, {w.format}: {len(loaded)} tensors"]
    tied_in = {k: v for k, v in filled.items() if k in taken}
    # a name --init-skip matched still holds the loaded weights when it is tied to one that was loaded
    loaded_by_parameter = {ties.get(t, t): t for t in reversed(taken)}
    held = {k: loaded_by_parameter[ties.get(k, k)] for k in left if ties.get(k, k) in loaded_by_parameter}
    if tied_in:
        parts.append(f"{len(tied_in)} tied, stored once in the file: " + _pairs(tied_in))
    if held:
        parts.append(f"{len(held)} matched by --init-skip but tied to a loaded weight, holding it: " + _pairs(held))
    fresh = [k for k in left if k not in held]
    if fresh:
        parts.append(f"{len(fresh)} left fresh by --init-skip: {', '.join(fresh[:4])}")
    return "; ".join(parts)


def _pairs(names: dict[str, str]) -> str:
    return ", ".join(f"{k} = {v}" for k, v in list(names.items())[:4]) + (" ..." if len(names) > 4 else "")
