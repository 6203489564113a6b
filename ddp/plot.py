"""``ddp plot``: a run's metrics.jsonl drawn as loss, throughput, gradient norm and peak memory by step."""

from __future__ import annotations

from pathlib import Path

from ddp.errors import DDPError
from ddp.metrics import read_metrics


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
                took = sum(r.get("eval_time", 0.0) for r in evals)  # what evaluating cost the run
                ax.plot([r["step"] for r in evals], [r[key] for r in evals], "o--", color=line.get_color(),
                        label=f"evaluation{name}, {took:.1f} s in all" if took else f"evaluation{name}")  # fmt: skip
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
