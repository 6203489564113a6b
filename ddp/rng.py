"""Every random number generator in one place: seeding them, and their state for checkpoints.

Python's ``random``, numpy's global generator and torch's (CPU and every CUDA device) are
seeded together and saved together: a resumed run draws exactly what an uninterrupted
one would. States are stored as tensors and plain values, so the weights-only loader
reads them back.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch


def seed_all(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_cpu(seed: int) -> None:
    """Seed Python's, numpy's and torch's CPU generators (torch.manual_seed costs 100 us: CUDA too)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of ``rank``'s own generators (dropout differs per rank, reproducibly), at ``step``."""
    return seed + 1_000_003 * rank + 7919 * step


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A seed for sample ``index`` of ``epoch``: a fixed mix (splitmix64) of the three numbers."""
    z = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return (z ^ (z >> 31)) % 2**63


@contextlib.contextmanager
def preserved() -> Iterator[None]:
    """Put Python's, numpy's and torch's CPU generator states back after the block."""
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed every generator for a block, then put the CPU generators' states back."""
    with preserved():
        seed_all(seed)
        yield


def seed_worker(worker_id: int) -> None:
    """A DataLoader worker's ``worker_init_fn``: Python and numpy seeded from torch's worker seed."""
    seed = torch.initial_seed() % 2**32  # derived by torch from the loader's generator
    np.random.seed(seed)
    random.seed(seed)


def state(cuda: bool = True) -> dict:
    """Python, numpy, torch CPU and (with ``cuda``) every CUDA device's generator state."""
    version, pystate, gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    captured = {
        "python": torch.from_numpy(np.fromiter(pystate, dtype=np.int64, count=len(pystate))),  # 3x torch.tensor's speed
        "python_version": version,
        "python_gauss": gauss,
        "numpy": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_pos": int(np_pos),
        "numpy_gauss": (int(np_has_gauss), float(np_gauss)),
        "torch": torch.get_rng_state(),
    }
    if cuda and torch.cuda.is_available():
        captured["cuda"] = torch.cuda.get_rng_state_all()
    return captured


def cpu_state() -> dict:
    """Python's, numpy's and torch's CPU generator state (a DataLoader worker has no CUDA to ask)."""
    return state(cuda=False)


def restore(saved: dict) -> None:
    """Put back what ``state`` captured."""
    random.setstate((saved["python_version"], tuple(saved["python"].tolist()), saved["python_gauss"]))
    has_gauss, gauss = saved["numpy_gauss"]
    np.random.set_state(("MT19937", saved["numpy"].numpy().astype(np.uint32), saved["numpy_pos"], has_gauss, gauss))
    torch.set_rng_state(saved["torch"])
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"][: torch.cuda.device_count()])
