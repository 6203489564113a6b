"""Full-state checkpoints: periodic, atomic, verified, and resumable on any world size.

The Trainer hands a ``Checkpointer`` the stateful parts of training: the model, its
optimizer, and named objects with ``state_dict()`` / ``load_state_dict()`` (a scheduler,
grad scaler, progress), as torchtitan's ``Stateful`` and accelerate's
``register_for_checkpointing`` take them. The Checkpointer owns the rest: what goes into
which file (``ddp.checkpoint_files``: the whole model, each rank's share, or FSDP's shards),
rank 0's buffers, every rank's RNG state, when a save commits, which checkpoints are kept,
and which one a restart resumes from. Every rank calls every method here, in the same
order, so every rank reaches the same collectives.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ddp import fsdp, group, optim, persist, replicas, rng, snapshot
from ddp.checkpoint_files import (
    FORMAT_VERSION,
    MANIFEST,
    MODEL,
    PRUNED,
    PRUNER,
    SHARDED,
    TRAIN,
    clean_stale,
    complete_checkpoints,
    fsync_dir,
    is_sharded,
    newest_valid,
    rank_files,
    read_manifest,
    read_state,
    read_train,
    remove_all,
    shard_entries,
    stage,
    step_dir,
    validate,
    write_durable,
    write_file,
    write_shards,
)
from ddp.config import CheckpointConfig, Config, config_changes, task_moved, upgrade
from ddp.errors import CheckpointError
from ddp.io import check_architecture, strip_prefixes


class Stateful(Protocol):
    """Anything a checkpoint can hold: torch's optimizers, schedulers and scalers, and the trainer's progress."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


PROGRESS = "progress"
"""The stateful whose entries sit at the top level of ``train.pt`` (step, epoch, ...), where ``ddp inspect``
and every earlier version of this project read them."""


class Checkpointer:
    """Saves, commits, prunes, finds and restores the training state under ``<out>/checkpoints``."""

    def __init__(
        self,
        root: Path,
        cfg: CheckpointConfig,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        stateful: dict[str, Stateful] | None = None,
        *,
        own_stateful: dict[str, Stateful] | None = None,
        sharded: bool = False,
        device: torch.device | str = "cpu",
        config: Config | None = None,
        say=print,
        guarded: bool = False,
    ) -> None:
        """
        Args:
            model: the unwrapped model (under FSDP, the sharded module itself).
            stateful: named objects saved in ``train.pt`` under their names; ``progress``'s
                entries go to its top level.
            own_stateful: named objects whose state is each rank's own (a stream that splits
                itself), saved in each rank's file; on a rank without one they load None.
            sharded: the model is sharded (``--strategy fsdp``): its and the optimizer's
                state are saved as each rank's shards.
            config: the run's config, stored with the state and compared on resume.
            guarded: no update is ever applied from a non-finite gradient (the trainer's ``NonFiniteGuard``,
                or fp16's GradScaler), so weights found finite once stay finite: only the first save checks them.
        """
        self.root, self.cfg, self.say = Path(root), cfg, say
        self.model, self.optimizer, self.stateful = model, optimizer, dict(stateful or {})
        self.own_stateful = dict(own_stateful or {})
        self.saved_world_size: int | None = None  # of the checkpoint restored, if any
        self.sharded, self.device, self.config = sharded, device, config
        self.config_dict = None if config is None else config.to_dict()  # saved with every state: built once
        self.buffers: dict[str, torch.Tensor] = {}  # async staging, reused from save to save
        self.writer = persist.Writer()  # --async-save: the save in flight
        self.pending_step: int | None = None
        self.last_saved: int | None = None
        self.best_step: int | None = None  # --keep-best: the checkpoint pruning keeps
        self.pruner: Future | None = None  # the deletion of the checkpoints retired by the last commit
        self.run_id: str | None = None  # the folder's run (ddp.run_folder): written in manifests, resumed alone
        self.last_save_time = time.monotonic()  # for --checkpoint-every-seconds
        self.time_due = False  # the ranks agreed that --checkpoint-every-seconds has passed
        self.snapshots = self._snapshots()  # the tier in host memory (ddp.snapshot), or None
        timeout_s = None if config is None else max(config.dist.timeout, config.dist.startup_timeout)
        self.replicas = self._replicas(timeout_s)  # copies of them on a partner node (ddp.replicas), or None
        self.async_mode = self._async_mode()  # how --async-save writes: off, thread or process
        # FSDP's async saves plan and gather on a group of their own, beside the training's collectives
        self.side_group = group.side_group(timeout_s) if sharded and self.async_mode != "off" else None
        self.guarded, self.proven_finite = guarded, False

    def _snapshots(self) -> snapshot.Snapshots | None:
        """Called by every rank: this rank's snapshots, or None; on every rank or on none, since a snapshot's
        state is built in a collective."""
        snaps = self._local_snapshots()
        held = group.all_gather_objects(snaps is not None)
        if snaps is not None and not all(held):
            without = [r for r, h in enumerate(held) if not h]
            self.say(f"warning: snapshots in host memory are off: rank(s) {without} have no /dev/shm (give "
                     "--snapshot-dir)")  # fmt: skip
            return None
        return snaps

    def _replicas(self, timeout_s: float | None) -> replicas.Replicas | None:
        """Called by every rank: this rank's side of the ring of snapshot replicas, or None."""
        if self.snapshots is None or not self.cfg.snapshot_replicas or group.world_size() == 1:
            return None
        return replicas.Replicas.plan(self.snapshots, timeout_s, self.say)

    def _async_mode(self) -> str:
        """``--async-save`` resolved. auto: on a thread, from the snapshot (under FSDP too: each rank's shards,
        through DCP); in step where there is no snapshot (a crash during a background write would lose that
        checkpoint with nothing in memory to cover it)."""
        if self.cfg.async_save != "auto":
            if self.cfg.async_save == "process" and self.snapshots is None:
                self.say("note: --async-save process writes from the snapshots in host memory, which are off: a "
                         "thread writes")  # fmt: skip
            return self.cfg.async_save
        return "thread" if self.snapshots is not None else "off"

    def _local_snapshots(self) -> snapshot.Snapshots | None:
        every = self.cfg.snapshot_every
        if every == "0":
            return None
        root = Path(self.cfg.snapshot_dir) if self.cfg.snapshot_dir else snapshot.default_dir()
        if root is None:
            self.say("warning: this system has no /dev/shm; give --snapshot-dir (in memory) or --snapshot-every 0")
            return None
        every_n = None if every == "auto" else int(every)
        return snapshot.Snapshots(root, every_n, group.rank(), self.root.parent, self.say)

    # -- the state --

    def state(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
        """(files identical on every rank, this rank's own state, its shards under FSDP) of a checkpoint now."""
        train: dict[str, Any] = {"format_version": FORMAT_VERSION}
        for name, obj in self.stateful.items():
            if name == PROGRESS:
                train.update(obj.state_dict())
            else:
                train[name] = obj.state_dict()
        train.update(
            config=self.config_dict,
            world_size=group.world_size(),
            torch_version=str(torch.__version__),
        )
        own = {"rank": group.rank(), "world_size": group.world_size(), "rng": rng.state()}
        own.update({name: obj.state_dict() for name, obj in self.own_stateful.items()})
        if self.sharded:
            shards = fsdp.sharded_state(self.model, self.optimizer)
            self._rank0_buffers(shards["model"])
            return {TRAIN: train}, own, shards
        train["optimizer"] = self.optimizer.state_dict()
        model_state = self.model.state_dict()
        self._rank0_buffers(model_state)
        return {MODEL: model_state, TRAIN: train}, own, None

    def _rank0_buffers(self, model_state: dict) -> None:
        """Put copies of rank 0's buffers into ``model_state`` on every rank, so any rank may write them.

        Buffers (BatchNorm statistics) are each rank's own: DDP broadcasts rank 0's before
        the next forward, FSDP never. A checkpoint holds rank 0's, as the exported weights
        do; the model itself is left as it is.
        """
        if group.world_size() == 1:
            return
        by_device: dict[torch.device, list[str]] = {}  # one broadcast of their bytes, not one per buffer or dtype:
        for name, _ in self.model.named_buffers():  # a ResNet-50 has 161 buffers, a BatchNorm two dtypes
            if name in model_state:  # persistent buffers only
                by_device.setdefault(model_state[name].device, []).append(name)
        for names in by_device.values():
            buffers = [model_state[name] for name in names]
            flat = torch.cat([b.reshape(-1).view(torch.uint8) for b in buffers])  # a copy: the model's stay as they are
            group.broadcast(flat, src=0)
            parts = flat.split([b.numel() * b.element_size() for b in buffers])
            for name, b, part in zip(names, buffers, parts, strict=True):  # each its own storage, aligned for its dtype
                model_state[name] = part.clone().view(b.dtype).view(b.shape)

    def restore(self, folder: Path) -> dict[str, Any]:
        """Load the checkpoint in ``folder`` into the model, optimizer, every stateful and the RNGs; its
        ``train.pt``."""
        with optim.kernels_kept(self.optimizer):
            if self.sharded and is_sharded(read_manifest(folder)):
                train, own, _ = read_train(folder, self.device)
                self._load_shards(folder / SHARDED)
            else:
                train, own = read_state(folder, self.device if not self.sharded else "cpu")
                self._load_whole(train, folder)
        self._restore_rest(train, own)
        self.last_saved = train["step"]
        return train

    def _restore_rest(self, train: dict[str, Any], own: dict[str, Any] | None) -> None:
        """Everything but the model and the optimizer: the statefuls, the RNGs, and a warning for changed settings."""
        for name, obj in self.stateful.items():
            obj.load_state_dict(train if name == PROGRESS else train.get(name))
        for name, obj in self.own_stateful.items():
            obj.load_state_dict(None if own is None else own.get(name))
        self.saved_world_size = train["world_size"]
        self._restore_rng(own, train["world_size"], train["step"])
        if self.config is not None and train.get("config") is not None:
            old_task, task = upgrade(train["config"]).get("task", {}), self.config.to_dict()["task"]
            if task_moved(old_task, task):
                self.say(f"the task file moved since the checkpoint, its content the same: {old_task['spec']} -> "
                         f"{task['spec']}")  # fmt: skip
            changes = config_changes(train["config"], self.config)
            if changes:
                self.say(
                    "warning: settings changed since the checkpoint, the run will not match an "
                    f"uninterrupted one: {', '.join(changes)}"
                )

    def _load_shards(self, folder: Path) -> None:
        """This rank's shards of a sharded checkpoint, written by any number of ranks (DCP reshards)."""
        from ddp import dcp  # torch.distributed.checkpoint: imported when used (see ddp/fsdp.py)

        shapes = {k: torch.empty(v, device="meta") for k, v in dcp.tensor_shapes(folder, "model.").items()}
        check_architecture(self.model, shapes, folder)
        state = fsdp.sharded_state(self.model, self.optimizer)
        dcp.load_into(state, folder)
        fsdp.load_state(self.model, self.optimizer, state)

    def _load_whole(self, state: dict, folder: Path) -> None:
        """A whole model and optimizer state (a DDP checkpoint, or a sharded one under DDP)."""
        model_state, _ = strip_prefixes(state["model"])
        source = folder / MODEL if (folder / MODEL).exists() else folder  # or each rank's share
        check_architecture(self.model, model_state, source)
        if self.sharded:  # each rank keeps its shard of the whole tensors
            optimizer = fsdp.optimizer_by_name(self.model, state["optimizer"])
            fsdp.load_state(self.model, self.optimizer, {"model": model_state, "optim": optimizer}, full=True)
        else:
            self.model.load_state_dict(model_state)
            self._load_optimizer(state["optimizer"], folder)

    def _load_optimizer(self, saved: dict, folder: Path) -> None:
        groups, ours = len(saved["param_groups"]), len(self.optimizer.param_groups)
        if groups != ours:  # e.g. saved before weight decay spared biases, norms and embeddings
            raise CheckpointError(
                f"{folder}: its optimizer state has {groups} parameter group(s), this run's optimizer {ours}; "
                "a checkpoint of a run with weight decay from before the split into decayed and kept parameters "
                "resumes with --weight-decay-all"
            )
        self.optimizer.load_state_dict(saved)

    def _restore_rng(self, own: dict | None, saved_world: int, step: int) -> None:
        world, rank = group.world_size(), group.rank()
        if own is not None:
            rng.restore(own["rng"])
        else:
            rng.seed_all(rng.rank_seed(self.config.run.seed if self.config else 0, rank, step))
        if saved_world != world:
            epoch, samples = (self.stateful[PROGRESS].state_dict()[k] for k in ("epoch", "epoch_samples"))
            reseeded = list(range(saved_world, world))
            self.say(
                f"warning: checkpoint written by {saved_world} rank(s), resuming on {world}: "
                f"data continues at sample {samples} of epoch {epoch}; "
                + (
                    f"ranks {reseeded} had no RNG state and were reseeded from (seed, rank, step)"
                    if reseeded
                    else f"the RNG state of ranks {list(range(world, saved_world))} was not used"
                )
                + "; results will not be bitwise equal to a run on the original world size"
            )

    # -- finding and resuming --

    def resume(self, resume: str) -> Path | str | None:
        """Clean up after interrupted saves, then restore what ``resume`` selects (auto, never, or a folder); the
        source restored (a checkpoint folder, or the snapshot in host memory), or None.

        Under ``auto`` the ranks agree on the newest step every rank holds in memory; it serves when it is newer
        than the newest checkpoint on disk, and then nothing is read from ``checkpoints/``.
        """
        self.prepare()
        folder = self.find(resume)
        if self.snapshots is not None and self.run_id is not None:  # a run's folder was claimed: snapshots are its
            self.snapshots.open(self.run_id, os.environ.get("LOCAL_RANK", "0") == "0", self.config_dict)
            if self.replicas is not None:
                self.replicas.open(self.run_id)
        choice = self._memory_choice(folder) if resume == "auto" else None
        if choice is not None and choice[2] and not self.replicas.restore(choice[0], choice[2]):
            choice = None  # said: the disk serves
        if choice is None:
            if folder is not None:
                self.restore(folder)
            return folder
        step = choice[0]
        files, own, shards = self._memory_state(*choice)
        train = {**files[TRAIN], "config": self.snapshots.saved_config}
        with optim.kernels_kept(self.optimizer):
            if shards is not None:  # FSDP: every rank its own shards (memory_choice: every rank holds the step now)
                live = fsdp.sharded_state(self.model, self.optimizer)  # the layout, the optimizer's state made
                fsdp.load_state(self.model, self.optimizer, fsdp.fill(live, shards))
            else:
                self._load_whole({**train, "model": files[MODEL]}, Path(f"the snapshot of step {step}"))
        self._restore_rest(train, own)
        self.last_saved = None if folder is None else read_manifest(folder)["step"]
        return f"the snapshot in host memory ({self.snapshots.root / self.run_id}), step {step}"

    def _memory_choice(self, folder: Path | None) -> tuple[int, list[int], list[int]] | None:
        """Called by every rank: (the step to restore from host memory, the ranks that hold it, the ranks whose
        partners hold it for them), or None where the newest checkpoint on disk (``folder``) is as new.

        Under FSDP every rank needs its own shards: the newest step every rank holds. Under DDP every rank
        holds the same model and optimizer, so one rank's snapshot can serve a rank that lost its own.
        """
        held = [] if self.snapshots is None else self.snapshots.held(group.world_size())
        keeping = [] if self.replicas is None else self.replicas.held()  # this rank's copies of its source's
        rows = group.all_gather_objects((held, keeping))
        disk = None if folder is None else read_manifest(folder)["step"]
        # each rank's steps that its partner keeps
        kept = [[] for _ in rows] if self.replicas is None else [rows[p][1] for p in self.replicas.partner_of]
        choice = memory_choice([row[0] for row in rows], disk, peers=not self.sharded, kept=kept)
        if choice is None:
            return None
        step, holders = choice
        return step, holders, [r for r in range(len(rows)) if r not in holders and step in kept[r]]

    def _memory_state(self, step: int, holders: list[int], returned: list[int]) -> tuple[dict, dict | None, Any]:
        """(the files of the snapshot of ``step``, this rank's own state or None, its shards under FSDP): from
        this rank's memory; for a rank without it, its own snapshot sent back by its partner (``ddp.replicas``),
        or else the replicated files sent by the first rank that holds it (DDP only)."""
        if returned:  # given back by their partners (resume): now as if they had kept them
            holders = sorted([*holders, *returned])
            self.say(f"rank(s) {returned} hold no snapshot of step {step} (a replaced node?): their partners on "
                     "another node sent them back their own (--snapshot-replicas)")  # fmt: skip
        mine = restorable(self.snapshots.load(step, copy=False)) if group.rank() in holders else None
        if len(holders) == group.world_size():
            return mine
        lost = [r for r in range(group.world_size()) if r not in holders]
        files = group.broadcast_object(None if mine is None else mine[0], src=holders[0])
        self.say(
            f"warning: rank(s) {lost} hold no snapshot of step {step} (a replaced node?): rank {holders[0]} sent "
            "them the model and optimizer over the process group; their RNG is reseeded from (seed, rank, step), "
            "so a model that draws random numbers in training (dropout) will not match an uninterrupted run"
        )
        return files, None if mine is None else mine[1], None

    def prepare(self) -> None:
        """Rank 0 removes leftovers of interrupted saves and deletions."""
        error = None
        if group.rank() == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                for p in clean_stale(self.root):
                    what = "deletion" if p.name.startswith(PRUNED) else "save"
                    self.say(f"removed leftover {p} of an interrupted {what}")
            except OSError as e:
                error = e
        group.raise_if_any_failed(error, f"preparing {self.root}")

    def find(self, resume: str) -> Path | None:
        """The checkpoint to resume from, chosen by rank 0."""
        choice: Path | BaseException | None = None
        if group.rank() == 0:
            try:
                choice = self._choose(resume)
            except CheckpointError as e:
                choice = e
        choice = group.all_gather_objects(str(choice) if isinstance(choice, BaseException) else choice)[0]
        if isinstance(choice, str):
            raise CheckpointError(choice)
        return choice

    def _choose(self, resume: str) -> Path | None:
        if resume == "never":
            return None
        if resume == "auto":
            return newest_valid(self.root, self.say, self.run_id)
        folder = Path(resume)
        if folder.name == MANIFEST:
            folder = folder.parent
        validate(folder)
        return folder

    # -- when to save --

    def save_if_due(self, step: int, last_step: bool = False) -> None:
        """Called by every rank after each step: save when one is due. Every ``--checkpoint-every`` steps, when
        the ranks agreed that ``--checkpoint-every-seconds`` passed, and at a run's ``last_step`` (its end, or a
        stop); a snapshot in host memory every ``--snapshot-every`` steps."""
        due = self.due(step, last_step)
        snap = self.snapshots is not None and not last_step
        if snap and self.snapshots.due(step, force=due and self.async_mode != "off"):
            start = time.perf_counter()
            files, own, shards = self.state()  # first: an async save is written from it
            files[TRAIN] = {k: v for k, v in files[TRAIN].items() if k != "config"}  # the run's, recorded once
            shards = None if shards is None else fsdp.local_shards(shards)  # this rank's own part
            self.snapshots.take(step, (files, own, shards), self._buffers, built_s=time.perf_counter() - start)
            if self.replicas is not None:
                self.replicas.send(step)
        if due:
            self.save(step, last_step)

    def _buffers(self) -> set[int]:
        """The ``data_ptr`` of the model's buffers: the next forward may change them (``Snapshots.take``)."""
        return {b.data_ptr() for b in self.model.buffers()}

    def due(self, step: int, last_step: bool = False) -> bool:
        """Whether ``save_if_due`` writes a checkpoint of ``step`` (on disk; a snapshot is not one)."""
        if last_step:
            return self.last_saved != step
        every = self.cfg.checkpoint_every
        return (every > 0 and step % every == 0) or self.time_due

    def keep_best(self, step: int) -> None:
        """Called by every rank after an evaluation of ``step`` that is the best so far: its checkpoint is saved
        (if it is not already) and kept, beside --keep-last's."""
        self.best_step = step
        if step not in (self.last_saved, self.pending_step):  # pending: an async save of it is in flight
            self.save(step)

    def resumable(self, run_id: str) -> bool:
        """Whether ``--resume auto`` would find snapshots of run ``run_id`` in this host's memory."""
        return self.snapshots is not None and self.cfg.resume == "auto" and self.snapshots.exists(run_id)

    def before_update(self) -> None:
        """Before the optimizer changes the state: the snapshot of the last step must be complete, and with
        replicas kept by the partner."""
        if self.snapshots is not None:
            self.snapshots.wait()
        if self.replicas is not None:
            self.replicas.wait()

    def finish(self) -> None:
        """After the last save: wait for it, end the writer process, and remove this run's snapshots, which
        nothing will resume from."""
        self.wait()
        self.writer.close()
        if self.replicas is not None:
            self.replicas.close(remove=True)
        if self.snapshots is not None:
            self.snapshots.close(remove=True)

    def committed(self) -> int | None:
        """Called by every rank: the newest checkpoint's step, once the save in flight (if any) is committed."""
        self.wait()
        return self.last_saved

    @property
    def in_flight(self) -> bool:
        """Whether an async save is written or waits for its commit: the ranks then agree at every step."""
        return self.pending_step is not None

    def riders(self) -> list[int]:
        """This rank's riders on the stop vote (``ddp.stopping``), which every rank reads at the same step,
        however seldom steps are logged: a timed save is due, the share of time its snapshots cost (in
        millionths; -1 before there is a measure), and the interval they were taken at.

        Rank 0's clock alone decides the timed save, so that every rank saves at the same step; the slowest
        rank's snapshot cost sets the interval of every rank's.
        """
        every_s = self.cfg.checkpoint_every_seconds
        due = group.rank() == 0 and every_s > 0 and time.monotonic() - self.last_save_time >= every_s
        share = self.snapshots.share() if self.snapshots is not None else -1.0
        every = self.snapshots.every if self.snapshots is not None else 0
        return [int(due), round(share * 1e6) if share >= 0 else -1, every]

    def voted(self, agreed: list[int]) -> None:
        """The riders agreed (each the largest over the ranks): note a timed save; tune the snapshots' interval.

        A vote is read at the next one, which may carry a share measured before the last vote's changed the
        interval: that share is stale, and not applied a second time.
        """
        due, share, every = agreed
        self.time_due = self.time_due or due > 0
        if self.snapshots is not None and every == self.snapshots.every:
            self.snapshots.tune(share / 1e6 if share >= 0 else -1.0)

    def row(self) -> list[float]:
        """This rank's part of the trainer's agreement: (still writing, failed) of the save in flight."""
        return [float(flag) for flag in self.status()]

    def settle(self, rows: list[list[float]]) -> None:
        """Every rank's ``row``: commit the async save once every rank wrote it, or raise its error on every
        rank."""
        writing, failed = (sum(row[i] for row in rows) for i in range(2))
        if failed:
            self.wait()  # raises on every rank, naming the rank and the error
        elif self.pending_step is not None and not writing:
            self.commit()

    # -- saving --

    def save(self, step: int, last_step: bool = False) -> None:
        """Write a checkpoint of the state now, as that of ``step``: in step, or under ``--async-save`` from the
        snapshot of ``step`` (``ddp.persist``), or staged and written on a thread where no snapshot holds it (under
        FSDP: by DCP, each rank its shards); committed by ``commit`` once every rank has written. ``auto`` writes
        the ``last_step``'s in step: the export follows it."""
        self.wait()
        if not (self.guarded and self.proven_finite):
            self._refuse_nonfinite(step)
            self.proven_finite = True
        self.last_save_time, self.time_due = time.monotonic(), False
        self.pending_step = step
        mode = self.async_mode
        in_step = mode == "off" or (self.cfg.async_save == "auto" and last_step and self.sharded)
        pinned = None if in_step or self.snapshots is None else self.snapshots.pin(step)
        # from a snapshot on every rank, or on none: state() below is a collective, and so is DCP's plan
        if not in_step and not all(group.all_gather_objects(pinned is not None)):
            pinned = self.snapshots.unpin() if pinned is not None else None
        if pinned is not None:  # written from the snapshot of this step, in memory: no copy of the live state
            data, record, ready = pinned
            job = {"data": str(data), "record": record, "rank": group.rank(), "world_size": group.world_size(),
                   "tmp": str(self._tmp(step)), "config": self.config_dict}  # fmt: skip
            if self.sharded:  # the live DTensors give DCP the layout of the slot's shards
                layout = fsdp.sharded_state(self.model, self.optimizer)
                write = self.writer.shards_from_slot(job, mode, layout, self.side_group)
            else:
                write = self.writer.from_slot(job, mode)
            self.writer.start(write, ready)
            return
        replicated, own, sharded = self.state()
        files = rank_files(replicated, own, group.rank(), group.world_size())
        auto_in_step = self.cfg.async_save == "auto" and (last_step or not self.sharded)  # DDP: from snapshots only
        if mode == "off" or auto_in_step:
            self.writer.result = persist.outcome(lambda: self._write(step, files, sharded))
            self.commit()
        elif sharded is not None:
            self._write_shards_in_background(step, files, sharded)
        else:
            self._write_in_background(step, files)

    def _write_shards_in_background(self, step: int, files: dict[str, Any], sharded: dict) -> None:
        """Under FSDP without a snapshot to write from: DCP stages this rank's shards into CPU memory now, then it
        and a thread of ours write."""
        from ddp import dcp  # torch.distributed.checkpoint: imported when used (see ddp/fsdp.py)

        folder = self._tmp(step) / SHARDED
        future = dcp.save_sharded_async(sharded, folder, self.side_group)

        def write() -> dict[str, dict]:
            dcp.finish_sharded(future, folder)
            written = shard_entries(folder)
            written.update({name: write_file(self._tmp(step) / name, obj) for name, obj in files.items()})
            return written

        self.writer.start(write)

    def _write_in_background(self, step: int, files: dict[str, Any]) -> None:
        """``--async-save`` without a snapshot to write from: stage into reused CPU buffers now, write them on a
        thread."""
        seen: dict = {}
        staged = {name: stage(obj, self.buffers, name, seen) for name, obj in files.items()}
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the non-blocking copies must land before the thread reads them
        self.writer.start(lambda: self._write(step, staged))

    def _refuse_nonfinite(self, step: int) -> None:
        """No checkpoint ever holds a NaN or inf weight, so retention can never prune the last good one.

        A pass over every weight: 0.08 s of a 0.6 s save of 256 MB. Under ``guarded`` it is made once.
        """
        bad = any(not torch.isfinite(_local(p)).all() for p in self.model.parameters() if p.is_floating_point())
        ranks = [r for r, b in enumerate(group.all_gather_objects(bad)) if b]
        if ranks:
            raise CheckpointError(
                f"checkpoint of step {step} refused: the weights hold NaN or inf values on rank(s) {ranks}; the "
                f"newest checkpoint ({'none' if self.last_saved is None else f'step {self.last_saved}'}) is kept"
            )

    def _tmp(self, step: int) -> Path:
        return self.root / f".tmp-{step_dir(self.root, step).name}"

    def _write(self, step: int, files: dict[str, Any], sharded: dict | None = None) -> dict[str, dict]:
        """Write this rank's ``files`` of the checkpoint of ``step``: their manifest entries."""
        tmp = self._tmp(step)
        written = {} if sharded is None else write_shards(tmp / SHARDED, sharded)  # first: a collective
        tmp.mkdir(parents=True, exist_ok=True)
        written.update({name: write_file(tmp / name, obj) for name, obj in files.items()})
        return written

    def status(self) -> tuple[int, int]:
        """Local (still writing, failed) flags of the save in flight, for the trainer's step check."""
        if self.pending_step is None:
            return 0, 0
        writing = self.writer.busy
        return int(writing), int(not writing and self.writer.result.get("error") is not None)

    def wait(self) -> None:
        """Finish and commit the save in flight, if any, and its pruning."""
        self.writer.join()
        if self.pending_step is not None:
            self.commit()
        if self.pruner is not None:
            self.pruner.result()
            self.pruner = None

    def commit(self) -> None:
        """Once every rank's files are written: rank 0 writes the manifest and renames."""
        step, result = self.pending_step, self.writer.join()
        self.pending_step = None
        if self.snapshots is not None:
            self.snapshots.unpin()
        final = step_dir(self.root, step)
        tmp = self.root / f".tmp-{final.name}"
        error = None if result["error"] is None else str(result["error"])
        gathered = group.all_gather_objects((error, result["files"]))
        failed = [(r, m) for r, (m, _) in enumerate(gathered) if m is not None]
        if failed:
            if group.rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            detail = "; ".join(f"rank {r}: {m}" for r, m in failed)
            raise CheckpointError(f"checkpoint of step {step} failed, the previous ones are intact: {detail}")
        error = None
        if group.rank() == 0:
            try:
                files = {name: entry for _, f in gathered for name, entry in f.items()}
                self._commit(step, files, tmp, final)
                self._prune()
            except (OSError, CheckpointError) as e:
                error = e
        group.raise_if_any_failed(error, f"committing checkpoint {final}")
        self.last_saved = step

    def _commit(self, step: int, files: dict, tmp: Path, final: Path) -> None:
        manifest = {
            "format_version": FORMAT_VERSION,
            "run_id": self.run_id,
            "step": step,
            "world_size": group.world_size(),
            "torch_version": str(torch.__version__),
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "files": dict(sorted(files.items())),
        }
        write_durable(tmp / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
        fsync_dir(tmp)
        old = None
        if final.exists():  # saved again after resuming from an older one: swap, never lose it
            old = final.with_name(f".old-{final.name}.{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(self.root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _prune(self) -> None:
        """Retire the checkpoints beyond --keep-last now; delete their files in the background.

        Deleting a GB of files took 0.2 s here, a stall of every save (sync or async) for
        nothing the next step needs. Once renamed, a folder is never loaded; a kill mid-way
        leaves a ``.pruned-`` folder that ``clean_stale`` removes at the next start.
        """
        if self.pruner is not None:
            self.pruner.result()
        retired = []
        best = None if self.best_step is None else step_dir(self.root, self.best_step)
        for folder in complete_checkpoints(self.root)[: -self.cfg.keep_last]:
            if folder == best:
                continue
            (folder / MANIFEST).unlink()  # first: a half-deleted folder must not look complete
            retired.append(folder.with_name(f"{PRUNED}{folder.name}.{os.getpid()}"))  # never an existing name
            os.replace(folder, retired[-1])
        if retired:
            self.pruner = PRUNER.submit(remove_all, retired)


def memory_choice(
    held: list[list[int]], disk: int | None, peers: bool, kept: list[list[int]] | None = None
) -> tuple[int, list[int]] | None:
    """(the step to restore from memory, the ranks that hold it) given the steps each rank's snapshots ``held``
    and the newest checkpoint on ``disk``; None where disk is as new.

    The newest step every rank holds, itself or in its partner's ``kept`` copies (``--snapshot-replicas``),
    comes first: each rank restores its own state, bitwise. Only where no such step is newer than disk, and
    with ``peers`` (DDP: every rank holds the same model and optimizer), does the newest step any rank holds
    serve the ranks without it.
    """
    sets = [set(h) for h in held]
    cover = [s | set(k) for s, k in zip(sets, kept or [[] for _ in sets], strict=True)]
    newer = {s for s in set.union(*cover) if disk is None or s > disk}
    common = newer.intersection(*cover)
    step = max(common) if common else (max(newer) if peers and newer else None)
    return None if step is None else (step, [r for r, h in enumerate(sets) if step in h])


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: a DTensor's local shard, else the tensor."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t.detach()


def restorable(state: tuple) -> tuple:
    """A snapshot's state (views of its slot) as a restore keeps it: the tensors that are only copied into the
    model or into FSDP's shards stay views, saving a copy of the model's bytes; every other tensor is copied out,
    since the optimizer and the RNGs keep the tensors they are given and a later snapshot rewrites the slot."""
    files, own, shards = state
    files = {k: v if k == MODEL else _copied(v) for k, v in files.items()}
    return files, _copied(own), None if shards is None else _copied(shards, views=fsdp.LOCAL)


def _copied(obj: Any, views: str | None = None) -> Any:
    """``obj`` with each tensor cloned, but for those under the key ``views`` (FSDP's local shards: copied into
    their DTensors by ``fsdp.fill``)."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: v if k == views else _copied(v, views) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copied(v, views) for v in obj)
    return obj
