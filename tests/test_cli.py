"""The ddp command, configuration files, progress output, metrics and the example script."""

import json
import shutil
import sys

import numpy as np
import pytest
import torch

import ddp
from ddp import cli
from ddp.model import MLP

from .helpers import ddp_command, launch, ok, run, torchrun


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-rank run of two epochs, logging every 5 steps."""
    out = tmp_path_factory.mktemp("cli")
    log = ok(torchrun(2, "--samples", "1024", "--batch-size", "32", "--epochs", "2", "--log-every", "5",
                      "--out", str(out)))  # fmt: skip
    return out, log


@pytest.mark.parametrize("sub", [[], ["train"], ["verify"], ["inspect"], ["predict"], ["export"], ["sample"], ["plot"]])
def test_every_subcommand_has_help(sub, capsys):
    assert "usage: ddp" in help_of(sub, capsys)


def help_of(sub: list[str], capsys) -> str:
    """``ddp SUB --help``, in this process (the console script is run as a command below)."""
    try:
        code = cli.main([*sub, "--help"])
    except SystemExit as e:  # argparse's; torchrun's @record on the train entry turns an exit 0 into a return
        code = e.code
    assert code in (0, None)
    return capsys.readouterr().out


def test_train_help_shows_every_option_with_its_default_and_doc(capsys):
    out = help_of(["train"], capsys)
    assert "--keep-last KEEP_LAST" in out and "(default: 3)" in out
    assert "Samples per rank per micro-batch" in out and "--config FILE.toml" in out


def test_inspect_json_describes_a_checkpoint(trained):
    out_dir, _ = trained
    folder = out_dir / "checkpoints" / "step-00000028"
    info = json.loads(ok(ddp_command("inspect", str(folder), "--json")))
    assert info["kind"] == "checkpoint" and info["step"] == 28 and info["epoch"] == 2 and info["world_size"] == 2
    assert info["torch_version"] == str(torch.__version__) and info["format"] == "torch"
    assert info["integrity"].startswith("ok: 5 files match the manifest")
    tensors = {t["name"]: t for t in info["tensors"]}
    assert tensors["hidden.0.weight"] == {"name": "hidden.0.weight", "shape": [256, 20], "dtype": "float32",
                                          "bytes": 256 * 20 * 4}  # fmt: skip
    assert info["total_bytes"] == sum(t["bytes"] for t in info["tensors"])
    assert info["metadata"]["config"]["run"]["out"] == str(out_dir) and info["metadata"]["manifest"]["step"] == 28


def test_inspect_of_a_run_folder_reads_its_mlp_params(trained):
    info = json.loads(ok(ddp_command("inspect", str(trained[0]), "--json")))
    assert info["kind"] == "weights" and info["task"] == "mlp" and info["tensor_count"] == 4


def test_inspect_into_a_pipe_that_closes_early_exits_quietly(trained):
    # `| true` closes the pipe before ddp writes (what `| head` does to long output)
    proc = run(["bash", "-c", f"set -o pipefail; {sys.executable} -m ddp inspect {trained[0]}/mlp.params | true"])
    assert proc.returncode == 0 and "Traceback" not in proc.output


def test_inspect_reports_a_damaged_file_with_exit_1(trained, tmp_path):
    bad = tmp_path / "mlp.params"
    bad.write_bytes((trained[0] / "mlp.params").read_bytes()[:500])
    proc = ddp_command("inspect", str(bad))
    assert proc.returncode == 1 and f"FAILED: {bad}" in proc.output


def test_predict_equals_the_models_forward_on_cpu(trained, tmp_path):
    out_dir, _ = trained
    x = np.random.default_rng(0).standard_normal((7, 20)).astype(np.float32)
    np.savez(tmp_path / "in.npz", X=x)
    ok(ddp_command("predict", str(out_dir / "mlp.params"), "--input", str(tmp_path / "in.npz"), "--device", "cpu",
            "--output", str(tmp_path / "pred.npz")))  # fmt: skip
    model = ddp.load_model(MLP(), out_dir / "mlp.params").eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).double()
    got = np.load(tmp_path / "pred.npz")
    # equal up to the summation order of another thread count
    assert np.allclose(got["logits"], logits.numpy(), rtol=0, atol=1e-5)
    assert np.array_equal(got["pred"], logits.argmax(1).numpy())


def test_predict_random_prints_one_prediction_per_line(trained):
    out = ok(ddp_command("predict", str(trained[0] / "mlp.params"), "--random", "3", "--device", "auto"))
    assert [line.split("\t")[0] for line in out.strip().splitlines()] == ["0", "1", "2"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU case")
def test_predict_on_cuda_without_a_gpu_is_a_usage_error(trained):
    proc = ddp_command("predict", str(trained[0] / "mlp.params"), "--random", "1", "--device", "cuda")
    assert proc.returncode == 2 and "no CUDA GPU is visible; use --device cpu or auto" in proc.output


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_export_makes_a_bitwise_weights_only_copy(trained, tmp_path, fmt):
    out_dir, _ = trained
    dest = tmp_path / f"model.{fmt}"
    ok(ddp_command("export", str(out_dir / "checkpoints" / "step-00000028"), "--format", fmt, "--output", str(dest)))
    assert ddp.io.detect_format(dest) == fmt
    original = torch.load(out_dir / "mlp.params", weights_only=True)
    copy = ddp.load(dest)
    assert copy.keys() == original.keys() and all(torch.equal(copy[k], original[k]) for k in copy)
    assert "verify: 1/1 ranks" in ok(ddp_command("verify", str(dest)))


def test_verify_under_torchrun_checks_every_rank(trained):
    out = ok(launch(["--standalone", "--nproc-per-node=2", "-m", "ddp", "verify",
                     str(trained[0] / "checkpoints" / "step-00000028")]))  # fmt: skip
    assert "ok: 5 files match the manifest (size, xxh3_128)" in out
    assert "verify: 2/2 ranks reloaded" in out and "outputs identical" in out


def test_verify_of_a_missing_file_exits_1_naming_it(tmp_path):
    proc = ddp_command("verify", str(tmp_path / "none.params"))
    assert proc.returncode == 1 and f"{tmp_path}/none.params does not exist" in proc.output


def test_verify_under_torchrun_of_a_missing_file_fails_on_every_rank_naming_it(tmp_path):
    missing = tmp_path / "none.params"
    cmd = ["--standalone", "--nproc-per-node=2", "-m", "ddp", "verify", str(missing)]
    # rank 1 is slow to leave the group: the launcher kills it once rank 0 exits, and it must have spoken
    proc = launch(cmd, extra_env={"DDP_FAULT": "linger:rank=1:seconds=5"})
    assert proc.returncode != 0
    for r in (0, 1):
        assert f"[rank {r}/2] ddp verify: error: {missing} does not exist; check the path" in proc.output


def test_plot_writes_a_png_of_loss_throughput_grad_norm_and_memory(trained):
    pytest.importorskip("matplotlib")
    out_dir, _ = trained
    ok(ddp_command("plot", str(out_dir)))
    assert (out_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from ddp.metrics import read_metrics
    from ddp.plot import draw, runs_of

    records = read_metrics(out_dir)
    train = [r for r in records if r["kind"] == "train"]
    axes = draw(runs_of(records), "demo").axes
    assert [ax.get_title() for ax in axes] == ["loss", "throughput (samples/s)", "gradient norm (before clipping)",
                                               "peak memory (MiB)"]  # fmt: skip
    for ax, key in zip(axes, ("loss", "samples_per_s", "grad_norm", "mem_peak_mb"), strict=True):
        assert list(ax.lines[0].get_ydata()) == [r[key] for r in train]
    took = sum(r["eval_time"] for r in records if r["kind"] == "eval")
    assert f"evaluation, {took:.1f} s in all" in axes[0].get_legend_handles_labels()[1]  # what evaluating cost


def test_plot_without_matplotlib_says_how_to_install_it(trained):
    code = "import sys; sys.modules['matplotlib'] = None; from ddp.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = run([sys.executable, "-c", code, "plot", str(trained[0])])
    assert proc.returncode == 1 and "pip install -e '.[plot]'" in proc.output


def test_metrics_jsonl_has_training_and_evaluation_records(trained):
    records = [json.loads(line) for line in (trained[0] / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 28]
    assert set(train[0]) == {"kind", "run", "step", "epoch", "loss", "lr", "grad_norm", "samples_per_s", "time",
                             "step_time", "step_time_max", "slowest_rank", "data_time", "mem_peak_mb",
                             "tflops"}  # fmt: skip
    for r in train:
        assert r["grad_norm"] > 0 and 0 < r["step_time"] <= r["step_time_max"] and r["slowest_rank"] in (0, 1)
        assert 0 <= r["data_time"] <= 1 and r["mem_peak_mb"] > 50  # a process with torch loaded
    assert [r["epoch"] for r in evals] == [0, 1] and all(0 <= r["accuracy"] <= 1 for r in evals)
    assert all(r["samples"] == r["of"] == r["count"] and 0 < r["eval_time"] < 60 for r in evals)  # all: 102 < 65,536
    assert evals[-1]["loss"] < evals[0]["loss"] + 0.5  # it learns (loosely: two epochs)


def test_plain_log_lines_when_not_a_terminal_and_only_rank_0(trained):
    _, log = trained
    assert "[rank 0/2] step 5 epoch 0 loss" in log and "samples/s" in log
    assert "[rank 0/2] eval at step 28 (epoch 1): loss" in log
    # rank 1's only line: its own verify result, which every rank reports
    assert [line for line in log.splitlines() if "[rank 1/2]" in line] == [
        line for line in log.splitlines() if line.startswith("[rank 1/2] verify: 2/2 ranks reloaded")
    ]


def test_progress_bar_on_a_terminal(tmp_path):
    if not shutil.which("script"):
        pytest.skip("needs util-linux script for a pseudo-terminal")
    # 461 training samples, global batch 64: 7 steps per epoch, so 10 steps span two epochs
    cmd = f"{sys.executable} -m ddp train --samples 512 --steps 10 --out {tmp_path}"
    out = ok(run(["script", "-qec", cmd, "/dev/null"]))
    assert "epoch 0: 100%" in out and "7/7" in out and "epoch 1: 100%" in out and "3/3" in out
    assert "step/s" in out and "loss=" in out


def test_toml_config_with_command_line_overrides(tmp_path):
    (tmp_path / "run.toml").write_text("[data]\nsamples = 512\nbatch_size = 16\n[optim]\nlr = 0.2\n[run]\nsteps = 3\n")
    out = ok(ddp_command("train", "--config", str(tmp_path / "run.toml"), "--lr", "0.3", "--out", str(tmp_path)))
    printed = json.loads(out.split("config: ", 1)[1].splitlines()[0])
    assert printed["data"]["batch_size"] == 16 and printed["optim"]["lr"] == 0.3 and printed["run"]["steps"] == 3
    saved = torch.load(tmp_path / "checkpoints" / "step-00000003" / "train.pt", weights_only=True)["config"]
    assert saved == printed


def test_bad_toml_names_the_file_and_the_setting(tmp_path):
    (tmp_path / "run.toml").write_text("[optim]\nlearning_rate = 0.1\n")
    proc = ddp_command("train", "--config", str(tmp_path / "run.toml"))
    assert proc.returncode == 2 and "unknown setting(s) ['learning_rate'] in [optim]" in proc.output


def test_example_script_runs_under_torchrun(tmp_path):
    out = ok(launch(["--standalone", "--nproc-per-node=2", "examples/own_model.py", "--out", str(tmp_path)]))
    assert f"own model: 2 ranks agree on {tmp_path}/tiny.params (max |Δ| = 0)" in out
