"""Hugging Face's layout, in and out: folders that ``from_pretrained`` loads, and models rebuilt from them.

``ddp export PATH --format hf --output DIR`` writes what ``save_pretrained`` would:
``model.safetensors`` (tied weights stored once, under the name HF keeps), sharded as
``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json`` above
``--max-shard-size``; ``config.json`` when the model is a ``transformers`` model; and the
tokenizer the run's tokens were made with. The other way, a folder with ``config.json``
rebuilds its model (a class of ``transformers`` itself: nothing from the folder runs), so
``ddp verify``, ``ddp predict`` and ``ddp inspect`` take what ``save_pretrained`` wrote.
``transformers`` is imported only for a model that is one, or a folder that names one.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddp.errors import CheckpointFormatError, ConfigError
from ddp.io import atomic_write, save_safetensors, split_aliases

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"
MAX_SHARD_SIZE = "5GB"
"""HF's own default: a model past it is written in shards of at most this many bytes."""
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """Bytes of ``5GB``, ``500MB``, ``2GiB`` or a plain number, as HF's ``max_shard_size`` reads them."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, re.IGNORECASE)
    if not found or float(found.group(1)) <= 0:
        raise ConfigError(f"--max-shard-size {text}: give a size such as 5GB, 500MB or 2GiB")
    return int(float(found.group(1)) * _UNITS[(found.group(2) or "").upper()])


def is_pretrained(model: nn.Module) -> bool:
    """Whether ``model`` is a ``transformers.PreTrainedModel`` (without importing transformers for one that is not)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def stored_once(state: dict[str, torch.Tensor], ties: dict[str, str]) -> dict[str, torch.Tensor]:
    """``state`` with each tied weight under one name: the model's first (``ties``: alias -> first name), as HF's
    ``save_pretrained`` stores it, and any other tensors that share memory once."""
    unique, _ = split_aliases(state)
    return {k: v for k, v in unique.items() if ties.get(k, k) == k or ties[k] not in unique}


def write_folder(
    state: dict[str, torch.Tensor],
    out: Path,
    *,
    max_shard: int,
    config: str | None = None,
    tokenizer: Path | None = None,
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """Write ``state`` into folder ``out`` as HF lays it out; the names of the files written.

    Each file is written atomically and the index last, so a reader never sees an index
    naming a shard not yet there; the shards of an earlier export that this one does not
    name are removed after.
    """
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", **(metadata or {})}  # HF's loader reads "format"
    shards = _split(state, max_shard)
    names = [WEIGHTS] if len(shards) == 1 else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in
                                                range(1, len(shards) + 1)]  # fmt: skip
    for name, shard in zip(names, shards, strict=True):
        save_safetensors(shard, out / name, metadata=meta)
    written = list(names)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(v.nbytes for v in state.values())},
            "weight_map": {k: name for name, shard in zip(names, shards, strict=True) for k in shard},
        }
        _write_text(out / INDEX, json.dumps(index, indent=2))
        written.append(INDEX)
    for stale in [*out.glob("model-*-of-*.safetensors"), out / WEIGHTS, out / INDEX]:
        if stale.name not in written and stale.exists():
            stale.unlink()
    if config is not None:
        _write_text(out / CONFIG, config)
        written.append(CONFIG)
    if tokenizer is not None:
        _write_text(out / TOKENIZER, tokenizer.read_text())
        _write_text(out / "tokenizer_config.json", json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
        written += [TOKENIZER, "tokenizer_config.json"]
    return written


def _split(state: dict[str, torch.Tensor], max_shard: int) -> list[dict[str, torch.Tensor]]:
    """Tensors in order, into shards of at most ``max_shard`` bytes (a bigger tensor alone in its own), as HF does."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        if shards[-1] and size + t.nbytes > max_shard:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    return shards


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def config_json(model: nn.Module) -> str | None:
    """The ``config.json`` of a ``transformers`` model, naming its class as ``save_pretrained`` does; else None."""
    if not is_pretrained(model):
        return None
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.architectures = [type(model).__name__]
    return config.to_json_string()


def config_beside(path: Path) -> Path | None:
    """The ``config.json`` of a Hugging Face folder, or of the folder a weights file is in; None if there is none."""
    folder = path if path.is_dir() else path.parent
    found = folder / CONFIG
    return found if found.is_file() else None


def model_from_config(path: Path) -> nn.Module:
    """A fresh model of the class ``config.json`` names, from ``transformers`` itself: nothing from the folder
    runs (a config asking for its own code, ``auto_map``, is refused)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointFormatError(f"{path} is not a readable JSON config: {e}") from e
    names = doc.get("architectures") if isinstance(doc, dict) else None
    if not names or "auto_map" in doc:
        why = "asks for code of its own (auto_map)" if "auto_map" in doc else "names no architectures"
        raise ConfigError(f"{path} {why}; give --model FILE.py:NAME or --task SPEC for the model")
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"{path} is a Hugging Face config: pip install transformers to build its model") from None
    cls = getattr(transformers, names[0], None)
    if not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
        raise ConfigError(f"{path}: {names[0]} is not a model class of transformers {transformers.__version__}")
    return cls(cls.config_class.from_dict(doc))


def probe(model: nn.Module) -> Any:
    """Inputs to run a ``transformers`` model on (its own ``dummy_inputs``), or None for any other model."""
    if not is_pretrained(model):
        return None
    inputs = getattr(model, "dummy_inputs", None)
    return dict(inputs) if isinstance(inputs, dict) and inputs else None
