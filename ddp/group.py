"""The process group: join it from torchrun's environment, talk through it, leave it.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and
MASTER_PORT. Started without torchrun, the process runs as a world of one, through the
same code path, so that a script works unchanged under ``python`` and ``torchrun``.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import gc
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ddp import faults
from ddp.config import DistConfig
from ddp.device import local_device, num_gpus
from ddp.errors import ConfigError, DistributedError, first_line


@dataclass(frozen=True)
class World:
    """Where this process stands in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str = "gloo"
    device_kind: str = "auto"
    """--device: auto, cpu or cuda."""
    roll_call: tuple[Any, str] | None = dataclasses.field(default=None, compare=False, repr=False)
    """(a store that outlives any one rank where there is one, this attempt's key) for ``watchdog.roll_call``."""

    @property
    def is_main(self) -> bool:
        """True on global rank 0, the only rank that writes shared files."""
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """This rank's device: its own GPU under NCCL, else the CPU."""
        return local_device(self.backend, self.device_kind)

    def prefix(self) -> str:
        """Log prefix, e.g. ``[rank 0/2]``."""
        return f"[rank {self.rank}/{self.world_size}]"


def world_from_env(backend: str = "gloo", device: str = "auto") -> World:
    """Read torchrun's variables; a world of one when they are absent."""
    env = os.environ
    return World(
        rank=int(env.get("RANK", 0)),
        world_size=int(env.get("WORLD_SIZE", 1)),
        local_rank=int(env.get("LOCAL_RANK", 0)),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
        backend=backend,
        device_kind=device,
    )


def resolve_backend(name: str) -> str:
    """``auto`` becomes nccl when CUDA is available, else gloo; NCCL needs GPUs."""
    if name == "auto":
        return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if name == "nccl" and not torch.cuda.is_available():
        raise ConfigError("--backend nccl needs a CUDA GPU and none is visible; use --backend gloo on CPU")
    return name


def check_devices(world: World) -> None:
    """Under NCCL each local rank needs its own GPU; refuse before any group starts."""
    if world.device_kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible; use --device auto or cpu")
    if world.device_kind == "cpu" and world.backend == "nccl":
        raise ConfigError("--device cpu: NCCL runs on GPUs only; use --backend gloo with --device cpu")
    if world.backend == "nccl" and world.local_world_size > num_gpus():
        raise ConfigError(
            f"{world.local_world_size} processes per node but only {num_gpus()} visible GPU(s) "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
            "NCCL needs one GPU per process: lower --nproc-per-node, or use --backend gloo"
        )


def init(cfg: DistConfig) -> World:
    """Join the process group (or make a world of one) with an explicit timeout."""
    world = world_from_env(resolve_backend(cfg.backend), cfg.device)
    check_devices(world)
    if world.device.type == "cuda":
        torch.cuda.set_device(world.device)  # before init, so NCCL binds this rank's GPU
    timeout = datetime.timedelta(seconds=max(cfg.startup_timeout, cfg.timeout))  # --timeout from the first step
    if "MASTER_ADDR" in os.environ and "WORLD_SIZE" in os.environ:
        faults.before_join(world.rank)
        store, roll_call = join_store(world, timeout, cfg.join_timeout)
        world = dataclasses.replace(world, roll_call=roll_call)
        dist.init_process_group(
            world.backend,
            store=store,
            rank=world.rank,
            world_size=world.world_size,
            timeout=timeout,
            device_id=_device_id(world),
        )
    else:
        dist.init_process_group(world.backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return world


# The key, in torchrun's own store, where rank 0 publishes the store of this attempt.
PUBLISHED = "ddp/process-group-store"


def join_store(world: World, timeout: datetime.timedelta, join_timeout: float) -> tuple[dist.Store, tuple]:
    """A store that only this attempt of the job has ever written to; and where to hold a roll call (torchrun's
    store, which outlives every rank, under this attempt's nonce; else the same store).

    torchrun (c10d rendezvous) hands its workers its own TCPStore, which outlives the
    workers: after a restart it still holds the previous attempt's keys, and a
    restarted rank can read the dead ranks' gloo addresses or NCCL ids from it
    (pytorch/pytorch#135712). ``TORCHELASTIC_RESTART_COUNT`` cannot scope the keys,
    since each node's agent counts its own restarts. So rank 0 starts a fresh store on
    a free port and publishes its address with a random nonce; a stale entry points at
    a dead process, or at a store without that nonce, and is retried until fresh. Without
    torchrun's store (plain env://, Slurm, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1), rank 0
    hosts the store at MASTER_ADDR:MASTER_PORT as init_process_group would.
    """
    host, port = os.environ["MASTER_ADDR"], int(os.environ.get("MASTER_PORT", "29500"))
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    deadline = time.monotonic() + join_timeout
    if not agent_store:
        store = _connect(world, host, port, timeout, deadline, is_master=world.rank == 0)
        return store, (store, "")
    agent = _connect(world, host, port, datetime.timedelta(seconds=join_timeout), deadline)
    if world.rank == 0:
        own = _connect(world, host, 0, timeout, deadline, is_master=True)
        nonce = uuid.uuid4().hex
        own.set("ddp/nonce", nonce)
        agent.set(PUBLISHED, f"{host} {own.port} {nonce}")
        return own, (agent, nonce)
    tried = "nothing published yet"
    while time.monotonic() < deadline:
        try:
            found_host, found_port, nonce = agent.get(PUBLISHED).decode().split()
            tried = f"{found_host}:{found_port}"
            if not listening(found_host, int(found_port)):  # a dead attempt's store: skip it quietly
                time.sleep(0.1)
                continue
            probe = datetime.timedelta(seconds=2)
            store = _connect(world, found_host, int(found_port), probe, time.monotonic() + 2)
            if store.get("ddp/nonce").decode() == nonce:
                store.set_timeout(timeout)
                return store, (agent, nonce)
        except (DistributedError, RuntimeError, ValueError):
            pass  # a previous attempt's entry: its rank 0 is gone; wait for this attempt's
        time.sleep(0.1)
    raise DistributedError(
        f"rank {world.rank} could not join the process group within {join_timeout:g} s: rank 0's store "
        f"(published in torchrun's store at {host}:{port}) did not answer; last address tried: {tried}. "
        "Check that rank 0 started (its log, and torchrun's), that this node reaches rank 0's host on any "
        "port (firewalls), or raise --join-timeout if rank 0 starts slowly"
    )


def listening(host: str, port: int) -> bool:
    """Whether something accepts connections at host:port, asked with a plain socket.

    A TCPStore client aimed at a dead address retries until its timeout and logs each
    failure with a C++ stack trace (40 lines): a restart after a SIGKILL printed two.
    """
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _connect(
    world: World,
    host: str,
    port: int,
    timeout: datetime.timedelta,
    deadline: float,
    is_master: bool = False,
) -> dist.TCPStore:
    """A TCPStore server (``is_master``) or client, giving up at ``deadline``; ops then wait ``timeout``."""
    wait = datetime.timedelta(seconds=max(deadline - time.monotonic(), 0.1))
    try:
        store = dist.TCPStore(host, port, world.world_size, is_master, timeout=wait, wait_for_workers=False)
    except (RuntimeError, dist.DistNetworkError) as e:
        what = "open a store on" if is_master else "reach the store at"
        hint = (
            "the port is taken: pick another (or let torchrun pick one with --rdzv-endpoint=localhost:0)"
            if is_master
            else f"check that rank 0 is running and that {host}:{port} is reachable from this node"
        )
        raise DistributedError(
            f"rank {world.rank} could not join the process group: cannot {what} {host}:{port}: "
            f"{first_line(e)}. {hint[0].upper()}{hint[1:]}"
        ) from e
    store.set_timeout(timeout)
    return store


def _device_id(world: World) -> torch.device | None:
    return world.device if world.backend == "nccl" else None


def run_process(main: Callable[[], int]) -> None:
    """Run a process's ``main`` and exit with its code (``exit_process``)."""
    gc.freeze()  # the imports made ~10^6 objects that live to the end: no collection need walk them again
    exit_process(main())


def exit_process(code: int) -> None:
    """End a ``torchrun`` worker or CLI process with ``code``, without tearing the interpreter down.

    Everything is written and the process group is gone by now. What is left is interpreter
    shutdown: cycle collections that walk every object torch created, then the teardown of
    every module, about 0.5 s of CPU per process here for nothing the OS would not do. The
    exit handlers still run (loggers, trackers, child processes), then the process ends.
    """
    atexit._run_exitfuncs()  # what interpreter shutdown runs first; the rest is freeing memory
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code or 0))


def shutdown() -> None:
    """Leave the process group, if one was joined."""
    # DDP models sit in reference cycles: free dead ones now, while the interpreter is
    # whole; freed at interpreter exit, gloo's threads can abort the process.
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


@contextlib.contextmanager
def process_group(cfg: DistConfig) -> Iterator[World]:
    """Join for the duration of a block; leave on every exit path, errors included."""
    world = init(cfg)
    try:
        yield world
        barrier()  # gloo aborts a rank whose peer tears down mid-exchange: leave together
    finally:
        faults.before_leave(world.rank)
        shutdown()


def set_timeout(seconds: float) -> None:
    """The process group's collectives wait ``seconds`` for a missing rank from now on."""
    if world_size() > 1:
        dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=seconds))  # torchtitan's way, no public one


COMM_FAILURES = ("Connection closed by peer", "Connection reset", "Timed out", "timed out", "timeout", "NCCL", "gloo")


def is_comm_failure(e: BaseException) -> bool:
    """True for errors of a collective whose peer died or hung (gloo raises plain RuntimeErrors)."""
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and any(c in str(e) for c in COMM_FAILURES))


def is_timeout(e: BaseException) -> bool:
    """True for a collective that timed out waiting for a rank (as opposed to one whose peer closed the
    connection by dying)."""
    return is_comm_failure(e) and any(c in str(e) for c in ("timeout", "Timed out", "timed out"))


def active() -> bool:
    """True when a process group has been joined."""
    return dist.is_available() and dist.is_initialized()


def side_group(timeout_s: float | None = None) -> Any:
    """Called by every rank: a gloo group of all ranks beside the default one, for collectives made on another
    thread while training's go on (DCP's async save plans and gathers its metadata on it; ``ddp.replicas`` sends
    snapshots on another). ``timeout_s``: how long its collectives wait for a missing rank (gloo's 30 min
    default otherwise)."""
    timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    return dist.new_group(backend="gloo", timeout=timeout)


def rank() -> int:
    """Global rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def control_device() -> torch.device:
    """Where small control tensors live: the current GPU under NCCL, else the CPU."""
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank."""
    if world_size() > 1:
        dist.barrier()


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks of a few numbers (losses, counters, flags), in float64."""
    t = torch.tensor(values, dtype=torch.float64, device=control_device())
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_gather_floats(values: list[float]) -> list[list[float]]:
    """Every rank's few numbers, in rank order: one tensor collective (no pickling, as all_gather_objects does)."""
    return start_all_gather_floats(values)()


def start_all_gather_floats(values: list[float]) -> Callable[[], list[list[float]]]:
    """``all_gather_floats``, started now: the returned function waits for it and gives its rows, so the caller
    works on while the ranks' numbers travel."""
    mine = torch.tensor(values, dtype=torch.float64, device=control_device())
    if world_size() == 1:
        return lambda: [mine.tolist()]
    out = torch.empty(world_size() * len(values), dtype=torch.float64, device=mine.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    work = gather(out, mine, async_op=True)

    def rows() -> list[list[float]]:
        work.wait()
        return out.view(world_size(), len(values)).tolist()

    return rows


def broadcast(tensor: torch.Tensor, src: int = 0) -> None:
    """Overwrite ``tensor`` on every rank with rank ``src``'s, in place."""
    if world_size() > 1:
        dist.broadcast(tensor, src=src)


def all_gather_objects(obj: object) -> list:
    """Every rank's ``obj``, in rank order (small picklable messages only)."""
    if world_size() == 1:
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, src: int) -> object:
    """Rank ``src``'s ``obj`` on every rank (pickled: for a restore, not for every step)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def raise_if_any_failed(error: BaseException | None, what: str) -> None:
    """Called by every rank after a step that may fail on some ranks only.

    Each rank passes its own error (or None); if any rank failed, every rank raises a
    DistributedError that names the failing ranks, so none waits forever on the others.
    """
    message = None if error is None else f"{type(error).__name__}: {error}"
    failures = [(r, m) for r, m in enumerate(all_gather_objects(message)) if m is not None]
    if failures:
        detail = "; ".join(f"rank {r}: {m}" for r, m in failures)
        raise DistributedError(f"{what} failed on {len(failures)} rank(s): {detail}") from error


def log(world: World, message: str, *, all_ranks: bool = False, file=None) -> None:
    """Print ``[rank r/w] message`` on rank 0 (or every rank with all_ranks)."""
    if world.is_main or all_ranks:
        out = file or sys.stdout
        out.write(f"{world.prefix()} {message}\n")  # one write: lines of ranks sharing a pipe never interleave
        out.flush()


def spawn(fn: Callable[..., Any], nproc: int, *args: Any, start_method: str = "spawn") -> dict[int, Any]:
    """Run ``fn(*args)`` on ``nproc`` local processes through torch's public elastic launcher; {rank: result}.

    What torchrun does, from Python: a c10d rendezvous on a free port, one worker process
    per rank with torchrun's environment (``fn`` joins the group itself, e.g. with
    ``init``). ``fn`` must be importable by name (defined at a module's top level). The
    tests and the benchmarks start their in-process jobs here. ``start_method="forkserver"``
    forks each worker from a server that imported ``fn``'s module once, rather than
    importing torch again (2 s of CPU); the server's environment is the one it started with.
    """
    import multiprocessing

    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if start_method == "forkserver":  # torch._dynamo too: DDP and every optimizer import it when built (1 s of CPU)
        multiprocessing.set_forkserver_preload(["torch._dynamo", fn.__module__])

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        run_id=str(uuid.uuid4()),
        max_restarts=0,
        monitor_interval=0.1,
        start_method=start_method,
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as torchrun sets it: one thread per rank unless told
    return elastic_launch(config, fn)(*args)
