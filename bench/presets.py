"""Named workloads: a model (config + class), a batch shape, and the runtime thresholds that suit it.

`cpu` is the default on a machine without a GPU (the embedded GPT, about a minute for the whole
bench on 2 cores); `quick` is the few-seconds smoke run; the `gpu-*` presets are Llama-like models
at 4k-16k tokens for a real GPU.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Union

import torch
from torch import nn

from bench.gpt import GPT, GPTConfig, make_batch
from bench.llama import Llama, LlamaConfig

ModelConfig = Union[GPTConfig, LlamaConfig]


@dataclass(frozen=True)
class Preset:
    """One workload. Sizes in tokens and bytes."""

    name: str
    description: str
    config: ModelConfig
    model_class: Callable[[ModelConfig], nn.Module]
    blocks: str  # qualified name of the nn.ModuleList holding the repeated blocks
    batch: int  # sequences per step
    seq: int  # tokens per sequence
    dtype: torch.dtype = torch.float32  # parameter (and so activation) dtype
    min_offload_bytes: int = 64 << 10  # storages below this are never offloaded (bytes)
    host_budget: str = "2GiB"  # pinned host memory the runtime may hold

    @property
    def tokens(self) -> int:
        """Tokens per step."""
        return self.batch * self.seq

    def with_sizes(self, *, batch: int | None = None, seq: int | None = None) -> "Preset":
        """The same workload at another batch or sequence length (the config grows to fit `seq`)."""
        seq = self.seq if seq is None else seq
        config = self.config
        if seq > config.block_size:
            config = dataclasses.replace(config, block_size=seq)
        return dataclasses.replace(self, batch=self.batch if batch is None else batch, seq=seq, config=config)

    def build(self, device: torch.device, seed: int = 0) -> nn.Module:
        """The model with seeded random weights, on `device`, in `dtype`, in train mode."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.model_class(self.config)
        return model.to(device=device, dtype=self.dtype).train()

    def batch_for(self, device: torch.device, seed: int = 0, batch: int | None = None,
                  seq: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Seeded token ids and next-token targets of shape (batch, seq) on `device`."""
        return make_batch(self.config, batch or self.batch, seq or self.seq, seed=seed, device=device)


def _llama(name: str, description: str, *, dim: int, n_layer: int, n_head: int, n_kv_head: int,
           seq: int, batch: int) -> Preset:
    cfg = LlamaConfig(vocab_size=32000, block_size=seq, n_layer=n_layer, n_head=n_head,
                      n_kv_head=n_kv_head, dim=dim)
    return Preset(name, description, cfg, Llama, "layers", batch=batch, seq=seq, dtype=torch.bfloat16,
                  min_offload_bytes=1 << 20, host_budget="24GiB")  # per contender: several live at once


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("cpu", "embedded GPT, 4 x 256-wide blocks, 2 x 256 tokens, float32 (about a minute on 2 cores)",
           GPTConfig(vocab_size=2048, block_size=256, n_layer=4, n_head=4, n_embd=256, dropout=0.1),
           GPT, "transformer.h", batch=2, seq=256),
    Preset("quick", "tiny GPT, 2 x 128-wide blocks, 4 x 64 tokens (a few seconds; the smoke test)",
           GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=128, dropout=0.1),
           GPT, "transformer.h", batch=4, seq=64, min_offload_bytes=16 << 10, host_budget="256MiB"),
    Preset("llama-tiny", "tiny Llama (RMSNorm, SwiGLU, rotary, GQA), 2 blocks, 4 x 64 tokens, float32 "
                         "(checks the Llama path on a CPU)",
           LlamaConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_kv_head=2, dim=128,
                       ffn_multiple_of=64),
           Llama, "layers", batch=4, seq=64, min_offload_bytes=16 << 10, host_budget="256MiB"),
    _llama("gpu-small", "Llama 8 x 1024-wide, GQA 16/4 heads, 4 x 4096 tokens, bf16",
           dim=1024, n_layer=8, n_head=16, n_kv_head=4, seq=4096, batch=4),
    _llama("gpu-8k", "Llama 8 x 2048-wide, GQA 16/4 heads, 2 x 8192 tokens, bf16",
           dim=2048, n_layer=8, n_head=16, n_kv_head=4, seq=8192, batch=2),
    _llama("gpu-16k", "Llama 8 x 2048-wide, GQA 16/4 heads, 1 x 16384 tokens, bf16",
           dim=2048, n_layer=8, n_head=16, n_kv_head=4, seq=16384, batch=1),
)}


def default_preset(device: torch.device) -> str:
    """`cpu` on the CPU, `gpu-small` on a GPU."""
    return "gpu-small" if device.type == "cuda" else "cpu"
