"""The command line and TOML files of ``ddp train``, built from the config's dataclasses.

Each field of ``ddp.config``'s sections is one flag (``--log-every`` for ``LogConfig.log_every``),
shown in ``--help`` under its section with the docstring written under the field. The flags are
flat: a field's name is unique across the sections, so moving a field between sections changes
no flag. Precedence: field defaults < TOML file < command line.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import itertools
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from ddp.config import SECTIONS, TASK_OPTIONS, Config, TaskConfig, upgrade
from ddp.errors import ConfigError
from ddp.io import check_regular


def field_docs(kind: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass."""
    body = _class_bodies(inspect.getsourcefile(kind))[kind.__qualname__]
    docs = {}
    for node, nxt in itertools.pairwise(body):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


@functools.cache
def _class_bodies(source: str) -> dict[str, list[ast.stmt]]:
    """Each top-level class of a source file, by name: the file parsed once, not once per class."""
    tree = ast.parse(Path(source).read_text())
    return {node.name: node.body for node in tree.body if isinstance(node, ast.ClassDef)}


def _arg_type(annotation) -> tuple[type, bool]:
    """The scalar type of a field and whether it is a tuple of them."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is tuple:
        return typing.get_args(annotation)[0], True
    return annotation, False


def parse_task_arg(text: str) -> tuple[str, Any]:
    """``KEY=VALUE``; the value as a TOML literal (3, 0.5, true, [1, 2], "x") or else as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def _add_task_arguments(parser: argparse.ArgumentParser) -> None:
    docs = field_docs(TaskConfig)
    group = parser.add_argument_group("task", TaskConfig.__doc__)
    group.add_argument("--task", dest="task.spec", metavar="SPEC", default=argparse.SUPPRESS,
                       help=f"{docs['spec']} (default: mlp)")  # fmt: skip
    add_task_arg_option(group, "--task-arg", "task.args", docs["args"])
    settings = parser.add_argument_group(
        "settings of the built-in tasks",
        "Each is the same as --task-arg NAME=VALUE; a task that does not take it "
        "refuses it. Defaults are the task's own.",
    )
    for name, (default, helptext) in TASK_OPTIONS.items():
        opts: dict[str, Any] = {"dest": f"task.args.{name}", "default": argparse.SUPPRESS}
        if isinstance(default, bool):
            opts["action"] = argparse.BooleanOptionalAction
        else:
            opts["metavar"] = name.upper()
            opts["type"] = str if default is None else type(default[0] if isinstance(default, tuple) else default)
            opts["nargs"] = "+" if isinstance(default, tuple) else None
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        settings.add_argument(f"--{name.replace('_', '-')}", help=f"{helptext} (mlp's default: {shown})", **opts)


def add_task_arg_option(group, flag: str, dest: str, helptext: str) -> None:
    """``--task-arg KEY=VALUE [KEY=VALUE ...]``, repeatable: every pair of every use, in order."""
    group.add_argument(flag, dest=dest, metavar="KEY=VALUE", nargs="+", action="extend", type=parse_task_arg,
                       default=argparse.SUPPRESS, help=helptext)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one option per config field, grouped by section, defaults shown in help."""
    _add_task_arguments(parser)
    for section, kind in SECTIONS.items():
        if kind is TaskConfig:
            continue
        group = parser.add_argument_group(section, kind.__doc__)
        docs = field_docs(kind)
        hints = typing.get_type_hints(kind)
        for f in dataclasses.fields(kind):
            scalar, many = _arg_type(hints[f.name])
            default = f.default
            doc = docs.get(f.name, "").replace("%", "%%")  # argparse formats help with %
            helptext = f"{doc} (default: {default if not many else ' '.join(map(str, default))})"
            opts: dict = {
                "dest": f"{section}.{f.name}",
                "default": argparse.SUPPRESS,
                "help": helptext,
            }
            if scalar is bool:
                opts["action"] = argparse.BooleanOptionalAction
            elif "bare" in f.metadata:  # a setting that was a switch: the flag alone, and --no-FLAG, still work
                opts.update(nargs="?", const=f.metadata["bare"], metavar=f.name.upper())
                group.add_argument(f"--no-{f.name.replace('_', '-')}", dest=opts["dest"], action="store_const",
                                   const=f.metadata["negated"], default=argparse.SUPPRESS,
                                   help=f"--{f.name.replace('_', '-')} {f.metadata['negated']}")  # fmt: skip
            else:
                opts["type"] = scalar
                opts["metavar"] = f.name.upper()
                if many:
                    opts["nargs"] = "+"
            group.add_argument(f"--{f.name.replace('_', '-')}", **opts)


def from_namespace(ns: argparse.Namespace, toml_path: str | None = None) -> Config:
    """Merge defaults, the TOML file (if any) and the options given on the command line."""
    values: dict[str, dict] = {name: {} for name in SECTIONS}
    if toml_path:
        for section, settings in load_toml(toml_path).items():
            values.setdefault(section, {}).update(settings)
    for dest, value in vars(ns).items():
        if dest == "task.args":  # KEY=VALUE pairs on top of the file's [task.args]
            values["task"]["args"] = {**values["task"].get("args", {}), **dict(value)}
        elif dest.startswith("task.args."):  # a built-in task's setting given by its own flag
            values["task"].setdefault("args", {})[dest.removeprefix("task.args.")] = value
        elif "." in dest:
            section, key = dest.split(".", 1)
            values[section][key] = value
    return Config.from_dict(values)


def load_toml(path: str) -> dict:
    """Read a TOML config file; errors name the file."""
    try:
        check_regular(Path(path), ConfigError, limit=16 * 2**20)
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config: {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config: {path} is not valid TOML: {e}") from None
    for section, settings in data.items():
        if not isinstance(settings, dict):
            raise ConfigError(f"--config: {path}: '{section}' must be a [section] table")
    return upgrade(data, explicit=True)


def parser(prog: str = "ddp train") -> argparse.ArgumentParser:
    """The training command line."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train a model with DistributedDataParallel, save it, reload it and verify it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        metavar="FILE.toml",
        help="TOML file with [run], [model], ... sections",
    )
    add_arguments(p)
    return p


def parse(argv: list[str] | None = None, prog: str = "ddp train") -> Config:
    """Parse a training command line; a bad setting is a usage error (exit 2)."""
    p = parser(prog)
    ns = p.parse_args(argv)
    try:
        return from_namespace(ns, ns.config)
    except ConfigError as e:
        p.error(str(e))
