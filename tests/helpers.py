"""Launching real jobs for the tests: torchrun subprocesses (in-process jobs: ``ddp.group.spawn``)."""

from __future__ import annotations

import functools
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
JOB_TIMEOUT = 150  # seconds; every launch is bounded, a hang fails the test


def env(**extra: str) -> dict[str, str]:
    """The environment for a child job: one thread per rank (2 cores here), no stray faults."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("DDP_", "TORCHELASTIC_", "TORCH_DISABLE_SHARE"))}
    # Nothing a user's own torchrun would not have: restarts must work on the plain path.
    e.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return e


def run(cmd: list[str], *, extra_env: dict | None = None, timeout: float = JOB_TIMEOUT, cwd: Path = ROOT, **kw):
    """Run a command to completion; a child killed by a signal is never a success."""
    proc = subprocess.run(
        cmd, cwd=cwd, env=env(**(extra_env or {})), capture_output=True, text=True, timeout=timeout, **kw
    )
    proc.output = proc.stdout + proc.stderr
    assert proc.returncode >= 0 or proc.returncode == -signal.SIGTERM, f"killed by signal:\n{proc.output}"
    return proc


def torchrun(nproc: int, *args: str, extra_env: dict | None = None, restarts: int = 0, timeout: float = JOB_TIMEOUT):
    """``torchrun --standalone --nproc-per-node=N -m ddp.train ARGS`` (a free port each time).

    torchrun's own code, forked from a server that imported it once (``tests/launcher.py``); its
    workers are ``python -m ddp.train``, as under any torchrun.
    """
    argv = [
        "--standalone", f"--nproc-per-node={nproc}", f"--max-restarts={restarts}",
        "-m", "ddp.train", *args,
    ]  # fmt: skip
    return launch(argv, extra_env=extra_env, timeout=timeout)


def launch(argv: list[str], *, extra_env: dict | None = None, timeout: float = JOB_TIMEOUT, cwd: Path = ROOT):
    """``torchrun ARGV`` to completion, as ``run`` gives a command: returncode, stdout (with stderr), output."""
    return _forked("torch.distributed.run", argv, extra_env=extra_env, timeout=timeout, cwd=cwd, merge=True)


def ddp_command(*argv: str, extra_env: dict | None = None, timeout: float = JOB_TIMEOUT, cwd: Path = ROOT):
    """``python -m ddp ARGV`` to completion, as ``run`` gives it: returncode, stdout, stderr, output."""
    return _forked("ddp", [str(a) for a in argv], extra_env=extra_env, timeout=timeout, cwd=cwd, merge=False)


def train_alone(*argv: str, extra_env: dict | None = None, timeout: float = JOB_TIMEOUT, cwd: Path = ROOT):
    """``python -m ddp.train ARGV`` without torchrun (a world of one), as ``ddp_command`` runs it."""
    return _forked("ddp.train", [str(a) for a in argv], extra_env=extra_env, timeout=timeout, cwd=cwd, merge=False)


def _forked(module: str, argv: list[str], *, extra_env: dict | None, timeout: float, cwd: Path, merge: bool):
    """``python -m MODULE ARGV``, forked from this test process's launcher server (``tests/launcher.py``)."""
    server = _launch_server()
    with tempfile.TemporaryDirectory(prefix="job-") as tmp:
        out, err = Path(tmp) / "out", Path(tmp) / ("out" if merge else "err")
        job = {"module": module, "argv": argv, "env": env(**(extra_env or {})), "cwd": str(cwd)}
        server.stdin.write(json.dumps({**job, "log": str(out), "err": str(err)}) + "\n")
        server.stdin.flush()
        pid = json.loads(server.stdout.readline())["pid"]
        try:
            if not select.select([server.stdout], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired([module, *argv], timeout, out.read_text(errors="replace"))
        except BaseException:  # a timeout, or pytest-timeout's: the job ends with the test
            os.killpg(pid, signal.SIGKILL)
            server.stdout.readline()
            raise
        code = json.loads(server.stdout.readline())["status"]
        stdout = out.read_text(errors="replace") if out.exists() else ""
        stderr = "" if merge or not err.exists() else err.read_text(errors="replace")
    proc = subprocess.CompletedProcess([module, *argv], code, stdout, stderr)
    proc.output = stdout + stderr
    assert code >= 0 or code == -signal.SIGTERM, f"killed by signal:\n{proc.output}"
    return proc


@functools.cache
def _launch_server() -> subprocess.Popen:
    """This test process's launcher server (``tests/launcher.py``); it ends when this process closes its stdin."""
    return subprocess.Popen(
        [sys.executable, "-m", "tests.launcher"], cwd=ROOT, env=env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True, bufsize=1,
    )  # fmt: skip


def spawn(fn, nproc: int, *args):
    """An in-process job (``ddp.group.spawn``): {rank: ``fn(*args)``}, its workers forked from a server that
    imported ``fn``'s module once (torch with it)."""
    from ddp import group

    return group.spawn(fn, nproc, *args, start_method="forkserver")


def ok(proc) -> str:
    """Assert a job succeeded; returns its output."""
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.output[-6000:]}"
    return proc.output


def stopped_after(output: str, signalled: int, name: str = "SIGTERM") -> int:
    """The step the ranks stopped after, on a signal one rank received at the end of step ``signalled``.

    The ranks learn of it at a vote (``ddp.stopping``): from the first step, the interval between votes at most
    doubles, so the stop comes after the signal and at most 4 times its step."""
    steps = {int(s) for s in re.findall(rf"stopping on {name} after step (\d+): checkpoint saved", output)}
    assert len(steps) == 1, output[-3000:]
    (step,) = steps
    assert signalled < step <= 4 * signalled, (signalled, step)
    return step


def start(cmd: list[str], log: Path, **extra: str) -> subprocess.Popen:
    """Start ``cmd`` (a launch script: ``PYTHON`` is this interpreter) in the background, its output in ``log``."""
    f = open(log, "w")
    extra = {"PYTHON": sys.executable, **extra}
    return subprocess.Popen(cmd, cwd=ROOT, env=env(**extra), stdout=f, stderr=subprocess.STDOUT)


def free_port() -> int:
    """A port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_state(run_dir: Path, step: int | None = None) -> tuple[dict, dict]:
    """(model state_dict, train state with the optimizer's whole state) of a run's newest (or given) checkpoint."""
    from ddp.checkpoint_files import read_state

    folders = sorted((run_dir / "checkpoints").glob("step-*"))
    folder = folders[-1] if step is None else run_dir / "checkpoints" / f"step-{step:08d}"
    state, _ = read_state(folder)
    return state.pop("model"), state


def assert_same_training(run_dir: Path, ref_dir: Path) -> None:
    """Two runs' newest checkpoints hold bitwise the same model and optimizer state."""
    (model, train), (ref_model, ref_train) = model_state(run_dir), model_state(ref_dir)
    assert_tree_equal(model, ref_model)
    assert_tree_equal(train["optimizer"], ref_train["optimizer"])


def max_diff(a, b) -> float:
    """Largest |a - b| over nested dicts and lists of tensors (plain values must be equal)."""
    if isinstance(a, torch.Tensor):
        return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"keys differ: {set(a) ^ set(b)}"
        return max((max_diff(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, (list, tuple)):
        return max((max_diff(x, y) for x, y in zip(a, b, strict=True)), default=0.0)
    assert a == b, f"{a!r} != {b!r}"
    return 0.0


def assert_tree_equal(a, b, path: str = "") -> None:
    """Bitwise equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"differs at {path}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"keys differ at {path}: {set(a) ^ set(b)}"
        for k in a:
            assert_tree_equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"lengths differ at {path}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_tree_equal(x, y, f"{path}/{i}")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"
