"""The maths of data parallelism: N ranks with batch b equal one process with batch N*b, under DDP and FSDP."""

import json

import numpy as np
import pytest
import torch

from ddp import optim
from ddp.config import Config
from ddp.data import Permutation, ResumableSampler, synthetic
from ddp.model import MLP

from . import workers
from .helpers import max_diff, model_state, ok, spawn, torchrun, train_alone

# 900 training samples: not a multiple of 2*16, 3*16 or 2*2*16, so a tail is dropped each epoch.
DATA = ["--samples", "1000", "--precision", "fp64", "--log-every", "1", "--epochs", "2"]
# fp64 AdamW on a global batch of 48, with hidden and output sizes (7, 5) that 2 and 3 ranks do
# not divide (FSDP pads the last shard): 18 steps per epoch, a tail dropped. The gradient norm
# is clipped at every step (it stays above 0.37 here), after 4 steps of warmup.
CLIP = 0.3
MATHS = [*DATA, "--optimizer", "adamw", "--lr", "0.01", "--hidden", "7", "--out-features", "5",
         "--max-grad-norm", str(CLIP), "--warmup-steps", "4", "--weight-decay", "0.1"]  # fmt: skip
STEPS = 2 * (900 // 48)


# The runs compared with one process on the global batch of 48, each launched once, on first use.
RUNS = {
    "one": (1, ["--batch-size", "48"]),
    "ddp2": (2, ["--batch-size", "24"]),  # DDP on 1 rank would compare a run with itself
    "fsdp1": (1, ["--batch-size", "48", "--strategy", "fsdp", "--compile"]),  # FSDP compiled, as well
    "fsdp2": (2, ["--batch-size", "24", "--strategy", "fsdp"]),
    # on 3 ranks the shards are uneven; activation checkpointing and 2 micro-batches ride along: neither may
    # change the maths (a test each would launch 4 more jobs)
    "fsdp3": (3, ["--batch-size", "8", "--strategy", "fsdp", "--ac", "full", "--grad-accum", "2"]),
    "ddp2-ac-accum": (2, ["--batch-size", "12", "--ac", "full", "--grad-accum", "2"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The RUNS shared by the tests below: runs(name) -> its folder."""
    done = {}

    def launch(name: str):
        if name not in done:
            nproc, args = RUNS[name]
            out = tmp_path_factory.mktemp(name)
            args = [*MATHS, *args, "--out", str(out)]
            ok(train_alone(*args) if nproc == 1 else torchrun(nproc, *args))  # one process: no torchrun needed
            done[name] = out
        return done[name]

    return launch


def losses(run_dir) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]


def maths(optimizer_state: dict) -> dict:
    """An optimizer's state without the implementation its groups name (fused under DDP; FSDP's shards have no
    fused SGD, so they take foreach): the same maths either way."""
    groups = [{k: v for k, v in g.items() if k not in optim.KERNELS} for g in optimizer_state["param_groups"]]
    return {**optimizer_state, "param_groups": groups}


def assert_same_training(run_dir, reference_dir) -> None:
    """Weights, optimizer state (AdamW's moments, by parameter) and every step's loss, to 1e-10."""
    (model, train), (ref_model, ref_train) = model_state(run_dir), model_state(reference_dir)
    assert train["step"] == ref_train["step"] == STEPS
    assert max_diff(model, ref_model) < 1e-10
    assert max_diff(maths(train["optimizer"]), maths(ref_train["optimizer"])) < 1e-10
    a, b = losses(run_dir), losses(reference_dir)
    assert len(a) == len(b) == STEPS and max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-10


@pytest.mark.parametrize("name", [name for name in RUNS if name != "one"])
def test_n_ranks_equal_one_process_on_the_global_batch(runs, name):
    run, (nproc, args) = runs(name), RUNS[name]
    assert_same_training(run, runs("one"))
    norms = [r["grad_norm"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "train"]  # fmt: skip
    assert len(norms) == STEPS and min(norms) > CLIP  # clipped at every step compared
    if "fsdp" in args:  # every rank wrote its own shards, and no whole model file
        checkpoint = sorted((run / "checkpoints").glob("step-*"))[-1]
        written = sorted(p.name for p in (checkpoint / "sharded").glob("__*.distcp"))
        assert written == [f"__{r}_0.distcp" for r in range(nproc)] and not (checkpoint / "model.pt").exists()


def test_fsdp_exports_the_same_plain_state_dict_as_ddp(runs):
    fsdp, ddp = runs("fsdp2"), runs("ddp2")
    a = torch.load(fsdp / "mlp.params", weights_only=True)
    b = torch.load(ddp / "mlp.params", weights_only=True)
    assert list(a) == list(b) and all(type(v) is torch.Tensor and v.device.type == "cpu" for v in a.values())
    assert max_diff(a, b) < 1e-10
    MLP(20, (7,), 5).double().load_state_dict(a)  # a plain nn.Module loads it: nothing of FSDP is left


@pytest.mark.parametrize(("n", "ranks", "batch"), [(900, 3, 16), (901, 2, 7), (64, 2, 32), (100, 1, 33)])
def test_every_sample_at_most_once_per_epoch_and_only_the_tail_dropped(n, ranks, batch):
    data = synthetic(n, (2,), 3, seed=0)
    for epoch in (0, 1):
        shards = []
        for r in range(ranks):
            sampler = ResumableSampler(data, ranks, r, seed=5)
            sampler.set_epoch(epoch)
            idx = list(sampler)
            shards.append(idx[: len(idx) // batch * batch])  # the loader drops a last partial batch
        used = [i for s in shards for i in s]
        assert len(used) == len(set(used)) == (n // (ranks * batch)) * ranks * batch
        order = Permutation(n, 5 + 1_000_003 * epoch)(np.arange(n, dtype=np.uint64)).tolist()
        assert set(used) == set(order[: len(used)])  # the global stream is the same for any world size


def test_grad_accum_allreduces_once_per_optimizer_step(tmp_path):
    cfg = Config.from_dict({"run": {"steps": 6}, "data": {"samples": 512, "batch_size": 8}}).to_dict()
    cfg["checkpoint"]["resume"] = "never"
    cfg["run"]["out"] = str(tmp_path)
    one, steps = spawn(workers.count_allreduces, 2, cfg)[0]
    cfg["optim"]["grad_accum"] = 4
    four, steps4 = spawn(workers.count_allreduces, 2, cfg)[0]
    assert steps == steps4 == 6
    assert four == one == 6  # the MLP's gradients fit one bucket: one all-reduce per step, K=4 or not


def test_fsdp_grad_accum_reduce_scatters_once_per_optimizer_step(tmp_path):
    cfg = Config.from_dict({"run": {"steps": 3}, "data": {"samples": 512, "batch_size": 8}}).to_dict()
    cfg.update(optim={**cfg["optim"], "grad_accum": 4}, dist={**cfg["dist"], "strategy": "fsdp"})
    cfg["checkpoint"]["resume"], cfg["run"]["out"] = "never", str(tmp_path)
    backward, reduce, steps = spawn(workers.count_fsdp_reductions, 2, cfg)[0]
    units = 2  # the MLP's two Linear layers; its root holds no parameters of its own
    assert steps == 3 and backward == 3 * 4 * units  # every micro-batch runs each unit's backward
    assert reduce == 3 * units  # and each unit reduce-scatters once per optimizer step


def test_batchnorm_model_trains_saves_reloads_and_verifies(tmp_path):
    out = ok(torchrun(2, "--samples", "512", "--batch-size", "16", "--steps", "10", "--batchnorm",
                      "--out", str(tmp_path)))  # fmt: skip
    assert "verify: 2/2 ranks reloaded" in out and "outputs identical" in out
    state = torch.load(tmp_path / "mlp.params", weights_only=True)
    assert state["hidden.1.num_batches_tracked"].item() == 10 and "hidden.1.running_var" in state


def test_sync_bn_without_gpus_is_a_clear_usage_error(tmp_path):
    proc = train_alone("--batchnorm", "--sync-bn", "--out", str(tmp_path), "--backend", "gloo")
    assert proc.returncode != 0 and "--sync-bn needs CUDA GPUs and NCCL" in proc.output


def test_deterministic_runs_are_bitwise_identical(tmp_path):
    args = ["--samples", "512", "--batch-size", "16", "--steps", "12", "--deterministic", "--dropout", "0.2"]
    ok(train_alone(*args, "--out", str(tmp_path / "a")))  # dropout's draws: a second rank draws the same way
    ok(train_alone(*args, "--out", str(tmp_path / "b")))
    a, b = model_state(tmp_path / "a")[0], model_state(tmp_path / "b")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_autocast_trains_on_cpu_and_verify_states_its_tolerance(tmp_path):
    out = ok(train_alone("--samples", "512", "--batch-size", "16", "--steps", "6", "--precision", "bf16",
                         "--out", str(tmp_path)))  # fmt: skip
    assert "atol = 0.01 for bf16)" in out
    _, train = model_state(tmp_path)
    assert "scaler" in train and train["config"]["optim"]["precision"] == "bf16"


def test_fp16_uses_a_grad_scaler_whose_state_resumes_exactly(tmp_path):
    args = ["--samples", "512", "--batch-size", "16", "--steps", "10", "--precision", "fp16", "--log-every", "1"]
    out = ok(train_alone(*args, "--out", str(tmp_path / "ref")))  # the scaler's state is per run: 1 rank shows it
    assert "atol = 0.001 for fp16)" in out
    ref_model, ref_train = model_state(tmp_path / "ref")
    assert ref_train["scaler"]["scale"] > 0 and ref_train["scaler"]["growth_interval"] == 2000
    crash = [*args, "--checkpoint-every", "4", "--no-async-save", "--out", str(tmp_path / "run")]
    train_alone(*crash, extra_env={"DDP_FAULT": "raise:rank=0:step=6"})
    ok(train_alone(*crash))
    model, train = model_state(tmp_path / "run")
    assert train["scaler"] == ref_train["scaler"] and all(torch.equal(model[k], ref_model[k]) for k in model)


def test_sync_bn_converts_every_batchnorm(tmp_path):
    from torch import nn

    from ddp.parallel import local_model
    from ddp.tasks import resolve

    cfg = Config.from_dict({"model": {"batchnorm": True, "hidden": [8, 8]}, "run": {"sync_bn": True}})
    kinds = [type(m) for m in local_model(resolve(cfg), cfg, torch.device("cpu")).modules()]
    assert kinds.count(nn.SyncBatchNorm) == 2 and nn.BatchNorm1d not in kinds


@pytest.mark.slow
def test_compile_saves_clean_keys_and_verifies(tmp_path):
    out = ok(train_alone("--samples", "256", "--batch-size", "16", "--steps", "3", "--compile",
                      "--out", str(tmp_path)), )  # fmt: skip
    assert "verify: 1/1 ranks" in out and "outputs identical" in out
    for path in (tmp_path / "mlp.params", tmp_path / "checkpoints" / "step-00000003" / "model.pt"):
        assert not any(k.startswith(("_orig_mod.", "module.")) for k in torch.load(path, weights_only=True))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs CUDA")
def test_fp16_with_grad_scaler_on_gpu_saves_its_state(tmp_path):
    out = ok(torchrun(1, "--steps", "6", "--precision", "fp16", "--out", str(tmp_path)))
    assert "verify: 1/1" in out and "for fp16)" in out
    assert model_state(tmp_path)[1]["scaler"]["scale"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs CUDA")
def test_sync_bn_on_gpu_verifies(tmp_path):
    n = min(torch.cuda.device_count(), 2)
    out = ok(torchrun(n, "--steps", "6", "--batchnorm", "--sync-bn", "--out", str(tmp_path)))
    assert f"verify: {n}/{n}" in out


def test_cnn_in_channels_last_on_2_ranks_equals_one_process(tmp_path):
    cnn = [*DATA, "--task", "cnn", "--width", "4", "--memory-format", "channels_last", "--epochs", "1"]  # fp64 convs
    ok(torchrun(2, *cnn, "--batch-size", "16", "--out", str(tmp_path / "ddp")))
    ok(train_alone(*cnn, "--batch-size", "32", "--out", str(tmp_path / "one")))
    (ddp_model, _), (one_model, _) = model_state(tmp_path / "ddp"), model_state(tmp_path / "one")
    conv2 = ddp_model["features.3.weight"]  # the first conv has 1 input channel: both layouts at once
    assert conv2.is_contiguous(memory_format=torch.channels_last) and not conv2.is_contiguous()
    assert max_diff(ddp_model, one_model) < 1e-10
