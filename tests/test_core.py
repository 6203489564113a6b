"""The core path with real torchrun processes on gloo: train, save, reload, verify."""

import json

import numpy as np
import pytest
import torch

import ddp
from ddp.config import Config
from ddp.model import MLP

from . import workers
from .helpers import ok, spawn, torchrun, train_alone

SMALL = ["--samples", "1024", "--batch-size", "32"]


@pytest.mark.parametrize("nproc", [1, 3])  # 2 ranks: nearly every other test
def test_train_save_reload_verify_passes(tmp_path, nproc):
    out = ok(torchrun(nproc, *SMALL, "--epochs", "2", "--log-all-ranks", "--out", str(tmp_path)))
    assert all(f"[rank {r}/{nproc}] step 10 epoch" in out for r in range(nproc))  # --log-all-ranks
    path = tmp_path / "mlp.params"
    line = f"verify: {nproc}/{nproc} ranks reloaded {path}; outputs identical (max |Δ| = 0, atol = 0 for fp32)"
    assert line in out
    state = torch.load(tmp_path / "mlp.params", weights_only=True)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state)
    MLP().load_state_dict(state)  # the textbook's MLP takes the file as it is


def test_each_rank_draws_a_disjoint_shard(tmp_path):
    cfg = Config.from_dict({"data": {"samples": 1000, "batch_size": 16}, "run": {"out": str(tmp_path)}}).to_dict()
    shards = spawn(workers.indices_per_rank, 3, cfg, 1)
    seen = [set(shards[r]) for r in range(3)]
    assert all(len(s) == len(shards[r]) for r, s in enumerate(seen))  # no repeats within a rank
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert sum(map(len, seen)) == (900 // (3 * 16)) * 3 * 16  # drop_last: whole global batches


def test_all_ranks_hold_identical_parameters_after_training(tmp_path):
    cfg = {"run": {"steps": 8, "out": str(tmp_path)}, "data": {"samples": 512, "batch_size": 16}}
    digests = spawn(workers.train_and_digest, 2, Config.from_dict(cfg).to_dict())
    assert digests[0] == digests[1]


def test_perturbed_rank_fails_verify_naming_that_rank(tmp_path):
    proc = torchrun(2, *SMALL, "--steps", "4", "--out", str(tmp_path), extra_env={"DDP_FAULT": "perturb:rank=1"})
    assert proc.returncode != 0
    assert "error: verify failed on 2 ranks (atol = 0): rank 1 differs from rank 0 by max |Δ| = " in proc.output
    assert "rank 0 differs" not in proc.output


def test_runs_without_torchrun_as_a_world_of_one(tmp_path):
    out = ok(train_alone(*SMALL, "--steps", "3", "--out", tmp_path))
    assert "[rank 0/1]" in out and "verify: 1/1 ranks" in out


def test_users_own_npz_data_trains_with_the_same_command(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 20)).astype(np.float32)
    np.savez(tmp_path / "mine.npz", X=x, y=(x[:, 0] > 0).astype(np.int64))
    out = ok(train_alone("--data", str(tmp_path / "mine.npz"), "--batch-size", "32", "--epochs", "3",
                         "--out", str(tmp_path / "run")))  # fmt: skip
    assert "verify: 1/1 ranks" in out
    accuracy = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert accuracy["kind"] == "eval" and accuracy["accuracy"] > 0.8  # the sign of X[:, 0] is easy to learn


def test_npz_without_labels_is_refused_naming_the_file(tmp_path):
    np.savez(tmp_path / "bad.npz", X=np.zeros((10, 20), np.float32))
    proc = train_alone("--data", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "run"))
    assert proc.returncode != 0 and f"--data: {tmp_path}/bad.npz lacks array(s) ['y']" in proc.output


def test_lazy_modules_are_materialised_before_ddp_wraps_them(tmp_path):
    from torch import nn

    from ddp import group
    from ddp.config import DistConfig
    from ddp.model import materialize

    with group.process_group(DistConfig(backend="gloo")):
        model = materialize(nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 2)), torch.zeros(2, 7))
        assert model[0].weight.shape == (4, 7)
        wrapped = nn.parallel.DistributedDataParallel(model)
        wrapped(torch.randn(3, 7)).sum().backward()
        assert model[0].weight.grad is not None


class ViewsItsFeatures(torch.nn.Module):
    """A user's CNN; with ``view``, its forward works in the contiguous layout only."""

    def __init__(self, view: bool) -> None:
        super().__init__()
        self.conv, self.head, self.view = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Linear(8 * 8 * 8, 2), view

    def forward(self, x):
        h = self.conv(x)
        return self.head(h.view(len(h), -1) if self.view else h.flatten(1))


def test_memory_format_auto_is_channels_last_for_a_users_cnn_whose_forward_takes_it(capsys):
    from ddp.parallel import local_model

    def conv_weight(view: bool, fmt: str = "auto") -> torch.Tensor:
        data = torch.utils.data.TensorDataset(torch.randn(32, 3, 8, 8), torch.randint(0, 2, (32,)))
        task = ddp.Task(model=lambda: ViewsItsFeatures(view), train_data=data)
        cfg = Config.from_dict({"run": {"memory_format": fmt}})
        return local_model(task, cfg, torch.device("cpu")).conv.weight

    assert conv_weight(view=False).is_contiguous(memory_format=torch.channels_last)
    assert not conv_weight(view=False).is_contiguous()
    assert capsys.readouterr().out == ""
    assert conv_weight(view=True).is_contiguous()  # the probe's forward failed in channels_last: no crash in a step
    said = capsys.readouterr().out
    assert "note: --memory-format auto: the model's forward on its probe input fails in channels_last (view" in said
    assert conv_weight(view=False, fmt="contiguous").is_contiguous()
    # batches of dicts and no Task.probe: no input to try the layout on, so the one that always works
    task = ddp.Task(model=lambda: ViewsItsFeatures(False), train_data=[{"image": torch.randn(3, 8, 8)}] * 4)
    assert local_model(task, Config.from_dict({}), torch.device("cpu")).conv.weight.is_contiguous()
    assert "note: --memory-format auto: no input to try channels_last on (task 'task'" in capsys.readouterr().out


def test_memory_format_auto_is_channels_last_for_the_cnn_and_contiguous_for_the_mlp():
    from ddp.parallel import local_model
    from ddp.tasks import resolve

    def conv_weight(arch: str, fmt: str) -> torch.Tensor:  # the second conv's (the first has 1 input channel)
        cfg = Config.from_dict({"task": {"spec": arch}, "run": {"memory_format": fmt}})
        weights = local_model(resolve(cfg), cfg, torch.device("cpu")).state_dict()
        return weights["features.3.weight" if arch == "cnn" else "hidden.0.weight"]

    assert conv_weight("cnn", "auto").is_contiguous(memory_format=torch.channels_last)
    assert not conv_weight("cnn", "auto").is_contiguous()
    assert conv_weight("cnn", "contiguous").is_contiguous()
    assert conv_weight("mlp", "auto").is_contiguous()
    assert conv_weight("mlp", "channels_last").is_contiguous()  # 2-D weights have no channels_last layout


def test_cnn_exports_weights_a_plain_model_loads_with_the_same_outputs(tmp_path):
    from ddp.model import ConvNet
    from ddp.parallel import local_model
    from ddp.tasks import resolve

    out = ok(train_alone("--task", "cnn", "--width", "8", *SMALL, "--steps", "4", "--out", str(tmp_path)))
    assert "outputs identical (max |Δ| = 0" in out
    cfg = Config.from_dict({"task": {"spec": "cnn"}, "model": {"width": 8}})
    state = torch.load(tmp_path / "cnn.params", weights_only=True)
    plain, fast = ConvNet(width=8), local_model(resolve(cfg), cfg, torch.device("cpu"))
    plain.load_state_dict(state), fast.load_state_dict(state)
    x = torch.randn(16, 1, 16, 16)
    # the layout changes float rounding only: the same weights, outputs equal to rounding
    torch.testing.assert_close(plain(x), fast(x), rtol=1e-5, atol=1e-5)
