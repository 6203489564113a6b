"""The optimizer's kernel that ``ddp.optim.kernel`` chooses beside torch's default, in one trainer.

On a CPU torch's default SGD and AdamW loop over the parameters in Python, several kernels
each; the fused kernel updates every tensor in one call, reading and writing each once (over
FSDP's shards, fused AdamW and foreach SGD). One ``Trainer`` per rank steps in alternating
blocks with its groups' ``fused`` and ``foreach`` as chosen and cleared (torch reads them at
every step), so both sides share the model, the data and the memory; the table gives step and
update times, medians over blocks, and the ratio of throughput.

    python bench/fused.py                     # the wide MLP (1024x1024, SGD), 2 ranks
    python bench/fused.py --case tokens --nproc 1   # the tokens GPT (AdamW), one process
    python bench/fused.py --case mlp --nproc 2      # the textbook MLP
    python bench/fused.py --case tokens --nproc 2 --strategy fsdp   # AdamW over FSDP's shards
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from ddp import group
from ddp.config import Config
from ddp.optim import KERNELS
from ddp.trainer import Trainer

from common import launch, median, paired, quiet, timed, trainer_step
from peer_task import TOKENS, write_tokens


def settings(case: str, strategy: str, tmp: Path) -> dict:
    """The trainer's configuration for ``case``, without snapshots (their cost is not this study's)."""
    if case == "tokens":
        write_tokens(tmp / "tokens.bin")
        model = {k: TOKENS[k] for k in ("vocab", "block", "layers", "heads", "embd")}
        task = {"spec": "tokens", "args": {"train": str(tmp / "tokens.bin"), **model, "dropout": 0.0}}
        data, optim = {"batch_size": TOKENS["batch"]}, {"optimizer": "adamw", "lr": TOKENS["lr"]}
    else:
        task = {"spec": "mlp", "args": {"samples": 8192, **({"hidden": [1024, 1024]} if case == "wide" else {})}}
        data, optim = {"batch_size": 64}, {}
    return {"task": task, "data": data, "optim": {**optim, "schedule": "constant"},
            "checkpoint": {"resume": "never", "snapshot_every": "0"}, "run": {"steps": 10**9, "out": str(tmp / "out")},
            "dist": {"backend": "gloo", "strategy": strategy}}  # fmt: skip


def worker(cfg: dict, repeats: int, block_s: float) -> dict:
    torch.set_num_threads(1)
    world = group.init(Config.from_dict(cfg).dist)
    trainer = quiet(Trainer(Config.from_dict(cfg), world))
    update_s = [0.0]
    real = trainer.optimizer.step

    def step_timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            update_s[0] += time.perf_counter() - start

    trainer.optimizer.step = step_timed
    chosen = [{k: g[k] for k in KERNELS} for g in trainer.optimizer.param_groups]
    step = trainer_step(trainer)
    steps = max(5, round(block_s / max(group.all_gather_objects(timed(step, 10, 5) / 10))))
    seconds: dict[str, list[float]] = {"chosen": [], "default": []}
    updates: dict[str, list[float]] = {"chosen": [], "default": []}
    for rep in range(repeats):
        for name in ("chosen", "default") if rep % 2 == 0 else ("default", "chosen"):
            for param_group, kernels in zip(trainer.optimizer.param_groups, chosen, strict=True):
                param_group.update(kernels if name == "chosen" else dict.fromkeys(KERNELS, False))
            group.barrier()
            update_s[0] = 0.0
            seconds[name].append(max(group.all_gather_objects(timed(step, steps, 2))))
            updates[name].append(update_s[0] / (steps + 2))
    group.shutdown()
    return {"kernels": chosen[0], "step_ms": {k: 1000 * median(v) / steps for k, v in seconds.items()},
            "update_ms": {k: 1000 * median(v) for k, v in updates.items()},
            "chosen / default (throughput)": paired(seconds, "default", "chosen"),
            "steps_per_block": steps}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=("mlp", "wide", "tokens"), default="wide")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--block-s", type=float, default=0.5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = launch(worker, args.nproc, settings(args.case, args.strategy, Path(tmp)), args.repeats, args.block_s)
    print(json.dumps({"case": args.case, "nproc": args.nproc, "strategy": args.strategy, **result}, indent=1))


if __name__ == "__main__":
    main()
