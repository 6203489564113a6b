"""The benchmark runs end to end (its figures are for reading, never asserted here)."""

import json
import sys

import pytest
import torch

from .helpers import model_state, ok, run, train_alone


def test_bench_quick_runs_and_writes_results(tmp_path):
    out = ok(run([sys.executable, "bench/bench.py", "--quick", "--output", str(tmp_path / "r.json")], timeout=240))
    results = json.loads((tmp_path / "r.json").read_text())
    assert {row["case"] for row in results["training"]} == {"mlp (textbook, 20-256-10)"}
    assert all(row["c"] > 0 and row["b"] > 0 for row in results["training"])
    assert all(
        row["c/d"]["q1"] <= row["c/d"]["median"] <= row["c/d"]["q3"] for row in results["training"] if "d" in row
    )
    assert {(row["workers"], row["pin_memory"]) for row in results["loader"]} >= {(0, False), (1, False)}
    assert "lost_per_checkpoint" in results["checkpoints"] and "| case |" in out
    restores = results["checkpoints"]["snapshots"]["models"]  # every model of the bench, from memory and from disk
    assert {"mlp (textbook, 20-256-10)", "tokens (charlm's GPT)"} <= set(restores) and "restore of tokens" in out
    assert all(row["memory_s"] > 0 and row["disk_s"] > 0 for row in restores.values())
    fsdp = next(row for row in results["strategies"] if row["strategy"] == "fsdp" and row["ranks"] == 2)
    assert fsdp["params / ddp"] == fsdp["grads / ddp"] == 0.5  # 2 ranks, sizes they divide: exactly half
    assert 0.5 <= fsdp["optimizer / ddp"] < 0.51  # AdamW's step counts are not sharded
    assert "| strategy | ranks |" in out
    assert results["activation_checkpointing"]["step_s_full"] > 0 and "| --ac |" in out
    assert [row["samples"] for row in results["scale"]] == [10**6, 10**10] and "| samples |" in out
    assert results["tokens"]["ours_samples_per_s"] > 0 and "nanoGPT's get_batch" in out
    assert results["tokens"]["snapshot_blocked_share"] > 0 and "a snapshot every step / none" in out


def test_the_peers_task_trains_as_a_users_task_does_its_cnn_in_channels_last(tmp_path):
    """bench/peers.py's task file (make bench launches each peer under torchrun: minutes, not run here)."""
    task = ["--task", "bench/peer_task.py:cnn", "--steps", "2", "--batch-size", "8"]
    out = ok(train_alone(*task, "--out", str(tmp_path)))
    assert "verify: 1/1 ranks reloaded" in out and "note: --memory-format" not in out
    conv = model_state(tmp_path)[0]["2.weight"]  # a user's CNN, under --memory-format auto
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


def test_the_snapshots_bench_launches_as_a_user_does_and_reads_autos_interval(tmp_path):
    """``peers.py --snapshots``: this project under torchrun with snapshots off, auto and every step, alternating;
    auto widens the textbook MLP's interval (a snapshot there costs far over 2 % of a 1 ms step) and says so. One
    rank: the harness is what is tested here."""
    cmd = [
        sys.executable,
        "bench/peers.py",
        "--snapshots",
        "--quick",
        "--nproc",
        "1",
        "--output",
        str(tmp_path / "s.json"),
    ]
    out = ok(run(cmd, timeout=180))
    (row,) = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert all(row[name]["median"] > 0 for name in ("none", "auto", "every step"))
    assert row["every step / none"]["median"] > 0 and row["auto / none"]["median"] > 0
    assert row["auto: one every N steps"][-1] > 1 and "| mlp |" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU case")
def test_gpu_check_without_cuda_says_so_and_exits_0(tmp_path):
    proc = run([sys.executable, "bench/gpu_check.py", "--report", str(tmp_path / "r.json")], timeout=60)
    assert proc.returncode == 0 and "no CUDA GPU is visible" in proc.output and not (tmp_path / "r.json").exists()
