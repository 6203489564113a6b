"""ddp: data-parallel training in PyTorch, with safe checkpoints and verified reloads.

The public API::

    from ddp import cpu, gpu, num_gpus, try_gpu, try_all_gpus    # devices
    from ddp import save, load                                    # tensors, lists, dicts
    from ddp import unwrap, save_model, load_model                # models, from any rank
    from ddp import verify_identical_outputs                      # all ranks agree?
    from ddp import Task, fit                                     # your model, data and loss, trained
"""

from __future__ import annotations

from typing import Any

from ddp import trackers
from ddp.device import cpu, gpu, num_gpus, try_all_gpus, try_gpu
from ddp.errors import (
    ArchitectureMismatchError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    ConfigError,
    DDPError,
    DistributedError,
    NonFiniteError,
    UnsafeCheckpointError,
    VerifyError,
)
from ddp.io import load, load_model, save, save_model, unwrap
from ddp.task import Task
from ddp.verify import VerifyReport, verify_identical_outputs


def fit(task: Task, trackers: list | None = None, **settings: Any) -> VerifyReport | None:
    """Train ``task`` with DDP (under torchrun, or alone), save, reload on every rank and verify.

    ``settings`` are ``ddp train``'s options by field name (``steps=200, batch_size=32,
    out="runs/mine"``); ``trackers`` receive the logged figures (``ddp.trackers``). Returns
    the verify report; None if a SIGTERM stopped the run after a checkpoint. See ``ddp.train.fit``.
    """
    from ddp.train import fit as _fit  # imported here: `python -m ddp.train` must not find it loaded

    return _fit(task, trackers, **settings)


__all__ = [
    "ArchitectureMismatchError",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointNotFoundError",
    "CheckpointWriteError",
    "ConfigError",
    "DDPError",
    "DistributedError",
    "NonFiniteError",
    "Task",
    "UnsafeCheckpointError",
    "VerifyError",
    "VerifyReport",
    "cpu",
    "fit",
    "gpu",
    "load",
    "load_model",
    "num_gpus",
    "save",
    "save_model",
    "trackers",
    "try_all_gpus",
    "try_gpu",
    "unwrap",
    "verify_identical_outputs",
]
