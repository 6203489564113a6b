"""A GPT (charlm's model) on nanoGPT-format token files: flat little-endian token ids, memory-mapped.

    ddp tokens book.txt notes.txt --output data/books     # byte-level: train.bin, val.bin, meta.json
    ddp tokens book.txt --bpe 4096 --output data/bpe       # a byte-level BPE trained on them: + tokenizer.json
    ddp train --task tokens --task-arg train=data/books/train.bin val=data/books/val.bin --steps 2000

A vocabulary of up to 65,536 ids is stored as uint16, a larger one as uint32; ``meta.json``
says which, with the vocabulary's size and the tokenizer (``bytes``, or the Hugging Face
``tokenizer.json`` beside the files, which ``ddp sample`` and ``--format hf`` export use).

One training sample per token offset (nanoGPT's ``get_batch`` draws the same windows at random):
``block`` tokens in, the next ``block`` out. The held-out file is scored in windows that do not
overlap (stride ``block``): each token once, as held-out loss is reported. The files are never
read whole: each process, DataLoader workers included, maps them on first use, and the sampler
draws positions without a list of them, so a corpus of 10^10 tokens costs what one of 10^6 does.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ddp.errors import ConfigError
from ddp.io import is_file_name
from ddp.task import Task
from ddp.tasks.charlm import CharLM, loss, metrics, with_perplexity

DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
TOKENIZER = "tokenizer.json"
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
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The windows at ``indices``, read in one gather (the DataLoader calls this once per batch), as
        ``(tokens in, tokens out)`` pairs."""
        if self.map is None:
            self.map = np.memmap(self.path, dtype=DTYPES[self.dtype], mode="r")
        starts = np.asarray(indices, dtype=np.int64) * self.stride
        windows = self.map[starts[:, None] + np.arange(self.block + 1)].astype(np.int64)
        top = int(windows.max())
        if top >= self.vocab:  # found here, named, not later as an embedding's index error
            row, column = np.unravel_index(int(windows.argmax()), windows.shape)
            raise ConfigError(
                f"--task-arg {self.arg}={self.path}: token id {top} at offset {int(starts[row]) + int(column)} is not "
                f"below vocab={self.vocab}; give the vocabulary's size (--task-arg vocab=N)"
            )
        batch = torch.from_numpy(windows)
        return list(zip(batch[:, :-1].contiguous().unbind(), batch[:, 1:].contiguous().unbind(), strict=True))


def task(
    train: str | None = None,
    val: str | None = None,
    dtype: str | None = None,
    vocab: int | None = None,
    tokenizer: str | None = None,
    block: int = 64,
    layers: int = 2,
    heads: int = 4,
    embd: int = 64,
    dropout: float = 0.1,
) -> Task:
    """charlm's GPT over ``vocab`` token ids stored as ``dtype``, made with ``tokenizer`` (each by default from the
    ``meta.json`` beside ``train``, as ``ddp tokens`` writes it; uint16 and bytes without one)."""
    if train is None:
        raise ConfigError("task tokens needs a token file: --task-arg train=FILE.bin (make one with `ddp tokens`)")
    meta = read_meta(Path(train)) if vocab is None or dtype is None or tokenizer is None else {}
    if vocab is None:
        vocab = _needs_vocab(meta, Path(train))
    dtype = dtype or meta.get("dtype", "uint16")
    if dtype not in DTYPES:
        raise ConfigError(f"--task-arg dtype={dtype}: use uint16 or uint32 (for vocabularies past 65,536)")
    if tokenizer is None and meta.get("tokenizer", "bytes") != "bytes":
        tokenizer = str((Path(train).parent / meta["tokenizer"]).resolve())
    data = functools.cache(lambda arg, path, stride: TokenWindows(path, dtype, block, vocab, arg, stride))
    return Task(
        model=lambda: CharLM(torch.arange(vocab), block, layers, heads, embd, dropout),
        train_data=lambda: data("train", train, 1),
        val_data=None if val is None else (lambda: data("val", val, block)),
        loss=loss,
        metrics=metrics,
        summarize=with_perplexity,
        blocks=lambda model: model.blocks,
        draws_random=False,  # windows of a file: no per-sample seeding, a batch in one gather
        name="tokens",
        tokens_per_sample=block,
        model_args={"vocab": vocab, "dtype": dtype, **({"tokenizer": tokenizer} if tokenizer else {})},
        tokenizer=tokenizer,
    )


def read_meta(train: Path) -> dict:
    """The ``meta.json`` beside a token file (``{}`` where there is none), its fields checked."""
    meta = train.parent / META
    if not meta.is_file():
        return {}
    try:
        doc = json.loads(meta.read_text())
        vocab = doc["vocab"]
        if not isinstance(vocab, int) or isinstance(vocab, bool) or not 0 < vocab <= 2**32:
            raise ValueError(f"vocab must be a positive whole number, not {vocab!r}")
        if doc.get("dtype", "uint16") not in DTYPES or not is_file_name(doc.get("tokenizer", "bytes")):
            raise ValueError(f"dtype {doc.get('dtype')!r} or tokenizer {doc.get('tokenizer')!r} is not one this reads")
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        said = f"task tokens: {meta} is not a token files' meta.json ({e}); pass --task-arg vocab=N"
        raise ConfigError(said) from None
    return doc


def _needs_vocab(meta: dict, train: Path) -> int:
    if "vocab" not in meta:
        raise ConfigError(
            f"task tokens needs the vocabulary's size: --task-arg vocab=N (no {META} beside {train}; "
            "`ddp tokens` writes one, with 256 for its byte-level files)"
        )
    return meta["vocab"]


def write_byte_tokens(files: list[Path], output: Path, val_fraction: float) -> dict:
    """``ddp tokens``: the bytes of ``files`` in order as uint16 token ids (vocab 256), the last ``val_fraction``
    held out, to ``output/train.bin`` and ``val.bin``, streamed (never read whole) and each written atomically."""
    from ddp.io import atomic_write  # the one way this project writes a file

    _check_files(files)
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


def write_tokenized(
    files: list[Path], output: Path, val_fraction: float, bpe: int | None = None, tokenizer: Path | None = None
) -> dict:
    """``ddp tokens --bpe N`` or ``--tokenizer FILE``: the text of ``files`` encoded with a byte-level BPE of ``N``
    ids trained on them (Hugging Face ``tokenizers``), or with an existing ``tokenizer.json``; written as
    ``write_byte_tokens`` writes bytes, with ``tokenizer.json`` beside. Streamed: a megabyte of text at a time,
    split at line ends, and the ids through a file, never all in memory."""
    from ddp.io import atomic_write

    _check_files(files)
    tok = _train_bpe(files, bpe) if bpe is not None else _read_tokenizer(tokenizer)
    vocab = tok.get_vocab_size()
    dtype = "uint16" if vocab <= 2**16 else "uint32"
    width = np.dtype(DTYPES[dtype]).itemsize
    output.mkdir(parents=True, exist_ok=True)
    ids = output / f".ids.tmp-{os.getpid()}"
    try:
        with open(ids, "wb") as f:
            for chunk in _text_chunks(files):
                f.write(np.asarray(tok.encode(chunk).ids, dtype=f"<u{width}").tobytes())
        total = ids.stat().st_size // width
        if total == 0:
            raise ConfigError(f"ddp tokens: {', '.join(map(str, files))} hold no text")
        cut = total - int(total * val_fraction)
        for name, lo, hi in (("train.bin", 0, cut), ("val.bin", cut, total)):
            atomic_write(output / name, lambda f, lo=lo, hi=hi: _copy_range([ids], lo * width, hi * width, f, raw=True))
    finally:
        ids.unlink(missing_ok=True)
    atomic_write(output / TOKENIZER, lambda f: f.write(tok.to_str().encode()))
    meta = {"vocab": vocab, "dtype": dtype, "tokenizer": TOKENIZER, "train_tokens": cut, "val_tokens": total - cut}
    atomic_write(output / META, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    return meta


def codec(tokenizer: str | None) -> tuple[Callable[[str], list[int]], Callable[[list[int]], str]]:
    """(encode, decode) of a tokens model's text: its ``tokenizer.json``, or UTF-8 bytes without one."""
    if tokenizer is None:
        return (lambda text: list(text.encode())), (lambda ids: bytes(ids).decode(errors="replace"))
    tok = _read_tokenizer(Path(tokenizer))
    return (lambda text: tok.encode(text).ids), (lambda ids: tok.decode(ids))


def _check_files(files: list[Path]) -> None:
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ConfigError(f"ddp tokens: no such file(s): {', '.join(missing)}")


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ConfigError(
            "ddp tokens --bpe and --tokenizer need Hugging Face tokenizers: pip install tokenizers"
        ) from None
    return tokenizers


def _train_bpe(files: list[Path], size: int):
    """A byte-level BPE (GPT-2's kind: every byte is a token, so any text encodes) of ``size`` ids."""
    tk = _tokenizers()
    alphabet = tk.pre_tokenizers.ByteLevel.alphabet()
    if size < len(alphabet):
        raise ConfigError(f"--bpe {size}: a byte-level BPE needs at least {len(alphabet)} ids, one per byte")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=size, initial_alphabet=alphabet, show_progress=False)
    try:
        tok.train([str(f) for f in files], trainer)
    except Exception as e:  # the Rust side raises its own exception types (an unreadable or non-UTF-8 file)
        raise ConfigError(f"ddp tokens --bpe: training on {', '.join(map(str, files))} failed: {e}") from None
    return tok


def _read_tokenizer(path: Path | None):
    tk = _tokenizers()
    if path is None or not path.is_file():
        raise ConfigError(f"--tokenizer {path}: no such file; give a Hugging Face tokenizer.json")
    try:
        return tk.Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side's own exception: not a tokenizer.json
        raise ConfigError(f"--tokenizer {path}: not a Hugging Face tokenizer.json ({e})") from None


def _text_chunks(files: list[Path], size: int = 1 << 20):
    """The files' text about ``size`` characters at a time, each chunk ending at a line end (a token never spans
    two chunks but at a line end)."""
    for path in files:
        with open(path, encoding="utf-8", newline="") as f:
            lines: list[str] = []
            held = 0
            try:
                for line in f:
                    lines.append(line)
                    held += len(line)
                    if held >= size:
                        yield "".join(lines)
                        lines, held = [], 0
            except UnicodeDecodeError as e:
                raise ConfigError(f"ddp tokens: {path} is not UTF-8 text ({e.reason}); --bpe encodes text") from None
            if lines:
                yield "".join(lines)


def _copy_range(files: list[Path], lo: int, hi: int, out, chunk: int = 1 << 24, raw: bool = False) -> None:
    """Bytes ``lo`` to ``hi`` of the files' concatenation, as uint16 (as they are, ``raw``), into ``out``."""
    offset = 0
    for path in files:
        size = path.stat().st_size
        start, stop = max(lo - offset, 0), min(hi - offset, size)
        with open(path, "rb") as f:
            f.seek(start)
            while start < stop:
                data = f.read(min(chunk, stop - start))
                out.write(data if raw else np.frombuffer(data, dtype=np.uint8).astype("<u2").tobytes())
                start += len(data)
        offset += size
