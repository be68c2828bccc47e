"""A Llama-like model for the GPU presets: RMSNorm, SwiGLU MLP, rotary (or learned) positions, GQA.

Random weights, no downloads. The blocks live in one `nn.ModuleList` named `layers`, so
`regions="auto"` finds them. `model(idx, targets)` returns (logits, loss), as `bench.gpt.GPT` does,
and the config has the `vocab_size` / `block_size` fields `bench.gpt.make_batch` reads.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    block_size: int = 4096  # tokens: the longest sequence (rotary tables / learned positions)
    n_layer: int = 8
    n_head: int = 16
    n_kv_head: int = 4  # < n_head: grouped-query attention; == n_head: multi-head
    dim: int = 1024
    ffn_multiple_of: int = 256  # the SwiGLU hidden size is 8/3 * dim rounded up to this
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rotary: bool = True  # False: learned absolute positions (an embedding of block_size rows)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def ffn_hidden(self) -> int:
        """SwiGLU hidden width: 2/3 of 4*dim, rounded up (the Llama recipe)."""
        hidden = int(2 * 4 * self.dim / 3)
        return self.ffn_multiple_of * -(-hidden // self.ffn_multiple_of)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.type_as(x) * self.weight


def rotary_tables(cfg: LlamaConfig, seq: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (seq, head_dim // 2), float32 (RoFormer, Su et al. 2021)."""
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=device, dtype=torch.float32)
                                   / cfg.head_dim)
    angles = torch.outer(torch.arange(seq, device=device, dtype=torch.float32), inv)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (even, odd) of the last dim of `x` (b, heads, t, head_dim) by the position angle."""
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        kv = cfg.n_kv_head * cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wk = nn.Linear(cfg.dim, kv, bias=False)
        self.wv = nn.Linear(cfg.dim, kv, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape
        cfg = self.cfg
        q = self.wq(x).view(b, t, cfg.n_head, cfg.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        if cos is not None:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           enable_gqa=cfg.n_kv_head != cfg.n_head)
        return self.wo(y.transpose(1, 2).reshape(b, t, cfg.dim))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x) (Shazeer 2020)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm block; `cos`/`sin` are the rotary tables (None with learned positions)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None = None,
                sin: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    """`model(idx, targets)` returns (logits, loss); loss (float32) is None without targets."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embeddings = None if cfg.rotary else nn.Embedding(cfg.block_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, 0.02) for every matrix, scaled down by sqrt(2 * n_layer) on residual outputs."""
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / (2 * self.cfg.n_layer) ** 0.5 if name.endswith(("wo.weight", "w2.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        b, t = idx.shape
        if t > self.cfg.block_size:
            raise ValueError(f"Llama: sequence of {t} tokens exceeds block_size={self.cfg.block_size}")
        x = self.tok_embeddings(idx)
        cos = sin = None
        if self.pos_embeddings is not None:
            x = x + self.pos_embeddings(torch.arange(t, device=idx.device))
        else:
            cos, sin = rotary_tables(self.cfg, t, idx.device)
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.output(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss
