"""ddp: data-parallel training in PyTorch, with safe checkpoints and verified reloads.

The public API::

    from ddp import cpu, gpu, num_gpus, try_gpu, try_all_gpus    # devices
    from ddp import save, load                                    # tensors, lists, dicts
    from ddp import unwrap, save_model, load_model                # models, from any rank
    from ddp import verify_identical_outputs                      # all ranks agree?
"""

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
    UnsafeCheckpointError,
    VerifyError,
)
from ddp.io import load, load_model, save, save_model, unwrap
from ddp.verify import VerifyReport, verify_identical_outputs

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
    "UnsafeCheckpointError",
    "VerifyError",
    "VerifyReport",
    "cpu",
    "gpu",
    "load",
    "load_model",
    "num_gpus",
    "save",
    "save_model",
    "try_all_gpus",
    "try_gpu",
    "unwrap",
    "verify_identical_outputs",
]
