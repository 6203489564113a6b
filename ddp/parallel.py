"""The model as training runs it: built the same on every rank, then replicated (DDP) or sharded (FSDP).

``Parallel`` builds the task's model from a seeded RNG, loads ``--init-from``, applies
activation checkpointing, and wraps it: ``DistributedDataParallel`` (every rank holds the
whole model), or FSDP2's ``fully_shard`` (each rank holds 1/N), compiled if asked; a world of
one trains the model itself, as DDP over one rank would, without DDP's hooks. It
hides which of the two it holds: the Trainer asks it for the model to step, the model to
evaluate, gradient sync on or off, and rank 0's buffers on every rank.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp import fsdp, group, rng
from ddp.config import Config
from ddp.device import autocast_dtype, weights_dtype
from ddp.errors import ConfigError
from ddp.io import unwrap
from ddp.model import checkpoint_activations, materialize
from ddp.task import Task


def local_model(task: Task, cfg: Config, device: torch.device, dtype: torch.dtype = torch.float32) -> nn.Module:
    """This rank's model before DDP: built from a seeded RNG (the same weights on every rank),
    lazy layers materialised, SyncBatchNorm if asked, in the memory format ``--memory-format``
    resolves to."""
    with rng.seeded(cfg.run.seed):
        model = task.model()
        if not isinstance(model, nn.Module):
            raise ConfigError(f"task {task.name!r}: model() returned a {type(model).__name__}, not an nn.Module")
        materialize(model, lambda: probe_input(task, cfg))  # lazy layers draw their weights here: seeded too
    if cfg.compute.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(device, dtype=dtype, memory_format=memory_format(cfg, task, model))


def probe_input(task: Task, cfg: Config):
    """The verify input: the task's probe, derived under a fixed seed so that every rank draws the same."""
    with rng.seeded(cfg.run.seed + 1234):
        return task.probe_input()


def memory_format(cfg: Config, task: Task, model: nn.Module) -> torch.memory_format:
    """channels_last under ``auto`` for a model with 2-D convolutions whose forward takes it (unless its task
    says otherwise, ``Task.channels_last``), for a user's model as for the built-in cnn.

    A conv whose weight is channels_last runs channels_last (oneDNN on CPU, cuDNN on
    GPU), inputs included, and carries the layout on to the next layer: a DDP step of
    two 3x3 convolutions is 1.1-1.25x faster on CPU (bench/bench.py, variant "c contiguous").
    It changes float rounding, not the weights' values, so it is an exactness setting: the
    choice depends on the model alone, never on a timing, so that a restart makes the same one.
    """
    fmt = cfg.compute.memory_format
    if fmt == "auto" and task.channels_last is None:  # the model decides
        if not any(isinstance(m, CONV_2D) for m in model.modules()):
            return torch.contiguous_format
        return _runs_channels_last(model, lambda: probe_input(task, cfg))
    if fmt == "auto":
        fmt = "channels_last" if task.channels_last else "contiguous"
    return torch.channels_last if fmt == "channels_last" else torch.contiguous_format


CONV_2D = (nn.Conv2d, nn.ConvTranspose2d)


def _runs_channels_last(model: nn.Module, probe) -> torch.memory_format:
    """channels_last if the model's forward takes it: one no-grad pass on the probe input; else contiguous, with
    a note. A forward that views a conv's output as if it were contiguous (``x.view(n, -1)``) fails in
    channels_last, where ``flatten`` or ``reshape`` would not."""
    from ddp.task import call

    try:
        x = probe()
    except ConfigError as e:  # batches of no (x, y) shape and no Task.probe: nothing to try the layout on
        _note(f"no input to try channels_last on ({e}); training in the contiguous layout "
              "(--memory-format channels_last chooses it)")  # fmt: skip
        return torch.contiguous_format
    model.to(memory_format=torch.channels_last)
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()
            call(model, x)
        return torch.channels_last
    except Exception as e:  # any failure means: not this layout (the note names it)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        _note(f"the model's forward on its probe input fails in channels_last ({first}); training in the "
              "contiguous layout (flatten or reshape instead of view would take the faster one; --memory-format "
              "contiguous says so and skips this check)")  # fmt: skip
        return torch.contiguous_format
    finally:
        model.train(was_training)
        model.to(memory_format=torch.contiguous_format)


def _note(text: str) -> None:
    if group.rank() == 0:
        print(f"note: --memory-format auto: {text}", flush=True)


class Parallel:
    """This rank's model: ``model`` to save and load (unwrapped, or FSDP's sharded module), ``wrapped`` to step."""

    def __init__(self, task: Task, cfg: Config, world: group.World) -> None:
        self.task, self.cfg, self.device = task, cfg, world.device
        self.sharded = cfg.dist.strategy == "fsdp"
        self.dtype = weights_dtype(cfg.optim.precision)
        # Under FSDP the whole model is built in host memory, with the seeded weights DDP would have; each
        # block's shards then move to the device as it is sharded, so no device ever holds the whole model.
        self.model = local_model(task, cfg, torch.device("cpu") if self.sharded else self.device, self.dtype)
        note = self._init_weights(wrapped=False)  # before wrapping: under FSDP each rank keeps its shards
        if cfg.compute.ac == "full":
            checkpoint_activations(self.model, task.blocks)
        self.wrapped = self._wrap(world)
        self.init_note: str | None = note or self._init_weights(wrapped=True)
        """What ``--init-from`` loaded, for the log (None without it)."""

    def _wrap(self, world: group.World) -> nn.Module:
        if self.sharded:  # in place: the model's parameters become this rank's shards (DTensors)
            units = fsdp.shard(self.model, world.world_size, self.device, self.task.blocks, self.cfg.optim.precision)
            group.log(world, units)
            if self.cfg.compute.compile:
                self.model.compile()  # compiled in place: the module stays the FSDP module it is
            return self.model
        model = torch.compile(self.model) if self.cfg.compute.compile else self.model
        if world.world_size == 1:  # DDP over one rank changes no number (an all-reduce of one, a division by 1)
            return model  # and costs its hooks: 1.6x the textbook MLP's step on a CPU
        d = self.cfg.dist
        return DDP(
            model,
            device_ids=[self.device] if self.device.type == "cuda" else None,  # must be None on CPU
            gradient_as_bucket_view=d.gradient_as_bucket_view,
            bucket_cap_mb=d.bucket_cap_mb,
            static_graph=d.static_graph,
        )

    def _init_weights(self, wrapped: bool) -> str | None:
        """``--init-from``: the weights of a file, loaded into the whole model before it is wrapped; or, under
        FSDP from a DCP folder, into the sharded model after, each rank reading only its shards."""
        path = self.cfg.checkpoint.init_from
        if path is None:
            return None
        from ddp import weights  # it reads DCP folders too: torch.distributed.checkpoint, 0.6 s to import

        skip = self.cfg.checkpoint.init_skip
        if self.sharded and weights.sharded_source(path) is not None:
            return weights.init_sharded(self.model, path, skip) if wrapped else None
        return None if wrapped else weights.init_model(self.model, path, skip)

    @property
    def eval_model(self) -> nn.Module:
        """The model to evaluate: compiled if it was, without DDP's forward hooks (FSDP's are its collectives)."""
        return self.wrapped.module if isinstance(self.wrapped, DDP) else self.wrapped

    @property
    def unwrapped(self) -> nn.Module:
        """The model without DDP or ``torch.compile`` around it: its state_dict has no prefixes."""
        return unwrap(self.wrapped)

    def gradient_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Reduce gradients on the last micro-batch only: DDP's no_sync, FSDP's requires_gradient_sync."""
        if self.sharded:
            self.model.set_requires_gradient_sync(last)  # unsharded gradients accumulate until then
            return contextlib.nullcontext()
        if last or not isinstance(self.wrapped, DDP):  # a world of one has no sync to skip
            return contextlib.nullcontext()
        return self.wrapped.no_sync()

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 or fp16 autocast under ``--precision``; nothing in fp32 and fp64."""
        dtype = autocast_dtype(self.cfg.optim.precision)
        return torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    def sync_buffers(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics), as DDP does before each forward.

        After the last step each rank holds statistics of its own last batch; the saved
        model, and so every reloaded copy, carries rank 0's.
        """
        for buffer in self.unwrapped.buffers():
            group.broadcast(buffer, src=0)

    def whole_state(self) -> dict[str, torch.Tensor] | None:
        """Under FSDP, the whole model's state gathered from every rank's shards (a collective); else None."""
        return fsdp.full_model_state(self.model) if self.sharded else None
