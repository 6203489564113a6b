"""``make gpu-check``: everything that needs a CUDA GPU, in one command, in under 8 minutes.

    make gpu-check                                   # report: runs/gpu-check/report.json
    python bench/gpu_check.py --report /tmp/r.json   # the same, elsewhere

On a host with one or more CUDA GPUs it runs, each step bounded in time:

1. the GPU-marked tests (``pytest -m gpu``; tests that need two GPUs say so when skipped);
2. ``make train-ddp`` on NCCL, one rank per GPU, with DDP and with ``--strategy fsdp``
   (bf16); on a one-GPU host also 2 ranks sharing that GPU over gloo (``--device cuda``);
3. the bench's quick mode: pinned vs pageable host-to-device copies, and the checkpoint
   floors and ratios on this host's disk.

It writes one JSON report with every step's outcome and figures and exits 1 if any step
failed. Without CUDA it says so and exits 0 at once.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def step(name: str, cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    """Run one check; its outcome, duration and the tail of its output."""
    print(f"gpu-check: {name} ...", flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
        rc, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, output = 124, f"{e.stdout or ''}{e.stderr or ''}\ntimed out after {timeout:.0f} s"
    seconds = time.perf_counter() - start
    print(f"gpu-check: {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {seconds:.0f} s", flush=True)
    return {"name": name, "ok": rc == 0, "exit": rc, "seconds": round(seconds, 1), "output_tail": output[-4000:]}


def train(nproc: int, out: Path, *extra: str) -> list[str]:
    """``make train-ddp``'s command line, with the Python running this script."""
    return ["env", f"NPROC={nproc}", f"PYTHON={sys.executable}", "MAX_RESTARTS=0", "bash", "launch/train_ddp.sh",
            "--epochs", "1", "--out", str(out), *extra]  # fmt: skip


def host() -> dict:
    return {
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.distributed.is_nccl_available() else None,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report", default=str(ROOT / "runs" / "gpu-check" / "report.json"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        print(f"gpu-check: no CUDA GPU is visible (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
              "nothing to check here", flush=True)  # fmt: skip
        return 0
    report_path = Path(args.report)
    work = report_path.parent
    work.mkdir(parents=True, exist_ok=True)
    n = torch.cuda.device_count()
    # time limits: 180 + 60 + 60 + 60 + 110 = 470 s, under 8 minutes whatever happens
    steps = [step("GPU tests", [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider"],
                  timeout=180)]  # fmt: skip
    steps.append(step(f"train-ddp, NCCL, {n} rank(s)", train(n, work / "nccl"), timeout=60))
    fsdp = train(n, work / "fsdp", "--strategy", "fsdp", "--precision", "bf16")
    steps.append(step(f"train-ddp --strategy fsdp --precision bf16, NCCL, {n} rank(s)", fsdp, timeout=60))
    if n == 1:
        shared = train(2, work / "gloo-shared", "--backend", "gloo", "--device", "cuda")
        steps.append(step("train-ddp, gloo, 2 ranks sharing the GPU", shared, timeout=60))
    bench_json = work / "bench.json"
    steps.append(step("bench --quick", [sys.executable, "bench/bench.py", "--quick", "--output", str(bench_json)],
                      timeout=110))  # fmt: skip
    for s in steps:  # the figures each step printed
        s["verify"] = re.findall(r"verify: \d+/\d+ ranks .*", s["output_tail"])[-1:]
        s["tests"] = re.findall(r"=+ (.*(?:passed|failed|error).*) =+", s["output_tail"])[-1:]
        s["skipped"] = re.findall(r"SKIPPED \[\d+\] (.*)", s["output_tail"])
    report = {"host": host(), "ok": all(s["ok"] for s in steps), "steps": steps,
              "bench": json.loads(bench_json.read_text()) if bench_json.exists() else None}  # fmt: skip
    report_path.write_text(json.dumps(report, indent=1))
    for s in steps:
        figures = " ".join(s["tests"] + s["verify"])
        print(f"  {'ok    ' if s['ok'] else 'FAILED'} {s['name']} ({s['seconds']:.0f} s) {figures}")
    print(f"gpu-check: {'all ok' if report['ok'] else 'FAILED'}; report: {report_path}", flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
