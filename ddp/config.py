"""Configuration: one dataclass per concern, each field documented and validated.

The command line and ``--config run.toml`` are both built from these classes
(``ddp.options``), so ``--help`` shows every option with its default and the docstring
under its field. A config of an earlier version (a checkpoint's, a TOML file's) is brought
to today's sections by ``upgrade``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddp.errors import ConfigError


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"--{name.replace('_', '-')}: {message}")


PRECISIONS = ("fp32", "bf16", "fp16", "fp64")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


@dataclass
class TaskConfig:
    """What to train: a built-in task, or your own model, data and loss."""

    spec: str = "mlp"
    """mlp, cnn, npz, digits, charlm, tokens, or yours: FILE.py:NAME or package.module:NAME (a Task or a function)."""
    args: dict[str, Any] = field(default_factory=dict)
    """The task's own settings, its function's keyword arguments: --task-arg KEY=VALUE [KEY=VALUE ...]
    (repeatable), or a [task.args] table. A setting the task does not take is a usage error."""
    file_sha256: str = ""
    """A task file's content digest (sha256, 16 hex digits), recorded beside its path when a run starts, so that
    a moved or edited file is named as such; set by this project, never typed."""

    def __post_init__(self) -> None:
        _check(bool(self.spec), "task", "must name a task")
        if not isinstance(self.args, dict) or not all(isinstance(k, str) for k in self.args):
            raise ConfigError(f"--task-arg: expected KEY=VALUE pairs, got {self.args!r}")
        self.args = dict(self.args)
        self.spec = resolved_file_spec(self.spec)
        self.file_sha256 = self.file_sha256 or file_digest(self.spec)


def resolved_file_spec(spec: str) -> str:
    """``FILE.py:NAME`` with FILE made absolute where it names a file from here; any other spec as it is.

    A run records its task file where it is, not as typed: the same run whether it was started
    with a relative or an absolute path, and ``ddp verify`` of its weights works from any folder.
    """
    path = task_file(spec)
    if path is not None and not path.is_absolute() and path.is_file():
        return f"{path.resolve()}:{spec.rpartition(':')[2]}"
    return spec


def task_file(spec: str) -> Path | None:
    """The file a ``FILE.py:NAME`` spec names (there or not); None for any other spec."""
    where, sep, _ = spec.rpartition(":")
    return Path(where) if sep and where.endswith(".py") else None


def file_digest(spec: str) -> str:
    """The first 16 hex digits of the sha256 of the task file ``spec`` names; "" for another spec or no such file."""
    path = task_file(spec)
    if path is None or not path.is_file():  # a FIFO or a device is no task file: never opened
        return ""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def task_moved(old: dict, new: dict) -> bool:
    """Whether two configs' tasks (``to_dict`` sections) are one task file at two paths: the same NAME in it, the
    same content (its arguments are compared where they count, with the other settings)."""
    old_file, new_file = task_file(old.get("spec", "")), task_file(new["spec"])
    return (
        old_file is not None
        and new_file is not None
        and old_file != new_file
        and old["spec"].rpartition(":")[2] == new["spec"].rpartition(":")[2]
        and old.get("file_sha256", "") == new["file_sha256"] != ""
    )


@dataclass
class DataConfig:
    """How the task's samples are batched and loaded (what the samples are is the task's own setting)."""

    batch_size: int = 64
    """Samples per rank per micro-batch; the global batch is this x ranks x --grad-accum."""
    workers: int = 0
    """DataLoader worker processes per rank (0 loads in the training process). A batch a worker does not deliver
    within the longer of --timeout and --startup-timeout fails the run rather than waiting for good."""
    stream_replay: bool = False
    """Resume a stream by reading past the samples already trained on, even where its state was saved (a stream
    that splits itself, resumed on another world size)."""

    def __post_init__(self) -> None:
        _check(
            self.batch_size > 0,
            "batch_size",
            f"must be positive, got {self.batch_size}",
        )
        _check(self.workers >= 0, "workers", "cannot be negative")


@dataclass
class OptimConfig:
    """How parameters are updated."""

    optimizer: str = "sgd"
    """sgd (with momentum) or adamw."""
    lr: float = 0.05
    """Peak learning rate (0 trains nothing: the weights stay as they start, e.g. as --init-from gives them)."""
    min_lr: float = 0.0
    """The rate cosine decays to at the last step."""
    warmup_steps: int = 0
    """Steps of linear warmup from 0 to --lr before the schedule; the rate is a function of the step."""
    schedule: str = "cosine"
    """After warmup: cosine (from --lr down to --min-lr at the last step) or constant."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 0.0
    """Weight decay of matrices; biases, norms and embeddings never decay (unless --weight-decay-all)."""
    weight_decay_all: bool = False
    """Decay every parameter, biases, norms and embeddings too (one parameter group, as before this split)."""
    max_grad_norm: float | None = None
    """Clip the global gradient norm to this once per optimizer step (default: off; the norm is logged always)."""
    skip_nonfinite: int = 0
    """Skip up to N steps whose gradient norm is NaN or inf (a warning each); past that, or at 0, such a step
    stops the run before its update. Not under fp16, whose GradScaler skips such steps itself."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; gradients sync once per step (no_sync in between)."""
    precision: str = "fp32"
    """fp32; bf16 or fp16 autocast (fp16 with a GradScaler, on CPU too); fp64 runs the model in float64."""

    def __post_init__(self) -> None:
        _check(self.optimizer in ("sgd", "adamw"), "optimizer", "use sgd or adamw")
        _check(self.lr >= 0 and math.isfinite(self.lr), "lr", f"must be >= 0, got {self.lr}")
        _check(0 <= self.min_lr <= self.lr, "min_lr", f"must be in [0, --lr], got {self.min_lr}")
        _check(self.warmup_steps >= 0, "warmup_steps", "cannot be negative")
        _check(self.weight_decay >= 0, "weight_decay", "cannot be negative")
        _check(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", "must be positive (omit it: off)")
        _check(self.skip_nonfinite >= 0, "skip_nonfinite", "cannot be negative")
        _check(
            self.schedule in ("cosine", "constant"),
            "schedule",
            "use cosine or constant",
        )
        _check(self.grad_accum >= 1, "grad_accum", f"must be >= 1, got {self.grad_accum}")
        _check(self.precision in PRECISIONS, "precision", f"use one of {', '.join(PRECISIONS)}")


ASYNC_SAVES = ("auto", "off", "thread", "process")


@dataclass
class CheckpointConfig:
    """Periodic full-state checkpoints, and where a run starts from."""

    checkpoint_every: int = 0
    """Also save the full training state to disk every N optimizer steps (0: by time and at the end only)."""
    checkpoint_every_seconds: float = 600.0
    """Save to disk when this many seconds of training have passed since the last save, checked at logging steps
    (0: off; a power cut then loses everything since the last save)."""
    snapshot_every: str = "auto"
    """Copy the training state into host shared memory every N steps, for a restarted worker to resume from
    (losing at most one step): auto (every step while a copy costs under 2 % of the time), N, or 0 (off)."""
    snapshot_dir: str | None = None
    """Where snapshots live (default /dev/shm): a folder in memory that outlives the process, not a disk."""
    snapshot_replicas: int = 0
    """1: each rank's snapshots are also kept by a rank on another node, so a lost node's ranks resume from their
    partners' memory, bitwise (under FSDP, the only way a lost node does not send the job back to disk); costs as
    much host memory again and a transfer of each snapshot, in the background. 0: off."""
    keep_last: int = 3
    """Complete checkpoints to keep; older ones are deleted after a newer one commits."""
    resume: str = "auto"
    """auto (newest complete checkpoint in --out), never, or a checkpoint folder."""
    async_save: str = field(default="auto", metadata={"bare": "thread", "negated": "off"})
    """Write checkpoints off the training thread: thread, or process (a writer process, off the GIL); from the
    step's snapshot in host memory where there is one, so training stalls only for that copy. off: in step.
    auto (the default): thread where snapshots are taken (under FSDP too: each rank's shards, through DCP), in
    step without them; the last step's checkpoint in step. --async-save alone: thread."""
    init_from: str | None = None
    """Start from the weights in this file or folder (any format ddp inspect reads): a fresh optimizer, step 0.
    A checkpoint of this run in --out takes precedence: a restarted fine-tune resumes, it does not start over."""
    init_skip: str | None = None
    """A regular expression: tensors whose names match it keep their fresh initialisation (a new head)."""

    def __post_init__(self) -> None:
        _check(self.checkpoint_every >= 0, "checkpoint_every", "cannot be negative")
        _check(self.snapshot_replicas in (0, 1), "snapshot_replicas", f"use 0 or 1, got {self.snapshot_replicas}")
        self.snapshot_every = str(self.snapshot_every)  # a TOML file may give a number
        _check(self.async_save in ASYNC_SAVES, "async_save", f"use {', '.join(ASYNC_SAVES)}, got {self.async_save!r}")
        _check(
            self.snapshot_every == "auto" or self.snapshot_every.isdigit(),
            "snapshot_every",
            f"use auto, a number of steps, or 0 (off), got {self.snapshot_every!r}",
        )
        if self.init_skip is not None:
            try:
                re.compile(self.init_skip)
            except re.error as e:
                raise ConfigError(f"--init-skip: {self.init_skip!r} is not a regular expression: {e}") from None
            _check(self.init_from is not None, "init_skip", "needs --init-from")
        _check(
            self.checkpoint_every_seconds >= 0,
            "checkpoint_every_seconds",
            "cannot be negative",
        )
        _check(
            self.keep_last >= 2,
            "keep_last",
            f"must be >= 2, got {self.keep_last}: the newest checkpoint may still be being "
            "written when a crash hits, so an older complete one must survive",
        )


STRATEGIES = ("ddp", "fsdp")


@dataclass
class DistConfig:
    """The process group, and how the model is spread over it."""

    strategy: str = "ddp"
    """ddp: every rank holds the whole model (DistributedDataParallel); fsdp: each rank holds 1/N of the
    parameters, gradients and optimizer state (FSDP2 fully_shard), for models that do not fit one device."""
    backend: str = "auto"
    """auto (nccl when CUDA is available, else gloo), nccl or gloo."""
    timeout: float = 300.0
    """Seconds a training collective waits for a missing rank, from the first step's end, before every other rank
    names it and the job fails (PyTorch: 10 min on NCCL, 30 on gloo)."""
    startup_timeout: float = 600.0
    """Seconds a collective waits before the first step's end and after the last (joining, compiling, resuming,
    the export and verify: slow, but no hang)."""
    join_timeout: float = 60.0
    """Seconds a rank waits to reach the process group's store at start (or after a restart) before failing."""
    device: str = "auto"
    """auto (each rank's own GPU under nccl, the CPU under gloo), cpu, or cuda: GPU local_rank mod the
    visible GPUs, under gloo too, so that several ranks can share one GPU (a test setup, not for speed)."""
    bucket_cap_mb: float | None = None
    """DDP's gradient bucket size in MiB; unset: DDP's own (25, first bucket 1). Smaller ones sync earlier."""
    gradient_as_bucket_view: bool = True
    """Let parameter gradients live in DDP's buckets: saves a copy and the memory of one."""
    static_graph: bool = False
    """Tell DDP the graph never changes (not with --grad-accum > 1, where DDP asserts)."""

    def __post_init__(self) -> None:
        _check(self.strategy in STRATEGIES, "strategy", f"unknown {self.strategy!r}; use ddp or fsdp")
        _check(self.bucket_cap_mb is None or self.bucket_cap_mb > 0, "bucket_cap_mb", "must be positive")
        _check(
            self.backend in ("auto", "nccl", "gloo"),
            "backend",
            f"unknown {self.backend!r}; use auto, nccl or gloo",
        )
        _check(self.timeout > 0, "timeout", "must be positive")
        _check(self.startup_timeout > 0, "startup_timeout", "must be positive")
        _check(self.join_timeout > 0, "join_timeout", "must be positive")
        _check(self.device in ("auto", "cpu", "cuda"), "device", f"unknown {self.device!r}; use auto, cpu or cuda")


@dataclass
class RunConfig:
    """The run as a whole: its length, its seed and its folder."""

    out: str | None = None
    """Output folder for checkpoints, weights and metrics (default runs/<name>)."""
    name: str = "default"
    """Run name, used for the default --out."""
    epochs: int = 3
    """Epochs to train (ignored when --steps is set)."""
    steps: int | None = None
    """Total optimizer steps; overrides --epochs."""
    seed: int = 0
    """Seed for the data, the model's initial weights and every RNG."""
    overwrite: bool = False
    """Start this run in --out even though it holds another run: the old contents move to <out>.old-<time>."""

    def __post_init__(self) -> None:
        _check(self.epochs > 0, "epochs", f"must be positive, got {self.epochs}")
        _check(self.steps is None or self.steps > 0, "steps", f"must be positive, got {self.steps}")

    @property
    def out_dir(self) -> Path:
        """The output folder."""
        return Path(self.out) if self.out else Path("runs") / self.name


@dataclass
class ComputeConfig:
    """How the model's arithmetic runs: kernels, layout, compilation, recomputation."""

    deterministic: bool = False
    """torch.use_deterministic_algorithms(True) and seeded workers: bitwise-repeatable runs."""
    compile: bool = False
    """torch.compile the model before DDP wraps it."""
    sync_bn: bool = False
    """Convert BatchNorm layers to SyncBatchNorm (needs CUDA)."""
    memory_format: str = "auto"
    """Layout of conv weights and activations: auto (channels_last for a model with 2-D convolutions whose forward
    takes it, unless its task says otherwise) or a layout."""
    ac: str = "none"
    """Activation checkpointing: none, or full (each of the task's blocks recomputes its forward in the backward,
    keeping only its inputs: less memory for more compute)."""

    def __post_init__(self) -> None:
        _check(self.ac in ("none", "full"), "ac", f"unknown {self.ac!r}; use none or full")
        _check(
            self.memory_format in MEMORY_FORMATS,
            "memory_format",
            f"unknown {self.memory_format!r}; use {', '.join(MEMORY_FORMATS)}",
        )


@dataclass
class EvalConfig:
    """When the held-out split is scored, on how much of it, and what its results decide."""

    eval_every: int = 0
    """Evaluate every N optimizer steps too (0: at the end of each epoch only); always once at the end of training."""
    eval_samples: int = 65_536
    """Evaluate on at most this many held-out samples: a seeded subset of a larger split, the same at every
    evaluation and on any world size (0: all of them, however many)."""

    keep_best: str = ""
    """Keep the checkpoint of the evaluation with the best value of this metric (loss, accuracy, ...), beside
    --keep-last's and never pruned by them, and export it as <task>.best.params ('': off)."""
    keep_best_mode: str = "auto"
    """Whether the best --keep-best is the min or the max (auto: max for accuracy, min for anything else)."""
    early_stop: int = 0
    """End the run, as at its last step, after N evaluations in a row that did not improve the --keep-best
    metric (loss if none is given) by more than --early-stop-delta (0: never)."""
    early_stop_delta: float = 0.0
    """The least change of the monitored metric that counts as an improvement for --early-stop."""

    def __post_init__(self) -> None:
        _check(self.eval_every >= 0 and self.eval_samples >= 0, "eval_every", "and --eval-samples cannot be negative")
        _check(self.keep_best_mode in ("auto", "min", "max"), "keep_best_mode", f"unknown {self.keep_best_mode!r}; "
               "use auto, min or max")  # fmt: skip
        _check(self.early_stop >= 0, "early_stop", f"cannot be negative, got {self.early_stop}")
        _check(self.early_stop_delta >= 0, "early_stop_delta", f"cannot be negative, got {self.early_stop_delta}")

    @property
    def monitored(self) -> str:
        """The metric --keep-best and --early-stop watch ('' when neither is on)."""
        return self.keep_best or ("loss" if self.early_stop else "")

    @property
    def higher_is_better(self) -> bool:
        """Whether a larger value of the monitored metric is an improvement."""
        return self.keep_best_mode == "max" or (self.keep_best_mode == "auto" and "accuracy" in self.monitored)


@dataclass
class LogConfig:
    """What a run shows and records while it trains."""

    log_every: int = 10
    """Log a line (and a metrics.jsonl record) every N steps."""
    log_all_ranks: bool = False
    """Let every rank print, not only rank 0."""
    peak_tflops: float | None = None
    """The device's dense peak TFLOP/s in the run's precision, for mfu (default: known for current NVIDIA GPUs)."""
    tensorboard: bool = False
    """Write the logged figures as TensorBoard events under <out>/tensorboard (rank 0)."""
    wandb: bool = False
    """Send the logged figures to Weights & Biases (pip install 'ddp[wandb]'; offline unless WANDB_MODE says)."""

    def __post_init__(self) -> None:
        _check(self.log_every > 0, "log_every", "must be positive")
        _check(self.peak_tflops is None or self.peak_tflops > 0, "peak_tflops", "must be positive")


@dataclass
class ExportConfig:
    """The trained weights written at the end, and how closely every rank's reload must agree."""

    format: str = "torch"
    """Format of the exported weights <out>/<task>.params (mlp.params for mlp): torch or safetensors."""
    atol: float | None = None
    """Verify tolerance; default 0 (bitwise) in fp32, looser for bf16/fp16 or mixed fleets."""

    def __post_init__(self) -> None:
        _check(self.format in ("torch", "safetensors"), "format", "use torch or safetensors")
        _check(self.atol is None or self.atol >= 0, "atol", "cannot be negative")


SECTIONS = {
    "task": TaskConfig,
    "run": RunConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "compute": ComputeConfig,
    "checkpoint": CheckpointConfig,
    "eval": EvalConfig,
    "log": LogConfig,
    "export": ExportConfig,
    "dist": DistConfig,
}

# Fields that moved to a section of their own: (old section, field) -> its section now. Configs written before
# (checkpoints', model cards', TOML files) are read through ``upgrade``, which moves them.
MOVED = {
    **{("run", k): "compute" for k in ("deterministic", "compile", "sync_bn", "memory_format", "ac")},
    **{("run", k): "eval" for k in ("eval_every", "eval_samples")},
    **{("run", k): "log" for k in ("log_every", "log_all_ranks", "peak_tflops", "tensorboard", "wandb")},
    ("checkpoint", "format"): "export",
    ("dist", "atol"): "export",
}

# Settings whose change on resume makes the result differ from an uninterrupted run.
EXACTNESS = {
    "task": ("spec", "args", "file_sha256"),
    "run": ("seed", "steps", "epochs"),
    "compute": ("deterministic", "memory_format"),
    "data": ("batch_size",),
    "dist": ("strategy",),  # FSDP reduces gradients in another order: equal to ~1e-16, not bitwise
    "optim": (
        "optimizer",
        "lr",
        "min_lr",
        "warmup_steps",
        "momentum",
        "weight_decay",
        "weight_decay_all",
        "schedule",
        "max_grad_norm",
        "grad_accum",
        "precision",
    ),
}


@dataclass
class Config:
    """Everything a training run needs."""

    task: TaskConfig = field(default_factory=TaskConfig)
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def __post_init__(self) -> None:
        if self.task.args.get("data") and self.task.spec == "mlp":
            self.task.spec = "npz"  # --data FILE.npz alone: the MLP on the user's arrays, as before tasks

    def to_dict(self) -> dict:
        """Plain nested dict (lists for tuples), safe for weights-only loading."""
        return {name: _plain(dataclasses.asdict(getattr(self, name))) for name in SECTIONS}

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        """Build from a nested dict such as ``to_dict`` or a TOML file gives (older forms upgraded)."""
        if not isinstance(d, dict) or not all(isinstance(v, dict) for v in d.values()):
            raise ConfigError(f"a config is a table of sections, each a table of settings; got {str(d)[:200]}")
        d = upgrade(d)
        unknown = set(d) - set(SECTIONS)
        if unknown:
            raise ConfigError(f"unknown config section(s) {sorted(unknown)}; use {sorted(SECTIONS)}")
        return cls(**{name: _build(kind, d.get(name, {}), name) for name, kind in SECTIONS.items()})


def _plain(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _build(kind: type, values: dict, section: str):
    if not isinstance(values, dict):
        raise ConfigError(f"[{section}] must be a table of settings, not {values!r}")
    fields = {f.name: f for f in dataclasses.fields(kind)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ConfigError(f"unknown setting(s) {sorted(unknown)} in [{section}]; known: {sorted(fields)}")
    for name, value in values.items():
        if not _fits(value, typing.get_type_hints(kind)[name]):
            raise ConfigError(f"[{section}] {name} = {value!r}: expected {_type_name(kind, name)}")
    return kind(**values)


def _fits(value: Any, annotation: Any) -> bool:
    """Whether a value read from a file or a dict can be the field's: its type, or None where allowed."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin in (tuple, list):
        return isinstance(value, (tuple, list)) and all(_fits(v, args[0]) for v in value)
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is Any or not isinstance(annotation, type):
        return True
    return isinstance(value, annotation)


def _type_name(kind: type, name: str) -> str:
    return str(typing.get_type_hints(kind)[name]).replace("typing.", "").replace("<class '", "").replace("'>", "")


# Settings of the built-in tasks that were options of their own ([model], three of [data]) before they became
# the tasks' arguments: the old flags remain as aliases of --task-arg. Each with its old default.
TASK_OPTIONS: dict[str, tuple[Any, str]] = {
    "in_features": (20, "Input features of the MLP (mlp)."),
    "hidden": ((256,), "Hidden layer widths of the MLP, e.g. --hidden 256 128 (mlp, npz)."),
    "out_features": (10, "Number of classes (mlp, cnn, npz)."),
    "width": (32, "Channels of the first convolution (cnn, digits)."),
    "batchnorm": (False, "A BatchNorm after each hidden layer: a model with buffers (mlp, cnn, npz)."),
    "dropout": (0.0, "Dropout probability after each hidden layer (mlp, npz, digits, charlm)."),
    "samples": (4096, "Size of the synthetic dataset (mlp, cnn)."),
    "val_fraction": (0.1, "Share of the samples held out for evaluation (every built-in task)."),
    "data": (None, "A .npz file with arrays X (samples) and y (int labels): the MLP on your data (npz)."),
}
# Which of those each built-in task read, before they became its arguments.
READ_BEFORE = {
    "mlp": ("in_features", "hidden", "out_features", "batchnorm", "dropout", "samples", "val_fraction"),
    "cnn": ("width", "out_features", "batchnorm", "samples", "val_fraction"),
    "npz": ("data", "hidden", "out_features", "batchnorm", "dropout", "val_fraction"),
    "charlm": ("val_fraction",),
}


def upgrade(old: dict, explicit: bool = False) -> dict:
    """A config of an earlier version in today's form; today's passes unchanged.

    ``model.arch`` became ``task.spec``; DDP was the only strategy; ``async_save`` was a switch; the built-in tasks'
    settings (``[model]``, ``data.samples``, ``data.val_fraction``, ``data.data``) became
    ``task.args``. From a stored config (a checkpoint's, which wrote every field) only
    those the task read and that differ from their old defaults move, so that an old
    checkpoint resumed with the same flags reports no change. From a file of the user's
    (``explicit``) every one moves, so that a setting the task does not take is refused.
    """
    old = _move_fields(old)
    saving = old.get("checkpoint", {})
    if isinstance(saving.get("async_save"), bool):  # was a switch: on meant a thread
        old = {**old, "checkpoint": {**saving, "async_save": "thread" if saving["async_save"] else "off"}}
    dist = old.get("dist", {})
    if "strategy" not in dist:
        old = {**old, "dist": {**dist, "strategy": "ddp"}}
    data = old.get("data", {})
    moved = {**old.get("model", {}), **{k: v for k, v in data.items() if k in TASK_OPTIONS}}
    if not moved:
        return old
    arch = moved.pop("arch", "mlp")
    task = dict(old.get("task") or {"spec": "npz" if moved.get("data") and arch == "mlp" else arch})
    args = dict(task.get("args", {}))
    for key, value in moved.items():
        default = TASK_OPTIONS[key][0] if key in TASK_OPTIONS else None
        unused = key not in READ_BEFORE.get(task["spec"], ()) or value == (
            list(default) if isinstance(default, tuple) else default
        )
        if explicit or not unused:
            args.setdefault(key, value)
    rest = {k: v for k, v in old.items() if k not in ("model", "data", "task")}
    return {**rest, "data": {k: v for k, v in data.items() if k not in TASK_OPTIONS}, "task": {**task, "args": args}}


def _move_fields(old: dict) -> dict:
    """``old`` with every field of ``MOVED`` in its section of today (a value given in both places: today's)."""
    if not any(key in old.get(section, {}) for section, key in MOVED):
        return old
    new = {name: dict(values) if isinstance(values, dict) else values for name, values in old.items()}
    for (section, key), to in MOVED.items():
        if key in new.get(section, {}):
            new.setdefault(to, {}).setdefault(key, new[section].pop(key))
    return new


def config_changes(old: dict, new: Config) -> list[str]:
    """Settings that differ from a checkpoint's config and break exact resumption.

    A setting the checkpoint's version did not have yet counts as its default there.
    """
    old, now, default = upgrade(old), new.to_dict(), Config().to_dict()
    before = {s: {k: old.get(s, {}).get(k, default[s][k]) for k in keys} for s, keys in EXACTNESS.items()}
    same = set()
    if task_moved(before["task"], now["task"]):  # the same file at another path: nothing changed but where
        same.add(("task", "spec"))
    if not before["task"]["file_sha256"]:  # a checkpoint of a version that recorded no digest: unknown
        same.add(("task", "file_sha256"))
    return [
        f"{key} {before[section][key]!r} -> {now[section][key]!r}"
        for section, keys in EXACTNESS.items()
        for key in keys
        if before[section][key] != now[section][key] and (section, key) not in same
    ]
