"""A run folder you can trust: one run per folder, stopped any way you like, weights that stand alone, one log."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest

from ddp import cli, train
from ddp.metrics import MetricsWriter, read_metrics
from ddp.plot import runs_of

from .helpers import ROOT, env, ok, stopped_after, torchrun, train_alone

SMALL = ["--samples", "512", "--batch-size", "32"]


def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---- one run per folder ---------------------------------------------------------------


def test_another_run_in_a_folder_is_refused_and_overwrite_moves_the_old_one_aside(tmp_path):
    out = tmp_path / "runx"
    ok(train_alone(*SMALL, "--steps", "30", "--out", str(out)))
    first = md5(out / "mlp.params")
    for other in (["--resume", "never"], ["--seed", "5"]):  # refused before training: one rank says it as two would
        proc = train_alone(*SMALL, "--steps", "10", *other, "--out", str(out))
        assert proc.returncode != 0 and f"--out {out} holds another run's checkpoints" in proc.output
        assert "newest step-00000030" in proc.output and "choose another --out, or pass --overwrite" in proc.output
        assert md5(out / "mlp.params") == first
    ok(train_alone(*SMALL, "--steps", "10", "--seed", "5", "--overwrite", "--out", str(out)))
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("runx.old-")]
    assert len(aside) == 1 and md5(aside[0] / "mlp.params") == first  # moved, never deleted
    assert md5(out / "mlp.params") != first and (out / "checkpoints" / "step-00000010").is_dir()
    assert not (out / "checkpoints" / "step-00000030").exists()
    # a plain relaunch now continues the new run (seed 5), never the old one
    assert "continuing at step 11" in ok(train_alone(*SMALL, "--steps", "12", "--seed", "5", "--out", str(out)))
    run_id = json.loads((out / "run.json").read_text())["id"]
    manifest = json.loads((out / "checkpoints" / "step-00000012" / "manifest.json").read_text())
    assert manifest["run_id"] == run_id and {r["run"] for r in records(out)} == {run_id}


def test_more_steps_or_another_rate_continue_the_run(tmp_path, capsys):
    assert train.main([*SMALL, "--steps", "6", "--out", str(tmp_path)]) == 0
    assert train.main([*SMALL, "--steps", "9", "--lr", "0.01", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "steps 6 -> 9, lr 0.05 -> 0.01" in out and "continuing at step 7" in out


# ---- stop it any way you like -----------------------------------------------------------


def test_sigint_saves_at_the_end_of_the_step_and_exits_with_one_line(tmp_path):
    proc = ok(train_alone(*SMALL, "--steps", "100", "--log-every", "1000", "--out", str(tmp_path),
                          extra_env={"DDP_FAULT": "sigint:step=7"}))  # fmt: skip
    assert "[rank 0/1] stopping on SIGINT after step 7: checkpoint saved, relaunch to resume" in proc
    assert "Traceback" not in proc and "KeyboardInterrupt" not in proc
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000007"]


def test_a_signal_on_one_rank_stops_every_rank_at_a_vote_whatever_log_every_is(tmp_path):
    args = [*SMALL, "--steps", "100", "--log-every", "2500", "--eval-every", "0", "--out", str(tmp_path)]
    out = ok(torchrun(2, *args, extra_env={"DDP_FAULT": "sigterm:rank=1:step=5"}))
    stopped = stopped_after(out, 5)  # at the next vote's reading, with no blocking collective in between
    assert (tmp_path / "checkpoints" / f"step-{stopped:08d}").is_dir() and not (tmp_path / "mlp.params").exists()


def test_ctrl_c_to_torchrun_stops_every_rank_with_a_checkpoint(tmp_path):
    # steps of ~0.1 s: the signal reaches the workers well within one step of the line that triggers it
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "ddp.train",
           "--hidden", "2048", "2048", "--batch-size", "128", "--steps", "100000", "--log-every", "1",
           "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "step 10 " in line:
            proc.send_signal(signal.SIGINT)  # a terminal's Ctrl-C reaches torchrun; it forwards SIGINT to workers
            break
    rest, _ = proc.communicate(timeout=60)
    output = "".join(seen) + rest
    stopped = [int(line.split("after step ")[1].split(":")[0]) for line in output.splitlines() if "stopping on" in line]
    assert stopped and 10 <= stopped[0] <= 13, output[-3000:]  # the step in progress, or the one after it
    assert "stopping on SIGINT" in output and "KeyboardInterrupt" not in output
    assert (tmp_path / "checkpoints" / f"step-{stopped[0]:08d}").is_dir()


def test_workers_whose_torchrun_is_sigkilled_stop_together_with_a_checkpoint(tmp_path):
    # torchrun killed outright (the out-of-memory killer, a scheduler's SIGKILL) tells its workers nothing: they
    # find themselves orphaned at a vote and stop as on SIGTERM, every rank at the same step, with a checkpoint
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "ddp.train",
           "--samples", "1024", "--batch-size", "32", "--steps", "100000", "--log-every", "1",
           "--out", str(tmp_path)]  # fmt: skip
    agent = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    workers: list[int] = []
    try:
        seen = []
        for line in agent.stdout:
            seen.append(line)
            if "step 5 " in line:
                workers = [int(p) for p in open(f"/proc/{agent.pid}/task/{agent.pid}/children").read().split()]
                agent.kill()
                break
        rest, _ = agent.communicate(timeout=60)  # the pipe ends once the last worker holding it exits
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    output = "".join(seen) + rest
    # the rank that looks first says so; a rank that looked a moment before the kill stops on the vote it carries
    assert len(workers) == 2 and "is gone: stopping as on SIGTERM" in output, output[-3000:]
    stopped = {int(line.split("after step ")[1].split(":")[0]) for line in output.splitlines() if "stopping on" in line}
    assert len(stopped) == 1, output[-3000:]  # the ranks agreed on the step
    assert (tmp_path / "checkpoints" / f"step-{stopped.pop():08d}" / "manifest.json").is_file()


def test_a_second_sigint_exits_at_once(tmp_path):
    cmd = [sys.executable, "-m", "ddp.train", "--hidden", "2048", "2048", "--batch-size", "512", "--steps", "100000",
           "--log-every", "1", "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "step 2 " in line:
            break
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)  # the first one's handler runs (signals of one kind do not queue), mid-step: steps take ~1 s
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "second SIGINT: exiting now, without a checkpoint" in err, err[-2000:]


# ---- exported weights that stand alone --------------------------------------------------

TASKS = {
    "mlp": ([], "mlp.params"),
    "cnn": (["--task", "cnn", "--width", "4"], "cnn.params"),
    "npz": (["--data", "{data}/arrays.npz"], "npz.params"),
    "digits": (["--task", "digits", "--task-arg", "width=4"], "digits.params"),
    "charlm": (
        ["--task", "charlm", "--task-arg", "text={data}/text.txt", "block=16", "layers=1", "embd=16"],
        "charlm.params",
    ),
    "user, lazy data": (["--task", "{data}/tabular.py:make"], "tabular.params"),
    "user, dict inputs": (["--task", "tests/user_task.py:make"], "user.params"),
}
TABULAR = """
import numpy as np, torch, ddp
from torch.utils.data import TensorDataset

def make(path: str = "{data}/rows.csv"):
    def rows():  # read only when training needs it
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)
        return TensorDataset(torch.from_numpy(table[:, :4]), torch.from_numpy(table[:, 4]).long())
    return ddp.Task(model=lambda: torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)),
                    train_data=rows, probe=torch.randn(5, 4, generator=torch.Generator().manual_seed(0)),
                    name="tabular")
"""


@pytest.mark.parametrize("name", list(TASKS))
def test_exported_weights_verify_and_predict_without_the_training_data(tmp_path, capsys, monkeypatch, name):
    monkeypatch.chdir(ROOT)
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    np.savez(data / "arrays.npz", X=rng.normal(size=(300, 7)).astype(np.float32), y=rng.integers(0, 10, 300))
    (data / "text.txt").write_text((ROOT / "docs" / "tasks.md").read_text())
    table = np.concatenate([rng.normal(size=(200, 4)), rng.integers(0, 2, (200, 1))], axis=1)
    np.savetxt(data / "rows.csv", table, delimiter=",")
    (data / "tabular.py").write_text(TABULAR.replace("{data}", str(data)))
    args, weights = TASKS[name]
    out = tmp_path / "run"
    ok(train_alone(*(a.replace("{data}", str(data)) for a in args), "--batch-size", "16", "--steps", "3",
                "--out", str(out)))  # fmt: skip
    for f in ("arrays.npz", "text.txt", "rows.csv"):
        (data / f).unlink()  # the training data is gone
    capsys.readouterr()
    assert cli.main(["verify", str(out / weights)]) == 0, capsys.readouterr().err
    assert "outputs identical (max |Δ| = 0" in capsys.readouterr().out
    assert cli.main(["predict", str(out / weights), "--random", "3", "--device", "cpu"]) == 0, capsys.readouterr()
    printed = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in printed] == ["0", "1", "2"]


# ---- a log that reads as one run -------------------------------------------------------


def test_the_logged_loss_is_the_mean_over_the_interval_and_ranks_and_epochs_are_the_steps_own(tmp_path):
    # 922 samples on 2 ranks of batch 32: 14 steps an epoch; logging every 5 and every step
    base = ["--samples", "1024", "--batch-size", "32", "--epochs", "2"]
    ok(torchrun(2, *base, "--log-every", "1", "--out", str(tmp_path / "each")))
    ok(torchrun(2, *base, "--log-every", "5", "--out", str(tmp_path / "five")))
    each = {r["step"]: r for r in records(tmp_path / "each") if r["kind"] == "train"}
    five = [r for r in records(tmp_path / "five") if r["kind"] == "train"]
    assert [r["step"] for r in five] == [5, 10, 15, 20, 25, 28]
    for r in five:
        start = max(s for s in [0, 5, 10, 15, 20, 25] if s < r["step"])
        mean = sum(each[s]["loss"] for s in range(start + 1, r["step"] + 1)) / (r["step"] - start)
        assert abs(r["loss"] - mean) < 1e-9
    assert each[14]["epoch"] == 0 and each[15]["epoch"] == 1 and each[28]["epoch"] == 1  # not epoch 2 at the end


def test_plot_draws_one_line_per_run_even_in_an_old_interleaved_log(tmp_path):
    old = [{"kind": "train", "step": s, "loss": 1.0, "time": 0} for s in (10, 20, 30, 10)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    assert [len(run) for run in runs_of(old)] == [3, 1]
    pytest.importorskip("matplotlib")
    assert cli.main(["plot", str(tmp_path)]) == 0 and (tmp_path / "loss.png").stat().st_size > 0


def test_a_resume_cuts_the_log_from_its_end_in_memory_that_does_not_grow_with_the_run(tmp_path):
    # a run of days logs millions of records: 200,000 here (21 MB); the resume reads the lines it cuts and streams
    # the rest for the eval records, holding neither (the code before held every record: 260 MB here)
    train = '{"kind": "train", "run": "r1", "step": %d, "loss": 0.5, "lr": 0.01, "grad_norm": 1.0, "time": 1.0}\n'
    evaluated = '{"kind": "eval", "run": "r1", "step": %d, "accuracy": 0.5, "time": 1.0}\n'
    lines = [train % s + (evaluated % s if s % 10_000 == 0 else "") for s in range(10, 2_000_001, 10)]
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(lines))
    writer = MetricsWriter(tmp_path, enabled=True)
    tracemalloc.start()
    evals = [r["step"] for r in writer.resume("r1", 1_500_000, elapsed=0.0)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert evals == list(range(10_000, 1_500_001, 10_000)) and peak < 4 << 20, peak
    assert log.read_text() == "".join(lines[:150_000])
    # a power cut: the last line torn, and the one before it without its newline; both resumes keep a log of lines
    log.write_text("".join(lines[:3])[:-1] + '\n{"kind": "train", "run": "r1", "st')
    assert list(writer.resume("r1", 30, elapsed=0.0)) == [] and log.read_text() == "".join(lines[:3])
    log.write_text("".join(lines[:3])[:-1])
    assert list(writer.resume("r1", 30, elapsed=0.0)) == [] and log.read_text() == "".join(lines[:3])
    writer.write("train", step=31, loss=0.5)
    assert [r["step"] for r in read_metrics(tmp_path)] == [10, 20, 30, 31]
    assert list(writer.resume("r1", 5, elapsed=0.0)) == [] and log.read_text() == ""  # before the first record
