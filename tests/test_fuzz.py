"""Damaged and hostile files, generated: every reader ends in success or in this project's own error.

Each format starts from a real file the project wrote (one training run, shared); Hypothesis
mutates its bytes or its fields, with a fixed seed and a bounded number of examples. Whatever it
makes must be read, or refused with a ``DDPError`` (which names the file), within a time bound,
and nothing outside the test's folder may be opened.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ddp
from ddp import model_card, options, run_folder, train, weights
from ddp.checkpoint_files import validate
from ddp.errors import DDPError
from ddp.tasks import tokens

EXAMPLES = 150  # per case: about 1 s each here (1,500 each, tried once, found nothing more)
SETTINGS = settings(
    max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)  # fmt: skip


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """One short run's folder: mlp.params, its model card, run.json, two checkpoints; a safetensors copy, a DCP
    folder, a sharded index, a TOML config, token files and a Lightning checkpoint."""
    out = tmp_path_factory.mktemp("made")
    args = ["--samples", "256", "--batch-size", "32", "--steps", "2", "--checkpoint-every", "1", "--out", str(out)]
    assert train.main(args) == 0
    state = ddp.load(out / "mlp.params")
    ddp.io.save_safetensors(state, out / "mlp.safetensors")
    weights.write(weights.read(out / "mlp.params"), out / "dcp", "dcp")  # what `ddp export --format dcp` writes
    index = {
        "metadata": {"total_size": 4 * sum(t.numel() for t in state.values())},
        "weight_map": dict.fromkeys(state, "mlp.safetensors"),
    }  # fmt: skip  (Hugging Face's sharded layout)
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    (out / "run.toml").write_text('[task]\nspec = "mlp"\n[run]\nsteps = 6\n[optim]\nlr = 0.1\n')
    tokens.write_byte_tokens([Path(ddp.__file__)], out / "bytes", 0.1)  # `ddp tokens`: train.bin, val.bin, meta.json
    model = ddp.model.MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 20)).sum().backward()
    opt.step()  # momentum buffers: tensors that are not weights, beside them
    lightning = {"epoch": 2, "global_step": 10, "pytorch-lightning_version": "2.4.0", "lr_schedulers": [],
                 "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                 "optimizer_states": [opt.state_dict()], "hyper_parameters": {"lr": 0.1}}  # fmt: skip
    torch.save(lightning, out / "lightning.ckpt")  # as Lightning's Trainer writes one
    return out


# ---- the oracle -------------------------------------------------------------------------------


def _ends_well(read: Callable[[], object], root: Path) -> None:
    """``read()`` succeeds or raises a DDPError, within 10 s, opening nothing outside ``root``."""
    opened: list[str] = []
    _WATCH.append(opened)
    start = time.monotonic()
    try:
        read()
    except DDPError:
        pass
    finally:
        _WATCH.pop()
    assert time.monotonic() - start < 10
    outside = [p for p in opened if not _allowed(p, root)]
    assert not outside, f"opened outside the test's folder: {outside}"


_WATCH: list[list[str]] = []


def _audit(event: str, args: tuple) -> None:
    if _WATCH and event == "open" and isinstance(args[0], (str, bytes, Path)):
        _WATCH[-1].append(str(args[0] if not isinstance(args[0], bytes) else args[0].decode(errors="replace")))


sys.addaudithook(_audit)  # only records while a read is watched


def _allowed(path: str, root: Path) -> bool:
    """The test's folder, and the code the reader imports (the interpreter's and the packages' files)."""
    p = Path(path)
    return not p.is_absolute() or any(
        p.is_relative_to(base) for base in (root, sys.prefix, sys.base_prefix, Path(ddp.__file__).parents[1])
    )


# ---- mutations ---------------------------------------------------------------------------------

edits = st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=8)


def _mutated(data: bytes, changes: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(data)
    for at, value in changes:
        out[at % len(out)] = value
    return bytes(out[:cut]) if cut is not None else bytes(out)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)


def _replace_field(doc, path: list[int], value):
    """``doc`` with the field that ``path`` picks (indices into each level's keys) replaced or deleted."""
    if not isinstance(doc, (dict, list)) or not doc or not path:
        return value
    keys = list(doc) if isinstance(doc, dict) else list(range(len(doc)))
    key = keys[path[0] % len(keys)]
    doc = dict(doc) if isinstance(doc, dict) else list(doc)
    if value is _DELETE and len(path) == 1 and isinstance(doc, dict):
        del doc[key]
    else:
        doc[key] = _replace_field(doc[key], path[1:], value)
    return doc


_DELETE = object()
field_edits = st.tuples(st.lists(st.integers(min_value=0), min_size=1, max_size=4), json_values | st.just(_DELETE))

# ---- the formats -----------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on a mutated protocol byte
@SETTINGS
@given(changes=edits, cut=st.none() | st.integers(min_value=0, max_value=4096))
@pytest.mark.parametrize("name", ["mlp.params", "mlp.safetensors", "lightning.ckpt"])
def test_damaged_weights_files_load_or_fail_with_our_error(made, tmp_path, name, changes, cut):
    path = tmp_path / name
    path.write_bytes(_mutated((made / name).read_bytes(), changes, cut))
    _ends_well(lambda: weights.read(path), tmp_path)


@SETTINGS
@given(changes=edits, cut=st.none() | st.integers(min_value=0, max_value=4096))
def test_damaged_token_files_train_or_fail_with_our_error(made, tmp_path, changes, cut):
    shutil.copytree(made / "bytes", tmp_path / "bytes", dirs_exist_ok=True)
    for name in ("train.bin", "val.bin"):  # ids past the vocabulary, half a token, too short for a window, empty
        data = (made / "bytes" / name).read_bytes()
        (tmp_path / "bytes" / name).write_bytes(_mutated(data, changes, None if cut is None else cut % len(data)))

    def read() -> None:
        task = tokens.task(train=str(tmp_path / "bytes" / "train.bin"), val=str(tmp_path / "bytes" / "val.bin"))
        task.load_data()
        for data in (task.train_data, task.val_data):
            for i in {0, len(data) // 2, len(data) - 1}:
                data[i]

    _ends_well(read, tmp_path)


@SETTINGS
@given(edit=field_edits)
def test_a_manifest_with_any_field_changed_validates_or_fails_with_our_error(made, tmp_path, edit):
    folder = tmp_path / "step"
    if not folder.exists():
        shutil.copytree(made / "checkpoints" / "step-00000002", folder)
    manifest = json.loads((made / "checkpoints" / "step-00000002" / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps(_replace_field(manifest, *edit), default=str))
    _ends_well(lambda: validate(folder), tmp_path)


@SETTINGS
@given(edit=field_edits)
def test_a_model_card_or_run_record_with_any_field_changed_reads_or_fails_with_our_error(made, tmp_path, edit):
    for name in ("mlp.params", "mlp.params.probe.pt"):
        if (made / name).exists() and not (tmp_path / name).exists():
            shutil.copy(made / name, tmp_path / name)
    card = json.loads(model_card.card_path(made / "mlp.params").read_text())
    model_card.card_path(tmp_path / "mlp.params").write_text(json.dumps(_replace_field(card, *edit), default=str))
    _ends_well(lambda: weights.read(tmp_path / "mlp.params").cfg, tmp_path)
    record = json.loads((made / run_folder.RUN_FILE).read_text())
    (tmp_path / run_folder.RUN_FILE).write_text(json.dumps(_replace_field(record, *edit), default=str))
    _ends_well(lambda: run_folder.read(tmp_path), tmp_path)


@SETTINGS
@given(changes=edits, cut=st.none() | st.integers(min_value=0, max_value=4096))
def test_a_damaged_dcp_metadata_reads_or_fails_with_our_error(made, tmp_path, changes, cut):
    folder = tmp_path / "dcp"
    if not folder.exists():
        shutil.copytree(made / "dcp", folder)
    (folder / ".metadata").write_bytes(_mutated((made / "dcp" / ".metadata").read_bytes(), changes, cut))
    _ends_well(lambda: weights.read(folder), tmp_path)


@SETTINGS
@given(edit=field_edits)
def test_an_index_a_toml_config_or_a_token_meta_with_any_field_changed_is_read_or_refused(made, tmp_path, edit):
    import tomllib

    if not (tmp_path / "mlp.safetensors").exists():
        shutil.copy(made / "mlp.safetensors", tmp_path / "mlp.safetensors")
        shutil.copytree(made / "bytes", tmp_path / "bytes")
    index = json.loads((made / "model.safetensors.index.json").read_text())
    (tmp_path / "i.index.json").write_text(json.dumps(_replace_field(index, *edit), default=str))
    _ends_well(lambda: weights.read(tmp_path / "i.index.json"), tmp_path)
    meta = json.loads((made / "bytes" / "meta.json").read_text())
    (tmp_path / "bytes" / "meta.json").write_text(json.dumps(_replace_field(meta, *edit), default=str))
    _ends_well(lambda: tokens.task(train=str(tmp_path / "bytes" / "train.bin")), tmp_path)
    toml = tomllib.loads((made / "run.toml").read_text())
    (tmp_path / "run.toml").write_text(_toml(_replace_field(toml, *edit)))
    _ends_well(lambda: _parsed(["--config", str(tmp_path / "run.toml"), "--out", str(tmp_path / "run")]), tmp_path)


def _parsed(argv: list[str]) -> None:
    """``ddp train``'s parsing: a usage error is argparse's exit 2, the only other way it may end."""
    try:
        options.parse(argv)
    except SystemExit as e:
        assert e.code == 2


def _toml(doc) -> str:
    """A TOML rendering of whatever the mutation made (strings for what TOML cannot hold)."""
    if not isinstance(doc, dict):
        return f"value = {json.dumps(str(doc))}\n"
    lines, tables = [], []
    for k, v in doc.items():
        if isinstance(v, dict):
            tables.append(f"[{json.dumps(k)}]\n" + "".join(f"{json.dumps(a)} = {_value(b)}\n" for a, b in v.items()))
        else:
            lines.append(f"{json.dumps(k)} = {_value(v)}\n")
    return "".join(lines) + "".join(tables)


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if (isinstance(v, int) and abs(v) < 2**63) or (isinstance(v, float) and v == v and abs(v) != float("inf")):
        return repr(v)
    return json.dumps(str(v))
