"""What sits beside exported weights so that they stand alone: the config that rebuilds the model and its probe.

Rank 0 writes ``<out>/<task>.params`` and beside it ``<task>.params.json`` (the training
config, with the task's ``model_args`` among its arguments) and ``<task>.params.probe.pt``
(the input every rank verified with). ``ddp verify`` and ``ddp predict`` read them: the
model is rebuilt without the training data, and predicted on inputs shaped like the probe.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ddp import group
from ddp.errors import CheckpointCorruptError, DDPError
from ddp.io import atomic_write, is_file_name, load, save
from ddp.task import Task, to_device

FORMAT = "ddp-model-card/1"


def card_path(weights: Path) -> Path:
    """The card beside a weights file."""
    return weights.with_name(weights.name + ".json")


def probe_path(weights: Path) -> Path:
    """The probe beside a weights file."""
    return weights.with_name(weights.name + ".probe.pt")


def write(weights: Path, config: dict, probe: Any) -> None:
    """Write the card and the probe of ``weights`` (each atomically; the probe first)."""
    save(probe, probe_path(weights))
    card = {"format": FORMAT, "weights": weights.name, "config": config, "probe": probe_path(weights).name}
    atomic_write(card_path(weights), lambda f: f.write(json.dumps(card, indent=1).encode()))


def write_for(weights: Path, config: dict, task: Task, probe: Any) -> None:
    """Called by every rank: rank 0 writes the card of a run's exported ``weights``, its ``config``
    (``Config.to_dict``) with the task's ``model_args`` among the task's arguments, and the probe."""
    error = None
    if group.rank() == 0:
        try:
            settings = {**config, "task": {**config["task"], "args": {**config["task"]["args"], **task.model_args}}}
            write(weights, settings, to_device(probe, torch.device("cpu")))
        except DDPError as e:
            error = e
    group.raise_if_any_failed(error, f"writing the model card of {weights}")


def read(weights: Path) -> tuple[dict, Any] | None:
    """(config, probe) from the card beside ``weights``; None when there is none."""
    path = card_path(weights)
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text())
        if card.get("format") != FORMAT:
            raise ValueError(f"format {card.get('format')!r}, expected {FORMAT!r}")
        config, probe_name = card["config"], card["probe"]
        if not is_file_name(probe_name):
            raise ValueError(f"its probe must be a file beside it, not {probe_name!r}")  # nothing outside the folder
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointCorruptError(f"{path} is not a model card of this project ({e}); move it away") from None
    probe = path.with_name(probe_name)
    return config, (load(probe) if probe.is_file() else None)
