"""Snapshots in host memory: slots, the restart's choice, room, async saves from them, and a stop honoured anywhere
(SIGKILLs at random steps and during a copy: test_resume, test_fsdp, test_stream)."""

import json
import re
import shutil
import threading
import time

import pytest
import torch

from ddp import faults, snapshot
from ddp.checkpoint import Checkpointer, memory_choice
from ddp.config import CheckpointConfig
from ddp.replicas import partners
from ddp.snapshot import Snapshots

from . import workers
from .helpers import assert_same_training, assert_tree_equal, model_state, ok, spawn, torchrun, train_alone

# 922 training samples, batch 32 on 2 ranks: 14 steps an epoch; the run crosses an epoch boundary.
ARGS = ["--samples", "1024", "--batch-size", "32", "--steps", "20", "--log-every", "1", "--checkpoint-every", "6"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-rank run, without snapshots."""
    out = tmp_path_factory.mktemp("ref")
    ok(torchrun(2, *ARGS, "--snapshot-every", "0", "--out", str(out)))
    return out


def test_a_snapshot_round_trips_bitwise_and_the_other_slot_survives_a_copy_never_committed(tmp_path, monkeypatch):
    snaps = Snapshots(tmp_path, 1, rank=0, out=tmp_path, say=lambda _: None)
    snaps.open("run", clean=False)
    states = [{"w": torch.randn(3, 5), "b": torch.arange(4, dtype=torch.bfloat16), "n": i, "s": [torch.ones(2)]}
              for i in range(3)]  # fmt: skip
    states[2]["big"] = torch.randn(2**21)  # 8 MiB: copied on the snapshot thread, beside the next step
    for step, state in enumerate(states[:2], start=1):
        snaps.take(step, state, live=set)
        snaps.wait()
    assert snaps.held(1) == [2, 1]
    assert_tree_equal(snaps.load(1), states[0])
    halfway, go_on = threading.Event(), threading.Event()

    def pause(rank: int, step: int) -> None:  # the fault hook half-way through a copy: here a pause, not a kill
        halfway.set()
        go_on.wait(30)

    monkeypatch.setattr(faults, "in_snapshot", pause)
    snaps.take(3, states[2], live=set)  # overwrites step 1's slot; seen half-way, as a kill would leave it:
    assert halfway.wait(30)
    reopened = Snapshots(tmp_path, 1, rank=0, out=tmp_path)
    reopened.open("run", clean=False)
    assert reopened.held(1) == [2]  # the slot being written is never named
    assert_tree_equal(reopened.load(2), states[1])
    go_on.set()
    snaps.wait()
    assert snaps.held(1) == [3, 2]  # named once the copy is whole
    assert_tree_equal(snaps.load(3), states[2])
    snaps.close(remove=True)
    assert not (tmp_path / snapshot.ROOT / "run").exists()


@pytest.mark.parametrize("extra", [{}, {"dtype": torch.float16, "device": torch.device("cpu")}], ids=["json", "torch"])
def test_a_snapshot_gives_back_each_value_of_its_own_type(tmp_path, extra):
    """Tuples, dicts keyed by numbers, a dict whose one key is a marker's, NaN: as JSON; with values JSON has no
    type for (a dtype, a device), in torch's format, which the weights-only loader reads."""
    snaps = Snapshots(tmp_path, 1, rank=0, out=tmp_path)
    snaps.open("run", clean=False)
    state = {"pos": (3, [1, 2], {"k": (None,)}), "by_id": {0: {"step": torch.ones(1)}, 1.5: "x", (1, 2): True},
             snapshot.TENSOR: 1, "fake": {snapshot.TENSOR: 0}, "nan": float("nan"), **extra}  # fmt: skip
    snaps.take(1, state, live=set)
    snaps.wait()
    loaded = snaps.load(1)
    assert snapshot.read_meta(snaps.dir / "meta-0")[1][:1] == (b"T" if extra else b"J")
    assert loaded["pos"] == (3, [1, 2], {"k": (None,)}) and loaded["fake"] == {snapshot.TENSOR: 0}
    assert list(loaded["by_id"]) == [0, 1.5, (1, 2)] and torch.equal(loaded["by_id"][0]["step"], torch.ones(1))
    assert loaded[snapshot.TENSOR] == 1 and loaded["nan"] != loaded["nan"]
    assert all(type(loaded[k]) is type(v) and loaded[k] == v for k, v in extra.items())


def test_a_restart_takes_the_newest_step_every_rank_holds_before_one_another_rank_must_send():
    # rank 1 died copying step 9: every rank holds 8, which restores bitwise from each rank's own memory
    assert memory_choice([[9, 8], [8, 7]], disk=5, peers=True) == (8, [0, 1])
    # rank 1's memory is gone (a replaced node): under DDP rank 0 sends step 9; under FSDP the disk serves
    assert memory_choice([[9, 8], []], disk=5, peers=True) == (9, [0])
    assert memory_choice([[9, 8], []], disk=5, peers=False) is None
    # nothing in memory newer than disk: the disk serves
    assert memory_choice([[6, 5], [6, 5]], disk=6, peers=True) is None
    assert memory_choice([[], []], disk=None, peers=True) is None
    # --snapshot-replicas: rank 1's partner kept its steps 9 and 8, so FSDP restores step 9 from memory too
    assert memory_choice([[9, 8], []], disk=5, peers=False, kept=[[], [9, 8]]) == (9, [0])
    assert memory_choice([[9, 8], []], disk=5, peers=False, kept=[[], [8]]) == (8, [0])


def test_a_rank_whose_memory_is_gone_is_sent_its_own_snapshot_back_by_its_partner_or_the_disk_serves(tmp_path):
    ranks = spawn(workers.replica_ring, 2, str(tmp_path))
    assert ranks[0]["kept"] == ranks[1]["kept"] == [2, 1]  # each keeps its source's two newest
    said = "\n".join(ranks[0]["said"])
    assert "each rank's snapshots are also kept by a rank on the next node (2 nodes; rank 0's by rank 1)" in said
    # step 1: rank 0's copy is damaged; every rank learns it, and the restore falls back to disk, said once
    assert not ranks[0]["step 1"] and not ranks[1]["step 1"]
    warning = next(line for line in ranks[0]["said"] if "could not be sent" in line)
    assert "rank(s) [1] could not be sent their snapshots of step 1" in warning
    assert "rank 1: its partner, rank 0, could not read the copy it keeps" in warning
    assert ranks[0]["step 2"] and ranks[1]["step 2"]
    assert_tree_equal(ranks[1]["restored"], ranks[1]["expected"])  # rank 1's own state, not rank 0's
    assert ranks[0]["saved_config"] == {"launch": 1}  # the run's record is the rank's own snapshots' to write


def test_each_ranks_partner_is_at_its_place_on_the_next_node_and_none_where_nodes_cannot_pair():
    assert partners(["a", "a", "b", "b"]) == [2, 3, 0, 1]
    assert partners(["a", "b", "c"]) == [1, 2, 0]
    assert partners(["a", "b", "a", "b"]) == [1, 0, 3, 2]  # ranks interleaved across nodes
    assert "one node" in partners(["a", "a"])
    assert "different numbers of ranks (2, 1)" in partners(["a", "a", "b"])


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_an_async_checkpoint_is_written_from_its_steps_snapshot_whose_slot_is_kept_until_it_commits(tmp_path, mode):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Linear(6, 6))
    model[1].weight = model[0].weight  # tied: one tensor, two names
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ckpts = {}
    for m in ("off", mode):  # the same state, saved in step and from the snapshot
        cfg = CheckpointConfig(checkpoint_every=2, checkpoint_every_seconds=0, snapshot_every="3", async_save=m,
                               snapshot_dir=str(tmp_path / "shm" / m))  # fmt: skip
        ckpts[m] = Checkpointer(tmp_path / m, cfg, model, optimizer, say=lambda _: None)
        ckpts[m].snapshots.open("run", clean=False)
    for step in range(1, 5):
        for c in ckpts.values():
            c.before_update()
        model(torch.randn(8, 6)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        for c in ckpts.values():
            c.save_if_due(step)
        snaps = ckpts[mode].snapshots
        if step % 2 == 0:  # due: a snapshot taken for it (not one of --snapshot-every's), pinned while written
            assert ckpts[mode].in_flight and snaps.pending[1] == step and snaps.pinned == snaps.pending[0]
        if step == 3:  # the newest slot (2's) is pinned: 3 goes to another, 4 to the third
            assert snaps.pending[0] not in (snaps.pinned, int(max(snaps.slots, key=lambda k: snaps.slots[k]["step"])))
    slots = sorted(p.name for p in snaps.dir.glob("data-*"))
    assert snaps.pinned is not None and slots == ["data-0", "data-1", "data-2"]
    for c in ckpts.values():
        c.wait()
    assert snaps.pinned is None and (mode == "thread") == (ckpts[mode].writer.process is None)
    for step in ("step-00000002", "step-00000004"):
        a, b = tmp_path / "off" / step, tmp_path / mode / step
        names = sorted(p.name for p in a.iterdir() if p.name != "manifest.json")
        assert names == sorted(p.name for p in b.iterdir() if p.name != "manifest.json")
        for name in names:  # bitwise the state of that step, though the model moved on while it was written
            assert_tree_equal(torch.load(a / name, weights_only=True), torch.load(b / name, weights_only=True))
    for c in ckpts.values():
        c.finish()
    assert not snaps.dir.exists()


def test_auto_grows_the_interval_at_once_to_what_brings_the_cost_under_its_budget(tmp_path):
    said = []
    snaps = Snapshots(tmp_path, None, rank=0, out=tmp_path, say=said.append)  # auto
    assert snaps.share() == -1.0 and snaps.every == 1  # not measured before 8 snapshots
    snaps.tune(0.30)  # 15x the 2 % budget: 16 steps apart, in one move
    assert snaps.every == 16 and said == ["snapshots cost 30.0% of training time: one every 16 steps from now"]
    snaps.tune(0.019)  # under the budget: kept
    snaps.tune(0.021)  # just over: twice as far apart
    assert snaps.every == 32 and len(said) == 2


def test_auto_counts_the_snapshot_threads_copies_where_no_core_is_spare_for_them(tmp_path):
    snaps = Snapshots(tmp_path, None, rank=0, out=tmp_path)
    snaps.open("run", clean=False)
    big = torch.randn(snapshot.SMALL // 4 + 1)  # over SMALL: copied on the snapshot thread
    for step in range(1, 9):
        snaps.take(step, {"w": big}, live=set)
    snaps.wait()
    assert snaps.cost["taken"] == 8 and snaps.cost["thread"] > 0  # the thread's CPU seconds
    # in 1000 s (long enough that a stall of this busy host before share() reads the clock moves nothing)
    snaps.cost.update(blocked=10.0, waited=4.0, thread=20.0, since=time.perf_counter() - 1000.0)
    snaps.spare_core = True  # the copies ran beside training: only what blocked it counts
    assert snaps.share() == pytest.approx(0.010, rel=1e-3)
    snaps.spare_core = False  # they ran in its place: training waited for 4 s of the 20 s they took
    assert snaps.share() == pytest.approx(0.026, rel=1e-3)
    snaps.close(remove=True)


@pytest.mark.parametrize("nproc", [1, 2])
def test_timed_checkpoints_and_the_snapshot_interval_do_not_wait_for_a_logged_step(tmp_path, nproc):
    # Both ride on the stop vote (every ~0.1 s of steps, read by every rank at the same step), not on the log's
    # agreement: with a log line every 10^5 steps, a run still saves every half second of training and widens the
    # interval of snapshots that cost more than 2 %; an evaluation every epoch (28 steps) reads the vote in flight,
    # whose riders then come at the next vote. A world of one decides both at every step, alone.
    args = ["--steps", "1000", "--log-every", "100000", "--checkpoint-every-seconds", "0.5", "--keep-last", "100",
            "--out", str(tmp_path)]  # fmt: skip
    out = ok(torchrun(2, *args)) if nproc == 2 else ok(train_alone(*args))
    saved = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "checkpoints").iterdir())
    assert len(saved) >= 2 and saved[-1] == 1000, saved  # timed ones, then the last step's
    assert re.search(r"snapshots cost [\d.]+% of training time: one every \d+ steps from now", out), out[-2000:]


def test_a_record_that_outgrows_its_meta_file_is_named_whole_and_a_smaller_one_after_it_too(tmp_path):
    # a slot's meta file is mapped once at 4 KiB and grown to fit; the header's length, not the file's, bounds the
    # record: a short record written over a long one reads back short
    snaps = Snapshots(tmp_path, 1, rank=0, out=tmp_path)
    snaps.open("run", clean=False)
    states = {1: {"w": torch.ones(2), "log": list(range(3000))}, 2: {"w": torch.ones(2), "log": []},
              3: {"w": torch.zeros(2), "log": [7]}}  # fmt: skip
    for step, state in states.items():
        snaps.take(step, state, live=set)
        snaps.wait()
    assert (snaps.dir / "meta-0").stat().st_size > 4096  # step 1's record, then step 3's in the same slot
    reopened = Snapshots(tmp_path, 1, rank=0, out=tmp_path)
    reopened.open("run", clean=False)
    assert reopened.held(1) == [3, 2]
    assert_tree_equal(reopened.load(3), states[3])
    assert_tree_equal(reopened.load(2), states[2])
    snaps.close(remove=True)


def test_a_tied_weight_is_stored_once_and_restored_as_one_tensor(tmp_path):
    snaps = Snapshots(tmp_path, 1, rank=0, out=tmp_path)
    snaps.open("run", clean=False)
    tied = torch.randn(4)
    snaps.take(1, {"embedding": tied, "head": tied}, live=set)
    snaps.wait()
    loaded = snaps.load(1)
    assert torch.equal(loaded["head"], tied) and loaded["head"].data_ptr() == loaded["embedding"].data_ptr()
    assert (tmp_path / snapshot.ROOT / "run" / "rank-0" / "data-0").stat().st_size == snapshot.ALIGN


def test_a_state_whose_layout_changes_between_steps_round_trips_at_each(tmp_path):
    # the layout (places, size, their JSON) is worked out again only when a tensor's dtype, shape or strides
    # change, or one comes or goes; each of those changes, and a tie made and undone, reads back exactly
    snaps = Snapshots(tmp_path, 1, rank=0, out=tmp_path)
    snaps.open("run", clean=False)
    w = torch.randn(3, 4)
    states = [{"w": w, "e": torch.zeros(0)}, {"w": w.clone(), "e": torch.zeros(0)},  # the same layout, new tensors
              {"w": torch.randn(4, 3), "e": torch.zeros(0)}, {"w": torch.randn(3, 4).t(), "e": torch.zeros(0, 2)},
              {"w": w.double(), "e": torch.zeros(0, 2)}, {"w": w, "v": w, "e": torch.zeros(0)},
              {"w": w, "v": w.clone(), "e": torch.zeros(0)}, {"w": w}]  # fmt: skip
    for step, state in enumerate(states, start=1):
        snaps.take(step, state, live=set)
        snaps.wait()
        reopened = Snapshots(tmp_path, 1, rank=0, out=tmp_path)  # as a restart reads it: from the files
        reopened.open("run", clean=False)
        loaded = reopened.load(step)
        assert_tree_equal(loaded, state)
        assert all(loaded[k].stride() == v.stride() and loaded[k].dtype == v.dtype for k, v in state.items())
        if "v" in state:  # tied at step 6, untied at step 7
            assert (loaded["v"].data_ptr() == loaded["w"].data_ptr()) == (state["v"] is state["w"])
    snaps.close(remove=True)


def test_a_damaged_slot_is_not_offered_to_a_restart(tmp_path):
    snaps = Snapshots(tmp_path, 1, rank=0, out=tmp_path)
    snaps.open("run", clean=False)
    for step in (1, 2):
        snaps.take(step, {"w": torch.full((8,), float(step))}, live=set)
        snaps.wait()
    _, record = snapshot.read_meta(snaps.dir / "meta-1")
    with open(snaps.dir / "meta-1", "r+b") as f:  # step 2's record, torn: its last bytes never written
        f.seek(snapshot.RECORD + len(record) - 3)
        f.write(b"\0\0\0")
    said = []
    reopened = Snapshots(tmp_path, 1, rank=0, out=tmp_path, say=said.append)
    reopened.open("run", clean=False)
    assert reopened.held(1) == [1] and "slot 1 is damaged; it is not used" in said[0]
    assert torch.equal(reopened.load(1)["w"], torch.full((8,), 1.0))
    (snaps.dir / "data-0").write_bytes(b"")  # emptied after the restart named it: an OSError too, not a ValueError
    with pytest.raises(OSError, match="data-0 is shorter than its snapshot"):
        reopened.load(1)
    (snaps.dir / "meta-0").write_bytes(b"{torn")  # after the restart read it: an OSError, which ddp.replicas reports
    with pytest.raises(OSError, match="does not match its checksum"):
        reopened.raw(1)
    (snaps.dir / "meta-0").write_bytes(b'{"step": 1}\nJ{}')  # the format before this one's: not named, no crash
    reopened.open("run", clean=False)
    assert reopened.held(1) == []


def test_too_little_shared_memory_warns_once_and_training_goes_on(tmp_path, monkeypatch):
    said = []
    snaps = Snapshots(tmp_path, 1, rank=0, out=tmp_path, say=said.append)
    snaps.open("run", clean=False)
    monkeypatch.setattr(snapshot.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(1 << 30, 1 << 30, 1024))
    for step in (1, 2):
        if snaps.due(step):
            snaps.take(step, {"w": torch.zeros(1 << 16)}, live=set)
    assert len(said) == 1 and "snapshots in host memory are off: a snapshot needs 0.2 MiB" in said[0]
    assert snapshot._available_memory() > 1 << 20  # read from the host, not assumed
    snaps.take(3, {"w": torch.zeros(1 << 16)}, live=set)  # due on every rank alike; off here, so nothing
    assert snaps.held(1) == [] and snaps.pending is None and len(said) == 1


def test_a_slot_already_reserved_takes_its_snapshot_without_asking_for_room_again(tmp_path, monkeypatch):
    snaps = Snapshots(tmp_path, 1, rank=0, out=tmp_path)
    snaps.open("run", clean=False)
    for step in (1, 2):  # both slots reserved, at the size of this state
        snaps.take(step, {"w": torch.full((1 << 16,), float(step))}, live=set)
        snaps.wait()
    monkeypatch.setattr(snapshot.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(1 << 30, 1 << 30, 1024))
    snaps.take(3, {"w": torch.full((1 << 16,), 3.0)}, live=set)  # into step 1's slot: no new memory needed
    snaps.wait()
    assert (
        not snaps.disabled and snaps.held(1) == [3, 2] and torch.equal(snaps.load(3)["w"], torch.full((1 << 16,), 3.0))
    )
    snaps.take(4, {"w": torch.zeros(1 << 18)}, live=set)  # a larger state: the slot must grow, and cannot
    assert snaps.disabled


def test_a_stop_during_an_evaluation_exits_with_the_last_step_saved_and_resumes_bitwise(tmp_path, reference):
    args = [*ARGS, "--eval-every", "8", "--snapshot-replicas", "1", "--out", str(tmp_path)]
    out = ok(torchrun(2, *args, extra_env={"DDP_FAULT": "sigint:rank=1:at=eval"}))
    assert "note: --snapshot-replicas 1 is off: every rank is on one node" in out  # said, and the run goes on
    assert "stopping on SIGINT after step 8: checkpoint saved, relaunch to resume" in out
    assert "eval at step 8" not in out and not (tmp_path / "mlp.params").exists()
    assert model_state(tmp_path)[1]["step"] == 8
    out = ok(torchrun(2, *args))
    assert "step-00000008: continuing at step 9" in out and "verify: 2/2 ranks reloaded" in out
    assert_same_training(tmp_path, reference)


def test_a_stop_during_the_export_keeps_the_last_step_and_a_relaunch_exports_it(tmp_path, reference):
    args = [*ARGS, "--out", str(tmp_path)]
    out = ok(torchrun(2, *args, extra_env={"DDP_FAULT": "sigterm:rank=0:at=export"}))
    assert "stopping on SIGTERM during the export: the checkpoint of the last step is saved" in out
    assert "verify:" not in out and model_state(tmp_path)[1]["step"] == 20
    out = ok(torchrun(2, *args))
    assert "step 20 already completes the run" in out and "verify: 2/2 ranks reloaded" in out
    assert "eval at step 20" not in out  # the first launch evaluated it: one evaluation per step
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    epoch_of = {r["step"]: r["epoch"] for r in records if r["kind"] == "train"}
    evals = [(r["step"], r["epoch"]) for r in records if r["kind"] == "eval"]
    assert [step for step, _ in evals].count(20) == 1 and all(epoch_of.get(s, e) == e for s, e in evals), evals
    assert_same_training(tmp_path, reference)
