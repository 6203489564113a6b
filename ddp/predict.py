"""``ddp predict``: inputs read, made at random or taken from a probe; outputs of any kind, summed up per input.

A model may return a tensor, a tuple, a dict or a Hugging Face ``ModelOutput``. Each
output keeps its name and shape (``logits`` for a lone tensor, ``output0``, ``output1``
for a tuple's items, a dict's own keys), and goes whole to ``--output``; the terminal
gets one row per input that sums them up: a class where an argmax means one, a shape and
the first few values otherwise.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ddp.errors import ConfigError, first_line
from ddp.task import call, to_device
from ddp.verify import outputs

SHOWN = 8
"""Values a row shows of an output, before ``...``."""


def sample_shape(model: nn.Module, what: str) -> tuple[int, ...]:
    """The shape of one input sample of a model given by ``--model``: its first Linear layer's width."""
    first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))), None)
    if not isinstance(first, nn.Linear):
        raise ConfigError(f"{what}: cannot tell this model's input shape; give --input FILE.npz with an array X")
    return (first.weight.shape[1],)  # not in_features: a lazy layer's stays 0 after loading


def random_like(probe: Any, n: int, generator: torch.Generator) -> Any:
    """``n`` random inputs shaped like the probe, whatever its kind: floats from N(0, 1), integers (token ids)
    from the range the probe's own span; a tuple or dict of them likewise."""
    if isinstance(probe, torch.Tensor):
        shape = (n, *probe.shape[1:])
        if probe.is_floating_point():
            return torch.randn(shape, generator=generator, dtype=probe.dtype)
        low, high = int(probe.min()), int(probe.max()) + 1
        return torch.randint(low, high, shape, generator=generator, dtype=probe.dtype)
    if isinstance(probe, dict):
        return {k: random_like(v, n, generator) for k, v in probe.items()}
    if isinstance(probe, (tuple, list)):
        return type(probe)(random_like(v, n, generator) for v in probe)
    return probe


def input_arrays(x: Any) -> dict[str, Any]:
    """A model input as named arrays: X for a tensor, its keys for a dict, X0, X1, ... for a tuple."""
    if isinstance(x, dict):
        return dict(x)
    if isinstance(x, (tuple, list)):
        return {f"X{i}": v for i, v in enumerate(x)}
    return {"X": x}


def read_inputs(path: str, probe: Any = None) -> Any:
    """Inputs from a .npz file, shaped as the probe is (see ``input_arrays``); X alone without a probe."""
    names = list(input_arrays(probe)) if probe is not None else ["X"]
    with np.load(path, allow_pickle=False) as f:
        missing = [n for n in names if n not in f.files]
        if missing:
            raise ConfigError(f"--input: {path} has no array(s) {missing} (it has {f.files}); this model takes {names}")
        arrays = {n: torch.as_tensor(f[n]) for n in names}
    if isinstance(probe, dict):
        return arrays
    if isinstance(probe, (tuple, list)):
        return type(probe)(arrays.values())
    return arrays["X"]


def run_model(model: nn.Module, x: Any) -> torch.Tensor:
    """The model's outputs on ``x``, flattened into one float64 tensor (``ddp.verify.outputs``); a usage error
    that names the inputs' shape where the model fails on them."""
    try:
        return outputs(model, x)
    except (RuntimeError, TypeError, ValueError) as e:
        raise _failed(x, e) from None


def _failed(x: Any, e: Exception) -> ConfigError:
    shapes = {k: tuple(v.shape) for k, v in input_arrays(x).items() if isinstance(v, torch.Tensor)}
    shape = next(iter(shapes.values())) if list(shapes) == ["X"] else shapes
    return ConfigError(f"the model failed on inputs of shape {shape}: {first_line(e)[:300]}")


@torch.no_grad()
def named_outputs(model: nn.Module, x: Any) -> dict[str, torch.Tensor]:
    """The model's outputs on ``x`` in eval mode, each on the CPU under its name, in its own shape and dtype."""
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    try:
        out = call(model, to_device(x, param.device, param.dtype))
    except (RuntimeError, TypeError, ValueError) as e:
        raise _failed(x, e) from None
    finally:
        model.train(was_training)
    found = _named(out, "")
    if not found:
        raise ConfigError(f"the model returned a {type(out).__name__} holding no tensors; nothing to predict")
    return found


def _named(out: Any, name: str) -> dict[str, torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return {name or "logits": out.detach().cpu()}
    if isinstance(out, dict):  # a ModelOutput is an OrderedDict of its non-None fields
        items = [(str(k), v) for k, v in out.items()]
    elif isinstance(out, (tuple, list)):
        items = [(f"{i}" if name else f"output{i}", v) for i, v in enumerate(out)]
    else:  # a cache object, a string: not a prediction
        return {}
    return {k: v for key, item in items for k, v in _named(item, f"{name}.{key}" if name else key).items()}


def is_class_scores(t: torch.Tensor, n: int) -> bool:
    """Whether an output is per input and ends in scores over classes (or a vocabulary), where an argmax means a
    prediction."""
    return t.is_floating_point() and t.dim() >= 2 and len(t) == n and t.shape[-1] > 1


def predictions(named: dict[str, torch.Tensor], n: int) -> torch.Tensor | None:
    """The argmax of the first output where it means one (``is_class_scores``); None where none does."""
    first = next(iter(named.values()))
    return first.argmax(-1) if is_class_scores(first, n) else None


def rows(named: dict[str, torch.Tensor], n: int) -> list[str]:
    """One line per input: its index, then each output summed up (outputs not per input get a line of their own)."""
    per_input = {k: v for k, v in named.items() if v.dim() >= 1 and len(v) == n}
    lines = [f"{i}\t" + "  ".join(_cell(k, v[i], i == 0) for k, v in per_input.items()) for i in range(n)]
    lines += [f"-\t{_cell(k, v, True)}" for k, v in named.items() if k not in per_input]
    return lines


def _cell(name: str, v: torch.Tensor, with_shape: bool) -> str:
    if v.numel() == 1:
        return f"{name}={_values(v)}"
    shape = f" {tuple(v.shape)}" if with_shape or v.dim() > 1 else ""
    if v.is_floating_point() and v.shape[-1] > 1:
        return f"{name}{shape}: argmax {_values(v.argmax(-1))}"
    return f"{name}{shape}: {_values(v)}"


def _values(v: torch.Tensor) -> str:
    flat = v.flatten()
    shown = [f"{x:.4g}" if v.is_floating_point() else str(x) for x in flat[:SHOWN].tolist()]
    text = ",".join(shown) + (",..." if len(flat) > SHOWN else "")
    return text if len(flat) == 1 else f"[{text}]"
