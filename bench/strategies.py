"""DDP vs FSDP: what each rank holds, its peak memory, and throughput, on 1, 2 and 3 ranks; and what
activation checkpointing (--ac full) saves in memory and costs in time.

    python bench/strategies.py                 # N = 1, 2, 3; an MLP of 4 x 2048 with AdamW
    python bench/strategies.py --quick         # N = 2, a small MLP (bench.py --quick runs this)

Each (strategy, N) is one fresh launch, so that its peak resident memory is its own. Per
rank: bytes of parameters, gradients and optimizer state this rank holds (its shards
under FSDP, measured after training steps), the peak resident set size minus the RSS
before the trainer was built (model, data, DDP buckets or FSDP's all-gathered blocks),
and samples/s over timed steps taken as ``ddp.train`` takes them.

Peak RSS is measured twice: with glibc's defaults, as a user runs, and with
``MALLOC_MMAP_THRESHOLD_`` fixed at 1 MiB, where every large block is mapped and unmapped
on its own and so leaves the process when freed. FSDP allocates and frees a block's
whole parameters and gradients at every step; under the defaults glibc keeps much of
that memory in its heaps after it is freed (its mmap threshold grows with the sizes it
sees), so the first figure overstates what FSDP keeps live and the second shows it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import time
from pathlib import Path

import torch

from ddp import group
from ddp.checkpoint_files import nbytes
from ddp.config import Config
from ddp.trainer import Trainer

from common import ROOT, launch, quiet, trainer_step


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """This process's own peak RSS (VmHWM).

    Not ``ru_maxrss``: Linux carries the launching process's peak across fork and exec into
    it, so after the checkpoint bench every worker reported the bench's 5.9 GB.
    """
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_peak_rss() -> None:
    """Start VmHWM again from the current RSS (Linux >= 4.0), so the peak is the trainer's."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def strategy_worker(cfg_dict: dict, steps: int) -> dict:
    """On each rank: bytes held, peak memory growth and samples/s of one strategy."""
    torch.set_num_threads(1)
    cfg = Config.from_dict(cfg_dict)
    world = group.init(cfg.dist)
    try:
        before = rss_bytes()
        reset_peak_rss()
        trainer = quiet(Trainer(cfg, world))
        step = trainer_step(trainer)
        for _ in range(3):  # warm-up: the optimizer state exists after the first step
            step()
        params = list(trainer.model.parameters())
        held = {
            "params": nbytes(params),
            "grads": nbytes([p.grad for p in params if p.grad is not None]),
            "optimizer": nbytes(trainer.optimizer.state_dict()["state"]),
        }
        group.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        seconds = time.perf_counter() - start
        peak = peak_rss_bytes()
        global_batch = cfg.data.batch_size * world.world_size
        return {**held, "peak_growth": peak - before, "samples_per_s": steps * global_batch / seconds}
    finally:
        group.shutdown()


def strategies_table(quick: bool, out: Path) -> list[dict]:
    """One row per (strategy, N): rank 0's figures, and each FSDP figure as a share of DDP's."""
    hidden, ranks, steps = ([256, 256], (2,), 5) if quick else ([2048] * 4, (1, 2, 3), 20)
    cfg = {
        "task": {"spec": "mlp", "args": {"hidden": hidden, "samples": 4096}},
        "data": {"batch_size": 32},
        "optim": {"optimizer": "adamw", "schedule": "constant"},
        "run": {"steps": 10**9, "out": str(out / "strategies")},
        "checkpoint": {"resume": "never"},
    }
    rows = []
    for n in ranks:
        got = {}
        for strategy in ("ddp", "fsdp"):
            c = json.loads(json.dumps(cfg))
            c["dist"] = {"strategy": strategy}
            got[strategy] = launch(strategy_worker, n, c, steps)
            if not quick:  # a launch more each: the quick run only proves the table runs
                with mmap_threshold(2**20):
                    got[strategy]["peak_growth_mapped"] = launch(strategy_worker, n, c, 1)["peak_growth"]
        for strategy, r in got.items():
            share = {f"{k} / ddp": r[k] / got["ddp"][k] for k in ("params", "grads", "optimizer", *PEAKS) if k in r}
            rows.append({"strategy": strategy, "ranks": n, "hidden": hidden, **r, **share,
                         "throughput / ddp": r["samples_per_s"] / got["ddp"]["samples_per_s"]})  # fmt: skip
            print(f"  {strategy} on {n} rank(s): " + ", ".join(f"{k}={v:,.3g}" for k, v in rows[-1].items()
                                                              if isinstance(v, float | int)), flush=True)  # fmt: skip
    return rows


PEAKS = ("peak_growth", "peak_growth_mapped")


# ---- activation checkpointing: memory for compute ---------------------------------------


def peak_memory_worker(cfg_dict: dict, steps: int) -> dict:
    """On each rank: peak memory growth over training steps, and seconds per step.

    On a GPU the figure is CUDA's peak allocated bytes; on a CPU the peak resident set
    (VmHWM) with every large block mapped on its own, so that freed activations leave.
    """
    torch.set_num_threads(1)
    cfg = Config.from_dict(cfg_dict)
    world = group.init(cfg.dist)
    try:
        trainer = quiet(Trainer(cfg, world))
        step = trainer_step(trainer)
        step()  # the optimizer state and the allocator's pools exist after the first step
        cuda = trainer.device.type == "cuda"
        before = torch.cuda.memory_allocated() if cuda else rss_bytes()
        torch.cuda.reset_peak_memory_stats() if cuda else reset_peak_rss()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        seconds = (time.perf_counter() - start) / steps
        peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()
        return {"peak_growth": peak - before, "step_s": seconds, "device": str(trainer.device)}
    finally:
        group.shutdown()


def ac_table(quick: bool, out: Path) -> dict:
    """charlm with and without --ac full, alternating launches: peak memory and step time, medians."""
    text = out / "text.txt"
    text.write_text((ROOT / "README.md").read_text() * (2 if quick else 8))
    block, layers, embd, steps, repeats = (64, 2, 32, 2, 1) if quick else (256, 4, 64, 5, 3)
    args = {"text": str(text), "block": block, "layers": layers, "heads": 4, "embd": embd, "dropout": 0.0}
    got: dict[str, list[dict]] = {"none": [], "full": []}
    for rep in range(repeats):
        for ac in ("none", "full") if rep % 2 == 0 else ("full", "none"):
            cfg = {"task": {"spec": "charlm", "args": args}, "data": {"batch_size": 32},
                   "optim": {"optimizer": "adamw", "lr": 0.001, "schedule": "constant"},
                   "run": {"steps": 10**9, "out": str(out / f"ac-{ac}")}, "compute": {"ac": ac},
                   "checkpoint": {"resume": "never"}}  # fmt: skip
            with mmap_threshold(2**20):
                got[ac].append(launch(peak_memory_worker, 1, cfg, steps))
    med = {ac: {k: sorted(r[k] for r in rows)[len(rows) // 2] for k in ("peak_growth", "step_s")}
           for ac, rows in got.items()}  # fmt: skip
    model = f"charlm block {block}, {layers} layers, embd {embd}, batch 32"
    result = {"model": model, "device": got["none"][0]["device"],
              **{f"{k}_{ac}": v for ac, m in med.items() for k, v in m.items()},
              "memory full / none": med["full"]["peak_growth"] / med["none"]["peak_growth"],
              "step time full / none": med["full"]["step_s"] / med["none"]["step_s"]}  # fmt: skip
    print(f"  --ac full vs none: peak memory {result['memory full / none']:.2f}x, step time "
          f"{result['step time full / none']:.2f}x", flush=True)  # fmt: skip
    return result


def print_ac(r: dict) -> None:
    mb = 2**20
    print(f"\nactivation checkpointing, {r['model']} on {r['device']} (medians, alternating launches):")
    print("| --ac | peak memory growth (MB) | s per step |\n|---|---:|---:|")
    for ac in ("none", "full"):
        print(f"| {ac} | {r[f'peak_growth_{ac}'] / mb:,.1f} | {r[f'step_s_{ac}']:.3f} |")
    print(f"full / none: memory {r['memory full / none']:.2f}x, step time {r['step time full / none']:.2f}x")


@contextlib.contextmanager
def mmap_threshold(size: int):
    """Workers launched inside map every allocation of ``size`` bytes or more on its own (glibc)."""
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(size)
    try:
        yield
    finally:
        del os.environ["MALLOC_MMAP_THRESHOLD_"]


def print_table(rows: list[dict]) -> None:
    mb = 2**20
    print(f"\nDDP vs FSDP per rank, MLP {'x'.join(map(str, rows[0]['hidden']))} + AdamW (MB; FSDP as a share of DDP):")
    print("| strategy | ranks | params | grads | optimizer | peak RSS growth | same, large blocks mapped | samples/s "
          "| throughput / ddp |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        keys = ("params", "grads", "optimizer", *PEAKS)
        cells = [f"{r[k] / mb:.1f} ({r[f'{k} / ddp']:.2f})" if k in r else "-" for k in keys]
        print(f"| {r['strategy']} | {r['ranks']} | " + " | ".join(cells)
              + f" | {r['samples_per_s']:,.0f} | {r['throughput / ddp']:.2f} |")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="N = 2 and a small model: checks that it runs")
    args = p.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory(dir=ROOT / "bench") as tmp:
        print_table(strategies_table(args.quick, Path(tmp)))
        print_ac(ac_table(args.quick, Path(tmp)))


if __name__ == "__main__":
    main()
