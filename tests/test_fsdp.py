"""--strategy fsdp: checkpoints, restarts, tied weights and settings; its maths are in test_equivalence."""

import random
import re

import pytest
import torch
from torch import nn

from ddp.errors import ConfigError
from ddp.fsdp import default_blocks, resolve_blocks
from ddp.model import MLP
from ddp.tasks.charlm import CharLM
from ddp.train import main
from ddp.weights import read

from .helpers import (
    assert_same_training,
    assert_tree_equal,
    free_port,
    max_diff,
    model_state,
    ok,
    start,
    stopped_after,
    torchrun,
    train_alone,
)
from .tied_task import TiedNet

FSDP = ["--strategy", "fsdp", "--samples", "1024", "--batch-size", "32", "--log-every", "1"]


# BatchNorm: each rank's running statistics are its own under FSDP; a checkpoint must hold rank 0's, a snapshot
# each rank's own
KILLED = [*FSDP, "--steps", "20", "--optimizer", "adamw", "--lr", "0.01", "--batchnorm"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The run that the killed ones must end equal to, never killed."""
    out = tmp_path_factory.mktemp("ref")
    ok(torchrun(2, *KILLED, "--out", str(out)))
    return out


def test_sigkilled_fsdp_rank_restarts_and_ends_bitwise_equal(tmp_path, reference):
    args = KILLED
    # --async-save process: a killed rank's writer process may be mid-file at the kill. --workers 2: the data
    # position of DataLoader workers is restored too (the reference, the replaced node below and test_hf's kill
    # read in the training process)
    run = [*args, "--checkpoint-every", "5", "--snapshot-every", "1", "--async-save", "process", "--workers", "2",
           "--out", str(tmp_path / "run")]  # fmt: skip
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    # two kills after a step, then one half-way through a snapshot's copy: with the replaced node below (step 7 to 9)
    # and test_hf's kill (step 5), five SIGKILLs of an FSDP rank in every run of the suite, four at random steps
    steps = sorted(rng.sample(range(2, 20), 3))
    kinds = ["kill", "kill", "kill-in-snapshot"]
    kills = ";".join(f"{kinds[i]}:attempt={i}:rank={rng.randrange(2)}:step={s}" for i, s in enumerate(steps))
    proc = torchrun(2, *run, restarts=3, extra_env={"DDP_FAULT": kills})
    context = f"seed {seed}, DDP_FAULT={kills}"
    assert proc.returncode == 0, f"{context}:\n{proc.output[-4000:]}"
    # each restart continues at the step it died in: every rank's shards from its own memory (the other slot's
    # after a kill during a copy), from disk only where a checkpoint holds the same step
    assert [int(n) for n in re.findall(r"continuing at step (\d+)", proc.output)] == steps, context
    from_memory = {int(n) for n in re.findall(r"host memory \(.*?\), step (\d+)", proc.output)}
    assert from_memory >= {s - 1 for s in steps if (s - 1) % 5}, context
    assert_same_training(tmp_path / "run", reference)  # across the epoch boundary at step 14 too


def test_a_replaced_node_gets_its_shards_back_from_its_partners_copy_and_ends_bitwise_equal(tmp_path, reference):
    # Two nodes on this host (two torchrun agents, one rank each), each with its own host memory. Rank 1 dies
    # with its node's memory: its snapshots and its copy of rank 0's. Under FSDP no other rank holds its shards;
    # with --snapshot-replicas 1 rank 0 keeps a copy of rank 1's snapshots and sends them back, so the job
    # resumes from memory, not from the checkpoint of step 5 on disk. With torchrun's store not shared with the
    # workers (what launch scripts exported until the restart fix: rank 0 hosts each attempt's store), the
    # restart must still join; the shared store's restarts are the other kill tests'. Rank 1's exchanges start
    # late, as over a slow network: each snapshot's must still be over before the next step ends (it once lagged).
    port, step = free_port(), random.randrange(7, 10)
    launcher = ["--head", "127.0.0.1", "--port", str(port), "--nnodes", "2", "--nproc", "1", "--rdzv-id", "partner",
                "--max-restarts", "1"]  # fmt: skip
    args = [*KILLED, "--checkpoint-every", "5", "--snapshot-every", "1", "--snapshot-replicas", "1"]
    nodes = []
    for i in range(2):
        shm = tmp_path / f"shm{i}"
        cmd = ["bash", "launch/multinode.sh", *launcher, "--", *args, "--snapshot-dir", str(shm), "--out",
               str(tmp_path / "run")]  # fmt: skip
        lost = f"lose-memory:rank=1:step={step}:dir={shm}:replica_delay=0.3"
        nodes.append(start(cmd, tmp_path / f"node{i}.log", DDP_FAULT=lost, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"))
    for node in nodes:
        node.wait(timeout=150)
    logs = "".join((tmp_path / f"node{i}.log").read_text() for i in range(2))
    assert all(node.returncode == 0 for node in nodes), f"step {step}:\n{logs[-4000:]}"
    assert re.search(r"rank\(s\) \[1\] hold no snapshot of step \d+ \(a replaced node\?\): their partners", logs)
    resumed = re.search(r"resumed from the snapshot in host memory \(.*\), step (\d+): continuing", logs)
    assert resumed and int(resumed[1]) in (step - 1, step), f"step {step}:\n{logs[-4000:]}"
    assert_same_training(tmp_path / "run", reference)


def test_fsdp_bf16_sigterm_saves_then_resumes_on_three_ranks_past_a_damaged_checkpoint(tmp_path):
    args = [*FSDP, "--steps", "16", "--checkpoint-every", "4", "--precision", "bf16", "--out", str(tmp_path)]
    out = ok(torchrun(2, *args, extra_env={"DDP_FAULT": "sigterm:rank=1:step=9"}))
    stopped = stopped_after(out, 9)  # at a vote: after step 10 to 16, the last
    newest = tmp_path / "checkpoints" / f"step-{stopped:08d}"
    shard = newest / "sharded" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    out = ok(torchrun(3, *args))
    assert f"skipping {newest}: {shard} fails its xxh3_128 check" in out
    before = (stopped - 1) // 4 * 4  # the newest checkpoint before the damaged one: --checkpoint-every 4
    assert "checkpoint written by 2 rank(s), resuming on 3" in out and f"continuing at step {before + 1}" in out
    assert "verify: 3/3 ranks reloaded" in out and "atol = 0.01 for bf16" in out
    assert model_state(tmp_path)[1]["step"] == 16
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())  # --keep-last 3 prunes sharded ones too
    assert kept == [f"step-{s:08d}" for s in sorted({8, 12, 16, stopped})[-3:]]  # the damaged one, where it is kept


def test_fsdp_trains_a_users_task_with_tied_weights_as_one_process_does(tmp_path):
    task = ["--task", "tests/tied_task.py:make", "--precision", "fp64", "--steps", "20"]
    ok(train_alone(*task, "--batch-size", "32", "--out", str(tmp_path / "one")))
    ok(torchrun(2, *task, "--batch-size", "16", "--strategy", "fsdp", "--out", str(tmp_path / "fsdp")))
    (a, _), (b, _) = model_state(tmp_path / "fsdp"), model_state(tmp_path / "one")
    assert max_diff(a, b) < 1e-10
    weights = torch.load(tmp_path / "fsdp" / "tied.params", weights_only=True)
    assert weights["head.weight"].data_ptr() == weights["embed.weight"].data_ptr()  # one tensor, as DDP saves it
    found = read(tmp_path / "fsdp" / "checkpoints" / "step-00000020")  # what inspect, verify and export read
    assert found.found_at == "sharded/model" and max_diff(found.state, weights) == 0
    # the step a user takes when the model outgrows DDP: its checkpoint continues under FSDP
    out = ok(torchrun(2, *task[:-1], "24", "--batch-size", "16", "--strategy", "fsdp", "--out", str(tmp_path / "one")))
    assert "strategy 'ddp' -> 'fsdp'" in out and "continuing at step 21" in out and "verify: 2/2 ranks" in out


def test_async_sharded_checkpoints_from_the_snapshot_hold_what_one_written_in_step_does(tmp_path):
    # --async-save thread and process under FSDP: each rank's shards, read in place from the snapshot of step 3,
    # are planned by DCP and written by a thread, or by each rank's writer process; a user's task with tied
    # weights and sizes (13, 6) that 2 ranks do not divide. The last step's checkpoint is written in step.
    args = ["--strategy", "fsdp", "--task", "tests/tied_task.py:make", "--steps", "6", "--checkpoint-every", "3",
            "--optimizer", "adamw", "--batch-size", "16"]  # fmt: skip
    for mode in ("off", "thread", "process"):
        ok(torchrun(2, *args, "--async-save", mode, "--out", str(tmp_path / mode)))
    (a, ta), (b, tb) = model_state(tmp_path / "off", 3), model_state(tmp_path / "thread", 3)
    c, tc = model_state(tmp_path / "process", 3)
    for model, train in ((b, tb), (c, tc)):
        assert_tree_equal(model, a)
        assert_tree_equal(train["optimizer"], ta["optimizer"])
        assert train["step"] == 3
    assert tc["config"]["checkpoint"]["async_save"] == "process"
    for rank in (0, 1):  # rank 1's file written by its own writer process: the records carry no CRC32, as model.pt
        data = [
            tmp_path / m / "checkpoints" / "step-00000003" / "sharded" / f"__{rank}_0.distcp"
            for m in ("off", "process")
        ]
        assert data[0].stat().st_size == data[1].stat().st_size and data[0].read_bytes() != data[1].read_bytes()


def test_default_blocks_open_containers_and_leave_tied_weights_to_the_root():
    mlp = MLP(20, (8, 8), 3)
    assert default_blocks(mlp) == [mlp.hidden[0], mlp.hidden[2], mlp.output]
    tied = TiedNet(13, 6)
    assert default_blocks(tied) == [tied.mix[0]]
    lm = CharLM(torch.arange(10), block=8, layers=2, heads=2, embd=8)
    assert [b for b in default_blocks(lm) if b in list(lm.blocks)] == list(lm.blocks)
    assert lm.tok not in default_blocks(lm) and lm.head not in default_blocks(lm)


def test_a_block_holding_one_half_of_a_tied_pair_is_refused_by_name():
    tied = TiedNet(13, 6)
    with pytest.raises(ConfigError, match=r"block 'head' shares a parameter with embed.weight"):
        resolve_blocks(tied, lambda m: [m.head])
    with pytest.raises(ConfigError, match="not a submodule of the model"):
        resolve_blocks(tied, lambda m: [nn.Linear(2, 2)])
    assert resolve_blocks(tied, lambda m: [m.mix, m.mix[0]]) == ["mix.0", "mix"]  # deepest first


def test_ddp_only_options_are_refused_under_fsdp(tmp_path, capsys):
    assert main(["--strategy", "fsdp", "--static-graph", "--bucket-cap-mb", "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--strategy fsdp does not take --static-graph, --bucket-cap-mb" in err


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # no_dist: one process, as meant
@pytest.mark.parametrize("held", ["all", "one missing"])
def test_the_writer_process_writes_a_dcp_data_file_that_dcp_reads_back(tmp_path, held):
    # ddp.dcp.SlotWriter: tensors read in place from a slot's file, a channels_last and an empty one among them,
    # and values DCP stores as bytes. Where DCP hands over a tensor that is not the slot's, DCP's own writer writes.
    from ddp import dcp, persist, snapshot

    tensors = [torch.randn(3, 5), torch.randn(2, 4, 3, 3).to(memory_format=torch.channels_last),
               torch.arange(6, dtype=torch.int64), torch.empty(0, 4)]  # fmt: skip
    places, size = snapshot._places(tensors)
    data = tmp_path / "slot"
    with open(data, "wb") as f:
        f.truncate(size)
        for t, place in zip(tensors, places, strict=True):
            f.seek(place[0])
            f.write(t.permute(0, 2, 3, 1).contiguous().numpy().tobytes() if place[3] else t.numpy().tobytes())
    mapped = persist.slot_tensors(data, {"places": places})
    places_by_pointer = {t.data_ptr(): p for t, p in zip(mapped, places, strict=True) if t.numel()}
    state = {"w": mapped[0], "conv": mapped[1], "n": mapped[2], "none": mapped[3], "lr": 0.1, "names": ["a", "b"]}
    if held == "one missing":
        state["copy"] = mapped[0].clone()
    writer = persist.Writer()
    try:
        slot_writer = dcp.SlotWriter(tmp_path / "out", data, places_by_pointer, writer.request)
        torch.distributed.checkpoint.save(state, storage_writer=slot_writer, no_dist=True)
    finally:
        writer.close()
    back, _ = dcp.load(tmp_path / "out")
    assert_tree_equal(back, {**state, "conv": tensors[1]})  # the channels_last one read back by its strides
    # the process hashed what it wrote: its entry is the one a manifest records
    assert bool(slot_writer.entries) == (held == "all")
    for name, entry in slot_writer.entries.items():
        assert entry["size"] == (tmp_path / "out" / name).stat().st_size
