"""Launch anywhere: every script in launch/ starts a working job."""

import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from .helpers import ROOT, assert_same_training, free_port, ok, run, start

SCRIPTS = sorted((ROOT / "launch").iterdir())
ARGS = ["--samples", "512", "--batch-size", "16", "--steps", "6"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_script_parses(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


def test_make_train_ddp_runs_nproc_cpu_workers_and_passes_arguments_through(tmp_path):
    out = ok(run(["make", "--no-print-directory", "train-ddp", "NPROC=1", f"ARGS={' '.join(ARGS)} --out {tmp_path}",
                  f"PY={sys.executable}", f"VENV={Path(sys.executable).parent.parent}"]))  # fmt: skip
    assert "verify: 1/1 ranks" in out and (tmp_path / "mlp.params").exists()  # launch/train_ddp.sh, NPROC=1


def kill_node(pid: int) -> None:
    """SIGKILL a launcher and every process under it at once: torchrun puts its workers in
    sessions of their own, so killing the launcher's process group would leave them running."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, i = [pid], 0
    while i < len(tree):
        tree += parents.get(tree[i], [])
        i += 1
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


TWO_NODES = [*ARGS, "--steps", "10", "--checkpoint-every", "3"]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """(the run's folder, its logs, the files each rank wrote) of a job on two nodes of this host, one rank each,
    never killed: 10 steps, a checkpoint every 3."""
    out = tmp_path_factory.mktemp("two-nodes")
    port, writes = free_port(), out / "writes.log"
    # one rank a node: node 1's rank 1 has local rank 0, which must not make it write what rank 0 writes
    launcher = ["--head", "127.0.0.1", "--port", str(port), "--nnodes", "2", "--nproc", "1", "--rdzv-id", "two"]
    cmd = ["bash", "launch/multinode.sh", *launcher, "--", *TWO_NODES, "--out", str(out / "run")]
    nodes = [start(cmd, out / f"node{i}.log", DDP_FAULT=f"log-writes:file={writes}") for i in range(2)]
    for node in nodes:
        node.wait(timeout=150)
    logs = "".join((out / f"node{i}.log").read_text() for i in range(2))
    assert all(node.returncode == 0 for node in nodes), logs[-4000:]
    return out / "run", logs, writes


def test_two_nodes_rendezvous_on_one_host_and_rank_0_writes_the_shared_files(two_nodes):
    _, logs, writes = two_nodes
    assert "verify: 2/2 ranks reloaded" in logs
    by_file: dict[str, set[str]] = {}
    for line in writes.read_text().splitlines():
        rank, name = line.split("\t")
        by_file.setdefault(name.split(".tmp-")[0].lstrip("."), set()).add(rank)
    assert by_file["mlp.params"] == by_file["train.pt"] == by_file["manifest.json"] == {"0"}
    assert all(by_file[f"rank-0000{r}.pt"] == {str(r)} for r in range(2))
    # the model's tensors and the momentum go to the ranks by size: every rank writes a share, under its name
    shares = {name: ranks for name, ranks in by_file.items() if name.startswith(("model-", "optim-"))}
    assert all(ranks == {str(int(name[6:11]))} for name, ranks in shares.items()) and "model.pt" not in by_file
    assert set().union(*shares.values()) == {"0", "1"}


def test_a_node_replaced_after_a_kill_gets_the_snapshot_from_the_other_node_and_ends_bitwise_equal(tmp_path, two_nodes):
    # Each node's agent counts its own restarts (the killed node's reaches 1, the other's may
    # stay 0), so a restart cannot be told apart by TORCHELASTIC_RESTART_COUNT: it must still join.
    # Rank 1 dies with its node's host memory (its snapshots): under DDP rank 0's serves both.
    port = free_port()
    launcher = ["--head", "127.0.0.1", "--port", str(port), "--nnodes", "2", "--nproc", "1", "--rdzv-id", "kill",
                "--max-restarts", "1"]  # fmt: skip
    args = [*TWO_NODES, "--no-async-save", "--snapshot-every", "1"]
    nodes = []
    for i in range(2):
        shm = tmp_path / f"shm{i}"  # each node's own memory
        cmd = [
            "bash",
            "launch/multinode.sh",
            *launcher,
            "--",
            *args,
            "--snapshot-dir",
            str(shm),
            "--out",
            str(tmp_path),
        ]
        nodes.append(start(cmd, tmp_path / f"node{i}.log", DDP_FAULT=f"lose-memory:rank=1:step=5:dir={shm}"))
    for node in nodes:
        node.wait(timeout=150)
    logs = "".join((tmp_path / f"node{i}.log").read_text() for i in range(2))
    assert all(node.returncode == 0 for node in nodes), logs[-4000:]
    assert re.search(r"warning: rank\(s\) \[1\] hold no snapshot of step [45] \(a replaced node\?\): rank 0 sent", logs)
    assert re.search(r"resumed from the snapshot in host memory \(.*\), step [45]: continuing at step [56]", logs)
    assert "verify: 2/2 ranks reloaded" in logs
    assert_same_training(tmp_path, two_nodes[0])  # the same job, never killed


def test_a_node_joins_a_running_elastic_job_then_leaves_it_and_the_job_goes_on_each_time(tmp_path):
    # Node 0 starts the job alone (elastic.sh takes the nodes it has, 1 to 2 here) and trains until a checkpoint.
    # Node 1 then joins: a membership change restarts the workers on the larger world without counting an
    # attempt, so both worlds look alike to TORCHELASTIC_RESTART_COUNT (elastic.sh unshares torchrun's store:
    # see multinode.sh). Once the larger world has checkpointed, node 1 dies whole (agent and workers: a power
    # cut). The survivor's collective fails, its agent restarts it (attempt 1), the next rendezvous round closes
    # without the dead node, missed 3 heartbeats 1 s apart, and the job ends on the smaller world.
    # Steps are slow in attempt 0, so that each change finds the job running.
    port = free_port()
    cmd = ["bash", "launch/elastic.sh", "--head", "127.0.0.1", "--port", str(port), "--nnodes", "1:2", "--nproc", "1",
           "--samples", "1024", "--batch-size", "16", "--steps", "300", "--checkpoint-every", "20",
           "--log-every", "100", "--timeout", "30", "--out", str(tmp_path)]  # fmt: skip
    rdzv = "last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3"
    slow = {"RDZV_CONF": rdzv, "DDP_FAULT": "sleep:seconds=0.1"}
    nodes = [start(cmd, tmp_path / "node0.log", **slow)]

    def wait_for(world_size: int) -> None:
        deadline = time.monotonic() + 90
        while not any(
            f'"world_size": {world_size}' in m.read_text()
            for m in (tmp_path / "checkpoints").glob("step-*/manifest.json")
        ):
            logs = "".join((tmp_path / f"node{i}.log").read_text() for i in range(len(nodes)))
            story = "\n".join(line for line in logs.splitlines() if re.search(r"resum|warning|rank\(s\)", line))
            assert time.monotonic() < deadline and all(n.poll() is None for n in nodes), story + logs[-3000:]
            time.sleep(0.1)

    try:
        wait_for(1)
        nodes.append(start(cmd, tmp_path / "node1.log", **slow))
        wait_for(2)
        kill_node(nodes[1].pid)
        nodes[0].wait(timeout=150)
    finally:
        for node in nodes:
            if node.poll() is None:
                kill_node(node.pid)
    log = (tmp_path / "node0.log").read_text()
    assert nodes[0].returncode == 0, log[-4000:]
    grown = re.search(r"warning: checkpoint written by 1 rank\(s\), resuming on 2: data continues at sample \d+", log)
    assert grown and "ranks [1] had no RNG state" in log, log[-4000:]
    assert (
        "warning: checkpoint written by 2 rank(s), resuming on 1" in log
        and "RNG state of ranks [1] was not used" in log
    )
    assert "verify: 1/1 ranks reloaded" in log


STANDINS = {
    "sbatch": """
        echo "sbatch $*" >> "$SLURM_LOG"
        script=$1; shift
        export SLURM_JOB_ID=4242 SLURM_JOB_NAME=ddp SLURM_JOB_NODELIST="node[1-2]"
        export SLURM_NNODES=$(sed -n 's/^#SBATCH --nodes=//p' "$script")
        exec bash "$script" "$@"
    """,
    "scontrol": """
        echo "scontrol $*" >> "$SLURM_LOG"
        if [ "$1 $2" = "show hostnames" ]; then for i in $(seq "$SLURM_NNODES"); do echo 127.0.0.1; done; fi
    """,
    "srun": """
        echo "srun $*" >> "$SLURM_LOG"
        while [ "${1#-}" != "$1" ]; do shift; done   # drop srun's own options
        pids=()
        for node in $(seq 0 $((SLURM_NNODES - 1))); do
            SLURM_NODEID=$node SLURM_PROCID=$node "$@" & pids+=($!)
        done
        trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
        status=0
        for p in "${pids[@]}"; do wait "$p" || status=$?; done
        exit $status
    """,
}


@pytest.fixture
def slurm(tmp_path):
    """Stand-ins for sbatch, srun and scontrol on PATH; each records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STANDINS.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\nset -u\n" + textwrap.dedent(body))
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "slurm.log"
    extra = {
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin",
        "SLURM_LOG": str(log),
        "PYTHON": sys.executable,
        "MASTER_PORT": str(free_port()),
        "NPROC": "1",
        "OUT": str(tmp_path / "run"),
    }
    return log, extra


def test_slurm_script_starts_a_working_job_through_srun(tmp_path, slurm):
    log, extra = slurm
    out = ok(run(["sbatch", "launch/slurm.sbatch", *ARGS, "--log-all-ranks"], extra_env=extra))
    assert "verify: 2/2 ranks reloaded" in out
    calls = log.read_text()
    assert "scontrol show hostnames node[1-2]" in calls
    assert "--rdzv-id=4242" in calls and "--nnodes=2" in calls and "--rdzv-endpoint=127.0.0.1:" in calls
    assert "srun --nodes=2 --ntasks=2 --ntasks-per-node=1" in calls
    assert (tmp_path / "run" / "mlp.params").exists()


def test_slurm_time_limit_signal_checkpoints_and_requeues(tmp_path, slurm):
    log, extra = slurm
    args = ["--samples", "512", "--steps", "100000", "--checkpoint-every", "5"]
    job = start(["sbatch", "launch/slurm.sbatch", *args], tmp_path / "job.log", **extra)
    deadline = time.monotonic() + 90
    while not list((tmp_path / "run" / "checkpoints").glob("step-*")):
        assert time.monotonic() < deadline and job.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
        time.sleep(0.2)
    job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 delivers to the batch script
    job.wait(timeout=90)
    output = (tmp_path / "job.log").read_text()
    assert job.returncode == 0, output[-3000:]
    assert "stopping on SIGTERM after step" in output and "scontrol requeue 4242" in log.read_text()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_each_local_rank_takes_its_own_gpu(tmp_path):
    extra = {"PYTHON": sys.executable, "NPROC": "2"}
    out = ok(run(["bash", "launch/train_ddp.sh", *ARGS, "--log-all-ranks", "--out", str(tmp_path)], extra_env=extra))
    assert "[rank 0/2] nccl on cuda:0" in out and "[rank 1/2] nccl on cuda:1" in out


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs CUDA")
def test_cuda_visible_devices_is_respected_and_too_many_processes_refused(tmp_path):
    extra = {"PYTHON": sys.executable, "NPROC": "2", "CUDA_VISIBLE_DEVICES": "0"}
    proc = run(["bash", "launch/train_ddp.sh", *ARGS, "--out", str(tmp_path)], extra_env=extra)
    assert proc.returncode != 0
    assert "2 processes per node but only 1 visible GPU(s) (CUDA_VISIBLE_DEVICES=0)" in proc.output
