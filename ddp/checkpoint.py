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
import threading
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ddp import fsdp, group, rng
from ddp.checkpoint_files import (
    FORMAT_VERSION,
    MANIFEST,
    MODEL,
    PRUNED,
    SHARDED,
    TRAIN,
    clean_stale,
    complete_checkpoints,
    fsync_dir,
    is_sharded,
    newest_valid,
    rank_file,
    read_manifest,
    read_state,
    read_train,
    remove_all,
    spread,
    stage,
    step_dir,
    validate,
    write_durable,
    write_file,
    write_shards,
)
from ddp.config import CheckpointConfig, Config, config_changes
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
        """
        self.root, self.cfg, self.say = Path(root), cfg, say
        self.model, self.optimizer, self.stateful = model, optimizer, dict(stateful or {})
        self.own_stateful = dict(own_stateful or {})
        self.saved_world_size: int | None = None  # of the checkpoint restored, if any
        self.sharded, self.device, self.config = sharded, device, config
        self.buffers: dict[str, torch.Tensor] = {}  # async staging, reused from save to save
        self.thread: threading.Thread | None = None
        self.result: dict = {}
        self.pending_step: int | None = None
        self.last_saved: int | None = None
        self.pruner: threading.Thread | None = None
        self.run_id: str | None = None  # the folder's run (ddp.run_folder): written in manifests, resumed alone

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
            config=None if self.config is None else self.config.to_dict(),
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
        for name, _ in self.model.named_buffers():
            if name in model_state:  # persistent buffers only
                model_state[name] = model_state[name].clone()
                group.broadcast(model_state[name], src=0)

    def restore(self, folder: Path) -> dict[str, Any]:
        """Load the checkpoint in ``folder`` into the model, optimizer, every stateful and the RNGs; its
        ``train.pt``."""
        if self.sharded and is_sharded(read_manifest(folder)):
            train, own, _ = read_train(folder, self.device)
            self._load_shards(folder / SHARDED)
        else:
            train, own = read_state(folder, self.device if not self.sharded else "cpu")
            self._load_whole(train, folder)
        for name, obj in self.stateful.items():
            obj.load_state_dict(train if name == PROGRESS else train.get(name))
        for name, obj in self.own_stateful.items():
            obj.load_state_dict(None if own is None else own.get(name))
        self.last_saved, self.saved_world_size = train["step"], train["world_size"]
        self._restore_rng(own, train["world_size"], train["step"])
        if self.config is not None and train.get("config") is not None:
            changes = config_changes(train["config"], self.config)
            if changes:
                self.say(
                    "warning: settings changed since the checkpoint, the run will not match an "
                    f"uninterrupted one: {', '.join(changes)}"
                )
        return train

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

    def resume(self, resume: str) -> Path | None:
        """Clean up after interrupted saves, then restore the checkpoint ``resume`` selects (auto, never, or a
        folder); the folder restored, or None."""
        self.prepare()
        folder = self.find(resume)
        if folder is not None:
            self.restore(folder)
        return folder

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

    # -- saving --

    def save(self, step: int) -> None:
        """Write a checkpoint of the state now, as that of ``step``: in step, or staged and written on a
        thread under ``--async-save`` (committed by ``commit`` once every rank has written)."""
        self.wait()
        self._refuse_nonfinite(step)
        replicated, own, sharded = self.state()
        shared, shares = spread(replicated, group.world_size())
        files = {rank_file(group.rank()): own}
        if group.rank() == 0:
            files.update(shared)
        files.update(shares.get(group.rank(), {}))
        self.pending_step = step
        if sharded is not None or not self.cfg.async_save:
            self.result = self._write(step, files, sharded)
            self.commit()
            return
        seen: dict = {}
        staged = {name: stage(obj, self.buffers, name, seen) for name, obj in files.items()}
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the non-blocking copies must land before the thread reads them
        self.result = {}
        self.thread = threading.Thread(target=self._write_into_result, args=(step, staged), daemon=True)
        self.thread.start()

    def _refuse_nonfinite(self, step: int) -> None:
        """No checkpoint ever holds a NaN or inf weight, so retention can never prune the last good one."""
        bad = any(not torch.isfinite(_local(p)).all() for p in self.model.parameters() if p.is_floating_point())
        ranks = [r for r, b in enumerate(group.all_gather_objects(bad)) if b]
        if ranks:
            raise CheckpointError(
                f"checkpoint of step {step} refused: the weights hold NaN or inf values on rank(s) {ranks}; the "
                f"newest checkpoint ({'none' if self.last_saved is None else f'step {self.last_saved}'}) is kept"
            )

    def _write_into_result(self, step: int, files: dict[str, Any]) -> None:
        self.result = self._write(step, files)

    def _write(self, step: int, files: dict[str, Any], sharded: dict[str, Any] | None = None) -> dict:
        tmp = self.root / f".tmp-{step_dir(self.root, step).name}"
        try:
            written = {} if sharded is None else write_shards(tmp / SHARDED, sharded)  # first: a collective
            tmp.mkdir(parents=True, exist_ok=True)
            written.update({name: write_file(tmp / name, obj) for name, obj in files.items()})
            return {"files": written, "error": None}
        except (OSError, CheckpointError) as e:
            return {"files": {}, "error": e}

    def status(self) -> tuple[int, int]:
        """Local (still writing, failed) flags of the save in flight, for the trainer's step check."""
        if self.pending_step is None:
            return 0, 0
        writing = self.thread is not None and self.thread.is_alive()
        return int(writing), int(not writing and self.result.get("error") is not None)

    def wait(self) -> None:
        """Finish and commit the save in flight, if any, and its pruning."""
        if self.thread is not None:
            self.thread.join()
        if self.pending_step is not None:
            self.commit()
        if self.pruner is not None:
            self.pruner.join()
            self.pruner = None

    def commit(self) -> None:
        """Once every rank's files are written: rank 0 writes the manifest and renames."""
        step, result = self.pending_step, self.result
        self.pending_step, self.thread = None, None
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
            self.pruner.join()
        retired = []
        for folder in complete_checkpoints(self.root)[: -self.cfg.keep_last]:
            (folder / MANIFEST).unlink()  # first: a half-deleted folder must not look complete
            retired.append(folder.with_name(f"{PRUNED}{folder.name}.{os.getpid()}"))  # never an existing name
            os.replace(folder, retired[-1])
        if retired:
            self.pruner = threading.Thread(target=remove_all, args=(retired,), name="ddp-prune")
            self.pruner.start()


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: a DTensor's local shard, else the tensor."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t.detach()
