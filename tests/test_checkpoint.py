"""The checkpoint layout's pure parts (how ``spread`` hands tensors to ranks), and the Checkpointer's ownership
of the training state: what it is handed comes back whole into fresh objects."""

from __future__ import annotations

import multiprocessing
import os
import threading

import pytest
import torch

from ddp import group
from ddp.checkpoint import PROGRESS, Checkpointer
from ddp.checkpoint_files import MODEL, TRAIN, Worker, model_file, nbytes, optim_file, read_model, spread
from ddp.config import CheckpointConfig, DistConfig
from ddp.trainer import Progress

from . import workers
from .helpers import assert_tree_equal, spawn


def replicated(sizes: dict[str, int], optimizer: bool = True) -> dict:
    """model.pt and train.pt of a model with tensors of these sizes (floats), with momentum for each."""
    model = {name: torch.full((n,), float(i)) for i, (name, n) in enumerate(sizes.items())}
    state = {i: {"momentum_buffer": torch.zeros(n)} for i, n in enumerate(sizes.values())}
    train = {"step": 3, "optimizer": {"state": state if optimizer else {}, "param_groups": [{"params": list(state)}]}}
    return {MODEL: model, TRAIN: train}


def bytes_per_rank(whole: dict, shares: dict[int, dict], world_size: int) -> list[int]:
    return [nbytes(whole) * (r == 0) + nbytes(shares.get(r, {})) for r in range(world_size)]


def test_one_rank_keeps_the_model_whole():
    files = replicated({"a": 10, "b": 20})
    assert spread(files, 1) == (files, {})


@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_spread_balances_bytes_over_the_ranks(world_size):
    sizes = {f"layer{i}.weight": n for i, n in enumerate([4096, 1024, 1024, 512, 512, 256, 256, 128, 64, 32, 16, 8])}
    whole, shares = spread(replicated(sizes), world_size)
    loads = bytes_per_rank(whole, shares, world_size)
    largest = 4 * 4096  # greedy, largest first: no rank exceeds another by more than the largest item
    assert max(loads) - min(loads) <= largest, loads
    assert sum(loads) == nbytes(whole) + sum(nbytes(s) for s in shares.values())
    assert MODEL not in whole and whole[TRAIN]["optimizer"]["state"] == {}  # every tensor went to some rank
    handed = {k for s in shares.values() for name, part in s.items() if name.startswith("model-") for k in part}
    assert handed == set(sizes)
    momentum = {k for s in shares.values() for name, part in s.items() if name.startswith("optim-") for k in part}
    assert momentum == set(range(len(sizes)))


def test_spread_is_the_same_on_every_rank_and_files_are_named_for_their_writer():
    sizes = {"w": 300, "v": 300, "u": 300, "b": 3}
    first, again = spread(replicated(sizes), 3), spread(replicated(sizes), 3)
    assert {r: {n: sorted(p) for n, p in s.items()} for r, s in first[1].items()} == {
        r: {n: sorted(p) for n, p in s.items()} for r, s in again[1].items()
    }
    for rank, files in first[1].items():
        assert set(files) <= {model_file(rank), optim_file(rank)}


def test_a_tied_weight_goes_whole_to_one_rank_and_is_stored_once():
    embedding = torch.randn(50, 8)
    files = replicated({"pos": 100, "norm": 8})
    files[MODEL] = {"tok.weight": embedding, **files[MODEL], "head.weight": embedding}
    _, shares = spread(files, 3)
    holders = [r for r, s in shares.items() if "tok.weight" in s.get(model_file(r), {})]
    assert len(holders) == 1
    part = shares[holders[0]][model_file(holders[0])]
    assert part["head.weight"] is part["tok.weight"]  # one tensor under both names: torch.save stores it once


def test_the_models_key_order_survives_the_spread(tmp_path, world_of_one):
    sizes = {"z.weight": 10, "a.weight": 500, "m.bias": 3, "b.weight": 200}
    files = replicated(sizes, optimizer=False)
    whole, shares = spread(files, 2)
    assert whole[TRAIN]["model_keys"] == list(sizes)
    for rank in shares:
        for name, part in shares[rank].items():
            torch.save(part, tmp_path / name)
    manifest = {"files": {name: {} for s in shares.values() for name in s}}
    state, where = read_model(tmp_path, manifest, whole[TRAIN]["model_keys"])
    assert list(state) == list(sizes) and where == "model-*.pt"
    assert_tree_equal(state, files[MODEL])


@pytest.fixture
def world_of_one():
    world = group.init(DistConfig(backend="gloo"))
    yield world
    group.shutdown()


def training_state(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    return model, optimizer, scheduler, Progress()


def test_every_rank_checkpoints_rank_0s_buffers_in_one_broadcast_and_keeps_its_own(tmp_path):
    """Any rank may write model.pt, so each holds rank 0's buffers (as exported weights do); the model's own stay.
    One broadcast of their bytes, whatever their dtypes: every snapshot of a BatchNorm model makes it."""
    for rank, buffers in spawn(workers.rank0_buffers, 2, str(tmp_path)).items():
        assert buffers.pop("broadcasts") == 1
        assert {saved.dtype for saved, _ in buffers.values()} == {torch.float32, torch.float64, torch.int64}
        for name, (saved, own) in buffers.items():
            assert saved.shape == own.shape and saved.dtype == own.dtype, name
            assert torch.equal(saved, torch.full_like(own, 10)) and torch.equal(own, torch.full_like(own, 10 + rank))


def test_the_checkpointer_restores_everything_it_was_handed_into_fresh_objects(tmp_path, world_of_one):
    model, optimizer, scheduler, progress = training_state(0)
    for _ in range(3):
        model(torch.randn(16, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
    progress.step, progress.epoch, progress.epoch_samples = 3, 1, 48
    stateful = {"scheduler": scheduler, PROGRESS: progress}
    saver = Checkpointer(tmp_path, CheckpointConfig(), model, optimizer, stateful, say=lambda _: None)
    saver.save(3)
    draws = torch.rand(4)  # what the generator gives after the save
    saver.wait()  # where the save is written on a thread (--async-save), it is committed here

    fresh_model, fresh_optimizer, fresh_scheduler, fresh_progress = training_state(1)
    loader = Checkpointer(tmp_path, CheckpointConfig(), fresh_model, fresh_optimizer,
                          {"scheduler": fresh_scheduler, PROGRESS: fresh_progress}, say=lambda _: None)  # fmt: skip
    assert loader.resume("auto") == tmp_path / "step-00000003"
    assert_tree_equal(fresh_model.state_dict(), model.state_dict())
    assert_tree_equal(fresh_optimizer.state_dict(), optimizer.state_dict())
    assert fresh_scheduler.state_dict() == scheduler.state_dict() and fresh_progress == progress
    assert torch.equal(torch.rand(4), draws)  # the RNG state is the Checkpointer's too
    assert loader.last_saved == 3


BACKGROUND = Worker("test-worker")


def _submit_in_child(results) -> None:
    results.put(BACKGROUND.submit(os.getpid).result(timeout=10))


def test_a_background_worker_runs_jobs_on_one_kept_thread_and_a_forked_child_starts_its_own():
    # ddp.checkpoint_files.Worker: the thread is started once and kept (no thread ends while a DataLoader forks);
    # a fork's child has no copy of it, and starts its own at its first job rather than queueing to nobody
    names = {BACKGROUND.submit(lambda: threading.current_thread().name).result(timeout=10) for _ in range(3)}
    assert names == {"test-worker"} and sum(t.name == "test-worker" for t in threading.enumerate()) == 1
    with pytest.raises(ZeroDivisionError):
        BACKGROUND.submit(lambda: 1 / 0).result(timeout=10)  # a job's error reaches its caller
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    child = ctx.Process(target=_submit_in_child, args=(results,))
    child.start()
    child.join(timeout=30)
    assert child.exitcode == 0 and results.get(timeout=5) == child.pid
