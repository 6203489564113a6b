"""A small GPT-style character language model, trained on any UTF-8 text file.

    ddp train --task charlm --task-arg text=README.md --steps 600
    ddp sample runs/default/charlm.params --prompt "The " --chars 200

Token and position embeddings, pre-LayerNorm blocks of causal self-attention (through
``scaled_dot_product_attention``) and an MLP, dropout, and an output layer tied to the token
embedding (one parameter under two names). The model keeps its alphabet and head count
as buffers, so a weights file alone can be sampled from.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ddp.errors import ConfigError
from ddp.task import Task


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a 4x MLP, each residual."""

    def __init__(self, embd: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(embd), nn.LayerNorm(embd)
        self.qkv, self.proj = nn.Linear(embd, 3 * embd), nn.Linear(embd, embd)
        self.mlp = nn.Sequential(nn.Linear(embd, 4 * embd), nn.GELU(), nn.Linear(4 * embd, embd), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
        x = x + F.dropout(self.proj(y.transpose(1, 2).reshape(b, t, c)), drop, self.training)
        return x + self.mlp(self.ln2(x))


class CharLM(nn.Module):
    """Characters in, next-character logits out: (batch, time) -> (batch, time, vocab)."""

    def __init__(
        self,
        vocab: torch.Tensor,
        block: int = 64,
        layers: int = 2,
        heads: int = 4,
        embd: int = 64,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if embd % heads:
            raise ConfigError(f"--task-arg embd={embd} must be a multiple of heads={heads}")
        self.register_buffer("vocab", torch.as_tensor(vocab, dtype=torch.int64).clone())  # code points, by id
        self.register_buffer("heads", torch.tensor(heads))
        self.tok = nn.Embedding(len(vocab), embd)
        self.pos = nn.Embedding(block, embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(embd, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(embd)
        self.head = nn.Linear(embd, len(vocab), bias=False)
        self.head.weight = self.tok.weight  # tied: one parameter, two names in the state_dict
        self.apply(_init)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.drop(self.tok(idx) + self.pos(torch.arange(t, device=idx.device)))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def _init(module: nn.Module) -> None:
    """GPT-2's initialisation: small weights, so the tied output layer starts near uniform logits."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class CharWindows(Dataset):
    """Windows of ``block + 1`` characters, one every ``stride``; ``jitter`` shifts each at random."""

    def __init__(self, ids: torch.Tensor, block: int, stride: int, jitter: bool) -> None:
        self.ids, self.block, self.stride, self.jitter = ids, block, stride, jitter
        self.n = max((len(ids) - block - 1 - (stride if jitter else 0)) // stride + 1, 0)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = i * self.stride + (int(torch.randint(self.stride, ())) if self.jitter else 0)
        chunk = self.ids[start : start + self.block + 1]
        return chunk[:-1], chunk[1:]


def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Next-character cross-entropy, averaged over every position."""
    x, y = batch
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def metrics(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """Summed loss over the batch's characters."""
    x, y = batch
    nll = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten(), reduction="sum")
    return {"loss": nll.item(), "count": y.numel()}


def with_perplexity(means: dict[str, float]) -> dict[str, float]:
    """Perplexity: exp of the mean loss per character."""
    return {**means, "perplexity": math.exp(min(means["loss"], 50.0))}


def read_text(text: str) -> str:
    """The UTF-8 text of a file; errors name it."""
    path = Path(text)
    if not path.is_file():
        raise ConfigError(f"--task-arg text={text}: no such file; give a UTF-8 text file to train on")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"--task-arg text={text}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def task(
    text: str | None = None,
    block: int = 64,
    layers: int = 2,
    heads: int = 4,
    embd: int = 64,
    dropout: float = 0.1,
    val_fraction: float = 0.1,
    vocab: str | None = None,
) -> Task:
    """Train on the first 90 % of ``text`` (windows every block/2 characters, jittered), hold out the rest.

    The model's alphabet is ``vocab``, or the text's characters (read now); with ``vocab``
    given, the text is read only when training needs it, so exported weights rebuild alone.
    """
    read = functools.cache(lambda: read_text(_needs(text)))
    vocab = vocab if vocab is not None else "".join(sorted(set(read())))

    @functools.cache
    def windows() -> tuple[CharWindows, CharWindows]:
        chars, index = read(), {c: i for i, c in enumerate(vocab)}
        unknown = sorted(set(chars) - set(index))
        if unknown:
            raise ConfigError(f"--task-arg text={text}: characters outside the model's vocabulary: {unknown[:10]}")
        ids = torch.tensor([index[c] for c in chars], dtype=torch.int64)
        cut = int(len(ids) * (1 - val_fraction))
        train = CharWindows(ids[:cut], block, max(block // 2, 1), jitter=True)
        val = CharWindows(ids[cut:], block, block, jitter=False)
        if len(train) == 0 or len(val) == 0:
            raise ConfigError(f"--task-arg text={text}: {len(chars)} characters are too few for windows of {block + 1}")
        return train, val

    codes = torch.tensor([ord(c) for c in vocab])
    return Task(
        model=lambda: CharLM(codes, block, layers, heads, embd, dropout),
        train_data=lambda: windows()[0],
        val_data=lambda: windows()[1],
        loss=loss,
        metrics=metrics,
        summarize=with_perplexity,
        blocks=lambda model: model.blocks,  # FSDP: one unit per transformer block; the tied embedding stays at the root
        name="charlm",
        tokens_per_sample=block,
        model_args={"vocab": vocab},
    )


def _needs(text: str | None) -> str:
    if text is None:
        raise ConfigError("task charlm needs a text file: --task-arg text=FILE (any UTF-8 text, e.g. README.md)")
    return text


def unigram_entropy(text: str) -> float:
    """Entropy of the text's character frequencies in nats: the loss of a model that ignores context."""
    counts: dict[str, int] = {}
    for c in text:
        counts[c] = counts.get(c, 0) + 1
    n = len(text)
    return -sum(k / n * math.log(k / n) for k in counts.values())


def from_state_dict(state: dict[str, torch.Tensor]) -> CharLM:
    """A CharLM shaped like ``state`` (weights not loaded); dropout 0, for sampling."""
    block, embd = state["pos.weight"].shape
    layers = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    return CharLM(state["vocab"], block, layers, int(state["heads"]), embd, dropout=0.0)


def generate(model: CharLM, prompt: str, chars: int, temperature: float = 1.0, seed: int = 0, top_k: int = 0) -> str:
    """``prompt`` continued by ``chars`` sampled characters (unknown prompt characters are dropped)."""
    vocab = [chr(c) for c in model.vocab.tolist()]
    index = {c: i for i, c in enumerate(vocab)}
    ids = sample(model, [index[c] for c in prompt if c in index] or [0], chars, temperature, top_k, seed)
    return "".join(vocab[i] for i in ids)


@torch.no_grad()
def sample(model: CharLM, ids: list[int], n: int, temperature: float = 1.0, top_k: int = 0, seed: int = 0) -> list[int]:
    """``ids`` continued by ``n`` token ids, each drawn from the softmax of the logits over ``temperature`` (below 1:
    safer choices), among the ``top_k`` likeliest only where ``top_k`` > 0 (nanoGPT's ``generate``)."""
    model.eval()
    block = model.pos.num_embeddings
    device = model.vocab.device
    ids = list(ids)
    g = torch.Generator(device=device).manual_seed(seed)
    for _ in range(n):
        x = torch.tensor([ids[-block:]], device=device)
        logits = model(x)[0, -1].double() / max(temperature, 1e-6)
        if 0 < top_k < len(logits):
            logits[logits < torch.topk(logits, top_k).values[-1]] = -math.inf
        ids.append(int(torch.multinomial(torch.softmax(logits, 0), 1, generator=g)))
    return ids
