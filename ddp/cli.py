"""The ``ddp`` command: train, verify, inspect, predict, export, sample, plot.

ddp train --epochs 3 --out runs/demo          # also: torchrun ... -m ddp.train
ddp verify runs/demo/mlp.params                 # under torchrun: every rank checks
ddp inspect runs/demo/checkpoints/step-00000168 --json
ddp predict runs/demo/mlp.params --random 4 --device cpu
ddp export runs/demo/mlp.params --format safetensors
ddp plot runs/demo                              # writes runs/demo/loss.png
ddp sample runs/lm/mlp.params --prompt "The "   # a trained charlm writes on
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddp import dist, train
from ddp.checkpoint import MANIFEST, read_manifest, validate
from ddp.config import Config, DistConfig, TaskConfig, upgrade
from ddp.errors import CheckpointError, ConfigError, DDPError
from ddp.io import (
    detect_format,
    load,
    load_model,
    load_safetensors,
    save,
    save_safetensors,
    split_aliases,
    strip_prefixes,
)
from ddp.metrics import plot
from ddp.model import builtin_from_state_dict
from ddp.task import Task
from ddp.tasks import charlm, resolve
from ddp.verify import outputs, summary, verify_identical_outputs


@dataclasses.dataclass
class Weights:
    """A model's weights as found in a file or checkpoint folder, with what is known of it."""

    path: Path
    state: dict[str, torch.Tensor]
    cfg: Config | None
    """The training config: a checkpoint's own, or guessed from the shapes of a built-in model."""
    info: dict[str, Any]


def read_weights(path: str | Path, map_location: str | torch.device = "cpu") -> Weights:
    """Weights from a checkpoint folder (validated against its manifest) or a weights file."""
    path = Path(path)
    if path.is_dir() or path.name == MANIFEST:
        folder = path if path.is_dir() else path.parent
        manifest = validate(folder)
        state = load(folder / "model.pt", map_location, expect="torch")
        train_state = load(folder / "train.pt", "cpu", expect="torch")
        info = {
            "kind": "checkpoint",
            "format": "torch",
            "step": manifest["step"],
            "epoch": train_state["epoch"],
            "world_size": manifest["world_size"],
            "torch_version": manifest["torch_version"],
            "integrity": f"ok: {len(manifest['files'])} files match the manifest (size, sha256)",
        }
        return Weights(folder, state, Config.from_dict(upgrade(train_state["config"])), info)
    fmt = detect_format(path)
    meta: dict = {}
    if fmt == "safetensors":
        state, meta = load_safetensors(path, map_location)
    else:
        state = load(path, map_location)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state_dict of tensors")
    state, stripped = strip_prefixes(state)
    if "config" in meta:
        cfg = Config.from_dict(json.loads(meta["config"]))
    else:
        try:
            spec, model = builtin_from_state_dict(state)
            cfg = Config(task=TaskConfig(spec=spec), model=model)
        except (ValueError, KeyError, IndexError):
            cfg = None  # listing the tensors needs no architecture; running them does
    info = {
        "kind": "weights",
        "format": fmt,
        "stripped_prefixes": stripped,
        "integrity": "ok: loaded with the weights-only loader"
        if fmt != "safetensors"
        else "ok: safetensors header and data",
    }
    return Weights(path, state, cfg, info)


def task_of(w: Weights) -> Task:
    """The task that trained these weights, rebuilt from its config."""
    if w.cfg is None:
        raise CheckpointError(
            f"{w.path}: cannot tell the architecture: not a built-in model and no training config is stored "
            "with it; verify the checkpoint folder it came from instead"
        )
    return resolve(w.cfg)


def build_loaded(w: Weights, task: Task, device: torch.device) -> torch.nn.Module:
    """A fresh model of the file's architecture with its weights, on ``device``."""
    dtype = next((v.dtype for v in w.state.values() if v.is_floating_point()), torch.float32)
    model = train.local_model(task, w.cfg, device, dtype)
    path = w.path / "model.pt" if w.path.is_dir() else w.path
    load_model(model, path, verbose=False)
    return model


def cmd_verify(args: argparse.Namespace) -> int:
    with dist.process_group(DistConfig(backend=args.backend)) as world:
        w = read_weights(args.path, world.device)
        task = task_of(w)
        model = build_loaded(w, task, world.device)
        probe = train.probe_input(task, w.cfg)
        report = verify_identical_outputs(model, probe, atol=args.atol)
        dist.log(world, f"{w.info['integrity']}")
        dist.log(world, summary(report, str(args.path)))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    path = Path(args.path)
    try:
        w = read_weights(path)
    except CheckpointError as e:
        info = {"path": str(path), "integrity": f"FAILED: {e}"}
        if path.is_dir() and (path / MANIFEST).exists():
            info.update(read_manifest(path))
        print(json.dumps(info, indent=2) if args.json else info["integrity"])
        return 1
    _, aliases = split_aliases(w.state)
    tensors = [
        {
            "name": k,
            "shape": list(v.shape),
            "dtype": str(v.dtype).removeprefix("torch."),
            "bytes": v.nbytes,
            **({"shares": aliases[k]} if k in aliases else {}),  # a tied weight: the same tensor as that one
        }
        for k, v in w.state.items()
    ]
    info = {
        "path": str(path),
        **w.info,
        "task": None if w.cfg is None else w.cfg.task.spec,
        "model": None if w.cfg is None else w.cfg.to_dict()["model"],
        "tensors": tensors,
        "total_bytes": sum(t["bytes"] for t in tensors if "shares" not in t),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key in ("path", "kind", "format", "step", "epoch", "world_size", "torch_version", "integrity"):
        if key in info:
            print(f"{key:>14}: {info[key]}")
    print(f"{'task':>14}: {info['task'] or 'unknown (no training config stored)'}")
    for t in tensors:
        shares = f"  (shares {t['shares']})" if "shares" in t else ""
        shape = "x".join(map(str, t["shape"])) or "scalar"
        print(f"  {t['name']:<32} {shape:>12} {t['dtype']:>9} {t['bytes']:>10,} B{shares}")
    unique = sum("shares" not in t for t in tensors)
    print(f"{'total':>14}: {info['total_bytes']:,} bytes in {unique} tensors")
    return 0


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(name)


def cmd_predict(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    w = read_weights(args.path, device)
    task = task_of(w)
    model = build_loaded(w, task, device)
    probe = train.probe_input(task, w.cfg)
    if not (isinstance(probe, torch.Tensor) and probe.is_floating_point()):
        raise ConfigError(f"ddp predict takes float tensor inputs; task {task.name!r} takes {type(probe).__name__}")
    shape = tuple(probe.shape[1:])
    if args.input:
        with np.load(args.input, allow_pickle=False) as f:
            if "X" not in f.files:
                raise ConfigError(f"--input: {args.input} has no array X (it has {f.files})")
            x = torch.as_tensor(f["X"], dtype=torch.float32)
        if tuple(x.shape[1:]) != shape:
            raise ConfigError(f"--input: samples have shape {tuple(x.shape[1:])}, the model expects {shape}")
    else:
        x = torch.randn(args.random, *shape, generator=torch.Generator().manual_seed(args.seed))
    logits = outputs(model, x)
    pred = logits.argmax(1)
    if args.output:
        np.savez(args.output, X=x.numpy(), logits=logits.numpy(), pred=pred.numpy())
        print(f"wrote {len(x)} predictions to {args.output} (on {device})")
    else:
        for i, p in enumerate(pred.tolist()):
            print(f"{i}\t{p}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    w = read_weights(args.path)
    suffix = ".safetensors" if args.format == "safetensors" else ".pt"
    src = w.path if not w.path.is_dir() else w.path / "model"
    out = Path(args.output) if args.output else src.with_suffix(suffix)
    if out.resolve() == Path(args.path).resolve():
        raise ConfigError(f"--output: {out} is the input file; choose another name")
    if args.format == "safetensors":
        meta = {} if w.cfg is None else {"config": json.dumps(w.cfg.to_dict())}
        save_safetensors(w.state, out, metadata=meta)
    else:
        save(w.state, out, format="torch")
    print(f"exported {len(w.state)} tensors from {args.path} to {out} ({args.format})")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    w = read_weights(args.path, device)
    if "vocab" not in w.state or "pos.weight" not in w.state:
        raise ConfigError(f"{args.path} is not a charlm model (no vocab or pos.weight); ddp sample needs one")
    model = charlm.from_state_dict(w.state).to(device)
    load_model(model, w.path / "model.pt" if w.path.is_dir() else w.path, verbose=False)
    print(charlm.generate(model, args.prompt, args.chars, args.temperature, args.seed))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    print(f"wrote {plot(args.run_dir)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ddp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("train", help="train with DDP (all options: ddp train --help)", add_help=False)

    v = sub.add_parser("verify", help="check a checkpoint or weights file and that every rank agrees")
    v.add_argument("path", help="a weights file (mlp.params, .safetensors) or a checkpoint folder")
    v.add_argument("--atol", type=float, default=0.0, help="tolerance between ranks (default: 0, bitwise)")
    v.add_argument("--backend", default="auto", help="auto, nccl or gloo (default: auto)")
    v.set_defaults(func=cmd_verify)

    i = sub.add_parser("inspect", help="step, sizes, tensors and integrity of a checkpoint or weights file")
    i.add_argument("path")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=cmd_inspect)

    pr = sub.add_parser("predict", help="run saved weights on new inputs, on any device")
    pr.add_argument("path")
    src = pr.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", metavar="FILE.npz", help="inputs: array X")
    src.add_argument("--random", type=int, metavar="N", help="N random inputs (a smoke test)")
    pr.add_argument("--seed", type=int, default=0, help="seed for --random (default: 0)")
    pr.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"], help="(default: auto)")
    pr.add_argument("--output", metavar="FILE.npz", help="write X, logits and pred here (default: print)")
    pr.set_defaults(func=cmd_predict)

    e = sub.add_parser("export", help="a weights-only copy for deployment")
    e.add_argument("path")
    e.add_argument("--format", required=True, choices=["safetensors", "torch"])
    e.add_argument("--output", help="destination (default: beside the input, new suffix)")
    e.set_defaults(func=cmd_export)

    sm = sub.add_parser("sample", help="continue a prompt with a trained charlm")
    sm.add_argument("path", help="a charlm's mlp.params (or a checkpoint folder)")
    sm.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    sm.add_argument("--chars", type=int, default=200, help="characters to sample (default: 200)")
    sm.add_argument("--temperature", type=float, default=0.8, help="below 1: safer choices (default: 0.8)")
    sm.add_argument("--seed", type=int, default=0, help="(default: 0)")
    sm.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"], help="(default: auto)")
    sm.set_defaults(func=cmd_sample)

    pl = sub.add_parser("plot", help="write RUN_DIR/loss.png from metrics.jsonl (needs matplotlib)")
    pl.add_argument("run_dir")
    pl.set_defaults(func=cmd_plot)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ddp`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "train":
        return train.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"ddp {args.command}: error: {e}", file=sys.stderr)
        return 2
    except DDPError as e:
        print(f"ddp {args.command}: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `ddp inspect ... | head`: the reader has gone, which is no error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # as Python's docs advise
        return 0


if __name__ == "__main__":
    sys.exit(main())
