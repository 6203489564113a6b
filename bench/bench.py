"""Benchmarks: training throughput and checkpoint speed, measured side by side.

    make bench                   # full run, about 13 minutes on 2 cores; writes bench/results.json
    python bench/bench.py --quick  # a smoke run with tiny sizes (the test suite runs this)
    python bench/bench.py --only cnn --no-checkpoints  # some training cases only
    python bench/strategies.py     # DDP vs FSDP alone: memory per rank and throughput on 1, 2, 3 ranks

Training (samples/s, same model, data and global batch):
  a  one process using every core
  b  N ranks, each training its shard with no gradient sync (the ideal for DDP here)
  c  N ranks with DDP as ddp.train runs it (Trainer.step)
  d  the plain tutorial loop: DataLoader + DistributedSampler, DDP and the model as they come
  e  a bare step: c's model (its memory format), DDP, batches and optimizer, forward, backward and step,
     nothing else; c/e is what the loop around the step costs (issue 34's target: at most 2 % on the wide MLP)
  c ... the same trainer with one setting changed; "c again" is c itself: the noise floor

These machines are noisy (steps of a few ms stall for ~4 ms now and then), so b, c, d and
the c variants run in the same processes as blocks of about --block-s seconds, in alternating
order, --repeats times; a ratio such as c/d is taken within each repeat and the median over
repeats is reported with its quartiles. Checkpoints are timed in steady state (after untimed
saves, with --keep-last pruning under way): medians of 9 paired ratios with their quartiles,
and the fastest over the fastest, the figure a disk's slow spells disturb least (the
lost-time window: medians of 5).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import mmap
import os
import platform
import shutil
import tempfile
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import xxhash
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

from ddp import group
from ddp import optim as ddp_optim
from ddp.checkpoint import Checkpointer, restorable
from ddp.checkpoint_files import MODEL, TRAIN, nbytes, read_state, stage, validate
from ddp.config import CheckpointConfig, Config
from ddp.data import make_loader
from ddp.model import MLP
from ddp.parallel import local_model
from ddp.task import Task
from ddp.tasks import resolve
from ddp.tasks.charlm import CharLM
from ddp.train import export_and_verify
from ddp.trainer import Trainer

from common import (
    ROOT,
    best_text,
    launch,
    median,
    next_batch,
    paired,
    paired_ratio,
    quiet,
    ratio_text,
    short,
    timed,
    trainer_step,
)
from peer_task import gpt
from strategies import ac_table, peak_rss_bytes, print_ac, print_table, reset_peak_rss, rss_bytes, strategies_table

# c with one setting changed (section, field, value); "c again" is c itself, the noise floor
C_VARIANTS = {
    "c static_graph": ("dist", "static_graph", True),
    "c bucket 1 MiB": ("dist", "bucket_cap_mb", 1.0),
    "c grads copied": ("dist", "gradient_as_bucket_view", False),
    "c contiguous": ("compute", "memory_format", "contiguous"),
    # the per-step figures (step times over ranks, memory, tflops: one all-gather and a metrics.jsonl line) and
    # the loss agreement at every step, against never: what watching a run costs at most
    "c figures every step": ("log", "log_every", 1),
    "c no figures": ("log", "log_every", 10**9),
    # a snapshot of the whole training state into host memory after every step (c takes none: it is never resumed)
    "c snapshot every step": ("checkpoint", "snapshot_every", "1"),
    # (the default, auto, is measured through the user's path: `peers.py --snapshots`. Here its share of the time
    # would count the other variants' blocks as its own training time, and so widen the interval too little)
    # a part of the step taken out (issue 34's breakdown): what the stop vote and the gradient norm cost
    "c no stop vote": ("ablate", "stop vote", None),
    "c no grad norm": ("ablate", "grad norm", None),
    # the logged step's gather read right after the step, as before issue 34's change (c reads it in the next step)
    "c gather read at once": ("ablate", "gather at once", None),
    # torch's default optimizer on a CPU (a Python loop over the parameters), which the tutorial and the peers run
    "c optimizer not fused": ("ablate", "unfused", None),
    "c again": None,
}
MODELS = {  # the built-in task and its settings (--task-arg)
    "mlp (textbook, 20-256-10)": ("mlp", {}),
    "mlp wide (1024x1024)": ("mlp", {"hidden": [1024, 1024]}),
    "cnn (2 conv, 16x16)": ("cnn", {"width": 32}),
    "cnn wide (64 channels)": ("cnn", {"width": 64}),
    "cnn wider (128 channels)": ("cnn", {"width": 128}),
}


def throughput_worker(cfg_dict: dict, block_s: float, repeats: int, variants: list[str]) -> dict:
    """On each rank: samples/s of variants b, c, d (and c options), interleaved per repeat."""
    torch.set_num_threads(1)
    cfg = Config.from_dict(cfg_dict)
    world = group.init(cfg.dist)
    try:
        result = _measure(cfg, cfg_dict, world, block_s, repeats, variants)
        group.barrier()  # the trainers are freed by now: leave the group together
        return result
    finally:
        group.shutdown()


def variant_config(cfg_dict: dict, variant: str) -> Config:
    """c's settings with the one change ``variant`` names."""
    changed = json.loads(json.dumps(cfg_dict))
    if C_VARIANTS[variant] and C_VARIANTS[variant][0] != "ablate":
        section, name, value = C_VARIANTS[variant]
        changed.setdefault(section, {})[name] = value
    return Config.from_dict(changed)


def step_functions(cfg: Config, cfg_dict: dict, world, variants: list[str]) -> tuple[dict, Trainer]:
    """One optimizer step of each variant, closures over their own model, optimizer and data."""
    trainer = quiet(Trainer(cfg, world))
    # d: the tutorial, as written there: per-sample DataLoader, DDP and the model as they come
    theirs_loader = DataLoader(trainer.task.train_data, batch_size=cfg.data.batch_size,
                               sampler=DistributedSampler(trainer.task.train_data, shuffle=True, seed=0))  # fmt: skip
    theirs = [iter(theirs_loader), theirs_loader]
    tutorial = DDP(trainer.task.model())
    tutorial_opt = torch.optim.SGD(tutorial.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum)

    def step_d():
        x, y = next_batch(theirs)
        tutorial_opt.zero_grad()
        F.cross_entropy(tutorial(x), y).backward()
        tutorial_opt.step()

    fns = {"b": bare_step(trainer, sync=False), "c": trainer_step(trainer), "d": step_d, "e": bare_step(trainer)}
    for v in variants:
        if v in C_VARIANTS:  # the same trainer with one setting changed
            changed = quiet(Trainer(variant_config(cfg_dict, v), world))
            if v.startswith("c snapshot"):  # a trainer never resumed has opened no snapshots (c takes none)
                changed.checkpointer.snapshots.open(f"bench-{uuid.uuid4().hex[:8]}", clean=False)
                fns[f"{v} (close)"] = functools.partial(changed.checkpointer.snapshots.close, remove=True)
                fns[f"{v} (cost)"] = changed.checkpointer.snapshots.cost  # what its copies took, on either thread
            fns[v] = ablated(changed, C_VARIANTS[v][1]) if C_VARIANTS[v] and C_VARIANTS[v][0] == "ablate" else (
                trainer_step(changed))  # fmt: skip
    return fns, trainer


def bare_step(trainer: Trainer, sync: bool = True):
    """A bare step on the trainer's model layout and batches: forward, backward and the trainer's optimizer,
    nothing else. b: no gradient sync at all (the ideal for DDP); e: under DDP as c wraps it (over 2+ ranks), so
    c/e is what the loop around the step costs."""
    cfg, k = trainer.cfg, trainer.cfg.optim.grad_accum
    model = local_model(trainer.task, cfg, torch.device("cpu"))
    model.load_state_dict(trainer.model.state_dict())
    wrapped = DDP(model, gradient_as_bucket_view=True) if sync and trainer.world.world_size > 1 else model
    opt = ddp_optim.build(model, cfg.optim)  # c's optimizer (fused): c/e is the loop around it
    batches = [iter(trainer.data.loader), trainer.data.loader]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        for i in range(k):
            x, y = next_batch(batches)
            skip = i < k - 1 and wrapped is not model  # DDP syncs the last micro-batch's gradients only
            with wrapped.no_sync() if skip else contextlib.nullcontext():
                (F.cross_entropy(wrapped(x), y) / k).backward()
        opt.step()

    return step


def ablated(trainer: Trainer, part: str):
    """A step of ``trainer`` without one of its parts: the stop vote, or the gradient norm (then 0, never
    non-finite), or the fused optimizer; or with the logged step's gather read at once. Benchmark only: the
    loop's guarantees need the first two."""
    step = trainer_step(trainer)
    if part == "unfused":
        for param_group in trainer.optimizer.param_groups:  # read at every step: torch's default from now on
            param_group["fused"] = False
        return step
    if part == "stop vote":
        trainer.stop.agree = lambda step, riders=list: None
        return step
    if part == "gather at once":

        def then_flush() -> None:
            step()
            trainer.flush()

        return then_flush

    trainer.grad_norm = lambda max_norm: torch.zeros(())
    return step


def _measure(cfg: Config, cfg_dict: dict, world, block_s: float, repeats: int, variants: list[str]) -> dict:
    fns, trainer = step_functions(cfg, cfg_dict, world, variants)
    global_batch = cfg.data.batch_size * world.world_size * cfg.optim.grad_accum
    # a block of every variant lasts about block_s: long enough to average the host's
    # millisecond stalls, short enough to interleave many blocks; all ranks run the same count
    per_step = max(group.all_gather_objects(timed(fns["c"], 5, warmup=3) / 5))
    steps = max(5, round(block_s / per_step))
    results: dict[str, list[float]] = {v: [] for v in variants}
    spent = dict.fromkeys(variants, 0.0)
    for rep in range(repeats):
        for v in variants if rep % 2 == 0 else variants[::-1]:  # alternate the order: no drift bias
            group.barrier()
            seconds = timed(fns[v], steps, warmup=3)
            spent[v] += seconds
            slowest = max(group.all_gather_objects(seconds))  # a step is as slow as the slowest rank
            results[v].append(steps * global_batch / slowest)
    for name, close in fns.items():
        if name.endswith("(close)"):
            close()
    return {"samples_per_s": {v: median(r) for v, r in results.items()}, "raw": results, "steps_per_block": steps,
            **snapshot_shares(fns, spent, steps * repeats), **where_time_goes(trainer, fns["c"])}  # fmt: skip


def snapshot_shares(fns: dict, spent: dict, steps: int) -> dict:
    """With a snapshot every step: what one snapshot's copy took (on the thread or not) and what it blocked
    training, each as a share of that variant's step (the slowest rank's)."""
    cost = fns.get("c snapshot every step (cost)")
    if cost is None or not cost["taken"]:
        return {}
    step_s = spent["c snapshot every step"] / steps
    shares = [cost["copy"] / cost["taken"] / step_s, cost["blocked"] / cost["taken"] / step_s]
    copy, blocked = (max(column) for column in zip(*group.all_gather_objects(shares), strict=True))
    return {"snapshot_copy_share": copy, "snapshot_blocked_share": blocked}


def where_time_goes(trainer: Trainer, step_c) -> dict:
    """One bare all-reduce of the gradients; an epoch of c; reload-and-verify."""
    grads = torch.zeros(sum(p.numel() for p in trainer.model.parameters()))
    allreduce_s = median([timed(lambda: torch.distributed.all_reduce(grads), 20, 3) / 20 for _ in range(3)])
    single = sorted(timed(lambda: torch.distributed.all_reduce(grads), 1, 0) for _ in range(100))
    group.barrier()
    t0 = time.perf_counter()
    for _ in range(trainer.data.steps_per_epoch):
        step_c()
    epoch_s = max(group.all_gather_objects(time.perf_counter() - t0))
    t0 = time.perf_counter()
    export_and_verify(trainer)
    verify_s = max(group.all_gather_objects(time.perf_counter() - t0))
    grad_mb = grads.nbytes / 2**20
    return {"epoch_s": epoch_s, "verify_s": verify_s, "allreduce_ms": 1000 * allreduce_s, "grad_mb": grad_mb,
            "allreduce_p50_ms": 1000 * single[50], "allreduce_p90_ms": 1000 * single[90]}  # fmt: skip


def one_process(cfg_dict: dict, block_s: float, repeats: int) -> float:
    """a: a world of one, every core, batch = the global batch."""
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = Config.from_dict(cfg_dict)
    world = group.init(cfg.dist)
    try:
        step = trainer_step(quiet(Trainer(cfg, world)))
        gb = cfg.data.batch_size * cfg.optim.grad_accum
        steps = max(5, round(block_s / (timed(step, 5, warmup=3) / 5)))
        return median([steps * gb / timed(step, steps, 3) for _ in range(repeats)])
    finally:
        group.shutdown()


QUICK_CASES = ("mlp (textbook, 20-256-10)",)  # --quick: one launch proves the table runs


def training_cases() -> list[tuple[str, tuple, dict]]:
    wide = MODELS["mlp wide (1024x1024)"]
    return [*((name, spec, {}) for name, spec in MODELS.items()),
            ("mlp wide, --grad-accum 4", wide, {"grad_accum": 4}),
            ("mlp wide, --precision bf16", wide, {"precision": "bf16"})]  # fmt: skip


def training_table(args, out: Path) -> list[dict]:
    rows = []
    for name, spec, optim in training_cases():
        if args.only not in name or (args.quick and name not in QUICK_CASES):
            continue
        cfg = {
            "task": {"spec": spec[0], "args": {**spec[1], "samples": args.samples}},
            "data": {"batch_size": args.batch},
            "optim": {"schedule": "constant", **optim},
            "checkpoint": {"resume": "never"},
            "run": {"steps": 10**9, "out": str(out / "train")},
            "dist": {"backend": "gloo"},
        }
        variants = ["b", "c", "e"]
        if not optim:  # the tutorial and the settings tried, on the plain cases
            variants += ["d", *(v for v in C_VARIANTS if v != "c contiguous" or spec[0] == "cnn")]
        res = launch(throughput_worker, args.nproc, cfg, args.block_s, args.repeats, variants)
        one = dict(cfg, data={"batch_size": args.batch * args.nproc})
        a = one_process(one, args.block_s, args.side_repeats)
        s, raw = res["samples_per_s"], res["raw"]
        global_batch = args.batch * args.nproc * optim.get("grad_accum", 1)
        row = {"case": name, "a": a, **s, "c/b": paired(raw, "c", "b"), "c/a": s["c"] / a,
               "verify_share_of_epoch": res["verify_s"] / res["epoch_s"],
               "step_ms_b": 1000 * global_batch / s["b"], "step_ms_c": 1000 * global_batch / s["c"],
               "allreduce_ms": res["allreduce_ms"], "grad_mb": res["grad_mb"],
               "allreduce_p50_ms": res["allreduce_p50_ms"], "allreduce_p90_ms": res["allreduce_p90_ms"],
               "steps_per_block": res["steps_per_block"], "repeats": args.repeats,
               **{k: res[k] for k in ("snapshot_copy_share", "snapshot_blocked_share") if k in res}}  # fmt: skip
        row["c/e"] = paired(raw, "c", "e")
        if "d" in s:
            row["c/d"] = paired(raw, "c", "d")
        for v in C_VARIANTS:
            if v in s:
                row[f"{v} / c"] = paired(raw, v, "c")
        if "c no figures" in s:
            row["figures every step / none"] = paired(raw, "c figures every step", "c no figures")
        rows.append(row)
        print(f"  {name}: " + ", ".join(f"{k}={short(v)}" for k, v in row.items() if k != "case"), flush=True)
    return rows


# ---- the input pipeline: DataLoader workers and pinned memory -----------------------

TUTORIAL_LOADER = ("tutorial", False)
# a user's per-sample Dataset over the same tensors: read through SeededSamples, collated
PER_SAMPLE = [("per-sample 0", False), ("per-sample 2", False)]
LOADER_NAMES = {
    "tutorial": "tutorial: per-sample, collated",
    "per-sample 0": "ours: per-sample, seeded, 0 workers",
    "per-sample 2": "ours: per-sample, seeded, 2 workers",
}


class Samples(torch.utils.data.Dataset):
    """The same tensors as a plain map-style dataset (one sample per __getitem__), as users write them."""

    def __init__(self, data) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return self.data[i]


def loader_table(args, out: Path) -> list[dict]:
    """Samples/s of c's step on this host's device (a world of one) per loader setting.

    Pinned memory only exists with CUDA; on a CPU host the table is about workers alone.
    """
    world = group.init(Config().dist)
    rows = []
    try:
        pins = (False, True) if world.device.type == "cuda" else (False,)
        per_sample = PER_SAMPLE[:1] if args.quick else PER_SAMPLE  # --quick: worker processes once, not twice
        settings = [(w, pin) for w in args.loader_workers for pin in pins] + [TUTORIAL_LOADER, *per_sample]
        default = (0, world.device.type == "cuda")
        for name in QUICK_CASES if args.quick else ("mlp (textbook, 20-256-10)", "cnn (2 conv, 16x16)"):
            task, model = MODELS[name]
            cfg = Config.from_dict({"task": {"spec": task, "args": {**model, "samples": args.samples}},
                                    "data": {"batch_size": args.batch},
                                    "optim": {"schedule": "constant"}, "checkpoint": {"resume": "never"},
                                    "run": {"steps": 10**9, "out": str(out / "loader")}})  # fmt: skip
            steps, trainers = {}, []
            for workers, pin in settings:
                t = quiet(Trainer(cfg, world))
                trainers.append(t)
                data, train_set = t.data, t.task.train_data
                if (workers, pin) == TUTORIAL_LOADER:  # d's loader: one sample at a time, then collate
                    data.loader = DataLoader(train_set, batch_size=args.batch, sampler=DistributedSampler(train_set))
                elif (workers, pin) in PER_SAMPLE:
                    task = dataclasses.replace(t.task, train_data=Samples(train_set))
                    data.loader = make_loader(
                        task, data.sampler, args.batch, int(workers.split()[1]), pin, cfg.run.seed
                    )
                else:
                    data.loader = make_loader(t.task, data.sampler, args.batch, workers, pin, cfg.run.seed)
                steps[(workers, pin)] = trainer_step(t)
            per_step = timed(steps[default], 5, warmup=3) / 5
            n = max(5, round(args.block_s / per_step))
            raw: dict = {k: [] for k in settings}
            for rep in range(args.side_repeats):
                for k in settings if rep % 2 == 0 else settings[::-1]:
                    raw[k].append(n * args.batch / timed(steps[k], n, warmup=3))
            for k in settings:
                ratio = paired({"x": raw[k], "base": raw[default]}, "x", "base")
                rows.append({"case": name, "device": str(world.device), "workers": k[0], "pin_memory": k[1],
                             "samples_per_s": median(raw[k]), "vs default": ratio})  # fmt: skip
                print(f"  {name}, workers {k[0]}, pin_memory {k[1]}: {median(raw[k]):,.0f} samples/s, "
                      f"vs default {short(ratio)}", flush=True)  # fmt: skip
            for t in trainers:
                t.data.close()  # worker processes exit now: dropped with a live iterator, each waits out 5 s
            del steps, t, trainers
            # Now, not at some later fork: DataLoader workers forked while these iterators await
            # the cycle collector inherit them and, collecting them, fail "can only test a child process".
            gc.collect()
    finally:
        group.shutdown()
    return rows


# ---- a corpus's size: what the sampler costs at 10^6, 10^8 and 10^10 samples -----------


class Virtual(torch.utils.data.Dataset):
    """``n`` samples with no storage behind them: sample i is drawn from a generator seeded with i."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        x = torch.randn(20, generator=torch.Generator().manual_seed(i))
        return x, i % 10


def scale_worker(n: int, out: str) -> dict:
    """On each rank: seconds from building the trainer to the end of its first step, and the peak RSS growth."""
    torch.set_num_threads(1)
    cfg = Config.from_dict({"data": {"batch_size": 64}, "optim": {"schedule": "constant"},
                            "run": {"steps": 10**9, "out": out}, "checkpoint": {"resume": "never"}})  # fmt: skip
    world = group.init(cfg.dist)
    try:
        before = rss_bytes()
        reset_peak_rss()
        start = time.perf_counter()
        trainer = quiet(Trainer(cfg, world, Task(model=lambda: MLP(), train_data=Virtual(n), name="virtual")))
        trainer.step(trainer.next_batches())
        return {"first_step_s": time.perf_counter() - start, "peak_growth": peak_rss_bytes() - before}
    finally:
        group.shutdown()


def scale_table(args, out: Path) -> list[dict]:
    """Time to the first step and peak memory against the dataset's length (2 ranks): it should be flat."""
    rows = []
    for n in (10**6, 10**10) if args.quick else (10**6, 10**8, 10**10):
        got = launch(scale_worker, args.nproc, n, str(out / f"scale-{n}"))
        rows.append({"samples": n, **got})
        print(f"  {n:.0e} samples: first step after {got['first_step_s']:.2f} s, "
              f"peak RSS growth {got['peak_growth'] / 2**20:.0f} MB", flush=True)  # fmt: skip
    return rows


# ---- token files: this project's loader against nanoGPT's get_batch ---------------------


def tokens_worker(path: str, out: str, block_s: float, repeats: int) -> dict:
    """One process: samples/s of Trainer.step on --task tokens (the real loader) and of nanoGPT's loop, alternating;
    and of Trainer.step with a snapshot every step (AdamW: 117 tensors), with what one snapshot blocks."""
    torch.set_num_threads(1)
    block, batch = 64, 32
    settings = {"train": path, "vocab": 256, "block": block, "layers": 2, "heads": 4, "embd": 64, "dropout": 0.0}
    cfg_dict = {"task": {"spec": "tokens", "args": settings}, "data": {"batch_size": batch},
                "optim": {"optimizer": "adamw", "lr": 1e-3, "schedule": "constant"},
                "run": {"steps": 10**9, "out": out}, "checkpoint": {"resume": "never"}}  # fmt: skip
    cfg = Config.from_dict(cfg_dict)
    world = group.init(cfg.dist)
    try:
        ours = trainer_step(quiet(Trainer(cfg, world)))
        cfg_dict["checkpoint"]["snapshot_every"] = "1"
        snapshotted = quiet(Trainer(Config.from_dict(cfg_dict), world))
        snaps = snapshotted.checkpointer.snapshots
        snaps.open(f"bench-{uuid.uuid4().hex[:8]}", clean=False)  # never resumed: opened by hand
        every_step = trainer_step(snapshotted)
        data = np.memmap(path, dtype=np.uint16, mode="r")
        model = CharLM(torch.arange(256), block, 2, 4, 64, 0.0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def theirs() -> None:  # nanoGPT's get_batch: random offsets into the memmap, stacked
            ix = torch.randint(len(data) - block, (batch,))
            x = torch.stack([torch.from_numpy(data[i : i + block].astype(np.int64)) for i in ix])
            y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + block].astype(np.int64)) for i in ix])
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        steps = max(3, round(block_s / (timed(theirs, 3, warmup=2) / 3)))
        fns = {"ours": ours, "nanogpt": theirs, "snapshot every step": every_step}
        t: dict[str, list[float]] = {name: [] for name in fns}
        for rep in range(repeats):
            for name in list(fns) if rep % 2 == 0 else list(fns)[::-1]:
                t[name].append(steps * batch / timed(fns[name], steps, warmup=1))
        cost, snapshot_step_s = snaps.cost, batch / median(t["snapshot every step"])
        snaps.close(remove=True)
        return {"ours_samples_per_s": median(t["ours"]), "nanogpt_samples_per_s": median(t["nanogpt"]),
                "ours / nanogpt": paired(t, "ours", "nanogpt"), "steps_per_block": steps,
                "snapshot every step / none": paired(t, "snapshot every step", "ours"),
                "snapshot_copy_share": cost["copy"] / max(cost["taken"], 1) / snapshot_step_s,
                "snapshot_blocked_share": cost["blocked"] / max(cost["taken"], 1) / snapshot_step_s}  # fmt: skip
    finally:
        group.shutdown()


def tokens_table(args, out: Path) -> dict:
    """--task tokens on a file of 2M random byte tokens, against nanoGPT's loop on the same model."""
    path = out / "tokens.bin"
    np.random.default_rng(0).integers(0, 256, 2_000_000).astype("<u2").tofile(path)
    result = launch(tokens_worker, 1, str(path), str(out / "tokens"), args.block_s * 2, args.side_repeats)
    print(f"  --task tokens {result['ours_samples_per_s']:,.0f} samples/s, nanoGPT's get_batch "
          f"{result['nanogpt_samples_per_s']:,.0f}: {ratio_text(result['ours / nanogpt'])}; a snapshot every step / "
          f"none {ratio_text(result['snapshot every step / none'])}, its copy {result['snapshot_copy_share']:.1%} of "
          f"a step, blocking {result['snapshot_blocked_share']:.1%}", flush=True)  # fmt: skip
    return result


def h2d_table(args) -> dict:
    """Host-to-device copies on CUDA: pageable vs pinned host memory, GB/s (alternating, repeats)."""
    if not torch.cuda.is_available():
        return {}
    n = (64 if args.quick else 256) * 2**20 // 4
    pageable, pinned = torch.randn(n), torch.randn(n).pin_memory()
    dest = torch.empty(n, device="cuda")
    times: dict[str, list[float]] = {"pageable": [], "pinned": []}

    def copy(src: torch.Tensor) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        dest.copy_(src, non_blocking=src.is_pinned())
        torch.cuda.synchronize()
        return time.perf_counter() - start

    copy(pageable), copy(pinned)  # warm up
    for rep in range(max(3, args.repeats)):
        for kind in ("pageable", "pinned") if rep % 2 == 0 else ("pinned", "pageable"):
            times[kind].append(copy(pageable if kind == "pageable" else pinned))
    gb = n * 4 / 1e9
    result = {
        "mb": n * 4 / 2**20,
        "device": torch.cuda.get_device_name(),
        **{f"{k}_gb_s": gb / median(v) for k, v in times.items()},
        "pinned/pageable": paired_ratio(times, "pageable", "pinned"),
    }
    print(f"  host-to-device {result['mb']:.0f} MB: pageable {result['pageable_gb_s']:.1f} GB/s, pinned "
          f"{result['pinned_gb_s']:.1f} GB/s, {ratio_text(result['pinned/pageable'])}x", flush=True)  # fmt: skip
    return result


# ---- checkpoints ---------------------------------------------------------------------


def big_state(megabytes: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model + SGD momentum of about ``megabytes`` MB of state (half weights, half momentum)."""
    width = int((megabytes * 2**20 / 24) ** 0.5)  # three width^2 layers, weights + momentum, 4 bytes
    model = MLP(hidden=(width, width, width, width))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    F.cross_entropy(model(torch.randn(4, 20)), torch.zeros(4, dtype=torch.long)).backward()
    opt.step()
    return model, opt


def tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors(v)


def write_floor(state, path: Path) -> float:
    """The write floor: the same tensor bytes, f.write(memoryview) into a fresh file, then fsync."""
    start = time.perf_counter()
    with open(path, "wb") as f:
        for t in tensors(state):
            f.write(memoryview(t.numpy()).cast("B"))
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - start


def read_floor(path: Path, buf: bytearray, cold: bool = False) -> tuple[float, float]:
    """(read floor, checksum pass): the least work that gets every byte of the file into memory.

    The floor is the fastest of ``readinto`` a preallocated buffer, a copy out of a memory
    map, and torch's copy out of one (on every core, as ``load_state_dict`` copies): a load
    must at least copy every byte into the model and optimizer. The checksum pass (xxh3 over
    a memory map) reads every byte but delivers none; a verified load makes that pass and
    the copy, so it is reported beside the floor, not as it.
    """

    def readinto() -> None:
        with open(path, "rb", buffering=0) as f:
            f.readinto(buf)

    def mapped(how: str) -> None:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if how == "copy":
                memoryview(buf)[: len(m)] = m
            elif how == "torch":
                with warnings.catch_warnings():  # a read-only map: torch warns that it is not writable
                    warnings.simplefilter("ignore")
                    torch.frombuffer(buf, dtype=torch.uint8)[: len(m)].copy_(torch.frombuffer(m, dtype=torch.uint8))
            else:
                xxhash.xxh3_128(m).digest()

    times = []
    for read in (readinto, lambda: mapped("copy"), lambda: mapped("torch"), lambda: mapped("hash")):
        if cold:
            drop_cache(path)
        start = time.perf_counter()
        read()
        times.append(time.perf_counter() - start)
    return min(times[:3]), times[3]


def floor_file(out: Path, rep: int) -> Path:
    """The floor's file of round ``rep``."""
    return out / f"raw{rep}.bin"


def retire(out: Path, rep: int, keep: int) -> None:
    """Delete the floor's file ``keep`` rounds older, after the new one, as --keep-last prunes."""
    floor_file(out, rep - keep).unlink(missing_ok=True)


def add(t: dict[str, list[float]], keys: tuple[str, ...], values: tuple[float, ...]) -> None:
    for k, v in zip(keys, values, strict=True):
        t[k].append(v)


def drop_cache(*paths: Path) -> bool:
    """Ask the kernel to forget these files' pages (our own files only); False where it cannot."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in paths:
        for p in [path] if path.is_file() else sorted(path.iterdir()):
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return True


def resume_load(folder: Path, model, opt) -> float:
    """What --resume does with a checkpoint: validate it, load it, into the model and optimizer."""
    start = time.perf_counter()
    validate(folder)
    state, _ = read_state(folder)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    return time.perf_counter() - start


def checkpoint_table(args, out: Path) -> dict:
    """Save and resume-load against the write and read floors, measured in turn, alternating order."""
    group.init(Config().dist)
    torch.set_num_threads(os.cpu_count() or 1)
    results: dict = {}
    lost_only, snapshots_only = args.only == "lost", args.only == "snapshots"
    try:
        for size in [] if lost_only or snapshots_only else args.sizes:
            model, opt = big_state(size)
            keep = 2
            in_step = CheckpointConfig(keep_last=keep, async_save="off")
            ckpt_sync = Checkpointer(out / f"sync{size}", in_step, model, opt)
            ckpt_async = Checkpointer(
                out / f"async{size}", CheckpointConfig(keep_last=keep, async_save="thread"), model, opt
            )
            state = ckpt_sync.state()[0]  # the files a save writes (model.pt, train.pt): the floors write these
            gb = nbytes(state) / 1e9
            buf = bytearray(nbytes(state) + 2**20)
            kinds = ("write", "save", "read", "checksum", "load", "read_cold", "checksum_cold", "load_cold", "copy",
                     "async_stall")  # fmt: skip
            t: dict[str, list[float]] = {k: [] for k in kinds}
            buffers: dict = {}
            stage(state, buffers)  # warm the copy floor's buffers, as async saves reuse theirs
            ckpt_async.save(0)
            ckpt_async.wait()
            # Steady state, as in a run that saves every N steps: keep+1 untimed rounds, so that
            # the floor and the save both write into blocks freed by their own retention. This
            # VM's disk wrote never-used blocks at a fifth of the speed (0.35 vs 1.8 GB/s).
            for warm in range(-keep - 1, 0):
                ckpt_sync.save(warm + keep + 2)
                write_floor(state, floor_file(out, warm))
                retire(out, warm, keep)
            ckpt_sync.wait()
            cold = True
            for rep in range(args.ckpt_repeats):
                step = rep + keep + 2
                raw, folder = floor_file(out, rep), out / f"sync{size}" / f"step-{step:08d}"
                for op in ("write", "save") if rep % 2 == 0 else ("save", "write"):
                    if op == "write":
                        t["write"].append(write_floor(state, raw))
                        retire(out, rep, keep)
                    else:
                        start = time.perf_counter()
                        ckpt_sync.save(step)
                        t["save"].append(time.perf_counter() - start)
                        ckpt_sync.wait()  # the background deletion of the checkpoint beyond --keep-last
                for op in ("read", "load") if rep % 2 == 0 else ("load", "read"):
                    if op == "read":
                        add(t, ("read", "checksum"), read_floor(raw, buf))
                    else:
                        t["load"].append(resume_load(folder, model, opt))
                cold = drop_cache(folder) and cold
                t["load_cold"].append(resume_load(folder, model, opt))
                add(t, ("read_cold", "checksum_cold"), read_floor(raw, buf, cold=True))
                start = time.perf_counter()
                stage(state, buffers)
                t["copy"].append(time.perf_counter() - start)
                start = time.perf_counter()
                ckpt_async.save(rep + 1)
                t["async_stall"].append(time.perf_counter() - start)
                ckpt_async.wait()
            results[f"{size} MB"] = {
                "state_gb": gb,
                **{f"{k}_gb_s": gb / median(v) for k, v in t.items() if k not in ("copy", "async_stall")},
                "save/write floor": paired_ratio(t, "write", "save"),  # speed as a fraction of the floor's
                "load/read floor": paired_ratio(t, "read", "load"),
                "load/read floor, cold": paired_ratio(t, "read_cold", "load_cold"),
                "load/checksum pass": paired_ratio(t, "checksum", "load"),
                "load/checksum pass, cold": paired_ratio(t, "checksum_cold", "load_cold"),
                "cold_cache_dropped": cold,
                "async_stall/copy": paired_ratio(t, "async_stall", "copy"),
            }
            r = results[f"{size} MB"]
            print(f"  {size} MB: save {ratio_text(r['save/write floor'])} of the write floor, load "
                  f"{ratio_text(r['load/read floor'])} of the read floor "
                  f"(cold {ratio_text(r['load/read floor, cold'])})", flush=True)  # fmt: skip
            del model, opt, state, buf, buffers
            gc.collect()
        # with every core training, and with one left to the background writer (as on a GPU node, where the
        # CPU does not train): the writer's own CPU time (reading the slot, hashing, copying into the page
        # cache) is lost to training only where it has no core of its own
        cores = os.cpu_count() or 1
        threads = [cores] if args.quick else sorted({cores, max(1, cores - 1)})[::-1]
        runs = [] if snapshots_only else [*((n, "ddp") for n in threads), (threads[-1], "fsdp")]
        results["lost_per_checkpoint"] = [lost_per_checkpoint(args, out, n, strategy) for n, strategy in runs]
        if not lost_only:
            results["snapshots"] = snapshot_table(args, out)
            results["snapshots"]["models"] = restore_rows(args, out) if results["snapshots"] else {}
    finally:
        group.shutdown()
    # two launches of fresh processes: most of a quick run's time for no figure worth reading
    if not args.quick and not lost_only and not snapshots_only:
        results["spread_save"] = spread_save_table(args, out)
    return results


def touched(opt: torch.optim.Optimizer) -> float:
    """Seconds to read each tensor of the optimizer's state once: what its first step pays for the part of a
    restore left mapped, not read (a checkpoint's ``train.pt`` is loaded with ``mmap``)."""
    start = time.perf_counter()
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                value.sum()
    return time.perf_counter() - start


def snapshot_table(args, out: Path) -> dict:
    """A snapshot in host memory against a synchronous save and a memory-copy floor; restoring from memory against
    restoring from a cold disk. The snapshot's copy is measured whole here (take, then wait at once): in training
    it overlaps the next forward and backward."""
    mb = args.sizes[0]
    model, opt = big_state(mb)
    cfg = CheckpointConfig(keep_last=2, snapshot_every="1", checkpoint_every_seconds=0, async_save="off")
    ckpt = Checkpointer(out / "snap", cfg, model, opt, say=lambda _: None)
    snaps = ckpt.snapshots
    if snaps is None:
        return {}
    snaps.open("bench", clean=False)
    floor_buf = [torch.empty_like(t) for t in tensors(ckpt.state()[0])]
    keys = ("floor", "snapshot", "save", "from_memory", "from_disk", "restore_floor")
    t: dict[str, list[float]] = {k: [] for k in keys}
    for rep in range(-1, args.ckpt_repeats):  # round -1 warms the slots and the disk's blocks
        step = rep + 3
        copy = timed(lambda: [b.copy_(x) for b, x in zip(floor_buf, tensors(ckpt.state()[0]), strict=True)], 1, 0)
        snap = timed(lambda s=step: (snaps.take(s, ckpt.state(), set), snaps.wait()), 1, 0)
        save = timed(lambda s=step: ckpt.save(s), 1, 0)
        disk, memory = restore_times(ckpt, step)
        least = restore_floor(model, floor_buf)
        if rep >= 0:
            add(t, tuple(t), (copy, snap, save, memory, disk, least))
    snaps.close(remove=True)
    result = {"state_mb": mb, "snapshot speed/floor": paired(t, "floor", "snapshot"),
              "save/snapshot": paired(t, "save", "snapshot"),
              "disk/memory restore": paired(t, "from_disk", "from_memory"),
              "restore floor/memory": paired(t, "restore_floor", "from_memory"),
              "disk/restore floor": paired(t, "from_disk", "restore_floor"),
              **{f"{k}_s": median(v) for k, v in t.items()}}  # fmt: skip
    print(f"  snapshot of {mb} MB: {result['snapshot_s']:.3f} s (copy floor {result['floor_s']:.3f} s, sync save "
          f"{result['save_s']:.3f} s); restore from memory {result['from_memory_s']:.3f} s, from a cold disk "
          f"{result['from_disk_s']:.3f} s ({ratio_text(result['disk/memory restore'])}x); restore floor "
          f"{result['restore_floor_s']:.3f} s", flush=True)  # fmt: skip
    return result


def restore_times(ckpt: Checkpointer, step: int) -> tuple[float, float]:
    """(from a cold disk, from memory): the checkpoint of ``step`` and its snapshot, each loaded into the
    checkpointer's model and optimizer until the optimizer's state has been read once (a checkpoint's is mapped,
    read in the first step)."""
    model, opt = ckpt.model, ckpt.optimizer
    folder = ckpt.root / f"step-{step:08d}"
    drop_cache(folder)
    disk = resume_load(folder, model, opt) + touched(opt)
    start = time.perf_counter()
    files, _, _ = restorable(ckpt.snapshots.load(step, copy=False))  # as the Checkpointer restores them
    model.load_state_dict(files[MODEL])
    opt.load_state_dict(files[TRAIN]["optimizer"])
    return disk, time.perf_counter() - start + touched(opt)


def bench_states() -> dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]:
    """The bench's models and the tokens case's GPT, each with its optimizer (SGD; the GPT's AdamW) after one step."""
    configs = {
        name: Config.from_dict({"task": {"spec": spec, "args": task_args}})
        for name, (spec, task_args) in MODELS.items()
    }
    models = {name: resolve(cfg).model() for name, cfg in configs.items()}
    models["tokens (charlm's GPT)"] = gpt()
    configs["tokens (charlm's GPT)"] = Config.from_dict({"optim": {"optimizer": "adamw", "lr": 1e-3}})
    states = {}
    for name, model in models.items():
        opt = ddp_optim.build(model, configs[name].optim)
        for p in model.parameters():
            p.grad = torch.full_like(p, 1e-3)
        opt.step()  # its state (momentum, AdamW's moments) exists, as in a run
        states[name] = (model, opt)
    return states


def restore_rows(args, out: Path) -> dict:
    """Restoring each of the bench's models from memory against from a cold disk: in a run's restart, the same."""
    rows = {}
    for i, (name, (model, opt)) in enumerate(bench_states().items()):
        cfg = CheckpointConfig(keep_last=2, snapshot_every="1", checkpoint_every_seconds=0, async_save="off")
        ckpt = Checkpointer(out / f"restore-{i}", cfg, model, opt, say=lambda _: None)
        ckpt.snapshots.open(f"bench-restore-{i}", clean=False)
        t: dict[str, list[float]] = {"disk": [], "memory": []}
        for rep in range(-1, args.ckpt_repeats):  # round -1 warms the slots and the disk's blocks
            step = rep + 3
            ckpt.snapshots.take(step, ckpt.state(), set)
            ckpt.snapshots.wait()
            ckpt.save(step)
            if rep >= 0:
                add(t, ("disk", "memory"), restore_times(ckpt, step))
        ckpt.snapshots.close(remove=True)
        mb = sum(x.numel() * x.element_size() for x in tensors(ckpt.state()[0])) / 2**20
        rows[name] = {"state_mb": mb, "disk/memory restore": paired(t, "disk", "memory"),
                      **{f"{k}_s": median(v) for k, v in t.items()}}  # fmt: skip
        row = rows[name]
        print(
            f"  restore of {name} ({mb:,.2f} MB of state): from memory {1e3 * row['memory_s']:.2f} ms, from a "
            f"cold disk {1e3 * row['disk_s']:.2f} ms ({ratio_text(row['disk/memory restore'])}x)",
            flush=True,
        )
    return rows


def restore_floor(model: torch.nn.Module, bufs: list[torch.Tensor]) -> float:
    """The least any restore from memory does: the same bytes copied from warm memory (``bufs``, in the order of
    ``tensors(Checkpointer.state()[0])``: the model's first) into the model's tensors, and into fresh ones for the
    rest (a restarted process has no optimizer state to copy into), each read once as ``touched`` does."""
    start = time.perf_counter()
    params = list(model.state_dict().values())
    for param, buf in zip(params, bufs, strict=False):
        param.copy_(buf)
    for buf in bufs[len(params) :]:
        buf.clone().sum()
    return time.perf_counter() - start


def spread_save_worker(megabytes: int, out: str, repeats: int) -> list[float]:
    """On every rank: seconds per checkpoint save of the same model + momentum (rank 0's figures)."""
    group.init(Config().dist)
    try:
        torch.manual_seed(0)  # the same state on every rank, as DDP keeps it
        model, opt = big_state(megabytes)
        ckpt = Checkpointer(Path(out), CheckpointConfig(keep_last=2, async_save="off"), model, opt, say=lambda _: None)
        ckpt.prepare()
        times = []
        for rep in range(3 + repeats):  # 3 untimed: steady state, writing into blocks the pruning freed
            group.barrier()
            start = time.perf_counter()
            ckpt.save(rep + 1)
            times.append(time.perf_counter() - start)
            ckpt.wait()  # the background deletion, untimed
        return times[3:]
    finally:
        group.shutdown()


def spread_save_table(args, out: Path) -> dict:
    """A save on 1 rank vs 2: with 2, rank 1 writes the optimizer state while rank 0 writes the model."""
    mb = args.sizes[0]
    times = {n: [] for n in (1, 2)}
    for rep in range(4):
        for n in (1, 2) if rep % 2 == 0 else (2, 1):
            times[n] += launch(spread_save_worker, n, mb, str(out / "spread"), 3)
            shutil.rmtree(out / "spread")
    result = {"state_mb": mb, **{f"{n}_rank_save_s": median(v) for n, v in times.items()},
              "2 ranks / 1": paired_ratio(times, 2, 1)}  # fmt: skip
    print(f"  save of {mb} MB: 1 rank {result['1_rank_save_s']:.3f} s, 2 ranks {result['2_rank_save_s']:.3f} s "
          f"(time ratio {best_text(result['2 ranks / 1'])})", flush=True)  # fmt: skip
    return result


def lost_per_checkpoint(args, out: Path, threads: int, strategy: str = "ddp") -> dict:
    """Training time lost per durable checkpoint over a window of steps, each saved where the trainer's own
    schedule (``--checkpoint-every``) makes it due: none, in step (sync), and ``--async-save thread`` and
    ``process``, which write from the step's snapshot. No other snapshots (``--snapshot-every`` far above the
    window): the async modes pay for the one they take. ``threads``: torch's intra-op threads in training;
    ``strategy``: ddp, or fsdp (its shards written through DCP)."""
    torch.set_num_threads(threads)
    width = args.window_width
    cfg = {
        "task": {"spec": "mlp", "args": {"hidden": [width, width, width], "samples": 4096}},
        "data": {"batch_size": 64},
        "optim": {"schedule": "constant"},
        "run": {"steps": 10**9},
        "dist": {"strategy": strategy},
        "checkpoint": {"resume": "never", "keep_last": 2, "snapshot_every": str(10**9),
                       "checkpoint_every_seconds": 0},
    }  # fmt: skip
    modes = {"none": "off", "sync": "off", "thread": "thread", "process": "process"}
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    n_ckpt = args.window // args.every
    for rep in range(args.window_repeats):
        for mode in list(times) if rep % 2 == 0 else list(times)[::-1]:
            c = json.loads(json.dumps(cfg))
            c["run"]["out"] = str(out / f"window-{strategy}-{mode}-{rep}")
            c["checkpoint"].update(async_save=modes[mode], checkpoint_every=0 if mode == "none" else args.every)
            trainer = quiet(Trainer(Config.from_dict(c), group.world_from_env()))
            trainer.resume()  # claims the run folder and opens its snapshots, as ddp.train does
            step = trainer_step(trainer)
            # steady state (pruning under way, buffers and writer process made), ending a step before a save: the
            # window's checkpoints are due at its 1st, (every+1)th, ... step, and the last one's background write
            # ends inside it, as training goes on after it. The wait after the window still counts what it does not
            for _ in range(3 * args.every - 1):
                step()
            trainer.checkpointer.wait()
            t0 = time.perf_counter()
            for _ in range(args.window):
                step()
            trainer.checkpointer.wait()
            times[mode].append(time.perf_counter() - t0)
            trainer.checkpointer.finish()
            shutil.rmtree(c["run"]["out"], ignore_errors=True)
    files, _, shards = trainer.checkpointer.state()
    state_mb = nbytes([files, shards]) / 2**20
    base = median(times["none"])
    lost = {f"{mode}_lost_per_ckpt_s": (median(times[mode]) - base) / n_ckpt for mode in ("sync", "thread", "process")}
    torch.set_num_threads(os.cpu_count() or 1)
    return {
        "strategy": strategy,
        "training_threads": threads,
        "state_mb": state_mb,
        "window_steps": args.window,
        "checkpoints": n_ckpt,
        "step_s": base / args.window,
        **lost,
        **{f"{mode}/sync": paired(
            {k: [t - b for t, b in zip(v, times["none"], strict=True)] for k, v in times.items()}, mode, "sync")
           for mode in ("thread", "process")},
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, two models: checks that the benchmark runs")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--output", default=str(ROOT / "bench" / "results.json"))
    p.add_argument("--only", default="", help="run only the training cases whose name contains this ('loader': "
                   "only the input pipeline table; 'lost': only the training time lost per checkpoint; "
                   "'snapshots': only the snapshot's copy and restore)")  # fmt: skip
    p.add_argument("--block-s", type=float, help="seconds per timed block of steps (default 0.5, quick 0.02)")
    p.add_argument("--repeats", type=int, help="interleaved blocks per variant (default 11, quick 1)")
    p.add_argument("--no-checkpoints", action="store_true", help="skip the checkpoint benchmarks")
    args = p.parse_args()
    q = args.quick
    args.block_s, args.repeats = args.block_s or (0.02 if q else 0.5), args.repeats or (1 if q else 11)
    args.side_repeats = max(1, args.repeats // 2)  # a and the loader table: coarser figures
    args.ckpt_repeats = 1 if q else 9  # this disk is noisy: medians of 9 paired ratios
    args.window_repeats = 1 if q else 5
    args.batch, args.samples = (16, 512) if q else (64, 8192)
    args.sizes = [4, 8] if q else [256, 1024]
    args.window, args.every, args.window_width = (4, 2, 64) if q else (12, 4, 4096)
    args.loader_workers = (0, 1) if q else (0, 1, 2)
    with tempfile.TemporaryDirectory(dir=ROOT / "bench") as tmp:
        tmp = Path(tmp)
        print(f"training throughput, {args.nproc} ranks on gloo (samples/s):", flush=True)
        training = training_table(args, tmp)
        print("input pipeline, a world of one (samples/s):", flush=True)
        loader = loader_table(args, tmp) if args.only in ("", "loader") else []
        print("host-to-device copies (CUDA only):", flush=True)
        h2d = h2d_table(args)
        print("token files (one process):", flush=True)
        tok = tokens_table(args, tmp) if args.only in ("", "tokens") else {}
        print("dataset size (a dataset with no storage, 2 ranks):", flush=True)
        scale = scale_table(args, tmp) if args.only in ("", "scale") else []
        print("checkpoints:", flush=True)
        ckpt = {} if args.no_checkpoints else checkpoint_table(args, tmp)
        print("DDP vs FSDP:", flush=True)
        strategies = strategies_table(q, tmp) if args.only in ("", "strategies") else []
        print("activation checkpointing:", flush=True)
        ac = ac_table(q, tmp) if args.only in ("", "ac") else {}
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"Python {platform.python_version()}",
        "quick": q,
        "training": training,
        "loader": loader,
        "host_to_device": h2d,
        "scale": scale,
        "tokens": tok,
        "checkpoints": ckpt,
        "strategies": strategies,
        "activation_checkpointing": ac,
    }
    Path(args.output).write_text(json.dumps(results, indent=1))
    print_tables(results)
    print(f"wrote {args.output}")


def print_tables(r: dict) -> None:
    print(f"\nmachine: {r['machine']}")
    print("ratios: median over repeats of the ratio within each repeat (quartiles in brackets)")
    print("| case | a: 1 proc | b: no sync | c: ddp | d: tutorial | c/b | c/d | c/e: loop | step ms b / c "
          "| all-reduce ms (MB) | verify / epoch |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in r["training"]:
        d = f"{row['d']:,.0f}" if "d" in row else "-"
        cd = ratio_text(row["c/d"]) if "c/d" in row else "-"
        print(f"| {row['case']} | {row['a']:,.0f} | {row['b']:,.0f} | {row['c']:,.0f} | {d} | {ratio_text(row['c/b'])} "
              f"| {cd} | {ratio_text(row['c/e'])} | {row['step_ms_b']:.2f} / {row['step_ms_c']:.2f} "
              f"| {row['allreduce_ms']:.2f} ({row['grad_mb']:.2f}) | {row['verify_share_of_epoch']:.1%} |")  # fmt: skip
    print("\n| setting vs c | " + " | ".join(row["case"] for row in r["training"] if "c/d" in row) + " |")
    print("|---|" + "---:|" * sum("c/d" in row for row in r["training"]))
    for v in C_VARIANTS:
        cells = [ratio_text(row[f"{v} / c"]) if f"{v} / c" in row else "-" for row in r["training"] if "c/d" in row]
        print(f"| {v} | " + " | ".join(cells) + " |")
        if v == "c snapshot every step":  # beside it, what the copy takes: the target (0.95) holds where it is <= 5 %
            for key, what in (("snapshot_copy_share", "its copy"), ("snapshot_blocked_share", "training it blocks")):
                cells = [f"{row[key]:.1%}" if key in row else "-" for row in r["training"] if "c/d" in row]
                print(f"| {what}, share of a step | " + " | ".join(cells) + " |")
    cells = [
        ratio_text(row["figures every step / none"]) for row in r["training"] if "figures every step / none" in row
    ]
    print("| figures every step / none (throughput) | " + " | ".join(cells) + " |")
    if r["loader"]:
        print(f"\ninput pipeline on {r['loader'][0]['device']} (a world of one; default: workers 0, pinned on CUDA):")
        print("| case | loader | pin_memory | samples/s | vs default |\n|---|---|---|---:|---:|")
        for row in r["loader"]:
            w = row["workers"]
            loader = LOADER_NAMES.get(w, f"ours: batched, {w} workers")
            print(f"| {row['case']} | {loader} | {row['pin_memory']} | {row['samples_per_s']:,.0f} "
                  f"| {ratio_text(row['vs default'])} |")  # fmt: skip
    if r["strategies"]:
        print_table(r["strategies"])
    if r["tokens"]:
        t = r["tokens"]
        ours, theirs = t["ours_samples_per_s"], t["nanogpt_samples_per_s"]
        print(f"\ntoken files: --task tokens {ours:,.0f} samples/s, nanoGPT's get_batch {theirs:,.0f} "
              f"(same model, one process): {ratio_text(t['ours / nanogpt'])}; a snapshot every step / none "
              f"{ratio_text(t['snapshot every step / none'])}, its copy {t['snapshot_copy_share']:.1%} of a step, "
              f"blocking {t['snapshot_blocked_share']:.1%}")  # fmt: skip
    if r["scale"]:
        print("\ndataset size: time to the first step and peak RSS growth of rank 0 (the sampler holds no index list):")
        print("| samples | first step (s) | peak RSS growth (MB) |\n|---:|---:|---:|")
        for row in r["scale"]:
            print(f"| {row['samples']:.0e} | {row['first_step_s']:.2f} | {row['peak_growth'] / 2**20:.0f} |")
    if r["activation_checkpointing"]:
        print_ac(r["activation_checkpointing"])
    if not r["checkpoints"]:
        return
    print(
        "\ncheckpoints: GB/s, and speed as a fraction of the floor's in the same run (median, quartiles; best: "
        "fastest over fastest)"
    )
    print("| state | write floor | save | save/floor | read floor | load | load/floor | cold: read floor | load "
          "| load/floor | load/checksum pass (hot; cold) | async stall/copy |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, c in r["checkpoints"].items():  # none under --only lost
        if name in ("lost_per_checkpoint", "spread_save", "snapshots"):
            continue
        cold = c["cold_cache_dropped"]
        cells = [f"{c['state_gb'] * 1000:.0f} MB", *(f"{c[f'{k}_gb_s']:.2f}" for k in ("write", "save")),
                 best_text(c["save/write floor"]), *(f"{c[f'{k}_gb_s']:.2f}" for k in ("read", "load")),
                 best_text(c["load/read floor"]),
                 *((f"{c['read_cold_gb_s']:.2f}", f"{c['load_cold_gb_s']:.2f}", best_text(c["load/read floor, cold"]))
                   if cold else ("cannot drop the cache here", "-", "-")),
                 f"{c['load/checksum pass']['median']:.2f}; {c['load/checksum pass, cold']['median']:.2f}",
                 ratio_text(c["async_stall/copy"])]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    for lost in r["checkpoints"].get("lost_per_checkpoint", []):
        kind = lost.get("strategy", "ddp")
        print(f"\ntraining time lost per checkpoint ({kind}, {lost['state_mb']:.0f} MB state, {lost['checkpoints']} "
              f"checkpoints in {lost['window_steps']} steps of {lost['step_s']:.3f} s, {lost['training_threads']} "
              f"training thread(s) on {os.cpu_count()} cores): sync {lost['sync_lost_per_ckpt_s']:.3f} s, "
              f"--async-save thread {lost['thread_lost_per_ckpt_s']:.3f} s ({ratio_text(lost['thread/sync'])} of "
              f"sync), process {lost['process_lost_per_ckpt_s']:.3f} s "
              f"({ratio_text(lost['process/sync'])})")  # fmt: skip
    snap = r["checkpoints"].get("snapshots")
    if snap:
        print(f"snapshot in host memory of {snap['state_mb']} MB: {snap['snapshot_s']:.3f} s whole, "
              f"{ratio_text(snap['snapshot speed/floor'])} of a plain copy's speed; a synchronous save takes "
              f"{ratio_text(snap['save/snapshot'])}x as long; restoring from memory is "
              f"{ratio_text(snap['disk/memory restore'])}x faster than from a cold disk, at "
              f"{ratio_text(snap['restore floor/memory'])} of the speed of a plain copy of its bytes from memory "
              f"(the floor), which is itself {ratio_text(snap['disk/restore floor'])}x faster than the cold disk: "
              "the most any restore from memory could gain here")  # fmt: skip
    spread = r["checkpoints"].get("spread_save")
    if not spread:
        return
    print(f"save of {spread['state_mb']} MB (model + momentum) on 1 rank: {spread['1_rank_save_s']:.3f} s; "
          f"on 2 ranks (rank 1 writes the momentum): {spread['2_rank_save_s']:.3f} s; "
          f"2/1: {best_text(spread['2 ranks / 1'])}")  # fmt: skip


if __name__ == "__main__":
    main()
