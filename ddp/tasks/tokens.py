"""A GPT (charlm's model) on nanoGPT-format token files: flat little-endian token ids, memory-mapped.

    ddp tokens book.txt notes.txt --output data/books     # byte-level: train.bin, val.bin, meta.json
    ddp train --task tokens --task-arg train=data/books/train.bin val=data/books/val.bin --steps 2000

One training sample per token offset (nanoGPT's ``get_batch`` draws the same windows at random):
``block`` tokens in, the next ``block`` out. The held-out file is scored in windows that do not
overlap (stride ``block``): each token once, as held-out loss is reported. The files are never
read whole: each process, DataLoader workers included, maps them on first use, and the sampler
draws positions without a list of them, so a corpus of 10^10 tokens costs what one of 10^6 does.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ddp.errors import ConfigError
from ddp.task import Task
from ddp.tasks.charlm import CharLM, loss, metrics, with_perplexity

DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
META = "meta.json"
"""Written beside the token files by ``ddp tokens``: the vocabulary's size and the dtype."""


def count_tokens(path: str | Path, dtype: str, block: int, arg: str) -> int:
    """The number of tokens in a token file, after the checks that name it: missing, empty, a partial token,
    too short for one window."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"--task-arg {arg}={path}: no such file; make token files with `ddp tokens FILES --output DIR`"
        )
    size, width = path.stat().st_size, np.dtype(DTYPES[dtype]).itemsize
    if size == 0:
        raise ConfigError(f"--task-arg {arg}={path}: the file is empty")
    if size % width:
        raise ConfigError(
            f"--task-arg {arg}={path}: {size} bytes are not a whole number of {dtype} tokens ({width} bytes each); "
            "is it a token file, and of this dtype (--task-arg dtype=uint16 or uint32)?"
        )
    if size // width <= block:
        raise ConfigError(f"--task-arg {arg}={path}: {size // width} tokens, fewer than one window of block + 1")
    return size // width


class TokenWindows(Dataset):
    """Windows of ``block + 1`` tokens of a token file, one every ``stride`` tokens; ids checked against ``vocab`` as
    they are read.

    The memory map is opened on first use in each process and never pickled: a DataLoader
    worker opens its own.
    """

    def __init__(self, path: str | Path, dtype: str, block: int, vocab: int, arg: str, stride: int = 1) -> None:
        self.path, self.dtype, self.block, self.vocab, self.arg = Path(path), dtype, block, vocab, arg
        self.stride = stride
        self.tokens = count_tokens(path, dtype, block, arg)
        self.map: np.memmap | None = None

    def __len__(self) -> int:
        return (self.tokens - self.block - 1) // self.stride + 1  # every window of block + 1 tokens that fits

    def __getstate__(self) -> dict:
        return {**self.__dict__, "map": None}

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.map is None:
            self.map = np.memmap(self.path, dtype=DTYPES[self.dtype], mode="r")
        i *= self.stride
        window = torch.from_numpy(self.map[i : i + self.block + 1].astype(np.int64))
        top = int(window.max())
        if top >= self.vocab:  # found here, named, not later as an embedding's index error
            offset = i + int(window.argmax())
            raise ConfigError(
                f"--task-arg {self.arg}={self.path}: token id {top} at offset {offset} is not below vocab="
                f"{self.vocab}; give the vocabulary's size (--task-arg vocab=N)"
            )
        return window[:-1], window[1:]


def task(
    train: str | None = None,
    val: str | None = None,
    dtype: str = "uint16",
    vocab: int | None = None,
    block: int = 64,
    layers: int = 2,
    heads: int = 4,
    embd: int = 64,
    dropout: float = 0.1,
) -> Task:
    """charlm's GPT over ``vocab`` token ids (default: the ``meta.json`` beside ``train``, as ``ddp tokens`` writes)."""
    if train is None:
        raise ConfigError("task tokens needs a token file: --task-arg train=FILE.bin (make one with `ddp tokens`)")
    if dtype not in DTYPES:
        raise ConfigError(f"--task-arg dtype={dtype}: use uint16 or uint32 (for vocabularies past 65,536)")
    if vocab is None:
        vocab = _vocab_beside(Path(train))
    data = functools.cache(lambda arg, path, stride: TokenWindows(path, dtype, block, vocab, arg, stride))
    return Task(
        model=lambda: CharLM(torch.arange(vocab), block, layers, heads, embd, dropout),
        train_data=lambda: data("train", train, 1),
        val_data=None if val is None else (lambda: data("val", val, block)),
        loss=loss,
        metrics=metrics,
        summarize=with_perplexity,
        blocks=lambda model: model.blocks,
        name="tokens",
        tokens_per_sample=block,
        model_args={"vocab": vocab},
    )


def _vocab_beside(train: Path) -> int:
    meta = train.parent / META
    if not meta.is_file():
        raise ConfigError(
            f"task tokens needs the vocabulary's size: --task-arg vocab=N (no {META} beside {train}; "
            "`ddp tokens` writes one, with 256 for its byte-level files)"
        )
    try:
        vocab = json.loads(meta.read_text())["vocab"]
        if not isinstance(vocab, int) or isinstance(vocab, bool) or not 0 < vocab <= 2**32:
            raise ValueError(f"vocab must be a positive whole number, not {vocab!r}")
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        said = f"task tokens: {meta} is not a token files' meta.json ({e}); pass --task-arg vocab=N"
        raise ConfigError(said) from None
    return vocab


def write_byte_tokens(files: list[Path], output: Path, val_fraction: float) -> dict:
    """``ddp tokens``: the bytes of ``files`` in order as uint16 token ids (vocab 256), the last ``val_fraction``
    held out, to ``output/train.bin`` and ``val.bin``, streamed (never read whole) and each written atomically."""
    from ddp.io import atomic_write  # the one way this project writes a file

    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ConfigError(f"ddp tokens: no such file(s): {', '.join(missing)}")
    total = sum(f.stat().st_size for f in files)
    if total == 0:
        raise ConfigError(f"ddp tokens: {', '.join(map(str, files))} hold no bytes")
    cut = total - int(total * val_fraction)
    output.mkdir(parents=True, exist_ok=True)
    for name, lo, hi in (("train.bin", 0, cut), ("val.bin", cut, total)):
        atomic_write(output / name, lambda f, lo=lo, hi=hi: _copy_range(files, lo, hi, f))
    meta = {"vocab": 256, "dtype": "uint16", "tokenizer": "bytes", "train_tokens": cut, "val_tokens": total - cut}
    atomic_write(output / META, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    return meta


def _copy_range(files: list[Path], lo: int, hi: int, out, chunk: int = 1 << 24) -> None:
    """Bytes ``lo`` to ``hi`` of the files' concatenation, as uint16, into ``out``."""
    offset = 0
    for path in files:
        size = path.stat().st_size
        start, stop = max(lo - offset, 0), min(hi - offset, size)
        with open(path, "rb") as f:
            f.seek(start)
            while start < stop:
                data = f.read(min(chunk, stop - start))
                out.write(np.frombuffer(data, dtype=np.uint8).astype("<u2").tobytes())
                start += len(data)
        offset += size
