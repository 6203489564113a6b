"""Train a model with DistributedDataParallel (or sharded, FSDP), then save, reload and verify it.

Launch commands:

    make train-ddp                                   # every GPU, or 2 CPU processes (gloo)
    torchrun --standalone --nproc-per-node=2 -m ddp.train --epochs 3 --out runs/demo
    python -m ddp.train --steps 50                   # no torchrun: a world of one
    torchrun --standalone --nproc-per-node=2 -m ddp.train --task mytask.py:make --task-arg hidden=64
    torchrun --standalone --nproc-per-node=2 -m ddp.train --task charlm --task-arg text=README.md
    torchrun --standalone --nproc-per-node=2 -m ddp.train --strategy fsdp   # sharded: see README, FSDP
    # two nodes; run on each, HOST being node 0's address:
    torchrun --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d \\
        --rdzv-endpoint=HOST:29500 --rdzv-id=job42 --max-restarts=3 -m ddp.train

``--task`` picks what to train (ddp/tasks/: a built-in, or your own Task).
Each rank trains on its own shard; rank 0 writes ``<out>/mlp.params`` (``<task>.params``: the unwrapped
state_dict, atomically) and full-state checkpoints under ``<out>/checkpoints``; every
rank reloads the weights into a fresh model and all must give identical outputs.
A relaunch with the same ``--out`` resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from ddp import faults, group, model_card, rng, run_folder, trackers, watchdog, weights
from ddp.checkpoint_files import step_dir
from ddp.config import SECTIONS, Config
from ddp.errors import ConfigError, DDPError, Reported, first_line, say
from ddp.io import load_model, save_model
from ddp.options import parse
from ddp.parallel import local_model, probe_input
from ddp.task import Task
from ddp.tasks import resolve
from ddp.trainer import Trainer
from ddp.verify import DEFAULT_ATOL, VerifyReport, outputs, summary, verify_identical_outputs


def export_and_verify(trainer: Trainer) -> VerifyReport | None:
    """Rank 0 saves the task's weights file (``mlp.params``) and its model card; every rank reloads it into a
    fresh model; all must agree. None if a stop signal came first (the ranks agree between the phases)."""
    cfg, world, task, par = trainer.cfg, trainer.world, trainer.task, trainer.parallel
    path = trainer.out / task.weights_file
    probe = probe_input(task, cfg)
    reference = outputs(par.unwrapped, probe, cfg.optim.precision)  # under FSDP, all ranks' forward
    save_model(par.wrapped, path, format=cfg.export.format, state=par.whole_state())
    faults.at_phase(world.rank, "export")
    if trainer.stop.check():
        return None
    model_card.write_for(path, cfg.to_dict(), task, probe)
    if trainer.stop.check():
        return None
    return reload_and_verify(trainer, path, probe, reference)


def reload_and_verify(trainer: Trainer, path: Path, probe, reference=None, said: str = "") -> VerifyReport:
    """Every rank reloads the exported ``path`` into a fresh model; all must give the same outputs on ``probe``
    (and ``reference``, where given); each rank logs the report after ``said``."""
    cfg, world = trainer.cfg, trainer.world
    fresh = load_model(local_model(trainer.task, cfg, trainer.device, trainer.parallel.dtype), path)
    faults.perturb_reloaded(world.rank, fresh)
    atol = cfg.export.atol if cfg.export.atol is not None else DEFAULT_ATOL[cfg.optim.precision]
    report = verify_identical_outputs(fresh, probe, reference=reference, atol=atol, precision=cfg.optim.precision)
    group.log(world, said + summary(report, str(path), cfg.optim.precision), all_ranks=True)
    return report


def export_best(trainer: Trainer) -> VerifyReport | None:
    """``--keep-best``: rank 0 exports the model of the best evaluation's checkpoint as ``<task>.best.params``
    (with its model card); every rank reloads it into a fresh model, and all must agree."""
    cfg, world, task, step = trainer.cfg, trainer.world, trainer.task, trainer.evaluator.best.step
    if not cfg.eval.keep_best or step is None:
        return None
    stem, _, suffix = task.weights_file.partition(".")
    path = trainer.out / f"{stem}.best.{suffix}"
    error = None
    if world.rank == 0:
        try:
            weights.write(weights.read(step_dir(trainer.checkpointer.root, step)), path, cfg.export.format)
        except (OSError, DDPError) as e:
            error = e
    group.raise_if_any_failed(error, f"exporting the best checkpoint (step {step}) to {path}")
    probe = probe_input(task, cfg)
    model_card.write_for(path, cfg.to_dict(), task, probe)
    best = trainer.evaluator.best
    return reload_and_verify(trainer, path, probe, said=f"best: step {step}'s {best.metric} {best.value:.4f}; ")


def check_output_dir(out: Path) -> None:
    """Create ``--out`` and prove it is writable now, not an hour into training."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--out: cannot write to {out}: {e.strerror}; choose a writable folder") from None


def check_settings(cfg: Config) -> None:
    """Usage errors that can be found before any process group starts."""
    backend = group.resolve_backend(cfg.dist.backend)
    group.check_devices(group.world_from_env(backend, cfg.dist.device))
    if cfg.compute.sync_bn and backend != "nccl":
        raise ConfigError("--sync-bn needs CUDA GPUs and NCCL (PyTorch's SyncBatchNorm does not run on CPU)")
    if cfg.dist.static_graph and cfg.optim.grad_accum > 1:
        raise ConfigError("--static-graph cannot be combined with --grad-accum > 1 (DDP fails an internal assert)")
    if cfg.dist.strategy == "fsdp":
        check_fsdp_settings(cfg)
    trackers.check_available(cfg.log.tensorboard, cfg.log.wandb)
    check_output_dir(cfg.run.out_dir)
    run_folder.check(cfg, cfg.run.overwrite)


def check_fsdp_settings(cfg: Config) -> None:
    """Options that only DDP has, refused under FSDP rather than silently ignored."""
    d, refused = cfg.dist, []
    if d.static_graph or d.bucket_cap_mb is not None or not d.gradient_as_bucket_view:
        refused.append("--static-graph, --bucket-cap-mb and --no-gradient-as-bucket-view tune DDP's buckets")
    if cfg.compute.sync_bn:
        refused.append("--sync-bn: SyncBatchNorm is for DDP")
    if refused:
        raise ConfigError("--strategy fsdp does not take " + "; ".join(refused))


def configure_determinism(cfg: Config) -> None:
    """Bitwise-repeatable kernels when asked for (some ops get slower)."""
    if cfg.compute.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # must precede CUDA's first use
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def run(cfg: Config, world: group.World, task: Task | None = None, trackers: list | None = None) -> VerifyReport | None:
    """Train, export and verify on this rank; the verify report (None when a signal stopped it)."""
    group.log(world, f"{world.backend} on {world.device}, {world.world_size} rank(s)", all_ranks=cfg.log.log_all_ranks)
    group.log(world, f"config: {json.dumps(cfg.to_dict())}")
    trainer = Trainer(cfg, world, task, trackers)
    with trainer.stop.installed():  # through the export too: the checkpoint of the last step is durable by then
        trainer.train()
        if trainer.stop.requested:
            return None
        report = export_and_verify(trainer)
        if report is not None:
            export_best(trainer)
    if report is None:
        group.log(world, f"stopping on {trainer.stop.name} during the export: the checkpoint of the last step is "
                  "saved; relaunch to export and verify")  # fmt: skip
    return report


def fit(task: Task, trackers: list | None = None, **settings) -> VerifyReport | None:
    """Train ``task`` with DDP, save its weights, reload them on every rank and verify.

    The same trainer as ``ddp train``: run it under ``torchrun`` (every rank calls ``fit``)
    or alone (a world of one). ``settings`` are the options of ``ddp train --help`` by
    field name, e.g. ``fit(task, steps=200, batch_size=32, out="runs/mine")``; ``trackers``
    receive the logged figures on rank 0 (``ddp.trackers``). Returns the verify report
    (None if a SIGTERM stopped the run after a checkpoint).
    """
    cfg = config_from_settings(settings, task)
    check_settings(cfg)
    configure_determinism(cfg)
    with rng.seeded(cfg.run.seed):
        task.probe_input()  # a task whose probe cannot be derived fails now, before any process group
    watchdog.enable_flight_recorder(cfg)
    with group.process_group(cfg.dist) as world:
        return run(cfg, world, task, trackers)


def config_from_settings(settings: dict, task: Task) -> Config:
    """A Config from flat ``field=value`` settings, each found in its section by name."""
    owner = {f.name: section for section, kind in SECTIONS.items() for f in dataclasses.fields(kind)}
    values: dict[str, dict] = {section: {} for section in SECTIONS}
    for key, value in settings.items():
        if key not in owner or owner[key] == "task":
            raise ConfigError(f"fit(): unknown setting {key!r}; the settings are the fields of `ddp train --help`")
        values[owner[key]][key] = value
    values["task"] = {"spec": f"python:{task.name}"}  # recorded in checkpoints; the Task itself is passed
    return Config.from_dict(values)


def explain(world: group.World, e: BaseException) -> int | None:
    """Print a known failure as one line on stderr and give its exit code; None for a bug.

    The failure may sit under another exception: a collective fails because a rank died, and while it
    is handled the launcher ends this rank's DataLoader workers, whose death the loader then raises.
    """
    for cause in _chain(e):
        if isinstance(cause, DDPError):
            return say(world.prefix(), cause)
        if group.is_comm_failure(cause):
            print(
                f"{world.prefix()} error: a collective failed, another rank probably died or hung "
                f"(see the launcher's report of the failing rank): {first_line(cause)}",
                file=sys.stderr,
                flush=True,
            )
            return 1
    return None


def _chain(e: BaseException | None) -> list[BaseException]:
    """``e`` and the exceptions it was raised from or while handling, outermost first."""
    found: list[BaseException] = []
    while e is not None and e not in found:
        found.append(e)
        e = e.__cause__ or e.__context__
    return found


@record
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``torchrun -m ddp.train`` and ``ddp train``."""
    cfg = parse(argv)
    world = group.world_from_env()
    try:
        check_settings(cfg)
        configure_determinism(cfg)
        task = resolve(cfg)  # a bad --task is a usage error before any process group starts
    except ConfigError as e:
        return say("ddp train:", e)
    try:
        watchdog.enable_flight_recorder(cfg)
        with group.process_group(cfg.dist) as world:
            try:
                run(cfg, world, task)
            except Exception as e:
                code = explain(world, e)  # now, before leaving the group: see Reported
                if code is None:
                    raise
                raise Reported(code) from e
        return 0
    except Reported as r:
        return r.code
    except KeyboardInterrupt:  # a Ctrl-C outside training (starting, verifying): one line, no traceback
        print(f"{world.prefix()} interrupted (SIGINT)", file=sys.stderr, flush=True)
        return 130
    except Exception as e:  # joining or leaving the group
        code = explain(world, e)
        if code is None:
            raise
        return code


if __name__ == "__main__":
    group.run_process(main)
