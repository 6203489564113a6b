"""Functions that run on every rank of an elastic_launch job (importable by spawned workers).

Each builds its Trainer inside an inner function, so the trainer (and DDP's hold on the
process group) is freed before the group is destroyed: gloo may abort otherwise.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from ddp import group
from ddp.config import Config
from ddp.io import unwrap
from ddp.trainer import Trainer


def _on_every_rank(cfg_dict: dict, body: Callable[[Trainer], object]):
    cfg = Config.from_dict(cfg_dict)
    group.init(cfg.dist)
    try:
        result = body(Trainer(cfg, group.world_from_env()))
        group.barrier()
        return result
    finally:
        group.shutdown()


def indices_per_rank(cfg_dict: dict, epoch: int) -> list[int]:
    """The sample indices this rank's trainer draws in one epoch."""

    def body(trainer: Trainer) -> list[int]:
        data = trainer.data
        assert data.loader.sampler.sampler is data.sampler  # whole batches of its indices
        data.sampler.set_position(epoch, 0)
        return [int(i) for batch in data.loader.sampler for i in batch]  # arrays of them, or lists for a subclass

    return _on_every_rank(cfg_dict, body)


def train_and_digest(cfg_dict: dict) -> str:
    """Train with the real Trainer; sha256 of this rank's final parameters and buffers."""

    def body(trainer: Trainer) -> str:
        trainer.train()
        h = hashlib.sha256()
        for k, v in unwrap(trainer.wrapped).state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    return _on_every_rank(cfg_dict, body)


def count_allreduces(cfg_dict: dict) -> tuple[int, int]:
    """(gradient all-reduces seen by a DDP communication hook, optimizer steps taken)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def body(trainer: Trainer) -> tuple[int, int]:
        calls = []

        def counting_hook(state, bucket):
            calls.append(bucket.index())
            return allreduce_hook(state, bucket)

        trainer.wrapped.register_comm_hook(None, counting_hook)
        trainer.train()
        return len(calls), trainer.progress.step

    return _on_every_rank(cfg_dict, body)


def count_fsdp_reductions(cfg_dict: dict) -> tuple[int, int, int]:
    """(FSDP backward passes, gradient reduce-scatters, optimizer steps), counted by the profiler.

    FSDP marks each unit's backward and reduce-scatter with ``record_function``; the profiler
    sees the real ones, nothing is replaced.
    """
    from torch.profiler import ProfilerActivity, profile

    def body(trainer: Trainer) -> tuple[int, int, int]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            trainer.train()
        names = [e.name for e in prof.events()]
        backward = sum(n.startswith("FSDP::pre_backward") for n in names)
        reduce = sum(n.startswith("FSDP::post_backward_reduce") for n in names)
        return backward, reduce, trainer.progress.step

    return _on_every_rank(cfg_dict, body)


def save_dcp(folder: str, state_file: str) -> None:
    """Every rank saves the same state with torch.distributed.checkpoint, as an FSDP or torchtitan job does."""
    import torch
    import torch.distributed as tdist
    import torch.distributed.checkpoint as dcp

    tdist.init_process_group("gloo")
    try:
        state = torch.load(state_file, weights_only=True)
        dcp.save({"model": state, "step": 7}, checkpoint_id=folder)
        tdist.barrier()
    finally:
        tdist.destroy_process_group()


def replica_ring(root: str) -> dict:
    """Each rank alone on its node (``GROUP_RANK``, as torchrun sets it on two nodes), snapshotting a state of its
    own at steps 1 and 2, which its partner keeps a copy of. Then rank 1's node is replaced: its memory is gone.
    Rank 0's copy of step 1 is damaged first, so that step cannot be sent back; step 2's is."""
    import os
    import shutil
    from pathlib import Path

    import torch

    from ddp.config import DistConfig
    from ddp.replicas import Replicas
    from ddp.snapshot import Snapshots

    os.environ["GROUP_RANK"] = os.environ["RANK"]
    group.init(DistConfig())
    try:
        rank, said = group.rank(), []
        memory = Path(root) / f"node{rank}"

        def opened() -> tuple[Snapshots, Replicas | None]:
            snaps = Snapshots(memory, 1, rank, out=Path(root), say=said.append)
            snaps.open("run", clean=False, config={"launch": 1})
            return snaps, Replicas.plan(snaps, 60, say=said.append)

        snaps, replicas = opened()
        replicas.open("run")
        states = {step: {"w": torch.full((1000,), 10.0 * rank + step), "rank": rank} for step in (1, 2)}
        for step, state in states.items():
            snaps.take(step, state, live=set)
            replicas.send(step)
            snaps.wait()
        replicas.close(remove=False)
        kept = replicas.held()
        group.barrier()
        if rank == 1:
            shutil.rmtree(memory)
        else:
            slot = next(k for k, s in replicas.store.slots.items() if s["step"] == 1)
            (replicas.store.dir / f"meta-{slot}").write_bytes(b"J{}")
        snaps, replicas = opened()
        replicas.open("run")
        result = {"kept": kept, "step 1": replicas.restore(1, [1]), "step 2": replicas.restore(2, [1])}
        result["restored"] = snaps.load(2) if rank == 1 else None
        result["said"], result["expected"] = said, states[2]
        result["saved_config"] = snaps.saved_config  # what the first launch recorded: not the replicas' nothing
        group.barrier()
        return result
    finally:
        group.shutdown()


def rank0_buffers(root: str) -> dict:
    """This rank's checkpoint state of a model whose buffers differ per rank (BatchNorm's, after each rank's own
    forward), in three dtypes: {name: (the buffer in the state, the model's own)}."""
    from pathlib import Path

    import torch

    from ddp.checkpoint import MODEL, Checkpointer
    from ddp.config import CheckpointConfig, DistConfig

    group.init(DistConfig())
    try:
        rank = group.rank()
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.BatchNorm1d(3).double())
        with torch.no_grad():
            for buffer in model.buffers():
                buffer.fill_(10 + rank)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        broadcast, calls = group.broadcast, []
        group.broadcast = lambda *args, **kwargs: calls.append(args) or broadcast(*args, **kwargs)  # counted
        state = Checkpointer(Path(root), CheckpointConfig(), model, optimizer, say=lambda _: None).state()[0][MODEL]
        group.broadcast = broadcast
        group.barrier()
        return {"broadcasts": len(calls)} | {
            name: (state[name].clone(), buffer.clone()) for name, buffer in model.named_buffers()
        }
    finally:
        group.shutdown()
