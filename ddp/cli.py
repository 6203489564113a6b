"""The ``ddp`` command: train, verify, inspect, predict, export, sample, tokens, plot.

Each command below works on what the ones before it made (tests/test_docs.py runs them):

ddp train --epochs 3 --out runs/demo             # also: torchrun ... -m ddp.train
ddp verify runs/demo/mlp.params                  # under torchrun: every rank checks
ddp inspect runs/demo/checkpoints/step-00000171 --json
ddp predict runs/demo/mlp.params --random 4 --device cpu
ddp export runs/demo/mlp.params --format safetensors
ddp inspect runs/demo/mlp.safetensors            # any file holding tensors: torch, safetensors, DCP folders
ddp predict runs/demo/mlp.safetensors --model ddp.model:MLP --random 2   # your class, for a file without a config
ddp plot runs/demo                               # writes runs/demo/loss.png
ddp train --task charlm --task-arg text=README.md --steps 30 --out runs/lm
ddp sample runs/lm/charlm.params --prompt "The "  # a trained charlm writes on
ddp tokens README.md --output runs/bytes         # text to token files; then --task tokens trains on them
ddp train --task tokens --task-arg train=runs/bytes/train.bin val=runs/bytes/val.bin --steps 30 --out runs/gpt
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
from torch import nn

from ddp import group, hf, predict, train, weights
from ddp.checkpoint_files import MANIFEST, read_manifest
from ddp.config import Config, DistConfig, TaskConfig, task_file
from ddp.errors import CheckpointError, ConfigError, DDPError, Reported, say
from ddp.fsdp import tied
from ddp.io import split_aliases
from ddp.options import parse_task_arg
from ddp.parallel import local_model, probe_input
from ddp.plot import plot
from ddp.rng import seeded
from ddp.task import Task
from ddp.tasks import build_model, charlm, resolve, tokens
from ddp.verify import summary, verify_identical_outputs
from ddp.weights import Weights

INSPECT_SCHEMA = 2
"""Bumped when a field of ``ddp inspect --json`` changes meaning or goes away; new fields may appear."""


def read_weights(args: argparse.Namespace, map_location: str | torch.device = "cpu") -> Weights:
    return weights.read(args.path, map_location, key=args.key)


def _config(w: Weights, args: argparse.Namespace) -> Config:
    if args.task:
        return dataclasses.replace(w.cfg or Config(), task=_given_task(w, args))
    gone = task_file(w.cfg.task.spec) if w.cfg is not None else None
    if gone is not None and not gone.is_file():
        digest = f" (sha256 {w.cfg.task.file_sha256})" if w.cfg.task.file_sha256 else ""
        raise ConfigError(
            f"{w.path} was trained with the task file {gone}{digest}, which is not there now: moved or deleted? "
            f"Add --task PATH/TO/{gone.name}:{w.cfg.task.spec.rpartition(':')[2]} where it is now"
        )
    if w.cfg is not None and w.cfg.task.spec.startswith("python:"):
        raise ConfigError(
            f"{w.path} was trained by ddp.fit on a Task object ({w.cfg.task.spec.removeprefix('python:')!r}), "
            "which no file names; add --model FILE.py:NAME (the function or class that builds its model) "
            "or --task FILE.py:NAME"
        )
    if w.cfg is None:
        raise ConfigError(
            f"{w.path}: cannot tell the architecture: no training config is stored with it and it is not a "
            "built-in model, and no Hugging Face config.json is beside it. Add --model FILE.py:NAME (a class or "
            "function returning your nn.Module; "
            "--model-arg KEY=VALUE for its arguments) or --task SPEC"
        )
    return w.cfg


def _given_task(w: Weights, args: argparse.Namespace) -> TaskConfig:
    """``--task`` and its arguments; a note where its file is not the one the weights were trained with."""
    task = TaskConfig(spec=args.task, args=dict(args.task_arg))
    trained = w.cfg.task.file_sha256 if w.cfg is not None else ""
    if trained and task.file_sha256 and task.file_sha256 != trained:
        print(f"note: {task_file(task.spec)} is not the task file {w.path} was trained with (sha256 {trained}, "
              f"this one {task.file_sha256}): the model it builds may differ", file=sys.stderr)  # fmt: skip
    return task


def model_for(w: Weights, args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, Any, Task | None]:
    """A fresh model of the weights' architecture with the weights loaded, its probe input (None if unknown), and
    the task that built it (None for ``--model`` and a Hugging Face folder's ``config.json``).

    The task is rebuilt without reading data it keeps lazy; the probe comes from the
    weights' model card, or else from the task (which may read its data for it).
    """
    dtype = next((v.dtype for v in w.state.values() if v.is_floating_point()), torch.float32)
    hf_config = hf.config_beside(w.path) if w.cfg is None and not args.task else None
    if args.model or hf_config is not None:
        with seeded(0):
            if args.model:
                model = build_model(args.model, dict(args.model_arg))
            else:
                model = hf.model_from_config(hf_config)
        model = model.to(device, dtype=dtype)
        return weights.load_into(model, w), hf.probe(model), None
    cfg = _config(w, args)
    task = resolve(cfg, check_probe=False)
    model = local_model(task, cfg, device, dtype)
    probe = w.probe if w.probe is not None and not args.task else probe_input(task, cfg)
    return weights.load_into(model, w), probe, task


def cmd_verify(args: argparse.Namespace) -> int:
    with group.process_group(DistConfig(backend=args.backend)) as world:
        try:
            verify_file(args, world)
        except DDPError as e:
            lead = f"ddp {args.command}:" if world.world_size == 1 else f"{world.prefix()} ddp {args.command}:"
            raise Reported(say(lead, e)) from e  # before leaving the group: see Reported
    return 0


def verify_file(args: argparse.Namespace, world: group.World) -> None:
    w = read_weights(args, world.device)
    model, probe, _ = model_for(w, args, world.device)
    if args.input:
        probe = predict.read_inputs(args.input, probe)
    elif probe is None:
        shape = predict.sample_shape(model, "ddp verify")
        probe = torch.randn(8, *shape, generator=torch.Generator().manual_seed(0))
    predict.run_model(model, probe)
    report = verify_identical_outputs(model, probe, atol=args.atol)
    group.log(world, integrity(w))
    group.log(world, summary(report, str(args.path)))


def integrity(w: Weights) -> str:
    if "integrity" in w.info:
        return w.info["integrity"]
    return {
        "safetensors": "ok: safetensors header and data",
        "dcp": "ok: read through torch.distributed.checkpoint (metadata of DCP's own classes only)",
    }.get(w.format.removesuffix("-sharded"), "ok: loaded with the weights-only loader") + (
        f", {len(w.metadata['shards'])} shards as the index says" if w.format.endswith("-sharded") else ""
    )


def describe(w: Weights, path: Path) -> dict[str, Any]:
    """``ddp inspect --json``: see the README for the meaning of every field."""
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
    return {
        "schema": INSPECT_SCHEMA,
        "path": str(path),
        "kind": "checkpoint" if "step" in w.info else "weights",
        "format": w.format,
        **w.info,
        "integrity": integrity(w),
        "found_at": w.found_at,
        "stripped_prefixes": w.stripped,
        "other_entries": w.other_entries,
        "metadata": w.metadata,
        "task": None if w.cfg is None else w.cfg.task.spec,
        "task_args": None if w.cfg is None else w.cfg.task.args,
        "tensors": tensors,
        "tensor_count": sum("shares" not in t for t in tensors),
        "total_bytes": sum(t["bytes"] for t in tensors if "shares" not in t),
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    path = Path(args.path)
    try:
        w = weights.read(path, key=args.key, mmap=True, shapes_only=True)
    except CheckpointError as e:
        info = {"schema": INSPECT_SCHEMA, "path": str(path), "integrity": f"FAILED: {e}"}
        if path.is_dir() and (path / MANIFEST).exists():
            info.update(read_manifest(path))
        print(json.dumps(info, indent=2) if args.json else info["integrity"])
        return 1
    info = describe(w, path)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    for key in ("path", "kind", "format", "step", "epoch", "world_size", "torch_version", "integrity"):
        if key in info:
            print(f"{key:>14}: {info[key]}")
    print(f"{'found at':>14}: {info['found_at'] or 'the top level'}")
    if info["stripped_prefixes"]:
        print(f"{'stripped':>14}: {', '.join(info['stripped_prefixes'])}")
    if info["other_entries"]:
        print(f"{'also holds':>14}: {', '.join(info['other_entries'])}")
    if info["kind"] == "weights" and info["metadata"]:  # a checkpoint's manifest is summed up above
        print(f"{'metadata':>14}: {json.dumps(info['metadata'], default=str)[:300]}")
    print(f"{'task':>14}: {info['task'] or 'unknown (no training config stored; --model runs it)'}")
    for t in info["tensors"]:
        shares = f"  (shares {t['shares']})" if "shares" in t else ""
        shape = "x".join(map(str, t["shape"])) or "scalar"
        print(f"  {t['name']:<32} {shape:>12} {t['dtype']:>9} {t['bytes']:>10,} B{shares}")
    print(f"{'total':>14}: {info['total_bytes']:,} bytes in {info['tensor_count']} tensors")
    return 0


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(name)


def cmd_predict(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    w = read_weights(args, device)
    model, probe, _ = model_for(w, args, device)
    generator = torch.Generator().manual_seed(args.seed)
    if args.input:
        x = predict.read_inputs(args.input, probe)
    elif probe is not None:
        x = predict.random_like(probe, args.random, generator)
    else:
        x = torch.randn(args.random, *predict.sample_shape(model, "ddp predict"), generator=generator)
    n = len(next(iter(predict.input_arrays(x).values())))
    named = predict.named_outputs(model, x)
    if args.output:
        pred = predict.predictions(named, n)
        arrays = {k: v for k, v in predict.input_arrays(x).items() if isinstance(v, torch.Tensor)}
        arrays |= named | ({} if pred is None else {"pred": pred})
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.output, **{k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in arrays.items()})
        print(f"wrote {n} predictions to {args.output} ({', '.join(named)}; on {device})")
    else:
        print("\n".join(predict.rows(named, n)))
    return 0


SUFFIX = {"safetensors": ".safetensors", "torch": ".pt", "dcp": ".dcp", "hf": "-hf"}
EXPORT_FORMATS = (*weights.FORMATS, "hf")


def cmd_export(args: argparse.Namespace) -> int:
    w = read_weights(args)
    built = None
    if args.model or args.task or (args.format == "hf" and (w.cfg is not None or hf.config_beside(w.path))):
        built = model_for(w, args, torch.device("cpu"))  # prove the weights fit before writing them
    src = Path(args.path)
    out = Path(args.output) if args.output else src.with_name(src.name.split(".")[0] + SUFFIX[args.format])
    if out.resolve() == src.resolve() or out.resolve() == w.path.resolve():
        raise ConfigError(f"--output: {out} is the input; choose another name")
    if src.is_dir() and out.resolve().is_relative_to(src.resolve()):
        raise ConfigError(f"--output: {out} is inside the input folder {src}; choose a path outside it")
    if args.format == "hf" and out.is_file():
        raise ConfigError(f"--output: {out} is a file; --format hf writes a folder (from_pretrained loads it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    where = f" found at {w.found_at!r}" if w.found_at else ""
    if args.format == "hf":
        files, stored = export_hf(w, out, args, built)
        once = f" ({len(w.state) - stored} tied, stored once)" if stored < len(w.state) else ""
        print(f"exported {len(w.state)} tensors{where}{once} from {args.path} to {out}/: {', '.join(files)}")
        return 0
    weights.write(w, out, args.format, keep_prefixes=args.keep_prefixes)
    stripped = f", prefix {''.join(w.stripped)!r} stripped" if w.stripped and not args.keep_prefixes else ""
    print(f"exported {len(w.state)} tensors{where} from {args.path} to {out} ({args.format}{stripped})")
    return 0


def export_hf(w: Weights, out: Path, args: argparse.Namespace, built: tuple | None) -> tuple[list[str], int]:
    """``--format hf``: the weights under the model's names, tied ones once, with the model's ``config.json`` and
    the run's tokenizer where there are; the files written, and the number of tensors stored."""
    model, _, task = built or (None, None, None)
    state = w.state if model is None else weights.fit_names(model, w)
    tokenizer = Path(task.tokenizer) if task is not None and task.tokenizer else None
    if tokenizer is not None and not tokenizer.is_file():
        print(f"note: the run's tokenizer {tokenizer} is not there now; exported without it", file=sys.stderr)
        tokenizer = None
    config = None if model is None else hf.config_json(model)
    if config is None:
        why = "not a transformers model" if model is not None else "no architecture known (give --task or --model)"
        print(f"note: no config.json written: {why}; from_pretrained needs the model's class", file=sys.stderr)
    state = hf.stored_once(state, {} if model is None else tied(model))
    files = hf.write_folder(
        state,
        out,
        max_shard=hf.parse_size(args.max_shard_size),
        config=config,
        tokenizer=tokenizer,
        metadata={} if w.cfg is None else {"config": json.dumps(w.cfg.to_dict())},
    )
    return files, len(state)


def cmd_sample(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    w = read_weights(args, device)
    if "vocab" not in w.state or "pos.weight" not in w.state:
        raise ConfigError(f"{args.path} is not a charlm or tokens model (no vocab or pos.weight); ddp sample needs one")
    model = weights.load_into(charlm.from_state_dict(w.state).to(device), w)
    if w.cfg is None or w.cfg.task.spec != "tokens":  # charlm: the model's own alphabet
        print(charlm.generate(model, args.prompt, args.chars, args.temperature, args.seed, args.top_k))
        return 0
    encode, decode = tokens.codec(w.cfg.task.args.get("tokenizer"))
    ids = encode(args.prompt) or [0]
    print(decode(charlm.sample(model, ids, args.chars, args.temperature, args.top_k, args.seed)))
    return 0


def cmd_tokens(args: argparse.Namespace) -> int:
    if not 0 <= args.val_fraction < 1:
        raise ConfigError(f"--val-fraction: must be in [0, 1), got {args.val_fraction}")
    files, out = [Path(f) for f in args.files], Path(args.output)
    if args.bpe is None and args.tokenizer is None:
        meta = tokens.write_byte_tokens(files, out, args.val_fraction)
    else:
        meta = tokens.write_tokenized(files, out, args.val_fraction, args.bpe, args.tokenizer and Path(args.tokenizer))
    made = "byte tokens" if meta["tokenizer"] == "bytes" else f"tokens of {out}/{meta['tokenizer']}"
    print(f"wrote {meta['train_tokens']:,} training and {meta['val_tokens']:,} held-out {made} (vocab "
          f"{meta['vocab']:,}, {meta['dtype']}) to {out}/train.bin and val.bin; train with: ddp train --task tokens "
          f"--task-arg train={out}/train.bin val={out}/val.bin")  # fmt: skip
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    print(f"wrote {plot(args.run_dir)}")
    return 0


def _source_options(p: argparse.ArgumentParser, architecture: bool = True) -> None:
    p.add_argument(
        "path",
        help="a weights file (torch, safetensors), a sharded set's *.index.json, "
        "a checkpoint folder of this project, or a torch.distributed.checkpoint folder",
    )
    p.add_argument("--key", metavar="A/B", help="where the weights are in a nested file (default: found)")
    if not architecture:
        return
    arch = p.add_argument_group("architecture (default: the file's own training config)")
    arch.add_argument("--model", metavar="SPEC", help="FILE.py:NAME or module:NAME: a class or function -> nn.Module")
    arch.add_argument("--model-arg", metavar="KEY=VALUE", nargs="+", action="extend", type=parse_task_arg, default=[])
    arch.add_argument("--task", metavar="SPEC", help="a task (built-in name, FILE.py:NAME) whose model it is")
    arch.add_argument("--task-arg", metavar="KEY=VALUE", nargs="+", action="extend", type=parse_task_arg, default=[])


def build_parser() -> argparse.ArgumentParser:
    """The ``ddp`` command line: one subcommand each (``train``'s own options are ``ddp.options``)."""
    p = argparse.ArgumentParser(prog="ddp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("train", help="train with DDP (all options: ddp train --help)", add_help=False)

    v = sub.add_parser("verify", help="check a checkpoint or weights file and that every rank agrees")
    _source_options(v)
    v.add_argument("--input", metavar="FILE.npz", help="inputs to compare on: array X (default: the task's probe)")
    v.add_argument("--atol", type=float, default=0.0, help="tolerance between ranks (default: 0, bitwise)")
    v.add_argument("--backend", default="auto", help="auto, nccl or gloo (default: auto)")
    v.set_defaults(func=cmd_verify)

    i = sub.add_parser("inspect", help="format, tensors, metadata and integrity of any file holding tensors")
    _source_options(i, architecture=False)
    i.add_argument("--json", action="store_true", help="machine-readable output (shape: see the README)")
    i.set_defaults(func=cmd_inspect)

    pr = sub.add_parser("predict", help="run saved weights on new inputs, on any device")
    _source_options(pr)
    src = pr.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", metavar="FILE.npz", help="inputs: array X")
    src.add_argument("--random", type=int, metavar="N", help="N random inputs (a smoke test)")
    pr.add_argument("--seed", type=int, default=0, help="seed for --random (default: 0)")
    pr.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"], help="(default: auto)")
    pr.add_argument("--output", metavar="FILE.npz", help="write X, logits and pred here (default: print)")
    pr.set_defaults(func=cmd_predict)

    e = sub.add_parser(
        "export", help="convert the weights among torch, safetensors, DCP and a Hugging Face folder (hf)"
    )
    _source_options(e)
    e.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    e.add_argument("--output", help="destination (default: beside the input, new suffix; dcp, hf: a folder)")
    e.add_argument("--max-shard-size", default=hf.MAX_SHARD_SIZE, metavar="SIZE",
                   help=f"hf: shards of at most SIZE, with an index (default: {hf.MAX_SHARD_SIZE}, as HF)")  # fmt: skip
    e.add_argument("--keep-prefixes", action="store_true", help="keep module./model. prefixes (default: strip)")
    e.set_defaults(func=cmd_export)
    _add_language_and_run_commands(sub)
    return p


def _add_language_and_run_commands(sub) -> None:
    """``ddp sample``, ``ddp tokens`` and ``ddp plot``."""
    sm = sub.add_parser("sample", help="continue a prompt with a trained charlm or tokens model")
    _source_options(sm, architecture=False)
    sm.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    sm.add_argument("--chars", type=int, default=200, help="characters (tokens: tokens) to sample (default: 200)")
    sm.add_argument("--temperature", type=float, default=0.8, help="below 1: safer choices (default: 0.8)")
    sm.add_argument("--top-k", type=int, default=0, metavar="K", help="draw among the K likeliest only (default: all)")
    sm.add_argument("--seed", type=int, default=0, help="(default: 0)")
    sm.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"], help="(default: auto)")
    sm.set_defaults(func=cmd_sample)

    tk = sub.add_parser("tokens", help="text files to nanoGPT-format token files (bytes, or a BPE) for --task tokens")
    tk.add_argument("files", nargs="+", help="text (or, as bytes, any) files, read in order")
    tk.add_argument("--output", required=True, metavar="DIR", help="writes DIR/train.bin, val.bin and meta.json")
    tk.add_argument("--val-fraction", type=float, default=0.1, help="the held-out end of the tokens (default: 0.1)")
    how = tk.add_mutually_exclusive_group()
    how.add_argument(
        "--bpe", type=int, metavar="N", help="train a byte-level BPE of N ids on the files (default: bytes)"
    )
    how.add_argument("--tokenizer", metavar="FILE", help="encode with this Hugging Face tokenizer.json")
    tk.set_defaults(func=cmd_tokens)

    pl = sub.add_parser(
        "plot", help="write RUN_DIR/loss.png: loss, throughput, grad norm and memory by step (needs matplotlib)"
    )
    pl.add_argument("run_dir")
    pl.set_defaults(func=cmd_plot)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ddp`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "train":
        return train.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Reported as r:
        return r.code
    except DDPError as e:
        return say(f"ddp {args.command}:", e)
    except BrokenPipeError:  # `ddp inspect ... | head`: the reader has gone, which is no error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # as Python's docs advise
        return 0


if __name__ == "__main__":
    sys.exit(main())
