"""DDP's own averaging against a comm hook that leaves the gradients' sum undivided, the loss scaled by 1/world.

DDP divides every gradient by the world size in its reducer: one pass over the gradients,
in place, as each one is ready. With a comm hook, DDP leaves them alone, so a hook that only
sums (the loss divided by the world size beforehand: exact for a power of two ranks) frees
that pass, which the gradient norm could then take instead. Measured here, 2 gloo ranks, the
wide MLP of ``make bench``, each variant's steps in alternating blocks; ratios of step times,
median and quartiles over repeats, with and without the gradient norm the trainer takes.

    python bench/sum_hook.py                      # 20-1024-1024-10, 15 repeats
    python bench/sum_hook.py --hidden 256 --repeats 21
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from common import launch, median, paired


def sum_hook(_, bucket):  # unannotated: DDP checks annotations as objects, and these would be strings
    """All-reduce the bucket, undivided."""
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])


def variant(hidden: list[int], hooked: bool, norm: bool, x: torch.Tensor, y: torch.Tensor):
    """One step of an MLP under DDP (gradients as bucket views, as ``ddp.train`` runs it), SGD with momentum."""
    torch.manual_seed(0)
    widths = [x.shape[1], *hidden]
    layers = [m for a, b in itertools.pairwise(widths) for m in (nn.Linear(a, b), nn.ReLU())]
    model = DDP(nn.Sequential(*layers, nn.Linear(widths[-1], 10)), gradient_as_bucket_view=True)
    if hooked:
        model.register_comm_hook(None, sum_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scale = 1 / dist.get_world_size() if hooked else 1.0

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        (F.cross_entropy(model(x), y) * scale).backward()
        if norm:  # as the trainer's guard: one pass, read back
            bool(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).isfinite())
        opt.step()

    step.model = model
    return step


def bitwise_equal(hidden: list[int], x: torch.Tensor, y: torch.Tensor, steps: int = 5) -> bool:
    """Whether the sum hook, its loss scaled by 1/world, trains the same bits as DDP's own averaging."""
    plain, hooked = variant(hidden, False, False, x, y), variant(hidden, True, False, x, y)
    for _ in range(steps):
        plain(), hooked()
    pairs = zip(plain.model.parameters(), hooked.model.parameters(), strict=True)
    return all(torch.equal(a, b) for a, b in pairs)


def worker(hidden: list[int], repeats: int, block_s: float) -> dict:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    g = torch.Generator().manual_seed(dist.get_rank())
    x, y = torch.randn(64, 20, generator=g), torch.randint(0, 10, (64,), generator=g)
    fns = {(h, n): variant(hidden, h, n, x, y) for h in (False, True) for n in (True, False)}
    names = {(False, True): "ddp", (True, True): "sum hook", (False, False): "ddp, no norm",
             (True, False): "sum hook, no norm"}  # fmt: skip
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < block_s:
        fns[False, True]()
        count += 1
    steps = torch.tensor([count])
    dist.all_reduce(steps, op=dist.ReduceOp.MAX)  # every rank takes as many steps
    seconds: dict[str, list[float]] = {name: [] for name in names.values()}
    for rep in range(repeats):
        for key in list(fns) if rep % 2 == 0 else list(fns)[::-1]:
            dist.barrier()
            for _ in range(3):
                fns[key]()
            start = time.perf_counter()
            for _ in range(int(steps)):
                fns[key]()
            took = torch.tensor([time.perf_counter() - start])
            dist.all_reduce(took, op=dist.ReduceOp.MAX)
            seconds[names[key]].append(float(took))
    same = bitwise_equal(hidden, x, y)
    dist.destroy_process_group()
    return {"bitwise equal to ddp": same, "step_ms": {k: 1000 * median(v) / int(steps) for k, v in seconds.items()},
            "sum hook / ddp (throughput)": paired(seconds, "ddp", "sum hook"),
            "ddp: step time, norm / none": paired(seconds, "ddp", "ddp, no norm"),
            "sum hook: step time, norm / none": paired(seconds, "sum hook", "sum hook, no norm")}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, nargs="+", default=[1024, 1024], help="the MLP's hidden widths")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--block-s", type=float, default=0.5)
    args = p.parse_args()
    print(json.dumps(launch(worker, 2, args.hidden, args.repeats, args.block_s), indent=1))


if __name__ == "__main__":
    main()
