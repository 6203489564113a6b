"""The textbook's device helpers."""

import pytest
import torch

import ddp
from ddp.device import local_device, peak_tflops

from .helpers import ddp_command


def test_cpu_and_gpu_name_devices():
    assert ddp.cpu() == torch.device("cpu")
    assert ddp.gpu() == torch.device("cuda:0")
    assert ddp.gpu(3) == torch.device("cuda:3")


def test_num_gpus_matches_torch():
    assert ddp.num_gpus() == torch.cuda.device_count()


def test_try_gpu_falls_back_to_cpu_for_a_missing_gpu():
    assert ddp.try_gpu(ddp.num_gpus()) == ddp.cpu()  # one past the last GPU never exists
    assert ddp.try_gpu(10_000) == ddp.cpu()


def test_try_all_gpus_is_never_empty():
    devices = ddp.try_all_gpus()
    assert devices == ([ddp.gpu(i) for i in range(ddp.num_gpus())] or [ddp.cpu()])
    assert len(devices) >= 1


def test_tensors_and_models_move_between_devices():
    x = torch.ones(2, 3, device=ddp.try_gpu())
    assert x.device.type == ddp.try_gpu().type
    net = torch.nn.Linear(3, 1).to(ddp.try_gpu())
    assert next(net.parameters()).device.type == ddp.try_gpu().type
    assert (x.cpu() + 1).device == ddp.cpu()


def test_local_device_follows_local_rank_under_nccl(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert local_device("nccl") == torch.device("cuda:3")  # each local rank its own GPU, never cuda:0
    assert local_device("gloo") == ddp.cpu()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_try_gpu_returns_an_existing_gpu():
    assert ddp.try_gpu(0) == ddp.gpu(0)
    assert torch.ones(1, device=ddp.try_gpu()).is_cuda


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU case")
def test_device_cuda_without_a_gpu_is_a_usage_error(tmp_path):
    proc = ddp_command("train", "--device", "cuda", "--steps", "1", "--out", tmp_path)
    assert proc.returncode == 2 and "--device cuda: no CUDA GPU is visible" in proc.output


def test_local_device_puts_ranks_on_gpus_only_when_asked():
    assert local_device("gloo") == local_device("gloo", "cpu") == local_device("nccl", "cpu") == ddp.cpu()
    assert local_device("nccl") == ddp.gpu(0)  # LOCAL_RANK unset: 0
    assert local_device("gloo", "cuda") == ddp.gpu(0)  # gloo ranks share the visible GPUs


@pytest.mark.parametrize(
    ("name", "precision", "tf32", "peak"),
    [
        ("NVIDIA H100 PCIe", "bf16", False, 756.0),  # not the SXM part's figure, though "H100" matches both
        ("NVIDIA H100 80GB HBM3", "bf16", False, 989.4),
        ("NVIDIA H200", "fp32", True, 494.7),  # fp32 matmuls on tensor cores where TF32 is allowed
        ("NVIDIA A100-SXM4-80GB", "fp32", False, 19.5),
        ("Tesla V100-SXM2-16GB", "bf16", False, None),  # no bf16 there: no guess
        ("NVIDIA GeForce RTX 4090", "bf16", False, None),  # not in the table
    ],
)
def test_the_peak_for_mfu_is_the_gpus_own_in_the_runs_precision(monkeypatch, name, precision, tf32, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    before = torch.backends.cuda.matmul.allow_tf32  # a property of torch's own: monkeypatch cannot undo it
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        assert peak_tflops(torch.device("cuda", 0), precision) == peak
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert peak_tflops(torch.device("cuda", 0), precision, override=123.0) == 123.0
    assert peak_tflops(torch.device("cpu"), precision) is None
