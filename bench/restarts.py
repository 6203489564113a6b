"""How often does a killed worker's restart succeed under plain torchrun?

    python bench/restarts.py --trials 10            # the figure issue 13 asks for
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 python bench/restarts.py --trials 10

Each trial is what a user does: ``torchrun --standalone --nproc_per_node=2
--max-restarts=1 -m ddp.train --steps 3000 --checkpoint-every 150 --seed 7 --out D``,
then ``kill -9`` of one worker (chosen at random) from outside once the first checkpoint
folder appears. A trial succeeds when torchrun exits 0 after the restart and the final
weights equal an uninterrupted run's bit for bit. Nothing in the environment is set
beyond what the caller has (OMP_NUM_THREADS=1, as torchrun would set it anyway).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ARGS = ["--steps", "3000", "--checkpoint-every", "150", "--seed", "7", "--log-every", "500"]


def torchrun(out: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--max-restarts=1", "-m", "ddp.train", *ARGS, "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (torchrun's workers), from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def trial(root: Path, i: int, reference: dict, timeout: float, rng: random.Random) -> str:
    out, log = root / f"t{i}", root / f"t{i}.log"
    job = torchrun(out, log)
    try:
        deadline = time.monotonic() + timeout
        while not list((out / "checkpoints").glob("step-*")):
            if job.poll() is not None or time.monotonic() > deadline:
                return "no checkpoint before the kill"
            time.sleep(0.05)
        workers = children(job.pid)
        victim = rng.choice(workers)
        os.kill(victim, signal.SIGKILL)
        try:
            code = job.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            return "hung (no exit before the timeout)"
        if code != 0:
            text = log.read_text()
            clue = next((line for line in text.splitlines() if "Error" in line or "error:" in line), "")
            return f"exit {code}: {clue.strip()[:160]}"
        state = torch.load(out / "mlp.params", weights_only=True)
        same = all(torch.equal(state[k], reference[k]) for k in reference)
        return "ok, bitwise equal" if same else "finished, but not bitwise equal"
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per trial before it counts as hung")
    parser.add_argument("--seed", type=int, default=0, help="seed for the choice of the killed worker")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ref = torchrun(root / "ref", root / "ref.log")
        if ref.wait(timeout=args.timeout) != 0:
            sys.exit(f"the uninterrupted reference run failed:\n{(root / 'ref.log').read_text()[-3000:]}")
        reference = torch.load(root / "ref" / "mlp.params", weights_only=True)
        results = []
        for i in range(args.trials):
            results.append(trial(root, i, reference, args.timeout, rng))
            print(f"trial {i + 1}: {results[-1]}", flush=True)
    good = sum(r.startswith("ok") for r in results)
    share = os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "unset")
    print(f"{good}/{args.trials} restarts succeeded bitwise (TORCH_DISABLE_SHARE_RDZV_TCP_STORE={share})")


if __name__ == "__main__":
    main()
