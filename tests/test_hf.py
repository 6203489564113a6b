"""A user's own Hugging Face model and tokenizer, in and out with no glue.

A GPT-2 built from its config (``tests/hf_task.py``; nothing downloaded) goes in from the
folder HF's own ``save_pretrained`` wrote (its tied ``lm_head.weight`` stored once), trains
under DDP and under FSDP (killed and restarted), and comes out as a folder that
``from_pretrained`` loads. Token files are made with a BPE that ``tokenizers`` trains here.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors
import torch

from ddp import cli, faults, fsdp, weights
from ddp.tasks import charlm

from .helpers import ROOT, ok, torchrun, train_alone

TASK = ["--task", "tests/hf_task.py:make", "--batch-size", "16", "--steps", "8", "--log-every", "1"]
TIED = "lm_head.weight = transformer.wte.weight"


def lm() -> type:
    """transformers' GPT2LMHeadModel, imported where a test needs it, not as the file is collected: every test worker
    collects every file, and transformers took 3 s of each one's start."""
    return pytest.importorskip("transformers").GPT2LMHeadModel


def gpt2(*sizes: int) -> torch.nn.Module:
    """A fresh GPT-2 of ``tests/hf_task.py``'s config of ``sizes``."""
    model = lm()
    from . import hf_task  # imports transformers

    return model(hf_task.config(*sizes))


def ddp(capsys, *argv) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out + out.err


def hf_logits(model: torch.nn.Module, ids: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=torch.from_numpy(ids)).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The folder HF's ``save_pretrained`` writes for a fresh GPT-2, and that model."""
    folder = tmp_path_factory.mktemp("hf") / "saved"
    torch.manual_seed(1)
    model = gpt2(96, 16, 2)
    model.save_pretrained(folder)
    return folder, model.eval()


@pytest.fixture(scope="module")
def runs(saved, tmp_path_factory):
    """Two runs from HF's file: DDP, uninterrupted; FSDP, rank 1 SIGKILLed after step 5 and restarted."""
    d = tmp_path_factory.mktemp("hf-runs")
    init = ["--init-from", str(saved[0] / "model.safetensors")]
    ddp_out = ok(torchrun(2, *TASK, *init, "--out", str(d / "ddp")))
    killed = {"DDP_FAULT": "kill:rank=1:step=5"}
    fsdp_out = ok(torchrun(2, *TASK, *init, "--strategy", "fsdp", "--snapshot-every", "1", "--out", str(d / "fsdp"),
                           restarts=1, extra_env=killed))  # fmt: skip
    return d, ddp_out, fsdp_out


def test_hf_model_from_save_pretrained_trains_under_ddp_and_fsdp_and_resumes_bitwise(runs):
    d, ddp_out, fsdp_out = runs
    for out in (ddp_out, fsdp_out):  # the tied weight HF stored once is taken, and said so
        assert f"1 tied, stored once in the file: {TIED}" in out and "missing" not in out
    assert "FSDP units: 2 GPT2Block (transformer.h.0 ... transformer.h.1), and the root" in fsdp_out
    assert "step 4: continuing at step 5" in fsdp_out and "verify: 2/2 ranks" in fsdp_out  # at most a step lost
    a = torch.load(d / "ddp" / "gpt2.params", weights_only=True)
    b = torch.load(d / "fsdp" / "gpt2.params", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # killed FSDP == uninterrupted DDP


def test_export_hf_is_a_folder_from_pretrained_loads_with_the_logits_of_ddp_predict(runs, capsys, tmp_path):
    params = runs[0] / "ddp" / "gpt2.params"
    code, text = ddp(capsys, "export", params, "--format", "hf", "--output", tmp_path / "new" / "gpt2")
    assert code == 0 and "(1 tied, stored once)" in text, text
    out = tmp_path / "new" / "gpt2"  # parent folders made
    with safetensors.safe_open(out / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys() and f.metadata()["format"] == "pt"  # as HF stores it
    assert json.loads((out / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    assert ddp(capsys, "predict", params, "--random", "3", "--output", tmp_path / "p.npz")[0] == 0
    got = np.load(tmp_path / "p.npz")
    model = lm().from_pretrained(out)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(hf_logits(model, got["input_ids"]), torch.from_numpy(got["logits"]))
    # past --max-shard-size: shards and an index, as HF writes them; both sides read them
    code, text = ddp(capsys, "export", params, "--format", "hf", "--output", out, "--max-shard-size", "40KB")
    assert code == 0 and not (out / "model.safetensors").exists(), text  # the single file of before is gone
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and "lm_head.weight" not in index["weight_map"]
    sharded = lm().from_pretrained(out)
    assert torch.equal(hf_logits(sharded, got["input_ids"]), torch.from_numpy(got["logits"]))
    code, text = ddp(capsys, "predict", out, "--input", tmp_path / "p.npz", "--output", tmp_path / "q.npz")
    assert code == 0 and np.array_equal(np.load(tmp_path / "q.npz")["logits"], got["logits"]), text


def test_a_save_pretrained_folder_is_read_as_it_is(saved, capsys, tmp_path):
    folder, model = saved
    ids = np.random.default_rng(0).integers(0, 96, (2, 16))
    np.savez(tmp_path / "x.npz", input_ids=ids)
    # config.json names the class: no --task, no --model
    code, text = ddp(capsys, "predict", folder, "--input", tmp_path / "x.npz", "--output", tmp_path / "p.npz")
    assert code == 0, text
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "p.npz")["logits"]), hf_logits(model, ids))
    code, text = ddp(capsys, "predict", folder, "--random", "2")  # HF's own dummy inputs, one row each
    assert code == 0 and [r.split("\t")[0] for r in text.splitlines()[-2:]] == ["0", "1"], text
    code, text = ddp(capsys, "verify", folder)
    assert code == 0 and "outputs identical" in text, text
    code, text = ddp(capsys, "inspect", folder)
    assert code == 0 and "transformer.wte.weight" in text, text
    fresh = gpt2(96, 16, 2)  # what --init-from does before training
    assert f"1 tied, stored once in the file: {TIED}" in weights.init_model(fresh, folder / "model.safetensors")
    assert torch.equal(hf_logits(fresh, ids), hf_logits(model, ids))
    # --init-skip of the head: the head is the embedding, which was loaded: not "left fresh"
    note = weights.init_model(gpt2(96, 16, 2), folder, skip=r"^lm_head\.")
    assert f"tied to a loaded weight, holding it: {TIED}" in note and "fresh" not in note


def test_fsdp_blocks_found_where_a_model_declares_none_and_a_warning_where_there_are_none():
    model = gpt2(96, 16, 2)
    model._no_split_modules = None  # the search alone: transformer is tied to lm_head, so it looks inside
    names = fsdp.resolve_blocks(model, None)
    assert set(names) == {"transformer.h.0", "transformer.h.1", "transformer.wpe", "transformer.ln_f"}
    assert fsdp.describe_units(torch.nn.Linear(2, 2), []).startswith("warning: FSDP found no blocks in Linear")


def test_bpe_token_files_train_sample_and_export_with_their_tokenizer(capsys, tmp_path, monkeypatch):
    tokenizers = pytest.importorskip("tokenizers")
    texts = [ROOT / "README.md", ROOT / "docs" / "tasks.md"]
    bpe = tmp_path / "bpe"
    code, text = ddp(capsys, "tokens", *texts, "--bpe", "400", "--output", bpe)
    assert code == 0 and "vocab 400, uint16" in text, text
    meta = json.loads((bpe / "meta.json").read_text())
    tok = tokenizers.Tokenizer.from_file(str(bpe / "tokenizer.json"))
    ids = np.concatenate([np.fromfile(bpe / f, dtype="<u2") for f in ("train.bin", "val.bin")])
    assert meta["tokenizer"] == "tokenizer.json" and meta["train_tokens"] + meta["val_tokens"] == len(ids)
    assert tok.decode(ids.tolist()) == "".join(t.read_text() for t in texts)  # every byte, once, in order
    again = tmp_path / "again"
    assert ddp(capsys, "tokens", *texts, "--tokenizer", bpe / "tokenizer.json", "--output", again)[0] == 0
    assert (again / "train.bin").read_bytes() == (bpe / "train.bin").read_bytes()
    big = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(70_000)}, unk_token="w0"))
    big.save(str(tmp_path / "big.json"))
    assert ddp(capsys, "tokens", texts[0], "--tokenizer", tmp_path / "big.json", "--output", tmp_path / "w")[0] == 0
    assert json.loads((tmp_path / "w" / "meta.json").read_text())["dtype"] == "uint32"  # past 65,536 ids
    files = [f"train={bpe}/train.bin", f"val={bpe}/val.bin", "block=16", "layers=1", "embd=16", "heads=2"]
    ok(train_alone("--task", "tokens", "--task-arg", *files, "--steps", "3", "--out", str(tmp_path / "run")))
    params = tmp_path / "run" / "tokens.params"
    code, text = ddp(capsys, "sample", params, "--prompt", "The model", "--chars", "12", "--top-k", "5")
    assert code == 0 and text.startswith("The model") and len(tok.encode(text.strip()).ids) >= 12, text
    assert ddp(capsys, "export", params, "--format", "hf")[0] == 0
    exported = tmp_path / "run" / "tokens-hf"
    assert (exported / "tokenizer.json").read_text() == (bpe / "tokenizer.json").read_text()
    assert (
        pytest.importorskip("transformers").AutoTokenizer.from_pretrained(exported)("The model").input_ids
        == tok.encode("The model").ids
    )


def test_sampling_with_top_k_1_is_greedy():
    torch.manual_seed(0)
    model = charlm.CharLM(torch.arange(11), block=8, layers=1, heads=2, embd=8, dropout=0.0)
    greedy = [3]
    with torch.no_grad():
        for _ in range(6):
            greedy.append(int(model(torch.tensor([greedy]))[0, -1].argmax()))
    assert charlm.sample(model, [3], 6, temperature=1.0, top_k=1, seed=5) == greedy


def test_an_export_that_fails_says_what_happened_and_writes_nothing(runs, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("DDP_FAULT", "enospc:rank=0:save=1")
    monkeypatch.setattr(faults, "_saves_seen", 0)
    faults._spec.cache_clear()
    try:
        code, text = ddp(capsys, "export", runs[0] / "ddp" / "gpt2.params", "--format", "safetensors",
                         "--output", tmp_path / "w.safetensors")  # fmt: skip
    finally:
        monkeypatch.delenv("DDP_FAULT")
        faults._spec.cache_clear()
    assert code != 0 and "ENOSPC" in text and "no w.safetensors was written" in text and "intact" not in text, text
    assert list(Path(tmp_path).iterdir()) == []
