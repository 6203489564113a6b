"""Data at the scale of a real corpus: a permutation computed index by index, and evaluation for runs that never
finish an epoch."""

from __future__ import annotations

import json
import re
import tracemalloc

import numpy as np
import pytest
import torch

import ddp
from ddp import evaluate
from ddp.config import EvalConfig
from ddp.data import IndexBatches, Permutation, ResumableSampler, eval_batches, eval_indices
from ddp.train import main
from ddp.trainer import Progress

from .helpers import assert_tree_equal, ddp_command, model_state, ok, torchrun, train_alone
from .user_task import Computed, huge_val


class Sized(torch.utils.data.Dataset):
    """A dataset of ``n`` samples with no storage behind it: the sampler only asks its length."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 1000, 4097, 65_537])
def test_every_index_exactly_once_per_epoch(n):
    order = Permutation(n, seed=11)(np.arange(n, dtype=np.uint64)).tolist()
    assert sorted(order) == list(range(n))


def test_epochs_and_seeds_give_other_orders():
    n = 10_000
    first = list(ResumableSampler(Sized(n), 1, 0, seed=0))
    sampler = ResumableSampler(Sized(n), 1, 0, seed=0)
    sampler.set_position(1, 0)
    assert list(sampler) != first and sorted(sampler) == sorted(first) == list(range(n))
    assert list(ResumableSampler(Sized(n), 1, 0, seed=1)) != first
    moved = sum(a != b for a, b in zip(first, range(n), strict=True))
    assert moved > 0.99 * n  # shuffled, not nearly the identity


@pytest.mark.parametrize("ranks", [1, 2, 3, 7])
def test_ranks_split_one_global_stream_from_any_position(ranks):
    n, start = 5_003, 1_234
    stream = Permutation(n, 5 + 1_000_003 * 2)(np.arange(n, dtype=np.uint64)).tolist()
    shards = []
    for r in range(ranks):
        sampler = ResumableSampler(Sized(n), ranks, r, seed=5)
        sampler.set_position(2, start)
        shards.append(list(sampler))
    per_rank = (n - start) // ranks
    assert all(len(s) == per_rank == len(ResumableSampler(Sized(n), ranks, 0, 5)) - start // ranks for s in shards)
    interleaved = [shards[i % ranks][i // ranks] for i in range(per_rank * ranks)]
    assert interleaved == stream[start : start + per_rank * ranks]  # global batch j: the same samples for any N


@pytest.mark.parametrize(("n", "ranks", "start", "batch", "order", "shuffle"), [
    (10_000, 1, 0, 64, 2, True), (10_000, 3, 1_234, 100, 2, True),  # batches across the sampler's chunks of 4096
    (9_000, 2, 17, 4096, 2, True), (5_000, 2, 0, 7, 2, False), (1_000, 2, 300, 32, 1, True),  # an earlier order
    (50, 2, 0, 64, 2, True),  # fewer samples than a batch: none
])  # fmt: skip
def test_whole_batches_of_indices_are_the_samplers_own_in_its_order(n, ranks, start, batch, order, shuffle):
    """What a TensorDataset is indexed with: arrays of the indices that ``BatchSampler`` gives as lists."""
    for rank in range(ranks):
        sampler = ResumableSampler(Sized(n), ranks, rank, seed=3, shuffle=shuffle)
        sampler.set_position(2, start, order=order)
        arrays = list(IndexBatches(sampler, batch))
        assert [a.tolist() for a in arrays] == list(torch.utils.data.BatchSampler(sampler, batch, drop_last=True))
        assert len(arrays) == len(IndexBatches(sampler, batch)) and all(a.dtype == np.int64 for a in arrays)


@pytest.mark.parametrize("n", [10**10, 2**40 + 12_345])
def test_a_corpus_of_ten_billion_samples_costs_no_memory_and_resumes_anywhere(n):
    sampler = ResumableSampler(Sized(n), 4, 3, seed=0)
    sampler.set_position(7, n // 2)  # resume at the middle of an epoch: no index before it is computed
    tracemalloc.start()
    try:
        it, batches = iter(sampler), iter(IndexBatches(sampler, 1000))
        first = [next(it) for _ in range(10_000)]
        assert np.concatenate([next(batches) for _ in range(10)]).tolist() == first  # what a TensorDataset is given
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20  # a chunk of positions, never a list of the epoch
    assert len(set(first)) == len(first) and all(0 <= i < n for i in first)
    assert len(sampler) == (n - n // 2) // 4


def test_an_epoch_begun_by_an_earlier_version_resumes_in_its_order():
    n, start = 1_000, 300
    sampler = ResumableSampler(Sized(n), 2, 1, seed=4)
    sampler.set_position(3, start, order=1)  # what a checkpoint without an order resumes with
    legacy = torch.randperm(n, generator=torch.Generator().manual_seed(4 + 3)).tolist()
    assert list(sampler) == legacy[start + 1 : n - (n - start) % 2 : 2]
    progress = Progress()
    progress.load_state_dict({"step": 9, "epoch": 3, "epoch_samples": start})  # saved before version 2
    assert progress.order == 1 and Progress().order == 2


def test_a_run_that_never_ends_an_epoch_evaluates_every_n_steps_on_a_fixed_subset_and_at_the_end(tmp_path):
    # 3687 training samples, global batch 64: 57 steps an epoch; the run stops at 12
    args = ["--steps", "12", "--eval-every", "5", "--eval-samples", "100", "--out", str(tmp_path)]
    ok(train_alone("--batch-size", "64", *args))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    evals = [r for r in map(json.loads, lines) if r["kind"] == "eval"]
    assert [(r["step"], r["epoch"], r["count"]) for r in evals] == [(5, 0, 100), (10, 0, 100), (12, 0, 100)]
    subset = eval_indices(409, 100, 0)
    assert len(subset) == 100 == len(set(subset)) and subset == eval_indices(409, 100, 0) != list(range(100))


def test_a_held_out_split_of_10_10_samples_is_scored_on_the_default_budget_named_in_the_log(
    tmp_path, capsys, monkeypatch
):
    # one rank: the subset is drawn before it is split over ranks, so it is the same on any world size
    monkeypatch.setattr(evaluate._Progress, "EVERY", 0.5)  # progress lines for an evaluation this short
    args = ["--task", "tests/user_task.py:huge_val", "--steps", "3", "--batch-size", "64", "--out", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "(65,536 of 10,000,000,000 held-out samples; --eval-samples 0 scores all)" in out
    assert re.search(r"eval at step 3: [\d,]+ of 1,024 batches of this rank's share \(\d+%\) in \d+ s", out), out
    evals = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").open()) if r["kind"] == "eval"]
    assert [(r["step"], r["count"], r["samples"], r["of"]) for r in evals] == [(3, 65_536, 65_536, 10**10)]
    assert 0 < evals[0]["eval_time"] < evals[0]["time"]
    subset = eval_indices(10**10, 65_536, 0)
    assert len(set(subset)) == 65_536 and sorted(i for r in range(3) for i in subset[r::3]) == list(subset)


def test_a_held_out_split_of_10_10_samples_scored_whole_is_keyed_a_batch_at_a_time():
    # --eval-samples 0 scores every sample; a task that may draw random numbers (the default) reads each one under a
    # seed of its own, keyed (epoch, index): per batch, never for the whole split at once
    task = huge_val()
    assert task.draws_random
    tracemalloc.start()
    try:
        batches = eval_batches(task, rank=1, world_size=3, batch_size=64, seed=0)
        first = [next(batches) for _ in range(3)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20
    expected = [Computed()[i] for i in range(1, 3 * 64 * 3, 3)]  # rank 1's share: every third sample from 1
    assert torch.equal(torch.cat([x for x, _ in first]), torch.from_numpy(np.stack([x for x, _ in expected])))
    assert torch.cat([y for _, y in first]).tolist() == [y for _, y in expected]


def eval_records(run_dir):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").open()) if r["kind"] == "eval"]


def test_keep_best_and_early_stop_survive_a_kill_and_a_relaunch_does_not_train_on(tmp_path):
    # checkpoints in step: an async one may still be in flight at the kill, and is then lost by design (the snapshot
    # in memory serves), which would change the folders kept
    args = ["--samples", "1024", "--batch-size", "16", "--steps", "200", "--eval-every", "5", "--keep-best", "accuracy",
            "--keep-last", "2", "--checkpoint-every", "10", "--early-stop", "3", "--no-async-save"]  # fmt: skip
    ref = ok(torchrun(2, *args, "--out", str(tmp_path / "ref")))
    evals = eval_records(tmp_path / "ref")
    best = max(range(len(evals)), key=lambda i: (evals[i]["accuracy"], -i))  # the first of the best
    kept, stopped = evals[best]["step"], evals[-1]["step"]
    assert len(evals) - 1 - best == 3 and stopped < 200  # stopped at the 3rd evaluation that did not improve
    assert f"early stop: accuracy has not improved on step {kept}'s" in ref
    # killed between the best and the stop: the restart must know both the best and the count since
    run = tmp_path / "run"
    out = ok(
        torchrun(2, *args, "--out", str(run), restarts=1, extra_env={"DDP_FAULT": f"kill:rank=1:step={stopped - 2}"})
    )
    assert "continuing at step" in out
    assert [(r["step"], r["accuracy"]) for r in eval_records(run)] == [(r["step"], r["accuracy"]) for r in evals]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted(
        {f"step-{kept:08d}", f"step-{stopped:08d}", f"step-{stopped // 10 * 10:08d}"}
    )  # the best, beside --keep-last's two
    assert f"verify: 2/2 ranks reloaded {run}/mlp.best.params" in out
    assert_tree_equal(torch.load(run / "mlp.best.params", weights_only=True), model_state(run, kept)[0])
    assert "verify: 1/1 ranks reloaded" in ok(ddp_command("verify", run / "mlp.best.params"))  # its model card
    assert ok(ddp_command("predict", run / "mlp.best.params", "--random", "2", "--device", "cpu")).strip()
    ok(ddp_command("export", run / "mlp.best.params", "--format", "safetensors", "--output", tmp_path / "best.st"))
    assert_tree_equal(ddp.load(tmp_path / "best.st"), model_state(run, kept)[0])
    out = ok(train_alone(*args, "--out", str(run)))  # one process: stopping needs no second rank
    assert f"the run stopped early at step {stopped} (--early-stop)" in out and f"eval at step {stopped}" not in out
    assert f"best: step {kept}'s accuracy" in out
    # a metric no evaluation has: rank 0 finds it in the records it replays, and every rank stops on it
    wrong = ["acuracy" if a == "accuracy" else a for a in args]
    proc = torchrun(2, *wrong, "--out", str(run), timeout=60)
    said = "error: --keep-best: the evaluation has no metric 'acuracy'"
    assert proc.returncode == 1 and all(f"[rank {r}/2] {said}" in proc.output for r in (0, 1)), proc.output[-3000:]


@pytest.mark.parametrize(
    ("metric", "mode", "delta", "values", "best_step", "stale"),
    [
        ("loss", "auto", 0.0, [1.0, 0.9, 0.95, 0.9, 0.89], 5, 0),  # lower is better; a tie is no improvement
        ("accuracy", "auto", 0.0, [0.5, 0.7, 0.6, 0.7], 2, 2),  # higher is better
        ("loss", "max", 0.0, [1.0, 0.9, 1.2], 3, 0),  # the mode overrides the name
        ("loss", "auto", 0.05, [1.0, 0.97, 0.96, 0.9], 4, 0),  # better, but by less than delta: stale still counts
        ("loss", "auto", 0.05, [1.0, 0.97, 0.96], 3, 2),
        ("loss", "auto", 0.0, [1.0, float("nan"), 0.99], 3, 0),  # NaN never becomes the best
    ],
)
def test_the_best_evaluation_and_the_count_since_follow_the_mode_and_delta(metric, mode, delta, values, best_step,
                                                                           stale):  # fmt: skip
    best = evaluate.Best(EvalConfig(keep_best=metric, keep_best_mode=mode, early_stop=2, early_stop_delta=delta))
    for step, v in enumerate(values, start=1):
        best.update(step, {metric: v})
    assert (best.step, best.value, best.stale, best.stopped) == (best_step, values[best_step - 1], stale, stale >= 2)
