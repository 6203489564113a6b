"""The Trainer's components, each on its own: the data's progress, evaluation's schedule, the step figures'
agreement, and when the Checkpointer saves. In one process, no launcher: what each decides from what it is told."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ddp import batches, group
from ddp.checkpoint import Checkpointer
from ddp.config import CheckpointConfig, Config, DistConfig
from ddp.evaluate import Evaluator
from ddp.metrics import StepMetrics
from ddp.tasks.mlp import task as mlp
from ddp.trainer import Progress


@pytest.fixture
def world():
    world = group.init(DistConfig(backend="gloo"))
    yield world
    group.shutdown()


def config(tmp_path, **sections) -> Config:
    return Config.from_dict({"run": {"out": str(tmp_path)}, **sections})


def test_map_batches_move_to_the_next_epoch_at_its_end_and_count_the_run_in_steps(tmp_path, world):
    cfg = config(tmp_path, data={"batch_size": 16}, run={"out": str(tmp_path), "epochs": 2})
    task = mlp(samples=200, val_fraction=0.2).load_data()  # 160 training samples: 10 steps of 16 an epoch
    started = []
    data = batches.build(task, cfg, world, lambda epoch, steps: started.append((epoch, steps)), print)
    assert isinstance(data, batches.MapBatches) and (data.steps_per_epoch, data.total_steps) == (10, 20)
    p = Progress()
    for _ in range(10):
        [(x, y)] = data.next(p)
        assert x.shape == (16, 20) and y.shape == (16,)
        p.step += 1
        data.advance(p)
    assert (p.epoch, p.epoch_samples) == (1, 0) and started == [(0, 10)]
    data.next(p)
    assert started == [(0, 10), (1, 10)] and data.statefuls() == ({}, {})
    data.close()


def test_a_position_with_less_than_a_step_left_in_its_epoch_starts_the_next_epoch(tmp_path, world):
    """A checkpoint of a world with a smaller global batch (an elastic job that then grew) may leave fewer samples
    in its epoch than this world's step takes: the loader had no batch for it (StopIteration); the next epoch
    starts."""
    cfg = config(tmp_path, data={"batch_size": 16}, run={"out": str(tmp_path), "epochs": 2})
    task = mlp(samples=200, val_fraction=0.2).load_data()  # 160 training samples
    started = []
    data = batches.build(task, cfg, world, lambda epoch, steps: started.append((epoch, steps)), print)
    p = Progress(step=19, epoch=0, epoch_samples=152)  # 8 left: 19 steps of 8, as a smaller world took them
    [(x, _)] = data.next(p)
    assert x.shape == (16, 20) and (p.epoch, p.epoch_samples) == (1, 0) and started == [(1, 1)]
    data.close()


def test_the_evaluator_is_due_at_epoch_ends_every_n_steps_and_at_the_last_never_twice(tmp_path, world):
    cfg = config(tmp_path, eval={"eval_every": 4})
    evaluator = Evaluator(mlp(samples=64).load_data(), cfg, world, torch.float32, metrics=None)
    assert [s for s in range(1, 10) if evaluator.due(s)] == [4, 8]
    assert evaluator.due(5, epoch_ended=True) and evaluator.due(9, last=True)
    evaluator.evaluated = 9
    assert not evaluator.due(9, last=True)  # the last step was evaluated already: not twice


def test_step_metrics_log_the_mean_loss_of_the_steps_taken_and_every_ranks_times(tmp_path, world):
    cfg = config(tmp_path)
    metrics = StepMetrics(cfg, world, global_batch=64, tokens_per_sample=None)
    for loss in (1.0, 3.0):
        metrics.stepped(torch.tensor(loss), torch.tensor(0.5), skipped=False, epoch=0)
    metrics.stepped(torch.tensor(math.nan), torch.tensor(math.nan), skipped=True, epoch=0)  # not in the mean
    row, record = metrics.taken(3, lr=0.1, elapsed=1.5)
    assert row[0] == 4.0 and len(row) == 5  # the loss sum, then step_timing
    metrics.stepped(torch.tensor(10.0), torch.tensor(2.0), skipped=False, epoch=1)  # the next step, before the rows
    record([row])  # every rank's row: here, a world of one
    assert metrics.last_loss == 4.0 / 2 and metrics.rank_timing == [row[1:]]
    assert math.isnan(metrics.last_grad_norm)  # step 3's, the skipped one: not the next step's 2.0
    (written,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert (written["step"], written["epoch"], written["loss"], written["time"]) == (3, 0, 2.0, 1.5)
    assert metrics.taken(4, lr=0.1, elapsed=2.0)[0][0] == 10.0  # the next record sums the steps after step 3
    metrics.close()


def test_a_snapshot_cost_is_applied_once_at_the_interval_it_was_measured_at(tmp_path, world):
    model = torch.nn.Linear(4, 2)
    cfg = CheckpointConfig(snapshot_every="auto", snapshot_dir=str(tmp_path / "shm"), async_save="off")
    said = []
    ckpt = Checkpointer(tmp_path / "checkpoints", cfg, model, torch.optim.SGD(model.parameters(), lr=0.1),
                        say=said.append)  # fmt: skip
    ckpt.voted([0, 300_000, 1])  # 30 % at one snapshot a step: 16 steps apart
    ckpt.voted([0, 300_000, 1])  # the next vote's, measured before that change: stale, not applied again
    assert ckpt.snapshots.every == 16 and len(said) == 1, said
    ckpt.voted([0, 30_000, 16])  # 3 % at the new interval: twice as far apart
    assert ckpt.snapshots.every == 32


def test_the_checkpointer_saves_every_n_steps_when_the_ranks_agreed_time_passed_and_at_the_last(tmp_path, world):
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = CheckpointConfig(checkpoint_every=3, checkpoint_every_seconds=3600, snapshot_every="0", async_save="off")
    ckpt = Checkpointer(tmp_path, cfg, model, optimizer, say=lambda _: None)
    for step in range(1, 6):
        ckpt.save_if_due(step)
    assert ckpt.last_saved == 3
    ckpt.voted([1, -1, 0])  # the stop vote's riders: rank 0's clock says an hour passed (no snapshot cost measured)
    ckpt.save_if_due(4)
    assert ckpt.last_saved == 4 and not ckpt.time_due  # saved, and the clock starts again
    ckpt.save_if_due(5, last_step=True)
    ckpt.save_if_due(5, last_step=True)  # the last step is saved once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003", "step-00000004", "step-00000005"]
