"""A dense training forward over the runtime's decoder modules: packed rows, LoRA deltas, autograd.

The runtime's Transformer.forward is inference-only (paged KV cache, inference_mode); this one runs
the same modules and the same maths (RMSNorm, RoPE, GQA, SwiGLU) on a PackedBatch: tokens of several
sequences back to back, positions restarting per sequence, attention causal within each sequence and
never across (block-diagonal causal). The frozen base weights get no gradient; only the adapters do.

Attention scatters the packed q/k/v [T, H, D] into a zero-padded [S, H, max_seqlen, D] grid and runs
F.scaled_dot_product_attention(is_causal=True) on it: causality alone keeps every real query away from
the padding (which sits after a sequence's last token), so no mask tensor is built, and the matmuls of
the rest of the layer run on the T real tokens only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.fine_tuning.lora import FusedLora, LoraAdapters
from workers.fine_tuning.packing import PackedBatch
from workers.runtime.model import Attention, FeedForward, Transformer, apply_rope


def packed_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch,
                            sm_scale: float) -> torch.Tensor:
    """softmax(q k^T * sm_scale + block-diagonal causal mask) v: q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]."""
    t, hq, d = q.shape
    s, width = batch.num_sequences, batch.max_seqlen

    def grid(x: torch.Tensor) -> torch.Tensor:  # [T, H, D] -> [S, H, max_seqlen, D]
        if s == 1:
            return x.transpose(0, 1).unsqueeze(0)
        cells = x.new_zeros(s * width, x.shape[1], d).index_copy(0, batch.grid_index, x)
        return cells.view(s, width, x.shape[1], d).transpose(1, 2)

    out = F.scaled_dot_product_attention(grid(q), grid(k), grid(v), is_causal=True, scale=sm_scale,
                                         enable_gqa=hq != k.shape[1])  # [S, Hq, max_seqlen, D]
    if s == 1:
        return out[0].transpose(0, 1)
    return out.transpose(1, 2).reshape(s * width, hq, d).index_select(0, batch.grid_index)


class _Dropout:
    """PEFT's lora_dropout on the adapters' input, drawn from the trainer's own generator (resumable)."""

    def __init__(self, p: float, generator: torch.Generator | None) -> None:
        self.p = p if generator is not None else 0.0
        self.generator = generator

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0:
            return x
        keep = torch.empty(x.shape, dtype=torch.float32).bernoulli_(1.0 - self.p, generator=self.generator)
        return x * (keep.to(device=x.device, dtype=x.dtype) / (1.0 - self.p))


def _linear(module: nn.Linear, x: torch.Tensor, lora: FusedLora | None, scale: float, dropout: _Dropout
            ) -> torch.Tensor:
    out = F.linear(x, module.weight, module.bias)
    return out if lora is None else lora.add_delta(dropout(x), out, scale)


def _attention(attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: PackedBatch,
               adapters: LoraAdapters | None, layer: int, dropout: _Dropout) -> torch.Tensor:
    c = attn.config
    tokens = x.shape[0]
    scale = adapters.config.scale if adapters is not None else 0.0
    qkv_lora = adapters.get(layer, "attention.wqkv") if adapters is not None else None
    o_lora = adapters.get(layer, "attention.wo") if adapters is not None else None
    q, k, v = _linear(attn.wqkv, x, qkv_lora, scale, dropout).split([c.q_size, c.kv_size, c.kv_size], dim=-1)
    q = apply_rope(q.view(tokens, c.n_heads, c.head_dim), cos, sin)  # [T, Hq, D]
    k = apply_rope(k.view(tokens, c.n_kv_heads, c.head_dim), cos, sin)  # [T, Hkv, D]
    v = v.reshape(tokens, c.n_kv_heads, c.head_dim)
    out = packed_causal_attention(q, k, v, batch, attn.sm_scale)
    return _linear(attn.wo, out.reshape(tokens, c.q_size), o_lora, scale, dropout)


def _feed_forward(ff: FeedForward, x: torch.Tensor, adapters: LoraAdapters | None, layer: int,
                  dropout: _Dropout) -> torch.Tensor:
    scale = adapters.config.scale if adapters is not None else 0.0
    w13_lora = adapters.get(layer, "feed_forward.w13") if adapters is not None else None
    w2_lora = adapters.get(layer, "feed_forward.w2") if adapters is not None else None
    gate, up = _linear(ff.w13, x, w13_lora, scale, dropout).chunk(2, dim=-1)
    return _linear(ff.w2, F.silu(gate) * up, w2_lora, scale, dropout)


def hidden_states(model: Transformer, batch: PackedBatch, adapters: LoraAdapters | None = None, *,
                  dropout_generator: torch.Generator | None = None) -> torch.Tensor:
    """Final-normed hidden states [T, dim] of a packed row; adapters=None runs the base model.

    Adapter dropout runs only when a dropout_generator is given (training steps).
    """
    dropout = _Dropout(adapters.config.dropout if adapters is not None else 0.0, dropout_generator)
    x = model.tok_embeddings(batch.tokens)  # [T, dim]
    angles = batch.positions.float()[:, None] * model.inv_freq[None, :]  # [T, D/2] fp32
    cos = angles.cos().to(x.dtype)[:, None, :]
    sin = angles.sin().to(x.dtype)[:, None, :]
    for i, layer in enumerate(model.layers):
        x = x + _attention(layer.attention, layer.attention_norm(x), cos, sin, batch, adapters, i, dropout)
        x = x + _feed_forward(layer.feed_forward, layer.ffn_norm(x), adapters, i, dropout)
    return model.norm(x)


def target_logits(model: Transformer, hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Logits [N, V] fp32 of the target positions only (the output head is ~20% of a small model's FLOPs)."""
    return F.linear(hidden.index_select(0, batch.target_index), model.output_weight()).float()


def all_logits(model: Transformer, hidden: torch.Tensor) -> torch.Tensor:
    """Logits [T, V] fp32 of every position (tests, evaluation of whole sequences)."""
    return F.linear(hidden, model.output_weight()).float()
