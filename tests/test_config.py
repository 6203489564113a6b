"""The configuration as a user writes it: flags, --task-arg, TOML files, and configs of older checkpoints."""

from __future__ import annotations

import pytest

from ddp.config import Config, config_changes, upgrade
from ddp.errors import ConfigError
from ddp.options import parse
from ddp.tasks import resolve

OLD_DEFAULT_MODEL = {"in_features": 20, "hidden": [256], "out_features": 10, "width": 32, "batchnorm": False,
                     "dropout": 0.0}  # fmt: skip
OLD_DEFAULT_DATA = {"data": None, "samples": 4096, "val_fraction": 0.1, "batch_size": 64, "workers": 0}


def old_checkpoint_config(spec: str = "mlp", **changed) -> dict:
    """A config as checkpoints stored it before the tasks took their own settings (every field written)."""
    model = {**OLD_DEFAULT_MODEL, **{k: v for k, v in changed.items() if k in OLD_DEFAULT_MODEL}}
    data = {**OLD_DEFAULT_DATA, **{k: v for k, v in changed.items() if k in OLD_DEFAULT_DATA}}
    cfg = Config().to_dict()
    return {**cfg, "task": {"spec": spec, "args": {}}, "model": model, "data": data}


def test_task_arg_takes_several_pairs_after_one_flag_and_repeats():
    cfg = parse(["--task", "charlm", "--task-arg", "text=README.md", "block=64", "layers=2", "--task-arg", "embd=32"])
    assert cfg.task.args == {"text": "README.md", "block": 64, "layers": 2, "embd": 32}


def test_the_old_flags_are_the_built_in_tasks_settings():
    cfg = parse(["--hidden", "32", "16", "--samples", "512", "--batchnorm", "--val-fraction", "0.25"])
    assert cfg.task.args == {"hidden": [32, 16], "samples": 512, "batchnorm": True, "val_fraction": 0.25}
    assert (
        cfg.to_dict()["task"]
        == parse(["--task-arg", "hidden=[32, 16]", "samples=512", "batchnorm=true", "val_fraction=0.25"]).to_dict()[
            "task"
        ]
    )
    assert "model" not in cfg.to_dict()  # the printed config shows what applies: only the settings given


def test_data_alone_trains_the_mlp_on_the_users_arrays():
    assert parse(["--data", "mine.npz"]).task.spec == "npz"


def test_a_setting_the_task_does_not_take_is_a_usage_error_naming_the_flag(tmp_path):
    (tmp_path / "tabular.py").write_text(
        "import torch, ddp\nfrom torch.utils.data import TensorDataset\n"
        "def make(rows: int = 64):\n"
        "    return ddp.Task(model=lambda: torch.nn.Linear(4, 2),\n"
        "                    train_data=TensorDataset(torch.randn(rows, 4), torch.randint(0, 2, (rows,))))\n"
    )
    cfg = parse(["--task", f"{tmp_path}/tabular.py:make", "--hidden", "32", "--val-fraction", "0.5"])
    with pytest.raises(
        ConfigError, match=r"takes no setting hidden, val_fraction \(given as --hidden, --val-fraction\)"
    ):
        resolve(cfg)
    with pytest.raises(ConfigError, match=r"--task cnn takes no setting hidden \(given as --hidden\)"):
        resolve(parse(["--task", "cnn", "--hidden", "8"]))
    with pytest.raises(ConfigError, match=r"--dropout: must be in \[0, 1\)"):
        resolve(parse(["--dropout", "1.5"]))


def test_a_toml_files_model_section_becomes_the_tasks_settings(tmp_path):
    (tmp_path / "run.toml").write_text(
        '[task]\nspec = "cnn"\n[model]\nwidth = 8\n[data]\nsamples = 300\nbatch_size = 8\n'
    )
    cfg = parse(["--config", str(tmp_path / "run.toml")])
    assert cfg.task.args == {"width": 8, "samples": 300} and cfg.data.batch_size == 8
    (tmp_path / "bad.toml").write_text('[task]\nspec = "cnn"\n[model]\nhidden = [8]\n')
    with pytest.raises(ConfigError, match="takes no setting hidden"):  # said in the file: refused, not ignored
        resolve(parse(["--config", str(tmp_path / "bad.toml")]))


def test_an_old_checkpoints_config_upgrades_to_the_settings_its_task_read():
    assert upgrade(old_checkpoint_config())["task"] == {"spec": "mlp", "args": {}}  # all defaults: nothing to say
    cnn = upgrade(old_checkpoint_config("cnn", width=8, hidden=[64], samples=512))
    assert cnn["task"] == {"spec": "cnn", "args": {"width": 8, "samples": 512}}  # hidden: never read by the cnn
    assert cnn["data"] == {"batch_size": 64, "workers": 0}
    older = {"model": {**OLD_DEFAULT_MODEL, "arch": "mlp"}, "data": {**OLD_DEFAULT_DATA, "data": "x.npz"}}
    assert upgrade(older)["task"] == {"spec": "npz", "args": {"data": "x.npz"}}  # before tasks: model.arch
    assert Config.from_dict(old_checkpoint_config(dropout=0.2)).task.args == {"dropout": 0.2}


def test_config_changes_lists_what_breaks_exact_resumption_and_nothing_else():
    now = parse(["--hidden", "32", "--lr", "0.1", "--steps", "40", "--log-every", "3", "--keep-last", "5"])
    saved = parse(["--hidden", "32", "--lr", "0.1", "--steps", "40"]).to_dict()
    assert config_changes(saved, now) == []  # logging and retention do not change the result
    saved = parse(["--hidden", "16", "--lr", "0.05", "--steps", "40", "--batch-size", "32"]).to_dict()
    assert config_changes(saved, now) == ["args {'hidden': [16]} -> {'hidden': [32]}", "batch_size 32 -> 64",
                                          "lr 0.05 -> 0.1"]  # fmt: skip
    assert config_changes(old_checkpoint_config(), parse([])) == []  # an old checkpoint, resumed as it was
    assert config_changes(old_checkpoint_config(hidden=[64]), parse(["--hidden", "64"])) == []
    assert config_changes(old_checkpoint_config(), parse(["--samples", "100"])) == ["args {} -> {'samples': 100}"]


def test_settings_written_under_their_old_sections_load_into_their_own(tmp_path):
    old = {"run": {"steps": 3, "log_every": 7, "memory_format": "contiguous", "eval_every": 5, "compile": True},
           "checkpoint": {"format": "safetensors"}, "dist": {"atol": 0.5}}  # fmt: skip
    cfg = Config.from_dict(old)  # a checkpoint's config, or a model card's
    assert (cfg.run.steps, cfg.log.log_every, cfg.eval.eval_every) == (3, 7, 5)
    assert (cfg.compute.memory_format, cfg.compute.compile, cfg.export.format, cfg.export.atol) == (
        "contiguous", True, "safetensors", 0.5)  # fmt: skip
    (tmp_path / "old.toml").write_text('[run]\nlog_every = 4\n[checkpoint]\nformat = "safetensors"\n')
    parsed = parse(["--config", str(tmp_path / "old.toml"), "--eval-every", "2"])
    assert (parsed.log.log_every, parsed.export.format, parsed.eval.eval_every) == (4, "safetensors", 2)
    # a resumed run compares like with like: an exactness setting that moved and did not change is no change
    unchanged = Config.from_dict({"compute": {"memory_format": "contiguous"}})
    assert config_changes({"run": {"memory_format": "contiguous"}}, unchanged) == []
    assert config_changes({"run": {"memory_format": "channels_last"}}, unchanged) == [
        "memory_format 'channels_last' -> 'contiguous'"
    ]
