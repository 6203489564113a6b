"""Where the logged figures go besides ``metrics.jsonl``: TensorBoard, Weights & Biases, or a class of yours.

A tracker is any object with two methods; rank 0 calls them with what it writes to
``metrics.jsonl``: every ``train`` record (``loss``, ``lr``, ``grad_norm``,
``samples_per_s``, ``step_time``, ...) and every ``eval`` record (the task's metrics)::

    class MyTracker:
        def log(self, kind: str, step: int, values: dict[str, float]) -> None:
            mlflow.log_metrics(scalars(kind, values), step=step)   # names as "train/loss", "eval/accuracy"

        def close(self) -> None:
            mlflow.end_run()

and ``ddp.fit(task, trackers=[MyTracker()])`` (or ``Trainer.metrics.add``) sends them there.
A resumed run calls ``log`` again from the step after its checkpoint: a tracker that keeps
its own history drops what lies past that step (TensorBoard's ``purge_step`` does).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Protocol

from ddp.errors import ConfigError

TENSORBOARD = "tensorboard"
"""The folder of ``--out`` TensorBoard's event files go to."""


class Tracker(Protocol):
    """What rank 0 sends each logged record to."""

    def log(self, kind: str, step: int, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def scalars(kind: str, values: dict[str, Any]) -> dict[str, float]:
    """A record's figures under ``<kind>/<name>`` (``train/loss``, ``eval/accuracy``): numbers only, step aside."""
    return {
        f"{kind}/{name}": float(v)
        for name, v in values.items()
        if name != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


class TensorBoard:
    """Event files under ``<out>/tensorboard``, one run per output folder: ``tensorboard --logdir runs``."""

    def __init__(self, out: Path, resume_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run's later steps replace the earlier attempt's: TensorBoard's readers drop the events at or
        # after purge_step that a previous writer left, so the curves go on without duplicate steps.
        self.writer = SummaryWriter(str(out / TENSORBOARD), purge_step=resume_step + 1 if resume_step else None)

    def log(self, kind: str, step: int, values: dict[str, float]) -> None:
        """One scalar per figure, at ``step``."""
        for name, value in scalars(kind, values).items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # a log line is rare next to a step: each is on disk when it is shown

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()


class WandB:
    """A Weights & Biases run, offline by default (``WANDB_MODE=online`` syncs as it goes; ``wandb sync`` later)."""

    def __init__(self, out: Path, name: str, run_id: str, config: dict) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE", "offline")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "ddp"),
            name=name,
            id=run_id,
            resume="allow",
            dir=str(out),
            config=config,
            mode=mode,
        )

    def log(self, kind: str, step: int, values: dict[str, float]) -> None:
        """The record's figures at ``step``."""
        self.run.log(scalars(kind, values), step=step)

    def close(self) -> None:
        """Finish the run (offline: its files stay under ``<out>/wandb``)."""
        self.run.finish()


def open_all(cfg: Any, out: Path, run_id: str, step: int, extra: list | None = None) -> list[Tracker]:
    """Rank 0's trackers of a run resumed at ``step``: --tensorboard, --wandb, then the caller's own (``extra``)."""
    opened: list[Tracker] = []
    if cfg.log.tensorboard:
        opened.append(TensorBoard(out, step))
    if cfg.log.wandb:
        opened.append(WandB(out, cfg.run.name, run_id, cfg.to_dict()))
    return [*opened, *(extra or [])]


def check_available(tensorboard: bool, wandb: bool) -> None:
    """A usage error, before any process group, for a tracker whose package is not installed."""
    import importlib.util

    for wanted, module, install in ((tensorboard, "tensorboard", "tensorboard"), (wandb, "wandb", "'ddp[wandb]'")):
        if wanted and importlib.util.find_spec(module) is None:
            raise ConfigError(f"--{module}: the {module} package is not installed; pip install {install}")
