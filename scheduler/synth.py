"""Synthetic profiles of decoder-only transformers, for what-if questions without a GPU.

A profile here is built from the model shape instead of measured: an embedding segment, one
recomputable segment per layer, and a head segment (final norm, LM head, loss).

Saved bytes per layer (bf16, e = 2 bytes; s = sequence, b = micro-batch, h = hidden,
f = FFN width, a = heads, g = kv_heads / heads). Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models", Eq. 1: a GPT layer saves s*b*h*(34 + 5*a*s/h)
bytes: two LayerNorm inputs (4sbh); attention QKV input, Q, K, V, projection input (10sbh) and
its dropout mask (sbh); softmax output (2as²b), its dropout mask (as²b) and output (2as²b); MLP
input (2sbh), GeLU input and output (2 x 8sbh at f = 4h) and its dropout mask (sbh).
We rebuild that sum tensor by tensor so it can be adjusted per model:

- GELU MLPs (gpt2-xl) keep the paper's terms exactly (f = 4h gives the 34).
- Llama-3 has no dropout: the three masks go (-2sbh, -as²b), and the softmax output is saved
  once (2as²b instead of 4as²b).
- GQA: K and V have kv_heads heads, so they save 2sbh*g each instead of 2sbh.
- SwiGLU: down(silu(gate(x)) * up(x)) saves x, gate(x) (silu's input), silu(gate(x)) and
  up(x) (the product's operands), and the product (down's input): 2sbh + 4 x 2sbf, where GeLU
  saves 2sbh + 2 x 2sbf. Llama-3-8B: 4 + (6 + 4g) + (2 + 8f/h) = 41 sbh at g = 1/4, f = 3.5h.
- Flash attention saves no s² term: its output (the projection input, counted already) and
  the fp32 log-sum-exp, 4asb bytes (Dao 2023, FlashAttention-2, §3.1.1); it regenerates
  dropout masks from the RNG state.
- Norms are taken as fused (input saved, the per-row statistics negligible).
- The head saves the final norm input, the LM head input and the fp32 log-probabilities of
  the loss (4*s*b*V), as cross-entropy on upcast logits does.

Times: forward = FLOPs / (peak_flops * mfu); a layer's FLOPs are 2 per parameter per token
(Kaplan et al. 2020) plus attention's QK^T and AV, 4*b*s²*h, halved for causal flash attention
which skips masked blocks; backward = 2 x forward (its two matmuls per forward matmul, same
sources). Every segment takes at least MIN_SEGMENT_S (kernel launches).
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Mapping

from .hardware import Hardware
from .profile import Profile, SegmentRecord, TensorRecord

MIN_SEGMENT_S = 50e-6  # assumed floor on one segment's forward: launch overheads, seconds
BF16 = 2  # bytes per element of activations
FP32 = 4
INT64 = 8


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer, as its config states it."""

    name: str
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    gated_mlp: bool  # SwiGLU (gate, up, down) rather than a two-matrix GeLU MLP
    dropout: bool  # trains with dropout, whose masks are saved


_MODELS = {
    m.name: m
    for m in (
        # Meta Llama 3 model card / config.json (8B and 70B).
        ModelShape("llama3-8b", layers=32, hidden=4096, ffn=14336, heads=32, kv_heads=8,
                   vocab=128256, gated_mlp=True, dropout=False),
        ModelShape("llama3-70b", layers=80, hidden=8192, ffn=28672, heads=64, kv_heads=8,
                   vocab=128256, gated_mlp=True, dropout=False),
        # OpenAI GPT-2 XL (Radford et al. 2019; Hugging Face config: n_embd 1600, n_layer 48).
        ModelShape("gpt2-xl", layers=48, hidden=1600, ffn=6400, heads=25, kv_heads=25,
                   vocab=50257, gated_mlp=False, dropout=True),
    )
}

#: Model presets by name, read-only.
MODELS: Mapping[str, ModelShape] = types.MappingProxyType(_MODELS)


def get_model(name: str) -> ModelShape:
    """The model preset called `name`; `ValueError` lists the known names otherwise."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"get_model: unknown model {name!r}; expected one of {sorted(MODELS)}") \
            from None


def layer_records(m: ModelShape, seq: int, batch: int, flash: bool) -> list[tuple[str, int]]:
    """(name, bytes) of every storage one layer saves, in the order the forward saves them."""
    sbh = seq * batch * m.hidden
    sbf = seq * batch * m.ffn
    g = m.kv_heads / m.heads
    probs = m.heads * seq * seq * batch  # elements of one attention-probability matrix
    out = [("attn_norm.in", BF16 * sbh), ("qkv.in", BF16 * sbh), ("q", BF16 * sbh),
           ("k", int(BF16 * sbh * g)), ("v", int(BF16 * sbh * g))]
    if flash:
        out.append(("attn.lse", FP32 * m.heads * seq * batch))
    else:
        out.append(("attn.probs", BF16 * probs))
        if m.dropout:
            out += [("attn.drop_mask", probs), ("attn.drop_out", BF16 * probs)]
    out.append(("o_proj.in", BF16 * sbh))
    if m.dropout:
        out.append(("attn.resid_mask", sbh))
    out += [("mlp_norm.in", BF16 * sbh), ("mlp.in", BF16 * sbh)]
    if m.gated_mlp:
        out += [("gate.out", BF16 * sbf), ("act.out", BF16 * sbf), ("up.out", BF16 * sbf),
                ("down.in", BF16 * sbf)]
    else:
        out += [("act.in", BF16 * sbf), ("fc2.in", BF16 * sbf)]
    if m.dropout:
        out.append(("mlp.resid_mask", sbh))
    return out


def layer_flops(m: ModelShape, seq: int, batch: int, flash: bool) -> float:
    """Forward FLOPs of one layer: 2 per weight per token, plus QK^T and AV (module docstring)."""
    h, g = m.hidden, m.kv_heads / m.heads
    weights = h * h * (2 + 2 * g) + (3 if m.gated_mlp else 2) * h * m.ffn
    attention = 4 * batch * seq * seq * h * (0.5 if flash else 1.0)
    return 2 * weights * seq * batch + attention


def transformer_profile(model: ModelShape | str, hardware: Hardware, *, seq: int,
                        batch: int = 1, flash: bool = True) -> Profile:
    """The synthetic profile of one training step of `model` at `seq` x `batch` on `hardware`.

    Tensors smaller than `offload_threshold(hardware)` are marked not offloadable, as the
    runtime's filter does.
    """
    m = get_model(model) if isinstance(model, str) else model
    for name, value in (("seq", seq), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"transformer_profile: {name} must be a positive int, got {value!r}")
    if not hardware.peak_flops > 0:
        raise ValueError(f"transformer_profile: hardware {hardware.name!r} has no peak_flops; "
                         "use a preset from scheduler.hardware.PRESETS")
    threshold = offload_threshold(hardware)
    rate = hardware.achieved_flops
    tokens = seq * batch
    segments: list[SegmentRecord] = []
    tensors: list[TensorRecord] = []

    def add(name: str, flops: float, recomputable: bool, inputs: int,
            records: list[tuple[str, int]]) -> None:
        index = len(segments)
        fwd = max(MIN_SEGMENT_S, flops / rate)
        segments.append(SegmentRecord(index, name, fwd, 2 * fwd, recomputable, inputs))
        for _, nbytes in records:
            tensors.append(TensorRecord(len(tensors), index, nbytes, nbytes >= threshold))

    add("embed", 0.0, False, 0, [("tokens", INT64 * tokens)])
    records = layer_records(m, seq, batch, flash)
    flops = layer_flops(m, seq, batch, flash)
    for i in range(m.layers):
        add(f"layers.{i}", flops, True, BF16 * tokens * m.hidden, records)
    add("head", 2.0 * tokens * m.hidden * m.vocab, False, 0,
        [("norm.in", BF16 * tokens * m.hidden), ("lm_head.in", BF16 * tokens * m.hidden),
         ("loss.logprobs", FP32 * tokens * m.vocab)])
    return Profile(
        segments=tuple(segments), tensors=tuple(tensors), bw_d2h=hardware.bw_d2h,
        bw_h2d=hardware.bw_h2d, transfer_latency_s=hardware.transfer_latency_s,
        signature=f"{m.name}:seq{seq}:batch{batch}:{'flash' if flash else 'eager'}",
        meta={"model": m.name, "seq": seq, "batch": batch, "flash": flash,
              "hardware": hardware.name, "layer_names": tuple(n for n, _ in records)})


def offload_threshold(hw: Hardware) -> int:
    """Smallest tensor worth a copy: one whose bandwidth term is at least 4x the fixed latency,
    i.e. a copy at >= 80% of link bandwidth. bytes = 4 * transfer_latency_s * bw_d2h."""
    return int(4 * hw.transfer_latency_s * hw.bw_d2h)
