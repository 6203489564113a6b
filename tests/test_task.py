"""Your model, your data: a task the trainer has never seen keeps every guarantee of the built-ins."""

import hashlib
import json
import random
import re
import sys

import pytest
import torch

import ddp
from ddp import cli, train
from ddp.tasks import charlm

from .helpers import ROOT, assert_tree_equal, ddp_command, launch, model_state, ok, run, torchrun, train_alone

USER = ["--task", "tests/user_task.py:make", "--precision", "fp64", "--log-every", "1", "--steps", "20"]


def final(run_dir) -> dict:
    model, state = model_state(run_dir)
    assert state["step"] == 20
    return {"model": model, "optimizer": state["optimizer"]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The user's task on 2 ranks, batch 16 per rank, never interrupted; its output too."""
    out = tmp_path_factory.mktemp("user-ref")
    log = ok(torchrun(2, *USER, "--batch-size", "16", "--out", str(out)))
    return out, log


def test_every_rank_reloads_the_users_model_and_prints_the_verify_line(reference):
    out, log = reference
    for r in (0, 1):
        assert f"[rank {r}/2] verify: 2/2 ranks reloaded {out}/user.params; outputs identical (max |Δ| = 0" in log
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert evals and {"loss", "accuracy"} <= set(evals[-1])  # the task's own metrics
    assert "scale" in torch.load(out / "user.params", weights_only=True)  # its buffer is saved


def test_users_task_on_2_ranks_equals_one_process_on_the_global_batch(reference, tmp_path):
    # every sample draws its noise from RNGs seeded by (seed, epoch, index): the same draws on any world size
    ok(train_alone(*USER, "--batch-size", "32", "--out", str(tmp_path)))
    (a, ta), (b, tb) = model_state(reference[0]), model_state(tmp_path)
    assert ta["step"] == tb["step"] == 20
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-10


def test_users_task_grad_accum_equals_the_larger_batch(reference, tmp_path):
    ok(train_alone(*USER, "--batch-size", "16", "--grad-accum", "2", "--out", str(tmp_path)))  # the global batch
    a, b = model_state(reference[0])[0], model_state(tmp_path)[0]
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-10


def test_users_task_killed_mid_run_restarts_and_ends_bitwise_equal(reference, tmp_path):
    # The reference loaded in the training process; this run loads in 2 worker processes and is
    # killed: what each sample draws depends neither on the restart nor on who loads it.
    args = [*USER, "--batch-size", "16", "--workers", "2", "--checkpoint-every", "4", "--out", str(tmp_path)]
    out = ok(torchrun(2, *args, restarts=1, extra_env={"DDP_FAULT": "kill:rank=1:step=10"}))
    assert "continuing at step" in out
    assert_tree_equal(final(tmp_path), final(reference[0]))


def test_task_options_from_a_toml_table_are_saved_a_change_of_lr_warns_and_of_them_is_another_run(tmp_path):
    (tmp_path / "run.toml").write_text(
        '[task]\nspec = "tests/user_task.py:make"\n[task.args]\nnoise = 0.2\nsamples = 256\n'
        "[run]\nsteps = 6\n[checkpoint]\ncheckpoint_every = 3\nasync_save = false\n"
    )
    base = ["--config", str(tmp_path / "run.toml"), "--out", str(tmp_path / "run")]
    train_alone(*base, extra_env={"DDP_FAULT": "raise:step=4"})
    saved = model_state(tmp_path / "run")[1]["config"]["task"]
    task_file = f"{ROOT}/tests/user_task.py:make"  # recorded where it is, not as typed
    digest = hashlib.sha256((ROOT / "tests" / "user_task.py").read_bytes()).hexdigest()[:16]  # and what it holds
    assert saved == {"spec": task_file, "args": {"noise": 0.2, "samples": 256}, "file_sha256": digest}
    other = train_alone(*base, "--task-arg", "noise=0.3")  # other task settings: another run, refused
    assert other.returncode != 0 and "would start a different run there (args {'noise': 0.2" in other.output
    # from another folder, the task named by its absolute path: the same run, continued
    elsewhere = ["--standalone", "--nproc-per-node=1", "-m", "ddp.train", *base, "--task", task_file]
    out = ok(launch([*elsewhere, "--lr", "0.2"], cwd=tmp_path))
    warning = next(line for line in out.splitlines() if "warning: settings changed since the checkpoint" in line)
    assert "the run will not match an uninterrupted one: " in warning and "lr 0.05 -> 0.2" in warning
    assert "verify: 1/1 ranks" in ok(ddp_command("verify", "run/user.params", cwd=tmp_path))


def test_a_task_file_is_known_by_its_content_edited_or_moved_from_any_folder(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    source = (ROOT / "tests" / "user_task.py").read_text()
    (tmp_path / "a" / "task.py").write_text(source)
    run_dir, weights = tmp_path / "run", tmp_path / "run" / "user.params"
    base = ["--checkpoint-every", "2", "--batch-size", "32", "--out", str(run_dir)]
    ok(train_alone("--task", "a/task.py:make", *base, "--steps", "4", cwd=tmp_path))  # relative to where it starts
    # edited in place: the run goes on, with the warning that names the digests
    (tmp_path / "a" / "task.py").write_text(source + "\n# edited\n")
    out = ok(train_alone("--task", "a/task.py:make", *base, "--steps", "6", cwd=tmp_path))
    assert re.search(r"settings changed since the checkpoint.*file_sha256 '[0-9a-f]{16}' -> '[0-9a-f]{16}'", out)
    digest = json.loads((run_dir / "run.json").read_text())["config"]["task"]["file_sha256"]  # the file as it is now
    # moved: the model card names the file it was trained with, and its digest
    (tmp_path / "a" / "task.py").rename(tmp_path / "b" / "task.py")
    proc = ddp_command("verify", weights)
    said = f"{weights} was trained with the task file {tmp_path}/a/task.py (sha256 {digest}), which is not there now"
    assert proc.returncode == 2 and said in proc.output
    assert "outputs identical" in ok(ddp_command("verify", weights, "--task", f"{tmp_path}/b/task.py:make"))
    predicted = ok(ddp_command("predict", weights, "--task", "task.py:make", "--random", "2", cwd=tmp_path / "b"))
    assert [line.split("\t")[0] for line in predicted.splitlines()] == ["0", "1"]  # relative to where it runs
    # the same content at another path continues the run, from another folder, and says where it moved
    out = ok(train_alone("--task", "task.py:make", *base, "--steps", "8", cwd=tmp_path / "b"))
    moved = f"moved since the checkpoint, its content the same: {tmp_path}/a/task.py:make -> {tmp_path}/b/task.py:make"
    warning = next(line for line in out.splitlines() if "settings changed" in line)
    assert moved in out and "continuing at step 7" in out and "steps 6 -> 8" in warning
    assert "task.py" not in warning and "file_sha256" not in warning
    # another file is another run, and verify says when a --task is not the file the weights were trained with
    (tmp_path / "c.py").write_text(source.replace("hidden: int = 16", "hidden: int = 8"))
    proc = train_alone("--task", "c.py:make", *base, "--steps", "10", cwd=tmp_path)
    assert proc.returncode == 2 and "would start a different run there (spec " in proc.output
    other = ddp_command("verify", weights, "--task", f"{tmp_path}/c.py:make")
    assert f"note: {tmp_path}/c.py is not the task file {weights} was trained with" in other.output


# ---- built-in tasks ---------------------------------------------------------------------


# Fixed text, not a file of this repository: a test whose loss depends on the README fails when the README changes
WORDS = ["The", "rank", "trains", "its", "shard", "of", "the", "data,", "then", "saves", "a", "checkpoint."]
PROSE = " ".join(random.Random(0).choices(WORDS, k=1200))


def test_charlm_keeps_its_tied_weights_one_tensor_through_save_load_and_resume(tmp_path, capsys):
    text = tmp_path / "text.txt"  # a few thousand characters: 10 steps an epoch, an evaluation each
    text.write_text(PROSE)
    args = ["--task", "charlm", "--task-arg", f"text={text}", "--task-arg", "block=32", "--task-arg", "embd=32",
            "--task-arg", "layers=1", "--optimizer", "adamw", "--lr", "0.01", "--batch-size", "16", "--steps", "24",
            "--log-every", "1", "--checkpoint-every", "8", "--async-save", "--snapshot-every", "0",
            "--out", str(tmp_path / "run")]  # fmt: skip
    # after step 16: its save waits for step 8's async one to commit first (never two in flight), so step 8's is
    # certainly there; step 16's may still be in flight at the crash (a loaded host left step 8's uncommitted at 12)
    crashed = torchrun(2, *args, extra_env={"DDP_FAULT": "raise:rank=1:step=17"})
    assert crashed.returncode != 0
    checkpoint = model_state(tmp_path / "run", step=8)[0]  # every rank's share, merged
    assert checkpoint["head.weight"].data_ptr() == checkpoint["tok.weight"].data_ptr()  # stored once, not twice
    saved = model_state(tmp_path / "run")[1]["step"]  # the newest committed: 8 or 16
    out = ok(torchrun(2, *args))
    assert f"continuing at step {saved + 1}" in out and "perplexity" in out
    resumed = model_state(tmp_path / "run", step=24)[0]
    assert resumed["head.weight"].data_ptr() == resumed["tok.weight"].data_ptr()  # after the resume as well
    state = torch.load(tmp_path / "run" / "charlm.params", weights_only=True)
    model = ddp.load_model(charlm.from_state_dict(state), tmp_path / "run" / "charlm.params")
    assert model.head.weight is model.tok.weight  # one parameter after loading, not a diverging copy
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.8 * losses[0]
    # safetensors refuses shared tensors: exported once, given back under both names, and it verifies
    # (exported from the checkpoint, whose config travels in the metadata: verify rebuilds the task)
    dest = tmp_path / "charlm.safetensors"
    last = tmp_path / "run" / "checkpoints" / "step-00000024"
    command(capsys, "export", str(last), "--format", "safetensors", "--output", str(dest))
    back = ddp.load(dest)
    assert back.keys() == state.keys() and back["head.weight"] is back["tok.weight"]
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert "outputs identical" in command(capsys, "verify", str(dest))
    info = json.loads(command(capsys, "inspect", str(dest), "--json"))
    assert {t["name"]: t.get("shares") for t in info["tensors"]}["head.weight"] == "tok.weight"
    sample = command(capsys, "sample", str(dest), "--prompt", "The ", "--chars", "40")
    assert sample.startswith("The ") and len(sample.rstrip("\n")) == 44


def command(capsys, *argv: str) -> str:
    """``ddp ARGV`` in this process (the CLI's own tests start it as a subprocess); its output."""
    assert cli.main(list(argv)) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_digits_trains_under_ddp_and_verifies(tmp_path):
    pytest.importorskip("sklearn")
    out = ok(train_alone("--task", "digits", "--epochs", "8", "--batch-size", "128", "--out", str(tmp_path)))
    assert "verify: 1/1 ranks reloaded" in out  # a world of one: DDP still wraps the model
    evals = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert evals[-1]["accuracy"] > 0.9  # real handwritten digits, 20 % held out


# ---- bad --task specs: usage errors before any process group ------------------------------


BAD_SPEC_IDS = ["missing-file", "missing-name", "import-error", "not-callable", "wrong-return", "no-len",
                "endless-stream", "bad-arg", "unknown-builtin", "charlm-without-text", "npz-without-data",
                "no-probe", "python-style-bool"]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--task", "nope.py:make"], "--task: nope.py does not exist"),
        (["--task", "tests/user_task.py:missing"], "tests/user_task.py has no 'missing'; it defines"),
        (["--task", "no_such_package.tasks:make"], "--task: cannot import module 'no_such_package.tasks'"),
        (["--task", "tests/user_task.py:not_a_task"], "is a int; expected a ddp.Task or a function returning one"),
        (["--task", "tests/user_task.py:returns_a_model"], "returned a Scorer, not a ddp.Task"),
        (["--task", "tests/user_task.py:unsized"], "train_data is a Unsized without __len__ and __getitem__"),
        (["--task", "tests/user_task.py:endless"], "--steps: task 'task' trains on a stream (Endless, an Iterable"),
        (
            ["--task", "tests/user_task.py:make", "--task-arg", "colour=red"],
            "takes no setting colour (given as --task-arg colour=...)",
        ),
        (["--task", "mlpp"], "--task 'mlpp': not a built-in task (mlp, cnn, npz, digits, charlm, tokens)"),
        (["--task", "charlm"], "task charlm needs a text file: --task-arg text=FILE"),
        (["--task", "npz"], "--task npz needs --data FILE.npz"),
        (["--task", "tests/user_task.py:no_probe"], "cannot derive a probe from batches of type dict"),
        (["--task", "tests/stream_task.py:hf", "--task-arg", "shuffle=False"], "takes shuffle as true or false (TOML)"),
    ],
    ids=BAD_SPEC_IDS,
)
def test_a_bad_task_spec_is_a_usage_error_naming_it(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(ROOT)
    assert train.main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "error:" in err
    assert not (tmp_path / "checkpoints").exists()


def test_a_task_file_that_fails_to_import_names_the_file_and_the_error(tmp_path, capsys):
    bad = tmp_path / "broken.py"
    bad.write_text("import torch\nraise ValueError('no GPU budget')\n")
    assert train.main(["--task", f"{bad}:make", "--out", str(tmp_path / "run")]) == 2
    assert f"--task: importing {bad} failed: ValueError: no GPU budget" in capsys.readouterr().err


# ---- the Python API -------------------------------------------------------------------------


def test_fit_runs_the_same_trainer_under_torchrun_and_alone(tmp_path):
    script = ROOT / "examples" / "fit.py"
    out = ok(launch(["--standalone", "--nproc-per-node=2", str(script), "--out", str(tmp_path / "two")]))
    assert "fit: 2 ranks verified" in out and (tmp_path / "two" / "rings.params").exists()
    out = ok(run([sys.executable, str(script), "--out", str(tmp_path / "one")]))
    assert "fit: 1 ranks verified" in out
    # a checkpoint of ddp.fit names no file to rebuild its model from: --model does
    folder = tmp_path / "one" / "checkpoints" / "step-00000060"
    proc = ddp_command("verify", folder)
    assert proc.returncode == 2 and "trained by ddp.fit on a Task object ('rings')" in proc.output
    out = ok(ddp_command("verify", folder, "--model", "examples/fit.py:rings_model"))
    assert "verify: 1/1 ranks reloaded" in out and "files match the manifest" in out
