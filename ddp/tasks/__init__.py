"""Built-in tasks, and ``--task SPEC`` resolved to a Task.

SPEC is a built-in name (below), ``path/to/file.py:NAME`` or ``package.module:NAME``,
where NAME is a Task or a function returning one; ``--task-arg KEY=VALUE`` (or the TOML
``[task.args]`` table) become that function's keyword arguments, the built-ins' included
(``--hidden 64`` is ``--task-arg hidden=[64]``). Every mistake is a usage error that
names the SPEC, found before any process group starts: a setting the task does not take
too, never silently ignored.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch import nn

from ddp.config import TASK_OPTIONS, Config
from ddp.errors import ConfigError
from ddp.rng import seeded
from ddp.task import Task
from ddp.tasks import charlm, cnn, digits, mlp, npz, tokens

BUILTIN: dict[str, Callable[..., Task]] = {
    "mlp": mlp.task,
    "cnn": cnn.task,
    "npz": npz.task,
    "digits": digits.task,
    "charlm": charlm.task,
    "tokens": tokens.task,
}


def resolve(cfg: Config, check_probe: bool = True) -> Task:
    """The Task that ``cfg.task`` names, built with every RNG seeded from ``--seed``.

    Seeding first makes a task that draws random data build the same data on every rank.
    ``check_probe``: derive the probe now (reading data a task keeps lazy), so that a task
    whose probe cannot be derived fails before training, not after.
    """
    spec, args = cfg.task.spec, cfg.task.args
    with seeded(cfg.run.seed), _naming(spec):
        if spec in BUILTIN:  # a built-in that draws data at random takes --seed, unless told otherwise
            fn = BUILTIN[spec]
            seed = {"seed": cfg.run.seed} if "seed" in inspect.signature(fn).parameters else {}
            task = build(fn, {**seed, **args}, spec)
        else:
            task = build(load_object(spec), args, spec)
        if check_probe:
            task.probe_input()  # a task whose probe cannot be derived fails now, not after training
    return task


@contextlib.contextmanager
def _naming(spec: str) -> Iterator[None]:
    """Prefix the task's own usage errors with the SPEC that produced them."""
    try:
        yield
    except ConfigError as e:
        text = str(e)
        raise ConfigError(text if text.startswith("--task") else f"--task {spec}: {text}") from None


def build(obj: Any, args: dict[str, Any], spec: str) -> Task:
    """``obj`` itself if it is a Task, else ``obj(**args)``, which must return one."""
    if isinstance(obj, Task):
        if args:
            raise ConfigError(f"--task {spec} is a Task, not a function: it takes no --task-arg ({sorted(args)})")
        return obj
    if not callable(obj):
        raise ConfigError(f"--task {spec} is a {type(obj).__name__}; expected a ddp.Task or a function returning one")
    check_args(obj, args, spec)
    try:
        task = obj(**args)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"--task {spec} failed while building the task: {type(e).__name__}: {e}") from e
    if not isinstance(task, Task):
        raise ConfigError(f"--task {spec} returned a {type(task).__name__}, not a ddp.Task")
    return task


def check_args(fn: Callable, args: dict[str, Any], spec: str, flag: str = "--task") -> None:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(args) - set(params))
    if unknown:
        given = ", ".join(
            f"--{k.replace('_', '-')}" if flag == "--task" and k in TASK_OPTIONS else f"{flag}-arg {k}=..."
            for k in unknown
        )
        raise ConfigError(
            f"{flag} {spec} takes no setting {', '.join(unknown)} (given as {given}); "
            f"it takes {', '.join(sorted(params)) or 'none'}"
        )
    missing = [
        n for n, p in params.items() if p.default is p.empty and p.kind is not p.VAR_POSITIONAL and n not in args
    ]
    if missing:
        raise ConfigError(f"{flag} {spec} needs {flag}-arg for {missing}")
    for name, value in args.items():  # a Python-style False would be the string "False", which is true
        p = params[name]
        if isinstance(value, str) and (p.annotation in (bool, "bool") or isinstance(p.default, bool)):
            raise ConfigError(f"{flag}-arg {name}={value}: {flag} {spec} takes {name} as true or false (TOML)")


def load_object(spec: str, flag: str = "--task") -> Any:
    """The object ``path/to/file.py:NAME`` or ``package.module:NAME`` names (``flag`` says which option)."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        builtin = f"not a built-in task ({', '.join(BUILTIN)}) nor" if flag == "--task" else "not"
        raise ConfigError(f"{flag} {spec!r}: {builtin} FILE.py:NAME or package.module:NAME")
    module = _import_file(where, flag) if where.endswith(".py") else _import_module(where, flag)
    if not hasattr(module, name):
        public = sorted(n for n in vars(module) if not n.startswith("_"))
        raise ConfigError(f"{flag} {spec}: {where} has no {name!r}; it defines {', '.join(public[:12]) or 'nothing'}")
    return getattr(module, name)


def _import_file(where: str, flag: str) -> Any:
    path = Path(where).resolve()
    if not path.is_file():
        raise ConfigError(f"{flag}: {where} does not exist (relative paths start at {Path.cwd()})")
    # A stable module name, registered in sys.modules, so DataLoader workers and pickle find it
    name = f"ddp_task_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise ConfigError(f"{flag}: importing {where} failed: {type(e).__name__}: {e}") from e
    return module


def _import_module(where: str, flag: str) -> Any:
    try:
        return importlib.import_module(where)
    except ImportError as e:
        raise ConfigError(f"{flag}: cannot import module {where!r}: {e}") from e
    except Exception as e:
        raise ConfigError(f"{flag}: importing {where} failed: {type(e).__name__}: {e}") from e


def build_model(spec: str, args: dict[str, Any]) -> nn.Module:
    """The module ``--model SPEC`` names: an nn.Module, or a class or function returning one,
    called with ``--model-arg`` keyword arguments."""
    obj = load_object(spec, "--model")
    if isinstance(obj, nn.Module):
        if args:
            raise ConfigError(f"--model {spec} is a module instance: it takes no --model-arg ({sorted(args)})")
        return obj
    if not callable(obj):
        raise ConfigError(f"--model {spec} is a {type(obj).__name__}; expected an nn.Module class or a function")
    check_args(obj, args, spec, "--model")
    try:
        model = obj(**args)
    except Exception as e:
        raise ConfigError(f"--model {spec} failed while building the model: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ConfigError(f"--model {spec} returned a {type(model).__name__}, not an nn.Module")
    return model
