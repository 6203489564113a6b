"""Bad input and faults: clear errors that name what is wrong, and no good checkpoint lost."""

import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

import ddp
import ddp.dcp
import ddp.weights
from ddp import options
from ddp.checkpoint_files import newest_valid, validate
from ddp.errors import (
    ArchitectureMismatchError,
    CheckpointCorruptError,
    CheckpointFormatError,
    ConfigError,
    UnsafeCheckpointError,
)
from ddp.group import World, check_devices
from ddp.model import MLP

from .helpers import ROOT, ddp_command, env, free_port, model_state, ok, run, torchrun, train_alone

ARGS = ["--samples", "512", "--batch-size", "32"]


def sha256_tree(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-rank run with checkpoints at steps 4 and 8."""
    out = tmp_path_factory.mktemp("trained")
    ok(torchrun(2, *ARGS, "--steps", "8", "--checkpoint-every", "4", "--out", str(out)))
    return out


@pytest.fixture
def run_copy(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


# ---- damaged checkpoints --------------------------------------------------------------


def test_truncated_checkpoint_is_reported_with_its_size(run_copy):
    model = run_copy / "checkpoints" / "step-00000008" / "model-00000.pt"  # rank 0's share of the model
    size = model.stat().st_size
    model.write_bytes(model.read_bytes()[: size // 2])
    with pytest.raises(CheckpointCorruptError, match=rf"{model} has {size // 2} bytes, the manifest says {size}"):
        validate(model.parent)
    with pytest.raises(CheckpointCorruptError, match=str(model)):
        ddp.load(model)


def test_flipped_byte_fails_the_checksum(run_copy):
    train = run_copy / "checkpoints" / "step-00000008" / "train.pt"
    data = bytearray(train.read_bytes())
    data[len(data) // 2] ^= 0xFF
    train.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match=rf"{train} fails its xxh3_128 check"):
        validate(train.parent)


def test_a_sha256_manifest_of_earlier_versions_still_verifies_and_resumes(run_copy):
    folder = run_copy / "checkpoints" / "step-00000008"
    manifest = json.loads((folder / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        del entry["xxh3_128"]
        entry["sha256"] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert validate(folder)["step"] == 8
    out = ok(train_alone(*ARGS, "--steps", "10", "--checkpoint-every", "4", "--out", str(run_copy)))  # on 1 rank
    assert f"resumed from {folder}: continuing at step 9" in out
    train = folder / "train.pt"
    train.write_bytes(train.read_bytes()[:-1] + bytes([train.read_bytes()[-1] ^ 1]))
    with pytest.raises(CheckpointCorruptError, match=rf"{train} fails its sha256 check"):
        validate(folder)


def test_checkpoint_without_or_with_a_broken_manifest_is_refused(run_copy):
    folder = run_copy / "checkpoints" / "step-00000008"
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointCorruptError, match=r"manifest\.json is not a valid manifest"):
        validate(folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(CheckpointCorruptError, match=r"has no manifest\.json: an unfinished save, never loaded"):
        validate(folder)


@pytest.mark.timeout(60)
def test_a_manifest_naming_a_pipe_or_a_file_outside_its_folder_is_refused_without_opening_it(run_copy):
    # a downloaded checkpoint folder is outside input: nothing it names may hang a reader or lead out of it
    root = run_copy / "checkpoints"
    folder = root / "step-00000008"
    manifest = json.loads((folder / "manifest.json").read_text())
    files = dict(manifest["files"])
    os.mkfifo(folder / "pipe")
    (folder / "link").symlink_to("/etc/passwd")
    passwd = os.path.getsize("/etc/passwd")
    hostile = {
        "pipe": (0, f"{folder}/pipe (named by {folder}/manifest.json) is not a regular file"),
        "/dev/zero": (0, "the entry '/dev/zero' is not a file inside the checkpoint folder"),
        "../../../../../../etc/passwd": (passwd, "the entry '../../../../../../etc/passwd' is not a file inside"),
        "link": (passwd, "the entry 'link' leads outside the checkpoint folder (a symlink to /etc/passwd)"),
    }
    for name, (size, said) in hostile.items():
        manifest["files"] = {**files, name: {"size": size, "xxh3_128": "00"}}
        (folder / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(CheckpointCorruptError, match=re.escape(said)):
            validate(folder)
    skipped = []
    assert newest_valid(root, say=skipped.append) == root / "step-00000004"  # a resume skips it, saying why
    assert len(skipped) == 1 and "leads outside the checkpoint folder" in skipped[0]
    proc = ddp_command("verify", folder, timeout=30)
    assert proc.returncode == 1 and "leads outside the checkpoint folder" in proc.output
    with pytest.raises(CheckpointFormatError, match="is not a regular file"):
        ddp.load(folder / "pipe")  # a weights file that is a pipe: refused by its stat, never read
    (folder / "manifest.json").unlink()
    os.mkfifo(folder / "manifest.json")
    with pytest.raises(CheckpointCorruptError, match=r"manifest\.json \(named by .*\) is not a regular file"):
        validate(folder)


@pytest.mark.timeout(60)
def test_a_pipe_in_place_of_an_index_a_dcp_metadata_or_a_config_file_is_refused_without_reading_it(tmp_path, capsys):
    index, dcp_folder, toml = tmp_path / "model.safetensors.index.json", tmp_path / "dcp", tmp_path / "run.toml"
    dcp_folder.mkdir()
    for fifo in (index, dcp_folder / ".metadata", toml):
        os.mkfifo(fifo)
    with pytest.raises(CheckpointCorruptError, match=f"{index} is not a regular file"):
        ddp.weights.read(index)
    with pytest.raises(ddp.errors.DDPError):  # not taken for a DCP folder: a folder with no weights file
        ddp.weights.read(dcp_folder)
    with pytest.raises(CheckpointCorruptError, match="is not a regular file"):
        ddp.dcp.read_metadata(dcp_folder)
    with pytest.raises(SystemExit):
        options.parse(["--config", str(toml)])
    assert f"{toml} is not a regular file" in capsys.readouterr().err


def test_resume_auto_falls_back_to_the_previous_complete_checkpoint(run_copy):
    newest = run_copy / "checkpoints" / "step-00000008"
    previous = run_copy / "checkpoints" / "step-00000004"
    before = sha256_tree(previous)
    model = newest / "model-00000.pt"
    model.write_bytes(model.read_bytes()[:100])
    out = ok(train_alone(*ARGS, "--steps", "8", "--checkpoint-every", "4", "--out", str(run_copy)))  # on 1 rank
    lines = [line for line in out.splitlines() if "skipping" in line]
    assert len(lines) == 1 and f"skipping {newest}: {model} has 100 bytes" in lines[0]
    assert "falling back to the previous checkpoint" in lines[0]
    assert f"resumed from {previous}: continuing at step 5" in out
    assert sha256_tree(previous) == before  # the good one is untouched (it is re-saved only at step 8)


def test_resume_from_an_explicit_damaged_path_fails_naming_the_file(run_copy):
    folder = run_copy / "checkpoints" / "step-00000004"
    (folder / "rank-00001.pt").write_bytes(b"")
    proc = torchrun(2, *ARGS, "--steps", "8", "--out", str(run_copy), "--resume", str(folder))
    assert proc.returncode != 0
    assert f"{folder}/rank-00001.pt has 0 bytes, the manifest says" in proc.output


# ---- files that are no checkpoint -----------------------------------------------------


@pytest.mark.parametrize(
    ("content", "found"),
    [
        (b"", "is empty \\(0 bytes\\)"),
        (b"hello, I am a text file\n", "found text"),
        (b"\x00\x01\x02\x03binary", "found unknown bytes"),
    ],
)
def test_files_that_are_not_checkpoints_say_what_was_expected_and_found(tmp_path, content, found):
    path = tmp_path / "mlp.params"
    path.write_bytes(content)
    with pytest.raises(CheckpointFormatError, match=rf"{path} .*{found}"):
        ddp.load(path)
    with pytest.raises(CheckpointFormatError):
        ddp.load_model(MLP(), path)


def test_a_zip_of_something_else_is_not_a_torch_checkpoint(tmp_path):
    path = tmp_path / "photos.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("holiday.txt", "sunny")
    with pytest.raises(CheckpointFormatError, match=r"is a zip archive but not a torch checkpoint"):
        ddp.load(path)


def test_safetensors_and_torch_files_are_told_apart(tmp_path):
    ddp.save({"w": torch.ones(2)}, tmp_path / "w.safetensors", format="safetensors")
    ddp.save({"w": torch.ones(2)}, tmp_path / "w.pt")
    with pytest.raises(CheckpointFormatError, match="is a safetensors file, but a torch file is expected"):
        ddp.load(tmp_path / "w.safetensors", expect="torch")
    with pytest.raises(CheckpointFormatError, match="is a torch file, but a safetensors file is expected"):
        ddp.load(tmp_path / "w.pt", expect="safetensors")


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/nope.params does not exist"):
        ddp.load(tmp_path / "nope.params")


class Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_runs_code_is_refused_and_the_code_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(1), "payload": Exploit(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match=rf"{path} holds objects the weights-only loader refuses"):
        ddp.load(path)
    with pytest.raises(UnsafeCheckpointError):
        ddp.load_model(MLP(), path)
    proc = ddp_command("inspect", path)
    assert proc.returncode == 1 and "weights-only loader refuses" in proc.output
    assert not marker.exists()


def test_the_package_never_loads_without_weights_only():
    for source in (ROOT / "ddp").glob("*.py"):
        text = source.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{source.name}: {call}"
        assert "pickle.load" not in text and "weights_only=False" not in text, source.name


# ---- wrong architecture, wrapper prefixes ---------------------------------------------


def test_another_architecture_lists_missing_unexpected_and_mismatched(tmp_path):
    ddp.save(MLP(hidden=(64, 32)).state_dict(), tmp_path / "mlp.params")
    with pytest.raises(ArchitectureMismatchError) as e:
        ddp.load_model(MLP(hidden=(256,)), tmp_path / "mlp.params")
    msg = str(e.value)
    assert "unexpected keys (2): hidden.2.weight, hidden.2.bias" in msg
    assert "shape mismatches (3): hidden.0.weight: file (64, 20) vs model (256, 20)" in msg
    assert str(tmp_path / "mlp.params") in msg


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapped_state_dicts_load_with_one_line_naming_the_prefix(tmp_path, capsys, prefix):
    net = MLP()
    ddp.save({prefix + k: v for k, v in net.state_dict().items()}, tmp_path / "w.pt")
    clone = ddp.load_model(MLP(), tmp_path / "w.pt")
    assert all(torch.equal(a, b) for a, b in zip(clone.state_dict().values(), net.state_dict().values(), strict=True))
    lines = capsys.readouterr().out.strip().splitlines()
    named = [f"'{p}'" for p in ("module.", "_orig_mod.") if p in prefix]
    assert len(lines) == 1 and lines[0].startswith("load_model: stripped prefix ")
    assert all(n in lines[0] for n in named) and str(tmp_path / "w.pt") in lines[0]


# ---- bad settings, before any process group ------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], "--steps: must be positive, got 0"),
        (["--batch-size", "-4"], "--batch-size: must be positive, got -4"),
        (["--keep-last", "1"], "--keep-last: must be >= 2, got 1: the newest checkpoint may still be being written"),
        (["--backend", "mpi"], "--backend: unknown 'mpi'; use auto, nccl or gloo"),
        (["--grad-accum", "0"], "--grad-accum: must be >= 1"),
        (["--memory-format", "nhwc"], "--memory-format: unknown 'nhwc'; use auto, channels_last, contiguous"),
    ],
)
def test_bad_settings_are_usage_errors_before_any_process_group(tmp_path, args, message):
    proc = train_alone(*args, "--out", tmp_path)
    assert proc.returncode == 2 and message in proc.output
    assert "gloo on cpu" not in proc.output and not (tmp_path / "checkpoints").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU case")
def test_nccl_without_a_gpu_is_a_usage_error(tmp_path):
    proc = train_alone("--backend", "nccl", "--out", tmp_path)
    assert proc.returncode == 2 and "--backend nccl needs a CUDA GPU and none is visible" in proc.output


def test_more_processes_than_gpus_with_nccl_is_refused():
    with pytest.raises(ConfigError, match=r"\d+ visible GPU\(s\).*NCCL needs one GPU per process"):
        check_devices(World(local_world_size=torch.cuda.device_count() + 1, backend="nccl"))
    check_devices(World(local_world_size=64, backend="gloo"))  # gloo on CPU: any number


def test_unwritable_out_fails_before_training_and_a_missing_out_is_created(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    proc = train_alone("--out", blocker / "run")
    assert proc.returncode == 2 and f"--out: cannot write to {blocker}/run" in proc.output
    assert "step" not in proc.output
    fresh = tmp_path / "new" / "deep" / "run"
    ok(train_alone(*ARGS, "--steps", "2", "--out", fresh))
    assert (fresh / "mlp.params").exists()


# ---- faults in real jobs --------------------------------------------------------------


def test_disk_full_during_a_save_fails_every_rank_and_keeps_the_previous_checkpoint(tmp_path, trained):
    args = [*ARGS, "--steps", "8", "--checkpoint-every", "4", "--timeout", "30", "--out", str(tmp_path)]
    start = time.monotonic()
    # per checkpoint rank 1 writes two files (rank file, its optimizer share), rank 0 four (rank
    # file, model, train, manifest): rank 1's third write is its rank file of step 8. Rank 1 is
    # slow to leave the group: the launcher kills it once rank 0 exits, and it must have spoken.
    proc = torchrun(2, *args, extra_env={"DDP_FAULT": "enospc:rank=1:save=3:linger=5"})
    assert time.monotonic() - start < 60 and proc.returncode != 0
    rank_file = tmp_path / "checkpoints" / ".tmp-step-00000008" / "rank-00001.pt"
    for r in (0, 1):
        assert f"[rank {r}/2] error: checkpoint of step 8 failed, the previous ones are intact: rank 1: " in proc.output
    assert f"could not write {rank_file}: ENOSPC No space left on device (disk full" in proc.output
    good = tmp_path / "checkpoints" / "step-00000004"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000004"]
    validate(good)
    kept, expected = model_state(tmp_path, 4), model_state(trained, 4)  # the same run, never stopped
    assert all(torch.equal(kept[0][k], expected[0][k]) for k in expected[0])  # loads, bitwise equal


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])  # fsdp: DCP's thread writes the shards, ours the rank's files
def test_an_async_save_that_fails_mid_run_stops_every_rank_at_the_next_step(tmp_path, strategy):
    args = [*ARGS, "--steps", "8", "--checkpoint-every", "4", "--async-save", "--log-every", "100",
            "--strategy", strategy]  # fmt: skip
    proc = torchrun(2, *args, "--out", str(tmp_path), extra_env={"DDP_FAULT": "enospc:rank=1:save=1:linger=5"})
    assert proc.returncode != 0
    for r in (0, 1):
        assert f"[rank {r}/2] error: checkpoint of step 4 failed, the previous ones are intact: rank 1: " in proc.output
    assert "ENOSPC" in proc.output and not (tmp_path / "checkpoints" / "step-00000004").exists()
    assert not (tmp_path / "mlp.params").exists()


# Per checkpoint, rank 0 writes its rank file, train.pt, its share of the model, then the
# manifest; rank 1 writes its rank file and its share of the optimizer state (with 2 ranks and
# SGD momentum the shares are the whole model and the whole momentum: tensors of the same sizes).
# The Nth write of a rank in a process is killed: points inside checkpoint 8, the manifest (the
# commit point), then on relaunch a data file (rank 0's are written as rank 1's are).
def test_kill_during_a_save_keeps_the_previous_checkpoint_and_cleans_up(tmp_path):
    args = [*ARGS, "--steps", "8", "--checkpoint-every", "4", "--snapshot-every", "0", "--out", str(tmp_path)]
    before = None
    for rank, write in ((0, 8), (1, 2)):  # rank 0's manifest; after a relaunch at step 5, rank 1's optimizer share
        start = time.monotonic()
        proc = torchrun(2, *args, extra_env={"DDP_FAULT": f"kill-in-save:rank={rank}:save={write}"})
        assert proc.returncode != 0 and time.monotonic() - start < 60  # a SIGKILLed rank fails the job fast,
        assert f"rank      : {rank} (local_rank: {rank})" in proc.output and "exitcode  : -9" in proc.output  # named
        folders = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
        assert folders == [".tmp-step-00000008", "step-00000004"]
        before = before or sha256_tree(tmp_path / "checkpoints" / "step-00000004")
        assert sha256_tree(tmp_path / "checkpoints" / "step-00000004") == before
    assert "step-00000004: continuing at step 5" in proc.output  # the second kill came after a resume
    out = ok(torchrun(2, *args))
    assert f"removed leftover {tmp_path}/checkpoints/.tmp-step-00000008 of an interrupted save" in out
    assert "step-00000004: continuing at step 5" in out
    assert sha256_tree(tmp_path / "checkpoints" / "step-00000004") == before


def test_a_rank_that_raises_during_training_fails_the_job_fast_naming_it(tmp_path):
    # a SIGKILLed rank: test_kill_during_a_save_keeps_the_previous_checkpoint_and_cleans_up
    start = time.monotonic()
    proc = torchrun(2, *ARGS, "--steps", "50", "--timeout", "20", "--out", str(tmp_path),
                    extra_env={"DDP_FAULT": "raise:rank=1:step=5"})  # fmt: skip
    assert proc.returncode != 0 and time.monotonic() - start < 60
    assert "rank      : 1 (local_rank: 1)" in proc.output  # torchrun's report names the failing rank
    assert "injected fault on rank 1 at step 5" in proc.output


def stopped_processes() -> list[int]:
    """Pids of this user's stopped (SIGSTOP) ddp.train processes."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
            if state == "T" and b"ddp.train" in (stat.parent / "cmdline").read_bytes():
                found.append(int(stat.parent.name))
        except (OSError, IndexError):
            pass
    return found


def test_a_stalled_rank_is_named_by_the_others_within_the_timeout_with_a_flight_recorder_dump(tmp_path):
    # SIGSTOP: rank 1 is alive, its sockets open, and answers nothing (as a deadlock or a frozen host)
    start = time.monotonic()
    # saves in step: step 4's is committed when rank 1 stalls in step 5
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=0",
           "-m", "ddp.train", *ARGS, "--steps", "50", "--timeout", "3", "--checkpoint-every", "2",
           "--no-async-save", "--out", str(tmp_path)]  # fmt: skip
    job = subprocess.Popen(cmd, cwd=ROOT, env=env(DDP_FAULT="stop:rank=1:step=5"), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines = []
    try:
        for line in job.stdout:
            lines.append(line)
            if "did not arrive" in line:
                break
        named = time.monotonic() - start
        for pid in stopped_processes():  # torchrun would SIGKILL it 30 s on: spare the test the wait
            os.kill(pid, signal.SIGKILL)
        output = "".join(lines) + job.communicate(timeout=60)[0]
    finally:
        job.kill()
    assert job.returncode != 0 and named < 30, output  # --timeout 3, then a roll call of at most 2.5 s
    assert (
        "[rank 0/2] error: after step 5: rank(s) [1] did not arrive at a collective within --timeout 3 s" in (output)
        and "a relaunch (or --max-restarts) resumes from step 4" in output
    )
    dump = tmp_path / "flight-recorder" / "rank_0"
    assert f"this rank's flight recorder: {dump}" in output
    frtrace = run([sys.executable, "-m", "torch.distributed.flight_recorder.fr_trace", str(dump.parent), "-p", "rank_"])
    assert "Missing dump files from ranks {1}" in frtrace.output  # torch's own reader: rank 1 never answered
    entries = pickle.loads(dump.read_bytes())["entries"]  # our own file: trusted
    assert entries and all(e["profiling_name"].startswith("gloo:") for e in entries)  # every collective it made


def test_the_first_step_may_take_longer_than_timeout(tmp_path):
    # compiling, loading, resuming: the start-up timeout covers them; --timeout starts after the first step
    ok(torchrun(2, *ARGS, "--steps", "3", "--timeout", "2", "--out", str(tmp_path),
                extra_env={"DDP_FAULT": "sleep:rank=1:step=1:seconds=3.5"}))  # fmt: skip


def test_two_jobs_on_one_host_both_run(tmp_path):
    cmd = ["bash", "launch/train_ddp.sh", *ARGS, "--steps", "6"]
    extra = {"NPROC": "1", "MAX_RESTARTS": "0"}  # each job's store and rendezvous on its own port
    # job a as from a fresh shell, where the venv is not active: the script finds the project's .venv itself
    fresh = {"PATH": "/usr/bin:/bin"} if (ROOT / ".venv" / "bin" / "python").exists() else {"PYTHON": sys.executable}
    jobs = [
        subprocess.Popen(
            [*cmd, "--out", str(tmp_path / name)],
            cwd=ROOT,
            env=env(**extra, **shell),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, shell in (("a", fresh), ("b", {"PYTHON": sys.executable}))
    ]
    outputs = [job.communicate(timeout=120)[0] for job in jobs]
    for job, out in zip(jobs, outputs, strict=True):
        assert job.returncode == 0 and "verify: 1/1 ranks" in out, out[-3000:]


def test_a_fixed_port_that_is_taken_fails_fast_naming_it(tmp_path):
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        start = time.monotonic()
        proc = run(["bash", "launch/train_ddp.sh", "--out", str(tmp_path)],
                   extra_env={"MASTER_PORT": str(port), "PYTHON": sys.executable})  # fmt: skip
    assert proc.returncode == 2 and time.monotonic() - start < 20
    assert f"MASTER_PORT={port} is already in use" in proc.output


# ---- safetensors ----------------------------------------------------------------------


def test_safetensors_weights_round_trip_bitwise_without_pickle(tmp_path):
    out = ok(train_alone(*ARGS, "--steps", "3", "--format", "safetensors", "--out", str(tmp_path)))
    assert "outputs identical" in out
    path = tmp_path / "mlp.params"
    assert ddp.io.detect_format(path) == "safetensors"
    from safetensors.torch import load_file

    state = load_file(path)  # readable by any safetensors consumer, no pickle involved
    assert_equal = [torch.equal(state[k], v) for k, v in ddp.load(path).items()]
    assert all(assert_equal) and len(assert_equal) == 4


def test_a_safetensors_file_whose_header_length_begins_with_0x80_is_not_taken_for_a_pickle(tmp_path):
    # 0x80 is also the first byte of a legacy torch pickle: 1 safetensors file in 256 looked like one
    path = tmp_path / "w.safetensors"
    for pad in range(256):
        ddp.io.save_safetensors({"w": torch.arange(3.0)}, path, metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert ddp.io.detect_format(path) == "safetensors" and torch.equal(ddp.load(path)["w"], torch.arange(3.0))


STUCK_TASK = '''
import time
import torch
from torch.utils.data import Dataset, get_worker_info
import ddp
from ddp.model import MLP


class Stuck(Dataset):
    """A user's Dataset whose DataLoader workers never deliver a batch (a stuck read, a deadlocked worker)."""

    def __len__(self):
        return 256

    def __getitem__(self, i):
        if get_worker_info() is not None:
            time.sleep(3600)
        return torch.randn(20), i % 10


def make():
    return ddp.Task(model=lambda: MLP(), train_data=Stuck(), name="stuck")
'''


def test_a_dataloader_worker_that_never_delivers_fails_the_run_instead_of_hanging_it(tmp_path):
    task = tmp_path / "stuck_task.py"
    task.write_text(STUCK_TASK)
    start = time.monotonic()
    proc = train_alone("--task", f"{task}:make", "--workers", "1", "--timeout", "3", "--startup-timeout", "3",
                       "--steps", "2", "--out", str(tmp_path / "run"), timeout=90)  # fmt: skip
    assert proc.returncode != 0 and time.monotonic() - start < 60, proc.output[-3000:]
    assert (
        "rank 0: after step 0 its DataLoader workers delivered no batch (DataLoader timed out after 3.0 seconds"
        in proc.output
    ), proc.output[-3000:]


BUSY_TASK = '''
import os
import time
import torch
from torch.utils.data import Dataset, get_worker_info
import ddp
from ddp.model import MLP

PIDS = os.environ["PIDS_FILE"]


class Busy(Dataset):
    """A user's Dataset whose DataLoader worker, after its first 2 batches, is busy for an hour (a slow read)."""

    def __init__(self):
        self.served = 0

    def __len__(self):
        return 256

    def __getitem__(self, i):
        if get_worker_info() is not None:
            if self.served == 0:
                with open(PIDS, "a") as f:
                    f.write(f"{os.getpid()}\\n")
            self.served += 1
            if self.served > 16:
                time.sleep(3600)
        return torch.randn(20), i % 10


def make():
    return ddp.Task(model=lambda: MLP(), train_data=Busy(), name="busy")
'''


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs: a zombie (dead, not yet reaped by whoever adopted it) holds no socket."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_sigkilled_ranks_dataloader_workers_die_with_it_even_mid_read(tmp_path):
    """A worker alive after its rank holds that rank's sockets: the other ranks saw no reset, and a restart waited
    for torch's watchdog (5 s), or for as long as a busy worker's read lasted (here an hour)."""
    task, pids, log = tmp_path / "busy_task.py", tmp_path / "pids", tmp_path / "log"
    task.write_text(BUSY_TASK)
    cmd = [sys.executable, "-m", "ddp.train", "--task", f"{task}:make", "--workers", "2", "--batch-size", "8",
           "--steps", "20", "--out", str(tmp_path / "run")]  # fmt: skip
    with log.open("w") as out:  # a file, not a pipe: workers that outlive the rank must not hold up the wait
        code = subprocess.run(cmd, cwd=ROOT, env=env(DDP_FAULT="kill:rank=0:step=2", PIDS_FILE=str(pids)),
                              stdout=out, stderr=subprocess.STDOUT, timeout=60).returncode  # fmt: skip
    workers = [int(line) for line in pids.read_text().split()]
    try:
        assert code == -signal.SIGKILL and len(workers) == 2, log.read_text()[-3000:]
        deadline = time.monotonic() + 20
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, workers)), f"DataLoader workers {workers} outlived their SIGKILLed rank"
    finally:
        for pid in filter(_alive, workers):
            os.kill(pid, signal.SIGKILL)
