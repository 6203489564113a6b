"""Text to token files to a running job: ``ddp tokens``, then ``--task tokens`` on the memory-mapped files."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from ddp import cli, train
from ddp.data import ResumableSampler, make_loader
from ddp.tasks import tokens

from .helpers import ROOT, ok, torchrun


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two text files made into byte-level token files."""
    d = tmp_path_factory.mktemp("corpus")
    texts = [(ROOT / "README.md").read_bytes(), (ROOT / "docs" / "tasks.md").read_bytes()]
    for i, text in enumerate(texts):
        (d / f"part{i}.txt").write_bytes(text)
    assert cli.main(["tokens", str(d / "part0.txt"), str(d / "part1.txt"), "--output", str(d / "bytes")]) == 0
    return d, b"".join(texts)


def test_ddp_tokens_writes_every_byte_once_with_the_end_held_out(corpus):
    d, text = corpus
    train_ids = np.fromfile(d / "bytes" / "train.bin", dtype="<u2")
    val_ids = np.fromfile(d / "bytes" / "val.bin", dtype="<u2")
    assert bytes(np.concatenate([train_ids, val_ids]).astype(np.uint8)) == text
    assert len(val_ids) == int(len(text) * 0.1)
    meta = json.loads((d / "bytes" / "meta.json").read_text())
    assert meta["vocab"] == 256 and meta["train_tokens"] == len(train_ids)


def test_the_held_out_file_is_scored_in_windows_that_do_not_overlap_and_cover_it(corpus):
    d, _ = corpus
    task = tokens.task(train=f"{d}/bytes/train.bin", val=f"{d}/bytes/val.bin", block=32).load_data()
    ids = np.fromfile(d / "bytes" / "val.bin", dtype="<u2").astype(np.int64)
    assert len(task.train_data) == len(np.fromfile(d / "bytes" / "train.bin", dtype="<u2")) - 32  # one per offset
    val = task.val_data
    assert len(val) == (len(ids) - 1) // 32  # windows of 33 tokens, 32 apart: the next starts where one ends
    inputs = np.concatenate([val[i][0].numpy() for i in range(len(val))])
    targets = np.concatenate([val[i][1].numpy() for i in range(len(val))])
    assert inputs.tolist() == ids[: len(inputs)].tolist() and targets.tolist() == ids[1 : len(inputs) + 1].tolist()


def test_token_windows_are_read_a_batch_in_one_gather_as_the_seeded_per_sample_path_reads_them(corpus):
    d, _ = corpus
    task = tokens.task(train=f"{d}/bytes/train.bin", block=32).load_data()
    assert not task.draws_random  # windows of a file draw nothing: no per-sample seeding

    def batches(task, start):
        sampler = ResumableSampler(task.train_data, num_replicas=2, rank=1, seed=5)
        sampler.set_position(epoch=3, start=start)
        loader = iter(make_loader(task, sampler, batch_size=8, workers=0, pin_memory=False, seed=5))
        return [next(loader) for _ in range(4)]

    seeded = dataclasses.replace(task, draws_random=True)
    for start in (0, 48):  # from an epoch's start, and resumed part-way into it
        fast, slow = batches(task, start), batches(seeded, start)
        assert all(torch.equal(a, b) for fb, sb in zip(fast, slow, strict=True) for a, b in zip(fb, sb, strict=True))
    x, y = fast[0]
    assert x.shape == y.shape == (8, 32) and torch.equal(x[:, 1:], y[:, :-1])  # y is x one token on


def test_a_gpt_trains_on_the_token_files_with_workers_and_stands_alone_without_them(corpus, tmp_path, capsys):
    d, _ = corpus
    files = [f"train={d}/bytes/train.bin", f"val={d}/bytes/val.bin", "block=32", "layers=1", "embd=32"]
    out = ok(torchrun(2, "--task", "tokens", "--task-arg", *files, "--workers", "2", "--batch-size", "16",
                      "--steps", "12", "--out", str(tmp_path / "run")))  # fmt: skip
    assert "verify: 2/2 ranks reloaded" in out and "perplexity" in out
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rates = [(r["tokens_per_s"], r["samples_per_s"]) for r in logged if r["kind"] == "train"]
    assert rates and all(abs(tokens - 32 * samples) <= 2 for tokens, samples in rates)  # block 32 tokens a sample
    (d / "bytes" / "train.bin").rename(d / "train.bin.away")
    try:
        assert cli.main(["verify", str(tmp_path / "run" / "tokens.params")]) == 0  # vocab is in the model card
    finally:
        (d / "train.bin.away").rename(d / "bytes" / "train.bin")


def write(path, ids, dtype="<u2"):
    np.asarray(ids, dtype=dtype).tofile(path)
    return path


@pytest.mark.parametrize(
    "make, args, message",
    [
        (lambda d: d / "none.bin", [], "none.bin: no such file; make token files with `ddp tokens"),
        (lambda d: write(d / "empty.bin", []), [], "empty.bin: the file is empty"),
        (
            lambda d: (d / "odd.bin").write_bytes(b"abc") and d / "odd.bin",
            [],
            "3 bytes are not a whole number of uint16 tokens",
        ),
        (lambda d: write(d / "short.bin", range(40)), ["block=64"], "short.bin: 40 tokens, fewer than one window"),
        (
            lambda d: write(d / "big.bin", [1, 2, 300] * 100),
            ["vocab=256"],
            "token id 300 at offset 2 is not below vocab=256",
        ),
        (lambda d: write(d / "novocab.bin", range(200)), [], "task tokens needs the vocabulary's size"),
    ],
    ids=["missing", "empty", "partial token", "shorter than a block", "id past vocab", "no vocab"],
)
def test_bad_token_files_are_usage_errors_that_name_the_file(tmp_path, capsys, make, args, message):
    path = make(tmp_path)
    vocab = [] if "vocab=" in " ".join(args) or "novocab" in str(path) else ["vocab=512"]
    argv = ["--task", "tokens", "--task-arg", f"train={path}", "block=8", *vocab, *args, "--out", str(tmp_path / "r")]
    assert train.main(argv) == 2
    assert message in capsys.readouterr().err
