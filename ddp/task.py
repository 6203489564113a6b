"""What the trainer needs from a user: a model, data and a loss, and nothing more.

A ``Task`` is a plain dataclass of the user's own objects::

    task = ddp.Task(
        model=lambda: MyNet(),               # called on every rank after seeding: same weights
        train_data=MyDataset("train"),       # any map-style Dataset: __len__, __getitem__(i)
        val_data=MyDataset("val"),           # optional
        loss=lambda model, batch: ...,       # optional; default cross-entropy of model(x) vs y
    )

The trainer owns everything else: devices, DDP, sharding, checkpoints, exact resume,
export and verification. Built-in tasks live in ``ddp/tasks/``, one file each.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, IterableDataset, TensorDataset, default_collate

from ddp.errors import ConfigError

Batch = Any
"""What the collate function returns: a tensor, or a tuple, list or dict of them."""


@dataclass
class Task:
    """A model, its data and its loss: everything the trainer takes from a user."""

    model: Callable[[], nn.Module]
    """Builds a fresh model; the trainer seeds every RNG first, so every rank gets the same weights."""
    train_data: Dataset | Callable[[], Dataset]
    """A map-style Dataset (``__len__``, ``__getitem__`` of one sample; a TensorDataset takes a faster path), an
    IterableDataset (a stream: ``ddp.stream`` says how it is split and resumed), or a function returning one:
    the data is then read only when training needs it, so that ``ddp verify`` and
    ``ddp predict`` rebuild the model without it."""
    val_data: Dataset | Callable[[], Dataset] | None = None
    """Held-out samples, evaluated after each epoch (optional); a function returning them, like ``train_data``."""
    collate: Callable[[list], Batch] | None = None
    """Samples -> batch; default: torch's default_collate (tuples and dicts of tensors)."""
    draws_random: bool = True
    """Whether the datasets' ``__getitem__`` may draw from Python's, numpy's or torch's global generators
    (augmentation, masking, crops). True, the safe default: each sample is read with every generator seeded for
    it (``ddp.data.SeededSamples``, about 10 us a sample), so a resumed run reads what an uninterrupted one does.
    False, for data that draws nothing: samples are read as they come, a whole batch in one call where the
    dataset has ``__getitems__``."""
    loss: Callable[[nn.Module, Batch], torch.Tensor] | None = None
    """``loss(model, batch)`` -> scalar tensor; default: cross-entropy of ``model(x)`` against ``y``."""
    probe: Any = None
    """The model input every rank uses to verify reloads: a tensor (``model(x)``), a tuple
    (``model(*x)``) or a dict (``model(**x)``). Default: the inputs of the first validation
    batch of ``(x, y)`` data."""
    metrics: Callable[[nn.Module, Batch], Mapping[str, float]] | None = None
    """``metrics(model, batch)`` -> sums over the batch, with a ``count`` entry; the trainer
    reports each sum / count. Default: loss, and accuracy for ``(x, y)`` classification (with a ``loss``
    of the task's own too, from the logits of its forward)."""
    summarize: Callable[[dict[str, float]], dict[str, float]] | None = None
    """Adds derived figures to the averaged metrics (e.g. perplexity from loss)."""
    channels_last: bool | None = None
    """Train in channels_last under ``--memory-format auto`` (convnets run faster so): True or False, or None
    to let the model decide: channels_last where it has 2-D convolutions and its forward takes that layout."""
    blocks: Callable[[nn.Module], Iterable[nn.Module]] | None = None
    """Under ``--strategy fsdp``: the submodules to shard one by one, e.g. ``lambda m: m.layers``
    (each transformer block); the root holds the rest. Default: the blocks a Hugging Face model declares
    (``_no_split_modules``), or else each child with parameters, containers and children holding a weight tied
    to one outside them opened up. The log names the units chosen."""
    name: str = "task"
    """A name for logs, and for the exported weights' file (``<name>.params``)."""
    weights_file: str | None = None
    """The exported weights' file name in ``--out``; default ``<name>.params`` (``mlp.params`` for mlp, as the
    textbook names it)."""
    tokens_per_sample: int | None = None
    """Tokens a sample holds (a language model's block): the log then reports tokens_per_s too."""
    model_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Task arguments, beyond those given, that rebuild the model without the data (a vocabulary found in
    the text, an input width found in a file): the exported weights' config records them."""
    tokenizer: str | None = None
    """The Hugging Face ``tokenizer.json`` the token data was made with (``ddp tokens --bpe``): ``ddp sample``
    encodes and decodes with it, and ``ddp export --format hf`` ships it beside the weights."""

    def __post_init__(self) -> None:
        if not callable(self.model):
            raise ConfigError(f"task {self.name!r}: model must be a callable that builds an nn.Module")
        self._check_data()

    def _check_data(self) -> None:
        for field_name in ("train_data", "val_data"):
            data = getattr(self, field_name)
            if (data is None and field_name == "val_data") or _lazy(data):
                continue
            if isinstance(data, IterableDataset):
                if field_name == "val_data":
                    raise ConfigError(
                        f"task {self.name!r}: val_data is a {type(data).__name__}, an IterableDataset; held-out "
                        "samples are evaluated as a map-style Dataset (__len__, __getitem__), the same ones every "
                        "time: take a fixed number of the stream's into a list or TensorDataset"
                    )
                continue  # a stream (ddp.stream): split over the ranks as it is read
            lacks = [m for m in ("__len__", "__getitem__") if not hasattr(data, m)]
            if lacks:
                raise ConfigError(
                    f"task {self.name!r}: {field_name} is a {type(data).__name__} without {' and '.join(lacks)}; "
                    "the trainer takes a map-style Dataset (__len__, and __getitem__ of one sample) or an "
                    "IterableDataset (a stream)"
                )
        if (
            not _lazy(self.train_data)
            and not isinstance(self.train_data, IterableDataset)
            and len(self.train_data) == 0
        ):
            raise ConfigError(f"task {self.name!r}: train_data is empty")
        file = self.weights_file or f"{self.name}.params"
        if not file or "/" in file or file.startswith(".") or file in ("checkpoints", "metrics.jsonl"):
            raise ConfigError(f"task {self.name!r}: {file!r} cannot be the weights' file name; give a plain name")
        self.weights_file = file

    def batch_of(self, dataset: Dataset, indices: Sequence[int]) -> Batch:
        """The batch of the given samples, as the trainer's loader makes it."""
        if isinstance(dataset, TensorDataset) and self.collate is None:
            return dataset[list(indices)]
        fetch = getattr(dataset, "__getitems__", None)  # one call per batch where the dataset has it
        samples = fetch(list(indices)) if fetch else [dataset[i] for i in indices]
        return (self.collate or default_collate)(samples)

    def compute_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The task's loss, or cross-entropy for ``(x, y)`` batches."""
        if self.loss is not None:
            return self.loss(model, batch)
        x, y = _pair(batch, self.name)
        return F.cross_entropy(model(x), y)

    def compute_metrics(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        """Sums over one batch with a ``count``: the task's, or loss (and accuracy) by default."""
        if self.metrics is not None:
            sums = dict(self.metrics(model, batch))
            if "count" not in sums:
                raise ConfigError(
                    f"task {self.name!r}: metrics() must return sums and a 'count'; it gave {sorted(sums)}"
                )
            return sums
        if self.loss is not None:
            return self._loss_metrics(model, batch)
        x, y = _pair(batch, self.name)
        logits = model(x).float()
        return {
            "loss": F.cross_entropy(logits, y, reduction="sum").item(),
            "accuracy": (logits.argmax(1) == y).sum().item(),
            "count": len(y),
        }

    def _loss_metrics(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        """The task's loss, and accuracy where the batch is ``(x, y)`` with class labels and the loss ran the
        model once on it, to logits: the default metrics that apply, from the loss's own forward."""
        outputs: list[Any] = []
        hook = model.register_forward_hook(lambda _module, _inputs, output: outputs.append(output))
        try:
            loss = self.loss(model, batch)
        finally:
            hook.remove()
        n = batch_size(batch)
        sums = {"loss": loss.item() * n, "count": n}
        y = batch[1] if isinstance(batch, (tuple, list)) and len(batch) == 2 else None
        logits = outputs[0] if len(outputs) == 1 else None
        if (
            isinstance(y, torch.Tensor)
            and isinstance(logits, torch.Tensor)
            and y.dim() == 1
            and not (y.is_floating_point() or y.is_complex())
            and logits.dim() == 2
            and logits.shape[0] == len(y)
        ):
            sums["accuracy"] = (logits.argmax(1) == y).sum().item()
        return sums

    def finish_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Averages from summed metrics, plus the task's derived ones."""
        count = sums.pop("count", 0)
        means = {k: v / count if count else math.nan for k, v in sums.items()}
        return self.summarize(means) if self.summarize else means

    def load_data(self) -> Task:
        """Read data given as functions (once), and check it as eager data is checked; the task."""
        for field_name in ("train_data", "val_data"):
            data = getattr(self, field_name)
            if _lazy(data):
                try:
                    setattr(self, field_name, data())
                except ConfigError:
                    raise
                except Exception as e:
                    raise ConfigError(
                        f"task {self.name!r}: reading {field_name} failed: {type(e).__name__}: {e}"
                    ) from e
        self._check_data()
        return self

    def probe_input(self, n: int = 16) -> Any:
        """The verify input: ``probe``, or the inputs of the first (validation) batch of ``(x, y)`` data."""
        if self.probe is not None:
            return self.probe
        self.load_data()
        data = self.val_data if self.val_data is not None and len(self.val_data) > 0 else self.train_data
        if isinstance(data, IterableDataset):  # the stream's first samples (the caller seeds the RNGs)
            batch = (self.collate or default_collate)(list(itertools.islice(data, n)))
        else:
            batch = self.batch_of(data, range(min(n, len(data))))
        if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], torch.Tensor):
            return batch[0]
        raise ConfigError(
            f"task {self.name!r}: cannot derive a probe from batches of type {type(batch).__name__} "
            "(only from (x, y) pairs); set Task.probe to a model input (a tensor, tuple or dict)"
        )


def _lazy(data: Any) -> bool:
    """Data given as a function that returns it (a Dataset is not called)."""
    return callable(data) and not hasattr(data, "__getitem__")


def check_setting(ok: bool, name: str, message: str) -> None:
    """A task's usage error for its setting ``name`` (``--name``, or ``--task-arg name=``) unless ``ok``."""
    if not ok:
        raise ConfigError(f"--{name.replace('_', '-')}: {message}")


def widths(value: int | Sequence[int], name: str = "hidden") -> tuple[int, ...]:
    """Layer widths given as one number or a list of them (``--hidden 64 32``, ``--task-arg hidden=[64, 32]``)."""
    found = (value,) if isinstance(value, int) else tuple(value)
    check_setting(
        all(isinstance(w, int) and w > 0 for w in found), name, f"widths must be positive integers, got {value!r}"
    )
    return found


def _pair(batch: Batch, name: str) -> tuple[Any, torch.Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ConfigError(
        f"task {name!r}: the default loss takes (x, y) batches, got a {type(batch).__name__}; "
        "give the task a loss(model, batch) (and metrics, or accept the loss as the only metric)"
    )


def batch_size(batch: Batch) -> int:
    """Samples in a batch: the leading size of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return len(batch)
    values = batch.values() if isinstance(batch, Mapping) else batch
    for v in values:
        if isinstance(v, torch.Tensor) or isinstance(v, (tuple, list, Mapping)):
            return batch_size(v)
    raise ConfigError(f"cannot tell the size of a batch of type {type(batch).__name__}")


def to_device(batch: Batch, device: torch.device, dtype: torch.dtype | None = None) -> Batch:
    """The batch on ``device``; floating tensors cast to ``dtype`` (integers, such as labels, kept)."""
    if isinstance(batch, torch.Tensor):
        cast = dtype if dtype is not None and batch.is_floating_point() else None
        return batch.to(device, cast, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: to_device(v, device, dtype) for k, v in batch.items()})
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device, dtype) for v in batch)
    return batch


def call(model: nn.Module, x: Any) -> Any:
    """``model(x)`` for a tensor, ``model(*x)`` for a tuple or list, ``model(**x)`` for a dict."""
    if isinstance(x, Mapping):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)
