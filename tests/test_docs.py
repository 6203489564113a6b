"""Every command the README, docs/ and bench/README.md show: parsed here, and the README's own examples run.

A command that a reader copies must work: a flag renamed, a task setting the task no
longer takes, a script or make target gone, each fails this file, naming the page and
the line. The README's quick examples (its Task file with the commands after it, and the
``ddp`` command block) run as written in a fresh folder.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.run import get_args_parser as torchrun_parser

from ddp import cli, options
from ddp.tasks import BUILTIN, check_args

from .helpers import JOB_TIMEOUT, ROOT, ddp_command, launch, ok, run

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]
SHELLS = ("sh", "bash")
SKIPPED = {"pip", "git", "cd", "export", "cat", "ls", "srun", "scontrol"}  # not ours to check


def blocks(page: Path, lang: tuple[str, ...] = SHELLS) -> list[str]:
    """The fenced code blocks of ``page`` in one of ``lang``."""
    return [
        m.group(2) for m in re.finditer(r"^```(\w*)\n(.*?)^```", page.read_text(), re.M | re.S) if m.group(1) in lang
    ]


def commands(block: str) -> list[list[str]]:
    """Each command of a shell block as words: continuation lines joined, comments and VAR=value prefixes dropped."""
    found = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
            words = words[1:]
        if words:
            found.append(words)
    return found


def shown() -> list[tuple[str, list[str]]]:
    return [(f"{page.relative_to(ROOT)}: {shlex.join(words)}", words) for page in PAGES for block in blocks(page)
            for words in commands(block)]  # fmt: skip


def check_train(args: list[str]) -> None:
    """``ddp train`` ARGS parse, and a built-in task takes every setting given to it."""
    parsed = options.parser().parse_args(args)  # argparse exits (SystemExit) on a bad flag
    cfg = options.from_namespace(parsed, None)
    if cfg.task.spec in BUILTIN:  # its signature refuses a setting it does not take, without building any data
        check_args(BUILTIN[cfg.task.spec], cfg.task.args, cfg.task.spec)


def check(words: list[str]) -> None:
    head, rest = words[0], words[1:]
    if head in ("python", "python3") and rest[:2] == ["-m", "ddp.train"]:
        return check_train(rest[2:])
    if head in ("python", "python3") and rest[:2] == ["-m", "ddp"]:
        return check(["ddp", *rest[2:]])
    if head in ("python", "python3"):
        assert (ROOT / rest[0]).is_file(), f"{rest[0]} does not exist"
        return None
    if head == "ddp":
        return check_train(rest[1:]) if rest[0] == "train" else cli.build_parser().parse_args(rest)
    if head == "torchrun":
        ns = torchrun_parser().parse_args(rest)
        if ns.module and ns.training_script == "ddp.train":
            return check_train(ns.training_script_args)
        assert ns.module or (ROOT / ns.training_script).is_file(), f"{ns.training_script} does not exist"
        return None
    if head == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M)
        for target in (w for w in rest if "=" not in w):
            assert target in targets, f"make {target}: no such target"
        return None
    if head == "bash" and rest[0].startswith("bench/"):  # a benchmark's script: takes no arguments
        assert (ROOT / rest[0]).is_file() and len(rest) == 1, f"{rest}: no such script, or arguments it ignores"
        return None
    if head in ("bash", "sbatch"):
        script = next(w for w in rest if w.startswith("launch/"))
        assert (ROOT / script).is_file(), f"{script} does not exist"
        after = rest[rest.index(script) + 1 :]
        if script.endswith("multinode.sh") and "--" in after:  # its own flags, then the trainer's
            after = after[after.index("--") + 1 :]
        if not after or after[0] != "--head":  # multinode.sh's flags alone, or the trainer's
            check_train(after)
        return None
    assert head in SKIPPED, f"no check for a command starting {head!r}: add one to tests/test_docs.py"
    return None


@pytest.mark.parametrize("where, words", shown(), ids=[w for w, _ in shown()])
def test_every_command_shown_parses(where, words):
    try:
        check(words)
    except SystemExit as e:
        pytest.fail(f"{where}: argparse refused it (exit {e.code})")


def test_the_pages_show_commands_at_all():
    pages = {where.split(":")[0] for where, _ in shown()}
    assert len(shown()) > 40 and {"README.md", "docs/launching.md", "docs/tasks.md", "bench/README.md"} <= pages


def in_folder(words: list[str], folder: Path, timeout: float = JOB_TIMEOUT):
    """Run a shown command in FOLDER: ``ddp`` and ``torchrun`` as ``python -m`` of their modules."""
    head, rest = words[0], words[1:]
    if head == "ddp":
        return ddp_command(*rest, cwd=folder, timeout=timeout)
    if head == "torchrun":
        return launch(rest, cwd=folder, timeout=timeout)
    raise AssertionError(f"cannot run {words}")


def readme_block(marker: str, lang: tuple[str, ...] = SHELLS) -> str:
    found = [b for b in blocks(ROOT / "README.md", lang) if marker in b]
    assert len(found) == 1, f"the README has {len(found)} blocks with {marker!r}"
    return found[0]


def test_the_readmes_task_example_trains_verifies_and_runs_under_torchrun(tmp_path):
    (tmp_path / "mytask.py").write_text(readme_block("# mytask.py", ("python",)))
    out = "".join(
        ok(in_folder(words, tmp_path, timeout=240)) for words in commands(readme_block("--task mytask.py:make"))
    )
    assert re.search(r"eval at step 600 \(epoch 4\): loss [\d.]+ accuracy 0\.9", out)  # its own loss keeps accuracy
    assert (tmp_path / "runs" / "mine" / "mytask.params").is_file()
    assert (tmp_path / "runs" / "mine-2" / "mytask.params").is_file()


# How each command the README starts with is run in the fresh shell below (cheaply: what it proves is that the
# command is found and starts); Slurm's own are not ours.
FRESH_SHELL = {
    "ddp": "ddp --help",
    "torchrun": "torchrun --help",
    "make": f"make -n -C {ROOT} train-ddp",
    "bash": None,  # launch/ scripts find .venv themselves, activated or not: test_faults runs one from a fresh PATH
    "sbatch": None,
}


def test_a_fresh_shell_runs_every_readme_command_after_its_activate_line(tmp_path):
    """The README says once how ``ddp`` gets on the PATH; in a shell whose PATH lacks ``.venv/bin``, that line
    alone makes every command the README shows start."""
    line = re.search(r"`(source \.venv/bin/activate)`", (ROOT / "README.md").read_text())
    assert line, "the README no longer says how the ddp command gets on the PATH"
    heads = {words[0] for block in blocks(ROOT / "README.md") for words in commands(block)}
    assert heads <= set(FRESH_SHELL), f"add how to run {heads - set(FRESH_SHELL)} to FRESH_SHELL"
    if not (ROOT / ".venv" / "bin" / "activate").is_file():
        pytest.skip("no .venv here (make install makes it): the line has nothing to activate")
    fresh = {"PATH": "/usr/bin:/bin"}
    assert run(["bash", "-c", "command -v ddp"], extra_env=fresh, cwd=tmp_path).returncode != 0
    probes = " && ".join(FRESH_SHELL[h] for h in sorted(heads) if FRESH_SHELL[h])
    shell = f"set -e; cd {ROOT} && {line.group(1)} && cd {tmp_path} && {probes}"
    out = ok(run(["bash", "-c", shell], extra_env=fresh, cwd=tmp_path))
    assert "usage: ddp" in out and "usage: torchrun" in out and "launch/train_ddp.sh" in out


def test_the_readmes_tracker_example_gets_the_figures(tmp_path):
    (tmp_path / "mytask.py").write_text(readme_block("# mytask.py", ("python",)))
    (tmp_path / "tracker.py").write_text(readme_block("# tracker.py", ("python",)))
    out = ok(run([sys.executable, "tracker.py"], cwd=tmp_path, extra_env={"PYTHONPATH": str(ROOT)}))
    assert "10 {'train/epoch': 0.0, 'train/loss':" in out and "'eval/loss':" in out


def test_the_readmes_ddp_command_block_runs_as_written(tmp_path):
    for words in commands(readme_block("ddp inspect runs/demo/mlp.params")):
        ok(in_folder(words, tmp_path))
    assert (tmp_path / "runs" / "demo" / "mlp.safetensors").is_file()
    tuned = torch.load(tmp_path / "runs" / "tuned" / "mlp.params", weights_only=True)
    assert tuned["output.weight"].shape == (5, 256)


def test_the_help_epilog_runs_as_written(tmp_path):
    """``ddp --help``: every example works on what the examples before it made, in a fresh folder."""
    (tmp_path / "README.md").write_text((ROOT / "README.md").read_text())  # the charlm example's text
    lines = [line for line in cli.__doc__.splitlines() if line.startswith("ddp ")]
    assert len(lines) >= 8
    for words in commands("\n".join(lines)):
        ok(in_folder(words, tmp_path))
    assert (tmp_path / "runs" / "demo" / "loss.png").is_file() and (
        tmp_path / "runs" / "lm" / "charlm.params"
    ).is_file()


def train_outs() -> list[tuple[str, str]]:
    """(where, --out) of every training command the pages show; runs/default where none is given."""
    found = []
    for where, words in shown():
        head = words[0]
        trains = (
            (head == "ddp" and words[1] == "train")
            or "ddp.train" in words
            or (head in ("bash", "make") and any(w.endswith("train_ddp.sh") or w == "train-ddp" for w in words))
        )
        if not trains:
            continue
        joined = " ".join(words)
        out = re.search(r"--out[ =](\S+)", joined)
        found.append((where, out.group(1).strip("\"'") if out else "runs/default"))
    return found


def test_no_two_training_commands_shown_share_a_run_folder():
    """Two commands a reader copies must not write one folder: the second would continue or be refused."""
    seen: dict[str, str] = {}
    for where, out in train_outs():
        command = where.split(": ", 1)[1]  # the same command shown on two pages is one run
        assert seen.get(out, command) == command, f"{where} and {seen[out]!r} both train into {out}"
        seen[out] = command


def test_every_run_folder_a_readme_command_reads_is_made_by_a_command_before_it():
    """A command that reads runs/X/... follows the one that writes runs/X (--out, --output) in its block."""
    sequences = [commands(b) for b in blocks(ROOT / "README.md")]
    sequences.append(commands("\n".join(line for line in cli.__doc__.splitlines() if line.startswith("ddp "))))
    for sequence in sequences:
        made: set[str] = set()
        for words in sequence:
            outs = {words[i + 1] for i, w in enumerate(words[:-1]) if w in ("--out", "--output")}
            for word in words:
                value = word.split("=", 1)[-1]
                if value.startswith("runs/") and value not in outs:
                    folder = "/".join(value.split("/")[:2])
                    assert folder in made, f"{shlex.join(words)} reads {value}, which no command before it writes"
            made |= {"/".join(o.split("/")[:2]) for o in outs}


def test_the_readmes_package_table_names_every_module_once():
    table = re.findall(r"^\| `(ddp/[\w/]+(?:\.py)?)` \|", (ROOT / "README.md").read_text(), re.M)
    modules = {f"ddp/{p.name}" for p in (ROOT / "ddp").glob("*.py") if p.name != "__main__.py"} | {"ddp/tasks/"}
    assert sorted(table) == sorted(modules), f"missing: {modules - set(table)}, stale: {set(table) - modules}"


def test_the_readmes_install_line_is_the_makefiles():
    found = re.findall(r"pip install --quiet (-e '\.\[[\w,]+\]')", (ROOT / "Makefile").read_text())
    installs = [line for line in found if line != "-e '.[bench]'"]  # the peers' libraries: make bench adds them
    assert len(installs) == 1, "the Makefile installs the package in one line"
    assert f"`pip install {installs[0]}`" in (ROOT / "README.md").read_text()
