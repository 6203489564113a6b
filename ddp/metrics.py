"""What a user watches: a progress bar or log lines, metrics.jsonl, and a loss plot."""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ddp.device import peak_memory_mb
from ddp.errors import DDPError
from ddp.io import atomic_write

METRICS = "metrics.jsonl"


class MetricsWriter:
    """Appends one JSON object per line to ``<out>/metrics.jsonl`` (rank 0 only): the log of one run.

    After a restart the log reads as if the run had never stopped: records past the step
    it resumes from (written after that checkpoint) are dropped, and ``time`` goes on from
    the training time the checkpoint recorded.
    """

    def __init__(self, out: Path, enabled: bool) -> None:
        self.path = out / METRICS
        self.enabled = enabled
        self.start = time.monotonic()
        self.offset = 0.0  # training seconds before this attempt
        self.run: str | None = None
        self.trackers: list = []  # ddp.trackers: each gets every record too

    def elapsed(self) -> float:
        """Seconds of training, this attempt's and those before it."""
        return self.offset + time.monotonic() - self.start

    def resume(self, run: str, step: int, elapsed: float) -> None:
        """Continue the log of ``run`` from ``step``: later records go, the clock goes on from ``elapsed``."""
        self.run, self.offset, self.start = run, elapsed, time.monotonic()
        if not self.enabled or not self.path.exists():
            return
        lines = self.path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        if len(kept) != len(lines):
            atomic_write(self.path, lambda f: f.write("".join(kept).encode()))

    def write(self, kind: str, **values: Any) -> None:
        """Record one event ('train' or 'eval') with its values and the training time."""
        if not self.enabled:
            return
        record = {"kind": kind, "run": self.run, **values, "time": round(self.elapsed(), 4)}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for tracker in self.trackers:
            tracker.log(kind, values["step"], {k: v for k, v in record.items() if k not in ("kind", "run")})

    def add(self, tracker: Any) -> None:
        """Send every record to ``tracker`` too (``ddp.trackers.Tracker``), on rank 0."""
        if self.enabled:
            self.trackers.append(tracker)

    def close(self) -> None:
        """Close every tracker."""
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def step_timing(timing: dict, device: torch.device) -> list[float]:
    """This rank's figures for ``step_figures``: its mean step, seconds of data and of steps, peak memory.

    ``timing``: this rank's seconds of steps and of data loading since the last record, and the steps counted.
    """
    return [timing["step"] / max(timing["steps"], 1), timing["data"], timing["step"], peak_memory_mb(device)]


def step_figures(ranks: list[list[float]], step_flops: float | None = None, peak: float | None = None) -> dict:
    """A logged step's figures from every rank's ``step_timing`` (gathered by the trainer's agreement): the mean
    step time, the slowest and whose, the share of it spent waiting for data, rank 0's peak memory, and the
    TFLOP/s each rank achieved (with ``mfu``, its share of the device's ``peak``).

    ``step_flops``: the FLOPs of one step on one rank (``FlopCounterMode``: recomputation included).
    """
    means = [r[0] for r in ranks]
    slowest = max(range(len(ranks)), key=lambda r: means[r])
    figures = {
        "step_time": round(sum(means) / len(means), 6),
        "step_time_max": round(means[slowest], 6),
        "slowest_rank": slowest,
        "data_time": round(sum(r[1] for r in ranks) / max(sum(r[2] for r in ranks), 1e-12), 4),
        "mem_peak_mb": round(ranks[0][3], 1),
    }
    if step_flops and figures["step_time"] > 0:
        tflops = step_flops / figures["step_time"] / 1e12
        figures["tflops"] = float(f"{tflops:.4g}")
        if peak:
            figures["mfu"] = float(f"{tflops / peak:.4g}")
    return figures


class ProgressDisplay:
    """A tqdm bar per epoch on a terminal; plain lines every ``log_every`` steps in CI and Slurm logs."""

    def __init__(self, log_every: int, prefix: str, enabled: bool) -> None:
        self.log_every, self.prefix, self.enabled = log_every, prefix, enabled
        self.terminal = enabled and sys.stderr.isatty()
        self.bar = None

    def start_epoch(self, epoch: int, steps: int) -> None:
        """A fresh bar for the ``steps`` optimizer steps this epoch will run."""
        if not self.terminal:
            return
        from tqdm import tqdm

        self.close()
        size = shutil.get_terminal_size((100, 20))  # a pty of unknown size reports 0 x 0
        desc = f"{self.prefix} epoch {epoch}"
        self.bar = tqdm(total=steps, desc=desc, unit="step", ncols=size.columns, nrows=size.lines)

    def update(
        self,
        step: int,
        epoch: int,
        loss: float,
        samples_per_s: float,
        lr: float,
        grad_norm: float = math.nan,
        figures: dict | None = None,
    ) -> None:
        """Advance by one optimizer step; ``figures`` (``step_figures``) at a logged step end its line."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{loss:.4f}", grad_norm=f"{grad_norm:.3g}", samples_s=f"{samples_per_s:,.0f}", refresh=False
            )
            self.bar.update(1)
        elif step % self.log_every == 0:
            print(
                f"{self.prefix} step {step} epoch {epoch} loss {loss:.4f} lr {lr:.4g} grad_norm {grad_norm:.4g} "
                f"{samples_per_s:,.0f} samples/s{_figures_text(figures or {})}",
                flush=True,
            )

    def message(self, text: str) -> None:
        """A line that does not break the bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(f"{self.prefix} {text}")
        else:
            print(f"{self.prefix} {text}", flush=True)

    def close(self) -> None:
        """Finish the bar."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _figures_text(f: dict) -> str:
    """``step_figures`` as the end of a log line: step time (and the slowest rank's), memory, MFU."""
    if "step_time" not in f:
        return ""
    text = f" | {1000 * f['step_time']:.1f} ms/step"
    if f["step_time_max"] > 1.1 * f["step_time"]:  # a straggler: name it
        text += f" (rank {f['slowest_rank']}: {1000 * f['step_time_max']:.1f})"
    text += f", {f['mem_peak_mb']:,.0f} MiB"
    return text + (f", mfu {100 * f['mfu']:.1f}%" if "mfu" in f else "")


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        raise DDPError(f"{path} does not exist; is {run_dir} the --out folder of a training run?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def runs_of(records: list[dict]) -> list[list[dict]]:
    """The records split into runs: by their ``run`` id, and, in a log from before ids, where the step goes back."""
    runs: list[list[dict]] = []
    for r in records:
        current = runs[-1] if runs else None
        same = current is not None and current[-1].get("run") == r.get("run")
        if not same or (r.get("run") is None and r["kind"] == "train" and r["step"] <= _last_step(current)):
            runs.append([])
        runs[-1].append(r)
    return runs


def _last_step(records: list[dict]) -> int:
    return max((r["step"] for r in records if r["kind"] == "train"), default=-1)


PANELS = (
    ("loss", "loss"),
    ("throughput", "samples_per_s"),  # tokens_per_s where the task counts tokens
    ("gradient norm (before clipping)", "grad_norm"),
    ("peak memory (MiB)", "mem_peak_mb"),
)


def plot(run_dir: str | Path) -> Path:
    """Write ``<run_dir>/loss.png``: the loss (training, and evaluation), throughput, gradient norm and peak
    memory by step, one line each per run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DDPError("ddp plot needs matplotlib: pip install -e '.[plot]' (or pip install matplotlib)") from None
    fig = draw(runs_of(read_metrics(run_dir)), Path(run_dir).name)
    out = Path(run_dir) / "loss.png"
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def draw(runs: list[list[dict]], title: str):
    """The figure of ``plot``: one panel per entry of ``PANELS``; a figure a log lacks says so in its panel."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for ax, (label, key) in zip(axes.flat, PANELS, strict=True):
        for i, records in enumerate(runs):
            name = "" if len(runs) == 1 else f" (run {records[0].get('run') or i + 1})"
            train = [r for r in records if r["kind"] == "train"]
            if key == "samples_per_s" and train and "tokens_per_s" in train[-1]:
                key, label = "tokens_per_s", "throughput (tokens/s)"
            shown = [r for r in train if isinstance(r.get(key), (int, float))]
            line = ax.plot([r["step"] for r in shown], [r[key] for r in shown], label=f"training{name}")[0]
            evals = [r for r in records if r["kind"] == "eval" and key in r]
            if evals:
                ax.plot([r["step"] for r in evals], [r[key] for r in evals], "o--", color=line.get_color(),
                        label=f"evaluation{name}")  # fmt: skip
        if not ax.lines or not any(len(line.get_xdata()) for line in ax.lines):
            ax.text(0.5, 0.5, f"{key}: not in this log", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(label if key != "samples_per_s" else "throughput (samples/s)")
        ax.grid(alpha=0.3)
        if key == "loss" and ax.lines:
            ax.legend()
    for ax in axes[1]:
        ax.set_xlabel("optimizer step")
    fig.suptitle(title)
    return fig
