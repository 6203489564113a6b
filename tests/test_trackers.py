"""What a user watches: FLOPs and MFU, TensorBoard read back with its own reader, and trackers of one's own."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ddp
from ddp import group
from ddp.config import Config, DistConfig, LogConfig, RunConfig
from ddp.tasks.mlp import task as mlp
from ddp.train import fit
from ddp.trainer import Trainer

from .helpers import ok, torchrun


def records(out, kind="train") -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.fixture
def world_of_one():
    world = group.init(DistConfig(backend="gloo"))
    yield world
    group.shutdown()


def test_the_flops_of_a_step_are_counted_once_as_the_matmuls_add_up(world_of_one, tmp_path):
    cfg = Config(run=RunConfig(out=str(tmp_path)), log=LogConfig(peak_tflops=2.0))
    cfg.optim.grad_accum = 2
    trainer = Trainer(cfg, world_of_one)
    trainer.step(trainer.next_batches())
    b = cfg.data.batch_size  # the MLP 20 -> 256 -> 10: forward, the gradients of both weights, one input's
    assert trainer.metrics.step_flops == 2 * 2 * b * (3 * 256 * 10 + 2 * 20 * 256)
    trainer.step(trainer.next_batches())
    assert trainer.metrics.step_flops == 2 * 2 * b * (3 * 256 * 10 + 2 * 20 * 256)  # counted once, kept


def test_tflops_and_mfu_are_logged_where_the_peak_is_known(tmp_path):
    fit(mlp(), steps=4, log_every=2, peak_tflops=0.5, out=str(tmp_path))
    for r in records(tmp_path):
        assert r["tflops"] > 0 and r["mfu"] == pytest.approx(r["tflops"] / 0.5, rel=1e-3)
    fit(mlp(), steps=2, log_every=2, out=str(tmp_path / "cpu"))
    assert "mfu" not in records(tmp_path / "cpu")[0]  # a CPU's peak is not known: no guess


def test_tensorboard_curves_go_on_after_a_kill_without_duplicate_steps(tmp_path):
    # disk checkpoints only, in step: how often host-memory snapshots are taken depends on this machine's speed
    # (auto), and whether step 10's async save is committed by the kill at 12 on its disk's
    args = ["--steps", "20", "--log-every", "2", "--checkpoint-every", "5", "--snapshot-every", "0", "--no-async-save",
            "--tensorboard", "--out", str(tmp_path)]  # fmt: skip
    out = ok(torchrun(1, *args, restarts=1, extra_env={"DDP_FAULT": "kill:step=12"}))  # rank 0 alone writes them
    assert "continuing at step 11" in out
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()  # TensorBoard's own reader: the second attempt's purge_step hides the first's steps 11-12
    assert len(list((tmp_path / "tensorboard").iterdir())) == 2
    logged = {r["step"]: r for r in records(tmp_path)}
    for name in ("loss", "lr", "grad_norm", "samples_per_s", "step_time", "mem_peak_mb", "tflops"):
        curve = events.Scalars(f"train/{name}")
        assert [e.step for e in curve] == list(range(2, 21, 2)) == sorted(logged)
        assert all(e.value == pytest.approx(logged[e.step][name], rel=1e-6) for e in curve)
    assert [e.step for e in events.Scalars("eval/accuracy")] == [20]


class Remember:
    """A tracker of one's own: two methods."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, dict]] = []
        self.closed = False

    def log(self, kind: str, step: int, values: dict) -> None:
        self.calls.append((kind, step, ddp.trackers.scalars(kind, values)))

    def close(self) -> None:
        self.closed = True


def test_a_tracker_of_ones_own_gets_every_record_under_train_and_eval(tmp_path):
    mine = Remember()
    fit(mlp(), trackers=[mine], steps=4, log_every=2, out=str(tmp_path))
    assert [(kind, step) for kind, step, _ in mine.calls] == [("train", 2), ("train", 4), ("eval", 4)]
    assert mine.calls[0][2]["train/loss"] == records(tmp_path)[0]["loss"] and "eval/accuracy" in mine.calls[2][2]
    assert mine.closed


def wandb_history(run_dir) -> list[dict]:
    """The history rows of an offline W&B run, read from its ``.wandb`` file (LevelDB's log format after a
    7-byte header) with W&B's own protobuf classes."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, pending, rows = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if (left := 32768 - pos % 32768) < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                rows.append(items)
            pending = b""
    return rows


def test_wandb_offline_gets_the_same_scalars(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    fit(mlp(), steps=4, log_every=2, wandb=True, out=str(tmp_path))
    rows = wandb_history(tmp_path)
    logged = records(tmp_path)
    assert [row["_step"] for row in rows] == [2, 4]
    for row, r in zip(rows, logged, strict=True):
        assert row["train/loss"] == pytest.approx(r["loss"]) and row["train/grad_norm"] == pytest.approx(r["grad_norm"])
    assert "eval/accuracy" in rows[-1]
