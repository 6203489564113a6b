"""Saving and loading: the textbook's first lesson, with atomic writes and safe loads."""

import os

import pytest
import torch
from torch import nn

import ddp
from ddp import group
from ddp.checkpoint import Checkpointer
from ddp.config import CheckpointConfig, DistConfig
from ddp.io import atomic_write, strip_prefixes
from ddp.model import MLP


def test_tensor_round_trip_is_bitwise(tmp_path):
    x = torch.arange(4, dtype=torch.float32) / 3
    ddp.save(x, tmp_path / "x-file")
    y = ddp.load(tmp_path / "x-file")
    assert y.dtype == x.dtype and torch.equal(x, y)


def test_list_of_tensors_round_trip(tmp_path):
    x, y = torch.arange(4), torch.randn(4, dtype=torch.float64)
    ddp.save([x, y], tmp_path / "x-files")
    x2, y2 = ddp.load(tmp_path / "x-files")
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_dict_of_tensors_round_trip_in_both_formats(tmp_path):
    mydict = {"x": torch.arange(4), "y": torch.zeros(4, dtype=torch.bfloat16)}
    for fmt in ("torch", "safetensors"):
        ddp.save(mydict, tmp_path / f"mydict.{fmt}", format=fmt)
        back = ddp.load(tmp_path / f"mydict.{fmt}")
        assert back.keys() == mydict.keys()
        assert all(torch.equal(back[k], mydict[k]) and back[k].dtype == mydict[k].dtype for k in mydict)


def test_mlp_params_restore_a_clone_with_identical_outputs(tmp_path):
    torch.manual_seed(0)
    net = MLP()
    x = torch.randn(size=(2, 20))
    y = net(x)
    ddp.save(net.state_dict(), tmp_path / "mlp.params")
    clone = MLP()
    ddp.load_model(clone, tmp_path / "mlp.params")
    clone.eval()
    assert torch.equal(clone(x), y)


def test_load_maps_onto_the_requested_device(tmp_path):
    ddp.save({"w": torch.ones(2)}, tmp_path / "w.pt")
    assert ddp.load(tmp_path / "w.pt", map_location="cpu")["w"].device == ddp.cpu()


@pytest.fixture
def world_of_one():
    world = group.init(DistConfig(backend="gloo"))
    yield world
    group.shutdown()


def test_unwrap_strips_ddp_and_compile_wrappers(world_of_one):
    net = MLP(hidden=(8,))
    wrapped = nn.parallel.DistributedDataParallel(torch.compile(net))
    assert next(iter(wrapped.state_dict())).startswith("module._orig_mod.")
    assert ddp.unwrap(wrapped) is net
    assert list(ddp.unwrap(wrapped).state_dict()) == list(net.state_dict())


def test_strip_prefixes_removes_both_wrappers():
    state = {"module._orig_mod.output.weight": torch.ones(1)}
    stripped, removed = strip_prefixes(state)
    assert list(stripped) == ["output.weight"] and removed == ["module.", "_orig_mod."]


def test_save_model_writes_unwrapped_keys(world_of_one, tmp_path):
    net = MLP(hidden=(8,))
    ddp.save_model(nn.parallel.DistributedDataParallel(net), tmp_path / "mlp.params")
    keys = list(torch.load(tmp_path / "mlp.params", weights_only=True))
    assert keys == list(net.state_dict()) and not any(k.startswith("module.") for k in keys)


def test_atomic_write_that_fails_midway_keeps_the_old_file(tmp_path):
    target = tmp_path / "mlp.params"
    ddp.save({"w": torch.ones(3)}, target)
    before = target.read_bytes()

    def half_then_crash(f):
        f.write(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt("power cut")

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_crash)
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["mlp.params"]  # no temp file left behind
    assert torch.equal(ddp.load(target)["w"], torch.ones(3))


def test_keep_last_retires_old_checkpoints_at_once_and_deletes_them_in_the_background(world_of_one, tmp_path):
    model = torch.nn.Linear(1000, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = Checkpointer(tmp_path, CheckpointConfig(keep_last=2, async_save="off"), model, optimizer, say=lambda m: None)
    ckpt.prepare()
    for step in (1, 2, 3):
        ckpt.save(step)
        names = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".pruned-"))
        assert names == [f"step-{s:08d}" for s in range(max(1, step - 1), step + 1)]  # never more than 2 loadable
    assert ckpt.pruner is not None  # step 1's files go while training goes on
    ckpt.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002", "step-00000003"]
    (tmp_path / ".pruned-step-00000001").mkdir()  # a kill in the middle of deleting
    (tmp_path / ".pruned-step-00000001" / "model.pt").write_bytes(b"half")
    said = []
    Checkpointer(tmp_path, CheckpointConfig(), model, optimizer, say=said.append).prepare()
    assert said == [f"removed leftover {tmp_path}/.pruned-step-00000001 of an interrupted deletion"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002", "step-00000003"]
