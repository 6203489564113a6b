"""Verify: every rank reloads the saved weights and must give identical outputs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ddp import group
from ddp.device import autocast_dtype
from ddp.errors import VerifyError
from ddp.task import call, to_device

DEFAULT_ATOL = {"fp64": 0.0, "fp32": 0.0, "bf16": 1e-2, "fp16": 1e-3}  # bitwise in fp32 on one device kind


@dataclass(frozen=True)
class VerifyReport:
    """What verify found: per-rank max |output - rank 0's| and |output - trained model's|."""

    world_size: int
    vs_rank0: list[float]
    vs_reference: list[float | None]
    atol: float
    nonfinite: list[int] = dataclasses.field(default_factory=list)
    """Per rank: how many outputs are NaN or inf (none when empty)."""

    @property
    def max_diff(self) -> float:
        """Largest difference seen anywhere."""
        return max(
            [*self.vs_rank0, *(d for d in self.vs_reference if d is not None)],
            default=0.0,
        )

    @property
    def ok(self) -> bool:
        """True when every output is finite and every difference is within ``atol``."""
        return not any(self.nonfinite) and self.max_diff <= self.atol

    def failures(self) -> list[str]:
        """One line per rank that disagrees, or whose outputs are not finite."""
        lines = [
            f"rank {r} gives {n} non-finite output(s) (NaN or inf): the weights or the inputs hold NaN or inf"
            for r, n in enumerate(self.nonfinite)
            if n
        ]
        for r, (d0, dref) in enumerate(zip(self.vs_rank0, self.vs_reference, strict=True)):
            if d0 > self.atol:
                lines.append(f"rank {r} differs from rank 0 by max |Δ| = {d0:.3g}")
            if dref is not None and dref > self.atol:
                lines.append(f"rank {r} differs from the trained model by max |Δ| = {dref:.3g}")
        return lines


@torch.no_grad()
def outputs(model: nn.Module, x: Any, precision: str = "fp32") -> torch.Tensor:
    """The model's output on ``x`` in eval mode, on the model's device, as one float64 CPU tensor.

    ``x`` is a tensor, or a tuple or dict of them (``model(*x)``, ``model(**x)``); floating
    inputs take the model's dtype. Tuple and dict outputs are flattened and joined.
    """
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    dtype = autocast_dtype(precision)
    with torch.autocast(param.device.type, dtype=dtype, enabled=dtype is not None):
        out = flatten(call(model, to_device(x, param.device, param.dtype)))
    model.train(was_training)
    return out


def flatten(out: Any) -> torch.Tensor:
    """A model's output (a tensor, or a tuple, list or dict of them) as one float64 CPU tensor."""
    if isinstance(out, torch.Tensor):
        return out.detach().double().cpu()
    values = [out[k] for k in sorted(out)] if isinstance(out, dict) else list(out)
    parts = [flatten(v).flatten() for v in values if isinstance(v, (torch.Tensor, dict, list, tuple))]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def verify_identical_outputs(
    model: nn.Module,
    x: Any,
    *,
    reference: torch.Tensor | None = None,
    atol: float = 0.0,
    precision: str = "fp32",
) -> VerifyReport:
    """Called by every rank: all must give rank 0's output on ``x`` (and ``reference``).

    Returns the report, or raises VerifyError on every rank naming each rank that
    differs and by how much.
    """
    out = outputs(model, x, precision)
    vs_ref = None if reference is None else (out - reference.double().cpu()).abs().max().item()
    gathered = group.all_gather_objects((out, vs_ref))
    base = gathered[0][0]
    report = VerifyReport(
        world_size=len(gathered),
        vs_rank0=[(o - base).abs().max().item() if o.shape == base.shape else float("inf") for o, _ in gathered],
        vs_reference=[d for _, d in gathered],
        atol=atol,
        nonfinite=[int((~torch.isfinite(o)).sum()) for o, _ in gathered],
    )
    if not report.ok:
        raise VerifyError(
            f"verify failed on {report.world_size} ranks (atol = {atol:g}): " + "; ".join(report.failures())
        )
    return report


def summary(report: VerifyReport, path: str, precision: str = "fp32") -> str:
    """The one line rank 0 prints after a successful verify."""
    same = "identical" if report.max_diff == 0 else "equal within tolerance"
    return (
        f"verify: {report.world_size}/{report.world_size} ranks reloaded {path}; "
        f"outputs {same} (max |Δ| = {report.max_diff:.3g}, atol = {report.atol:g} for {precision})"
    )
