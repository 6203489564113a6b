"""Fully sharded data parallelism (FSDP2, ``fully_shard``): shard a model, move its state in and out.

Under ``--strategy fsdp`` each rank keeps 1/N of every parameter, gradient and optimizer
state; a block's full parameters exist only while it runs (all-gathered before its
forward and backward, freed after). Sharding is per block: each block the task names is
one unit of communication, the root holds the rest. Checkpoints hold each rank's
shards (``torch.distributed.checkpoint``, which reshards on load); the exported weights
are gathered whole to rank 0's CPU, one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ddp.device import autocast_dtype
from ddp.errors import ConfigError

# torch.distributed.fsdp and .checkpoint are imported where used: together they add 0.6 s to the
# start of every process, DDP's included.

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def default_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks the model declares (Hugging Face's ``_no_split_modules``), or else its children that hold
    parameters, containers and children with tied parameters opened up.

    For an ``nn.Sequential`` of layers that is each layer; for a transformer whose blocks
    sit in a ``ModuleList``, each block (and the embeddings, norms and head beside it). A
    module sharing a parameter with one outside it (an output layer tied to the
    embedding) cannot be one unit: its own children are searched instead (GPT-2's
    ``transformer``, whose ``wte`` is tied to ``lm_head``, gives its ``h.0``, ``h.1``, ...).
    """
    declared = set(getattr(model, "_no_split_modules", None) or ())
    if declared:
        return [
            m
            for name, m in model.named_modules()
            if name and type(m).__name__ in declared and not _tied_outside(model, name)
        ]
    found: list[nn.Module] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            if not any(True for _ in child.parameters()):
                continue
            if isinstance(child, CONTAINERS) or _tied_outside(model, f"{prefix}{name}"):
                visit(child, f"{prefix}{name}.")
            else:
                found.append(child)

    visit(model, "")
    return found


def _owners(model: nn.Module) -> dict[int, list[str]]:
    """Parameter id -> every name it has in ``model`` (two or more when tied)."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    return owners


def tied(model: nn.Module) -> dict[str, str]:
    """The second and later names of each tied parameter -> its first name, in the model's own order
    (Hugging Face's GPT-2: ``lm_head.weight`` -> ``transformer.wte.weight``, the one its files store)."""
    return {alias: names[0] for names in _owners(model).values() for alias in names[1:]}


def _tied_outside(model: nn.Module, block: str) -> list[str]:
    """Names outside ``block`` of parameters that ``block`` holds."""
    inside = f"{block}."
    return [
        name
        for names in _owners(model).values()
        if any(n.startswith(inside) for n in names)
        for name in names
        if not name.startswith(inside)
    ]


def resolve_blocks(model: nn.Module, blocks: Callable[[nn.Module], Iterable[nn.Module]] | None) -> list[str]:
    """Qualified names of the blocks to shard, deepest first; a clear error for a block FSDP cannot shard."""
    chosen = list(blocks(model)) if blocks is not None else default_blocks(model)
    names = {id(m): name for name, m in model.named_modules()}
    resolved = []
    for block in chosen:
        if not isinstance(block, nn.Module) or id(block) not in names:
            raise ConfigError(
                f"Task.blocks returned a {type(block).__name__} that is not a submodule of the model; "
                "return the model's own blocks, e.g. `blocks=lambda m: m.layers`"
            )
        name = names[id(block)]
        if name == "":
            continue  # the root is always sharded last
        if tied := _tied_outside(model, name):
            raise ConfigError(
                f"Task.blocks: block {name!r} shares a parameter with {', '.join(tied[:3])} outside it (tied "
                "weights); FSDP shards a parameter in one unit only: leave that block to the root, or name a "
                "block that holds both"
            )
        resolved.append(name)
    return sorted(set(resolved), key=lambda n: -n.count("."))


def describe_units(model: nn.Module, names: list[str]) -> str:
    """A log line for the units chosen: their classes and names, or a warning when the root is the only one."""
    if not names:
        return (
            f"warning: FSDP found no blocks in {type(model).__name__}: the whole model is one unit, gathered whole "
            "for every forward and backward. Name its blocks with Task.blocks (e.g. blocks=lambda m: m.layers)"
        )
    kinds: dict[str, list[str]] = {}
    for name in sorted(names, key=lambda n: [int(p) if p.isdigit() else p for p in n.split(".")]):
        kinds.setdefault(type(model.get_submodule(name)).__name__, []).append(name)
    parts = [f"{len(n)} {k} ({n[0]}{f' ... {n[-1]}' if len(n) > 1 else ''})" for k, n in kinds.items()]
    return f"FSDP units: {', '.join(parts)}, and the root with the rest"


def shard(
    model: nn.Module,
    world_size: int,
    device: torch.device,
    blocks: Callable[[nn.Module], Iterable[nn.Module]] | None = None,
    precision: str = "fp32",
) -> str:
    """``fully_shard`` each block (deepest first), then the root, over a 1-D mesh of all ranks; the log line that
    names the units (``describe_units``: their classes, before sharding renames them).

    bf16 and fp16 run the forward and backward in that dtype with fp32 master weights
    and fp32 gradient reduction, FSDP's own mixed precision.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    dtype = autocast_dtype(precision)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
    names = resolve_blocks(model, blocks)
    units = describe_units(model, names)
    for name in names:
        fully_shard(model.get_submodule(name), mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return units


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """This rank's shards of the model and optimizer state, keyed by parameter name (for DCP)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state}


LOCAL = "__ddp_local_shard__"  # in a snapshot: the place of a DTensor, which holds this rank's shard only


def local_shards(state: Any) -> Any:
    """``state`` (``sharded_state``'s) with each DTensor replaced by ``{LOCAL: its local shard}``: what a
    snapshot in host memory keeps of this rank's part."""
    from torch.distributed.tensor import DTensor

    if isinstance(state, DTensor):
        return {LOCAL: state.to_local()}
    if isinstance(state, dict):
        return {k: local_shards(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(local_shards(v) for v in state)
    return state


def fill(live: Any, saved: Any) -> Any:
    """``saved`` (``local_shards``'s, of the same world size) poured into ``live`` (``sharded_state``'s, whose
    DTensors give the layout): each shard copied into its DTensor's local tensor; the result for ``load_state``."""
    from torch.distributed.tensor import DTensor

    if isinstance(live, DTensor):
        live.to_local().copy_(saved[LOCAL])
        return live
    if isinstance(live, torch.Tensor):
        return saved.to(live.device)
    if isinstance(live, dict) and isinstance(saved, dict):
        return {k: fill(live[k], v) if k in live else v for k, v in saved.items()}
    return saved


def rewrap(live: Any, saved: Any) -> Any:
    """``saved`` (``local_shards``'s, of the same world size) as DTensors laid out as ``live``'s, each holding its
    saved shard itself, not a copy: a sharded state for DCP to write, read from a snapshot in host memory."""
    from torch.distributed.tensor import DTensor

    if isinstance(live, DTensor):  # the constructor DCP's own staging uses: from_local would move a CPU shard
        return DTensor(saved[LOCAL], live._spec, requires_grad=False)
    if isinstance(live, dict) and isinstance(saved, dict):
        return {k: rewrap(live[k], v) if k in live else v for k, v in saved.items()}
    return saved


def load_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], *, full: bool = False
) -> None:
    """Load ``{"model", "optim"}`` into the (sharded) model and optimizer.

    ``full``: the state holds whole tensors (a DDP checkpoint); each rank keeps its shard.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=StateDictOptions(full_state_dict=full),
    )


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Called by every rank: the whole state_dict on rank 0's CPU (``{}`` elsewhere).

    Gathered one tensor at a time and moved to the CPU at once, so no rank ever holds
    more than one full copy, and no GPU more than one full tensor.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    for names in _owners(model).values():  # tied weights: one tensor under both names, as DDP saves them
        for alias in names[1:]:
            if names[0] in state and alias in state:
                state[alias] = state[names[0]]
    return state


def optimizer_by_name(model: nn.Module, optimizer_state: dict[str, Any]) -> dict[str, Any]:
    """A torch optimizer state_dict (parameters by index) keyed by parameter name instead."""
    names = [name for name, _ in model.named_parameters()]
    return {
        "state": {names[i]: entry for i, entry in optimizer_state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in optimizer_state["param_groups"]],
    }
