"""Streams (an IterableDataset as training data): the split, the end of an epoch, and exact resume.

The user's stream is ``tests/stream_task.py``: 1000 records on 2 ranks in batches of 16,
so an epoch is 31 steps (each rank's last 4 records are dropped) and a 40-step run
crosses into epoch 1.
"""

from __future__ import annotations

import itertools
import re
import shutil

import pytest
import torch
from torch.utils.data import IterableDataset, default_collate

from ddp.stream import RankStream, StreamBatch, StreamEnd, has_state, lost_on_resume
from ddp.train import main

from .helpers import assert_same_training, ok, torchrun

RUN = ["--task", "tests/stream_task.py:make", "--steps", "40", "--batch-size", "16", "--checkpoint-every", "5",
       "--log-every", "10"]  # fmt: skip


class Numbers(IterableDataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        yield from map(torch.tensor, range(self.n))


def rank_batches(n: int, ranks: int, rank: int, workers: int, batch: int, start: int = 0) -> list:
    """A rank's items in the order its DataLoader gives them: worker w's k-th batch is the rank's (kW + w)-th."""
    per_worker = []
    for w in range(workers):
        stream = RankStream(Numbers(n), rank, ranks, batch, default_collate, seed=0)
        stream.set_position(0, start)
        per_worker.append(list(stream._batches(w, workers)))
    merged = []
    for k in itertools.count():
        items = per_worker[k % workers]
        if k // workers >= len(items):
            return merged
        merged.append(items[k // workers])
        if isinstance(merged[-1], StreamEnd):
            return merged


@pytest.mark.parametrize("ranks", [1, 2, 3])
@pytest.mark.parametrize("start", [0, 24, 25])
def test_every_sample_goes_to_one_rank_and_micro_batch_k_is_block_k_with_any_workers(ranks, start):
    n, b = 103, 4
    by_rank = [rank_batches(n, ranks, r, 1, b, start) for r in range(ranks)]
    for r in range(ranks):
        assert [x.batch.tolist() if isinstance(x, StreamBatch) else x for x in rank_batches(n, ranks, r, 2, b, start)] \
            == [x.batch.tolist() if isinstance(x, StreamBatch) else x for x in by_rank[r]]  # fmt: skip
    whole = [[x for x in batches if isinstance(x, StreamBatch)] for batches in by_rank]
    steps = min(map(len, whole))  # the epoch ends when the first rank runs dry
    for k in range(steps):
        block = sorted(v for r in range(ranks) for v in whole[r][k].batch.tolist())
        assert block == list(range(start + k * ranks * b, start + (k + 1) * ranks * b))
    seen = [v for batches in whole for x in batches for v in x.batch.tolist()]
    left = [x.leftover for batches in by_rank for x in batches if isinstance(x, StreamEnd)]
    assert len(left) == ranks and len(seen) == len(set(seen)) and len(seen) + sum(left) == n - start
    assert min(seen) == start


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: a stream without state, read in the training process."""
    out = tmp_path_factory.mktemp("stream") / "ref"
    log = ok(torchrun(2, *RUN, "--out", str(out)))
    return out, log


def test_a_finite_stream_ends_the_epoch_on_every_rank_at_the_same_step(reference):
    _, log = reference
    assert "epoch 0 of the stream ended after step 31: rank(s) [0, 1] ran dry; the 8 sample(s) read" in log
    assert "eval at step 31 (epoch 0)" in log and "step 40 epoch 1" in log


def test_the_first_rank_to_run_dry_ends_the_epoch_and_the_dropped_samples_are_counted(tmp_path):
    # 1023 records: rank 0 has 512 (32 batches), rank 1 511 (31 batches and 15)
    out = ok(torchrun(2, *RUN[:2], "--task-arg", "n=1023", "--steps", "33", "--batch-size", "16",
                      "--out", str(tmp_path)))  # fmt: skip
    assert "epoch 0 of the stream ended after step 31: rank(s) [1] ran dry; the 31 sample(s) read" in out


@pytest.mark.parametrize(
    ("kind", "workers", "kill_at", "said"),
    [
        # each kind, each way of reading (in the training process, in 2 workers) and each epoch once
        ("replay", 0, 12, "at sample 352 by replay: reading past the 352 samples already trained on"),
        ("state", 2, 37, "at sample 160 from its saved state_dict"),
    ],
)
def test_a_stream_killed_and_restarted_by_plain_torchrun_ends_bitwise_equal(
    reference, tmp_path, kind, workers, kill_at, said
):
    ref, _ = reference
    args = [*RUN, "--task-arg", f"kind={kind}", "--workers", str(workers), "--snapshot-every", "1"]
    out = ok(
        torchrun(2, *args, "--out", str(tmp_path), restarts=1, extra_env={"DDP_FAULT": f"kill:rank=1:step={kill_at}"})
    )
    # from the snapshot in host memory of the step before the kill: only the killed step is recomputed
    assert f"step {kill_at - 1}: continuing at step {kill_at}" in out and said in out
    assert_same_training(tmp_path, ref)  # with --workers 2 too: the batches do not depend on the workers


def test_a_hugging_face_stream_shuffled_through_a_buffer_killed_and_restarted_ends_bitwise_equal(tmp_path):
    # datasets keeps no shuffle buffer in its state_dict: resumed from it, the samples in the buffer were lost and the
    # run differed (at /0.weight); replayed, it is exact
    pytest.importorskip("datasets")
    args = ["--task", "tests/stream_task.py:hf", "--steps", "24", "--batch-size", "16", "--snapshot-every", "1"]
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0  # uninterrupted, in this process, without workers
    # one rank: what is tested is the stream's own state. With --workers 2, which a Hugging Face stream would split
    # its shards over (each worker trained on its share of a share: the run differed from the workers' first step)
    out = ok(torchrun(1, *args, "--workers", "2", "--out", str(tmp_path / "run"), restarts=1,
                      extra_env={"DDP_FAULT": "kill:rank=0:step=13"}))  # fmt: skip
    said = ("resuming epoch 0 of the stream at sample 192 by replay: reading past the 192 samples already trained on "
            "(its state_dict would lose the shuffle buffer of datasets' IterableDataset.shuffle)")  # fmt: skip
    assert "step 12: continuing at step 13" in out and said in out
    assert "note: --workers 2 not used: the stream of task 'hf-stream' is a Hugging Face IterableDataset" in out
    assert_same_training(tmp_path / "run", tmp_path / "ref")


def test_a_hugging_face_stream_continues_from_its_own_state_dict_where_it_keeps_its_place():
    pytest.importorskip("datasets")
    from .stream_task import hf

    plain, shuffled = hf(shuffle=False).train_data, hf().train_data
    assert has_state(plain) and lost_on_resume(plain) is None
    assert not has_state(shuffled) and "shuffle buffer" in lost_on_resume(shuffled)  # replayed: the test above
    # 2 ranks' view of rank 1, as the trainer reads it: stopped after 5 batches, resumed from the last one's state
    whole = [
        x for x in RankStream(plain, 1, 2, 16, default_collate, seed=0)._batches(0, 1) if isinstance(x, StreamBatch)
    ]
    resumed = RankStream(plain, 1, 2, 16, default_collate, seed=0)
    resumed.set_position(0, 5 * 2 * 16, whole[4].state)
    rest = [x for x in resumed._batches(0, 1) if isinstance(x, StreamBatch)]
    assert len(whole) == 31 and len(rest) == 26
    for a, b in zip(whole[5:], rest, strict=True):
        assert torch.equal(a.batch["x"], b.batch["x"]) and torch.equal(a.batch["y"], b.batch["y"])


def test_a_hugging_face_stream_behind_split_by_rank_is_read_in_the_training_process_under_workers(tmp_path, capsys):
    # what each worker iterates is the HF split, which in a worker would read only that worker's shards
    pytest.importorskip("datasets")
    args = ["--task", "tests/stream_task.py:hf", "--task-arg", "by_rank=true", "--steps", "2", "--workers", "2"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    assert "note: --workers 2 not used: the stream of task 'hf-stream' is a Hugging Face" in capsys.readouterr().out


def test_a_hugging_face_stream_split_by_node_already_is_refused_naming_what_to_give(tmp_path, capsys):
    pytest.importorskip("datasets")
    args = ["--task", "tests/stream_task.py:hf", "--task-arg", "split_by_node=true", "--steps", "2", "--out"]
    assert main([*args, str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "already split over 2 nodes (datasets.distributed.split_dataset_by_node, rank 0)" in err
    assert "give the whole dataset" in err and "split_by_rank(rank, world_size)" in err


def test_a_stream_that_splits_itself_resumes_exactly_and_refuses_another_world_size(tmp_path, capsys):
    args = [*RUN, "--task-arg", "kind=split"]  # workers: the other tests
    ok(torchrun(2, *args, "--out", str(tmp_path / "ref")))
    out = ok(torchrun(2, *args, "--out", str(tmp_path / "run"), restarts=1,
                      extra_env={"DDP_FAULT": "kill:rank=0:step=22"}))  # fmt: skip
    # from the snapshot or checkpoint of step 20 or 21 (whether --snapshot-every auto had widened its interval by
    # then depends on the steps' speed): the stream's own position, 32 samples a step
    resumed = int(re.search(r"continuing at step (\d+)", out)[1]) - 1
    assert resumed in (20, 21) and f"at sample {32 * resumed} from its saved state_dict" in out
    assert_same_training(tmp_path / "run", tmp_path / "ref")
    one = [*args[:2], "--task-arg", "kind=split", "--steps", "45", "--batch-size", "16", "--out", str(tmp_path / "ref")]
    assert main(one) == 2  # one rank has no share of the two saved
    assert "written by 2 rank(s) and this run has 1" in capsys.readouterr().err
    assert main([*one, "--stream-replay"]) == 0


def test_a_plain_stream_resumes_on_another_world_size_where_the_two_left_off(reference, tmp_path, capsys):
    ref, _ = reference
    shutil.copytree(ref, tmp_path / "run")
    assert main([*RUN[:2], "--steps", "45", "--batch-size", "16", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "resuming epoch 1 of the stream at sample 288 by replay" in out and "checkpoint written by 2 rank(s)" in out


def test_an_endless_stream_trains_for_its_steps(tmp_path):
    assert (
        main(["--task", "tests/user_task.py:endless", "--steps", "3", "--batch-size", "4", "--out", str(tmp_path)]) == 0
    )
