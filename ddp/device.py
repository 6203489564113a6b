"""Devices: the textbook's helpers, and the device that belongs to this process."""

from __future__ import annotations

import os
import resource
import sys

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
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # VmHWM, in a system call, not /proc's text (18 us)
    return peak / (2**20 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux


# Dense peak TFLOP/s by GPU (matched in torch.cuda.get_device_name, first match wins) and dtype, from NVIDIA's
# data sheets; "tf32" is fp32 matmuls where TF32 is allowed, "fp32" without it. fp64 is not listed.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6},
    "L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "V100": {"fp16": 125.0, "fp32": 15.7},
}


def peak_tflops(device: torch.device, precision: str, override: float | None = None) -> float | None:
    """The device's dense peak TFLOP/s for ``precision`` (``PEAK_TFLOPS``), ``override`` if given; None when
    unknown (a CPU, an unlisted GPU, fp64)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    kind = precision
    if precision == "fp32" and torch.backends.cuda.matmul.allow_tf32:
        kind = "tf32"
    for gpu_name, peaks in PEAK_TFLOPS.items():
        if gpu_name in name:
            return peaks.get(kind)
    return None


DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}
"""The dtype each ``--precision`` computes in."""


def weights_dtype(precision: str) -> torch.dtype:
    """The dtype a model's weights are kept in: float64 under fp64, else float32 (bf16/fp16 autocast)."""
    return torch.float64 if precision == "fp64" else torch.float32


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype autocast (or FSDP's mixed precision) computes in; None when the weights' own dtype is used."""
    dtype = DTYPES[precision]
    return None if dtype == weights_dtype(precision) else dtype
