"""The training loop's features: the learning rate, clipping, non-finite steps, weight decay, --init-from, AC."""

from __future__ import annotations

import itertools
import json
import math
import re

import pytest
import safetensors.torch
import torch

from ddp import dcp, fsdp, group, optim, weights
from ddp.checkpoint import Checkpointer
from ddp.config import CheckpointConfig, DistConfig, OptimConfig
from ddp.errors import CheckpointError, ConfigError, VerifyError
from ddp.model import MLP
from ddp.optim import lr_at, param_groups
from ddp.tasks.charlm import CharLM
from ddp.train import main
from ddp.verify import verify_identical_outputs

from .helpers import assert_tree_equal, model_state, ok, torchrun, train_alone

SMALL = ["--samples", "512", "--batch-size", "32", "--log-every", "1"]


def records(run_dir, kind: str = "train") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.fixture
def world_of_one():
    world = group.init(DistConfig(backend="gloo"))
    yield world
    group.shutdown()


# ---- the learning rate: a function of the step -----------------------------------------


def test_the_rate_warms_up_linearly_from_zero_then_decays_to_min_lr():
    cfg = OptimConfig(lr=0.1, min_lr=0.01, warmup_steps=4)
    rates = [lr_at(s, 20, cfg) for s in range(20)]
    assert rates[:4] == [0.1 * (i + 1) / 5 for i in range(4)] and rates[4] == 0.1
    assert all(a >= b for a, b in itertools.pairwise(rates[4:]))  # cosine: never rises after warmup
    assert rates[-1] == pytest.approx(0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * 15 / 16)))
    assert lr_at(20, 20, cfg) == pytest.approx(0.01)  # the end of the curve: --min-lr
    assert [lr_at(s, 20, OptimConfig(lr=0.1, schedule="constant")) for s in (0, 19)] == [0.1, 0.1]


def test_a_resume_with_a_new_length_or_rate_continues_on_the_new_curve(tmp_path):
    args = [*SMALL, "--checkpoint-every", "10", "--warmup-steps", "3", "--out", str(tmp_path)]
    ok(train_alone(*args, "--steps", "20"))
    out = ok(train_alone(*args, "--steps", "40", "--lr", "0.02"))
    assert "settings changed since the checkpoint" in out and "steps 20 -> 40" in out and "lr 0.05 -> 0.02" in out
    rates = {r["step"]: r["lr"] for r in records(tmp_path)}
    cfg = OptimConfig(lr=0.02, warmup_steps=3)
    assert [rates[s] for s in range(21, 41)] == [lr_at(s - 1, 40, cfg) for s in range(21, 41)]
    first = OptimConfig(warmup_steps=3)
    assert [rates[s] for s in range(1, 21)] == [lr_at(s - 1, 20, first) for s in range(1, 21)]


# ---- weight decay where it belongs -----------------------------------------------------


def test_matrices_decay_and_biases_norms_and_embeddings_do_not():
    lm = CharLM(torch.arange(10), block=8, layers=1, heads=2, embd=8)
    decay, keep = param_groups(lm, 0.1)
    names = {id(p): n for n, p in lm.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {"blocks.0.qkv.weight", "blocks.0.proj.weight",
                                                        "blocks.0.mlp.0.weight", "blocks.0.mlp.2.weight"}  # fmt: skip
    kept = {names[id(p)] for p in keep["params"]}
    assert "tok.weight" in kept and "pos.weight" in kept and "norm.weight" in kept and "blocks.0.qkv.bias" in kept
    assert decay["weight_decay"] == 0.1 and keep["weight_decay"] == 0.0
    assert len(decay["params"]) + len(keep["params"]) == len(list(lm.parameters()))  # the tied one once
    assert len(param_groups(lm, 0.1, decay_all=True)) == 1 and len(param_groups(lm, 0.0)) == 1


def test_the_optimizer_is_fused_where_torch_can_and_a_load_keeps_this_runs_choice():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    sgd = optim.build(model, OptimConfig())
    assert [g["fused"] for g in sgd.param_groups] == [True]
    assert optim.kernel(torch.nn.Embedding(5, 3, sparse=True), "sgd") == {}  # sparse gradients: torch's default
    saved = torch.optim.SGD(model.parameters(), lr=0.1).state_dict()  # torch's default: its groups say fused None
    with optim.kernels_kept(sgd):
        sgd.load_state_dict(saved)
    assert sgd.param_groups[0]["fused"] is True and sgd.param_groups[0]["lr"] == 0.1  # the rest is the saved state


@pytest.mark.parametrize("max_norm", [None, 0.5])
def test_the_gradient_norm_is_torchs_to_the_bit_and_clips_as_torch_does(max_norm):
    ours, theirs = MLP(6, [16, 8], 3), MLP(6, [16, 8], 3)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(5, 6)
    for model in (ours, theirs):
        model(x).square().sum().backward()
        model.hidden[0].bias.grad = None  # a parameter without a gradient is left out, as torch leaves it
    norm = optim.GradNorm(torch.optim.SGD(ours.parameters(), lr=0.1))(max_norm)
    expected = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm if max_norm is not None else math.inf)
    assert torch.equal(norm, expected)
    pairs = zip(ours.parameters(), theirs.parameters(), strict=True)
    assert all(a.grad is b.grad is None or torch.equal(a.grad, b.grad) for a, b in pairs)


# ---- non-finite values never reach a checkpoint ----------------------------------------


def test_a_nan_loss_stops_every_rank_naming_the_step_and_rank_and_keeps_the_last_good_checkpoint(tmp_path):
    args = [*SMALL, "--steps", "30", "--checkpoint-every", "5", "--out", str(tmp_path)]
    proc = torchrun(2, *args, extra_env={"DDP_FAULT": "nan:rank=1:step=12:linger=1"})
    assert proc.returncode != 0
    for r in (0, 1):
        assert f"[rank {r}/2] error: step 12: the gradient norm is nan; the loss was not finite on rank 1 (nan)" in (
            proc.output
        )
    assert "the newest checkpoint, step 10, is good" in proc.output
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000005", "step-00000010"]
    model, _ = model_state(tmp_path)
    assert all(torch.isfinite(t).all() for t in model.values())


def test_skip_nonfinite_skips_the_bad_step_with_a_warning_and_counts_it(tmp_path):
    args = [*SMALL, "--steps", "16", "--skip-nonfinite", "1", "--precision", "bf16", "--out", str(tmp_path)]
    out = ok(torchrun(2, *args, extra_env={"DDP_FAULT": "nan:rank=0:step=6"}))
    assert "warning: step 6 skipped: the gradient norm is nan (0 more may be skipped)" in out
    _, train = model_state(tmp_path)
    assert train["step"] == 16 and train["skipped"] == 1
    assert "verify: 2/2 ranks reloaded" in out


def test_the_checkpointer_refuses_non_finite_weights(tmp_path, world_of_one):
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = Checkpointer(tmp_path, CheckpointConfig(), model, optimizer, say=lambda _: None)
    ckpt.save(1)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(CheckpointError, match=r"step 2 refused: the weights hold NaN or inf values on rank\(s\) \[0\]"):
        ckpt.save(2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]


def test_verify_names_the_ranks_whose_outputs_are_not_finite(world_of_one):
    model = torch.nn.Linear(4, 2)
    with torch.no_grad():
        model.bias[1] = float("nan")
    with pytest.raises(VerifyError, match=r"rank 0 gives 4 non-finite output\(s\) \(NaN or inf\)"):
        verify_identical_outputs(model, torch.randn(4, 4))


# ---- starting from existing weights ----------------------------------------------------


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A trained MLP's weights, and the same tensors in every format --init-from reads."""
    d = tmp_path_factory.mktemp("source")
    assert main([*SMALL, "--steps", "6", "--hidden", "16", "--out", str(d / "run")]) == 0
    state = torch.load(d / "run" / "mlp.params", weights_only=True)
    torch.save({"model": state, "epoch": 3}, d / "nested.pt")
    torch.save({f"module.{k}": v for k, v in state.items()}, d / "prefixed.pt")
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 1}, d / "lightning.ckpt")
    safetensors.torch.save_file(state, d / "model.safetensors")
    (d / "sharded").mkdir()
    names = sorted(state)
    shard_of = {k: f"model-0000{i % 2 + 1}-of-00002.safetensors" for i, k in enumerate(names)}
    for shard in set(shard_of.values()):
        safetensors.torch.save_file({k: state[k] for k in names if shard_of[k] == shard}, d / "sharded" / shard)
    (d / "sharded" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shard_of}))
    dcp.save({"model": state, "step": 6}, d / "dcp")
    return d, state


INIT_SOURCES = ["run/mlp.params", "run", "run/checkpoints/step-00000006", "nested.pt", "prefixed.pt",
                "lightning.ckpt", "model.safetensors", "sharded/model.safetensors.index.json", "dcp"]  # fmt: skip


@pytest.mark.parametrize("name", INIT_SOURCES)
def test_init_from_any_format_with_lr_0_reproduces_the_source_weights_bitwise(source, tmp_path, capsys, name):
    d, state = source
    out = tmp_path / "ft"
    assert main([*SMALL, "--steps", "2", "--hidden", "16", "--lr", "0", "--init-from", str(d / name),
                 "--out", str(out)]) == 0  # fmt: skip
    assert f"initialised from {d / name}" in capsys.readouterr().out
    assert_tree_equal(torch.load(out / "mlp.params", weights_only=True), state)
    _, train = model_state(out)
    assert train["step"] == 2 and train["optimizer"]["state"]  # a fresh optimizer, trained from step 0


def test_init_from_a_file_that_does_not_fit_is_a_usage_error_naming_the_tensors(source, tmp_path, capsys):
    d, _ = source
    assert main([*SMALL, "--hidden", "32", "--init-from", str(d / "model.safetensors"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert (
        "--init-from" in err and "does not fit the model: of another shape: hidden.0.weight (16, 20) in the file" in err
    )


def test_init_skip_gives_a_new_head_and_keeps_the_rest(source, tmp_path, capsys):
    d, state = source
    args = [*SMALL, "--steps", "1", "--hidden", "16", "--lr", "0", "--out-features", "5",
            "--init-from", str(d / "run" / "mlp.params"), "--init-skip", r"^output\."]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "ft")]) == 0
    assert "2 left fresh by --init-skip: output.weight, output.bias" in capsys.readouterr().out
    tuned = torch.load(tmp_path / "ft" / "mlp.params", weights_only=True)
    assert_tree_equal({k: v for k, v in tuned.items() if k.startswith("hidden")},
                      {k: v for k, v in state.items() if k.startswith("hidden")})  # fmt: skip
    fresh = MLP(20, (16,), 5).state_dict()
    assert tuned["output.weight"].shape == (5, 16) and fresh["output.weight"].shape == (5, 16)


def test_a_checkpoint_in_out_takes_precedence_over_init_from(source, tmp_path, capsys):
    d, _ = source
    args = [*SMALL, "--hidden", "16", "--init-from", str(d / "dcp"), "--out", str(tmp_path)]
    assert main([*args, "--steps", "3"]) == 0
    assert main([*args, "--steps", "5"]) == 0
    out = capsys.readouterr().out
    assert f"--init-from {d / 'dcp'} not used: this run's checkpoint takes precedence" in out
    assert "continuing at step 4" in out


@pytest.fixture(scope="module")
def fsdp_source(tmp_path_factory):
    """A checkpoint of an FSDP run on 2 ranks: a DCP folder with each rank's shards in its own file."""
    d = tmp_path_factory.mktemp("fsdp_source")
    ok(torchrun(2, *SMALL, "--steps", "2", "--hidden", "16", "--strategy", "fsdp", "--out", str(d)))
    return d / "checkpoints" / "step-00000002", torch.load(d / "mlp.params", weights_only=True)


def test_init_from_under_fsdp_gives_each_rank_its_shards_of_a_whole_file(source, tmp_path):
    d, state = source
    ok(torchrun(2, *SMALL, "--steps", "2", "--hidden", "16", "--lr", "0", "--strategy", "fsdp",
                "--init-from", str(d / "model.safetensors"), "--out", str(tmp_path)))  # fmt: skip
    assert_tree_equal(torch.load(tmp_path / "mlp.params", weights_only=True), state)


def test_init_from_a_sharded_checkpoint_under_fsdp_reads_only_each_ranks_shards(fsdp_source, tmp_path):
    folder, state = fsdp_source
    out = ok(torchrun(2, *SMALL, "--steps", "2", "--hidden", "16", "--lr", "0", "--strategy", "fsdp",
                      "--init-from", str(folder), "--out", str(tmp_path)))  # fmt: skip
    assert_tree_equal(torch.load(tmp_path / "mlp.params", weights_only=True), state)
    found = re.search(r"each rank read only its shards' chunks: ([\d.]+) KB, ([\d.]+) KB of ([\d.]+) KB", out)
    assert found, out
    rank0, rank1, whole = map(float, found.groups())
    assert rank0 < 0.6 * whole and rank1 < 0.6 * whole and rank0 + rank1 == pytest.approx(whole, rel=0.02)


def test_init_from_dcp_into_a_sharded_model_checks_the_fit_from_the_metadata(source, world_of_one):
    d, state = source
    wide = MLP(20, (32,), 2)
    fsdp.shard(wide, 1, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"does not fit the model: of another shape: hidden.0.weight \(16, 20\)"):
        weights.init_sharded(wide, d / "dcp")
    head = MLP(20, (16,), 5)
    fsdp.shard(head, 1, torch.device("cpu"))
    note = weights.init_sharded(head, d / "dcp", r"^output\.")
    assert "found at 'model'" in note and "2 left fresh by --init-skip: output.weight, output.bias" in note
    loaded = fsdp.full_model_state(head)
    assert_tree_equal({k: v for k, v in loaded.items() if k.startswith("hidden")},
                      {k: v for k, v in state.items() if k.startswith("hidden")})  # fmt: skip


def test_under_fp16_the_norm_is_measured_and_clipped_on_the_unscaled_gradients(tmp_path):
    args = [*SMALL, "--steps", "8", "--precision", "fp16", "--max-grad-norm", "0.5"]
    ok(train_alone(*args, "--out", str(tmp_path / "fp16")))
    ok(train_alone(*args[:-4], "--precision", "fp32", *args[-2:], "--out", str(tmp_path / "fp32")))
    half, full = (records(tmp_path / p) for p in ("fp16", "fp32"))
    # the GradScaler multiplies the loss by 65536: a norm of the scaled gradients would be ~1e4 times larger
    for a, b in zip(half, full, strict=True):
        assert math.isfinite(a["grad_norm"]) and abs(a["grad_norm"] - b["grad_norm"]) < 0.05 * b["grad_norm"]
