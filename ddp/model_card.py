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

from ddp.errors import CheckpointCorruptError
from ddp.io import atomic_write, load, save

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


def read(weights: Path) -> tuple[dict, Any] | None:
    """(config, probe) from the card beside ``weights``; None when there is none."""
    path = card_path(weights)
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text())
        if card.get("format") != FORMAT:
            raise ValueError(f"format {card.get('format')!r}, expected {FORMAT!r}")
        config = card["config"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointCorruptError(f"{path} is not a model card of this project ({e}); move it away") from None
    probe = path.with_name(card["probe"])
    return config, (load(probe) if probe.is_file() else None)
