"""Functions that run on every rank of an elastic_launch job (importable by spawned workers)."""

from __future__ import annotations

import hashlib

import torch

from ddp import dist
from ddp.config import Config
from ddp.io import unwrap
from ddp.train import Trainer


def _trainer(cfg_dict: dict) -> tuple[Trainer, dist.World]:
    cfg = Config.from_dict(cfg_dict)
    world = dist.init(cfg.dist)
    return Trainer(cfg, world), world


def indices_per_rank(cfg_dict: dict, epoch: int) -> list[int]:
    """The sample indices this rank's trainer draws in one epoch."""
    trainer, _ = _trainer(cfg_dict)
    try:
        assert trainer.loader.batch_sampler is None and trainer.loader.sampler.sampler is trainer.sampler
        trainer.sampler.set_position(epoch, 0)
        return [i for batch in trainer.loader.sampler for i in batch]
    finally:
        dist.shutdown()


def train_and_digest(cfg_dict: dict) -> str:
    """Train with the real Trainer; sha256 of this rank's final parameters and buffers."""
    trainer, _ = _trainer(cfg_dict)
    try:
        trainer.train()
        h = hashlib.sha256()
        for k, v in unwrap(trainer.ddp).state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()
    finally:
        dist.shutdown()


def count_allreduces(cfg_dict: dict) -> tuple[int, int]:
    """(gradient all-reduces seen by a DDP communication hook, optimizer steps taken)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    trainer, _ = _trainer(cfg_dict)
    calls = []

    def counting_hook(state, bucket):
        calls.append(bucket.index())
        return allreduce_hook(state, bucket)

    try:
        trainer.ddp.register_comm_hook(None, counting_hook)
        trainer.train()
        return len(calls), trainer.progress.step
    finally:
        dist.shutdown()


def param_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for v in model.state_dict().values():
        h.update(v.cpu().numpy().tobytes())
    return h.hexdigest()
