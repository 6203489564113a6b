"""Bring your own model and data: a plain torchrun script using ddp's save/load/verify.

    torchrun --standalone --nproc-per-node=2 examples/own_model.py --out runs/own

The model has BatchNorm buffers and a lazy layer; the data is the user's own tensors.
After training, rank 0 saves the weights, every rank reloads them, and all must agree.
"""

import argparse
import gc
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import ddp


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.LazyLinear(32), nn.BatchNorm1d(32), nn.ReLU())
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def my_dataset(n: int = 600) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 1).long())


def train_and_verify(args: argparse.Namespace, device: torch.device) -> None:
    """Everything that holds the process group (DDP's reducer) lives and dies in here."""
    torch.manual_seed(0)
    model = TinyNet()
    model(torch.zeros(2, 8))  # materialise the lazy layer before DDP registers its hooks
    model = DDP(model.to(device), device_ids=[device] if device.type == "cuda" else None)

    data = my_dataset()
    sampler = DistributedSampler(data, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(data, batch_size=32, sampler=sampler, drop_last=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
            opt.step()

    os.makedirs(args.out, exist_ok=True)
    path = ddp.save_model(model, f"{args.out}/tiny.params")  # rank 0 writes, all wait
    fresh = TinyNet()
    fresh(torch.zeros(2, 8))
    ddp.load_model(fresh.to(device), path)
    probe = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    for buffer in ddp.unwrap(model).buffers():  # saved statistics are rank 0's: give them to all
        dist.broadcast(buffer, src=0)
    reference = ddp.unwrap(model).eval()(probe.to(device))
    report = ddp.verify_identical_outputs(fresh, probe, reference=reference)
    if dist.get_rank() == 0:
        print(f"own model: {report.world_size} ranks agree on {path} (max |Δ| = {report.max_diff:g})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/own")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = ddp.gpu(int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else ddp.cpu()
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=timedelta(minutes=5))  # never the 30-minute default
    try:
        train_and_verify(args, device)
        # DDP sits in reference cycles: collect it now, while the group is alive, and leave
        # together. Freed at interpreter exit instead, gloo can abort the process.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
