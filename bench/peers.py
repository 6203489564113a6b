"""Peers: this project against what its users would otherwise run, each launched the way its users launch it.

    make bench                         # bench/bench.py, then this table (the `bench` extra: accelerate, Lightning)
    python bench/peers.py              # about 35 minutes on 2 cores; writes bench/peers.json
    python bench/peers.py --quick      # the textbook MLP, short runs, one repeat
    python bench/peers.py --snapshots --repeats 5   # this project alone: snapshots off, auto, every step (15 min)

Every contestant is a fresh ``torchrun --standalone --nproc-per-node 2`` job (gloo, one thread a rank) that
trains the same model on the same in-memory data (``bench/peer_task.py``: 65,536 rows), per-rank batch 64,
SGD (lr 0.01, momentum 0.9):

  ours       torchrun -m ddp.train --task bench/peer_task.py:CASE, with its defaults (snapshots, final save,
             export and verify included), as a user runs it
  tutorial   the pytorch/examples loop: DataLoader + DistributedSampler, DDP and the model as they come
  accelerate Accelerator.prepare(model, optimizer, loader) and accelerator.backward
  fabric     Lightning Fabric: setup, setup_dataloaders, fabric.backward
  lightning  a LightningModule under Lightning's Trainer (no logger, checkpointing or progress bar)

Each launch runs 2N steps. Throughput is taken between the end of step N and the end of step 2N, from the
lines rank 0 prints there (this project's log line at those steps; a peer's "peer step N done"): N x global
batch / seconds, warm, with start-up and exit outside it. Start-up is the time from the launch to the first
step (to step N's line, less N steps); exit, from the last step's line to the launcher's exit (this
project's final checkpoint, export and verify included). The contestants run in alternating order,
``--repeats`` times; figures are medians with quartiles, and "ours / best peer" is the median of the
per-repeat ratios against the fastest peer of that repeat.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

from peer_task import TOKENS, write_tokens

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONTESTANTS = ("ours", "tutorial", "accelerate", "fabric", "lightning", "nanogpt")
PEERS = {"tokens": ("ours", "nanogpt")}  # the tokens case against nanoGPT's loop; the others against the rest
NEEDS = {"accelerate": "accelerate", "fabric": "lightning", "lightning": "lightning"}  # the `bench` extra
STEPS = {"mlp": 2500, "wide": 300, "cnn": 80, "tokens": 120}  # N: about 5 s of steps here; multiples of 10
QUICK_STEPS = {"mlp": 100, "wide": 20, "cnn": 10, "tokens": 20}
BATCH, LR, MOMENTUM = 64, 0.01, 0.9
LAUNCH_TIMEOUT = 600
SNAPSHOTS = {"none": ("--snapshot-every", "0"), "auto": (), "every step": ("--snapshot-every", "1")}  # --snapshots
AUTO = re.compile(r"one every (\d+) steps from now")  # this project's line where auto widens the interval


# ---- the contestants' loops (run by torchrun: python bench/peers.py --loop NAME) -------------------------


def _done(step: int, steps: int, rank: int, world: int) -> None:
    """The lines the harness times: printed by rank 0 at the end of the middle step and of the last (with the
    world size, which the harness checks)."""
    if rank == 0 and step in (steps // 2, steps):
        print(f"peer step {step} done, world {world}", flush=True)


def loop_tutorial(case: str, steps: int) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data import DataLoader, DistributedSampler

    from peer_task import build, data

    dist.init_process_group("gloo", timeout=timedelta(minutes=5))
    try:
        model, dataset = DDP(build(case)), data(case)
        sampler = DistributedSampler(dataset, shuffle=True, seed=0)
        loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler, drop_last=True)
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        step, epoch = 0, 0
        while step < steps:
            sampler.set_epoch(epoch)
            for x, y in loader:
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
                step += 1
                _done(step, steps, dist.get_rank(), dist.get_world_size())
                if step == steps:
                    break
            epoch += 1
        del model, opt
        dist.barrier()
    finally:
        dist.destroy_process_group()


def loop_accelerate(case: str, steps: int) -> None:
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from peer_task import build, data

    acc = Accelerator(cpu=True)
    loader = DataLoader(data(case), batch_size=BATCH, shuffle=True, drop_last=True)
    model = build(case)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    model, opt, loader = acc.prepare(model, opt, loader)
    step = 0
    while step < steps:
        for x, y in loader:
            opt.zero_grad()
            acc.backward(F.cross_entropy(model(x), y))
            opt.step()
            step += 1
            _done(step, steps, acc.process_index, acc.num_processes)
            if step == steps:
                break
    acc.wait_for_everyone()
    acc.end_training()


def loop_fabric(case: str, steps: int) -> None:
    import torch
    import torch.nn.functional as F
    from lightning.fabric import Fabric
    from torch.utils.data import DataLoader

    from peer_task import build, data

    fabric = Fabric(accelerator="cpu", strategy="ddp", devices=int(os.environ["LOCAL_WORLD_SIZE"]))
    fabric.launch()
    model = build(case)
    model, opt = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM))
    loader = fabric.setup_dataloaders(DataLoader(data(case), batch_size=BATCH, shuffle=True, drop_last=True))
    step = 0
    while step < steps:
        for x, y in loader:
            opt.zero_grad()
            fabric.backward(F.cross_entropy(model(x), y))
            opt.step()
            step += 1
            _done(step, steps, fabric.global_rank, fabric.world_size)
            if step == steps:
                break
    fabric.barrier()


def loop_lightning(case: str, steps: int) -> None:
    import lightning as L
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from peer_task import build, data

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = build(case)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.model(x), y)

        def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
            _done(self.trainer.global_step, steps, self.global_rank, self.trainer.world_size)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)

    trainer = L.Trainer(
        accelerator="cpu", strategy="ddp", devices=int(os.environ["LOCAL_WORLD_SIZE"]), max_steps=steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(Module(), DataLoader(data(case), batch_size=BATCH, shuffle=True, drop_last=True))


def loop_nanogpt(case: str, steps: int) -> None:
    """nanoGPT's train.py loop (its get_batch, DDP when launched by torchrun, AdamW), on the tokens case's model,
    with the settings the others share: a constant rate, no clipping, logging the loss each step as its
    log_interval 1 does."""
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from peer_task import gpt

    distributed = int(os.environ.get("RANK", -1)) != -1
    if distributed:
        dist.init_process_group("gloo", timeout=timedelta(minutes=5))
    rank = dist.get_rank() if distributed else 0
    torch.manual_seed(1337 + rank)
    block, batch = TOKENS["block"], TOKENS["batch"]

    def get_batch():
        data = np.memmap(os.environ["PEERS_TOKENS"], dtype=np.uint16, mode="r")  # re-mapped per batch, as nanoGPT does
        ix = torch.randint(len(data) - block, (batch,))
        x = torch.stack([torch.from_numpy(data[i : i + block].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + block].astype(np.int64)) for i in ix])
        return x, y

    model = gpt()
    raw = model
    if distributed:
        model = DDP(model)
    opt = torch.optim.AdamW(raw.parameters(), lr=TOKENS["lr"])
    x, y = get_batch()
    for step in range(1, steps + 1):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        x, y = get_batch()  # the next batch during the forward's work on a GPU (here, in turn)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if rank == 0:
            loss.item()  # nanoGPT logs every step (log_interval = 1): one host sync each
        _done(step, steps, rank, dist.get_world_size() if distributed else 1)
    if distributed:
        del model
        dist.barrier()
        dist.destroy_process_group()


# ---- the harness ------------------------------------------------------------------------------------------


def command(contestant: str, case: str, steps: int, nproc: int, out: Path, extra: Sequence[str] = ()) -> list[str]:
    """The launch of one contestant, as its users type it (``extra``: more of this project's flags)."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    if nproc == 1 and case == "tokens":  # one process, as both are run on one device: no launcher
        launch = [sys.executable]
    if contestant == "ours" and case == "tokens":
        t = TOKENS
        settings = [f"{k}={t[k]}" for k in ("vocab", "block", "layers", "heads", "embd")]
        return [*launch, "-m", "ddp.train", "--task", "tokens", "--task-arg", f"train={os.environ['PEERS_TOKENS']}",
                *settings, "dropout=0.0", "--steps", str(steps), "--batch-size", str(t["batch"]), "--optimizer",
                "adamw", "--lr", str(t["lr"]), "--schedule", "constant", "--out", str(out), *extra]  # fmt: skip
    if contestant == "ours":
        return [*launch, "-m", "ddp.train", "--task", f"{HERE / 'peer_task.py'}:{case}", "--steps", str(steps),
                "--batch-size", str(BATCH), "--lr", str(LR), "--momentum", str(MOMENTUM), "--schedule", "constant",
                "--out", str(out), *extra]  # fmt: skip
    return [*launch, str(Path(__file__)), "--loop", contestant, "--case", case, "--steps", str(steps)]


def timed_launch(cmd: list[str], steps: int, nproc: int) -> tuple[float, float, float, bool, str]:
    """Seconds from the launch to the lines of the middle step and of the last, and to the launcher's exit;
    whether the job exited cleanly (a rank that aborts at exit, after its last step, fails the job but not its
    timings); and what it printed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{HERE}{os.pathsep}{ROOT}"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    timer = threading.Timer(LAUNCH_TIMEOUT, proc.kill)  # a hung contestant fails its launch, not the bench
    timer.start()
    # ours: "[rank 0/2] step N epoch ..." (each --log-every); the peers: "peer step N done, world W"
    markers = {n: re.compile(rf"\bstep {n}\b") for n in (steps // 2, steps)}
    seen: dict[int, float] = {}
    lines = []
    for line in proc.stdout:
        lines.append(line)
        for n, marker in markers.items():
            if n not in seen and marker.search(line):
                seen[n] = time.perf_counter() - start
    proc.wait()
    timer.cancel()
    end = time.perf_counter() - start
    worlds = {int(w) for w in re.findall(r"peer step \d+ done, world (\d+)", "".join(lines))}
    if len(seen) != 2 or worlds - {nproc}:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{''.join(lines[-40:])}")
    if proc.returncode != 0:
        print(f"    exit {proc.returncode} after the last step: {''.join(lines[-3:]).strip()[-300:]}", flush=True)
    return seen[steps // 2], seen[steps], end, proc.returncode == 0, "".join(lines)


def quartiles(xs: list[float]) -> dict:
    if not xs:  # no launch gave the figure (every exit crashed)
        return {"median": math.nan, "q1": math.nan, "q3": math.nan}
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2]}


def runs(case: str, launches: dict[str, Callable[[int, Path], list[str]]], steps: int, nproc: int, repeats: int,
         tmp: str) -> dict:  # fmt: skip
    """Per launch and repeat, in alternating order: samples/s from steps N to 2N, start-up and exit seconds, and
    the intervals ``--snapshot-every auto`` chose (this project's runs)."""
    raw = {c: {"samples_per_s": [], "startup_s": [], "exit_s": [], "failed_exits": 0, "auto": []} for c in launches}
    batch = TOKENS["batch"] if case == "tokens" else BATCH
    for rep in range(repeats):
        for c in list(launches) if rep % 2 == 0 else list(launches)[::-1]:  # alternating: no drift bias
            cmd = launches[c](steps=2 * steps, out=Path(tmp) / f"{c}-{case}-{nproc}-{rep}")
            middle, last, end, clean, lines = timed_launch(cmd, 2 * steps, nproc)
            step_s = (last - middle) / steps  # steps N+1 to 2N: warm, start-up and exit outside
            raw[c]["samples_per_s"].append(batch * nproc / step_s)
            raw[c]["startup_s"].append(middle - steps * step_s)
            if clean:  # a crash at exit is counted, not timed
                raw[c]["exit_s"].append(end - last)
            raw[c]["failed_exits"] += not clean
            raw[c]["auto"].append(int((AUTO.findall(lines) or [1])[-1]))  # "... one every 16 steps from now"
            print(f"  {case} ({nproc}) {c} repeat {rep + 1}: {raw[c]['samples_per_s'][-1]:,.0f} samples/s", flush=True)
    return raw


def ratios(raw: dict, top: str, bottoms: list[str]) -> dict:
    """The median and quartiles of the per-repeat ratios of ``top``'s samples/s to the best of ``bottoms``'."""
    top_s, repeats = raw[top]["samples_per_s"], len(raw[top]["samples_per_s"])
    return quartiles([top_s[r] / max(raw[b]["samples_per_s"][r] for b in bottoms) for r in range(repeats)])


def measure(case: str, contestants: list[str], steps: int, nproc: int, repeats: int, tmp: str,
            extra: Sequence[str] = ()) -> dict:  # fmt: skip
    """Per contestant and repeat: samples/s from the N and 2N runs, start-up and exit seconds."""
    launches = {c: functools.partial(command, c, case, nproc=nproc, extra=extra if c == "ours" else ())
                for c in contestants}  # fmt: skip
    raw = runs(case, launches, steps, nproc, repeats, tmp)
    row = {c: {k: quartiles(v) if isinstance(v, list) else v for k, v in figures.items() if k != "auto"}
           for c, figures in raw.items()}  # fmt: skip
    peers = [c for c in contestants if c != "ours"]
    if "ours" in contestants and peers:
        row["ours / best peer"] = ratios(raw, "ours", peers)
    name = case if case != "tokens" else f"tokens, {nproc} rank{'s' if nproc > 1 else ''}"
    return {"case": name, "steps": steps, "nproc": nproc, "contestants": contestants, "raw": raw, **row}


def measure_snapshots(case: str, steps: int, nproc: int, repeats: int, tmp: str) -> dict:
    """This project's runs with snapshots off, at their default (``auto``) and every step, as a user launches
    them: what the snapshots cost through the whole path (``bench.py`` measures them inside one process)."""
    launches = {name: functools.partial(command, "ours", case, nproc=nproc, extra=flags)
                for name, flags in SNAPSHOTS.items()}  # fmt: skip
    raw = runs(case, launches, steps, nproc, repeats, tmp)
    row = {name: quartiles(raw[name]["samples_per_s"]) for name in SNAPSHOTS}
    row.update({f"{name} / none": ratios(raw, name, ["none"]) for name in SNAPSHOTS if name != "none"})
    row["auto: one every N steps"] = sorted(set(raw["auto"]["auto"]))
    name = case if case != "tokens" else f"tokens, {nproc} rank{'s' if nproc > 1 else ''}"
    return {"case": name, "steps": steps, "nproc": nproc, "raw": raw, **row}


def table(rows: list[dict]) -> str:
    """The results as a Markdown table: samples/s (median, quartiles), start-up and exit seconds, and the launches
    whose exit crashed (a rank aborting after its last step), of those made."""
    columns = [c for c in CONTESTANTS if any(c in row["contestants"] for row in rows)]
    lines = ["| case | " + " | ".join(columns) + " | ours / best peer |", "|---|" + "---:|" * (len(columns) + 1)]
    for row in rows:
        for label, key, shown in (("samples/s", "samples_per_s", "{median:,.0f} ({q1:,.0f}–{q3:,.0f})"),
                                  ("launch to first step, s", "startup_s", "{median:.2f}"),
                                  ("last step to exit, s", "exit_s", "{median:.2f}"),
                                  ("exits that crashed", "failed_exits", "{}")):  # fmt: skip
            cells = [_cell(row, c, key, shown) for c in columns]
            ratio = row.get("ours / best peer") if key == "samples_per_s" else None
            last = "{median:.2f} ({q1:.2f}–{q3:.2f})".format(**ratio) if ratio else ""
            lines.append(f"| {row['case']}: {label} | " + " | ".join(cells) + f" | {last} |")
    return "\n".join(lines)


def snapshot_table(rows: list[dict]) -> str:
    """The snapshot runs as a Markdown table: samples/s of each setting, the ratios to none, auto's interval."""
    lines = ["| case | none | auto (the default) | every step | auto / none | every step / none | auto chose |",
             "|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for row in rows:
        speeds = [f"{row[name]['median']:,.0f}" for name in SNAPSHOTS]
        shares = ["{median:.2f} ({q1:.2f}–{q3:.2f})".format(**row[f"{name} / none"]) for name in ("auto", "every step")]
        chose = ", ".join(f"every {n}" for n in row["auto: one every N steps"])
        lines.append(f"| {row['case']} | " + " | ".join([*speeds, *shares, chose]) + " |")
    return "\n".join(lines)


def _cell(row: dict, contestant: str, key: str, shown: str) -> str:
    if contestant not in row["contestants"]:
        return "–"
    value = row[contestant][key]
    if isinstance(value, int):
        return f"{value} of {len(row['raw'][contestant]['samples_per_s'])}"
    return "–" if math.isnan(value["median"]) else shown.format(**value)


def available(contestants: list[str]) -> list[str]:
    """The contestants whose library is installed (``pip install -e '.[bench]'``); the others are named."""
    found = [c for c in contestants if c not in NEEDS or importlib.util.find_spec(NEEDS[c]) is not None]
    for c in sorted(set(contestants) - set(found)):
        print(f"{c}: {NEEDS[c]} is not installed (pip install -e '.[bench]'): left out", flush=True)
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--loop", choices=CONTESTANTS[1:], help="run one contestant's training loop (under torchrun)")
    p.add_argument("--case", default="mlp", help="with --loop: the model (bench/peer_task.py)")
    p.add_argument("--steps", type=int, default=100, help="with --loop: the steps to take")
    p.add_argument("--quick", action="store_true", help="the textbook MLP, short runs, one repeat")
    p.add_argument("--cases", help="comma-separated, of mlp, wide, cnn, tokens (default: all; --quick: mlp)")
    p.add_argument("--contestants", default=",".join(CONTESTANTS), help="comma-separated, of " + ", ".join(CONTESTANTS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--output", type=Path, help="where the results go (default: bench/peers.json)")
    p.add_argument("--ours-args", default="", help="more flags for this project's runs, e.g. '--snapshot-every 0'")
    p.add_argument("--snapshots", action="store_true", help="instead: this project's runs with snapshots off, auto "
                   "and every step (writes bench/snapshots.json unless --output)")  # fmt: skip
    args = p.parse_args(argv)
    if args.loop:
        globals()[f"loop_{args.loop}"](args.case, args.steps)
        return 0
    cases = args.cases.split(",") if args.cases else ["mlp"] if args.quick else ["mlp", "wide", "cnn", "tokens"]
    contestants = ["ours"] if args.snapshots else available(args.contestants.split(","))
    repeats = 1 if args.quick else args.repeats
    what = "snapshots: none, auto, every step" if args.snapshots else f"peers: {', '.join(contestants)}"
    print(f"{what}; {args.nproc} ranks on gloo, one thread each", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        os.environ["PEERS_TOKENS"] = str(Path(tmp) / "tokens.bin")  # read by the contestants of the tokens case
        write_tokens(os.environ["PEERS_TOKENS"])
        for case in cases:
            steps = (QUICK_STEPS if args.quick else STEPS)[case]
            peers = PEERS.get(case, [c for c in CONTESTANTS if c not in PEERS["tokens"][1:]])
            here = [c for c in contestants if c in peers]
            for nproc in sorted({1, args.nproc}) if case == "tokens" else (args.nproc,):  # nanoGPT alone and under DDP
                if args.snapshots:
                    rows.append(measure_snapshots(case, steps, nproc, repeats, tmp))
                else:
                    rows.append(measure(case, here, steps, nproc, repeats, tmp, shlex.split(args.ours_args)))
    print(snapshot_table(rows) if args.snapshots else table(rows))
    output = args.output or HERE / ("snapshots.json" if args.snapshots else "peers.json")
    output.write_text(json.dumps({"rows": rows, "quick": args.quick}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
