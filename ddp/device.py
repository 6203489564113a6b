"""Devices: the textbook's helpers, and the device that belongs to this process."""

from __future__ import annotations

import os

import torch


def cpu() -> torch.device:
    """The CPU device."""
    return torch.device("cpu")


def gpu(i: int = 0) -> torch.device:
    """The i-th CUDA device (whether or not it exists)."""
    return torch.device(f"cuda:{i}")


def num_gpus() -> int:
    """How many CUDA devices this process can see (respects CUDA_VISIBLE_DEVICES)."""
    return torch.cuda.device_count()


def try_gpu(i: int = 0) -> torch.device:
    """GPU i if it exists, else the CPU."""
    return gpu(i) if num_gpus() >= i + 1 else cpu()


def try_all_gpus() -> list[torch.device]:
    """Every GPU, or ``[cpu()]`` when there is none (never an empty list)."""
    return [gpu(i) for i in range(num_gpus())] or [cpu()]


def local_rank() -> int:
    """This process's rank on its node, as torchrun sets it (0 when run alone)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_device(backend: str = "gloo", kind: str = "auto") -> torch.device:
    """The device this process trains on: ``cuda:LOCAL_RANK`` under NCCL, else the CPU.

    Each local rank takes its own GPU; ``cuda:0`` for every rank would put the whole
    node's work on one card. ``kind="cuda"`` puts gloo ranks on GPUs too, sharing them
    when there are more ranks than GPUs.
    """
    if kind == "cpu":
        return cpu()
    if backend == "nccl":
        return gpu(local_rank())
    if kind == "cuda":
        return gpu(local_rank() % max(num_gpus(), 1))
    return cpu()


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak memory in MiB: CUDA's max allocated on a GPU, the resident high-water mark (VmHWM) on
    a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):  # not Linux: the OS's own figure
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}
"""The dtype each ``--precision`` computes in."""


def weights_dtype(precision: str) -> torch.dtype:
    """The dtype a model's weights are kept in: float64 under fp64, else float32 (bf16/fp16 autocast)."""
    return torch.float64 if precision == "fp64" else torch.float32


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype autocast (or FSDP's mixed precision) computes in; None when the weights' own dtype is used."""
    dtype = DTYPES[precision]
    return None if dtype == weights_dtype(precision) else dtype
