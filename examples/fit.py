"""Your own model, data and loss through the whole machinery, from Python: ``ddp.fit``.

    torchrun --standalone --nproc-per-node=2 examples/fit.py --out runs/fit
    python examples/fit.py --out runs/fit          # no torchrun: a world of one

``fit`` runs the same trainer as ``ddp train``: DDP over the ranks, checkpoints every
``checkpoint_every`` steps, exact resume when relaunched with the same ``out``, then rank 0
saves ``out/rings.params`` (the task's name) and every rank reloads and verifies it.
"""

import argparse
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

import ddp


class Rings(Dataset):
    """Points on two noisy rings; class = which ring. A fresh rotation per read (augmentation)."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.label = torch.randint(2, (n,), generator=g)
        angle = 2 * torch.pi * torch.rand(n, generator=g)
        radius = 1.0 + self.label + 0.2 * torch.randn(n, generator=g)
        self.xy = torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1)

    def __len__(self) -> int:
        return len(self.label)

    def __getitem__(self, i: int) -> dict:
        turn = 2 * torch.pi * torch.rand(())  # seeded per (epoch, sample) by the trainer: exact resume
        rotation = torch.stack([torch.stack([turn.cos(), -turn.sin()]), torch.stack([turn.sin(), turn.cos()])])
        return {"xy": rotation @ self.xy[i], "label": self.label[i]}


def ring_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return F.cross_entropy(model(batch["xy"]), batch["label"])


def rings_model() -> nn.Module:
    """The model; ``ddp predict runs/fit/rings.params --model examples/fit.py:rings_model --random 4`` runs it."""
    return nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 2))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/fit")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    task = ddp.Task(
        model=rings_model,
        train_data=Rings(2048, seed=0),
        val_data=Rings(256, seed=1),
        loss=ring_loss,
        probe=torch.randn(8, 2, generator=torch.Generator().manual_seed(0)),  # dict batches: say what to probe with
        name="rings",
    )
    report = ddp.fit(task, steps=args.steps, batch_size=32, lr=0.1, checkpoint_every=20, out=args.out)
    if report is not None and os.environ.get("RANK", "0") == "0":
        print(f"fit: {report.world_size} ranks verified {args.out}/{task.weights_file} (max |Δ| = {report.max_diff:g})")


if __name__ == "__main__":
    main()
