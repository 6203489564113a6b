"""One run per ``--out`` folder: which run a folder holds, and what a launch may do with it.

``<out>/run.json`` records the run: an id and the settings it started with. A launch that
would make a different run in a folder holding another run's checkpoints (``--resume
never``, another task, task settings or seed) is refused with a usage error that says
what to do; ``--overwrite`` moves the old run aside, to ``<out>.old-<time>``, never deleting
it. Changes that continue a run (more steps, another learning rate, another world size)
resume it, with the warning that lists them. Checkpoints carry the run's id in their
manifest, and resuming takes only the folder's own run's.
"""

from __future__ import annotations

import datetime
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path

from ddp import group
from ddp.checkpoint_files import complete_checkpoints, read_train
from ddp.config import Config, task_moved, upgrade
from ddp.errors import CheckpointError, ConfigError, DDPError
from ddp.io import atomic_write

RUN_FILE = "run.json"
IDENTITY = {"task": ("spec", "args"), "run": ("seed",)}
"""The settings that make a run what it is: change one and it is another run, not a continued one."""


def read(out: Path) -> dict | None:
    """The folder's run record ({"id", "created", "config"}), or None."""
    path = out / RUN_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        record["id"], record["config"]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--out: {path} is not a run record ({e}); move it away or pass --overwrite") from None
    return record


def identity_changes(saved: dict, cfg: Config) -> list[str]:
    """The settings that make ``cfg`` another run than the one ``saved`` (a config dict) started."""
    old, now = upgrade(saved), cfg.to_dict()
    moved = task_moved(old.get("task", {}), now["task"])  # the run's own task file, moved: the same run
    return [
        f"{key} {old.get(section, {}).get(key)!r} -> {now[section][key]!r}"
        for section, keys in IDENTITY.items()
        for key in keys
        if old.get(section, {}).get(key) != now[section][key] and not (moved and key == "spec")
    ]


def check(cfg: Config, overwrite: bool = False) -> None:
    """Refuse, as a usage error, a launch that would make another run in a folder holding a run's checkpoints.

    Read-only, so every rank may call it before any process group starts; ``claim`` then
    writes on rank 0.
    """
    out = cfg.run.out_dir
    if overwrite:
        return
    held = _held(out)
    if held is None:
        return
    run_id, config, newest = held
    why = ["--resume never starts a new run"] if cfg.checkpoint.resume == "never" else identity_changes(config, cfg)
    if why:
        raise ConfigError(
            f"--out {out} holds another run's checkpoints (run {run_id}, newest {newest.name}), and this launch "
            f"would start a different run there ({'; '.join(why)}). Resume it (its settings, without --resume "
            f"never), choose another --out, or pass --overwrite to move it aside to {out}.old-<time>"
        )


def _held(out: Path) -> tuple[str, dict, Path] | None:
    """(run id, the config it started with, its newest checkpoint) of the run whose checkpoints ``out`` holds."""
    checkpoints = complete_checkpoints(out / "checkpoints")
    if not checkpoints:
        return None
    record = read(out)
    if record is not None:
        return record["id"], record["config"], checkpoints[-1]
    try:  # a folder of a version before run.json: its newest checkpoint's config speaks for it
        train, _, _ = read_train(checkpoints[-1])
    except CheckpointError:
        return None  # damaged: --resume auto skips it, and the run starts afresh beside it
    return "(unnamed: from before run.json)", train.get("config") or {}, checkpoints[-1]


def claim(cfg: Config, overwrite: bool = False, say=print, resumable: Callable[[str], bool] | None = None) -> str:
    """Rank 0: move an old run aside if ``--overwrite``, then record this folder's run; its id.

    A folder whose run already has checkpoints, or snapshots in host memory (``resumable(id)``),
    keeps its id (this launch continues it); one without becomes this run's. A folder of an
    earlier version is adopted as it is.
    """
    out = cfg.run.out_dir
    if overwrite and out.exists() and any(out.iterdir()):
        aside = out.with_name(f"{out.name}.old-{datetime.datetime.now():%Y%m%d-%H%M%S}")
        os.replace(out, aside)
        out.mkdir(parents=True)
        say(f"--overwrite: moved the previous contents of {out} to {aside}")
    record = read(out)
    if record is not None and (_held(out) is not None or (resumable is not None and resumable(record["id"]))):
        task = cfg.to_dict()["task"]
        if record["config"].get("task") != task:  # its file moved or edited (check let only those through)
            _write(out, {**record, "config": {**record["config"], "task": task}})
        return record["id"]
    record = {
        "id": uuid.uuid4().hex[:12],
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "config": cfg.to_dict(),
    }
    out.mkdir(parents=True, exist_ok=True)
    _write(out, record)
    return record["id"]


def _write(out: Path, record: dict) -> None:
    atomic_write(out / RUN_FILE, lambda f: f.write(json.dumps(record, indent=1).encode()))


def claim_on_rank0(cfg: Config, world: group.World, say=print, resumable: Callable[[str], bool] | None = None) -> str:
    """Called by every rank: rank 0 claims ``--out`` for this run (``claim``); the run's id, on every rank."""
    run_id, error = None, None
    if world.is_main:
        try:
            run_id = claim(cfg, cfg.run.overwrite, say, resumable)
        except (OSError, DDPError) as e:
            error = e
    group.raise_if_any_failed(error, f"claiming {cfg.run.out_dir}")
    return group.all_gather_objects(run_id)[0]
