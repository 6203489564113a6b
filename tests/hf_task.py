"""A user's own Hugging Face GPT-2, built from its config (nothing is downloaded), trained as a ``ddp.Task``.

Random token windows stand in for a corpus; the loss is the model's own (``labels=``), as a
``transformers`` user writes it. Loaded as ``--task tests/hf_task.py:make``.
"""

import torch
from torch.utils.data import TensorDataset
from transformers import GPT2Config, GPT2LMHeadModel

import ddp


def config(vocab: int, block: int, layers: int) -> GPT2Config:
    return GPT2Config(vocab_size=vocab, n_positions=block, n_embd=32, n_layer=layers, n_head=2,
                      bos_token_id=0, eos_token_id=0)  # fmt: skip


def loss(model: GPT2LMHeadModel, batch: list[torch.Tensor]) -> torch.Tensor:
    ids = batch[0]
    return model(input_ids=ids, labels=ids).loss


def make(samples: int = 512, vocab: int = 96, block: int = 16, layers: int = 2) -> ddp.Task:
    """Windows of ``block`` tokens of a repeating pattern with noise: a little to learn, quickly."""
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, vocab, (samples, 1), generator=g)
    ids = (start + torch.arange(block)) % vocab
    ids = torch.where(torch.rand(ids.shape, generator=g) < 0.1, torch.randint(0, vocab, ids.shape, generator=g), ids)
    return ddp.Task(
        model=lambda: GPT2LMHeadModel(config(vocab, block, layers)),
        train_data=TensorDataset(ids[64:]),
        val_data=TensorDataset(ids[:64]),
        loss=loss,
        metrics=lambda model, batch: {"loss": float(loss(model, batch)) * len(batch[0]), "count": len(batch[0])},
        probe={"input_ids": ids[:2]},
        name="gpt2",
        tokens_per_sample=block,
    )
