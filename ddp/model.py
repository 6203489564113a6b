"""The built-in models (the textbook's MLP, a small convnet), and what is done to any model before training:
lazy layers materialised, activation checkpointing."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from ddp.task import call


class MLP(nn.Module):
    """A multilayer perceptron; with the defaults, exactly the textbook's MLP."""

    def __init__(
        self,
        in_features: int = 20,
        hidden: tuple[int, ...] = (256,),
        out_features: int = 10,
        batchnorm: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers.append(nn.Linear(width, h))
            if batchnorm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.ReLU())
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        self.hidden = nn.Sequential(*layers)
        self.output = nn.Linear(width, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.hidden(x.flatten(1)))


class ConvNet(nn.Module):
    """A small CNN on 1x16x16 inputs: enough arithmetic per step to hide communication."""

    def __init__(self, out_features: int = 10, width: int = 32, batchnorm: bool = False) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            norm: list[nn.Module] = [nn.BatchNorm2d(cout)] if batchnorm else []
            return [
                nn.Conv2d(cin, cout, 3, padding=1),
                *norm,
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]

        self.features = nn.Sequential(*block(1, width), *block(width, 2 * width))
        self.output = nn.Linear(2 * width * 4 * 4, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.features(x).flatten(1))


def materialize(model: nn.Module, example: Any | Callable[[], Any]) -> nn.Module:
    """Run one forward pass so lazy modules get their shapes before DDP wraps them.

    DDP registers gradient hooks on parameters at construction; an uninitialised lazy
    parameter would be missed.
    """
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters()):
        with torch.no_grad():
            was_training = model.training
            model.eval()
            call(model, example() if callable(example) else example)
            model.train(was_training)
    return model


def builtin_model(spec: str, settings: dict[str, Any]) -> nn.Module:
    """The built-in model ``spec`` (mlp or cnn) with its task's settings (``--task-arg``)."""
    if spec == "cnn":
        return ConvNet(settings["out_features"], width=settings["width"], batchnorm=settings["batchnorm"])
    return MLP(**{k: settings[k] for k in ("in_features", "hidden", "out_features", "batchnorm")})


def builtin_from_state_dict(state: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """Which built-in model (mlp or cnn) a state_dict is from, and its task's settings; None unless
    every name and shape matches that model exactly."""
    try:
        spec, settings = _guess(state)
    except (KeyError, IndexError, AttributeError, ValueError):
        return None
    with torch.device("meta"):  # shapes only: nothing is allocated
        expected = builtin_model(spec, settings).state_dict()
    fits = expected.keys() == state.keys() and all(expected[k].shape == state[k].shape for k in state)
    return (spec, settings) if fits else None


def _guess(state: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if "features.0.weight" in state:
        return "cnn", {
            "width": state["features.0.weight"].shape[0],
            "out_features": state["output.weight"].shape[0],
            "batchnorm": "features.1.running_mean" in state,
        }
    linears = sorted(
        (k for k in state if re.fullmatch(r"hidden\.\d+\.weight", k) and state[k].dim() == 2),
        key=lambda k: int(k.split(".")[1]),
    )
    hidden = [state[k].shape[0] for k in linears]
    in_features = state[linears[0]].shape[1] if linears else state["output.weight"].shape[1]
    return "mlp", {
        "in_features": in_features,
        "hidden": hidden,
        "out_features": state["output.weight"].shape[0],
        "batchnorm": any(k.endswith("running_mean") for k in state),
    }


def checkpoint_activations(model: nn.Module, blocks: Callable[[nn.Module], Iterable[nn.Module]] | None) -> list[str]:
    """``--ac full``: each block (the task's ``blocks``, as FSDP shards them) keeps only its inputs for the
    backward and runs its forward again there; the names of the blocks.

    The block's own ``forward`` is wrapped in place, so its parameters keep their names (no
    wrapper module, no prefix in any state_dict) and FSDP's hooks on the block still run. The
    recomputation restores the RNG state first, so dropout draws the same mask again.
    """
    from ddp.fsdp import resolve_blocks

    names = resolve_blocks(model, blocks)
    for name in names:
        block = model.get_submodule(name)
        block.forward = functools.partial(_recomputed, block.forward)
    return names


def _recomputed(forward: Callable, *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():  # evaluation: nothing to save for a backward
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
