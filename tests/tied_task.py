"""A user's task whose output layer is tied to its input embedding (one parameter, two names).

FSDP shards a parameter in one unit only, so the tied pair must stay together at the
root; the block between them is sharded on its own. Loaded as ``--task tests/tied_task.py:make``.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import ddp


class TiedNet(nn.Module):
    """Token ids (batch, 4) -> logits (batch, vocab): embed, mix, and score with the embedding itself."""

    def __init__(self, vocab: int, width: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Sequential(nn.Linear(width, width), nn.Tanh())
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.mix(self.embed(ids).mean(1)))


def make(samples: int = 600, vocab: int = 13, width: int = 6) -> ddp.Task:
    """Predict the most frequent of 4 random tokens (vocab and width: sizes 2 and 3 do not divide)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (samples, 4), generator=g)
    labels = ids[:, 0]
    data = TensorDataset(ids, labels)
    train, val = torch.utils.data.random_split(data, [samples - 100, 100], generator=g)
    return ddp.Task(
        model=lambda: TiedNet(vocab, width),
        train_data=train,
        val_data=val,
        loss=lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]),
        probe=ids[:8],
        name="tied",
    )
