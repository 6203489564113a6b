"""Checkpoints this project did not write: inspect, export, predict and verify them.

Every file is made here the way its tool makes it (nothing downloaded): the textbook's
mlp.params, a plain nn.Sequential state_dict, pytorch/examples' DDP snapshot, a
Lightning checkpoint, safetensors (single and sharded) with metadata, and a
torch.distributed.checkpoint folder saved by 2 gloo ranks.
"""

import json
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from ddp import cli, dcp, weights

from . import user_models, user_task, workers
from .helpers import ROOT, ddp_command, launch, ok, spawn

MODELS = Path(user_models.__file__).relative_to(ROOT)
FORMATS = ["torch", "safetensors", "dcp"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """name -> (path, expected tensors, what inspect must say, the --model that runs it, the original module)."""
    d = tmp_path_factory.mktemp("formats")
    torch.manual_seed(0)
    textbook = user_models.TextbookMLP()
    textbook(torch.randn(2, 20))  # the textbook materialises its lazy layers so
    seq = user_models.sequential()
    tb, sq = textbook.state_dict(), seq.state_dict()
    tb0 = {k: v.clone() for k, v in tb.items()}  # the step below changes tb's tensors in place
    torch.save(tb, d / "mlp.params")
    torch.save(sq, d / "seq.pt")
    torch.save({"MODEL_STATE": tb, "EPOCHS_RUN": 3}, d / "snapshot.pt")
    opt = torch.optim.SGD(textbook.parameters(), lr=0.1, momentum=0.9)
    textbook(torch.randn(4, 20)).sum().backward()
    opt.step()  # gives the optimizer state (momentum buffers: tensors that are not weights)
    tb = textbook.state_dict()
    lightning = {
        "epoch": 2,
        "global_step": 10,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": {f"model.{k}": v for k, v in tb.items()},
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [],
        "hyper_parameters": {"lr": 0.1},
    }
    torch.save(lightning, d / "lightning.ckpt")
    safetensors.torch.save_file(sq, d / "model.safetensors", metadata={"format": "pt", "source": "another library"})
    (d / "sharded").mkdir()
    shard_of = {k: f"model-0000{i % 2 + 1}-of-00002.safetensors" for i, k in enumerate(tb)}
    for shard in sorted(set(shard_of.values())):
        safetensors.torch.save_file({k: v for k, v in tb.items() if shard_of[k] == shard}, d / "sharded" / shard)
    index = {"metadata": {"total_size": sum(v.nbytes for v in tb.values())}, "weight_map": shard_of}
    (d / "sharded" / "model.safetensors.index.json").write_text(json.dumps(index))
    torch.save(sq, d / "state-for-dcp.pt")
    spawn(workers.save_dcp, 2, str(d / "dcp"), str(d / "state-for-dcp.pt"))
    tb_model = f"{MODELS}:TextbookMLP"
    return {
        "textbook": (d / "mlp.params", tb0, {"format": "torch", "found_at": ""}, tb_model),
        "sequential": (d / "seq.pt", sq, {"format": "torch", "found_at": ""}, f"{MODELS}:sequential"),
        "snapshot": (d / "snapshot.pt", tb0, {"found_at": "MODEL_STATE", "other_entries": ["EPOCHS_RUN"]},
                     tb_model),
        "lightning": (d / "lightning.ckpt", tb, {"found_at": "state_dict", "stripped_prefixes": ["model."]}, tb_model),
        "safetensors": (d / "model.safetensors", sq, {"format": "safetensors"}, f"{MODELS}:sequential"),
        "sharded": (d / "sharded" / "model.safetensors.index.json", tb, {"format": "safetensors-sharded"}, tb_model),
        "dcp": (d / "dcp", sq, {"format": "dcp", "found_at": "model", "other_entries": ["step"]},
                f"{MODELS}:sequential"),
    }  # fmt: skip


def ddp(capsys, *argv: str) -> tuple[int, str]:
    """Run the ddp command in this process: (exit code, stdout + stderr)."""
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out + out.err


def assert_same_tensors(got: dict, want: dict) -> None:
    assert set(got) == set(want), f"names differ: {set(got) ^ set(want)}"
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), f"{k} differs"


NAMES = ["textbook", "sequential", "snapshot", "lightning", "safetensors", "sharded", "dcp"]


@pytest.mark.parametrize("name", NAMES)
def test_inspect_lists_every_tensor_without_an_architecture(files, capsys, name):
    path, want, says, _ = files[name]
    code, out = ddp(capsys, "inspect", path, "--json")
    assert code == 0, out
    info = json.loads(out)
    assert info["schema"] == 2 and info["kind"] == "weights" and info["integrity"].startswith("ok")
    for key, value in says.items():
        assert info[key] == value, (key, info[key])
    assert sorted((t["name"], t["shape"], t["dtype"], t["bytes"]) for t in info["tensors"]) == sorted(
        (k, list(v.shape), str(v.dtype).removeprefix("torch."), v.nbytes) for k, v in want.items()
    )  # in the file's order: safetensors stores its tensors sorted, not in the model's order
    assert info["total_bytes"] == sum(v.nbytes for v in want.values()) and info["tensor_count"] == len(want)
    code, text = ddp(capsys, "inspect", path)
    assert code == 0 and all(f"  {k} " in text for k in want) and f"in {len(want)} tensors" in text


def test_inspect_shows_each_formats_metadata(files, capsys):
    meta = {n: json.loads(ddp(capsys, "inspect", files[n][0], "--json")[1])["metadata"] for n in NAMES}
    assert meta["safetensors"] == {"format": "pt", "source": "another library"}
    assert meta["sharded"]["shards"] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert meta["sharded"]["metadata"]["total_size"] > 0
    assert meta["dcp"]["non_tensor_entries"] == ["step"]
    assert meta["dcp"]["data_files"] == ["__0_0.distcp", "__1_0.distcp"]  # both ranks wrote their share
    lightning = json.loads(ddp(capsys, "inspect", files["lightning"][0], "--json")[1])
    assert {"epoch", "optimizer_states", "hyper_parameters"} <= set(lightning["other_entries"])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", NAMES)
def test_export_round_trips_bitwise(files, capsys, tmp_path, name, fmt):
    path, want, _, _ = files[name]
    out = tmp_path / f"out.{fmt}"
    code, text = ddp(capsys, "export", path, "--format", fmt, "--output", out)
    assert code == 0, text
    back = weights.read(out)
    assert back.found_at == "" and back.stripped == []  # a plain state_dict, whatever it came from
    assert_same_tensors(back.state, want)
    if fmt == "torch":  # loads anywhere, with nothing of ours
        assert_same_tensors(torch.load(out, weights_only=True), want)


@pytest.mark.parametrize("name", NAMES)
def test_predict_with_model_gives_the_original_modules_outputs(files, capsys, tmp_path, name):
    path, want, _, spec = files[name]
    x = np.random.default_rng(1).standard_normal((5, 20)).astype(np.float32)
    np.savez(tmp_path / "x.npz", X=x)
    code, text = ddp(capsys, "predict", path, "--model", spec, "--input", tmp_path / "x.npz", "--device", "cpu",
                     "--output", tmp_path / "pred.npz")  # fmt: skip
    assert code == 0, text
    original = user_models.TextbookMLP() if spec.endswith("TextbookMLP") else user_models.sequential()
    original.load_state_dict(want)
    with torch.no_grad():
        expected = original(torch.from_numpy(x)).double().numpy()
    assert np.array_equal(np.load(tmp_path / "pred.npz")["logits"], expected)


@pytest.mark.parametrize("as_tuple", [False, True])
def test_predict_keeps_each_output_of_a_model_with_several_and_prints_a_row_per_input(capsys, tmp_path, as_tuple):
    torch.manual_seed(0)
    model = user_models.TwoHeads(as_tuple)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    spec = ["--model", f"{MODELS}:TwoHeads", "--model-arg", f"as_tuple={str(as_tuple).lower()}"]
    code, text = ddp(capsys, "predict", tmp_path / "w.pt", *spec, "--random", "3")
    rows = text.splitlines()
    assert code == 0 and [r.split("\t")[0] for r in rows] == ["0", "1", "2"], text  # a summary, not megabytes
    scores, value = ("output0", "output1") if as_tuple else ("scores", "value")
    assert f"{scores} (3,): argmax " in rows[0] and f"{value}=" in rows[1] and len(text) < 600, text
    code, text = ddp(capsys, "predict", tmp_path / "w.pt", *spec, "--random", "3", "--output", tmp_path / "o/p.npz")
    got = np.load(tmp_path / "o" / "p.npz")  # --output's folder is made
    x = torch.from_numpy(got["X"])
    with torch.no_grad():
        want = model(x)
    names = ["output0", "output1", "output2"] if as_tuple else ["scores", "value", "embedding"]
    for name, w in zip(names, want.values() if isinstance(want, dict) else want, strict=True):
        assert np.array_equal(got[name], w.numpy()), name  # each output whole, in its own shape
    assert np.array_equal(got["pred"], got[names[0]].argmax(-1))  # the first output's classes: an argmax means one


def test_verify_of_a_dcp_folder_on_two_ranks_with_model(files):
    path, _, _, spec = files["dcp"]
    out = ok(launch(["--standalone", "--nproc-per-node=2", "-m", "ddp", "verify", str(path), "--model", spec]))
    assert "verify: 2/2 ranks reloaded" in out and "outputs identical" in out and "DCP" in out


def test_without_an_architecture_the_error_names_the_flags(files, capsys):
    code, text = ddp(capsys, "predict", files["sequential"][0], "--random", "2")
    assert code == 2 and "cannot tell the architecture" in text and "--model FILE.py:NAME" in text


def test_a_model_named_model_gets_its_prefix_back(capsys, tmp_path):
    torch.manual_seed(0)
    wrapped = user_models.Wrapped()
    torch.save(wrapped.state_dict(), tmp_path / "w.pt")
    info = json.loads(ddp(capsys, "inspect", tmp_path / "w.pt", "--json")[1])
    assert info["stripped_prefixes"] == ["model."]
    code, text = ddp(capsys, "predict", tmp_path / "w.pt", "--model", f"{MODELS}:Wrapped", "--random", "3")
    assert code == 0 and len(text.splitlines()) == 3, text
    code, text = ddp(capsys, "export", tmp_path / "w.pt", "--format", "safetensors", "--keep-prefixes")
    assert code == 0 and set(weights.read(tmp_path / "w.safetensors").named(keep_prefixes=True)) == set(
        wrapped.state_dict()
    )


def test_a_wrong_model_names_the_missing_and_mis_shaped_keys(files, capsys):
    code, text = ddp(capsys, "predict", files["sequential"][0], "--model", f"{MODELS}:sequential",
                     "--model-arg", "width=16", "--random", "2")  # fmt: skip
    assert code == 1 and "shape mismatches" in text and "0.weight: file (32, 20) vs model (16, 20)" in text


def test_a_pickle_with_code_is_refused_naming_what(capsys, tmp_path):
    target = tmp_path / "ran"
    torch.save({"w": torch.ones(2), "p": user_models.Payload(str(target))}, tmp_path / "evil.pt")
    code, text = ddp(capsys, "inspect", tmp_path / "evil.pt")
    assert code == 1 and "weights-only loader refuses (Unsupported global: GLOBAL io.open" in text
    assert not target.exists()


def test_dcp_metadata_with_code_is_refused(files, capsys, tmp_path):
    folder = tmp_path / "dcp"
    shutil.copytree(files["dcp"][0], folder)
    target = tmp_path / "ran"
    (folder / ".metadata").write_bytes(pickle.dumps(user_models.Payload(str(target))))
    code, text = ddp(capsys, "export", folder, "--format", "torch", "--output", tmp_path / "x.pt")
    assert code == 1 and "open is not part of DCP metadata" in text and "was not loaded" in text
    assert not target.exists() and not (tmp_path / "x.pt").exists()


def test_a_file_without_tensors_says_what_it_holds(capsys, tmp_path):
    torch.save({"epoch": 3, "name": "run"}, tmp_path / "none.pt")
    code, text = ddp(capsys, "inspect", tmp_path / "none.pt")
    assert code == 1 and "holds no tensors (a dict with keys epoch, name)" in text


def test_an_index_naming_a_missing_shard_names_it(files, capsys, tmp_path):
    shutil.copytree(files["sharded"][0].parent, tmp_path / "set")
    index = json.loads(files["sharded"][0].read_text())
    index["weight_map"]["output.bias"] = "model-00003-of-00003.safetensors"
    (tmp_path / "set" / "model.safetensors.index.json").write_text(json.dumps(index))
    code, text = ddp(capsys, "inspect", tmp_path / "set")
    assert code == 1 and "names shard model-00003-of-00003.safetensors" in text and "output.bias" in text


def test_several_sets_of_weights_ask_for_key(capsys, tmp_path):
    sd = user_models.sequential().state_dict()
    ema = {k: v + 1 for k, v in sd.items()}
    torch.save({"student": sd, "teacher": ema, "step": 4}, tmp_path / "two.pt")
    code, text = ddp(capsys, "inspect", tmp_path / "two.pt")
    assert code == 1 and "several sets of tensors: student (4 tensors), teacher (4 tensors)" in text
    info = json.loads(ddp(capsys, "inspect", tmp_path / "two.pt", "--key", "teacher", "--json")[1])
    assert info["found_at"] == "teacher" and info["other_entries"] == ["student", "step"]
    code, text = ddp(capsys, "inspect", tmp_path / "two.pt", "--key", "ema")
    assert code == 2 and "has no 'ema' at the top level (it has ['student', 'teacher', 'step'])" in text


def test_the_textbooks_tensor_list_and_dict_files_list_their_tensors(capsys, tmp_path):
    x, y = torch.arange(4), torch.zeros(4)
    torch.save(x, tmp_path / "x-file")
    torch.save([x, y], tmp_path / "x-files")
    torch.save({"x": x, "y": y}, tmp_path / "mydict")
    names = {f: [t["name"] for t in json.loads(ddp(capsys, "inspect", tmp_path / f, "--json")[1])["tensors"]]
             for f in ("x-file", "x-files", "mydict")}  # fmt: skip
    assert names == {"x-file": ["tensor"], "x-files": ["0", "1"], "mydict": ["x", "y"]}


def test_export_refuses_to_overwrite_its_input(files, capsys, tmp_path):
    src = tmp_path / "model.safetensors"
    src.write_bytes(files["safetensors"][0].read_bytes())
    before = src.read_bytes()
    code, text = ddp(capsys, "export", src, "--format", "safetensors")
    assert code == 2 and "is the input" in text and src.read_bytes() == before
    code, text = ddp(capsys, "export", files["dcp"][0], "--format", "dcp", "--output", files["dcp"][0])
    assert code == 2 and "is the input" in text


def test_tied_weights_are_stored_once_in_safetensors_and_kept_in_every_format(capsys, tmp_path):
    emb, head = torch.nn.Embedding(5, 4), torch.nn.Linear(4, 5, bias=False)
    head.weight = emb.weight
    torch.save(torch.nn.ModuleDict({"emb": emb, "head": head}).state_dict(), tmp_path / "tied.pt")
    for fmt in FORMATS:
        assert ddp(capsys, "export", tmp_path / "tied.pt", "--format", fmt, "--output", tmp_path / fmt)[0] == 0
        state = weights.read(tmp_path / fmt).state
        assert torch.equal(state["head.weight"], emb.weight.detach()) and torch.equal(state["emb.weight"], emb.weight)
    info = json.loads(ddp(capsys, "inspect", tmp_path / "safetensors", "--json")[1])
    assert info["tensors"][1]["shares"] == "emb.weight" and info["total_bytes"] == 5 * 4 * 4


def test_a_truncated_dcp_data_file_is_named(files, capsys, tmp_path):
    folder = tmp_path / "dcp"
    shutil.copytree(files["dcp"][0], folder)
    data = folder / "__1_0.distcp"
    data.write_bytes(data.read_bytes()[:100])
    code, text = ddp(capsys, "inspect", folder)
    assert code == 1 and f"{data} has 100 bytes, .metadata says" in text


def bytes_read() -> int:
    """Bytes this process has read through read() calls so far, page cache or not."""
    return int(next(line for line in Path("/proc/self/io").read_text().splitlines() if line.startswith("rchar:"))[6:])


@pytest.mark.parametrize("layout", ["nested", "torchtitan"])
def test_a_dcp_folders_optimizer_state_is_read_neither_to_list_nor_to_load_its_weights(capsys, tmp_path, layout):
    model = {"layer.weight": torch.randn(64, 64), "layer.bias": torch.randn(64)}
    optim = {"exp_avg": torch.randn(4_000_000), "exp_avg_sq": torch.randn(4_000_000)}  # 32 MB, Adam's two moments
    rest = {"optim": optim, "step": 7}
    # torchtitan saves the model's tensors at the top level, beside the optimizer and the rest
    dcp.save({"model": model, **rest} if layout == "nested" else {**model, **rest}, tmp_path / "ckpt")
    before = bytes_read()
    w = weights.read(tmp_path / "ckpt")
    loading = bytes_read() - before
    assert w.found_at == ("model" if layout == "nested" else "") and w.other_entries == ["optim", "step"]
    assert_same_tensors(w.state, model)
    before = bytes_read()
    code, out = ddp(capsys, "inspect", tmp_path / "ckpt", "--json")
    listing = bytes_read() - before
    info = json.loads(out)
    assert code == 0 and info["integrity"].endswith("(tensors not read)") and info["total_bytes"] == 64 * 65 * 4
    assert loading < 2_000_000 and listing < 1_000_000, (loading, listing)  # of 32 MB in the folder


def test_a_dcp_folder_saved_unflattened_lists_and_loads(capsys, tmp_path):
    import torch.distributed.checkpoint as torch_dcp
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    model = {"layer.weight": torch.randn(4, 3), "layer.bias": torch.randn(4)}
    writer, planner = torch_dcp.FileSystemWriter(tmp_path / "flat"), DefaultSavePlanner(flatten_state_dict=False)
    with warnings.catch_warnings():  # torch: "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore")
        torch_dcp.save({**model, "step": 3}, storage_writer=writer, planner=planner, no_dist=True)
    assert dcp.read_metadata(tmp_path / "flat").planner_data is None  # no paths to unflatten by
    w = weights.read(tmp_path / "flat")
    assert w.found_at == "" and w.other_entries == ["step"]
    assert_same_tensors(w.state, model)
    code, out = ddp(capsys, "inspect", tmp_path / "flat", "--json")
    assert code == 0 and [t["name"] for t in json.loads(out)["tensors"]] == list(model)


def test_verify_with_task_rebuilds_a_users_model_from_a_nested_file(tmp_path):
    torch.manual_seed(0)
    scorer = user_task.make(hidden=8).model()
    torch.save({"MODEL_STATE": {f"module.{k}": v for k, v in scorer.state_dict().items()}}, tmp_path / "s.pt")
    verify = ["verify", tmp_path / "s.pt", "--task", "tests/user_task.py:make"]
    proc = ddp_command(*verify)
    assert proc.returncode == 1 and "shape mismatches" in proc.output  # the task's default hidden=16
    out = ok(ddp_command(*verify, "--task-arg", "hidden=8"))
    assert "verify: 1/1 ranks reloaded" in out
