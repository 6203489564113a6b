"""The optimizer's side of a step: which parameters decay, its kernel, the learning rate at each step, the norm.

The learning rate is a function of the step (``lr_at``), as nanoGPT's ``get_lr`` is, not
a scheduler's state: a run resumed with a new ``--steps``, ``--epochs`` or ``--lr``
continues on the new curve from the step it saved, and one resumed unchanged takes
exactly the rates an uninterrupted run takes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ddp import group
from ddp.config import OptimConfig
from ddp.errors import NonFiniteError

NO_DECAY = (nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)
"""Modules whose weights never decay: embeddings and normalisation layers (as nanoGPT and torchtitan)."""


def param_groups(model: nn.Module, weight_decay: float, decay_all: bool = False) -> list[dict]:
    """The model's parameters in one group, or two when some decay and some do not.

    Matrices decay; biases, norms' weights and embeddings do not, unless ``decay_all``. A
    parameter shared by two modules (a tied embedding and output layer) is the embedding's,
    and is listed once. Without weight decay there is one group, as before this split.
    """
    params = list(model.parameters())
    if weight_decay == 0 or decay_all:
        return [{"params": params, "weight_decay": weight_decay}]
    exempt = {id(p) for m in model.modules() if isinstance(m, NO_DECAY) for p in m.parameters(recurse=False)}
    decay = [p for p in params if p.dim() >= 2 and id(p) not in exempt]
    keep = [p for p in params if p.dim() < 2 or id(p) in exempt]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


FUSED_DEVICES = ("cpu", "cuda")
"""Devices where torch has a fused kernel for SGD and AdamW, among those this project runs on."""
PLAIN = (torch.Tensor, nn.Parameter)
"""The types of a plain parameter (``type(p)``): not a tensor subclass such as FSDP's DTensor shards."""


def kernel(model: nn.Module, optimizer: str) -> dict[str, bool]:
    """The implementation of ``optimizer`` that ``build`` asks torch for, given ``model``'s parameters.

    torch's fused kernel where it has one: plain floating-point tensors on a CPU or a GPU, with
    dense gradients (an embedding may make sparse ones). FSDP's shards are DTensors, which have a
    fused AdamW but no fused SGD: their SGD is the ``foreach`` one. Anything else: torch's default.
    On a CPU that default is a Python loop over the parameters; the fused kernel is one call that
    reads and writes each tensor once: the wide MLP's SGD update in 0.65x the time, the tokens
    GPT's AdamW in 0.44x (``bench/fused.py``); over FSDP's shards, AdamW in 0.25x, SGD in 0.80x.
    """
    params = list(model.parameters())
    if any(getattr(m, "sparse", False) is True for m in model.modules()):  # nn.Embedding(sparse=True)
        return {}
    if not all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params):
        return {}
    if all(type(p) in PLAIN for p in params):
        return {"fused": True}
    from torch.distributed.tensor import DTensor  # FSDP's; imported only where a parameter is not a plain tensor

    if all(isinstance(p, DTensor) for p in params):
        return {"fused": True} if optimizer == "adamw" else {"foreach": True}
    return {}


def build(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer ``--optimizer`` names, over ``param_groups``, in the implementation ``kernel`` chooses."""
    groups = param_groups(model, cfg.weight_decay, cfg.weight_decay_all)
    chosen = kernel(model, cfg.optimizer)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, **chosen)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, **chosen)


KERNELS = ("fused", "foreach")
"""The ``param_groups`` entries that choose torch's implementation of a step, not what it computes."""


@contextlib.contextmanager
def kernels_kept(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Keep ``optimizer``'s own implementation through a load of saved state in the block: the saved
    ``param_groups`` carry the saving run's, and a DDP run's fused SGD has no kernel for FSDP's shards."""
    chosen = [{k: group[k] for k in KERNELS if k in group} for group in optimizer.param_groups]
    try:
        yield
    finally:
        for group, kernels in zip(optimizer.param_groups, chosen, strict=True):
            group.update(kernels)


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total_steps``.

    Linear warmup from 0 over ``--warmup-steps`` (step i takes lr * (i + 1) / (warmup + 1)),
    then ``--schedule``: cosine from ``--lr`` down to ``--min-lr`` at the last step, or constant.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min((step - cfg.warmup_steps) / max(total_steps - cfg.warmup_steps, 1), 1.0)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give every parameter group this learning rate."""
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr


class GradNorm:
    """The global 2-norm of the optimizer's gradients, once per step, before clipping; clipped to ``max_norm`` if set.

    Called on the reduced gradients: after DDP's all-reduce, after a GradScaler's ``unscale_``,
    on the sum of the accumulated micro-batches. Under FSDP the gradients are DTensor shards
    and the norm is the whole model's (one all-reduce, in ``get_total_norm``).

    The parameters are listed once, from the optimizer's groups; where they are plain tensors
    of one device and dtype (DDP), the norm is one ``_foreach_norm`` call, as ``get_total_norm``
    makes on a GPU, without its grouping of the tensors by device and dtype at every call. The
    model's walk and that grouping were two thirds of the norm's time on the textbook MLP.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        kinds = {(p.device, p.dtype) for p in self.params}
        self.uniform = len(kinds) == 1 and all(type(p) in PLAIN for p in self.params)

    def __call__(self, max_norm: float | None) -> torch.Tensor:
        with_grad = [p for p in self.params if p.grad is not None]
        grads = [p.grad for p in with_grad]
        if self.uniform and grads:  # torch's own kernel for this, on every device: one pass over the gradients
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        else:
            norm = torch.nn.utils.get_total_norm(grads)
        if max_norm is not None:  # a second pass only to clip (clip_grad_norm_ scales by 1.0 even when it need not)
            torch.nn.utils.clip_grads_with_norm_(with_grad, max_norm, norm)
        full_tensor = getattr(norm, "full_tensor", None)  # a DTensor under FSDP
        return (full_tensor() if full_tensor is not None else norm).detach()


def nonfinite_error(what: str, loss: torch.Tensor, step: int, committed: Callable[[], int | None]) -> NonFiniteError:
    """Called by every rank at a non-finite step: the error, naming the ranks whose loss was not finite.

    ``committed()``: the newest checkpoint's step once a save in flight (of a good step) is committed.
    """
    last_saved = committed()
    losses = group.all_gather_objects(float(loss))
    bad = [f"rank {r} ({v})" for r, v in enumerate(losses) if not math.isfinite(v)]
    newest = (
        "no checkpoint was saved yet" if last_saved is None else f"the newest checkpoint, step {last_saved}, is good"
    )
    return NonFiniteError(
        f"step {step}: {what}; the loss was not finite on {', '.join(bad) or 'no rank'}. Training stopped "
        f"before the update ({newest}). Lower --lr, add --warmup-steps or --max-grad-norm, or allow "
        "--skip-nonfinite N"
    )


class NonFiniteGuard:
    """No update ever uses a NaN or inf gradient, and a run whose loss goes bad stops, naming the ranks.

    Under fp16 the GradScaler skips such steps itself; the guard then only watches the mean loss.
    """

    def __init__(self, cfg: OptimConfig, scaler: torch.amp.GradScaler, say) -> None:
        self.cfg, self.scaler, self.say = cfg, scaler, say

    def skip(self, grad_norm: torch.Tensor, loss: torch.Tensor, progress, committed: Callable[[], int | None]) -> bool:
        """Whether to skip this step's update (one host sync a step: the norm's).

        The norm is the same on every rank (reduced gradients), so all ranks decide alike, with
        no collective; a non-finite one is skipped while ``--skip-nonfinite`` allows (counted
        in ``progress.skipped``, which checkpoints keep), else every rank raises before the update.
        """
        if self.scaler.is_enabled():
            return False
        norm = grad_norm.item()
        if math.isfinite(norm):
            return False
        step = progress.step + 1
        if progress.skipped < self.cfg.skip_nonfinite:
            progress.skipped += 1
            left = self.cfg.skip_nonfinite - progress.skipped
            self.say(f"warning: step {step} skipped: the gradient norm is {norm} ({left} more may be skipped)")
            return True
        raise nonfinite_error(f"the gradient norm is {norm}", loss, step, committed)

    def check_mean_loss(self, total: float, mine: float, step: int, committed: Callable[[], int | None]) -> None:
        """Called by every rank with the same ``total`` (the loss summed over ranks): stop on a non-finite one."""
        if not math.isfinite(total) and not self.scaler.is_enabled():
            raise nonfinite_error("the mean loss is not finite", torch.tensor(mine), step, committed)
