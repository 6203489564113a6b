"""A snapshot every step, side by side with the snapshot code of an older commit, in one launch.

Three trainers on 2 gloo ranks, one process each: no snapshots, a snapshot every step with
``ddp.snapshot`` as it is, and the same with ``ddp/snapshot.py`` of ``--against`` (read with
``git show``, loaded beside the current one). Blocks of steps alternate between them, so the
host's slow spells hit all three alike; ratios are of throughput, per block, median and quartiles.
Then the two snapshotting trainers take snapshots alone, in a loop between steps, in alternating
blocks: what one costs, in microseconds, without the step's noise around it.

    python bench/snapshot_ab.py --against f2ba27c                 # the textbook MLP
    python bench/snapshot_ab.py --against f2ba27c --hidden 1024 1024
    python bench/snapshot_ab.py --against f2ba27c --case tokens --nproc 1
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import subprocess
import tempfile
import uuid
from pathlib import Path

import torch

from ddp import group
from ddp.config import Config
from ddp.trainer import Trainer

from common import ROOT, launch, median, paired, quiet, timed, trainer_step
from peer_task import TOKENS, write_tokens


def old_snapshots(source: str, like):
    """A ``Snapshots`` of the older module in ``source``, with the settings of ``like`` (a current one)."""
    spec = importlib.util.spec_from_file_location("snapshot_then", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    snaps = module.Snapshots(like.root.parent, 1, like.rank, like.out, like.say)
    take = snaps.take
    if "Callable" not in str(inspect.signature(take).parameters["live"].annotation):  # before 2026-12: a set, built
        snaps.take = lambda step, state, live, built_s=0.0: take(step, state, live(), built_s)  # at every snapshot
    return snaps


def settings(args: argparse.Namespace, tmp: Path) -> dict:
    """The trainers' configuration: the MLP (``--hidden``), or ``--task tokens`` on a file of random bytes."""
    if args.case == "tokens":
        write_tokens(tmp / "tokens.bin")
        model = {k: TOKENS[k] for k in ("vocab", "block", "layers", "heads", "embd")}  # bench/peers.py's tokens case
        task = {"spec": "tokens", "args": {"train": str(tmp / "tokens.bin"), **model, "dropout": 0.0}}
        data, optim = {"batch_size": TOKENS["batch"]}, {"optimizer": "adamw", "lr": TOKENS["lr"]}
    else:
        task = {"spec": "mlp", "args": {"samples": 8192, **({"hidden": args.hidden} if args.hidden else {})}}
        data, optim = {"batch_size": 64}, {}
    return {"task": task, "data": data, "optim": {**optim, "schedule": "constant"},
            "checkpoint": {"resume": "never"}, "run": {"steps": 10**9, "out": str(tmp / "out")},
            "dist": {"backend": "gloo"}}  # fmt: skip


def worker(source: str, cfg: dict, repeats: int, block_s: float) -> dict:
    torch.set_num_threads(1)
    world = group.init(Config.from_dict(cfg).dist)
    none = quiet(Trainer(Config.from_dict(cfg), world))
    cfg["checkpoint"]["snapshot_every"] = "1"
    now, then = (quiet(Trainer(Config.from_dict(cfg), world)) for _ in range(2))
    then.checkpointer.snapshots = old_snapshots(source, now.checkpointer.snapshots)
    run = f"ab-{uuid.uuid4().hex[:8]}"  # never resumed: opened by hand, as bench.py's snapshot variants are
    for name, trainer in (("now", now), ("then", then)):
        trainer.checkpointer.snapshots.open(f"{run}-{name}", clean=False)
    fns = {"none": trainer_step(none), "now": trainer_step(now), "then": trainer_step(then)}
    steps = max(5, round(block_s / max(group.all_gather_objects(timed(fns["none"], 20, 5) / 20))))
    seconds: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(repeats):
        for k in list(fns) if rep % 2 == 0 else list(fns)[::-1]:
            group.barrier()
            seconds[k].append(max(group.all_gather_objects(timed(fns[k], steps, 3))))
    alone = snapshots_alone({"now": now, "then": then}, repeats)
    for trainer in (now, then):
        trainer.checkpointer.snapshots.close(remove=True)
    group.barrier()
    group.shutdown()
    # throughput ratios: the other's seconds over this one's, block by block
    return {"step_ms": {k: 1000 * median(v) / steps for k, v in seconds.items()},
            "now / none": paired(seconds, "none", "now"), "then / none": paired(seconds, "none", "then"),
            "now / then": paired(seconds, "then", "now"),
            "snapshot alone, us (building the state, take, commit; in a loop, caches warm)": alone}  # fmt: skip


def snapshots_alone(trainers: dict[str, Trainer], repeats: int, calls: int = 100) -> dict[str, float]:
    """Microseconds per snapshot of each trainer's state, taken and committed in a loop between steps (as
    ``save_if_due`` and ``before_update`` take one), in alternating blocks: the snapshot's own cost, which
    in a step is larger (caches the step emptied) and hidden in the step's noise."""
    step = [10**6]  # past any step the trainers took: a new snapshot each call

    def snapshot(checkpointer) -> None:
        step[0] += 1
        checkpointer.save_if_due(step[0])
        checkpointer.before_update()

    seconds: dict[str, list[float]] = {k: [] for k in trainers}
    for rep in range(repeats):
        for k in list(trainers) if rep % 2 == 0 else list(trainers)[::-1]:
            group.barrier()
            ck = trainers[k].checkpointer
            seconds[k].append(max(group.all_gather_objects(timed(lambda ck=ck: snapshot(ck), calls, 3))))
    return {k: round(1e6 * median(v) / calls, 1) for k, v in seconds.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", required=True, help="the commit whose ddp/snapshot.py is measured beside this one")
    p.add_argument("--case", choices=("mlp", "tokens"), default="mlp", help="the MLP, or charlm's GPT (AdamW)")
    p.add_argument("--hidden", type=int, nargs="*", default=[], help="the MLP's hidden widths (default: textbook)")
    p.add_argument("--nproc", type=int, default=2, help="ranks (1: a core is left to the snapshot thread)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--block-s", type=float, default=0.5)
    args = p.parse_args()
    code = subprocess.run(["git", "show", f"{args.against}:ddp/snapshot.py"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout  # fmt: skip
    with tempfile.TemporaryDirectory(dir=ROOT / "bench") as tmp:
        source = Path(tmp) / "snapshot_then.py"
        source.write_text(code)
        cfg = settings(args, Path(tmp))
        result = launch(worker, args.nproc, str(source), cfg, args.repeats, args.block_s)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
