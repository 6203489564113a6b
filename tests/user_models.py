"""Models as users write them, for ``--model tests/user_models.py:NAME`` (and a file that runs code)."""

import torch
from torch import nn


class TextbookMLP(nn.Module):
    """The textbook's MLP: lazy layers named hidden and output (its mlp.params has hidden.weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.LazyLinear(256)
        self.output = nn.LazyLinear(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(torch.relu(self.hidden(x)))


def sequential(width: int = 32) -> nn.Module:
    """The same kind of MLP as a plain nn.Sequential (state_dict names 0.weight, 2.weight)."""
    return nn.Sequential(nn.Linear(20, width), nn.ReLU(), nn.Linear(width, 10))


class Wrapped(nn.Module):
    """A model whose only child is called ``model``: its own names begin with the ``model.`` prefix."""

    def __init__(self) -> None:
        super().__init__()
        self.model = sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class Payload:
    """Unpickling this would run ``open(path, 'w')``: what a malicious checkpoint does."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class TwoHeads(nn.Module):
    """A model with several outputs, as many are: a dict (``as_tuple``: a tuple) of class scores, a regression
    value and an embedding per input."""

    def __init__(self, as_tuple: bool = False) -> None:
        super().__init__()
        self.as_tuple = as_tuple
        self.body = nn.Linear(20, 8)
        self.classes, self.value = nn.Linear(8, 3), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor):
        h = self.body(x)
        out = {"scores": self.classes(h), "value": self.value(h), "embedding": h}
        return tuple(out.values()) if self.as_tuple else out
