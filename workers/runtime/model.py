"""A Llama-family decoder (Llama, Mistral, Qwen2) in the spirit of gpt-fast.

RMSNorm, RoPE (HF's rotate-half layout), grouped-query attention through kernels/ (paged decode for
one-token rows, paged varlen prefill after a cached prefix for the others, in one mixed step),
SwiGLU MLP, tied or untied output head, optional q/k/v bias. Weights come in already converted by a
loader (weights.py names, q/k/v and gate/up fused); forward never asks where they came from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from workers.runtime.config import ModelConfig, rope_inv_freq
from workers.runtime.kv_cache import KVCache


@dataclass
class ForwardBatch:
    """The tokens of one forward pass (a mixed step) and where each one's keys/values live in the cache.

    Rows are sequences. The first num_decodes rows feed one token each (decodes, and prefill chunks of
    one token); the others feed a run of new tokens after their cached prefix (prefills, prompt chunks).
    Tokens are packed in row order.
    """

    tokens: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64: index of each token in its sequence (RoPE angle, cache slot)
    slot_mapping: torch.Tensor  # [T] int64: flat cache slot (block * block_size + offset) of each token
    block_tables: torch.Tensor  # [B, max_blocks] int32: cache blocks of each row's sequence, in order
    seq_lens: torch.Tensor  # [B] int32: tokens in the cache per row after this step (cached + new)
    num_decodes: int  # leading rows with one new token each (tokens[:num_decodes])
    cu_seqlens: torch.Tensor | None = None  # [B - num_decodes + 1] int32: the other rows' new tokens in
    #                                         tokens[num_decodes:]; None when there are none
    logits_indices: torch.Tensor | None = None  # rows of T whose logits are wanted; None: all T
    # Known on the host, passed so that the Triton launchers need no device sync once per layer:
    max_decode_len: int | None = None  # largest seq_lens entry of the decode rows
    decode_shared_blocks: int = 0  # leading block-table entries all decode rows share (a cached prompt prefix)
    prefill_shared_blocks: int = 0  # the same for the prefill rows, all of it before their new tokens
    max_prefill_new: int | None = None  # most new tokens of one prefill row


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) in fp32, then scaled in the model dtype (as transformers does).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, H, D] by angles (cos, sin: [T, 1, D/2]); halves layout: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        qkv_out = config.q_size + 2 * config.kv_size
        self.wqkv = nn.Linear(config.dim, qkv_out, bias=config.qkv_bias)
        self.wo = nn.Linear(config.q_size, config.dim, bias=False)
        self.sm_scale = config.head_dim**-0.5

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch,
        k_cache: torch.Tensor, v_cache: torch.Tensor,
    ) -> torch.Tensor:
        c = self.config
        tokens = x.shape[0]
        q, k, v = self.wqkv(x).split([c.q_size, c.kv_size, c.kv_size], dim=-1)
        q = apply_rope(q.view(tokens, c.n_heads, c.head_dim), cos, sin)  # [T, Hq, D]
        k = apply_rope(k.view(tokens, c.n_kv_heads, c.head_dim), cos, sin)  # [T, Hkv, D]
        v = v.reshape(tokens, c.n_kv_heads, c.head_dim)
        kernels.write_kv(k, v, k_cache, v_cache, batch.slot_mapping)  # every new token, before attending
        d = batch.num_decodes
        parts = []
        if d:
            parts.append(kernels.decode_attention(q[:d], k_cache, v_cache, batch.block_tables[:d], batch.seq_lens[:d],
                                                  self.sm_scale, max_seq_len=batch.max_decode_len,
                                                  shared_blocks=batch.decode_shared_blocks))
        if tokens > d:
            parts.append(kernels.prefill_attention(q[d:], k_cache, v_cache, batch.cu_seqlens, batch.seq_lens[d:],
                                                   batch.block_tables[d:], self.sm_scale,
                                                   max_seqlen_q=batch.max_prefill_new,
                                                   shared_blocks=batch.prefill_shared_blocks))
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return self.wo(out.reshape(tokens, c.q_size))


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.w13 = nn.Linear(config.dim, 2 * config.hidden_dim, bias=False)  # gate rows, then up rows
        self.w2 = nn.Linear(config.hidden_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)


class Transformer(nn.Module):
    """The decoder. Build it on the meta device and `load_state_dict(..., assign=True)` the fused weights."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)  # [D/2] fp32

    def output_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
        """Logits [len(logits_indices) or T, V] in fp32; writes every token's k/v into the cache."""
        x = self.tok_embeddings(batch.tokens)  # [T, dim]
        angles = batch.positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2] fp32
        cos = angles.cos().to(x.dtype)[:, None, :]
        sin = angles.sin().to(x.dtype)[:, None, :]
        for i, layer in enumerate(self.layers):
            h = layer.attention_norm(x)
            x = x + layer.attention(h, cos, sin, batch, cache.k[i], cache.v[i])
            x = x + layer.feed_forward(layer.ffn_norm(x))
        if batch.logits_indices is not None:
            x = x[batch.logits_indices]
        return F.linear(self.norm(x), self.output_weight()).float()


def build_model(config: ModelConfig, state: dict[str, torch.Tensor], device: torch.device,
                dtype: torch.dtype) -> Transformer:
    """The decoder with `state` (fused names) moved to device/dtype; no random init is ever run."""
    with torch.device("meta"):
        model = Transformer(config)
    state = {name: t.to(device=device, dtype=dtype) for name, t in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.inv_freq = rope_inv_freq(config).to(device)
    return model.eval()
